"""`vila-edge chat`: interactive, one-shot (`--prompt`) and live-camera (`--interval`) use of a Pipeline.

Interactive commands: `/image PATH` (attach to the next question), `/reset`, `/stats`, `/quit`.
Answers stream to stdout; notices (context trimming, camera reconnects) go to stderr as `note: ...`.
Live mode (`vila_edge.captioner`): frames that did not change since the last answered one are skipped
(`--dedup-threshold`), the next frame is encoded while an answer streams (`--no-pipeline` turns it off); at the
end a summary (frames seen / encoded / skipped, captions/s) goes to stderr, or with `--json` a last stdout line
`{"summary": {...}}`.
Ctrl-C stops the current answer (interactive) or the whole session (one-shot, live) cleanly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vila_edge.errors import MediaError, PromptError, VilaEdgeError
from vila_edge.generate import SamplingParams
from vila_edge.prompt import check_text

HELP = "commands: /image PATH (attach to your next message), /reset, /stats, /quit"


@dataclass
class ChatOptions:
    images: list[str] = field(default_factory=list)
    video: str | None = None
    camera: str | None = None
    prompt: str | None = None
    as_json: bool = False
    interval: float | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    max_cycles: int | None = None  # live mode: stop after this many answers (tests, scripts)
    dedup_threshold: float = 2.0  # live mode: skip frames within this many grey levels of the last encoded one
    pipelined: bool = True  # live mode: encode the next frame while the answer streams


# ---------------------------------------------------------------------------------------------
# Output helpers
# ---------------------------------------------------------------------------------------------


class Console:
    def __init__(self, out: TextIO | None = None, err: TextIO | None = None):
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, msg: str) -> None:
        self.err.write(f"note: {msg}\n")
        self.err.flush()


def format_stats(result, pipe) -> str:
    if result is None:
        return "no answer yet"
    t = result.timings
    return (f"preprocess {t.preprocess * 1e3:.1f} ms | vision {t.vision * 1e3:.1f} ms ({t.tiles} tiles) | "
            f"merge+projector {t.merge_projector * 1e3:.1f} ms | prefill {t.prefill * 1e3:.1f} ms "
            f"({t.prefill_positions} positions, {t.prefill_tokens_per_s:.0f}/s) | time to first token "
            f"{t.ttft * 1e3:.1f} ms | decode {t.generated_tokens} tokens {t.decode_tokens_per_s:.1f} tok/s | "
            f"context {pipe.llm.length}/{pipe.max_context}{_cache_stats(pipe)}")


def _cache_stats(pipe) -> str:
    v = pipe.vision_cache.stats() if hasattr(pipe, "vision_cache") else None
    if not v or not v["max_bytes"]:
        return ""
    return (f" | vision cache {v['hits']} hits / {v['misses']} misses, {v['entries']} images, "
            f"{v['bytes'] / 2**20:.1f}/{v['max_bytes'] / 2**20:.0f} MiB")


def _stream_answer(stream, con: Console, *, echo: bool = True, interrupt_ends_all: bool = False):
    """Print a TextStream; Ctrl-C stops it (the partial answer is kept). Returns the result.
    `interrupt_ends_all` (live captions): Ctrl-C also ends the caller's loop (re-raised once the answer is
    closed), wherever in the cycle it lands; in a conversation it only stops the answer."""
    try:
        for piece in stream:
            if echo:
                con.write(piece)
    except KeyboardInterrupt:
        stream.close()
        if echo:
            con.write(" [stopped]\n" if interrupt_ends_all else " [stopped]")
        if interrupt_ends_all:
            raise
    if echo:
        con.write("\n")
    return stream.result


def _answer(stream, con: Console, opts: ChatOptions, *, echo: bool = True, interrupt_ends_all: bool = False):
    """`_stream_answer`, plus a note when a JSON-schema answer was cut before its JSON was complete."""
    result = _stream_answer(stream, con, echo=echo, interrupt_ends_all=interrupt_ends_all)
    if opts.params.json_schema is not None:
        from vila_edge.structured import cut_note

        note = cut_note(result)
        if note:
            con.note(note)
    return result


# ---------------------------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------------------------


def _open_camera(src: str, con: Console):
    from vila_edge.media.camera import FrameGrabber

    grabber = FrameGrabber(src, on_notice=con.note)
    grabber.start()  # MediaError: one line naming the source and how to choose cameras
    return grabber


def _frame_image(frame):
    from vila_edge.media.image import bgr_to_pil

    return bgr_to_pil(frame.image, f"frame {frame.seq}")


def run_once(pipe, opts: ChatOptions, con: Console) -> int:
    images: list = list(opts.images)
    grabber = None
    try:
        if opts.camera:
            grabber = _open_camera(opts.camera, con)
            images.append(_frame_image(grabber.first_frame()))
        conv = pipe.chat(on_notice=con.note)
        stream = conv.ask(opts.prompt, images=images, video=opts.video, stream=True, params=opts.params)
        if opts.as_json:
            result = _answer(stream, con, opts, echo=False)
            con.write(json.dumps(result.as_dict(), indent=2) + "\n")
        else:
            result = _answer(stream, con, opts)
        return 0 if result is not None and result.finish_reason != "interrupted" else 130
    finally:
        if grabber is not None:
            grabber.close()


def run_live(pipe, opts: ChatOptions, con: Console) -> int:
    """Ask the prompt about each new camera frame (at most one every `interval` seconds, frames that did not
    change skipped, the next frame encoded while this answer streams); stream the answers; a summary at the end."""
    from vila_edge.captioner import Captioner
    from vila_edge.media.camera import newest_frames
    from vila_edge.media.frame_dedup import FrameDedup

    if not opts.camera:
        raise MediaError("--interval needs --camera SRC (a video file path works as a stand-in camera)")
    prompt = opts.prompt or "Describe what you see."
    dedup = FrameDedup(opts.dedup_threshold)  # MediaError on a bad threshold, before the camera opens
    grabber = _open_camera(opts.camera, con)
    cap = Captioner(pipe, prompt, params=opts.params, dedup=dedup, pipelined=opts.pipelined, interval=opts.interval,
                    on_notice=con.note)
    try:
        grabber.first_frame()  # MediaError: opened but no frame
        n = 0
        for c in cap.captions(newest_frames(grabber, on_notice=con.note)):
            if opts.as_json:
                d = _answer(c.stream, con, opts, echo=False, interrupt_ends_all=True).as_dict()
                d["frame"] = c.frame.seq
                con.write(json.dumps(d) + "\n")
            else:
                con.write(f"[frame {c.frame.seq}] ")
                _answer(c.stream, con, opts, interrupt_ends_all=True)
            n += 1
            if opts.max_cycles and n >= opts.max_cycles:
                break
        else:
            con.note(f"{grabber.label}: no more frames; stopping")
        return 0
    except KeyboardInterrupt:
        con.note("stopped")
        return 0
    finally:
        cap.close()
        grabber.close()
        stats = cap.stats()
        if opts.as_json:
            con.write(json.dumps({"summary": stats.as_dict()}) + "\n")
        else:
            con.note(stats.summary())


def run_interactive(pipe, opts: ChatOptions, con: Console, read_line: Callable[[str], str] = input) -> int:
    conv = pipe.chat(on_notice=con.note)
    pending_images: list = list(opts.images)
    pending_video = opts.video
    grabber = _open_camera(opts.camera, con) if opts.camera else None
    con.note(f"{pipe.config.family} | {pipe.describe()['llm'].get('backend', '?')} | context {pipe.max_context}. {HELP}")
    try:
        while True:
            try:
                line = read_line("you> ")
            except EOFError:
                return 0
            except KeyboardInterrupt:
                con.write("\n")
                return 0
            line = line.strip()
            if not line:
                continue
            try:
                check_text(line, "your message")
            except PromptError as exc:
                con.note(f"{exc}; type it again")
                continue
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/quit", "/exit", "/q"):
                    return 0
                if cmd == "/reset":
                    conv.reset()
                    pending_images, pending_video = [], None
                    con.note("conversation cleared")
                elif cmd == "/stats":
                    con.note(format_stats(conv.last, pipe))
                elif cmd == "/image":
                    path = arg.strip().strip("'\"")
                    if not path:
                        con.note("usage: /image PATH")
                        continue
                    from vila_edge.media.image import load_image

                    try:
                        load_image(path)
                    except MediaError as exc:
                        con.note(str(exc))
                        continue
                    pending_images.append(path)
                    con.note(f"attached {path} to your next message")
                else:
                    con.note(f"unknown command {cmd}; {HELP}")
                continue
            images = pending_images
            if grabber is not None:
                frame = grabber.latest()
                if frame is None:
                    frame = grabber.first_frame()
                images = images + [_frame_image(frame)]
            con.write("vila> ")
            try:
                stream = conv.ask(line, images=images, video=pending_video, stream=True, params=opts.params)
            except MediaError as exc:
                con.write("\n")
                con.note(str(exc))
                continue
            pending_images, pending_video = [], None
            _answer(stream, con, opts)
    finally:
        if grabber is not None:
            grabber.close()


def run_chat(pipe, opts: ChatOptions, con: Console | None = None) -> int:
    con = con or Console()
    if opts.interval is not None:
        if opts.interval < 0:
            raise VilaEdgeError(f"--interval {opts.interval}: must be >= 0 seconds (0: one answer after another)")
        return run_live(pipe, opts, con)
    if opts.prompt is not None:
        try:
            return run_once(pipe, opts, con)
        except KeyboardInterrupt:
            con.note("stopped")
            return 130
    if opts.as_json:
        raise VilaEdgeError("--json needs --prompt (or --interval)")
    if hasattr(sys.stdin, "reconfigure"):
        # Undecodable bytes typed or piped in become lone surrogates that check_text reports for that line,
        # instead of a UnicodeDecodeError that ends the chat (and leaves the stream's decoder in a bad state).
        sys.stdin.reconfigure(errors="surrogateescape")
    return run_interactive(pipe, opts, con)


def check_inputs(images: Sequence[str], video: str | None) -> None:
    """Fail fast, before loading engines, on media that cannot be read (one line each)."""
    from vila_edge.media.image import load_image

    for p in images:
        load_image(p)
    if video is not None and not Path(video).exists():
        raise MediaError(f"{video}: video file not found")


def live_vision_threads(threads: int | None) -> int:
    """CPU threads of the vision engine when it runs beside the LLM (pipelined live mode): half of the LLM's.
    Measured on 2 cores (benchmarks/results/live_captioner_threads.md): two 2-thread pools overlapping were ~3x
    slower than vision 1 + LLM 2 (both spinning thread pools fight for the cores)."""
    from vila_edge.backends.ort_llm import default_threads

    return max(1, (threads or default_threads()) // 2)


CHAT_BACKENDS = ("auto", "onnxruntime", "torch")  # --backend: vision and LLM engines alike


def run_chat_cli(engines: Path, *, images: Sequence[Path] = (), video: Path | None = None, camera: str | None = None,
                 prompt: str | None = None, as_json: bool = False, interval: float | None = None,
                 params: SamplingParams | None = None, device: str = "auto", threads: int | None = None,
                 max_context: int | None = None, vision_cache_mb: float | None = None,
                 ensure_engine: Callable[[Path, Callable[[str], None]], Path] | None = None,
                 backend: str = "auto", dedup_threshold: float = 2.0, pipelined: bool = True,
                 vision_precision: str | None = None) -> int:
    """The `vila-edge chat` command (the CLI only parses options). `ensure_engine(path, say)` turns a
    checkpoint into its engine directory (the CLI passes the builder's, which builds on first use: this
    module stays below the builder); without it `engines` must be an engine directory."""
    if backend not in CHAT_BACKENDS:
        raise VilaEdgeError(f"--backend {backend!r} is not one of: {', '.join(CHAT_BACKENDS)}")
    con = Console()
    imgs = [str(p) for p in images or ()]
    if prompt is not None:
        check_text(prompt, "--prompt")  # before loading anything
    check_inputs(imgs, str(video) if video else None)  # before a first-use build: a typo costs no build
    if interval is not None:
        from vila_edge.media.frame_dedup import FrameDedup

        FrameDedup(dedup_threshold)  # a bad --dedup-threshold is one line, before anything loads
    say = con.note if not as_json else (lambda m: print(m, file=sys.stderr))
    path = ensure_engine(Path(engines), say) if ensure_engine else Path(engines)
    from vila_edge.runtime import load

    pipe = load(path, device=device, threads=threads, max_context=max_context, vision_backend=backend,
                llm_backend=backend, vision_cache_mb=vision_cache_mb,
                vision_threads=live_vision_threads(threads) if interval is not None and pipelined else None,
                vision_precision=vision_precision)
    opts = ChatOptions(images=imgs, video=str(video) if video else None, camera=camera, prompt=prompt,
                       as_json=as_json, interval=interval, params=params or SamplingParams(),
                       dedup_threshold=dedup_threshold, pipelined=pipelined)
    try:
        return run_chat(pipe, opts, con)
    finally:
        pipe.close()
