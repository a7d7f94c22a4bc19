"""InternViT as VILA loads it (VILA1.5-40b's tower): `llava/model/multimodal_encoder/intern/
modeling_intern_vit.py::InternVisionModel`, written here from that file's inference path, with VILA's
feature selection (doc §2.1). Parameter names equal the upstream module's, so `vision_tower/` loads strictly.

Per layer (pre-norm, layer-scaled residuals):
    x = x + ls1 * proj(attention(norm1(x)))       norm: InternRMSNorm (always RMS in VILA's copy)
    x = x + ls2 * fc2(act(fc1(norm2(x)))))        act: config hidden_act ("gelu": exact erf GELU)
Attention: one fused qkv Linear (bias only with `qkv_bias`); with `qk_normalization` q and k are
RMS-normalised over all heads at once ([B, N, heads*d]) before the scaled dot product; softmax in the
input dtype (upstream's `_naive_attn`; its flash-attention path computes the same function). Embeddings:
class token ++ patch conv (with bias), plus learned positions, no pre- or post-norm. Drop path and dropout
are training-only (identity in eval). VILA adds no pixel shuffle for InternViT: its `mlp_downsample`
projector does the 2x2 merge (reference.projector).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vila_edge.config import VisionConfig
from vila_edge.reference.vision import SelectedFeatures


class InternRMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class InternEmbeddings(nn.Module):
    def __init__(self, hidden: int, patch: int, image_size: int):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, hidden))
        self.patch_embedding = nn.Conv2d(3, hidden, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, grid^2, C]
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)


class InternAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"InternViT hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
        self.heads = heads
        self.scale = (hidden // heads) ** -0.5
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm = InternRMSNorm(hidden, eps)
            self.k_norm = InternRMSNorm(hidden, eps)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:  # normalised across all heads of a token: [B, H, N, d] -> [B, N, H*d] and back
            q = self.q_norm(q.transpose(1, 2).flatten(-2)).view(b, n, self.heads, -1).transpose(1, 2)
            k = self.k_norm(k.transpose(1, 2).flatten(-2)).view(b, n, self.heads, -1).transpose(1, 2)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        from transformers.activations import ACT2FN

        self.act = ACT2FN[act]
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternLayer(nn.Module):
    def __init__(self, v: VisionConfig, act: str):
        super().__init__()
        h = v.hidden_size
        self.attn = InternAttention(h, v.num_heads, v.layer_norm_eps, v.qkv_bias, v.qk_normalization)
        self.mlp = InternMLP(h, v.intermediate_size, act)
        self.norm1 = InternRMSNorm(h, v.layer_norm_eps)
        self.norm2 = InternRMSNorm(h, v.layer_norm_eps)
        self.ls1 = nn.Parameter(torch.ones(h))
        self.ls2 = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternEncoder(nn.Module):
    def __init__(self, v: VisionConfig, act: str):
        super().__init__()
        self.layers = nn.ModuleList([InternLayer(v, act) for _ in range(v.num_layers)])


class InternVisionModel(nn.Module):
    """All layers; `forward(pixels, output_hidden_states=True)` returns upstream's hidden_states tuple
    (embeddings, layer 0 out, ..., layer N-1 out) for cross-checking `SelectedFeatures`."""

    def __init__(self, v: VisionConfig, act: str = "gelu"):
        super().__init__()
        self.embeddings = InternEmbeddings(v.hidden_size, v.patch_size, v.image_size)
        self.encoder = InternEncoder(v, act)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True):
        from types import SimpleNamespace

        states = [self.embeddings(pixel_values)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1]))
        return SimpleNamespace(last_hidden_state=states[-1], hidden_states=tuple(states))


def build_intern(raw_vision: dict, vision: VisionConfig, state_dict: dict | None = None) -> InternVisionModel:
    model = InternVisionModel(vision, str(raw_vision.get("hidden_act", "gelu")))
    if state_dict is not None:
        model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def tower_module(raw_vision: dict, state_dict: dict | None, vision: VisionConfig):
    """InternViT's entry for `vila_edge.towers`."""
    return SelectedFeatures(build_intern(raw_vision, vision, state_dict), vision)
