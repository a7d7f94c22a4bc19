"""The engine directory: what `vila-edge build` writes and everything else reads.

One floor below the runtime: the runtime, the backends, bench, serve and the builder read an engine
directory through `read_manifest` (-> a typed, frozen `Manifest`) and `check_engine_dir`. Nothing here
imports the builder; the builder (`vila_edge.builder.engine_dir`) keeps the writer, the lock and the
staging, and writes `Manifest.to_json()`.

Contract (format 1)::

    engines/NAME/
      manifest.json            see below; written last, so a directory without it is not an engine dir
      checkpoint_config.json   Checkpoint.raw: the raw config dicts {"top", "llm", "vision", "projector",
                               "preprocessor", "overrides"}; `--stage engines` needs no checkpoint/torch
      tokenizer/               tokenizer.json + tokenizer_config.json as loaded (media tokens added by the
                               loader included: Checkpoint.tokenizer.save)
      vision/tower.<prec>.onnx        input "pixel_values" [tiles,3,S,S] float32 -> "features" [tiles,T,C]
                                      (hidden_states[select_layer], select_feature applied; later layers,
                                      post_layernorm and head are not in the graph)
      vision/projector.<prec>.onnx    input "features" [chunks,T,C*n_scales] float32 -> "embeds" [chunks,T',D]
                                      (space-to-depth with the checkpoint's token order is in the graph)
      vision/combined.<prec>.onnx     optional (`--combined-vision`, non-S2 families only): tower+projector,
                                      TensorRT-LLM multimodal naming "input" -> "encoder_output"
      vision/tower.qdq.onnx           optional (`--qdq-vision`): symmetric int8 Q/DQ tower, the source of
                                      TensorRT int8 engines (standard ops, opset 17)
      vision/<name>.<trtprec>.plan    TensorRT engines (stage "engines" only, built on the target GPU),
                                      vision/timing.cache, and for the combined graph vision/trtllm/
                                      {model.engine, config.json} (TensorRT-LLM's --visual_engine_dir layout)
      llm/                            from vila_edge.builder.llm_onnx.build_llm_onnx (decoder model.onnx,
                                      genai_config.json, embed_tokens.npy); absent when skipped

    <prec> is fp32 | fp16 | int8 (int8: CPU tower from ONNX Runtime dynamic quantization, com.microsoft
    ops; never a TensorRT source). Every ONNX graph takes and returns float32, whatever its inner
    precision; the only dynamic axis is the leading one, named "tiles" (tower, combined) or "chunks"
    (projector); all graphs are opset 17 (TensorRT 8.6 / JetPack 6.0 parse <= 17). Weights over 1 GiB
    are stored next to the graph as "<file>.data".
    The S2 / dynamic-S2 merge is NOT in any graph: the runtime runs it (numpy) between tower and
    projector using manifest["config"]["vision"] (s2_scales, s2_output_scale_idx, grid).

manifest.json::

    format          1
    vila_edge       the version that built it (a different major.minor is refused)
    name            NAME
    checkpoint      {"path", "name", "layout", "fingerprint" (Checkpoint.fingerprint())}
    config          dataclasses.asdict(VilaConfig) (read back with vila_edge.config.config_from_json)
    overrides       {"token_order", "splice", "chat_format"} given at build time (None = checkpoint's own)
    options         the build options that determine the output (same fingerprint + same options = up to date)
    versions        {"onnx", "onnxruntime", "torch", "tensorrt"?} of the machine that built each stage
    target          {"device": "cpu" | "cuda", "sm": "8.7" | None}; "cuda" only once plans exist
    stage           "export" (portable ONNX) | "engines" (TensorRT plans added on the target)
    vision          {"files": {"tower": {prec: relpath}, "projector": {...}, "combined"?: {...}},
                     "plans": {name: relpath} (empty at stage export), "io": {name: {"input", "output"}},
                     "image_size", "tokens_per_tile" (T), "hidden_size" (C), "feature_width" (C*n_scales),
                     "projector_tokens" (T'), "embed_dim" (D), "tile_batch" / "chunk_batch" {min, opt, max}
                     (the TensorRT profiles: a runtime splits larger batches), "checks" (ONNX Runtime vs
                     the PyTorch reference, fp16 / int8 / qdq cosine vs fp32), "opset", "exporter", "merge"}
    engines_options {"trt_precision", "trt_workspace_gb"} once plans exist; engines_built_at
    llm             the dict returned by build_llm_onnx (paths relative to llm/), or {"skipped": reason}
    files           {relpath: size in bytes} of every file but manifest.json (checked on load)
    created_at      ISO 8601 UTC

`read_manifest` refuses (one EngineError line naming the file and the rebuild command) a missing
directory or manifest, a file that is not JSON, another format, a vila-edge of another major.minor,
an unknown stage, a missing section and a config this vila-edge cannot read. `check_engine_dir` adds
the file table, the checkpoint fingerprint and the TensorRT version / GPU architecture of the plans.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vila_edge import __version__
from vila_edge.config import VilaConfig, config_from_json
from vila_edge.errors import EngineError

FORMAT = 1
MANIFEST = "manifest.json"
CHECKPOINT_CONFIG = "checkpoint_config.json"
TOKENIZER_DIR = "tokenizer"
VISION_DIR = "vision"
LLM_DIR = "llm"
STAGES = ("export", "engines")


@dataclass(frozen=True)
class CheckpointRef:
    """The checkpoint an engine directory was built from."""

    path: str  # absolute, on the machine that exported it
    name: str
    layout: str  # "dev" | "hf"
    fingerprint: str  # Checkpoint.fingerprint(): same fingerprint + same options = up to date


@dataclass(frozen=True)
class Target:
    device: str = "cpu"  # "cpu" | "cuda" ("cuda" only once TensorRT plans exist)
    sm: str | None = None  # the GPU architecture the plans were built for, e.g. "8.7"


@dataclass(frozen=True)
class Manifest:
    """manifest.json, typed (the field list is the module docstring's). `vision` and `llm` are the
    records of the vision export and of the LLM builder; `config` is the resolved VilaConfig."""

    vila_edge: str
    name: str
    checkpoint: CheckpointRef
    config: VilaConfig
    overrides: dict[str, str | None]
    options: dict[str, Any]
    versions: dict[str, str | None]
    target: Target
    stage: str
    vision: dict[str, Any]
    llm: dict[str, Any]
    created_at: str
    files: dict[str, int] = field(default_factory=dict)
    engines_options: dict[str, Any] | None = None
    engines_built_at: str | None = None
    format: int = FORMAT

    @property
    def plans(self) -> dict[str, str]:
        """{engine name: relpath} of the TensorRT plans (empty at stage export)."""
        return dict(self.vision.get("plans") or {})

    def to_json(self) -> dict[str, Any]:
        """The JSON object of manifest.json (keys in the documented order; unset engine fields left out)."""
        out = {
            "format": self.format, "vila_edge": self.vila_edge, "name": self.name,
            "checkpoint": dataclasses.asdict(self.checkpoint), "config": dataclasses.asdict(self.config),
            "overrides": self.overrides, "options": self.options, "versions": self.versions,
            "target": dataclasses.asdict(self.target), "stage": self.stage, "vision": self.vision, "llm": self.llm,
            "engines_options": self.engines_options, "engines_built_at": self.engines_built_at,
            "files": self.files, "created_at": self.created_at,
        }
        return {k: v for k, v in out.items() if v is not None or k not in ("engines_options", "engines_built_at")}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> Manifest:
        """Validate the JSON object read from `path` (a manifest.json); EngineError names what is wrong."""
        hint = rebuild_hint(path.parent, _get(_get(data, "checkpoint"), "path"))
        if not isinstance(data, dict):
            raise EngineError(f"{path}: not a manifest object; {hint}")
        if data.get("format") != FORMAT:
            raise EngineError(f"{path}: format {data.get('format')!r}, this vila-edge reads format {FORMAT}; {hint}")
        built = str(data.get("vila_edge", "?"))
        if _version_key(built) != _version_key(__version__):
            raise EngineError(f"{path.parent}: built by vila-edge {built}, this is {__version__}; {hint}")
        if data.get("stage") not in STAGES:
            raise EngineError(f"{path}: unknown stage {data.get('stage')!r}; {hint}")
        for key in ("checkpoint", "config", "vision", "llm", "files"):
            if not isinstance(data.get(key), dict):
                raise EngineError(f"{path}: {key!r} is missing; {hint}")
        try:
            config = config_from_json(data["config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise EngineError(f"{path}: the config does not match this vila-edge ({exc}); {hint}") from None
        for key in ("overrides", "options", "versions", "target"):  # optional, but objects when present
            if data.get(key) is not None and not isinstance(data[key], dict):
                raise EngineError(f"{path}: {key!r} must be an object, not {type(data[key]).__name__}; {hint}")
        try:
            checkpoint = CheckpointRef(**data["checkpoint"])
            target = Target(**(data.get("target") or {}))
        except TypeError as exc:
            raise EngineError(f"{path}: unreadable checkpoint / target entry ({exc}); {hint}") from None
        return cls(vila_edge=built, name=str(data.get("name", path.parent.name)), checkpoint=checkpoint,
                   config=config, overrides=dict(data.get("overrides") or {}), options=dict(data.get("options") or {}),
                   versions=dict(data.get("versions") or {}), target=target, stage=data["stage"],
                   vision=data["vision"], llm=data["llm"], created_at=str(data.get("created_at", "")),
                   files=data["files"], engines_options=data.get("engines_options"),
                   engines_built_at=data.get("engines_built_at"), format=FORMAT)


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else None


def _version_key(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def rebuild_hint(engine_dir, checkpoint_path: str | None = None) -> str:
    return f"run `vila-edge build {checkpoint_path or 'CKPT'} -o {engine_dir}`"


def is_engine_dir(path) -> bool:
    """A directory with a manifest (written last by the builder: an interrupted build has none)."""
    return (Path(path) / MANIFEST).is_file()


def read_manifest(engine_dir) -> Manifest:
    """The validated manifest of an engine directory; EngineError (one line, with the rebuild command)
    if the directory or its manifest is absent, unreadable, of another format or vila-edge version."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise EngineError(f"{root}: engine directory not found; {rebuild_hint(root)}")
    path = root / MANIFEST
    if not path.is_file():
        raise EngineError(f"{path}: missing (not an engine directory, or an interrupted build); {rebuild_hint(root)}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable ({exc}); {rebuild_hint(root)}") from None
    return Manifest.from_json(data, path)


def check_engine_dir(engine_dir, checkpoint=None, *, sm: str | None = None) -> Manifest:
    """`read_manifest`, then the files: refuses (EngineError naming the fix) missing or truncated files,
    a checkpoint whose fingerprint differs (`checkpoint`: a Checkpoint or a checkpoint path, loaded with
    the manifest's overrides), TensorRT plans built by another TensorRT version than the installed one,
    or plans built for another GPU architecture than `sm` (e.g. "8.7") when given."""
    root = Path(engine_dir)
    m = read_manifest(root)
    hint = rebuild_hint(root, m.checkpoint.path)
    for rel, size in m.files.items():
        p = root / rel
        if not p.is_file():
            raise EngineError(f"{p}: missing (the engine directory is incomplete); {hint}")
        if size is not None and p.stat().st_size != size:
            raise EngineError(f"{p}: {p.stat().st_size} bytes, the manifest says {size} (truncated or replaced); {hint}")
    if checkpoint is not None:
        fp = _checkpoint_fingerprint(checkpoint, m)
        if fp != m.checkpoint.fingerprint:
            raise EngineError(f"{root}: built from another version of the checkpoint (fingerprint "
                              f"{m.checkpoint.fingerprint}, checkpoint now {fp}); {hint}")
    if m.plans:
        built_trt = m.versions.get("tensorrt")
        try:
            import tensorrt

            have = tensorrt.__version__
        except ImportError:  # an optional package: plans are checked where it is installed
            have = None
        if have is not None and built_trt is not None and have != built_trt:
            raise EngineError(f"{root}: TensorRT plans were built with TensorRT {built_trt}, this machine has {have}; "
                              f"rebuild them here: `vila-edge build {root} --stage engines`")
        if sm is not None and m.target.sm is not None and str(sm) != str(m.target.sm):
            raise EngineError(f"{root}: TensorRT plans were built for sm_{m.target.sm}, this GPU is sm_{sm}; "
                              f"rebuild them here: `vila-edge build {root} --stage engines`")
    return m


def _checkpoint_fingerprint(checkpoint, manifest: Manifest) -> str:
    if hasattr(checkpoint, "fingerprint"):
        return checkpoint.fingerprint()
    from vila_edge.checkpoint import load_checkpoint

    ov = manifest.overrides
    ckpt = load_checkpoint(checkpoint, token_order=ov.get("token_order"), splice=ov.get("splice"),
                           chat_format=ov.get("chat_format"))
    return ckpt.fingerprint()
