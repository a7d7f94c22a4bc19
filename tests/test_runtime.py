"""End-to-end runtime checks against the PyTorch reference (the oracle), on the tiny checkpoints.

Engine directories come from `runtime_engine` (tests/conftest_runtime.py): built by the real builder.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)
from PIL import Image

torch = pytest.importorskip("torch")

FAMILIES = ("vila1.5", "vila1.5-s2", "nvila", "nvila-lite", "clip", "intern")
PROMPT = "Describe the image."


def _image(w=300, h=150, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


_REFS: dict = {}


def _reference(tiny_checkpoint, family):
    if family not in _REFS:
        from vila_edge.checkpoint import load_checkpoint
        from vila_edge.reference.model import ReferenceVILA

        _REFS[family] = ReferenceVILA(load_checkpoint(tiny_checkpoint(family)))
    return _REFS[family]


_PIPES: dict = {}


def _pipe(runtime_engine, family, precision="fp32", **kw):  # noqa: F811
    key = (family, precision, tuple(sorted(kw.items())))
    if key not in _PIPES:
        import vila_edge

        _PIPES[key] = vila_edge.load(runtime_engine(family, precision), device="cpu", threads=1, **kw)
    return _PIPES[key]


def _reference_embeds(ref, prompt, images):
    """The reference's inputs_embeds for one user turn (media layout as the reference defines it)."""
    from vila_edge.media.tiling import preprocess_image
    from vila_edge.prompt import Message, render, tokenize, user_content

    cfg, tok = ref.cfg, ref.ckpt.tokenizer
    single = len(images) == 1
    items, n_tiles = [], None
    for im in images:
        its = ref.image_items(preprocess_image(im, cfg.vision, single=single))
        n_tiles = len(its) if single else None
        items += its
    content = user_content(cfg, prompt, n_images=len(images), n_tiles=n_tiles)
    ids = tokenize(cfg, tok, render(cfg.llm.chat_format, [Message("user", content)], tok), first=True)
    return ref.inputs_embeds(ids, items)


