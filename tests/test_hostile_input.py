"""Bad and hostile input to the Python API, the CLI and the prompt encoder (issue: fresh machines and hostile
input, D3 D4 D6 D7 D9 D10 D11 and the nits). Each test failed on the main it was written against."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import zlib

import numpy as np
import pytest
from conftest_runtime import runtime_engine  # noqa: F401  (session fixture shared by the runtime tests)
from PIL import Image

from vila_edge.errors import MediaError, PromptError, VilaEdgeError

pytest.importorskip("torch")

CLI = [sys.executable, "-c", "from vila_edge.cli import main; main()"]


def cli(*args, stdin: bytes | None = None, timeout: float = 180):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([*CLI, *map(os.fsdecode, args)], input=stdin, capture_output=True, timeout=timeout, env=env)


def one_error_line(proc) -> str:
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    return err


_PIPES: dict = {}


def pipe_for(runtime_engine, family="nvila"):  # noqa: F811
    if family not in _PIPES:
        import vila_edge

        _PIPES[family] = vila_edge.load(runtime_engine(family), device="cpu", threads=1)
    return _PIPES[family]


def red_square() -> Image.Image:
    img = np.zeros((96, 128, 3), np.uint8)
    img[20:70, 30:90] = (230, 20, 20)  # RGB red
    return Image.fromarray(img)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny valid PNG header for a huge image (a decompression bomb: the pixels would be megabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    rows = zlib.compress(b"\0" * (width * 3 + 1) * 16)  # a few rows are enough to look like an image
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# ---- D4: channel order of arrays ---------------------------------------------------------------------


def test_arrays_are_rgb_and_bgr_is_explicit(runtime_engine):  # noqa: F811
    from vila_edge.media.image import load_image

    pipe = pipe_for(runtime_engine)
    pil = red_square()
    rgb = np.asarray(pil)
    want = pipe.image_items(pil)
    for got in (pipe.image_items(rgb), pipe.image_items(load_image(rgb[:, :, ::-1].copy(), channels="BGR"))):
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    with pytest.raises(MediaError, match="channels"):
        load_image(rgb, channels="RGBA")


# ---- D10: the Python API validates its arguments ----------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"images": [None]}, "images\\[0\\] is None"),
    ({"prompt": None}, "prompt=None"),
    ({"max_new_tokens": "5"}, "max_new_tokens='5'"),
    ({"temperature": math.inf}, "temperature=inf"),
    ({"repetition_penalty": math.nan}, "repetition_penalty=nan"),
    ({"top_k": 2.5}, "top_k=2.5"),
    ({"stop": 3}, "stop=3"),
    ({"images": [np.zeros((0, 0, 3), np.uint8)]}, "no pixels"),
    ({"images": [Image.new("RGB", (0, 0))]}, "no pixels"),
    ({"images": [object()]}, "not an image"),
    ({"images": 42}, "pass an image or a list"),
])
def test_generate_rejects_bad_arguments_with_one_line(runtime_engine, kwargs, match):  # noqa: F811
    pipe = pipe_for(runtime_engine)
    call = {"prompt": "Describe.", "max_new_tokens": 2, **kwargs}
    with pytest.raises(VilaEdgeError, match=match):
        pipe.generate(call.pop("prompt"), **call)


def test_one_image_need_not_be_in_a_list(runtime_engine, tmp_path):  # noqa: F811
    pipe = pipe_for(runtime_engine)
    path = tmp_path / "red.png"
    red_square().save(path)
    want = pipe.generate("Describe.", images=[str(path)], max_new_tokens=3).token_ids
    assert pipe.generate("Describe.", images=str(path), max_new_tokens=3).token_ids == want  # not per character
    assert pipe.generate("Describe.", images=red_square(), max_new_tokens=3).token_ids == want


# ---- D11: one pixel cap for every entry point --------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    from vila_edge.media.image import MAX_PIXELS, load_image

    with pytest.raises(MediaError, match="image too large"):  # beyond Pillow's own refusal, too
        load_image(png_declaring(20000, 20000))
    bomb = png_declaring(12000, 12000)
    assert len(bomb) < 200_000 and 12000 * 12000 > MAX_PIXELS
    with pytest.raises(MediaError, match="image too large"):
        load_image(bomb)
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    with pytest.raises(MediaError, match="image too large"):
        load_image(path)
    with pytest.raises(MediaError, match="image too large"):
        load_image(np.zeros((4097, 4097), np.uint8))
    assert load_image(np.zeros((4096, 4096), np.uint8)).size == (4096, 4096)  # the cap itself is allowed


def test_chat_cli_refuses_a_bomb_with_one_line(runtime_engine, tmp_path):  # noqa: F811
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(12000, 12000))
    err = one_error_line(cli("chat", runtime_engine("nvila"), "--image", path, "--prompt", "hi"))
    assert "image too large" in err and str(path) in err


# ---- D9: user text cannot forge control tokens ----------------------------------------------------


@pytest.mark.parametrize("family", ["vila1.5", "nvila"])
def test_user_text_special_tokens_are_literal(tiny_checkpoint, family):
    from vila_edge.checkpoint import load_checkpoint
    from vila_edge.prompt import Message, render, tokenize, user_content

    ckpt = load_checkpoint(tiny_checkpoint(family))
    cfg, tok = ckpt.config, ckpt.tokenizer
    honest = [Message("user", user_content(cfg, "What is in the picture?", n_images=1))]
    text = render(cfg.llm.chat_format, honest, tok)
    assert tokenize(cfg, tok, text, messages=honest) == tokenize(cfg, tok, text)  # honest prompts: unchanged ids
    specials = sorted(tok.special_ids)
    forged_text = "hi " + "".join(tok.id_to_token(i) for i in specials) + " bye"
    forged = [Message("user", user_content(cfg, forged_text, n_images=1))]
    text = render(cfg.llm.chat_format, forged, tok)
    plain, guarded = tokenize(cfg, tok, text), tokenize(cfg, tok, text, messages=forged)
    count = lambda ids: sum(t in tok.special_ids for t in ids)  # noqa: E731
    assert count(plain) > count(guarded) == count(tokenize(cfg, tok, render(cfg.llm.chat_format, honest, tok)))
    assert "hi " in tok.decode([t for t in guarded if t >= 0], skip_special_tokens=False)


def test_nested_media_markers_are_removed():
    from vila_edge.prompt import strip_media_markers

    assert strip_media_markers("a <ima<image>ge> b <vila/<vila/video>video>") == "a  b "


# ---- D3: text that is not UTF-8 ------------------------------------------------------------------


def test_lone_surrogates_are_a_prompt_error():
    from vila_edge.prompt import check_text

    with pytest.raises(PromptError, match="not valid UTF-8"):
        check_text("hi \ud800")
    assert check_text("héllo ✓") == "héllo ✓"


def test_chat_cli_reports_invalid_utf8_prompt_and_keeps_interactive_chat_alive(runtime_engine):  # noqa: F811
    engine = runtime_engine("nvila")
    err = one_error_line(cli(b"chat", os.fsencode(engine), b"--prompt", b"hi \xff\xfe there"))
    assert "UTF-8" in err
    proc = cli("chat", engine, "--max-new-tokens", "2", stdin=b"bad \xff line\nhello\n/quit\n")
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "not valid UTF-8" in out and out.count("vila>") == 1  # the bad line is refused, the next answered


# ---- D6 / D7: build outputs that would destroy the checkpoint -----------------------------------------


def test_build_refuses_outputs_overlapping_the_checkpoint(checkpoint_copy, tmp_path):
    ckpt = checkpoint_copy("nvila-lite")
    before = sorted(p.relative_to(ckpt) for p in ckpt.rglob("*"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, extra, words in [(ckpt, ["--force"], "is the checkpoint"),
                              (ckpt / "engines", ["--force"], "is inside the checkpoint"),
                              (ckpt.parent, ["--force"], "contains the checkpoint"),
                              (a_file, [], "not a directory")]:
        err = one_error_line(cli("build", ckpt, "-o", out, "--skip-llm", *extra))
        assert words in err and "\n" not in err, err
    assert sorted(p.relative_to(ckpt) for p in ckpt.rglob("*")) == before and a_file.read_text() == "x"


# ---- nits -------------------------------------------------------------------------------------------


def test_zero_threads_and_context_are_refused(runtime_engine):  # noqa: F811
    engine = runtime_engine("nvila")
    for flag in ("--threads", "--max-context"):
        proc = cli("chat", engine, flag, "0", "--prompt", "hi")
        assert proc.returncode == 2 and flag in proc.stderr.decode(), proc.stderr.decode()


def test_awq_progress_goes_to_stderr():
    from vila_edge.builder.awq import _progress_bar

    assert _progress_bar(True).console.stderr


def test_interrupted_build_says_so(tiny_checkpoint, tmp_path):
    import time

    from vila_edge.builder.engine_dir import temp_prefix

    out = tmp_path / "out"
    env = dict(os.environ, VILA_EDGE_TEST_STAGE_DELAY="30")
    # SIGINT at its default disposition: a background CI job inherits it ignored (see test_engine_dir).
    proc = subprocess.Popen([*CLI, "build", str(tiny_checkpoint("nvila-lite")), "-o", str(out), "--skip-llm",
                             "--stage", "export"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not any(out.parent.glob(temp_prefix(out) + "*")) and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and b"interrupted" in err, err
    assert not out.exists()

