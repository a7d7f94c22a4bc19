"""FP8 in the PyTorch backend (backends/torch_fp8.py) on the CPU, where `torch._scaled_mm` runs (torch >= 2.13):
the torch quantizers against kernels_ref bit for bit, the FP8 linear against kernels_ref's numpy GEMMs, the whole fp8
LLM against the ONNX Runtime FP8 decoder built from the same checkpoint (and, looser, the float model), the FP8
projector against the ONNX FP8 projector, and `build --llm-precision fp8 --projector-precision fp8 --torch-weights`
end to end. The CUDA path (tensor-core `_scaled_mm`, CUDA-graph decode) is checked by benchmarks/gpu_check.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vila_edge import kernels_ref as R  # noqa: E402
from vila_edge.backends.torch_fp8 import (  # noqa: E402
    BLOCK_DIAGONAL_ROWS,
    Fp8Linear,
    block_row_scales,
    quantize_activations,
    quantize_weight,
    scaled_mm_support,
)
from vila_edge.errors import EngineError  # noqa: E402

FORMATS = ("e4m3", "e5m2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _linear(codes: np.ndarray, block_scales: np.ndarray, fmt: str, **kw) -> Fp8Linear:
    rows = block_row_scales(torch.from_numpy(block_scales), codes.shape[0])
    return Fp8Linear(torch.from_numpy(codes), rows, fmt, kw.pop("bias", None), torch.float32, "cpu", **kw)


def _rel(got, want) -> float:
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


# ---- the linear ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_quantizers_are_kernels_ref_bit_for_bit(fmt):
    """Weights [300, 200] (partial 128-blocks both ways) and activations: same codes, same scales."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((300, 200)) * np.float32(10.0) ** rng.integers(-3, 3, (300, 1))).astype(np.float32)
    x = rng.standard_normal((7, 200)).astype(np.float32) * 30
    codes, rows = quantize_weight(torch.from_numpy(w), fmt)
    want_codes, want_scales = R.fp8_quantize_weight_ref(w, fmt)
    np.testing.assert_array_equal(codes.view(torch.uint8).numpy(), want_codes)
    np.testing.assert_array_equal(rows.numpy(), np.repeat(want_scales, 128, axis=0)[:300])
    act_codes, act_scales = quantize_activations(torch.from_numpy(x), fmt)  # [KB, M, 128], [KB, M, 1]
    want_codes, want_scales = R.fp8_quantize_act_ref(x, fmt)
    np.testing.assert_array_equal(act_codes.transpose(0, 1).reshape(7, -1)[:, :200].view(torch.uint8).numpy(),
                                  want_codes)
    np.testing.assert_array_equal(act_scales[..., 0].t().numpy(), want_scales)


@pytest.mark.parametrize("rows", [1, 5, 70])  # 2 K blocks: rows x 2 <= 128 block-diagonal, 140 one call per block
@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_linear_matches_the_numpy_fp8_gemms(fmt, rows):
    """W8A8 through torch._scaled_mm (block-diagonal for few rows, one call per 128-column K block for more) vs
    kernels_ref.fp8_gemm_ref, and weight-only vs fp8_gemm_weight_only_ref. Both references multiply the dequantized
    operands in fp32 and the codes are the same, so only the fp32 summation order differs: relative error
    (max |diff| / max |ref|) <= 2e-6."""
    assert scaled_mm_support("cpu", fmt, 300) == (torch.float32, None)  # torch 2.13 runs _scaled_mm on the CPU
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((300, 200)).astype(np.float32)
    x = rng.standard_normal((rows, 200)).astype(np.float32)
    bias = rng.standard_normal(300).astype(np.float32)
    wq, ws = R.fp8_quantize_weight_ref(w, fmt)
    lin = _linear(wq, ws, fmt, bias=torch.from_numpy(bias))
    assert lin.gemm == "scaled-mm" and lin.fallback is None
    xq, xs = R.fp8_quantize_act_ref(x, fmt)
    want = R.fp8_gemm_ref(xq, xs, wq, ws, fmt) + bias
    assert _rel(lin(torch.from_numpy(x)).numpy(), want) <= 2e-6
    assert _rel(lin(torch.from_numpy(x[None])).numpy()[0], want) <= 2e-6  # [B, M, K] inputs too

    only = _linear(wq, ws, fmt, gemm="weight-only")
    x16 = x.astype(np.float16).astype(np.float32)
    assert only.gemm == "weight-only"
    assert _rel(only(torch.from_numpy(x16)).numpy(), R.fp8_gemm_weight_only_ref(x16, wq, ws, fmt)) <= 2e-6
    deq = R.fp8_dequantize_weight_ref(wq, ws, fmt)
    for layer in (lin, only):  # both layouts dequantize to kernels_ref's weight exactly
        np.testing.assert_array_equal(layer.dense_weight().numpy(), deq)


