"""The engine directory: what `vila-edge build` writes and the runtime reads.

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

Builds are atomic: everything is written to a hidden temp dir next to the target (".NAME.build-<pid>-*")
and renamed into place at the end; a lock file "NAME.lock" (created with O_EXCL, holding the pid) keeps
two builds off one directory. Leftovers of killed builds are removed by the next build of NAME and
ignored by everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from vila_edge.errors import EngineError

FORMAT = 1
MANIFEST = "manifest.json"
CHECKPOINT_CONFIG = "checkpoint_config.json"
TOKENIZER_DIR = "tokenizer"
VISION_DIR = "vision"
LLM_DIR = "llm"
STAGES = ("export", "engines")


def rebuild_hint(engine_dir, manifest: dict | None = None) -> str:
    ckpt = "CKPT"
    if manifest:
        ckpt = (manifest.get("checkpoint") or {}).get("path") or ckpt
    return f"run `vila-edge build {ckpt} -o {engine_dir}`"


def _version_key(version: str) -> tuple[str, ...]:
    return tuple(str(version).split(".")[:2])


def load_manifest(engine_dir) -> dict:
    """Read manifest.json; EngineError (one line, with the rebuild command) if absent or unreadable."""
    root = Path(engine_dir)
    if not root.is_dir():
        raise EngineError(f"{root}: engine directory not found; {rebuild_hint(root)}")
    path = root / MANIFEST
    if not path.is_file():
        raise EngineError(f"{path}: missing (not an engine directory, or an interrupted build); {rebuild_hint(root)}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable ({exc}); {rebuild_hint(root)}") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path}: not a manifest object; {rebuild_hint(root)}")
    return manifest


def check_engine_dir(engine_dir, checkpoint=None, *, sm: str | None = None) -> dict:
    """Validate an engine directory and return its manifest.

    Refuses (EngineError naming the fix) a missing directory or manifest, another manifest format, a
    vila-edge of another major.minor, missing or truncated files, a checkpoint whose fingerprint differs
    (`checkpoint`: a Checkpoint or a checkpoint path, loaded with the manifest's overrides), TensorRT
    plans built by another TensorRT version than the installed one, or plans built for another GPU
    architecture than `sm` (e.g. "8.7") when given.
    """
    from vila_edge import __version__

    root = Path(engine_dir)
    m = load_manifest(root)
    hint = rebuild_hint(root, m)
    if m.get("format") != FORMAT:
        raise EngineError(f"{root / MANIFEST}: format {m.get('format')!r}, this vila-edge reads format {FORMAT}; {hint}")
    built = str(m.get("vila_edge", "?"))
    if _version_key(built) != _version_key(__version__):
        raise EngineError(f"{root}: built by vila-edge {built}, this is {__version__}; {hint}")
    if m.get("stage") not in STAGES:
        raise EngineError(f"{root / MANIFEST}: unknown stage {m.get('stage')!r}; {hint}")
    for key in ("checkpoint", "config", "vision", "files"):
        if not isinstance(m.get(key), dict):
            raise EngineError(f"{root / MANIFEST}: {key!r} is missing; {hint}")
    for rel, size in m["files"].items():
        p = root / rel
        if not p.is_file():
            raise EngineError(f"{p}: missing (the engine directory is incomplete); {hint}")
        if size is not None and p.stat().st_size != size:
            raise EngineError(f"{p}: {p.stat().st_size} bytes, the manifest says {size} (truncated or replaced); {hint}")
    if checkpoint is not None:
        fp = _checkpoint_fingerprint(checkpoint, m)
        if fp != m["checkpoint"].get("fingerprint"):
            raise EngineError(
                f"{root}: built from another version of the checkpoint (fingerprint {m['checkpoint'].get('fingerprint')}, "
                f"checkpoint now {fp}); {hint}"
            )
    plans = (m["vision"].get("plans") or {})
    if plans:
        built_trt = (m.get("versions") or {}).get("tensorrt")
        try:
            import tensorrt  # noqa: F401

            have = tensorrt.__version__
        except ImportError:
            have = None
        if have is not None and built_trt is not None and have != built_trt:
            raise EngineError(f"{root}: TensorRT plans were built with TensorRT {built_trt}, this machine has {have}; "
                              f"rebuild them here: `vila-edge build {root} --stage engines`")
        built_sm = (m.get("target") or {}).get("sm")
        if sm is not None and built_sm is not None and str(sm) != str(built_sm):
            raise EngineError(f"{root}: TensorRT plans were built for sm_{built_sm}, this GPU is sm_{sm}; "
                              f"rebuild them here: `vila-edge build {root} --stage engines`")
    return m


def _checkpoint_fingerprint(checkpoint, manifest: dict) -> str:
    if hasattr(checkpoint, "fingerprint"):
        return checkpoint.fingerprint()
    from vila_edge.checkpoint import load_checkpoint

    ov = manifest.get("overrides") or {}
    ckpt = load_checkpoint(checkpoint, token_order=ov.get("token_order"), splice=ov.get("splice"),
                           chat_format=ov.get("chat_format"))
    return ckpt.fingerprint()


def file_table(root) -> dict[str, int]:
    """{relative path: size} of every file under root except the manifest (sorted, '/' separators)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = p.stat().st_size
    return out


def write_manifest(root, manifest: dict) -> None:
    """Write manifest.json (through a temp file + rename: a manifest is either absent or complete)."""
    root = Path(root)
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, root / MANIFEST)


