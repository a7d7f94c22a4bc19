"""S2 and dynamic-S2 feature merging in PyTorch (reference doc §3.1, §3.3) — the oracle.

Shapes follow upstream: feature maps are [B, C, H, W]; tile stacks are [n_tiles * B, h*w, C] with
tiles ordered rows-outer, cols-inner (and, for a batch, all images of tile 0, then tile 1, ...).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from vila_edge.media.tiling import MergeSpec


def merge_chessboard(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """Tiles -> one map. x: [nh*nw*b, C, h, w] or [nh*nw*b, h*w, C] (square tiles) -> [b, C, nh*h, nw*w]."""
    if x.dim() == 3:
        n, hw, c = x.shape
        side = math.isqrt(hw)
        x = x.transpose(1, 2).reshape(n, c, side, side)
    b = x.shape[0] // (nh * nw)
    rows = [torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1) for i in range(nh)]
    return torch.cat(rows, dim=-2)


def split_chessboard(x: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """Inverse of merge_chessboard: [b, C, H, W] -> [nh*nw*b, C, H/nh, W/nw]."""
    h, w = x.shape[-2] // nh, x.shape[-1] // nw
    return torch.cat([x[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


def area_resize(x: torch.Tensor, size) -> torch.Tensor:
    """`F.interpolate(mode="area")` == adaptive_avg_pool2d: windows [floor(i*In/Out), ceil((i+1)*In/Out))."""
    return F.interpolate(x.float(), size=tuple(size), mode="area")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c


def static_s2_merge(tile_features: torch.Tensor, *, tiles_per_side: list[int], output_scale_idx: int = 0) -> torch.Tensor:
    """s2wrapper.multiscale_forward after the encoder: [sum n_s^2 * B, h*w, C] -> [B, h_out*w_out, C*S]."""
    total = sum(n * n for n in tiles_per_side)
    batch = tile_features.shape[0] // total
    maps, cnt = [], 0
    for n in tiles_per_side:
        maps.append(merge_chessboard(tile_features[cnt:cnt + n * n * batch], n, n))
        cnt += n * n * batch
    out_hw = maps[output_scale_idx].shape[-2:]
    return _tokens(torch.cat([area_resize(m, out_hw) for m in maps], dim=1))


def dynamic_s2_merge(tile_features: torch.Tensor, *, block_size: tuple[int, int] | None, scales: list[int],
                     output_scale_idx: int = -1) -> torch.Tensor:
    """`merge_features_for_dynamic_s2` + the split before the projector, for one image.

    tile_features: [sum_{s<last} (s/s0)^2 + rows*cols, h*w, C] -> projector input [n_chunks, h*w, C*S].
    block_size None: one plain tile, its features repeated once per scale along channels.
    """
    n_scales = len(scales)
    if block_size is None:
        return tile_features[:1].repeat(1, 1, n_scales)
    maps, cnt = [], 0
    for s in scales[:-1]:
        k = s // scales[0]
        maps.append(merge_chessboard(tile_features[cnt:cnt + k * k], k, k))
        cnt += k * k
    rows, cols = block_size
    maps.append(merge_chessboard(tile_features[cnt:cnt + rows * cols], rows, cols))
    cnt += rows * cols
    if cnt != tile_features.shape[0]:
        raise ValueError(f"dynamic S2 expects {cnt} tiles, got {tile_features.shape[0]}")
    out_hw = maps[output_scale_idx].shape[-2:]
    merged = torch.cat([area_resize(m, out_hw) for m in maps], dim=1)
    if output_scale_idx in (n_scales - 1, -1):
        new_bs = block_size
    else:
        new_bs = (scales[output_scale_idx] // scales[0],) * 2
    return _tokens(split_chessboard(merged, *new_bs))


def s2_merge(tile_features: torch.Tensor, spec: MergeSpec) -> torch.Tensor:
    """The merge a tiling scheme's `MergeSpec` describes, for one image, from upstream's steps:
    merge_chessboard per scale, area-resize to the output scale's map, concatenate along channels,
    split_chessboard into `spec.chunk`-sized projector inputs. [n_tiles, h*w, C] -> [n_chunks, ch*cw, C*S].

    Static S2 (one chunk = the whole map) equals `static_s2_merge`, dynamic S2 (tile-sized chunks)
    `dynamic_s2_merge`; a plain tile listed once per scale (`tile_offsets` all 0) repeats its features.
    """
    grids = spec.tile_grids
    offsets = spec.tile_offsets
    if offsets is None:
        offsets = [sum(nh * nw for nh, nw in grids[:k]) for k in range(len(grids))]
    used = max(o + nh * nw for o, (nh, nw) in zip(offsets, grids, strict=True))
    if used != tile_features.shape[0]:
        raise ValueError(f"the merge expects {used} tiles, got {tile_features.shape[0]}")
    maps = [merge_chessboard(tile_features[o:o + nh * nw], nh, nw) for o, (nh, nw) in zip(offsets, grids, strict=True)]
    out_h, out_w = maps[spec.output_scale_idx].shape[-2:]
    merged = torch.cat([area_resize(m, (out_h, out_w)) for m in maps], dim=1)
    ch, cw = spec.chunk
    return _tokens(split_chessboard(merged, out_h // ch, out_w // cw))


def dynamic_s2_tokens(projected: torch.Tensor, block_size: tuple[int, int] | None) -> torch.Tensor:
    """After the projector: [rows*cols, T, D] chunks -> global row-major tokens [(rows*sqrt T)*(cols*sqrt T), D]."""
    if block_size is None:
        return projected[0]
    merged = merge_chessboard(projected, *block_size)  # [1, D, H, W]
    return _tokens(merged)[0]
