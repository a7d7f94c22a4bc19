"""CLIP vision tower as VILA loads it (`llava/model/multimodal_encoder/clip_encoder.py`: transformers'
`CLIPVisionModel.from_pretrained(vision_tower/)`), with VILA's feature selection (doc §2.1).

What differs from SigLIP, all inside transformers' module: a learned class embedding is token 0, the
patch conv has no bias, `pre_layrnorm` normalises the embeddings before the encoder (hidden_states[0] is
its output), the MLP uses the config's `hidden_act` (OpenAI CLIP: quick_gelu, x * sigmoid(1.702 x)).
"""

from __future__ import annotations

from vila_edge.config import VisionConfig
from vila_edge.reference.vision import SelectedFeatures, load_hf_weights

CLIP_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
             "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "projection_dim")


def build_clip(raw_vision: dict, state_dict: dict | None = None):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = CLIPVisionModel(CLIPVisionConfig(**{k: raw_vision[k] for k in CLIP_KEYS if k in raw_vision}))
    if state_dict is not None:
        # transformers < 4.31 saved embeddings.position_ids (a buffer, arange) in the file; it is not a weight
        load_hf_weights(model, state_dict, drop=("embeddings.position_ids",))
    return model.eval()


def tower_module(raw_vision: dict, state_dict: dict | None, vision: VisionConfig):
    """CLIP's entry for `vila_edge.towers`."""
    return SelectedFeatures(build_clip(raw_vision, state_dict), vision)
