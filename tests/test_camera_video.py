"""Camera capture (newest-frame policy, reconnect/backoff) and video frame sampling.

There is no camera on this machine: live capture is exercised through a real OpenCV capture of a video
file, and a source that fails mid-stream is a FAKE capture object (documented below).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from vila_edge.errors import MediaError  # noqa: E402
from vila_edge.media.camera import FrameGrabber, open_capture  # noqa: E402
from vila_edge.media.video import load_video, nvila_indices, v15_indices  # noqa: E402


def write_video(path, n=20, fps=10, size=(64, 48)):
    """Frame i is a flat grey of level 10*i (readable back through MJPG compression)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), (10 * i) % 256, np.uint8))
    w.release()
    return path


def frame_index(img) -> int:
    return int(round(float(np.asarray(img, dtype=np.float32).mean()) / 10))


# ---- video sampling -------------------------------------------------------------------------


def test_index_rules():
    assert v15_indices(20, 8) == [0, 2, 5, 8, 10, 13, 16, 19]  # truncation
    assert nvila_indices(20, 8) == [0, 3, 5, 8, 11, 14, 16, 19]  # rounding
    assert v15_indices(5, 8) == [0, 1, 2, 3, 4]  # fewer frames: all of them
    assert nvila_indices(5, 8) == [0, 1, 1, 2, 2, 3, 3, 4]  # duplicates reused
    assert nvila_indices(20, 8, fps=2, video_fps=10) == [0, 5, 10, 15]  # arange(0, 2 s, 0.5 s)


@pytest.mark.parametrize("generation,want", [("v15", [0, 2, 5, 8, 10, 13, 16, 19]),
                                             ("nvila", [0, 3, 5, 8, 11, 14, 16, 19])])
def test_load_video_reads_the_sampled_frames(tmp_path, generation, want):
    video = write_video(tmp_path / "v.avi")
    cfg = SimpleNamespace(generation=generation, num_video_frames=8, video_fps=0.0)
    frames = load_video(video, cfg)
    assert [frame_index(f) for f in frames] == want
    assert frames[0].mode == "RGB"


def test_load_video_fps_rule_and_short_videos(tmp_path):
    video = write_video(tmp_path / "v.avi", n=20, fps=10)
    frames = load_video(video, SimpleNamespace(generation="nvila", num_video_frames=8, video_fps=2.0))
    assert [frame_index(f) for f in frames] == [0, 5, 10, 15]
    short = write_video(tmp_path / "s.avi", n=5)
    assert len(load_video(short, SimpleNamespace(generation="v15", num_video_frames=8, video_fps=0.0))) == 5
    assert [frame_index(f) for f in load_video(short, SimpleNamespace(generation="nvila", num_video_frames=8,
                                                                       video_fps=0.0))] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_unreadable_video_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    cfg = SimpleNamespace(generation="nvila", num_video_frames=8, video_fps=0.0)
    with pytest.raises(MediaError, match="bad.mp4: cannot open video"):
        load_video(bad, cfg)
    with pytest.raises(MediaError, match="not found"):
        load_video(tmp_path / "missing.mp4", cfg)


# ---- capture --------------------------------------------------------------------------------


def test_video_file_source_newest_frame_under_slow_consumer(tmp_path):
    """Real OpenCV capture of a file played at its frame rate (50 fps); the consumer takes one frame every
    0.15 s. It must always get the newest frame (sequence numbers jump), and nothing queues up."""
    video = write_video(tmp_path / "cam.avi", n=60, fps=50)
    notes = []
    with FrameGrabber(str(video), on_notice=notes.append) as g:
        first = g.first_frame()
        seen = [first.seq]
        while g.alive:
            time.sleep(0.15)
            f = g.wait_newer(seen[-1], timeout=1.0)
            if f is None:
                break
            assert f.seq >= g.frames_read - 1  # the newest (at 50 fps at most one more can land meanwhile)
            seen.append(f.seq)
        assert g.finished and g.error is None
        assert any("end of video" in n for n in notes)
        assert g.frames_read == 60
    gaps = np.diff(seen)
    assert (gaps >= 1).all() and gaps.max() > 2  # frames were skipped, not queued
    assert g.dropped > 0 and g.dropped + len(seen) <= 60
    assert not hasattr(g, "_queue")  # one slot


class FakeCapture:
    """FAKE OpenCV capture (no camera here): yields `frames` frames, then read() fails forever."""

    def __init__(self, frames: int, fps: float = 0.0):
        self.left = frames
        self.fps = fps
        self.released = False

    def isOpened(self):  # noqa: N802 - OpenCV's name
        return True

    def get(self, prop):
        return self.fps

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        time.sleep(0.005)
        return True, np.zeros((8, 8, 3), np.uint8)

    def release(self):
        self.released = True


def test_source_that_stops_delivering_retries_with_backoff_then_gives_up():
    opened = []

    def opener(src):
        cap = FakeCapture(3 if not opened else 0)  # first capture: 3 frames; reconnections: nothing
        opened.append(cap)
        return cap

    notes = []
    g = FrameGrabber("rtsp://fake/stream", opener=opener, max_retries=3, backoff=0.02, on_notice=notes.append)
    t0 = time.monotonic()
    with g:
        assert g.first_frame().seq >= 1
        deadline = time.monotonic() + 5
        while g.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        assert g.wait_newer(g.frames_read, timeout=0.1) is None
    assert g.error is not None and "gave up after 3" in g.error
    assert [n for n in notes if "reconnecting" in n] == [
        f"camera source 'rtsp://fake/stream': no frames; reconnecting (attempt {k}/3) in {d:.1f} s"
        for k, d in ((1, 0.02), (2, 0.04), (3, 0.08))]
    assert time.monotonic() - t0 >= 0.14  # 0.02 + 0.04 + 0.08 of backoff
    assert len(opened) == 4 and all(c.released for c in opened[:-1])


def test_source_that_comes_back_is_reconnected():
    opened = []

    def opener(src):
        opened.append(src)
        return FakeCapture(2 if len(opened) == 1 else 1000)

    notes = []
    with FrameGrabber("0", opener=opener, backoff=0.01, on_notice=notes.append) as g:
        g.first_frame()
        f = g.wait_newer(5, timeout=3)
        assert f is not None and f.seq > 5
    assert any("reconnected" in n for n in notes) and g.error is None


@pytest.mark.parametrize("src", ["7", "/dev/video99", "no-such-file.mp4"])
def test_missing_camera_is_one_line_naming_the_source(src):
    with pytest.raises(MediaError) as err:
        open_capture(src)
    msg = str(err.value)
    assert "\n" not in msg and src.split("/")[-1] in msg and "--camera" in msg
