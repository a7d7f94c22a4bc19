"""The PyTorch backend (backends/torch_llm.py, backends/torch_vision.py) against the PyTorch reference, on the CPU.

The int4 LLM runs through `torch.ops.aten._weight_int4pack_mm_for_cpu` (the CUDA kernel cannot run here; the
GPU path is checked by benchmarks/gpu_check.py when a GPU is lent). Its reference is the transformers model
with the very weights the built decoder computes with (`dequantized_weights`: linears, biases, folded norms), so
the comparison is strict: relative logit error <= 1e-3 and 32 identical greedy tokens on every fixture family.
Vision: fp16 on the CPU (torch supports conv2d / layer_norm / SDPA / gelu in fp16 there) against the fp32
reference, cosine >= 0.999 per token.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)
from test_runtime import FAMILIES, PROMPT, _image, _reference_embeds, _rel_err

# the PyTorch backend runs SigLIP towers only (`build --torch-weights` refuses CLIP / InternViT in one line)
SIGLIP_FAMILIES = [f for f in FAMILIES if f not in ("clip", "intern")]

torch = pytest.importorskip("torch")

from vila_edge.backends.torch_llm import Int4Linear, TorchLLMEngine, dequantize_grouped  # noqa: E402
from vila_edge.backends.torch_vision import TorchVisionEngine  # noqa: E402
from vila_edge.builder import torch_weights as tw  # noqa: E402
from vila_edge.errors import EngineError  # noqa: E402

GREEDY_STEPS = 32


# ---- fixtures ----------------------------------------------------------------------------------------------

_DIRS: dict = {}


@pytest.fixture(scope="module")
def torch_engine_dir(runtime_engine, tiny_checkpoint, tmp_path_factory):  # noqa: F811
    """torch_engine_dir(family) -> a copy of the int4 runtime engine directory with the torch weights added."""
    from vila_edge.checkpoint import load_checkpoint

    def make(family: str):
        if family not in _DIRS:
            dst = tmp_path_factory.mktemp("torch-engines") / family
            shutil.copytree(runtime_engine(family, "int4"), dst)
            tw.write_torch_weights(dst, load_checkpoint(tiny_checkpoint(family)))
            _DIRS[family] = dst
        return _DIRS[family]

    return make


_REFS: dict = {}


def _int4_reference(tiny_checkpoint, family, engine_dir):
    """ReferenceVILA whose LLM runs the decoder's dequantized int4 weights (the LLM builder's read-back)."""
    if family not in _REFS:
        from vila_edge.builder.llm_onnx import dequantized_weights
        from vila_edge.checkpoint import load_checkpoint
        from vila_edge.reference.model import ReferenceVILA

        ref = ReferenceVILA(load_checkpoint(tiny_checkpoint(family)))
        ref.load_llm_weights(dequantized_weights(engine_dir / "llm"))
        _REFS[family] = ref
    return _REFS[family]


def _masked(logits: np.ndarray, cfg) -> np.ndarray:
    from vila_edge.reference.model import mask_untrained

    return mask_untrained(torch.from_numpy(logits), cfg).numpy()


@torch.no_grad()
def _reference_greedy(ref, emb, steps: int) -> list[int]:
    """argmax decode for `steps` tokens, no stop tokens (so every step is compared)."""
    out = ref.llm(inputs_embeds=emb[None], use_cache=True)
    cache, tokens = out.past_key_values, []
    logits = _masked(out.logits[0, -1].float().numpy(), ref.cfg)
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        out = ref.llm(inputs_embeds=ref.embed([tokens[-1]])[None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        logits = _masked(out.logits[0, -1].float().numpy(), ref.cfg)
    return tokens


def _engine_greedy(eng, emb, steps: int, cfg) -> tuple[np.ndarray, list[int]]:
    first = _masked(eng.forward(emb), cfg)
    tokens = [int(np.argmax(first))]
    for _ in range(steps - 1):
        tokens.append(int(np.argmax(_masked(eng.forward(eng.embed([tokens[-1]])), cfg))))
    return first, tokens


# ---- the int4 kernel and the weight format -------------------------------------------------------------------


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_linear_equals_awq_dequantization(group):
    """(q - 8) * s + (8 - z) * s (the int4pack kernel) against (q - z) * s (AWQ / MatMulNBits)."""
    rng = np.random.default_rng(group)
    n, k = 48, 512
    codes = rng.integers(0, 16, (n, k), dtype=np.uint8)
    zeros = rng.integers(0, 16, (n, k // group)).astype(np.float32)
    scales = rng.uniform(1e-3, 5e-2, (n, k // group)).astype(np.float16).astype(np.float32)  # AWQ scales are fp16
    sz = tw.int4_scales_and_zeros(scales, zeros)
    assert sz.shape == (k // group, n, 2) and np.array_equal(sz[..., 1].T, (8 - zeros) * scales)  # exact zeros
    lin = Int4Linear(torch.from_numpy(tw.pack_int4_rows(codes)), torch.from_numpy(sz), group, None,
                     torch.float32, "cpu")
    w = dequantize_grouped(torch.from_numpy(codes), torch.from_numpy(zeros), torch.from_numpy(scales), k).double()
    for rows in (5, Int4Linear.DENSE_ROWS + 1):  # the int4 kernel; the dequantized dense GEMM (prefill sizes)
        x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32))
        want = x.double() @ w.T
        got = lin(x).double()
        assert float((got - want).abs().max() / want.abs().max()) < 1e-6


def test_packed_rows_put_the_even_column_in_the_high_nibble():
    """The layout `_convert_weight_to_int4pack` (CUDA) takes: byte j of a row = code[2j] << 4 | code[2j+1]."""
    codes = np.array([[1, 2, 3, 4, 15, 0, 7, 9]] * 16, np.uint8)
    assert tw.pack_int4_rows(codes)[0].tolist() == [0x12, 0x34, 0xF0, 0x79]


def test_shapes_the_int4_kernels_refuse_are_stored_grouped():
    rng = np.random.default_rng(0)
    part = {"codes": rng.integers(0, 16, (24, 64), dtype=np.uint8), "zeros": np.full((24, 2), 3, np.float32),
            "scales": np.full((24, 2), 0.01, np.float32), "K": 64, "N": 24, "block": 32, "bits": 4}
    tensors: dict = {}
    assert tw._store("x", part, tensors)["kind"] == "grouped"  # N % 16 != 0
    assert tw._store("y", {**part, "N": 32, "codes": np.zeros((32, 64), np.uint8),
                           "zeros": np.full((32, 2), 3, np.float32), "scales": np.ones((32, 2), np.float32)},
                     tensors)["kind"] == "int4"
    assert tw._store("z", {**part, "bits": 8}, tensors)["kind"] == "grouped"
    inexact = {**part, "N": 32, "codes": np.zeros((32, 64), np.uint8), "zeros": np.full((32, 2), 1, np.float32),
               "scales": np.full((32, 2), 1 + 2.0 ** -23, np.float32)}  # 24 significant bits: 7 * s rounds
    assert tw._store("w", inexact, tensors)["kind"] == "grouped"


# ---- LLM parity ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SIGLIP_FAMILIES)
def test_int4_llm_matches_reference_with_the_same_weights(torch_engine_dir, tiny_checkpoint, family):
    engine_dir = torch_engine_dir(family)
    ref = _int4_reference(tiny_checkpoint, family, engine_dir)
    emb = _reference_embeds(ref, PROMPT, [_image()])
    want_first = ref.logits(emb)[-1].numpy()
    want_tokens = _reference_greedy(ref, emb, GREEDY_STEPS)
    meta = json.loads((engine_dir / "manifest.json").read_text())["llm"]
    # eager decode + dequantized prefill; the fixed-shape step that CUDA graphs capture + int4-kernel prefill
    for decode, dense_prefill in (("eager", True), ("static", False)):
        eng = TorchLLMEngine(engine_dir / "llm", meta, device="cpu", decode=decode, dense_prefill=dense_prefill,
                             max_context=256)
        assert eng.describe()["linears"] == ["grouped", "int4"]  # int4 body, 8-bit lm_head
        first, tokens = _engine_greedy(eng, emb.numpy(), GREEDY_STEPS, ref.cfg)
        assert _rel_err(first, want_first) <= 1e-3
        assert tokens == want_tokens
        assert eng.length == emb.shape[0] + GREEDY_STEPS - 1


@pytest.mark.parametrize("dtype, limit", [("float16", 3e-3), ("bfloat16", 3e-2)])
def test_half_precision_llm_stays_near_the_reference(torch_engine_dir, tiny_checkpoint, dtype, limit):
    """fp16 (the CUDA model dtype) and bf16 (what the CUDA int4 kernel computes in: activations and scales) on
    the CPU int4 kernel: the first logits within `limit` (bf16: the tolerance benchmarks/gpu_check.py uses on
    the GPU; greedy tokens of these random tiny models are near-ties that bf16 flips within a few steps)."""
    engine_dir = torch_engine_dir("nvila")
    ref = _int4_reference(tiny_checkpoint, "nvila", engine_dir)
    emb = _reference_embeds(ref, PROMPT, [_image()])
    want = ref.logits(emb)[-1].numpy()
    for dense_prefill in (True, False):
        eng = TorchLLMEngine(engine_dir / "llm", {}, device="cpu", dtype=dtype, dense_prefill=dense_prefill,
                             max_context=256)
        assert _rel_err(_masked(eng.forward(emb.numpy()), ref.cfg), want) <= limit


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])
def test_pipeline_with_the_torch_llm_uses_the_same_sampler_and_stops(torch_engine_dir, tiny_checkpoint, family):
    """vila_edge.load(..., llm_backend="torch"): greedy generation and stop tokens as the reference's."""
    import vila_edge

    engine_dir = torch_engine_dir(family)
    ref = _int4_reference(tiny_checkpoint, family, engine_dir)
    pipe = vila_edge.load(engine_dir, device="cpu", threads=1, llm_backend="torch")
    assert pipe.describe()["llm"]["backend"] == "torch"
    img = _image()
    emb = _reference_embeds(ref, PROMPT, [img])
    assert _rel_err(pipe.first_token_logits(PROMPT, [img]), ref.logits(emb)[-1].numpy()) <= 1e-3
    assert pipe.generate(PROMPT, images=[img], max_new_tokens=GREEDY_STEPS).token_ids == ref.greedy(emb, GREEDY_STEPS)


