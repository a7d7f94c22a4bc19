"""The live camera page of `vila-edge serve --camera`: a video file (written with OpenCV's VideoWriter) stands in
for the camera; the engine is the REAL tiny NVILA engine.

The headless-Chromium test needs the Debian `chromium` package and skips without it. Set
VILA_EDGE_SAVE_SCREENSHOT=1 to also copy its screenshot to benchmarks/results/serve_camera_page.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
cv2 = pytest.importorskip("cv2")

from conftest_runtime import runtime_engine  # noqa: E402,F401

from vila_edge.serve import BackgroundServer  # noqa: E402
from vila_edge.serve.app import ServeSettings, create_app  # noqa: E402
from vila_edge.serve.engine import PipelineEngine  # noqa: E402
from vila_edge.serve.live import open_camera  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
W, H = 320, 240
SQUARE = (110, 70, 210, 170)  # x0, y0, x1, y1 of the red square in the last frame
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


def write_video(path: Path, frames: int = 12, fps: int = 12) -> Path:
    """A short clip: a red square sliding into place on a blue background, a frame counter in the corner."""
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (W, H))
    assert out.isOpened()
    for i in range(frames):
        f = np.full((H, W, 3), (140, 70, 20), np.uint8)  # BGR: dark blue
        dx = (frames - 1 - i) * 6
        x0, y0, x1, y1 = SQUARE
        cv2.rectangle(f, (x0 - dx, y0), (x1 - dx, y1), (30, 30, 230), -1)  # BGR: red
        cv2.putText(f, f"frame {i + 1}", (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        out.write(f)
    out.release()
    return path


@pytest.fixture(scope="module")
def live_server(runtime_engine, tmp_path_factory):  # noqa: F811
    engine = PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")
    video = write_video(tmp_path_factory.mktemp("camera") / "camera.avi")
    cam = open_camera(str(video))
    # dedup off: the clip plays once in a second; these tests want captions of its last frame again and again
    settings = ServeSettings(camera_prompt="What is in the frame?", camera_interval=0.2, camera_max_tokens=12,
                             camera_dedup_threshold=0)
    with BackgroundServer(create_app(engine, settings, camera=cam)) as srv:
        yield srv


def read_mjpeg_frames(url: str, n: int, timeout: float = 10.0) -> list[bytes]:
    frames = []
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200
        ctype = r.headers["content-type"]
        assert ctype.startswith("multipart/x-mixed-replace")
        boundary = ctype.split("boundary=")[1].encode()
        buf = b""
        for piece in r.iter_bytes():
            buf += piece
            while True:
                m = re.search(rb"--" + boundary + rb"\r\nContent-Type: image/jpeg\r\nContent-Length: (\d+)\r\n\r\n", buf)
                if not m or len(buf) < m.end() + int(m.group(1)) + 2:
                    break
                size = int(m.group(1))
                frames.append(buf[m.end():m.end() + size])
                buf = buf[m.end() + size + 2:]
                if len(frames) >= n:
                    return frames
    return frames


def read_captions(url: str, until_done: int, timeout: float = 30.0) -> list[dict]:
    events = []
    deadline = time.monotonic() + timeout
    with httpx.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if sum(1 for e in events if e.get("done")) >= until_done:
                    break
            if time.monotonic() > deadline:
                break
    return events


def test_page_and_static_files(live_server):
    r = httpx.get(live_server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in r.text and "static/style.css" in r.text
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        s = httpx.get(f"{live_server.url}/static/{name}")
        assert s.status_code == 200 and s.headers["content-type"].startswith(ctype) and len(s.content) > 200
        assert "http://" not in s.text and "https://" not in s.text  # no CDN, nothing remote
    assert httpx.get(live_server.url + "/static/../cli.py").status_code == 404
    assert httpx.get(live_server.url + "/static/secret.txt").status_code == 404


def test_mjpeg_stream_shows_the_newest_frame(live_server):
    frames = read_mjpeg_frames(live_server.url + "/stream.mjpg", 2)
    assert len(frames) >= 1
    img = cv2.imdecode(np.frombuffer(frames[-1], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3)
    state = httpx.get(live_server.url + "/camera/state").json()
    assert state["frame_shape"] == [H, W, 3] and state["frame_seq"] >= 1


def test_captions_stream_answers_about_the_frame(live_server):
    events = read_captions(live_server.url + "/captions", until_done=2)
    done = [e for e in events if e.get("done")]
    assert len(done) >= 2, events[-3:]
    assert all("error" not in e for e in done), done
    assert done[-1]["id"] > done[0]["id"] and done[-1]["finish_reason"] in ("stop", "length")
    assert any(e["text"] for e in done)
    partial = [e for e in events if not e.get("done") and not e.get("waiting")]
    assert partial, "captions are streamed token by token"
    state = httpx.get(live_server.url + "/camera/state").json()
    assert state["captions_done"] >= 2 and state["model"] == "tiny-nvila"


class ScriptedFrames:
    """A frame source (`read_latest()`, the interface of vila_edge.serve.live) playing a fixed list of frames, one
    per read, then holding the last one: `scenes` scenes (a box moving right), 5 reads each (seq grows with each
    read)."""

    def __init__(self, scenes: int = 2):
        self.scenes = []
        for k in range(scenes):
            f = np.full((H, W, 3), 40, np.uint8)
            cv2.rectangle(f, (20 + 60 * k, 40), (100 + 60 * k, 200), (0, 0, 255), -1)
            self.scenes.append(f)
        self.frames = [f for f in self.scenes for _ in range(5)]
        self.seq = 0

    def read_latest(self):
        self.seq = min(self.seq + 1, len(self.frames))
        return self.seq, self.frames[self.seq - 1]


def test_camera_page_captions_only_frames_that_changed(runtime_engine):  # noqa: F811
    engine = PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")
    settings = ServeSettings(camera_prompt="What changed?", camera_interval=0.0, camera_max_tokens=2,
                             camera_dedup_threshold=2.0)
    with BackgroundServer(create_app(engine, settings, camera=ScriptedFrames())) as srv:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = httpx.get(srv.url + "/camera/state").json()
            if state["frame_seq"] == 10 and state["captions_done"] >= 2:
                break
            time.sleep(0.1)
        time.sleep(0.5)  # more loop turns: the held last frame must not be captioned again
        state = httpx.get(srv.url + "/camera/state").json()
        metrics = httpx.get(srv.url + "/metrics").text
    assert state["captions_done"] == 2 and state["dedup_threshold"] == 2.0
    f = state["frames"]
    assert f["encoded"] == 2 and f["seen"] == f["encoded"] + f["skipped"] and f["skipped"] >= 1
    assert "vila_edge_camera_frames_encoded_total 2" in metrics
    assert f'vila_edge_camera_frames_skipped_total {f["skipped"]}' in metrics
    assert f'vila_edge_camera_frames_seen_total {f["seen"]}' in metrics


def test_camera_page_encodes_the_next_frame_while_a_caption_decodes(runtime_engine):  # noqa: F811
    """Pipelining: each caption after the first finds its frame already in the vision cache (encoded beside the
    previous caption's decode), and says what a cold run on that frame says."""
    from vila_edge.media.image import bgr_to_pil

    engine = PipelineEngine.load(runtime_engine("nvila"), model_id="tiny-nvila")
    if getattr(engine.pipeline, "vision_cache", None) is None:
        pytest.skip("the runtime has no vision cache to encode the next frame into")
    source = ScriptedFrames(scenes=3)
    settings = ServeSettings(camera_prompt="What changed?", camera_interval=0.0, camera_max_tokens=3,
                             camera_dedup_threshold=2.0)
    app = create_app(engine, settings, camera=source)
    with BackgroundServer(app) as srv:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            state = httpx.get(srv.url + "/camera/state").json()
            if state["frame_seq"] == len(source.frames) and state["captions_done"] >= 3:
                break
            time.sleep(0.1)
        captions = read_captions(srv.url + "/captions", until_done=1)
    assert state["pipelined"] and state["captions_done"] == 3 and state["frames"]["encoded"] == 3
    assert state["prefetched"] == 2  # the first caption's frame had nothing to overlap with
    cache = engine.pipeline.vision_cache.stats()
    assert cache["hits"] >= 2
    last = [e for e in captions if e.get("done")][-1]
    cold = engine.pipeline.generate("What changed?", images=[bgr_to_pil(source.scenes[-1])], max_new_tokens=3)
    assert last["text"] == cold.text
    engine.pipeline.close()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _run_chromium(args: list[str], user_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install chromium)")
def test_page_in_headless_chromium(live_server, tmp_path):
    # wait until a caption exists, so the page shows one as soon as it connects
    read_captions(live_server.url + "/captions", until_done=1)
    # The MJPEG <img> never finishes loading, so --virtual-time-budget would wait forever: --timeout stops
    # the page load after N ms and the screenshot / DOM is taken then.
    shot = tmp_path / "page.png"
    r = _run_chromium([f"--screenshot={shot}", "--window-size=1000,560", "--timeout=3000", live_server.url + "/"],
                      tmp_path / "profile1")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    page = cv2.imread(str(shot))
    assert page is not None and page.shape[:2] == (560, 1000)
    # the frame: the red square of the video is on the page (BGR: low blue, low green, high red)
    red = (page[:, :, 2] > 170) & (page[:, :, 1] < 90) & (page[:, :, 0] < 90)
    assert red.sum() > 5000, f"no video frame on the page ({int(red.sum())} red pixels)"
    # the caption: the DOM after the scripts ran holds a finished caption
    dom = _run_chromium(["--dump-dom", "--window-size=1000,560", "--timeout=3000", live_server.url + "/"],
                        tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r'<p id="caption" class="caption[^"]*"[^>]*>(.*?)</p>', dom.stdout, re.S)
    assert m and m.group(1).strip() and "waiting for the first caption" not in m.group(1), dom.stdout[-3000:]
    assert re.search(r"caption #\d+ of frame \d+", dom.stdout)
    assert 'class="status live"' in dom.stdout
    # the caption panel is not blank in the screenshot: light text pixels right of the frame
    panel = page[60:400, 620:980]
    assert (panel.max(axis=2) > 200).sum() > 300, "no caption text drawn"
    if os.environ.get("VILA_EDGE_SAVE_SCREENSHOT") == "1":
        dest = ROOT / "benchmarks" / "results" / "serve_camera_page.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, dest)
