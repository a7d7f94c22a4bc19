"""Engine directory contract: manifest, refusal of stale / mismatched / incomplete directories,
atomic builds (Ctrl-C, SIGKILL), the build lock, "up to date" reuse, the CLI surface."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vila_edge.builder.build import BuildOptions, build
from vila_edge.builder.engine_dir import BuildLock, lock_path, temp_prefix
from vila_edge.engine_dir import MANIFEST, CheckpointRef, Target, check_engine_dir, read_manifest
from vila_edge.errors import EngineError

VISION_ONLY = BuildOptions(skip_llm=True)


@pytest.fixture(scope="module", autouse=True)
def _reuse_onnx_registry():
    """Test speed only: torch.onnx rebuilds its op registry on every dynamo export (~1 s); build it once."""
    try:
        from torch.onnx._internal.exporter import _registration

        original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    except (ImportError, KeyError):
        yield
        return
    cache = {}

    def cached(cls, opset_version=18):
        if opset_version not in cache:
            cache[opset_version] = original.__func__(cls, opset_version=opset_version)
        return cache[opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(cached)
    yield
    _registration.ONNXRegistry.from_torchlib = original


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") or p.name.endswith(".lock"))


@pytest.fixture(scope="module")
def built(tiny_checkpoint, tmp_path_factory):
    """One vision-only engine dir of the nvila fixture (do not modify: copy it)."""
    out = tmp_path_factory.mktemp("built") / "nvila"
    res = build(tiny_checkpoint("nvila"), out, options=VISION_ONLY, stage="export", progress=False)
    assert res.status == "built"
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_manifest_records_the_contract(built, tiny_checkpoint):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.tokenizer import MEDIA_TOKENS, Tokenizer

    ckpt = load_checkpoint(tiny_checkpoint("nvila"))
    m = check_engine_dir(built, ckpt)
    assert m.format == 1 and m.stage == "export" and m.target == Target("cpu", None)
    assert m.checkpoint.fingerprint == ckpt.fingerprint()
    assert m.config == ckpt.config
    assert set(m.versions) >= {"onnx", "onnxruntime", "torch"}
    assert m.llm == {"skipped": "--skip-llm"}
    assert m.options == VISION_ONLY.export_key()
    assert m.vision["io"]["tower"] == {"input": "pixel_values", "output": "features"}
    assert m.vision["io"]["projector"] == {"input": "features", "output": "embeds"}
    for rel, size in m.files.items():
        assert (built / rel).stat().st_size == size
    assert {"checkpoint_config.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
            "vision/tower.fp32.onnx", "vision/projector.fp32.onnx"} <= set(m.files)
    assert json.loads((built / "checkpoint_config.json").read_text())["top"] == ckpt.raw["top"]
    tok = Tokenizer.from_dir(built / "tokenizer")
    for name, idx in ckpt.config.llm.media_token_ids.items():
        assert tok.token_to_id(MEDIA_TOKENS[name]) == idx
    assert oct((built).stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    # the same checks by path (loaded with the manifest's overrides)
    assert check_engine_dir(built, tiny_checkpoint("nvila")).name == "nvila"


def test_changed_checkpoint_is_refused(built, checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy("nvila")
    check_engine_dir(built, ckpt)  # the copy is byte-identical: same fingerprint
    weights = ckpt / "mm_projector" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x55  # flip bits inside the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"another version of the checkpoint.*vila-edge build"):
        check_engine_dir(built, ckpt)


def test_incomplete_or_foreign_directories_are_refused(built, tmp_path):
    with pytest.raises(EngineError, match=r"not found.*vila-edge build CKPT -o"):
        read_manifest(tmp_path / "nope")
    d = _copy(built, tmp_path / "a")
    (d / "vision" / "projector.fp32.onnx").unlink()
    with pytest.raises(EngineError, match=r"projector.fp32.onnx: missing.*vila-edge build .* -o"):
        check_engine_dir(d)
    d = _copy(built, tmp_path / "b")
    with open(d / "vision" / "tower.fp32.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(EngineError, match="truncated"):
        check_engine_dir(d)
    for key, value, pattern in (("format", 2, "format 2"), ("vila_edge", "9.9.0", "vila-edge 9.9.0")):
        d = _copy(built, tmp_path / f"c-{key}")
        m = json.loads((d / MANIFEST).read_text())
        m[key] = value
        (d / MANIFEST).write_text(json.dumps(m))
        with pytest.raises(EngineError, match=pattern):
            check_engine_dir(d)
    d = _copy(built, tmp_path / "d")
    (d / MANIFEST).unlink()
    with pytest.raises(EngineError, match="interrupted build"):
        check_engine_dir(d)
    # plans built for another GPU
    d = _copy(built, tmp_path / "e")
    m = json.loads((d / MANIFEST).read_text())
    m["vision"]["plans"] = {"tower": "vision/tower.fp16.plan"}
    m["target"] = {"device": "cuda", "sm": "8.9"}
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="sm_8.9.*--stage engines"):
        check_engine_dir(d, sm="8.7")


def test_unchanged_rebuild_is_up_to_date_and_changes_rebuild(built, tiny_checkpoint, tmp_path):
    out = _copy(built, tmp_path / "nvila")
    before = (out / MANIFEST).stat().st_mtime_ns
    t0 = time.perf_counter()
    res = build(tiny_checkpoint("nvila"), out, options=VISION_ONLY, stage="export", progress=False)
    assert res.status == "up-to-date" and time.perf_counter() - t0 < 10
    assert (out / MANIFEST).stat().st_mtime_ns == before
    # another option -> rebuilt, replaced atomically, nothing left beside it
    res = build(tiny_checkpoint("nvila"), out, options=BuildOptions(skip_llm=True, precision="fp16"), stage="export",
                progress=False)
    assert res.status == "built"
    m = check_engine_dir(out)
    assert m.options["precision"] == "fp16" and set(m.vision["files"]["tower"]) == {"fp16"}
    assert not (out / "vision" / "tower.fp32.onnx").exists()
    assert _leftovers(out) == []


def test_existing_non_engine_directory_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(EngineError, match="not an engine directory.*--force"):
        build(tiny_checkpoint("nvila-lite"), out, options=VISION_ONLY, stage="export", progress=False)
    assert (out / "notes.txt").read_text() == "precious"
    assert _leftovers(out) == []


def test_concurrent_build_is_refused_and_a_stale_lock_is_taken_over(built, tiny_checkpoint, tmp_path):
    out = _copy(built, tmp_path / "nvila")
    with BuildLock(out):  # a live build (this process) holds it
        with pytest.raises(EngineError, match=r"another build \(pid \d+"):
            build(tiny_checkpoint("nvila"), out, options=VISION_ONLY, stage="export", progress=False)
        with pytest.raises(EngineError, match="another build"):
            BuildLock(out).acquire()
    assert not lock_path(out).exists()
    # a lock left by a dead process is stale
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    lock_path(out).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 5}))
    res = build(tiny_checkpoint("nvila"), out, options=VISION_ONLY, stage="export", progress=False)
    assert res.status == "up-to-date"
    assert not lock_path(out).exists()


def _default_sigint() -> None:
    # A job started in the background by a non-interactive shell (as CI runners may do) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C test would wait forever.
    # Give the child the disposition a user's terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "vila_edge.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint, **kw)


def _wait_for_temp_dir(out: Path, proc, timeout=120.0) -> Path:
    t0 = time.time()
    while time.time() - t0 < timeout:
        tmp = [p for p in out.parent.glob(temp_prefix(out) + "*")]
        if tmp and (tmp[0] / "checkpoint_config.json").is_file():  # first step done, parked in its delay
            return tmp[0]
        if proc.poll() is not None:
            raise AssertionError(f"build ended before it could be interrupted: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the build never started writing")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_interrupted_build_leaves_no_partial_directory(sig, tiny_checkpoint, tmp_path):
    ckpt = tiny_checkpoint("nvila-lite")
    out = tmp_path / "engines" / "lite"
    env = {**os.environ, "VILA_EDGE_TEST_STAGE_DELAY": "30"}  # park after each step: a wide window to kill in
    proc = _cli("build", ckpt, "-o", out, "--skip-llm", "--stage", "export", env=env)
    tmp = _wait_for_temp_dir(out, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert not out.exists()  # never a partial engine directory
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
        assert _leftovers(out) == []  # temp dir and lock cleaned up
    else:
        assert not tmp.name.startswith(out.name)  # a hidden temp dir that no reader looks at
        with pytest.raises(EngineError):
            check_engine_dir(out)
        # the next build takes over the dead build's lock and removes its temp dir
        res = build(ckpt, out, options=VISION_ONLY, stage="export", progress=False)
        assert res.status == "built"
        check_engine_dir(out, ckpt)
        assert _leftovers(out) == []


def test_llm_builder_is_called_with_the_options(tiny_checkpoint, tmp_path, monkeypatch):
    import types

    calls = {}

    def fake_build_llm_onnx(llm_dir, out_dir, **kw):
        calls.update(kw, llm_dir=Path(llm_dir))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True)
        (out_dir / "model.onnx").write_bytes(b"onnx")
        (out_dir / "genai_config.json").write_text("{}")
        return {"model": str(out_dir / "model.onnx"), "precision": kw["precision"], "group_size": kw["group_size"]}

    monkeypatch.setitem(sys.modules, "vila_edge.builder.llm_onnx",
                        types.SimpleNamespace(build_llm_onnx=fake_build_llm_onnx))

    def no_vision(ckpt, tmp, options, threads, rep):  # the vision export is tested elsewhere; keep this fast
        (tmp / "vision").mkdir()
        return {"files": {}, "plans": {}}

    monkeypatch.setattr("vila_edge.builder.build._export_vision", no_vision)
    opts = BuildOptions(llm_precision="int8", group_size=64)
    # the -hf layout: the LLM builder gets a plain HF folder written from the flat weights
    res = build(tiny_checkpoint("nvila-lite", "hf"), tmp_path / "a", options=opts, stage="export", progress=False)
    m = res.manifest
    assert m.llm == {"model": "model.onnx", "precision": "int8", "group_size": 64}  # relative to llm/
    assert (tmp_path / "a" / "llm" / "model.onnx").is_file() and "llm/genai_config.json" in m.files
    assert calls["precision"] == "int8" and calls["group_size"] == 64 and calls["quant"] == "awq"
    assert not calls["llm_dir"].exists()  # the temporary HF folder is gone
    assert not any(".llm-src" in f for f in m.files)
    assert read_manifest(tmp_path / "a") == m  # what was written reads back as what the build returned


def test_cli_dry_run_and_one_line_errors(tiny_checkpoint, tmp_path):
    out = tmp_path / "e"
    proc = _cli("build", tiny_checkpoint("nvila"), "-o", out, "--dry-run", "--int8-vision")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    text = stdout + stderr
    assert "vision/tower.fp32.onnx" in text and "vision/tower.int8.onnx" in text and "peak memory" in text
    assert not out.exists()
    proc = _cli("build", tiny_checkpoint("nvila"), "-o", out, "--precision", "int3")
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert stderr.strip().splitlines() == ["error: --precision 'int3' is not one of: fp32, fp16"]


def test_manifest_reads_back_as_written_and_bad_ones_are_one_line(built, tmp_path):
    from vila_edge.engine_dir import Manifest

    m = read_manifest(built)
    assert Manifest.from_json(json.loads(json.dumps(m.to_json())), built / MANIFEST) == m
    assert m.checkpoint == CheckpointRef(**json.loads((built / MANIFEST).read_text())["checkpoint"])
    assert "engines_options" not in m.to_json()  # unset until TensorRT plans exist
    cases = [
        ("{ not json", r"manifest.json: unreadable .*vila-edge build"),
        ("[1, 2]", r"manifest.json: not a manifest object"),
        ("stage=compiled", r"unknown stage 'compiled'"),
        ("del=vision", r"manifest.json: 'vision' is missing"),
        ("config=broken", r"manifest.json: the config does not match this vila-edge"),
    ]
    for k, (change, pattern) in enumerate(cases):
        d = _copy(built, tmp_path / f"m{k}")
        data = json.loads((d / MANIFEST).read_text())
        if change.startswith("stage="):
            data["stage"] = change.split("=")[1]
        elif change.startswith("del="):
            del data[change.split("=")[1]]
        elif change.startswith("config="):
            del data["config"]["vision"]["image_size"]
        (d / MANIFEST).write_text(json.dumps(data) if "=" in change else change)
        with pytest.raises(EngineError, match=pattern) as err:
            read_manifest(d)
        assert len(str(err.value).splitlines()) == 1 and str(d) in str(err.value)


def test_the_runtime_reads_through_the_same_checks(built, tmp_path):
    import vila_edge

    d = _copy(built, tmp_path / "old")
    data = json.loads((d / MANIFEST).read_text())
    data["format"] = 0
    (d / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EngineError, match=r"format 0, this vila-edge reads format 1; run `vila-edge build"):
        vila_edge.load(d)
