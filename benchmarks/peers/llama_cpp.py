#!/usr/bin/env python
"""llama.cpp peer: the same LLM geometry with the same random weights, Q4_0, the same thread count.

    python benchmarks/peers/llama_cpp.py --preset nvila-lite-2b --threads 2
        [--ours DIR] [--group-size 128] [--prompt-tokens 300] [--new-tokens 128] [--runs 3]
        [--work-dir bench-work] [--out benchmarks/results]

1. writes the preset's LLM (random weights, vila_edge.presets) unless --work-dir already has it;
2. converts it to an F16 GGUF with the `gguf` package, streaming one tensor at a time (norms and
   biases F32, as convert_hf_to_gguf does), with the tiny tokenizer padded to the vocabulary size;
3. quantizes it to Q4_0 with llama.cpp's own `llama_model_quantize` (default parameters, i.e. what
   `llama-quantize in.gguf out.gguf Q4_0` gives: the tied table/LM head is kept at Q6_K);
4. runs our ONNX Runtime int4 decoder (built by vila_edge.builder.llm_onnx, or --ours) and llama.cpp
   interleaved, each in a fresh process, with a bandwidth probe right after every run;
5. prints decode and prefill ratios and writes benchmarks/results/bench_<preset>-vs-llama.cpp_*.json/png.

Needs `llama-cpp-python` (compiles llama.cpp: several minutes on 2 cores) - not part of CI:
    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `llama_cpp` package: drop the folder.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np  # noqa: E402

from vila_edge import bench  # noqa: E402
from vila_edge.generate import timed_greedy_run, timed_runs  # noqa: E402

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    parts = hf.split(".")
    if parts[:2] == ["model", "layers"]:
        return f"blk.{parts[2]}." + _NAMES[".".join(parts[3:])]
    raise KeyError(hf)


def _vocab(llm_dir: Path, rows: int) -> tuple[list[str], list[int], list[str], int]:
    """(tokens, token types, merges, eos id) of the checkpoint's tokenizer, padded to `rows`."""
    import gguf

    tj = json.loads((llm_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    special = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    tokens = [f"[PAD{i}]" for i in range(rows)]
    types = [int(gguf.TokenType.UNUSED)] * rows
    for tok, i in vocab.items():
        if i < rows:
            tokens[i] = tok
            types[i] = int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    cfg = json.loads((llm_dir / "tokenizer_config.json").read_text())
    eos = vocab.get(cfg.get("eos_token") or "<|im_end|>", 0)
    return tokens, types, merges, eos


def write_gguf_f16(llm_dir: Path, out: Path) -> Path:
    """HF Qwen2/Llama folder (safetensors, bf16/fp16) -> F16 GGUF, one tensor in memory at a time."""
    import gguf
    import torch
    from safetensors import safe_open

    if out.is_file():
        return out
    cfg = json.loads((llm_dir / "config.json").read_text())
    arch = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}[cfg["architectures"][0]]
    index = llm_dir / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(llm_dir / "model.safetensors"), "pt") as f:
            wm = {k: "model.safetensors" for k in f.keys()}
    names = sorted(wm, key=lambda n: (0, 0) if "embed" in n else (
        (1, int(n.split(".")[2])) if n.startswith("model.layers.") else (2, 0)))
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(llm_dir.parent.name)
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    rows = int(cfg["vocab_size"])
    tokens, types, merges, eos = _vocab(llm_dir, rows)
    if arch == "qwen2":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
    else:
        w.add_tokenizer_model("llama")
        w.add_bos_token_id(1)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_eos_token_id(eos)

    def shape_of(name):
        with safe_open(str(llm_dir / wm[name]), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    plan = []
    for n in names:
        shp = shape_of(n)
        dt = np.float32 if len(shp) == 1 else np.float16
        plan.append((n, shp, dt))
        w.add_tensor_info(gguf_name(n), shp, np.dtype(dt), int(np.prod(shp)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for n, _, dt in plan:
        with safe_open(str(llm_dir / wm[n]), "pt") as f:
            t = f.get_tensor(n)
        w.write_tensor_data(t.to(torch.float32 if dt == np.float32 else torch.float16).numpy())
        del t
    w.close()
    tmp.rename(out)
    return out


def quantize_q4_0(src: Path, out: Path, threads: int) -> Path:
    import llama_cpp as L

    if out.is_file():
        return out
    params = L.llama_model_quantize_default_params()
    params.ftype = L.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")
    tmp.rename(out)
    return out


def decode_bytes(gguf_path: Path) -> int:
    """Bytes one decode step reads: every tensor but a separate token_embd (one row is gathered)."""
    import gguf

    r = gguf.GGUFReader(str(gguf_path))
    names = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(names.values())
    if "output.weight" in names:
        total -= names.get("token_embd.weight", 0)
    return total


def child(spec: dict) -> dict:
    """Load the GGUF with llama.cpp's C API; prefill random ids; decode forced greedy tokens."""
    import llama_cpp as L

    L.llama_backend_init()
    p, n = int(spec["prompt_tokens"][0]), int(spec["new_tokens"])
    threads = int(spec["threads"])
    t0 = time.perf_counter()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(spec["model"].encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp cannot load {spec['model']}")
    cp = L.llama_context_default_params()
    cp.n_ctx = p + n + 16
    cp.n_batch = max(p, 32)
    cp.n_ubatch = max(p, 32)
    cp.n_threads = threads
    cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    load_s = time.perf_counter() - t0
    rss_load = bench._rss()
    nv = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, nv, p)
    mem = L.llama_get_memory(ctx)

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(nv,))

    tok = (L.llama_token * 1)()

    def decode_one_token(t: int) -> np.ndarray:
        tok[0] = t
        if L.llama_decode(ctx, L.llama_batch_get_one(tok, 1)) != 0:
            raise SystemExit("llama_decode failed (decode)")
        return logits()

    def one(tokens: int) -> dict:
        L.llama_memory_clear(mem, True)
        arr = (L.llama_token * p)(*[int(i) for i in prompt])

        def prefill() -> np.ndarray:
            if L.llama_decode(ctx, L.llama_batch_get_one(arr, p)) != 0:
                raise SystemExit("llama_decode failed (prefill)")
            return logits()

        return timed_greedy_run(prefill, decode_one_token, lambda lg: int(np.argmax(lg)), p, tokens)

    runs = timed_runs(one, warmup=spec["warmup"], warmup_tokens=spec["warmup_tokens"], runs=spec["runs"], tokens=n,
                      on_progress=bench._progress)
    hp = {"n_vocab": nv, "n_ctx": cp.n_ctx, "type_k": "f16", "flash_attn_type": int(cp.flash_attn_type)}
    L.llama_free(ctx)
    L.llama_model_free(model)
    kvp = int(spec.get("kv_bytes_per_position", 0))  # f16 K and V (llama.cpp's default cache type)
    return {"cases": [{"image": None, "prompt_tokens": p, "runs": runs}], "load_s": load_s,
            "rss_after_load_bytes": rss_load, "peak_rss_bytes": bench._peak_rss(), "kv_cache_bytes": kvp * cp.n_ctx,
            "kv_bytes_per_position": kvp, "describe": {"backend": "llama.cpp", **hp}, "threads": threads}


def contender(preset: str, work_dir: Path, opts: bench.BenchOptions, *, threads: int,
              omp_wait: str = "default") -> bench.Contender | list[bench.Contender]:
    """The llama.cpp contender; omp_wait "passive" / "both" adds OMP_WAIT_POLICY=passive variants."""
    from vila_edge.presets import preset_config

    ckpt = bench.ensure_preset_checkpoint(preset, work_dir, llm_only=True)
    f16 = write_gguf_f16(ckpt / "llm", Path(work_dir) / f"{preset}-f16.gguf")
    q4 = quantize_q4_0(f16, Path(work_dir) / f"{preset}-q4_0.gguf", threads)
    cfg = preset_config(preset)
    spec = {"model": str(q4), "prompt_tokens": list(opts.prompt_tokens), "new_tokens": opts.new_tokens, "runs": 1,
            "warmup": opts.warmup, "warmup_tokens": opts.warmup_tokens, "threads": threads,
            "kv_bytes_per_position": cfg.llm.kv_bytes_per_token_fp16}
    base = bench.Contender(name="llama.cpp Q4_0", cmd=[sys.executable, str(Path(__file__).resolve()), "--child"],
                           spec=spec, weight_bytes=decode_bytes(q4),
                           kv_bytes_per_position=cfg.llm.kv_bytes_per_token_fp16, config=None, precision="q4_0",
                           kind="peer", manifest={"gguf": q4.name, "quantize": "llama_model_quantize Q4_0 (default)"})
    passive = bench.Contender(**{**base.__dict__, "name": "llama.cpp Q4_0 OMP passive",
                                 "env": {"OMP_WAIT_POLICY": "passive"}})
    return {"default": base, "passive": passive, "both": [base, passive]}[omp_wait]


def main(argv=None) -> dict:
    if argv is None and sys.argv[1:2] == ["--child"]:
        bench.child_entry(child)
        return {}
    a = bench.llm_comparison_args(__doc__, argv)
    threads = a.threads or bench.default_threads()
    return bench.run_llm_comparison(
        a, [lambda opts: contender(a.preset, a.work_dir, opts, threads=threads, omp_wait=a.llama_omp_wait)],
        tag="llama.cpp")


if __name__ == "__main__":
    main()
