"""Session fixture for the runtime tests: engine directories of the tiny checkpoints, built once by the
real builder (`vila_edge.builder.build.build_engine_dir`)."""

from __future__ import annotations

from pathlib import Path

import pytest


def build_engine(ckpt_path: Path, out: Path, precision: str) -> Path:
    from vila_edge.builder.build import build_engine_dir

    # int4 with our RTN quantizer: no AWQ calibration (minutes on 2 cores; the builder's tests cover AWQ)
    extra = {"llm_quant": "rtn"} if precision == "int4" else {}
    return build_engine_dir(ckpt_path, out, precision=precision, progress=False, **extra)


_BUILT: dict = {}  # (family, precision) -> engine dir; module-level so every test module shares one build


@pytest.fixture(scope="session")
def runtime_engine(tiny_checkpoint, tmp_path_factory):
    """runtime_engine(family, precision="fp32") -> engine directory of the tiny checkpoint (built once).

    Test modules import this fixture (`from conftest_runtime import runtime_engine`)."""

    def make(family: str, precision: str = "fp32") -> Path:
        key = (family, precision)
        if key not in _BUILT:
            root = tmp_path_factory.getbasetemp() / "runtime-engines"
            root.mkdir(exist_ok=True)
            _BUILT[key] = build_engine(tiny_checkpoint(family), root / f"{family}-{precision}", precision)
        return _BUILT[key]

    return make
