"""Live frames from a camera, a stream or a video file, keeping ONLY the newest frame.

Sources (`--camera SRC`):
- a device index: `0`, `1`, ...            -> cv2.VideoCapture(index)
- a device path: `/dev/video0`              -> cv2.VideoCapture(path, CAP_V4L2 where available)
- a URL: `rtsp://...`, `http(s)://...`      -> cv2.VideoCapture(url, CAP_FFMPEG)
- a GStreamer pipeline (contains `!`), e.g. `nvarguscamerasrc ! nvvidconv ! video/x-raw,format=BGRx !
  videoconvert ! appsink` (Jetson CSI cameras) -> cv2.VideoCapture(pipeline, CAP_GSTREAMER)
- a video file path (played at its own frame rate; stands in for a camera)

`FrameGrabber` runs one capture thread that overwrites a single slot with each new frame: a slow
consumer never makes a queue grow, it just sees the newest frame (`dropped` counts the frames nobody
took). When a live source stops delivering frames the thread reopens it with exponential backoff and
reports each attempt through `on_notice`; after `max_retries` failed attempts it gives up and
`error` says why. A video file ends with `finished` set (no retries).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vila_edge.errors import MediaError

LIST_HINT = ("list cameras with `v4l2-ctl --list-devices` (or `ls /dev/video*`) and choose one with "
             "--camera N, --camera /dev/videoN, an rtsp:// or http:// URL, or a GStreamer pipeline ending in appsink")


@dataclass(frozen=True)
class Frame:
    seq: int  # 1, 2, 3, ... for every frame read from the source
    image: np.ndarray  # HxWx3 BGR uint8 (OpenCV)
    time: float  # time.monotonic() when it was read


def describe_source(src) -> str:
    s = str(src)
    if s.isdigit():
        return f"camera {s}"
    if "!" in s:
        return f"GStreamer pipeline {s!r}"
    return f"camera source {s!r}"


def is_file_source(src) -> bool:
    s = str(src)
    return not s.isdigit() and "!" not in s and "://" not in s and not s.startswith("/dev/") and Path(s).is_file()


def quiet_opencv() -> None:
    """OpenCV prints WARN lines to stderr when a device cannot be opened; our error line says it all."""
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # very old OpenCV builds
        pass


@contextlib.contextmanager
def silenced_stderr():
    """Native libraries (FFmpeg, GStreamer) print to fd 2 while probing a source; our MediaError line is
    the one message the user should see. Redirects fd 2 to /dev/null for the duration."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real fd (e.g. captured by a test harness)
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def open_capture(src):
    """Open `src` with OpenCV; raise MediaError (one line with how to list/choose cameras) on failure."""
    import cv2

    quiet_opencv()
    s = str(src).strip()
    with silenced_stderr():
        return _open_capture(cv2, s)


def _open_capture(cv2, s: str):
    if s.isdigit():
        cap = cv2.VideoCapture(int(s))
    elif "!" in s:
        cap = cv2.VideoCapture(s, cv2.CAP_GSTREAMER)
    elif "://" in s:
        cap = cv2.VideoCapture(s, cv2.CAP_FFMPEG)
    elif s.startswith("/dev/"):
        if not Path(s).exists():
            raise MediaError(f"{describe_source(s)}: {s} does not exist; {LIST_HINT}")
        cap = cv2.VideoCapture(s, getattr(cv2, "CAP_V4L2", cv2.CAP_ANY))
    else:
        if not Path(s).is_file():
            raise MediaError(f"{describe_source(s)}: not a camera index, device, URL, GStreamer pipeline or video file; "
                             f"{LIST_HINT}")
        cap = cv2.VideoCapture(s)
    if not cap.isOpened():
        cap.release()
        raise MediaError(f"{describe_source(s)}: cannot open it (not connected, busy, or no permission); {LIST_HINT}")
    return cap


