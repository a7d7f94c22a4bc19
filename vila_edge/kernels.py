"""Python launchers for the CUDA kernels in ``kernels/`` (S2 merge, FP8 block-scaled GEMM).

API (all launches are asynchronous on the caller's ``stream``; documented in kernels/README.md):

* :func:`s2_merge` -- fused S2 / dynamic-S2 merge straight into the projector's input layout.
* :func:`fp8_quantize` -- activations -> FP8 E4M3 + 1x128 block scales.
* :func:`fp8_gemm` -- W8A8 ``Y = X W^T`` with block scales (FP8 tensor cores, sm_89+).
* :func:`fp8_gemm_weight_only` -- fp16 ``X`` times FP8 ``W`` (any sm_80+; the Jetson Orin path).
* :func:`fp8_linear` -- picks the path for the GPU; :class:`Fp8Linear` owns a quantized weight.

Arrays may be anything exposing ``__cuda_array_interface__`` (PyTorch, CuPy, Numba, ...) or
DLPack (``__dlpack__``; needed for bfloat16, which the array interface cannot describe), a
:class:`DeviceArray`, or a raw device pointer ``int`` (then the shape comes from the other
arguments, e.g. ONNX Runtime's ``OrtValue.data_ptr()``). Arguments are validated (dtype, shape,
C-contiguity, alignment, writability) and rejected with a ``ValueError`` naming the argument
before any CUDA call, so validation works without a GPU.

CUDA is reached through cuda-python's driver API, imported on first launch (``cuda.bindings``
from cuda-python >= 12.6, or the older ``from cuda import cuda``). Kernels come from the fatbins
built by ``make -C kernels`` (``kernels/build``, or ``$VILA_EDGE_KERNELS_DIR``) when they hold
code for the device (sm_87 / sm_89 / sm_90), otherwise they are compiled from the ``.cu`` source
with NVRTC for the device's exact SM (``VILA_EDGE_KERNELS_NVRTC=1`` forces that path).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vila_edge import kernels_ref

__all__ = [
    "DeviceArray",
    "Fp8Linear",
    "KernelsUnavailableError",
    "as_device_array",
    "fp8_gemm",
    "fp8_gemm_weight_only",
    "fp8_linear",
    "fp8_quantize",
    "fp8_scale_shape",
    "fatbin_entries",
    "s2_merge",
    "s2_output_shape",
]

BLOCK = kernels_ref.BLOCK
S2_MAX_SCALES = 4  # VILA_S2_MAX_SCALES in kernels/s2_merge.cu
FATBIN_ARCHS = ((8, 7), (8, 9), (9, 0))  # SASS in the fatbins (see kernels/Makefile)
_SOURCES = {"s2_merge": "s2_merge.cu", "fp8_gemm": "fp8_gemm.cu"}
_W8A8_SMEM = 2 * (128 + 128) * (128 + 32)  # w8a8::SMEM_BYTES in kernels/fp8_gemm.cu
_WONLY_SMEM = 2 * (64 * (128 * 2 + 32) + 128 * (128 + 16))  # wonly::SMEM_BYTES


def fatbin_entries(path: str | os.PathLike) -> list[tuple[str, int]]:
    """``[(kind, sm), ...]`` of a fatbin, kind ``"ptx"`` or ``"sass"`` (e.g. ``("sass", 90)``).

    Parses the fatbin container header (magic 0xBA55ED50, then one header per embedded image with
    the kind at offset 0 and the SM version at offset 28), enough to tell which GPUs it serves.
    """
    import struct

    data = Path(path).read_bytes()
    magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, 0)
    if magic != 0xBA55ED50:
        raise ValueError(f"{path}: not a fatbin (magic {magic:#x})")
    entries, off = [], header_size
    while off < min(len(data), header_size + fat_size):
        kind, _, entry_header, payload = struct.unpack_from("<HHII", data, off)
        sm = struct.unpack_from("<I", data, off + 28)[0]
        entries.append(({1: "ptx", 2: "sass"}.get(kind, str(kind)), int(sm)))
        off += entry_header + payload
    return entries


class KernelsUnavailableError(RuntimeError):
    """cuda-python, a CUDA driver/GPU, or a usable kernel binary is missing."""


def kernels_dir() -> Path:
    """Directory holding the kernel sources (``*.cu``) and ``build/`` with the fatbins."""
    env = os.environ.get("VILA_EDGE_KERNELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "kernels"


# ---------------------------------------------------------------------------------------------
# Array arguments
# ---------------------------------------------------------------------------------------------
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1, "int8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}
_TYPESTR = {"<f2": "float16", "<f4": "float32", "|u1": "uint8", "<u1": "uint8", "|i1": "int8", "<i1": "int8"}
# DLPack (code, bits) -> dtype; kDLInt=0, kDLUInt=1, kDLFloat=2, kDLBfloat=4, kDLFloat8_e4m3fn=10, kDLFloat8_e5m2=12
_DLPACK_DTYPES = {(2, 16): "float16", (2, 32): "float32", (4, 16): "bfloat16", (1, 8): "uint8", (0, 8): "int8",
                  (10, 8): "float8_e4m3fn", (12, 8): "float8_e5m2"}
_FP8_STORAGE = ("uint8", "int8", "float8_e4m3fn", "float8_e5m2")  # accepted for fp8 bytes (the format is `fmt`)
_DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 2, 3, 13


@dataclass
class DeviceArray:
    """A C-contiguous device buffer: pointer, shape, dtype name (``float16``, ``bfloat16``,
    ``float32``, ``uint8``, ...). ``device`` is the CUDA ordinal when known."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    device: int | None = None
    readonly: bool = False
    keepalive: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * _ITEMSIZE[self.dtype]

    @property
    def __cuda_array_interface__(self) -> dict:
        typestr = {"float16": "<f2", "float32": "<f4", "uint8": "|u1", "int8": "|i1", "float8_e4m3fn": "|u1",
                   "float8_e5m2": "|u1"}
        if self.dtype not in typestr:
            raise TypeError(f"{self.dtype} has no __cuda_array_interface__ typestr")
        return {"shape": self.shape, "typestr": typestr[self.dtype], "data": (self.ptr, self.readonly),
                "strides": None, "version": 3}


