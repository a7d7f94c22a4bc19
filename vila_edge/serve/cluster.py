"""`vila-edge serve ENGINE --cluster auto|local|ADDRESS --replicas N`: the same server on a Ray cluster.

One model = one Ray Serve deployment. Each replica is a Ray actor that loads the engine directory and serves
the very app `vila-edge serve` serves (`create_app`: the same routes, guards, scheduler and 429s), built in
the replica by Ray Serve's late-bound ingress (`__serve_build_asgi_app__`). Ray's HTTP proxy spreads
requests over the replicas, restarts a replica whose process dies, and scales between --replicas and
--max-replicas on the number of requests in flight.

Queue limits: a replica runs one generation and lets `max_queue` wait (beyond that its own OpenAI-shaped 429,
as a single server); Ray sends a replica at most `max_queue + 1 + HEALTH_SLOTS` requests at once; a proxy holds
at most `max_queue` more while every replica is busy and answers 429 with Retry-After beyond that.

/health and /metrics answer for the whole deployment: every replica reports its metrics to one small actor
(the board) every `REPORT_INTERVAL` seconds, and the replica that serves /health or /metrics adds its own
fresh figures to the others' latest. Counters of a replica that died stay in the totals (they never go
backwards); its gauges (queue, active, memory) leave with it.

Needs the `ray` extra (`ray[serve]`), imported only here and only when used.
"""

from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vila_edge.errors import VilaEdgeError

REPORT_INTERVAL = 0.5  # seconds between a replica's reports to the board
STALE_AFTER = 4 * REPORT_INTERVAL  # a replica silent for longer is gone (its gauges leave the totals)
HEALTH_SLOTS = 2  # requests Ray may send a replica beyond its own queue: /health and /metrics under load
MEAN_GAUGES = ("vila_edge_tokens_per_second",)  # per-generation speeds: averaged over replicas, not summed
BOARD_NAME = "vila-edge-board"
REPLICA_HEADER = "x-vila-edge-replica"


def _ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise VilaEdgeError("--cluster needs Ray Serve: pip install 'vila-edge[ray]'") from None
    return ray, serve


# ---------------------------------------------------------------------------------------------
# resources per replica, from the planner
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    replicas: int = 1
    max_replicas: int | None = None  # > replicas: autoscale between the two on requests in flight
    threads: int = 1  # engine threads per replica = CPUs Ray reserves for it
    node_profile: str | None = None  # planner device profile of the GPU nodes (a replica's share of the GPU)
    max_queue: int = 8
    health_check_period_s: float = 10.0


def replica_resources(cfg, *, llm_precision: str, gpu: bool, threads: int, node_profile=None) -> dict:
    """Ray actor options of one replica: CPUs = its engine threads; memory (Ray's logical `memory` resource,
    so a node gets no more replicas than it can hold) = the planner's total for the engine; on GPU engines the
    GPU share = that total / the node profile's usable memory (a whole GPU without a profile)."""
    from vila_edge.plan import host_profile, load_profile, plan

    opts = {"num_cpus": threads}
    profile = load_profile(node_profile) if node_profile else None
    if profile is not None and (profile.kind == "cpu") == gpu:
        raise VilaEdgeError(f"--node-profile {profile.name} is a {'CPU' if profile.kind == 'cpu' else 'GPU'} "
                            f"profile but the engines are built for {'GPUs' if gpu else 'CPUs'}")
    if gpu and profile is None:
        opts["num_gpus"] = 1.0
        return opts
    profile = profile or host_profile(1.0, 1.0, memory_gib=1.0)  # only activation width and overhead matter here
    need = plan(cfg, profile, llm_precision=llm_precision, suggest=False).memory["total"]
    if gpu:
        opts["num_gpus"] = min(1.0, math.ceil(100 * need / profile.usable_bytes) / 100)
    if not gpu or profile.kind == "jetson":  # host memory: CPU engines, and Jetsons' unified memory
        opts["memory"] = int(need)
    return opts