# ---- locking ---------------------------------------------------------------------------------


def lock_path(target) -> Path:
    target = Path(target)
    return target.parent / (target.name + ".lock")


def _pid_alive(pid: int, started: float | None) -> bool:
    try:
        import psutil

        proc = psutil.Process(pid)
        # a recycled pid belongs to a process that started after the lock was written
        return not (started is not None and proc.create_time() > started + 2.0)
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except Exception:  # psutil.NoSuchProcess, AccessDenied on a zombie, ...
        return False


class BuildLock:
    """`NAME.lock` next to the target, created with O_CREAT|O_EXCL; holds {"pid", "host", "started"}.

    A lock whose process is gone (same host) is stale and taken over; a live one is refused.
    """

    def __init__(self, target):
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.held = False

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def acquire(self) -> BuildLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    # being written right now, or garbage: give a writer a moment, then judge it
                    time.sleep(0.2)
                    owner = self._read()
                if owner is not None and (owner.get("host") != info["host"]
                                          or _pid_alive(int(owner.get("pid", -1)), owner.get("started"))):
                    raise EngineError(
                        f"{self.target}: another build (pid {owner.get('pid')} on {owner.get('host')}) is writing it; "
                        f"wait for it, or delete {self.path} if that build is gone"
                    ) from None
                # stale: move it aside atomically (only one contender wins the rename), then retry
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                try:
                    moved = json.loads(aside.read_text())
                except (OSError, ValueError):
                    moved = None
                if owner is not None and moved is not None and moved != owner:
                    # another contender replaced the stale lock with a live one in between: put it back
                    with contextlib.suppress(OSError):
                        os.link(aside, self.path)
                    with contextlib.suppress(OSError):
                        os.unlink(aside)
                    raise EngineError(f"{self.target}: another build (pid {moved.get('pid')}) is writing it; wait for it") from None
                with contextlib.suppress(OSError):
                    os.unlink(aside)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.held = True
            return self
        raise EngineError(f"{self.path}: could not take the build lock; delete it if no build is running")

    def release(self) -> None:
        if self.held:
            owner = self._read()
            if owner is None or owner.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            self.held = False

    def __enter__(self) -> BuildLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---- atomic publication ------------------------------------------------------------------------


def temp_prefix(target) -> str:
    return f".{Path(target).name}.build-"


def clean_stale(target) -> list[Path]:
    """Remove temp dirs left by killed builds of `target`. Call only while holding its BuildLock."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if p.name.startswith(temp_prefix(target)) or p.name.startswith(f".{target.name}.replaced-"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextlib.contextmanager
def staging(target):
    """Yield a fresh temp dir next to `target`; on success it replaces `target` (rename), on any
    exception (Ctrl-C included) it is deleted and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{temp_prefix(target)}{os.getpid()}-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the published directory should not be
    try:
        yield tmp
        publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(tmp: Path, target: Path) -> None:
    """Move tmp into target's place. An existing target is renamed aside first, then deleted."""
    if not target.exists():
        os.rename(tmp, target)
        return
    aside = target.parent / f".{target.name}.replaced-{os.getpid()}-{int(time.time() * 1000)}"
    os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (same filesystem: instant, no extra disk) or copy one file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
