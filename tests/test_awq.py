"""AWQ quantizer, AutoAWQ / TinyChat v2 formats, and the quality check on a real model (SmolLM2)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vila_edge.builder import awq
from vila_edge.builder.awq_formats import (
    AWQ_PACK_ORDER,
    QuantizedLinear,
    dequantize_awq_checkpoint,
    pack_awq_gemm,
    read_awq_checkpoint,
    read_tinychat_v2,
    tinychat_v2_to_awq_checkpoint,
    unpack_awq_gemm,
    unpack_tinychat_v2,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: the quantizer is faster on one thread


# ---- tiny HF checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """The llm/ folder of the tiny NVILA fixture: Qwen2, GQA 4/2, nonzero q/k/v biases, untied head."""
    from vila_edge.testing import make_tiny_checkpoint

    return make_tiny_checkpoint("nvila", tmp_path_factory.mktemp("ckpt") / "tiny-nvila", seed=1) / "llm"


# ---- packing -------------------------------------------------------------------------------


def test_awq_gemm_pack_order_matches_autoawq():
    # AutoAWQ's WQLinear_GEMM puts column order_map[i] of each 8 into nibble i
    codes = torch.arange(8, dtype=torch.uint8).reshape(1, 8)
    packed = pack_awq_gemm(codes)
    expected = sum(col << (4 * nibble) for nibble, col in enumerate(AWQ_PACK_ORDER))
    assert packed.dtype == torch.int32
    assert packed.item() & 0xFFFFFFFF == expected == 0x75316420
    random = torch.randint(0, 16, (24, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_awq_gemm(pack_awq_gemm(random)), random)


def pack_tinychat_v2_from_doc(codes: np.ndarray) -> np.ndarray:
    """llm-awq pack_intweight, written from the reference doc §7.2 (interleave 4, kstride 64)."""
    n, k = codes.shape
    w = codes.astype(np.int32).reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, k // 32, 32)
    w = w.reshape(n, k // 32, 4, 4, 2).transpose(0, 1, 2, 4, 3).reshape(n, k)
    w = w.reshape(n // 4, 4, k // 64, 64).transpose(0, 2, 1, 3).reshape(n // 4, k // 64, 64, 4)
    w = w[..., 0] | (w[..., 1] << 4) | (w[..., 2] << 8) | (w[..., 3] << 12)
    return w.reshape(n // 4, k).astype(np.int16)


def test_tinychat_v2_unpack_inverts_doc_packer():
    # step (1) of the doc: each 32-block becomes [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, ...]
    step1 = np.arange(32).reshape(4, 4, 2).transpose(1, 0, 2).reshape(-1)
    assert list(step1[:12]) == [0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11]
    codes = np.random.default_rng(0).integers(0, 16, size=(16, 256))
    packed = torch.from_numpy(pack_tinychat_v2_from_doc(codes))
    assert packed.shape == (4, 256) and packed.dtype == torch.int16
    assert torch.equal(unpack_tinychat_v2(packed), torch.from_numpy(codes.astype(np.uint8)))


# ---- quantizer -------------------------------------------------------------------------------


def test_quantize_tensor_is_asymmetric_per_group():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    codes, scales, zeros = awq.quantize_tensor(w, 4, 64)
    assert codes.shape == (16, 128) and scales.shape == (16, 2) and zeros.shape == (16, 2)
    assert scales.dtype == torch.float16 and int(codes.max()) <= 15
    deq = QuantizedLinear(codes, scales, zeros, 64).dequantize()
    step = scales.float().repeat_interleave(64, dim=1)
    assert (deq - w).abs().le(step / 2 + 1e-6).all()  # within half a step everywhere (no clipping here)


def test_group_size_that_does_not_divide_names_layer_and_alternatives(tiny_qwen2):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_qwen2)
    config.intermediate_size = 192
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*192.*128.*\[32, 64\]"):
        awq.check_group_size(model, 128)
    awq.check_group_size(model, 64)


def test_scale_folding_preserves_float_outputs(tiny_qwen2):
    model, _ = awq.load_float_model(tiny_qwen2, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.bias.abs().min() > 0
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    scales = torch.rand(128, generator=torch.Generator().manual_seed(1)) + 0.5
    awq._scale_norm_into_linears(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                         layer.self_attn.v_proj], scales)
    inner = torch.rand(256, generator=torch.Generator().manual_seed(2)) + 0.5
    awq._scale_linear_into_linear(layer.mlp.up_proj, layer.mlp.down_proj, inner)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_awq_checkpoint_round_trip(tiny_qwen2, tmp_path):
    """Our AutoAWQ checkpoint loads back and dequantizes to exactly the weights we quantized."""
    model, tokenizer = awq.load_float_model(tiny_qwen2, dtype=torch.float32)
    calib = awq.calibration_ids(tokenizer, awq.default_corpus()[0], 4, 64)
    settings = awq.AWQSettings(w_bit=4, group_size=64, method="awq", n_grid=5, calib_samples=4, calib_seqlen=64)
    quantized, stats = awq.quantize_model(model, calib, settings, progress=False)
    assert set(stats["layers"][0]) >= {"qkv", "gate_up", "down"} and "o" not in stats["layers"][0]  # GQA: no o scale

    from vila_edge.builder.awq_formats import write_awq_checkpoint

    floats = {k: v for k, v in model.state_dict().items()
              if not any(k.startswith(p + ".") for p in quantized) and k != "lm_head.weight"}
    out = write_awq_checkpoint(tmp_path / "awq", model.config.to_dict(), floats, quantized, group_size=64,
                               tokenizer_dir=tiny_qwen2)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 64,
                                             "zero_point": True, "version": "gemm"}
    _, tensors, read_back = read_awq_checkpoint(out)
    from safetensors.torch import load_file

    raw = load_file(str(out / "model.safetensors"))
    q = raw["model.layers.0.self_attn.q_proj.qweight"]
    assert q.dtype == torch.int32 and q.shape == (128, 128 // 8)
    assert raw["model.layers.0.self_attn.q_proj.qzeros"].shape == (2, 16)
    assert raw["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
    assert raw["model.layers.0.self_attn.k_proj.bias"].abs().min() > 0
    for name, layer in quantized.items():
        assert torch.equal(read_back[name].q, layer.q) and torch.equal(read_back[name].zeros, layer.zeros)
        assert torch.equal(read_back[name].scales, layer.scales)
    state = dequantize_awq_checkpoint(out)
    for name in quantized:
        torch.testing.assert_close(state[f"{name}.weight"], model.get_submodule(name).weight.data, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_awq_equals_in_memory_awq(tiny_qwen2, tmp_path, dtype):
    """awq_stream (one layer read from disk at a time, model on the meta device) computes exactly what
    quantize_model computes on the loaded model: the same codes, scales, zeros, biases and folded norms."""
    from transformers import AutoModelForCausalLM

    from vila_edge.builder.awq_formats import copy_tokenizer_files
    from vila_edge.builder.awq_stream import model_skeleton, quantize_layers
    from vila_edge.builder.tensor_stream import SafetensorsReader

    folder = tmp_path / "llm"
    AutoModelForCausalLM.from_pretrained(tiny_qwen2, dtype=dtype).save_pretrained(folder)
    copy_tokenizer_files(tiny_qwen2, folder)
    model, tokenizer = awq.load_float_model(folder)
    calib = awq.calibration_ids(tokenizer, awq.default_corpus()[0], 4, 64)
    settings = awq.AWQSettings(w_bit=4, group_size=64, method="awq", n_grid=5, calib_samples=4, calib_seqlen=64)
    folded: dict = {}
    quantized, stats = awq.quantize_model(model, calib, settings, progress=False, float32_params=folded)
    with SafetensorsReader(folder) as reader:
        streamed = list(quantize_layers(model_skeleton(folder), reader, settings, calib, progress=False))
    assert [layer.index for layer in streamed] == [0, 1]
    for layer in streamed:
        assert layer.stats["qkv"] == stats["layers"][layer.index]["qkv"]
        floats, linears = layer.checkpoint_tensors()
        for name, value in floats.items():
            assert torch.equal(value, folded[name]), name
        for name, qlinear in linears.items():
            expected = quantized[name]
            assert torch.equal(qlinear.q, expected.q) and torch.equal(qlinear.zeros, expected.zeros), name
            assert torch.equal(qlinear.scales, expected.scales), name
            assert (qlinear.bias is None and expected.bias is None) or torch.equal(qlinear.bias, expected.bias), name


def test_streamed_awq_next_inputs_from_quantized_layer(tiny_qwen2):
    """next_inputs="quantized" feeds layer 1 the quantized layer 0's output: layer 0 is unchanged, layer 1 differs."""
    from vila_edge.builder.awq_stream import model_skeleton, quantize_layers
    from vila_edge.builder.tensor_stream import SafetensorsReader

    _, tokenizer = awq.load_float_model(tiny_qwen2)
    calib = awq.calibration_ids(tokenizer, awq.default_corpus()[0], 4, 64)
    runs = {}
    for mode in ("float", "quantized"):
        settings = awq.AWQSettings(w_bit=4, group_size=64, n_grid=5, next_inputs=mode)
        with SafetensorsReader(tiny_qwen2) as reader:
            runs[mode] = list(quantize_layers(model_skeleton(tiny_qwen2), reader, settings, calib, progress=False))
    first, second = (runs[m][0].linears["mlp.down_proj"].q for m in runs), (runs[m][1].stats["qkv"] for m in runs)
    assert torch.equal(*first)
    assert len({s["loss"] for s in second}) == 2
    with pytest.raises(ValueError, match="next_inputs"):
        next(quantize_layers(model_skeleton(tiny_qwen2), None, awq.AWQSettings(next_inputs="x"), calib))


