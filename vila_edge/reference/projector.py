"""Every projector type in the reference doc (§4), as torch modules whose parameter names match
`mm_projector/model.safetensors` (`layers.<i>.*`, indices of upstream's nn.Sequential)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from vila_edge.config import ProjectorConfig


def space_to_depth(x: torch.Tensor, k: int, order: str = "row") -> torch.Tensor:
    """DownSample{2x2,3x3}Block: [B, N, C] (square grid, row-major) -> [B, ceil(h/k)*ceil(w/k), k*k*C].

    Zero-pads the bottom rows then the right columns to a multiple of k (in feature space, before the
    LayerNorm). Each cell's vector is concat over dr, dc of x[k*i+dr, k*j+dc] ([TL, TR, BL, BR] for k=2).
    order="row": cells row-major (NVILA code). order="col": column-major (VILA1.5 / V15 code, §4.3).
    """
    b, n, c = x.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"space_to_depth needs a square token grid, got {n} tokens")
    x = x.reshape(b, side, side, c)
    pad = (-side) % k
    if pad:
        x = F.pad(x, (0, 0, 0, pad, 0, pad))  # (C), (W: right), (H: bottom)
    s = side + pad
    x = x.reshape(b, s // k, k, s // k, k, c).permute(0, 1, 3, 2, 4, 5)  # b, i, j, dr, dc, c
    if order == "col":
        x = x.transpose(1, 2)
    elif order != "row":
        raise ValueError(f"token order must be 'row' or 'col', got {order!r}")
    return x.reshape(b, (s // k) ** 2, k * k * c)


class Projector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.in_features, cfg.out_features
        t = cfg.type
        if t == "identity":
            self.layers = nn.Identity()
        elif t == "linear":
            self.layers = nn.Linear(c, d)
        elif t == "mlp2x_gelu":
            self.layers = nn.Sequential(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d))
        elif t in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = nn.Sequential(nn.Identity(), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d))
        elif t == "mlp_downsample_3x3_fix":
            self.layers = nn.Sequential(
                nn.Identity(), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
                nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(), nn.Linear(d, d),
            )
        else:
            raise ValueError(f"unsupported projector type {t!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, N, C] features of B tiles -> [B, N', D]."""
        k = self.cfg.downsample
        if k > 1:
            x = space_to_depth(x, k, self.cfg.token_order)
        return self.layers(x)


def load_projector(cfg: ProjectorConfig, state_dict: dict) -> Projector:
    proj = Projector(cfg)
    proj.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return proj.eval()
