"""Weights for the PyTorch backend (`backends/torch_vision.py`, `backends/torch_llm.py`), written next to the ONNX
files of an engine directory:

  vision/torch.fp16.safetensors   SigLIP (the layers the selected feature uses) + projector, fp16; with
                                  --projector-precision fp8 the projector's linears as FP8 codes + block scales
                                  (`projector_fp8.{module}.fp8` / `.fp8_scales`, the layout of the LLM's "fp8" kind:
                                  the numbers of vision/projector.fp8.onnx) and its other tensors in float32
  llm/torch.int4.safetensors      the decoder's own quantized weights, read back from its ONNX graph

The LLM file holds exactly the numbers the ONNX Runtime decoder computes with (codes, zero points, scales of every
MatMulNBits node, the AWQ-folded RMSNorm weights, the q/k/v biases), so both backends run the same model. Per
linear, one of four storage kinds (the safetensors metadata "config" JSON says which):

- "int4": 4-bit codes for `torch.ops.aten._weight_int4pack_mm` (CUDA) / `_weight_int4pack_mm_for_cpu` (CPU).
  `{name}.int4` uint8 [N, K/2], two codes a byte, the even K index in the high nibble: the input of
  `_convert_weight_to_int4pack` (CUDA; the backend repacks into the tensor-core tile layout on the GPU at load,
  the packed layout depends on the device). `{name}.scales_and_zeros` float32 [K/G, N, 2]. Those kernels
  dequantize `(q - 8) * scale + zero` with a float zero; AWQ / MatMulNBits compute `(q - z) * scale` with an
  integer zero point z, so `zero = (8 - z) * scale`: an integer in -7..8 times an fp16-valued scale (AWQ's) is
  exact in float32. Checked per tensor; a linear whose products are not exact is stored "grouped" instead.
- "grouped": any other quantized linear (8-bit heads, shapes the int4 kernels refuse: N % 16, K % 32, group
  sizes outside 32..256): `{name}.codes` uint8 [N, blocks*G], `{name}.zeros` and `{name}.scales` float32
  [N, blocks]; the backend dequantizes them once at load.
- "dense": float linears, `{name}.weight` [N, K] as stored in the graph.
- "fp8": the FP8 QDQ linears of an `--llm-precision fp8` decoder (`builder/fp8_qdq.py`): `{name}.fp8` uint8 [N, K],
  the graph's OCP FP8 codes (metadata "format": e4m3 | e5m2), and `{name}.fp8_scales` float32 [N, ceil(K/128)],
  each 128x128 block's scale on each of its rows (the graph's [ceil(K/128), N] scales transposed); metadata
  "activations": "dynamic" (the graph quantizes the linear's input per token and 128 columns) or "none". The
  backend runs them with `torch._scaled_mm` (`backends/torch_fp8.py`). Fusing q/k/v or gate/up concatenates rows:
  per-row scales need no block alignment between the fused matrices.

q/k/v are one fused `qkv_proj` and gate/up one fused `gate_up_proj` (one kernel each per step). The rotary
inverse frequencies come from transformers' own rotary embedding for the checkpoint's config (every static
rope type), so the backend needs no transformers at run time.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vila_edge.backends.torch_llm import LLM_FILE
from vila_edge.backends.torch_vision import VISION_FILE
from vila_edge.errors import EngineError

FORMAT = 1
INT4_GROUPS = (32, 64, 128, 256)
_STATIC_ROPE = ("default", "linear", "llama3", "yarn", "longrope")


# ---- LLM -------------------------------------------------------------------------------------------------


def _linear_name(node_name: str) -> str | None:
    """'/model/layers.3/attn/qkv_proj/MatMulNBits' -> 'layers.3.qkv_proj'; '/lm_head/MatMul' -> 'lm_head'."""
    parts = node_name.split("/")
    if len(parts) > 1 and parts[1] == "lm_head":
        return "lm_head"
    if len(parts) > 4 and parts[1] == "model" and parts[2].startswith("layers."):
        return f"{parts[2]}.{parts[4]}"
    return None


def _graph_linears(model) -> tuple[dict, dict, dict]:
    """(quantized or dense linears by name, biases by name, norm weights) of a genai decoder graph."""
    from onnx import numpy_helper

    from vila_edge.builder.llm_onnx import matmulnbits_parts

    inits = {i.name: i for i in model.graph.initializer}
    fp8 = _fp8_weight_outputs(model.graph.node, inits)
    linears, biases = {}, {}
    for node in model.graph.node:
        name = _linear_name(node.name)
        if name is None:
            continue
        if node.op_type == "MatMulNBits":
            linears[name] = matmulnbits_parts(node, inits)
        elif node.op_type == "MatMul" and node.input[1] in fp8:
            base = node.name.rsplit("/", 1)[0]  # fp8_qdq names the input QDQ {base}/act_qdq/...
            dynamic = node.input[0].startswith(f"{base}/act_qdq/")
            linears[name] = {**fp8[node.input[1]], "activations": "dynamic" if dynamic else "none"}
        elif node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]]).T
            linears[name] = {"weight": np.ascontiguousarray(w), "K": w.shape[1], "N": w.shape[0]}
        elif node.op_type == "Add":
            b = next((i for i in node.input if i in inits), None)
            if b is not None:
                biases[name] = numpy_helper.to_array(inits[b]).astype(np.float32)
    norms = {n: numpy_helper.to_array(i).astype(np.float32) for n, i in inits.items()
             if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "final_norm_layernorm.weight"))}
    return linears, biases, norms


def _fp8_weight_outputs(nodes, inits) -> dict:
    """Output name of each FP8 weight DequantizeLinear -> {"fp8": codes [N, K], "fp8_scales": [N, KB], "format",
    "K", "N"}."""
    from onnx import TensorProto, numpy_helper

    formats = {TensorProto.FLOAT8E4M3FN: "e4m3", TensorProto.FLOAT8E5M2: "e5m2"}
    out = {}
    for node in nodes:
        codes = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if codes is None or codes.data_type not in formats or len(codes.dims) != 2:
            continue
        kn = numpy_helper.to_array(codes).view(np.uint8)  # [K, N]
        scales = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)  # [ceil(K/128), N]
        out[node.output[0]] = {"fp8": np.ascontiguousarray(kn.T), "fp8_scales": np.ascontiguousarray(scales.T),
                               "format": formats[codes.data_type], "K": kn.shape[0], "N": kn.shape[1]}
    return out


def _fuse(parts: list[dict], where: str) -> dict:
    """Concatenate linears along N (same K; same bits and group size when quantized)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if "fp8" in first:
        if any("fp8" not in p or (p["K"], p["format"], p["activations"]) != (first["K"], first["format"],
                                                                             first["activations"]) for p in parts):
            raise EngineError(f"{where}: linears with different K / FP8 format / activations cannot be fused")
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("fp8", "fp8_scales")}
        return {**first, **out, "N": out["fp8"].shape[0]}
    if "weight" in first:
        if not all("weight" in p for p in parts):
            raise EngineError(f"{where}: cannot fuse float and quantized linears")
        w = np.concatenate([p["weight"] for p in parts])
        return {"weight": w, "K": first["K"], "N": w.shape[0]}
    if any("codes" not in p or (p["K"], p["block"], p["bits"]) != (first["K"], first["block"], first["bits"])
           for p in parts):
        raise EngineError(f"{where}: linears with different K / group size / bits cannot be fused")
    out = {k: np.concatenate([p[k] for p in parts]) for k in ("codes", "zeros", "scales")}
    return {**out, "K": first["K"], "N": out["codes"].shape[0], "block": first["block"], "bits": first["bits"]}