def test_tinychat_v2_checkpoint_converts_to_same_weights(tiny_qwen2, tmp_path):
    model, _ = awq.load_float_model(tiny_qwen2, dtype=torch.float32)
    quantized, _ = awq.quantize_model(model, None, awq.AWQSettings(group_size=64, method="rtn"), progress=False)
    # write a TinyChat v2 state dict exactly as the doc lays it out: groups padded to a multiple of 8
    state = {k: v.half() for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p in quantized)}
    for name, layer in quantized.items():
        groups = layer.scales.shape[1]
        padded = math.ceil(groups / 8) * 8
        scales = torch.zeros(padded, layer.out_features, dtype=torch.float16)
        scales[:groups] = layer.scales.t()
        scaled_zeros = torch.zeros_like(scales)
        scaled_zeros[:groups] = (-layer.scales.float() * layer.zeros.float()).t().half()
        state[f"{name}.qweight"] = torch.from_numpy(pack_tinychat_v2_from_doc(layer.q.numpy()))
        state[f"{name}.scales"] = scales
        state[f"{name}.scaled_zeros"] = scaled_zeros
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.half()
    pt = tmp_path / "tiny-w4-g64-awq-v2.pt"
    torch.save(state, pt)
    _, read_back = read_tinychat_v2(pt)
    for name, layer in quantized.items():
        assert torch.equal(read_back[name].q, layer.q), name
        assert torch.equal(read_back[name].zeros, layer.zeros), name
    converted = tinychat_v2_to_awq_checkpoint(pt, tiny_qwen2, tmp_path / "awq")
    dequantized = dequantize_awq_checkpoint(converted)
    for name in quantized:
        torch.testing.assert_close(dequantized[f"{name}.weight"], model.get_submodule(name).weight.data, rtol=0, atol=0)

    # an llm/ folder holding the .pt (as HF Efficient-Large-Model/*-AWQ ships it) builds as is
    import shutil

    from vila_edge.builder.llm_onnx import build_llm_onnx, dequantized_weights

    folder = tmp_path / "llm-awq"
    folder.mkdir()
    for item in tiny_qwen2.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy2(item, folder / item.name)
    shutil.copy2(pt, folder / pt.name)
    info = build_llm_onnx(folder, tmp_path / "decoder", group_size=64, lm_head="float", progress=False, threads=1)
    assert info["quant"] == "prequantized-tinychat-v2" and info["group_size"] == 64
    graph = dequantized_weights(tmp_path / "decoder")
    for name in quantized:
        torch.testing.assert_close(torch.from_numpy(graph[f"{name}.weight"]), model.get_submodule(name).weight.data,
                                   rtol=0, atol=0)
    norm = "model.layers.1.post_attention_layernorm.weight"
    torch.testing.assert_close(torch.from_numpy(graph[norm]), state[norm].float(), rtol=0, atol=0)


