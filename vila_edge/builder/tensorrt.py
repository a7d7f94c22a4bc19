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

TensorRT versions (switched on `tensorrt.__version__` at run time; README "TensorRT / TensorRT-LLM
versions"): 8.6 (JetPack 6.0) needs EXPLICIT_BATCH requested; 10.x builds with BuilderFlag.FP16 / INT8
(deprecated in 10.12, still present up to 10.x); 11 removed those flags (python/src/infer/pyCore.cpp at
NVIDIA/TensorRT v11.0: `BuilderFlag` has no FP16/INT8/FP8, every network is strongly typed), so the
precision comes from the graph itself: an fp16 engine is built from the fp16 ONNX graph, flags empty.
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
from vila_edge.nvidia_versions import tensorrt_version, trt_major  # noqa: F401  (re-exported)

DEFAULT_WORKSPACE_GB = 2.0
STRONGLY_TYPED_FROM = 11  # TensorRT major without BuilderFlag.FP16/INT8/FP8 (NVIDIA/TensorRT v11.0 pyCore.cpp)
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


def strongly_typed(trt_version: str | None) -> bool:
    """TensorRT >= 11: no precision builder flags; the network's own types decide."""
    major = trt_major(trt_version)
    return major is not None and major >= STRONGLY_TYPED_FROM


def builder_flags(precision: str, sm: str | None, trt_version: str | None = None) -> tuple[str, ...]:
    """BuilderFlag names for a precision. int8/fp8 are explicit quantization (QDQ graphs): the flags
    only allow those kernels; fp16 stays on for the layers outside Q/DQ pairs. TensorRT >= 11 has no
    such flags (strongly typed): none, the source graph carries the precision (`plan_engines`)."""
    if precision not in TRT_PRECISIONS:
        raise EngineError(f"TensorRT precision {precision!r} is not one of: {', '.join(TRT_PRECISIONS)}")
    if strongly_typed(trt_version):
        return ()
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
                 sm: str | None = None, trt_version: str | None = None) -> list[EngineSpec]:
    """The engines to build for an exported engine directory, as data. `trt_version`: the TensorRT
    that will build them (default: the installed one; none installed plans for TensorRT 10)."""
    cfg = manifest.config
    vision = manifest.vision
    files = vision["files"]
    trt_version = trt_version or tensorrt_version()
    typed = strongly_typed(trt_version)
    flags = builder_flags(precision, sm, trt_version)
    ws = int(workspace_gb * (1 << 30))
    T, CS = vision["tokens_per_tile"], vision["feature_width"]
    S = cfg.vision.image_size
    tiles, chunks = tile_batch_profile(cfg), chunk_batch_profile(cfg)

    def source(name: str, prec: str) -> str:
        avail = files.get(name) or {}
        if prec == "fp8":
            raise EngineError("TensorRT fp8 engines need FP8 QDQ graphs (ONNX opset 19), which this vila-edge does not "
                              "export yet; use --trt-precision fp16 or int8")
        if prec == "int8":
            if "qdq" not in avail:
                raise EngineError("TensorRT int8 engines are built from a QDQ tower graph: rebuild the export with "
                                  "--qdq-vision (or use --trt-precision fp16)")
            return avail["qdq"]
        if typed and prec == "fp16":
            # strongly typed: an fp32 graph would give an fp32 engine, so fp16 needs the fp16 graph
            if "fp16" in avail:
                return avail["fp16"]
            raise EngineError(f"TensorRT {trt_version} builds strongly typed networks (no FP16 builder flag): "
                              f"an fp16 {name} engine needs the fp16 ONNX graph; rebuild the export with "
                              f"--precision fp16, or use --trt-precision fp32")
        for variant in ("fp32", "fp16"):
            if variant in avail:
                return avail[variant]
        raise EngineError(f"the engine directory has no fp32/fp16 {name} graph to build a TensorRT engine from; "
                          f"rebuild the export with --precision fp32 or fp16")

    def shapes(p: Profile, tail: tuple[int, ...]):
        return (p.min, *tail), (p.opt, *tail), (p.max, *tail)

    specs = []
    io = vision["io"]
    for name, prof, tail in (("tower", tiles, (3, S, S)), ("projector", chunks, (T, CS))):
        mn, op, mx = shapes(prof, tail)
        # int8: only the tower is quantized (QDQ); the small projector stays fp16 (strongly typed
        # TensorRT without an fp16 projector graph: fp32)
        prec = precision if name == "tower" or precision != "int8" else "fp16"
        if typed and precision == "int8" and name == "projector" and "fp16" not in (files.get(name) or {}):
            prec = "fp32"
        specs.append(EngineSpec(name, source(name, prec), f"vision/{name}.{prec}.plan", io[name]["input"],
                                io[name]["output"], mn, op, mx, builder_flags(prec, sm, trt_version), ws))
    if "combined" in files and precision != "int8":
        mn, op, mx = shapes(tiles, (3, S, S))
        specs.append(EngineSpec("combined", source("combined", precision), f"{TRTLLM_DIR}/model.engine", io["combined"]["input"],
                                io["combined"]["output"], mn, op, mx, flags, ws))
    return specs


