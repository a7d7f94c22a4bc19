"""Structured output: JSON-schema constrained decoding with llguidance.

llguidance (Microsoft's grammar engine, Rust, no torch) compiles a JSON schema into a grammar and, at every
step, gives the set of tokens of *our* Hugging Face `tokenizers` vocabulary that keep the output a prefix of
a schema-valid document; the sampler sets the others to -inf before it picks, so greedy and sampled
decoding both produce valid JSON whatever the weights. The mask is computed on the logits the pipeline
already holds in numpy, so it works with every LLM backend (ONNX Runtime, PyTorch, TensorRT-LLM: each
returns one step's logits to our loop).

    text = schema_text({"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}})
    params = SamplingParams(json_schema=text)            # checked here: a bad schema is one VilaEdgeError line
    constraint = JsonConstraint(text, tokenizer, stop_ids)
    constraint.mask(logits); ...; constraint.accept(token); constraint.complete()

Output is compact JSON (no whitespace between tokens: a random-weights model could otherwise emit spaces
forever). The answer ends when the grammar is complete (the closing brace of the top-level object).

A token budget is respected without breaking the JSON where the schema allows. In the last CLOSE_LOOKAHEAD
tokens the constraint estimates how many tokens finishing needs (`tokens_to_close`: on a copy of the grammar
state, take a closing token (`"`, `]`, `}`) where one is allowed, else the grammar's forced text, else the
longest allowed token); once the budget left is no more than that, it closes: whenever the grammar accepts
closing tokens the choice is restricted to them (the model still picks among them), and text the grammar
forces (a required key) is written in its canonical tokens, so an open string or container is closed
instead of cut. Such an answer is valid JSON but its values may be cut short: its finish is "length"
(as an OpenAI client expects when the budget ran out) and `JsonConstraint.closed_early` is set. Where the
schema forbids closing (a required key still missing, minItems, minLength) the answer can still be cut:
finish "length" / "context" and the text is *not* complete JSON (callers check finish, or parse, before use).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vila_edge.errors import VilaEdgeError

# OpenAI's response_format {"type": "json_object"}: any JSON object.
ANY_JSON_OBJECT = {"type": "object"}
INSTALL_HINT = "pip install llguidance (structured output needs it)"
# Compact JSON: a model that keeps choosing whitespace could otherwise never finish.
_COMPILE_OPTIONS = {"whitespace_flexible": False}
# How far before the end of the budget the constraint starts estimating what closing the JSON needs, and how
# long an estimate may run (tokens); a document needing more than that to close is cut as before.
CLOSE_LOOKAHEAD = 32
CLOSE_MARGIN = 4
_CLOSING_CHARS = frozenset('"]}')


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise VilaEdgeError(f"JSON schema output needs llguidance: {INSTALL_HINT}") from None
    return llguidance


def schema_text(schema, *, source: str = "json_schema") -> str:
    """A JSON schema (dict, or its JSON text) as canonical JSON text, checked by llguidance's compiler.
    A schema it cannot compile (unknown type, bad regex, unsupported keyword) is one line naming `source`."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise VilaEdgeError(f"{source}: not valid JSON ({exc})") from None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise VilaEdgeError(f"{source}: a JSON schema must be an object, not {type(schema).__name__}")
    text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=_COMPILE_OPTIONS)
        err = llg.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as exc:
        err = str(exc)
    if err:
        first = " ".join(str(err).split())[:300]
        raise VilaEdgeError(f"{source}: unsupported or invalid JSON schema ({first})")
    return text


def read_schema_file(path) -> str:
    """A schema file (`chat --json-schema FILE`, `watch --schema FILE`) as checked schema text."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise VilaEdgeError(f"{path}: cannot read the JSON schema ({exc.__class__.__name__}: {exc})") from None
    return schema_text(raw, source=str(path))


def cli_schema(path, any_object: bool = False, *, flag: str = "--json-schema") -> str | None:
    """`--json-schema FILE` / `--json-object` as schema text (None: free text)."""
    if path is not None and any_object:
        raise VilaEdgeError(f"{flag} and --json-object: choose one")
    if path is not None:
        return read_schema_file(path)
    return schema_text(ANY_JSON_OBJECT) if any_object else None


def cut_note(result) -> str | None:
    """The note to show when a JSON answer was cut before its end (None when it is complete or not JSON)."""
    if result is None or result.finish_reason in ("stop", "interrupted"):
        return None
    limit = "max_new_tokens" if result.finish_reason == "length" else "the context"
    try:
        json.loads(result.text)
    except ValueError:
        return f"the answer reached {limit} before its JSON was complete: it is not valid JSON (raise the limit)"
    return f"the answer reached {limit}: its JSON was closed early, values may be cut short (raise the limit)"


# One llguidance tokenizer per (our tokenizer, stop ids): building it walks the whole vocabulary (~0.2 s for
# 49k tokens), a conversation asks for it on every turn.
_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def grammar_tokenizer(tokenizer, stop_ids: Sequence[int]):
    """llguidance's view of `tokenizer` (a vila_edge Tokenizer) whose end-of-sequence ids are `stop_ids`."""
    llg = _llguidance()
    per_tok = _LL_TOKENIZERS.setdefault(tokenizer, {})
    key = tuple(sorted(set(int(i) for i in stop_ids)))
    if not key:
        raise VilaEdgeError("JSON schema output needs a stop token (not with ignore_eos)")
    if key not in per_tok:
        try:
            per_tok[key] = llg.LLTokenizer(tokenizer._tok.to_str(), n_vocab=len(tokenizer), eos_token=list(key))
        except (ValueError, RuntimeError) as exc:
            raise VilaEdgeError(f"{tokenizer.source}: llguidance cannot read this tokenizer ({exc})") from None
    return per_tok[key]


