"""Bytes per token and decode speed: the int4 decoder with the default int8 LM head vs an int4 head (issue 19).

    python benchmarks/lm_head_decode.py [--preset nvila-lite-2b] [--context 300] [--steps 48] [--rounds 5]
        [--threads 2] [--work-dir bench-work] [--out benchmarks/results/lm_head_decode.json]

Both decoders come from our streamed RTN writer (g128 body) and the same random weights at the preset's LLM
geometry; only `lm_head` differs (`build_llm_onnx(lm_head="int4")`: our asymmetric int4 RTN, the smallest
decoder). Decode is bandwidth-bound, so the speed should follow the decoder's bytes. The quality cost of an
int4 head is measured on real weights in results/awq_quality.md (SmolLM2-135M, g64: +2.7 perplexity for the
head alone, int8 +0.02); random weights cannot say it at this size.

Writes benchmarks/results/lm_head_decode.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache_dtype import timed_rounds  # noqa: E402
from result_doc import command_line, load_average, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
HEADS = ("int8", "int4")


def main(argv: list[str] | None = None) -> dict:
    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint
    from vila_edge.bench.probes import default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nvila-lite-2b")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "lm_head_decode.json")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    load_before = load_average()
    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    names = {"int8": f"{a.preset}-llm-int4-rtn-g128", "int4": f"{a.preset}-llm-int4-rtn-g128-head-int4"}
    dirs = {head: ensure_llm_engine(ckpt / "llm", Path(a.work_dir) / names[head], quant="rtn", group_size=128,
                                    threads=threads, lm_head=head) for head in HEADS}
    engines = {head: OrtLLMEngine(d, threads=threads, max_context=a.context + a.steps + 16) for head, d in dirs.items()}
    rows = timed_rounds(engines, [a.context], a.steps, a.rounds)
    for head, d in dirs.items():
        rows[head]["decoder_bytes"] = sum(f.stat().st_size for f in d.glob("model.onnx*"))
    doc = {"what": "int4 decoder decode speed with an int8 vs an int4 LM head (bytes per token)",
           "command": command_line("lm_head_decode.py", argv),
           "preset": a.preset, "context": a.context, "steps": a.steps, "rounds": a.rounds, "threads": threads,
           "heads": rows,
           "decode_speedup": round(rows["int4"]["decode_tok_s"][str(a.context)]
                                   / rows["int8"]["decode_tok_s"][str(a.context)], 3),
           "bytes_ratio": round(rows["int8"]["decoder_bytes"] / rows["int4"]["decoder_bytes"], 3)}
    return save(doc, a.out, write_report, load_before)


def write_report(doc: dict, out: Path) -> None:
    ctx = str(doc["context"])
    lines = [f"# LM head bytes and decode: {doc['preset']} int4 decoder, {doc['threads']} threads", "",
             f"{doc['steps']} decode steps after {doc['context']} cached positions, median of {doc['rounds']} "
             "alternating rounds (random weights; quality on real weights: results/awq_quality.md).", "",
             "| LM head | decoder bytes (MB) | decode tok/s | prefill (s) |", "|---|---|---|---|"]
    for head, r in doc["heads"].items():
        lines.append(f"| {head} | {r['decoder_bytes'] / 1e6:.0f} | {r['decode_tok_s'][ctx]:.2f} | {r['prefill_s']:.2f} |")
    lines += ["", f"int4 / int8 head: {doc['bytes_ratio']:.2f}x fewer bytes, decode {doc['decode_speedup']:.2f}x.", "",
              f"Machine: {doc['machine'].get('cpu')}, load average before {doc['load_average_before']}. "
              f"Reproduce: `{doc['command']}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    heads = list(doc["heads"])
    ax.bar(heads, [doc["heads"][h]["decode_tok_s"][ctx] for h in heads], 0.5)
    ax.set_ylabel("decode tok/s")
    ax.set_xlabel("LM head")
    ax.set_title(f"{doc['preset']}: {doc['decode_speedup']:.2f}x for {doc['bytes_ratio']:.2f}x fewer bytes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
