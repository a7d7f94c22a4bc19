"""The live captioner: frames in, one fresh answer per new frame out, with frame dedup and pipelining.

    frames (camera / video file) -> FrameDedup -> vision (Pipeline.encode_message) -> LLM (Conversation.ask)

- **Dedup** (`vila_edge.media.frame_dedup.FrameDedup`): a frame that differs from the last encoded one by less
  than the threshold (grey levels of a 64x36 thumbnail) is skipped: nothing changed, nothing new to say.
- **Pacing**: a frame is picked no sooner than `interval` seconds after the previous picked one (0: back to back).
- **Pipelining** (`pipelined=True`): a worker thread picks and encodes the NEXT frame while the caller streams
  the current answer (the LLM decode). ONNX Runtime releases the GIL inside `session.run`, so both sessions run
  at once and captions/s approaches 1 / max(vision, LLM) instead of 1 / (vision + LLM). The worker stays exactly
  one frame ahead (it picks a frame only once the previous encoded one was taken), so a caption is never about a
  frame older than one caption period. The worker touches only the vision engine, the caller only the LLM.

Both modes pick frames with the same code, so on a source that yields every frame (a video file read in full)
they caption the same frames and, with greedy decoding, give the same answers (tests/test_captioner.py).

    cap = Captioner(pipe, "Describe what you see.", dedup=FrameDedup(2.0), pipelined=True)
    for c in cap.captions(newest_frames(grabber)):
        print(c.frame.seq, "".join(c.stream))
    cap.stats()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from vila_edge.generate import SamplingParams
from vila_edge.media.camera import Frame
from vila_edge.media.frame_dedup import FrameDedup


@dataclass
class Caption:
    frame: Frame
    stream: object  # vila_edge.runtime.TextStream: iterate it for the answer's text; .result once exhausted


@dataclass
class CaptionerStats:
    frames_seen: int = 0
    frames_encoded: int = 0
    frames_skipped: int = 0
    captions: int = 0
    vision_s: float = 0.0  # preprocess + vision + projector, summed over encoded frames
    llm_s: float = 0.0  # prefill + decode, summed over captions
    wall_s: float = 0.0
    pipelined: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def captions_per_s(self) -> float:
        return self.captions / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"frames_seen": self.frames_seen, "frames_encoded": self.frames_encoded,
                "frames_skipped": self.frames_skipped, "captions": self.captions,
                "vision_s": round(self.vision_s, 4), "llm_s": round(self.llm_s, 4), "wall_s": round(self.wall_s, 4),
                "captions_per_s": round(self.captions_per_s, 4), "pipelined": self.pipelined, **self.extra}

    def summary(self) -> str:
        return (f"{self.captions} captions in {self.wall_s:.1f} s ({self.captions_per_s:.2f}/s, "
                f"{'pipelined' if self.pipelined else 'sequential'}); frames seen {self.frames_seen}, "
                f"encoded {self.frames_encoded}, skipped as unchanged {self.frames_skipped}")


_END = object()


class Captioner:
    """One fresh single-turn answer per picked frame. `captions(frames)` yields `Caption`s in frame order."""

    def __init__(self, pipe, prompt: str, *, params: SamplingParams | None = None, dedup: FrameDedup | None = None,
                 pipelined: bool = True, interval: float = 0.0, on_notice: Callable[[str], None] | None = None):
        self.pipe = pipe
        self.prompt = prompt
        self.params = params or SamplingParams()
        self.dedup = dedup if dedup is not None else FrameDedup(0.0)
        self.pipelined = pipelined
        self.interval = max(0.0, float(interval))
        self.on_notice = on_notice
        self._stats = CaptionerStats(pipelined=pipelined)
        self._stop = threading.Event()
        self._next_pick = 0.0
        self._worker: threading.Thread | None = None

    # ---- the vision side (worker thread when pipelined) --------------------------------------------------
    def _pick(self, frames: Iterator[Frame | None]) -> Frame | None:
        """The next frame to caption: paced by `interval`, unchanged frames skipped. None: no more frames."""
        wait = self._next_pick - time.monotonic()
        if wait > 0 and self._stop.wait(wait):
            return None
        for frame in frames:
            if self._stop.is_set():
                return None
            if frame is None:  # a live source's "nothing new yet" tick: lets a stop request through
                continue
            if self.dedup.is_new(frame.image):
                self._next_pick = time.monotonic() + self.interval
                return frame
        return None

    def _encode(self, frame: Frame):
        from vila_edge.media.image import bgr_to_pil

        # cache=False: live frames are new by construction (dedup), caching them would only fill its bound
        enc = self.pipe.encode_message(self.prompt, [bgr_to_pil(frame.image, f"frame {frame.seq}")], cache=False)
        t = enc.timings
        self._stats.vision_s += t.preprocess + t.vision + t.merge_projector
        return frame, enc

    def _work(self, frames: Iterator[Frame], out: queue.Queue, credit: threading.Semaphore) -> None:
        try:
            while not self._stop.is_set():
                while not credit.acquire(timeout=0.1):  # one frame ahead at most
                    if self._stop.is_set():
                        return
                frame = self._pick(frames)
                if frame is None:
                    break
                out.put(self._encode(frame))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, raised there
            out.put(exc)
            return
        out.put(_END)

    # ---- the LLM side (caller's thread) ------------------------------------------------------------------
    def _encoded(self, frames: Iterator[Frame]) -> Iterator[tuple[Frame, object]]:
        if not self.pipelined:
            while (frame := self._pick(frames)) is not None:
                yield self._encode(frame)
            return
        out: queue.Queue = queue.Queue()
        credit = threading.Semaphore(1)
        self._worker = threading.Thread(target=self._work, args=(frames, out, credit), name="vila-edge-vision",
                                        daemon=True)
        self._worker.start()
        while True:
            try:
                item = out.get(timeout=0.1)  # a timeout keeps Ctrl-C responsive
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            credit.release()  # the worker may pick and encode the next frame while this one decodes
            yield item

    def captions(self, frames: Iterable[Frame | None]) -> Iterator[Caption]:
        """Captions of the frames that pass dedup and pacing (`frames` may yield None while a live source has
        nothing new: `vila_edge.media.camera.newest_frames`). Iterate each caption's stream before asking for
        the next one (an unfinished stream is closed: its answer is kept as cut)."""
        self._stop.clear()
        start = time.monotonic()
        prev = None
        try:
            for frame, enc in self._encoded(iter(frames)):
                self._end_caption(prev)
                conv = self.pipe.chat(on_notice=self.on_notice)  # each frame is a fresh question
                prev = Caption(frame, conv.ask(None, encoded=enc, stream=True, params=self.params))
                yield prev
        finally:
            self._end_caption(prev)
            self.close()
            self._stats.wall_s += time.monotonic() - start

    def _end_caption(self, cap: Caption | None) -> None:
        if cap is None:
            return
        if cap.stream.result is None:
            cap.stream.close()
        self._stats.captions += 1
        r = cap.stream.result
        if r is not None:
            self._stats.llm_s += r.timings.prefill + r.timings.decode

    def close(self) -> None:
        """Stop the worker (it finishes the encode it is in, then exits)."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None

    def stats(self) -> CaptionerStats:
        c = self.dedup.counts
        s = self._stats
        s.frames_seen, s.frames_encoded, s.frames_skipped = c.seen, c.encoded, c.skipped
        return s
