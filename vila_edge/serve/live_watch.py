"""The camera watch of `vila-edge serve --camera SRC --watch-ask QUESTION --watch-schema FILE`: `vila-edge watch`
on the live page.

The live loop (vila_edge.serve.live.LiveCaptioner) asks QUESTION, with the schema enforced and the CLI's sampling
settings (`watch.watch_params`), about each frame that passes its dedup, INSTEAD of the caption prompt: the
engine runs one generation at a time, so a caption beside every answer would halve how often the watch looks,
and the answer itself streams on `/captions` as the caption text. Each answer goes through the CLI's change
detection (`watch.ChangeTracker`); a change event is the CLI's JSON line with the frame's sequence number and
wall-clock time ("time", as `vila-edge watch` on a camera), published to:

- `GET /watch/events` subscribers (server-sent events, `id: N` + `data: {event}`); a new subscriber first gets
  the current answer (the newest event, with its id), so a page opened late shows the state;
- the webhook (`--watch-webhook`, through `watch.post_event`: loopback or `--allow-webhook-network` only), posted
  in order from a thread so the live loop never waits for it; failures are logged and counted, never fatal.

Every subscriber (the webhook's poster too) has a bounded queue: when a slow client lets it fill, the oldest
event is dropped and counted (`dropped` and `webhook_dropped` in `/watch/state` and `/stats`,
`vila_edge_watch_dropped_total` and `vila_edge_watch_webhook_dropped_total`), so memory never grows.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from vila_edge.generate import SamplingParams
from vila_edge.watch import ChangeTracker, post_event, utc_time

log = logging.getLogger("vila_edge.serve")

DEFAULT_QUEUE = 64  # events buffered per subscriber; a change event is ~100 bytes


class Subscription:
    """One subscriber's bounded queue of (id, event); None ends it."""

    def __init__(self, bound: int):
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=bound)
        self.dropped = 0

    def put(self, item) -> bool:
        """Queue `item`; when full, drop the oldest first (counted). False when something was dropped."""
        full = self.queue.full()
        if full:
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(item)
        return not full

    def end(self) -> None:
        """Make None (the end) the next thing after what is queued (the oldest goes when full: not a drop)."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class EventHub:
    """Fan-out of events to subscriptions; remembers the newest (id, event). Event-loop only (not thread-safe)."""

    def __init__(self, bound: int = DEFAULT_QUEUE):
        if bound < 1:
            raise ValueError("the queue bound must be >= 1")
        self.bound = bound
        self.latest: tuple[int, dict] | None = None
        self.published = 0
        self.dropped = 0  # events dropped from full queues, all subscriptions together
        self._subs: set[Subscription] = set()
        self.closed = False

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def subscribe(self, *, replay: bool = True) -> Subscription:
        sub = Subscription(self.bound)
        if self.closed:
            sub.end()
        elif replay and self.latest is not None:
            sub.put(self.latest)
        self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, event: dict) -> int:
        """Send `event` to every subscription; its id (1, 2, ...)."""
        self.published += 1
        item = (self.published, event)
        self.latest = item
        for sub in list(self._subs):
            if not sub.put(item):
                self.dropped += 1
        return self.published

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        self.closed = True
        for sub in list(self._subs):
            sub.end()


class LiveWatch:
    """The server's watch: question, schema'd sampling settings, change tracker, event hub, webhook poster."""

    def __init__(self, question: str, params: SamplingParams, *, webhook: str | None = None,
                 allowed_networks=(), queue_bound: int = DEFAULT_QUEUE):
        if params.json_schema is None:
            raise ValueError("a watch needs a JSON schema")
        self.question = question
        self.params = params
        self.tracker = ChangeTracker(max_tokens_flag="--watch-max-tokens")
        self.hub = EventHub(queue_bound)
        self.webhook = webhook
        self.allowed_networks = tuple(allowed_networks)
        self.errors = 0  # answers the engine failed to give (logged)
        self.webhook_posts = 0
        self.webhook_failures = 0
        self._poster: Subscription | None = None
        self._poster_task: asyncio.Task | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.webhook is not None:
            self._poster = self.hub.subscribe(replay=False)
            self._poster_task = asyncio.create_task(self._post_events(self._poster), name="vila-edge-watch-webhook")

    def begin_shutdown(self) -> None:
        self.hub.close()

    async def stop(self) -> None:
        self.hub.close()
        if self._poster_task is not None:
            self._poster_task.cancel()
            try:
                await self._poster_task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

    # ---- answers --------------------------------------------------------------------------------
    def params_for(self, room: int) -> SamplingParams:
        """The CLI's settings, with max_new_tokens cut to the positions the context has left."""
        return dataclasses.replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room))

    def on_answer(self, frame: int, wall_time: float, text: str, finish_reason: str) -> dict | None:
        """The live loop's answer to frame `frame` (read at `wall_time`, time.time()): publish its change event."""
        event = self.tracker.observe(frame, {"time": utc_time(wall_time)}, text, finish_reason,
                                     on_notice=lambda msg: log.warning("watch: %s", msg))
        if event is not None:
            self.hub.publish(event)
        return event

    def on_error(self, frame: int, message: str) -> None:
        self.errors += 1
        log.warning("watch: frame %s: no answer (%s)", frame, message)

    async def _post_events(self, sub: Subscription) -> None:
        """POST each event in order from a worker thread (post_event blocks up to its 5 s deadline)."""
        while True:
            item = await sub.queue.get()
            if item is None:
                return
            problem = await asyncio.to_thread(post_event, self.webhook, item[1], self.allowed_networks)
            self.webhook_posts += 1
            if problem:
                self.webhook_failures += 1
                log.warning("watch: %s", problem)

    # ---- routes ---------------------------------------------------------------------------------
    def counts(self) -> dict:
        s = self.tracker.stats
        webhook_dropped = self._poster.dropped if self._poster is not None else 0
        return {"answers": s.asked, "events": s.events, "incomplete": s.incomplete, "errors": self.errors,
                "subscribers": self.hub.subscribers - (self._poster is not None),
                "dropped": self.hub.dropped - webhook_dropped,  # by /watch/events subscribers
                "webhook_posts": self.webhook_posts, "webhook_failures": self.webhook_failures,
                "webhook_dropped": webhook_dropped}

    def state(self) -> dict:
        last_id, last = self.hub.latest or (None, None)
        return {"question": self.question, "schema": json.loads(self.params.json_schema),
                "max_new_tokens": self.params.max_new_tokens, "answer": None if last is None else last["answer"],
                "last_event": last, "last_event_id": last_id, "webhook": self.webhook is not None, **self.counts()}

    async def events(self):
        """`GET /watch/events`: the current answer first (if any), then each change event, as server-sent events."""
        sub = self.hub.subscribe()
        try:
            yield "retry: 2000\n\n"
            while True:
                try:
                    item = await asyncio.wait_for(sub.queue.get(), 15.0)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                if item is None:
                    return
                n, event = item
                yield f"id: {n}\ndata: {json.dumps(event)}\n\n"
        finally:
            self.hub.unsubscribe(sub)
