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
forever). The answer ends when the grammar is complete (the closing brace of the top-level object); if
`max_new_tokens` or the context runs out first, the answer is cut, finish is "length" / "context", and the
text is *not* complete JSON (callers must check finish before parsing).
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
    return f"the answer reached {limit} before its JSON was complete: it is not valid JSON (raise the limit)"


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

    def allowed(self) -> np.ndarray:
        """Boolean [n_vocab]: the tokens the grammar accepts next (stop tokens once the JSON may end)."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, bitorder="little")[: self.n_vocab].astype(bool)

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

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise VilaEdgeError(f"json_schema: token {token} does not continue the JSON ({self.matcher.get_error()})")

    def complete(self) -> bool:
        """Nothing but a stop token may follow: the JSON document is finished."""
        return self.matcher.is_stopped()