_CLOSING_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _TokenTexts:
    """Per tokenizer: each token's text, and which tokens close something: in a string, those starting with
    `"` made only of `"`, `]`, `}` (e.g. `"}`); outside, those made only of `]` and `}` (a `"` would open one)."""

    def __init__(self, tokenizer):
        self.texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(len(tokenizer))]
        self.length = np.array([len(t) for t in self.texts], dtype=np.int32)
        only = np.array([bool(t) and set(t) <= _CLOSING_CHARS for t in self.texts], dtype=bool)
        self.close_string = only & np.array([t.startswith('"') for t in self.texts], dtype=bool)
        self.close_container = only & np.array(['"' not in t for t in self.texts], dtype=bool)


def _token_texts(tokenizer) -> _TokenTexts:
    if tokenizer not in _CLOSING_TOKENS:
        _CLOSING_TOKENS[tokenizer] = _TokenTexts(tokenizer)
    return _CLOSING_TOKENS[tokenizer]


def closing_tokens(tokenizer) -> np.ndarray:
    """Boolean [len(tokenizer)]: tokens that may close something (`"`, `]`, `}` only, e.g. `"}`)."""
    t = _token_texts(tokenizer)
    return t.close_string | t.close_container


def _in_string_after(text: str, in_string: bool, escaped: bool) -> tuple[bool, bool]:
    """(inside a JSON string, after a backslash) once `text` follows."""
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
    return in_string, escaped


class JsonConstraint:
    """One answer's grammar state: which tokens may come next, what was chosen, whether the JSON is complete."""

    def __init__(self, schema: str, tokenizer, stop_ids: Sequence[int]):
        llg = _llguidance()
        self.tokenizer = grammar_tokenizer(tokenizer, stop_ids)
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
        self.matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise VilaEdgeError(f"json_schema: {self.matcher.get_error()}")
        self.n_vocab = self.tokenizer.vocab_size
        self.texts = _token_texts(tokenizer)
        self.string_state = (False, False)  # (inside a string, after a backslash) of the text so far
        self.closing = False  # the budget left is what closing needs: close (see the module doc)
        self.closed_early = False  # ... and that changed a choice

    def allowed(self, matcher=None) -> np.ndarray:
        """Boolean [n_vocab]: the tokens the grammar accepts next (stop tokens once the JSON may end)."""
        bits = np.frombuffer((matcher or self.matcher).compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

    def _closing_choices(self, ok: np.ndarray, matcher, in_string: bool) -> np.ndarray | None:
        """Of the allowed tokens `ok`, those that close (or the forced text's next canonical token); None: any."""
        closers = self.texts.close_string if in_string else self.texts.close_container
        n = min(len(closers), len(ok))
        closing = ok[:n] & closers[:n]
        if closing.any():
            return np.flatnonzero(closing)
        forced = matcher.compute_ff_tokens()
        return np.array(forced[:1]) if forced else None

    def tokens_to_close(self, limit: int = CLOSE_LOOKAHEAD) -> int | None:
        """Tokens finishing the JSON from here takes when it closes as soon as it may (an estimate: closing tokens,
        forced text, else the longest allowed token); None if not within `limit`."""
        m = self.matcher.deep_copy()
        state = self.string_state
        for n in range(limit + 1):
            if m.is_stopped():
                return n
            ok = self.allowed(m)
            choices = self._closing_choices(ok, m, state[0])
            if choices is None:
                cand = np.flatnonzero(ok[: len(self.texts.length)])
                if not len(cand):
                    return n if m.is_accepting() else None
                choices = cand[np.argmax(self.texts.length[cand])][None]
            token = int(choices[0])
            if not m.consume_token(token):
                return None
            state = _in_string_after(self.texts.texts[token], *state)
        return None

    def update_budget(self, tokens_left: int) -> None:
        """Called before each pick with the tokens the budget has left (this one included)."""
        if not self.closing and tokens_left <= CLOSE_LOOKAHEAD:
            need = self.tokens_to_close()
            # + margin: one free pick may raise the need by a few tokens (a multi-byte character's first
            # byte, a new nested value) and the pick after this check is still free
            self.closing = need is not None and tokens_left <= need + CLOSE_MARGIN

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """Set every token the grammar refuses to -inf, in place (logits wider than the vocabulary: the extra
        rows are refused too). Returns `logits`."""
        ok = self.allowed()
        n = min(len(ok), logits.shape[0])
        logits[:n][~ok[:n]] = -np.inf
        logits[n:] = -np.inf
        if not np.isfinite(logits).any():
            raise VilaEdgeError("json_schema: no token the model may produce continues the JSON "
                                "(the schema needs a token outside the model's trained vocabulary)")
        return logits

    def mask_closing(self, logits: np.ndarray) -> np.ndarray:
        """When closing (`update_budget`): of the tokens `mask` left, keep the closing ones when the grammar
        accepts any, else the forced text's canonical token (in place). Returns `logits`."""
        if not self.closing:
            return logits
        ok = np.isfinite(logits)
        choices = self._closing_choices(ok, self.matcher, self.string_state[0])
        if choices is not None and len(choices) < ok.sum():
            keep = np.zeros_like(ok)
            keep[choices] = True
            logits[~keep] = -np.inf
            self.closed_early = True
        return logits

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise VilaEdgeError(f"json_schema: token {token} does not continue the JSON ({self.matcher.get_error()})")
        if token < len(self.texts.texts):
            self.string_state = _in_string_after(self.texts.texts[token], *self.string_state)

    def complete(self) -> bool:
        """Nothing but a stop token may follow: the JSON document is finished."""
        return self.matcher.is_stopped()
