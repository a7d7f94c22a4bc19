"""Frame dedup and the pipelined live captioner (vila_edge.media.frame_dedup, vila_edge.captioner).

Real OpenCV (a generated MJPG video read back frame by frame), real ONNX Runtime engines of the tiny checkpoints.
The only fake is a camera that disconnects (no camera hardware here): `FakeCapture` of test_camera_video.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)
from test_camera_video import FakeCapture

from vila_edge.errors import MediaError
from vila_edge.media.frame_dedup import FrameDedup, frame_difference, thumbnail

cv2 = pytest.importorskip("cv2")

W, H = 160, 96
# Static stretches with known change points (1-based frame numbers where the scene changes). Between them the
# frames are byte-identical, except SMALL_CHANGE, where a 2x2 dot appears: far below the threshold.
CHANGES = (1, 9, 17, 30, 38)
SMALL_CHANGE = 22
N_FRAMES = 45


def scene(k: int) -> np.ndarray:
    img = np.full((H, W, 3), 30 + 40 * k, np.uint8)
    cv2.rectangle(img, (10 + 25 * k, 20), (50 + 25 * k, 70), (0, 0, 250 - 40 * k), -1)
    return img


def frame_image(i: int) -> np.ndarray:
    k = sum(1 for c in CHANGES if c <= i) - 1
    img = scene(k)
    if i >= SMALL_CHANGE and k == 2:
        img[5:7, 5:7] = 255
    return img


@pytest.fixture(scope="module")
def change_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("live") / "changes.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    for i in range(1, N_FRAMES + 1):
        w.write(frame_image(i))
    w.release()
    return path


# ---- dedup -------------------------------------------------------------------------------------------------


def test_dedup_encodes_exactly_the_change_points_of_a_video(change_video):
    from vila_edge.media.camera import file_frames

    dedup = FrameDedup(2.0)
    encoded = [f.seq for f in file_frames(change_video) if dedup.is_new(f.image)]
    assert encoded == list(CHANGES)
    assert dedup.counts.as_dict() == {"seen": N_FRAMES, "encoded": len(CHANGES), "skipped": N_FRAMES - len(CHANGES)}


def test_dedup_off_encodes_every_frame(change_video):
    from vila_edge.media.camera import file_frames

    dedup = FrameDedup(0)
    assert sum(dedup.is_new(f.image) for f in file_frames(change_video)) == N_FRAMES
    assert dedup.counts.skipped == 0 and not dedup.enabled


def test_dedup_score_is_grey_levels_and_compares_with_the_last_encoded_frame():
    flat = [np.full((48, 64, 3), v, np.uint8) for v in range(100, 110)]
    dedup = FrameDedup(2.0)
    # a drift of 1 grey level a frame: every frame differs from the previous by 1 (< 2), but differences add up
    # against the last ENCODED frame, so every second frame is encoded
    assert [dedup.is_new(f) for f in flat] == [True, False] * 5
    assert dedup.last_score == pytest.approx(1.0)
    assert frame_difference(thumbnail(flat[0]), thumbnail(flat[3])) == pytest.approx(3.0)
    assert frame_difference(thumbnail(np.zeros((4, 4, 3), np.uint8)), thumbnail(np.full((4, 4), 255, np.uint8))) \
        == pytest.approx(255.0)


def test_dedup_threshold_boundary_is_inclusive():
    a, b = np.full((36, 64, 3), 50, np.uint8), np.full((36, 64, 3), 53, np.uint8)
    assert FrameDedup(3.0).is_new(a) and not _second(FrameDedup(3.01), a, b) and _second(FrameDedup(3.0), a, b)


def _second(d: FrameDedup, a, b) -> bool:
    d.is_new(a)
    return d.is_new(b)


@pytest.mark.parametrize("bad", [-1, 256, float("nan")])
def test_bad_threshold_is_one_line(bad):
    with pytest.raises(MediaError, match="--dedup-threshold"):
        FrameDedup(bad)


def test_bad_frame_is_one_line():
    with pytest.raises(MediaError, match="uint8"):
        FrameDedup(1).is_new(np.zeros((4, 4, 3), np.float32))


# ---- the captioner -----------------------------------------------------------------------------------------


def _run(pipe, frames, *, pipelined, threshold=2.0, tokens=6):
    from vila_edge.captioner import Captioner
    from vila_edge.generate import SamplingParams

    cap = Captioner(pipe, "Describe the picture.", params=SamplingParams(max_new_tokens=tokens),
                    dedup=FrameDedup(threshold), pipelined=pipelined)
    out = []
    for c in cap.captions(frames):
        text = "".join(c.stream)
        out.append((c.frame.seq, text, list(c.stream.result.token_ids)))
    return out, cap.stats()


@pytest.mark.parametrize("family", ["vila1.5", "nvila-lite"])
def test_pipelined_captions_equal_sequential_ones(runtime_engine, change_video, family):  # noqa: F811
    import vila_edge
    from vila_edge.media.camera import file_frames

    pipe = vila_edge.load(runtime_engine(family), device="cpu")
    try:
        seq, s_stats = _run(pipe, file_frames(change_video), pipelined=False)
        par, p_stats = _run(pipe, file_frames(change_video), pipelined=True)
        off, _ = _run(pipe, file_frames(change_video), pipelined=True, threshold=0)
    finally:
        pipe.close()
    assert [s for s, _, _ in seq] == list(CHANGES)
    assert par == seq
    assert all(ids for _, _, ids in seq)
    # the captions of the change points are those of every frame's captions at those frames (dedup changes
    # which frames are asked about, never an answer)
    assert [x for x in off if x[0] in CHANGES] == seq
    assert len({t for _, t, _ in off}) > 1  # the scenes are told apart: a test that can fail
    for st in (s_stats, p_stats):
        assert (st.frames_seen, st.frames_encoded, st.frames_skipped, st.captions) == (
            N_FRAMES, len(CHANGES), N_FRAMES - len(CHANGES), len(CHANGES))
    assert p_stats.pipelined and not s_stats.pipelined
    assert not [t for t in threading.enumerate() if t.name == "vila-edge-vision"]


def test_camera_that_disconnects_ends_the_captioner_with_its_error(runtime_engine):  # noqa: F811
    """FAKE camera (no hardware here): 40 frames, then it disconnects for good."""
    import vila_edge
    from vila_edge.captioner import Captioner
    from vila_edge.generate import SamplingParams
    from vila_edge.media.camera import FrameGrabber, newest_frames

    opened = []

    def opener(src):
        opened.append(src)
        return FakeCapture(40 if len(opened) == 1 else 0)

    pipe = vila_edge.load(runtime_engine("vila1.5"), device="cpu")
    grabber = FrameGrabber("rtsp://fake/cam", opener=opener, max_retries=1, backoff=0.01).start()
    cap = Captioner(pipe, "Describe.", params=SamplingParams(max_new_tokens=2), dedup=FrameDedup(0), pipelined=True)
    got = []
    try:
        with pytest.raises(MediaError, match="gave up after 1"):
            for c in cap.captions(newest_frames(grabber)):
                got.append("".join(c.stream))
    finally:
        grabber.close()
        pipe.close()
    assert got  # frames before the disconnect were captioned
    assert cap.stats().captions == len(got)
    assert not [t for t in threading.enumerate() if t.name == "vila-edge-vision"]


def test_consumer_that_stops_early_stops_the_worker(runtime_engine, change_video):  # noqa: F811
    """What Ctrl-C does in `chat`: the exception leaves the loop mid-answer; the worker thread ends."""
    import vila_edge
    from vila_edge.captioner import Captioner
    from vila_edge.generate import SamplingParams
    from vila_edge.media.camera import file_frames

    pipe = vila_edge.load(runtime_engine("vila1.5"), device="cpu")
    cap = Captioner(pipe, "Describe.", params=SamplingParams(max_new_tokens=8), dedup=FrameDedup(0), pipelined=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            for c in cap.captions(file_frames(change_video)):
                for _ in c.stream:
                    if c.frame.seq == 3:
                        raise KeyboardInterrupt
    finally:
        pipe.close()
    st = cap.stats()
    assert st.captions == 3 and st.frames_encoded in (3, 4)  # the worker is never more than one frame ahead
    assert not [t for t in threading.enumerate() if t.name == "vila-edge-vision"]


def test_chat_live_cli_prints_the_counts_and_stops_on_ctrl_c(runtime_engine, tmp_path):  # noqa: F811
    """`vila-edge chat --camera VIDEO --interval 0`: a real SIGINT after the first answer ends it cleanly."""
    path = tmp_path / "long.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (W, H))
    for i in range(600):  # 60 s at 10 fps: still running when the signal comes
        w.write(scene((i // 20) % 5))
    w.release()
    cmd = [sys.executable, "-c", "from vila_edge.cli import main; main()", "chat", str(runtime_engine("vila1.5")),
           "--camera", str(path), "--interval", "0", "--prompt", "What now?", "--max-new-tokens", "3",
           "--dedup-threshold", "2"]
    # a test run started in the background (nohup, `cmd &`) ignores SIGINT and its children inherit that:
    # give the CLI the default disposition, as a terminal does
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        first = p.stdout.readline()
        assert first.startswith("[frame "), first + p.stderr.read()
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "note: stopped" in err and "Traceback" not in err
    summary = [line for line in err.splitlines() if "frames seen" in line]
    assert len(summary) == 1 and "encoded" in summary[0] and "skipped as unchanged" in summary[0]


class _InterruptedStream:
    """An answer stream that gets Ctrl-C after its first piece (the signal's timing is what the CLI test cannot
    control: this pins down both places it may land)."""

    def __init__(self):
        self.closed, self.result = False, None

    def __iter__(self):
        yield "a red"
        raise KeyboardInterrupt

    def close(self):
        self.closed = True


def test_ctrl_c_during_a_live_caption_ends_the_loop_but_only_the_answer_in_a_conversation():
    import io

    from vila_edge.chat import Console, _stream_answer

    out = io.StringIO()
    s = _InterruptedStream()
    with pytest.raises(KeyboardInterrupt):
        _stream_answer(s, Console(out, io.StringIO()), interrupt_ends_all=True)
    assert s.closed and out.getvalue() == "a red [stopped]\n"
    s, out = _InterruptedStream(), io.StringIO()
    assert _stream_answer(s, Console(out, io.StringIO())) is None  # the conversation goes on
    assert s.closed and out.getvalue() == "a red [stopped]\n"
