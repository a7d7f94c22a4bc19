"""Generation: token selection, text output, and the loop, one step per function (gpt-fast's shape).

`SamplingParams` is the one home of sampling settings (the Python API's keywords, `vila-edge chat`, the
server's requests all become one); `StopStrings` is the one stop-string matcher (the runtime's answers,
the server's scheduler).

Sampling follows Hugging Face `generate` (what VILA's `generate_content` calls), in its order:
repetition penalty (on the tokens generated so far: with `inputs_embeds` upstream has no prompt ids)
-> temperature -> top-k -> top-p -> draw. Temperature 0 (or `do_sample` off) is greedy. Draws use a
seeded `numpy.random.Generator`, so a seed reproduces a run exactly.

Logits at or beyond the checkpoint's trained vocabulary (`config.llm.vocab_size`: rows added for media
tokens were never trained) and the ids in `config.llm.extra_masked_ids` are never chosen.

The loop, on any LLM engine:

    logits = prefill(llm, chunks)                    # the prompt (a splice.PromptChunks) into the KV cache
    for token, finish in generate_tokens(logits, lambda t: decode_one_token(llm, t), sampler,
                                         max_new_tokens=64, stop_ids={eos}):
        ...                                          # pick a token, yield it, feed it back

`Answer` puts text on top of the tokens (incremental detokenizer, stop strings) for the runtime's
`Conversation`. `timed_greedy_run` and `timed_runs` are the measuring loop of the benchmarks: our
engine (`vila_edge.bench`) and the peers (llama.cpp, transformers: `benchmarks/peers/`) all run the
same prefill -> forced greedy decode -> warm-up / runs, each with its own step functions.

`KVCache` makes explicit which conversation's tokens an LLM engine's cache holds: a conversation that
finds the cache still its own continues on it, any other starts over.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from vila_edge.errors import EngineError, VilaEdgeError


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
    # JSON schema the answer must follow (vila_edge.structured: a dict or its JSON text, stored as checked
    # canonical text); None: free text
    json_schema: str | None = None
    # speculative decoding by prompt lookup: draft up to this many tokens per step from earlier text of the
    # conversation (PromptLookup) and verify them in one decoder run; 0: off. Greedy only: the answer is the
    # greedy answer of the verification runs' logits (an fp32 decoder: the plain answer, token for token; an
    # int4 CPU decoder computes a several-position run with ONNX Runtime's multi-row int8 kernel and a step
    # with its one-row kernel, logits up to ~2% apart, so answers can part at a near-tie; which positions
    # share a run depends on DraftBudget's timings, so such answers can also differ between runs). Ignored
    # with sampling, a JSON schema, or an engine without multi-position logits.
    prompt_lookup: int = 0

    def __post_init__(self):
        # Checked before anything else so that a string or NaN from a caller is one clear line, not a TypeError
        # deep in the sampler (or a silently accepted NaN, which compares False with everything).
        for name in ("max_new_tokens", "top_k", "prompt_lookup"):
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
        if not 0 <= self.prompt_lookup <= MAX_DRAFT_TOKENS:
            raise VilaEdgeError(f"prompt_lookup={self.prompt_lookup}: must be 0 (off) to {MAX_DRAFT_TOKENS} draft tokens")
        if not 0 < self.top_p <= 1:
            raise VilaEdgeError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise VilaEdgeError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1 = off)")
        if self.json_schema is not None:
            from vila_edge.structured import schema_text

            if self.ignore_eos:
                raise VilaEdgeError("json_schema and ignore_eos: a JSON answer ends at its stop token; drop one")
            if self.stop:
                raise VilaEdgeError("json_schema and stop strings: a stop string could cut the JSON; drop the stop "
                                    "strings (a JSON answer ends with its closing brace)")
            object.__setattr__(self, "json_schema", schema_text(self.json_schema))

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
    """`constraint` (a `structured.JsonConstraint`): its grammar masks the logits first, and learns each pick."""

    def __init__(self, params: SamplingParams, vocab_size: int, extra_masked_ids: Sequence[int] = (),
                 constraint=None):
        self.params = params
        self.vocab_size = vocab_size
        self.extra = tuple(extra_masked_ids)
        self.rng = np.random.default_rng(params.seed)
        self.constraint = constraint

    def processed(self, logits: np.ndarray, generated: Sequence[int] = ()) -> np.ndarray:
        """Masked, penalized, temperature-scaled, top-k / top-p filtered logits (-inf = excluded)."""
        p = self.params
        x = mask_logits(logits, self.vocab_size, self.extra)
        if self.constraint is not None:
            self.constraint.mask(x)
            self.constraint.update_budget(p.max_new_tokens - len(generated))  # near the end: close the JSON
            self.constraint.mask_closing(x)
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
            token = int(np.argmax(x))
        else:
            probs = _softmax(x)
            token = int(self.rng.choice(probs.shape[0], p=probs))
        if self.constraint is not None:
            self.constraint.accept(token)
        return token


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
    """Cut text at the first of `stops`, holding back only a tail that could still become one (so the
    beginning of a stop string is never streamed). The one stop-string matcher: the runtime's answers and
    the server's scheduler both feed their text through it."""

    stops: tuple[str, ...]
    text: str = ""
    emitted: int = 0
    hit: str | None = None
    _longest: int = field(init=False, default=0)

    def __post_init__(self):
        self.stops = tuple(s for s in self.stops if s)
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, delta: str, *, final: bool = False) -> str:
        """Add `delta`; return the text that is now safe to show (`final`: the rest, no stop string came)."""
        if self.hit is not None:
            return ""
        self.text += delta
        start = max(0, self.emitted - self._longest)
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
        safe = len(self.text) if final else len(self.text) - self._held_back()
        if safe <= self.emitted:
            return ""
        out = self.text[self.emitted:safe]
        self.emitted = safe
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------