@pytest.mark.parametrize("rows", [4, BLOCK_DIAGONAL_ROWS])  # block-diagonal; one call per K block (2 blocks)
def test_swapped_format_or_transposed_scales_fail_the_parity(rows):
    """What the parity tests would see if the format were swapped (e4m3 codes read as e5m2 and back) or the
    128x128 block scales transposed: errors of order 1, far past their 2e-6 / 1e-5 limits. The weight has blocks
    of very different magnitudes so that a transposed scale grid is wrong almost everywhere."""
    rng = np.random.default_rng(2)
    magnitude = np.float32(10.0) ** np.array([[0, -2], [1, -1]], np.float32)  # 2 x 2 blocks
    w = (rng.standard_normal((256, 256)) * np.repeat(np.repeat(magnitude, 128, 0), 128, 1)).astype(np.float32)
    x = rng.standard_normal((rows, 256)).astype(np.float32)
    for fmt, other in (("e4m3", "e5m2"), ("e5m2", "e4m3")):
        wq, ws = R.fp8_quantize_weight_ref(w, fmt)
        want = R.fp8_linear_ref(x, w, fmt=fmt)
        assert _rel(_linear(wq, ws, fmt)(torch.from_numpy(x)).numpy(), want) <= 2e-6
        # "not <= 0.5": larger, or NaN (e5m2 codes read as e4m3 include its NaN codes)
        assert not _rel(_linear(wq, ws, other)(torch.from_numpy(x)).numpy(), want) <= 0.5
        assert not _rel(_linear(wq, np.ascontiguousarray(ws.T), fmt)(torch.from_numpy(x)).numpy(), want) <= 0.5


def test_fp8_linear_bad_options_are_one_line():
    codes, rows = quantize_weight(torch.ones(32, 128), "e4m3")
    with pytest.raises(EngineError, match=r"^fp8 gemm 'fast' is not one of: scaled-mm, weight-only$"):
        Fp8Linear(codes, rows, "e4m3", None, torch.float32, "cpu", gemm="fast")
    with pytest.raises(EngineError, match=r"^FP8 format 'e3m4' is not one of: e4m3, e5m2$"):
        Fp8Linear(codes, rows, "e3m4", None, torch.float32, "cpu")
    with pytest.raises(EngineError, match=r"FP8 scales \[1, 32\] do not fit codes \[32, 128\]"):
        Fp8Linear(codes, rows.t(), "e4m3", None, torch.float32, "cpu")


# ---- the LLM ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from vila_edge.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("nvila-lite", tmp_path_factory.mktemp("ckpt") / "tiny", seed=3) / "llm"


