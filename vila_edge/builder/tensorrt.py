"""TensorRT engines for the vision graphs (stage "engines", on the target GPU).

Built from the same ONNX files the export stage wrote (fp32 graph preferred: TensorRT picks fp16
kernels itself under the FP16 flag; the int8 CPU graph uses ONNX Runtime contrib ops and is never a
source). Everything that decides an engine -- source file, optimization profile over the tile batch,
builder flags, workspace -- is computed as plain data first (`plan_engines`), so it is testable
without TensorRT; `build_engines` then only executes that plan. Needs `tensorrt` (JetPack ships it;
on x86 `pip install tensorrt`), not torch.

Profiles (leading axis; min / opt / max) come from the checkpoint's tiling scheme
(`vila_edge.media.tiling`, `tile_batch` / `chunk_batch`), e.g.:
  dynamic_s2  tiles 1 / 1+4+9 / 1+4+max_tiles   (scales s0, 2s0, 3s0: (s/s0)^2 fixed tiles + the last grid)
  dynamic     tiles 1 / max_tiles+1 / max_tiles+1 (tiles + thumbnail)
  s2          tiles 1 / n / n with n = sum over scales of ceil(s/split)^2 (every image is n tiles)
  resize/pad  tiles 1 / 1 / num_video_frames
Projector chunks: dynamic_s2 1 / 9 / max(max_tiles, frames); dynamic like its tiles; s2 and
resize 1 / 1 / num_video_frames. A runtime with more tiles than `max` splits the batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vila_edge.engine_dir import Manifest
from vila_edge.errors import EngineError
from vila_edge.media.tiling import tiling_scheme

DEFAULT_WORKSPACE_GB = 2.0
TIMING_CACHE = "vision/timing.cache"
TRT_PRECISIONS = ("fp16", "fp32", "int8", "fp8")  # int8: from the QDQ tower (--qdq-vision); fp8: not yet
TRTLLM_DIR = "vision/trtllm"  # TensorRT-LLM `--visual_engine_dir` layout: model.engine + config.json


@dataclass(frozen=True)
class Profile:
    min: int
    opt: int
    max: int

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineSpec:
    name: str  # "tower" | "projector" | "combined"
    onnx: str  # source graph, relative to the engine dir
    plan: str  # output, relative to the engine dir
    input: str
    output: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    flags: tuple[str, ...]  # trt.BuilderFlag names, lower case
    workspace_bytes: int

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("min_shape", "opt_shape", "max_shape", "flags"):
            d[k] = list(d[k])
        return d


def tile_batch_profile(cfg) -> Profile:
    """Tiles the tower sees at once for one image (or one video's frames)."""
    return Profile(*tiling_scheme(cfg.vision).tile_batch(max(1, cfg.num_video_frames)))


def chunk_batch_profile(cfg) -> Profile:
    """Chunks the projector sees at once (after the merge)."""
    return Profile(*tiling_scheme(cfg.vision).chunk_batch(max(1, cfg.num_video_frames)))


def sm_tuple(sm: str | None) -> tuple[int, int] | None:
    if sm is None:
        return None
    major, _, minor = str(sm).partition(".")
    return int(major), int(minor or 0)


def builder_flags(precision: str, sm: str | None) -> tuple[str, ...]:
    """BuilderFlag names for a precision. int8/fp8 are explicit quantization (QDQ graphs): the flags
    only allow those kernels; fp16 stays on for the layers outside Q/DQ pairs."""
    if precision not in TRT_PRECISIONS:
        raise EngineError(f"TensorRT precision {precision!r} is not one of: {', '.join(TRT_PRECISIONS)}")
    if precision == "fp32":
        return ()
    if precision == "fp16":
        return ("fp16",)
    if precision == "fp8":
        cc = sm_tuple(sm)
        if cc is not None and cc < (8, 9):
            raise EngineError(f"FP8 engines need an Ada/Hopper GPU (sm_89+); this target is sm_{sm} "
                              f"(Jetson Orin has no FP8): use --trt-precision fp16 or int8")
        return ("fp16", "fp8")
    return ("fp16", "int8")


def plan_engines(manifest: Manifest, *, precision: str = "fp16", workspace_gb: float = DEFAULT_WORKSPACE_GB,
                 sm: str | None = None) -> list[EngineSpec]:
    """The engines to build for an exported engine directory, as data."""
    cfg = manifest.config
    vision = manifest.vision
    files = vision["files"]
    flags = builder_flags(precision, sm)
    ws = int(workspace_gb * (1 << 30))
    T, CS = vision["tokens_per_tile"], vision["feature_width"]
    S = cfg.vision.image_size
    tiles, chunks = tile_batch_profile(cfg), chunk_batch_profile(cfg)

    def source(name: str) -> str:
        avail = files.get(name) or {}
        if precision == "fp8":
            raise EngineError("TensorRT fp8 engines need FP8 QDQ graphs (ONNX opset 19), which this vila-edge does not "
                              "export yet; use --trt-precision fp16 or int8")
        if precision == "int8" and name == "tower":
            if "qdq" not in avail:
                raise EngineError("TensorRT int8 engines are built from a QDQ tower graph: rebuild the export with "
                                  "--qdq-vision (or use --trt-precision fp16)")
            return avail["qdq"]
        for prec in ("fp32", "fp16"):
            if prec in avail:
                return avail[prec]
        raise EngineError(f"the engine directory has no fp32/fp16 {name} graph to build a TensorRT engine from; "
                          f"rebuild the export with --precision fp32 or fp16")

    def shapes(p: Profile, tail: tuple[int, ...]):
        return (p.min, *tail), (p.opt, *tail), (p.max, *tail)

    specs = []
    io = vision["io"]
    for name, prof, tail in (("tower", tiles, (3, S, S)), ("projector", chunks, (T, CS))):
        mn, op, mx = shapes(prof, tail)
        # int8: only the tower is quantized (QDQ); the small projector stays fp16
        fl = flags if name == "tower" or precision != "int8" else builder_flags("fp16", sm)
        prec = precision if fl == flags else "fp16"
        specs.append(EngineSpec(name, source(name), f"vision/{name}.{prec}.plan", io[name]["input"],
                                io[name]["output"], mn, op, mx, fl, ws))
    if "combined" in files and precision != "int8":
        mn, op, mx = shapes(tiles, (3, S, S))
        specs.append(EngineSpec("combined", source("combined"), f"{TRTLLM_DIR}/model.engine", io["combined"]["input"],
                                io["combined"]["output"], mn, op, mx, flags, ws))
    return specs


# ---- target detection ---------------------------------------------------------------------------


def tensorrt_version() -> str | None:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def detect_sm() -> str | None:
    """Compute capability of GPU 0 as "8.7", or None without a CUDA GPU. No torch needed."""
    for mod in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            import importlib

            cudart = importlib.import_module(mod)
            attr = cudart.cudaDeviceAttr
            err, major = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, 0)
            err2, minor = cudart.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, 0)
            if int(err) == 0 and int(err2) == 0:
                return f"{major}.{minor}"
        except Exception:
            pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            line = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
            if line and line[0].isdigit():
                return line.strip()
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    try:  # Jetson Orin (JetPack 6 has no nvidia-smi compute_cap query)
        compat = Path("/proc/device-tree/compatible").read_bytes()
        if b"tegra234" in compat:
            return "8.7"
    except OSError:
        pass
    return None


