"""The camera watch of `vila-edge serve --camera SRC --watch-ask Q --watch-schema FILE` (vila_edge.serve.live_watch):
change events as server-sent events on /watch/events, /watch/state, the webhook, the page's watch panel.

The camera is a video file written with OpenCV (tests/test_watch.py's `write_video`: known images, each held for
SCENE_FRAMES frames), played in real time by the runtime's FrameGrabber, and the engine is the REAL tiny NVILA
engine (the demo model in the slow test). The events the server sends are compared with what `vila-edge watch`'s
function (`run_watch`) gives on the same video with the same model: the same answers in the same order, each at a
frame of the same scene (a camera shows its newest frame; the live loop takes it when the engine is free, so the
frame number within a scene depends on timing; `vila-edge watch` on a file reads every frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import re
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("llguidance")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

from conftest_runtime import runtime_engine  # noqa: E402,F401
from test_demo import demo_engines, needs_weights  # noqa: E402,F401
from test_serve_page import _chromium, _run_chromium  # noqa: E402
from test_watch import _frames, write_video  # noqa: E402

from vila_edge.errors import VilaEdgeError  # noqa: E402
from vila_edge.serve import BackgroundServer  # noqa: E402
from vila_edge.serve.app import ServeSettings, create_app  # noqa: E402
from vila_edge.serve.engine import PipelineEngine, StandInEngine  # noqa: E402
from vila_edge.serve.live import open_camera  # noqa: E402
from vila_edge.serve.live_watch import LiveWatch  # noqa: E402
from vila_edge.structured import schema_text  # noqa: E402
from vila_edge.watch import ChangeTracker, run_watch, watch_params  # noqa: E402

QUESTION = "How many people are there?"
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
          "additionalProperties": False}
# plain colours (BGR): JPEG keeps each frame of a scene identical, so dedup asks once per scene. The tiny random
# model answers 5, 1, 5, 5, 8 for them: four events, none between the two scenes that both get 5.
COLOURS = [(30, 30, 230), (30, 200, 30), (230, 30, 30), (40, 230, 240), (250, 250, 250)]
SCENES = len(COLOURS)
SCENE_FRAMES = 10  # 1 s each at test_watch.FPS (10): the live loop (an answer takes ~0.1 s) sees every scene


class GatedCamera:
    """A frame source (vila_edge.serve.live's interface) over `open_camera(video)` that starts playing only when
    the test opens it: the /watch/events subscriber is connected before the first frame, so it sees every event."""

    def __init__(self, video):
        self.video = video
        self.grabber = None

    def open(self) -> None:
        self.grabber = open_camera(str(self.video))

    def read_latest(self):
        return (0, None) if self.grabber is None else self.grabber.read_latest()

    def close(self) -> None:
        if self.grabber is not None:
            self.grabber.close()


class Collector(BaseHTTPRequestHandler):
    """A loopback webhook receiver: keeps each POSTed JSON body."""

    received: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        Collector.received.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def read_sse(url: str, n: int, timeout: float = 60.0, subscribed: threading.Event | None = None) -> list:
    """The first `n` (id, event) of a server-sent event stream (fewer if `timeout` passes first)."""
    out, cur_id = [], None
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("retry:") and subscribed is not None:
                subscribed.set()
            elif line.startswith("id: "):
                cur_id = int(line[4:])
            elif line.startswith("data: "):
                out.append((cur_id, json.loads(line[6:])))
                if len(out) >= n:
                    break
            if time.monotonic() > deadline:
                break
    return out


def cli_events(pipe, video, schema: str, **kw):
    """`vila-edge watch ENGINES VIDEO --ask QUESTION --schema FILE`'s JSON lines and stats (its function)."""
    out, err = io.StringIO(), io.StringIO()
    stats = run_watch(pipe, str(video), QUESTION, watch_params(schema), out=out, err=err, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()], stats


@contextlib.contextmanager
def served_watch(engine, video, settings: ServeSettings, n_events: int):
    """Serve `engine` with the watch on a gated camera playing `video` to its end; yields the server and the first
    `n_events` (id, event) that a /watch/events subscriber connected before the first frame got."""
    camera = GatedCamera(video)
    with BackgroundServer(create_app(engine, settings, camera=camera)) as srv:
        subscribed, got = threading.Event(), []
        reader = threading.Thread(target=lambda: got.extend(read_sse(srv.url + "/watch/events", n_events,
                                                                     subscribed=subscribed)))
        reader.start()
        assert subscribed.wait(30)
        camera.open()
        reader.join(60)
        deadline = time.monotonic() + 60
        # the video plays to its end (and the last answer is in): no more events may come after this
        while not camera.grabber.finished and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        yield srv, got


@pytest.fixture(scope="module")
def watched(runtime_engine, tmp_path_factory):  # noqa: F811
    """One served watch over a 5-scene video, with a webhook receiver; the server stays up for the tests."""
    tmp = tmp_path_factory.mktemp("watch")
    video = tmp / "scenes.avi"
    write_video(video, [np.full((48, 64, 3), c[::-1], np.uint8) for c in COLOURS], SCENE_FRAMES)  # RGB in
    engine = PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")
    schema = schema_text(SCHEMA)
    expected, cli_stats = cli_events(engine.pipeline, video, schema)
    # the premise (the tiny model's answers, checked when COLOURS was chosen): changes, and a scene without one
    assert 2 <= len(expected) < SCENES, expected

    hook = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    Collector.received = []
    settings = ServeSettings(camera_interval=0.0, watch_question=QUESTION, watch_schema=schema,
                             watch_webhook=f"http://127.0.0.1:{hook.server_address[1]}/hook")
    t0 = time.time()
    with served_watch(engine, video, settings, len(expected)) as (srv, got):
        yield SimpleNamespace(srv=srv, events=got, expected=expected, cli_stats=cli_stats, t0=t0, t1=time.time(),
                              received=Collector.received)
    hook.shutdown()
    hook.server_close()
    engine.pipeline.close()


def _without_frame_and_time(e: dict) -> dict:
    return {k: v for k, v in e.items() if k not in ("frame", "time", "time_s")}


def test_watch_events_are_the_cli_events(watched):
    got = [e for _, e in watched.events]
    assert [_without_frame_and_time(e) for e in got] == [_without_frame_and_time(e) for e in watched.expected]
    assert [n for n, _ in watched.events] == list(range(1, len(got) + 1))
    # each event at a frame of the scene where `vila-edge watch` saw the change (grabber seq 1 = video frame 0)
    assert [(e["frame"] - 1) // SCENE_FRAMES for e in got] == [e["frame"] // SCENE_FRAMES for e in watched.expected]
    # "time": the wall-clock time the frame was taken, ISO 8601 UTC, in order
    times = [datetime.strptime(e["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
             for e in got]
    assert all(watched.t0 - 1 <= t <= watched.t1 + 1 for t in times) and times == sorted(times)
    assert set(got[0]) == {"event", "frame", "time", "answer", "previous"} and got[0]["previous"] is None


def test_late_subscriber_gets_the_current_answer_first(watched):
    first = read_sse(watched.srv.url + "/watch/events", 1, timeout=10)
    assert first == [watched.events[-1]]  # same id, same event


def test_watch_state_metrics_and_stats(watched):
    url = watched.srv.url
    n = len(watched.events)
    state = httpx.get(url + "/watch/state").json()
    assert state["question"] == QUESTION and state["schema"] == SCHEMA and state["max_new_tokens"] == 64
    assert state["answer"] == watched.events[-1][1]["answer"] and state["last_event"] == watched.events[-1][1]
    assert state["last_event_id"] == n and state["events"] == n  # no event after the ones read
    # one answer per scene, as the CLI asked once per scene (the frames between were the same as the last asked)
    assert state["answers"] == watched.cli_stats.asked == SCENES
    assert state["incomplete"] == state["errors"] == state["dropped"] == 0
    camera = httpx.get(url + "/camera/state").json()
    assert camera["prompt"] == QUESTION and camera["watch"]["events"] == n
    metrics = httpx.get(url + "/metrics").text
    assert f"vila_edge_watch_events_total {n}" in metrics
    assert f"vila_edge_watch_answers_total {SCENES}" in metrics
    assert "vila_edge_watch_dropped_total 0" in metrics
    stats = httpx.get(url + "/stats").json()
    assert stats["watch"]["events"] == n and stats["watch"]["answers"] == SCENES


def test_webhook_gets_each_event_in_order(watched):
    deadline = time.monotonic() + 15
    while len(watched.received) < len(watched.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watched.received == [e for _, e in watched.events]
    state = httpx.get(watched.srv.url + "/watch/state").json()
    assert state["webhook"] and state["webhook_posts"] == len(watched.events) and state["webhook_failures"] == 0


def test_captions_stream_carries_the_watch_answers(watched):
    """The live loop asks the watch question instead of the caption prompt: /captions shows its JSON answers."""
    caption = read_sse(watched.srv.url + "/captions", 1, timeout=10)[0][1]
    assert caption["done"] and json.loads(caption["text"]) == watched.events[-1][1]["answer"]


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_page_shows_the_watch_panel(watched, tmp_path):
    dom = _run_chromium(["--dump-dom", "--window-size=1000,700", "--timeout=3000", watched.srv.url + "/"],
                        tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert re.search(r'<section id="watch" class="watch"\s*>', html), "the watch panel is shown"
    assert f'<span id="watch-question">{QUESTION}</span>' in html
    answer = watched.events[-1][1]["answer"]
    m = re.search(r'<pre id="watch-answer"[^>]*>(.*?)</pre>', html, re.S)
    assert m and json.loads(m.group(1)) == answer
    log = re.findall(r"<li><time[^>]*>(.*?)</time><code>(.*?)</code></li>", html)
    # a page opened late: the current answer is its first log entry
    assert len(log) == 1 and f"frame {watched.events[-1][1]['frame']}" in log[0][0]
    assert json.loads(log[0][1].replace("&quot;", '"')) == answer


# ---- the subscriber queue bound, the webhook's failures, the tracker --------------------------------------------


def test_slow_subscriber_queue_is_bounded_and_drops_the_oldest():
    async def scenario():
        w = LiveWatch(QUESTION, watch_params(schema_text(SCHEMA)), queue_bound=8)
        stream = w.events()
        assert await anext(stream) == "retry: 2000\n\n"  # subscribed; now it stops reading
        for k in range(100):
            w.on_answer(k + 1, time.time(), json.dumps({"n": k % 2}), "stop")
        assert w.counts()["dropped"] == 100 - 8 and w.counts()["subscribers"] == 1
        assert w.hub._subs and all(s.queue.qsize() == 8 for s in w.hub._subs)
        got = [await anext(stream) for _ in range(8)]  # the newest 8, in order
        w.begin_shutdown()
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
        return got

    got = asyncio.run(scenario())
    ids = [int(re.match(r"id: (\d+)\n", g).group(1)) for g in got]
    assert ids == list(range(93, 101))
    last = json.loads(got[-1].split("data: ", 1)[1])
    assert last["frame"] == 100 and last["answer"] == {"n": 1} and last["previous"] == {"n": 0}


def test_webhook_failures_are_counted_and_logged_not_fatal(caplog):
    pytest.importorskip("httpcore")

    async def scenario():
        # a private address that is not allowed: refused at connect time (no connection is made)
        w = LiveWatch(QUESTION, watch_params(schema_text(SCHEMA)), webhook="http://10.1.2.3:9/hook")
        await w.start()
        for k in range(3):
            w.on_answer(k, time.time(), json.dumps({"n": k}), "stop")
        deadline = time.monotonic() + 20
        while w.webhook_posts < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await w.stop()
        return w.counts()

    with caplog.at_level(logging.WARNING, logger="vila_edge.serve"):
        counts = asyncio.run(scenario())
    assert counts["webhook_posts"] == counts["webhook_failures"] == 3 and counts["events"] == 3
    assert sum("address not allowed" in r.getMessage() for r in caplog.records) == 3


def test_change_tracker():
    t = ChangeTracker()
    assert t.observe(1, {"time_s": 0.0}, '{"n":1}', "stop") == {"event": "change", "frame": 1, "time_s": 0.0,
                                                                 "answer": {"n": 1}, "previous": None}
    assert t.observe(2, {}, '{"n":1}', "stop") is None  # same answer: no event
    notes = []
    assert t.observe(3, {}, '{"n":', "length", notes.append) is None  # cut: not JSON
    assert t.observe(4, {}, '{"n":', "stop", notes.append) is None  # ended early without its JSON end
    assert t.observe(5, {}, '{"n":2}', "stop")["previous"] == {"n": 1}
    assert (t.stats.asked, t.stats.incomplete, t.stats.events) == (5, 2, 2)
    assert "max_new_tokens" in notes[0] and "frame 4" in notes[1]


# ---- wiring and refusals -----------------------------------------------------------------------------------------


class StillFrames:
    """A frame source holding one grey frame."""

    def read_latest(self):
        return 1, np.full((48, 64, 3), 90, np.uint8)


def test_watch_off_and_watch_without_camera():
    with BackgroundServer(create_app(StandInEngine(), ServeSettings(camera_interval=0.2), camera=StillFrames())) as srv:
        for path in ("/watch/events", "/watch/state"):
            r = httpx.get(srv.url + path)
            assert r.status_code == 404 and "--watch-ask" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/camera/state").json()["watch"] is None
    with pytest.raises(VilaEdgeError, match="--watch-ask needs --camera"):
        create_app(StandInEngine(), ServeSettings(watch_question="q", watch_schema=schema_text(SCHEMA)))
    with pytest.raises(VilaEdgeError, match="--watch-schema"):
        create_app(StandInEngine(), ServeSettings(watch_question="q"), camera=StillFrames())


def test_watch_events_need_the_api_key():
    settings = ServeSettings(api_key="k3y", camera_interval=0.2, watch_question=QUESTION,
                             watch_schema=schema_text(SCHEMA))
    with BackgroundServer(create_app(StandInEngine(), settings, camera=StillFrames())) as srv:
        assert httpx.get(srv.url + "/watch/state").status_code == 401
        assert httpx.get(srv.url + "/watch/state?key=k3y").status_code == 200
        with httpx.stream("GET", srv.url + "/watch/events?key=k3y", timeout=10) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert httpx.get(srv.url + "/watch/events").status_code == 401


def _serve(args, **kw):
    return subprocess.run([sys.executable, "-m", "vila_edge.cli", "serve", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_serve_watch_refusals_are_one_line(tmp_path):
    schema = tmp_path / "n.json"
    schema.write_text(json.dumps(SCHEMA))
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"n": {"type": "int"}}}')
    video = tmp_path / "v.avi"
    write_video(video, _frames(1), 2)
    engines = str(tmp_path / "no-engine-needed")  # every refusal comes before the engines load
    cam = ["--camera", str(video)]
    cases = [
        (["--watch-ask", "q", "--watch-schema", str(schema)], "--watch-ask needs --camera SRC"),
        (cam + ["--watch-ask", "q", "--watch-schema", str(bad)], f"--watch-schema {bad}: unsupported or invalid"),
        (cam + ["--watch-ask", "q", "--watch-schema", str(tmp_path / "missing.json")], "--watch-schema "),
        (cam + ["--watch-ask", "q"], "--watch-ask needs --watch-schema FILE"),
        (cam + ["--watch-schema", str(schema)], "--watch-schema applies to a camera watch: add --watch-ask"),
        (cam + ["--watch-ask", "q", "--watch-schema", str(schema), "--watch-webhook", "ftp://x/"],
         "--watch-webhook 'ftp://x/': must be an http:// or https:// URL"),
        (cam + ["--watch-ask", "q", "--watch-schema", str(schema), "--watch-webhook", "http://127.0.0.1:9/",
                "--allow-webhook-network", "nonsense"], "--allow-webhook-network 'nonsense'"),
        (cam + ["--watch-ask", " ", "--watch-schema", str(schema)], "--watch-ask: the question is empty"),
    ]
    for args, message in cases:
        r = _serve([engines, "--port", "0", *args])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert lines[0].startswith("error: ") and message in lines[0], (args, lines)


def test_cli_serve_with_watch(runtime_engine, tmp_path):  # noqa: F811
    """`vila-edge serve ENGINE --camera VIDEO --watch-ask Q --watch-schema FILE`: the flags reach the watch."""
    video = tmp_path / "still.avi"
    write_video(video, _frames(1), 30)
    schema = tmp_path / "n.json"
    schema.write_text(json.dumps(SCHEMA))
    proc = subprocess.Popen([sys.executable, "-m", "vila_edge.cli", "serve", str(runtime_engine("nvila")), "--port",
                             "0", "--threads", "1", "--camera", str(video), "--interval", "0.1", "--watch-ask",
                             QUESTION, "--watch-schema", str(schema), "--watch-max-tokens", "40",
                             "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
        url = re.search(r"at (http://\S+)/v1", line).group(1)
        assert f"watch events {url}/watch/events" in line
        while time.monotonic() < deadline:
            state = httpx.get(url + "/watch/state").json()
            if state["events"]:
                break
            time.sleep(0.2)
        assert state["question"] == QUESTION and state["schema"] == SCHEMA and state["max_new_tokens"] == 40
        assert state["events"] == 1 and state["last_event"]["previous"] is None  # a still video: one answer
        assert read_sse(url + "/watch/events", 1, timeout=10) == [(1, state["last_event"])]
        # a viewer still connected does not hold up the shutdown: its stream ends at once
        subscribed, got = threading.Event(), []
        viewer = threading.Thread(target=lambda: got.extend(read_sse(url + "/watch/events", 2, subscribed=subscribed)))
        viewer.start()
        assert subscribed.wait(10)
        t0 = time.monotonic()
        proc.terminate()
        proc.wait(30)
        viewer.join(10)
        assert not viewer.is_alive() and time.monotonic() - t0 < 10 and got == [(1, state["last_event"])]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        proc.stderr.close()


# ---- the demo model: events where the colour changes, as `vila-edge watch` reports them ---------------------------


@pytest.mark.slow
@needs_weights
def test_demo_served_watch_reports_the_colour_changes(demo_engines, tmp_path):  # noqa: F811
    from test_watch import SCENES as COLOUR_SCENES

    from vila_edge.demo import data as D
    from vila_edge.demo.assemble import CHECKPOINT_NAME

    scenes = [D.make_scene(random.Random(seed), "single") for seed, _ in COLOUR_SCENES]
    schema = schema_text({"type": "object", "properties": {"answer": {"enum": list(D.COLOURS)}},
                          "required": ["answer"], "additionalProperties": False})
    video = tmp_path / "colours.avi"
    write_video(video, [s.image for s in scenes], SCENE_FRAMES)
    engine = PipelineEngine.load(demo_engines / CHECKPOINT_NAME, model_id="demo")
    try:
        question = "What colour is the shape?"
        out = io.StringIO()
        run_watch(engine.pipeline, str(video), question, watch_params(schema), out=out, err=io.StringIO())
        expected = [json.loads(x) for x in out.getvalue().splitlines()]
        assert [e["answer"]["answer"] for e in expected] == ["red", "blue", "green", "yellow"]
        settings = ServeSettings(camera_interval=0.0, watch_question=question, watch_schema=schema)
        with served_watch(engine, video, settings, len(expected)) as (srv, got):
            state = httpx.get(srv.url + "/watch/state").json()
    finally:
        engine.pipeline.close()
    events = [e for _, e in got]
    assert [_without_frame_and_time(e) for e in events] == [_without_frame_and_time(e) for e in expected]
    assert [(e["frame"] - 1) // SCENE_FRAMES for e in events] == [e["frame"] // SCENE_FRAMES for e in expected]
    assert state["events"] == len(expected) and state["answers"] == len(scenes)
