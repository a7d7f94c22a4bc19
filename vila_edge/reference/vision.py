"""Vision towers with VILA's feature selection (doc §2.1): the dispatcher (`build_tower` / `load_tower`,
through `vila_edge.towers.TOWERS`), the module every tower's features come out of (`SelectedFeatures`)
and SigLIP itself (Hugging Face `SiglipVisionModel`). CLIP: `reference.clip`; InternViT: `reference.intern`."""

from __future__ import annotations

import importlib

import torch
import torch.nn as nn

from vila_edge.config import VisionConfig
from vila_edge.towers import tower_named


def build_tower(raw_vision: dict, state_dict: dict | None, vision: VisionConfig) -> nn.Module:
    """pixels [N,3,S,S] -> features [N,T,C] of the checkpoint's tower (float32, eval mode)."""
    module = importlib.import_module(f"vila_edge.reference.{tower_named(vision.tower).module}")
    return module.tower_module(raw_vision, state_dict, vision).eval()


def load_tower(ckpt) -> nn.Module:
    return build_tower(ckpt.raw["vision"], ckpt.state_dict("vision_tower", torch.float32), ckpt.config.vision)


def load_hf_weights(model, state_dict: dict, drop: tuple[str, ...] = ()) -> None:
    """Load on-disk weights into a transformers vision model. On disk (VILA, transformers 4.x) names start
    with "vision_model."; transformers 5 flattened the module tree. Match whichever the installed class uses.
    `drop`: stored buffers the installed class no longer keeps (CLIP's old `position_ids`)."""
    wants_prefix = any(k.startswith("vision_model.") for k in model.state_dict())
    fixed = {}
    for k, v in state_dict.items():
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        if bare in drop:
            continue
        fixed[("vision_model." + bare) if wants_prefix else bare] = v.float()
    model.load_state_dict(fixed, strict=True)


def hf_state_dict_on_disk(model) -> dict:
    """A transformers vision model's weights named as VILA checkpoints store them ("vision_model." prefix)."""
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.contiguous().clone()
            for k, v in model.state_dict().items()}


def siglip_config_dict(raw_vision: dict) -> dict:
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
    return {k: raw_vision[k] for k in keep if k in raw_vision}


def build_siglip(raw_vision: dict, state_dict: dict | None = None):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**siglip_config_dict(raw_vision))
    cfg.vision_use_head = any(k.startswith("vision_model.head.") for k in (state_dict or {}))
    model = SiglipVisionModel(cfg)
    if state_dict is not None:
        load_hf_weights(model, state_dict)
    return model.eval()


siglip_state_dict_on_disk = hf_state_dict_on_disk


def tower_module(raw_vision: dict, state_dict: dict | None, vision: VisionConfig) -> nn.Module:
    """SigLIP's entry for `vila_edge.towers` (`build_tower` finds it by module name)."""
    return SelectedFeatures(build_siglip(raw_vision, state_dict), vision)


class SelectedFeatures(nn.Module):
    """pixels [N,3,S,S] -> hidden_states[select_layer] with select_feature applied: [N, T, C].

    Only the encoder layers that feed the selected hidden state run (the rest, post_layernorm and
    the head are dropped), so the exported graph contains exactly what is used. Any tower whose model has
    `embeddings` and `encoder.layers` (called as `layer(x, attention_mask=None)`) fits: SigLIP, CLIP (whose
    `pre_layrnorm` runs before the encoder: hidden_states[0] is its output) and InternViT.
    """

    def __init__(self, model, vision: VisionConfig):
        super().__init__()
        vm = getattr(model, "vision_model", model)  # transformers 5 has no vision_model wrapper
        self.embeddings = vm.embeddings
        self.pre_norm = getattr(vm, "pre_layrnorm", None) or nn.Identity()
        self.layers = nn.ModuleList(list(vm.encoder.layers)[: vision.layers_used])
        self.drop_first = vision.select_feature == "patch"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(self.embeddings(pixel_values))
        for layer in self.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return x[:, 1:] if self.drop_first else x


def full_model_features(model, vision: VisionConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """The upstream path (`output_hidden_states=True`, index, select): cross-checks SelectedFeatures."""
    out = model(pixel_values=pixel_values, output_hidden_states=True)
    x = out.hidden_states[vision.select_layer]
    return x[:, 1:] if vision.select_feature == "patch" else x
