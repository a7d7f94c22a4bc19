"""SigLIP vision tower (Hugging Face `SiglipVisionModel`) with VILA's feature selection (doc §2.1)."""

from __future__ import annotations

import torch
import torch.nn as nn

from vila_edge.config import VisionConfig


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
        # On disk (VILA, transformers 4.x) names start with "vision_model."; transformers 5 flattened the
        # module tree. Match whichever the installed class uses.
        wants_prefix = any(k.startswith("vision_model.") for k in model.state_dict())
        fixed = {}
        for k, v in state_dict.items():
            bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
            fixed[("vision_model." + bare) if wants_prefix else bare] = v.float()
        model.load_state_dict(fixed, strict=True)
    return model.eval()


def siglip_state_dict_on_disk(model) -> dict:
    """A SiglipVisionModel's weights named as VILA checkpoints store them ("vision_model." prefix)."""
    return {(k if k.startswith("vision_model.") else "vision_model." + k): v.contiguous().clone()
            for k, v in model.state_dict().items()}


class SelectedFeatures(nn.Module):
    """pixels [N,3,S,S] -> hidden_states[select_layer] with select_feature applied: [N, T, C].

    Only the encoder layers that feed the selected hidden state run (the rest, post_layernorm and
    the head are dropped), so the exported graph contains exactly what is used.
    """

    def __init__(self, siglip, vision: VisionConfig):
        super().__init__()
        vm = getattr(siglip, "vision_model", siglip)  # transformers 5 has no vision_model wrapper
        self.embeddings = vm.embeddings
        self.layers = nn.ModuleList(list(vm.encoder.layers)[: vision.layers_used])
        self.drop_first = vision.select_feature == "patch"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            out = layer(x, attention_mask=None)
            x = out[0] if isinstance(out, tuple) else out
        return x[:, 1:] if self.drop_first else x


def full_model_features(siglip, vision: VisionConfig, pixel_values: torch.Tensor) -> torch.Tensor:
    """The upstream path (`output_hidden_states=True`, index, select): cross-checks SelectedFeatures."""
    out = siglip(pixel_values=pixel_values, output_hidden_states=True)
    x = out.hidden_states[vision.select_layer]
    return x[:, 1:] if vision.select_feature == "patch" else x
