"""A small tokenizer over Hugging Face `tokenizers` (no transformers at run time).

Reads `tokenizer.json` + `tokenizer_config.json` from a checkpoint's `llm/` folder (or an engine
directory). Chat templates are rendered with jinja2 the way transformers does.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from vila_edge.errors import CheckpointError

# llava/constants.py: media markers and the sentinel used to find the stop token (NUM_EXTRA_TOKENS).
MEDIA_TOKENS = {"image": "<image>", "video": "<vila/video>"}
SENTINEL_TOKEN = "<vila/sentinel>"


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        return value.get("content")
    return value


def _convert_sentencepiece(folder: Path) -> HFTokenizer:
    """A SentencePiece `tokenizer.model` (VILA1.5's Llama tokenizer) -> a fast tokenizer, as transformers
    converts it with `legacy=False` (what VILA uses). Needs the `export` extra; engine directories
    store the converted tokenizer.json, so the runtime never needs this."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{folder / 'tokenizer.model'}: converting a SentencePiece tokenizer needs the export extra "
            "(pip install 'vila-edge[export]'), or put a tokenizer.json beside it"
        ) from None
    try:
        fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True, legacy=False)
    except Exception as exc:  # conversion errors come from several libraries
        raise CheckpointError(f"{folder / 'tokenizer.model'}: cannot convert tokenizer ({exc})") from None
    return HFTokenizer.from_str(fast.backend_tokenizer.to_str())


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict, source: str):
        self._tok = tokenizer
        self.config = config
        self.source = source
        self.chat_template: str | None = config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        tj = folder / "tokenizer.json"
        if tj.is_file():
            try:
                tok = HFTokenizer.from_file(str(tj))
            except Exception as exc:  # tokenizers raises plain Exception subclasses
                raise CheckpointError(f"{tj}: cannot read tokenizer ({exc})") from None
        elif (folder / "tokenizer.model").is_file():
            tok = _convert_sentencepiece(folder)
        else:
            raise CheckpointError(f"{tj}: tokenizer.json is missing (and there is no tokenizer.model to convert)")
        cfg_path = folder / "tokenizer_config.json"
        config = {}
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except ValueError as exc:
                raise CheckpointError(f"{cfg_path}: invalid JSON ({exc})") from None
        tpl = folder / "chat_template.jinja"
        if "chat_template" not in config and tpl.is_file():
            config["chat_template"] = tpl.read_text()
        return cls(tok, config, str(folder))

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2))

    # ---- vocabulary ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(idx)

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Add tokens missing from the vocabulary, in order (as HEAD's build_llm_and_tokenizer does)."""
        missing = [t for t in tokens if self._tok.token_to_id(t) is None]
        if missing:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, *, add_special_tokens: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_literal(self, text: str) -> list[int]:
        """`text` with special-token strings taken as plain characters (user text must not become control
        tokens: "<|im_end|>" typed by a user would otherwise close their turn and open a forged one)."""
        return self._literal_tok.encode(text, add_special_tokens=False).ids

    @cached_property
    def _literal_tok(self) -> HFTokenizer:
        # A private copy: `encode_special_tokens` is a flag on the tokenizer object, and the shared one must keep
        # parsing the chat template's own control tokens.
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok

    @cached_property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token covers (vocabulary strings are at least as long as their
        text: byte-level symbols stand for one byte each). A text of more than `n * max_token_chars` characters
        needs more than `n` tokens, which the server checks before tokenizing anything."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (control tokens, media markers)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @cached_property
    def adds_bos(self) -> bool:
        """Does encode(add_special_tokens=True) prepend a BOS token (Llama SentencePiece) or not (Qwen2)?"""
        plain = self.encode("a", add_special_tokens=False)
        full = self.encode("a", add_special_tokens=True)
        return len(full) > len(plain) and full[-len(plain):] == plain

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: the tokenizer has no chat_template; choose --chat-format vicuna_v1|llama_3|hermes-2")
        return compiled_chat_template(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


@lru_cache(maxsize=8)
def compiled_chat_template(source: str):
    """A chat template compiled once: compiling it takes 50-300 ms, as long as a whole cached request's TTFT."""
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)
