"""Vision path -> ONNX: the vision tower (SigLIP, CLIP or InternViT, up to the selected layer) and the
projector, as two graphs.

    tiles [N,3,S,S] --tower.onnx--> features [N,T,C] --(S2 merge, numpy, runtime)--> [M,T,C*n]
                    --projector.onnx--> embeds [M,T',D]

The modules exported are the PyTorch reference's own (`reference.vision.SelectedFeatures`,
`reference.projector.Projector`), so the graphs are the oracle by construction; `check_parity` runs
them in ONNX Runtime against it.

Exporter choice: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). Both exporters
work in torch 2.13 and both match the reference to ~1e-5 on the fixtures, but the dynamo graph is the
cleaner one: ~half the nodes (no Shape->Gather->Unsqueeze->Concat chain per reshape), static
non-batch dims (T, C are numbers, not symbols, which TensorRT and ORT's fusions like) and it ran
~1.7x faster in ONNX Runtime on the SigLIP-448 geometry here (the TorchScript graph's per-layer shape
arithmetic and attention layout). Its trap: without explicit `dynamic_shapes` it silently fixes the
example's batch size, so we export with a batch-2 example AND a named dynamic batch dim, then assert
that dim 0 of every input/output is symbolic (and the tests run batch 1 and 3).

Opset: the dynamo exporter emits opset 18 natively; we lower it to 17 (`lower_opset`) because the
TensorRT 8.6 of JetPack 6.0 parses opsets <= 17. Our graphs only use ops whose opset-18 schema equals
the opset-17 one, except Pad-18, which only added an optional `axes` input (unused here), and the
reductions whose constant `axes` input moves back to an attribute (InternViT's RMSNorm ReduceMean).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vila_edge.errors import EngineError

OPSET = 17
EXPORT_BATCH = 2  # never 1: a batch-1 example is what gets silently specialised
MAX_EXPORT_BATCH = 4096  # torch.export bound only; the ONNX dim is symbolic
EXTERNAL_DATA_BYTES = 1 << 30  # graphs with more weight bytes keep them in "<file>.data"

TOWER_IO = ("pixel_values", "features")
PROJECTOR_IO = ("features", "embeds")
COMBINED_IO = ("input", "encoder_output")  # TensorRT-LLM multimodal vision engine naming
BATCH_DIMS = {"tower": "tiles", "projector": "chunks", "combined": "tiles"}


@dataclass(frozen=True)
class VisionGeometry:
    image_size: int
    tokens_per_tile: int  # T
    hidden: int  # C
    feature_width: int  # C * n_scales (projector input)
    projector_tokens: int  # T'
    embed_dim: int  # D

    @classmethod
    def from_config(cls, cfg) -> VisionGeometry:
        v = cfg.vision
        return cls(v.image_size, v.tokens_per_tile, v.hidden_size, v.feature_width, cfg.tokens_per_tile,
                   cfg.projector.out_features)


# ---- modules -----------------------------------------------------------------------------------


def load_modules(ckpt):
    """(tower, projector): the reference modules in float32, eval mode."""
    import torch

    from vila_edge.reference.projector import load_projector
    from vila_edge.reference.vision import load_tower

    tower = load_tower(ckpt)
    projector = load_projector(ckpt.config.projector, ckpt.state_dict("mm_projector", torch.float32))
    return tower, projector


def combined_module(tower, projector):
    """tower -> projector in one module (plain, non-S2 tilings only: no merge in between)."""
    import torch.nn as nn

    class TowerProjector(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower, self.projector = tower, projector

        def forward(self, x):
            return self.projector(self.tower(x))

    return TowerProjector().eval()


def example_input(kind: str, geom: VisionGeometry, batch: int = EXPORT_BATCH, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    if kind in ("tower", "combined"):
        return torch.rand((batch, 3, geom.image_size, geom.image_size), generator=g) * 2 - 1
    return torch.randn((batch, geom.tokens_per_tile, geom.feature_width), generator=g)


# ---- export ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_exporter():
    """torch.onnx's dynamo path logs progress and optional-dependency warnings; keep the CLI clean."""
    names = ("", "torch.onnx", "torch.export", "torch._export", "torch.fx", "onnxscript", "torch._dynamo",
             "torch._subclasses")  # "": onnxruntime.quantization logs through the root logger
    saved = [(logging.getLogger(n), logging.getLogger(n).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(module, kind: str, path, geom: VisionGeometry, *, opset: int = OPSET) -> dict:
    """Export one module to `path` with a dynamic leading axis; returns {"path", "input", "output", "external"}."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    in_name, out_name = {"tower": TOWER_IO, "projector": PROJECTOR_IO, "combined": COMBINED_IO}[kind]
    batch = torch.export.Dim(BATCH_DIMS[kind], min=1, max=MAX_EXPORT_BATCH)
    example = example_input(kind, geom)
    external = param_bytes(module) > EXTERNAL_DATA_BYTES
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=18, input_names=[in_name], output_names=[out_name],
            dynamic_shapes=({0: batch},), optimize=True, verbose=False, report=False,
        )
        program.save(str(path), external_data=external)
    del program
    lower_opset(path, opset)
    assert_dynamic_batch(path)
    return {"path": path, "input": in_name, "output": out_name, "external": external}


def lower_opset(path, opset: int = OPSET) -> None:
    """Relabel an opset-18 graph as `opset` when every node's schema is unchanged between them.

    (onnx's version converter has no Pad 18->17 adapter; Pad-18 only added the optional `axes` input.)
    Weights stored as external data are left untouched.
    """
    import onnx
    from onnx import defs

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    current = {o.domain: o.version for o in model.opset_import}
    if current.get("", opset) <= opset:
        return

    def check(graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                continue
            hi = defs.get_schema(node.op_type, current[""]).since_version
            lo = defs.get_schema(node.op_type, opset).since_version
            same = (node.op_type == "Pad" and len(node.input) <= 3) or (node.op_type in _REDUCE_AXES_18 and len(node.input) == 1)
            if hi != lo and not same:
                raise EngineError(f"{path}: op {node.op_type} changed between opset {opset} and {current['']}; "
                                  f"cannot lower the graph for TensorRT")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    check(attr.g)

    _reduce_axes_to_attribute(model.graph, opset)
    check(model.graph)
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = opset
    onnx.save(model, str(path))


# Reductions whose `axes` became an input in opset 18 (attribute before; ReduceSum moved in 13 already)
_REDUCE_AXES_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                   "ReduceLogSumExp", "ReduceSumSquare"}


def _reduce_axes_to_attribute(graph, opset: int) -> None:
    """Opset-18 reductions with constant `axes` inputs -> the opset-17 form (an `axes` attribute).
    InternViT's RMSNorm mean exports as ReduceMean-18."""
    import onnx
    from onnx import numpy_helper

    if opset >= 18:
        return
    consts = {t.name: t for t in graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute
                   and n.attribute[0].name == "value"})
    detached = set()
    for node in graph.node:
        if node.op_type in _REDUCE_AXES_18 and node.domain in ("", "ai.onnx") and len(node.input) > 1 \
                and node.input[1] in consts:
            noop = [a for a in node.attribute if a.name == "noop_with_empty_axes"]
            if any(a.i for a in noop):
                continue  # no opset-17 equivalent; check() refuses the graph
            axes = [int(a) for a in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
            detached.add(node.input[1])
            del node.input[1:]
            for a in noop:
                node.attribute.remove(a)
            node.attribute.append(onnx.helper.make_attribute("axes", axes))
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name in detached - used]:
        graph.initializer.remove(t)
    for n in [n for n in graph.node if n.op_type == "Constant" and n.output[0] in detached - used]:
        graph.node.remove(n)


def assert_dynamic_batch(path) -> None:
    """Dim 0 of every graph input and output must be a symbol, all other dims numbers."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            raise EngineError(f"{path}: the exporter fixed the batch axis of {v.name!r} "
                              f"({[d.dim_value or d.dim_param for d in dims]}); it must be dynamic")


def graph_io(path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": {v.name: shape(v) for v in model.graph.input},
            "outputs": {v.name: shape(v) for v in model.graph.output},
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def _save(model, path: Path, weight_bytes: int) -> None:
    import onnx

    data = path.with_name(path.name + ".data")
    for p in (path, data):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def to_fp16(src, dst) -> Path:
    """fp16 weights and math, float32 inputs/outputs (casts at the edges): for CUDA / TensorRT."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst = Path(dst)
    model = onnx.load(str(src))
    weight_bytes = sum(np.prod(t.dims, dtype=np.int64) * 2 for t in model.graph.initializer)
    with _quiet_exporter():
        model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=weight_bytes > (1 << 30))
    del model
    _save(model16, dst, int(weight_bytes))
    return dst


def _int8_needs_external_data(src: Path) -> bool:
    """int8 weights are a quarter of the fp32 ones: keep one file unless even that is over the limit."""
    data = src.with_name(src.name + ".data")
    fp32_bytes = data.stat().st_size if data.exists() else src.stat().st_size
    return fp32_bytes // 4 > EXTERNAL_DATA_BYTES


def quantize_int8(src, dst) -> dict:
    """CPU int8 tower: ONNX Runtime dynamic quantization of every MatMul with a constant weight.

    Weights int8 symmetric per output channel; activations uint8 with a per-tensor scale computed at
    run time (DynamicQuantizeLinear + MatMulIntegerToFloat after ORT's fusions). Dynamic quantization
    needs no calibration data, so the build stays deterministic and torch-free.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    big = _int8_needs_external_data(src)
    with _quiet_exporter():
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                         weight_type=QuantType.QInt8, use_external_data_format=big,
                         extra_options={"MatMulConstBOnly": True})
    return {"method": "onnxruntime.quantization.quantize_dynamic", "weights": "int8 symmetric, per output channel",
            "activations": "uint8, per-tensor dynamic scale", "ops": ["MatMul"]}


def quantize_qdq_int8(src, dst, calibration: np.ndarray, input_name: str = TOWER_IO[0]) -> dict:
    """QDQ int8 graph for TensorRT explicit quantization (`--trt-precision int8`): symmetric int8
    QuantizeLinear/DequantizeLinear pairs (zero point 0, as TensorRT requires) on the inputs of every
    MatMul with a constant weight, weights per output channel, activation ranges by min/max calibration
    over `calibration` (one tile per batch). Standard ONNX ops only, still opset 17.

    Experimental: the build calibrates on synthetic images; real-image calibration ranges will differ.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    big = _int8_needs_external_data(src)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{input_name: np.ascontiguousarray(calibration[i:i + 1], np.float32)}
                             for i in range(len(calibration))])

        def get_next(self):
            return next(self._it, None)

    with _quiet_exporter():
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, reduce_range=False, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=big,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True})
    for p in src.parent.glob("augmented_model*.onnx"):  # calibration leftovers of some ORT versions
        p.unlink()
    lower_opset(dst)
    return {"method": "onnxruntime.quantization.quantize_static (QDQ)", "weights": "int8 symmetric per output channel",
            "activations": "int8 symmetric, min/max calibration", "calibration": f"{len(calibration)} synthetic tiles",
            "ops": ["MatMul"], "for": "TensorRT explicit quantization (--trt-precision int8)"}


