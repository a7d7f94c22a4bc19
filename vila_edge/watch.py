"""`vila-edge watch`: ask one question about every new frame, answer as schema'd JSON, report changes.

    vila-edge watch ENGINES SRC --ask "Is there a person?" --schema person.json [--webhook URL]

SRC is a video file (read in order: every `--every`-th frame, deterministic) or a camera (index, device, URL,
GStreamer pipeline; the newest frame every `--interval` seconds through `media.camera.FrameGrabber`). Each
frame that differs from the last one asked about (media.frame_dedup.FrameDedup: a cheap downscaled difference) is asked
about with the schema enforced while decoding (vila_edge.structured), so the answer is always valid JSON. When
the answer differs from the previous one an event is emitted: one JSON line on stdout

    {"event": "change", "frame": 30, "time_s": 1.0, "answer": {"person": true}, "previous": {"person": false}}

and, with `--webhook`, the same JSON POSTed to a loopback URL (or one in `--allow-webhook-network`; the address
check is `serve.remote`'s, at connect time). The first answer is an event too (previous: null). Answers cut by
`--max-new-tokens` are not JSON: a note on stderr, no event, the previous answer stands.

`ChangeTracker` is the change detection alone (answer text in, event out); `vila-edge serve --camera SRC
--watch-ask ...` (vila_edge.serve.live_watch) feeds it the live page's answers, so both report the same events.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from vila_edge.errors import VilaEdgeError
from vila_edge.generate import SamplingParams
from vila_edge.media.frame_dedup import DEFAULT_THRESHOLD, FrameDedup

DEFAULT_MIN_CHANGE = DEFAULT_THRESHOLD  # grey levels between thumbnails below which a frame is "the same"
DEFAULT_MAX_NEW_TOKENS = 64  # tokens per answer: a small object; longer schemas need more (--max-new-tokens)


@dataclass
class WatchStats:
    frames: int = 0  # frames seen
    asked: int = 0  # frames the model answered
    skipped: int = 0  # frames skipped as unchanged
    incomplete: int = 0  # answers cut before their JSON ended
    events: int = 0


def file_frames(path, every: int = 1) -> Iterator[tuple[int, dict, np.ndarray]]:
    """(frame index, its time fields, BGR image) of a video file, every `every`-th frame."""
    from vila_edge.media.video import iter_frames

    for index, t, image in iter_frames(path, every=every):
        yield index, {"time_s": round(t, 3)}, image


def utc_time(t: float | None = None) -> str:
    """Wall-clock time `t` (time.time(); default now) as ISO 8601 UTC with milliseconds: the events' "time"."""
    now = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1e3) % 1000:03d}Z"


def watch_params(schema: str, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
    """The sampling settings of a watch question (the CLI's and the server's): greedy, the schema enforced."""
    return SamplingParams(max_new_tokens=max_new_tokens, json_schema=schema)


def check_webhook_url(url: str | None, flag: str = "--webhook") -> None:
    if url is not None and not url.startswith(("http://", "https://")):
        raise VilaEdgeError(f"{flag} {url!r}: must be an http:// or https:// URL")


def camera_frames(src, interval: float, on_notice: Callable[[str], None]) -> Iterator[tuple[int, dict, np.ndarray]]:
    """The newest camera frame every `interval` seconds (sequence number, wall-clock time, BGR image)."""
    from vila_edge.media.camera import FrameGrabber

    if interval <= 0:
        raise VilaEdgeError(f"--interval {interval}: must be > 0 seconds")
    with FrameGrabber(src, on_notice=on_notice) as grabber:
        grabber.start()
        frame = grabber.first_frame()
        while True:
            t0 = time.monotonic()
            yield frame.seq, {"time": utc_time()}, frame.image
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))
            nxt = grabber.wait_newer(frame.seq, timeout=max(5.0, interval * 2))
            if nxt is None:
                if grabber.error:
                    raise VilaEdgeError(grabber.error)
                if grabber.finished:
                    on_notice(f"{grabber.label}: no more frames; stopping")
                    return
                continue
            frame = nxt


