"""The child protocol: every engine runs in a fresh process (its peak RSS is the engine's alone).

The parent (`run_child`) writes a spec as JSON on the child's stdin; the child (`python -m vila_edge.bench
--child pipeline|llm`, or a peer script with `--child`) prints `PROGRESS <done> <total>` lines on stderr and
one line `VILA_EDGE_BENCH_RESULT <json>` on stdout. Also the inputs the children feed: a synthetic image
and a prompt of about N tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from vila_edge.bench.probes import default_threads
from vila_edge.engine_dir import LLM_DIR, is_engine_dir, read_manifest
from vila_edge.errors import VilaEdgeError

RESULT_MARK = "VILA_EDGE_BENCH_RESULT "


def synthetic_image(width: int, height: int, seed: int = 0):
    """A deterministic photo-like RGB image (smooth gradients + noise) of the given size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(1, width - 1), y / max(1, height - 1), 0.5 + 0.5 * np.sin((x + y) / 37.0)], axis=-1)
    img = np.clip(base * 200 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def prompt_of_tokens(tokenizer, n_tokens: int) -> str:
    """English text that the tokenizer encodes to about `n_tokens` tokens (before the chat template)."""
    from vila_edge.testing import corpus_text

    text = corpus_text(max(4000, n_tokens * 12))
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n_tokens:
        text = (text + "\n") * (n_tokens // max(1, len(ids)) + 1)
        ids = tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)


def _peak_rss() -> int:
    """Peak RSS of this process only. Linux folds the parent's peak into a child's ru_maxrss (execve keeps
    the larger of the two), so a contender started after an in-process build would report the build's peak;
    /proc/self/status VmHWM is the high-water mark of this process's own address space."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, Linux: KiB


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _progress(done: int, total: int) -> None:
    print(f"PROGRESS {done} {total}", file=sys.stderr, flush=True)


def llm_dir(path: Path) -> Path:
    """The LLM folder of an engine directory, or `path` itself when it is an LLM folder."""
    return path / LLM_DIR if is_engine_dir(path) and (path / LLM_DIR).is_dir() else path


def child_pipeline(spec: dict) -> dict:
    """Load one engine directory and run every (image size, prompt length) case."""
    import vila_edge

    t0 = time.perf_counter()
    # every run sends the same image and prompt: without the caches off, runs 2.. would time cache hits
    pipe = vila_edge.load(spec["engine"], device="cpu", threads=spec.get("threads"), vision_cache_mb=0,
                          prefix_reuse=False, vision_precision=spec.get("vision_precision"))
    load_s = time.perf_counter() - t0
    rss_load = _rss()
    cases = [(tuple(s), int(p)) for s in spec["image_sizes"] for p in spec["prompt_tokens"]]
    total = len(cases) * (spec["warmup"] + spec["runs"])
    done = 0
    out = []
    for (w, h), p in cases:
        img = synthetic_image(w, h)
        prompt = prompt_of_tokens(pipe.tokenizer, p)
        for _ in range(spec["warmup"]):
            pipe.generate(prompt, images=[img], max_new_tokens=spec["warmup_tokens"], ignore_eos=True)
            done += 1
            _progress(done, total)
        runs = []
        for _ in range(spec["runs"]):
            # benchmarking generates exactly new_tokens: a stop token must not end the run early
            res = pipe.generate(prompt, images=[img], max_new_tokens=spec["new_tokens"], ignore_eos=True)
            t = res.timings
            runs.append({"preprocess_s": t.preprocess, "vision_s": t.vision, "merge_projector_s": t.merge_projector,
                         "prefill_s": t.prefill, "ttft_s": t.ttft, "decode_s": t.decode,
                         "generated_tokens": t.generated_tokens, "tiles": t.tiles,
                         "prompt_positions": t.prompt_positions, "decode_tok_s": t.decode_tokens_per_s,
                         "finish_reason": res.finish_reason})
            done += 1
            _progress(done, total)
        out.append({"image": {"width": w, "height": h}, "prompt_tokens": p, "runs": runs})
    llm = pipe.llm
    kv = llm.kv_bytes() if hasattr(llm, "kv_bytes") else 0
    desc = pipe.describe()
    pipe.close()
    return {"cases": out, "load_s": load_s, "rss_after_load_bytes": rss_load, "peak_rss_bytes": _peak_rss(),
            "kv_cache_bytes": kv, "kv_bytes_per_position": kv // max(1, llm.max_context) if kv else 0,
            "describe": desc, "threads": spec.get("threads") or default_threads()}


def child_llm(spec: dict) -> dict:
    """Decode-only: prefill `prompt_tokens` random ids, then force `new_tokens` greedy tokens."""
    from vila_edge.backends.ort_llm import OrtLLMEngine

    path = Path(spec["engine"])
    info = read_manifest(path).llm if is_engine_dir(path) else {}  # else a bare LLM folder
    p, n = int(spec["prompt_tokens"][0]), int(spec["new_tokens"])
    max_ctx = int(spec.get("max_context") or p + n + 16)
    t0 = time.perf_counter()
    eng = OrtLLMEngine(llm_dir(path), info, device="cpu", threads=spec.get("threads"), max_context=max_ctx,
                       spinning=bool(spec.get("spinning", True)))
    load_s = time.perf_counter() - t0
    rss_load = _rss()
    rng = np.random.default_rng(0)
    vocab = min(eng.vocab_size, eng.embed_table.shape[0])
    prompt = rng.integers(0, vocab, p)
    from vila_edge.generate import decode_one_token, timed_greedy_run, timed_runs

    def one(tokens: int) -> dict:
        eng.reset()
        x = eng.embed(prompt)
        return timed_greedy_run(lambda: eng.forward(x), lambda tok: decode_one_token(eng, tok),
                                lambda logits: int(np.argmax(logits[:vocab])), p, tokens)

    runs = timed_runs(one, warmup=spec["warmup"], warmup_tokens=spec["warmup_tokens"], runs=spec["runs"], tokens=n,
                      on_progress=_progress)
    desc = eng.describe()
    kv = eng.kv_bytes()
    return {"cases": [{"image": None, "prompt_tokens": p, "runs": runs}], "load_s": load_s,
            "rss_after_load_bytes": rss_load, "peak_rss_bytes": _peak_rss(), "kv_cache_bytes": kv,
            "kv_bytes_per_position": kv // max(1, eng.max_context),
            "describe": desc, "threads": spec.get("threads") or default_threads()}


def run_child(cmd: list[str], spec: dict, on_progress: Callable[[int, int], None] | None = None,
              timeout: float | None = None, env_extra: dict | None = None) -> dict:
    """Run a child benchmark command, feeding `spec` as JSON on stdin; returns its result dict."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdin and proc.stdout and proc.stderr
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    import threading

    out_lines: list[str] = []
    t = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)
    t.start()
    err_tail: list[str] = []
    for line in proc.stderr:
        if line.startswith("PROGRESS ") and on_progress:
            try:
                a, b = line.split()[1:3]
                on_progress(int(a), int(b))
            except ValueError:
                pass
        else:
            err_tail = (err_tail + [line.rstrip()])[-20:]
    rc = proc.wait(timeout=timeout)
    t.join()
    for line in reversed(out_lines):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise VilaEdgeError(f"benchmark child {' '.join(cmd[-2:])} failed (exit {rc}): "
                        + (" | ".join(x for x in err_tail if x.strip())[-600:] or "no output"))


def child_entry(kind_fn: Callable[[dict], dict]) -> None:
    """Entry point of a child process: spec on stdin, result line on stdout."""
    spec = json.loads(sys.stdin.read())
    res = kind_fn(spec)
    print(RESULT_MARK + json.dumps(res, default=str), flush=True)


def self_cmd(kind: str) -> list[str]:
    return [sys.executable, "-m", "vila_edge.bench", "--child", kind]


def main(argv: list[str] | None = None) -> None:
    """`python -m vila_edge.bench --child pipeline|llm` (vila_edge/bench/__main__.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        fn = {"pipeline": child_pipeline, "llm": child_llm}[argv[1]]
        child_entry(fn)
        return
    raise SystemExit("usage: python -m vila_edge.bench --child pipeline|llm  (use `vila-edge bench` instead)")
