"""On-disk formats for 4-bit AWQ weights: AutoAWQ "gemm" checkpoints (read + write) and
TinyChat "v2" ``.pt`` files (read).

Every reader returns the same in-memory form, :class:`QuantizedLinear`: unpacked integer codes
``q`` [out, in], fp16 ``scales`` [out, groups] and integer ``zeros`` [out, groups], with the
dequantized weight ``(q - zeros) * scales`` (per group of ``group_size`` input columns).

AutoAWQ GEMM layout (``awq/modules/linear/gemm.py::WQLinear_GEMM.from_linear``), for a linear
with K inputs and N outputs:
- ``qweight`` int32 [K, N/8]: the codes transposed to [K, N]; output columns ``8c .. 8c+7`` go into
  word ``c``, nibble ``i`` (bits 4i..4i+3) holding column ``8c + AWQ_PACK_ORDER[i]``.
- ``qzeros`` int32 [K/G, N/8]: the zero points, packed the same way.
- ``scales`` fp16 [K/G, N]; ``bias`` fp16 [N].
onnxruntime-genai's ``loaders/awq.py`` undoes exactly this order (``reverse_reorder_tensor``).

TinyChat v2 layout (VILA reference doc §7.2): ``qweight`` int16 [N/4, K] from llm-awq's
``pack_intweight`` (interleave 4, kstride 64), ``scales`` and ``scaled_zeros`` fp16 [G_pad, N]
with ``scaled_zeros = -scales * zeros`` and ``G_pad`` >= K/G rows (padding rows are zero).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Files of a HF folder that hold weights or the model config; everything else (tokenizer,
# generation config, chat template) is copied verbatim next to a converted checkpoint.
_WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")
_MODEL_CONFIG_FILES = ("config.json",)


@dataclass
class QuantizedLinear:
    """One linear layer quantized per group of input columns (asymmetric, with zero points)."""

    q: torch.Tensor  # uint8 [out, in], codes in [0, 2**bits - 1]
    scales: torch.Tensor  # float16 [out, in / group_size]
    zeros: torch.Tensor  # uint8 [out, in / group_size]
    group_size: int
    bits: int = 4
    bias: torch.Tensor | None = None  # [out]

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> torch.Tensor:
        """Float32 weight [out, in] = (q - zero) * scale, the same arithmetic MatMulNBits uses."""
        out_features, in_features = self.q.shape
        groups = in_features // self.group_size
        codes = self.q.to(torch.float32).reshape(out_features, groups, self.group_size)
        zeros = self.zeros.to(torch.float32).unsqueeze(-1)
        scales = self.scales.to(torch.float32).unsqueeze(-1)
        return ((codes - zeros) * scales).reshape(out_features, in_features)


# --------------------------------------------------------------------------------------------
# AutoAWQ GEMM packing
# --------------------------------------------------------------------------------------------


def pack_awq_gemm(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes [rows, cols] into int32 [rows, cols/8] in AutoAWQ's column order."""
    rows, cols = codes.shape
    if cols % 8:
        raise ValueError(f"AutoAWQ packing needs a multiple of 8 columns, got {cols}")
    codes = codes.to(torch.int64).reshape(rows, cols // 8, 8)
    packed = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        packed |= (codes[:, :, column] & 0xF) << (4 * nibble)
    # int64 -> int32 keeps the low 32 bits (two's complement), as AutoAWQ's int32 ops do
    return (packed - ((packed >> 31) & 1) * (1 << 32)).to(torch.int32)


def unpack_awq_gemm(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_awq_gemm`: int32 [rows, cols/8] -> uint8 codes [rows, cols]."""
    rows, words = packed.shape
    packed = packed.to(torch.int64) & 0xFFFFFFFF
    codes = torch.empty(rows, words, 8, dtype=torch.uint8)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        codes[:, :, column] = ((packed >> (4 * nibble)) & 0xF).to(torch.uint8)
    return codes.reshape(rows, words * 8)


def awq_gemm_tensors(layer: QuantizedLinear) -> dict[str, torch.Tensor]:
    """The AutoAWQ GEMM buffers (qweight, qzeros, scales[, bias]) of one quantized linear."""
    if layer.bits != 4:
        raise ValueError(f"AutoAWQ GEMM checkpoints hold 4-bit weights only, got {layer.bits}-bit")
    tensors = {
        "qweight": pack_awq_gemm(layer.q.t().contiguous()),
        "qzeros": pack_awq_gemm(layer.zeros.t().contiguous()),
        "scales": layer.scales.t().contiguous().to(torch.float16),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(torch.float16)
    return tensors


def quantized_linear_from_awq_gemm(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, bias=None
) -> QuantizedLinear:
    """Read one AutoAWQ GEMM linear (qweight [K, N/8], qzeros [K/G, N/8], scales [K/G, N])."""
    codes = unpack_awq_gemm(qweight).t().contiguous()  # [N, K]
    zeros = unpack_awq_gemm(qzeros).t().contiguous()  # [N, K/G]
    return QuantizedLinear(
        q=codes, scales=scales.t().contiguous().to(torch.float16), zeros=zeros,
        group_size=group_size, bits=4, bias=bias,
    )


# --------------------------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------------------------


def awq_quantization_config(group_size: int, bits: int = 4) -> dict:
    """The ``quantization_config`` block AutoAWQ / transformers / onnxruntime-genai read."""
    return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm"}


def copy_tokenizer_files(src_dir: Path, out_dir: Path) -> None:
    """Copy every non-weight, non-config file (tokenizer, generation config, templates)."""
    for path in Path(src_dir).iterdir():
        if not path.is_file() or path.name in _MODEL_CONFIG_FILES or path.name.endswith(_WEIGHT_FILE_SUFFIXES):
            continue
        shutil.copy2(path, Path(out_dir) / path.name)


class AwqCheckpointWriter:
    """Writes an AutoAWQ-compatible HF folder one shard at a time (``model-0000k-of-0000n.safetensors``
    + ``model.safetensors.index.json``; a single shard is ``model.safetensors``), so a layer-streamed
    quantizer never holds the whole checkpoint. Float tensors are stored as ``float_dtype``
    (float16, as AutoAWQ does)."""

    def __init__(self, out_dir: Path | str, config: dict, *, group_size: int, num_shards: int = 1,
                 tokenizer_dir: Path | str | None = None, float_dtype: torch.dtype = torch.float16):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.config, self.group_size, self.num_shards = dict(config), group_size, num_shards
        self.tokenizer_dir, self.float_dtype = tokenizer_dir, float_dtype
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, float_tensors: dict[str, torch.Tensor], quantized: dict[str, QuantizedLinear]) -> None:
        """One shard: unquantized parameters by full name, and linears by module name (their ``.weight`` dropped)."""
        from safetensors.torch import save_file

        tensors = {name: t.detach().to(self.float_dtype).contiguous() for name, t in float_tensors.items()}
        for prefix, layer in quantized.items():
            tensors.pop(f"{prefix}.weight", None)
            for suffix, tensor in awq_gemm_tensors(layer).items():
                tensors[f"{prefix}.{suffix}"] = tensor.contiguous()
        shard = len(set(self.weight_map.values())) + 1
        if shard > self.num_shards:
            raise ValueError(f"{self.out_dir}: more than the {self.num_shards} announced shards")
        filename = ("model.safetensors" if self.num_shards == 1
                    else f"model-{shard:05d}-of-{self.num_shards:05d}.safetensors")
        save_file(tensors, str(self.out_dir / filename), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(tensors, filename))
        self.total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> Path:
        if self.num_shards > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config = dict(self.config)
        config["quantization_config"] = awq_quantization_config(self.group_size)
        config["torch_dtype"] = "float16"
        config.pop("dtype", None)
        (self.out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.tokenizer_dir is not None:
            copy_tokenizer_files(Path(self.tokenizer_dir), self.out_dir)
        return self.out_dir


def write_awq_checkpoint(
    out_dir: Path | str,
    config: dict,
    float_tensors: dict[str, torch.Tensor],
    quantized: dict[str, QuantizedLinear],
    *,
    group_size: int,
    tokenizer_dir: Path | str | None = None,
    float_dtype: torch.dtype = torch.float16,
) -> Path:
    """Write an AutoAWQ-compatible HF folder in one ``model.safetensors``.

    ``float_tensors`` are the unquantized parameters by full name (norms, embeddings, lm_head);
    ``quantized`` maps a linear's module name (``model.layers.0.self_attn.q_proj``) to its codes.
    """
    writer = AwqCheckpointWriter(out_dir, config, group_size=group_size, tokenizer_dir=tokenizer_dir,
                                 float_dtype=float_dtype)
    writer.add(float_tensors, quantized)
    return writer.close()


def _load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weight files")
    tensors = {}
    for file in files:
        tensors.update(load_file(str(file)))
    return tensors


def is_awq_checkpoint(folder: Path | str) -> bool:
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        return False
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "awq"


def read_awq_checkpoint(folder: Path | str) -> tuple[dict, dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """Read an AutoAWQ GEMM folder -> (config dict, float tensors, quantized linears by module name)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if str(quant.get("quant_method", "")).lower() != "awq":
        raise ValueError(f"{folder}/config.json: quantization_config.quant_method is not 'awq'")
    version = str(quant.get("version", "gemm")).lower()
    if version != "gemm":
        raise NotImplementedError(f"{folder}: AutoAWQ version '{version}' is not supported (only 'gemm')")
    if int(quant.get("bits", 4)) != 4 or not quant.get("zero_point", True):
        raise NotImplementedError(f"{folder}: only 4-bit AWQ with zero points is supported, got {quant}")
    group_size = int(quant.get("group_size", 128))
    tensors = _load_safetensors_folder(folder)
    quantized = {}
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        qweight = tensors.pop(name)
        try:
            qzeros = tensors.pop(f"{prefix}.qzeros")
            scales = tensors.pop(f"{prefix}.scales")
        except KeyError as missing:
            raise ValueError(f"{folder}: {prefix} has qweight but no {missing}") from None
        group = group_size if group_size > 0 else qweight.shape[0]
        quantized[prefix] = quantized_linear_from_awq_gemm(
            qweight, qzeros, scales, group, bias=tensors.pop(f"{prefix}.bias", None)
        )
    return config, tensors, quantized


# --------------------------------------------------------------------------------------------
# TinyChat v2 (.pt) reading
# --------------------------------------------------------------------------------------------


def unpack_tinychat_v2(packed: torch.Tensor, interleave: int = 4, kstride: int = 64) -> torch.Tensor:
    """Undo llm-awq ``pack_intweight``: int16 [N/4, K] -> uint8 codes [N, K].

    Packing (reference doc §7.2) was: (1) within each 32-wide K block reorder with
    ``reshape(N, K/32, 4, 4, 2).transpose(0, 1, 3, 2, 4)``; (2) within each 8 reorder
    ``reshape(N, K/32, 4, 4, 2).transpose(0, 1, 2, 4, 3)``; (3) interleave 4 rows:
    ``reshape(N/4, 4, K/64, 64).transpose(0, 2, 1, 3).reshape(N/4, K/64, 64, 4)``;
    (4) ``v0 | v1 << 4 | v2 << 8 | v3 << 12`` into int16. Each step is undone in reverse order.
    """
    rows, in_features = packed.shape
    out_features = rows * interleave
    if in_features % kstride or in_features % 32:
        raise ValueError(f"TinyChat v2 qweight has K={in_features}, not a multiple of {kstride}")
    words = packed.to(torch.int32) & 0xFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(interleave)], dim=-1)  # [N/4, K, 4]
    # (4)+(3): [N/4, K/64, 64, 4] was a plain reshape of [N/4, K/64, 4, 64]
    codes = nibbles.reshape(rows, in_features // kstride, interleave, kstride)
    codes = codes.permute(0, 2, 1, 3).reshape(out_features, in_features)
    # (2): the transpose swapped the last two axes of [.., 4, 4, 2] -> [.., 4, 2, 4]
    codes = codes.reshape(out_features, in_features // 32, 4, 2, 4).permute(0, 1, 2, 4, 3)
    codes = codes.reshape(out_features, in_features)
    # (1): swapping two axes of equal size is its own inverse
    codes = codes.reshape(out_features, in_features // 32, 4, 4, 2).permute(0, 1, 3, 2, 4)
    return codes.reshape(out_features, in_features).to(torch.uint8).contiguous()


def group_size_from_name(name: str, default: int = 128) -> int:
    """``vila-1.5-3b-w4-g128-awq-v2.pt`` -> 128."""
    match = re.search(r"-g(\d+)-", Path(name).name)
    return int(match.group(1)) if match else default


def find_tinychat_v2_file(folder: Path | str) -> Path | None:
    candidates = sorted(Path(folder).glob("*v2.pt"))
    return candidates[0] if candidates else None


def read_tinychat_v2(
    pt_path: Path | str, group_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedLinear]]:
    """Read a TinyChat ``*-w4-g128-awq-v2.pt`` state dict -> (float tensors, quantized linears).

    Integer zero points are recovered as ``round(-scaled_zeros / scales)``; TinyChat itself
    dequantizes ``q * s + scaled_zeros`` with the fp16 product, which differs from
    ``(q - z) * s`` by at most one fp16 rounding of ``s * z``.
    """
    pt_path = Path(pt_path)
    if not pt_path.name.endswith("v2.pt"):
        raise ValueError(
            f"{pt_path}: not a TinyChat v2 file (name must end in 'v2.pt'); repack v1 files with "
            "llm-awq's tinychat/offline-weight-repacker.py first"
        )
    group_size = group_size or group_size_from_name(pt_path.name)
    state = torch.load(str(pt_path), map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    quantized = {}
    for name in [n for n in state if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        quantized[prefix] = tinychat_v2_linear(
            state.pop(name), state.pop(f"{prefix}.scales"), state.pop(f"{prefix}.scaled_zeros"),
            group_size, bias=state.pop(f"{prefix}.bias", None), where=f"{pt_path}: {prefix}")
    floats = {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
    return floats, quantized


def tinychat_v2_linear(packed: torch.Tensor, scales: torch.Tensor, scaled_zeros: torch.Tensor, group_size: int,
                       bias: torch.Tensor | None = None, where: str = "TinyChat v2") -> QuantizedLinear:
    """One TinyChat v2 linear (qweight int16 [N/4, K], scales / scaled_zeros fp16 [G_pad, N]) -> QuantizedLinear."""
    codes = unpack_tinychat_v2(packed)
    out_features, in_features = codes.shape
    if in_features % group_size:
        raise ValueError(f"{where} has K={in_features}, not divisible by group size {group_size}")
    groups = in_features // group_size
    if scales.shape[0] < groups or scales.shape[1] != out_features:
        raise ValueError(
            f"{where}.scales has shape {tuple(scales.shape)}, expected ({groups}+, {out_features}); "
            "is the group size right?"
        )
    group_scales = scales[:groups].t().contiguous().to(torch.float16)
    zeros = torch.round(-scaled_zeros[:groups].t().float() / group_scales.float().clamp(min=1e-10))
    return QuantizedLinear(q=codes, scales=group_scales, zeros=zeros.clamp(0, 15).to(torch.uint8),
                           group_size=group_size, bits=4, bias=bias)


def tinychat_v2_to_awq_checkpoint(
    pt_path: Path | str, llm_dir: Path | str, out_dir: Path | str, group_size: int | None = None
) -> Path:
    """Convert a TinyChat v2 ``.pt`` (+ the ``llm/`` folder's config and tokenizer) to AutoAWQ."""
    llm_dir = Path(llm_dir)
    floats, quantized = read_tinychat_v2(pt_path, group_size)
    config = json.loads((llm_dir / "config.json").read_text())
    any_layer = next(iter(quantized.values()))
    return write_awq_checkpoint(
        out_dir, config, floats, quantized, group_size=any_layer.group_size, tokenizer_dir=llm_dir
    )


# --------------------------------------------------------------------------------------------
# Dequantization (the PyTorch oracle's weights)
# --------------------------------------------------------------------------------------------


def dequantize_awq_checkpoint(folder: Path | str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """State dict of float weights (HF names) equal to what the quantized checkpoint computes.

    Works for AutoAWQ folders and for ``llm/`` folders holding a TinyChat ``*v2.pt``.
    """
    folder = Path(folder)
    if is_awq_checkpoint(folder):
        _, floats, quantized = read_awq_checkpoint(folder)
    else:
        pt_path = find_tinychat_v2_file(folder)
        if pt_path is None:
            raise FileNotFoundError(f"{folder}: neither an AutoAWQ checkpoint nor a folder with a TinyChat *v2.pt")
        floats, quantized = read_tinychat_v2(pt_path)
    state = {name: tensor.to(dtype) for name, tensor in floats.items()}
    for prefix, layer in quantized.items():
        state[f"{prefix}.weight"] = layer.dequantize().to(dtype)
        if layer.bias is not None:
            state[f"{prefix}.bias"] = layer.bias.to(dtype)
    return state


def load_dequantized_model(folder: Path | str, dtype: torch.dtype = torch.float32):
    """A transformers causal LM holding the dequantized weights of an AWQ checkpoint folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = dequantize_awq_checkpoint(folder, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{folder}: dequantized weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()
