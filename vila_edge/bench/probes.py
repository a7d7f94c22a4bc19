"""Machine probes: memory bandwidth (read, STREAM-style copy), ONNX Runtime matmul rate, machine and
package versions, and the median / min / max of a series."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

MIB = 1 << 20


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


def stats(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "values": []}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
