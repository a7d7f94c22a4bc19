"""FP8 linears for the PyTorch backend: OCP E4M3 ("e4m3fn") / E5M2 weights, the GEMM through `torch._scaled_mm`.

The arithmetic is `vila_edge.kernels_ref`'s (the ONNX QDQ build's, `builder/fp8_qdq.py`, and `kernels/fp8_gemm.cu`'s):
weights in 128x128 blocks, one fp32 scale per block; activations quantized per token and per 128 input columns at
run time; `scale = max(amax / fp8_max, 1e-10)`, `q = fp8(x / scale)` rounded to nearest even and saturated.

`torch._scaled_mm` takes one fp32 scale per row of A (`[M, 1]`) and one per column of B (`[1, N]`), over the whole
K. A 1x128 activation scale and a 128x128 weight scale are per row / per column *within one 128-column block of K*,
so each block's products are scaled apart and summed in fp32, which is the reference's sum term for term
(dequantized x times dequantized w, fp32 products) with the weights' FP8 codes exactly the ONNX graph's: no
requantization to per-channel scales, which would change the codes and the numbers. Two exact ways, by size:

- few rows (decode; M x blocks <= 128): ONE `_scaled_mm` whose A is block-diagonal, [KB*M, KB*128] with row (b, m)
  holding token m's block b and zeros elsewhere, scale_a its activation scale, scale_b ones: row (b, m) of the
  result is block b's partial dot product for token m. Times the weight scales [KB, 1, N] and summed over b. The
  zeros cost tensor-core work, not memory traffic (one tile of 128 rows at most), and a decode step launches a
  handful of kernels per linear instead of two per K block (a CUDA-graphed step is launch-bound).
- more rows (prefill): one `_scaled_mm` per K block b, `a[:, b] x w[:, b].t()` with scale_a = the block's activation
  scales and scale_b = its weight scales, summed in fp32.

The weight block scales are stored per output row (`[N, ceil(K/128)]`, each block's scale repeated over its 128
rows), which is what `scale_b` takes and also lets q/k/v and gate/up, quantized as separate matrices by the ONNX
build, run as one fused linear.

Where `_scaled_mm` is refused (no FP8 tensor cores: Jetson Orin sm_87, Ampere; a format pair cuBLAS lacks, such as
E5M2 x E5M2; a torch build without it), the linear is weight-only: the codes are dequantized per call (fp32, then
the model dtype) and multiplied with the unquantized activations, like `vila_edge.kernels.fp8_linear`'s weight-only
mode. That is decided once at load by a probe call per (device, format, N), not per call. `activations="none"` (a
weight-only ONNX build) is weight-only everywhere.
"""

from __future__ import annotations

import functools

import torch  # this module is imported only where an FP8 linear is made
import torch.nn.functional as F

from vila_edge.errors import EngineError
from vila_edge.kernels_ref import BLOCK, FP8_FORMATS, SCALE_FLOOR

GEMM_MODES = ("scaled-mm", "weight-only")
BLOCK_DIAGONAL_ROWS = 128  # M x K blocks up to this: one block-diagonal _scaled_mm (see the module doc)
ACTIVATIONS = ("dynamic", "none")


def fp8_dtype(fmt: str):
    if fmt not in FP8_FORMATS:
        raise EngineError(f"FP8 format {fmt!r} is not one of: {', '.join(FP8_FORMATS)}")
    return torch.float8_e4m3fn if fmt == "e4m3" else torch.float8_e5m2


def to_fp8(x, fmt: str):
    """fp32 -> FP8, round to nearest even, saturating (torch's cast makes E5M2 overflow inf; satfinite clamps)."""
    top = FP8_FORMATS[fmt].max
    return x.clamp(-top, top).to(fp8_dtype(fmt))


def _padded_k(x, k_blocks: int):
    pad = k_blocks * BLOCK - x.shape[-1]
    return F.pad(x, (0, pad)) if pad else x  # zero columns leave every block's amax unchanged


