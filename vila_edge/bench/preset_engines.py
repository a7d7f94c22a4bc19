"""Preset engines: a preset's random-weight checkpoint (vila_edge.presets) written and built, cached in
the work folder. The one bench module above the builder: it builds what the others measure."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from vila_edge.engine_dir import is_engine_dir
from vila_edge.errors import VilaEdgeError


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
    from vila_edge.builder.llm_onnx import build_llm_onnx

    build_llm_onnx(llm_src, out, precision=precision, quant=quant, group_size=group_size, **kw)
    return out


def ensure_preset_engine(name: str, work_dir: Path, console=None, threads: int | None = None) -> Path:
    """`vila-edge build` of the preset's random checkpoint (RTN int4: AWQ calibration is moot on random weights),
    with the int8 CPU tower too (the runtime picks it on CPUs when its recorded cosine allows)."""
    ckpt = ensure_preset_checkpoint(name, work_dir, console=console)
    eng = Path(work_dir) / f"{name}-engine"
    if is_engine_dir(eng):
        return eng
    cmd = [sys.executable, "-m", "vila_edge.cli", "build", str(ckpt), "-o", str(eng), "--llm-quant", "rtn", "--int8-vision"]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise VilaEdgeError(f"`vila-edge build {ckpt} -o {eng}` failed (exit {r.returncode})")
    return eng
