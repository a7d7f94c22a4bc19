"""Geometry presets: the real layer sizes of released checkpoints, with random weights.

Speed and memory depend on shapes, not on trained values, so a preset lets `vila-edge bench` and
`vila-edge plan` run without downloading anything:

- `preset_config(name)` builds the resolved `VilaConfig` from the preset's JSON dicts (no files);
- `write_preset_checkpoint(name, path)` writes a dev-layout checkpoint (`config.json`, `llm/`,
  `vision_tower/`, `mm_projector/`) whose safetensors shards are streamed to disk one tensor at a
  time (header first, then each tensor generated in 64 MiB chunks), so an 8B checkpoint is written
  with well under 1 GiB of RAM.

Sizes come from reference doc §1.3, §4.4 and §9. NVILA-Lite-2B's LLM is Qwen2(.5)-1.5B: hidden 1536,
intermediate 8960, 28 layers, 12 heads / 2 KV heads, tied embeddings. Its embedding row count is
[UNVERIFIED] in the reference doc; the preset uses 151648 rows, the value NVILA-8B's llm/config.json
has (Qwen2's base checkpoints have 151936, 0.2% more LM-head bytes).

Random values: every weight is a float16/bfloat16 with a random sign, an exponent of 2^-7 or 2^-6
and random mantissa bits (|w| in [0.0078, 0.031), std ~0.019, like trained projections); norm weights
are in [1, 1.125). Values are generated from bits (no float RNG), seeded per tensor name.
The tokenizer is a tiny BPE trained on CPython's docs (vila_edge.testing) padded with filler entries
to the preset's vocabulary size, so every id the LM head can emit decodes.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vila_edge.config import VilaConfig, config_from_dicts
from vila_edge.errors import VilaEdgeError
from vila_edge.staging import staged_dir

_SIGLIP = dict(patch_size=14, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
               num_attention_heads=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
               attention_dropout=0.0, model_type="siglip_vision_model", architectures=["SiglipVisionModel"])


def _pre(size: int) -> dict:
    return {"do_resize": True, "size": {"height": size, "width": size}, "resample": 3, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor"}


@dataclass(frozen=True)
class Preset:
    name: str
    checkpoint_name: str  # folder name of the real checkpoint (the chat format is derived from it)
    description: str
    top: dict
    llm: dict
    vision: dict
    projector: dict
    preprocessor: dict
    tokenizer: str  # "llama" | "qwen2"
    vision_head: bool  # VILA1.5's tower file still holds the unused attention-pooling head (doc §1.3)

    def config(self) -> VilaConfig:
        return config_from_dicts(top=self.top, llm=self.llm, vision=self.vision, projector=self.projector,
                                 preprocessor=self.preprocessor, name=self.checkpoint_name,
                                 has_chat_template=self.tokenizer == "qwen2", where=f"preset {self.name}")


PRESETS: dict[str, Preset] = {
    "vila1.5-3b": Preset(
        name="vila1.5-3b",
        checkpoint_name="VILA1.5-3b",
        description="VILA1.5-3b: Sheared-LLaMA-2.7B + SigLIP-so400m-384 + mlp_downsample (doc §1.3, §9)",
        top={"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "_name_or_path": "VILA1.5-3b",
             "hidden_size": 2560, "mm_hidden_size": 1152, "mm_vision_select_layer": -2,
             "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize", "s2": False,
             "s2_scales": "336,672,1008", "s2_max_split_size": 336, "mm_use_im_start_end": False,
             "mm_use_im_patch_token": False, "num_video_frames": 8, "model_dtype": "torch.bfloat16"},
        llm={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2560,
             "intermediate_size": 6912, "num_hidden_layers": 32, "num_attention_heads": 20,
             "num_key_value_heads": 20, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "bos_token_id": 1, "eos_token_id": 2, "model_max_length": 4096, "tokenizer_model_max_length": 4096,
             "tokenizer_padding_side": "right", "torch_dtype": "bfloat16"},
        vision={**_SIGLIP, "image_size": 384},
        projector={"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
                   "model_type": "v2l_projector", "torch_dtype": "bfloat16", "transformers_version": "4.36.2"},
        preprocessor=_pre(384),
        tokenizer="llama",
        vision_head=True,
    ),
    "nvila-lite-2b": Preset(
        name="nvila-lite-2b",
        checkpoint_name="NVILA-Lite-2B",
        description="NVILA-Lite-2B: Qwen2.5-1.5B + SigLIP-so400m-448 + mlp_downsample_3x3_fix, dynamic tiles (doc §9, §11.B)",
        top={"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "_name_or_path": "NVILA-Lite-2B",
             "hidden_size": 1536, "mm_hidden_size": 1152, "mm_vision_select_layer": -2,
             "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "dynamic", "min_tiles": 1,
             "max_tiles": 12, "num_video_frames": 8, "mm_use_im_start_end": False,
             "mm_use_im_patch_token": False, "model_dtype": "torch.bfloat16"},
        llm={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
             "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151648, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": True, "hidden_act": "silu",
             "bos_token_id": 151643, "eos_token_id": 151645, "model_max_length": 4096, "torch_dtype": "bfloat16"},
        vision={**_SIGLIP, "image_size": 448, "vision_use_head": False},
        projector={"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample_3x3_fix",
                   "model_type": "v2l_projector", "torch_dtype": "bfloat16", "transformers_version": "4.46.0"},
        preprocessor=_pre(448),
        tokenizer="qwen2",
        vision_head=False,
    ),
    "nvila-8b": Preset(
        name="nvila-8b",
        checkpoint_name="NVILA-8B",
        description="NVILA-8B: Qwen2.5-7B + SigLIP-so400m-448, dynamic S2 448/896/1344 + mlp_downsample (doc §1.2, §1.3, §9)",
        top={"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "_name_or_path": "NVILA-8B",
             "hidden_size": 3584, "mm_hidden_size": 3456, "mm_vision_select_layer": -2,
             "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "dynamic_s2", "s2": False,
             "dynamic_s2": True, "s2_scales": "448,896,1344", "s2_max_split_size": 448,
             "s2_resize_output_to_scale_idx": -1, "num_video_frames": 8, "fps": 0.0,
             "mm_use_im_start_end": False, "mm_use_im_patch_token": True, "model_dtype": "torch.bfloat16"},
        llm={"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
             "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 151648, "max_position_embeddings": 32768,
             "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "bos_token_id": 151643, "eos_token_id": 151645, "model_max_length": 8192, "torch_dtype": "bfloat16"},
        vision={**_SIGLIP, "image_size": 448, "vision_use_head": False},
        projector={"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
                   "model_type": "v2l_projector", "torch_dtype": "bfloat16", "transformers_version": "4.46.0"},
        preprocessor=_pre(448),
        tokenizer="qwen2",
        vision_head=False,
    ),
    "vila1.5-40b": Preset(
        name="vila1.5-40b",
        checkpoint_name="VILA1.5-40b",
        description="VILA1.5-40b: Yi-34B + InternViT-6B-448px-V1-2 (all 45 layers) + mlp_downsample (doc §2.1, §4.4, §9)",
        # V15 scripts/v1_5/release/40b/3_sft.sh: --vision_tower OpenGVLab/InternViT-6B-448px-V1-2 --mm_projector
        # mlp_downsample --mm_vision_select_layer -1 --image_aspect_ratio resize --version hermes-2; the select
        # feature is the args default "patch" (1024 tokens: the downsample needs the square grid).
        top={"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "_name_or_path": "VILA1.5-40b",
             "hidden_size": 7168, "mm_hidden_size": 3200, "mm_vision_select_layer": -1,
             "mm_vision_select_feature": "patch", "image_aspect_ratio": "resize", "s2": False,
             "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "num_video_frames": 8,
             "model_dtype": "torch.bfloat16"},
        # Yi-34B's published geometry (Nous-Hermes-2-Yi-34B) [UNVERIFIED: VILA1.5-40b's own llm/config.json;
        # the base model is not named in the release scripts ($BASE_MODEL_PATH); hermes-2 chat suggests it]
        llm={"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 7168,
             "intermediate_size": 20480, "num_hidden_layers": 60, "num_attention_heads": 56,
             "num_key_value_heads": 8, "vocab_size": 64000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_theta": 5000000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "bos_token_id": 1, "eos_token_id": 7, "model_max_length": 4096, "tokenizer_model_max_length": 4096,
             "torch_dtype": "bfloat16"},
        # InternViT-6B-448px-V1-2's config.json (45 layers: V1-2 drops the last 3 of 48) [UNVERIFIED values]
        vision={"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "image_size": 448,
                "patch_size": 14, "hidden_size": 3200, "intermediate_size": 12800, "num_attention_heads": 25,
                "num_hidden_layers": 45, "num_channels": 3, "qkv_bias": False, "qk_normalization": True,
                "norm_type": "rms", "hidden_act": "gelu", "layer_norm_eps": 1e-6, "use_flash_attn": True,
                "dropout": 0.0, "drop_path_rate": 0.0, "attention_dropout": 0.0, "initializer_factor": 0.1},
        projector={"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample",
                   "model_type": "v2l_projector", "torch_dtype": "bfloat16", "transformers_version": "4.36.2"},
        # VILA ignores it (InternVisionPreprocessor: 448, ImageNet mean/std, hard-coded)
        preprocessor={"crop_size": 448, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                      "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
                      "size": 448},
        tokenizer="llama",
        vision_head=False,
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise VilaEdgeError(f"preset {name!r} is not one of: {', '.join(PRESETS)}") from None


def preset_config(name: str) -> VilaConfig:
    """The resolved VilaConfig of a preset (no checkpoint needed)."""
    return get_preset(name).config()


# ---- tensor lists ----------------------------------------------------------------------------


def _vision_head(h: int, i: int) -> dict[str, tuple[int, ...]]:
    p = "vision_model.head."
    return {p + "probe": (1, 1, h), p + "attention.in_proj_weight": (3 * h, h), p + "attention.in_proj_bias": (3 * h,),
            p + "attention.out_proj.weight": (h, h), p + "attention.out_proj.bias": (h,),
            p + "layernorm.weight": (h,), p + "layernorm.bias": (h,), p + "mlp.fc1.weight": (i, h),
            p + "mlp.fc1.bias": (i,), p + "mlp.fc2.weight": (h, i), p + "mlp.fc2.bias": (h,)}


def _layer_key(name: str):
    """Sort tensors as save_pretrained does in practice: by layer number, then name."""
    parts = name.split(".")
    for k, p in enumerate(parts):
        if p.isdigit() and k > 0 and parts[k - 1] == "layers":
            return (1, int(p), name)
    return (0 if "embed" in name else 2, 0, name)


def preset_tensors(name: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """part -> tensor name -> shape, exactly what the checkpoint loader expects (plus VILA1.5's head)."""
    from vila_edge.checkpoint import expected_llm, expected_projector, expected_vision

    preset = get_preset(name)
    cfg = preset.config()
    vision = expected_vision(cfg, preset.vision)
    if preset.vision_head:
        vision.update(_vision_head(cfg.vision.hidden_size, cfg.vision.intermediate_size))
    llm = expected_llm(cfg, int(preset.llm["vocab_size"]))
    out = {}
    for part, tensors in (("llm", llm), ("vision_tower", vision), ("mm_projector", expected_projector(cfg))):
        out[part] = {k: tensors[k] for k in sorted(tensors, key=_layer_key)}
    return out


# ---- random values from bits -----------------------------------------------------------------

_CHUNK = 32 << 20  # elements per generated chunk (64 MiB of 16-bit values)


def _is_norm(name: str) -> bool:
    return ("norm" in name) and name.endswith("weight")


def _random_bits(rng: np.random.Generator, n: int, dtype: str, norm: bool) -> np.ndarray:
    r = rng.integers(0, 1 << 64, (n + 3) // 4, dtype=np.uint64, endpoint=False).view(np.uint16)[:n]
    if dtype == "F16":  # sign(1) exponent(5, bias 15) mantissa(10)
        if norm:  # 1.0 + mantissa/1024, mantissa < 128
            return (r & np.uint16(0x007F)) | np.uint16(15 << 10)
        return (r & np.uint16(0x83FF)) | (((r >> np.uint16(10)) & np.uint16(1)) + np.uint16(8)) << np.uint16(10)
    # BF16: sign(1) exponent(8, bias 127) mantissa(7)
    if norm:
        return (r & np.uint16(0x000F)) | np.uint16(127 << 7)
    return (r & np.uint16(0x807F)) | (((r >> np.uint16(7)) & np.uint16(1)) + np.uint16(120)) << np.uint16(7)


def _tensor_seed(seed: int, part: str, name: str) -> list[int]:
    return [seed, zlib.crc32(f"{part}/{name}".encode())]


def write_safetensors_streaming(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str, seed: int, part: str,
                                progress: Callable[[int], None] | None = None) -> int:
    """Write one safetensors file, generating each tensor's bytes chunk by chunk. Returns bytes written."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    sizes = {}
    for name, shape in tensors.items():
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        sizes[name] = n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + 2 * n]}
        off += 2 * n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    written = 0
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, n in sizes.items():
            rng = np.random.Generator(np.random.SFC64(_tensor_seed(seed, part, name)))
            norm = _is_norm(name)
            left = n
            while left:
                k = min(left, _CHUNK)
                f.write(_random_bits(rng, k, dtype, norm).tobytes())
                left -= k
                written += 2 * k
                if progress:
                    progress(2 * k)
    return written


def _write_part(folder: Path, part: str, tensors: dict[str, tuple[int, ...]], dtype: str, seed: int,
                shard_bytes: int, progress) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    shards: list[dict] = [{}]
    size = 0
    total = 0
    for name, shape in tensors.items():
        nbytes = 2 * int(np.prod(shape, dtype=np.int64))
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = shape
        size += nbytes
        total += nbytes
    folder.mkdir(parents=True, exist_ok=True)
    if len(shards) == 1:
        write_safetensors_streaming(folder / "model.safetensors", shards[0], dtype, seed, part, progress)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_streaming(folder / fname, shard, dtype, seed, part, progress)
        weight_map.update({n: fname for n in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ---- tokenizer -------------------------------------------------------------------------------


def padded_tokenizer(kind: str, vocab_size: int):
    """(tokenizers.Tokenizer, tokenizer_config) trained tiny, padded with filler entries to `vocab_size`.

    Qwen2 kind: NVILA's media tokens (<vila/sentinel>, <image>, <vila/video>) are added after the
    filler, below vocab_size, so every id the runtime sees has an embedding row.
    """
    from tokenizers import AddedToken, Tokenizer

    from vila_edge.testing import QWEN2_CHAT_TEMPLATE, train_llama_tokenizer, train_qwen2_tokenizer

    if kind == "qwen2":
        tok, cfg = train_qwen2_tokenizer(media_tokens=False)
        cfg = {**cfg, "chat_template": QWEN2_CHAT_TEMPLATE, "model_max_length": 32768}
        reserve = 8
    else:
        tok, cfg = train_llama_tokenizer()
        cfg = {**cfg, "model_max_length": 4096}
        reserve = 0
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    target = vocab_size - reserve
    k = 0
    while len(vocab) < target:
        vocab[f"<filler_{k}>"] = len(vocab)
        k += 1
    out = Tokenizer.from_str(json.dumps(data))
    if kind == "qwen2":
        out.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<vila/sentinel>", "<image>", "<vila/video>")])
    return out, cfg


# ---- the checkpoint --------------------------------------------------------------------------


def checkpoint_bytes(name: str) -> int:
    """Bytes of weights write_preset_checkpoint writes (16-bit values)."""
    return sum(2 * int(np.prod(s, dtype=np.int64)) for t in preset_tensors(name).values() for s in t.values())


def write_preset_checkpoint(name: str, path, *, seed: int = 0, dtype: str = "bf16", shard_bytes: int = 2 << 30,
                            overwrite: bool = False, progress: Callable[[int, int], None] | None = None,
                            parts: tuple[str, ...] = ("llm", "vision_tower", "mm_projector")) -> Path:
    """Write preset `name` as a dev-layout checkpoint at `path` (atomically: a temp folder renamed).

    dtype: "bf16" (what released checkpoints hold) or "fp16". `progress(done_bytes, total_bytes)` is
    called after every chunk. An existing checkpoint is reused unless `overwrite`. `parts` limits which
    weight folders get tensors (configs and tokenizer are always written); leaving out vision_tower
    gives an LLM-only folder for decode benchmarks (not loadable by load_checkpoint).
    """
    preset = get_preset(name)
    st_dtype = {"bf16": "BF16", "fp16": "F16"}.get(dtype)
    if st_dtype is None:
        raise VilaEdgeError(f"dtype {dtype!r} is not one of: bf16, fp16")
    path = Path(path)
    if path.exists():
        if not overwrite and (path / "config.json").is_file():
            return path
        shutil.rmtree(path)
    tensors = preset_tensors(name)
    total = sum(2 * int(np.prod(s, dtype=np.int64)) for p in parts for s in tensors[p].values())
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    torch_dtype = {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    llm_json = {**preset.llm, "torch_dtype": torch_dtype}
    vision_json = {**preset.vision, "torch_dtype": torch_dtype}
    proj_json = {**preset.projector, "torch_dtype": torch_dtype}
    top = {**preset.top, "llm_cfg": llm_json, "vision_tower_cfg": vision_json, "mm_projector_cfg": proj_json,
           "model_dtype": f"torch.{torch_dtype}"}

    with staged_dir(path) as tmp:
        (tmp / "llm").mkdir()
        (tmp / "llm" / "config.json").write_text(json.dumps(llm_json, indent=2))
        tok, tok_cfg = padded_tokenizer(preset.tokenizer, int(preset.llm["vocab_size"]))
        tok.save(str(tmp / "llm" / "tokenizer.json"))
        (tmp / "llm" / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (tmp / "llm" / "generation_config.json").write_text(json.dumps(
            {k: preset.llm[k] for k in ("bos_token_id", "eos_token_id") if preset.llm.get(k) is not None}, indent=2))
        (tmp / "vision_tower").mkdir()
        (tmp / "vision_tower" / "config.json").write_text(json.dumps(vision_json, indent=2))
        (tmp / "vision_tower" / "preprocessor_config.json").write_text(json.dumps(preset.preprocessor, indent=2))
        (tmp / "mm_projector").mkdir()
        (tmp / "mm_projector" / "config.json").write_text(json.dumps(proj_json, indent=2))
        for part in parts:
            _write_part(tmp / part, part, tensors[part], st_dtype, seed, shard_bytes, tick)
        (tmp / "config.json").write_text(json.dumps(top, indent=2))
    return path