def test_second_turn_on_the_static_cache_equals_reprefill(torch_engine_dir):
    import vila_edge

    pipe = vila_edge.load(torch_engine_dir("nvila"), device="cpu", threads=1, llm_backend="torch")
    a, b = pipe.chat(), pipe.chat(reuse_kv=False)
    r1a = a.ask(PROMPT, images=[_image()], max_new_tokens=6)
    r2a = a.ask("And the colours?", max_new_tokens=10)
    r1b = b.ask(PROMPT, images=[_image()], max_new_tokens=6)
    r2b = b.ask("And the colours?", max_new_tokens=10)
    assert (r1a.token_ids, r2a.token_ids) == (r1b.token_ids, r2b.token_ids)
    assert r2a.timings.prefill_positions < r2b.timings.prefill_positions  # a continued on its cache


def test_decode_step_traces_as_one_graph(torch_engine_dir):
    """torch.compile(fullgraph=True) of the static decode step (the eager dynamo backend: no C++ toolchain
    needed) gives the eager step's logits: no graph break, the cache writes survive tracing."""
    engine_dir = torch_engine_dir("nvila-lite")
    emb = np.random.default_rng(0).standard_normal((7, 128)).astype(np.float32) * 0.1
    plain = TorchLLMEngine(engine_dir / "llm", {}, device="cpu", max_context=64)
    traced = TorchLLMEngine(engine_dir / "llm", {}, device="cpu", max_context=64, decode="static")
    traced._decode = torch.compile(traced.model.decode_static, backend="eager", fullgraph=True)
    for eng in (plain, traced):
        eng.forward(emb)
    for t in (5, 9, 11):
        np.testing.assert_allclose(traced.forward(traced.embed([t])), plain.forward(plain.embed([t])),
                                   rtol=0, atol=1e-5)
    traced.truncate(7)  # a rollback is only the length: the masked step ignores the stale rows
    plain.truncate(7)
    np.testing.assert_allclose(traced.forward(traced.embed([3])), plain.forward(plain.embed([3])), rtol=0, atol=1e-5)


