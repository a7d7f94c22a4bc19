"""The committed lock (requirements/dev.lock) covers what pyproject.toml asks for, at versions it allows."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

REPO = Path(__file__).resolve().parents[1]
# The gpu extra is a target install (onnxruntime-gpu replaces onnxruntime; cuda-python needs a driver).
UNLOCKED_EXTRAS = {"gpu"}


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements" / "dev.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"dev.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def test_every_declared_dependency_is_locked_at_an_allowed_version():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, reqs in project["optional-dependencies"].items():
        if extra not in UNLOCKED_EXTRAS:
            declared += reqs
    pins = locked()
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is declared in pyproject.toml but not in requirements/dev.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"dev.lock pins {name}=={pins[name]}, outside {req}"


def test_torch_is_the_pinned_cpu_release():
    assert locked()["torch"] == "2.13.0"