def engine_resources(engine_dir, opts: ClusterOptions) -> dict:
    from vila_edge.engine_dir import read_manifest

    manifest = read_manifest(engine_dir)
    return replica_resources(manifest.config, llm_precision=manifest.options.get("llm_precision", "int4"),
                             gpu=manifest.target.device == "cuda", threads=opts.threads,
                             node_profile=opts.node_profile)


# ---------------------------------------------------------------------------------------------
# /metrics and /health for the whole deployment
# ---------------------------------------------------------------------------------------------


def _parse_metrics(text: str) -> tuple[dict, dict]:
    """Prometheus text -> ({family: (help line, type line, kind)}, {sample key: (family, value)}), in order."""
    families: dict[str, list] = {}
    samples: dict[str, tuple[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            families.setdefault(line.split(" ", 3)[2], [line, None, None])[0] = line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            families.setdefault(name, [None, None, None])[1:] = [line, kind]
        elif line.strip():
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            family = next((f for f in (name, name.rsplit("_", 1)[0]) if f in families), name)
            samples[key] = (family, float(value))
    return families, samples


def merge_metrics(live: list[str], gone: list[str] = ()) -> str:
    """One Prometheus text from the replicas' texts: counters and histograms summed over every replica (also
    those that are gone, so totals never decrease), gauges over the live ones (MEAN_GAUGES averaged)."""
    from vila_edge.serve.metrics import _fmt

    families: dict[str, list] = {}
    totals: dict[str, list] = {}  # sample key -> [family, sum, live replicas that have it]
    for text, alive in [(t, True) for t in live] + [(t, False) for t in gone]:
        fams, samples = _parse_metrics(text)
        for name, fam in fams.items():
            families.setdefault(name, fam)
        for key, (family, value) in samples.items():
            gauge = fams.get(family, [None, None, None])[2] == "gauge"
            if gauge and not alive:
                continue
            entry = totals.setdefault(key, [family, 0.0, 0])
            entry[1] += value
            entry[2] += 1
    lines = []
    for name, (help_line, type_line, _) in families.items():
        lines += [x for x in (help_line, type_line) if x]
        for key, (family, total, n) in totals.items():
            if family == name:
                value = total / n if name in MEAN_GAUGES and n else total
                lines.append(f"{key} {_fmt(value)}")
    lines += ["# HELP vila_edge_replicas Replicas reporting now.", "# TYPE vila_edge_replicas gauge",
              f"vila_edge_replicas {len(live)}"]
    return "\n".join(lines) + "\n"


def split_reports(reports: dict) -> tuple[list[dict], list[dict]]:
    """The board's reports -> (live, gone) by age."""
    live = [r for r in reports.values() if r["age"] <= STALE_AFTER]
    gone = [r for r in reports.values() if r["age"] > STALE_AFTER]
    return live, gone


def merge_health(local: dict, live: list[dict]) -> dict:
    out = dict(local)
    out["queue_length"] = sum(r["queue_length"] for r in live)
    out["active"] = sum(r["active"] for r in live)
    out["max_queue"] = sum(r["max_queue"] for r in live)
    out["replicas"] = [{k: r[k] for k in ("id", "pid", "node", "queue_length", "active")} for r in
                       sorted(live, key=lambda r: r["id"])]
    return out


class MetricsBoard:
    """The latest report of every replica (a Ray actor with no CPU: created once per deployment)."""

    def __init__(self):
        self.reports: dict[str, dict] = {}
        self.at: dict[str, float] = {}

    def put(self, report: dict) -> None:
        self.reports[report["id"]] = report
        self.at[report["id"]] = time.monotonic()

    def view(self) -> dict:
        now = time.monotonic()
        return {rid: {**r, "age": now - self.at[rid]} for rid, r in self.reports.items()}


# ---------------------------------------------------------------------------------------------
# the replica
# ---------------------------------------------------------------------------------------------


class ClusterView:
    """ASGI layer around the replica's app: every response names its replica (header), and a 200 from /health
    or /metrics (the app's own guards and API-key check have passed) is replaced by the deployment's totals."""

    def __init__(self, app, replica):
        self.app, self.replica = app, replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tag = (REPLICA_HEADER.encode(), self.replica.id.encode())
        if scope.get("method") != "GET" or scope.get("path") not in ("/health", "/metrics"):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), tag]}
                await send(message)

            return await self.app(scope, receive, tagged)
        sent: list[dict] = []

        async def keep(message):
            sent.append(message)

        await self.app(scope, receive, keep)
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        if start["status"] == 200:
            body = await self.replica.totals(scope["path"], body)
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers += [(b"content-length", str(len(body)).encode()), tag]
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class ClusterReplica:
    """One Ray Serve replica: loads the engine directory and serves `create_app` over it (wrapped in
    `serve.ingress()` at deploy time; Ray calls `__serve_build_asgi_app__` after `__init__`)."""

    def __init__(self, engine_dir: str, settings, load_kwargs: dict, board):
        import ray
        from ray import serve

        from vila_edge.serve.engine import load_engines

        self.engines = load_engines([engine_dir], **load_kwargs)
        self.settings, self.board = settings, board
        self.id = serve.get_replica_context().replica_id.unique_id  # as in Ray's own logs
        self.node = ray.get_runtime_context().get_node_id()[:12]
        self.server_app = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report_loop, name="vila-edge-report", daemon=True)

    def __serve_build_asgi_app__(self):
        from vila_edge.serve.app import create_app

        self.server_app = create_app(self.engines, self.settings)
        self._thread.start()
        return ClusterView(self.server_app, self)

    def report(self) -> dict:
        state = self.server_app.state
        sched = state.scheduler
        return {"id": self.id, "pid": os.getpid(), "node": self.node, "queue_length": sched.queue_length,
                "active": sched.active, "max_queue": sched.max_queue, "metrics": state.metrics.render()}

    def _report_loop(self) -> None:
        while not self._stop.wait(REPORT_INTERVAL):
            try:
                self.board.put.remote(self.report())
            except Exception:  # noqa: BLE001 - the board may be gone while Serve shuts down; keep serving
                pass

    async def totals(self, path: str, local_body: bytes) -> bytes:
        try:
            await self.board.put.remote(self.report())
            live, gone = split_reports(await self.board.view.remote())
        except Exception:  # noqa: BLE001 - no board (Serve shutting down): this replica's own answer
            return local_body
        if path == "/metrics":
            return merge_metrics([r["metrics"] for r in live], [r["metrics"] for r in gone]).encode()
        return json.dumps(merge_health(json.loads(local_body), live)).encode()

    def __del__(self):
        stop = getattr(self, "_stop", None)  # absent when __init__ failed
        if stop is not None:
            stop.set()