def test_static_decode_over_growing_cache_spans_equals_eager(torch_engine_dir):
    """The static step attends over the smallest cache span past its position (256, 512, ..., cache rows): the
    logits equal the eager step's (which slices the cache to the cached length) across span boundaries, after a
    jump into a larger span and after a rollback into a smaller one."""
    from vila_edge.backends.torch_llm import decode_spans

    assert decode_spans(600) == [256, 512, 600] and decode_spans(100) == [100] and decode_spans(512) == [256, 512]
    engine_dir = torch_engine_dir("nvila-lite")
    rng = np.random.default_rng(1)
    plain = TorchLLMEngine(engine_dir / "llm", {}, device="cpu", max_context=600)
    spans = TorchLLMEngine(engine_dir / "llm", {}, device="cpu", max_context=600, decode="static")
    calls = []
    step = spans._decode
    spans._decode = lambda x, pos, *span: calls.append(span) or step(x, pos, *span)

    def both(emb):
        np.testing.assert_allclose(spans.forward(emb), plain.forward(emb), rtol=0, atol=1e-5)

    both(rng.standard_normal((253, 128)).astype(np.float32) * 0.1)
    for t in range(6):  # positions 253..258: spans 256 then 512
        both(plain.embed([t]))
    both(rng.standard_normal((260, 128)).astype(np.float32) * 0.1)  # to 519
    both(plain.embed([7]))  # position 519: span 600
    for eng in (plain, spans):
        eng.truncate(100)
    both(plain.embed([8]))  # back to span 256 over rows the longer conversation left behind
    assert calls == [(256,)] * 3 + [(512,)] * 3 + [(608,), (256,)]  # the cache has 600 rows rounded up to 16


