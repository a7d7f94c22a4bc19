"""`vila-edge chat` as a user runs it (subprocesses), plus the chat loop in-process."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)

cv2 = pytest.importorskip("cv2")

CLI = [sys.executable, "-c", "from vila_edge.cli import main; main()"]


def run_cli(*args, stdin: str | None = None, timeout: float = 120, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*CLI, "chat", *map(str, args)], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    img = d / "img.png"
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    vid = d / "clip.avi"
    w = cv2.VideoWriter(str(vid), cv2.VideoWriter_fourcc(*"MJPG"), 20, (64, 48))
    for i in range(30):
        w.write(np.full((48, 64, 3), 8 * i, np.uint8))
    w.release()
    return {"image": img, "video": vid}


def test_one_shot_prompt_with_image(runtime_engine, media):  # noqa: F811
    eng = runtime_engine("nvila")
    r = run_cli(eng, "--image", media["image"], "--prompt", "What is in the picture?", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Traceback" not in r.stderr


def test_one_shot_json_has_timings(runtime_engine, media):  # noqa: F811
    eng = runtime_engine("nvila-lite")
    r = run_cli(eng, "--image", media["image"], "--prompt", "Describe.", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["timings"]) >= {"preprocess", "vision", "merge_projector", "prefill", "decode", "ttft"}
    assert out["timings"]["media_items"] > 1  # NVILA-Lite: one item per tile
    assert len(out["token_ids"]) == 4 and out["finish_reason"] == "length"


def test_missing_camera_exits_nonzero_with_one_line(runtime_engine):  # noqa: F811
    r = run_cli(runtime_engine("nvila"), "--camera", "7", "--prompt", "hi")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: camera 7") and "--camera" in lines[0]


@pytest.mark.parametrize("flag", ["--image", "--video"])
def test_unreadable_media_is_one_line(runtime_engine, tmp_path, flag):  # noqa: F811
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"junk")
    r = run_cli(runtime_engine("nvila"), flag, bad, "--prompt", "hi")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.mp4" in lines[0], r.stderr


def test_live_mode_on_a_video_file_camera(runtime_engine, media):  # noqa: F811
    r = run_cli(runtime_engine("nvila"), "--camera", media["video"], "--interval", "0.3", "--prompt", "What now?",
                "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
    frames = [int(line.split("]")[0].split()[-1]) for line in r.stdout.splitlines() if line.startswith("[frame ")]
    assert len(frames) >= 2 and frames == sorted(frames) and frames[-1] > frames[0]
    assert "no more frames" in r.stderr


def test_interactive_commands(runtime_engine, media):  # noqa: F811
    script = f"hello\n/image {media['image']}\nwhat is this?\n/stats\n/reset\n/bogus\n/quit\n"
    r = run_cli(runtime_engine("vila1.5"), "--max-new-tokens", "4", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("vila> ") == 2
    assert "attached" in r.stderr and "prefill" in r.stderr and "conversation cleared" in r.stderr
    assert "unknown command /bogus" in r.stderr
    assert "vision cache 0 hits / 1 misses, 1 images" in r.stderr  # the image was encoded once, and kept
    r = run_cli(runtime_engine("vila1.5"), "--max-new-tokens", "4", "--vision-cache-mb", "0", stdin=script)
    assert r.returncode == 0 and "prefill" in r.stderr and "vision cache" not in r.stderr  # 0: off


def test_checkpoint_argument_builds_engines_first(tiny_checkpoint, media, tmp_path):
    """`vila-edge chat CKPT ...` builds the engine directory through the builder on first use, then reuses it."""
    pytest.importorskip("vila_edge.builder.build", reason="the engine builder is not installed")
    ckpt = tiny_checkpoint("vila1.5")
    out = tmp_path / "engines" / "tiny"
    args = (ckpt, "--engine-dir", out, "--precision", "fp32", "--image", media["image"], "--prompt", "Hi",
            "--max-new-tokens", "3")
    r = run_cli(*args, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "building engines" in r.stderr and (out / "manifest.json").is_file()
    r2 = run_cli(*args)
    assert r2.returncode == 0 and "building" not in r2.stderr
    assert r2.stdout == r.stdout


# ---- in-process --------------------------------------------------------------------------------


def test_chat_loop_keeps_the_cache_between_turns(runtime_engine, media):  # noqa: F811
    import vila_edge
    from vila_edge.chat import ChatOptions, Console, run_interactive
    from vila_edge.generate import SamplingParams

    pipe = vila_edge.load(runtime_engine("nvila"), device="cpu", threads=1)
    lines = iter(["first question", f"/image {media['image']}", "second question", "/quit"])
    out, err = io.StringIO(), io.StringIO()
    code = run_interactive(pipe, ChatOptions(params=SamplingParams(max_new_tokens=3)), Console(out, err),
                           read_line=lambda prompt: next(lines))
    assert code == 0
    assert out.getvalue().count("vila> ") == 2
    assert pipe.llm.length > 0  # the conversation's cache is still there


def test_ensure_engine_reuses_an_existing_engine_dir(runtime_engine, tmp_path):  # noqa: F811
    from vila_edge.builder.build import ensure_engine_dir as ensure_engine
    from vila_edge.errors import EngineError

    eng = runtime_engine("nvila")
    assert ensure_engine(eng) == eng
    with pytest.raises(EngineError, match="neither an engine directory"):
        ensure_engine(tmp_path)
    with pytest.raises(EngineError, match="no such"):
        ensure_engine(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(eng, copy)
    assert Path(ensure_engine(copy)) == copy
