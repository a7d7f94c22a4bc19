"""Vision tower + projector on ONNX Runtime (CPU, or the CUDA / TensorRT execution providers).

Engine files (engine directory contract):
  vision/tower.<prec>.onnx      "pixel_values" [tiles, 3, S, S] -> "features" [tiles, T, C]
  vision/projector.<prec>.onnx  "features" [chunks, T, C*S]    -> "embeds" [chunks, T', D]
The manifest's `vision` dict may name the files (`tower` / `projector`) and a batch limit
(`max_batch`); otherwise the single `tower.*.onnx` / `projector.*.onnx` present is used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.backends.base import VisionEngine
from vila_edge.backends.ort_llm import _NP_DTYPES, ort_providers, session_options
from vila_edge.errors import EngineError


def _find(vision_dir: Path, info: dict, key: str, stem: str, precision: str | None) -> Path:
    named = info.get(key) or info.get(f"{key}_file")
    if isinstance(named, dict):
        named = named.get("file") or named.get("filename")
    if named:
        path = vision_dir / Path(str(named)).name
        if not path.is_file():
            raise EngineError(f"{path}: listed in manifest.json but missing; rebuild with `vila-edge build`")
        return path
    if precision:
        path = vision_dir / f"{stem}.{precision}.onnx"
        if path.is_file():
            return path
    found = sorted(vision_dir.glob(f"{stem}.*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise EngineError(f"{vision_dir}: no {stem}.<precision>.onnx; rebuild with `vila-edge build`")
    raise EngineError(f"{vision_dir}: several {stem} engines ({', '.join(p.name for p in found)}); "
                      f"choose one with --vision-precision")


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
                 precision: str | None = None):
        vision_dir = Path(vision_dir)
        info = dict(info or {})
        self.providers = ort_providers(device)
        self.on_gpu = self.providers[0] != "CPUExecutionProvider"
        so = session_options(threads)
        self.tower = _Runner(_find(vision_dir, info, "tower", "tower", precision), self.providers, so,
                             "pixel_values", "features")
        self.projector = _Runner(_find(vision_dir, info, "projector", "projector", precision), self.providers, so,
                                 "features", "embeds")
        self.max_batch = int(info.get("max_batch", 0) or 0)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.tower(pixels, self.max_batch)

    def project(self, features: np.ndarray) -> np.ndarray:
        return self.projector(features, self.max_batch)

    def describe(self) -> dict:
        return {"backend": self.name, "providers": self.providers, "tower": self.tower.path.name,
                "projector": self.projector.path.name}