def test_context_overflow_changes_nothing(torch_engine_dir):
    from vila_edge.backends.base import ContextOverflow

    eng = TorchLLMEngine(torch_engine_dir("nvila") / "llm", {}, device="cpu", max_context=8)
    eng.forward(eng.embed([1, 2, 3, 4, 5]))
    with pytest.raises(ContextOverflow):
        eng.forward(eng.embed([1, 2, 3, 4]))
    assert eng.length == 5


# ---- vision --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SIGLIP_FAMILIES)
def test_fp16_vision_matches_fp32_reference(torch_engine_dir, tiny_checkpoint, family):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.reference.model import ReferenceVILA

    ref = ReferenceVILA(load_checkpoint(tiny_checkpoint(family)), llm=False)
    size = ref.cfg.vision.image_size
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, size, size)).astype(np.float32)
    feats = np.random.default_rng(1).standard_normal((2, ref.cfg.vision.tokens_per_tile,
                                                     ref.cfg.projector.in_features)).astype(np.float32)
    want = ref.encode_tiles(pixels).numpy()
    with torch.no_grad():
        want_proj = ref.projector(torch.from_numpy(feats)).numpy()

    def cosine(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    for dtype, limit in (("float16", 0.999), ("float32", 0.99999)):  # fp32 compute on the fp16-stored weights
        eng = TorchVisionEngine(torch_engine_dir(family) / "vision", {}, device="cpu", dtype=dtype, max_batch=2)
        got = eng.encode(pixels)
        assert got.shape == want.shape and got.dtype == np.float32
        assert cosine(got, want).min() >= limit, dtype
        assert cosine(eng.project(feats), want_proj).min() >= limit, dtype


@pytest.mark.parametrize("family", ["vila1.5-s2", "nvila"])
def test_torch_pipeline_embeds_match_reference(torch_engine_dir, tiny_checkpoint, family):
    """Both engines torch (fp32 compute on the CPU): the S2 / dynamic-S2 merge runs between them (numpy here,
    vila_edge.kernels on CUDA)."""
    import vila_edge

    ref = _int4_reference(tiny_checkpoint, family, torch_engine_dir(family))
    pipe = vila_edge.load(torch_engine_dir(family), device="cpu", threads=1, vision_backend="torch",
                          llm_backend="torch")
    assert pipe.vision.name == "torch" and not pipe.vision.on_gpu
    img = _image()
    want = _reference_embeds(ref, PROMPT, [img]).numpy()
    got = pipe.prompt_embeds(PROMPT, [img])
    assert got.shape == want.shape
    assert float(np.abs(got - want).max() / np.abs(want).max()) < 1e-2
    assert len(pipe.generate(PROMPT, images=[img], max_new_tokens=4).token_ids) >= 1


# ---- selection and errors ------------------------------------------------------------------------------------


def test_auto_picks_torch_only_with_cuda_and_the_weights(torch_engine_dir, runtime_engine, monkeypatch):  # noqa: F811
    """No GPU exists here: `torch.cuda.is_available` is faked to test the decision, not the engine."""
    from vila_edge import backends

    with_weights = torch_engine_dir("nvila") / "llm" / "torch.int4.safetensors"
    without = runtime_engine("nvila", "int4") / "llm" / "torch.int4.safetensors"
    assert not backends._torch_cuda(with_weights, "auto")  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends._torch_cuda(with_weights, "auto") and backends._torch_cuda(with_weights, "cuda")
    assert not backends._torch_cuda(with_weights, "cpu") and not backends._torch_cuda(without, "auto")


def test_missing_torch_weights_is_one_clear_error(runtime_engine, torch_engine_dir, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    import vila_edge

    plain = runtime_engine("nvila", "int4")
    with pytest.raises(EngineError, match="--torch-weights"):
        vila_edge.load(plain, device="cpu", llm_backend="torch")

    def chat(*args):
        return subprocess.run([sys.executable, "-c", "from vila_edge.cli import main; main()", "chat", str(plain),
                               "--prompt", "hi", "--device", "cpu", *args], capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))

    res = chat("--backend", "torch")
    assert res.returncode == 2 and "--torch-weights" in res.stderr and "Traceback" not in res.stderr
    res = chat("--backend", "tensorflow")
    assert res.returncode == 2 and "--backend 'tensorflow'" in res.stderr
    damaged = tmp_path / "llm"
    damaged.mkdir()
    (damaged / "torch.int4.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EngineError, match="cannot read it"):
        TorchLLMEngine(damaged, {}, device="cpu")
    llm_dir = torch_engine_dir("nvila") / "llm"
    with pytest.raises(EngineError, match="needs the CUDA device"):
        TorchLLMEngine(llm_dir, {}, device="cpu", decode="cuda-graph")
    with pytest.raises(EngineError, match="decode 'jit' is not one of"):
        TorchLLMEngine(llm_dir, {}, device="cpu", decode="jit")


def test_builder_writes_the_torch_weights(tiny_checkpoint, tmp_path):
    from vila_edge.builder.build import BuildOptions, build

    assert "torch_weights" not in BuildOptions().export_key()  # older directories stay up to date
    out = tmp_path / "engine"
    res = build(tiny_checkpoint("nvila-lite"), out, options=BuildOptions(llm_quant="rtn", torch_weights=True),
                progress=False)
    m = res.manifest
    assert m.options["torch_weights"] is True
    assert m.llm["torch"]["int4_linears"] == 4 * m.config.llm.num_layers
    assert m.vision["torch"]["dtype"] == "float16"
    for rel in ("vision/torch.fp16.safetensors", "llm/torch.int4.safetensors"):
        assert rel in m.files and (out / rel).is_file()
    import vila_edge

    pipe = vila_edge.load(out, device="cpu", threads=1, vision_backend="torch", llm_backend="torch")
    assert pipe.generate(PROMPT, images=[_image()], max_new_tokens=3).token_ids


# ---- planner --------------------------------------------------------------------------------------------------


def test_planner_torch_backend_on_orin_uses_the_stated_estimates():
    """The Orin profiles state torch backend efficiencies (estimates); NVILA-Lite-2B decode is predicted above
    TinyChat's NVILA-3B 45 tok/s on AGX Orin, counting the default build's 8-bit head as fp16."""
    from vila_edge.errors import VilaEdgeError
    from vila_edge.plan import list_profiles, load_profile, plan

    for name in (n for n in list_profiles() if "orin" in n):
        prof = load_profile(name)
        assert 0 < prof.torch_decode_efficiency < prof.decode_efficiency and prof.torch_vision_efficiency > 0, name
    native = plan("nvila-lite-2b", "agx-orin-64gb", max_context=2048)
    torch_plan = plan("nvila-lite-2b", "agx-orin-64gb", max_context=2048, backend="torch")
    assert torch_plan.efficiency["backend"] == "torch" and torch_plan.efficiency["decode_efficiency"] == 0.45
    assert torch_plan.predicted["decode_bytes_per_token_ctx1k"] > native.predicted["decode_bytes_per_token_ctx1k"]
    assert torch_plan.predicted["decode_tok_s_ctx1k"] > 45.0
    with pytest.raises(VilaEdgeError, match="no torch backend efficiencies"):
        plan("nvila-lite-2b", "cpu-laptop", backend="torch")
    with pytest.raises(VilaEdgeError, match="backend 'jax'"):
        plan("nvila-lite-2b", "agx-orin-64gb", backend="jax")
