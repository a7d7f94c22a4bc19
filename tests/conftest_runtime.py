"""Session fixtures for the runtime tests: engine directories for the tiny checkpoints, built once.

`runtime_engine(family, precision)` builds through the REAL builder (`vila_edge.builder.build`) when it
is importable. Until it lands, a stand-in (`_standin_engine_dir`, test-only) writes the same engine
directory contract: vision tower / projector exported from the PyTorch reference with torch.onnx, the
LLM decoder by onnxruntime-genai's model builder with `exclude_embeds` + `prune_lm_head`, the
embedding table as embed_tokens.npy, the tokenizer, and a manifest with the resolved config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest


def _real_builder():
    try:
        from vila_edge.builder.build import build_engine_dir
    except ImportError:
        return None
    return build_engine_dir


def _export(module, example, path: Path, in_name: str, out_name: str) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(module, (example,), str(path), input_names=[in_name], output_names=[out_name],
                          dynamic_axes={in_name: {0: "batch"}, out_name: {0: "batch"}}, opset_version=17,
                          dynamo=False)


def _standin_engine_dir(ckpt_path: Path, out: Path, precision: str, accuracy_level: int = 4) -> Path:
    """TEST-ONLY stand-in for `vila-edge build` (same directory contract; see module docstring)."""
    import contextlib
    import io

    import numpy as np
    import torch
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.reference.model import ReferenceVILA

    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.config
    ref = ReferenceVILA(ckpt, llm=False)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "vision").mkdir(parents=True)
    v = cfg.vision
    _export(ref.tower, torch.zeros(2, 3, v.image_size, v.image_size), tmp / "vision" / "tower.fp32.onnx",
            "pixel_values", "features")
    g = v.grid
    _export(ref.projector, torch.zeros(2, g * g, v.feature_width), tmp / "vision" / "projector.fp32.onnx",
            "features", "embeds")
    llm_dir = tmp / "llm"
    src = str(ckpt.part_dir("llm"))
    args = (None, src, str(llm_dir), precision, "cpu", str(tmp / "cache"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        opts = ["exclude_embeds=true", "prune_lm_head=true", "filename=decoder.onnx"]
        if precision == "int4":
            opts.append(f"accuracy_level={accuracy_level}")
        eo = parse_extra_options(*args, opts)
        create_model(*args, **eo)
    shutil.rmtree(tmp / "cache", ignore_errors=True)
    emb = ckpt.state_dict("llm")["model.embed_tokens.weight"].float().numpy()
    np.save(llm_dir / "embed_tokens.npy", emb.astype(np.float32))
    ckpt.tokenizer.save(tmp / "tokenizer")
    manifest = {"vila_edge": "stand-in", "checkpoint": str(ckpt_path.name), "config": dataclasses.asdict(cfg),
                "vision": {"files": {"tower": {"fp32": "vision/tower.fp32.onnx"},
                                     "projector": {"fp32": "vision/projector.fp32.onnx"}}},
                "llm": {"decoder": "decoder.onnx", "embed_tokens": "embed_tokens.npy", "precision": precision}}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list))
    tmp.rename(out)
    return out


def build_engine(ckpt_path: Path, out: Path, precision: str) -> Path:
    builder = _real_builder()
    if builder is not None:
        # int4 with our RTN quantizer: no AWQ calibration (minutes on 2 cores; the builder's tests cover AWQ)
        extra = {"llm_quant": "rtn"} if precision == "int4" else {}
        return Path(builder(ckpt_path, out, precision=precision, progress=False, **extra) or out)
    return _standin_engine_dir(ckpt_path, out, precision)


_BUILT: dict = {}  # (family, precision) -> engine dir; module-level so every test module shares one build


@pytest.fixture(scope="session")
def runtime_engine(tiny_checkpoint, tmp_path_factory):
    """runtime_engine(family, precision="fp32") -> engine directory of the tiny checkpoint (built once).

    Test modules import this fixture (`from conftest_runtime import runtime_engine`); tests/conftest.py
    is not ours to edit."""

    def make(family: str, precision: str = "fp32") -> Path:
        key = (family, precision)
        if key not in _BUILT:
            root = tmp_path_factory.getbasetemp() / "runtime-engines"
            root.mkdir(exist_ok=True)
            _BUILT[key] = build_engine(tiny_checkpoint(family), root / f"{family}-{precision}", precision)
        return _BUILT[key]

    return make
