"""Validation of OpenAI chat-completion requests, and the OpenAI response / error shapes.

Hand-written rather than pydantic models so that every refusal names the exact parameter
(`messages[1].content[0].image_url.url`) the way OpenAI's own errors do, and so that unknown fields that
real clients send (`user`, `metadata`, `logit_bias`: null, ...) are ignored instead of refused.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vila_edge.errors import VilaEdgeError
from vila_edge.generate import SamplingParams


class APIError(Exception):
    """An error answered to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value", status: int = 400) -> APIError:
    return APIError(status, message, param=param, code=code)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 4
    max_tokens: int = 1024  # cap on max_tokens (and the default when the request gives none)
    max_messages: int = 64
    max_stop: int = 4  # OpenAI's own limit on stop sequences
    # Characters of message text; create_app lowers it to what the model's context can hold at all.
    max_text_chars: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class ImageRef:
    param: str  # where in the request, for error messages
    kind: str  # "data" | "remote"
    url: str  # the remote URL, or the data URL's media type for "data"
    data: bytes = b""


@dataclass
class Part:
    text: str = ""
    image: ImageRef | None = None


@dataclass
class ParsedMessage:
    role: str  # system | user | assistant
    parts: list[Part]


@dataclass
class ChatRequest:
    model: str | None
    messages: list[ParsedMessage]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    images: list[ImageRef] = field(default_factory=list)
    json_schema: str | None = None  # response_format json_schema / json_object, as checked schema text

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """The request's sampling settings (fields it leaves out keep SamplingParams' defaults)."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")}
        kw = {k: v for k, v in given.items() if v is not None}
        if "seed" in kw:
            kw["seed"] %= 2**64  # OpenAI allows any int64; numpy wants >= 0
        return SamplingParams(max_new_tokens=max_new_tokens, stop=self.stop, json_schema=self.json_schema, **kw)


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(?:;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,",
                       re.IGNORECASE)


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _number(body: dict, key: str, lo: float, hi: float, *, integer: bool = False):
    if key not in body or body[key] is None:
        return None
    v = body[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        want = "an integer" if integer else "a number"
        raise bad(f"'{key}' must be {want}, got {_type_name(v)}", key, "invalid_type")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"'{key}' must be a finite number", key)
    if not lo <= v <= hi:
        raise bad(f"'{key}' must be between {lo:g} and {hi:g}, got {v}", key)
    return v


def parse_chat_request(body: Any, limits: Limits) -> ChatRequest:
    """Validate a decoded JSON body. Raises APIError(400) naming the offending parameter."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")

    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_type_name(model)}", "model", "invalid_type")

    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad(f"'stream' must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        include_usage = bool(so.get("include_usage", False))

    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise bad("only n=1 is supported (the engine generates one answer per request)", "n", "unsupported_value")
    for key in ("tools", "functions"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    json_schema = _response_format(body.get("response_format"))
    if body.get("logprobs"):
        raise bad("'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")

    mt_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, mt_key, 1, 2**31, integer=True)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise bad(f"'{mt_key}' is {max_tokens} but this server allows at most {limits.max_tokens}", mt_key,
                  "max_tokens_exceeded")
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    if top_p is not None and top_p == 0:
        raise bad("'top_p' must be greater than 0", "top_p")
    top_k = _number(body, "top_k", 0, 1_000_000, integer=True)
    repetition_penalty = _number(body, "repetition_penalty", 0.01, 10)
    seed = _number(body, "seed", -(2**63), 2**63 - 1, integer=True)

    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_raw, str):
        stop = (_utf8_text(stop_raw, "stop"),)
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = tuple(_utf8_text(s, "stop") for s in stop_raw)
    else:
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stop) > limits.max_stop:
        raise bad(f"'stop' has {len(stop)} sequences; at most {limits.max_stop} are allowed", "stop")
    if any(not s for s in stop):
        raise bad("'stop' sequences must not be empty", "stop")

    raw_messages = body.get("messages")
    if raw_messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(raw_messages, list):
        raise bad(f"'messages' must be an array, got {_type_name(raw_messages)}", "messages", "invalid_type")
    if not raw_messages:
        raise bad("'messages' must contain at least one message", "messages")
    if len(raw_messages) > limits.max_messages:
        raise bad(f"'messages' has {len(raw_messages)} entries; at most {limits.max_messages} are allowed", "messages")

    messages: list[ParsedMessage] = []
    images: list[ImageRef] = []
    text_chars = 0
    for i, m in enumerate(raw_messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object, got {_type_name(m)}", where, "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            kind = "tool calls" if role in ("tool", "function") else f"role {role!r}"
            raise bad(f"'{where}.role' must be one of system, developer, user, assistant ({kind} not supported)",
                      f"{where}.role", "invalid_value")
        parts = _parse_content(m.get("content"), f"{where}.content", role, images, limits)
        text_chars += sum(len(p.text) for p in parts)
        if text_chars > limits.max_text_chars:
            raise bad(f"the messages hold more than {limits.max_text_chars} characters of text, more than the model's "
                      "context can hold; shorten them", "messages", "context_length_exceeded")
        messages.append(ParsedMessage(_ROLES[role], parts))
    if messages[-1].role != "user":
        raise bad("the last message must come from the user", f"messages[{len(messages) - 1}].role")
    if json_schema is not None and stop:
        raise bad("'stop' with a JSON response_format: a stop string could cut the JSON; drop 'stop' (the answer "
                  "ends with its closing brace)", "stop", "unsupported_value")
    return ChatRequest(model=model, messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                       repetition_penalty=repetition_penalty, seed=seed, stop=stop, images=images,
                       json_schema=json_schema)


def _response_format(rf: Any) -> str | None:
    """OpenAI's response_format as checked JSON-schema text: text (None), json_object (any object), json_schema."""
    from vila_edge.structured import ANY_JSON_OBJECT, schema_text

    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind in ("text", None) and isinstance(rf, dict):
        return None
    try:
        if kind == "json_object":
            return schema_text(ANY_JSON_OBJECT)
        if kind == "json_schema":
            spec = rf.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise bad("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                          "response_format.json_schema", "missing_required_parameter")
            return schema_text(spec["schema"], source="response_format.json_schema.schema")
    except VilaEdgeError as exc:
        raise bad(str(exc), "response_format.json_schema.schema") from None
    raise bad("response_format must be {'type': 'text' | 'json_object' | 'json_schema'}", "response_format",
              "unsupported_value")


def _utf8_text(text: str, where: str) -> str:
    """JSON may carry lone surrogates ("\\ud800") that no tokenizer can encode: a 400, not a 500."""
    from vila_edge.errors import PromptError
    from vila_edge.prompt import check_text

    try:
        return check_text(text, f"'{where}'")
    except PromptError as exc:
        raise bad(str(exc), where, "invalid_text") from None


def _parse_content(content: Any, where: str, role: str, images: list[ImageRef], limits: Limits) -> list[Part]:
    if isinstance(content, str):
        return [Part(text=_utf8_text(content, where))]
    if content is None:
        if role == "assistant":
            return [Part(text="")]
        raise bad(f"'{where}' is required", where, "missing_required_parameter")
    if not isinstance(content, list):
        raise bad(f"'{where}' must be a string or an array of content parts, got {_type_name(content)}", where,
                  "invalid_type")
    parts: list[Part] = []
    for j, p in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(p, dict):
            raise bad(f"'{pw}' must be an object, got {_type_name(p)}", pw, "invalid_type")
        ptype = p.get("type")
        if ptype == "text":
            text = p.get("text")
            if not isinstance(text, str):
                raise bad(f"'{pw}.text' must be a string, got {_type_name(text)}", f"{pw}.text", "invalid_type")
            parts.append(Part(text=_utf8_text(text, f"{pw}.text")))
        elif ptype == "image_url":
            if role != "user":
                raise bad(f"'{pw}': images are only accepted in user messages", pw)
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str):
                raise bad(f"'{pw}.image_url.url' must be a string", f"{pw}.image_url.url", "invalid_type")
            if len(images) >= limits.max_images:
                raise bad(f"too many images: at most {limits.max_images} per request", pw, "too_many_images")
            ref = parse_image_url(url, f"{pw}.image_url.url", limits)
            images.append(ref)
            parts.append(Part(image=ref))
        else:
            raise bad(f"'{pw}.type' must be 'text' or 'image_url', got {ptype!r}", f"{pw}.type", "invalid_value")
    return parts


def parse_image_url(url: str, param: str, limits: Limits) -> ImageRef:
    """A data URL (decoded here, size-checked) or an http(s) URL (fetched later, if allowed)."""
    head = url[:64].lower()
    if head.startswith("data:"):
        m = _DATA_URL.match(url[:512])
        if not m or not m.group("b64"):
            raise bad("image data URLs must look like data:image/png;base64,<base64 data>", param, "invalid_image_url")
        mime = (m.group("mime") or "").lower()
        if mime and not mime.startswith("image/"):
            raise bad(f"the data URL's media type is {mime!r}, not an image type", param, "invalid_image_url")
        payload = url[m.end():]
        if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
            raise bad(f"image is about {len(payload) // 4 * 3} bytes; at most {limits.max_image_bytes} bytes are "
                      "allowed", param, "image_too_large")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise bad("the image data URL is not valid base64", param, "invalid_image_url") from None
        if len(data) > limits.max_image_bytes:
            raise bad(f"image is {len(data)} bytes; at most {limits.max_image_bytes} are allowed", param,
                      "image_too_large")
        if not data:
            raise bad("the image data URL is empty", param, "invalid_image_url")
        return ImageRef(param=param, kind="data", url=mime, data=data)
    if head.startswith(("http://", "https://")):
        return ImageRef(param=param, kind="remote", url=url)
    raise bad("image_url must be a data URL (data:image/...;base64,...) or an http(s) URL; local files and other "
              "schemes are never read", param, "invalid_image_url")


# ---- responses -------------------------------------------------------------------------------


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, model: str, created: int, text: str, finish_reason: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None, no_choices: bool = False) -> dict:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "system_fingerprint": None,
           "choices": [] if no_choices else [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(model_id: str, created: int | None = None) -> dict:
    return {"id": model_id, "object": "model", "created": created or int(time.time()), "owned_by": "vila-edge"}
