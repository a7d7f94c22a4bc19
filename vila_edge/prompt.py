"""Prompt text and token ids with media placeholders (reference doc §5.2-§5.5).

Two layouts, chosen by `VilaConfig.splice`:
- "v15" (VILA1.5 training code): the user text holds "<image>\\n" per image; the prompt string is split
  on "<image>", each chunk tokenized on its own (only the first keeps its BOS), and the placeholder
  id IMAGE_PLACEHOLDER (-200) is put between chunks.
- "head" (NVILA and later): "<image>" / "<vila/video>" are real special tokens of the tokenizer; the
  whole prompt is tokenized once.
Either way the result is a list of ids where media positions are marked, ready for `splice`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from vila_edge.config import VilaConfig
from vila_edge.errors import PromptError
from vila_edge.media.tiling import tiling_scheme
from vila_edge.tokenizer import MEDIA_TOKENS, SENTINEL_TOKEN, Tokenizer

IMAGE_PLACEHOLDER = -200  # llava.constants.IMAGE_TOKEN_INDEX (V15)
# The media markers `user_content` puts before a message's text.
MEDIA_PREFIX = re.compile("^(?:(?:" + "|".join(re.escape(m) for m in MEDIA_TOKENS.values()) + ")\n?)*")

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, and assist the user with a variety of "
    "tasks using natural language."
)
HERMES_SYSTEM = "<|im_start|>system\nAnswer the questions."


@dataclass(frozen=True)
class Message:
    role: str  # "user" | "assistant"
    content: str  # may contain "<image>" / "<vila/video>" markers


def render(chat_format: str, messages: list[Message], tokenizer: Tokenizer, *, add_generation_prompt: bool = True) -> str:
    """The conversation as the model saw it in training (llava/conversation.py templates)."""
    if chat_format == "vicuna_v1":
        # SeparatorStyle.TWO: seps (" ", "</s>") alternate after user / assistant turns.
        out = VICUNA_SYSTEM + " "
        for m in messages:
            role = "USER" if m.role == "user" else "ASSISTANT"
            out += f"{role}: {m.content}" + (" " if m.role == "user" else "</s>")
        return out + ("ASSISTANT:" if add_generation_prompt else "")
    if chat_format == "llama_3":
        out = LLAMA3_SYSTEM + "<|eot_id|>"
        for m in messages:
            out += f"<|start_header_id|>{m.role}<|end_header_id|>\n\n{m.content}<|eot_id|>"
        return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")
    if chat_format == "hermes-2":
        out = HERMES_SYSTEM + "<|im_end|>"
        for m in messages:
            out += f"<|im_start|>{m.role}\n{m.content}<|im_end|>"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
    if chat_format == "auto":
        return tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], add_generation_prompt=add_generation_prompt
        )
    raise PromptError(f"unknown chat format {chat_format!r}; use vicuna_v1, llama_3, hermes-2 or auto")


def user_content(cfg: VilaConfig, text: str, *, n_images: int = 0, n_tiles: int | None = None, video: bool = False,
                 n_frames: int = 0) -> str:
    """The user message with media markers placed as upstream does (media first, then the text).

    - V15: "<image>\\n" per image (run_vila auto-prepends it); a video is "<image>\\n" per frame.
    - NVILA: "<image>" per image; NVILA-Lite with one image: "<image>\\n" per tile (each tile is its own
      media item); a video is one "<vila/video>".
    Literal markers typed by the user are removed (HEAD `extract_media` does the same).
    """
    text = strip_media_markers(text)
    if cfg.splice == "v15":
        media = "<image>\n" * (n_images + (n_frames if video else 0))
    else:
        if tiling_scheme(cfg.vision).items_per_tile and n_images == 1 and n_tiles:
            media = "<image>\n" * n_tiles
        else:
            media = "<image>" * n_images
        if video:
            media += MEDIA_TOKENS["video"]
    return media + text


def strip_media_markers(text: str) -> str:
    """Remove media markers a user typed, until none is left ("<ima<image>ge>" must not leave an "<image>")."""
    while any(marker in text for marker in MEDIA_TOKENS.values()):
        for marker in MEDIA_TOKENS.values():
            text = text.replace(marker, "")
    return text


def check_text(text, what: str = "prompt") -> str:
    """A prompt from a caller: a str that encodes as UTF-8 (a lone surrogate, e.g. from undecodable bytes in
    argv or JSON's "\\ud800", cannot be tokenized)."""
    if not isinstance(text, str):
        raise PromptError(f"{what}={text!r}: must be a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{what}: character {exc.start} is not valid UTF-8 text ({text[exc.start]!r}); "
                          "send UTF-8 encoded text") from None
    return text


def literal_spans(prompt: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
    """Where each message's own text (after its media markers) sits in the rendered prompt, in order."""
    spans, cursor = [], 0
    for m in messages:
        text = MEDIA_PREFIX.sub("", m.content, count=1)
        for candidate in (text, text.strip()):  # templates may trim the content
            at = prompt.find(candidate, cursor) if candidate else -1
            if at >= 0:
                spans.append((at, at + len(candidate)))
                cursor = at + len(candidate)
                break
    return spans


def _encode_guarded(tokenizer: Tokenizer, text: str, spans: Sequence[tuple[int, int]], add_special_tokens: bool) -> list[int]:
    """Encode `text`; special tokens that fall inside a span of message text are re-encoded as literal text.
    A prompt without such tokens (every honest one) gets exactly the ids of a plain `encode`."""
    ids, offsets = tokenizer.encode_with_offsets(text, add_special_tokens=add_special_tokens)
    special = tokenizer.special_ids
    # where special tokens came from the text itself (an added BOS has an empty span); few, so spans are
    # checked against this short list rather than every token
    found = [(lo, hi) for t, (lo, hi) in zip(ids, offsets, strict=True) if t in special and hi > lo]
    forged = [(a, b) for a, b in spans if any(a <= lo and hi <= b for lo, hi in found)]
    if not forged:
        return ids
    out, pos = [], 0
    for k, (a, b) in enumerate(forged):
        if k == 0 or text[pos:a]:
            out += tokenizer.encode(text[pos:a], add_special_tokens=add_special_tokens and k == 0)
        out += tokenizer.encode_literal(text[a:b])
        pos = b
    if text[pos:]:
        out += tokenizer.encode(text[pos:], add_special_tokens=False)
    return out


def tokenize(cfg: VilaConfig, tokenizer: Tokenizer, prompt: str, *, first: bool = True,
             messages: Sequence[Message] = ()) -> list[int]:
    """Prompt text -> ids with media positions marked (IMAGE_PLACEHOLDER for V15, media token ids for HEAD).

    `first` is False when the text continues a conversation whose BOS was already emitted. `messages` are the
    messages rendered into `prompt`: their text is encoded literally (special-token strings in it are text).
    """
    spans = literal_spans(prompt, messages)
    if cfg.splice == "v15":
        ids: list[int] = []
        chunks = prompt.split(MEDIA_TOKENS["image"])
        bos = tokenizer.adds_bos
        start = 0
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE_PLACEHOLDER)
            local = [(max(a, start) - start, min(b, start + len(chunk)) - start) for a, b in spans
                     if a < start + len(chunk) and b > start]
            piece = _encode_guarded(tokenizer, chunk, local, True)
            if bos and (k or not first):
                piece = piece[1:]
            ids += piece
            start += len(chunk) + len(MEDIA_TOKENS["image"])
        return ids
    add = first and not prompt.startswith(tokenizer.bos_token or "\0")
    return _encode_guarded(tokenizer, prompt, spans, add)


def media_positions(cfg: VilaConfig, ids: list[int]) -> list[int]:
    marks = {IMAGE_PLACEHOLDER} if cfg.splice == "v15" else set(cfg.llm.media_token_ids.values())
    return [i for i, t in enumerate(ids) if t in marks]


def infer_stop_tokens(chat_format: str, tokenizer: Tokenizer) -> list[int]:
    """`infer_stop_tokens`: eos plus the token that closes an assistant message in this template."""
    stops = []
    if tokenizer.eos_token and tokenizer.token_to_id(tokenizer.eos_token) is not None:
        stops.append(tokenizer.token_to_id(tokenizer.eos_token))
    text = render(chat_format, [Message("user", "hi"), Message("assistant", SENTINEL_TOKEN)], tokenizer,
                  add_generation_prompt=False)
    after = text.split(SENTINEL_TOKEN, 1)[1] if SENTINEL_TOKEN in text else ""
    if after:
        ids = tokenizer.encode(after, add_special_tokens=False)
        if ids and ids[0] not in stops:
            stops.append(ids[0])
    if not stops:
        raise PromptError(f"{tokenizer.source}: cannot tell the stop token (no eos_token in tokenizer_config.json)")
    return stops