def trt_available() -> tuple[bool, str]:
    """(usable, reason): TensorRT importable and a CUDA GPU present."""
    ver = tensorrt_version()
    if ver is None:
        return False, "TensorRT is not installed (JetPack ships it; on x86: pip install tensorrt)"
    if detect_sm() is None:
        return False, f"TensorRT {ver} is installed but no CUDA GPU was found"
    return True, f"TensorRT {ver}"


# ---- building -------------------------------------------------------------------------------------


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError("TensorRT is not installed: `--stage engines` runs on the target GPU "
                          "(JetPack ships tensorrt; on x86: pip install tensorrt)") from None
    return trt


def build_engine(spec: EngineSpec, root: Path, timing_cache: bytes | None = None) -> tuple[bytes, bytes]:
    """Build one serialized engine; returns (plan bytes, updated timing cache bytes)."""
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT < 10 needs explicit batch requested; in 10 it is the only mode (the flag is deprecated)
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    src = root / spec.onnx
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{src}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    for flag in spec.flags:
        config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input, spec.min_shape, spec.opt_shape, spec.max_shape)
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{src}: TensorRT failed to build the {spec.name} engine (see the log above); "
                          f"try a larger --trt-workspace-gb")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(root, specs: list[EngineSpec], *, vision_meta: dict | None = None, log=print) -> dict:
    """Build every spec into `root` (sharing one timing cache, saved to vision/timing.cache)."""
    root = Path(root)
    cache_path = root / TIMING_CACHE
    cache = cache_path.read_bytes() if cache_path.is_file() else None
    out = {}
    for spec in specs:
        t0 = time.perf_counter()
        log(f"TensorRT: {spec.name} <- {spec.onnx} ({', '.join(spec.flags) or 'fp32'}, "
            f"batch {spec.min_shape[0]}..{spec.max_shape[0]})")
        plan, cache = build_engine(spec, root, cache)
        dst = root / spec.plan
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(plan)
        out[spec.name] = {"plan": spec.plan, "bytes": len(plan), "seconds": round(time.perf_counter() - t0, 1),
                          "spec": spec.as_dict()}
        if spec.name == "combined":
            meta = vision_meta or {}
            (dst.parent / "config.json").write_text(json.dumps({"builder_config": {
                "model_type": "vila", "precision": "float16" if "fp16" in spec.flags else "float32",
                "max_batch_size": spec.max_shape[0], "input_name": spec.input, "output_name": spec.output,
                "output_shape": [spec.max_shape[0], meta.get("projector_tokens"), meta.get("embed_dim")],
            }}, indent=2))
    if cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(cache)
    return out