# ---------------------------------------------------------------------------------------------
# start or join a cluster, deploy, stop
# ---------------------------------------------------------------------------------------------


def connect(cluster: str, *, quiet: bool = True, **init_kwargs) -> bool:
    """`auto`: the cluster this machine belongs to, else a new local one; `local`: always a new local one;
    anything else: the address of a running cluster's head (HOST:6379 or ray://HOST:10001).
    Returns True when this process started the cluster (and so should end it)."""
    ray, _ = _ray()
    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": not quiet, "logging_level": "WARNING"}
    if cluster not in ("auto", "local"):
        try:
            ray.init(address=cluster, **common)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise VilaEdgeError(f"--cluster {cluster}: cannot join that Ray cluster ({exc}); start its head with "
                                f"`ray start --head` or use --cluster auto") from None
        return False
    if cluster == "auto":
        try:
            ray.init(address="auto", **common)
            return False
        except (ConnectionError, ValueError, RuntimeError):
            pass
    ray.init(**common, **init_kwargs)
    return True


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(engine_dir, settings, opts: ClusterOptions, *, host: str = "127.0.0.1", port: int = 8000,
           load_kwargs: dict | None = None, name: str | None = None) -> str:
    """Deploy one model on the connected cluster; returns the base URL (the proxy on this node)."""
    ray, serve = _ray()
    from ray.serve.config import BackpressureConfig

    engine_dir = Path(engine_dir).resolve()
    resources = engine_resources(engine_dir, opts)
    name = name or engine_dir.name
    if opts.max_replicas is not None and opts.max_replicas < opts.replicas:
        raise VilaEdgeError(f"--max-replicas {opts.max_replicas} is below --replicas {opts.replicas}")
    port = port or free_port(host)
    serve.start(http_options={"host": host, "port": port})
    board = ray.remote(num_cpus=0)(MetricsBoard).options(name=f"{BOARD_NAME}-{name}", namespace="serve",
                                                         get_if_exists=True).remote()
    scaling = {"num_replicas": opts.replicas}
    if opts.max_replicas is not None and opts.max_replicas > opts.replicas:
        # one request running and one waiting per replica is the target; more: add a replica
        scaling = {"autoscaling_config": {"min_replicas": opts.replicas, "max_replicas": opts.max_replicas,
                                          "target_ongoing_requests": 2}}
    deployment = serve.deployment(serve.ingress()(ClusterReplica)).options(
        name=name, ray_actor_options=resources, max_ongoing_requests=opts.max_queue + 1 + HEALTH_SLOTS,
        max_queued_requests=max(1, opts.max_queue),
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=opts.health_check_period_s, graceful_shutdown_timeout_s=10, **scaling)
    kwargs = {k: v for k, v in (load_kwargs or {}).items() if v is not None}
    kwargs.setdefault("threads", opts.threads)
    try:
        serve.run(deployment.bind(str(engine_dir), settings, kwargs, board), name=name, route_prefix="/",
                  blocking=False)
    except Exception:  # noqa: BLE001 - a replica that cannot load its engine: one line, not Ray's dump
        raise VilaEdgeError(f"{engine_dir}: the deployment did not start ({_replica_error(serve, name)})") from None
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _replica_error(serve, name: str) -> str:
    """The last line of the replicas' own error (Ray's message holds their whole traceback)."""
    try:
        message = serve.status().applications[name].deployments[name].message
    except (KeyError, AttributeError):
        return "see the Ray logs"
    lines = [x.strip() for x in message.replace("\\n", "\n").splitlines() if x.strip()]
    return lines[-1] if lines else "see the Ray logs"


