"""AWQ int4 at a real model size on a CPU (issue 19): the streamed decoder build with AWQ, timed, peak RSS.

    python benchmarks/awq_real_size.py [--preset nvila-lite-2b] [--calib 32x512] [--threads 2]
        [--search-dtype auto] [--checkpoint DIR] [--work DIR]

Writes the preset's random-weight checkpoint (bf16, nothing downloaded) unless --checkpoint names one, then
runs ``build_llm_onnx(llm/, quant="awq")`` in this process, exactly what ``vila-edge build --llm-quant awq
--awq-calib 32x512`` does for the LLM: one layer read at a time, its AWQ scale and clip searches on the
calibration activations, int4 MatMulNBits written straight into the decoder. Random weights make the
quality meaningless but not the work: every layer runs the same searches on the same shapes as the real
checkpoint. Quality is measured on SmolLM2 (benchmarks/awq_quality.py). Records wall time, the process
peak RSS, per-layer seconds, the machine's load average before and after, and writes
benchmarks/results/awq_real_size_<preset>.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vila_edge.bench.probes import machine_info, versions

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nvila-lite-2b")
    parser.add_argument("--calib", default="32x512", help="sequences x tokens")
    parser.add_argument("--grid", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the quantizer")
    parser.add_argument("--search-dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--checkpoint", type=Path, help="existing checkpoint folder of the preset (has llm/)")
    parser.add_argument("--work", type=Path, help="where the checkpoint and decoder go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from vila_edge.builder.awq import AWQSettings, peak_rss_mib, resolve_search_dtype
    from vila_edge.builder.llm_onnx import build_llm_onnx
    from vila_edge.presets import write_preset_checkpoint

    samples, seqlen = (int(v) for v in args.calib.lower().split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="awq-real-size-"))
    checkpoint = args.checkpoint or work / f"{args.preset}-checkpoint"
    if not (checkpoint / "llm" / "config.json").is_file():
        write_preset_checkpoint(args.preset, checkpoint)
    settings = AWQSettings(w_bit=4, group_size=128, method="awq", calib_samples=samples, calib_seqlen=seqlen,
                           n_grid=args.grid, threads=args.threads, search_dtype=args.search_dtype)
    load_before = list(os.getloadavg())
    peak_before = peak_rss_mib()
    started = time.perf_counter()
    info = build_llm_onnx(checkpoint / "llm", work / "llm", quant="awq", group_size=128, awq_settings=settings)
    seconds = time.perf_counter() - started
    awq = json.loads((work / "llm" / "awq_stats.json").read_text())  # info["awq"] leaves the layers out
    layers = awq.get("layers", [])
    layer_seconds = [layer["seconds"] for layer in layers]
    output_bytes = sum(f.stat().st_size for f in (work / "llm").rglob("*") if f.is_file())
    result = {
        "what": f"AWQ int4 g128 decoder build of the {args.preset} geometry (random bf16 weights), streamed, "
                f"calibration {samples}x{seqlen}, {args.grid}-point grid, {args.threads} torch threads",
        "command": "python benchmarks/awq_real_size.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "preset": args.preset,
        "calib_samples": samples,
        "calib_seqlen": seqlen,
        "n_grid": args.grid,
        "threads": args.threads,
        "search_dtype": str(resolve_search_dtype(settings)).removeprefix("torch."),
        "wall_seconds": round(seconds, 1),
        "wall_minutes": round(seconds / 60, 1),
        "goal_minutes": 90,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_before_build_mib": peak_before,
        "int4_output_mib": round(output_bytes / (1 << 20), 1),
        "layers": len(layers),
        "layer_seconds_median": round(statistics.median(layer_seconds), 1) if layer_seconds else None,
        "layer_seconds": layer_seconds,
        "awq_summary": {k: v for k, v in awq.items() if k != "layers"},
        "decoder": {k: v for k, v in info.items() if k != "awq"},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
        "versions": versions(),
    }
    out = args.out or RESULTS / f"awq_real_size_{args.preset}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(result, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("layer_seconds", "machine", "versions")}, indent=2))
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(result["layer_seconds"])), result["layer_seconds"], color="#4a7")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("seconds")
    ax.set_title(f"AWQ {result['preset']}: {result['wall_minutes']} min total, peak RSS "
                 f"{result['peak_rss_mib'] / 1024:.1f} GiB ({result['search_dtype']} search, "
                 f"{result['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
