"""The step-named generation loop (vila_edge.generate) and the prompt chunk sequence (vila_edge.splice):
greedy tokens through the ONNX Runtime engine equal the PyTorch reference's; chunk positions equal the
spliced embeddings' rows, from features and from row counts alike (the server counts without the vision
tower); the loop's finish reasons; the KV cache's holder."""

from __future__ import annotations

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)
from PIL import Image

from vila_edge.generate import generate_tokens, timed_greedy_run, timed_runs
from vila_edge.splice import MediaChunk, TextChunk, prompt_chunks

torch = pytest.importorskip("torch")


def _image(w=300, h=150, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _pipe(runtime_engine, family):  # noqa: F811
    import vila_edge

    return vila_edge.load(runtime_engine(family, "fp32"), device="cpu", threads=1)


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])
def test_generate_tokens_greedy_equals_reference(runtime_engine, tiny_checkpoint, family):  # noqa: F811
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.generate import decode_one_token, prefill
    from vila_edge.reference.model import ReferenceVILA

    pipe = _pipe(runtime_engine, family)
    ref = ReferenceVILA(load_checkpoint(tiny_checkpoint(family)))
    user, items = pipe.user_message("Describe the image.", [_image()])
    chunks = pipe.prompt_chunks(pipe.prompt_ids([user]), items)
    cfg = pipe.config.llm
    pipe.llm.reset()
    pipe.kv.release()

    def pick(logits, _generated):  # greedy over the trained vocabulary, as the reference masks it
        x = np.array(logits[:cfg.vocab_size], np.float32)
        x[list(cfg.extra_masked_ids)] = -np.inf
        return int(np.argmax(x))

    steps = generate_tokens(prefill(pipe.llm, chunks), lambda t: decode_one_token(pipe.llm, t), pick,
                            max_new_tokens=12, stop_ids=set(cfg.stop_token_ids))
    got = [t for t, _ in steps]
    pipe.llm.reset()
    emb = torch.from_numpy(chunks.embeds(pipe.embed))
    assert got == ref.greedy(emb, 12)
    assert len(got) >= 2  # the loop fed tokens back (not only the prefill's pick)


@pytest.mark.parametrize("family", ["nvila", "nvila-lite", "vila1.5", "vila1.5-s2"])
def test_chunk_positions_match_spliced_embeddings(runtime_engine, family):  # noqa: F811
    pipe = _pipe(runtime_engine, family)
    img = _image(400, 200)
    user, items = pipe.user_message("What is here?", [img])
    ids = pipe.prompt_ids([user])
    chunks = pipe.prompt_chunks(ids, items)
    embeds = chunks.embeds(pipe.embed)
    assert chunks.n_positions == embeds.shape[0] == len(chunks.position_ids())
    pos = 0
    for c in chunks:  # each chunk knows where it starts: contiguous, in order
        assert c.start == pos
        pos += c.n_positions
        if isinstance(c, MediaChunk):
            np.testing.assert_array_equal(embeds[c.start:c.start + c.n_rows], c.features)
        else:
            np.testing.assert_array_equal(embeds[c.start:c.start + c.n_positions], pipe.embed(list(c.ids)))
    assert len(chunks.media) == len(items)
    # the server's count: row counts from the image layout, no vision tower
    lengths = pipe.prompt_chunks(ids, [len(x) for x in items])
    assert lengths.n_positions == chunks.n_positions and lengths.position_ids() == chunks.position_ids()
    assert pipe.count_positions("What is here?", images=[img]) == chunks.n_positions


def test_prompt_chunks_cut_at_markers():
    c = prompt_chunks([1, 2, 99, 3, 99], [np.zeros((2, 4)), 3], media_ids={99}, end_ids=[7])
    assert [type(x) for x in c] == [TextChunk, MediaChunk, TextChunk, MediaChunk]
    assert [x.start for x in c] == [0, 2, 5, 6] and c.n_positions == 10
    assert c.position_ids() == [1, 2, -1, -1, 7, 3, -1, -1, -1, 7]
    with pytest.raises(Exception, match="built from lengths"):
        c.embeds(lambda ids: np.zeros((len(ids), 4)))
    with pytest.raises(Exception, match="2 media marker"):
        prompt_chunks([99, 99], [1], media_ids={99})


# ---- the loop on a toy model: next token = (token + 1) % 5 ---------------------------------------


def _toy():
    fed = []

    def step(t):
        fed.append(t)
        return np.eye(5, dtype=np.float32)[(t + 1) % 5]

    return fed, step


def _argmax(logits, _generated):
    return int(np.argmax(logits))


def test_generate_tokens_finish_reasons():
    start = np.eye(5, dtype=np.float32)[0]
    fed, step = _toy()
    assert list(generate_tokens(start, step, _argmax, max_new_tokens=3)) == [(0, None), (1, None), (2, "length")]
    assert fed == [0, 1]  # the last token is not fed back
    fed, step = _toy()
    assert list(generate_tokens(start, step, _argmax, max_new_tokens=9, stop_ids={2})) == [
        (0, None), (1, None), (2, "stop")]
    assert fed == [0, 1]
    fed, step = _toy()
    room = iter([True, False])
    assert list(generate_tokens(start, step, _argmax, max_new_tokens=9, has_room=lambda: next(room))) == [
        (0, None), (1, "context")]


def test_timed_runs_warm_up_then_measure():
    fed, step = _toy()
    progress = []
    runs = timed_runs(lambda n: timed_greedy_run(lambda: np.eye(5, dtype=np.float32)[0], step,
                                                 lambda lg: int(np.argmax(lg)), 4, n),
                      warmup=1, warmup_tokens=2, runs=2, tokens=3, on_progress=lambda a, b: progress.append((a, b)))
    assert [r["generated_tokens"] for r in runs] == [3, 3] and progress == [(1, 3), (2, 3), (3, 3)]
    assert len(fed) == 2 + 3 + 3  # forced decode steps: exactly `tokens` per run, no stop token


def test_kv_cache_holder_switches_between_conversations(runtime_engine):  # noqa: F811
    pipe = _pipe(runtime_engine, "nvila")
    a, b = pipe.chat(), pipe.chat()
    a.ask("Hi there.", max_new_tokens=4)
    assert pipe.kv.holds(a, a.cache_positions)
    b.ask("Hello.", max_new_tokens=4)  # b takes the cache: a must re-prefill its whole conversation
    assert pipe.kv.holds(b, b.cache_positions) and not pipe.kv.holds(a, a.cache_positions)
    held = pipe.prompt_chunks(*b.cached_prompt())
    r = a.ask("Go on.", max_new_tokens=4)
    # ... all but the start it shares with b's (the chat template's opening, up to the first user text)
    from vila_edge.splice import shared_positions

    shared = shared_positions(held, pipe.prompt_chunks(*a.segments[0]))
    assert 0 < shared < held.n_positions
    assert r.timings.prefill_positions == r.timings.prompt_positions - shared
    r = a.ask("More.", max_new_tokens=4)  # a holds it again: only the new turn is prefilled
    assert 0 < r.timings.prefill_positions < r.timings.prompt_positions
    a.reset()
    assert pipe.kv.holder is None and pipe.llm.length == 0
