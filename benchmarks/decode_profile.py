"""Where a decode step's time goes, by ONNX Runtime op, at a preset's LLM geometry and several context lengths.

    python benchmarks/decode_profile.py [--preset nvila-lite-2b] [--contexts 300,1000,2000] [--steps 30]
        [--threads 2] [--kv-dtype float32] [--work-dir bench-work] [--out benchmarks/results/decode_profile.json]

The int4 decoder (our streamed RTN writer, g128, random weights) runs through OrtLLMEngine exactly as chat does
(shared past/present buffers, fixed I/O binding) with ONNX Runtime's profiler on; after the prompt and a
warm-up, `--steps` one-token steps are profiled. Per op type: microseconds per step and share of the kernels'
time. For GroupQueryAttention the bytes it must read (the cached K and V up to the context, every layer) give a
floor at the bandwidth probe's rate: how far the attention kernel is from reading the cache once.

Writes benchmarks/results/decode_profile.{json,md,png}.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_doc import command_line, load_average, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# ops that make up attention in either graph (grouped attention: builder.decoder_onnx._grouped_attention and the
# per-run index/mask subgraph; Add also counts the q/k/v bias adds of Qwen2, a few microseconds)
ATTENTION_OPS = {"GroupQueryAttention", "FusedMatMul", "MatMul", "Softmax", "ScatterND", "RotaryEmbedding", "Add",
                 "Transpose", "Reshape", "Split", "Where", "LessOrEqual", "Range", "Expand", "Concat", "Unsqueeze"}


def profile_steps(engine_dir: Path, context: int, steps: int, threads: int) -> dict:
    """Per-op microseconds per decode step with `context` positions cached (a fresh session per context)."""
    from vila_edge.backends.ort_llm import OrtLLMEngine

    with tempfile.TemporaryDirectory() as tmp:
        eng = OrtLLMEngine(engine_dir, threads=threads, max_context=context + steps + 16,
                           profile_prefix=str(Path(tmp) / "decode"))
        rng = np.random.default_rng(0)
        eng.forward(eng.embed(rng.integers(0, eng.vocab_size, context).tolist()))
        for _ in range(4):  # warm-up steps, not counted
            eng.forward(eng.embed([5]))
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.forward(eng.embed([5]))
        wall = (time.perf_counter() - t0) / steps
        events = json.loads(Path(eng.session.end_profiling()).read_text())
        kv_bytes = eng.kv_bytes() / eng.max_context  # per cached position, all layers
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-steps:]
    start = runs[0]["ts"]
    per_op: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            per_op[e["args"]["op_name"]] += e["dur"]
    kernels = sum(per_op.values())
    return {"context": context, "step_ms": round(wall * 1000, 3),
            "model_run_us": round(sum(r["dur"] for r in runs) / steps, 1),
            "kernels_us": round(kernels / steps, 1),
            "ops": {op: {"us_per_step": round(us / steps, 1), "share": round(us / kernels, 4)}
                    for op, us in per_op.most_common()},
            "kv_read_bytes": int(kv_bytes * context)}


def main(argv: list[str] | None = None) -> dict:
    from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint
    from vila_edge.bench.probes import default_threads, measure_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nvila-lite-2b")
    ap.add_argument("--contexts", default="300,1000,2000")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--kv-dtype", default="float32", choices=("float32", "float16"))
    ap.add_argument("--attention", default="gqa", choices=("gqa", "grouped"))
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "decode_profile.json")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    load_before = load_average()
    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    suffix = ("" if a.kv_dtype == "float32" else f"-kv-{a.kv_dtype}") + ("" if a.attention == "gqa" else "-grouped")
    engine = ensure_llm_engine(ckpt / "llm", Path(a.work_dir) / f"{a.preset}-llm-int4-rtn-g128{suffix}", quant="rtn",
                               group_size=128, threads=threads, kv_dtype=a.kv_dtype, attention=a.attention)
    rows = []
    for context in (int(c) for c in a.contexts.split(",")):
        row = profile_steps(engine, context, a.steps, threads)
        probe = measure_bandwidth(threads)["read_gbs"]
        gqa = sum(v["us_per_step"] for op, v in row["ops"].items() if op in ATTENTION_OPS)
        row["attention_us"] = round(gqa, 1)
        row["probe_gbs"] = round(probe, 1)
        row["attention_floor_us"] = round(row["kv_read_bytes"] / (probe * 1e9) * 1e6, 1)
        row["attention_vs_floor"] = round(gqa / row["attention_floor_us"], 2) if row["attention_floor_us"] else None
        rows.append(row)
        print(f"  {context:5d} cached: step {row['step_ms']:.1f} ms; " + ", ".join(
            f"{op} {v['share']:.0%}" for op, v in list(row["ops"].items())[:3])
            + f"; attention {row['attention_vs_floor']}x its KV-read floor at {probe:.0f} GB/s", file=sys.stderr)
    doc = {"what": "decode step time by ONNX Runtime op (profiler), int4 decoder at a preset's geometry",
           "command": command_line("decode_profile.py", argv),
           "preset": a.preset, "threads": threads, "steps": a.steps, "kv_dtype": a.kv_dtype, "attention": a.attention,
           "engine": engine.name,
           "contexts": rows}
    return save(doc, a.out, write_report, load_before)


def write_report(doc: dict, out: Path) -> None:
    rows = doc["contexts"]
    ops = sorted({op for r in rows for op in r["ops"]}, key=lambda op: -max(r["ops"].get(op, {}).get("share", 0)
                                                                             for r in rows))[:6]
    lines = [f"# Decode step by op: {doc['preset']} int4 decoder, {doc['threads']} threads, {doc['kv_dtype']} KV, "
             f"{doc.get('attention', 'gqa')} attention", "",
             f"ONNX Runtime's profiler over {doc['steps']} one-token steps after the context (OrtLLMEngine as chat "
             "runs it). Microseconds per step (share of the kernels' time).", "",
             "| cached positions | step (ms, profiled) | " + " | ".join(ops)
             + " | attention, all its ops (us) | KV-read floor (us) | attention / floor |",
             "|---|---|" + "---|" * (len(ops) + 3)]
    for r in rows:
        cells = [f"{r['ops'][op]['us_per_step']:.0f} ({r['ops'][op]['share']:.0%})" if op in r["ops"] else "-"
                 for op in ops]
        lines.append(f"| {r['context']} | {r['step_ms']:.1f} | " + " | ".join(cells)
                     + f" | {r['attention_us']:.0f} | {r['attention_floor_us']:.0f} | {r['attention_vs_floor']}x |")
    lines += ["", "The floor: every layer's cached K and V read once at the bandwidth probe's rate "
              "(taken right after each profile). Reproduce: `" + doc["command"] + "`. Machine: "
              f"{doc['machine'].get('cpu')}, load average before {doc['load_average_before']}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    for op in ops:
        ms = np.array([r["ops"].get(op, {}).get("us_per_step", 0.0) / 1000 for r in rows])
        ax.bar(x, ms, 0.6, bottom=bottom, label=op)
        bottom += ms
    ax.set_xticks(x, [f"{r['context']} cached" for r in rows])
    ax.set_ylabel("ms per decode step (profiled)")
    ax.set_title(f"{doc['preset']} int4 decode step by op, {doc['threads']} threads", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
