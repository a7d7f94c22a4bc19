"""The server under hostile input (issue: fresh machines and hostile input, D1 D2 D3 D5 D8 and request fuzzing).

Real server (uvicorn on loopback), real engine (the tiny NVILA fixture through PipelineEngine), real HTTP
peers for remote images (http.server threads). Timing checks are ratios against a baseline taken in the same
test, with generous margins (the machine is shared)."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest_runtime import runtime_engine  # noqa: E402,F401  (session fixture: tiny engine directories)
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_serve import data_url, image_message, png_bytes, post  # noqa: E402

from vila_edge.serve import BackgroundServer, bind_socket  # noqa: E402
from vila_edge.serve.app import ServeSettings, create_app  # noqa: E402
from vila_edge.serve.engine import PipelineEngine  # noqa: E402
from vila_edge.serve.openai_schema import Limits  # noqa: E402
from vila_edge.serve.remote import FETCH_FAILED, address_allowed, parse_networks  # noqa: E402


@pytest.fixture(scope="module")
def engine(runtime_engine):  # noqa: F811
    return PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, ServeSettings(max_queue=4, limits=Limits(max_tokens=8)))) as srv:
        yield srv


def _health_latency(url: str, n: int = 5) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=30).status_code == 200
        out.append(time.perf_counter() - t0)
    return out


# ---- D1: huge text is refused before tokenizing; the event loop stays responsive -----------------------


def test_huge_text_is_refused_without_stalling_the_server(server, engine):
    assert engine.max_prompt_chars == engine.max_context * engine.pipeline.tokenizer.max_token_chars
    idle = statistics.median(_health_latency(server.url))
    text = "lorem ipsum dolor sit amet " * (12_000_000 // 27)  # ~12 MB of plain text
    result = {}

    def send():
        result["r"] = post(server, {"messages": [{"role": "user", "content": text}]}, timeout=120)

    t = threading.Thread(target=send)
    t.start()
    busy = []
    while t.is_alive():
        busy += _health_latency(server.url, 1)
    t.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    # tokenizing 12 MB holds the GIL for seconds; refusing it first keeps /health within a few idle round trips
    assert max(busy, default=0.0) < max(20 * idle, 1.0), (idle, busy)


# ---- D2: remote images cannot reach what only the server can reach ------------------------------------


@pytest.mark.parametrize("ip, ok", [("8.8.8.8", True), ("2001:4860:4860::8888", True), ("127.0.0.1", False),
                                    ("10.1.2.3", False), ("192.168.1.10", False), ("172.16.0.1", False),
                                    ("169.254.169.254", False), ("0.0.0.0", False), ("::1", False),
                                    ("fe80::1", False), ("::ffff:127.0.0.1", False), ("224.0.0.1", False),
                                    ("100.64.0.1", False)])
def test_only_public_addresses_unless_a_network_is_allowed(ip, ok):
    assert address_allowed(ip) is ok
    assert address_allowed("192.168.1.10", parse_networks(["192.168.1.0/24"]))


class _Peer(BaseHTTPRequestHandler):
    """Image host for the tests: /img.png, redirects, slow drip."""

    def do_GET(self):  # noqa: N802
        if self.path == "/img.png":
            data = png_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path.startswith("/to/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/to/"):].replace("~", "/"))
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(1000):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.5)
            except OSError:
                pass
        else:
            self.send_error(404)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def peer():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Peer)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_remote_fetch_checks_every_hop_with_one_generic_error(engine, peer):
    port = peer.rsplit(":", 1)[1]
    lan = ServeSettings(allow_remote_images=True, remote_timeout=2.0, remote_image_networks=parse_networks(["127.0.0.0/8"]),
                        limits=Limits(max_tokens=4))
    public_only = ServeSettings(allow_remote_images=True, remote_timeout=2.0, limits=Limits(max_tokens=4))
    with BackgroundServer(create_app(engine, public_only)) as srv:
        r = post(srv, {"messages": image_message(url=peer + "/img.png")})  # loopback: refused
        assert r.status_code == 400 and r.json()["error"]["message"] == FETCH_FAILED
    with BackgroundServer(create_app(engine, lan)) as srv:
        assert post(srv, {"messages": image_message(url=peer + "/img.png")}).status_code == 200
        cases = {
            "redirect to link-local metadata": peer + "/to/http:~~169.254.169.254~latest",
            "redirect loop": peer + "/loop",
            "missing": peer + "/nothing-here",
            "closed port": "http://127.0.0.1:9/x.png",
            "slow drip": peer + "/drip",
        }
        for name, url in cases.items():
            t0 = time.monotonic()
            r = post(srv, {"messages": image_message(url=url)}, timeout=60)
            err = r.json()["error"]
            assert r.status_code == 400 and err["code"] == "image_fetch_failed", (name, r.text)
            assert err["message"] == FETCH_FAILED and port not in err["message"] and "404" not in err["message"]
            assert time.monotonic() - t0 < 20, f"{name}: the total deadline (2 s) was not applied"


# ---- D3: lone surrogates are a 400; 5xx are counted and keep the connection ----------------------------


class _Broken:
    """STAND-IN engine whose token counting fails: the only way to make a route raise on purpose."""

    model_id, max_context, max_prompt_chars = "broken", 256, 4096

    def count_tokens(self, messages, images):
        raise RuntimeError("boom")

    def generate_stream(self, messages, images, params):
        raise RuntimeError("boom")


def test_lone_surrogate_is_400_and_errors_are_counted_on_a_kept_connection(server):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'
    r = post(server, raw)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_text", r.text
    with BackgroundServer(create_app(_Broken())) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert c.get("/health").status_code == 200  # same client: the keep-alive connection survived
        metrics = c.get("/metrics").text
        assert 'route="/v1/chat/completions",status="500"' in metrics.replace(" ", ""), metrics


# ---- D5: no Nagle delay on keep-alive connections ----------------------------------------------------


def test_keep_alive_requests_are_not_delayed(server):
    sock = bind_socket("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
    fresh = []
    for _ in range(10):
        with httpx.Client(timeout=30) as c:
            t0 = time.perf_counter()
            c.get(server.url + "/health")
            fresh.append(time.perf_counter() - t0)
    with httpx.Client(timeout=30) as c:
        c.get(server.url + "/health")
        kept = []
        for _ in range(20):
            t0 = time.perf_counter()
            c.get(server.url + "/health")
            kept.append(time.perf_counter() - t0)
    # Nagle + delayed ACK adds ~40 ms to every reused-connection request; a fresh connection pays no such delay
    assert statistics.median(kept) < max(2 * statistics.median(fresh), statistics.median(fresh) + 0.02), (fresh, kept)


# ---- D8: browsers cannot drive a loopback server -----------------------------------------------------


def test_browser_borne_requests_are_refused_without_an_api_key(server):
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = post(server, body, headers={"host": "attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "untrusted_host"
    r = post(server, body, headers={"origin": "http://attacker.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin"
    assert post(server, body, headers={"origin": server.url}).status_code == 200  # the camera page's own origin
    assert httpx.get(server.url + "/health", headers={"host": f"localhost:{server.url.rsplit(':', 1)[1]}"}).status_code == 200


def test_with_an_api_key_names_are_allowed_but_json_is_still_required(engine):
    settings_ = ServeSettings(api_key="k", limits=Limits(max_tokens=2))
    with BackgroundServer(create_app(engine, settings_)) as srv:
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        auth = {"authorization": "Bearer k"}
        assert post(srv, body, headers={**auth, "host": "vila.lan"}).status_code == 200
        r = httpx.post(srv.url + "/v1/chat/completions", content=body, headers={**auth, "content-type": "text/plain"})
        assert r.status_code == 415


# ---- fuzzing request bodies ------------------------------------------------------------------------

BODY_EXAMPLES = 60
VALID = {"model": "tiny-nvila", "max_tokens": 2, "temperature": 0,
         "messages": [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                                   {"type": "image_url", "image_url": {"url": ""}}]}]}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=8)


@settings(max_examples=BODY_EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_request_bodies_never_give_5xx(server, data):
    body = json.loads(json.dumps(VALID))
    body["messages"][0]["content"][1]["image_url"]["url"] = data_url(png_bytes((24, 16)))
    for _ in range(data.draw(st.integers(1, 3))):
        node, path = body, []
        while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
            key = data.draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            path.append((node, key))
            node = node[key]
        if not path:
            key = data.draw(st.sampled_from(sorted(body)))
            path = [(body, key)]
        parent, key = path[-1]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[key]
        else:
            parent[key] = data.draw(JSON_VALUES)
    r = post(server, body, timeout=120)
    assert r.status_code < 500, (body, r.status_code, r.text)
    assert r.status_code == 200 or "error" in r.json()
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
