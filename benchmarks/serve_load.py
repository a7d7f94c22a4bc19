"""Load test of `vila-edge serve`: many concurrent clients against one batch-1 engine, loopback only.

    python benchmarks/serve_load.py                      # tiny NVILA fixture engine, 50 clients x 4 requests x 3 rounds
    python benchmarks/serve_load.py --engine DIR --clients 50 --requests 4

The server is the real CLI (`python -m vila_edge.cli serve ENGINE --port 0`) in a subprocess on 127.0.0.1.
Each round, `clients` concurrent clients send `requests` chat requests each, one after another (half of the
clients stream, half do not; half of the requests carry an image as a data URL); `abandon` extra clients
open a stream and hang up after the first chunk. Checked:
- every accepted request (HTTP 200) completes with the FULL answer: the same text and finish reason as the
  same request sent alone before the load (greedy decoding, so it is deterministic);
- every other request gets 429 with Retry-After (no 5xx, no dropped connection);
- the server is idle after each round (queue 0, nothing running: abandoned streams freed the engine);
- the server's resident memory (RSS) is flat: growth from the end of round 1 to the end of the last round;
- the server exits cleanly on SIGTERM.
Bounded: at most `time_limit` seconds in all; each request has a client timeout.
Results: benchmarks/results/serve_load.json and serve_load.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RSS_FLAT_MB = 16.0  # allowed RSS growth between the end of round 1 and the end of the last round


def build_fixture_engine(work: Path) -> tuple[Path, str]:
    """The tiny NVILA checkpoint built into an engine directory by the builder (fp32, as the tests do)."""
    from vila_edge.builder.build import build_engine_dir
    from vila_edge.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint("nvila", work / "tiny-nvila-ckpt", seed=0)
    out = work / "tiny-nvila"
    if out.exists():
        return out, "cached"
    build_engine_dir(ckpt, out, precision="fp32", progress=False)
    return out, "vila_edge.builder"


def _png_data_url() -> str:
    from PIL import Image

    img = Image.new("RGB", (160, 120), (30, 90, 200))
    img.paste((230, 40, 40), (40, 30, 100, 90))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _variants(model: str, max_tokens: int) -> list[dict]:
    url = _png_data_url()
    return [
        {"model": model, "max_tokens": max_tokens, "temperature": 0,
         "messages": [{"role": "user", "content": "Write a short story about a robot."}]},
        {"model": model, "max_tokens": max_tokens, "temperature": 0,
         "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                                   {"type": "image_url", "image_url": {"url": url}}]}]},
    ]


class Server:
    def __init__(self, engine_dir: Path, max_queue: int, max_tokens: int, timeout: float = 120, extra: tuple = ()):
        cmd = [sys.executable, "-m", "vila_edge.cli", "serve", str(engine_dir), "--host", "127.0.0.1", "--port", "0",
               "--max-queue", str(max_queue), "--max-tokens", str(max_tokens), "--log-level", "warning", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.stderr: list[str] = []
        self.url = None
        deadline = time.monotonic() + timeout
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise RuntimeError("the server exited before listening:\n" + "".join(self.stderr))
            self.stderr.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            if m:
                self.url = m.group(1)
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self, wait: float = 20) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def _error_of(body: bytes) -> dict:
    """The OpenAI error object of a response body; a body that is not one (a proxy's plain text) as its message."""
    try:
        return json.loads(body).get("error", {})
    except (ValueError, AttributeError):
        return {"message": body.decode("utf-8", "replace")[:200]}


async def _one(client, url: str, body: dict, stream: bool) -> dict:
    t0 = time.perf_counter()
    out = {"stream": stream}
    if not stream:
        r = await client.post(url, json=body)
        out["status"] = r.status_code
        out["latency"] = time.perf_counter() - t0
        if r.status_code == 200:
            j = r.json()
            out["text"] = j["choices"][0]["message"]["content"]
            out["finish"] = j["choices"][0]["finish_reason"]
        else:
            out["error"] = _error_of(r.content)
            out["retry_after"] = r.headers.get("retry-after")
        return out
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        out["status"] = r.status_code
        if r.status_code != 200:
            out["error"] = _error_of(await r.aread())
            out["retry_after"] = r.headers.get("retry-after")
            out["latency"] = time.perf_counter() - t0
            return out
        text, finish, done = "", None, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                out["error"] = ev["error"]
                break
            for ch in ev["choices"]:
                if ch["delta"].get("content"):
                    if "ttft" not in out:
                        out["ttft"] = time.perf_counter() - t0
                    text += ch["delta"]["content"]
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
        out.update(text=text, finish=finish, done=done, latency=time.perf_counter() - t0)
        return out


async def _abandon(client, url: str, body: dict) -> str:
    """Open a stream and hang up after the first chunk."""
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return str(r.status_code)
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                return "abandoned"
    return "ended"


async def _round(url: str, variants: list[dict], refs: list[tuple[str, str]], clients: int, per_client: int,
                 abandon: int, request_timeout: float, proxy_429: bool = False) -> dict:
    """One round of load. `proxy_429`: a 429 with Retry-After from a proxy in front of the servers (Ray Serve's
    backpressure: plain text, no OpenAI error code) is a rejection too, counted apart."""
    import httpx

    results: list[dict] = []
    problems: list[str] = []
    limits = httpx.Limits(max_connections=clients + abandon + 8, max_keepalive_connections=clients + abandon + 8)
    async with httpx.AsyncClient(limits=limits, timeout=request_timeout, trust_env=False) as client:
        chat = url + "/v1/chat/completions"

        async def worker(i: int):
            for j in range(per_client):
                v = (i + j) % len(variants)
                try:
                    res = await _one(client, chat, variants[v], stream=i % 2 == 0)
                except Exception as exc:  # noqa: BLE001 - a dropped connection is a failure we count
                    res = {"status": -1, "error": {"message": f"{type(exc).__name__}: {exc}"}}
                res["variant"] = v
                results.append(res)

        t0 = time.perf_counter()
        tasks = [worker(i) for i in range(clients)]
        tasks += [_abandon(client, chat, variants[k % len(variants)]) for k in range(abandon)]
        outs = await asyncio.gather(*tasks, return_exceptions=True)
        seconds = time.perf_counter() - t0
    abandoned = [o for o in outs[clients:]]
    completed = wrong = rejected = by_proxy = other = 0
    for r in results:
        if r["status"] == 200 and "error" not in r:
            ref_text, ref_finish = refs[r["variant"]]
            if r["text"] == ref_text and r["finish"] == ref_finish and r.get("done", True):
                completed += 1
            else:
                wrong += 1
                problems.append(f"incomplete or wrong answer (variant {r['variant']}, stream={r['stream']}): "
                                f"{r.get('text')!r} != {ref_text!r}")
        elif r["status"] == 429:
            if r.get("error", {}).get("code") == "queue_full" and (r.get("retry_after") or "").isdigit():
                rejected += 1
            elif proxy_429 and "code" not in r.get("error", {}) and (r.get("retry_after") or "").isdigit():
                rejected += 1
                by_proxy += 1
            else:
                other += 1
                problems.append(f"429 without the queue_full error / Retry-After: {r}")
        else:
            other += 1
            problems.append(f"unexpected result: status {r['status']} {r.get('error')}")
    lat = sorted(r["latency"] for r in results if r["status"] == 200 and "latency" in r)
    ttft = sorted(r["ttft"] for r in results if "ttft" in r)
    rej_lat = sorted(r["latency"] for r in results if r["status"] == 429 and "latency" in r)

    def pct(xs, p):
        return round(xs[min(len(xs) - 1, int(p * len(xs)))], 4) if xs else None

    return {"sent": len(results), "completed": completed, "rejected_429": rejected, "rejected_429_by_proxy": by_proxy,
            "wrong_answers": wrong,
            "other_errors": other, "abandoned_streams": sum(1 for a in abandoned if a == "abandoned"),
            "abandon_outcomes": [str(a) for a in abandoned], "seconds": round(seconds, 3),
            "completed_per_s": round(completed / seconds, 2) if seconds else None,
            "latency_s": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "max": pct(lat, 1.0)},
            "stream_ttft_s": {"p50": pct(ttft, 0.5), "p95": pct(ttft, 0.95)},
            "rejection_latency_s": {"p50": pct(rej_lat, 0.5), "max": pct(rej_lat, 1.0)},
            "problems": problems[:20]}