def _check_contiguous(name: str, shape: tuple[int, ...], strides: Sequence[int] | None, itemsize: int) -> None:
    if strides is None:
        return
    if len(strides) != len(shape):
        raise ValueError(f"{name}: {len(strides)} strides for {len(shape)} dimensions")
    expect = itemsize
    for dim, stride in zip(reversed(shape), reversed(tuple(strides)), strict=True):
        if dim != 1 and stride != expect:
            raise ValueError(f"{name}: must be C-contiguous (shape {list(shape)}, byte strides {list(strides)})")
        expect *= dim


def _from_cai(obj: Any, name: str, cai: dict) -> DeviceArray:
    shape = tuple(int(d) for d in cai["shape"])
    typestr = cai["typestr"]
    if typestr not in _TYPESTR:
        raise ValueError(f"{name}: unsupported dtype (array interface typestr {typestr!r})")
    dtype = _TYPESTR[typestr]
    if cai.get("mask") is not None:
        raise ValueError(f"{name}: masked arrays are not supported")
    _check_contiguous(name, shape, cai.get("strides"), _ITEMSIZE[dtype])
    ptr, readonly = cai["data"]
    return DeviceArray(int(ptr or 0), shape, dtype, None, bool(readonly), obj)


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


def _dlpack_capsule_tensor(capsule: Any) -> _DLTensor:
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [ctypes.py_object, ctypes.c_char_p]
    addr = get(capsule, b"dltensor")  # DLManagedTensor*, whose first member is the DLTensor
    return _DLTensor.from_address(addr)


def _from_dlpack_capsule(obj: Any, name: str, capsule: Any) -> tuple[DeviceArray, int]:
    """Parse a (legacy, unversioned) DLPack capsule; returns the array and the DLPack device type.
    The capsule is kept alive by the returned array (its destructor frees the producer's tensor)."""
    t = _dlpack_capsule_tensor(capsule)
    key = (int(t.dtype.code), int(t.dtype.bits))
    if key not in _DLPACK_DTYPES or t.dtype.lanes != 1:
        raise ValueError(f"{name}: unsupported DLPack dtype (code {key[0]}, bits {key[1]}, lanes {t.dtype.lanes})")
    dtype = _DLPACK_DTYPES[key]
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    strides = None
    if t.strides:
        strides = [int(t.strides[i]) * _ITEMSIZE[dtype] for i in range(t.ndim)]  # DLPack: elements
    _check_contiguous(name, shape, strides, _ITEMSIZE[dtype])
    ptr = int(t.data or 0) + int(t.byte_offset)
    arr = DeviceArray(ptr, shape, dtype, int(t.device.device_id), False, (obj, capsule))
    return arr, int(t.device.device_type)


def as_device_array(obj: Any, name: str = "array", *, shape: Sequence[int] | None = None,
                    dtype: str | None = None) -> DeviceArray:
    """Describe ``obj`` as a :class:`DeviceArray` without touching CUDA.

    ``obj`` may be a DeviceArray, an object with ``__cuda_array_interface__`` or ``__dlpack__``,
    or a raw pointer ``int`` (then ``shape`` and ``dtype`` must be given).
    """
    if isinstance(obj, DeviceArray):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        if shape is None or dtype is None:
            raise ValueError(f"{name}: a raw device pointer needs its shape and dtype from the other arguments")
        if int(obj) <= 0:
            raise ValueError(f"{name}: null or negative device pointer")
        return DeviceArray(int(obj), tuple(int(d) for d in shape), dtype)
    cai_error: Exception | None = None
    if hasattr(type(obj), "__cuda_array_interface__") or hasattr(obj, "__cuda_array_interface__"):
        try:
            cai = obj.__cuda_array_interface__
        except (TypeError, AttributeError, RuntimeError, ValueError) as e:  # e.g. torch bfloat16 (old torch)
            cai_error = e
        else:
            # torch >= 2.11 describes bfloat16 as an opaque '<V2' (seen on an H200 run): the array
            # interface has no bf16 typestr, so such a dtype goes on to DLPack, which names it
            if cai["typestr"] in _TYPESTR or not hasattr(obj, "__dlpack__"):
                return _from_cai(obj, name, cai)
            cai_error = ValueError(f"unsupported dtype (array interface typestr {cai['typestr']!r})")
    if hasattr(obj, "__dlpack__"):
        dev_type = None
        if hasattr(obj, "__dlpack_device__"):
            dev_type, _ = obj.__dlpack_device__()
            if int(dev_type) not in (_DL_CUDA, _DL_CUDA_MANAGED):
                raise ValueError(f"{name}: must be a CUDA device array (DLPack device type {int(dev_type)})")
        try:
            capsule = obj.__dlpack__(stream=-1)  # -1: the caller orders the work on `stream` itself
        except (TypeError, ValueError, BufferError, RuntimeError):
            try:
                capsule = obj.__dlpack__()
            except (TypeError, ValueError, BufferError, RuntimeError) as e:
                raise ValueError(f"{name}: DLPack export failed ({type(e).__name__}: {e})") from e
        arr, dev_type = _from_dlpack_capsule(obj, name, capsule)
        if dev_type not in (_DL_CUDA, _DL_CUDA_MANAGED):
            raise ValueError(f"{name}: must be a CUDA device array (DLPack device type {dev_type})")
        return arr
    if cai_error is not None:
        raise ValueError(f"{name}: __cuda_array_interface__ failed ({cai_error}) and no DLPack fallback")
    raise ValueError(
        f"{name}: expected a CUDA array (__cuda_array_interface__ or DLPack), a DeviceArray or a raw device "
        f"pointer, got {type(obj).__name__}"
    )