# ---- target detection ---------------------------------------------------------------------------


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
    if is_jetson(b"tegra234"):  # Jetson Orin (JetPack 6 has no nvidia-smi compute_cap query)
        return "8.7"
    return None


def is_jetson(chip: bytes = b"tegra") -> bool:
    """A Jetson (L4T) board: its device tree names the Tegra SoC (tegra234 = Orin)."""
    try:
        return chip in Path("/proc/device-tree/compatible").read_bytes()
    except OSError:
        return False


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


def graph_io_dtype(path: Path) -> str:
    """The element type of an ONNX graph's first input ("float32", "float16", ...). vila-edge's graphs
    all keep float32 I/O (`vision_onnx.to_fp16(keep_io_types=True)`), the fallback when `onnx` is absent."""
    try:
        import onnx
    except ImportError:
        return "float32"
    graph = onnx.load(str(path), load_external_data=False).graph
    elem = graph.input[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
            onnx.TensorProto.BFLOAT16: "bfloat16"}.get(elem, "float32")


def _set_flags(trt, config, spec: EngineSpec) -> None:
    for flag in spec.flags:
        value = getattr(trt.BuilderFlag, flag.upper(), None)
        if value is None:  # TensorRT 11 removed FP16/INT8/FP8 (strongly typed networks only)
            raise EngineError(f"TensorRT {trt.__version__} has no BuilderFlag.{flag.upper()} (removed in TensorRT 11: "
                              f"strongly typed networks); re-plan the engines on this machine "
                              f"(`vila-edge build --stage engines`), which builds fp16 from the fp16 ONNX graph")
        config.set_flag(value)


def _attach_timing_cache(config, timing_cache: bytes | None, log) -> None:
    """Attach the saved timing cache; one from another GPU / TensorRT is refused by TensorRT
    (`set_timing_cache` returns False), then the build starts from an empty one."""
    cache = config.create_timing_cache(timing_cache or b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    log(f"TensorRT: {TIMING_CACHE} was made on another GPU or TensorRT version; starting a new one")
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise EngineError("TensorRT refused an empty timing cache; delete vision/timing.cache and rebuild")


def build_engine(spec: EngineSpec, root: Path, timing_cache: bytes | None = None, log=print) -> tuple[bytes, bytes | None]:
    """Build one serialized engine; returns (plan bytes, updated timing cache bytes or None)."""
    trt = _import_trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = trt_major(trt.__version__) or 10
    # TensorRT < 10 needs explicit batch requested; in 10 it is the only mode (the flag is deprecated,
    # gone in 11, where STRONGLY_TYPED is always on: NVIDIA/TensorRT v11.0 python/src/infer/pyCore.cpp)
    net_flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if major < 10 else 0
    network = builder.create_network(net_flags)
    parser = trt.OnnxParser(network, logger)
    src = root / spec.onnx
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{src}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    _set_flags(trt, config, spec)
    profile = builder.create_optimization_profile()
    profile.set_shape(spec.input, spec.min_shape, spec.opt_shape, spec.max_shape)
    config.add_optimization_profile(profile)
    _attach_timing_cache(config, timing_cache, log)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{src}: TensorRT failed to build the {spec.name} engine (see the log above); "
                          f"try a larger --trt-workspace-gb")
    cache = config.get_timing_cache()  # None when no cache is attached (documented in pyCoreDoc.h)
    return bytes(serialized), (bytes(cache.serialize()) if cache is not None else None)


def trtllm_visual_config(spec: EngineSpec, io_dtype: str, vision_meta: dict | None = None) -> dict:
    """`vision/trtllm/config.json` for TensorRT-LLM's multimodal runner. Its `precision` is the dtype the
    runner casts the image to and declares for the engine input (multimodal_model_runner.py:
    `image.to(str_dtype_to_torch(self.vision_precision))`), so it must be the graph's I/O dtype, not
    the builder's math precision (an fp16 engine from our graphs still takes float32)."""
    meta = vision_meta or {}
    return {"builder_config": {
        "model_type": "vila", "precision": io_dtype,
        "max_batch_size": spec.max_shape[0], "input_name": spec.input, "output_name": spec.output,
        "output_shape": [spec.max_shape[0], meta.get("projector_tokens"), meta.get("embed_dim")],
    }}


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
        plan, cache = build_engine(spec, root, cache, log=log)
        dst = root / spec.plan
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(plan)
        out[spec.name] = {"plan": spec.plan, "bytes": len(plan), "seconds": round(time.perf_counter() - t0, 1),
                          "spec": spec.as_dict()}
        if spec.name == "combined":
            config = trtllm_visual_config(spec, graph_io_dtype(root / spec.onnx), vision_meta)
            (dst.parent / "config.json").write_text(json.dumps(config, indent=2))
    if cache:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_bytes(cache)
    return out
