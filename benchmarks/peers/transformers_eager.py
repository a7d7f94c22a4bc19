#!/usr/bin/env python
"""Hugging Face transformers peer: the same LLM geometry and random weights in fp32, eager PyTorch
(no torch.compile; default SDPA attention), the same thread count.

    python benchmarks/peers/transformers_eager.py --preset nvila-lite-2b --threads 2
        [--ours DIR] [--group-size 128] [--prompt-tokens 300] [--new-tokens 128] [--runs 3]
        [--work-dir bench-work] [--out benchmarks/results]

Writes the preset's LLM (random weights) unless --work-dir has it, loads it with
AutoModelForCausalLM in float32 (torch.set_num_threads = --threads), prefills random ids with
`logits_to_keep=1`, then decodes forced greedy tokens with the KV cache; runs interleaved with our ONNX
Runtime int4 decoder, each in a fresh process, a bandwidth probe after every run; prints the ratio.
fp32 reads ~4 bytes per weight per token: expect ~1-3 tok/s at the 1.5B geometry on 2 cores (use
--new-tokens 32 to keep a run short). Needs torch + transformers (the `export` extra). Not in CI.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from vila_edge import bench
from vila_edge.generate import timed_greedy_run, timed_runs


def child(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    threads = int(spec["threads"])
    torch.set_num_threads(threads)
    p, n = int(spec["prompt_tokens"][0]), int(spec["new_tokens"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    rss_load = bench._rss()
    vocab = int(model.config.vocab_size)
    prompt = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, p)).long()[None]

    past = None

    def prefill():
        nonlocal past
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        return out.logits[0, -1]

    def decode_one_token(tok: int):
        nonlocal past
        out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        return out.logits[0, -1]

    @torch.inference_mode()
    def one(tokens: int) -> dict:
        return timed_greedy_run(prefill, decode_one_token, lambda lg: int(torch.argmax(lg)), p, tokens)

    runs = timed_runs(one, warmup=spec["warmup"], warmup_tokens=spec["warmup_tokens"], runs=spec["runs"], tokens=n,
                      on_progress=bench._progress)
    m = model.config
    kv = 2 * m.num_hidden_layers * m.num_key_value_heads * (m.hidden_size // m.num_attention_heads) * 4 * (p + n)
    return {"cases": [{"image": None, "prompt_tokens": p, "runs": runs}], "load_s": load_s,
            "rss_after_load_bytes": rss_load, "peak_rss_bytes": bench._peak_rss(), "kv_cache_bytes": kv,
            "describe": {"backend": "transformers", "torch": torch.__version__, "dtype": "float32",
                         "attn_implementation": getattr(m, "_attn_implementation", "?")}, "threads": threads}


def contender(preset: str, work_dir: Path, opts: bench.BenchOptions, *, threads: int) -> bench.Contender:
    from vila_edge.plan import llm_linear_params
    from vila_edge.presets import preset_config

    ckpt = bench.ensure_preset_checkpoint(preset, work_dir, llm_only=True)
    cfg = preset_config(preset)
    m = cfg.llm
    # fp32 bytes one token reads: linear layers, the LM head (the tied table), norms/biases; not the embedding
    weight = 4 * (llm_linear_params(cfg) + m.vocab_size * m.hidden_size + (2 * m.num_layers + 1) * m.hidden_size)
    spec = {"model": str(ckpt / "llm"), "prompt_tokens": list(opts.prompt_tokens), "new_tokens": opts.new_tokens,
            "runs": 1, "warmup": opts.warmup, "warmup_tokens": min(opts.warmup_tokens, 4), "threads": threads}
    return bench.Contender(name="transformers fp32 eager", cmd=[sys.executable, str(Path(__file__).resolve()), "--child"],
                           spec=spec, weight_bytes=weight, kv_bytes_per_position=2 * m.kv_bytes_per_token_fp16,
                           precision="fp32", kind="peer", manifest={"source": str(ckpt / "llm")})


def main(argv=None) -> dict:
    if argv is None and sys.argv[1:2] == ["--child"]:
        bench.child_entry(child)
        return {}
    a = bench.llm_comparison_args(__doc__, argv)
    threads = a.threads or bench.default_threads()
    return bench.run_llm_comparison(
        a, [lambda opts: contender(a.preset, a.work_dir, opts, threads=threads)], tag="transformers")


if __name__ == "__main__":
    main()
