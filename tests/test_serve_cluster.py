"""`vila-edge serve --cluster`: the server as a Ray Serve deployment (vila_edge.serve.cluster).

The cluster test starts a real local Ray cluster (2 CPUs), deploys the tiny NVILA engine directory with 2
replicas, talks to Ray's HTTP proxy with the official openai client (streamed and not, with an image),
kills one replica's process by PID under load and checks that Ray replaces it, that only requests that
were on the killed replica failed (each with an error, none hanging) and that everything else got the
answer the engine gives when called directly. Skipped only when Ray is not installed (the `ray` extra).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest_runtime import runtime_engine  # noqa: E402,F401  (session fixture: tiny engine directories)
from test_serve import LIMITS, direct_answer, image_message, png_bytes  # noqa: E402

from vila_edge.engine_dir import read_manifest  # noqa: E402
from vila_edge.plan import load_profile, plan  # noqa: E402
from vila_edge.serve import cluster  # noqa: E402
from vila_edge.serve.app import ServeSettings  # noqa: E402
from vila_edge.serve.engine import PipelineEngine  # noqa: E402
from vila_edge.serve.metrics import ServerMetrics  # noqa: E402

MAX_QUEUE = 4


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# ---------------------------------------------------------------------------------------------
# without Ray: the totals and the resources
# ---------------------------------------------------------------------------------------------


def _replica_metrics(tokens: int, queue: int, speed: float) -> str:
    m = ServerMetrics(lambda: queue, lambda: 1)
    m.completion_tokens.inc(tokens)
    m.requests.inc(2, "/v1/chat/completions", "200")
    m.ttft.observe(0.2)
    m.tokens_per_second.set(speed)
    return m.render()


def test_merge_metrics_sums_counters_and_live_gauges():
    a, b, dead = _replica_metrics(10, 2, 30.0), _replica_metrics(5, 1, 10.0), _replica_metrics(7, 3, 99.0)
    merged = cluster.merge_metrics([a, b], [dead])
    assert metric(merged, "vila_edge_completion_tokens_total") == 22  # the dead replica's tokens stay counted
    assert 'vila_edge_http_requests_total{route="/v1/chat/completions",status="200"} 6' in merged
    assert metric(merged, "vila_edge_time_to_first_token_seconds_count") == 3
    assert 'vila_edge_time_to_first_token_seconds_bucket{le="0.25"} 3' in merged
    assert metric(merged, "vila_edge_queue_length") == 3  # gauges: live replicas only
    assert metric(merged, "vila_edge_active_generations") == 2
    assert metric(merged, "vila_edge_tokens_per_second") == 20.0  # a speed: averaged, not summed
    assert metric(merged, "vila_edge_replicas") == 2
    assert merged.count("# TYPE vila_edge_completion_tokens_total counter") == 1


def test_replica_resources_from_the_plan(runtime_engine):  # noqa: F811
    engine_dir = runtime_engine("nvila")
    manifest = read_manifest(engine_dir)
    cfg, precision = manifest.config, manifest.options["llm_precision"]
    cpu = cluster.engine_resources(engine_dir, cluster.ClusterOptions(threads=2))
    assert cpu["num_cpus"] == 2 and "num_gpus" not in cpu
    from vila_edge.plan import host_profile

    assert cpu["memory"] == plan(cfg, host_profile(1.0, 1.0, memory_gib=1.0), llm_precision=precision,
                                 suggest=False).memory["total"]
    orin = load_profile("orin-nano-8gb")
    gpu = cluster.replica_resources(cfg, llm_precision=precision, gpu=True, threads=1, node_profile="orin-nano-8gb")
    need = plan(cfg, orin, llm_precision=precision, suggest=False).memory["total"]
    assert gpu["memory"] == need  # a Jetson's GPU memory is the host's
    assert need / orin.usable_bytes <= gpu["num_gpus"] <= need / orin.usable_bytes + 0.01
    whole = cluster.replica_resources(cfg, llm_precision=precision, gpu=True, threads=1)
    assert whole["num_gpus"] == 1.0 and "memory" not in whole
    with pytest.raises(cluster.VilaEdgeError, match="--node-profile orin-nano-8gb is a GPU profile"):
        cluster.replica_resources(cfg, llm_precision=precision, gpu=False, threads=1, node_profile="orin-nano-8gb")


# ---------------------------------------------------------------------------------------------
# a local Ray cluster
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(runtime_engine):  # noqa: F811
    pytest.importorskip("ray", reason="the `ray` extra (ray[serve]) is not installed")
    pytest.importorskip("ray.serve", reason="the `ray` extra (ray[serve]) is not installed")
    engine_dir = runtime_engine("nvila")
    started = cluster.connect("local", num_cpus=2, object_store_memory=100 * 2**20)
    try:
        url = cluster.deploy(engine_dir, ServeSettings(limits=LIMITS, max_queue=MAX_QUEUE),
                             cluster.ClusterOptions(replicas=2, max_queue=MAX_QUEUE, health_check_period_s=1),
                             port=0, name="tiny-nvila")
        yield url, engine_dir
    finally:
        cluster.shutdown(started)


@pytest.mark.slow
def test_two_replicas_openai_client_and_failover(deployed):
    openai = pytest.importorskip("openai")
    url, engine_dir = deployed
    local = PipelineEngine.load(engine_dir)
    expected = direct_answer(local, "What is in the picture?", [png_bytes()], 8)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    model = engine_dir.name  # the engine folder's name, as with `vila-edge serve`
    kw = dict(model=model, messages=image_message(), max_tokens=8, temperature=0)

    # the same answers as the engine called directly, streamed and not
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == expected and r.model == model
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens

    # /health and /metrics speak for both replicas
    health = httpx.get(url + "/health", timeout=10).json()
    assert len(health["replicas"]) == 2 and health["max_queue"] == 2 * MAX_QUEUE
    want = 2 * r.usage.completion_tokens
    for _ in range(50):  # the other replica's figures arrive within one report interval
        tokens = metric(httpx.get(url + "/metrics", timeout=10).text, "vila_edge_completion_tokens_total")
        if tokens == want:
            break
        time.sleep(0.1)
    assert tokens == want
    assert httpx.post(url + "/v1/chat/completions", content="{}", timeout=10).status_code == 415  # the app's guard

    # under load, one replica's process is killed
    outcomes: list[dict] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        n = 0
        while not stop.is_set():
            stream, n = (i + n) % 2 == 0, n + 1
            out = {"stream": stream, "t0": time.monotonic()}
            try:
                raw = client.chat.completions.with_raw_response.create(stream=stream, **kw)
                out["replica"] = raw.headers.get(cluster.REPLICA_HEADER)
                res = raw.parse()
                out["text"] = ("".join(c.choices[0].delta.content or "" for c in res if c.choices) if stream
                               else res.choices[0].message.content)
            except openai.APITimeoutError as exc:  # a hang: never acceptable
                out["hang"] = repr(exc)
            except (openai.APIError, httpx.HTTPError) as exc:
                out["error"] = f"{type(exc).__name__}: {exc}"
            out["t1"] = time.monotonic()
            outcomes.append(out)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()

    def wait_for(cond, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return False

    assert wait_for(lambda: sum("text" in o for o in outcomes) >= 8, 60)
    victim = health["replicas"][0]
    tokens_before = metric(httpx.get(url + "/metrics", timeout=10).text, "vila_edge_completion_tokens_total")
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        reps = httpx.get(url + "/health", timeout=10).json().get("replicas", [])
        return len(reps) == 2 and victim["pid"] not in {r["pid"] for r in reps}

    assert wait_for(replaced, 90), "Ray did not replace the killed replica"
    recovered_at = time.monotonic()
    assert wait_for(lambda: sum("text" in o and o["t0"] > recovered_at for o in outcomes) >= 8, 60)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"

    assert not [o for o in outcomes if "hang" in o]
    assert all(o["text"] == expected for o in outcomes if "text" in o)
    failed = [o for o in outcomes if "error" in o]
    # only requests that were on the killed replica fail: those sent before it died (Ray had given it at most
    # max_ongoing_requests), never one sent once its replacement was up; a stream that failed came from it
    assert len(failed) <= MAX_QUEUE + 1 + cluster.HEALTH_SLOTS
    assert all(o["t0"] < recovered_at for o in failed)
    assert all(o.get("replica") in (None, victim["id"]) for o in failed)
    assert all(o["t1"] >= killed_at for o in failed), [o["error"] for o in failed]
    tokens_after = metric(httpx.get(url + "/metrics", timeout=10).text, "vila_edge_completion_tokens_total")
    assert tokens_after >= tokens_before  # the dead replica's counts stay in the totals
    print(f"failover: {len(failed)} failed of {len(outcomes)}; replaced in {recovered_at - killed_at:.1f} s")


def test_cluster_cli_refuses_a_camera_and_two_models(tmp_path):
    from typer.testing import CliRunner

    from vila_edge.cli import app

    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--cluster", "local", "--camera", "0"])
    assert isinstance(res.exception, cluster.VilaEdgeError) and "--camera" in str(res.exception)
    with pytest.raises(cluster.VilaEdgeError, match="one model"):
        cluster.serve_cluster([tmp_path, tmp_path], ServeSettings(), cluster.ClusterOptions(), cluster="local",
                              host="127.0.0.1", port=0, load_kwargs={})

