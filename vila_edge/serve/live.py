"""The live camera page: newest frame as MJPEG, and captions of the newest frame as server-sent events.

A `LiveCaptioner` loops: take the newest frame, skip it when it is within `camera_dedup_threshold` grey levels of
the last captioned frame (`vila_edge.media.frame_dedup`; counts in `/metrics` and `/camera/state`), ask the
engine about it (through the same scheduler as API requests, so it never runs beside another generation),
broadcast the answer token by token to every `/captions` subscriber, wait `interval` seconds, repeat. Frames are never queued: a caption is always about
the newest frame at the time it starts, and `/stream.mjpg` always shows the newest frame.

A frame source is anything with `read_latest() -> (seq, frame)` (frame: HxWx3 BGR uint8, or None before
the first one; seq grows with every new frame) plus optional `close()`; `open_camera(src)` opens the
runtime's `vila_edge.media.camera.FrameGrabber`.

With a watch (`--watch-ask`, vila_edge.serve.live_watch.LiveWatch) the loop asks the watch's question, schema
enforced, instead of the caption prompt, and hands each finished answer to the watch (change events on
`/watch/events` and the webhook); `/captions` streams the answers as they decode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from vila_edge.errors import MediaError
from vila_edge.generate import SamplingParams
from vila_edge.media.frame_dedup import FrameDedup
from vila_edge.serve.engine import ChatMessage
from vila_edge.serve.scheduler import Job

log = logging.getLogger("vila_edge.serve")


def open_camera(src: str):
    """A started frame source for `--camera SRC`: the runtime's `FrameGrabber` (newest-frame capture thread with
    reconnect backoff; a video file plays once at its own frame rate, then its last frame stays on the page)."""
    from vila_edge.media.camera import FrameGrabber

    grabber = FrameGrabber(src, on_notice=lambda msg: log.warning("%s", msg))
    grabber.start()
    try:
        grabber.first_frame()
    except BaseException:
        grabber.close()
        raise
    return grabber


class LiveCaptioner:
    BOUNDARY = "vilaedgeframe"

    def __init__(self, source, engine, scheduler, settings, watch=None):
        self.source = source
        self.watch = watch  # a LiveWatch: ask its question instead of the caption prompt
        self.engine = engine
        self.scheduler = scheduler
        self.settings = settings
        self._subscribers: set[asyncio.Queue] = set()
        self._task: asyncio.Task | None = None
        self._latest: dict = {"id": 0, "text": "", "done": False, "waiting": True}
        self._jpeg_seq = -1
        self._jpeg = b""
        self._jpeg_lock = asyncio.Lock()
        self._running = False
        self._closing = False
        self.captions_done = 0
        self.dedup = FrameDedup(settings.camera_dedup_threshold)
        self._checked_seq = 0  # newest frame dedup has looked at
        # pipelining needs somewhere to put the next frame's encoding (the engine's vision cache)
        self.pipelined = bool(getattr(engine, "can_prefetch", False))
        self._ahead: asyncio.Task | None = None  # picks + encodes the next caption's frame
        self.prefetched = 0

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.watch is not None:
            await self.watch.start()
        self._running = True
        self._task = asyncio.create_task(self._loop(), name="vila-edge-captions")

    def begin_shutdown(self) -> None:
        """The server is stopping: end every viewer's MJPEG and caption stream now."""
        self._closing = True
        for q in list(self._subscribers):
            q.put_nowait(None)
        if self.watch is not None:
            self.watch.begin_shutdown()

    async def stop(self) -> None:
        self._running = False
        self._closing = True
        for task in (self._task, self._ahead):
            if task is not None:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                    pass
        for q in list(self._subscribers):
            q.put_nowait(None)
        if self.watch is not None:
            await self.watch.stop()
        close = getattr(self.source, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    def state(self) -> dict:
        seq, frame = self.source.read_latest()
        shape = None if frame is None else list(frame.shape)
        return {"frame_seq": seq, "frame_shape": shape, "caption": self._latest, "captions_done": self.captions_done,
                "frames": self.dedup.counts.as_dict(), "dedup_threshold": self.dedup.threshold,
                "pipelined": self.pipelined, "prefetched": self.prefetched,
                "source_error": getattr(self.source, "error", None),
                "prompt": self.prompt, "interval": self.settings.camera_interval,
                "model": self.engine.model_id, "watch": None if self.watch is None else self.watch.state()}

    @property
    def prompt(self) -> str:
        """What the loop asks about each frame: the watch's question, else the caption prompt."""
        return self.watch.question if self.watch is not None else self.settings.camera_prompt

    # ---- captions -------------------------------------------------------------------------------
    def _broadcast(self, event: dict) -> None:
        self._latest = event
        for q in list(self._subscribers):
            if q.qsize() > 200:  # a stalled viewer: drop its backlog, keep the newest
                while not q.empty():
                    q.get_nowait()
            q.put_nowait(event)

    async def _next_new_frame(self) -> tuple[int, object, float] | None:
        """(seq, RGB image, wall-clock time it was taken) of the newest frame that passes dedup (waits for one);
        None once stopping."""
        from vila_edge.media.image import bgr_to_pil

        while self._running:
            seq, frame = self.source.read_latest()
            taken = time.time()
            if frame is None or (self.dedup.enabled and seq == self._checked_seq):
                await asyncio.sleep(0.05)
                continue
            if self.dedup.enabled:
                self._checked_seq = seq
                if not self.dedup.is_new(frame):  # nothing changed since the last caption: nothing new to say
                    await asyncio.sleep(0.05)
                    continue
            else:
                self.dedup.is_new(frame)  # counts it
            return seq, await asyncio.to_thread(bgr_to_pil, frame.copy(), "camera frame"), taken
        return None

    async def _pick_ahead(self, interval: float) -> tuple[int, object, float] | None:
        """Pipelining: the next caption's frame, picked `interval` seconds after this caption started and encoded
        into the engine's vision cache while this caption decodes (its request then finds the items there)."""
        await asyncio.sleep(interval)
        picked = await self._next_new_frame()
        if picked is not None:
            try:
                if await asyncio.to_thread(self.engine.prefetch_images, [picked[1]]):
                    self.prefetched += 1
            except Exception as exc:  # noqa: BLE001 - the caption's own request encodes it and reports it
                log.warning("camera frame prefetch failed: %s", exc)
        return picked

    async def _loop(self) -> None:
        s = self.settings
        n = 0
        while self._running:
            if self._ahead is not None:
                picked, self._ahead = await self._ahead, None
            else:
                picked = await self._next_new_frame()
            if picked is None:
                return
            seq, image, taken = picked
            try:
                messages = [ChatMessage("user", self.prompt, 1)]
                tokens = await asyncio.to_thread(self.engine.count_tokens, messages, [image])
                room = self.engine.max_context - tokens
                if room < 1:
                    raise MediaError(f"the camera prompt needs {tokens} positions; the model holds "
                                     f"{self.engine.max_context}")
                params = (self.watch.params_for(room) if self.watch is not None
                          else SamplingParams(max_new_tokens=min(s.camera_max_tokens, room)))
                job = Job(engine=self.engine, messages=messages, images=[image], params=params,
                          timeout=s.request_timeout, prompt_tokens=tokens)
                if not self.scheduler.submit(job):  # API traffic fills the queue: try again later
                    self.dedup.reset()  # this frame was not captioned: the next one must be
                    await asyncio.sleep(max(0.2, s.camera_interval))
                    continue
                n += 1
                t0 = time.monotonic()
                if self.pipelined:
                    self._ahead = asyncio.create_task(self._pick_ahead(s.camera_interval))
                text = ""
                try:
                    while True:
                        ev = await job.events.get()
                        if ev[0] == "text":
                            text += ev[1]
                            self._broadcast({"id": n, "text": text, "done": False, "frame": seq})
                        elif ev[0] in ("end", "error"):
                            done = {"id": n, "text": text, "done": True, "frame": seq,
                                    "finish_reason": ev[1] if ev[0] == "end" else "error",
                                    "seconds": round(time.monotonic() - t0, 3)}
                            if ev[0] == "error":
                                done["error"] = ev[1]
                            self._broadcast(done)
                            self.captions_done += 1
                            if self.watch is not None:
                                if ev[0] == "end":
                                    self.watch.on_answer(seq, taken, text, ev[1])
                                else:
                                    self.watch.on_error(seq, ev[1])
                            break
                finally:
                    if not job.done:
                        self.scheduler.cancel(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep captioning; show the problem on the page
                log.warning("camera caption failed: %s", exc)
                if self.watch is not None:
                    self.watch.on_error(seq, str(exc))
                self._broadcast({"id": n, "text": "", "done": True, "error": str(exc)})
            if self._ahead is None:  # pipelined: the next frame is picked `interval` after this caption STARTED
                await asyncio.sleep(s.camera_interval)

    async def captions(self):
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(q)
        if self._closing:
            q.put_nowait(None)
        try:
            yield "retry: 2000\n\n"
            yield "data: " + json.dumps(self._latest) + "\n\n"
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if ev is None:
                    return
                yield "data: " + json.dumps(ev) + "\n\n"
        finally:
            self._subscribers.discard(q)

    # ---- MJPEG ----------------------------------------------------------------------------------
    async def _jpeg_of_newest(self) -> tuple[int, bytes]:
        seq, frame = self.source.read_latest()
        if frame is None:
            return 0, b""
        async with self._jpeg_lock:  # one encode per new frame, shared by all viewers
            if seq != self._jpeg_seq:
                self._jpeg = await asyncio.to_thread(_encode_jpeg, frame)
                self._jpeg_seq = seq
            return self._jpeg_seq, self._jpeg

    async def mjpeg(self):
        """multipart/x-mixed-replace of JPEGs: each new frame (at most camera_fps a second), and the current one
        again every second while the source is still (keeps the connection and late viewers fed)."""
        period = 1.0 / max(0.5, self.settings.camera_fps)
        last, last_sent = -1, 0.0
        while not self._closing:
            seq, jpeg = await self._jpeg_of_newest()
            now = time.monotonic()
            if jpeg and (seq != last or now - last_sent >= 1.0):
                last, last_sent = seq, now
                yield (f"--{self.BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                       .encode() + jpeg + b"\r\n")
            await asyncio.sleep(period)


def _encode_jpeg(frame) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise MediaError("cannot encode the camera frame as JPEG")
    return buf.tobytes()
