"""Process heap policy: large blocks from mmap, so memory freed between stages goes back to the OS.

glibc serves blocks above its mmap threshold (128 KiB at start) from mmap and returns them on free,
but raises the threshold to the size of every large block freed (up to 32 MiB). From then on, tensors
of a few MiB (ONNX Runtime's repacking copies, a vision tile's activations, the builder's per-layer
float32 copies) land in the brk heap, where small allocations made in between pin them: the resident
set keeps the freed memory, and how much depends on allocation order, so it differs run to run.

Measured on an NVILA-Lite-2B engine, one 1920x1080 question on CPU (issue 19, P6;
benchmarks/results/chat_memory_nvila-lite-2b.json): peak RSS 2190-2195 MiB (1.29x what the process must
hold) with glibc's default, 1921-1922 MiB (1.13x) with a fixed 1 MiB threshold; exploratory runs of the
default saw 2084-2330 MiB. Vision and prefill times are the same within noise; decode after a 300-token
prompt, 9 runs each interleaved in fresh processes: 27.4 tok/s with it, 27.0 without (median).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also turns off the dynamic adjustment
LARGE_BLOCK_BYTES = 1 << 20


def large_blocks_from_mmap(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Serve allocations >= ``threshold`` bytes from mmap, returned to the OS on free. Process-wide and
    permanent. True when set; False where the C library is not glibc (nothing changes there)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no glibc mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