def _rel_err(got, want):
    f = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), f), "masked logits differ"
    return float(np.abs(got[f] - want[f]).max() / np.abs(want[f]).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_pipeline_matches_reference(runtime_engine, tiny_checkpoint, family):  # noqa: F811
    ref = _reference(tiny_checkpoint, family)
    pipe = _pipe(runtime_engine, family)
    img = _image()
    want_emb = _reference_embeds(ref, PROMPT, [img])
    got_emb = pipe.prompt_embeds(PROMPT, [img])
    assert got_emb.shape == tuple(want_emb.shape)
    np.testing.assert_allclose(got_emb, want_emb.numpy(), rtol=0, atol=1e-4)

    want = ref.logits(want_emb)[-1].numpy()
    got = pipe.first_token_logits(PROMPT, [img])
    assert _rel_err(got, want) <= 1e-3

    want_tokens = ref.greedy(want_emb, 16)
    pipe.vision_cache.clear()  # the image was encoded above: time every stage of a miss
    res = pipe.generate(PROMPT, images=[img], max_new_tokens=16)
    assert res.token_ids == want_tokens
    t = res.timings
    assert t.prompt_positions == want_emb.shape[0] and t.generated_tokens == len(want_tokens)
    assert min(t.preprocess, t.vision, t.merge_projector, t.prefill) > 0


@pytest.mark.parametrize("family", ["nvila", "nvila-lite"])
def test_multi_image_uses_one_plain_tile_per_image(runtime_engine, tiny_checkpoint, family):  # noqa: F811
    ref = _reference(tiny_checkpoint, family)
    pipe = _pipe(runtime_engine, family)
    imgs = [_image(300, 150, 1), _image(120, 200, 2)]
    want_emb = _reference_embeds(ref, "Compare them.", imgs)
    got_emb = pipe.prompt_embeds("Compare them.", imgs)
    np.testing.assert_allclose(got_emb, want_emb.numpy(), rtol=0, atol=1e-4)
    assert pipe.generate("Compare them.", images=imgs, max_new_tokens=8).token_ids == ref.greedy(want_emb, 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_scheme_layout_is_what_the_runtime_produces(runtime_engine, family):  # noqa: F811
    """The tiling scheme's layout (what the server and the planner count) equals the tiles, media items
    and LLM positions the pipeline really produces, for one image and for two.

    The layout counts the prompt's "\\n" after a marker as the tokens the checkpoint's tokenizer spends on
    it (`text_tokens`, from config.llm.newline_tokens for V15 prompts: two with Llama's SentencePiece,
    "▁" + "<0x0A>"), so every family's count is exact."""
    from vila_edge.media.tiling import image_layout
    from vila_edge.prompt import Message, render, tokenize, user_content
    from vila_edge.runtime import Timings

    pipe = _pipe(runtime_engine, family)
    cfg, tok = pipe.config, pipe.tokenizer

    def n_ids(n_images, n_tiles):
        content = user_content(cfg, PROMPT, n_images=n_images, n_tiles=n_tiles)
        return len(tokenize(cfg, tok, render(cfg.llm.chat_format, [Message("user", content)], tok), first=True))

    text_only = pipe.prompt_embeds(PROMPT).shape[0]
    for sizes in ([(300, 150)], [(120, 200)], [(90, 400)], [(300, 150), (120, 200)]):
        imgs = [_image(w, h, k) for k, (w, h) in enumerate(sizes)]
        layouts = [image_layout(cfg, w, h, len(sizes)) for w, h in sizes]
        for img, lay in zip(imgs, layouts, strict=True):
            t = Timings()
            items = pipe.image_items(img, single=len(sizes) == 1, timings=t)
            assert (t.tiles, len(items)) == (lay.n_tiles, lay.n_items), sizes
            assert [len(x) for x in items] == [lay.feature_tokens] * lay.n_items, sizes
        positions = pipe.prompt_embeds(PROMPT, imgs).shape[0] - text_only
        n_items = sum(lay.n_items for lay in layouts)
        text = n_ids(len(sizes), layouts[0].n_items if len(sizes) == 1 else None) - n_ids(0, None) - n_items
        media = positions - text  # each marker id became its item's feature rows + end tokens
        assert media == sum(lay.n_items * (lay.feature_tokens + lay.end_tokens) for lay in layouts), sizes
        assert text == sum(lay.n_items * lay.text_tokens for lay in layouts), sizes
        assert positions == sum(lay.positions for lay in layouts), sizes


def _dequantized_llm_weights(llm_onnx, cfg) -> dict:
    """HF-named LLM weights dequantized from the decoder's MatMulNBits nodes.

    Prefers the LLM builder's own function when it exists; otherwise reads the graph (symmetric or
    asymmetric uint4, blocks along K; genai names: layers.{i}/attn/qkv_proj (fused q|k|v), o_proj,
    mlp/{gate,up,down}_proj, lm_head)."""
    try:
        from vila_edge.builder import llm_onnx as builder_llm

        fn = getattr(builder_llm, "dequantized_weights", None)
    except ImportError:
        fn = None
    if fn is not None:
        return {k: np.asarray(v, np.float32) for k, v in fn(llm_onnx.parent).items()}
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(llm_onnx), load_external_data=True)
    inits = {i.name: i for i in m.graph.initializer}
    q_rows, kv_rows = cfg.llm.num_heads * cfg.llm.head_dim, cfg.llm.num_kv_heads * cfg.llm.head_dim
    out = {}
    for n in m.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        K, N, bs = a["K"], a["N"], a["block_size"]
        assert a["bits"] == 4
        packed = numpy_helper.to_array(inits[n.input[1]]).reshape(N, -1)
        scales = numpy_helper.to_array(inits[n.input[2]]).reshape(N, -1).astype(np.float32)
        nb = scales.shape[1]
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(N, nb, bs).astype(np.float32)
        if len(n.input) > 3 and n.input[3]:
            zp = numpy_helper.to_array(inits[n.input[3]]).reshape(N, -1)
            z = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(N, -1)[:, :nb].astype(np.float32)
        else:
            z = np.full((N, nb), 8.0, np.float32)
        w = ((codes - z[:, :, None]) * scales[:, :, None]).reshape(N, nb * bs)[:, :K]
        parts = n.name.split("/")
        if parts[1] == "lm_head":
            out["lm_head.weight"] = w
            continue
        pre = f"model.{parts[2]}." + ("self_attn." if parts[3] == "attn" else "mlp.")
        if parts[4] == "qkv_proj":
            out[pre + "q_proj.weight"] = w[:q_rows]
            out[pre + "k_proj.weight"] = w[q_rows:q_rows + kv_rows]
            out[pre + "v_proj.weight"] = w[q_rows + kv_rows:]
        else:
            out[pre + parts[4] + ".weight"] = w
    return out


def _accuracy_level(llm_onnx) -> int:
    import onnx

    m = onnx.load(str(llm_onnx), load_external_data=False)
    levels = {onnx.helper.get_attribute_value(a) for n in m.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "accuracy_level"}
    return max(levels or {0})


def _with_accuracy_level(engine_dir, dst, level: int):
    """A copy of an engine directory whose decoder runs MatMulNBits at `level` (same int4 weights)."""
    import shutil

    import onnx

    shutil.copytree(engine_dir, dst)
    path = next((dst / "llm").glob("*.onnx"))
    m = onnx.load(str(path), load_external_data=False)
    for n in m.graph.node:
        for a in n.attribute:
            if n.op_type == "MatMulNBits" and a.name == "accuracy_level":
                a.i = level
    onnx.save(m, str(path))
    return dst


def test_int4_pipeline_matches_reference_with_dequantized_weights(runtime_engine, tiny_checkpoint, tmp_path):  # noqa: F811
    """int4 decoder vs the PyTorch reference whose LLM linears are the decoder's dequantized weights.

    Weights come from the LLM builder's `dequantized_weights` (linears, biases, folded norms). The fixture
    quantizes with RTN only because AWQ calibration takes minutes on 2 shared cores. The builder's default accuracy_level 4 quantizes activations to int8 (~1.7e-2 relative logit
    error on these random models, enough to flip near-tied greedy tokens), so the strict check runs the same
    weights at accuracy_level 1 (fp32 activations)."""
    import vila_edge
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.reference.model import ReferenceVILA

    family = "nvila"
    engine = runtime_engine(family, "int4")
    pipe = _pipe(runtime_engine, family, "int4")
    decoder = pipe.llm.model_path
    ref = ReferenceVILA(load_checkpoint(tiny_checkpoint(family)))
    weights = _dequantized_llm_weights(decoder, ref.cfg)
    assert len(weights) >= 7 * ref.cfg.llm.num_layers, "the int4 decoder is not quantized"
    params = dict(ref.llm.named_parameters())
    with torch.no_grad():
        if "lm_head.weight" in weights and ref.cfg.llm.tie_word_embeddings:  # untie: the table stays float
            ref.llm.config.tie_word_embeddings = False
            ref.llm.lm_head.weight = torch.nn.Parameter(ref.llm.lm_head.weight.detach().clone())
            params = dict(ref.llm.named_parameters())
        for name, w in weights.items():
            assert params[name].shape == w.shape, name
            params[name].copy_(torch.from_numpy(w))
    img = _image()
    emb = _reference_embeds(ref, PROMPT, [img])
    want = ref.logits(emb)[-1].numpy()
    level = _accuracy_level(decoder)
    err = _rel_err(pipe.first_token_logits(PROMPT, [img]), want)
    assert err <= (1e-3 if level <= 1 else 5e-2), f"accuracy_level={level}: relative error {err:.2e}"

    strict = vila_edge.load(_with_accuracy_level(engine, tmp_path / "level1", 1), device="cpu", threads=1)
    assert _rel_err(strict.first_token_logits(PROMPT, [img]), want) <= 1e-3
    assert strict.generate(PROMPT, images=[img], max_new_tokens=16).token_ids == ref.greedy(emb, 16)


# ---- KV cache -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])
def test_second_turn_kv_reuse_equals_reprefill(runtime_engine, tiny_checkpoint, family):  # noqa: F811
    pipe = _pipe(runtime_engine, family)
    a, b = pipe.chat(), pipe.chat(reuse_kv=False)  # one LLM engine: run a's turns, then b's
    r1a = a.ask(PROMPT, images=[_image()], max_new_tokens=6)
    r2a = a.ask("And the colours?", images=[_image(90, 200, 3)], max_new_tokens=10)
    r1b = b.ask(PROMPT, images=[_image()], max_new_tokens=6)
    r2b = b.ask("And the colours?", images=[_image(90, 200, 3)], max_new_tokens=10)
    assert r1a.token_ids == r1b.token_ids
    assert r2a.token_ids == r2b.token_ids
    assert r2a.timings.prompt_positions == r2b.timings.prompt_positions
    assert r2a.timings.prefill_positions < r2b.timings.prefill_positions  # only the new turn was prefilled
    assert r2a.timings.prefill_positions + r1a.timings.prompt_positions + len(r1a.token_ids) - 1 == \
        r2a.timings.prompt_positions
    # and both equal the reference run on the very same token sequence
    ref = _reference(tiny_checkpoint, family)
    prompt_ids = [i for s in a.segments[:-1] for i in s[0]]  # last segment = answer 2 (minus its last token)
    prompt_items = [torch.from_numpy(np.array(x)) for s in a.segments[:-1] for x in s[1]]
    assert len(prompt_items) == 2
    emb = ref.inputs_embeds(prompt_ids, prompt_items)
    assert emb.shape[0] == r2a.timings.prompt_positions
    assert ref.greedy(emb, 10) == r2a.token_ids


def test_closing_the_event_stream_stops_and_keeps_the_conversation(runtime_engine):  # noqa: F811
    from vila_edge.generate import SamplingParams

    pipe = _pipe(runtime_engine, "nvila")
    conv = pipe.chat()
    events = conv.ask_events("Hi there.", params=SamplingParams(max_new_tokens=20))
    got = [next(events) for _ in range(3)]
    events.close()  # what a server does when the client goes away
    assert all(e.token_id is not None for e in got)
    assert conv.last.finish_reason == "interrupted" and conv.last.token_ids == [e.token_id for e in got]
    assert pipe.llm.length == conv.cache_positions
    r = conv.ask("Go on.", max_new_tokens=3)
    assert 0 < r.timings.prefill_positions < r.timings.prompt_positions  # continued on the kept cache


def test_position_ids_mark_media_rows(runtime_engine):  # noqa: F811
    """What id-fed engines (TensorRT-LLM: real ids + a prompt table for media rows) receive."""
    pipe = _pipe(runtime_engine, "nvila")
    user, items = pipe.user_message("Hi", [_image()])
    ids, items = pipe.chat()._full_prompt([user], items)
    chunks = pipe.prompt_chunks(ids, items)
    pos = chunks.position_ids()
    assert len(pos) == chunks.n_positions == pipe.prompt_embeds("Hi", [_image()]).shape[0]
    assert pos.count(-1) == sum(len(x) for x in items)
    assert set(pos) - {-1} <= set(ids) | set(pipe.end_ids)


def test_context_overflow_drops_oldest_turns(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila-lite", max_context=160)
    notes = []
    conv = pipe.chat(on_notice=notes.append)
    conv.ask("Hi there, who are you?", max_new_tokens=20)
    conv.ask("Tell me more about yourself please.", max_new_tokens=20)
    r = conv.ask("Now look at this.", images=[_image(100, 100, 4)], max_new_tokens=20)  # 1 tile = 17 positions
    assert r.notices and "dropped" in r.notices[0] and notes == r.notices
    assert pipe.llm.length <= 160
    assert len(conv.messages) < 6


def test_kv_buffer_is_shared_and_updated_in_place(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila")
    llm = pipe.llm
    assert llm.share_buffer and llm.last_only
    k0 = llm._kv_np[0][0]
    ptr = k0.__array_interface__["data"][0]
    llm.reset()
    for k, v in llm._kv_np:
        k[...] = 0
        v[...] = 0
    x = llm.embed([5, 6, 7, 8])
    l_full = llm.forward(x)
    assert np.abs(k0[0, :, :4]).sum() > 0 and np.abs(k0[0, :, 4:]).sum() == 0  # written in place
    llm.truncate(2)
    l_again = llm.forward(x[2:])
    np.testing.assert_allclose(l_again, l_full, rtol=0, atol=1e-5)
    assert llm._kv_np[0][0].__array_interface__["data"][0] == ptr
    llm.reset()
    pipe.kv.release()


def test_chunked_prefill_equals_one_run(runtime_engine):  # noqa: F811
    """A prompt longer than prefill_chunk runs in pieces (bounded activations): same logits and cache as one run."""
    from vila_edge.backends.ort_llm import OrtLLMEngine

    eng = runtime_engine("nvila")
    whole = OrtLLMEngine(eng / "llm", prefill_chunk=0)
    chunked = OrtLLMEngine(eng / "llm", prefill_chunk=5)
    x = whole.embed(list(range(3, 26)))  # 23 positions: runs of 5, 5, 5, 5, 3
    l_whole, l_chunked = whole.forward(x), chunked.forward(x)
    assert chunked.length == whole.length == 23
    np.testing.assert_allclose(l_chunked, l_whole, rtol=0, atol=1e-4)
    for (k1, v1), (k2, v2) in zip(whole._kv_np, chunked._kv_np, strict=True):
        np.testing.assert_allclose(k2[0, :, :23], k1[0, :, :23], rtol=0, atol=1e-5)
        np.testing.assert_allclose(v2[0, :, :23], v1[0, :, :23], rtol=0, atol=1e-5)
    step = whole.embed([7])  # and decoding goes on the same from there
    np.testing.assert_allclose(chunked.forward(step), whole.forward(step), rtol=0, atol=1e-4)
    assert chunked.describe()["prefill_chunk"] == 5 and whole.describe()["prefill_chunk"] == "whole prompt"


# ---- streaming, sampling --------------------------------------------------------------------


def test_stream_equals_final_text(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila")
    stream = pipe.generate(PROMPT, images=[_image()], stream=True, max_new_tokens=24, temperature=0.9, seed=3)
    pieces = list(stream)
    res = stream.result
    assert "".join(pieces) == res.text
    gen = [t for t in res.token_ids if t not in pipe.config.llm.stop_token_ids]
    assert res.text == pipe.tokenizer.decode(gen)


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "vila1.5")
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2)
    a = pipe.generate("Say something.", seed=7, **kw)
    b = pipe.generate("Say something.", seed=7, **kw)
    c = pipe.generate("Say something.", seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    if len(a.text) > 3:
        stop = a.text[2:4]
        d = pipe.generate("Say something.", seed=7, stop=[stop], **kw)
        assert stop not in d.text and d.finish_reason == "stop" and a.text.startswith(d.text)


def test_ignore_eos_generates_through_stop_tokens(runtime_engine):  # noqa: F811
    from dataclasses import replace

    pipe = _pipe(runtime_engine, "vila1.5")
    first = pipe.generate("Go.", max_new_tokens=6).token_ids
    cfg = pipe.config
    # make the greedy answer's first token a stop token: a plain call must then stop right there
    pipe.config = replace(cfg, llm=replace(cfg.llm, stop_token_ids=(first[0], *cfg.llm.stop_token_ids)))
    try:
        stopped = pipe.generate("Go.", max_new_tokens=6)
        forced = pipe.generate("Go.", max_new_tokens=6, ignore_eos=True)
    finally:
        pipe.config = cfg
    assert stopped.token_ids == [first[0]] and stopped.finish_reason == "stop"
    assert len(forced.token_ids) == 6 and forced.finish_reason == "length" and forced.token_ids[0] == first[0]


def test_generated_ids_stay_in_trained_vocabulary(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila")
    cfg = pipe.config.llm
    res = pipe.generate("Go.", max_new_tokens=16, temperature=5.0, seed=1)
    assert all(t < cfg.vocab_size and t not in cfg.extra_masked_ids for t in res.token_ids)


# ---- video ----------------------------------------------------------------------------------


def _write_video(path, n=20, size=(64, 48), fps=10):
    import cv2

    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), i * 12, np.uint8))
    w.release()
    return path


def test_nvila_video_item_with_tsp_pooling(runtime_engine, tiny_checkpoint, tmp_path):  # noqa: F811
    import dataclasses

    from vila_edge.media.tiling import preprocess_image
    from vila_edge.media.video import load_video

    pipe = _pipe(runtime_engine, "nvila")
    ref = _reference(tiny_checkpoint, "nvila")
    video = _write_video(tmp_path / "clip.avi")
    frames = load_video(video, pipe.config)
    assert len(frames) == pipe.config.num_video_frames == 8
    # upstream TSPVideoEncoder on the projected per-frame features, then "\n" after every pooled frame
    feats = torch.stack([ref.image_items(preprocess_image(f, ref.cfg.vision, single=False))[0] for f in frames])
    pool = (4, 2, 2)
    nl = int(feats.shape[1] ** 0.5)
    x = feats.view(8, nl, nl, -1)
    for dim, p in enumerate(pool):
        x = x.view(x.shape[:dim] + (-1, p) + x.shape[dim + 1:]).mean(dim + 1)
    x = x.flatten(1, 2)
    end = ref.embed(list(ref.cfg.llm.end_token_ids))
    want = torch.cat([torch.cat([f, end]) for f in x])[: -len(end)]

    pipe.config = dataclasses.replace(pipe.config, video_pool_sizes=(pool,))
    try:
        items, n = pipe.video_items(str(video))
        emb = pipe.prompt_embeds("What happens?", video=str(video))
    finally:
        pipe.config = dataclasses.replace(pipe.config, video_pool_sizes=())
    assert n == 8 and len(items) == 1
    np.testing.assert_allclose(items[0], want.numpy(), rtol=0, atol=1e-4)
    assert emb.shape[0] > items[0].shape[0]


def test_vila15_video_frames_are_images(runtime_engine, tiny_checkpoint, tmp_path):  # noqa: F811
    pipe = _pipe(runtime_engine, "vila1.5")
    video = _write_video(tmp_path / "clip.avi", n=5)
    msg, items = pipe.user_message("What happens?", video=str(video))
    assert len(items) == 5 and msg.content.count("<image>\n") == 5  # fewer frames than 8: all of them
    res = pipe.generate("What happens?", video=str(video), max_new_tokens=4)
    assert res.timings.media_items == 5


# ---- NVIDIA backends (skipped here: no GPU, no TensorRT / TensorRT-LLM on this machine) -------------


def test_nvidia_backends_import_lazily_and_fail_with_one_line(runtime_engine, tmp_path):  # noqa: F811
    import importlib.util

    from vila_edge.backends import make_llm_engine, make_vision_engine
    from vila_edge.engine_dir import read_manifest
    from vila_edge.errors import EngineError

    eng = runtime_engine("nvila")
    manifest = read_manifest(eng)
    # "auto" never picks an NVIDIA backend that is not installed / has no engine files
    assert make_vision_engine("auto", eng, manifest, device="cpu").name == "onnxruntime"
    if importlib.util.find_spec("tensorrt") is None:
        with pytest.raises(EngineError, match="tensorrt"):
            make_vision_engine("tensorrt", eng, manifest)
    with pytest.raises(EngineError, match="TensorRT-LLM"):
        make_llm_engine("tensorrt-llm", eng, manifest)


def test_tensorrt_vision_engine_matches_onnxruntime(runtime_engine):  # noqa: F811
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here (no NVIDIA GPU); runs on Jetson / CUDA hosts")
    from vila_edge.backends.ort_vision import OrtVisionEngine
    from vila_edge.backends.tensorrt_vision import TensorRTVisionEngine

    eng = runtime_engine("nvila")
    if not list((eng / "vision").glob("*.plan")):
        pytest.skip("no TensorRT plans in the engine directory (run `vila-edge build --stage engines` on the GPU)")
    x = np.random.default_rng(0).standard_normal((3, 3, 56, 56)).astype(np.float32)
    a, b = OrtVisionEngine(eng / "vision"), TensorRTVisionEngine(eng / "vision")
    np.testing.assert_allclose(b.encode(x), a.encode(x), rtol=2e-2, atol=2e-2)


def test_tensorrt_llm_engine_matches_onnxruntime(runtime_engine):  # noqa: F811
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed here (no NVIDIA GPU)")
    from vila_edge.backends import make_llm_engine
    from vila_edge.backends.ort_llm import OrtLLMEngine

    eng = runtime_engine("nvila")
    from vila_edge.backends.trtllm_llm import find_trtllm_engine

    if find_trtllm_engine(eng) is None:
        pytest.skip("no TensorRT-LLM engine in the engine directory (trtllm/)")
    from vila_edge.engine_dir import read_manifest

    trt = make_llm_engine("tensorrt-llm", eng, read_manifest(eng))
    ort = OrtLLMEngine(eng / "llm")
    x = ort.embed([5, 6, 7, 8])
    np.testing.assert_allclose(trt.forward_ids([5, 6, 7, 8], x), ort.forward(x), rtol=2e-2, atol=2e-2)