def _arg(obj: Any, name: str, dtypes: Sequence[str], shape: Sequence[int | None], *,
         writable: bool = False, align: int = 1, raw_dtype: str | None = None) -> DeviceArray:
    """Convert + validate one array argument. ``shape`` entries of None are unchecked; a raw
    pointer gets ``shape`` (all entries must then be known) and ``raw_dtype`` (default dtypes[0])."""
    raw_shape = None if any(d is None for d in shape) else shape
    arr = as_device_array(obj, name, shape=raw_shape, dtype=raw_dtype or dtypes[0])
    if arr.dtype not in dtypes:
        raise ValueError(f"{name}: expected dtype {' or '.join(dtypes)}, got {arr.dtype}")
    if len(arr.shape) != len(shape) or any(e is not None and a != e for a, e in zip(arr.shape, shape, strict=True)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(arr.shape)}")
    if arr.size and arr.ptr == 0:
        raise ValueError(f"{name}: null data pointer")
    if align > 1 and arr.ptr % align:
        raise ValueError(f"{name}: data pointer must be {align}-byte aligned (got {arr.ptr:#x})")
    if writable and arr.readonly:
        raise ValueError(f"{name}: output array is read-only")
    return arr


def _dims(obj: Any, name: str, ndim: int) -> tuple[int, ...] | None:
    """Shape of an array argument (None for a raw pointer), for deriving the other shapes."""
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool):
        return None
    arr = as_device_array(obj, name)
    if len(arr.shape) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {list(arr.shape)}")
    return arr.shape