class ChangeTracker:
    """The change detection of a watch: feed it each answer (`observe`), it returns the change event or None.

    An answer that did not end by itself (finish reason other than "stop": cut by max_new_tokens, the context,
    a timeout) is not JSON: counted as incomplete, no event, the previous answer stands. `last_event` is the
    newest event (the current answer)."""

    def __init__(self, stats: WatchStats | None = None, *, max_tokens_flag: str = "--max-new-tokens"):
        self.stats = stats if stats is not None else WatchStats()
        self.last_event: dict | None = None
        self.max_tokens_flag = max_tokens_flag  # named in the note about a cut answer

    def observe(self, frame: int, when: dict, text: str, finish_reason: str,
                on_notice: Callable[[str], None] = lambda m: None) -> dict | None:
        """The event for the answer `text` to frame `frame` (`when`: its time fields), or None (no change)."""
        self.stats.asked += 1
        answer = None
        if finish_reason == "stop":
            try:
                answer = json.loads(text)
            except ValueError:  # ended without completing its JSON (the engine stopped early)
                finish_reason = "incomplete"
        if finish_reason != "stop":
            self.stats.incomplete += 1
            why = (f"reached max_new_tokens before its JSON ended; raise {self.max_tokens_flag}"
                   if finish_reason == "length" else f"ended ({finish_reason}) before its JSON ended")
            on_notice(f"frame {frame}: the answer {why} (no event)")
            return None
        last = self.last_event
        if last is not None and answer == last["answer"]:
            return None
        self.stats.events += 1
        self.last_event = {"event": "change", "frame": frame, **when, "answer": answer,
                           "previous": None if last is None else last["answer"]}
        return self.last_event


def watch(pipe, frames: Iterable[tuple[int, dict, np.ndarray]], question: str, params: SamplingParams, *,
          min_change: float = DEFAULT_MIN_CHANGE, stats: WatchStats | None = None,
          on_notice: Callable[[str], None] = lambda m: None) -> Iterator[dict]:
    """The change events of the structured answers to `question` over `frames` (see the module doc)."""
    from vila_edge.media.image import bgr_to_pil

    if params.json_schema is None:
        raise VilaEdgeError("watch needs a JSON schema (--schema FILE): events compare structured answers")
    tracker = ChangeTracker(stats)
    stats = tracker.stats
    dedup = FrameDedup(min_change)  # the live captioner's dedup: compared with the last frame asked about
    for index, when, image in frames:
        stats.frames += 1
        if not dedup.is_new(image):
            stats.skipped += 1
            continue
        result = pipe.generate(question, images=[bgr_to_pil(image, f"frame {index}")], params=params)
        event = tracker.observe(index, when, result.text, result.finish_reason, on_notice)
        if event is not None:
            yield event


def post_event(url: str, event: dict, allowed_networks, deadline_s: float = 5.0) -> str | None:
    """POST one event to the webhook; None, or why it failed (one line; the watch goes on)."""
    import asyncio

    try:
        import httpcore

        from vila_edge.serve.remote import BlockedAddress, post_json
    except ImportError:
        return "--webhook needs httpcore: pip install 'vila-edge[serve]'"
    try:
        status = asyncio.run(post_json(url, event, deadline_s, allowed_networks))
    except BlockedAddress:
        return (f"webhook {url}: address not allowed (loopback only; allow a network with "
                "--allow-webhook-network CIDR)")
    except (asyncio.TimeoutError, httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
            httpcore.UnsupportedProtocol, OSError, ValueError) as exc:
        return f"webhook {url}: POST failed ({type(exc).__name__})"
    return None if 200 <= status < 300 else f"webhook {url}: HTTP {status}"


def run_watch(pipe, src: str, question: str, params: SamplingParams, *, every: int | None = None,
              interval: float | None = None, min_change: float = DEFAULT_MIN_CHANGE, webhook: str | None = None,
              allowed_networks=(), out=None, err=None) -> WatchStats:
    """The `vila-edge watch` command after its options are parsed: events to `out` (JSON lines), notes to `err`."""
    from vila_edge.media.camera import is_file_source

    out, err = out or sys.stdout, err or sys.stderr

    def note(msg: str) -> None:
        err.write(f"note: {msg}\n")
        err.flush()

    if every is not None and interval is not None:
        raise VilaEdgeError("--every N (frames of a video file) or --interval S (seconds, cameras): choose one")
    check_webhook_url(webhook)
    if is_file_source(src) and interval is None:
        frames = file_frames(src, every or 1)
    else:
        if every is not None:
            raise VilaEdgeError(f"--every applies to video files; {src} is a camera: use --interval S")
        frames = camera_frames(src, interval or 1.0, note)
    stats = WatchStats()
    try:
        for event in watch(pipe, frames, question, params, min_change=min_change, stats=stats, on_notice=note):
            out.write(json.dumps(event) + "\n")
            out.flush()
            if webhook is not None:
                problem = post_event(webhook, event, allowed_networks)
                if problem:
                    note(problem)
    except KeyboardInterrupt:
        note("stopped")
    note(f"{stats.frames} frames, {stats.asked} asked, {stats.skipped} unchanged (skipped), "
         f"{stats.incomplete} incomplete answers, {stats.events} events")
    return stats
