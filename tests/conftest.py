"""Shared fixtures: tiny checkpoints in the real on-disk formats, built once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FAMILIES = ("vila1.5", "vila1.5-s2", "nvila", "nvila-lite")


@pytest.fixture(scope="session")
def fixture_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(fixture_root):
    """tiny_checkpoint(family, layout="dev") -> path of a cached tiny checkpoint (do not modify it)."""
    from vila_edge.testing import make_tiny_checkpoint

    def make(family: str, layout: str = "dev") -> Path:
        return make_tiny_checkpoint(family, fixture_root / f"{family}-{layout}", seed=0, layout=layout)

    return make


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A private, writable copy of a tiny checkpoint, for tests that break it."""

    def make(family: str, layout: str = "dev") -> Path:
        dst = tmp_path / f"{family}-{layout}"
        shutil.copytree(tiny_checkpoint(family, layout), dst)
        return dst

    return make


@pytest.fixture(scope="module")
def one_torch_thread():
    """Quantize and run references on one torch thread: on a CPU shared with other busy processes the
    quantizer's thousands of small element-wise ops are many times slower with more (see AWQSettings.threads)."""
    from vila_edge.builder.awq import torch_threads

    with torch_threads(1):
        yield