def _float_zeros(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray | None:
    """(8 - z) * scale in float32, or None when a product is not exact (scales with more than ~20 significant
    bits: not AWQ's fp16 ones)."""
    s = scales.astype(np.float32)
    zf = ((8.0 - zeros.astype(np.float32)) * s).astype(np.float32)
    exact = np.array_equal(zf.astype(np.float64), (8.0 - zeros.astype(np.float64)) * s.astype(np.float64))
    return zf if exact else None


def _int4_ok(p: dict) -> bool:
    zeros_are_codes = np.array_equal(p["zeros"], np.round(p["zeros"])) and p["zeros"].min() >= 0 \
        and p["zeros"].max() <= 15
    return (p.get("bits") == 4 and zeros_are_codes and p["block"] in INT4_GROUPS and p["K"] % p["block"] == 0
            and p["K"] % 32 == 0 and p["N"] % 16 == 0 and _float_zeros(p["scales"], p["zeros"]) is not None)


def int4_scales_and_zeros(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """[N, groups] scales and integer zero points -> float32 [groups, N, 2] (scale, (8 - z) * scale), exact."""
    zf = _float_zeros(scales, zeros)
    if zf is None:
        raise EngineError("a zero point is not exactly representable as a float32 zero; store the linear grouped")
    return np.ascontiguousarray(np.stack([scales.astype(np.float32), zf], axis=-1).transpose(1, 0, 2))


def pack_int4_rows(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [N, K] (0..15) -> uint8 [N, K/2], even K index in the high nibble."""
    c = codes.astype(np.uint8)
    return np.ascontiguousarray((c[:, 0::2] << 4) | c[:, 1::2])


def _store(name: str, p: dict, tensors: dict) -> dict:
    if "fp8" in p:
        tensors[f"{name}.fp8"], tensors[f"{name}.fp8_scales"] = p["fp8"], p["fp8_scales"]
        return {"kind": "fp8", "in": int(p["K"]), "out": int(p["N"]), "format": p["format"],
                "activations": p["activations"]}
    if "weight" in p:
        tensors[f"{name}.weight"] = p["weight"]
        return {"kind": "dense", "in": int(p["K"]), "out": int(p["N"])}
    meta = {"in": int(p["K"]), "out": int(p["N"]), "group_size": int(p["block"]), "bits": int(p["bits"])}
    if _int4_ok(p):
        k = p["K"]
        tensors[f"{name}.int4"] = pack_int4_rows(p["codes"][:, :k])
        tensors[f"{name}.scales_and_zeros"] = int4_scales_and_zeros(p["scales"], p["zeros"])
        return {"kind": "int4", **meta}
    tensors[f"{name}.codes"] = np.ascontiguousarray(p["codes"].astype(np.uint8))
    tensors[f"{name}.zeros"] = p["zeros"].astype(np.float32)
    tensors[f"{name}.scales"] = p["scales"].astype(np.float32)
    return {"kind": "grouped", **meta}


def rope_tables(raw_llm: dict) -> tuple[np.ndarray, float]:
    """(inv_freq float32 [head_dim/2], attention_scaling) from transformers' rotary embedding of this config."""
    import importlib

    from transformers import AutoConfig

    raw = dict(raw_llm)
    model_type = raw.pop("model_type", "llama")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "architectures"})
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind not in _STATIC_ROPE:
        raise EngineError(f"rope_type {kind!r} changes with the sequence length; the torch backend supports "
                          f"{', '.join(_STATIC_ROPE)}")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = cls(cfg)
    return rotary.inv_freq.detach().float().numpy(), float(getattr(rotary, "attention_scaling", 1.0))


def llm_config(raw_llm: dict, linears: dict, **dims) -> dict:
    """The metadata "config" of an LLM weights file: geometry, norm / activation settings, the linears' kinds."""
    return {"format": FORMAT, **dims, "hidden_size": int(raw_llm["hidden_size"]),
            "vocab_size": int(linears["lm_head"]["out"]), "rms_norm_eps": float(raw_llm.get("rms_norm_eps", 1e-6)),
            "hidden_act": str(raw_llm.get("hidden_act", "silu")), "linears": linears}


def write_llm_weights(llm_dir: Path, raw_llm: dict) -> dict:
    """Read the built decoder in `llm_dir`, write `llm_dir / LLM_FILE`; returns its description."""
    import onnx
    from safetensors.numpy import save_file

    llm_dir = Path(llm_dir)
    genai_path = llm_dir / "genai_config.json"
    if not genai_path.is_file():
        raise EngineError(f"{genai_path}: missing; the torch LLM weights are read from the built ONNX decoder")
    dec = json.loads(genai_path.read_text())["model"]["decoder"]
    graph = onnx.load(str(llm_dir / dec.get("filename", "model.onnx")), load_external_data=True)
    linears, biases, norms = _graph_linears(graph)
    layers, heads, kv_heads, head_dim = (int(dec[k]) for k in ("num_hidden_layers", "num_attention_heads",
                                                                  "num_key_value_heads", "head_size"))
    tensors: dict[str, np.ndarray] = {}
    described: dict[str, dict] = {}
    for i in range(layers):
        pre = f"layers.{i}."
        groups = {"qkv_proj": ["qkv_proj"] if pre + "qkv_proj" in linears else ["q_proj", "k_proj", "v_proj"],
                  "o_proj": ["o_proj"],
                  "gate_up_proj": ["gate_up_proj"] if pre + "gate_up_proj" in linears else ["gate_proj", "up_proj"],
                  "down_proj": ["down_proj"]}
        for target, sources in groups.items():
            missing = [s for s in sources if pre + s not in linears]
            if missing:
                raise EngineError(f"{llm_dir}: decoder graph has no {pre}{missing[0]} linear")
            name = pre + target
            described[name] = _store(name, _fuse([linears[pre + s] for s in sources], name), tensors)
            bias = [biases.get(pre + s) for s in sources]
            if any(b is not None for b in bias):
                tensors[name + ".bias"] = np.concatenate(
                    [b if b is not None else np.zeros(linears[pre + s]["N"], np.float32)
                     for b, s in zip(bias, sources, strict=True)])
        tensors[pre + "input_norm"] = norms[f"model.layers.{i}.input_layernorm.weight"]
        tensors[pre + "post_norm"] = norms[f"model.layers.{i}.post_attention_layernorm.weight"]
    tensors["norm"] = norms[f"model.layers.{layers}.final_norm_layernorm.weight"]
    if "lm_head" not in linears:
        raise EngineError(f"{llm_dir}: decoder graph has no lm_head linear")
    described["lm_head"] = _store("lm_head", linears["lm_head"], tensors)
    inv_freq, scaling = rope_tables(raw_llm)
    tensors["rope_inv_freq"] = inv_freq
    config = llm_config(raw_llm, described, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
                        head_dim=head_dim, rope_attention_scaling=scaling, source=dec.get("filename", "model.onnx"))
    path = llm_dir / LLM_FILE
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
              metadata={"config": json.dumps(config)})
    kinds = sorted({d["kind"] for d in described.values()})
    return {"file": f"{llm_dir.name}/{LLM_FILE}", "kinds": kinds,
            "int4_linears": sum(d["kind"] == "int4" for d in described.values()),
            "fp8_linears": sum(d["kind"] == "fp8" for d in described.values()), "linears": len(described)}