# ---- checks ------------------------------------------------------------------------------------


def ort_session(path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_graph(session, x: np.ndarray) -> np.ndarray:
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def cosine_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    """Cosine similarity per token (last axis = channels): mean and min, plus over the whole tensor."""
    a = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    b = np.asarray(got, np.float64).reshape(-1, got.shape[-1])
    per = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    whole = float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    return {"mean": float(per.mean()), "min": float(per.min()), "global": whole,
            "max_abs": float(np.abs(a - b).max())}


def check_parity(path, module, kind: str, geom: VisionGeometry, *, batches=(1,), threads: int | None = None,
                 seed: int = 1) -> dict:
    """ONNX Runtime vs the torch module over the given batch sizes: {"max_abs", "rel", "batches"}
    (rel = max_abs / max |reference|). A wrong output shape raises EngineError."""
    import torch

    sess = ort_session(path, threads)
    worst, scale = 0.0, 0.0
    for i, b in enumerate(batches):
        x = example_input(kind, geom, batch=b, seed=seed + i)
        with torch.no_grad():
            ref = module(x).numpy()
        got = run_graph(sess, x.numpy())
        if got.shape != ref.shape:
            raise EngineError(f"{path}: batch {b} gives shape {list(got.shape)}, the reference {list(ref.shape)}")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    return {"max_abs": worst, "rel": worst / max(scale, 1e-30), "batches": list(batches)}


def synthetic_image(width: int, height: int, seed: int = 0):
    """A deterministic natural-ish RGB image (gradients, shapes, texture) for calibration-free checks."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(x / max(width, 1) * 6.3 + rng.uniform(0, 6)),
        127 + 100 * np.cos(y / max(height, 1) * 4.1 + rng.uniform(0, 6)),
        127 + 60 * np.sin((x + y) / max(width + height, 1) * 9.0),
    ], axis=-1)
    base += rng.normal(0, 12, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(5, max(6, width // 3)), y0 + rng.integers(5, max(6, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    return img


def sample_tiles(cfg, n: int = 2, seed: int = 0) -> np.ndarray:
    """n preprocessed tiles of synthetic images, as the runtime would feed the tower."""
    from vila_edge.media.tiling import normalize

    s = cfg.vision.image_size
    tiles = [synthetic_image(s, s, seed + i) for i in range(n)]
    return normalize(tiles, cfg.vision.image_mean, cfg.vision.image_std)


def compare_graphs(ref_path, test_path, x: np.ndarray, threads: int | None = None) -> dict:
    """cosine_stats of graph `test_path` against graph `ref_path` on input x."""
    ref = run_graph(ort_session(ref_path, threads), x)
    got = run_graph(ort_session(test_path, threads), x)
    return cosine_stats(ref, got)


def estimate_tower_params(ckpt) -> int:
    """Parameters that end up in the tower graph (embeddings + the layers that run)."""
    used = ckpt.config.vision.layers_used
    n = 0
    for name, info in ckpt.index.get("vision_tower", {}).items():
        if ".head." in name or "post_layernorm" in name or name.endswith("position_ids"):
            continue
        if ".layers." in name:
            k = int(name.split(".layers.")[1].split(".")[0])
            if k >= used:
                continue
        size = 1
        for d in info.shape:
            size *= d
        n += size
    return n


def estimate_projector_params(ckpt) -> int:
    n = 0
    for info in ckpt.index.get("mm_projector", {}).values():
        size = 1
        for d in info.shape:
            size *= d
        n += size
    return n


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