Pick = Callable[[np.ndarray, Sequence[int]], int]  # (logits, generated so far) -> next token


@dataclass(frozen=True)
class TokenEvent:
    """One generated token and the text it adds ("" while a character or a possible stop string is
    incomplete). A final event with token_id None carries text released at the end."""

    token_id: int | None
    text: str


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------


def prefill(llm, chunks) -> np.ndarray:
    """Append the prompt's positions to the cache; logits of the last one."""
    return llm.forward_ids(chunks.position_ids(), chunks.embeds(llm.embed))


def decode_one_token(llm, token: int) -> np.ndarray:
    """Append one generated token; logits of the next."""
    return llm.forward_ids([token], llm.embed([token]))


def generate_tokens(logits, decode_one_token: Callable[[int], object], pick: Pick, *, max_new_tokens: int,
                    stop_ids: Sequence[int] | set[int] = (), has_room: Callable[[], bool] | None = None,
                    complete: Callable[[], bool] | None = None) -> Iterator[tuple[int, str | None]]:
    """Pick a token from `logits`, yield (token, finish), feed it back with `decode_one_token`, repeat.

    `finish` is None while the loop goes on, else why this token is the last: "stop" (a stop token, which
    is never fed back), "complete" (`complete()` says the structured answer is finished: this token, with
    its text, ends it; no step is spent on a stop token), "length" (max_new_tokens), "context" (`has_room()`
    says the cache is full). The caller may also stop early by not asking for the next token.
    """
    generated: list[int] = []
    while True:
        token = pick(logits, generated)
        generated.append(token)
        if token in stop_ids:
            finish = "stop"
        elif complete is not None and complete():
            finish = "complete"
        elif len(generated) >= max_new_tokens:
            finish = "length"
        elif has_room is not None and not has_room():
            finish = "context"
        else:
            finish = None
        yield token, finish
        if finish is not None:
            return
        logits = decode_one_token(token)


# ---------------------------------------------------------------------------------------------
# Speculative decoding: prompt lookup
# ---------------------------------------------------------------------------------------------

MAX_DRAFT_TOKENS = 16