# ---- vision ----------------------------------------------------------------------------------------------


def vision_config(raw_vision: dict, cfg) -> dict:
    """The metadata "config" of a vision weights file, from the raw SigLIP dict and the resolved VilaConfig."""
    import dataclasses

    v = cfg.vision
    return {"format": FORMAT, "hidden_size": int(raw_vision["hidden_size"]),
            "num_heads": int(raw_vision["num_attention_heads"]), "layers": int(v.layers_used),
            "patch_size": int(raw_vision["patch_size"]), "image_size": int(v.image_size),
            "layer_norm_eps": float(raw_vision.get("layer_norm_eps", 1e-6)),
            "hidden_act": str(raw_vision.get("hidden_act", "gelu_pytorch_tanh")),
            "drop_first": v.select_feature == "patch", "projector": dataclasses.asdict(cfg.projector)}


def fp8_projector_tensors(projector, fmt: str) -> tuple[dict, list[str]]:
    """({`projector_fp8.{name}.fp8`: uint8 codes [N, K], `.fp8_scales`: float32 row scales [N, KB]}, linear names)
    of every nn.Linear of the fp32 `projector`: `kernels_ref.fp8_quantize_weight_ref`, the quantization the ONNX
    FP8 projector (`fp8_qdq.quantize_graph_linears`) applies to the same fp32 weights."""
    import torch

    from vila_edge.kernels_ref import BLOCK, fp8_quantize_weight_ref

    tensors, names = {}, []
    for name, module in projector.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach().float().numpy()
            codes, block_scales = fp8_quantize_weight_ref(w, fmt)
            tensors[f"projector_fp8.{name}.fp8"] = torch.from_numpy(codes)
            rows = np.repeat(block_scales, BLOCK, axis=0)[:w.shape[0]]
            tensors[f"projector_fp8.{name}.fp8_scales"] = torch.from_numpy(np.ascontiguousarray(rows))
            names.append(name)
    return tensors, names


