"""Vision tower + projector on ONNX Runtime (CPU, or the CUDA / TensorRT execution providers).

Engine files (engine directory contract):
  vision/tower.<prec>.onnx      "pixel_values" [tiles, 3, S, S] -> "features" [tiles, T, C]
  vision/projector.<prec>.onnx  "features" [chunks, T, C*S]    -> "embeds" [chunks, T', D]
The manifest's `vision` dict may name the files (`tower` / `projector`) and a batch limit
(`max_batch`); otherwise the single `tower.*.onnx` / `projector.*.onnx` present is used.

Tower precision on CPUs: the int8 graph (`build --int8-vision`, ONNX Runtime dynamic quantization) when
the build recorded its cosine vs the fp32 tower (manifest `vision.checks.tower_int8_vs_fp32.min`, per
token over the check tiles) >= INT8_MIN_COSINE, else fp32; `precision="fp32"` (chat / bench
`--vision-precision`) overrides. The projector has no int8 graph: it follows the tower when it can.

Memory on CPUs (issue 19, P6): tiles run CPU_TILE_BATCH at a time and the sessions have no arena. The
tower's activations grow with the batch (SigLIP-so400m at 448 px: ~320 MiB per tile, mostly attention
scores) while its speed per tile does not (measured 35.5 s/tile at batch 1 vs 36.9 at batch 3 on the
same loaded machine), and without the arena they are returned before the LLM prefill needs memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.backends.base import VisionEngine
from vila_edge.backends.ort_llm import _NP_DTYPES, ort_providers, session_options
from vila_edge.errors import EngineError


def _find(vision_dir: Path, info: dict, key: str, stem: str, precision: str | None, on_gpu: bool = False) -> Path:
    """The ONNX file of `key` ("tower" / "projector"). Manifest format 1: info["files"][key] = {prec: relpath};
    without an explicit precision: fp32 on the CPU (fp16 only runs fast on GPUs), fp16 on a GPU."""
    files = info.get("files") if isinstance(info.get("files"), dict) else {}
    by_prec = files.get(key) if isinstance(files.get(key), dict) else {}
    if not by_prec:  # other layouts: {"tower": "tower.fp32.onnx"} or nothing (glob)
        named = info.get(key)
        if isinstance(named, str):
            by_prec = {"given": named}
    if by_prec:
        # fp8 (the FP8 QDQ projector, built only on request) first on the CPU, where ONNX Runtime runs its float8 ops
        order = [precision] if precision else (["fp16", "fp32", "int8"] if on_gpu else ["fp8", "fp32", "int8", "fp16"])
        choice = next((by_prec[p] for p in order if p in by_prec), None)
        if choice is None:
            if precision:
                raise EngineError(f"{vision_dir}: no {stem} engine in precision {precision!r} "
                                  f"(has {', '.join(sorted(by_prec))})")
            choice = next(iter(by_prec.values()))
        for base in (vision_dir.parent, vision_dir):
            path = base / str(choice)
            if path.is_file():
                return path
        raise EngineError(f"{vision_dir.parent / str(choice)}: listed in manifest.json but missing; "
                          f"rebuild with `vila-edge build`")
    if precision:
        path = vision_dir / f"{stem}.{precision}.onnx"
        if path.is_file():
            return path
    found = sorted(vision_dir.glob(f"{stem}.*.onnx"))
    if not found:
        raise EngineError(f"{vision_dir}: no {stem}.<precision>.onnx; rebuild with `vila-edge build`")
    for pref in (("fp16", "fp32") if on_gpu else ("fp32", "int8", "fp16")):
        for f in found:
            if f.name == f"{stem}.{pref}.onnx":
                return f
    return found[0]


CPU_TILE_BATCH = 1  # tiles per tower run on CPUs (GPUs: all tiles at once, unless the manifest says)
INT8_MIN_COSINE = 0.995  # int8 tower used by default on CPUs only at or above this recorded cosine vs fp32


def int8_tower_cosine(info: dict) -> float | None:
    """The cosine (min per token) of the int8 tower vs fp32 recorded at build time; None when not recorded."""
    checks = info.get("checks") if isinstance(info.get("checks"), dict) else {}
    stats = checks.get("tower_int8_vs_fp32") if isinstance(checks.get("tower_int8_vs_fp32"), dict) else {}
    value = stats.get("min")
    return float(value) if isinstance(value, (int, float)) else None


def tower_precision(vision_dir: Path, info: dict, precision: str | None, on_gpu: bool) -> str | None:
    """The tower precision to load: `precision` when given; on CPUs int8 when its recorded cosine allows;
    else None (the file order of `_find`: fp32 on CPUs, fp16 on GPUs)."""
    if precision or on_gpu:
        return precision
    files = info.get("files") if isinstance(info.get("files"), dict) else {}
    listed = files.get("tower") if isinstance(files.get("tower"), dict) else {}
    has_int8 = "int8" in listed or (vision_dir / "tower.int8.onnx").is_file()
    cos = int8_tower_cosine(info)
    return "int8" if has_int8 and cos is not None and cos >= INT8_MIN_COSINE else None


class _Runner:
    def __init__(self, path: Path, providers, so, in_name: str, out_name: str):
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as exc:  # noqa: BLE001
            raise EngineError(f"{path}: onnxruntime cannot load it ({exc})") from None
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        self.in_name = in_name if in_name in ins else next(iter(ins))
        self.out_name = out_name if out_name in outs else next(iter(outs))
        self.dtype = _NP_DTYPES.get(ins[self.in_name].type) or np.float32
        self.path = path

    def __call__(self, x: np.ndarray, max_batch: int = 0) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        step = max_batch or x.shape[0] or 1
        outs = []
        for i in range(0, x.shape[0], step):
            try:
                (y,) = self.session.run([self.out_name], {self.in_name: x[i:i + step]})
            except Exception as exc:  # noqa: BLE001
                raise EngineError(f"{self.path.name}: run failed on input {list(x[i:i + step].shape)} ({exc})") from None
            outs.append(y)
        y = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
        return y.astype(np.float32, copy=False)


class OrtVisionEngine(VisionEngine):
    name = "onnxruntime"

    def __init__(self, vision_dir, info: dict | None = None, *, device: str = "cpu", threads: int | None = None,
                 precision: str | None = None, tile_batch: int | None = None, arena: bool | None = None):
        """`tile_batch` / `arena`: tiles per run (0: all) and ONNX Runtime's CPU arena; default: the
        manifest's `max_batch`, else CPU_TILE_BATCH without arena on CPUs, all tiles with it on GPUs."""
        vision_dir = Path(vision_dir)
        info = dict(info or {})
        self.providers = ort_providers(device)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        so = session_options(threads, arena=self.on_gpu if arena is None else arena)
        tower = tower_precision(vision_dir, info, precision, self.on_gpu)
        self.tower = _Runner(_find(vision_dir, info, "tower", "tower", tower, self.on_gpu), self.providers, so,
                             "pixel_values", "features")
        proj = tower if tower in ("fp32", "fp16") else None  # no int8 projector: the device's default one
        self.projector = _Runner(_find(vision_dir, info, "projector", "projector", proj, self.on_gpu),
                                 self.providers, so, "features", "embeds")
        default_batch = 0 if self.on_gpu else CPU_TILE_BATCH  # 0: all tiles in one run (dynamic batch axis)
        self.max_batch = int(tile_batch if tile_batch is not None else info.get("max_batch") or default_batch)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.tower(pixels, self.max_batch)

    def project(self, features: np.ndarray) -> np.ndarray:
        return self.projector(features, self.max_batch)

    def merge_on_device(self, pixels: np.ndarray, kernels, merge: dict) -> np.ndarray | None:
        """Tower -> CUDA S2 merge (vila_edge.kernels.s2_merge) -> projector without leaving the GPU.

        Only for fp16 engines on the CUDA EP; returns None when that does not apply (numpy path)."""
        import onnxruntime as ort

        if not self.on_gpu or self.tower.dtype != np.float16 or self.projector.dtype != np.float16:
            return None
        io = self.tower.session.io_binding()
        io.bind_cpu_input(self.tower.in_name, np.ascontiguousarray(pixels, dtype=np.float16))
        io.bind_output(self.tower.out_name, "cuda")
        self.tower.session.run_with_iobinding(io)
        feats = io.get_outputs()[0]
        n_tiles, hw, c = feats.shape()
        shape = kernels.s2_output_shape(channels=c, **{k: v for k, v in merge.items() if k != "tile_offsets"})
        merged = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float16, "cuda", 0)
        kernels.s2_merge(feats.data_ptr(), merged.data_ptr(), channels=c, **merge)
        io2 = self.projector.session.io_binding()
        io2.bind_ortvalue_input(self.projector.in_name, merged)
        io2.bind_output(self.projector.out_name, "cpu")
        self.projector.session.run_with_iobinding(io2)
        return io2.get_outputs()[0].numpy().astype(np.float32)

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.providers, "tower": self.tower.path.name,
                "projector": self.projector.path.name}
