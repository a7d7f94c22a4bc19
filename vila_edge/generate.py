"""Token selection and text output for the runtime: sampling, incremental detokenization, stop strings.

Sampling follows Hugging Face `generate` (what VILA's `generate_content` calls), in its order:
repetition penalty (on the tokens generated so far: with `inputs_embeds` upstream has no prompt ids)
-> temperature -> top-k -> top-p -> draw. Temperature 0 (or `do_sample` off) is greedy. Draws use a
seeded `numpy.random.Generator`, so a seed reproduces a run exactly.

Logits at or beyond the checkpoint's trained vocabulary (`config.llm.vocab_size`: rows added for media
tokens were never trained) and the ids in `config.llm.extra_masked_ids` are never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vila_edge.errors import VilaEdgeError


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None
    stop: tuple[str, ...] = ()  # extra stop strings (the checkpoint's stop tokens apply unless ignore_eos)
    ignore_eos: bool = False  # keep generating through stop tokens (benchmarks: exactly max_new_tokens)

    def __post_init__(self):
        # Checked before anything else so that a string or NaN from a caller is one clear line, not a TypeError
        # deep in the sampler (or a silently accepted NaN, which compares False with everything).
        for name in ("max_new_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise VilaEdgeError(f"{name}={value!r}: must be an integer")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise VilaEdgeError(f"{name}={value!r}: must be a finite number")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))):
            raise VilaEdgeError(f"seed={self.seed!r}: must be an integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(x, str) for x in stop):
            raise VilaEdgeError(f"stop={self.stop!r}: must be a string or a list of strings")
        object.__setattr__(self, "stop", tuple(x for x in stop if x))
        if self.max_new_tokens < 1:
            raise VilaEdgeError(f"max_new_tokens={self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise VilaEdgeError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise VilaEdgeError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise VilaEdgeError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise VilaEdgeError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mask_logits(logits: np.ndarray, vocab_size: int, extra_masked_ids: Sequence[int] = ()) -> np.ndarray:
    """float32 copy of `logits[:vocab_size]` with the never-trained ids at -inf."""
    out = np.array(logits[: max(1, vocab_size)], dtype=np.float32, copy=True)
    if len(extra_masked_ids):
        ids = [i for i in extra_masked_ids if i < out.shape[0]]
        out[ids] = -np.inf
    return out


class Sampler:
    def __init__(self, params: SamplingParams, vocab_size: int, extra_masked_ids: Sequence[int] = ()):
        self.params = params
        self.vocab_size = vocab_size
        self.extra = tuple(extra_masked_ids)
        self.rng = np.random.default_rng(params.seed)

    def processed(self, logits: np.ndarray, generated: Sequence[int] = ()) -> np.ndarray:
        """Masked, penalized, temperature-scaled, top-k / top-p filtered logits (-inf = excluded)."""
        p = self.params
        x = mask_logits(logits, self.vocab_size, self.extra)
        if p.repetition_penalty != 1.0 and len(generated):
            ids = np.unique(np.asarray(generated, dtype=np.int64))
            ids = ids[ids < x.shape[0]]
            s = x[ids]
            x[ids] = np.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        if p.greedy:
            return x
        x = x / np.float32(p.temperature)
        if p.top_k and p.top_k < x.shape[0]:
            kth = np.partition(x, -p.top_k)[-p.top_k]
            x = np.where(x < kth, -np.inf, x).astype(np.float32)
        if p.top_p < 1.0:
            order = np.argsort(-x, kind="stable")
            probs = _softmax(x[order])
            cum = np.cumsum(probs)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = (cum - probs) >= p.top_p
            drop[0] = False
            x[order[drop]] = -np.inf
        return x

    def __call__(self, logits: np.ndarray, generated: Sequence[int] = ()) -> int:
        x = self.processed(logits, generated)
        if self.params.greedy:
            return int(np.argmax(x))
        probs = _softmax(x)
        return int(self.rng.choice(probs.shape[0], p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x)
    if not np.isfinite(m):
        raise VilaEdgeError("every token was filtered out (check top_k / top_p / masked ids)")
    e = np.exp(x - m)
    return e / e.sum()


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text deltas without ever emitting half a UTF-8 character.

    Each step decodes a short window (from `prefix_offset`) twice, with and without the new tokens, and
    emits the difference only when it does not end in U+FFFD (an incomplete byte sequence from byte
    fallback / byte-level BPE). Decoding a window rather than single tokens keeps the spacing of
    SentencePiece-style tokenizers right. `flush()` emits whatever is left at the end.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


@dataclass
class StopStrings:
    """Holds back just enough text to never stream the beginning of a stop string."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    hit: str | None = None
    _hold: int = field(init=False, default=0)

    def __post_init__(self):
        self._hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, delta: str, *, final: bool = False) -> str:
        if self.hit is not None:
            return ""
        self.text += delta
        start = max(0, self.emitted - self._hold)
        best = None
        for s in self.stops:
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            self.hit = best[1]
            self.text = self.text[: best[0]]
            out = self.text[self.emitted:]
            self.emitted = len(self.text)
            return out
        safe = len(self.text) if final else len(self.text) - self._hold
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out


def decode_stream(tokenizer, ids: Iterable[int]) -> Iterable[str]:
    """Convenience: the text deltas an id sequence streams as (tests, tools)."""
    det = IncrementalDetokenizer(tokenizer)
    for t in ids:
        d = det.push(t)
        if d:
            yield d
    d = det.flush()
    if d:
        yield d
