"""TTFT of `vila-edge serve` with the encoder-output cache and prefix KV reuse vs without, in one run.

    python benchmarks/serve_cache.py --engine engines/vila-edge-demo-smollm2-135m   # the demo model's engines
    python benchmarks/serve_cache.py                                                # tiny NVILA fixture engine

Two servers run the same engine side by side (the real CLI in subprocesses, loopback only): `cached` with the
defaults (vision cache 256 MiB, prefix reuse on) and `uncached` with `--vision-cache-mb 0 --no-prefix-reuse`.
Requests go one at a time, alternating between the servers (the same load on the machine for both), streamed;
TTFT is measured by the client, from sending the request to the first content chunk.

- same image: the same request (one image as a data URL + a question) sent `--repeats` times;
- same image, new question: the same image with a different question each time (the vision cache and the
  shared start of the prompt, up to the question);
- conversation: an OpenAI multi-turn chat about one image, the client resending the whole conversation and the
  image with every turn (`--turns` turns).
The answers of the two servers must be identical (greedy decoding; the caches change nothing but the time).
Results: benchmarks/results/serve_cache.json, serve_cache.md and serve_cache.png.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (the server subprocess, the streaming client, the fixture engine)

ROOT = Path(__file__).resolve().parents[1]
UNCACHED = ("--vision-cache-mb", "0", "--no-prefix-reuse")
QUESTIONS = ("What is in the image?", "What colour is the shape?", "Where is the shape?", "Describe the image.",
             "How many shapes are there?", "What is the background colour?", "Is the shape large or small?",
             "What shape is it?", "Is there any text?", "What stands out?")
FOLLOW_UPS = ("What colour is it?", "And the background?", "Where exactly?", "Anything else?", "Sum it up.",
              "Is it large?", "Thanks. One more detail?", "What shape is it?")


def image_data_url(size=(640, 480), seed: int = 0) -> str:
    """A photo-sized PNG: a noisy background with a few coloured shapes (not compressible to nothing)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(60, 200, (size[1], size[0], 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    d = min(size) // 4
    for _ in range(3):
        x, y = int(rng.integers(0, size[0] - d)), int(rng.integers(0, size[1] - d))
        draw.ellipse((x, y, x + d, y + d), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user_turn(text: str, url: str | None = None) -> dict:
    if url is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


async def ask(client, srv, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: {"ttft": s, "text": answer}."""
    body = {"model": srv.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    out = await serve_load._one(client, srv.url + "/v1/chat/completions", body, stream=True)
    if out.get("status") != 200 or "ttft" not in out:
        raise RuntimeError(f"request failed: {out.get('status')} {out.get('error')}")
    return {"ttft": out["ttft"], "text": out["text"]}


async def both(client, servers: dict, messages: dict | list, max_tokens: int, k: int) -> dict:
    """The same request to each server, one after the other; who goes first alternates with `k`."""
    names = list(servers) if k % 2 == 0 else list(servers)[::-1]
    got = {}
    for name in names:
        msgs = messages[name] if isinstance(messages, dict) else messages
        got[name] = await ask(client, servers[name], msgs, max_tokens)
    return got


async def scenarios(servers: dict, *, repeats: int, turns: int, max_tokens: int, image_size) -> dict:
    import httpx

    url = image_data_url(image_size, seed=1)
    out: dict = {}
    async with httpx.AsyncClient(timeout=300, trust_env=False) as client:
        warm = [user_turn("What is in the image?", image_data_url(image_size, seed=99))]
        await both(client, servers, warm, max_tokens, 0)  # sessions warm, first-call costs paid on both

        same = [user_turn(QUESTIONS[0], url)]
        out["same_image"] = [await both(client, servers, same, max_tokens, k) for k in range(repeats)]
        url2 = image_data_url(image_size, seed=2)  # a new image: its first request is a miss on both servers
        out["same_image_new_question"] = [
            await both(client, servers, [user_turn(QUESTIONS[k % len(QUESTIONS)], url2)], max_tokens, k)
            for k in range(repeats)]

        url3 = image_data_url(image_size, seed=3)
        history = {name: [user_turn("Describe the image.", url3)] for name in servers}
        conv = []
        for k in range(turns):
            got = await both(client, servers, history, max_tokens, k)
            conv.append(got)
            for name in servers:
                history[name] += [{"role": "assistant", "content": got[name]["text"]},
                                  user_turn(FOLLOW_UPS[k % len(FOLLOW_UPS)])]
        out["conversation"] = conv
        out["stats"] = {name: (await client.get(srv.url + "/stats")).json() for name, srv in servers.items()}
    return out


def summarize(runs: list[dict]) -> dict:
    c = [r["cached"]["ttft"] for r in runs]
    u = [r["uncached"]["ttft"] for r in runs]
    mc, mu = statistics.median(c), statistics.median(u)
    return {"ttft_s": {"cached": [round(x, 4) for x in c], "uncached": [round(x, 4) for x in u]},
            "median_s": {"cached": round(mc, 4), "uncached": round(mu, 4)},
            "median_after_first_s": {"cached": round(statistics.median(c[1:]), 4) if len(c) > 1 else None,
                                     "uncached": round(statistics.median(u[1:]), 4) if len(u) > 1 else None},
            "speedup_median": round(mu / mc, 2) if mc > 0 else None,
            "answers_identical": all(r["cached"]["text"] == r["uncached"]["text"] for r in runs)}


def run(engine_dir: Path | None, *, repeats: int, turns: int, max_tokens: int, image_size) -> dict:
    start = time.monotonic()
    work = None
    if engine_dir is None:
        work = Path(tempfile.mkdtemp(prefix="vila-edge-serve-cache-"))
        engine_dir, built_with = serve_load.build_fixture_engine(work)
    else:
        built_with = "given"
    servers = {}
    try:
        servers["cached"] = serve_load.Server(engine_dir, max_queue=4, max_tokens=max_tokens)
        servers["uncached"] = serve_load.Server(engine_dir, max_queue=4, max_tokens=max_tokens, extra=UNCACHED)
        for srv in servers.values():
            srv.model = serve_load._health(srv.url)["models"][0]
        raw = asyncio.run(scenarios(servers, repeats=repeats, turns=turns, max_tokens=max_tokens,
                                    image_size=image_size))
    finally:
        for srv in servers.values():
            srv.stop()
        if work is not None:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    res = {
        "benchmark": "serve_cache", "engine": engine_dir.name, "engine_built_with": built_with,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"repeats": repeats, "turns": turns, "max_tokens": max_tokens, "image_size": list(image_size),
                   "uncached_server_flags": " ".join(UNCACHED)},
        "same_image": summarize(raw["same_image"]),
        "same_image_new_question": summarize(raw["same_image_new_question"]),
        "conversation": summarize(raw["conversation"]),
        "server_stats": raw["stats"],
        "goal": {"same_image_speedup_median": 5.0},
        "seconds": round(time.monotonic() - start, 1),
    }
    ok = res["same_image"]["speedup_median"] is not None and res["same_image"]["speedup_median"] >= 5.0
    res["ok"] = ok and all(res[k]["answers_identical"] for k in ("same_image", "same_image_new_question",
                                                                 "conversation"))
    return res


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, xlabel in zip(axes, ("same_image", "same_image_new_question", "conversation"),
                               ("request", "request (new question each)", "turn"), strict=True):
        t = res[key]["ttft_s"]
        xs = range(1, len(t["cached"]) + 1)
        ax.plot(xs, [v * 1000 for v in t["uncached"]], "o-", label="no caches")
        ax.plot(xs, [v * 1000 for v in t["cached"]], "o-", label="vision cache + prefix reuse")
        ax.set_title(f"{key.replace('_', ' ')}: {res[key]['speedup_median']}x lower median TTFT")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("TTFT (ms)")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(f"vila-edge serve, {res['engine']}, {res['machine']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_cache.json").write_text(json.dumps(res, indent=2) + "\n")
    try:
        plot(res, out / "serve_cache.png")
    except ImportError:  # matplotlib is optional
        pass
    c = res["config"]
    lines = [
        "# vila-edge serve: encoder-output cache and prefix KV reuse",
        "",
        f"`python benchmarks/serve_cache.py` — engine `{res['engine']}` ({res['engine_built_with']}), "
        f"{res['machine']['cpus']} CPUs, loopback. Two servers side by side, requests alternating between them: "
        f"**cached** (defaults: vision cache 256 MiB, prefix reuse) and **uncached** (`{c['uncached_server_flags']}`). "
        f"Streamed, greedy, max_tokens {c['max_tokens']}, a {c['image_size'][0]}x{c['image_size'][1]} PNG as a data "
        f"URL; TTFT measured by the client. Result: **{'PASS' if res['ok'] else 'FAIL'}** (goal: >= "
        f"{res['goal']['same_image_speedup_median']}x lower median TTFT for the same image sent {c['repeats']} times, "
        "identical answers).",
        "",
        "| scenario | median TTFT uncached (ms) | median TTFT cached (ms) | speedup | median after the first request "
        "(uncached / cached, ms) | answers identical |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in (("same_image", f"same request x{c['repeats']}"),
                      ("same_image_new_question", f"same image, new question x{c['repeats']}"),
                      ("conversation", f"{c['turns']}-turn conversation, image resent each turn")):
        s = res[key]
        a = s["median_after_first_s"]
        lines.append(f"| {name} | {s['median_s']['uncached'] * 1000:.1f} | {s['median_s']['cached'] * 1000:.1f} | "
                     f"{s['speedup_median']}x | {a['uncached'] * 1000:.1f} / {a['cached'] * 1000:.1f} | "
                     f"{s['answers_identical']} |")
    t = res["conversation"]["ttft_s"]
    lines += ["", "Conversation, TTFT per turn (ms):", "", "| turn | " + " | ".join(str(i + 1) for i in range(len(t["cached"])))
              + " |", "|---|" + "---|" * len(t["cached"]),
              "| uncached | " + " | ".join(f"{v * 1000:.1f}" for v in t["uncached"]) + " |",
              "| cached | " + " | ".join(f"{v * 1000:.1f}" for v in t["cached"]) + " |"]
    s = res["server_stats"]["cached"]
    v, p = s.get("vision_cache", {}), s.get("prefill", {})
    lines += ["", f"Cached server's `/stats` at the end: vision cache {v.get('hits')} hits / {v.get('misses')} misses, "
              f"{v.get('entries')} entries, {v.get('bytes')} bytes; {p.get('prefilled_positions')} positions prefilled, "
              f"{p.get('reused_positions')} reused from the KV cache (the uncached server: "
              f"{res['server_stats']['uncached'].get('prefill', {}).get('reused_positions')} reused).",
              "", f"Wall time {res['seconds']} s. A small shared CPU machine: absolute times are noisy; both servers "
              "ran under the same load, interleaved."]
    (out / "serve_cache.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, default=None, help="engine directory (default: tiny NVILA fixture)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--image-size", default="640x480")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    a = ap.parse_args(argv)
    w, h = (int(x) for x in a.image_size.lower().split("x"))
    res = run(a.engine, repeats=a.repeats, turns=a.turns, max_tokens=a.max_tokens, image_size=(w, h))
    write_results(res, a.out)
    print((a.out / "serve_cache.md").read_text())
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
