"""`vila-edge serve`: the real server (uvicorn on 127.0.0.1, a free port) driven by the official `openai`
client and by raw HTTP.

- The OpenAI-client tests and the bad-input tests run against a REAL engine: the tiny NVILA checkpoint
  built into an engine directory (`runtime_engine`) and loaded with `vila_edge.load`; answers are checked
  against the runtime called directly.
- The queueing / disconnect / timeout tests need a generation whose speed and length the test controls,
  which a random tiny model cannot promise (it may stop after one token). They use `StandInEngine`, a
  deterministic word generator that is NOT a model (vila_edge.serve.engine), clearly named as such.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from conftest_runtime import runtime_engine  # noqa: E402,F401  (session fixture: tiny engine directories)
from PIL import Image  # noqa: E402

from vila_edge.generate import SamplingParams  # noqa: E402
from vila_edge.serve import BackgroundServer  # noqa: E402
from vila_edge.serve.app import ServeSettings, create_app  # noqa: E402
from vila_edge.serve.engine import ChatMessage, PipelineEngine, StandInEngine  # noqa: E402
from vila_edge.serve.openai_schema import Limits  # noqa: E402
from vila_edge.serve.remote import parse_networks  # noqa: E402

LIMITS = Limits(max_body_bytes=400_000, max_image_bytes=150_000, max_image_pixels=1_000_000, max_images=2,
                max_tokens=64)


def png_bytes(size=(96, 64), color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, color)
    img.paste((20, 20, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    img.save(buf, fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_message(text="What is in the picture?", url=None):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url or data_url(png_bytes())}}]}]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(runtime_engine):  # noqa: F811
    return PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, ServeSettings(limits=LIMITS, max_queue=4))
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, body, **kw):
    if not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=body,
                      headers={"content-type": "application/json", **kw.pop("headers", {})},
                      timeout=kw.pop("timeout", 30), **kw)


def direct_answer(engine, text, images, max_tokens, **sampling):
    """What the runtime itself answers (no server), as the server should."""
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    return "".join(engine.generate_stream([ChatMessage("user", text, len(pil))], pil,
                                          SamplingParams(max_new_tokens=max_tokens, **sampling)))


# ---------------------------------------------------------------------------------------------
# OpenAI client on the real engine
# ---------------------------------------------------------------------------------------------


def test_openai_client_non_streaming_with_image(server, client, engine):
    r = client.chat.completions.create(model="tiny-nvila", messages=image_message(), max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny-nvila" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    expected = direct_answer(engine, "What is in the picture?", [png_bytes()], 12)
    assert choice.message.content == expected
    img = Image.open(io.BytesIO(png_bytes()))
    assert r.usage.prompt_tokens == engine.count_tokens([ChatMessage("user", "What is in the picture?", 1)], [img])
    assert r.usage.prompt_tokens == engine.pipeline.count_positions("What is in the picture?", images=[img])
    assert 1 <= r.usage.completion_tokens <= 12


def test_openai_client_streaming_matches_non_streaming(client):
    kw = dict(model="tiny-nvila", messages=image_message("Describe it."), max_tokens=10, temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format(server):
    body = {"model": "tiny-nvila", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ")
        assert json.loads(ev[6:])["object"] == "chat.completion.chunk"


def test_max_tokens_stop_and_seed(client, engine):
    base = dict(model="tiny-nvila", messages=[{"role": "user", "content": "Tell me a story."}])
    long = client.chat.completions.create(max_tokens=24, temperature=0, **base).choices[0].message.content
    short = client.chat.completions.create(max_tokens=3, temperature=0, **base)
    if short.choices[0].finish_reason == "length":
        assert short.usage.completion_tokens == 3
        assert long.startswith(short.choices[0].message.content)
    # a stop string taken from the middle of the greedy answer cuts it right there
    visible = [i for i in range(2, len(long) - 2) if long[i:i + 2].strip() and "\ufffd" not in long[i:i + 2]]
    if visible:
        i = visible[len(visible) // 2]
        stop = long[i:i + 2]
        r = client.chat.completions.create(max_tokens=24, temperature=0, stop=[stop], **base)
        assert r.choices[0].message.content == long[:long.index(stop)]
        assert r.choices[0].finish_reason == "stop"
        rs = client.chat.completions.create(max_tokens=24, temperature=0, stop=stop, stream=True, **base)
        assert "".join(c.choices[0].delta.content or "" for c in rs if c.choices) == long[:long.index(stop)]
    # sampling with a seed is reproducible, and is what the runtime gives for that seed
    a = client.chat.completions.create(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, **base)
    b = client.chat.completions.create(max_tokens=8, temperature=1.0, top_p=0.9, seed=7, **base)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content == direct_answer(engine, "Tell me a story.", [], 8, temperature=1.0,
                                                         top_p=0.9, seed=7)
    neg = client.chat.completions.create(max_tokens=4, temperature=0.7, seed=-3, **base)  # any int64 is a seed
    assert neg.choices[0].finish_reason in ("stop", "length")


def test_multi_turn_and_system_message(client):
    r = client.chat.completions.create(model="tiny-nvila", max_tokens=5, temperature=0, messages=[
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": image_message()[0]["content"]},
        {"role": "assistant", "content": "A red picture."},
        {"role": "user", "content": "And the square?"}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 40


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["tiny-nvila"]
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["models"] == ["tiny-nvila"] and h["queue_length"] == 0
    m = httpx.get(server.url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'vila_edge_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    for name in ("vila_edge_time_to_first_token_seconds_bucket", "vila_edge_tokens_per_second",
                 "vila_edge_queue_length", "vila_edge_completion_tokens_total", "vila_edge_active_generations"):
        assert name in text
    ttft_count = [ln for ln in text.splitlines() if ln.startswith("vila_edge_time_to_first_token_seconds_count")]
    assert int(ttft_count[0].split()[-1]) >= 1


# ---------------------------------------------------------------------------------------------
# bad input: 4xx with the OpenAI error shape, never a 500
# ---------------------------------------------------------------------------------------------

_MSG = [{"role": "user", "content": "hi"}]
_garbage = data_url(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)


def _big_png(w, h):
    return data_url(png_bytes((w, h)))


BAD = [
    # (id, body, status, code, param)
    ("malformed-json", b'{"messages": [', 400, "invalid_json", None),
    ("not-utf8", b'\xff\xfe{"a":1}', 400, "invalid_json", None),
    ("empty-body", b"", 400, "invalid_json", None),
    ("body-not-object", [1, 2], 400, "invalid_type", None),
    ("messages-missing", {"model": "tiny-nvila"}, 400, "missing_required_parameter", "messages"),
    ("messages-not-list", {"messages": "hi"}, 400, "invalid_type", "messages"),
    ("messages-empty", {"messages": []}, 400, "invalid_value", "messages"),
    ("message-not-object", {"messages": ["hi"]}, 400, "invalid_type", "messages[0]"),
    ("bad-role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ("tool-role", {"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ("content-number", {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ("part-type", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "invalid_value",
     "messages[0].content[0].type"),
    ("text-not-string", {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400,
     "invalid_type", "messages[0].content[0].text"),
    ("last-not-user", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, 400,
     "invalid_value", "messages[1].role"),
    ("max-tokens-string", {"messages": _MSG, "max_tokens": "10"}, 400, "invalid_type", "max_tokens"),
    ("max-tokens-zero", {"messages": _MSG, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ("max-tokens-over-cap", {"messages": _MSG, "max_tokens": 65}, 400, "max_tokens_exceeded", "max_tokens"),
    ("max-completion-tokens", {"messages": _MSG, "max_completion_tokens": 1000}, 400, "max_tokens_exceeded",
     "max_completion_tokens"),
    ("temperature-range", {"messages": _MSG, "temperature": 3}, 400, "invalid_value", "temperature"),
    ("temperature-bool", {"messages": _MSG, "temperature": True}, 400, "invalid_type", "temperature"),
    ("top-p-zero", {"messages": _MSG, "top_p": 0}, 400, "invalid_value", "top_p"),
    ("seed-float", {"messages": _MSG, "seed": 1.5}, 400, "invalid_type", "seed"),
    ("stream-string", {"messages": _MSG, "stream": "yes"}, 400, "invalid_type", "stream"),
    ("stop-number", {"messages": _MSG, "stop": 5}, 400, "invalid_type", "stop"),
    ("stop-too-many", {"messages": _MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ("n-2", {"messages": _MSG, "n": 2}, 400, "unsupported_value", "n"),
    ("tools", {"messages": _MSG, "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ("unknown-model", {"model": "gpt-9", "messages": _MSG}, 404, "model_not_found", "model"),
    ("model-number", {"model": 3, "messages": _MSG}, 400, "invalid_type", "model"),
    ("image-undecodable", {"messages": image_message(url=_garbage)}, 400, "invalid_image",
     "messages[0].content[1].image_url.url"),
    ("image-bad-base64", {"messages": image_message(url="data:image/png;base64,@@@@")}, 400, "invalid_image_url",
     "messages[0].content[1].image_url.url"),
    ("image-not-base64", {"messages": image_message(url="data:image/png,rawdata")}, 400, "invalid_image_url",
     "messages[0].content[1].image_url.url"),
    ("image-wrong-mime", {"messages": image_message(url=data_url(b"hello", "text/plain"))}, 400,
     "invalid_image_url", "messages[0].content[1].image_url.url"),
    ("image-local-path", {"messages": image_message(url="/etc/passwd")}, 400, "invalid_image_url",
     "messages[0].content[1].image_url.url"),
    ("image-file-url", {"messages": image_message(url="file:///etc/passwd")}, 400, "invalid_image_url",
     "messages[0].content[1].image_url.url"),
    ("image-remote-disabled", {"messages": image_message(url="http://127.0.0.1:9/x.png")}, 400,
     "remote_images_disabled", "messages[0].content[1].image_url.url"),
    ("image-url-not-string", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "invalid_type", "messages[0].content[0].image_url.url"),
    ("image-too-many-pixels", {"messages": image_message(url=_big_png(1100, 1000))}, 400, "image_too_large",
     "messages[0].content[1].image_url.url"),
    ("image-too-many-bytes", {"messages": image_message(url=data_url(b"\x89PNG" + bytes(160_000)))}, 400,
     "image_too_large", "messages[0].content[1].image_url.url"),
    ("too-many-images", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}} for _ in range(3)]}]}, 400,
     "too_many_images", "messages[0].content[2]"),
    ("image-in-assistant", {"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]},
        {"role": "user", "content": "x"}]}, 400, "invalid_value", "messages[0].content[0]"),
    ("context-exceeded", {"messages": [{"role": "user", "content": "word " * 1200}]}, 400,
     "context_length_exceeded", "messages"),
    ("body-too-large", {"messages": [{"role": "user", "content": "x" * 500_000}]}, 413, "request_too_large", None),
]


@pytest.mark.parametrize("body,status,code,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_are_clear_4xx(server, body, status, code, param):
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param and err["message"]
    assert "Traceback" not in r.text


def test_max_tokens_beyond_context_room(server, engine):
    def positions(n):
        return engine.count_tokens([ChatMessage("user", "word " * n)], [])

    n = 1
    while positions(n * 2) < engine.max_context - 40:
        n *= 2
    while positions(n + 1) < engine.max_context - 40:
        n += 1
    assert engine.max_context - 64 < positions(n) < engine.max_context  # fits, but leaves under 64 positions
    r = post(server, {"messages": [{"role": "user", "content": "word " * n}], "max_tokens": 64})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "max_tokens"


def test_http_level_errors(server):
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(server.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # chunked body without Content-Length, over the limit
    r = httpx.post(server.url + "/v1/chat/completions", content=iter([b"x" * 100_000] * 5), timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    # the server is still fine
    assert post(server, {"messages": _MSG, "max_tokens": 2}).status_code == 200


def test_api_key(engine):
    app = create_app(engine, ServeSettings(limits=LIMITS, api_key="s3cret"))
    with BackgroundServer(app) as srv:
        body = {"messages": _MSG, "max_tokens": 2}
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = post(srv, body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        assert httpx.get(srv.url + "/health").status_code == 200  # liveness probes need no key
        assert post(srv, body, headers={"authorization": "Bearer s3cret"}).status_code == 200
        openai = pytest.importorskip("openai")
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert c.chat.completions.create(model="tiny-nvila", messages=_MSG, max_tokens=2).choices


def test_two_models_one_engine_queue(engine):
    other = PipelineEngine(engine.pipeline, "tiny-nvila-b")  # same weights, another name
    with BackgroundServer(create_app([engine, other], ServeSettings(limits=LIMITS))) as srv:
        openai = pytest.importorskip("openai")
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="-", max_retries=0)
        assert [m.id for m in c.models.list()] == ["tiny-nvila", "tiny-nvila-b"]
        a = c.chat.completions.create(model="tiny-nvila", messages=_MSG, max_tokens=4, temperature=0)
        b = c.chat.completions.create(model="tiny-nvila-b", messages=_MSG, max_tokens=4, temperature=0)
        assert (a.model, b.model) == ("tiny-nvila", "tiny-nvila-b")
        assert a.choices[0].message.content == b.choices[0].message.content
        r = post(srv, {"messages": _MSG})  # with several models, 'model' is required
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert httpx.get(srv.url + "/v1/models/tiny-nvila-b").json()["id"] == "tiny-nvila-b"
        assert httpx.get(srv.url + "/v1/models/nope").status_code == 404


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        if self.path == "/cat.png":
            data = png_bytes((80, 60))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        else:
            self.send_error(404)

    def log_message(self, *a):
        pass


def test_remote_images_when_allowed(engine):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        app = create_app(engine, ServeSettings(limits=LIMITS, allow_remote_images=True,
                                               remote_image_networks=parse_networks(["127.0.0.0/8"])))
        with BackgroundServer(app) as srv:
            r = post(srv, {"messages": image_message(url=base + "/cat.png"), "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == direct_answer(
                engine, "What is in the picture?", [png_bytes((80, 60))], 4)
            r = post(srv, {"messages": image_message(url=base + "/missing.png")})
            assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
            r = post(srv, {"messages": image_message(url="file:///etc/hostname")})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image_url"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ---------------------------------------------------------------------------------------------
# queueing, disconnects, timeouts (StandInEngine: controlled speed, NOT a model)
# ---------------------------------------------------------------------------------------------


def _health(srv):
    return httpx.get(srv.url + "/health", timeout=5).json()


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_queue_full_gives_429_and_accepted_requests_complete():
    eng = StandInEngine(token_delay=0.02, answer_tokens=15)  # ~0.3 s per request
    app = create_app(eng, ServeSettings(max_queue=2))
    with BackgroundServer(app) as srv:
        body = {"messages": _MSG, "max_tokens": 64}
        results = [None] * 8

        def one(i):
            results[i] = post(srv, body)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 3 and set(codes) <= {200, 429}, codes
        full = eng.answer([ChatMessage("user", "hi")], [], SamplingParams(max_new_tokens=64))
        for r in results:
            if r.status_code == 200:
                assert r.json()["choices"][0]["message"]["content"] == full
            else:
                assert r.json()["error"]["code"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        assert eng.max_running == 1  # never two generations at once
        text = httpx.get(srv.url + "/metrics").text
        assert 'vila_edge_rejected_total{reason="queue_full"}' in text


def test_client_disconnect_mid_stream_frees_the_engine():
    eng = StandInEngine(token_delay=0.01, eos=False)  # would run for 10 s (1000 tokens)
    app = create_app(eng, ServeSettings(max_queue=2, limits=Limits(max_tokens=1000)))
    with BackgroundServer(app) as srv:
        body = {"messages": _MSG, "max_tokens": 1000, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=10) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any('"content"' in g for g in got)
            assert _health(srv)["active"] == 1
            # a second stream waits in the queue; its client hangs up before getting a byte
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=10) as r2:
                assert r2.status_code == 200
                assert _wait(lambda: _health(srv)["queue_length"] == 1, 2.0)
            assert _wait(lambda: _health(srv)["queue_length"] == 0, 2.0)
        t0 = time.monotonic()  # connection closed here
        assert _wait(lambda: _health(srv)["active"] == 0 and eng.running == 0, 3.0)
        freed = time.monotonic() - t0
        assert freed < 1.5
        assert eng.calls == 1
        # the freed slot serves the next request at once
        r = post(srv, {"messages": _MSG, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        text = httpx.get(srv.url + "/metrics").text
        assert 'vila_edge_generations_total{finish_reason="cancelled"} 2' in text  # running + queued


def test_client_disconnect_non_streaming_and_while_queued():
    eng = StandInEngine(token_delay=0.01, eos=False)
    app = create_app(eng, ServeSettings(max_queue=4, limits=Limits(max_tokens=1000)))
    with BackgroundServer(app) as srv:
        body = {"messages": _MSG, "max_tokens": 1000}
        # the first request runs (its client gives up after 1 s); the second waits in the queue and its client
        # gives up first (after 0.4 s): it must leave the queue without ever reaching the engine
        errs = []

        def impatient(timeout):
            try:
                post(srv, body, timeout=timeout)
            except httpx.TimeoutException as exc:
                errs.append(exc)

        ts = [threading.Thread(target=impatient, args=(t,)) for t in (1.0, 0.4)]
        for t in ts:
            t.start()
            time.sleep(0.15)
        assert _wait(lambda: len(errs) == 1, 2.0) and _health(srv)["queue_length"] == 0
        assert _health(srv)["active"] == 1
        for t in ts:
            t.join(10)
        assert len(errs) == 2
        assert _wait(lambda: _health(srv)["active"] == 0 and _health(srv)["queue_length"] == 0, 3.0)
        assert eng.calls == 1  # the queued one never started
        assert post(srv, {"messages": _MSG, "max_tokens": 3}).status_code == 200


def test_request_timeout():
    eng = StandInEngine(token_delay=0.01, eos=False)
    app = create_app(eng, ServeSettings(request_timeout=0.3, limits=Limits(max_tokens=1000)))
    with BackgroundServer(app) as srv:
        r = post(srv, {"messages": _MSG, "max_tokens": 1000})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=10,
                          json={"messages": _MSG, "max_tokens": 1000, "stream": True}) as s:
            raw = s.read().decode()
        assert '"code":"timeout"' in raw and raw.endswith("data: [DONE]\n\n")
        assert _health(srv)["active"] == 0


class _Exploding(StandInEngine):
    def generate_stream(self, messages, images, params):
        if "boom" in messages[-1].text:
            yield "a"
            raise RuntimeError("kaboom")
        yield from super().generate_stream(messages, images, params)


def test_engine_failure_is_a_500_and_the_server_survives():
    eng = _Exploding()
    with BackgroundServer(create_app(eng)) as srv:
        r = post(srv, {"messages": [{"role": "user", "content": "boom"}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "Traceback" not in r.text
        r = post(srv, {"messages": _MSG, "max_tokens": 3})
        assert r.status_code == 200


# ---------------------------------------------------------------------------------------------
# CLI and load
# ---------------------------------------------------------------------------------------------


def test_cli_serve_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "serve", "no/such/engine", "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "engine directory not found" in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "vila_edge.cli", "serve", "x", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "cannot listen on 127.0.0.1" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_load_short(runtime_engine, tmp_path):  # noqa: F811
    """The load benchmark, small: the real CLI server in a subprocess, 16 clients x 2 requests."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "benchmarks"))
    import serve_load

    res = serve_load.run(engine_dir=runtime_engine("nvila"), clients=16, requests_per_client=2, max_queue=3,
                         max_tokens=24, rounds=2, time_limit=60, abandon=2)
    assert res["ok"], res["problems"]
    assert res["totals"]["completed"] >= 3 and res["totals"]["rejected_429"] >= 1
    assert res["totals"]["completed"] + res["totals"]["rejected_429"] == res["totals"]["sent"]
    assert res["totals"]["wrong_answers"] == 0 and res["totals"]["other_errors"] == 0
