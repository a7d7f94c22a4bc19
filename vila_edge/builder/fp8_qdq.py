"""FP8 linears as ONNX QDQ: float8 weights with 128x128 block scales, dynamic 1x128 activation scales.

The arithmetic is ``kernels/fp8_gemm.cu``'s (``vila_edge.kernels_ref``): weight ``W [N, K]`` is stored
as OCP FP8 codes (E4M3 "e4m3fn" or E5M2) with one fp32 scale per 128x128 block, and each token's
activations are quantized per 128 input columns at run time (``scale = max(amax / fp8_max, 1e-10)``,
round to nearest even, saturate). In ONNX (opset 21, float8 types since opset 19):

    W: DequantizeLinear(float8 [K, N], scales [ceil(K/128), N], axis=0, block_size=128)
       (a 128x128 block scale repeated over its 128 output columns: the same numbers)
    X: [.., K] -> Pad to KB*128 -> Reshape [.., KB, 128] -> scale = Max(ReduceMax(Abs) / fp8_max, 1e-10)
       -> QuantizeLinear(X / scale, 1, float8 zero, saturate=1) -> DequantizeLinear -> * scale
       -> Reshape [.., KB*128] -> Slice [.., :K]
    Y = MatMul(X', W') (+ bias)

ONNX Runtime's CPU provider executes QuantizeLinear / DequantizeLinear for both float8 types (blocked
and per-axis) but has no float8 GEMM, so on CPU this is *simulated* FP8: the products run in fp32
on dequantized operands, exactly what the CUDA kernels' fp32-accumulating reference computes, at
fp32 MatMul speed plus the (de)quantization. Weights stay 1 byte each on disk and in the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vila_edge.kernels_ref import BLOCK, SCALE_FLOOR, fp8_decode, fp8_format, fp8_quantize_weight_ref

FP8_LINEAR_FORMATS = ("e4m3", "e5m2")
ACTIVATION_MODES = ("dynamic", "none")  # dynamic: W8A8 per-token 1x128 scales; none: weight-only


@dataclass(frozen=True)
class FloatLinear:
    """A float linear on its way to FP8 (quantized after q/k/v fusion, so blocks span the fused rows)."""

    weight: np.ndarray  # float32 [out, in]
    bias: np.ndarray | None = None  # float32 [out]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def fuse_float_rows(layers: list[FloatLinear]) -> FloatLinear:
    """One linear computing the concatenated outputs of ``layers`` (fused q/k/v)."""
    weight = np.concatenate([layer.weight for layer in layers])
    if all(layer.bias is None for layer in layers):
        return FloatLinear(weight)
    bias = np.concatenate([np.zeros(layer.out_features, np.float32) if layer.bias is None else layer.bias
                           for layer in layers])
    return FloatLinear(weight, bias)


def onnx_float8_type(fmt: str) -> int:
    from onnx import TensorProto

    fp8_format(fmt)
    return TensorProto.FLOAT8E4M3FN if fmt == "e4m3" else TensorProto.FLOAT8E5M2


def numpy_float8_dtype(fmt: str):
    import ml_dtypes

    fp8_format(fmt)
    return np.dtype(ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2)


def qdq_weight_arrays(weight: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """``W [N, K]`` -> (float8 codes [K, N] as the numpy float8 dtype, fp32 scales [ceil(K/128), N])."""
    codes, block_scales = fp8_quantize_weight_ref(weight, fmt)  # [N, K], [NB, KB]
    n = weight.shape[0]
    scales = np.repeat(block_scales, BLOCK, axis=0)[:n].T  # [KB, N]: each block's scale on its 128 columns
    return np.ascontiguousarray(codes.T).view(numpy_float8_dtype(fmt)), np.ascontiguousarray(scales, np.float32)


def weight_from_qdq(codes_kn: np.ndarray, scales_kbn: np.ndarray, fmt: str) -> np.ndarray:
    """The float32 ``W [N, K]`` a DequantizeLinear(axis=0, block_size=128) node computes (the graph's weight)."""
    k = codes_kn.shape[0]
    values = fp8_decode(np.asarray(codes_kn).view(np.uint8), fmt)  # [K, N]
    return (values * np.repeat(scales_kbn, BLOCK, axis=0)[:k]).T.astype(np.float32)


class QdqGraph:
    """Adds FP8 QDQ linears to a graph being written node by node.

    ``node(op, name, inputs, outputs=None, **attrs) -> first output`` and ``initializer(name, array) -> None``
    are the writer's own functions (``DecoderWriter`` streams initializers to external data; the projector
    rewrite keeps them in the model)."""

    def __init__(self, node: Callable[..., str], initializer: Callable[[str, np.ndarray], None], fmt: str,
                 activations: str = "dynamic"):
        if activations not in ACTIVATION_MODES:
            raise ValueError(f"activations must be one of {ACTIVATION_MODES}, got {activations!r}")
        self.node, self.initializer = node, initializer
        self.fmt, self.activations = fmt, activations
        self.fp8_max = float(fp8_format(fmt).max)
        self._constants: dict[str, str] = {}

    def _constant(self, label: str, array: np.ndarray) -> str:
        """A small constant as a Constant node (shape inputs must be inside the model, not external data)."""
        from onnx import numpy_helper

        name = f"/fp8_qdq/constants/{label}"
        if name not in self._constants:
            tensor = numpy_helper.from_array(np.asarray(array), name)
            self._constants[name] = self.node("Constant", f"/fp8_qdq/constant_nodes/{label}", [], [name], value=tensor)
        return name

    def linear(self, base: str, prefix: str, x: str, layer: FloatLinear) -> str:
        """``x [.., K]`` times the FP8 weight of ``layer`` (+ bias); node names under ``base`` (``{base}/MatMul``),
        initializers under ``prefix``."""
        n, k = layer.weight.shape
        codes, scales = qdq_weight_arrays(layer.weight, self.fmt)
        wq, ws = f"{prefix}.DequantizeLinear.weight", f"{prefix}.DequantizeLinear.scales"
        self.initializer(wq, codes)
        self.initializer(ws, scales)
        w = self.node("DequantizeLinear", f"{base}/DequantizeLinear", [wq, ws], axis=0, block_size=BLOCK)
        if self.activations == "dynamic":
            x = self.activation_qdq(f"{base}/act_qdq", x, k)
        out = self.node("MatMul", f"{base}/MatMul", [x, w])
        if layer.bias is None:
            return out
        bias_name = f"{prefix}.Add.bias"
        self.initializer(bias_name, layer.bias.astype(np.float32))
        return self.node("Add", f"{base}/Add", [out, bias_name])

    def activation_qdq(self, base: str, x: str, k: int) -> str:
        """Dynamic per-token 1x128 FP8 quantize-dequantize of ``x [.., K]`` (``kernels_ref.fp8_qdq_act_ref``)."""
        kb = -(-k // BLOCK)
        i64 = np.int64
        if kb * BLOCK != k:  # zero columns leave every block's amax unchanged and are sliced off again
            pads = self._constant(f"pads_{k}", np.array([0, 0, 0, 0, 0, kb * BLOCK - k], i64))
            x = self.node("Pad", f"{base}/Pad", [x, pads])
        blocks = self.node("Reshape", f"{base}/Reshape", [x, self._constant(f"blocks_{kb}", np.array([0, 0, kb, BLOCK], i64))])
        amax = self.node("ReduceMax", f"{base}/ReduceMax", [self.node("Abs", f"{base}/Abs", [blocks]),
                                                             self._constant("last_axis", np.array([-1], i64))],
                         keepdims=1)
        per_max = self.node("Div", f"{base}/Div_max", [amax, self._constant(f"max_{self.fmt}", np.array(self.fp8_max, np.float32))])
        scale = self.node("Max", f"{base}/Max", [per_max, self._constant("floor", np.array(SCALE_FLOOR, np.float32))])
        scaled = self.node("Div", f"{base}/Div", [blocks, scale])
        one = self._constant("one", np.array(1.0, np.float32))
        zero = self._constant(f"zero_{self.fmt}", np.zeros((), numpy_float8_dtype(self.fmt)))
        q = self.node("QuantizeLinear", f"{base}/QuantizeLinear", [scaled, one, zero], saturate=1)
        dq = self.node("DequantizeLinear", f"{base}/DequantizeLinear", [q, one])
        restored = self.node("Mul", f"{base}/Mul", [dq, scale])
        flat = self.node("Reshape", f"{base}/Reshape_back",
                         [restored, self._constant(f"flat_{kb}", np.array([0, 0, kb * BLOCK], i64))])
        if kb * BLOCK == k:
            return flat
        return self.node("Slice", f"{base}/Slice", [flat, self._constant("zero_i64", np.array([0], i64)),
                                                     self._constant(f"k_{k}", np.array([k], i64)),
                                                     self._constant("last_axis", np.array([-1], i64))])


def quantize_linear_inputs(model, fmt: str, include: Callable[[str], bool] = lambda name: True) -> None:
    """PyTorch oracle side: every ``nn.Linear`` of ``model`` whose name passes ``include`` sees its input
    quantized per token and 128 columns (``kernels_ref.fp8_qdq_act_ref``), as the QDQ graph's activations are."""
    import torch

    from vila_edge.kernels_ref import fp8_qdq_act_ref

    def hook(module, args):
        x = args[0]
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32).numpy()
        return (torch.from_numpy(fp8_qdq_act_ref(flat, fmt)).reshape(x.shape).to(x.dtype),)

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and include(name):
            module.register_forward_pre_hook(hook)


def quantize_graph_linears(src, dst, fmt: str, activations: str = "dynamic") -> dict:
    """Rewrite the ONNX graph at ``src`` (e.g. the fp32 projector) into ``dst`` with every ``MatMul`` by a
    2-D float initializer (``x [.., K] @ W^T [K, N]``, 3-D ``x``) as an FP8 QDQ linear. Returns what changed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    nodes, added, replaced = [], [], []

    def node(op, name, inputs, outputs=None, domain="", **attrs):
        outputs = outputs or [f"{name}/output_0"]
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    qdq = QdqGraph(node, lambda name, array: added.append(numpy_helper.from_array(array, name)), fmt, activations)
    for original in graph.node:
        weight = initializers.get(original.input[1]) if original.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT:
            nodes.append(original)
            continue
        base = original.name or f"/fp8/linear_{len(replaced)}"
        w = numpy_helper.to_array(weight).T.astype(np.float32)  # MatMul's [K, N] -> [N, K]
        out = qdq.linear(base, f"{weight.name}.fp8", original.input[0], FloatLinear(w))
        node("Identity", f"{base}/fp8_out", [out], [original.output[0]])
        replaced.append(weight.name)
    if not replaced:
        raise ValueError(f"{src}: no MatMul with a constant 2-D weight to quantize")
    used = {name for n in nodes for name in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    if not any(o.domain in ("", "ai.onnx") and o.version >= 21 for o in model.opset_import):
        for o in model.opset_import:  # blocked DequantizeLinear needs opset 21
            if o.domain in ("", "ai.onnx"):
                o.version = 21
    onnx.save_model(model, str(dst))
    return {"format": fmt, "activations": activations, "linears": len(replaced), "weight_block": [BLOCK, BLOCK],
            "activation_block": [1, BLOCK] if activations == "dynamic" else None}
