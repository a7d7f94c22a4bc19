"""The FastAPI app: OpenAI-compatible chat completions, models, health, metrics and the live camera page.

`create_app(engines, settings, camera=...)` builds the app; `vila_edge.serve.run` serves it with uvicorn.
Model code never runs on the event loop: generation runs on the scheduler's worker thread, image decoding
and token counting in the default thread pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from vila_edge.serve import openai_schema as oa
from vila_edge.serve.engine import ChatMessage, Engine, GenParams
from vila_edge.serve.guards import RequestGuard
from vila_edge.serve.metrics import ServerMetrics
from vila_edge.serve.remote import fetch_image
from vila_edge.serve.scheduler import Job, Scheduler

log = logging.getLogger("vila_edge.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


@dataclass
class ServeSettings:
    limits: oa.Limits = field(default_factory=oa.Limits)
    max_queue: int = 8  # requests waiting for the engine (beyond the running one); more get 429
    request_timeout: float = 300.0  # seconds from acceptance to the last token (queue wait included)
    allow_remote_images: bool = False
    remote_timeout: float = 10.0  # for the whole fetch, redirects included
    remote_image_networks: tuple = ()  # private networks image URLs may point into (LAN cameras); see serve.remote
    api_key: str | None = None
    allowed_hosts: tuple = ()  # Host names accepted without an API key besides IP literals and localhost
    # live camera page
    camera_prompt: str = "Describe what you see in one sentence."
    camera_interval: float = 2.0  # seconds between the end of one caption and the next frame
    camera_max_tokens: int = 48
    camera_fps: float = 10.0  # MJPEG frames per second sent to each viewer (at most)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _error(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, type=type, param=param, code=code), status_code=status,
                        headers=headers)


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


def _sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------


def create_app(engines: Engine | Sequence[Engine], settings: ServeSettings | None = None, *, camera=None) -> FastAPI:
    """The server app. `camera`: a frame source (see vila_edge.serve.live) enables `/`, `/stream.mjpg`, `/captions`."""
    settings = settings or ServeSettings()
    engine_list = [engines] if not isinstance(engines, (list, tuple)) else list(engines)
    if not engine_list:
        raise ValueError("at least one engine is needed")
    by_id = {e.model_id: e for e in engine_list}
    # text that no engine's context could hold is refused before it is tokenized (tokenizing 20 MB holds the
    # GIL for seconds and stalls every other request)
    text_bound = max(getattr(e, "max_prompt_chars", settings.limits.max_text_chars) for e in engine_list)
    limits = dataclasses.replace(settings.limits, max_text_chars=min(settings.limits.max_text_chars, text_bound))
    scheduler = Scheduler(max_queue=settings.max_queue)
    metrics = ServerMetrics(lambda: scheduler.queue_length, lambda: scheduler.active)
    scheduler.metrics = metrics
    created = int(time.time())
    live = None
    if camera is not None:
        from vila_edge.serve.live import LiveCaptioner

        live = LiveCaptioner(camera, engine_list[0], scheduler, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        if live is not None:
            await live.start()
        try:
            yield
        finally:
            if live is not None:
                await live.stop()
            await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="vila-edge", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.scheduler = scheduler
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.live = live
    app.state.begin_shutdown = (lambda: live.begin_shutdown()) if live is not None else (lambda: None)
    app.add_middleware(RequestGuard, metrics=metrics, api_key_set=bool(settings.api_key),
                       allowed_hosts=settings.allowed_hosts)

    # ---- errors: always the OpenAI shape, never a traceback ----------------------------------------
    @app.exception_handler(oa.APIError)
    async def _api_error(request: Request, exc: oa.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                      str(exc.detail))
        return _error(exc.status_code, msg, code=code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return _error(400, "invalid request", code="invalid_request")

    # ---- auth ------------------------------------------------------------------------------------
    def check_auth(request: Request, *, allow_query: bool = False) -> None:
        key = settings.api_key
        if not key:
            return
        given = None
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif allow_query:
            given = request.query_params.get("key")
        if given is None or not hmac.compare_digest(given.encode(), key.encode()):
            raise oa.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(by_id), "queue_length": scheduler.queue_length,
                "active": scheduler.active, "max_queue": settings.max_queue}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        check_auth(request)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [oa.model_card(m, created) for m in by_id]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id not in by_id:
            raise oa.APIError(404, f"the model {model_id!r} does not exist; available: {', '.join(by_id)}",
                              param="model", code="model_not_found")
        return oa.model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            check_auth(request)
            body = _parse_json(await _read_body(request, limits.max_body_bytes))
            req = oa.parse_chat_request(body, limits)
            engine = _pick_engine(req.model)
            if scheduler.full():  # refuse before the costly part (fetching / decoding images)
                raise _busy()
            images = await _load_images(req)
            messages = to_engine_messages(req)
            prompt_tokens = await asyncio.to_thread(engine.count_tokens, messages, images)
            max_tokens = _budget(engine, req, prompt_tokens)
        except oa.APIError as exc:
            metrics.rejected.inc(1, "queue_full" if exc.status == 429 else "invalid" if exc.status < 500 else
                                 str(exc.status))
            raise
        params = GenParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                           repetition_penalty=req.repetition_penalty, seed=req.seed, stop=req.stop)
        job = Job(engine=engine, messages=messages, images=images, params=params, timeout=settings.request_timeout,
                  prompt_tokens=prompt_tokens)
        if not scheduler.submit(job):
            metrics.rejected.inc(1, "queue_full")
            raise _busy()
        cid, created_at, model_name = oa.new_id(), int(time.time()), engine.model_id
        if req.stream:
            # the background task also runs when the client left before the first byte (the generator's own
            # `finally` never runs then): the job must not go on without a listener
            return StreamingResponse(_stream(job, cid, created_at, model_name, req.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS,
                                     background=BackgroundTask(_release, job))
        return await _collect(job, request, cid, created_at, model_name)

    def _busy() -> oa.APIError:
        ra = scheduler.retry_after()
        return oa.APIError(429, f"the server is busy ({settings.max_queue} requests already waiting); retry in "
                                f"{ra} s", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(ra)})

    def _release(job: Job) -> None:
        if not job.done:
            scheduler.cancel(job)

    def _pick_engine(name: str | None) -> Engine:
        if name in by_id:
            return by_id[name]
        if name is None and len(by_id) == 1:
            return engine_list[0]
        if name is None:
            raise oa.bad(f"'model' is required; available: {', '.join(by_id)}", "model", "missing_required_parameter")
        raise oa.APIError(404, f"the model {name!r} does not exist; available: {', '.join(by_id)}", param="model",
                          code="model_not_found")

    async def _load_images(req: oa.ChatRequest) -> list:
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

    def _budget(engine: Engine, req: oa.ChatRequest, prompt_tokens: int) -> int:
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

    async def _collect(job: Job, request: Request, cid, created_at, model_name):
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

    async def _stream(job: Job, cid, created_at, model_name, include_usage) -> AsyncIterator[str]:
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
                    yield _sse(oa.chunk(cid, model_name, created_at, {"role": "assistant", "content": ""}))
                    sent_role = True
                if ev[0] == "text":
                    yield _sse(oa.chunk(cid, model_name, created_at, {"content": ev[1]}))
                elif ev[0] == "error":
                    yield _sse(oa.error_body(ev[1] or "generation failed", code=job.error_code,
                                             type="invalid_request_error" if job.error_status < 500 else "server_error"))
                    yield "data: [DONE]\n\n"
                    return
                elif ev[0] == "end":
                    reason = ev[1]
                    if reason in ("timeout", "cancelled"):
                        msg = (f"the request did not finish within {settings.request_timeout:g} s"
                               if reason == "timeout" else "the server is shutting down")
                        yield _sse(oa.error_body(msg, type="timeout_error" if reason == "timeout" else "server_error",
                                                 code=reason))
                        yield "data: [DONE]\n\n"
                        return
                    yield _sse(oa.chunk(cid, model_name, created_at, {}, reason))
                    if include_usage:
                        yield _sse(oa.chunk(cid, model_name, created_at, {}, no_choices=True,
                                            usage_=oa.usage(job.prompt_tokens, job.completion_tokens)))
                    yield "data: [DONE]\n\n"
                    return
        finally:  # normal end, or the client went away (starlette cancels this generator)
            if not job.done:
                scheduler.cancel(job)

    # ---- live camera page ------------------------------------------------------------------------
    if live is not None:
        static = resources.files("vila_edge") / "static"

        def _static(name: str, media_type: str) -> Response:
            return Response((static / name).read_bytes(), media_type=media_type,
                            headers={"Cache-Control": "no-cache"})

        @app.get("/")
        async def index(request: Request):
            check_auth(request, allow_query=True)
            return _static("index.html", "text/html; charset=utf-8")

        @app.get("/static/{name}")
        async def static_file(name: str, request: Request):
            types = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
            if name not in types:
                raise oa.APIError(404, f"no static file {name!r}", code="not_found")
            return _static(name, types[name])

        @app.get("/stream.mjpg")
        async def mjpeg(request: Request):
            check_auth(request, allow_query=True)
            return StreamingResponse(live.mjpeg(), media_type=f"multipart/x-mixed-replace; boundary={live.BOUNDARY}",
                                     headers={"Cache-Control": "no-cache, no-store", "Pragma": "no-cache"})

        @app.get("/captions")
        async def captions(request: Request):
            check_auth(request, allow_query=True)
            return StreamingResponse(live.captions(), media_type="text/event-stream", headers=SSE_HEADERS)

        @app.get("/camera/state")
        async def camera_state(request: Request):
            check_auth(request, allow_query=True)
            return live.state()

    return app

