"""The OpenAI-compatible routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`.

A request is read (size-capped), validated (`openai_schema`), its images fetched / decoded in the thread
pool, its prompt positions counted by the engine, then handed to the scheduler as a `Job` with the
request's `SamplingParams`; the answer is collected (JSON) or streamed (server-sent events) from the job's
events. The client leaving cancels the job.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from vila_edge.errors import VilaEdgeError
from vila_edge.serve import openai_schema as oa
from vila_edge.serve.app import SSE_HEADERS, ServeSettings, check_auth, sse
from vila_edge.serve.engine import ChatMessage, Engine
from vila_edge.serve.metrics import ServerMetrics
from vila_edge.serve.remote import fetch_image
from vila_edge.serve.scheduler import Job, Scheduler


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise oa.APIError(413, f"request body is {declared} bytes; at most {limit} are allowed",
                                  code="request_too_large")
        except ValueError:
            raise oa.bad("invalid Content-Length header", None, "invalid_header") from None
    buf = bytearray()
    async for piece in request.stream():
        buf += piece
        if len(buf) > limit:
            raise oa.APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    return bytes(buf)


def _parse_json(body: bytes):
    if not body:
        raise oa.bad("the request body is empty; send a JSON object", None, "invalid_json")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise oa.bad("the request body is not UTF-8 text", None, "invalid_json") from None
    except json.JSONDecodeError as exc:
        raise oa.bad(f"the request body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                     None, "invalid_json") from None
    except RecursionError:
        raise oa.bad("the request body is nested too deeply", None, "invalid_json") from None


def decode_image(data: bytes, param: str, limits: oa.Limits):
    """Bytes -> RGB PIL image through the one loader every entry point uses (its pixel cap is checked from the
    header, before any pixel is decoded); the server's cap may be lower than the library's."""
    from vila_edge.errors import ImageTooLarge, MediaError
    from vila_edge.media.image import load_image

    try:
        return load_image(data, name="image", max_pixels=limits.max_image_pixels)
    except ImageTooLarge as exc:
        raise oa.bad(str(exc), param, "image_too_large") from None
    except MediaError as exc:
        raise oa.bad(str(exc), param, "invalid_image") from None


def to_engine_messages(req: oa.ChatRequest) -> list[ChatMessage]:
    out = []
    for m in req.messages:
        text = "\n".join(p.text for p in m.parts if p.image is None and p.text)
        n_img = sum(1 for p in m.parts if p.image is not None)
        out.append(ChatMessage(m.role, text, n_img))
    return out


def pick_engine(engines: Sequence[Engine], name: str | None) -> Engine:
    by_id = {e.model_id: e for e in engines}
    if name in by_id:
        return by_id[name]
    if name is None and len(by_id) == 1:
        return engines[0]
    if name is None:
        raise oa.bad(f"'model' is required; available: {', '.join(by_id)}", "model", "missing_required_parameter")
    raise oa.APIError(404, f"the model {name!r} does not exist; available: {', '.join(by_id)}", param="model",
                      code="model_not_found")


def token_budget(engine: Engine, req: oa.ChatRequest, prompt_tokens: int, limits: oa.Limits) -> int:
    """max_tokens of the request, checked against the context the prompt leaves."""
    ctx = engine.max_context
    if prompt_tokens >= ctx:
        raise oa.bad(f"the prompt takes {prompt_tokens} positions (images included) but the model's context is "
                     f"{ctx}; shorten it or send fewer or smaller images", "messages", "context_length_exceeded")
    room = ctx - prompt_tokens
    if req.max_tokens is None:
        return min(limits.max_tokens, room)
    if req.max_tokens > room:
        raise oa.bad(f"prompt ({prompt_tokens} positions) + max_tokens ({req.max_tokens}) exceeds the model's "
                     f"context of {ctx}; ask for at most {room} tokens", "max_tokens", "context_length_exceeded")
    return req.max_tokens


async def load_images(req: oa.ChatRequest, settings: ServeSettings, limits: oa.Limits) -> list:
    images = []
    for ref in req.images:
        if ref.kind == "remote":
            if not settings.allow_remote_images:
                raise oa.bad("http(s) image URLs are disabled on this server (start it with "
                             "--allow-remote-images); send the image as a data URL", ref.param,
                             "remote_images_disabled")
            data = await fetch_image(ref, limits, settings.remote_timeout, settings.remote_image_networks)
        else:
            data = ref.data
        images.append(await asyncio.to_thread(decode_image, data, ref.param, limits))
    return images


def busy(scheduler: Scheduler, settings: ServeSettings) -> oa.APIError:
    ra = scheduler.retry_after()
    return oa.APIError(429, f"the server is busy ({settings.max_queue} requests already waiting); retry in "
                            f"{ra} s", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(ra)})


async def collect(job: Job, request: Request, scheduler: Scheduler, settings: ServeSettings, cid, created_at,
                  model_name):
    """The whole answer as one chat.completion (the client hanging up cancels the job)."""
    async def watch_disconnect():  # the body is read: the next ASGI message is the client hanging up
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                scheduler.cancel(job)
                return

    watcher = asyncio.create_task(watch_disconnect())
    parts: list[str] = []
    try:
        while True:
            ev = await job.events.get()
            if ev[0] == "text":
                parts.append(ev[1])
            elif ev[0] == "error":
                raise oa.APIError(job.error_status, ev[1] or "generation failed",
                                  type="invalid_request_error" if job.error_status < 500 else "server_error",
                                  code=job.error_code)
            elif ev[0] == "end":
                reason = ev[1]
                if reason == "timeout":
                    raise oa.APIError(504, f"the request did not finish within {settings.request_timeout:g} s",
                                      type="timeout_error", code="timeout")
                if reason == "cancelled":  # client gone (nobody reads this) or server shutting down
                    raise oa.APIError(503, "the request was cancelled (client gone or server shutting down)",
                                      type="server_error", code="cancelled")
                return oa.completion(cid, model_name, created_at, "".join(parts), reason, job.prompt_tokens,
                                     job.completion_tokens)
    finally:
        watcher.cancel()
        if not job.done:
            scheduler.cancel(job)


async def stream(job: Job, scheduler: Scheduler, settings: ServeSettings, cid, created_at, model_name,
                 include_usage) -> AsyncIterator[str]:
    """The answer as chat.completion.chunk server-sent events, keep-alive comments while waiting."""
    try:
        sent_role = False
        while True:
            try:
                ev = await asyncio.wait_for(job.events.get(), 15.0)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"  # while queued or in a slow prefill
                continue
            if ev[0] == "start":
                continue
            if not sent_role and ev[0] in ("text", "end"):
                yield sse(oa.chunk(cid, model_name, created_at, {"role": "assistant", "content": ""}))
                sent_role = True
            if ev[0] == "text":
                yield sse(oa.chunk(cid, model_name, created_at, {"content": ev[1]}))
            elif ev[0] == "error":
                yield sse(oa.error_body(ev[1] or "generation failed", code=job.error_code,
                                        type="invalid_request_error" if job.error_status < 500 else "server_error"))
                yield "data: [DONE]\n\n"
                return
            elif ev[0] == "end":
                reason = ev[1]
                if reason in ("timeout", "cancelled"):
                    msg = (f"the request did not finish within {settings.request_timeout:g} s"
                           if reason == "timeout" else "the server is shutting down")
                    yield sse(oa.error_body(msg, type="timeout_error" if reason == "timeout" else "server_error",
                                            code=reason))
                    yield "data: [DONE]\n\n"
                    return
                yield sse(oa.chunk(cid, model_name, created_at, {}, reason))
                if include_usage:
                    yield sse(oa.chunk(cid, model_name, created_at, {}, no_choices=True,
                                       usage_=oa.usage(job.prompt_tokens, job.completion_tokens)))
                yield "data: [DONE]\n\n"
                return
    finally:  # normal end, or the client went away (starlette cancels this generator)
        if not job.done:
            scheduler.cancel(job)


def openai_router(engines: Sequence[Engine], scheduler: Scheduler, metrics: ServerMetrics, settings: ServeSettings,
                  limits: oa.Limits) -> APIRouter:
    """`limits`: the settings' limits, the text cap lowered to what the engines' contexts can hold."""
    router = APIRouter()
    model_ids = [e.model_id for e in engines]
    created = int(time.time())

    @router.get("/v1/models")
    async def models(request: Request):
        check_auth(request, settings)
        return {"object": "list", "data": [oa.model_card(m, created) for m in model_ids]}

    @router.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request, settings)
        if model_id not in model_ids:
            raise oa.APIError(404, f"the model {model_id!r} does not exist; available: {', '.join(model_ids)}",
                              param="model", code="model_not_found")
        return oa.model_card(model_id, created)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request, settings)
            body = _parse_json(await _read_body(request, limits.max_body_bytes))
            req = oa.parse_chat_request(body, limits)
            engine = pick_engine(engines, req.model)
            if scheduler.full():  # refuse before the costly part (fetching / decoding images)
                raise busy(scheduler, settings)
            images = await load_images(req, settings, limits)
            messages = to_engine_messages(req)
            prompt_tokens = await asyncio.to_thread(engine.count_tokens, messages, images)
            try:
                params = req.sampling_params(token_budget(engine, req, prompt_tokens, limits))
            except VilaEdgeError as exc:
                raise oa.bad(str(exc), None, "invalid_value") from None
        except oa.APIError as exc:
            metrics.rejected.inc(1, "queue_full" if exc.status == 429 else "invalid" if exc.status < 500 else
                                 str(exc.status))
            raise
        job = Job(engine=engine, messages=messages, images=images, params=params, timeout=settings.request_timeout,
                  prompt_tokens=prompt_tokens)
        if not scheduler.submit(job):
            metrics.rejected.inc(1, "queue_full")
            raise busy(scheduler, settings)
        cid, created_at, model_name = oa.new_id(), int(time.time()), engine.model_id
        if req.stream:
            # the background task also runs when the client left before the first byte (the generator's own
            # `finally` never runs then): the job must not go on without a listener
            return StreamingResponse(stream(job, scheduler, settings, cid, created_at, model_name, req.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(_release, job, scheduler))
        return await collect(job, request, scheduler, settings, cid, created_at, model_name)

    return router


def _release(job: Job, scheduler: Scheduler) -> None:
    if not job.done:
        scheduler.cancel(job)
