"""FP8 (OCP E4M3 / E5M2) inference on CPU: the numpy rounding against ml_dtypes, ONNX Runtime's float8
QuantizeLinear against it, the FP8 QDQ decoder and projector against the PyTorch oracle, and the build flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vila_edge import kernels_ref as R
from vila_edge.builder.fp8_qdq import numpy_float8_dtype, onnx_float8_type, qdq_weight_arrays, weight_from_qdq

ml_dtypes = pytest.importorskip("ml_dtypes")
FORMATS = ("e4m3", "e5m2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _values_and_ties(fmt: str) -> np.ndarray:
    """Every finite FP8 value, every midpoint between neighbours (exact ties) and random fp32 in range."""
    vals = R.FP8_VALUES[fmt]
    finite = np.unique(vals[np.isfinite(vals)].astype(np.float64))
    mids = (finite[:-1] + finite[1:]) / 2  # exact in fp32: neighbours differ by one FP8 ulp
    rng = np.random.default_rng(0)
    top = R.FP8_FORMATS[fmt].max
    rand = np.concatenate([rng.standard_normal(100_000) * s for s in (1e-6, 1e-3, 0.1, 10, top / 4)])
    x = np.concatenate([finite, mids, rand]).astype(np.float32)
    return x[np.abs(x) <= top]


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_encode_equals_ml_dtypes_and_saturates(fmt):
    x = _values_and_ties(fmt)
    want = x.astype(numpy_float8_dtype(fmt)).view(np.uint8)  # ml_dtypes: round to nearest even
    codes = R.fp8_encode(x, fmt)
    assert np.array_equal(codes, want)
    assert np.array_equal(R.fp8_decode(codes, fmt), want.view(numpy_float8_dtype(fmt)).astype(np.float32))
    top = R.FP8_FORMATS[fmt].max
    big = np.float32([top * 1.01, 1e30, np.inf, -np.inf, -top * 3])
    assert R.fp8_decode(R.fp8_encode(big, fmt), fmt).tolist() == [top, top, top, -top, -top]  # satfinite
    assert np.isnan(R.fp8_decode(R.fp8_encode(np.float32([np.nan]), fmt), fmt)).all()
    all_codes = np.arange(256, dtype=np.uint8)  # every code decodes as ml_dtypes reads it (NaN, inf included)
    np.testing.assert_array_equal(R.fp8_decode(all_codes, fmt),
                                  all_codes.view(numpy_float8_dtype(fmt)).astype(np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_onnxruntime_float8_quantize_linear_is_the_reference(fmt):
    """ONNX Runtime's CPU QuantizeLinear(saturate=1) to float8 rounds exactly as fp8_encode (incl. saturation)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x = np.concatenate([_values_and_ties(fmt), np.float32([R.FP8_FORMATS[fmt].max * 2, -1e30])])
    zero = numpy_helper.from_array(np.zeros((), numpy_float8_dtype(fmt)), "zero")
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["q"], saturate=1),
         helper.make_node("DequantizeLinear", ["q", "one"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert zero.data_type == onnx_float8_type(fmt)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, R.fp8_decode(R.fp8_encode(x, fmt), fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_qdq_weight_layout_is_the_block_quantization(fmt):
    w = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
    codes, scales = qdq_weight_arrays(w, fmt)
    assert codes.shape == (200, 300) and scales.shape == (2, 300)
    q, s = R.fp8_quantize_weight_ref(w, fmt)
    np.testing.assert_array_equal(weight_from_qdq(codes, scales, fmt), R.fp8_dequantize_weight_ref(q, s, fmt))


# ---- the FP8 decoder ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from vila_edge.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("nvila-lite", tmp_path_factory.mktemp("ckpt") / "tiny", seed=3) / "llm"


@pytest.mark.parametrize("fmt,activations", [("e4m3", "dynamic"), ("e5m2", "dynamic"), ("e4m3", "none")])
def test_fp8_decoder_matches_pytorch_running_the_dequantized_weights(tmp_path, tiny_qwen2, fmt, activations):
    """The decoder against ``reference_model``: the float model with the graph's FP8 weights (read back, and
    equal to kernels_ref's block quantization of the source weights) and its activation QDQ in numpy.

    Tolerance: weight-only, every step's logits within 1e-5 relative (fp32 summation order). With dynamic
    activations both sides round the same fp32 values (the rounding itself is exact:
    test_onnxruntime_float8_quantize_linear_is_the_reference), but an activation on a rounding boundary can
    fall either side after the fp32 noise of attention / RMSNorm (1e-7) and move by one FP8 step, and that
    token's K/V carries it into later steps: the prefill within 1e-5, the median step within 1e-4, every
    step within 5e-2, and the greedy tokens identical."""
    from test_llm_builder import ort_greedy, torch_greedy

    from vila_edge.builder.llm_onnx import build_llm_onnx, dequantized_weights, reference_model
    from vila_edge.builder.tensor_stream import SafetensorsReader

    out = tmp_path / "decoder"
    info = build_llm_onnx(tiny_qwen2, out, precision="fp8", fp8_format=fmt, fp8_activations=activations,
                          group_size=64, accuracy_level=1, progress=False, threads=1)
    assert info["quant"] == f"fp8-{fmt}" and info["fp8"]["format"] == fmt
    assert info["fp8"]["activations"] == activations and info["fp8"]["weight_block"] == [128, 128]
    assert info["matmulnbits"]["count"] == 1  # the int8 lm_head only
    graph = dequantized_weights(out)
    reader = SafetensorsReader(tiny_qwen2)
    try:
        for layer in range(info["num_layers"]):
            for name in ("self_attn.o_proj", "mlp.down_proj", "mlp.gate_proj"):
                key = f"model.layers.{layer}.{name}.weight"
                want = R.fp8_dequantize_weight_ref(*R.fp8_quantize_weight_ref(reader.read(key).float().numpy(), fmt),
                                                   fmt)
                np.testing.assert_array_equal(graph[key], want, err_msg=key)
    finally:
        reader.close()
    oracle = reference_model(tiny_qwen2, info, decoder_dir=out)
    prompt = [5, 17, 99, 250, 3, 42, 7]
    ort_tokens, ort_logits = ort_greedy(out, info, prompt, 16)
    ref_tokens, ref_logits = torch_greedy(oracle, np.load(out / "embed_tokens.npy"), prompt, 16)
    relative = np.abs(ort_logits - ref_logits).max(axis=1) / np.abs(ref_logits).max(axis=1)
    print(f"fp8 {fmt} activations={activations}: relative logit error per step {np.round(relative, 7).tolist()}")
    assert ort_tokens == ref_tokens
    if activations == "none":
        assert relative.max() <= 1e-5
    else:
        assert relative[0] <= 1e-5 and np.median(relative) <= 1e-4 and relative.max() <= 5e-2
    # and FP8 is really quantizing: the float model's logits are further away than the oracle's
    float_model = reference_model(tiny_qwen2, {"quant": "float"})
    _, float_logits = torch_greedy(float_model, np.load(out / "embed_tokens.npy"), prompt, 1)
    assert np.abs(float_logits[0] - ort_logits[0]).max() > 10 * np.abs(ref_logits[0] - ort_logits[0]).max()


def test_fp8_projector_matches_pytorch_with_fp8_weights_and_inputs(tmp_path, tiny_checkpoint):
    import onnxruntime as ort

    from vila_edge.builder import vision_onnx as vo
    from vila_edge.builder.fp8_qdq import quantize_graph_linears, quantize_linear_inputs
    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint("nvila-lite"))
    geom = vo.VisionGeometry.from_config(ckpt.config)
    _, projector = vo.load_modules(ckpt)
    vo.export_graph(projector, "projector", tmp_path / "p.onnx", geom)
    meta = quantize_graph_linears(tmp_path / "p.onnx", tmp_path / "p.fp8.onnx", "e5m2")
    assert meta["linears"] == sum(isinstance(m, torch.nn.Linear) for m in projector.modules()) > 0
    for module in projector.modules():  # the oracle: kernels_ref's FP8 weights, inputs quantized per token
        if isinstance(module, torch.nn.Linear):
            q, s = R.fp8_quantize_weight_ref(module.weight.detach().numpy(), "e5m2")
            module.weight.data = torch.from_numpy(R.fp8_dequantize_weight_ref(q, s, "e5m2"))
    quantize_linear_inputs(projector, "e5m2")
    x = vo.example_input("projector", geom, 2)
    with torch.no_grad():
        want = projector(x).numpy()
    session = ort.InferenceSession(str(tmp_path / "p.fp8.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


# ---- build flags --------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"fp8_format": "e5m2"}, "--fp8-format e5m2 needs --llm-precision fp8 or --projector-precision fp8"),
    ({"llm_precision": "fp8", "fp8_format": "e3m4"}, "--fp8-format 'e3m4' is not one of: e4m3, e5m2"),
    ({"projector_precision": "int8"}, "--projector-precision 'int8' is not one of: fp8"),
    ({"projector_precision": "fp8", "precision": "fp16"}, "--projector-precision fp8 needs --precision fp32"),
])
def test_fp8_build_options_refuse_bad_combinations(kwargs, message):
    from vila_edge.builder.build import BuildOptions
    from vila_edge.errors import VilaEdgeError

    with pytest.raises(VilaEdgeError, match=message.replace("(", r"\(")):
        BuildOptions(**kwargs).validate()


def test_fp8_build_options_keys():
    from vila_edge.builder.build import BuildOptions

    assert "fp8_format" not in BuildOptions().export_key()  # int4 directories built before stay up to date
    opts = BuildOptions(llm_precision="fp8", fp8_format="e5m2").validate()
    assert opts.fp8 == "e5m2" and opts.export_key()["fp8_format"] == "e5m2"
    assert BuildOptions(llm_precision="fp8").validate().fp8 == "e4m3"


def test_cli_fp8_bad_combination_is_one_line(tiny_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, "-c", "from vila_edge.cli import main; main()", "build",
                           str(tiny_checkpoint("nvila-lite")), "-o", str(tmp_path / "e"), "--fp8-format", "e5m2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --fp8-format e5m2 needs --llm-precision fp8 or --projector-precision fp8"]
    assert not (tmp_path / "e").exists()


def test_fp8_engine_directory_builds_and_generates(tiny_checkpoint, tmp_path):
    """`vila-edge build --llm-precision fp8 --projector-precision fp8 --fp8-format e5m2` end to end on CPU."""
    import vila_edge
    from vila_edge.builder.build import BuildOptions, build

    opts = BuildOptions(llm_precision="fp8", projector_precision="fp8", fp8_format="e5m2", llm_quant="rtn")
    res = build(tiny_checkpoint("nvila-lite"), tmp_path / "e", options=opts, progress=False, threads=1)
    m = res.manifest
    assert m.llm["quant"] == "fp8-e5m2" and m.llm["fp8"]["activations"] == "dynamic"
    assert m.vision["files"]["projector"]["fp8"] == "vision/projector.fp8.onnx"
    assert m.vision["checks"]["projector_fp8_vs_fp32"]["min"] > 0.99
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["options"]["fp8_format"] == "e5m2"
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    model = vila_edge.load(tmp_path / "e", device="cpu", threads=1)
    try:
        assert Path(model.vision.projector.path).name == "projector.fp8.onnx"
        out = model.generate("<image>\nWhat is this?", images=[rgb], max_new_tokens=4, ignore_eos=True)
    finally:
        model.close()
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_fp8_decoder_with_fp16_kv_cache(tmp_path, tiny_qwen2):
    """fp8 weight-only linears with kv_dtype="float16": fp16 past/present, the same greedy tokens as the
    fp32-cache build of the same weights, logits within 2e-3 relative (K/V rounded to fp16)."""
    from test_llm_builder import ort_greedy

    from vila_edge.builder.llm_onnx import build_llm_onnx

    common = dict(precision="fp8", fp8_format="e4m3", fp8_activations="none", group_size=64, accuracy_level=1,
                  progress=False, threads=1)
    half = build_llm_onnx(tiny_qwen2, tmp_path / "half", kv_dtype="float16", **common)
    full = build_llm_onnx(tiny_qwen2, tmp_path / "full", **common)
    assert half["kv_dtype"] == "float16" and full["kv_dtype"] == "float32"
    prompt = [5, 17, 99, 250, 3, 42, 7]
    tokens, logits = ort_greedy(tmp_path / "half", half, prompt, 12)
    tokens32, logits32 = ort_greedy(tmp_path / "full", full, prompt, 12)
    assert tokens == tokens32
    relative = np.abs(logits - logits32).max(axis=1) / np.abs(logits32).max(axis=1)
    assert 0 < relative.max() <= 2e-3, relative
