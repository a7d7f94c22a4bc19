"""What runs: benchmark options, contenders (our engine directories or LLM folders, peer scripts) and the
interleaved rounds (every contender once per round in a fresh process, a bandwidth probe after each run)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vila_edge.bench.child import llm_dir, run_child, self_cmd
from vila_edge.bench.probes import default_threads, measure_bandwidth, measure_matmul
from vila_edge.engine_dir import Manifest, is_engine_dir, read_manifest
from vila_edge.errors import VilaEdgeError


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
    vision_precision: str | None = None  # pipeline: the ONNX Runtime tower graph (None: the runtime's default)


def llm_decode_bytes(path: Path) -> int:
    """Bytes of the LLM decoder files (graph + external weights): what one decode step reads.

    The embedding table (embed_tokens.npy, one row read per token) is not counted.
    """
    d = llm_dir(Path(path))
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
    dec = _genai_decoder(llm_dir(Path(path)))
    if dec:
        return 2 * int(dec["num_hidden_layers"]) * int(dec["num_key_value_heads"]) * int(dec["head_size"]) * 2
    return 0


def _manifest_summary(manifest: Manifest | None) -> dict:
    """The manifest without the file table (the resolved config stays: it is small)."""
    return {k: v for k, v in manifest.to_json().items() if k != "files"} if manifest else {}


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
    manifest = read_manifest(path) if is_engine_dir(path) else None  # else a bare LLM folder
    if config is None and manifest is not None:
        config = manifest.config
    llm_info = manifest.llm if manifest is not None else {}
    precision = precision or llm_info.get("precision") or "int4"
    pipeline = manifest is not None and not opts.llm_only
    if not pipeline and not ((llm_dir(path) / "genai_config.json").is_file() or llm_info):
        raise VilaEdgeError(f"{path}: neither an engine directory (manifest.json) nor an LLM folder (genai_config.json)")
    spec = {"engine": str(path), "image_sizes": [list(s) for s in opts.image_sizes],
            "prompt_tokens": list(opts.prompt_tokens), "new_tokens": opts.new_tokens, "runs": 1,
            "warmup": opts.warmup, "warmup_tokens": opts.warmup_tokens, "threads": opts.threads or default_threads(),
            "max_context": opts.max_context, "vision_precision": opts.vision_precision}
    return Contender(name=name or path.name, cmd=self_cmd("pipeline" if pipeline else "llm"), spec=spec,
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
