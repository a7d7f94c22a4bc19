"""Benchmark core behind `vila-edge bench` and the scripts in benchmarks/.

What is measured, per engine and case (image size x prompt length):
- vision latency per tile, and time to first token split into preprocess / vision / merge+projector /
  prefill (the runtime's own per-stage timings);
- decode tokens/s: (generated - 1) / decode time over `new_tokens` (>= 128 by default) forced tokens
  (stop tokens are ignored while benchmarking), after an unmeasured warm-up; the median of `runs`
  runs, with min and max;
- peak resident memory of the process that ran the engine (each engine runs in a fresh child process,
  so loading or building anything else does not count);
- memory bandwidth (read, and STREAM-style copy) with numpy on 512 MiB arrays, one thread per engine
  thread, probed right after every run (bandwidth on shared VMs drifts: each run is reported as a share
  of the probe taken next to it), and a matmul probe (fp32 MatMul in ONNX Runtime, same threads);
- the decode roofline: bandwidth / (LLM weight bytes a token reads + KV bytes of the mean context),
  and the planner's prediction (vila_edge.plan) for this machine next to the measurement.

Several engines (or contenders: our LLM engine, llama.cpp, transformers) run interleaved in rounds.
Output: a rich table, a JSON document valid against benchmarks/schema/bench.schema.json, and a PNG.

Modules:
- `probes`          bandwidth and matmul probes, machine and package versions, stats
- `child`           the child protocol (spec on stdin, `VILA_EDGE_BENCH_RESULT <json>` on stdout) and
                    the two children: the full pipeline and the LLM alone
- `run`             options, contenders, the interleaved rounds
- `report`          the result document, ratios, planner predictions, table and chart
- `preset_engines`  a preset's random checkpoint written and built (the one module above the builder)
- `cli`             `vila-edge bench` and the LLM-only comparisons of benchmarks/
"""

from vila_edge.bench.child import (
    RESULT_MARK,
    _peak_rss,  # _rss, _peak_rss, _progress: the peer scripts' children report through these too
    _progress,
    _rss,
    child_entry,
    child_llm,
    child_pipeline,
    prompt_of_tokens,
    run_child,
    synthetic_image,
)
from vila_edge.bench.cli import llm_comparison_args, run_bench_cli, run_llm_comparison
from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint, ensure_preset_engine
from vila_edge.bench.probes import default_threads, machine_info, measure_bandwidth, measure_matmul, stats, versions
from vila_edge.bench.report import make_document, print_report, schema_path, validate, write_outputs
from vila_edge.bench.run import BenchOptions, Contender, engine_contender, run_interleaved

__all__ = [
    "RESULT_MARK", "BenchOptions", "Contender", "_peak_rss", "_progress", "_rss", "child_entry", "child_llm",
    "child_pipeline", "default_threads", "engine_contender", "ensure_llm_engine", "ensure_preset_checkpoint",
    "ensure_preset_engine", "llm_comparison_args", "machine_info", "make_document", "measure_bandwidth",
    "measure_matmul", "print_report", "prompt_of_tokens", "run_bench_cli", "run_child", "run_interleaved",
    "run_llm_comparison", "schema_path", "stats", "synthetic_image", "validate", "versions", "write_outputs",
]
