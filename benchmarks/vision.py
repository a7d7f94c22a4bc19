"""CPU vision-tower latency per tile: ONNX Runtime fp32 / int8 vs PyTorch eager fp32 (not a test).

Real SigLIP-so400m geometry with random weights (hidden 1152, 27 layers of which 26 run for
select_layer -2, 16 heads, MLP 4304, patch 14), at 384 (VILA1.5) and 448 (NVILA). The ONNX graphs
are produced by the builder's own code path (`vila_edge.builder.vision_onnx`), so this measures what
`vila-edge build --int8-vision` ships. All variants run in this one process with the same thread
count, interleaved round by round (the order rotates each round) so drifting machine load hits them
alike; the median per-tile latency (batch 1) is reported.

    python benchmarks/vision.py                      # 384 + 448, 2 threads, 3 rounds
    python benchmarks/vision.py --sizes 448 --rounds 5
    python benchmarks/vision.py --layers 3 --rounds 1 --no-save   # smoke run

Writes benchmarks/results/vision_cpu.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOALS = {"ort_fp32_speedup": 1.5, "ort_int8_speedup": 2.5, "int8_cosine": 0.995}
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "logical_cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            if key.strip() in ("Model name", "Thread(s) per core", "Core(s) per socket", "L2 cache", "L3 cache"):
                info[key.strip()] = val.strip()
            if key.strip() == "Flags":
                flags = set(val.split())
                info["isa"] = sorted(f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                               "avx512_bf16", "amx_int8", "amx_bf16", "fma"})
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / (1 << 30), 1)
    except ImportError:
        pass
    return info


def versions() -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "transformers": transformers.__version__}


def make_tower(size: int, layers: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vila_edge.config import VisionConfig
    from vila_edge.reference.vision import SelectedFeatures

    cfg = SiglipVisionConfig(image_size=size, num_hidden_layers=layers, **SO400M)
    siglip = SiglipVisionModel(cfg).eval()  # HF init: random weights at the real scale
    vcfg = VisionConfig(tower="siglip", image_size=size, patch_size=14, hidden_size=1152, num_layers=layers,
                        num_heads=16, intermediate_size=4304, layer_norm_eps=1e-6, select_layer=-2,
                        select_feature="cls_patch", tiling="resize")
    return SelectedFeatures(siglip, vcfg).eval(), vcfg


def tiles_for(size: int, n: int, seed: int = 0) -> np.ndarray:
    from vila_edge.builder.vision_onnx import synthetic_image
    from vila_edge.media.tiling import normalize

    return normalize([synthetic_image(size, size, seed + i) for i in range(n)], (0.5,) * 3, (0.5,) * 3)


def bench_size(size: int, layers: int, threads: int, rounds: int, work: Path, log) -> dict:
    import torch

    from vila_edge.builder import vision_onnx as vo

    torch.manual_seed(0)
    tower, vcfg = make_tower(size, layers)
    n_params = sum(p.numel() for p in tower.parameters())
    tokens = vcfg.tokens_per_tile
    # FLOPs per tile (multiply-add = 2): patch conv + per layer qkvo, MLP, and the two attention matmuls
    h, m = 1152, 4304
    flops = 2 * tokens * 3 * 14 * 14 * h + vcfg.layers_used * (2 * tokens * (4 * h * h + 2 * h * m) + 4 * tokens * tokens * h)

    geom = vo.VisionGeometry(size, tokens, h, h, tokens, h)
    fp32, int8 = work / f"tower{size}.fp32.onnx", work / f"tower{size}.int8.onnx"
    t0 = time.perf_counter()
    vo.export_graph(tower, "tower", fp32, geom)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vo.quantize_int8(fp32, int8)
    quant_s = time.perf_counter() - t0
    log(f"  {size}: exported in {export_s:.0f}s, quantized in {quant_s:.0f}s")

    torch.set_num_threads(threads)
    held = {"tower": tower, "fp32": vo.ort_session(fp32, threads), "int8": vo.ort_session(int8, threads)}
    del tower
    x = tiles_for(size, 1, seed=7)
    xt = torch.from_numpy(x)

    def eager():
        with torch.inference_mode():
            return held["tower"](xt).numpy()

    variants = {"pytorch_eager_fp32": eager,
                "ort_fp32": lambda: vo.run_graph(held["fp32"], x),
                "ort_int8": lambda: vo.run_graph(held["int8"], x)}
    outputs = {k: f() for k, f in variants.items()}  # warm-up (first-run allocations, ORT graph prep)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            t0 = time.perf_counter()
            variants[k]()
            times[k].append(time.perf_counter() - t0)
        log(f"  {size}: round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names))

    # accuracy: ORT fp32 vs eager on the timed tile; int8 vs fp32 on 4 synthetic tiles
    fp32_err = float(np.abs(outputs["ort_fp32"] - outputs["pytorch_eager_fp32"]).max())
    xs = tiles_for(size, 4, seed=11)
    cos = vo.cosine_stats(vo.run_graph(held["fp32"], xs), vo.run_graph(held["int8"], xs))
    med = {k: statistics.median(v) for k, v in times.items()}
    eager_t = med["pytorch_eager_fp32"]
    res = {
        "image_size": size, "tokens_per_tile": tokens, "layers_run": vcfg.layers_used, "params": n_params,
        "gflop_per_tile": round(flops / 1e9, 1),
        "seconds_per_tile": {k: {"median": med[k], "min": min(v), "all": v} for k, v in times.items()},
        "gflops": {k: round(flops / med[k] / 1e9, 1) for k in med},
        "speedup_vs_eager": {k: eager_t / med[k] for k in med},
        "speedup_vs_eager_best_run": {k: min(times["pytorch_eager_fp32"]) / min(v) for k, v in times.items()},
        "ort_fp32_vs_eager_max_abs": fp32_err,
        "int8_vs_fp32_cosine": cos,
        "file_mb": {"fp32": round(sum(p.stat().st_size for p in work.glob(f"tower{size}.fp32.onnx*")) / 1e6, 1),
                    "int8": round(sum(p.stat().st_size for p in work.glob(f"tower{size}.int8.onnx*")) / 1e6, 1)},
        "export_seconds": round(export_s, 1), "quantize_seconds": round(quant_s, 1),
    }
    held.clear()
    outputs.clear()
    gc.collect()
    for p in work.glob(f"tower{size}.*"):
        p.unlink()
    return res


def write_markdown(data: dict, path: Path) -> None:
    m = data["machine"]
    lines = [
        "# Vision tower on the CPU: ONNX Runtime vs PyTorch eager",
        "",
        f"SigLIP-so400m geometry, random weights, {data['layers_run']} of 27 layers run (select_layer -2), "
        f"batch 1 (per tile), {data['threads']} threads, {data['rounds']} interleaved rounds (median). "
        f"Generated by `python benchmarks/vision.py` on {data['date']}.",
        "",
        f"Machine: {m.get('Model name', '?')}, {m.get('logical_cpus')} logical CPUs "
        f"({m.get('Thread(s) per core', '?')} thread/core), {m.get('memory_gib', '?')} GiB, ISA {', '.join(m.get('isa', []))}; "
        f"{data['versions']}. Load average before/after: {data['load_before']} / {data['load_after']} "
        f"(the machine is shared; see the notes).",
        "",
        "| tile | GFLOP/tile | PyTorch eager fp32 | ORT fp32 | ORT int8 | ORT fp32 speedup | ORT int8 speedup | int8 cosine (mean / min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        s, sp, c = r["seconds_per_tile"], r["speedup_vs_eager"], r["int8_vs_fp32_cosine"]
        best = r["speedup_vs_eager_best_run"]
        lines.append(
            f"| {r['image_size']} ({r['tokens_per_tile']} tok) | {r['gflop_per_tile']} | "
            f"{s['pytorch_eager_fp32']['median']:.2f} s | {s['ort_fp32']['median']:.2f} s | {s['ort_int8']['median']:.2f} s | "
            f"{sp['ort_fp32']:.2f}x (best runs {best['ort_fp32']:.2f}x) | {sp['ort_int8']:.2f}x (best runs {best['ort_int8']:.2f}x) | "
            f"{c['mean']:.5f} / {c['min']:.5f} |")
    lines += ["", "Goals: ORT fp32 >= 1.5x eager, ORT int8 >= 2.5x eager with cosine >= 0.995."]
    for r in data["results"]:
        g = r["goals"]
        lines.append(f"- {r['image_size']}: fp32 {'met' if g['ort_fp32_speedup'] else 'NOT met'}, "
                     f"int8 {'met' if g['ort_int8_speedup'] else 'NOT met'}, "
                     f"cosine {'met' if g['int8_cosine'] else 'NOT met'}; ORT fp32 vs eager max abs {r['ort_fp32_vs_eager_max_abs']:.2e}")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    path.write_text("\n".join(lines) + "\n")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"pytorch_eager_fp32": "PyTorch eager fp32", "ort_fp32": "ONNX Runtime fp32", "ort_int8": "ONNX Runtime int8"}
    sizes = [r["image_size"] for r in data["results"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.25
    for i, k in enumerate(labels):
        vals = [r["seconds_per_tile"][k]["median"] for r in data["results"]]
        bars = ax.bar([j + (i - 1) * width for j in range(len(sizes))], vals, width, label=labels[k])
        for b, r in zip(bars, data["results"], strict=True):
            ax.annotate(f"{r['speedup_vs_eager'][k]:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(sizes)), [f"{s}x{s} tile" for s in sizes])
    ax.set_ylabel("seconds per tile (median, batch 1)")
    ax.set_title(f"SigLIP-so400m ({data['layers_run']} layers), {data['threads']} threads, "
                 f"{data['machine'].get('Model name', 'CPU')}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 448])
    ap.add_argument("--layers", type=int, default=27, help="encoder layers in the model (27 = so400m; 26 run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    load_before = [round(x, 2) for x in os.getloadavg()]
    results = []
    with tempfile.TemporaryDirectory(prefix="vila-edge-bench-") as work:
        for size in args.sizes:
            log(f"tile {size}x{size}: exporting + timing ({args.rounds} rounds)")
            r = bench_size(size, args.layers, args.threads, args.rounds, Path(work), log)
            r["goals"] = {"ort_fp32_speedup": r["speedup_vs_eager"]["ort_fp32"] >= GOALS["ort_fp32_speedup"],
                          "ort_int8_speedup": r["speedup_vs_eager"]["ort_int8"] >= GOALS["ort_int8_speedup"],
                          "int8_cosine": r["int8_vs_fp32_cosine"]["mean"] >= GOALS["int8_cosine"]}
            results.append(r)
            log(f"  {size}: eager {r['seconds_per_tile']['pytorch_eager_fp32']['median']:.2f}s, "
                f"ORT fp32 {r['seconds_per_tile']['ort_fp32']['median']:.2f}s "
                f"({r['speedup_vs_eager']['ort_fp32']:.2f}x), int8 {r['seconds_per_tile']['ort_int8']['median']:.2f}s "
                f"({r['speedup_vs_eager']['ort_int8']:.2f}x), int8 cosine {r['int8_vs_fp32_cosine']['mean']:.5f}")
    data = {
        "benchmark": "vision tower per-tile latency, CPU", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(), "versions": versions(), "threads": args.threads, "rounds": args.rounds,
        "layers_run": args.layers - 1, "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "goals": GOALS, "results": results,
        "notes": [
            "Random weights (HF init): latency is weight-independent, but the int8 cosine is optimistic; real SigLIP "
            "activations have outliers (TinyChat applies SmoothQuant alpha 0.3 before W8A8), so re-check the cosine on "
            "the real checkpoint (the builder records it in manifest.json: vision.checks.tower_int8_vs_fp32).",
            "int8 = ONNX Runtime dynamic quantization of every MatMul (int8 per-channel weights, uint8 per-tensor "
            "dynamic activations), attention softmax and LayerNorm stay fp32.",
            "PyTorch eager = transformers SiglipVisionModel layers (sdpa attention) under torch.inference_mode, "
            "torch.set_num_threads(threads).",
            "Why ORT fp32 is ~2x eager here: this torch wheel's BLAS is MKL (torch.__config__: BLAS_INFO=mkl), whose "
            "sgemm reaches ~50 GFLOPS on 2 cores of this AMD EPYC, while ONNX Runtime's MLAS uses AVX-512 (~100 GFLOPS); "
            "on an Intel CPU the fp32 gap will be smaller. The int8 graph spends ~30% of its time in the fp32 attention "
            "matmuls + softmax (not quantized), which is why int8 gains less at 448 (1024 tokens) than at 384.",
            "The machine is shared with other jobs: variants are interleaved round by round so load drift hits all of "
            "them; compare the speedups, not the absolute seconds, across runs.",
        ],
    }
    print(json.dumps({r["image_size"]: {"speedup": r["speedup_vs_eager"], "cosine": r["int8_vs_fp32_cosine"]["mean"]}
                      for r in results}, indent=1))
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "vision_cpu.json").write_text(json.dumps(data, indent=2) + "\n")
        write_markdown(data, args.out / "vision_cpu.md")
        plot(data, args.out / "vision_cpu.png")
        log(f"wrote {args.out}/vision_cpu.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
