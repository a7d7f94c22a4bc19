"""What the server needs from a model: the small `Engine` protocol, and adapters onto it.

The server never calls the runtime directly; it calls an `Engine`:

- `model_id`: the name clients pass as `model`;
- `max_context`: prompt positions + generated tokens the engine can hold;
- `count_tokens(messages, images)`: prompt positions the request would take (image positions included);
- `generate_stream(messages, images, params)`: an iterator that yields ONE item per generated token (the
  text that token adds; "" while a multi-byte character is incomplete). `params` is the runtime's
  `SamplingParams` (the one home of sampling settings; `max_new_tokens` is the request's budget). The
  server counts tokens by counting items, enforces `max_new_tokens` and the stop strings itself (the
  scheduler owns them: an engine ignores `params.stop`), and closes the iterator to stop early (client
  gone, timeout), so an adapter must stop generating when its iterator is closed.

Optional: `can_prefetch` and `prefetch_images(images)` (encode a coming request's images ahead, beside a running
generation: the camera page's pipelining).

`PipelineEngine` adapts `vila_edge.load(engine_dir)`; `StandInEngine` is a deterministic, model-free
stand-in for tests of the HTTP layer only (it is never used by `vila-edge serve`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from PIL import Image

from vila_edge.generate import SamplingParams


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    text: str
    n_images: int = 0  # images attached to this message; they come first, in the order of `images`


@runtime_checkable
class Engine(Protocol):
    model_id: str
    max_context: int
    max_prompt_chars: int  # characters of message text that certainly exceed max_context

    def count_tokens(self, messages: Sequence[ChatMessage], images: Sequence[Image.Image]) -> int: ...

    def generate_stream(self, messages: Sequence[ChatMessage], images: Sequence[Image.Image],
                        params: SamplingParams) -> Iterator[str]: ...


# ---------------------------------------------------------------------------------------------
# Stand-in (tests of the HTTP layer only)
# ---------------------------------------------------------------------------------------------

_WORDS = ("the", "camera", "shows", "a", "red", "square", "on", "blue", "ground", "and", "small", "white", "text",
          "near", "left", "edge", "of", "frame", "with", "light")


class StandInEngine:
    """STAND-IN, not a model: a deterministic word generator for testing the server's HTTP layer.

    The answer is a pure function of (messages, image sizes and pixels, seed): the same request always gets
    the same answer, so concurrency tests can check that every answer arrived complete. Each token takes
    `token_delay` seconds of wall time (sleep), which releases the GIL like a real engine's kernels do.
    """

    def __init__(self, model_id: str = "stand-in", *, max_context: int = 2048, answer_tokens: int = 24,
                 token_delay: float = 0.002, image_tokens: int = 64, eos: bool = True):
        self.model_id = model_id
        self.max_context = max_context
        self.max_prompt_chars = max_context * 16
        self.answer_tokens = answer_tokens
        self.token_delay = token_delay
        self.image_tokens = image_tokens
        self.eos = eos  # stop by itself after answer_tokens (else run until closed / max_tokens)
        self.calls = 0
        self.running = 0  # generations in flight; the server must keep this <= 1
        self.max_running = 0

    def count_tokens(self, messages, images) -> int:
        return sum(len(m.text.split()) + 4 for m in messages) + self.image_tokens * len(images)

    def _digest(self, messages, images, params) -> bytes:
        h = hashlib.sha256()
        for m in messages:
            h.update(f"{m.role}\0{m.text}\0{m.n_images}\0".encode())
        for im in images:
            h.update(f"{im.size}".encode())
            h.update(im.resize((8, 8)).tobytes())
        h.update(str(params.seed).encode())
        return h.digest()

    def answer(self, messages, images, params, n: int | None = None) -> str:
        """The full answer a request gets when nothing cuts it short."""
        return "".join(self._pieces(messages, images, params, n or self.answer_tokens))

    def _pieces(self, messages, images, params, n):
        d = self._digest(messages, images, params)
        out = []
        for i in range(n):
            w = _WORDS[(d[i % len(d)] + 7 * (i // len(d))) % len(_WORDS)]
            out.append(w if i == 0 else " " + w)
        if out and not out[-1].endswith("."):
            out[-1] += "."
        return out

    def generate_stream(self, messages, images, params):
        self.calls += 1
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            n = self.answer_tokens if self.eos else 10**9
            pieces = self._pieces(messages, images, params, self.answer_tokens)
            for i in range(n):
                if self.token_delay:
                    time.sleep(self.token_delay)
                yield pieces[i] if i < len(pieces) else " more"
        finally:
            self.running -= 1


# ---------------------------------------------------------------------------------------------
# The real runtime
# ---------------------------------------------------------------------------------------------


class Tail(str):
    """Text an engine releases after its last token (held-back characters): yielded, but not a token.
    `finish`: why the answer ended when the scheduler cannot see it by counting ("length": a JSON answer the
    budget made the runtime close early, vila_edge.structured)."""

    finish: str | None = None

    def __new__(cls, text: str = "", finish: str | None = None):
        tail = super().__new__(cls, text)
        tail.finish = finish
        return tail


class PipelineEngine:
    """`Engine` over the runtime's Pipeline (`vila_edge.load(engine_dir)`).

    The conversation goes to `Pipeline.generate_events` as `Turn`s (one TokenEvent per generated token; the
    closing event without a token id becomes a `Tail`). System / developer messages have no slot in the
    VILA chat templates (their system prompts are fixed), so their text is put before the first user
    message's text. `count_tokens` builds the prompt's chunk sequence (`Pipeline.prompt_chunks`) with each
    image's row count from the config's image layout, without running the vision tower (the engine may be
    busy with another request).
    """

    def __init__(self, pipeline, model_id: str):
        self.pipeline = pipeline
        self.model_id = model_id
        self.max_context = int(pipeline_max_context(pipeline))
        # Text longer than this cannot fit the context whatever it says: refused before it is tokenized.
        self.max_prompt_chars = self.max_context * pipeline.tokenizer.max_token_chars

    @classmethod
    def load(cls, engine_dir, model_id: str | None = None, **load_kwargs) -> PipelineEngine:
        from pathlib import Path

        from vila_edge.runtime import load

        engine_dir = Path(engine_dir)
        return cls(load(engine_dir, **load_kwargs), model_id or engine_dir.name)

    def _turns(self, messages: Sequence[ChatMessage], images: Sequence[Image.Image]):
        from vila_edge.runtime import Turn

        system = "\n\n".join(m.text for m in messages if m.role == "system" and m.text)
        turns, k = [], 0
        for m in messages:
            if m.role == "system":
                continue
            imgs = list(images[k:k + m.n_images])
            k += m.n_images
            text = m.text
            if system and m.role == "user":
                text, system = (system + "\n\n" + text) if text else system, ""
            if turns and turns[-1].role == m.role:  # two user (or assistant) messages in a row: one turn
                prev = turns[-1]
                turns[-1] = Turn(m.role, "\n".join(x for x in (prev.text, text) if x), list(prev.images) + imgs)
            else:
                turns.append(Turn(m.role, text, imgs))
        return turns

    def count_tokens(self, messages, images) -> int:
        from vila_edge.media.tiling import image_layout
        from vila_edge.prompt import Message, user_content

        pipe = self.pipeline
        cfg = pipe.config
        msgs, lengths = [], []
        for t in self._turns(messages, images):
            if t.role != "user":
                msgs.append(Message("assistant", t.text))
                continue
            n = len(t.images)
            n_tiles = None
            for im in t.images:
                lay = image_layout(cfg, im.width, im.height, n)
                if n == 1:
                    n_tiles = lay.n_items
                lengths += [lay.feature_tokens] * lay.n_items
            msgs.append(Message("user", user_content(cfg, t.text, n_images=n, n_tiles=n_tiles)))
        return pipe.prompt_chunks(pipe.prompt_ids(msgs), lengths).n_positions

    @property
    def can_prefetch(self) -> bool:
        """Whether `prefetch_images` does anything: the pipeline keeps a vision cache for the encodings to land in,
        and the vision engine is ONNX Runtime's (its sessions take concurrent runs, so encoding beside a running
        generation is safe; a TensorRT execution context is not)."""
        cache = getattr(self.pipeline, "vision_cache", None)
        return bool(cache is not None and cache.enabled and getattr(self.pipeline.vision, "name", "") == "onnxruntime")

    def prefetch_images(self, images: Sequence[Image.Image]) -> bool:
        """Encode the images of a request about to be made (the camera page's next frame) into the vision cache,
        while another generation runs: the request then skips the vision tower. False when it cannot help."""
        if not self.can_prefetch:
            return False
        for im in images:
            self.pipeline.image_items(im, single=len(images) == 1)
        return True

    def generate_stream(self, messages, images, params: SamplingParams):
        # the scheduler cuts stop strings (for every engine): the runtime runs without them
        events = self.pipeline.generate_events(self._turns(messages, images), params=replace(params, stop=()))
        try:
            while True:
                try:
                    ev = next(events)
                except StopIteration as end:  # its value: the GenerationResult
                    if end.value is not None and end.value.finish_reason == "length":
                        yield Tail("", finish="length")
                    return
                yield ev.text if ev.token_id is not None else Tail(ev.text)
        finally:
            events.close()  # stops the runtime at once (it rolls its KV cache back itself)


def pipeline_max_context(pipeline) -> int:
    for attr in ("max_context", "max_seq_len", "max_length"):
        v = getattr(pipeline, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(pipeline, "config", None)
    return int(cfg.llm.max_length) if cfg is not None else 2048


def load_engines(paths, **load_kwargs) -> list[Engine]:
    """`vila-edge serve ENGINES`: one PipelineEngine per engine folder; names must be unique."""
    from vila_edge.errors import EngineError

    engines: list[Engine] = []
    seen: set[str] = set()
    for p in paths:
        eng = PipelineEngine.load(p, **{k: v for k, v in load_kwargs.items() if v is not None})
        if eng.model_id in seen:
            raise EngineError(f"{p}: two engines are named {eng.model_id!r}; rename one folder")
        seen.add(eng.model_id)
        engines.append(eng)
    return engines
