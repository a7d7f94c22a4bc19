"""`python -m vila_edge.bench --child pipeline|llm`: a benchmark child (see vila_edge.bench.child)."""

from vila_edge.bench.child import main

main()