def write_vision_weights(vision_dir: Path, ckpt, projector_fp8: str | None = None) -> dict:
    """SigLIP (layers used only) + projector of `ckpt` in fp16 -> `vision_dir / VISION_FILE`. `projector_fp8`
    (e4m3 | e5m2): the projector's linears in FP8 instead, its other tensors in float32 (as the ONNX FP8 projector)."""
    import torch
    from safetensors.torch import save_file

    from vila_edge.builder.vision_onnx import load_modules

    if ckpt.config.vision.tower != "siglip":  # build() refuses first; this guards direct callers
        raise EngineError(f"{ckpt.root}: the PyTorch backend runs SigLIP towers only, not {ckpt.config.vision.tower}")
    tower, projector = load_modules(ckpt)

    def floats(prefix: str, module, dtype, skip=()):
        return {f"{prefix}{k}": t.detach().to(dtype).contiguous() for k, t in module.state_dict().items()
                if t.is_floating_point() and k not in skip}

    tensors = floats("tower.", tower, torch.float16)
    config = vision_config(ckpt.raw["vision"], ckpt.config)
    if projector_fp8 is None:
        tensors.update(floats("projector.", projector, torch.float16))
    else:
        fp8, names = fp8_projector_tensors(projector, projector_fp8)
        tensors.update(floats("projector.", projector, torch.float32, skip={f"{name}.weight" for name in names}))
        tensors.update(fp8)
        config["projector_fp8"] = {"format": projector_fp8, "activations": "dynamic", "linears": names}
    vision_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(vision_dir / VISION_FILE), metadata={"config": json.dumps(config)})
    out = {"file": f"{vision_dir.name}/{VISION_FILE}", "dtype": "float16"}
    return out if projector_fp8 is None else {**out, "projector": f"fp8-{projector_fp8}"}


def write_torch_weights(root: Path, ckpt, projector_fp8: str | None = None) -> dict:
    """Both files into the (staged) engine directory `root`; the LLM part needs the built decoder (whose linears
    it copies: int4, or FP8 for an --llm-precision fp8 build). `projector_fp8`: see `write_vision_weights`."""
    root = Path(root)
    out = {"vision": write_vision_weights(root / "vision", ckpt, projector_fp8)}
    if (root / "llm" / "genai_config.json").is_file():
        out["llm"] = write_llm_weights(root / "llm", ckpt.raw["llm"])
    return out
