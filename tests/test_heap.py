"""vila_edge.heap: large blocks freed between stages go back to the OS (issue 19, P6).

Each case runs in a fresh Python process (the heap policy is process-wide and permanent). The pattern that
pins memory under glibc's default policy: a large block freed (glibc raises its mmap threshold to its size),
then tensors of a few MiB each followed by a small long-lived allocation, then the tensors freed. The
control case shows the pattern does pin memory, so the other two can fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc heap policy: Linux only")

MIB = 1 << 20
BLOCKS, BLOCK_MIB = 40, 4  # 160 MiB of freed tensors

PATTERN = textwrap.dedent(f"""
    import json
    def rss_anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    big = bytearray(24 << 20)  # freed: glibc's dynamic threshold now sits above the tensors below
    del big
    tensors, pins = [], []
    for _ in range({BLOCKS}):
        tensors.append(bytearray({BLOCK_MIB} << 20))  # zero-filled: resident
        pins.append(bytearray(2000))  # a small malloc after each tensor, alive to the end
    before = rss_anon_mib()
    tensors.clear()
    print(json.dumps({{"freed_mib": {BLOCKS * BLOCK_MIB}, "kept_mib": rss_anon_mib() - before + {BLOCKS * BLOCK_MIB}}}))
""")


def _kept_mib(setup: str) -> float:
    out = subprocess.run([sys.executable, "-c", setup + PATTERN], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["kept_mib"]


def _glibc() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.fixture(scope="module")
def default_kept_mib():
    if not _glibc():
        pytest.skip("not glibc: the policy is a no-op there")
    return _kept_mib("")


def test_default_glibc_policy_keeps_freed_tensors(default_kept_mib):
    # the control: without the policy the freed tensors stay resident
    assert default_kept_mib > 0.8 * BLOCKS * BLOCK_MIB


def test_large_blocks_from_mmap_returns_freed_tensors(default_kept_mib):
    kept = _kept_mib("from vila_edge.heap import large_blocks_from_mmap\nassert large_blocks_from_mmap()\n")
    assert kept < 0.1 * BLOCKS * BLOCK_MIB, f"{kept:.0f} MiB of {BLOCKS * BLOCK_MIB} MiB freed stayed resident"


def test_load_sets_the_policy(runtime_engine, default_kept_mib):
    engine = runtime_engine("nvila")
    kept = _kept_mib(f"import vila_edge\npipe = vila_edge.load({str(engine)!r}, device='cpu', threads=1)\n")
    assert kept < 0.1 * BLOCKS * BLOCK_MIB, f"after vila_edge.load: {kept:.0f} MiB of {BLOCKS * BLOCK_MIB} MiB stayed"
