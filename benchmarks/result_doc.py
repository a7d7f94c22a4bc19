"""What every benchmark result records besides its numbers, and how it is written (JSON + report)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduces a run. Absolute paths (work folders: caches of built engines) are
    recorded by name, not as this machine's path."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{script}", *(Path(x).name if os.path.isabs(x) else x for x in args)])


def save(doc: dict, out: Path, write_report: Callable[[dict, Path], None], load_before: list[float]) -> dict:
    """Add the machine facts to `doc`, write it to `out` (JSON) and its report (`out` .md/.png), print the
    report; returns `doc`."""
    from vila_edge.bench.probes import machine_info, versions

    doc.update({"load_average_before": load_before, "load_average_after": load_average(), "machine": machine_info(),
                "versions": versions()})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    write_report(doc, out)
    print(out.with_suffix(".md").read_text())
    return doc
