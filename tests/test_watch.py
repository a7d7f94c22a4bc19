"""`vila-edge watch` (vila_edge/watch.py): structured answers per new frame, an event when the answer changes.

Videos are written here with OpenCV (MJPG in AVI) from known images. The demo model test uses demo scenes
whose colour the demo model names correctly (checked when the seeds were chosen; the test re-checks each
scene before the watch run, so a model change shows up as that, not as a wrong event list); the tiny random
engine tests check the mechanics (dedup, events, webhook, errors), whatever its answers are.
"""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

pytest.importorskip("llguidance")
cv2 = pytest.importorskip("cv2")

from conftest_runtime import runtime_engine  # noqa: E402,F401
from test_demo import demo_engines, needs_weights  # noqa: E402,F401

from vila_edge.errors import VilaEdgeError  # noqa: E402
from vila_edge.generate import SamplingParams  # noqa: E402
from vila_edge.media.frame_dedup import FrameDedup  # noqa: E402
from vila_edge.watch import run_watch  # noqa: E402

FPS = 10


def write_video(path, images_rgb, frames_each: int) -> None:
    h, w = images_rgb[0].shape[:2]
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    assert out.isOpened()
    for img in images_rgb:
        for _ in range(frames_each):
            out.write(np.ascontiguousarray(img[:, :, ::-1]))
    out.release()


def watch_lines(pipe, src, question, schema, **kw):
    out, err = io.StringIO(), io.StringIO()
    stats = run_watch(pipe, str(src), question, SamplingParams(max_new_tokens=48, json_schema=schema), out=out,
                      err=err, **kw)
    return [json.loads(line) for line in out.getvalue().splitlines()], stats, err.getvalue()


# ---- the demo model: events exactly where the colour changes ------------------------------------------------------

# demo scene seeds (data.make_scene(random.Random(seed), "single")) and their colours: two reds, two blues, a green,
# a yellow. Consecutive scenes of one colour are different images with the same answer: no event between them.
SCENES = [(1, "red"), (10, "red"), (2, "blue"), (5, "blue"), (4, "green"), (0, "yellow")]
FRAMES_EACH = 8


@pytest.mark.slow
@needs_weights
def test_watch_demo_video_emits_exactly_the_colour_changes(demo_engines, tmp_path):  # noqa: F811
    from PIL import Image

    from vila_edge.demo import data as D
    from vila_edge.demo.assemble import CHECKPOINT_NAME
    from vila_edge.runtime import load

    scenes = [D.make_scene(random.Random(seed), "single") for seed, _ in SCENES]
    assert [s.colour for s in scenes] == [c for _, c in SCENES]
    schema = {"type": "object", "properties": {"answer": {"enum": list(D.COLOURS)}}, "required": ["answer"],
              "additionalProperties": False}
    question = "What colour is the shape?"
    pipe = load(demo_engines / CHECKPOINT_NAME)
    try:
        for s in scenes:  # the premise: the model names each scene's colour
            r = pipe.generate(question, images=[Image.fromarray(s.image)], max_new_tokens=20, json_schema=schema)
            assert json.loads(r.text) == {"answer": s.colour}
        video = tmp_path / "colours.avi"
        write_video(video, [s.image for s in scenes], FRAMES_EACH)
        events, stats, _ = watch_lines(pipe, video, question, schema)
    finally:
        pipe.close()
    expected = [(0, "red", None), (2 * FRAMES_EACH, "blue", "red"), (4 * FRAMES_EACH, "green", "blue"),
                (5 * FRAMES_EACH, "yellow", "green")]
    got = [(e["frame"], e["answer"]["answer"], (e["previous"] or {}).get("answer")) for e in events]
    assert got == expected
    assert [e["time_s"] for e in events] == [f / FPS for f, _, _ in expected]
    # one question per scene: the static frames in between were skipped as unchanged
    assert (stats.frames, stats.asked, stats.skipped, stats.events) == (6 * FRAMES_EACH, 6, 6 * FRAMES_EACH - 6, 4)


# ---- mechanics on the tiny engine ----------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"person": {"type": "boolean"}}, "required": ["person"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_pipe(runtime_engine):  # noqa: F811
    from vila_edge.runtime import load

    pipe = load(runtime_engine("nvila"), threads=1)
    yield pipe
    pipe.close()


def _frames(n_images: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(n_images)]


