"""Write the int4 ONNX Runtime decoder graph ourselves, one layer at a time.

The graph is the one onnxruntime-genai's model builder makes for Llama / Qwen2 with
``exclude_embeds`` (same ops, node names, initializer names and attributes), so decode speed and
every tool that reads the graph back (``llm_onnx.dequantized_weights``, the runtime) are unchanged:

    inputs_embeds -> [SimplifiedLayerNormalization | SkipSimplifiedLayerNormalization]
      -> MatMulNBits qkv (+ bias Add) -> GroupQueryAttention (rotary inside, cos/sin caches,
         KV cache as past/present, seqlens from attention_mask) -> MatMulNBits o
      -> SkipSimplifiedLayerNormalization -> MatMulNBits gate, up -> SiLU * up -> MatMulNBits down
    -> final SkipSimplifiedLayerNormalization -> last position (Gather) -> lm_head -> logits

Tensors go to ``model.onnx.data`` as they are produced (``ExternalData``); the ``ModelProto``
keeps only their offsets, so the writer holds one layer at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vila_edge.backends.ort_llm import LOGITS_TO_KEEP
from vila_edge.builder.awq_formats import QuantizedLinear
from vila_edge.builder.fp8_qdq import FloatLinear, QdqGraph, fuse_float_rows

MS_DOMAIN = "com.microsoft"
OPSET = 21
KV_DTYPES = ("float32", "float16")
ATTENTIONS = ("gqa", "grouped")
TENSOR_TYPES = {"float32": 1, "float16": 10}  # onnx.TensorProto.FLOAT / FLOAT16
DATA_ALIGNMENT = 64  # bytes; every tensor starts on a multiple
# tensors of 1 MiB and more start on a 64 KiB boundary (the allocation granularity onnx's external-data
# writer aligns to), so that ONNX Runtime can memory-map them instead of reading them into its own buffers
LARGE_TENSOR_BYTES, LARGE_TENSOR_ALIGNMENT = 1 << 20, 1 << 16
LM_HEAD_CHUNK_ROWS = 8192


class ExternalData:
    """Appends tensors to one external-data file and returns TensorProtos pointing into it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.offset = 0

    def begin(self, name: str, dtype: np.dtype, dims: tuple[int, ...]):
        from onnx import TensorProto, helper

        nbytes = int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
        pad = (-self.offset) % (LARGE_TENSOR_ALIGNMENT if nbytes >= LARGE_TENSOR_BYTES else DATA_ALIGNMENT)
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        tensor = TensorProto(name=name, dims=list(dims), data_type=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        tensor.data_location = TensorProto.EXTERNAL
        return tensor, self.offset

    def write(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if array.dtype.itemsize == 1 and array.dtype not in (np.uint8, np.int8):  # ml_dtypes float8: no buffer format
            array = array.view(np.uint8)
        self.file.write(memoryview(array).cast("B"))  # no bytes copy
        self.offset += array.nbytes

    def end(self, tensor, start: int):
        from onnx import helper

        expected = int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if self.offset - start != expected:
            raise AssertionError(f"{tensor.name}: wrote {self.offset - start} bytes, dims need {expected}")
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(expected))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def add(self, name: str, array: np.ndarray):
        tensor, start = self.begin(name, array.dtype, array.shape)
        self.write(array)
        return self.end(tensor, start)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class DecoderSpec:
    """The geometry and options of the decoder graph (from the HF config)."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    context_length: int
    model_type: str
    accuracy_level: int = 4
    prune_lm_head: bool = True
    # KV cache (past/present) and attention dtype: "float16" halves the cache and its reads per step;
    # ONNX Runtime's CPU GroupQueryAttention runs fp16 (1.32: 0.74x the fp32 kernel's time at Qwen2-1.5B's heads,
    # 300 positions), the rest of the graph stays fp32 around two Casts per layer
    kv_dtype: str = "float32"
    # "gqa": ONNX Runtime's GroupQueryAttention (rotary, cache update, attention in one op; its CPU kernel
    # runs every query head against its KV head's whole cache). "grouped" (experimental): the same attention
    # from standard ops, one GEMM per KV head for all its query heads (_grouped_attention); the cache is updated
    # in place by ScatterND and attention spans the cache buffer, so the runtime grows that buffer with the
    # context. Measured (benchmarks/results/attention.md): no faster on CPUs (decode 1.00x at 2000 cached
    # positions, 0.79x at 300, prefill 0.79x): the per-op overhead of ~15 small ops a layer eats what reading
    # each KV head once saves
    attention: str = "gqa"

    @classmethod
    def from_config(cls, config: dict, *, accuracy_level: int = 4, prune_lm_head: bool = True,
                    kv_dtype: str = "float32", attention: str = "gqa") -> DecoderSpec:
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "grouped" and kv_dtype != "float32":
            raise ValueError("attention='grouped' keeps an fp32 KV cache (its MatMuls read the cache as it is); "
                             "use kv_dtype='float32' or attention='gqa'")
        # transformers 5 keeps RoPE settings in rope_parameters, older configs in rope_theta / rope_scaling
        rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise NotImplementedError(f"RoPE scaling {rope} is not supported by the decoder writer (plain RoPE only); "
                                      "build with writer='genai'")
        heads = int(config["num_attention_heads"])
        return cls(
            num_layers=int(config["num_hidden_layers"]), hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // heads),
            vocab_size=int(config["vocab_size"]), rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            context_length=int(config.get("seq_length") or config.get("max_position_embeddings", 2048)),
            model_type=str(config.get("model_type", "llama")), accuracy_level=accuracy_level,
            prune_lm_head=prune_lm_head, kv_dtype=kv_dtype, attention=attention,
        )


def rotary_caches(spec: DecoderSpec) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches [context_length, head_dim / 2] as the model builder computes them."""
    dim = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    t = torch.arange(spec.context_length, dtype=torch.int64).type_as(inv_freq)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().numpy(), freqs.sin().numpy()


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 codes [rows, n] (n even) -> [rows, n / 2], the first of each pair in the low nibble."""
    return (values[:, 0::2] & 0x0F) | ((values[:, 1::2] & 0x0F) << 4)


def matmulnbits_arrays(layer: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(qweight uint8 [N, blocks, block/2], scales float32 [N * blocks], zero points uint8) of a 4-bit linear."""
    codes = layer.q.numpy()
    n, k = codes.shape
    blocks = k // layer.group_size
    qweight = pack_nibbles(codes).reshape(n, blocks, layer.group_size // 2)
    scales = layer.scales.to(torch.float32).numpy().reshape(-1)
    zeros = layer.zeros.numpy()
    if blocks % 2:
        zeros = np.pad(zeros, ((0, 0), (0, 1)))
    return qweight, scales, pack_nibbles(zeros).reshape(-1)


class DecoderWriter:
    """Builds the graph layer by layer; ``finish`` writes ``model.onnx`` + ``genai_config.json``."""

    def __init__(self, out_dir: Path, spec: DecoderSpec, filename: str = "model.onnx", fp8: str | None = None,
                 fp8_activations: str = "dynamic"):
        """``fp8``: ``e4m3`` | ``e5m2`` to write the layers' linears as FP8 QDQ (``fp8_qdq``; they then come as
        ``FloatLinear``), None for int4 MatMulNBits."""
        from onnx import helper

        self.out_dir, self.spec, self.filename = Path(out_dir), spec, filename
        self.data = ExternalData(self.out_dir / (filename + ".data"))
        self.nodes: list = []
        self.initializers: list = []
        self.layers_done = 0
        self.helper = helper
        self.residual = "inputs_embeds"  # running sum of the residual stream
        self.pending = None  # output of the previous block not yet added to the residual
        self.qdq = None if fp8 is None else QdqGraph(self._node, self._initializer, fp8, fp8_activations)
        if spec.attention == "grouped":
            self._grouped_subgraph()
        else:
            self._mask_subgraph()
        cos, sin = rotary_caches(spec)
        kv = np.dtype(spec.kv_dtype)  # GroupQueryAttention takes its rotary caches in the KV dtype
        self.initializers += [self.data.add("cos_cache", cos.astype(kv)), self.data.add("sin_cache", sin.astype(kv))]

    # ---- small graph helpers ----------------------------------------------------------------------

    def _node(self, op: str, name: str, inputs: list[str], outputs: list[str] | None = None, domain: str = "",
              **attrs) -> str:
        outputs = outputs or [f"{name}/output_0"]
        self.nodes.append(self.helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    def _constant(self, value: int, shape: tuple = ()) -> str:
        label = f"[{value}]" if shape else str(value)
        name = f"/model/constants/INT64/{label}"
        if not any(n.output[0] == name for n in self.nodes if n.op_type == "Constant"):
            self._array_constant(name, np.array([value] if shape else value, dtype=np.int64),
                                 node_name=f"/model/constant_nodes/INT64/{label}")
        return name

    def _array_constant(self, name: str, array: np.ndarray, node_name: str | None = None) -> str:
        from onnx import numpy_helper

        self.nodes.append(self.helper.make_node("Constant", [], [name], name=node_name or name,
                                                value=numpy_helper.from_array(array, name)))
        return name

    def _mask_subgraph(self) -> None:
        """seqlens_k = sum(mask) - 1 and total_sequence_length = mask.shape[1], int32, for GroupQueryAttention."""
        base = "/model/attn_mask_reformat/attn_mask_subgraph"
        one_d = self._constant(1, (1,))
        summed = self._node("ReduceSum", f"{base}/ReduceSum", ["attention_mask", one_d], keepdims=0)
        minus = self._node("Sub", f"{base}/Sub", [summed, one_d])
        self.seqlens = self._node("Cast", f"{base}/Sub/Cast", [minus], to=6)
        shape = self._node("Shape", f"{base}/Shape", ["attention_mask"])
        total = self._node("Gather", f"{base}/Gather", [shape, self._constant(1)], axis=0)
        self.total_length = self._node("Cast", f"{base}/Gather/Cast", [total], to=6)

    def _int64s(self, name: str, values) -> str:
        return self._array_constant(name, np.asarray(values, np.int64))

    def _grouped_subgraph(self) -> None:
        """Per run, shared by every layer of grouped attention: positions of the new rows [1, S], ScatterND
        indices of their cache rows [1, kv_heads, S, 3], and the additive mask [1, 1, S * group, capacity]
        (query row s * group + g may see cache rows <= its position; rows past the context are stale)."""
        spec, base = self.spec, "/model/grouped_attention"
        group = spec.num_heads // spec.num_kv_heads
        total = self._node("Gather", f"{base}/total", [self._node("Shape", f"{base}/mask_shape", ["attention_mask"]),
                                                       self._constant(1)], axis=0)
        new = self._node("Gather", f"{base}/new", [self._node("Shape", f"{base}/x_shape", ["inputs_embeds"]),
                                                   self._constant(1)], axis=0)
        past = self._node("Sub", f"{base}/past", [total, new])
        positions = self._node("Range", f"{base}/positions", [past, total, self._constant(1)])  # [S]
        self.positions = self._node("Unsqueeze", f"{base}/position_ids", [positions, self._constant(0, (1,))])
        new_1d = self._node("Unsqueeze", f"{base}/new_1d", [new, self._constant(0, (1,))])
        heads = self._int64s(f"{base}/kv_heads", np.arange(spec.num_kv_heads).reshape(1, -1, 1, 1))
        index_shape = self._node("Concat", f"{base}/index_shape", [
            self._int64s(f"{base}/one_kv", [1, spec.num_kv_heads]), new_1d, self._constant(1, (1,))], axis=0)
        columns = [
            self._node("Expand", f"{base}/batch_column", [self._int64s(f"{base}/zero4", np.zeros((1, 1, 1, 1))),
                                                          index_shape]),
            self._node("Expand", f"{base}/head_column", [heads, index_shape]),
            self._node("Expand", f"{base}/row_column", [
                self._node("Reshape", f"{base}/positions_4d", [positions, self._int64s(f"{base}/shape_11s1",
                                                                                       [1, 1, -1, 1])]),
                index_shape]),
        ]
        self.scatter_index = self._node("Concat", f"{base}/scatter_index", columns, axis=-1)
        capacity = self._node("Gather", f"{base}/capacity", [
            self._node("Shape", f"{base}/cache_shape", ["past_key_values.0.key"]), self._constant(2)], axis=0)
        rows = self._node("Unsqueeze", f"{base}/cache_rows", [
            self._node("Range", f"{base}/cache_range", [self._constant(0), capacity, self._constant(1)]),
            self._constant(0, (1,))])  # [1, capacity]
        query_rows = self._node("Reshape", f"{base}/query_positions", [
            self._node("Expand", f"{base}/query_grid", [
                self._node("Reshape", f"{base}/positions_s1", [positions, self._int64s(f"{base}/shape_m1_1", [-1, 1])]),
                self._node("Concat", f"{base}/grid_shape", [new_1d, self._int64s(f"{base}/group", [group])], axis=0)]),
            self._int64s(f"{base}/shape_m1_1b", [-1, 1])])  # [S * group, 1]
        visible = self._node("LessOrEqual", f"{base}/visible", [rows, query_rows])
        zero = self._array_constant(f"{base}/zero_f", np.array(0.0, np.float32))
        minus_inf = self._array_constant(f"{base}/minus_inf", np.array(-np.inf, np.float32))
        self.attention_bias = self._node("Unsqueeze", f"{base}/bias", [
            self._node("Where", f"{base}/bias_2d", [visible, zero, minus_inf]), self._int64s(f"{base}/axes01", [0, 1])])

    def _grouped_attention(self, index: int, qkv: str) -> str:
        """Attention of layer `index` on the fused q/k/v projection [1, S, (heads + 2 kv_heads) * head_dim]:
        rotary (com.microsoft RotaryEmbedding, the GQA op's caches and half rotation), the new K/V rows
        scattered into the cache in place (ScatterND; the runtime binds present to the past buffer), and one
        [S * group, head_dim] x [head_dim, capacity] product per KV head: every cached K and V row is read once per
        step, not once per query head as ONNX Runtime's CPU GroupQueryAttention does."""
        spec, root = self.spec, f"/model/layers.{index}/attn/grouped"
        h, kv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        group = h // kv
        if index == 0:
            self._int64s("/model/grouped_attention/qkv_split", [h * d, kv * d, kv * d])
            self._int64s("/model/grouped_attention/shape_rows", [1, -1, kv, d])
            self._int64s("/model/grouped_attention/shape_q5", [1, -1, kv, group, d])
            self._int64s("/model/grouped_attention/shape_qg", [1, kv, -1, d])
            self._int64s("/model/grouped_attention/shape_o5", [1, kv, -1, group, d])
            self._int64s("/model/grouped_attention/shape_o", [1, -1, h * d])
        c = "/model/grouped_attention/"
        q, k, v = (f"{root}/Split/output_{i}" for i in range(3))
        self._node("Split", f"{root}/Split", [qkv, c + "qkv_split"], [q, k, v], axis=2)
        rope = dict(domain=MS_DOMAIN, interleaved=0)
        q = self._node("RotaryEmbedding", f"{root}/q_rotary", [q, self.positions, "cos_cache", "sin_cache"],
                       num_heads=h, **rope)
        k = self._node("RotaryEmbedding", f"{root}/k_rotary", [k, self.positions, "cos_cache", "sin_cache"],
                       num_heads=kv, **rope)
        caches = []
        for kind, rows in (("key", k), ("value", v)):
            rows = self._node("Transpose", f"{root}/{kind}_rows", [
                self._node("Reshape", f"{root}/{kind}_rows_4d", [rows, c + "shape_rows"])], perm=[0, 2, 1, 3])
            caches.append(self._node("ScatterND", f"{root}/{kind}_cache_update",
                                     [f"past_key_values.{index}.{kind}", self.scatter_index, rows],
                                     [f"present.{index}.{kind}"]))
        q = self._node("Reshape", f"{root}/q_grouped", [self._node("Transpose", f"{root}/q_heads_first", [
            self._node("Reshape", f"{root}/q_5d", [q, c + "shape_q5"])], perm=[0, 2, 1, 3, 4]), c + "shape_qg"])
        scores = self._node("FusedMatMul", f"{root}/scores", [q, caches[0]], domain=MS_DOMAIN, transB=1,
                            alpha=float(np.float32(1 / math.sqrt(d))))
        probs = self._node("Softmax", f"{root}/Softmax", [self._node("Add", f"{root}/masked", [scores,
                                                                                            self.attention_bias])],
                           axis=-1)
        out = self._node("MatMul", f"{root}/context", [probs, caches[1]])
        return self._node("Reshape", f"{root}/output", [self._node("Transpose", f"{root}/output_heads_last", [
            self._node("Reshape", f"{root}/output_5d", [out, c + "shape_o5"])], perm=[0, 2, 1, 3, 4]), c + "shape_o"])

    def _norm(self, name: str, weight_name: str, weight: np.ndarray, last: bool = False) -> str:
        """RMSNorm of residual + pending (SkipSimplifiedLayerNormalization), or of the input for the first one."""
        self.initializers.append(self.data.add(weight_name, weight.astype(np.float32)))
        eps = self.spec.rms_norm_eps
        if self.pending is None:
            return self._node("SimplifiedLayerNormalization", f"{name}/LayerNorm", [self.residual, weight_name],
                              [f"{name}/output_0"], epsilon=eps, axis=-1, stash_type=1)
        outputs = [f"{name}/output_0"] if last else [f"{name}/output_0", "", "", f"{name}/output_3"]
        out = self._node("SkipSimplifiedLayerNormalization", f"{name}/SkipLayerNorm",
                         [self.residual, self.pending, weight_name], outputs, domain=MS_DOMAIN, epsilon=eps)
        if not last:
            self.residual = f"{name}/output_3"
        return out

    def _initializer(self, name: str, array: np.ndarray) -> None:
        self.initializers.append(self.data.add(name, array))

    def _linear(self, base: str, prefix: str, x: str, layer: QuantizedLinear | FloatLinear) -> str:
        if isinstance(layer, FloatLinear):
            if self.qdq is None:
                raise ValueError(f"{prefix}: a float linear needs DecoderWriter(fp8=...)")
            return self.qdq.linear(base, prefix, x, layer)
        return self._matmul_nbits(base, prefix, x, layer, _bias(layer))

    def _matmul_nbits(self, base: str, prefix: str, x: str, layer: QuantizedLinear, bias: np.ndarray | None = None
                      ) -> str:
        qweight, scales, zeros = matmulnbits_arrays(layer)
        names = [f"{prefix}.MatMulNBits.{k}" for k in ("qweight", "scales", "qzeros")]
        self.initializers += [self.data.add(n, a) for n, a in zip(names, (qweight, scales, zeros), strict=True)]
        out = self._node("MatMulNBits", f"{base}/MatMulNBits", [x, *names], domain=MS_DOMAIN,
                         **self._nbits_attrs(layer.in_features, layer.out_features, 4, layer.group_size))
        if bias is None:
            return out
        bias_name = f"{prefix}.Add.bias"
        self.initializers.append(self.data.add(bias_name, bias.astype(np.float32)))
        return self._node("Add", f"{base}/Add", [out, bias_name])

    def _nbits_attrs(self, k: int, n: int, bits: int, block: int) -> dict:
        attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
        if self.spec.accuracy_level:
            attrs["accuracy_level"] = self.spec.accuracy_level
        return attrs

    # ---- layers -------------------------------------------------------------------------------------

    def add_layer(self, index: int, norms: dict[str, np.ndarray], linears: dict[str, QuantizedLinear]) -> None:
        """One decoder layer: ``norms`` input_layernorm / post_attention_layernorm, ``linears`` by HF name
        (``self_attn.q_proj`` ..., bias inside); q/k/v are fused into one MatMulNBits as the builder does."""
        if index != self.layers_done:
            raise ValueError(f"layers must be added in order: expected {self.layers_done}, got {index}")
        spec, root = self.spec, f"/model/layers.{index}"
        prefix = f"model.layers.{index}"
        x = self._norm(f"{root}/input_layernorm", f"{prefix}.input_layernorm.weight", norms["input_layernorm"])
        fuse = fuse_float_rows if isinstance(linears["self_attn.q_proj"], FloatLinear) else fuse_rows
        qkv = fuse([linears[f"self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")])
        h = self._linear(f"{root}/attn/qkv_proj", f"{prefix}.attn.qkv_proj", x, qkv)
        half = spec.kv_dtype == "float16"
        if half:
            h = self._node("Cast", f"{root}/attn/qkv_proj/Cast", [h], to=TENSOR_TYPES["float16"])
        if spec.attention == "grouped":
            attn = self._grouped_attention(index, h)
        else:
            attn = self._gqa(index, h)
        if half:
            attn = self._node("Cast", f"{root}/attn/GroupQueryAttention/Cast", [attn], to=TENSOR_TYPES["float32"])
        self.pending = self._linear(f"{root}/attn/o_proj", f"{prefix}.attn.o_proj", attn, linears["self_attn.o_proj"])
        x = self._norm(f"{root}/post_attention_layernorm", f"{prefix}.post_attention_layernorm.weight",
                       norms["post_attention_layernorm"])
        gate = self._linear(f"{root}/mlp/gate_proj", f"{prefix}.mlp.gate_proj", x, linears["mlp.gate_proj"])
        up = self._linear(f"{root}/mlp/up_proj", f"{prefix}.mlp.up_proj", x, linears["mlp.up_proj"])
        sigmoid = self._node("Sigmoid", f"{root}/mlp/act_fn/Sigmoid", [gate])
        silu = self._node("Mul", f"{root}/mlp/act_fn/Mul", [gate, sigmoid])
        product = self._node("Mul", f"{root}/mlp/Mul", [silu, up])
        self.pending = self._linear(f"{root}/mlp/down_proj", f"{prefix}.mlp.down_proj", product,
                                    linears["mlp.down_proj"])
        self.layers_done += 1

    def _gqa(self, index: int, h: str) -> str:
        spec, root = self.spec, f"/model/layers.{index}"
        return self._node(
            "GroupQueryAttention", f"{root}/attn/GroupQueryAttention",
            [h, "", "", f"past_key_values.{index}.key", f"past_key_values.{index}.value", self.seqlens,
             self.total_length, "cos_cache", "sin_cache", "", "", ""],
            [f"{root}/attn/GroupQueryAttention/output_0", f"present.{index}.key", f"present.{index}.value"],
            domain=MS_DOMAIN, num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads,
            scale=float(np.float32(1 / math.sqrt(spec.head_dim))), local_window_size=-1, softcap=0.0, do_rotary=1,
            rotary_interleaved=0)

    def finish(self, final_norm: np.ndarray, head_rows, head: str, group_size: int) -> Path:
        """Final norm, last-position slice and the lm_head; write model.onnx. ``head_rows`` yields float32
        row chunks of the [vocab, hidden] head weight; ``head``: ``int8`` | ``int4`` | ``float``."""
        spec = self.spec
        if self.layers_done != spec.num_layers:
            raise ValueError(f"{self.layers_done} of {spec.num_layers} layers were added")
        x = self._norm(f"/model/layers.{spec.num_layers}/final_norm_layernorm",
                       f"model.layers.{spec.num_layers}.final_norm_layernorm.weight", final_norm, last=True)
        if spec.prune_lm_head:
            last = self._node("Gather", "/lm_head/prune/Gather", [x, self._constant(-1)], axis=1)
            x = self._node("Unsqueeze", "/lm_head/prune/Unsqueeze", [last, self._constant(1, (1,))])
        self._lm_head(x, head_rows, head, group_size)
        self.data.close()
        return self._save()

    def _lm_head(self, x: str, head_rows, head: str, group_size: int) -> None:
        spec = self.spec
        n, k = spec.vocab_size, spec.hidden
        if head == "float":
            weight = np.empty((k, n), np.float32)
            for start, rows in head_rows:
                weight[:, start:start + rows.shape[0]] = rows.T
            self.initializers.append(self.data.add("lm_head.MatMul.weight", weight))
            self._node("MatMul", "/lm_head/MatMul", [x, "lm_head.MatMul.weight"], ["logits"])
            return
        bits = 8 if head == "int8" else 4
        blocks = -(-k // group_size)
        scales, zeros = [], []
        qname = "lm_head.MatMul.weight_Q8" if bits == 8 else "lm_head.MatMulNBits.qweight"
        tensor, start = self.data.begin(qname, np.uint8, (n, blocks, group_size * bits // 8))
        for _, rows in head_rows:
            packed, chunk_scales, chunk_zeros = _quantize_head_rows(rows, bits, group_size)
            self.data.write(packed)
            scales.append(chunk_scales)
            zeros.append(chunk_zeros)
        self.initializers.append(self.data.end(tensor, start))
        if bits == 8:  # the builder's int8 head: symmetric (implicit zero point 128), ONNX Runtime's quantizer
            names = [qname, "lm_head.MatMul.weight_scales"]
            self.initializers.append(self.data.add(names[1], np.concatenate(scales).reshape(n, blocks)))
            name = "/lm_head/MatMul_Q8"
        else:  # our asymmetric int4 RTN with zero points (what int4_lm_head_weight reproduces)
            names = [qname, "lm_head.MatMulNBits.scales", "lm_head.MatMulNBits.qzeros"]
            self.initializers.append(self.data.add(names[1], np.concatenate(scales).reshape(-1)))
            self.initializers.append(self.data.add(names[2], np.concatenate(zeros).reshape(-1)))
            name = "/lm_head/MatMulNBits"
        self._node("MatMulNBits", name, [x, *names], ["logits"], domain=MS_DOMAIN,
                   **self._nbits_attrs(k, n, bits, group_size))

    def _save(self) -> Path:
        import onnx
        from onnx import TensorProto, helper

        spec = self.spec
        kv = ["batch_size", spec.num_kv_heads, "past_sequence_length", spec.head_dim]
        present = ["batch_size", spec.num_kv_heads, "total_sequence_length", spec.head_dim]
        inputs = [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT,
                                                ["batch_size", "sequence_length", spec.hidden])]
        outputs = [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["batch_size", 1 if spec.prune_lm_head else "sequence_length", spec.vocab_size])]
        kv_type = TENSOR_TYPES[spec.kv_dtype]
        for kind in ("key", "value"):
            for i in range(spec.num_layers):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_type, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_type, present))
        graph = helper.make_graph(self.nodes, "main_graph", inputs, outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid(MS_DOMAIN, 1)],
                                  producer_name="vila-edge", ir_version=10)
        path = self.out_dir / self.filename
        onnx.save_model(model, str(path))
        return path

    def close(self) -> None:
        self.data.close()


def _bias(layer: QuantizedLinear) -> np.ndarray | None:
    return None if layer.bias is None else layer.bias.float().numpy()


def fuse_rows(layers: list[QuantizedLinear]) -> QuantizedLinear:
    """One linear computing the concatenated outputs of ``layers`` (fused q/k/v)."""
    biases = [layer.bias for layer in layers]
    if any(b is not None for b in biases):
        biases = [torch.zeros(layer.out_features) if b is None else b.float() for layer, b in zip(layers, biases,
                                                                                                 strict=True)]
        bias = torch.cat(biases)
    else:
        bias = None
    return QuantizedLinear(torch.cat([layer.q for layer in layers]), torch.cat([layer.scales for layer in layers]),
                           torch.cat([layer.zeros for layer in layers]), layers[0].group_size, layers[0].bits, bias)


def _quantize_head_rows(rows, bits: int, group_size: int):
    """(packed codes, scales, packed zero points) of float32 head rows [n, K] for MatMulNBits."""
    if bits == 8:
        from onnxruntime.capi._pybind_state import quantize_matmul_8bits

        n, k = rows.shape
        blocks = -(-k // group_size)
        weight = np.ascontiguousarray(rows.numpy().T)  # [K, n]: ONNX Runtime's quantizer takes the MatMul weight
        packed = np.zeros((n, blocks, group_size), np.uint8)
        scales = np.zeros((n, blocks), np.float32)
        zeros = np.zeros((n, blocks), np.uint8)
        quantize_matmul_8bits(packed, weight, scales, zeros, group_size, n, k, True)
        return packed, scales, zeros
    from vila_edge.builder.awq import quantize_tensor

    codes, scales, zeros = quantize_tensor(rows, 4, group_size)
    qweight, flat_scales, packed_zeros = matmulnbits_arrays(QuantizedLinear(codes, scales, zeros, group_size))
    return qweight, flat_scales, packed_zeros


def write_genai_config(out_dir: Path, spec: DecoderSpec, tokens: dict, filename: str, threads: int) -> dict:
    """genai_config.json in the model builder's layout (the runtime and tools read it); ``tokens``: the
    bos / eos / pad token ids."""
    genai = {
        "model": {
            "bos_token_id": tokens["bos_token_id"],
            "context_length": spec.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": [],
                                    "intra_op_num_threads": int(threads)},
                "filename": filename, "head_size": spec.head_dim, "hidden_size": spec.hidden,
                "inputs": {"inputs_embeds": "inputs_embeds", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads, "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.num_kv_heads,
            },
            "eos_token_id": tokens["eos_token_id"],
            "pad_token_id": tokens["pad_token_id"],
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": spec.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 50, "top_p": 1.0},
    }
    (Path(out_dir) / "genai_config.json").write_text(json.dumps(genai, indent=4) + "\n")
    return genai


# --------------------------------------------------------------------------------------------
# Logits of the last k positions (speculative decoding)
# --------------------------------------------------------------------------------------------


def add_logits_to_keep(model_path: Path) -> bool:
    """Rewrite a last-position decoder (Gather(-1) + Unsqueeze before the lm_head, as onnxruntime-genai's
    builder and our writer make it) to Slice the last ``logits_to_keep`` positions instead.

    ``logits_to_keep`` is an int64 [1] input: 1 computes what the graph computed before (the last
    position's logits, [batch, 1, vocab]); speculative decoding passes k+1 to read the logits of every
    position it verifies in one run. A required input, not an initializer-backed default: ONNX Runtime
    warns on every load about overridable initializers, and only our runtime drives this decoder
    (``backends.ort_llm`` binds it; onnxruntime-genai cannot run an inputs_embeds decoder anyway).
    Only ``model.onnx`` is rewritten (its external data is untouched). Returns False when the graph has
    no such pattern (all-position logits, or another builder's head) or already has the input.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    if any(i.name == LOGITS_TO_KEEP for i in graph.input):
        return False
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    constants.update({i.name: numpy_helper.to_array(i) for i in graph.initializer if not i.external_data})
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    gather = unsqueeze = None
    for node in graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        if node.op_type != "Gather" or axis != 1 or constants.get(node.input[1], np.array(0)).tolist() != -1:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Unsqueeze" and constants.get(users[0].input[1], np.array(0)).tolist() == [1]:
            gather, unsqueeze = node, users[0]
            break
    if gather is None:
        return False
    base = "/lm_head/logits_to_keep"
    neg = helper.make_node("Neg", [LOGITS_TO_KEEP], [f"{base}/Neg/output_0"], name=f"{base}/Neg")
    ends = helper.make_node("Constant", [], [f"{base}/ends"], name=f"{base}/ends",
                            value=numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64)))
    axes = helper.make_node("Constant", [], [f"{base}/axes"], name=f"{base}/axes",
                            value=numpy_helper.from_array(np.array([1], np.int64)))
    slice_ = helper.make_node("Slice", [gather.input[0], neg.output[0], ends.output[0], axes.output[0]],
                              [unsqueeze.output[0]], name=f"{base}/Slice")
    position = list(graph.node).index(gather)
    kept = [n for n in graph.node if n is not gather and n is not unsqueeze]
    nodes = kept[:position] + [neg, ends, axes, slice_] + kept[position:]
    del graph.node[:]
    graph.node.extend(nodes)
    # shapes recorded for the old head (genai's builder writes value_info: [batch, 1, hidden]) would pin
    # the positions axis to 1 again
    stale = {gather.output[0], unsqueeze.output[0]}
    infos = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    # the Gather's index (-1) and the Unsqueeze's axes are initializers or Constants only they may have read:
    # drop orphans, else ONNX Runtime warns about each on every load (a stderr line before the CLI's one error)
    old_operands = {*gather.input[1:], *unsqueeze.input[1:]}
    used = {name for node in graph.node for name in node.input}
    for initializer in [i for i in graph.initializer if i.name in old_operands and i.name not in used]:
        graph.initializer.remove(initializer)
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in old_operands - used]:
        graph.node.remove(node)
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, onnx.TensorProto.INT64, [1]))
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[1].HasField("dim_value") and dims[1].dim_value == 1:
            dims[1].Clear()
            dims[1].dim_param = "logits_positions"
    onnx.save_model(model, str(model_path))
    return True
