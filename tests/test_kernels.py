"""CPU tests of the CUDA kernels (kernels/, vila_edge.kernels, vila_edge.kernels_ref).

* the numpy references against the PyTorch oracle (vila_edge.reference.s2) and torch itself;
* the real kernel sources, compiled by the host C++ compiler for the CPU simulator
  (kernels/sim/), launched through vila_edge.kernels' own launch code, against the references;
* argument validation of the launchers (no CUDA needed);
* `make -C kernels` produces fatbins with SASS for sm_87/sm_89/sm_90 and compute_87 PTX.
The same kernels run on a GPU in benchmarks/gpu_kernels.py.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vila_edge import kernels as K
from vila_edge import kernels_ref as R

KERNELS = Path(__file__).resolve().parent.parent / "kernels"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
class HostCAI:
    """A host numpy array dressed as a device array (``__cuda_array_interface__``): the simulator's
    "device memory" is host memory, and validation only looks at the interface."""

    def __init__(self, a: np.ndarray, typestr: str | None = None, strides=None, readonly: bool = False):
        self.a = a
        self.__cuda_array_interface__ = {"shape": a.shape, "typestr": typestr or a.dtype.str,
                                          "data": (a.ctypes.data, readonly), "strides": strides, "version": 3}


class SimBackend:
    """vila_edge.kernels backend running the kernels in the CPU simulator."""

    def __init__(self, lib_path: Path, cc: tuple[int, int] = (8, 9)):
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.sim_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p]
        self.lib.sim_convert.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        self.cc = cc
        self.launches: list[tuple] = []
        self._mem: dict[int, np.ndarray] = {}

    def device_of(self, arrays):
        return 0

    def fp8_mma_supported(self, device):
        return self.cc >= (8, 9)

    def launch(self, device, module, kernel, grid, block, smem, params, stream):
        self.launches.append((kernel, grid, block, smem))
        assert self.lib.sim_launch(kernel.encode(), *grid, *block, smem, params) == 0, kernel

    def alloc(self, device, nbytes):
        buf = np.zeros(nbytes + 16, np.uint8)
        ptr = (buf.ctypes.data + 15) // 16 * 16
        self._mem[ptr] = buf
        return ptr

    def free(self, device, ptr):
        del self._mem[ptr]

    def upload(self, device, ptr, host):
        host = np.ascontiguousarray(host)
        ctypes.memmove(ptr, host.ctypes.data, host.nbytes)

    def download(self, arr: K.DeviceArray, dtype) -> np.ndarray:
        out = np.empty(arr.shape, dtype)
        ctypes.memmove(out.ctypes.data, arr.ptr, out.nbytes)
        return out

    def convert(self, op: int, x: np.ndarray, out_dtype) -> np.ndarray:
        x = np.ascontiguousarray(x)
        out = np.empty(x.shape, out_dtype)
        self.lib.sim_convert(op, x.ctypes.data, out.ctypes.data, x.size)
        return out


@pytest.fixture(scope="module")
def sim_lib() -> Path:
    if shutil.which("make") is None or shutil.which("g++") is None:
        pytest.skip("make / g++ not found: cannot build the kernel simulator")
    subprocess.run(["make", "-s", "-C", str(KERNELS), "sim"], check=True)
    return KERNELS / "build" / "libvila_kernels_sim.so"


@pytest.fixture
def sim(sim_lib):
    backend = SimBackend(sim_lib)
    old = K._set_backend(backend)
    yield backend
    K._set_backend(old)


class _NoCuda:
    """Backend that fails the test if anything reaches CUDA."""

    def __getattr__(self, name):
        raise AssertionError(f"validation should have failed before touching CUDA ({name})")


@pytest.fixture
def no_cuda():
    old = K._set_backend(_NoCuda())
    yield
    K._set_backend(old)


def _fp16_features(rng, n_tiles, hw, C):
    return rng.standard_normal((n_tiles, hw, C)).astype(np.float16)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint16), b.view(np.uint16))


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_to_f32(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# numpy S2 reference vs PyTorch
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(54, 27), (64, 96), (32, 96), (96, 96), (9, 3), (7, 3), (10, 4), (27, 54)])
def test_area_resize_matches_adaptive_avg_pool2d(n_in, n_out):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n_in * 1000 + n_out)
    x = rng.standard_normal((n_in, n_in + 5, 3)).astype(np.float32)
    out_w = n_out + 7 if n_in + 5 >= n_out + 7 else n_out
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(2, 0, 1)[None], (n_out, out_w))
    got = R.area_resize_hwc(x, n_out, out_w)
    assert np.array_equal(got, ref[0].permute(1, 2, 0).numpy())


def test_area_windows_non_integer_ratio():
    lo, hi = R.area_windows(64, 96)  # dynamic S2: the 896 scale (64x64) onto the 96-wide grid
    assert list(zip(lo[:4], hi[:4], strict=True)) == [(0, 1), (0, 2), (1, 2), (2, 3)]
    lo, hi = R.area_windows(32, 96)  # upsampling replicates
    assert np.all(hi - lo == 1) and np.array_equal(lo, np.arange(96) // 3)


@pytest.fixture(scope="module")
def s2_oracle():
    pytest.importorskip("torch")
    from vila_edge.reference import s2  # the PyTorch oracle; must exist (not skipped)

    return s2


@pytest.mark.parametrize("batch", [1, 2])
def test_static_s2_reference_matches_torch(s2_oracle, batch):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(batch)
    h = w = 27
    f = _fp16_features(rng, 5 * batch, h * w, 8).astype(np.float32)  # VILA1.5-s2: scales 384, 768
    want = s2_oracle.static_s2_merge(torch.from_numpy(f), tiles_per_side=[1, 2], output_scale_idx=0).numpy()
    got = R.s2_merge_ref(f, tile_grids=[(1, 1), (2, 2)], h=h, w=w, output_scale_idx=0, batch=batch)
    assert got.shape == (batch, 729, 16)
    assert np.array_equal(got, want)


def test_static_s2_three_scales_other_output_idx(s2_oracle):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    h = w = 6
    f = _fp16_features(rng, 1 + 4 + 9, h * w, 4).astype(np.float32)
    for idx in (0, 1, 2):
        want = s2_oracle.static_s2_merge(torch.from_numpy(f), tiles_per_side=[1, 2, 3], output_scale_idx=idx).numpy()
        side = h * (idx + 1)
        got = R.s2_merge_ref(f, tile_grids=[(1, 1), (2, 2), (3, 3)], h=h, w=w, output_scale_idx=idx,
                             chunk=(side, side))  # static S2 emits whole maps: one chunk per image
        assert np.array_equal(got, want), idx


@pytest.mark.parametrize("block,idx", [((3, 4), -1), ((3, 3), -1), ((4, 3), -1), ((3, 4), 1), ((3, 4), 0)])
def test_dynamic_s2_reference_matches_torch(s2_oracle, block, idx):
    """NVILA geometry with small C: 1920x1080 -> block (3, 4); (3, 3) has the 64 -> 96 ratio."""
    torch = pytest.importorskip("torch")
    rows, cols = block
    rng = np.random.default_rng(rows * 10 + cols)
    h = w = 32
    f = _fp16_features(rng, 1 + 4 + rows * cols, h * w, 4).astype(np.float32)
    want = s2_oracle.dynamic_s2_merge(torch.from_numpy(f), block_size=block, scales=[448, 896, 1344],
                                      output_scale_idx=idx).numpy()
    got = R.s2_merge_ref(f, tile_grids=[(1, 1), (2, 2), block], h=h, w=w, output_scale_idx=idx)
    assert np.array_equal(got, want)


def test_dynamic_s2_plain_tile_reference_matches_torch(s2_oracle):
    torch = pytest.importorskip("torch")
    f = _fp16_features(np.random.default_rng(3), 1, 1024, 4).astype(np.float32)
    want = s2_oracle.dynamic_s2_merge(torch.from_numpy(f), block_size=None, scales=[448, 896, 1344]).numpy()
    got = R.s2_merge_ref(f, tile_grids=[(1, 1)] * 3, h=32, w=32, output_scale_idx=-1, tile_offsets=[0, 0, 0])
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# FP8 references
# ---------------------------------------------------------------------------------------------
def test_e4m3_encode_matches_torch_and_saturates():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    vals = R.E4M3_VALUES[np.isfinite(R.E4M3_VALUES)]
    mids = (vals[:-1] + vals[1:]) / 2  # exact ties (sorted positive and negative halves)
    x = np.concatenate([(rng.standard_normal(200_000) * s).astype(np.float32) for s in (1e-3, 0.1, 10, 150)]
                       + [vals, mids[np.abs(mids) < 448].astype(np.float32)])
    x = x[np.abs(x) < 448]
    want = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(R.e4m3_encode(x), want)
    big = np.float32([448, 463.9, 464, 1e6, np.inf, -500, -np.inf])
    assert list(R.e4m3_decode(R.e4m3_encode(big))) == [448, 448, 448, 448, 448, -448, -448]
    assert R.e4m3_encode(np.float32([2.0**-10, 3 * 2.0**-10])).tolist() == [0, 2]  # ties to even


def test_fp8_quantize_reference_blocks():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 272)).astype(np.float32) * 5
    x[1, 128:256] = 0
    q, s = R.fp8_quantize_act_ref(x)
    assert q.shape == (3, 272) and s.shape == (3, 3) and q.dtype == np.uint8 and s.dtype == np.float32
    assert s[1, 1] == np.float32(1e-10)
    assert s[0, 2] == np.float32(np.abs(x[0, 256:]).max()) / np.float32(448)
    err = np.abs(R.fp8_dequantize_act_ref(q, s) - x)
    assert np.all(err <= np.abs(x) * 2.0**-4 + 2.0**-9 * np.repeat(s, 128, axis=1)[:, :272] + 1e-7)
    w = rng.standard_normal((200, 272)).astype(np.float32)
    wq, ws = R.fp8_quantize_weight_ref(w)
    assert ws.shape == (2, 3)
    rel = np.abs(R.fp8_dequantize_weight_ref(wq, ws) - w).max() / np.abs(w).max()
    assert rel < 2.0**-4


# ---------------------------------------------------------------------------------------------
# the kernel sources on the CPU simulator
# ---------------------------------------------------------------------------------------------
def test_sim_conversions_match_numpy(sim):
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        (rng.standard_normal(100_000) * 50).astype(np.float32)])
    x = x[np.isfinite(x)]
    assert np.array_equal(sim.convert(0, x, np.uint8), R.e4m3_encode(x))  # f32_to_e4m3_satfinite
    assert np.array_equal(sim.convert(5, x, np.uint8), R.fp8_encode(x, "e5m2"))  # f32_to_e5m2_satfinite
    with np.errstate(over="ignore"):
        assert np.array_equal(sim.convert(1, x, np.uint16), x.astype(np.float16).view(np.uint16))
    assert np.array_equal(sim.convert(2, x, np.uint16), _bf16_bits(x))
    pairs = np.arange(65536, dtype=np.uint32).astype(np.uint16)  # fp8 byte pairs -> fp16x2
    for op, fmt in ((4, "e4m3"), (6, "e5m2")):
        h2 = sim.convert(op, pairs, np.uint32)
        for half, byte in ((h2 & 0xFFFF, pairs & 0xFF), (h2 >> 16, pairs >> 8)):
            got = half.astype(np.uint16).view(np.float16).astype(np.float32)
            want = R.FP8_VALUES[fmt][byte]
            ok = np.isfinite(want)
            assert np.array_equal(got[ok], want[ok])
        if fmt == "e5m2":  # infinities too (e5m2 has them; the kernels never produce them: satfinite)
            inf = np.isinf(R.FP8_VALUES[fmt][pairs & 0xFF])
            assert np.array_equal((h2 & 0xFFFF)[inf].astype(np.uint16).view(np.float16), R.FP8_VALUES[fmt][pairs & 0xFF][inf])


S2_CASES = [
    # tile_grids, h, w, output_scale_idx, C, batch, chunk, tile_offsets
    ([(1, 1), (2, 2), (3, 4)], 4, 4, -1, 16, 1, None, None),  # dynamic S2 (3,4), vector path
    ([(1, 1), (2, 2), (3, 3)], 4, 4, -1, 5, 1, None, None),  # odd C: scalar path, 8 -> 12 ratio
    ([(1, 1), (2, 2), (3, 4)], 6, 6, -1, 24, 1, None, None),  # 12 -> 18 rows (non-integer), 6 -> 24
    ([(1, 1), (2, 2)], 3, 3, 0, 8, 3, None, None),  # static S2, batch 3, tile-major order
    ([(1, 1), (2, 2)], 3, 3, 1, 8, 2, (6, 6), None),  # static S2, output idx 1 -> whole 6x6 maps
    ([(1, 1), (1, 1), (1, 1)], 4, 4, -1, 8, 1, None, [0, 0, 0]),  # plain tile repeated per scale
    ([(1, 1), (3, 3)], 3, 3, 0, 8, 2, None, None),  # 9 -> 3: 3x3 windows, the IEEE-division store path
    ([(1, 1), (3, 3)], 3, 3, 0, 5, 1, None, None),  # the same on the scalar path
    ([(1, 1), (2, 3)], 2, 2, 0, 1344, 1, None, None),  # 168 groups: two passes of 5 x 32 lanes; 3x1 windows
    ([(1, 1), (2, 2)], 2, 2, 0, 1152, 1, None, None),  # SigLIP's C: 144 groups, the 5th slot half the lanes
]


@pytest.mark.parametrize("case", S2_CASES)
def test_sim_s2_merge_exact(sim, case):
    grids, h, w, idx, C, batch, chunk, offs = case
    rng = np.random.default_rng(len(grids) * 100 + C)
    n_tiles = max(o + a * b * batch for o, (a, b) in zip(offs or R.s2_default_tile_offsets(grids, batch), grids, strict=True))
    f = _fp16_features(rng, n_tiles, h * w, C)
    shape = K.s2_output_shape(tile_grids=grids, h=h, w=w, output_scale_idx=idx, channels=C, batch=batch, chunk=chunk)
    out = np.full(shape, np.nan, np.float16)  # poisoned: every element must be written
    K.s2_merge(HostCAI(f), HostCAI(out), tile_grids=grids, h=h, w=w, output_scale_idx=idx, batch=batch,
               chunk=chunk, tile_offsets=offs)
    want = R.s2_merge_ref(f, tile_grids=grids, h=h, w=w, output_scale_idx=idx, batch=batch, chunk=chunk,
                          tile_offsets=offs).astype(np.float16)
    assert _bits_equal(out, want)
    assert sim.launches[-1][0] == ("s2_merge_f16_v8" if C % 8 == 0 else "s2_merge_f16_v1")
    if C % 8 == 0:  # the first version (kept for the GPU benchmark's comparison) is exact too
        out[...] = np.nan
        K.s2_merge(HostCAI(f), HostCAI(out), tile_grids=grids, h=h, w=w, output_scale_idx=idx, batch=batch,
                   chunk=chunk, tile_offsets=offs, variant="block")
        assert sim.launches[-1][0] == "s2_merge_f16_v8_block"
        assert _bits_equal(out, want)


def test_sim_s2_merge_raw_pointers(sim):
    rng = np.random.default_rng(5)
    f = _fp16_features(rng, 5, 9, 8)
    out = np.full((1, 9, 16), np.nan, np.float16)
    K.s2_merge(f.ctypes.data, out.ctypes.data, tile_grids=[(1, 1), (2, 2)], h=3, w=3, output_scale_idx=0, channels=8)
    want = R.s2_merge_ref(f, tile_grids=[(1, 1), (2, 2)], h=3, w=3, output_scale_idx=0).astype(np.float16)
    assert _bits_equal(out, want)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M,N,Kd", [(37, 200, 272), (130, 136, 128), (5, 8, 16)])
def test_sim_fp8_quantize_and_gemms(sim, M, N, Kd, fmt):
    rng = np.random.default_rng(M + N + Kd)
    x = (rng.standard_normal((M, Kd)) * 3).astype(np.float16)
    x[0, : min(Kd, 128)] = 0  # an all-zero block gets the 1e-10 scale floor
    w = rng.standard_normal((N, Kd)).astype(np.float32) * 0.05
    xq = np.full((M, Kd), 0xAA, np.uint8)
    xs = np.full(K.fp8_scale_shape(M, Kd), np.nan, np.float32)
    K.fp8_quantize(HostCAI(x), HostCAI(xq), HostCAI(xs), fmt=fmt)
    rq, rs = R.fp8_quantize_act_ref(x, fmt)
    assert np.array_equal(xq, rq) and np.array_equal(xs, rs)  # bit exact

    wq, ws = R.fp8_quantize_weight_ref(w, fmt)
    ref = R.fp8_gemm_ref(rq, rs, wq, ws, fmt)
    out = np.full((M, N), np.nan, np.float16)
    K.fp8_gemm(HostCAI(xq), HostCAI(xs), HostCAI(wq), HostCAI(ws), HostCAI(out), fmt=fmt)
    assert sim.launches[-1][0] == ("fp8_gemm_w8a8_f16out" if fmt == "e4m3" else "fp8_gemm_w8a8_f16out_e5m2")
    assert not np.isnan(out).any()
    assert np.abs(out.astype(np.float32) - ref).max() <= 2e-3 * np.abs(ref).max()

    ref_wo = R.fp8_gemm_weight_only_ref(x, wq, ws, fmt)
    out_bf = np.full((M, N), 0xFFFF, np.uint16)  # bf16 output (NaN pattern), passed as raw pointer
    K.fp8_gemm_weight_only(HostCAI(x), HostCAI(wq), HostCAI(ws), out_bf.ctypes.data, out_dtype="bfloat16",
                           fmt=fmt)
    got = _bf16_to_f32(out_bf)
    assert not np.isnan(got).any()
    assert np.abs(got - ref_wo).max() <= 1e-2 * np.abs(ref_wo).max()


def test_sim_fp8_quantize_bf16_input(sim):
    rng = np.random.default_rng(9)
    xf = (rng.standard_normal((4, 160)) * 7).astype(np.float32)
    xb = _bf16_bits(xf)
    xq = np.zeros((4, 160), np.uint8)
    xs = np.zeros((4, 2), np.float32)
    K.fp8_quantize(xb.ctypes.data, HostCAI(xq), HostCAI(xs), m=4, k=160, x_dtype="bfloat16")
    rq, rs = R.fp8_quantize_act_ref(_bf16_to_f32(xb))
    assert np.array_equal(xq, rq) and np.array_equal(xs, rs)
    assert sim.launches[-1][0] == "fp8_quantize_act_bf16"


@pytest.mark.parametrize("cc,kernel,fmt", [((8, 9), "fp8_gemm_w8a8_f16out", "e4m3"),
                                            ((8, 7), "fp8_gemm_wonly_f16out", "e4m3"),
                                            ((8, 9), "fp8_gemm_w8a8_f16out_e5m2", "e5m2"),
                                            ((8, 7), "fp8_gemm_wonly_f16out_e5m2", "e5m2")])
def test_sim_fp8_linear_picks_path_per_sm(sim, cc, kernel, fmt):
    sim.cc = cc
    rng = np.random.default_rng(11)
    w = rng.standard_normal((136, 144)).astype(np.float32) * 0.1
    x = rng.standard_normal((20, 144)).astype(np.float16)
    lin = K.Fp8Linear(w, fmt=fmt)
    out = np.full((20, 136), np.nan, np.float16)
    lin(HostCAI(x), HostCAI(out))
    assert sim.launches[-1][0] == kernel
    want = R.fp8_linear_ref(x.astype(np.float32), w, weight_only=cc < (8, 9), fmt=fmt)
    assert np.abs(out.astype(np.float32) - want).max() <= 2e-3 * np.abs(want).max()
    lin.close()


def test_sim_fp8_gemm_refuses_w8a8_without_fp8_tensor_cores(sim):
    sim.cc = (8, 7)
    a = np.zeros((16, 16), np.uint8)
    s = np.ones((16, 1), np.float32)
    with pytest.raises(K.KernelsUnavailableError, match="sm_89"):
        K.fp8_gemm(HostCAI(a), HostCAI(s), HostCAI(a), HostCAI(np.ones((1, 1), np.float32)),
                   HostCAI(np.zeros((16, 16), np.float16)))


# ---------------------------------------------------------------------------------------------
# argument validation (no CUDA)
# ---------------------------------------------------------------------------------------------
def _s2_args():
    f = np.zeros((5, 9, 8), np.float16)
    out = np.zeros((1, 9, 16), np.float16)
    return f, out, dict(tile_grids=[(1, 1), (2, 2)], h=3, w=3, output_scale_idx=0)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda f, o: (HostCAI(f.astype(np.float32)), HostCAI(o)), r"features: expected dtype float16, got float32"),
        (lambda f, o: (HostCAI(f[:4]), HostCAI(o)), r"features: 4 tiles given, the tile grids need 5"),
        (lambda f, o: (HostCAI(f.reshape(5, 3, 24)), HostCAI(o)), r"features: expected shape \[n_tiles, 9, C\]"),
        (lambda f, o: (HostCAI(f), HostCAI(o[:, :, :8])), r"out: expected shape \[1, 9, 16\]"),
        (lambda f, o: (HostCAI(f), HostCAI(o, readonly=True)), r"out: output array is read-only"),
        (lambda f, o: (HostCAI(f, strides=(2, 720, 80)), HostCAI(o)), r"features: must be C-contiguous"),
        (lambda f, o: (f, HostCAI(o)), r"features: must be a CUDA device array \(DLPack device type 1\)"),
        (lambda f, o: (f.tolist(), HostCAI(o)), r"features: expected a CUDA array"),
        (lambda f, o: (12345, HostCAI(o)), r"channels: required when features is a raw device pointer"),
        (lambda f, o: (HostCAI(f, typestr="<f8"), HostCAI(o)), r"features: unsupported dtype"),
    ],
)
def test_s2_merge_validation(no_cuda, mutate, match):
    f, out, kw = _s2_args()
    feats, dst = mutate(f, out)
    with pytest.raises(ValueError, match=match):
        K.s2_merge(feats, dst, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(tile_grids=[(1, 1)] * 5), r"tile_grids: 1 to 4 scales"),
        (dict(tile_grids=[1, 2]), r"tile_grids: expected a sequence of \(rows, cols\) pairs"),
        (dict(output_scale_idx=2), r"output_scale_idx: 2 out of range"),
        (dict(chunk=(2, 3)), r"chunk: 2x3 does not tile the 3x3 output grid"),
        (dict(tile_offsets=[0]), r"tile_offsets: expected 2"),
        (dict(batch=0), r"batch: must be positive"),
        (dict(variant="fast"), r"variant: 'fast' is not one of warp, block"),
    ],
)
def test_s2_merge_geometry_validation(no_cuda, kw, match):
    f, out, base = _s2_args()
    with pytest.raises(ValueError, match=match):
        K.s2_merge(HostCAI(f), HostCAI(out), **{**base, **kw})


def test_s2_merge_refuses_what_32_bit_indexing_cannot_address(no_cuda):
    with pytest.raises(ValueError, match=r"too large for 32-bit indexing .*split the batch"):
        K.s2_merge(1 << 20, 1 << 20, channels=1 << 27, tile_grids=[(1, 1)], h=4, w=4, output_scale_idx=0)


def test_fp8_validation(no_cuda):
    xq = np.zeros((4, 32), np.uint8)
    xs = np.zeros((4, 1), np.float32)
    wq = np.zeros((8, 32), np.uint8)
    ws = np.zeros((1, 1), np.float32)
    out = np.zeros((4, 8), np.float16)
    with pytest.raises(ValueError, match=r"K: inconsistent sizes \[32, 48\]"):
        K.fp8_gemm(HostCAI(xq), HostCAI(xs), HostCAI(np.zeros((8, 48), np.uint8)), HostCAI(ws), HostCAI(out))
    with pytest.raises(ValueError, match=r"x_scales: expected shape \[4, 1\], got \[4, 2\]"):
        K.fp8_gemm(HostCAI(xq), HostCAI(np.zeros((4, 2), np.float32)), HostCAI(wq), HostCAI(ws), HostCAI(out))
    with pytest.raises(ValueError, match=r"out: expected dtype float16 or bfloat16, got float32"):
        K.fp8_gemm(HostCAI(xq), HostCAI(xs), HostCAI(wq), HostCAI(ws), HostCAI(out.astype(np.float32)))
    with pytest.raises(ValueError, match=r"xq: K \(= 24\) must be a positive multiple of 16"):
        K.fp8_gemm(HostCAI(np.zeros((4, 24), np.uint8)), HostCAI(xs), HostCAI(np.zeros((8, 24), np.uint8)),
                   HostCAI(ws), HostCAI(out))
    raw = bytearray(64)
    misaligned = (ctypes.addressof(ctypes.c_char.from_buffer(raw)) | 15) + 2
    with pytest.raises(ValueError, match=r"x: data pointer must be 16-byte aligned"):
        K.fp8_gemm_weight_only(misaligned, HostCAI(wq), HostCAI(ws), HostCAI(out), m=4, k=32)
    with pytest.raises(ValueError, match=r"M: cannot be derived from raw pointers"):
        K.fp8_quantize(1 << 20, 1 << 21, HostCAI(xs))
    with pytest.raises(ValueError, match=r"x: expected dtype float16 or bfloat16, got float32"):
        K.fp8_quantize(HostCAI(np.zeros((4, 32), np.float32)), HostCAI(xq), HostCAI(xs))
    with pytest.raises(ValueError, match=r"mode: expected"):
        K.fp8_linear(HostCAI(np.zeros((4, 32), np.float16)), HostCAI(wq), HostCAI(ws), HostCAI(out), mode="int8")
    with pytest.raises(ValueError, match=r"workspace: w8a8 needs"):
        K.fp8_linear(HostCAI(np.zeros((4, 32), np.float16)), HostCAI(wq), HostCAI(ws), HostCAI(out), mode="w8a8")


def test_dlpack_parsing_and_cpu_rejection(no_cuda):
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    arr, dev_type = K._from_dlpack_capsule(a, "a", a.__dlpack__())
    assert (arr.ptr, arr.shape, arr.dtype, dev_type) == (a.ctypes.data, (3, 4), "float16", 1)
    with pytest.raises(ValueError, match=r"must be C-contiguous"):
        t = a.T
        K._from_dlpack_capsule(t, "t", t.__dlpack__())
    with pytest.raises(ValueError, match=r"features: must be a CUDA device array \(DLPack device type 1\)"):
        K.as_device_array(a, "features")
    torch = pytest.importorskip("torch")
    b = torch.zeros((2, 8), dtype=torch.bfloat16)
    arr, dev_type = K._from_dlpack_capsule(b, "b", b.__dlpack__())
    assert (arr.shape, arr.dtype, arr.ptr) == ((2, 8), "bfloat16", b.data_ptr())
    with pytest.raises(ValueError, match=r"out: must be a CUDA device array"):
        K.as_device_array(b, "out")


def test_opaque_bf16_array_interface_falls_back_to_dlpack(no_cuda):
    """torch 2.11 (seen on an H200) describes a CUDA bf16 tensor's array interface as typestr '<V2':
    such an object must be read through DLPack, which names bfloat16, not refused."""
    torch = pytest.importorskip("torch")

    class OpaqueBf16:
        def __init__(self, t):
            self.t = t
            self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<V2",
                                              "data": (t.data_ptr(), False), "strides": None, "version": 3}

        def __dlpack__(self, stream=None):
            return self.t.__dlpack__()

    t = torch.zeros((2, 8), dtype=torch.bfloat16)
    # reaches DLPack (a CPU tensor here, so refused for its device, not for its dtype)
    with pytest.raises(ValueError, match=r"out: must be a CUDA device array \(DLPack device type 1\)"):
        K.as_device_array(OpaqueBf16(t), "out")
    with pytest.raises(ValueError, match=r"out: unsupported dtype \(array interface typestr '<V2'\)"):
        K.as_device_array(HostCAI(np.zeros((2, 8), np.float16), typestr="<V2"), "out")


def test_stream_handles():
    class TorchLike:
        cuda_stream = 0x1234

    class Protocol:
        def __cuda_stream__(self):
            return (0, 0x5678)

    assert K._stream_handle(None) == 0
    assert K._stream_handle(7) == 7
    assert K._stream_handle(TorchLike()) == 0x1234
    assert K._stream_handle(Protocol()) == 0x5678
    with pytest.raises(ValueError, match="stream:"):
        K._stream_handle("default")


def test_missing_cuda_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError("no cuda-python here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    old = K._set_backend(None)
    try:
        with pytest.raises(K.KernelsUnavailableError, match="cuda-python"):
            K.s2_merge(HostCAI(np.zeros((5, 9, 8), np.float16)), HostCAI(np.zeros((1, 9, 16), np.float16)),
                       tile_grids=[(1, 1), (2, 2)], h=3, w=3, output_scale_idx=0)
    finally:
        K._set_backend(old)


# ---------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------
def test_make_builds_all_fatbins():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found: cannot compile the CUDA kernels here")
    subprocess.run(["make", "-s", "-C", str(KERNELS)], check=True, timeout=600)
    for name in ("s2_merge", "fp8_gemm"):
        entries = set(K.fatbin_entries(KERNELS / "build" / f"{name}.fatbin"))
        assert {("sass", 87), ("sass", 89), ("sass", 90), ("ptx", 87)} <= entries, (name, entries)


# ---------------------------------------------------------------------------------------------
# the cuda-python backend's control flow, against a fake driver (no GPU, no cuda-python needed)
# ---------------------------------------------------------------------------------------------
class _Ns:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class FakeDriver:
    CUresult = _Ns(CUDA_SUCCESS=0)
    CUdevice_attribute = _Ns(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR=75,
                             CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR=76)
    CUfunction_attribute = _Ns(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
    CUpointer_attribute = _Ns(CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL=9)

    def __init__(self, cc, launch_result=0):
        self.cc, self.launch_result, self.calls = cc, launch_result, []

    def cuInit(self, flags):
        return (0,)

    def cuCtxGetCurrent(self):
        return (0, 0x1000)

    def cuCtxGetDevice(self):
        return (0, 0)

    def cuDeviceGet(self, i):
        return (0, i)

    def cuDevicePrimaryCtxRetain(self, dev):
        return (0, 0x1000)

    def cuCtxSetCurrent(self, ctx):
        self.calls.append(("set_ctx", ctx))
        return (0,)

    def cuDeviceGetAttribute(self, attr, dev):
        return (0, self.cc[0] if attr == 75 else self.cc[1])

    def cuModuleLoadData(self, image):
        self.calls.append(("load", image))
        return (0, "module")

    def cuModuleGetFunction(self, mod, name):
        return (0, ("fn", name.decode()))

    def cuFuncSetAttribute(self, fn, attr, value):
        self.calls.append(("smem", fn[1], value))
        return (0,)

    def cuModuleGetGlobal(self, mod, name):
        assert name == b"vila_fp8_mma_available"
        self._flag = ctypes.c_int(1)
        return (0, ctypes.addressof(self._flag), 4)

    def cuMemcpyDtoH(self, dst, src, nbytes):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def CUstream(self, handle):
        return ("stream", handle)

    def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        args = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        first_ptr = ctypes.c_uint64.from_address(args[0]).value
        self.calls.append(("launch", fn[1], (gx, gy, gz), (bx, by, bz), smem, stream, first_ptr))
        return (self.launch_result,)

    def cuGetErrorName(self, err):
        return (0, b"CUDA_ERROR_FAKE")


class FakeNvrtc:
    nvrtcResult = _Ns(NVRTC_SUCCESS=0)

    def __init__(self):
        self.options = None

    def nvrtcCreateProgram(self, src, name, n, headers, names):
        assert names == [b"common.cuh"] and b'#include "common.cuh"' in src
        return (0, "prog")

    def nvrtcCompileProgram(self, prog, n, opts):
        self.options = opts
        return (0,)

    def nvrtcGetCUBINSize(self, prog):
        return (0, 8)

    def nvrtcGetCUBIN(self, prog, buf):
        return (0,)

    def nvrtcDestroyProgram(self, prog):
        return (0,)


@pytest.mark.parametrize("cc", [(8, 9), (12, 0)])
def test_cuda_backend_flow_with_fake_driver(monkeypatch, cc):
    drv, nvrtc = FakeDriver(cc), FakeNvrtc()
    monkeypatch.setattr(K, "_import_cuda", lambda: (drv, nvrtc))
    backend = K._CudaBackend()
    old = K._set_backend(backend)
    try:
        f = np.zeros((5, 9, 8), np.float16)
        K.s2_merge(HostCAI(f), HostCAI(np.zeros((1, 9, 16), np.float16)), tile_grids=[(1, 1), (2, 2)], h=3, w=3,
                   output_scale_idx=0, stream=77)
        launch = [c for c in drv.calls if c[0] == "launch"][-1]
        # one warp per (token, scale): 9 tokens / 4 warps per block -> 3 blocks, x 2 scales
        assert launch[1:6] == ("s2_merge_f16_v8", (3, 2, 1), (128, 1, 1), 0, ("stream", 77))
        assert launch[6] == f.ctypes.data  # kernelParams[0] points at the features pointer
        fatbin = KERNELS / "build" / "s2_merge.fatbin"
        has_sass = fatbin.exists() and ("sass", cc[0] * 10 + cc[1]) in K.fatbin_entries(fatbin)
        assert (nvrtc.options is None) == has_sass  # fatbin when it has SASS for the SM, else NVRTC
        if not has_sass:
            assert f"--gpu-architecture=sm_{cc[0]}{cc[1]}".encode() in nvrtc.options

        xq, xs = np.zeros((16, 32), np.uint8), np.ones((16, 1), np.float32)
        K.fp8_gemm(HostCAI(xq), HostCAI(xs), HostCAI(np.zeros((8, 32), np.uint8)), HostCAI(np.ones((1, 1), np.float32)),
                   HostCAI(np.zeros((16, 8), np.float16)))
        assert ("smem", "fp8_gemm_w8a8_f16out", K._W8A8_SMEM) in drv.calls  # > 48 KiB opt-in
        drv.launch_result = 1
        with pytest.raises(RuntimeError, match=r"cuLaunchKernel\(s2_merge_f16_v8\) failed: CUDA_ERROR_FAKE"):
            K.s2_merge(HostCAI(f), HostCAI(np.zeros((1, 9, 16), np.float16)), tile_grids=[(1, 1), (2, 2)], h=3,
                       w=3, output_scale_idx=0)
    finally:
        K._set_backend(old)