def _health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=10, trust_env=False).json()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def run(engine_dir: Path | None = None, *, clients: int = 50, requests_per_client: int = 4, max_queue: int = 8,
        max_tokens: int = 32, rounds: int = 3, abandon: int = 4, time_limit: float = 240.0,
        request_timeout: float = 60.0) -> dict:
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    start = time.monotonic()
    work = None
    built_with = "given"
    if engine_dir is None:
        work = Path(tempfile.mkdtemp(prefix="serve-load-"))
        engine_dir, built_with = build_fixture_engine(work)
    engine_dir = Path(engine_dir)
    srv = Server(engine_dir, max_queue=max_queue, max_tokens=max_tokens)
    problems: list[str] = []
    rounds_out = []
    try:
        model = _health(srv.url)["models"][0]
        variants = _variants(model, max_tokens)
        refs = []
        for body in variants:  # each request alone: the answer every accepted request must get
            j = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60, trust_env=False).json()
            refs.append((j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"]))
        rss_start = srv.rss_mb()
        for k in range(rounds):
            left = time_limit - (time.monotonic() - start)
            if left < 5:
                problems.append(f"time limit reached before round {k + 1}")
                break
            res = asyncio.run(asyncio.wait_for(
                _round(srv.url, variants, refs, clients, requests_per_client, abandon, request_timeout), left))
            idle = False
            for _ in range(100):
                h = _health(srv.url)
                if h["queue_length"] == 0 and h["active"] == 0:
                    idle = True
                    break
                time.sleep(0.05)
            res["idle_after"] = idle
            if not idle:
                problems.append(f"round {k + 1}: the server was still busy after the clients finished")
            res["rss_mb_after"] = round(srv.rss_mb(), 1)
            problems += [f"round {k + 1}: {p}" for p in res["problems"]]
            rounds_out.append(res)
        metrics_text = httpx.get(srv.url + "/metrics", timeout=10, trust_env=False).text
    finally:
        rc = srv.stop()
        if work is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    stderr = "".join(srv.stderr)
    # uvicorn re-raises SIGTERM after its graceful shutdown: -15 plus our "stopped" line is a clean stop
    if rc not in (0, -15) or "vila-edge: stopped" not in stderr:
        problems.append(f"server did not stop cleanly on SIGTERM (exit code {rc})")
    if "Traceback" in stderr:
        problems.append("server printed a traceback:\n" + stderr[-2000:])

    totals = {key: sum(r[key] for r in rounds_out) for key in
              ("sent", "completed", "rejected_429", "wrong_answers", "other_errors", "abandoned_streams")}
    rss_after = [r["rss_mb_after"] for r in rounds_out]
    growth = round(rss_after[-1] - rss_after[0], 1) if len(rss_after) > 1 else 0.0
    if len(rss_after) > 1 and growth > RSS_FLAT_MB:
        problems.append(f"RSS grew {growth} MB from round 1 to round {len(rss_after)} (limit {RSS_FLAT_MB} MB)")
    if totals["completed"] + totals["rejected_429"] != totals["sent"]:
        problems.append("some requests neither completed nor got 429")
    result = {
        "benchmark": "serve_load",
        "engine": engine_dir.name, "engine_built_with": built_with,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"clients": clients, "requests_per_client": requests_per_client, "abandoning_clients": abandon,
                   "rounds": rounds, "max_queue": max_queue, "max_tokens": max_tokens, "time_limit_s": time_limit},
        "reference_answers": [{"variant": i, "chars": len(t), "finish_reason": f} for i, (t, f) in enumerate(refs)]
        if rounds_out else [],
        "rounds": rounds_out,
        "totals": totals,
        "rss_mb": {"after_warmup": round(rss_start, 1), "after_each_round": rss_after, "growth_round1_to_last": growth,
                   "flat_limit": RSS_FLAT_MB},
        "server_metrics": {k: _metric(metrics_text, k) for k in (
            "vila_edge_completion_tokens_total", "vila_edge_tokens_per_second", "vila_edge_queue_length",
            "vila_edge_time_to_first_token_seconds_count", "vila_edge_time_to_first_token_seconds_sum")}
        if rounds_out else {},
        "server_exit_code": rc,
        "seconds": round(time.monotonic() - start, 1),
        "problems": problems,
        "ok": not problems and bool(rounds_out),
    }
    return result


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(res, indent=2) + "\n")
    c, t, m = res["config"], res["totals"], res["rss_mb"]
    lines = [
        "# vila-edge serve: load test",
        "",
        f"`python benchmarks/serve_load.py` — engine `{res['engine']}` (built with {res['engine_built_with']}), "
        f"{res['machine']['cpus']} CPUs, loopback only. Result: **{'PASS' if res['ok'] else 'FAIL'}**.",
        "",
        f"{c['clients']} concurrent clients x {c['requests_per_client']} requests x {c['rounds']} rounds, plus "
        f"{c['abandoning_clients']} clients per round that hang up after the first streamed chunk; "
        f"`--max-queue {c['max_queue']}`, max_tokens {c['max_tokens']}, greedy. Half of the clients stream, half "
        "of the requests carry an image (data URL).",
        "",
        "| round | sent | completed (full answer) | 429 | wrong/incomplete | other errors | seconds | "
        "p50 / p95 latency (s) | stream TTFT p50 (s) | RSS after (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(res["rounds"], 1):
        lines.append(f"| {i} | {r['sent']} | {r['completed']} | {r['rejected_429']} | {r['wrong_answers']} | "
                     f"{r['other_errors']} | {r['seconds']} | {r['latency_s']['p50']} / {r['latency_s']['p95']} | "
                     f"{r['stream_ttft_s']['p50']} | {r['rss_mb_after']} |")
    lines += [
        f"| total | {t['sent']} | {t['completed']} | {t['rejected_429']} | {t['wrong_answers']} | "
        f"{t['other_errors']} | | | | |",
        "",
        f"- Every accepted request returned the same text and finish reason as the request sent alone: "
        f"{'yes' if t['wrong_answers'] == 0 else 'NO'}; the rest got 429 with Retry-After: "
        f"{'yes' if t['other_errors'] == 0 else 'NO'}.",
        f"- Server RSS: {m['after_warmup']} MB after warm-up, {m['after_each_round']} MB after each round; growth "
        f"round 1 -> last: {m['growth_round1_to_last']} MB (limit {m['flat_limit']} MB).",
        f"- Server idle after every round (abandoned streams freed the engine): "
        f"{all(r['idle_after'] for r in res['rounds'])}; exit code on SIGTERM: {res['server_exit_code']}.",
        f"- Wall time {res['seconds']} s. Latencies are from a small CPU machine that may be busy with other work: "
        "the checks above are the point of this test, not the speed of a random tiny model.",
    ]
    if res["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in res["problems"][:20]]
    (out / "serve_load.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, default=None, help="engine directory (default: tiny NVILA fixture)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=4, help="requests per client per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--abandon", type=int, default=4, help="extra clients per round that hang up mid-stream")
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds for the whole run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    res = run(a.engine, clients=a.clients, requests_per_client=a.requests, max_queue=a.max_queue,
              max_tokens=a.max_tokens, rounds=a.rounds, abandon=a.abandon, time_limit=a.time_limit)
    write_results(res, a.out)
    print((a.out / "serve_load.md").read_text())
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
