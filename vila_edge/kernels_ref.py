"""Numpy references for the CUDA kernels in ``kernels/`` (see ``vila_edge.kernels``).

Everything here is plain numpy, CPU only, written for clarity over speed. The GPU benchmark
(``benchmarks/gpu_kernels.py``) and the tests compare the kernels against these functions.

S2 merge ("generic formulation", vila-reference.md §3.1 / §3.3)
    Scales s = 0..S-1 (ascending). Scale s has a tile grid ``tile_grids[s] = (nh, nw)`` of
    ``h x w`` feature tiles; its merged map is ``(nh*h) x (nw*w)``. For batch element b, tile
    (r, c) of scale s is ``features[tile_offsets[s] + (r*nw + c)*batch + b]`` (tile-major over the
    batch like s2wrapper; ``tile_offsets`` defaults to the scales stored one after another).
    Every merged map is area-resampled (= adaptive average pooling, exact windows
    ``[floor(i*In/Out), ceil((i+1)*In/Out))``) to the grid of scale ``output_scale_idx``, the
    scales are concatenated along channels in ascending order, and the output map is cut into
    ``chunk = (ch, cw)`` chunks (default ``(h, w)``), chunks row-major, tokens row-major inside a
    chunk: result ``[batch * n_chunks, ch*cw, C*S]``.

FP8, OCP 8-bit floating point: E4M3 ("e4m3fn": bias 7, max 448, no infinities, 0x7F/0xFF = NaN)
    and E5M2 (bias 15, max 57344, 0x7C = inf, 0x7D..0x7F = NaN). Encoding rounds to nearest even
    and saturates to +-max (``satfinite``). Block quantization: ``scale = max(amax / max, 1e-10)``
    per block (fp32), ``q = fp8(x / scale)``; activations use
    1x128 blocks (``scales[M, ceil(K/128)]``), weights 128x128 blocks
    (``scales[ceil(N/128), ceil(K/128)]``). The GEMM reference dequantizes and multiplies in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BLOCK = 128
SCALE_FLOOR = np.float32(1e-10)


# ---------------------------------------------------------------------------------------------
# S2 merge
# ---------------------------------------------------------------------------------------------
def area_windows(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-average-pool windows ``[lo, hi)`` for each of the ``n_out`` outputs."""
    i = np.arange(n_out, dtype=np.int64)
    lo = (i * n_in) // n_out
    hi = -((-(i + 1) * n_in) // n_out)  # ceil
    return lo, hi


def area_resize_hwc(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``F.interpolate(mode="area")`` / ``adaptive_avg_pool2d`` on an ``[H, W, C]`` fp32 map.

    Bit-exact with PyTorch's CPU kernel: the window is summed in fp32 starting from 0, rows outer
    and columns inner, then divided by the window height and then by its width.
    """
    x = np.asarray(x, dtype=np.float32)
    in_h, in_w, _ = x.shape
    y_lo, y_hi = area_windows(in_h, out_h)
    x_lo, x_hi = area_windows(in_w, out_w)
    kh = (y_hi - y_lo).astype(np.float32)
    kw = (x_hi - x_lo).astype(np.float32)
    acc = np.zeros((out_h, out_w, x.shape[2]), dtype=np.float32)
    for dy in range(int(kh.max())):
        rows = np.minimum(y_lo + dy, in_h - 1)
        row_ok = (y_lo + dy) < y_hi
        for dx in range(int(kw.max())):
            cols = np.minimum(x_lo + dx, in_w - 1)
            col_ok = (x_lo + dx) < x_hi
            ok = (row_ok[:, None] & col_ok[None, :])[:, :, None]
            # Adding 0.0 for positions outside a window leaves the running fp32 sum unchanged,
            # so every output sees exactly the sequence of additions PyTorch performs.
            acc += np.where(ok, x[rows[:, None], cols[None, :]], np.float32(0.0))
    return acc / kh[:, None, None] / kw[None, :, None]


def s2_default_tile_offsets(tile_grids: Sequence[tuple[int, int]], batch: int = 1) -> list[int]:
    offsets, n = [], 0
    for nh, nw in tile_grids:
        offsets.append(n)
        n += nh * nw * batch
    return offsets


def s2_output_geometry(
    tile_grids: Sequence[tuple[int, int]],
    h: int,
    w: int,
    output_scale_idx: int,
    chunk: tuple[int, int] | None = None,
) -> tuple[int, int, int, int, int]:
    """Returns ``(out_h, out_w, chunk_h, chunk_w, n_chunks)``; raises ValueError if inconsistent."""
    n = len(tile_grids)
    if n == 0:
        raise ValueError("tile_grids: need at least one scale")
    if not -n <= output_scale_idx < n:
        raise ValueError(f"output_scale_idx: {output_scale_idx} out of range for {n} scales")
    nh, nw = tile_grids[output_scale_idx]
    out_h, out_w = nh * h, nw * w
    ch, cw = chunk if chunk is not None else (h, w)
    if ch <= 0 or cw <= 0 or out_h % ch or out_w % cw:
        raise ValueError(f"chunk: {ch}x{cw} does not tile the {out_h}x{out_w} output grid")
    return out_h, out_w, ch, cw, (out_h // ch) * (out_w // cw)


def s2_merge_ref(
    features: np.ndarray,
    *,
    tile_grids: Sequence[tuple[int, int]],
    h: int,
    w: int,
    output_scale_idx: int,
    batch: int = 1,
    chunk: tuple[int, int] | None = None,
    tile_offsets: Sequence[int] | None = None,
) -> np.ndarray:
    """fp32 reference of ``kernels/s2_merge.cu``: ``features [n_tiles, h*w, C]`` ->
    ``[batch * n_chunks, ch*cw, C*S]`` (see the module docstring for the layout)."""
    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim != 3 or feats.shape[1] != h * w:
        raise ValueError(f"features: expected [n_tiles, {h * w}, C], got {list(feats.shape)}")
    grids = [(int(a), int(b)) for a, b in tile_grids]
    offsets = list(tile_offsets) if tile_offsets is not None else s2_default_tile_offsets(grids, batch)
    if len(offsets) != len(grids):
        raise ValueError(f"tile_offsets: expected {len(grids)} entries, got {len(offsets)}")
    out_h, out_w, ch, cw, _ = s2_output_geometry(grids, h, w, output_scale_idx, chunk)
    C = feats.shape[2]
    outs = []
    for b in range(batch):
        maps = []
        for (nh, nw), base in zip(grids, offsets, strict=True):
            idx = base + (np.arange(nh * nw) * batch) + b
            tiles = feats[idx].reshape(nh, nw, h, w, C)
            merged = tiles.transpose(0, 2, 1, 3, 4).reshape(nh * h, nw * w, C)  # merge_chessboard
            maps.append(area_resize_hwc(merged, out_h, out_w))
        full = np.concatenate(maps, axis=-1)  # [out_h, out_w, C*S]
        # split into chunks: [out_h/ch, ch, out_w/cw, cw, CS] -> [nch_h, nch_w, ch, cw, CS]
        chunks = full.reshape(out_h // ch, ch, out_w // cw, cw, -1).transpose(0, 2, 1, 3, 4)
        outs.append(chunks.reshape(-1, ch * cw, full.shape[-1]))
    return np.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------------------------
# FP8 (OCP 8-bit floating point: E4M3 "e4m3fn" and E5M2)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fp8Format:
    """One OCP FP8 format: ``exponent_bits`` / ``mantissa_bits``, exponent ``bias``, largest finite
    value ``max`` and its positive code ``max_code`` (codes 0..max_code are the finite non-negative
    values in increasing order, so "even mantissa" is "even code")."""

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float
    max_code: int

    def values(self) -> np.ndarray:
        """code -> value (fp32, exact) for all 256 codes; NaN (and +-inf for E5M2) where the spec puts them."""
        codes = np.arange(256, dtype=np.int64)
        m_bits = self.mantissa_bits
        sign = np.where(codes & 0x80, -1.0, 1.0)
        e = (codes >> m_bits) & ((1 << self.exponent_bits) - 1)
        m = codes & ((1 << m_bits) - 1)
        frac = m / float(1 << m_bits)
        mag = np.where(e == 0, frac * 2.0 ** (1 - self.bias), (1.0 + frac) * 2.0 ** (e - float(self.bias)))
        vals = sign * mag
        if self.name == "e4m3":  # e4m3fn: no infinities, S.1111.111 is NaN
            vals[(codes & 0x7F) == 0x7F] = np.nan
        else:  # IEEE-like: exponent all ones is inf (mantissa 0) or NaN
            top = e == (1 << self.exponent_bits) - 1
            vals[top] = np.where(m[top] == 0, sign[top] * np.inf, np.nan)
        return vals.astype(np.float32)


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", 4, 3, 7, 448.0, 0x7E),
    "e5m2": Fp8Format("e5m2", 5, 2, 15, 57344.0, 0x7B),
}
FP8_VALUES = {name: fmt.values() for name, fmt in FP8_FORMATS.items()}  # code -> value per format
E4M3_VALUES = FP8_VALUES["e4m3"]


def fp8_format(fmt: str) -> Fp8Format:
    if fmt not in FP8_FORMATS:
        raise ValueError(f"FP8 format must be one of {', '.join(FP8_FORMATS)}, got {fmt!r}")
    return FP8_FORMATS[fmt]


def fp8_decode(codes: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    fp8_format(fmt)
    return FP8_VALUES[fmt][np.asarray(codes, dtype=np.uint8)]


def fp8_encode(x: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """fp32 -> FP8 codes (uint8): round to nearest, ties to even, saturate to +-max (``satfinite``:
    infinities too, as the CUDA ``__nv_cvt_float_to_fp8(..., __NV_SATFINITE, ...)`` and ONNX
    ``QuantizeLinear(saturate=1)`` do); NaN stays NaN."""
    f = fp8_format(fmt)
    finite = FP8_VALUES[fmt][: f.max_code + 1].astype(np.float64)  # 0 .. max, increasing
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        a = np.abs(x).astype(np.float64)
    hi = np.clip(np.searchsorted(finite, a, side="left"), 0, f.max_code)  # first value >= a
    lo = np.clip(hi - 1, 0, f.max_code)
    d_lo = a - finite[lo]
    d_hi = finite[hi] - a
    take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = np.where(take_hi, hi, lo)
    code = np.where(a >= f.max, f.max_code, code)  # satfinite (covers inf)
    code = np.where(np.signbit(x), code | 0x80, code)
    code = np.where(np.isnan(x), 0x7F, code)  # a NaN code in both formats
    return code.astype(np.uint8)


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    return fp8_decode(codes, "e4m3")


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """fp32 -> e4m3 codes (uint8): round to nearest, ties to even, saturate to +-448."""
    return fp8_encode(x, "e4m3")


def _block_scales(amax: np.ndarray, fmt: str) -> np.ndarray:
    return np.maximum(amax.astype(np.float32) / np.float32(fp8_format(fmt).max), SCALE_FLOOR).astype(np.float32)


def fp8_quantize_act_ref(x: np.ndarray, fmt: str = "e4m3") -> tuple[np.ndarray, np.ndarray]:
    """``x [M, K]`` -> ``(q uint8 [M, K], scales fp32 [M, ceil(K/128)])``, 1x128 blocks (dynamic, per token)."""
    x = np.asarray(x, dtype=np.float32)
    M, K = x.shape
    KB = -(-K // BLOCK)
    pad = np.zeros((M, KB * BLOCK), np.float32)
    pad[:, :K] = x
    blocks = pad.reshape(M, KB, BLOCK)
    scales = _block_scales(np.abs(blocks).max(axis=2), fmt)
    q = fp8_encode(blocks / scales[:, :, None], fmt).reshape(M, KB * BLOCK)[:, :K]
    return np.ascontiguousarray(q), scales


def fp8_quantize_weight_ref(w: np.ndarray, fmt: str = "e4m3") -> tuple[np.ndarray, np.ndarray]:
    """``w [N, K]`` -> ``(q uint8 [N, K], scales fp32 [ceil(N/128), ceil(K/128)])``, 128x128 blocks."""
    w = np.asarray(w, dtype=np.float32)
    N, K = w.shape
    NB, KB = -(-N // BLOCK), -(-K // BLOCK)
    pad = np.zeros((NB * BLOCK, KB * BLOCK), np.float32)
    pad[:N, :K] = w
    blocks = pad.reshape(NB, BLOCK, KB, BLOCK)
    scales = _block_scales(np.abs(blocks).max(axis=(1, 3)), fmt)
    q = fp8_encode(blocks / scales[:, None, :, None], fmt).reshape(NB * BLOCK, KB * BLOCK)[:N, :K]
    return np.ascontiguousarray(q), scales


def fp8_dequantize_act_ref(q: np.ndarray, scales: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    K = q.shape[1]
    return fp8_decode(q, fmt) * np.repeat(scales, BLOCK, axis=1)[:, :K]


def fp8_dequantize_weight_ref(q: np.ndarray, scales: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    N, K = q.shape
    s = np.repeat(np.repeat(scales, BLOCK, axis=0), BLOCK, axis=1)[:N, :K]
    return fp8_decode(q, fmt) * s


def fp8_qdq_act_ref(x: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """What the activations of an FP8 W8A8 linear become: 1x128 dynamic quantize then dequantize."""
    q, s = fp8_quantize_act_ref(x, fmt)
    return fp8_dequantize_act_ref(q, s, fmt)


def fp8_gemm_ref(xq: np.ndarray, x_scales: np.ndarray, wq: np.ndarray, w_scales: np.ndarray,
                 fmt: str = "e4m3") -> np.ndarray:
    """W8A8 reference: dequantize both operands, fp32 ``X @ W^T`` -> ``[M, N]`` fp32."""
    x = fp8_dequantize_act_ref(xq, x_scales, fmt)
    w = fp8_dequantize_weight_ref(wq, w_scales, fmt)
    return (x @ w.T).astype(np.float32)


def fp8_gemm_weight_only_ref(x: np.ndarray, wq: np.ndarray, w_scales: np.ndarray, fmt: str = "e4m3") -> np.ndarray:
    """Weight-only reference: ``x`` (fp16 values) times the dequantized weight, fp32 ``[M, N]``."""
    w = fp8_dequantize_weight_ref(wq, w_scales, fmt)
    return (np.asarray(x, dtype=np.float32) @ w.T).astype(np.float32)


def fp8_linear_ref(x: np.ndarray, w: np.ndarray, *, weight_only: bool = False, fmt: str = "e4m3") -> np.ndarray:
    """End-to-end reference of ``Fp8Linear``: quantize ``w`` (and ``x`` unless weight-only)."""
    wq, ws = fp8_quantize_weight_ref(w, fmt)
    if weight_only:
        return fp8_gemm_weight_only_ref(np.asarray(x, np.float16), wq, ws, fmt)
    xq, xs = fp8_quantize_act_ref(x, fmt)
    return fp8_gemm_ref(xq, xs, wq, ws, fmt)
