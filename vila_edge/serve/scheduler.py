"""One generation at a time, a bounded wait queue, cancellation and deadlines.

A single worker thread owns the engine(s): it takes jobs in arrival order and runs each to its end. The
event loop never runs model code; it only submits jobs and reads their events from an asyncio queue that
the worker fills with `call_soon_threadsafe`.

- `submit` refuses a job at once when `max_queue` jobs are already waiting (the caller answers 429).
- `cancel` (client gone) removes a waiting job from the queue at once; a running job is stopped before its
  next token and its engine iterator is closed, so the engine is free for the next job immediately.
- every job has a deadline: past it, a waiting job is answered with a timeout instead of running, and a
  running one is stopped at its next token.
- anything the engine raises ends that job with an "error" event; the worker survives.
- stop strings are cut here, for every engine, by the runtime's `StopStrings` (the one matcher), and
  `max_new_tokens` of the job's `SamplingParams` is enforced here too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from vila_edge.errors import VilaEdgeError
from vila_edge.generate import SamplingParams, StopStrings
from vila_edge.serve.engine import ChatMessage, Engine, Tail

log = logging.getLogger("vila_edge.serve")

_ids = itertools.count(1)


@dataclass
class Job:
    engine: Engine
    messages: list[ChatMessage]
    images: list
    params: SamplingParams
    timeout: float
    prompt_tokens: int = 0
    id: int = field(default_factory=lambda: next(_ids))
    # filled by submit()
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    accepted_at: float = 0.0
    deadline: float = 0.0
    # filled by the worker
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None  # stop | length | cancelled | timeout | error
    error_status: int = 500  # for finish_reason "error": 400 when the engine refused the input itself
    error_code: str = "engine_error"
    cancel_event: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


# Events put on job.events (tuples):
#   ("start",)                       the engine began this job
#   ("text", str)                    visible text (stop strings already cut)
#   ("end", finish_reason, n_tokens) finished: stop | length | cancelled | timeout
#   ("error", message)               the engine raised (or the job timed out while waiting: ("end", "timeout"))


class Scheduler:
    def __init__(self, *, max_queue: int, metrics=None):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self._durations: deque[float] = deque(maxlen=20)

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._closing = False
            self._thread = threading.Thread(target=self._work, name="vila-edge-engine", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything and stop the worker (server shutdown)."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            if self._running is not None:
                self._running.cancel_event.set()
            self._cond.notify_all()
        for job in waiting:
            self._finish(job, "cancelled")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- queue ----------------------------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return 1 if self._running is not None else 0

    def full(self) -> bool:
        """Would `submit` refuse a job now? (A cheap early answer before decoding a request's images.)"""
        with self._cond:
            busy = self._running is not None or bool(self._pending)
            return self._closing or (busy and len(self._pending) >= self.max_queue)

    def submit(self, job: Job) -> bool:
        """Accept `job` (True) or refuse it because the queue is full (False). Call from the event loop."""
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        with self._cond:
            if self._closing:
                return False
            busy = self._running is not None or bool(self._pending)
            if busy and len(self._pending) >= self.max_queue:
                return False
            job.accepted_at = time.monotonic()
            job.deadline = job.accepted_at + job.timeout
            self._pending.append(job)
            self._cond.notify()
        return True

    def cancel(self, job: Job) -> None:
        """The client is gone: drop the job if it is waiting, stop it if it is running."""
        job.cancel_event.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                return  # running (the worker stops it at the next token) or already finished
        self._finish(job, "cancelled")

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue drained at the recent pace, 1..60."""
        avg = sum(self._durations) / len(self._durations) if self._durations else 1.0
        return int(min(60, max(1, round(avg * (len(self._pending) + 1)))))

    # ---- worker ---------------------------------------------------------------------------------
    def _emit(self, job: Job, event: tuple) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            pass

    def _finish(self, job: Job, reason: str, error: str | None = None) -> None:
        if job.done:
            return
        job.finish_reason = reason
        job.finished_at = time.monotonic()
        m = self.metrics
        if m is not None:
            m.generations.inc(1, reason)
            if job.started_at is not None and job.accepted_at:
                m.duration.observe(job.finished_at - job.accepted_at)
            if job.completion_tokens:
                m.completion_tokens.inc(job.completion_tokens)
                m.prompt_tokens.inc(job.prompt_tokens)
            if job.first_token_at is not None and job.completion_tokens > 1:
                dt = job.finished_at - job.first_token_at
                if dt > 0:
                    rate = (job.completion_tokens - 1) / dt
                    m.decode_seconds.inc(dt)
                    m.tokens_per_second.set(rate)
                    m.tokens_per_second_hist.observe(rate)
        self._emit(job, ("error", error) if reason == "error" else ("end", reason, job.completion_tokens))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                self._run(job)
            except VilaEdgeError as exc:  # the engine refused this input (context, media, prompt)
                job.error_status = 400
                job.error_code = "context_length_exceeded" if "ContextOverflow" in type(exc).__name__ else (
                    "invalid_input")
                self._finish(job, "error", str(exc))
            except BaseException as exc:  # never let one job kill the worker
                log.exception("generation %s failed", job.id)
                self._finish(job, "error", f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                with self._cond:
                    self._running = None
                if job.started_at is not None and job.finished_at is not None:
                    self._durations.append(job.finished_at - job.started_at)

    def _run(self, job: Job) -> None:
        now = time.monotonic()
        if job.cancel_event.is_set():
            self._finish(job, "cancelled")
            return
        if now >= job.deadline:
            self._finish(job, "timeout")
            return
        job.started_at = now
        if self.metrics is not None:
            self.metrics.queue_wait.observe(now - job.accepted_at)
        self._emit(job, ("start",))
        params = job.params
        stops = StopStrings(params.stop)
        reason = None
        it = job.engine.generate_stream(job.messages, job.images, params)
        try:
            for piece in it:
                if isinstance(piece, Tail) and piece.finish and reason is None:
                    reason = piece.finish  # e.g. a JSON answer closed early for its budget
                if not isinstance(piece, Tail):
                    if reason == "length":  # a token past max_new_tokens: the engine does not stop by itself
                        break
                    if job.first_token_at is None:
                        job.first_token_at = time.monotonic()
                        if self.metrics is not None:
                            self.metrics.ttft.observe(job.first_token_at - job.accepted_at)
                    job.completion_tokens += 1
                shown = stops.feed(piece)
                if shown:
                    self._emit(job, ("text", shown))
                if stops.hit is not None:
                    reason = "stop"
                    break
                if job.cancel_event.is_set():
                    reason = "cancelled"
                    break
                if time.monotonic() >= job.deadline:
                    reason = "timeout"
                    break
                if job.completion_tokens >= params.max_new_tokens:
                    # keep reading only for the engine's closing text (a Tail); it ends there by itself
                    reason = "length"
            else:
                reason = reason or "stop"
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
        rest = stops.feed("", final=True)  # text held back for a stop string that never came
        if rest:
            self._emit(job, ("text", rest))
        self._finish(job, reason)