def shutdown(started: bool, name: str | None = None) -> None:
    """Take the deployment down: the whole cluster when this process started it, else only `name` (other
    applications on a joined cluster keep running)."""
    ray, serve = _ray()
    if started or name is None:
        serve.shutdown()
    else:
        serve.delete(name)
        try:
            ray.kill(ray.get_actor(f"{BOARD_NAME}-{name}", namespace="serve"))
        except ValueError:  # never created
            pass
    if started:
        ray.shutdown()


def serve_cluster(engine_dirs, settings, opts: ClusterOptions, *, cluster: str, host: str, port: int,
                  load_kwargs: dict, on_listen=None, on_stop=None) -> None:
    """`vila-edge serve --cluster`: deploy, then wait for Ctrl-C / SIGTERM and take the deployment down."""
    import signal

    if len(engine_dirs) != 1:
        raise VilaEdgeError("--cluster serves one model (one deployment); start one `vila-edge serve --cluster` "
                            "per model, each on its own cluster or --port")
    stop = threading.Event()
    started = connect(cluster)
    # after ray.init, which installs its own handlers (SIGTERM: a C++ one that aborts the process)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    name = Path(engine_dirs[0]).resolve().name
    try:
        url = deploy(engine_dirs[0], settings, opts, host=host, port=port, load_kwargs=load_kwargs, name=name)
        if on_listen is not None:
            on_listen(url)
        while not stop.wait(0.5):
            pass
    finally:
        shutdown(started, name)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if on_stop is not None:
        on_stop()