def _torch_greedy(engine, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    logits = [engine.forward(engine.embed(prompt))]
    tokens = [int(np.argmax(logits[0]))]
    for _ in range(steps - 1):
        logits.append(engine.forward(engine.embed([tokens[-1]])))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, np.stack(logits)


@pytest.mark.parametrize("fmt,activations", [("e4m3", "dynamic"), ("e5m2", "dynamic"), ("e4m3", "none")])
def test_fp8_llm_matches_onnxruntime_fp8_decoder(tmp_path, tiny_llm, fmt, activations):
    """The torch backend on the torch weights of an fp8 decoder vs that decoder on ONNX Runtime (CPU), 16 greedy
    steps from the same prompt, both eager fp32.

    Weights: the file's codes are kernels_ref's block quantization of the checkpoint's weights (q/k/v fused before
    quantizing, as the graph does), so the two engines multiply by the same FP8 numbers.
    Tolerance (relative: max |diff| / max |ORT logits| per step): weight-only, every step <= 1e-5 (fp32 summation
    order). W8A8: the prefill <= 1e-5, the median step <= 1e-4, every step <= 5e-2, greedy tokens identical: both
    round the same activations the same way, but one on a rounding boundary can fall either side after 1e-7 of
    attention / RMSNorm noise and move by one FP8 step, and its K/V carries that into the later steps (the ONNX
    decoder shows the same against its PyTorch oracle, test_fp8.py).
    Against the float model (fp32 checkpoint weights, no quantization) the first logits are only close: relative
    error <= 0.25 (e4m3) / 0.5 (e5m2, 2 mantissa bits) and cosine >= 0.98 / 0.9 on this random tiny model, and at
    least 10x the torch-vs-ORT difference (FP8 really quantizes)."""
    from test_llm_builder import ort_greedy, torch_greedy

    from vila_edge.backends.torch_llm import TorchLLMEngine, read_safetensors
    from vila_edge.builder.llm_onnx import build_llm_onnx, reference_model
    from vila_edge.builder.tensor_stream import SafetensorsReader
    from vila_edge.builder.torch_weights import LLM_FILE, write_llm_weights

    out = tmp_path / "decoder"
    info = build_llm_onnx(tiny_llm, out, precision="fp8", fp8_format=fmt, fp8_activations=activations,
                          group_size=64, accuracy_level=1, progress=False, threads=1)
    written = write_llm_weights(out, json.loads((tiny_llm / "config.json").read_text()))
    assert written["fp8_linears"] == 4 * info["num_layers"] and written["kinds"] == ["fp8", "grouped"]  # int8 head

    tensors, config = read_safetensors(out / LLM_FILE)
    reader = SafetensorsReader(tiny_llm)
    try:
        for fused, names in (("qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                             ("down_proj", ["mlp.down_proj"])):
            w = np.concatenate([reader.read(f"model.layers.1.{n}.weight").float().numpy() for n in names])
            codes, scales = R.fp8_quantize_weight_ref(w, fmt)
            np.testing.assert_array_equal(tensors[f"layers.1.{fused}.fp8"].numpy(), codes)
            np.testing.assert_array_equal(tensors[f"layers.1.{fused}.fp8_scales"].numpy(),
                                          np.repeat(scales, 128, axis=0)[:w.shape[0]])
        gate, up = (reader.read(f"model.layers.0.mlp.{n}.weight").float().numpy() for n in ("gate_proj", "up_proj"))
    finally:
        reader.close()
    # gate and up are quantized apart (two graph linears) and fused by rows: each keeps its own block scales
    fused_codes = np.concatenate([R.fp8_quantize_weight_ref(gate, fmt)[0], R.fp8_quantize_weight_ref(up, fmt)[0]])
    np.testing.assert_array_equal(tensors["layers.0.gate_up_proj.fp8"].numpy(), fused_codes)
    assert config["linears"]["layers.0.o_proj"] == {"kind": "fp8", "in": 128, "out": 128, "format": fmt,
                                                    "activations": activations}

    engine = TorchLLMEngine(out, info, device="cpu", max_context=64)
    assert engine.describe()["fp8"].startswith(f"{fmt} {'W8A8' if activations == 'dynamic' else 'weight-only'}")
    prompt = [5, 17, 99, 250, 3, 42, 7]
    ort_tokens, ort_logits = ort_greedy(out, info, prompt, 16)
    tokens, logits = _torch_greedy(engine, prompt, 16)
    relative = np.abs(logits - ort_logits).max(axis=1) / np.abs(ort_logits).max(axis=1)
    print(f"torch fp8 {fmt} activations={activations} vs ONNX Runtime: relative logit error per step "
          f"{np.round(relative, 7).tolist()}")
    assert tokens == ort_tokens
    if activations == "none":
        assert relative.max() <= 1e-5
    else:
        assert relative[0] <= 1e-5 and np.median(relative) <= 1e-4 and relative.max() <= 5e-2

    _, float_logits = torch_greedy(reference_model(tiny_llm, {"quant": "float"}), np.load(out / "embed_tokens.npy"),
                                   prompt, 1)
    vs_float = _rel(logits[0], float_logits[0])
    cosine = float(logits[0] @ float_logits[0] / np.linalg.norm(logits[0]) / np.linalg.norm(float_logits[0]))
    print(f"torch fp8 {fmt} activations={activations} vs float: relative {vs_float:.3f}, cosine {cosine:.4f}")
    assert vs_float <= (0.25 if fmt == "e4m3" else 0.5) and cosine >= (0.98 if fmt == "e4m3" else 0.9)
    assert vs_float > 10 * relative[0]


def test_fp8_llm_weight_only_fallback_runs_the_same_weights(tmp_path, tiny_llm):
    """`fp8_gemm="weight-only"` (what a GPU without FP8 tensor cores gets) on a W8A8 build: no activation
    quantization, so it equals the weight-only reference: ONNX Runtime's decoder with the same weights and no
    activation QDQ (an `activations="none"` build of the same checkpoint), within 1e-5 every step."""
    from test_llm_builder import ort_greedy

    from vila_edge.backends.torch_llm import TorchLLMEngine
    from vila_edge.builder.llm_onnx import build_llm_onnx
    from vila_edge.builder.torch_weights import write_llm_weights

    raw = json.loads((tiny_llm / "config.json").read_text())
    w8a8, weight_only = tmp_path / "w8a8", tmp_path / "weight-only"
    info = build_llm_onnx(tiny_llm, w8a8, precision="fp8", fp8_format="e4m3", group_size=64, accuracy_level=1,
                          progress=False, threads=1)
    write_llm_weights(w8a8, raw)
    info_none = build_llm_onnx(tiny_llm, weight_only, precision="fp8", fp8_format="e4m3", fp8_activations="none",
                               group_size=64, accuracy_level=1, progress=False, threads=1)
    engine = TorchLLMEngine(w8a8, info, device="cpu", max_context=64, fp8_gemm="weight-only")
    assert engine.describe()["fp8"] == "e4m3 weight-only, dequantized per call (asked for weight-only)"
    prompt = [9, 8, 7, 6, 5]
    ort_tokens, ort_logits = ort_greedy(weight_only, info_none, prompt, 8)
    tokens, logits = _torch_greedy(engine, prompt, 8)
    assert tokens == ort_tokens
    assert (np.abs(logits - ort_logits).max(axis=1) / np.abs(ort_logits).max(axis=1)).max() <= 1e-5
    with pytest.raises(EngineError, match=r"^fp8 gemm 'tensorcore' is not one of: scaled-mm, weight-only$"):
        TorchLLMEngine(w8a8, info, device="cpu", max_context=64, fp8_gemm="tensorcore")


# ---- the projector and the build ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_projector_matches_onnx_fp8_projector(tmp_path, tiny_checkpoint, fmt):
    """The torch vision file's FP8 projector (codes from the fp32 weights, other tensors fp32) vs
    `quantize_graph_linears` on the fp32 projector graph, same features in: relative error <= 1e-4 (the same FP8
    numbers; fp32 LayerNorm / GELU / summation order, and an activation on a rounding boundary can move one step),
    while the fp16 projector of an int4 build is further away."""
    import onnxruntime as ort

    from vila_edge.backends.torch_vision import TorchVisionEngine
    from vila_edge.builder import vision_onnx as vo
    from vila_edge.builder.fp8_qdq import quantize_graph_linears
    from vila_edge.builder.torch_weights import write_vision_weights
    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint("nvila-lite"))
    geom = vo.VisionGeometry.from_config(ckpt.config)
    _, projector = vo.load_modules(ckpt)
    vo.export_graph(projector, "projector", tmp_path / "p.onnx", geom)
    quantize_graph_linears(tmp_path / "p.onnx", tmp_path / "p.fp8.onnx", fmt)
    x = vo.example_input("projector", geom, 2).numpy()
    session = ort.InferenceSession(str(tmp_path / "p.fp8.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]

    facts = write_vision_weights(tmp_path / "fp8", ckpt, projector_fp8=fmt)
    assert facts["projector"] == f"fp8-{fmt}"
    engine = TorchVisionEngine(tmp_path / "fp8", device="cpu")
    assert engine.describe()["projector"] == f"{fmt} W8A8, torch._scaled_mm with 1x128 / 128x128 block scales"
    err = _rel(engine.project(x), want)
    write_vision_weights(tmp_path / "fp16", ckpt)
    err_fp16 = _rel(TorchVisionEngine(tmp_path / "fp16", device="cpu").project(x), want)
    print(f"projector {fmt}: torch fp8 vs ONNX fp8 {err:.2e}; torch fp16 vs ONNX fp8 {err_fp16:.2e}")
    assert err <= 1e-4 and err_fp16 > 10 * err


def test_fp8_build_with_torch_weights_runs_on_the_torch_backend(tiny_checkpoint, tmp_path):
    """`build --llm-precision fp8 --projector-precision fp8 --fp8-format e5m2 --torch-weights`, then the pipeline on
    the torch backends (CPU): FP8 linears in both files, and the same greedy tokens as ONNX Runtime on the same
    prompt embeddings (the LLMs share their FP8 weights)."""
    import vila_edge
    from vila_edge.builder.build import BuildOptions, build

    opts = BuildOptions(llm_precision="fp8", projector_precision="fp8", fp8_format="e5m2", llm_quant="rtn",
                        torch_weights=True)
    m = build(tiny_checkpoint("nvila-lite"), tmp_path / "e", options=opts, progress=False, threads=1).manifest
    assert m.llm["torch"]["fp8_linears"] > 0 and m.vision["torch"]["projector"] == "fp8-e5m2"
    rgb = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    outs = {}
    for backend in ("torch", "onnxruntime"):
        model = vila_edge.load(tmp_path / "e", device="cpu", threads=1, vision_backend=backend, llm_backend=backend)
        try:
            if backend == "torch":
                described = model.describe()
                assert "e5m2 W8A8" in json.dumps(described), described
            emb = outs.get("embeds")
            if emb is None:
                emb = outs["embeds"] = model.prompt_embeds("What is this?", [rgb])
            llm = model.llm
            logits = llm.forward(emb)
            tokens = [int(np.argmax(logits))]
            for _ in range(5):
                tokens.append(int(np.argmax(llm.forward(llm.embed([tokens[-1]])))))
            outs[backend] = tokens
        finally:
            model.close()
    assert outs["torch"] == outs["onnxruntime"]
