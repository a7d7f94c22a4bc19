"""The vision towers this runtime runs: one table, the one place a checkpoint's config picks its tower.

VILA (`llava/model/multimodal_encoder/builder.py::build_vision_tower`) dispatches on
`vision_tower/config.json` `architectures[0].lower()`: "intern" -> InternViT, "clip" -> CLIP,
"siglip" -> SigLIP (PS3 on the top-level `ps3` flag, before all of them). `TOWERS` keeps that order;
`tower_for(top, vision)` walks it. Each entry says, without torch:
- which tensors its `vision_tower/` weights hold (`expected`: name -> shape, as VILA checkpoints store them);
- whether token 0 is a class token (CLIP, InternViT) or a patch (SigLIP), which `select_feature` needs;
- the module under `vila_edge.reference` whose `build_tower(raw_vision, state_dict, vision)` returns the
  torch tower (embeddings -> the encoder layers that feed `select_layer` -> `select_feature`).
Adding a tower: its entry here and its reference module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vila_edge.errors import CheckpointError
from vila_edge.ps3_config import expected_ps3_tensors

if TYPE_CHECKING:
    from vila_edge.config import VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN (transformers.image_utils)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # intern_encoder.py::build_transform, hard-coded there
IMAGENET_STD = (0.229, 0.224, 0.225)


def _per_layer(v: VisionConfig, layer: Callable[[str], dict]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for k in range(v.num_layers):
        out.update(layer(f"{k}."))
    return out


def _hf_layer(pre: str, v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """One HF SigLIP / CLIP encoder layer (the two share the module tree)."""
    h, i = v.hidden_size, v.intermediate_size
    exp: dict[str, tuple[int, ...]] = {}
    for ln in ("layer_norm1", "layer_norm2"):
        exp[pre + ln + ".weight"] = (h,)
        exp[pre + ln + ".bias"] = (h,)
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        exp[pre + f"self_attn.{proj}.weight"] = (h, h)
        exp[pre + f"self_attn.{proj}.bias"] = (h,)
    exp.update({pre + "mlp.fc1.weight": (i, h), pre + "mlp.fc1.bias": (i,), pre + "mlp.fc2.weight": (h, i),
                pre + "mlp.fc2.bias": (h,)})
    return exp


def siglip_tensors(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """HF `SiglipVisionModel` ("vision_model." prefix, transformers 4.x as VILA saved it)."""
    h, p = v.hidden_size, v.patch_size
    exp = {
        "vision_model.embeddings.patch_embedding.weight": (h, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (h,),
        "vision_model.embeddings.position_embedding.weight": (v.grid * v.grid, h),
        "vision_model.post_layernorm.weight": (h,),
        "vision_model.post_layernorm.bias": (h,),
    }
    exp.update(_per_layer(v, lambda k: _hf_layer(f"vision_model.encoder.layers.{k}", v)))
    return exp


def clip_tensors(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """HF `CLIPVisionModel`: a class embedding, a bias-free patch conv, grid^2 + 1 positions and the
    pre-LayerNorm (`pre_layrnorm`, spelled so upstream) before the encoder."""
    h, p = v.hidden_size, v.patch_size
    exp = {
        "vision_model.embeddings.class_embedding": (h,),
        "vision_model.embeddings.patch_embedding.weight": (h, 3, p, p),
        "vision_model.embeddings.position_embedding.weight": (v.grid * v.grid + 1, h),
        "vision_model.pre_layrnorm.weight": (h,),
        "vision_model.pre_layrnorm.bias": (h,),
        "vision_model.post_layernorm.weight": (h,),
        "vision_model.post_layernorm.bias": (h,),
    }
    exp.update(_per_layer(v, lambda k: _hf_layer(f"vision_model.encoder.layers.{k}", v)))
    return exp


def intern_tensors(v: VisionConfig) -> dict[str, tuple[int, ...]]:
    """VILA's `InternVisionModel` (llava/model/multimodal_encoder/intern/modeling_intern_vit.py; no wrapper
    module, so no prefix): fused qkv (bias only with `qkv_bias`), RMSNorms with a weight only, per-head-
    concatenated q/k RMSNorm with `qk_normalization`, layer scales ls1 / ls2, no post-norm."""
    h, i, p = v.hidden_size, v.intermediate_size, v.patch_size
    exp: dict[str, tuple[int, ...]] = {
        "embeddings.class_embedding": (1, 1, h),
        "embeddings.patch_embedding.weight": (h, 3, p, p),
        "embeddings.patch_embedding.bias": (h,),
        "embeddings.position_embedding": (1, v.grid * v.grid + 1, h),
    }

    def layer(k: str) -> dict[str, tuple[int, ...]]:
        pre = f"encoder.layers.{k}"
        out = {pre + "attn.qkv.weight": (3 * h, h), pre + "attn.proj.weight": (h, h), pre + "attn.proj.bias": (h,),
               pre + "mlp.fc1.weight": (i, h), pre + "mlp.fc1.bias": (i,), pre + "mlp.fc2.weight": (h, i),
               pre + "mlp.fc2.bias": (h,), pre + "norm1.weight": (h,), pre + "norm2.weight": (h,),
               pre + "ls1": (h,), pre + "ls2": (h,)}
        if v.qkv_bias:
            out[pre + "attn.qkv.bias"] = (3 * h,)
        if v.qk_normalization:
            out[pre + "attn.q_norm.weight"] = (h,)
            out[pre + "attn.k_norm.weight"] = (h,)
        return out

    exp.update(_per_layer(v, layer))
    return exp


@dataclass(frozen=True)
class Tower:
    name: str  # VisionConfig.tower
    label: str  # for people (`vila-edge info`)
    matches: Callable[[dict, str], bool]  # (top-level config, architectures[0].lower()) -> is it this tower
    class_token: bool  # token 0 of every hidden state is a class token, not a patch
    module: str  # vila_edge.reference.<module>.build_tower(raw_vision, state_dict, vision) -> torch tower
    expected: Callable[[VisionConfig], dict[str, tuple[int, ...]]]
    optional_prefixes: tuple[str, ...] = ()  # tensors a file may hold beyond `expected` (never used)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # normalisation when preprocessor_config.json has none
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    fixed_normalisation: bool = False  # the upstream processor ignores preprocessor_config.json's mean/std


# VILA's dispatch order (builder.py): intern, radio (not run here), clip, siglip.
TOWERS: tuple[Tower, ...] = (
    Tower("intern", "InternViT", lambda top, arch: "intern" in arch, True, "intern", intern_tensors,
          mean=IMAGENET_MEAN, std=IMAGENET_STD, fixed_normalisation=True),
    Tower("clip", "CLIP", lambda top, arch: "clip" in arch, True, "clip", clip_tensors,
          optional_prefixes=("vision_model.embeddings.position_ids",), mean=CLIP_MEAN, std=CLIP_STD),
    Tower("siglip", "SigLIP", lambda top, arch: "siglip" in arch, False, "vision", siglip_tensors,
          optional_prefixes=("vision_model.head.",)),
    # PS3 (VILA-HD): picked by the top-level `ps3` flag in config_from_dicts, which reads its settings
    # (vila_edge.ps3_config) and runs its SigLIP trunk; never matched on the architecture name
    Tower("ps3", "PS3", lambda top, arch: False, False, "ps3", lambda v: expected_ps3_tensors(v.ps3)),
)


def tower_named(name: str) -> Tower:
    for t in TOWERS:
        if t.name == name:
            return t
    raise CheckpointError(f"vision tower {name!r} is not one of: {', '.join(t.name for t in TOWERS)}")


def tower_for(top: dict, vision: dict, where: str) -> Tower:
    """The tower a checkpoint's configs describe, as VILA's build_vision_tower picks it."""
    arch = str((vision.get("architectures") or ["SiglipVisionModel"])[0])
    for t in TOWERS:
        if t.matches(top, arch.lower()):
            return t
    raise CheckpointError(f"{where}: vision tower {arch!r} is not supported "
                          f"(supported: {', '.join(t.label for t in TOWERS)})")