def quantize_activations(x, fmt: str):
    """x [M, K] -> (codes [KB, M, 128] FP8, scales [KB, M, 1] fp32): 1x128 blocks, `fp8_quantize_act_ref`'s numbers,
    laid out one contiguous row-major operand and one contiguous `scale_a` per K block."""
    m, k = x.shape
    kb = -(-k // BLOCK)
    blocks = _padded_k(x.float(), kb).view(m, kb, BLOCK)
    scales = (blocks.abs().amax(dim=-1, keepdim=True) / FP8_FORMATS[fmt].max).clamp_min(float(SCALE_FLOOR))
    codes = to_fp8(blocks / scales, fmt)
    return codes.transpose(0, 1).contiguous(), scales.transpose(0, 1).contiguous()


def quantize_weight(w, fmt: str):
    """w [N, K] -> (codes [N, K] FP8, row scales [N, ceil(K/128)] fp32): 128x128 blocks, `fp8_quantize_weight_ref`'s
    codes and scales (bit for bit), the scales repeated over each block's rows. For weights made in memory (the
    benchmarks); engine directories carry the ONNX build's codes."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = F.pad(w.float(), (0, kb * BLOCK - k, 0, nb * BLOCK - n)).view(nb, BLOCK, kb, BLOCK)
    scales = (padded.abs().amax(dim=(1, 3)) / FP8_FORMATS[fmt].max).clamp_min(float(SCALE_FLOOR))  # [NB, KB]
    codes = to_fp8(padded / scales[:, None, :, None], fmt).view(nb * BLOCK, kb * BLOCK)[:n, :k]
    return codes.contiguous(), block_row_scales(scales, n)


def block_row_scales(block_scales, n: int):
    """[ceil(N/128), KB] block scales -> [N, KB] row scales."""
    return block_scales.repeat_interleave(BLOCK, dim=0)[:n].contiguous()


@functools.cache
def scaled_mm_support(device: str, fmt: str, n: int) -> tuple[torch.dtype | None, str | None]:
    """(output dtype, None) for the call `Fp8Linear` makes (FP8 [M, 128] x [128, n], row-wise fp32 scales) where
    `torch._scaled_mm` runs it on `device`, else (None, why not: the error it raised). fp32 output is tried first
    (exact partial sums); some CUDA builds take only bfloat16 output with row-wise scales, whose per-block partials
    are then rounded to bf16 before the fp32 sum. Probed once per (device, format, N)."""
    dt = fp8_dtype(fmt)
    a = torch.zeros(1, BLOCK, device=device).to(dt)
    b = torch.zeros(n, BLOCK, device=device).to(dt)
    reason = None
    for out_dtype in (torch.float32, torch.bfloat16):
        try:
            torch._scaled_mm(a, b.t(), scale_a=torch.ones(1, 1, device=device),
                             scale_b=torch.ones(1, n, device=device), out_dtype=out_dtype)
            return out_dtype, None
        except (RuntimeError, ValueError, NotImplementedError) as exc:  # unsupported GPU / shape / dtype / torch build
            reason = reason or f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None, reason


class Fp8Linear:
    """y = x @ W.T (+ b) with W as FP8 codes [N, K] and per-row block scales [N, ceil(K/128)] (see the module doc).

    `gemm`: "scaled-mm" (W8A8 through `torch._scaled_mm`), "weight-only", or None to take "scaled-mm" where the
    probe says it runs and `activations` is "dynamic". `self.gemm` is what it runs; `self.fallback` why not W8A8."""

    def __init__(self, codes, row_scales, fmt: str, bias, dtype, device: str, *, activations: str = "dynamic",
                 gemm: str | None = None):
        if activations not in ACTIVATIONS:
            raise EngineError(f"FP8 activations {activations!r} is not one of: {', '.join(ACTIVATIONS)}")
        if gemm is not None and gemm not in GEMM_MODES:
            raise EngineError(f"fp8 gemm {gemm!r} is not one of: {', '.join(GEMM_MODES)}")
        self.fmt, self.dtype, self.activations = fmt, dtype, activations
        self.out_features, self.in_features = codes.shape
        self.k_blocks = -(-self.in_features // BLOCK)
        if tuple(row_scales.shape) != (self.out_features, self.k_blocks):
            raise EngineError(f"FP8 scales {list(row_scales.shape)} do not fit codes {list(codes.shape)} "
                              f"(want [N, ceil(K/128)]); rebuild the engine directory")
        self.fallback, self.out_dtype = None, None
        if activations == "none":
            self.fallback = "weight-only build (activations none)"
        elif gemm != "weight-only":
            self.out_dtype, self.fallback = scaled_mm_support(device, fmt, self.out_features)
            if self.fallback and gemm == "scaled-mm":
                raise EngineError(f"fp8 gemm 'scaled-mm': torch._scaled_mm refuses it on {device} ({self.fallback}); "
                                  f"use weight-only")
        else:
            self.fallback = "asked for weight-only"
        self.gemm = "weight-only" if self.fallback else "scaled-mm"
        codes = codes.to(device)
        if codes.dtype == torch.uint8:
            codes = codes.view(fp8_dtype(fmt))
        if codes.dtype != fp8_dtype(fmt):
            raise EngineError(f"FP8 codes of dtype {codes.dtype} for format {fmt}; rebuild the engine directory")
        # [N, KB*128] row-major: its .t() (and each 128-column slice's) is the column-major B that _scaled_mm takes
        padded = torch.zeros(self.out_features, self.k_blocks * BLOCK, dtype=torch.uint8, device=device)
        padded[:, :self.in_features] = codes.view(torch.uint8)  # zero codes in the padding add nothing
        self.weight = padded.view(fp8_dtype(fmt))
        self.scales = row_scales.to(device=device, dtype=torch.float32).t().contiguous().view(
            self.k_blocks, 1, self.out_features)  # scale_b of block b: self.scales[b], [1, N] contiguous
        self.ones = torch.ones(1, self.out_features, device=device)  # scale_b of the block-diagonal call
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype)

    def dense_weight(self):
        """The dequantized weight [N, K] in the model dtype (fp32 products, as kernels_ref)."""
        n, kb = self.out_features, self.k_blocks
        w = self.weight.float().view(n, kb, BLOCK) * self.scales.view(kb, n).t()[..., None]
        return w.view(n, -1)[:, :self.in_features].to(self.dtype)

    def __call__(self, x):
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.gemm == "weight-only":
            y = F.linear(x2, self.dense_weight())
        elif x2.shape[0] * self.k_blocks <= BLOCK_DIAGONAL_ROWS:
            y = self._block_diagonal(x2)
        else:
            y = self._per_block(x2)
        if self.gemm != "weight-only":
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _block_diagonal(self, x2):
        m, kb = x2.shape[0], self.k_blocks
        codes, scales = quantize_activations(x2, self.fmt)  # [KB, M, 128], [KB, M, 1]
        a = torch.zeros(kb, m, kb, BLOCK, dtype=torch.uint8, device=x2.device)
        a.diagonal(dim1=0, dim2=2).copy_(codes.view(torch.uint8).permute(1, 2, 0))  # a[b, :, b] = block b
        partial = torch._scaled_mm(a.view(fp8_dtype(self.fmt)).view(kb * m, kb * BLOCK), self.weight.t(),
                                   scale_a=scales.view(kb * m, 1), scale_b=self.ones, out_dtype=self.out_dtype)
        return (partial.view(kb, m, -1).float() * self.scales).sum(dim=0)

    def _per_block(self, x2):
        codes, scales = quantize_activations(x2, self.fmt)
        y = None
        for b in range(self.k_blocks):
            part = torch._scaled_mm(codes[b], self.weight[:, b * BLOCK:(b + 1) * BLOCK].t(), scale_a=scales[b],
                                    scale_b=self.scales[b], out_dtype=self.out_dtype)
            y = part.float() if y is None else y.add_(part)  # summed in fp32
        return y

    def tensors(self):
        return [t for t in (self.weight, self.scales, self.bias) if t is not None]

    def describe(self) -> str:
        if self.gemm == "scaled-mm":
            partials = "" if self.out_dtype == torch.float32 else f", {str(self.out_dtype)[6:]} partials"
            return f"{self.fmt} W8A8, torch._scaled_mm with 1x128 / 128x128 block scales{partials}"
        return f"{self.fmt} weight-only, dequantized per call ({self.fallback})"


class Fp8Module(torch.nn.Module):
    """An `Fp8Linear` where an `nn.Linear` was (the projector's modules)."""

    def __init__(self, linear: Fp8Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x)


def replace_linears(module, tensors: dict, prefix: str, fmt: str, dtype, device: str, *, activations: str = "dynamic",
                    gemm: str | None = None) -> list[Fp8Linear]:
    """Swap every `nn.Linear` of `module` named in `tensors` (`{prefix}{name}.fp8` / `.fp8_scales`) for its FP8 version
    (the linear's own bias kept); returns the new linears."""
    made = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, torch.nn.Linear) or f"{prefix}{name}.fp8" not in tensors:
            continue
        linear = Fp8Linear(tensors[f"{prefix}{name}.fp8"], tensors[f"{prefix}{name}.fp8_scales"], fmt,
                           None if child.bias is None else child.bias.detach(), dtype, device,
                           activations=activations, gemm=gemm)
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, Fp8Module(linear))
        made.append(linear)
    return made