# ---- quality on a real model -------------------------------------------------------------------


@pytest.mark.slow
def test_awq_beats_rtn_on_smollm2_short():
    """Short version of benchmarks/awq_quality.py: int4 g64 on SmolLM2-135M (4 x 256 calibration tokens,
    a 10-point grid, 6 held-out windows of 256; ~1 minute on one core)."""
    from vila_edge.models import smollm2_hf_checkpoint

    folder = smollm2_hf_checkpoint()
    calib_text, heldout_text = awq.default_corpus()
    results = {}
    for method in ("float", "rtn", "awq"):
        model, tokenizer = awq.load_float_model(folder, dtype=torch.float32)
        if method != "float":
            calib = awq.calibration_ids(tokenizer, calib_text, 4, 256) if method == "awq" else None
            settings = awq.AWQSettings(w_bit=4, group_size=64, method=method, n_grid=10, clip_tokens=256)
            awq.quantize_model(model, calib, settings, progress=False)
        results[method] = awq.perplexity(model, awq.tokenize_text(tokenizer, heldout_text), seqlen=256, max_windows=6)
    recovered = (results["rtn"] - results["awq"]) / (results["rtn"] - results["float"])
    print("SmolLM2 held-out perplexity (short):", {k: round(v, 3) for k, v in results.items()},
          f"AWQ recovers {recovered:.0%} of RTN's increase")
    assert results["float"] < results["awq"] < results["rtn"]
    assert recovered >= 0.5


def test_bf16_checkpoint_quantizes_with_float32_folded_norms(tmp_path):
    """A bf16 llm/ (like NVILA's) goes through AWQ layer by layer in float32 and loads back."""
    from transformers import AutoModelForCausalLM

    from vila_edge.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint("nvila-lite", tmp_path / "tiny-nvila-lite", seed=2) / "llm"  # tied head
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).save_pretrained(folder)
    stats = awq.quantize_checkpoint(folder, tmp_path / "awq", group_size=64, calib_samples=2, calib_seqlen=64,
                                    progress=False)
    assert stats["method"] == "awq" and len(stats["layers"]) == 2
    from vila_edge.builder.awq_formats import load_dequantized_model

    model = load_dequantized_model(tmp_path / "awq")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, reference.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.isfinite(got).all()
    # int4 g64 on random weights: same function up to quantization noise
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9
