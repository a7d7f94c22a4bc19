"""Prefix KV reuse across prompts (`Conversation._take_cache`): a new prompt that starts like what the LLM's
cache holds (a server client resending its conversation and image) prefills only the rest, and answers
exactly as a cold run does. Real ONNX Runtime engines of the tiny checkpoints; the server tests run the
real app (uvicorn on 127.0.0.1) with the official `openai` client."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture: tiny engine directories)
from PIL import Image

from vila_edge.generate import SamplingParams, prefill
from vila_edge.runtime import Conversation, Turn
from vila_edge.splice import prompt_chunks, shared_positions

PROMPT = "Describe the image."


def _image(w=300, h=150, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# ---- the chunk walk (no engine) -----------------------------------------------------------------


def test_shared_positions_compares_tokens_and_whole_media_items():
    m = 99  # the media marker
    a_img, b_img = np.ones((4, 2), np.float32), np.ones((4, 2), np.float32)
    a = prompt_chunks([1, 2, m, 3, 4], [a_img], media_ids={m}, end_ids=[7])
    b = prompt_chunks([1, 2, m, 3, 5, 6], [b_img.copy()], media_ids={m}, end_ids=[7])  # equal values, other array
    assert shared_positions(a, b) == 2 + 4 + 1 + 1  # text, media rows, end token, then 3 (4 != 5)
    assert shared_positions(a, a) == a.n_positions
    other = prompt_chunks([1, 2, m, 3, 4], [b_img * 2], media_ids={m}, end_ids=[7])
    assert shared_positions(a, other) == 2  # another image: the prefix ends where it starts
    assert shared_positions(a, prompt_chunks([1, 2], [], media_ids={m})) == 2
    assert shared_positions(prompt_chunks([5], [], media_ids={m}), a) == 0
    rest = b.after(8)
    assert rest.position_ids() == [5, 6] and rest.chunks[0].start == 8
    assert b.media_start_before(4) == 2 and b.media_start_before(8) == 8
    with pytest.raises(Exception, match="inside a media item"):
        b.after(4)


# ---- runtime ------------------------------------------------------------------------------------

_PIPES: dict = {}


def _pipe(runtime_engine, family, *, cold=False):  # noqa: F811
    key = (family, cold)
    if key not in _PIPES:
        import vila_edge

        kw = {"vision_cache_mb": 0, "prefix_reuse": False} if cold else {}
        _PIPES[key] = vila_edge.load(runtime_engine(family), device="cpu", threads=1, **kw)
    return _PIPES[key]


def _first_logits(pipe, turns: list[Turn]) -> tuple[np.ndarray, int]:
    """The prefill of `turns` as `Conversation.ask_events` does it: (logits of the first answer token,
    positions prefilled)."""
    conv = Conversation(pipe)
    conv.add_history(turns[:-1])
    user, items = pipe.user_message(turns[-1].text, turns[-1].images)
    ids, its, reuse = conv._fit(user, items, SamplingParams(), [])
    chunks = conv._take_cache(pipe.prompt_chunks(ids, its), reuse)
    return prefill(pipe.llm, chunks), chunks.n_positions


def _close(a: np.ndarray, b: np.ndarray) -> None:
    # the same positions prefilled in two pieces instead of one: float32 sums in another order, nothing more
    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), np.abs(a - b).max()


@pytest.mark.parametrize("family", ["nvila", "vila1.5"])
def test_a_resent_conversation_prefills_only_its_new_part(runtime_engine, family):  # noqa: F811
    warm, cold = _pipe(runtime_engine, family), _pipe(runtime_engine, family, cold=True)
    img = _image(seed=1)
    first = [Turn("user", PROMPT, [img])]
    r1 = warm.generate(first, max_new_tokens=8)
    r1c = cold.generate(first, max_new_tokens=8)
    assert r1.token_ids == r1c.token_ids
    turns = first + [Turn("assistant", r1.text), Turn("user", "And the colours?")]
    r2 = warm.generate(turns, max_new_tokens=12, ignore_eos=True)
    r2c = cold.generate(turns, max_new_tokens=12, ignore_eos=True)
    assert r2.token_ids == r2c.token_ids  # greedy: the same answer as a cold run
    assert r2.timings.prompt_positions == r2c.timings.prompt_positions
    assert r2c.timings.prefill_positions == r2c.timings.prompt_positions  # cold: everything prefilled
    # warm: the first turn (image included) came from the cache; at most the re-tokenized answer and the new turn
    assert r2.timings.prefill_positions <= r2.timings.prompt_positions - r1.timings.prompt_positions
    # the first answer token's logits, warm (after turn 1 again) vs a full prefill
    warm.generate(first, max_new_tokens=8)
    got, n_warm = _first_logits(warm, turns)
    cold.kv.release()
    want, n_cold = _first_logits(cold, turns)
    assert n_warm < n_cold - r1.timings.prompt_positions // 2
    _close(got, want)


def test_the_same_request_twice_prefills_one_position(runtime_engine):  # noqa: F811
    warm = _pipe(runtime_engine, "nvila")
    img = _image(seed=2)
    a = warm.generate(PROMPT, images=[img], max_new_tokens=6)
    b = warm.generate(PROMPT, images=[img], max_new_tokens=6)
    assert b.token_ids == a.token_ids
    assert b.timings.prefill_positions == 1 and b.timings.prompt_positions == a.timings.prompt_positions
    assert b.timings.vision == 0.0  # and the image came from the vision cache


def test_another_image_is_prefilled_again(runtime_engine):  # noqa: F811
    warm, cold = _pipe(runtime_engine, "nvila"), _pipe(runtime_engine, "nvila", cold=True)
    warm.generate(PROMPT, images=[_image(seed=3)], max_new_tokens=4)
    new = _image(seed=4)
    r = warm.generate(PROMPT, images=[new], max_new_tokens=8, ignore_eos=True)
    rc = cold.generate(PROMPT, images=[new], max_new_tokens=8, ignore_eos=True)
    assert r.token_ids == rc.token_ids
    media = r.timings.prompt_positions - warm.count_positions(PROMPT)  # rows the image takes
    assert media > 0 and r.timings.prefill_positions >= media  # only the text before the image was kept
    assert r.timings.prefill_positions < r.timings.prompt_positions


def test_reuse_switched_off(runtime_engine):  # noqa: F811
    warm = _pipe(runtime_engine, "nvila")
    img = _image(seed=5)
    warm.generate(PROMPT, images=[img], max_new_tokens=4)
    r = warm.chat(reuse_kv=False).ask(PROMPT, images=[img], max_new_tokens=4)  # re-prefills by request
    assert r.timings.prefill_positions == r.timings.prompt_positions
    cold = _pipe(runtime_engine, "nvila", cold=True)
    cold.generate(PROMPT, images=[img], max_new_tokens=4)
    r = cold.generate(PROMPT, images=[img], max_new_tokens=4)
    assert r.timings.prefill_positions == r.timings.prompt_positions
    assert cold.stats()["prefill"]["reused_positions"] == 0


def test_a_chat_turn_after_a_generate_call_keeps_the_shared_start(runtime_engine):  # noqa: F811
    warm, cold = _pipe(runtime_engine, "vila1.5"), _pipe(runtime_engine, "vila1.5", cold=True)
    img = _image(seed=6)
    warm.generate(PROMPT, images=[img], max_new_tokens=4)
    conv = warm.chat()
    r1 = conv.ask(PROMPT + " Briefly.", images=[img], max_new_tokens=5)
    assert r1.timings.prefill_positions < r1.timings.prompt_positions
    r2 = conv.ask("More?", max_new_tokens=5)  # the chat's own continuation still works on top
    c = cold.chat()
    c1 = c.ask(PROMPT + " Briefly.", images=[img], max_new_tokens=5)
    c2 = c.ask("More?", max_new_tokens=5)
    assert (r1.token_ids, r2.token_ids) == (c1.token_ids, c2.token_ids)


# ---- the server ---------------------------------------------------------------------------------


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_server_reuses_the_image_and_the_conversation(runtime_engine):  # noqa: F811
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")
    import vila_edge
    from vila_edge.serve import BackgroundServer
    from vila_edge.serve.app import create_app
    from vila_edge.serve.engine import PipelineEngine

    engine_dir = runtime_engine("nvila")
    warm = PipelineEngine(vila_edge.load(engine_dir, device="cpu", threads=1), "tiny")
    cold = PipelineEngine(vila_edge.load(engine_dir, device="cpu", threads=1, vision_cache_mb=0,
                                         prefix_reuse=False), "tiny")
    url = _data_url(_image(seed=7))
    first = [{"role": "user", "content": [{"type": "text", "text": PROMPT},
                                          {"type": "image_url", "image_url": {"url": url}}]}]

    def ask(srv, messages, n=10):
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=n, temperature=0)
        return r.choices[0].message.content

    with BackgroundServer(create_app(warm)) as srv:
        a1 = ask(srv, first)
        assert ask(srv, first) == a1  # the same request again: the image from the cache
        m = httpx.get(srv.url + "/metrics").text
        assert (_metric(m, "vila_edge_vision_cache_misses_total"), _metric(m, "vila_edge_vision_cache_hits_total")) \
            == (1, 1)
        assert _metric(m, "vila_edge_vision_cache_entries") == 1 and _metric(m, "vila_edge_vision_cache_bytes") > 0
        s0 = httpx.get(srv.url + "/stats").json()
        assert s0["models"] == ["tiny"] and s0["vision_cache"]["hits"] == 1
        second = first + [{"role": "assistant", "content": a1}, {"role": "user", "content": "And the colours?"}]
        a2 = ask(srv, second, n=12)
        s1 = httpx.get(srv.url + "/stats").json()
        third = second + [{"role": "assistant", "content": a2}, {"role": "user", "content": "Anything else?"}]
        a3 = ask(srv, third, n=12)
        s2 = httpx.get(srv.url + "/stats").json()
        m = httpx.get(srv.url + "/metrics").text
    assert s2["vision_cache"]["hits"] == 3 and s2["vision_cache"]["misses"] == 1
    assert _metric(m, "vila_edge_prefix_reused_positions_total") == s2["prefill"]["reused_positions"] > 0
    assert _metric(m, "vila_edge_prefill_positions_total") == s2["prefill"]["prefilled_positions"]

    with BackgroundServer(create_app(cold)) as srv:  # each request on a fresh server: everything prefilled
        assert ask(srv, first) == a1
        c0 = httpx.get(srv.url + "/stats").json()
        assert ask(srv, second, n=12) == a2
        c1 = httpx.get(srv.url + "/stats").json()
        assert ask(srv, third, n=12) == a3
        c2 = httpx.get(srv.url + "/stats").json()
    assert c2["vision_cache"]["hits"] == 0 and c2["prefill"]["reused_positions"] == 0

    def prefilled(before, after):
        return after["prefill"]["prefilled_positions"] - before["prefill"]["prefilled_positions"]

    def prompt(before, after):
        return after["prefill"]["prompt_positions"] - before["prefill"]["prompt_positions"]

    assert prompt(s0, s1) == prompt(c0, c1) and prompt(s1, s2) == prompt(c1, c2)  # the same prompts
    assert prefilled(c0, c1) == prompt(c0, c1) and prefilled(c1, c2) == prompt(c1, c2)
    assert prefilled(s0, s1) < prompt(s0, s1) // 2 and prefilled(s1, s2) < prompt(s1, s2) // 2


@pytest.mark.slow
def test_serve_cache_benchmark_short(runtime_engine, tmp_path):  # noqa: F811
    """The benchmark, small: two real CLI servers (one with `--vision-cache-mb 0 --no-prefix-reuse`), the same
    answers from both; the flags reach the runtime (the uncached server reuses nothing). No timing asserted."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import serve_cache

    res = serve_cache.run(runtime_engine("nvila"), repeats=2, turns=2, max_tokens=4, image_size=(96, 64))
    for key in ("same_image", "same_image_new_question", "conversation"):
        assert res[key]["answers_identical"], key
        assert len(res[key]["ttft_s"]["cached"]) == 2
    cached, uncached = res["server_stats"]["cached"], res["server_stats"]["uncached"]
    assert cached["vision_cache"]["hits"] > 0 and cached["prefill"]["reused_positions"] > 0
    assert uncached["vision_cache"]["hits"] == 0 and uncached["vision_cache"]["max_bytes"] == 0
    assert uncached["prefill"]["reused_positions"] == 0
    serve_cache.write_results(res, tmp_path)
    assert json.loads((tmp_path / "serve_cache.json").read_text())["engine"] == res["engine"]
    assert "same request x2" in (tmp_path / "serve_cache.md").read_text()
