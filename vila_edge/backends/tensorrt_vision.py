"""Vision tower + projector as native TensorRT engines (TensorRT >= 10 name-based I/O API).

Files: `vision/tower*.plan|engine` ("pixel_values" -> "features") and `vision/projector*.plan|engine`
("features" -> "embeds"), built from the ONNX files of the engine directory (e.g. `trtexec
--onnx=vision/tower.fp16.onnx --saveEngine=vision/tower.fp16.plan --fp16 --minShapes=pixel_values:1x3x448x448
--optShapes=pixel_values:4x3x448x448 --maxShapes=pixel_values:17x3x448x448`). Engines are specific to
the GPU (SM) and TensorRT version that built them: build them on the target (Jetson) itself.

Device memory and copies go through cuda-python's runtime API (`cuda.bindings.runtime`, or the older
`from cuda import cudart`); batches larger than the engine's optimization profile are split.
Imported lazily: nothing here loads unless the backend is chosen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vila_edge.backends.base import VisionEngine
from vila_edge.errors import EngineError


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise EngineError("the TensorRT backend needs cuda-python (pip install cuda-python)") from None
    return cudart


def _check(result, what: str):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error in {what}: {err}")
    return rest[0] if len(rest) == 1 else rest


class _DeviceBuffer:
    def __init__(self, cudart, nbytes: int):
        self.cudart = cudart
        self.nbytes = max(1, nbytes)
        self.ptr = int(_check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr:
            self.cudart.cudaFree(self.ptr)
            self.ptr = 0


class _TrtModule:
    """One engine with one input and one output tensor."""

    def __init__(self, path: Path, trt, cudart, stream, in_name: str, out_name: str):
        self.path = path
        self.trt = trt
        self.cudart = cudart
        self.stream = stream
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineError(f"{path}: TensorRT cannot deserialize it (built for another GPU or TensorRT version? "
                              f"rebuild it on this device)")
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        ins = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.in_name = in_name if in_name in ins else ins[0]
        self.out_name = out_name if out_name in outs else outs[0]
        self.in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.in_name)))
        self.out_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.out_name)))
        try:
            _, _, max_shape = engine.get_tensor_profile_shape(self.in_name, 0)
            self.max_batch = int(max_shape[0])
        except Exception:  # noqa: BLE001 - static engines have no profile
            self.max_batch = int(engine.get_tensor_shape(self.in_name)[0])
        self._bufs: dict[str, _DeviceBuffer] = {}

    def _buf(self, key: str, nbytes: int) -> _DeviceBuffer:
        b = self._bufs.get(key)
        if b is None or b.nbytes < nbytes:
            if b is not None:
                b.free()
            b = self._bufs[key] = _DeviceBuffer(self.cudart, nbytes)
        return b

    def run(self, x: np.ndarray) -> np.ndarray:
        cudart = self.cudart
        outs = []
        for i in range(0, x.shape[0], max(1, self.max_batch)):
            part = np.ascontiguousarray(x[i:i + self.max_batch], dtype=self.in_dtype)
            self.context.set_input_shape(self.in_name, tuple(part.shape))
            out_shape = tuple(self.context.get_tensor_shape(self.out_name))
            y = np.empty(out_shape, dtype=self.out_dtype)
            bin_ = self._buf("in", part.nbytes)
            bout = self._buf("out", y.nbytes)
            kind_h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            kind_d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(bin_.ptr, part.ctypes.data, part.nbytes, kind_h2d, self.stream), "H2D copy")
            self.context.set_tensor_address(self.in_name, bin_.ptr)
            self.context.set_tensor_address(self.out_name, bout.ptr)
            if not self.context.execute_async_v3(self.stream):
                raise EngineError(f"{self.path.name}: TensorRT execution failed on input {list(part.shape)}")
            _check(cudart.cudaMemcpyAsync(y.ctypes.data, bout.ptr, y.nbytes, kind_d2h, self.stream), "D2H copy")
            _check(cudart.cudaStreamSynchronize(self.stream), "stream sync")
            outs.append(y)
        y = outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)
        return y.astype(np.float32, copy=False)

    def close(self) -> None:
        for b in self._bufs.values():
            b.free()
        self._bufs.clear()


def _engine_file(vision_dir: Path, stem: str, info: dict | None = None) -> Path:
    plans = (info or {}).get("plans") if isinstance((info or {}).get("plans"), dict) else {}
    for name, rel in sorted(plans.items()):
        if str(name).startswith(stem):
            for base in (vision_dir.parent, vision_dir):
                if (base / str(rel)).is_file():
                    return base / str(rel)
    found = sorted([*vision_dir.glob(f"{stem}*.plan"), *vision_dir.glob(f"{stem}*.engine")])
    if not found:
        raise EngineError(f"{vision_dir}: no {stem}*.plan / {stem}*.engine TensorRT engine")
    return found[0]


class TensorRTVisionEngine(VisionEngine):
    name = "tensorrt"
    on_gpu = True

    def __init__(self, vision_dir, info: dict | None = None):
        try:
            import tensorrt as trt
        except ImportError:
            raise EngineError("the TensorRT vision backend needs the `tensorrt` Python package (JetPack ships it; "
                              "on x86 install it from NVIDIA's index)") from None
        cudart = _cudart()
        vision_dir = Path(vision_dir)
        self.stream = _check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.tower = _TrtModule(_engine_file(vision_dir, "tower", info), trt, cudart, self.stream, "pixel_values", "features")
        self.projector = _TrtModule(_engine_file(vision_dir, "projector", info), trt, cudart, self.stream, "features",
                                    "embeds")
        self._cudart = cudart

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.tower.run(pixels)

    def project(self, features: np.ndarray) -> np.ndarray:
        return self.projector.run(features)

    def describe(self) -> dict:
        return {"backend": self.name, "tower": self.tower.path.name, "projector": self.projector.path.name,
                "max_batch": self.tower.max_batch}

    def close(self) -> None:
        self.tower.close()
        self.projector.close()
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None