class PromptLookup:
    """Draft tokens by prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`, llama.cpp's
    lookup decoding): find the latest earlier occurrence of the context's last n tokens (n from `max_ngram`
    down to `min_ngram`) and propose the (up to) `num_draft` tokens that followed it.

    Answers that quote their prompt (reading text in an image back, JSON keys, a caption close to the last
    one, code) are drafted well; other text finds no match and costs nothing: with no draft the step is a
    plain decode step. `min_ngram` 2 by default: a single-token match is right too rarely on 2-core CPUs,
    where verifying a draft costs more than a step (benchmarks/speculative_decode.py).
    """

    def __init__(self, num_draft: int = 4, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.num_draft, self.max_ngram, self.min_ngram = num_draft, max_ngram, min_ngram

    def __call__(self, history: Sequence[int], limit: int | None = None) -> list[int]:
        limit = self.num_draft if limit is None else min(limit, self.num_draft)
        if limit <= 0:
            return []
        h = np.asarray(history, dtype=np.int64)
        for n in range(min(self.max_ngram, len(h) - 1), self.min_ngram - 1, -1):
            tail = h[-n:]
            # start positions i < len - n whose n tokens equal the tail (the tail itself excluded)
            windows = np.lib.stride_tricks.sliding_window_view(h[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return [int(t) for t in h[start:start + limit]]
        return []


@dataclass
class DraftBudget:
    """How much of a draft to verify, from what drafts have been worth so far (adaptive prompt lookup).

    A decoder run of n positions costs c(n) one-token steps, and a draft of k tokens, each right with
    probability a once the ones before it were, yields 1 + a + ... + a^k tokens from one run of k + 1
    positions. `choose` verifies the k with the most tokens per cost, or none (a plain step: 1 token for 1)
    when no k beats a step by `margin`. On 2 CPU cores c grows ~0.3 steps per extra position (the int8
    kernel is compute-bound past one row: benchmarks/speculative_decode.py), so a 4-token draft must be
    right ~60% of the time to pay, and first answers (13-27% right) lost 1-9% verifying every draft.

    c(n) is timed as it runs (EMAs of run seconds by width over the one-token steps'; widths not run yet
    take the measured extra cost per position, `prior_cost` before any); `a` counts the drafts resolved in
    this answer (right / tested: a wrong draft ends its run's test), seeded with `prior_acceptance` worth
    `prior_weight` tokens. The evidence ages by `memory` at each decision, so drafting is tried again a
    while after it stopped paying, and a stretch that copies is picked up after one that did not.
    `measure=False` keeps the costs fixed (`run_cost`: width -> steps; benchmarks replaying another size).
    """

    prior_acceptance: float = 0.6
    prior_weight: float = 3.0
    prior_cost: float = 0.3
    memory: float = 0.95
    margin: float = 1.02
    measure: bool = True
    run_cost: dict[int, float] = field(default_factory=dict)  # width -> steps, fixed (measure=False)
    run_seconds: dict[int, float] = field(default_factory=dict)  # width -> EMA seconds (measure=True)
    right: float = 0.0
    tested: float = 0.0

    def new_answer(self) -> None:
        self.right = self.tested = 0.0

    @property
    def acceptance(self) -> float:
        return (self.right + self.prior_acceptance * self.prior_weight) / (self.tested + self.prior_weight)

    def cost(self, width: int) -> float:
        """Steps one run of `width` positions costs."""
        if width == 1:
            return 1.0
        if not self.measure:
            if width in self.run_cost:
                return self.run_cost[width]
            known = {w: c for w, c in self.run_cost.items() if w > 1}
        else:
            step = self.run_seconds.get(1)
            if step and width in self.run_seconds:
                return max(1.0, self.run_seconds[width] / step)
            known = {w: t / step for w, t in self.run_seconds.items() if w > 1} if step else {}
        per_position = (sum((c - 1) / (w - 1) for w, c in known.items()) / len(known)) if known else self.prior_cost
        return 1.0 + max(0.0, per_position) * (width - 1)

    def choose(self, available: int) -> int:
        """How many of `available` drafted tokens to verify (0: a plain step)."""
        a = self.acceptance
        self.right *= self.memory
        self.tested *= self.memory
        best, best_value = 0, self.margin
        gained = 1.0
        for k in range(1, available + 1):
            gained += a ** k
            value = gained / self.cost(k + 1)
            if value > best_value:
                best, best_value = k, value
        return best

    def observe_run(self, width: int, seconds: float) -> None:
        if self.measure:
            old = self.run_seconds.get(width)
            self.run_seconds[width] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def resolve(self, drafted: int, accepted: int) -> None:
        """A verified draft's outcome: `accepted` of its `drafted` tokens were right."""
        self.right += accepted
        self.tested += accepted + (accepted < drafted)


@dataclass
class DraftStats:
    """What speculation did in one answer: verification runs, tokens drafted and accepted."""

    steps: int = 0  # decoder runs after the first token (plain steps and verifications)
    verifications: int = 0  # of which verified a draft
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens generated
    # per decoder run after the first token: [tokens drafted, of which accepted] ([0, 0]: a plain step);
    # benchmarks replay it at other model sizes (benchmarks/speculative_decode.py)
    trace: list[list[int]] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"steps": self.steps, "verifications": self.verifications, "drafted": self.drafted,
                "accepted": self.accepted, "acceptance": round(self.acceptance, 4), "tokens": self.tokens,
                "tokens_per_step": round(self.tokens / max(1, self.steps + 1), 4)}


def speculative_tokens(logits, llm, pick: Pick, draft: Callable[..., list[int]], history: Sequence[int], *,
                       max_new_tokens: int, stop_ids: Sequence[int] | set[int] = (), max_context: int | None = None,
                       stats: DraftStats | None = None, budget: DraftBudget | None = None
                       ) -> Iterator[tuple[int, str | None]]:
    """`generate_tokens` with drafted tokens verified in one run (`llm.forward_all`), for a deterministic
    `pick` (greedy; penalties allowed: each pick sees exactly the tokens before it).

    After a token, `draft(history + generated, limit)` proposes up to `limit` tokens; the token and the
    drafts are run together, and picking goes on from the returned rows while each pick equals the next
    draft: the same tokens and finishes `generate_tokens` yields, with fewer runs when drafts are right.
    The cache is rolled back past a wrong draft. While drafts are being confirmed the cache runs ahead (it
    holds the drafts already run); at the end, also when the consumer stops early (`finally`), it holds
    what `generate_tokens` leaves: the prompt and every generated token but the last. "context"
    (`max_context`: positions the cache may hold) is judged on that plain length, so it ends where
    `generate_tokens` with the matching `has_room` would. `budget`: verify only the part of each draft that
    pays (DraftBudget, timed on this engine); None verifies every draft whole.
    """
    stats = stats if stats is not None else DraftStats()
    if budget is not None:
        budget.new_answer()
    outcome: list[int] | None = None  # this answer's last verification [drafted, accepted], once resolved
    start = llm.length
    history = list(history)
    generated: list[int] = []
    rows: list[np.ndarray] = [logits]  # rows[0] predicts the next token
    drafts: list[int] = []  # drafts[i]: the token in the cache after rows[i]'s position
    try:
        while True:
            token = pick(rows.pop(0), generated)
            generated.append(token)
            stats.tokens += 1
            if drafts and drafts[0] == token:  # a right draft: already in the cache, its row computed
                drafts.pop(0)
                stats.accepted += 1
                stats.trace[-1][1] += 1
            else:
                drafts, rows = [], []
                if llm.length > start + len(generated) - 1:
                    llm.truncate(start + len(generated) - 1)  # drop the wrong drafts' positions
            if token in stop_ids:
                finish = "stop"
            elif len(generated) >= max_new_tokens:
                finish = "length"
            elif max_context is not None and start + len(generated) > max_context:
                finish = "context"  # no room to feed this token (generate_tokens' has_room)
            else:
                finish = None
            if finish is not None and llm.length > start + len(generated) - 1:
                llm.truncate(start + len(generated) - 1)  # the last token is not fed (generate_tokens' cache)
            yield token, finish
            if finish is not None:
                return
            if rows:
                continue
            # room: this token plus the drafts must fit the cache; drafts beyond the budget are wasted work
            room = min(llm.max_context, max_context or llm.max_context) - llm.length
            limit = min(max_new_tokens - len(generated) - 1, room - 1)
            drafts = draft(history + generated, limit) if limit > 0 else []
            if budget is not None:
                if outcome is not None:  # the previous verification's picks are all made
                    budget.resolve(*outcome)
                    outcome = None
                if drafts:
                    drafts = drafts[:budget.choose(len(drafts))]
            stats.steps += 1
            stats.trace.append([len(drafts), 0])
            t0 = time.perf_counter()
            if drafts:
                stats.verifications += 1
                stats.drafted += len(drafts)
                outcome = stats.trace[-1]
                batch = [token, *drafts]
                rows = list(llm.forward_all(batch, llm.embed(batch)))
            else:
                rows = [decode_one_token(llm, token)]
            if budget is not None:
                budget.observe_run(len(drafts) + 1, time.perf_counter() - t0)
    finally:
        if llm.length > start + max(0, len(generated) - 1):
            llm.truncate(start + max(0, len(generated) - 1))


def can_speculate(llm, params: SamplingParams) -> bool:
    """Does prompt lookup apply: asked for, greedy, free text, an engine returning every position's logits?"""
    return (params.prompt_lookup > 0 and params.greedy and params.json_schema is None
            and bool(getattr(llm, "can_forward_all", False)))


# ---------------------------------------------------------------------------------------------
# Text on top
# ---------------------------------------------------------------------------------------------


class Answer:
    """One answer while it is generated: its tokens, text, why it ended and its decode time. Readable at
    any point, also after its event stream was closed half-way ("interrupted")."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopStrings(tuple(stop))
        self.token_ids: list[int] = []
        self.finish = "interrupted"
        self.decode_s = 0.0  # picking, detokenizing and decode steps (not the caller's time between tokens)
        self.first_token_at: float | None = None  # perf_counter when the first token was chosen

    @property
    def text(self) -> str:
        return self.stops.text if self.stops.hit is not None else self.detok.text

    def events(self, tokens: Iterator[tuple[int, str | None]]) -> Iterator[TokenEvent]:
        """One TokenEvent per token of `tokens` (a `generate_tokens` loop) but a stop token, stop strings
        cut; a last event (token_id None) releases the text held back at the end."""
        while True:
            t0 = time.perf_counter()
            token, finish = next(tokens)
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.token_ids.append(token)
            if finish == "stop":  # a stop token: no text
                self.decode_s += time.perf_counter() - t0
                self.finish = "stop"
                break
            piece = self.stops.feed(self.detok.push(token))
            self.decode_s += time.perf_counter() - t0
            yield TokenEvent(token, piece)
            if self.stops.hit is not None:
                self.finish = "stop"
                break
            if finish is not None:
                self.finish = "stop" if finish == "complete" else finish  # a finished JSON answer stopped normally
                break
        tail = self.stops.feed(self.detok.flush(), final=True)
        if tail:
            yield TokenEvent(None, tail)


# ---------------------------------------------------------------------------------------------
# The KV cache's holder
# ---------------------------------------------------------------------------------------------


class KVCache:
    """An LLM engine's cache and the one holder (a Conversation) whose tokens are in it."""

    def __init__(self, llm):
        self.llm = llm
        self.holder: object | None = None

    @property
    def length(self) -> int:
        return self.llm.length

    def holds(self, owner, length: int) -> bool:
        """Does the cache still hold exactly `owner`'s `length` positions?"""
        return self.holder is owner and self.llm.length == length

    def take(self, owner, *, keep: bool) -> None:
        """`owner` writes to the cache now; `keep`: it continues on its own cached positions."""
        if not keep:
            self.llm.reset()
        self.holder = owner

    def release(self, owner=None) -> None:
        """Nobody's tokens are trusted in the cache any more (any holder, or only `owner`'s)."""
        if owner is None or self.holder is owner:
            self.holder = None

    def clear(self, owner) -> None:
        """`owner` is done with its tokens: empty the cache if it holds them."""
        if self.holder is owner:
            self.llm.reset()
            self.holder = None

    def truncate(self, owner, length: int) -> None:
        """Roll the cache back to `length` positions; when the engine cannot, `owner` loses it."""
        if self.llm.length == length:
            return
        try:
            self.llm.truncate(length)
        except (EngineError, ValueError):  # an engine that cannot roll back: re-prefill next turn
            self.release(owner)


# ---------------------------------------------------------------------------------------------
# Benchmarks: the same loop, timed
# ---------------------------------------------------------------------------------------------


def timed_greedy_run(prefill_fn: Callable[[], object], decode_one_token: Callable[[int], object],
                     pick: Callable[[object], int], prompt_positions: int, tokens: int) -> dict:
    """Prefill, then `tokens` forced greedy decode steps (pick + decode_one_token; no stop tokens).
    The decode time runs from the first token chosen to the last step's token chosen."""
    s = time.perf_counter()
    logits = prefill_fn()
    prefill_s = time.perf_counter() - s
    start = None
    for k, _ in enumerate(generate_tokens(logits, decode_one_token, lambda lg, _: pick(lg),
                                          max_new_tokens=tokens + 1)):
        if k == 0:
            start = time.perf_counter()
    dec = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_s": dec, "generated_tokens": tokens, "prompt_positions": prompt_positions,
            "decode_tok_s": tokens / dec if dec > 0 else 0.0,
            "prefill_tok_s": prompt_positions / prefill_s if prefill_s else 0.0, "ttft_s": prefill_s}


def timed_runs(one: Callable[[int], dict], *, warmup: int, warmup_tokens: int, runs: int, tokens: int,
               on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """`warmup` untimed runs of `warmup_tokens`, then `runs` of `tokens`; the runs' results."""
    total = warmup + runs
    out = []
    for k in range(total):
        r = one(warmup_tokens if k < warmup else tokens)
        if k >= warmup:
            out.append(r)
        if on_progress is not None:
            on_progress(k + 1, total)
    return out
