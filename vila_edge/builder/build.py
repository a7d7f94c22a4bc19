"""`vila-edge build`: checkpoint -> engine directory (the contract is in `vila_edge.engine_dir`).

Stages:
  export   (any machine; needs torch) tokenizer + raw config + vision ONNX (+ int8 CPU tower) + LLM ONNX
  engines  (the target GPU; needs tensorrt, not torch) TensorRT plans from the exported ONNX files
  all      export, then engines when TensorRT and a CUDA GPU are present here

Every build writes into a temp dir next to the target and renames it into place at the end, under a
lock file; an unchanged checkpoint with unchanged options is "up to date" and costs nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from vila_edge import __version__
from vila_edge.builder.engine_dir import BuildLock, clean_stale, file_table, link_or_copy, staging, write_manifest
from vila_edge.engine_dir import (
    CHECKPOINT_CONFIG,
    LLM_DIR,
    TOKENIZER_DIR,
    CheckpointRef,
    Manifest,
    Target,
    check_engine_dir,
    is_engine_dir,
    read_manifest,
)
from vila_edge.errors import EngineError, VilaEdgeError
from vila_edge.media.tiling import tiling_scheme

VISION_PRECISIONS = ("fp32", "fp16")
LLM_PRECISIONS = ("int4", "int8", "fp8", "fp16", "fp32")
PROJECTOR_PRECISIONS = ("fp8",)  # besides the default: the vision graphs' --precision
FP8_FORMATS = ("e4m3", "e5m2")
LLM_QUANTS = ("awq", "rtn")
BUILD_STAGES = ("all", "export", "engines")
STAGE_DELAY_ENV = "VILA_EDGE_TEST_STAGE_DELAY"  # seconds to pause after each step (tests kill builds mid-way)
PARITY_REL_LIMIT = 1e-3  # an fp32 graph further than this from the reference is a broken export


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"  # vision graphs
    int8_vision: bool = False
    qdq_vision: bool = False  # QDQ int8 tower for TensorRT explicit quantization (--trt-precision int8)
    combined_vision: bool = False
    llm_precision: str = "int4"
    llm_quant: str = "awq"
    group_size: int = 128
    awq_calib: str = "128x512"  # calibration sequences x tokens per sequence
    awq_grid: int = 20  # scale-exponent grid points per linear group
    skip_llm: bool = False
    token_order: str | None = None
    splice: str | None = None
    chat_format: str | None = None
    trt_precision: str = "fp16"
    trt_workspace_gb: float = 2.0
    torch_weights: bool = False  # also write the torch backend's weights (builder/torch_weights.py)
    projector_precision: str | None = None  # None: as `precision`; "fp8": FP8 QDQ projector (builder/fp8_qdq.py)
    fp8_format: str | None = None  # e4m3 (default) | e5m2, for the fp8 LLM and/or projector
    kv_dtype: str = "float32"  # LLM KV cache: float32 | float16 (our decoder writer: int4 awq/rtn, fp8)
    attention: str = "gqa"  # LLM attention: gqa (GroupQueryAttention) | grouped (builder.decoder_onnx)

    def validate(self) -> BuildOptions:
        def one_of(name, value, allowed):
            if value not in allowed:
                raise VilaEdgeError(f"--{name.replace('_', '-')} {value!r} is not one of: {', '.join(allowed)}")

        one_of("precision", self.precision, VISION_PRECISIONS)
        one_of("llm_precision", self.llm_precision, LLM_PRECISIONS)
        one_of("llm_quant", self.llm_quant, LLM_QUANTS)
        from vila_edge.builder.tensorrt import TRT_PRECISIONS

        one_of("trt_precision", self.trt_precision, TRT_PRECISIONS)
        if self.group_size not in (32, 64, 128, 256):
            raise VilaEdgeError(f"--group-size {self.group_size} is not one of: 32, 64, 128, 256")
        self.awq_calibration()
        self._check_fp8()
        one_of("kv_dtype", self.kv_dtype, ("float32", "float16"))
        one_of("attention", self.attention, ("gqa", "grouped"))
        if self.attention == "grouped" and self.kv_dtype != "float32":
            raise VilaEdgeError("--attention grouped keeps an fp32 KV cache: drop --kv-dtype float16")
        written_by_us = self.llm_precision == "fp8" or (self.llm_precision == "int4" and self.llm_quant in ("awq", "rtn"))
        if self.attention != "gqa" and not self.skip_llm and not written_by_us:
            raise VilaEdgeError(f"--attention {self.attention} needs --llm-precision int4 (--llm-quant awq or rtn) or "
                                f"fp8; the {self.llm_precision} {self.llm_quant} decoder is onnxruntime-genai's")
        if self.kv_dtype != "float32" and not self.skip_llm and not written_by_us:
            raise VilaEdgeError(f"--kv-dtype {self.kv_dtype} needs --llm-precision int4 (--llm-quant awq or rtn) or "
                                f"fp8; the {self.llm_precision} {self.llm_quant} decoder keeps an fp32 KV cache")
        if self.awq_grid < 1:
            raise VilaEdgeError(f"--awq-grid {self.awq_grid} must be at least 1")
        if not self.trt_workspace_gb > 0:
            raise VilaEdgeError(f"--trt-workspace-gb {self.trt_workspace_gb} must be positive")
        return self

    def _check_fp8(self) -> None:
        fp8_llm, fp8_projector = self.llm_precision == "fp8", self.projector_precision == "fp8"
        if self.projector_precision is not None and not fp8_projector:
            raise VilaEdgeError(f"--projector-precision {self.projector_precision!r} is not one of: fp8 "
                                "(leave it out for the vision graphs' --precision)")
        if self.fp8_format is not None and self.fp8_format not in FP8_FORMATS:
            raise VilaEdgeError(f"--fp8-format {self.fp8_format!r} is not one of: {', '.join(FP8_FORMATS)}")
        if self.fp8_format is not None and not (fp8_llm or fp8_projector):
            raise VilaEdgeError(f"--fp8-format {self.fp8_format} needs --llm-precision fp8 or --projector-precision fp8")
        if fp8_projector and self.precision != "fp32":
            raise VilaEdgeError(f"--projector-precision fp8 needs --precision fp32 (got {self.precision}): the FP8 "
                                "QDQ projector takes fp32 features")

    @property
    def fp8(self) -> str:
        """The FP8 format of the fp8 parts."""
        return self.fp8_format or "e4m3"

    def awq_calibration(self) -> tuple[int, int]:
        """(sequences, tokens per sequence) of --awq-calib NxL."""
        try:
            samples, seqlen = (int(v) for v in self.awq_calib.lower().split("x"))
        except ValueError:
            raise VilaEdgeError(f"--awq-calib {self.awq_calib!r} is not SEQUENCESxTOKENS, e.g. 32x512") from None
        if samples < 1 or seqlen < 16:
            raise VilaEdgeError(f"--awq-calib {self.awq_calib!r}: need at least 1 sequence of 16 tokens")
        return samples, seqlen

    def export_key(self) -> dict:
        """The options that decide what the export stage writes."""
        d = dataclasses.asdict(self)
        for key in ("torch_weights", "projector_precision", "fp8_format"):
            if not d[key]:  # directories built before the option existed stay up to date
                del d[key]
        return {k: v for k, v in d.items() if not k.startswith("trt_")}

    def engines_key(self) -> dict:
        return {"trt_precision": self.trt_precision, "trt_workspace_gb": self.trt_workspace_gb}


@dataclass
class BuildResult:
    status: str  # "built" | "up-to-date" | "planned"
    path: Path
    manifest: Manifest | None = None
    plan: dict | None = None
    messages: list[str] = field(default_factory=list)


# ---- progress ------------------------------------------------------------------------------------


class Reporter:
    """One line per finished step ("✓ [2/6] export tower 3.1s"), a spinner while it runs (rich)."""

    def __init__(self, enabled=True, console=None):
        # `enabled` may be a callable taking one line of text (e.g. the chat command's logger)
        self.sink = enabled if callable(enabled) else None
        self.enabled = bool(enabled) and self.sink is None
        self.messages: list[str] = []
        self.total = 0
        self.done = 0
        self._console = console

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=True, highlight=False)
        return self._console

    def note(self, msg: str) -> None:
        self.messages.append(msg)
        if self.sink:
            self.sink(msg)
        elif self.enabled:
            self.console.print(msg, markup=False)

    def warn(self, msg: str) -> None:
        self.messages.append("warning: " + msg)
        if self.sink:
            self.sink("warning: " + msg)
        elif self.enabled:
            self.console.print("[yellow]warning:[/] " + msg.replace("[", "\\["))

    @contextlib.contextmanager
    def step(self, title: str, *, spinner: bool = True):
        self.done += 1
        label = f"[{self.done}/{self.total}] {title}" if self.total else title
        t0 = time.perf_counter()
        if self.enabled and spinner and self.console.is_terminal:
            with self.console.status(label + " ..."):
                yield
        else:
            if self.enabled and not spinner:
                self.console.print(f"  {label} ...")
            yield
        secs = time.perf_counter() - t0
        self.messages.append(f"{label} ({secs:.1f}s)")
        if self.sink:
            self.sink(f"{label} ({secs:.1f}s)")
        elif self.enabled:
            self.console.print(f"[green]✓[/] {label} [dim]{secs:.1f}s[/]")
        delay = os.environ.get(STAGE_DELAY_ENV)
        if delay:
            time.sleep(float(delay))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the temp dir and the lock are removed."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- helpers ---------------------------------------------------------------------------------------


def _versions(torch_too: bool = True) -> dict:
    out = {}
    for mod in ("onnx", "onnxruntime") + (("torch",) if torch_too else ()):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    from vila_edge.builder.tensorrt import tensorrt_version

    trt = tensorrt_version()
    if trt:
        out["tensorrt"] = trt
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _relativize(obj, base: Path):
    """Paths inside the temp dir (returned by sub-builders) -> relative to `base`."""
    if isinstance(obj, dict):
        return {k: _relativize(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_relativize(v, base) for v in obj]
    if isinstance(obj, Path) or (isinstance(obj, str) and obj.startswith(str(base))):
        p = Path(obj)
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            return str(p)
    return obj


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= (1 << 27) else f"{n / (1 << 20):.1f} MiB"


def check_output_path(source: Path, out: Path) -> None:
    """Refuse an output that would overwrite the checkpoint (`--force` replaces the output directory) or that
    is not a directory. One line, before anything is written."""
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst.is_relative_to(src) or src.is_relative_to(dst):
        where = "is" if dst == src else "is inside" if dst.is_relative_to(src) else "contains"
        raise VilaEdgeError(f"-o {out}: the output {where} the checkpoint {source}; choose a folder outside it, "
                            f"e.g. -o engines/{src.name}")
    if out.exists() and not out.is_dir():
        raise VilaEdgeError(f"-o {out}: exists and is not a directory; choose another output folder")


# ---- the plan (also what --dry-run prints) --------------------------------------------------------------


def make_plan(ckpt, out: Path, options: BuildOptions, stage: str, *, engines_here: bool) -> dict:
    """Steps with estimated disk and peak memory (rough: weights x bytes, exporter copies)."""
    from vila_edge.builder.tensorrt import chunk_batch_profile, tile_batch_profile
    from vila_edge.builder.vision_onnx import estimate_projector_params, estimate_tower_params

    cfg = ckpt.config
    n_tower = estimate_tower_params(ckpt)
    n_full = ckpt.param_counts().get("vision_tower", n_tower)
    n_proj = estimate_projector_params(ckpt)
    n_llm = ckpt.param_counts().get("llm", 0)
    steps = []

    def add(st, what, output, disk, mem):
        steps.append({"stage": st, "what": what, "output": output, "disk_bytes": int(disk), "peak_memory_bytes": int(mem)})

    wb = {"fp32": 4, "fp16": 2}[options.precision]
    combined = options.combined_vision and not tiling_scheme(cfg.vision).multi_scale
    if stage in ("all", "export"):
        add("export", "tokenizer + checkpoint config", f"{TOKENIZER_DIR}/, {CHECKPOINT_CONFIG}", 5 << 20, 256 << 20)
        add("export", f"vision tower -> ONNX ({options.precision})", f"vision/tower.{options.precision}.onnx",
            n_tower * wb, 4 * n_full + 8 * n_tower)
        add("export", f"projector -> ONNX ({options.precision})", f"vision/projector.{options.precision}.onnx",
            n_proj * wb, 4 * n_proj * 3)
        if options.projector_precision == "fp8":
            add("export", f"projector -> FP8 {options.fp8} QDQ", "vision/projector.fp8.onnx", n_proj * 1.05, 4 * n_proj * 3)
        if combined:
            add("export", "tower+projector -> ONNX (TensorRT-LLM naming)", f"vision/combined.{options.precision}.onnx",
                (n_tower + n_proj) * wb, 4 * n_full + 8 * (n_tower + n_proj))
        if options.int8_vision:
            add("export", "int8 CPU tower (ONNX Runtime dynamic quantization)", "vision/tower.int8.onnx",
                n_tower * 1.05, 4 * n_tower * 3)
        if options.qdq_vision:
            add("export", "QDQ int8 tower for TensorRT (static calibration)", "vision/tower.qdq.onnx",
                n_tower * 1.05, 4 * n_tower * 4)
        if options.skip_llm:
            pass
        else:
            bits = {"int4": 4.25, "int8": 8.5, "fp8": 8.0, "fp16": 16, "fp32": 32}[options.llm_precision]
            h = cfg.llm.hidden_size
            embed = cfg.llm.vocab_size * h * 2
            add("export", f"LLM -> ONNX ({options.llm_precision}"
                + (f", {options.llm_quant} g{options.group_size})" if options.llm_precision in ("int4", "int8")
                   else f" {options.fp8}, 128x128 weight / 1x128 activation scales)" if options.llm_precision == "fp8"
                   else ")"),
                f"{LLM_DIR}/", n_llm * bits / 8 + embed, n_llm * 2 * 1.5 + n_llm * (4 if options.llm_precision == "fp32" else 0))
    if stage == "engines" or (stage == "all" and engines_here):
        tiles, chunks = tile_batch_profile(cfg), chunk_batch_profile(cfg)
        ws = int(options.trt_workspace_gb * (1 << 30))
        pb = 2 if options.trt_precision != "fp32" else 4
        add("engines", f"TensorRT tower ({options.trt_precision}, tiles {tiles.min}..{tiles.max})",
            f"vision/tower.{options.trt_precision}.plan", n_tower * pb, n_tower * (4 + pb) + ws)
        add("engines", f"TensorRT projector ({options.trt_precision}, chunks {chunks.min}..{chunks.max})",
            f"vision/projector.{options.trt_precision}.plan", n_proj * pb, n_proj * (4 + pb) + ws)
        if combined:
            add("engines", "TensorRT tower+projector (TensorRT-LLM --visual_engine_dir)", "vision/trtllm/model.engine",
                (n_tower + n_proj) * pb, (n_tower + n_proj) * (4 + pb) + ws)
    disk = sum(s["disk_bytes"] for s in steps)
    try:
        free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    except OSError:
        free = None
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:
        avail = None
    return {
        "checkpoint": str(ckpt.root), "family": cfg.family, "output": str(out), "stage": stage,
        "options": dataclasses.asdict(options), "steps": steps,
        "disk_bytes": disk, "peak_memory_bytes": max((s["peak_memory_bytes"] for s in steps), default=0),
        "free_disk_bytes": free, "available_memory_bytes": avail,
        "params": {"vision_tower_used": n_tower, "vision_tower_file": n_full, "projector": n_proj, "llm": n_llm},
    }


def print_plan(plan: dict, console=None) -> None:
    import sys

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    t = Table(title=f"vila-edge build plan: {plan['checkpoint']} ({plan['family']}) -> {plan['output']}")
    for col in ("stage", "step", "writes", "disk (est.)", "peak memory (est.)"):
        t.add_column(col, justify="right" if "est" in col else "left")
    for s in plan["steps"]:
        t.add_row(s["stage"], s["what"], s["output"], _gib(s["disk_bytes"]), _gib(s["peak_memory_bytes"]))
    console.print(t)
    line = f"total disk ~{_gib(plan['disk_bytes'])}, peak memory ~{_gib(plan['peak_memory_bytes'])}"
    if plan["free_disk_bytes"] is not None:
        line += f"; free disk {_gib(plan['free_disk_bytes'])}"
    if plan["available_memory_bytes"] is not None:
        line += f", available memory {_gib(plan['available_memory_bytes'])}"
    console.print(line)
    if plan["free_disk_bytes"] is not None and plan["disk_bytes"] * 2 > plan["free_disk_bytes"]:
        console.print("[yellow]warning:[/] the build needs about twice its output size free (temp dir + old directory)")
    if plan["available_memory_bytes"] is not None and plan["peak_memory_bytes"] > plan["available_memory_bytes"]:
        console.print("[yellow]warning:[/] the estimated peak memory exceeds the memory available now")


# ---- stages ----------------------------------------------------------------------------------------------


def _export_vision(ckpt, tmp: Path, options: BuildOptions, threads: int | None, rep: Reporter) -> dict:
    from vila_edge.builder import vision_onnx as vo
    from vila_edge.builder.tensorrt import chunk_batch_profile, tile_batch_profile

    cfg = ckpt.config
    if cfg.vision.tower == "ps3":  # VILA-HD: three graphs with the patch selection between them
        from vila_edge.builder.ps3_onnx import export_vision_stage

        vo.set_threads(threads)
        return export_vision_stage(ckpt, tmp, options, rep, PARITY_REL_LIMIT)
    geom = vo.VisionGeometry.from_config(cfg)
    vo.set_threads(threads)
    vdir = tmp / "vision"
    files: dict[str, dict[str, str]] = {"tower": {}, "projector": {}}
    checks: dict = {}
    io = {"tower": dict(zip(("input", "output"), vo.TOWER_IO, strict=True)),
          "projector": dict(zip(("input", "output"), vo.PROJECTOR_IO, strict=True))}
    with rep.step("load vision tower + projector weights"):
        tower, projector = vo.load_modules(ckpt)
    graphs = [("tower", tower, (1,)), ("projector", projector, (1, 3))]
    if options.combined_vision:
        if tiling_scheme(cfg.vision).multi_scale:
            rep.warn("--combined-vision: skipped, S2 checkpoints need the merge between tower and projector")
        else:
            graphs.append(("combined", vo.combined_module(tower, projector), (1,)))
            files["combined"] = {}
            io["combined"] = dict(zip(("input", "output"), vo.COMBINED_IO, strict=True))
    fp32_paths = {}
    for name, module, batches in graphs:
        with rep.step(f"export {name} -> ONNX (opset {vo.OPSET})"):
            path = vdir / f"{name}.fp32.onnx"
            vo.export_graph(module, name, path, geom)
            par = vo.check_parity(path, module, name, geom, batches=batches, threads=threads)
            if not par["rel"] <= PARITY_REL_LIMIT:
                raise EngineError(f"{path}: ONNX Runtime differs from the PyTorch reference by {par['max_abs']:.3g} "
                                  f"(relative {par['rel']:.3g}); the export is broken, please report it")
            checks[f"{name}_fp32_vs_reference"] = par
            fp32_paths[name] = path
            files[name]["fp32"] = path.relative_to(tmp).as_posix()
    del graphs
    del tower, projector
    gc.collect()
    tiles = vo.sample_tiles(cfg, n=2)
    if options.projector_precision == "fp8":
        from vila_edge.builder.fp8_qdq import quantize_graph_linears

        with rep.step(f"projector -> FP8 {options.fp8} QDQ (128x128 weight, 1x128 activation scales)"):
            dst = vdir / "projector.fp8.onnx"
            meta = quantize_graph_linears(fp32_paths["projector"], dst, options.fp8)
            stats = vo.compare_graphs(fp32_paths["projector"], dst, vo.example_input("projector", geom, 2).numpy(),
                                      threads)
            checks["projector_fp8_vs_fp32"] = {**stats, "input": "2 random feature chunks", **meta}
            files["projector"]["fp8"] = dst.relative_to(tmp).as_posix()
    if options.precision == "fp16":
        for name, src in fp32_paths.items():
            with rep.step(f"{name} -> fp16"):
                dst = vo.to_fp16(src, vdir / f"{name}.fp16.onnx")
                x = tiles if name != "projector" else vo.example_input("projector", geom, 2).numpy()
                try:
                    checks[f"{name}_fp16_vs_fp32"] = vo.compare_graphs(src, dst, x, threads)
                except Exception as exc:  # this ONNX Runtime build lacks an fp16 CPU kernel: skip the check
                    checks[f"{name}_fp16_vs_fp32"] = {"skipped": f"{type(exc).__name__}: {str(exc)[:200]}"}
                files[name]["fp16"] = dst.relative_to(tmp).as_posix()
    if options.qdq_vision:
        with rep.step("QDQ int8 tower for TensorRT (static, calibrated on synthetic tiles)"):
            dst = vdir / "tower.qdq.onnx"
            meta = vo.quantize_qdq_int8(fp32_paths["tower"], dst, vo.sample_tiles(cfg, n=8, seed=100))
            stats = vo.compare_graphs(fp32_paths["tower"], dst, tiles, threads)
            checks["tower_qdq_vs_fp32"] = {**stats, "input": "2 synthetic image tiles (not the calibration ones)", **meta}
            files["tower"]["qdq"] = dst.relative_to(tmp).as_posix()
    if options.int8_vision:
        with rep.step("int8 CPU tower (ONNX Runtime dynamic quantization)"):
            dst = vdir / "tower.int8.onnx"
            meta = vo.quantize_int8(fp32_paths["tower"], dst)
            stats = vo.compare_graphs(fp32_paths["tower"], dst, tiles, threads)
            checks["tower_int8_vs_fp32"] = {**stats, "input": "2 synthetic image tiles", **meta}
            files["tower"]["int8"] = dst.relative_to(tmp).as_posix()
            rep.note(f"  int8 tower vs fp32: cosine mean {stats['mean']:.5f}, min {stats['min']:.5f}")
    if options.precision != "fp32":
        for name, src in fp32_paths.items():
            for p in (src, src.with_name(src.name + ".data")):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            files[name].pop("fp32", None)
    return {
        "exporter": "torch.onnx.export(dynamo=True)", "opset": vo.OPSET, "precision": options.precision,
        "files": files, "plans": {}, "io": io,
        "image_size": geom.image_size, "tokens_per_tile": geom.tokens_per_tile, "hidden_size": geom.hidden,
        "feature_width": geom.feature_width, "projector_tokens": geom.projector_tokens, "embed_dim": geom.embed_dim,
        "merge": {"tiling": cfg.vision.tiling, "between": "tower and projector (numpy, runtime)"},
        "tile_batch": tile_batch_profile(cfg).as_dict(), "chunk_batch": chunk_batch_profile(cfg).as_dict(),
        "checks": checks,
    }


@contextlib.contextmanager
def _llm_source(ckpt, scratch: Path):
    """An HF causal-LM folder for the LLM builder (the -hf flat layout gets one written to scratch)."""
    if ckpt.layout == "dev":
        yield ckpt.part_dir("llm")
        return
    from safetensors.torch import save_file

    src = scratch / ".llm-src"
    src.mkdir(parents=True, exist_ok=True)
    try:
        raw = dict(ckpt.raw["llm"])
        raw.setdefault("model_type", "qwen2" if ckpt.config.llm.family == "qwen2" else "llama")
        (src / "config.json").write_text(json.dumps(raw, indent=2))
        save_file({k: v.contiguous() for k, v in ckpt.state_dict("llm").items()}, str(src / "model.safetensors"))
        ckpt.tokenizer.save(src)
        yield src
    finally:
        shutil.rmtree(src, ignore_errors=True)


def _build_llm(ckpt, tmp: Path, options: BuildOptions, threads: int | None, rep: Reporter) -> dict:
    if options.skip_llm:
        return {"skipped": "--skip-llm"}
    from vila_edge.builder.llm_onnx import build_llm_onnx

    out = tmp / LLM_DIR
    with rep.step(f"LLM -> ONNX ({options.llm_precision})", spinner=False), _llm_source(ckpt, tmp) as src:
        samples, seqlen = options.awq_calibration()
        info = build_llm_onnx(src, out, precision=options.llm_precision, quant=options.llm_quant,
                              group_size=options.group_size, calib_path=None, threads=threads, progress=rep.enabled,
                              calib_samples=samples, calib_seqlen=seqlen, awq_grid=options.awq_grid,
                              fp8_format=options.fp8, kv_dtype=options.kv_dtype,
                              attention=options.attention)
    return _relativize(dict(info or {}), out)


def _compile(root: Path, manifest: Manifest, options: BuildOptions, rep: Reporter) -> Manifest:
    """Add TensorRT plans to the (staged) directory `root` whose manifest is `manifest`; returns the new one."""
    from vila_edge.builder import tensorrt as trtb

    ok, reason = trtb.trt_available()
    if not ok:
        raise EngineError(f"{reason}: `--stage engines` runs on the target GPU (copy the exported directory there "
                          f"and run `vila-edge build DIR --stage engines`)")
    sm = trtb.detect_sm()
    specs = trtb.plan_engines(manifest, precision=options.trt_precision, workspace_gb=options.trt_workspace_gb, sm=sm)
    built = {}
    for spec in specs:
        with rep.step(f"TensorRT {spec.name} engine ({options.trt_precision}, batch {spec.min_shape[0]}..{spec.max_shape[0]})"):
            built.update(trtb.build_engines(root, [spec], vision_meta=manifest.vision, log=lambda m: None))
    plans = {name: b["plan"] for name, b in built.items()}
    return dataclasses.replace(
        manifest, stage="engines", target=Target("cuda", sm), vision={**manifest.vision, "plans": plans, "engines": built},
        engines_options=options.engines_key(), engines_built_at=_now(),
        versions={**manifest.versions, "tensorrt": trtb.tensorrt_version()})  # export versions kept


# ---- entry point ---------------------------------------------------------------------------------------------


def _up_to_date(out: Path, fingerprint: str, options: BuildOptions, want_engines: bool, sm: str | None):
    """(state, manifest): state "fresh" (nothing to do), "export-ok" (only engines missing) or "stale"."""
    try:
        m = check_engine_dir(out)
    except EngineError:
        return "stale", None
    if m.checkpoint.fingerprint != fingerprint or m.options != options.export_key():
        return "stale", m
    if not options.skip_llm and m.llm.get("skipped"):
        return "stale", m
    if want_engines and (m.stage != "engines" or m.engines_options != options.engines_key()
                         or (sm is not None and m.target.sm != sm)):
        return "export-ok", m
    return "fresh", m


def build(source, output=None, *, options: BuildOptions | None = None, stage: str = "all", dry_run: bool = False,
          force: bool = False, threads: int | None = None, progress: bool = True, console=None) -> BuildResult:
    """Build (or refresh) an engine directory. See the module docstring."""
    options = (options or BuildOptions()).validate()
    if stage not in BUILD_STAGES:
        raise VilaEdgeError(f"--stage {stage!r} is not one of: {', '.join(BUILD_STAGES)}")
    if threads is not None and threads < 1:
        raise VilaEdgeError(f"--threads {threads} must be at least 1")
    rep = Reporter(progress, console)
    source = Path(source)
    if stage == "engines" and is_engine_dir(source):
        return _build_engines_only(source, Path(output) if output else source, options, dry_run, force, rep)

    from vila_edge.builder.tensorrt import detect_sm, trt_available
    from vila_edge.checkpoint import load_checkpoint

    ckpt = load_checkpoint(source, token_order=options.token_order, splice=options.splice,
                           chat_format=options.chat_format)
    out = Path(output) if output else Path("engines") / ckpt.name
    check_output_path(source, out)
    if options.torch_weights and ckpt.config.vision.tower != "siglip":
        raise VilaEdgeError(f"--torch-weights: the PyTorch backend runs SigLIP towers only, {source} has a "
                            f"{ckpt.config.vision.tower} tower; build without it (ONNX Runtime / TensorRT run it)")
    if stage == "engines":
        if not is_engine_dir(out):
            raise EngineError(f"{out}: no exported engine directory to compile; run `vila-edge build {source} -o {out} "
                              f"--stage export` first (on any machine)")
        check_engine_dir(out, ckpt)
        return _build_engines_only(out, out, options, dry_run, force, rep)

    engines_here, why_not = trt_available()
    plan = make_plan(ckpt, out, options, stage, engines_here=engines_here)
    if dry_run:
        if progress:
            print_plan(plan, console)
            if stage == "all" and not engines_here:
                rep.note(f"TensorRT engines: not here ({why_not}); the export is portable: `--stage engines` on the target")
        return BuildResult("planned", out, plan=plan, messages=rep.messages)

    n_graphs = 2 + (1 if options.combined_vision and not tiling_scheme(ckpt.config.vision).multi_scale else 0)
    fingerprint = ckpt.fingerprint()
    want_engines = stage == "all" and engines_here
    sm = detect_sm() if want_engines else None
    with _sigterm_as_interrupt(), BuildLock(out):
        clean_stale(out)
        state, existing = ("stale", None) if force else _up_to_date(out, fingerprint, options, want_engines, sm)
        if state == "fresh":
            rep.note(f"{out}: up to date (same checkpoint fingerprint {fingerprint[:12]}, same options); nothing to do")
            return BuildResult("up-to-date", out, manifest=existing, plan=plan, messages=rep.messages)
        if out.exists() and not is_engine_dir(out) and any(out.iterdir()) and not force:
            raise EngineError(f"{out}: exists and is not an engine directory; choose another -o or pass --force to replace it")
        if state == "export-ok":
            rep.note(f"{out}: export is up to date; adding TensorRT engines")
            rep.total = 2 + (1 if "combined" in existing.vision["files"] else 0)
            return _compile_into(out, out, existing, options, rep)
        if existing is not None:
            rep.note(f"{out}: rebuilding (checkpoint or options changed)")
        if not engines_here and stage == "all":
            rep.note(f"TensorRT engines skipped: {why_not}. The directory runs on ONNX Runtime; "
                     f"compile on the target with `vila-edge build {out} --stage engines`")
        rep.total = (2 + n_graphs * (2 if options.precision == "fp16" else 1) + int(options.int8_vision)
                     + int(options.qdq_vision) + int(options.torch_weights)
                     + int(not options.skip_llm) + (n_graphs if want_engines else 0))
        with staging(out) as tmp:
            with rep.step("tokenizer + checkpoint config"):
                ckpt.tokenizer.save(tmp / TOKENIZER_DIR)
                (tmp / CHECKPOINT_CONFIG).write_text(json.dumps(ckpt.raw, indent=2, default=str) + "\n")
            vision = _export_vision(ckpt, tmp, options, threads, rep)
            llm = _build_llm(ckpt, tmp, options, threads, rep)
            if options.torch_weights:
                from vila_edge.builder.torch_weights import write_torch_weights

                fp8_projector = options.fp8 if options.projector_precision == "fp8" else None
                with rep.step(f"torch backend weights (fp16 vision{', FP8 projector' if fp8_projector else ''}, "
                              f"{options.llm_precision} LLM from the decoder graph)"):
                    torch_files = write_torch_weights(tmp, ckpt, projector_fp8=fp8_projector)
                vision = {**vision, "torch": torch_files["vision"]}
                if "llm" in torch_files:
                    llm = {**llm, "torch": torch_files["llm"]}
            manifest = Manifest(
                vila_edge=__version__, name=out.name,
                checkpoint=CheckpointRef(str(ckpt.root.resolve()), ckpt.name, ckpt.layout, fingerprint),
                config=ckpt.config,
                overrides={"token_order": options.token_order, "splice": options.splice,
                           "chat_format": options.chat_format},
                options=options.export_key(), versions=_versions(), target=Target("cpu", None), stage="export",
                vision=vision, llm=llm, created_at=_now())
            if want_engines:
                manifest = _compile(tmp, manifest, options, rep)
            manifest = dataclasses.replace(manifest, files=file_table(tmp))
            write_manifest(tmp, manifest)
        rep.note(f"{out}: built ({manifest.stage} stage, {_gib(sum(manifest.files.values()))})")
        return BuildResult("built", out, manifest=manifest, plan=plan, messages=rep.messages)


def _compile_into(src: Path, out: Path, manifest: Manifest, options: BuildOptions, rep: Reporter) -> BuildResult:
    """Stage a copy (hard links) of the exported directory `src`, add plans, publish as `out`."""
    with staging(out) as tmp:
        for rel in manifest.files:
            if rel.endswith(".plan") or rel.startswith("vision/trtllm/"):
                continue  # replaced by this build
            link_or_copy(src / rel, tmp / rel)
        new = _compile(tmp, manifest, options, rep)
        new = dataclasses.replace(new, files=file_table(tmp))
        write_manifest(tmp, new)
    rep.note(f"{out}: TensorRT engines built for sm_{new.target.sm}")
    return BuildResult("built", out, manifest=new, messages=rep.messages)


def _build_engines_only(src: Path, out: Path, options: BuildOptions, dry_run: bool, force: bool,
                        rep: Reporter) -> BuildResult:
    """`--stage engines` from an exported directory: no checkpoint, no torch."""
    from vila_edge.builder.tensorrt import detect_sm, plan_engines

    manifest = check_engine_dir(src)
    sm = detect_sm()
    specs = plan_engines(manifest, precision=options.trt_precision, workspace_gb=options.trt_workspace_gb, sm=sm)
    plan = {"stage": "engines", "source": str(src), "output": str(out), "sm": sm,
            "engines": [s.as_dict() for s in specs]}
    if dry_run:
        if rep.enabled:
            from rich.console import Console

            con = rep._console or Console(width=160)
            con.print(f"vila-edge build plan: TensorRT engines from {src} -> {out} (target sm {sm or 'unknown: no GPU here'})")
            for s in specs:
                con.print(f"  {s.plan}: {s.onnx}, {s.input} {list(s.min_shape)}..{list(s.max_shape)} "
                          f"(opt {list(s.opt_shape)}), flags {list(s.flags) or ['fp32']}, workspace {_gib(s.workspace_bytes)}")
        return BuildResult("planned", out, plan=plan, messages=rep.messages)
    rep.total = len(specs)
    with _sigterm_as_interrupt(), BuildLock(out):
        clean_stale(out)
        if not force and out.resolve() != src.resolve() and is_engine_dir(out):
            try:
                cur = read_manifest(out)
            except EngineError:
                cur = None
            if cur and cur.stage == "engines" and cur.checkpoint == manifest.checkpoint \
                    and cur.engines_options == options.engines_key() and cur.target.sm == sm:
                rep.note(f"{out}: up to date; nothing to do")
                return BuildResult("up-to-date", out, manifest=cur, plan=plan, messages=rep.messages)
        if not force and manifest.stage == "engines" and manifest.engines_options == options.engines_key() \
                and manifest.target.sm == sm and out.resolve() == src.resolve():
            rep.note(f"{out}: up to date (TensorRT engines for sm_{sm}); nothing to do")
            return BuildResult("up-to-date", out, manifest=manifest, plan=plan, messages=rep.messages)
        return _compile_into(src, out, manifest, options, rep)


def build_engine_dir(source, output=None, *, precision: str | None = None, progress=True, **options) -> Path:
    """Convenience entry point for other commands (e.g. `vila-edge chat CKPT` on first use): build with
    defaults and return the engine directory. `precision` is the LLM precision; other BuildOptions
    fields may be passed by name; `progress` is a bool or a callable taking one line of text."""
    fields = {f.name for f in dataclasses.fields(BuildOptions)}
    unknown = set(options) - fields - {"stage", "force", "threads", "dry_run"}
    if unknown:
        raise TypeError(f"build_engine_dir: unknown options {sorted(unknown)}")
    run = {k: options.pop(k) for k in ("stage", "force", "threads", "dry_run") if k in options}
    if precision is not None:
        options["llm_precision"] = precision
    return build(source, output, options=BuildOptions(**options), progress=progress, **run).path


def ensure_engine_dir(path, *, output=None, precision: str | None = None,
                      say: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """`path` if it is an engine directory; for a checkpoint, its engine directory (`output`, default
    ./engines/<checkpoint name>), built on first use and rebuilt when stale (`vila-edge chat CKPT`)."""
    path = Path(path)
    if is_engine_dir(path):
        return path
    if not path.exists():
        raise EngineError(f"{path}: no such engine directory or checkpoint")
    if not (path / "config.json").is_file():
        raise EngineError(f"{path}: neither an engine directory (manifest.json) nor a checkpoint (config.json)")
    out = Path(output) if output else Path("engines") / path.resolve().name
    if is_engine_dir(out):
        try:
            check_engine_dir(out, path)
            return out
        except VilaEdgeError as exc:
            say(f"note: {out} is stale ({exc}); rebuilding")
    say(f"building engines for {path.name} into {out} (first use; later runs reuse them)")
    t0 = time.perf_counter()
    out = build_engine_dir(path, out, precision=precision, progress=lambda msg: say(f"  {msg}"))
    say(f"engines ready in {time.perf_counter() - t0:.1f} s: {out}")
    return out