def test_static_video_is_one_question_and_one_event(tiny_pipe, tmp_path):
    video = tmp_path / "static.avi"
    write_video(video, _frames(1), 12)
    events, stats, err = watch_lines(tiny_pipe, video, "Is there a person?", SCHEMA)
    assert len(events) == 1 and events[0]["frame"] == 0 and events[0]["previous"] is None
    assert isinstance(events[0]["answer"]["person"], bool)
    assert (stats.frames, stats.asked, stats.skipped) == (12, 1, 11)
    assert "12 frames, 1 asked, 11 unchanged" in err
    # --min-change 0 asks about every frame; the same frame gets the same (greedy) answer: still one event
    events0, stats0, _ = watch_lines(tiny_pipe, video, "Is there a person?", SCHEMA, min_change=0)
    assert events0 == events and stats0.asked == 12
    # --every 5: frames 0, 5, 10
    _, stats5, _ = watch_lines(tiny_pipe, video, "Is there a person?", SCHEMA, every=5, min_change=0)
    assert stats5.frames == 3


def test_events_are_answer_changes(tiny_pipe, tmp_path):
    """Whatever the random model answers, events are exactly the frames where its answer differs from the last."""
    from PIL import Image

    images = _frames(5, seed=3)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 3}},
              "required": ["n"], "additionalProperties": False}
    video = tmp_path / "five.avi"
    write_video(video, images, 3)
    from vila_edge.media.video import iter_frames

    decoded = [img for i, _, img in iter_frames(video) if i % 3 == 0]  # what watch sees (after MJPG)
    answers = [json.loads(tiny_pipe.generate("How many?", images=[Image.fromarray(img[:, :, ::-1])],
                                             max_new_tokens=48, json_schema=schema).text) for img in decoded]
    expected = [(3 * k, a) for k, a in enumerate(answers) if k == 0 or a != answers[k - 1]]
    events, stats, _ = watch_lines(tiny_pipe, video, "How many?", schema)
    assert [(e["frame"], e["answer"]) for e in events] == expected
    assert stats.asked == 5


def test_watch_dedup_threshold():
    """watch skips frames through the live captioner's FrameDedup: within 2 grey levels is the same frame."""
    a = np.full((40, 40, 3), 100, np.uint8)
    dedup = FrameDedup(2.0)
    assert dedup.is_new(a)
    assert not dedup.is_new(a + 1)
    assert dedup.is_new(a + 3)


class _Collector(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        n = int(self.headers["Content-Length"])
        _Collector.received.append(json.loads(self.rfile.read(n)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


def test_webhook_gets_each_event_and_only_allowed_addresses(tiny_pipe, tmp_path):
    pytest.importorskip("httpcore")
    video = tmp_path / "two.avi"
    write_video(video, _frames(2, seed=5), 2)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        _Collector.received.clear()
        url = f"http://127.0.0.1:{srv.server_address[1]}/hook"
        events, _, err = watch_lines(tiny_pipe, video, "Is there a person?", SCHEMA, webhook=url)
        assert events and _Collector.received == events
        assert "webhook" not in err
    finally:
        srv.shutdown()
        srv.server_close()
    # public and private addresses are refused at connect time (no connection is made), unless allowed
    for url in ("http://93.184.216.34/hook", "http://10.1.2.3:9/hook"):
        events, _, err = watch_lines(tiny_pipe, video, "Is there a person?", SCHEMA, webhook=url)
        assert events and err.count("address not allowed") == len(events)
    with pytest.raises(VilaEdgeError, match="--webhook"):
        watch_lines(tiny_pipe, video, "q", SCHEMA, webhook="file:///etc/passwd")


def test_watch_refusals(tiny_pipe, tmp_path):
    video = tmp_path / "v.avi"
    write_video(video, _frames(1), 2)
    with pytest.raises(VilaEdgeError, match="choose one"):
        watch_lines(tiny_pipe, video, "q", SCHEMA, every=2, interval=1.0)
    with pytest.raises(VilaEdgeError, match="--every applies to video files"):
        watch_lines(tiny_pipe, "0", "q", SCHEMA, every=2)
    with pytest.raises(VilaEdgeError, match="needs a JSON schema"):
        list(__import__("vila_edge.watch", fromlist=["watch"]).watch(tiny_pipe, [], "q", SamplingParams()))


def test_cli_watch(runtime_engine, tmp_path):  # noqa: F811
    video = tmp_path / "v.avi"
    write_video(video, _frames(1), 3)
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    cmd = [sys.executable, "-m", "vila_edge.cli", "watch", str(runtime_engine("nvila")), str(video),
           "--ask", "Is there a person?", "--threads", "1"]
    r = subprocess.run(cmd + ["--schema", str(schema)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 1 and lines[0]["event"] == "change" and lines[0]["frame"] == 0
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"person": {"type": "bool"}}}')
    r = subprocess.run(cmd + ["--schema", str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(bad) in r.stderr
    r = subprocess.run(cmd + ["--schema", str(schema), "--allow-webhook-network", "nonsense"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and "--allow-webhook-network 'nonsense'" in r.stderr
