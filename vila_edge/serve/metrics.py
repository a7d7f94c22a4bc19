"""Prometheus text-format metrics, hand-rolled (no client library): counters, gauges, histograms.

Everything is updated from the event loop and from the generation worker thread, so every metric
takes one shared lock. Label values are always from small fixed sets (status codes, route templates,
finish reasons): no user-controlled label values.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

# seconds; time to first token and request durations on edge devices span ~10 ms .. minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)  # tokens per second


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = registry.lock
        registry.metrics.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        out = self.header()
        if not self._values and not self.label_names:
            out.append(f"{self.name} 0")
        for key, v in sorted(self._values.items()):
            out.append(f"{self.name}{_labels(self.label_names, key)} {_fmt(v)}")
        return out


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, *a, fn: Callable[[], float] | None = None, **kw):
        super().__init__(*a, **kw)
        self._value = 0.0
        self._fn = fn

    def set(self, v: float) -> None:
        with self._lock:
            self._value = float(v)

    def get(self) -> float:
        return float(self._fn()) if self._fn is not None else self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self.get())}"]


class ReadCounter(_Metric):
    """A counter kept elsewhere (the runtime's caches): `fn()` is read at every scrape."""

    kind = "counter"

    def __init__(self, *a, fn: Callable[[], float], **kw):
        super().__init__(*a, **kw)
        self._fn = fn

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_fmt(self._fn())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *a, buckets: tuple[float, ...] = LATENCY_BUCKETS, **kw):
        super().__init__(*a, **kw)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._n = 0

    def observe(self, v: float) -> None:
        with self._lock:
            self._sum += v
            self._n += 1
            for i, b in enumerate(self.buckets):
                if v <= b:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        return self._n

    def render(self) -> list[str]:
        out = self.header()
        acc = 0
        for b, c in zip(self.buckets, self._counts, strict=True):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_fmt(b)}"}} {acc}')
        out.append(f"{self.name}_sum {_fmt(self._sum)}")
        out.append(f"{self.name}_count {self._n}")
        return out


class Registry:
    def __init__(self):
        self.lock = threading.RLock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        lines: list[str] = []
        with self.lock:
            for m in self.metrics:
                lines += m.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The metrics `/metrics` exposes."""

    def __init__(self, queue_length: Callable[[], float], active: Callable[[], float]):
        import psutil

        proc = psutil.Process()
        r = self.registry = Registry()
        self.requests = Counter(r, "vila_edge_http_requests_total", "HTTP requests by route and status code.",
                                ("route", "status"))
        self.rejected = Counter(r, "vila_edge_rejected_total",
                                "Chat requests refused before generation, by reason (queue_full, invalid, ...).",
                                ("reason",))
        self.generations = Counter(r, "vila_edge_generations_total",
                                   "Generations finished, by finish reason (stop, length, cancelled, timeout, error).",
                                   ("finish_reason",))
        self.prompt_tokens = Counter(r, "vila_edge_prompt_tokens_total", "Prompt positions processed (images included).")
        self.completion_tokens = Counter(r, "vila_edge_completion_tokens_total", "Tokens generated.")
        self.decode_seconds = Counter(r, "vila_edge_decode_seconds_total",
                                      "Seconds spent between the first and the last token of generations.")
        self.tokens_per_second = Gauge(r, "vila_edge_tokens_per_second",
                                       "Decode speed of the last finished generation (tokens/s after the first).")
        self.tokens_per_second_hist = Histogram(r, "vila_edge_decode_tokens_per_second",
                                                "Decode speed per generation (tokens/s after the first token).",
                                                buckets=RATE_BUCKETS)
        self.ttft = Histogram(r, "vila_edge_time_to_first_token_seconds",
                              "Seconds from accepting a request to its first generated token (queue wait included).")
        self.queue_wait = Histogram(r, "vila_edge_queue_wait_seconds", "Seconds a request waited for the engine.")
        self.duration = Histogram(r, "vila_edge_request_duration_seconds",
                                  "Seconds from accepting a chat request to its last token.")
        Gauge(r, "vila_edge_queue_length", "Requests waiting for the engine (the running one excluded).",
              fn=queue_length)
        Gauge(r, "vila_edge_active_generations", "Generations running now (0 or 1: batch size 1).", fn=active)
        Gauge(r, "vila_edge_process_resident_memory_bytes", "Resident memory of the server process.",
              fn=lambda: proc.memory_info().rss)

    def add_runtime_stats(self, stats: Callable[[], dict]) -> None:
        """The runtime's cache counts (`Pipeline.stats()`, summed over the served pipelines)."""
        r = self.registry

        def read(group: str, key: str) -> Callable[[], float]:
            return lambda: stats().get(group, {}).get(key, 0)

        for key, help_text in (("hits", "Images whose media items came from the vision (encoder-output) cache."),
                               ("misses", "Images the vision tower encoded (not in the vision cache)."),
                               ("evictions", "Entries the vision cache dropped to stay within its byte bound.")):
            ReadCounter(r, f"vila_edge_vision_cache_{key}_total", help_text, fn=read("vision_cache", key))
        Gauge(r, "vila_edge_vision_cache_bytes", "Bytes of media items held by the vision cache.",
              fn=read("vision_cache", "bytes"))
        Gauge(r, "vila_edge_vision_cache_entries", "Images held by the vision cache.", fn=read("vision_cache", "entries"))
        ReadCounter(r, "vila_edge_prefill_positions_total", "Prompt positions prefilled into the KV cache.",
                    fn=read("prefill", "prefilled_positions"))
        ReadCounter(r, "vila_edge_prefix_reused_positions_total",
                    "Prompt positions not prefilled: the KV cache already held them (a resent conversation's start).",
                    fn=read("prefill", "reused_positions"))

    def add_camera(self, frame_counts: Callable[[], dict]) -> None:
        """The camera page's frame counts (`FrameDedup.counts.as_dict()`)."""
        for key, help_text in (("seen", "Camera frames the live captioner looked at."),
                               ("encoded", "Camera frames captioned (they differed from the last captioned one)."),
                               ("skipped", "Camera frames skipped: within --dedup-threshold of the last captioned "
                                           "frame.")):
            ReadCounter(self.registry, f"vila_edge_camera_frames_{key}_total", help_text,
                        fn=lambda key=key: frame_counts()[key])

    def add_watch(self, counts: Callable[[], dict]) -> None:
        """The camera watch's counts (`LiveWatch.counts()`, vila_edge.serve.live_watch)."""
        for key, help_text in (("answers", "Camera watch answers (frames the watch question was answered about)."),
                               ("events", "Camera watch change events (the answer differed from the last one)."),
                               ("incomplete", "Camera watch answers cut before their JSON ended (no event)."),
                               ("errors", "Camera watch frames the engine failed to answer."),
                               ("dropped", "Watch events dropped from the full queue of a slow /watch/events "
                                           "subscriber."),
                               ("webhook_posts", "Watch events POSTed to --watch-webhook (failures included)."),
                               ("webhook_failures", "Watch webhook POSTs that failed (refused address, network "
                                                    "error, non-2xx)."),
                               ("webhook_dropped", "Watch events dropped before the webhook got them (it was too "
                                                   "slow).")):
            ReadCounter(self.registry, f"vila_edge_watch_{key}_total", help_text, fn=lambda key=key: counts()[key])
        Gauge(self.registry, "vila_edge_watch_subscribers", "Clients connected to /watch/events.",
              fn=lambda: counts()["subscribers"])

    def render(self) -> str:
        return self.registry.render()
