"""Benchmark core behind `vila-edge bench` and the scripts in benchmarks/.

What is measured, per engine and case (image size x prompt length):
- vision latency per tile, and time to first token split into preprocess / vision / merge+projector /
  prefill (the runtime's own per-stage timings);
- decode tokens/s: (generated - 1) / decode time over `new_tokens` (>= 128 by default) forced tokens
  (stop tokens are ignored while benchmarking), after an unmeasured warm-up; the median of `runs`
  runs, with min and max;
- peak resident memory of the process that ran the engine (each engine runs in a fresh child process,
  so loading or building anything else does not count);
- memory bandwidth (read, and STREAM-style copy) with numpy on 512 MiB arrays, one thread per engine
  thread, probed right after every run (bandwidth on shared VMs drifts: each run is reported as a share
  of the probe taken next to it), and a matmul probe (fp32 MatMul in ONNX Runtime, same threads);
- the decode roofline: bandwidth / (LLM weight bytes a token reads + KV bytes of the mean context),
  and the planner's prediction (vila_edge.plan) for this machine next to the measurement.

Several engines (or contenders: our LLM engine, llama.cpp, transformers) run interleaved in rounds.

Output: a rich table, a JSON document valid against benchmarks/schema/bench.schema.json, and a PNG.
A child process prints one line `VILA_EDGE_BENCH_RESULT <json>` on stdout and `PROGRESS <done> <total>`
lines on stderr; `python -m vila_edge.bench --child` reads its spec as JSON on stdin.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vila_edge.errors import VilaEdgeError

SCHEMA_ID = "vila-edge-bench/1"
RESULT_MARK = "VILA_EDGE_BENCH_RESULT "
MIB = 1 << 20


@dataclass
class BenchOptions:
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(1920, 1080)])
    prompt_tokens: list[int] = field(default_factory=lambda: [32])
    new_tokens: int = 128
    runs: int = 3
    warmup: int = 1
    warmup_tokens: int = 16
    threads: int | None = None
    device: str | None = None  # also predict for this device profile
    llm_only: bool = False
    bandwidth_mib: int = 512
    max_context: int | None = None  # LLM-only: KV positions to allocate (default prompt + new + 16)


# ---------------------------------------------------------------------------------------------
# Machine, versions
# ---------------------------------------------------------------------------------------------


def default_threads() -> int:
    from vila_edge.backends.ort_llm import default_threads as d

    return d()


def machine_info() -> dict:
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        fl = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd")
                         if f" {f}" in fl)
    except (OSError, StopIteration):
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "physical_cores": psutil.cpu_count(logical=False) or 0,
        "logical_cores": psutil.cpu_count(logical=True) or 0,
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 2),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": load,
        "gpu": "none",
    }


def versions() -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("vila-edge", "numpy", "onnxruntime", "onnxruntime-genai", "onnx", "tokenizers", "torch",
                "transformers", "llama_cpp_python", "gguf"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = "unknown"
    return out


# ---------------------------------------------------------------------------------------------
# Probes
# ---------------------------------------------------------------------------------------------


def measure_bandwidth(threads: int | None = None, size_mib: int = 512, repeats: int = 5) -> dict:
    """Best-of-`repeats` memory bandwidth with numpy over `threads` threads (numpy releases the GIL).

    read: `max` over float64 chunks (vectorised, memory bound); copy: `copyto` counted STREAM-style
    (bytes read + bytes written).
    """
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or default_threads()
    n = size_mib * MIB // 8
    a = np.ones(n, dtype=np.float64)
    b = np.zeros(n, dtype=np.float64)  # both touched: pages resident before timing
    sa, sb = np.array_split(a, threads), np.array_split(b, threads)

    def best(fn) -> float:
        t = math.inf
        for _ in range(repeats):
            s = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - s)
        return t

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(lambda c: c.max(), sa))  # warm the pool
        t_read = best(lambda: list(ex.map(lambda c: c.max(), sa)))
        t_copy = best(lambda: list(ex.map(lambda p: np.copyto(p[0], p[1]), zip(sb, sa, strict=True))))
    del a, b
    return {"read_gbs": round(a_bytes(n) / t_read / 1e9, 3), "copy_gbs": round(2 * a_bytes(n) / t_copy / 1e9, 3),
            "threads": threads, "size_mib": size_mib, "time": round(time.time(), 3)}


def a_bytes(n: int) -> int:
    return 8 * n


def measure_matmul(threads: int | None = None, n: int = 1024, repeats: int = 5) -> dict:
    """fp32 MatMul throughput in ONNX Runtime ([n, n] x [n, n]) with `threads` intra-op threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    threads = threads or default_threads()
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    t = math.inf
    for _ in range(repeats):
        s = time.perf_counter()
        sess.run(None, feeds)
        t = min(t, time.perf_counter() - s)
    return {"fp32_tflops": round(2 * n ** 3 / t / 1e12, 4), "threads": threads, "n": n}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


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


def stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}


def _peak_rss() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _progress(done: int, total: int) -> None:
    print(f"PROGRESS {done} {total}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Engine files
# ---------------------------------------------------------------------------------------------


def _llm_dir(path: Path) -> Path:
    """The LLM folder of an engine directory, or `path` itself when it is an LLM folder."""
    return path / "llm" if (path / "manifest.json").is_file() and (path / "llm").is_dir() else path


def llm_decode_bytes(path: Path) -> int:
    """Bytes of the LLM decoder files (graph + external weights): what one decode step reads.

    The embedding table (embed_tokens.npy, one row read per token) is not counted.
    """
    d = _llm_dir(Path(path))
    total = 0
    for f in d.iterdir():
        if f.is_file() and (f.suffix in (".onnx", ".data") or f.name.endswith(".onnx.data")):
            total += f.stat().st_size
    return total


def _genai_decoder(d: Path) -> dict:
    try:
        return json.loads((d / "genai_config.json").read_text())["model"]["decoder"]
    except (OSError, ValueError, KeyError):
        return {}


def kv_bytes_per_position(path: Path, config=None) -> int:
    if config is not None:
        return int(config.llm.kv_bytes_per_token_fp16)
    dec = _genai_decoder(_llm_dir(Path(path)))
    if dec:
        return 2 * int(dec["num_hidden_layers"]) * int(dec["num_key_value_heads"]) * int(dec["head_size"]) * 2
    return 0


def _engine_manifest(path: Path) -> dict:
    p = Path(path) / "manifest.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except ValueError:
            return {}
    return {}


def _manifest_summary(manifest: dict) -> dict:
    """The manifest without bulky fields (the resolved config stays: it is small)."""
    return {k: v for k, v in manifest.items() if k not in ("files", "hashes")} if manifest else {}


# ---------------------------------------------------------------------------------------------
# Children: one engine, fresh process
# ---------------------------------------------------------------------------------------------


def child_pipeline(spec: dict) -> dict:
    """Load one engine directory and run every (image size, prompt length) case."""
    import vila_edge

    t0 = time.perf_counter()
    pipe = vila_edge.load(spec["engine"], device="cpu", threads=spec.get("threads"))
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
    manifest = _engine_manifest(path)
    info = manifest.get("llm") if isinstance(manifest.get("llm"), dict) else {}
    p, n = int(spec["prompt_tokens"][0]), int(spec["new_tokens"])
    max_ctx = int(spec.get("max_context") or p + n + 16)
    t0 = time.perf_counter()
    eng = OrtLLMEngine(_llm_dir(path), info, device="cpu", threads=spec.get("threads"), max_context=max_ctx,
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


def _self_cmd(kind: str) -> list[str]:
    return [sys.executable, "-m", "vila_edge.bench", "--child", kind]


# ---------------------------------------------------------------------------------------------
# Contenders and the interleaved run
# ---------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """Something that decodes: our engine (pipeline or LLM-only) or a peer script."""

    name: str
    cmd: list[str]
    spec: dict
    weight_bytes: int  # bytes one decode step reads (weights)
    kv_bytes_per_position: int
    config: object = None  # VilaConfig when known (planner prediction)
    precision: str = "int4"
    manifest: dict = field(default_factory=dict)
    kind: str = "llm"  # "pipeline" | "llm" | "peer"
    env: dict = field(default_factory=dict)  # extra environment of its child process (e.g. OMP_WAIT_POLICY)


def engine_contender(path, opts: BenchOptions, *, name: str | None = None, config=None,
                     precision: str | None = None) -> Contender:
    path = Path(path)
    manifest = _engine_manifest(path)
    if config is None and manifest.get("config"):
        from vila_edge.config import config_from_json

        try:
            config = config_from_json(manifest["config"])
        except (TypeError, KeyError):
            config = None
    llm_info = manifest.get("llm") if isinstance(manifest.get("llm"), dict) else {}
    precision = precision or llm_info.get("precision") or manifest.get("llm_precision") or "int4"
    pipeline = (path / "manifest.json").is_file() and not opts.llm_only
    if not pipeline and not ((_llm_dir(path) / "genai_config.json").is_file() or llm_info):
        raise VilaEdgeError(f"{path}: neither an engine directory (manifest.json) nor an LLM folder (genai_config.json)")
    spec = {"engine": str(path), "image_sizes": [list(s) for s in opts.image_sizes],
            "prompt_tokens": list(opts.prompt_tokens), "new_tokens": opts.new_tokens, "runs": 1,
            "warmup": opts.warmup, "warmup_tokens": opts.warmup_tokens, "threads": opts.threads or default_threads(),
            "max_context": opts.max_context}
    return Contender(name=name or path.name, cmd=_self_cmd("pipeline" if pipeline else "llm"), spec=spec,
                     weight_bytes=llm_decode_bytes(path), kv_bytes_per_position=kv_bytes_per_position(path, config),
                     config=config, precision=precision, manifest=_manifest_summary(manifest),
                     kind="pipeline" if pipeline else "llm")


def run_interleaved(contenders: list[Contender], opts: BenchOptions, *, console=None) -> dict:
    """`opts.runs` rounds; each round runs every contender once (fresh process) then probes bandwidth."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    con = console or Console(stderr=True)
    threads = opts.threads or default_threads()
    results: dict[str, list[dict]] = {c.name: [] for c in contenders}
    probes: dict[str, list[dict]] = {c.name: [] for c in contenders}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=con, transient=False) as prog:
        overall = prog.add_task("rounds", total=opts.runs * len(contenders))
        matmul = measure_matmul(threads)
        for r in range(opts.runs):
            for c in contenders:
                task = prog.add_task(f"round {r + 1}/{opts.runs}: {c.name}", total=None)

                def cb(done, total, task=task):
                    prog.update(task, completed=done, total=total)

                res = run_child(c.cmd, c.spec, cb, env_extra=c.env)
                prog.update(task, description=f"round {r + 1}/{opts.runs}: {c.name} -> bandwidth probe")
                bw = measure_bandwidth(threads, opts.bandwidth_mib)
                res["bandwidth_after"] = bw
                results[c.name].append(res)
                probes[c.name].append(bw)
                prog.remove_task(task)
                prog.advance(overall)
    return {"results": results, "probes": probes, "matmul": matmul, "threads": threads}


def summarize(contenders: list[Contender], raw: dict, opts: BenchOptions) -> list[dict]:
    """One entry per contender x case: medians, min/max, roofline shares, predictions."""
    out = []
    for c in contenders:
        rounds = raw["results"][c.name]
        if not rounds:
            continue
        n_cases = len(rounds[0]["cases"])
        for k in range(n_cases):
            runs, shares, share_copy = [], [], []
            for rd in rounds:
                case = rd["cases"][k]
                bw = rd["bandwidth_after"]
                # the KV dtype the engine really allocated (ORT on CPU keeps fp32 KV) when it says so
                kvp = rd.get("kv_bytes_per_position") or c.kv_bytes_per_position
                for run in case["runs"]:
                    ctx = run["prompt_positions"] + run["generated_tokens"] / 2
                    per_tok = c.weight_bytes + kvp * ctx
                    roof = bw["read_gbs"] * 1e9 / per_tok if per_tok else 0.0
                    roof_copy = bw["copy_gbs"] * 1e9 / per_tok if per_tok else 0.0
                    run = dict(run, roofline_tok_s=roof, bandwidth_read_gbs=bw["read_gbs"],
                               bandwidth_copy_gbs=bw["copy_gbs"], mean_context=ctx, bytes_per_token=per_tok)
                    runs.append(run)
                    if roof:
                        shares.append(100 * run["decode_tok_s"] / roof)
                        share_copy.append(100 * run["decode_tok_s"] / roof_copy)
            case0 = rounds[0]["cases"][k]
            peak = max(rd["peak_rss_bytes"] for rd in rounds)
            kv_alloc = max(rd.get("kv_cache_bytes", 0) for rd in rounds)
            vision_b = _vision_bytes(Path(c.spec.get("engine", "")), rounds[0].get("describe", {})) \
                if c.kind == "pipeline" else 0
            resident = c.weight_bytes + vision_b + kv_alloc
            entry = {
                "name": c.name,
                "kind": c.kind,
                "engine": c.spec.get("engine") or c.spec.get("model", ""),
                "precision": c.precision,
                "image": case0["image"],
                "prompt_tokens": case0["prompt_tokens"],
                "new_tokens": opts.new_tokens,
                "threads": rounds[0].get("threads", raw["threads"]),
                "runs": runs,
                "decode_tok_s": stats([r["decode_tok_s"] for r in runs]),
                "prefill_s": stats([r["prefill_s"] for r in runs]),
                "ttft_ms": stats([1e3 * r["ttft_s"] for r in runs]),
                "roofline_share_pct": stats(shares),
                "roofline_share_copy_pct": stats(share_copy),
                "memory": {
                    "peak_rss_bytes": peak,
                    "rss_after_load_bytes": max(rd["rss_after_load_bytes"] for rd in rounds),
                    "weight_bytes": c.weight_bytes,
                    "vision_weight_bytes": vision_b,
                    "kv_cache_bytes": kv_alloc,
                    "peak_over_weights_plus_kv": peak / resident if resident else None,
                },
                "load_s": stats([rd["load_s"] for rd in rounds]),
                "describe": rounds[0].get("describe", {}),
            }
            if c.kind == "pipeline":
                tiles = [r["tiles"] for r in runs]
                entry["tiles"] = max(tiles) if tiles else 0
                entry["vision_ms_per_tile"] = stats([1e3 * r["vision_s"] / max(1, r["tiles"]) for r in runs])
                entry["ttft_split_ms"] = {
                    stage: statistics.median([1e3 * r[f"{stage}_s"] for r in runs])
                    for stage in ("preprocess", "vision", "merge_projector", "prefill")
                }
            out.append(entry)
    return out


def _vision_bytes(engine_dir: Path, describe: dict) -> int:
    """Bytes of the vision graphs the pipeline loaded (tower + projector, external data included)."""
    v = describe.get("vision", {}) if isinstance(describe, dict) else {}
    total = 0
    for key in ("tower", "projector"):
        name = v.get(key)
        if not isinstance(name, str):
            continue
        for f in (engine_dir / "vision" / name, engine_dir / "vision" / (name + ".data")):
            if f.is_file():
                total += f.stat().st_size
    return total


def predictions(contenders: list[Contender], summary: list[dict], raw: dict, opts: BenchOptions) -> list[dict]:
    """The planner's prediction for this machine (measured bandwidth + matmul rate) next to the measurement."""
    from vila_edge.plan import host_profile, plan

    bws = [p["read_gbs"] for ps in raw["probes"].values() for p in ps]
    if not bws:
        return []
    host = host_profile(statistics.median(bws), raw["matmul"]["fp32_tflops"])
    out = []
    by_name = {c.name: c for c in contenders}
    for s in summary:
        c = by_name.get(s["name"])
        if c is None or c.config is None:
            continue
        prec = c.precision if c.precision in ("int4", "int8", "fp16", "fp32", "bf16") else "int4"
        ctx = statistics.median([r["mean_context"] for r in s["runs"]])
        p = plan(c.config, host, max_context=max(int(ctx) + 1, 64), max_tiles=s.get("tiles") or None,
                 llm_precision=prec, suggest=False)
        w = p.detail["llm_decode_read_per_token"]
        pred_dec = host.decode_efficiency * host.bandwidth_gbs * 1e9 / (w + p.detail["kv_bytes_per_position"] * ctx)
        row = {"name": s["name"], "image": s["image"], "prompt_tokens": s["prompt_tokens"],
               "host_bandwidth_gbs": host.bandwidth_gbs, "host_fp32_tflops": host.fp32_tflops,
               "decode_efficiency": host.decode_efficiency, "vision_efficiency": host.vision_efficiency,
               "planner_weight_bytes": w, "measured_weight_bytes": c.weight_bytes,
               "decode_tok_s": {"predicted": pred_dec, "measured": s["decode_tok_s"]["median"],
                                "ratio": s["decode_tok_s"]["median"] / pred_dec if pred_dec else None}}
        if s.get("vision_ms_per_tile"):
            pv = p.predicted["vision_ms_per_tile"]
            mv = s["vision_ms_per_tile"]["median"]
            row["vision_ms_per_tile"] = {"predicted": pv, "measured": mv, "ratio": mv / pv if pv else None}
        if opts.device:
            q = plan(c.config, opts.device, llm_precision=prec if prec != "fp32" else "fp16", suggest=False)
            row["device"] = {"name": q.device.name, "fits": q.fits, "memory_total_bytes": q.memory["total"],
                             "usable_bytes": q.memory["usable"],
                             "decode_tok_s_ctx1k": q.predicted["decode_tok_s_ctx1k"],
                             "vision_ms_per_tile": q.predicted["vision_ms_per_tile"]}
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Report: document, table, chart
# ---------------------------------------------------------------------------------------------


def make_document(contenders: list[Contender], raw: dict, opts: BenchOptions, *, label: str,
                  peers_ratio: dict | None = None, notes: Sequence[str] = ()) -> dict:
    summary = summarize(contenders, raw, opts)
    doc = {
        "schema": SCHEMA_ID,
        "label": label,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(),
        "versions": versions(),
        "options": {**asdict(opts), "image_sizes": [list(s) for s in opts.image_sizes]},
        "engines": [{"name": c.name, "kind": c.kind, "path": c.spec.get("engine") or c.spec.get("model", ""),
                     "precision": c.precision, "manifest": c.manifest, "weight_bytes": c.weight_bytes,
                     "kv_bytes_per_position": c.kv_bytes_per_position} for c in contenders],
        "probes": {"bandwidth": [p for ps in raw["probes"].values() for p in ps], "matmul": raw["matmul"]},
        "results": summary,
        "predictions": predictions(contenders, summary, raw, opts),
        "ratios": peers_ratio or ratios(summary),
        "notes": list(notes),
    }
    return _scrub(json.loads(json.dumps(doc, default=_jsonable)))


def portable_path(p) -> str:
    """A path fit for a committed result: relative to the working directory when inside it, else
    `<work>/<name>` (no absolute machine paths in results)."""
    p = Path(str(p))
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return f"<work>/{p.name}"


def _scrub(obj):
    """Replace absolute paths in strings of a result document (engine paths, manifest entries)."""
    if isinstance(obj, dict):
        return {k: _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    if isinstance(obj, str) and obj.startswith("/") and len(obj) > 1 and " " not in obj:
        return portable_path(obj)
    return obj


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


def ratios(summary: list[dict]) -> list[dict]:
    """Decode and prefill speed of our engines relative to each peer (or to the first engine), per case."""
    if len(summary) < 2:
        return []
    peers = [s for s in summary if s["kind"] == "peer"]
    ours = [s for s in summary if s["kind"] != "peer"]
    if peers:
        pairs = [(o, p) for o in ours for p in peers]
    else:
        pairs = [(summary[0], s) for s in summary[1:] if s["name"] != summary[0]["name"]]
    out = []
    for b, s in pairs:
        if json.dumps(b["image"]) != json.dumps(s["image"]) or b["prompt_tokens"] != s["prompt_tokens"]:
            continue
        out.append({"baseline": b["name"], "other": s["name"],
                    "decode_ratio": b["decode_tok_s"]["median"] / s["decode_tok_s"]["median"]
                    if s["decode_tok_s"]["median"] else None,
                    "prefill_ratio": s["prefill_s"]["median"] / b["prefill_s"]["median"]
                    if b["prefill_s"]["median"] else None})
    return out


def print_report(doc: dict, console=None) -> None:
    from rich.table import Table

    con = console or _console()
    m = doc["machine"]
    con.print(f"[bold]{doc['label']}[/bold]  {m['cpu']} ({m['physical_cores']} cores, {m['memory_gib']} GiB), "
              f"threads {doc['options']['threads'] or doc['probes']['matmul']['threads']}, "
              f"onnxruntime {doc['versions'].get('onnxruntime', '?')}")
    t = Table(show_header=True)
    for col in ("engine", "case", "decode tok/s (min..max)", "% roofline", "TTFT ms", "TTFT split ms (pre/vis/proj/prefill)",
                "vision ms/tile", "peak RSS MiB", "weights+KV MiB (LLM+vision+KV)"):
        t.add_column(col, justify="right" if col != "engine" else "left")
    for s in doc["results"]:
        d = s["decode_tok_s"]
        case = (f"{s['image']['width']}x{s['image']['height']}, " if s["image"] else "") + f"{s['prompt_tokens']} tok"
        split = s.get("ttft_split_ms")
        split_s = "/".join(f"{split[k]:.0f}" for k in ("preprocess", "vision", "merge_projector", "prefill")) if split else "-"
        vis = s.get("vision_ms_per_tile")
        mem = s["memory"]
        t.add_row(s["name"], case, f"{d['median']:.2f} ({d['min']:.2f}..{d['max']:.2f})",
                  f"{s['roofline_share_pct']['median']:.0f}%" if s["roofline_share_pct"]["median"] else "-",
                  f"{s['ttft_ms']['median']:.0f}", split_s,
                  f"{vis['median']:.0f}" if vis else "-", f"{mem['peak_rss_bytes'] / MIB:.0f}",
                  f"{(mem['weight_bytes'] + mem.get('vision_weight_bytes', 0) + mem['kv_cache_bytes']) / MIB:.0f}")
    con.print(t)
    bws = [p["read_gbs"] for p in doc["probes"]["bandwidth"]]
    if bws:
        con.print(f"bandwidth probes (read GB/s): {', '.join(f'{b:.1f}' for b in bws)}; "
                  f"matmul fp32 {doc['probes']['matmul']['fp32_tflops'] * 1e3:.0f} GFLOPS")
    for r in doc["ratios"]:
        if r.get("decode_ratio"):
            con.print(f"decode {r['baseline']} / {r['other']}: [bold]{r['decode_ratio']:.2f}x[/bold]"
                      + (f", prefill {r['prefill_ratio']:.2f}x" if r.get("prefill_ratio") else ""))
    for p in doc["predictions"]:
        line = (f"planner for this machine ({p['host_bandwidth_gbs']:.1f} GB/s x {p['decode_efficiency']}): "
                f"{p['name']} decode predicted {p['decode_tok_s']['predicted']:.2f}, measured "
                f"{p['decode_tok_s']['measured']:.2f} tok/s")
        if p.get("vision_ms_per_tile"):
            v = p["vision_ms_per_tile"]
            line += f"; vision predicted {v['predicted']:.0f}, measured {v['measured']:.0f} ms/tile"
        con.print(line)
        if p.get("device"):
            dv = p["device"]
            con.print(f"  on {dv['name']}: {'fits' if dv['fits'] else 'does NOT fit'}, decode ~{dv['decode_tok_s_ctx1k']:.1f} "
                      f"tok/s @1k, vision ~{dv['vision_ms_per_tile']:.0f} ms/tile (predicted)")


def _console(stderr: bool = False):
    from rich.console import Console

    c = Console(stderr=stderr)
    return c if c.is_terminal else Console(stderr=stderr, width=170)


def write_chart(doc: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    labels = [(s["name"] + ("\n" + f"{s['image']['width']}x{s['image']['height']}" if s["image"] else "")
               + f"\n{s['prompt_tokens']} tok") for s in res]
    pipe = [s for s in res if s.get("ttft_split_ms")]
    ncols = 3 if pipe else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 4.2))
    x = np.arange(len(res))
    med = [s["decode_tok_s"]["median"] for s in res]
    lo = [s["decode_tok_s"]["median"] - s["decode_tok_s"]["min"] for s in res]
    hi = [s["decode_tok_s"]["max"] - s["decode_tok_s"]["median"] for s in res]
    ax = axes[0]
    ax.bar(x, med, yerr=[lo, hi], capsize=4, color="#4C72B0", label="measured (median, min..max)")
    roof = [statistics.median([r["roofline_tok_s"] for r in s["runs"]]) if s["runs"] else 0 for s in res]
    ax.scatter(x, roof, marker="_", s=600, color="#C44E52", label="bandwidth roofline", zorder=3)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decode ({doc['options']['new_tokens']} tokens)")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[1]
    peak = [s["memory"]["peak_rss_bytes"] / MIB for s in res]
    wkv = [(s["memory"]["weight_bytes"] + s["memory"].get("vision_weight_bytes", 0) + s["memory"]["kv_cache_bytes"]) / MIB
           for s in res]
    ax.bar(x - 0.2, peak, 0.4, label="peak RSS", color="#55A868")
    ax.bar(x + 0.2, wkv, 0.4, label="weights (LLM + vision) + KV", color="#8172B2")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("memory")
    ax.legend(fontsize=7)
    if pipe:
        ax = axes[2]
        xs = np.arange(len(pipe))
        bottom = np.zeros(len(pipe))
        for stage, color in (("preprocess", "#DD8452"), ("vision", "#4C72B0"), ("merge_projector", "#937860"),
                             ("prefill", "#55A868")):
            vals = np.array([s["ttft_split_ms"][stage] for s in pipe])
            ax.bar(xs, vals, bottom=bottom, label=stage.replace("_", "+"), color=color)
            bottom += vals
        ax.set_xticks(xs, [lb for s, lb in zip(res, labels, strict=True) if s.get("ttft_split_ms")], fontsize=7)
        ax.set_ylabel("ms")
        ax.set_title("time to first token")
        ax.legend(fontsize=7)
    m = doc["machine"]
    fig.suptitle(f"{doc['label']} — {m['cpu']}, {doc['probes']['matmul']['threads']} threads", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(doc: dict, out: Path, stem: str | None = None) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"bench_{doc['label']}_{time.strftime('%Y%m%d-%H%M%S')}"
    jp = out / f"{stem}.json"
    jp.write_text(json.dumps(doc, indent=2))
    pp = write_chart(doc, out / f"{stem}.png")
    return jp, pp


def schema_path() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks" / "schema" / "bench.schema.json"


def validate(doc: dict, schema_file: Path | None = None) -> None:
    """Validate against the JSON schema (needs `jsonschema`)."""
    import jsonschema

    schema = json.loads(Path(schema_file or schema_path()).read_text())
    jsonschema.validate(doc, schema)


# ---------------------------------------------------------------------------------------------
# Presets: checkpoint -> engine
# ---------------------------------------------------------------------------------------------


def ensure_preset_checkpoint(name: str, work_dir: Path, *, llm_only: bool = False, console=None) -> Path:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from vila_edge.presets import write_preset_checkpoint

    path = Path(work_dir) / (f"{name}-llm-only" if llm_only else name)
    if (path / "config.json").is_file():
        return path
    with Progress(TextColumn(f"writing {name} random checkpoint"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=console) as prog:
        task = prog.add_task("w", total=None)
        write_preset_checkpoint(name, path, parts=("llm",) if llm_only else ("llm", "vision_tower", "mm_projector"),
                                progress=lambda d, t: prog.update(task, completed=d, total=t))
    return path


def ensure_llm_engine(llm_src: Path, out: Path, precision: str = "int4", *, quant: str = "builder",
                      group_size: int = 128, **kw) -> Path:
    """The builder's ONNX LLM (vila_edge.builder.llm_onnx.build_llm_onnx) for an HF LLM folder, cached.

    Random weights need no AWQ search: `quant="builder"` is onnxruntime-genai's symmetric RTN int4
    with `group_size` blocks (same kernels and bytes as an AWQ build of that group size)."""
    out = Path(out)
    if (out / "genai_config.json").is_file():
        return out
    try:
        from vila_edge.builder.llm_onnx import build_llm_onnx
    except ImportError:
        raise VilaEdgeError("vila_edge.builder.llm_onnx is not available in this checkout; "
                            "build the LLM with `vila-edge build` first") from None
    build_llm_onnx(llm_src, out, precision=precision, quant=quant, group_size=group_size, **kw)
    return out


def ensure_preset_engine(name: str, work_dir: Path, console=None, threads: int | None = None) -> Path:
    """`vila-edge build` of the preset's random checkpoint (RTN int4: AWQ calibration is moot on random weights)."""
    ckpt = ensure_preset_checkpoint(name, work_dir, console=console)
    eng = Path(work_dir) / f"{name}-engine"
    if (eng / "manifest.json").is_file():
        return eng
    cmd = [sys.executable, "-m", "vila_edge.cli", "build", str(ckpt), "-o", str(eng), "--llm-quant", "rtn"]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise VilaEdgeError(f"`vila-edge build {ckpt} -o {eng}` failed (exit {r.returncode})")
    return eng


def run_bench_cli(engines: list[Path], opts: BenchOptions, *, out: Path, preset: str | None, work_dir: Path) -> dict:

    con = _console()
    err = _console(stderr=True)
    config = None
    if preset:
        from vila_edge.presets import preset_config

        config = preset_config(preset)
        if opts.llm_only:
            ckpt = ensure_preset_checkpoint(preset, work_dir, llm_only=True, console=err)
            engines = [ensure_llm_engine(ckpt / "llm", Path(work_dir) / f"{preset}-llm-int4")] + list(engines)
        else:
            engines = [ensure_preset_engine(preset, work_dir, console=err, threads=opts.threads)] + list(engines)
    if not engines:
        raise VilaEdgeError("give engine directories, or --preset NAME")
    if opts.new_tokens < 1 or opts.runs < 1:
        raise VilaEdgeError("--new-tokens and --runs must be at least 1")
    contenders = [engine_contender(e, opts, config=config if preset and k == 0 else None)
                  for k, e in enumerate(engines)]
    raw = run_interleaved(contenders, opts, console=err)
    label = (preset or contenders[0].name) + ("-llm" if opts.llm_only else "")
    doc = make_document(contenders, raw, opts, label=label)
    print_report(doc, con)
    jp, pp = write_outputs(doc, out)
    con.print(f"wrote {jp} and {pp}")
    return doc


# ---------------------------------------------------------------------------------------------
# LLM-only comparisons (benchmarks/llm_decode.py and benchmarks/peers/*.py)
# ---------------------------------------------------------------------------------------------


def llm_comparison_args(doc: str | None, argv=None, extra=None):
    import argparse

    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nvila-lite-2b", help="LLM geometry (vila_edge.presets)")
    ap.add_argument("--ours", type=Path, action="append", default=[],
                    help="our LLM folder or engine directory (repeatable; default: build with vila_edge.builder.llm_onnx)")
    ap.add_argument("--group-size", type=int, action="append", default=[],
                    help="int4 block size(s) of our builds when --ours is not given (32, 64, 128; default 128)")
    ap.add_argument("--threads", type=int, default=None, help="threads for every contender (default: physical cores)")
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="interleaved rounds (median, min, max reported)")
    ap.add_argument("--work-dir", type=Path, default=Path("bench-work"), help="checkpoints, GGUFs and builds (cached)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--bandwidth-mib", type=int, default=512)
    ap.add_argument("--lm-head", default=None,
                    help="LM head precision of our builds (build_llm_onnx lm_head: int4 | int8 | float; default: the builder's)")
    ap.add_argument("--ort-spinning", choices=("on", "off", "both"), default="on",
                    help="ONNX Runtime intra-op spinning of our decoder(s) (default on, as the runtime)")
    ap.add_argument("--llama-omp-wait", choices=("default", "passive", "both"), default="default",
                    help="llama.cpp peer: OMP_WAIT_POLICY of its process (passive: threads sleep at barriers)")
    if extra:
        extra(ap)
    a = ap.parse_args(argv)
    a.group_size = a.group_size or [128]
    return a


def run_llm_comparison(a, peer_factories: Sequence[Callable[[BenchOptions], Contender]], tag: str) -> dict:
    """Our int4 decoder(s) + peers at a preset's LLM geometry, interleaved; document, table, chart."""
    from vila_edge.presets import preset_config

    threads = a.threads or default_threads()
    opts = BenchOptions(image_sizes=[], prompt_tokens=[a.prompt_tokens], new_tokens=a.new_tokens, runs=a.runs,
                        warmup=1, threads=threads, llm_only=True, bandwidth_mib=a.bandwidth_mib)
    cfg = preset_config(a.preset)
    ours: list[Contender] = []
    if a.ours:
        for d in a.ours:
            ours.append(engine_contender(d, opts, name=f"vila-edge {Path(d).name}", config=cfg, precision="int4"))
    else:
        ckpt = ensure_preset_checkpoint(a.preset, a.work_dir, llm_only=True)
        head = getattr(a, "lm_head", None)
        for g in a.group_size:
            kw = {"lm_head": head} if head else {}
            tag = f"-head-{head}" if head else ""
            d = ensure_llm_engine(ckpt / "llm", Path(a.work_dir) / f"{a.preset}-llm-int4-g{g}{tag}", group_size=g,
                                  threads=threads, **kw)
            ours.append(engine_contender(d, opts, name=f"vila-edge ORT int4 g{g}" + (f" head {head}" if head else ""),
                                         config=cfg, precision="int4"))
    spins = {"on": [True], "off": [False], "both": [True, False]}[getattr(a, "ort_spinning", "on")]
    variants = []
    for c in ours:
        for spin in spins:
            v = Contender(**{**c.__dict__, "spec": {**c.spec, "spinning": spin}})
            if len(spins) > 1 or not spin:
                v.name = f"{c.name} spin {'on' if spin else 'off'}"
            variants.append(v)
    peers = []
    for f in peer_factories:
        got = f(opts)
        peers += got if isinstance(got, list) else [got]
    contenders = variants + peers
    raw = run_interleaved(contenders, opts)
    notes = [f"{a.preset} LLM geometry, random weights; prompt {a.prompt_tokens} random ids then {a.new_tokens} "
             f"forced greedy tokens; {threads} threads everywhere; every run in a fresh process; contenders "
             f"interleaved per round, a bandwidth probe right after each run"]
    doc = make_document(contenders, raw, opts, label=f"{a.preset}-vs-{tag}" if peer_factories else f"{a.preset}-llm",
                        notes=notes)
    print_report(doc)
    jp, pp = write_outputs(doc, a.out)
    print(f"wrote {jp} and {pp}")
    return doc


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "--child":
        fn = {"pipeline": child_pipeline, "llm": child_llm}[argv[1]]
        child_entry(fn)
        return
    raise SystemExit("usage: python -m vila_edge.bench --child pipeline|llm  (use `vila-edge bench` instead)")


if __name__ == "__main__":
    main()