class FrameGrabber:
    """Capture thread with a newest-frame slot. Use as a context manager or start()/close()."""

    def __init__(self, src, *, opener: Callable[[object], object] = open_capture, max_retries: int = 5,
                 backoff: float = 0.5, max_backoff: float = 8.0, realtime: bool | None = None,
                 on_notice: Callable[[str], None] | None = None, first_frame_timeout: float = 10.0):
        self.src = src
        self.label = describe_source(src)
        self._opener = opener
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.is_file = is_file_source(src)
        self.realtime = self.is_file if realtime is None else realtime
        self.on_notice = on_notice or (lambda msg: None)
        self.first_frame_timeout = first_frame_timeout
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._taken_seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cap = None
        self.frames_read = 0
        self.dropped = 0  # frames overwritten before anyone took them
        self.retries = 0
        self.error: str | None = None
        self.finished = False
        self.fps = 0.0

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FrameGrabber:
        self._cap = self._opener(self.src)  # raises MediaError: caller prints one line
        try:
            import cv2

            self.fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        except Exception:  # noqa: BLE001 - fakes and odd backends
            self.fps = 0.0
        self._thread = threading.Thread(target=self._run, name="vila-edge-capture", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._cap is not None:
            try:
                self._cap.release()
            except Exception:  # noqa: BLE001
                pass
            self._cap = None

    def __enter__(self) -> FrameGrabber:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return not (self.finished or self.error is not None or self._stop.is_set())

    # ---- consumer side ------------------------------------------------------------------------
    def latest(self) -> Frame | None:
        """The newest frame (marks it taken), or None before the first one."""
        with self._cond:
            if self._frame is not None:
                self._taken_seq = self._frame.seq
            return self._frame

    def read_latest(self):
        """(seq, BGR frame) of the newest frame, (0, None) before the first (serve's frame-source API)."""
        f = self.latest()
        return (0, None) if f is None else (f.seq, f.image)

    def wait_newer(self, after_seq: int = 0, timeout: float | None = None) -> Frame | None:
        """Block until a frame newer than `after_seq` exists (or the source ends / timeout): newest frame."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._frame is None or self._frame.seq <= after_seq) and self.alive:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(timeout=0.2 if left is None else min(left, 0.2))
            if self._frame is not None and self._frame.seq > after_seq:
                self._taken_seq = self._frame.seq
                return self._frame
            return None

    def first_frame(self) -> Frame:
        f = self.wait_newer(0, timeout=self.first_frame_timeout)
        if f is None:
            raise MediaError(self.error or f"{self.label}: opened but delivered no frame within "
                                            f"{self.first_frame_timeout:g} s; {LIST_HINT}")
        return f

    # ---- capture thread -----------------------------------------------------------------------
    def _publish(self, image: np.ndarray) -> None:
        with self._cond:
            if self._frame is not None and self._frame.seq > self._taken_seq:
                self.dropped += 1
            self.frames_read += 1
            self._frame = Frame(self.frames_read, image, time.monotonic())
            self._cond.notify_all()

    def _reopen(self) -> bool:
        delay = self.backoff
        for attempt in range(1, self.max_retries + 1):
            if self._stop.is_set():
                return False
            self.retries += 1
            self.on_notice(f"{self.label}: no frames; reconnecting (attempt {attempt}/{self.max_retries}) "
                           f"in {delay:.1f} s")
            if self._stop.wait(delay):
                return False
            try:
                if self._cap is not None:
                    self._cap.release()
            except Exception:  # noqa: BLE001
                pass
            try:
                self._cap = self._opener(self.src)
            except MediaError:
                delay = min(delay * 2, self.max_backoff)
                continue
            ok, frame = self._cap.read()
            if ok and frame is not None:
                self.on_notice(f"{self.label}: reconnected")
                self._publish(frame)
                return True
            delay = min(delay * 2, self.max_backoff)
        return False

    def _run(self) -> None:
        period = (1.0 / self.fps) if (self.realtime and self.fps > 0) else 0.0
        next_t = time.monotonic()
        try:
            while not self._stop.is_set():
                ok, frame = self._cap.read()
                if not ok or frame is None:
                    if self.is_file:
                        self.finished = True
                        self.on_notice(f"{self.label}: end of video")
                        break
                    if not self._reopen():
                        if not self._stop.is_set():
                            self.error = (f"{self.label}: stopped delivering frames; gave up after "
                                          f"{self.max_retries} reconnection attempts")
                            self.on_notice(self.error)
                        break
                    continue
                self._publish(frame)
                if period:
                    next_t += period
                    delay = next_t - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
                    else:
                        next_t = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - never die silently in a thread
            self.error = f"{self.label}: capture failed ({exc.__class__.__name__}: {exc})"
            self.on_notice(self.error)
        finally:
            with self._cond:
                self._cond.notify_all()


def newest_frames(grabber: FrameGrabber, *, tick: float = 0.25, on_notice: Callable[[str], None] | None = None,
                  quiet_after: float = 10.0) -> Iterator[Frame | None]:
    """Every frame newer than the last one taken, newest first come (frames that arrived while the consumer was
    busy are dropped: the grabber keeps one slot). Yields None every `tick` seconds without a new frame, so a
    consumer can stop; ends when a video file ends; raises MediaError when a live source is gone for good."""
    seq = 0
    idle_since = time.monotonic()
    warned = False
    while True:
        frame = grabber.wait_newer(seq, timeout=tick)
        if frame is not None:
            seq, idle_since, warned = frame.seq, time.monotonic(), False
            yield frame
            continue
        if grabber.error:
            raise MediaError(grabber.error)
        if grabber.finished:
            return
        if not warned and on_notice is not None and time.monotonic() - idle_since > quiet_after:
            on_notice(f"{grabber.label}: no new frame for {quiet_after:g} s; waiting")
            warned = True
        yield None


def file_frames(path) -> Iterator[Frame]:
    """EVERY frame of a video file, in order, as fast as it decodes (benchmarks and tests: a reproducible
    frame sequence, where a FrameGrabber gives the newest frame of a real-time playback)."""
    from vila_edge.media.video import open_video

    cap = open_video(Path(path))
    try:
        seq = 0
        while True:
            ok, image = cap.read()
            if not ok or image is None:
                return
            seq += 1
            yield Frame(seq, image, time.monotonic())
    finally:
        cap.release()