def _stream_handle(stream: Any) -> int:
    """CUstream handle from 0/None, an int, torch/CuPy streams, or ``__cuda_stream__`` objects."""
    if stream is None:
        return 0
    if isinstance(stream, (int, np.integer)) and not isinstance(stream, bool):
        return int(stream)
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    for attr in ("cuda_stream", "ptr", "handle"):  # torch.cuda.Stream, cupy Stream, others
        value = getattr(stream, attr, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
    try:
        return int(stream)  # cuda-python CUstream
    except (TypeError, ValueError):
        raise ValueError(f"stream: cannot get a CUDA stream handle from {type(stream).__name__}") from None


# ---------------------------------------------------------------------------------------------
# Backends: the CUDA driver (cuda-python), or the CPU simulator (tests).
# ---------------------------------------------------------------------------------------------
def _import_cuda() -> tuple[Any, Any]:
    try:
        from cuda.bindings import driver, nvrtc  # cuda-python >= 12.6 (and 13.x)

        return driver, nvrtc
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # cuda-python 11.x / 12.x < 12.6
        from cuda import nvrtc

        return driver, nvrtc
    except ImportError as e:
        raise KernelsUnavailableError(
            "vila_edge.kernels needs cuda-python and an NVIDIA GPU: pip install 'cuda-python>=12.4' "
            "(or vila-edge[gpu])"
        ) from e


class _CudaBackend:
    """Loads modules per (context, kernel file) and launches through cuLaunchKernel."""

    def __init__(self) -> None:
        self.driver, self.nvrtc = _import_cuda()
        self._lock = threading.Lock()
        self._modules: dict[tuple[int, str], Any] = {}
        self._functions: dict[tuple[int, str], Any] = {}
        self._contexts: dict[int, Any] = {}
        self._smem_configured: set[tuple[int, str]] = set()
        self._cc: dict[int, tuple[int, int]] = {}
        self._fp8_ok: dict[int, bool] = {}
        try:
            self._check(self.driver.cuInit(0), "cuInit")
        except RuntimeError as e:
            raise KernelsUnavailableError(f"no usable CUDA driver/GPU: {e}") from e

    # -- error handling -------------------------------------------------------------------
    def _check(self, result: Any, what: str) -> Any:
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.driver.CUresult.CUDA_SUCCESS:
            try:
                name = self.driver.cuGetErrorName(err)[1].decode()
            except Exception:  # noqa: BLE001 - best effort decoding of the error name
                name = str(err)
            raise RuntimeError(f"{what} failed: {name}")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    # -- devices and contexts -------------------------------------------------------------
    def device_of(self, arrays: Sequence[DeviceArray]) -> int:
        """The arrays' device: from DLPack if known, else the current context's device (what
        torch / CuPy / ORT make current), else the pointer's, else 0. Only context queries on the
        common path, so launches stay legal inside CUDA-graph stream capture."""
        for a in arrays:
            if a.device is not None:
                return a.device
        d = self.driver
        ctx = self._check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if ctx is not None and int(ctx) != 0:
            return int(self._check(d.cuCtxGetDevice(), "cuCtxGetDevice"))
        for a in arrays:
            try:
                attr = d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
                return int(self._check(d.cuPointerGetAttribute(attr, a.ptr), "cuPointerGetAttribute"))
            except (RuntimeError, TypeError, AttributeError):
                continue
        return 0

    def _context(self, device: int) -> Any:
        d = self.driver
        ctx = self._contexts.get(device)
        if ctx is None:
            dev = self._check(d.cuDeviceGet(device), "cuDeviceGet")
            ctx = self._check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            self._contexts[device] = ctx
        current = self._check(d.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if current is None or int(current) != int(ctx):
            self._check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return ctx

    def compute_capability(self, device: int) -> tuple[int, int]:
        if device in self._cc:
            return self._cc[device]
        d = self.driver
        dev = self._check(d.cuDeviceGet(device), "cuDeviceGet")
        a = d.CUdevice_attribute
        major = self._check(d.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "attr")
        minor = self._check(d.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "attr")
        self._cc[device] = (int(major), int(minor))
        return self._cc[device]

    def fp8_mma_supported(self, device: int) -> bool:
        """sm_89+ and the loaded fp8_gemm module was compiled with FP8 MMA (not the trap stub an
        older toolkit leaves), read from its ``vila_fp8_mma_available`` device variable."""
        if device in self._fp8_ok:
            return self._fp8_ok[device]
        ok = self.compute_capability(device) >= (8, 9)
        if ok:
            with self._lock:
                self._context(device)
                mod = self._module(device, "fp8_gemm")
                ptr, size = self._check(self.driver.cuModuleGetGlobal(mod, b"vila_fp8_mma_available"),
                                        "cuModuleGetGlobal")
                flag = np.zeros(1, np.int32)
                self._check(self.driver.cuMemcpyDtoH(flag.ctypes.data, ptr, 4), "cuMemcpyDtoH")
                ok = bool(flag[0])
        self._fp8_ok[device] = ok
        return ok

    # -- modules --------------------------------------------------------------------------
    def _nvrtc_check(self, result: Any, what: str, prog: Any = None) -> Any:
        err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
        if err != self.nvrtc.nvrtcResult.NVRTC_SUCCESS:
            log = ""
            if prog is not None:
                size = self.nvrtc.nvrtcGetProgramLogSize(prog)[1]
                buf = b" " * size
                self.nvrtc.nvrtcGetProgramLog(prog, buf)
                log = buf.decode(errors="replace")
            raise KernelsUnavailableError(f"NVRTC {what} failed: {err}\n{log}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def _compile_nvrtc(self, module: str, cc: tuple[int, int]) -> bytes:
        n = self.nvrtc
        src_dir = kernels_dir()
        src = (src_dir / _SOURCES[module]).read_bytes()
        header = (src_dir / "common.cuh").read_bytes()
        prog = self._nvrtc_check(
            n.nvrtcCreateProgram(src, _SOURCES[module].encode(), 1, [header], [b"common.cuh"]), "create")
        opts = [f"--gpu-architecture=sm_{cc[0]}{cc[1]}".encode(), b"-std=c++17", b"-lineinfo"]
        self._nvrtc_check(n.nvrtcCompileProgram(prog, len(opts), opts), "compile", prog)
        size = self._nvrtc_check(n.nvrtcGetCUBINSize(prog), "cubin size")
        cubin = b" " * size
        self._nvrtc_check(n.nvrtcGetCUBIN(prog, cubin), "cubin")
        n.nvrtcDestroyProgram(prog)
        return cubin

    def _module(self, device: int, module: str) -> Any:
        key = (device, module)
        if key in self._modules:
            return self._modules[key]
        cc = self.compute_capability(device)
        fatbin = kernels_dir() / "build" / f"{module}.fatbin"
        force_nvrtc = os.environ.get("VILA_EDGE_KERNELS_NVRTC", "") not in ("", "0")
        mod = None
        errors = []
        has_sass = False
        if not force_nvrtc and fatbin.exists():
            try:
                has_sass = ("sass", cc[0] * 10 + cc[1]) in fatbin_entries(fatbin)
            except (ValueError, OSError) as e:
                errors.append(str(e))
        if has_sass:
            try:
                image = np.frombuffer(fatbin.read_bytes(), np.uint8)
                mod = self._check(self.driver.cuModuleLoadData(image.ctypes.data), f"cuModuleLoadData({fatbin.name})")
            except RuntimeError as e:  # e.g. fatbin from a newer CUDA than the driver
                errors.append(str(e))
        if mod is None:
            try:
                image = np.frombuffer(self._compile_nvrtc(module, cc), np.uint8)
                mod = self._check(self.driver.cuModuleLoadData(image.ctypes.data), "cuModuleLoadData(NVRTC cubin)")
            except Exception as e:  # noqa: BLE001 - report both attempts
                errors.append(str(e))
                raise KernelsUnavailableError(
                    f"cannot load kernel module {module!r} for sm_{cc[0]}{cc[1]} (run `make -C kernels`?): "
                    + " | ".join(errors)) from e
        self._modules[key] = mod
        return mod

    def _function(self, device: int, module: str, kernel: str, smem: int) -> Any:
        key = (device, kernel)
        fn = self._functions.get(key)
        if fn is None:
            mod = self._module(device, module)
            fn = self._check(self.driver.cuModuleGetFunction(mod, kernel.encode()), f"cuModuleGetFunction({kernel})")
            self._functions[key] = fn
        if smem > 48 * 1024 and key not in self._smem_configured:
            attr = self.driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            self._check(self.driver.cuFuncSetAttribute(fn, attr, smem), f"cuFuncSetAttribute({kernel})")
            self._smem_configured.add(key)
        return fn

    def launch(self, device: int, module: str, kernel: str, grid: tuple[int, int, int],
               block: tuple[int, int, int], smem: int, params: int, stream: int) -> None:
        with self._lock:
            self._context(device)
            fn = self._function(device, module, kernel, smem)
        self._check(self.driver.cuLaunchKernel(fn, *grid, *block, smem, self.driver.CUstream(stream), params, 0),
                    f"cuLaunchKernel({kernel})")

    # -- memory (used by Fp8Linear) ------------------------------------------------------------
    def alloc(self, device: int, nbytes: int) -> int:
        self._context(device)
        return int(self._check(self.driver.cuMemAlloc(max(nbytes, 1)), "cuMemAlloc"))

    def free(self, device: int, ptr: int) -> None:
        self._context(device)
        self._check(self.driver.cuMemFree(ptr), "cuMemFree")

    def upload(self, device: int, ptr: int, host: np.ndarray) -> None:
        self._context(device)
        host = np.ascontiguousarray(host)
        self._check(self.driver.cuMemcpyHtoD(ptr, host.ctypes.data, host.nbytes), "cuMemcpyHtoD")


_backend_lock = threading.Lock()
_backend_instance: Any = None


def _backend() -> Any:
    global _backend_instance
    with _backend_lock:
        if _backend_instance is None:
            _backend_instance = _CudaBackend()
        return _backend_instance


def _set_backend(backend: Any) -> Any:
    """Swap the launch backend (tests use the CPU simulator); returns the previous one."""
    global _backend_instance
    with _backend_lock:
        old, _backend_instance = _backend_instance, backend
        return old


def _pack_params(values: Sequence[Any]) -> tuple[int, list[Any]]:
    """cuLaunchKernel's ``void** kernelParams``: ctypes objects and an array of their addresses.
    The caller must keep the returned list alive until the launch call returns."""
    holders = list(values)
    arr = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(v) for v in holders])
    holders.append(arr)
    return ctypes.addressof(arr), holders


def _launch(arrays: Sequence[DeviceArray], module: str, kernel: str, grid: tuple[int, int, int],
            block: tuple[int, int, int], smem: int, values: Sequence[Any], stream: Any) -> None:
    handle = _stream_handle(stream)
    backend = _backend()
    device = backend.device_of(arrays)
    params, keep = _pack_params(values)
    backend.launch(device, module, kernel, grid, block, smem, params, handle)
    del keep


def _ptr(a: DeviceArray) -> ctypes.c_uint64:
    return ctypes.c_uint64(a.ptr)


# ---------------------------------------------------------------------------------------------
# S2 merge
# ---------------------------------------------------------------------------------------------
class _S2MergeParams(ctypes.Structure):
    _fields_ = [("num_scales", ctypes.c_int), ("batch", ctypes.c_int), ("h", ctypes.c_int), ("w", ctypes.c_int),
                ("channels", ctypes.c_int), ("out_h", ctypes.c_int), ("out_w", ctypes.c_int),
                ("chunk_h", ctypes.c_int), ("chunk_w", ctypes.c_int),
                ("tile_base", ctypes.c_int * S2_MAX_SCALES), ("grid_h", ctypes.c_int * S2_MAX_SCALES),
                ("grid_w", ctypes.c_int * S2_MAX_SCALES), ("rows", ctypes.c_int), ("chunks_w", ctypes.c_int),
                ("n_chunks", ctypes.c_int)]


S2_VARIANTS = ("warp", "block")  # "block": the first version (one block per token), kept for the GPU benchmark
_S2_WARPS_PER_BLOCK = 4  # VILA_S2_WARPS_PER_BLOCK in kernels/s2_merge.cu


def _s2_geometry(tile_grids: Sequence[Sequence[int]], h: int, w: int, output_scale_idx: int, batch: int,
                 chunk: Sequence[int] | None, tile_offsets: Sequence[int] | None):
    try:
        grids = [(int(g[0]), int(g[1])) for g in tile_grids]
        if any(len(g) != 2 for g in tile_grids):
            raise TypeError
    except (TypeError, IndexError, ValueError):
        raise ValueError(f"tile_grids: expected a sequence of (rows, cols) pairs, got {tile_grids!r}") from None
    if not 1 <= len(grids) <= S2_MAX_SCALES:
        raise ValueError(f"tile_grids: 1 to {S2_MAX_SCALES} scales supported, got {len(grids)}")
    if any(a <= 0 or b <= 0 for a, b in grids):
        raise ValueError(f"tile_grids: grid sizes must be positive, got {grids}")
    if h <= 0 or w <= 0:
        raise ValueError(f"h, w: tile token grid must be positive, got {h}x{w}")
    if batch <= 0:
        raise ValueError(f"batch: must be positive, got {batch}")
    if chunk is not None and len(tuple(chunk)) != 2:
        raise ValueError(f"chunk: expected (rows, cols), got {chunk!r}")
    out_h, out_w, ch, cw, n_chunks = kernels_ref.s2_output_geometry(
        grids, h, w, output_scale_idx, None if chunk is None else (int(chunk[0]), int(chunk[1])))
    if tile_offsets is None:
        offsets = kernels_ref.s2_default_tile_offsets(grids, batch)
    else:
        offsets = [int(o) for o in tile_offsets]
        if len(offsets) != len(grids) or any(o < 0 for o in offsets):
            raise ValueError(f"tile_offsets: expected {len(grids)} non-negative tile indices, got {tile_offsets!r}")
    n_tiles = max(o + nh * nw * batch for o, (nh, nw) in zip(offsets, grids, strict=True))
    return grids, offsets, out_h, out_w, ch, cw, n_chunks, n_tiles


def s2_output_shape(*, tile_grids: Sequence[Sequence[int]], h: int, w: int, output_scale_idx: int, channels: int,
                    batch: int = 1, chunk: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Shape of :func:`s2_merge`'s output: ``(batch * n_chunks, chunk_h * chunk_w, channels * S)``."""
    _, _, _, _, ch, cw, n_chunks, _ = _s2_geometry(tile_grids, h, w, output_scale_idx, batch, chunk, None)
    return batch * n_chunks, ch * cw, channels * len(tile_grids)


def s2_merge(features: Any, out: Any, *, tile_grids: Sequence[Sequence[int]], h: int, w: int,
             output_scale_idx: int, batch: int = 1, chunk: Sequence[int] | None = None,
             tile_offsets: Sequence[int] | None = None, channels: int | None = None, stream: Any = 0,
             variant: str = "warp") -> Any:
    """Fused S2 merge: ``features`` fp16 ``[n_tiles, h*w, C]`` -> ``out`` fp16
    ``[batch * n_chunks, chunk_h*chunk_w, C*S]`` (layout: kernels/README.md, kernels_ref.s2_merge_ref).

    * NVILA dynamic S2, one image with block ``(rows, cols)``: ``tile_grids=[(1,1),(2,2),(rows,cols)]``,
      ``h=w=32``, ``output_scale_idx=-1`` -> ``[rows*cols, 1024, 3*C]`` (the projector input).
      A plain image (block_size None): ``tile_grids=[(1,1)]*3, tile_offsets=[0,0,0]``.
    * VILA1.5-s2 static S2 (scales 384,768): ``tile_grids=[(1,1),(2,2)]``, ``h=w=27``,
      ``output_scale_idx=0``, ``batch=B`` (s2wrapper's tile-major order) -> ``[B, 729, 2*C]``.
      With another ``output_scale_idx`` pass ``chunk=(out_h, out_w)`` to get whole maps per image.
    ``channels`` is only needed when ``features`` is a raw pointer. ``variant``: "warp" (one warp per output
    token and scale, 32-bit index math) or "block" (the first version, one block per token; for benchmarks).
    Returns ``out``.
    """
    if variant not in S2_VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(S2_VARIANTS)}")
    grids, offsets, out_h, out_w, ch, cw, n_chunks, n_tiles = _s2_geometry(
        tile_grids, h, w, output_scale_idx, batch, chunk, tile_offsets)
    fshape = _dims(features, "features", 3)
    if fshape is not None:
        if fshape[1] != h * w:
            raise ValueError(f"features: expected shape [n_tiles, {h * w}, C] for {h}x{w} tiles, got {list(fshape)}")
        C = fshape[2]
        if channels is not None and channels != C:
            raise ValueError(f"channels: {channels} does not match features' {C}")
        if fshape[0] < n_tiles:
            raise ValueError(f"features: {fshape[0]} tiles given, the tile grids need {n_tiles}")
    else:
        if channels is None:
            raise ValueError("channels: required when features is a raw device pointer")
        C = int(channels)
    if C <= 0:
        raise ValueError(f"features: channel count must be positive, got {C}")
    S = len(grids)
    feats = _arg(features, "features", ("float16",), (fshape[0] if fshape else n_tiles, h * w, C))
    rows = batch * n_chunks * ch * cw
    dst = _arg(out, "out", ("float16",), (batch * n_chunks, ch * cw, C * S), writable=True)

    vec8 = C % 8 == 0 and feats.ptr % 16 == 0 and dst.ptr % 16 == 0
    # The "warp" kernel's index math is 32-bit: rows, window products and per-tile offsets must fit.
    in_max = max(max(nh * h, nw * w) for nh, nw in grids)
    if max(rows, (max(out_h, out_w) + 1) * in_max + max(out_h, out_w), h * w * C, n_tiles) >= 2**31:
        raise ValueError(f"s2_merge: problem too large for 32-bit indexing ({rows} rows, {n_tiles} tiles of "
                         f"{h}x{w}x{C}); split the batch")
    p = _S2MergeParams(S, batch, h, w, C, out_h, out_w, ch, cw)
    for s, ((nh, nw), base) in enumerate(zip(grids, offsets, strict=True)):
        p.tile_base[s], p.grid_h[s], p.grid_w[s] = base, nh, nw
    p.rows, p.chunks_w, p.n_chunks = rows, out_w // cw, n_chunks
    if variant == "block":
        if not vec8:
            raise ValueError("variant 'block': needs C % 8 == 0 and 16-byte aligned buffers")
        threads = min(512, max(32, (C // 8 + 31) // 32 * 32))
        grid, block, kernel = (rows, 1, 1), (threads, 1, 1), "s2_merge_f16_v8_block"
    else:
        grid = (-(-rows // _S2_WARPS_PER_BLOCK), S, 1)
        block = (32 * _S2_WARPS_PER_BLOCK, 1, 1)
        kernel = "s2_merge_f16_v8" if vec8 else "s2_merge_f16_v1"
    _launch([feats, dst], "s2_merge", kernel, grid, block, 0, [_ptr(feats), _ptr(dst), p], stream)
    return out


# ---------------------------------------------------------------------------------------------
# FP8
# ---------------------------------------------------------------------------------------------
def fp8_scale_shape(rows: int, k: int, *, weight: bool = False) -> tuple[int, int]:
    """Scale tensor shape: activations ``[M, ceil(K/128)]``, weights ``[ceil(N/128), ceil(K/128)]``."""
    kb = -(-k // BLOCK)
    return (-(-rows // BLOCK), kb) if weight else (rows, kb)


def _fp8_kernel(name: str, fmt: str) -> str:
    """The kernel of format ``fmt``: E4M3 kernels have the plain names, E5M2 ones end in ``_e5m2``."""
    kernels_ref.fp8_format(fmt)
    return name if fmt == "e4m3" else f"{name}_e5m2"


def _check_k(K: int, name: str) -> None:
    if K <= 0 or K % 16:
        raise ValueError(f"{name}: K (= {K}) must be a positive multiple of 16")


def _resolve(name: str, *candidates: int | None) -> int:
    known = {c for c in candidates if c is not None}
    if not known:
        raise ValueError(f"{name}: cannot be derived from raw pointers; pass {name.lower()}=")
    if len(known) > 1:
        raise ValueError(f"{name}: inconsistent sizes {sorted(known)} across arguments")
    return known.pop()


def fp8_quantize(x: Any, xq: Any, x_scales: Any, *, m: int | None = None, k: int | None = None,
                 x_dtype: str = "float16", fmt: str = "e4m3", stream: Any = 0) -> None:
    """``x`` fp16/bf16 ``[M, K]`` -> ``xq`` FP8 bytes ``[M, K]`` (uint8; ``fmt`` e4m3 | e5m2) and ``x_scales``
    fp32 ``[M, ceil(K/128)]`` (``scale = max(amax/fp8_max, 1e-10)`` per 1x128 block). K % 16 == 0."""
    xs, qs = _dims(x, "x", 2), _dims(xq, "xq", 2)
    M = _resolve("M", m, xs and xs[0], qs and qs[0])
    K = _resolve("K", k, xs and xs[1], qs and qs[1])
    _check_k(K, "x")
    xa = _arg(x, "x", ("float16", "bfloat16"), (M, K), align=16, raw_dtype=x_dtype)
    qa = _arg(xq, "xq", _FP8_STORAGE, (M, K), writable=True, align=16)
    sa = _arg(x_scales, "x_scales", ("float32",), fp8_scale_shape(M, K), writable=True, align=4)
    items = M * fp8_scale_shape(M, K)[1]
    if items == 0:
        return
    kernel = _fp8_kernel("fp8_quantize_act_bf16" if xa.dtype == "bfloat16" else "fp8_quantize_act_f16", fmt)
    grid = (-(-items // 8), 1, 1)
    _launch([xa, qa, sa], "fp8_gemm", kernel, grid, (256, 1, 1), 0,
            [_ptr(xa), _ptr(qa), _ptr(sa), ctypes.c_int(M), ctypes.c_int(K)], stream)


def _gemm_grid(M: int, N: int, bm: int) -> tuple[int, int, int]:
    gy = -(-M // bm)
    if gy > 65535:
        raise ValueError(f"M: {M} rows exceed the launch grid limit ({65535 * bm}); split the call")
    return -(-N // 128), gy, 1


def fp8_gemm(xq: Any, x_scales: Any, wq: Any, w_scales: Any, out: Any, *, m: int | None = None,
             n: int | None = None, k: int | None = None, out_dtype: str = "float16", fmt: str = "e4m3",
             stream: Any = 0) -> None:
    """W8A8: ``out[M, N] = dequant(xq, x_scales) @ dequant(wq, w_scales)^T`` (fp16/bf16 out; both operands ``fmt``).
    FP8 tensor cores: needs sm_89+ (raises ``KernelsUnavailableError`` on older GPUs)."""
    xs, ws, os_ = _dims(xq, "xq", 2), _dims(wq, "wq", 2), _dims(out, "out", 2)
    M = _resolve("M", m, xs and xs[0], os_ and os_[0])
    N = _resolve("N", n, ws and ws[0], os_ and os_[1])
    K = _resolve("K", k, xs and xs[1], ws and ws[1])
    _check_k(K, "xq")
    xa = _arg(xq, "xq", _FP8_STORAGE, (M, K), align=16)
    sxa = _arg(x_scales, "x_scales", ("float32",), fp8_scale_shape(M, K), align=4)
    wa = _arg(wq, "wq", _FP8_STORAGE, (N, K), align=16)
    swa = _arg(w_scales, "w_scales", ("float32",), fp8_scale_shape(N, K, weight=True), align=4)
    oa = _arg(out, "out", ("float16", "bfloat16"), (M, N), writable=True, align=4, raw_dtype=out_dtype)
    if M == 0 or N == 0:
        return
    backend = _backend()
    device = backend.device_of([xa, oa])
    if not backend.fp8_mma_supported(device):
        raise KernelsUnavailableError("fp8_gemm needs FP8 tensor cores (sm_89+); use fp8_gemm_weight_only")
    kernel = _fp8_kernel("fp8_gemm_w8a8_bf16out" if oa.dtype == "bfloat16" else "fp8_gemm_w8a8_f16out", fmt)
    _launch([xa, oa], "fp8_gemm", kernel, _gemm_grid(M, N, 128), (256, 1, 1), _W8A8_SMEM,
            [_ptr(xa), _ptr(sxa), _ptr(wa), _ptr(swa), _ptr(oa), ctypes.c_int(M), ctypes.c_int(N), ctypes.c_int(K)],
            stream)


def fp8_gemm_weight_only(x: Any, wq: Any, w_scales: Any, out: Any, *, m: int | None = None, n: int | None = None,
                         k: int | None = None, out_dtype: str = "float16", fmt: str = "e4m3",
                         stream: Any = 0) -> None:
    """Weight-only FP8 (weights ``fmt``): ``out[M, N] = x @ dequant(wq, w_scales)^T`` with fp16 ``x`` (any sm_80+,
    the Jetson Orin path: FP8 weights widened to fp16 in-kernel, fp16 tensor cores)."""
    xs, ws, os_ = _dims(x, "x", 2), _dims(wq, "wq", 2), _dims(out, "out", 2)
    M = _resolve("M", m, xs and xs[0], os_ and os_[0])
    N = _resolve("N", n, ws and ws[0], os_ and os_[1])
    K = _resolve("K", k, xs and xs[1], ws and ws[1])
    _check_k(K, "x")
    xa = _arg(x, "x", ("float16",), (M, K), align=16)
    wa = _arg(wq, "wq", _FP8_STORAGE, (N, K), align=16)
    swa = _arg(w_scales, "w_scales", ("float32",), fp8_scale_shape(N, K, weight=True), align=4)
    oa = _arg(out, "out", ("float16", "bfloat16"), (M, N), writable=True, align=4, raw_dtype=out_dtype)
    if M == 0 or N == 0:
        return
    kernel = _fp8_kernel("fp8_gemm_wonly_bf16out" if oa.dtype == "bfloat16" else "fp8_gemm_wonly_f16out", fmt)
    _launch([xa, oa], "fp8_gemm", kernel, _gemm_grid(M, N, 64), (256, 1, 1), _WONLY_SMEM,
            [_ptr(xa), _ptr(wa), _ptr(swa), _ptr(oa), ctypes.c_int(M), ctypes.c_int(N), ctypes.c_int(K)], stream)


def fp8_linear(x: Any, wq: Any, w_scales: Any, out: Any, *, workspace: tuple[Any, Any] | None = None,
               mode: str = "auto", fmt: str = "e4m3", stream: Any = 0) -> None:
    """``out = x @ W^T`` for a block-quantized FP8 weight (format ``fmt``), choosing the path for the GPU:
    ``mode="w8a8"`` (quantize ``x`` into ``workspace = (xq uint8 [M,K], x_scales fp32 [M,KB])``, then
    the FP8-MMA GEMM; sm_89+), ``"weight_only"`` (fp16 ``x``; any sm_80+) or ``"auto"`` (w8a8 where
    the GPU has FP8 tensor cores, else weight-only)."""
    if mode not in ("auto", "w8a8", "weight_only"):
        raise ValueError(f"mode: expected 'auto', 'w8a8' or 'weight_only', got {mode!r}")
    xs = _dims(x, "x", 2)
    if xs is None:
        raise ValueError("x: fp8_linear needs an array (not a raw pointer) to size its workspace")
    if mode == "auto":
        backend = _backend()
        mode = "w8a8" if backend.fp8_mma_supported(backend.device_of([as_device_array(x, "x")])) else "weight_only"
    if mode == "weight_only":
        fp8_gemm_weight_only(x, wq, w_scales, out, fmt=fmt, stream=stream)
        return
    if workspace is None or len(workspace) != 2:
        raise ValueError("workspace: w8a8 needs (xq uint8 [M, K], x_scales fp32 [M, ceil(K/128)]) buffers")
    xq, x_scales = workspace
    fp8_quantize(x, xq, x_scales, fmt=fmt, stream=stream)
    fp8_gemm(xq, x_scales, wq, w_scales, out, fmt=fmt, stream=stream)


class Fp8Linear:
    """A linear layer ``y = x @ W^T`` with ``W`` quantized once to FP8 (``fmt`` e4m3 | e5m2, 128x128 blocks).

    ``weight``: ``[N, K]`` fp16/fp32 (numpy array, or anything with ``.detach().cpu().numpy()`` /
    ``__array__``); quantized on the host with the reference quantizer and uploaded to ``device``.
    ``forward(x, out, stream=...)``: ``x`` fp16 ``[M, K]`` (bf16 too on the W8A8 path), ``out``
    fp16/bf16 ``[M, N]``. ``mode="auto"`` uses W8A8 FP8 tensor cores on sm_89+ and the weight-only
    kernel on sm_87 (Jetson Orin). The W8A8 path owns a workspace that grows to the largest M seen.
    """

    def __init__(self, weight: Any, *, device: int = 0, mode: str = "auto", fmt: str = "e4m3") -> None:
        if mode not in ("auto", "w8a8", "weight_only"):
            raise ValueError(f"mode: expected 'auto', 'w8a8' or 'weight_only', got {mode!r}")
        w = _host_array(weight, "weight")
        if w.ndim != 2:
            raise ValueError(f"weight: expected [N, K], got shape {list(w.shape)}")
        self.out_features, self.in_features = (int(d) for d in w.shape)
        _check_k(self.in_features, "weight")
        wq, ws = kernels_ref.fp8_quantize_weight_ref(w, fmt)
        self.fmt = fmt
        self.device = device
        self._backend = _backend()
        if mode == "auto":
            mode = "w8a8" if self._backend.fp8_mma_supported(device) else "weight_only"
        self.mode = mode
        self._owned: list[int] = []
        self.wq = self._upload(wq, "uint8")
        self.w_scales = self._upload(ws, "float32")
        self._ws_rows = 0
        self._ws: tuple[DeviceArray, DeviceArray] | None = None

    def _upload(self, host: np.ndarray, dtype: str) -> DeviceArray:
        ptr = self._backend.alloc(self.device, host.nbytes)
        self._owned.append(ptr)
        self._backend.upload(self.device, ptr, host)
        return DeviceArray(ptr, tuple(host.shape), dtype, self.device)

    def _workspace(self, M: int) -> tuple[DeviceArray, DeviceArray]:
        K = self.in_features
        if self._ws is None or M > self._ws_rows:
            rows = max(M, 2 * self._ws_rows)
            if self._ws is not None:
                for a in self._ws:
                    self._backend.free(self.device, a.ptr)
                    self._owned.remove(a.ptr)
            q = self._backend.alloc(self.device, rows * K)
            s = self._backend.alloc(self.device, rows * fp8_scale_shape(rows, K)[1] * 4)
            self._owned += [q, s]
            self._ws_rows = rows
            self._ws = (DeviceArray(q, (rows, K), "uint8", self.device),
                        DeviceArray(s, fp8_scale_shape(rows, K), "float32", self.device))
        q, s = self._ws
        return (DeviceArray(q.ptr, (M, self.in_features), "uint8", self.device),
                DeviceArray(s.ptr, fp8_scale_shape(M, self.in_features), "float32", self.device))

    def forward(self, x: Any, out: Any, *, stream: Any = 0) -> Any:
        xs = _dims(x, "x", 2)
        if xs is None or xs[1] != self.in_features:
            raise ValueError(f"x: expected an array [M, {self.in_features}], got {None if xs is None else list(xs)}")
        if self.mode == "weight_only":
            fp8_gemm_weight_only(x, self.wq, self.w_scales, out, fmt=self.fmt, stream=stream)
        else:
            fp8_linear(x, self.wq, self.w_scales, out, workspace=self._workspace(xs[0]), mode="w8a8", fmt=self.fmt,
                       stream=stream)
        return out

    __call__ = forward

    def close(self) -> None:
        """Free the device buffers (also done when the object is garbage-collected)."""
        owned, self._owned = getattr(self, "_owned", []), []
        for ptr in owned:
            try:
                self._backend.free(self.device, ptr)
            except Exception:  # noqa: BLE001 - interpreter shutdown / context already gone
                pass

    def __del__(self) -> None:
        self.close()


def _host_array(obj: Any, name: str) -> np.ndarray:
    if hasattr(obj, "detach"):  # torch
        obj = obj.detach().float().cpu().numpy()
    try:
        arr = np.asarray(obj, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a host array (numpy / torch), got {type(obj).__name__}") from e
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: contains non-finite values")
    return arr
