"""The FastAPI app: scheduler, metrics, errors, auth, `/health`, `/metrics`, `/stats`, and two routers: the OpenAI
API (`vila_edge.serve.routes_openai`) and, with a camera, the live page and its watch (`vila_edge.serve.routes_camera`).

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
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from vila_edge.errors import VilaEdgeError
from vila_edge.serve import openai_schema as oa
from vila_edge.serve.engine import Engine
from vila_edge.serve.guards import RequestGuard
from vila_edge.serve.metrics import ServerMetrics
from vila_edge.serve.scheduler import Scheduler

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
    # seconds between the end of one caption and the next frame; with pipelining (the engine can encode ahead:
    # vila_edge.serve.live) between the START of one caption and the next frame, encoded while the caption decodes
    camera_interval: float = 2.0
    camera_max_tokens: int = 48
    camera_dedup_threshold: float = 2.0  # grey levels (vila_edge.media.frame_dedup); 0: caption every interval
    camera_fps: float = 10.0  # MJPEG frames per second sent to each viewer (at most)
    # camera watch (vila_edge.serve.live_watch): this question, schema enforced, instead of camera_prompt
    watch_question: str | None = None
    watch_schema: str | None = None  # checked schema text (structured.read_schema_file / schema_text)
    watch_max_tokens: int = 64  # `vila-edge watch --max-new-tokens`' default
    watch_webhook: str | None = None
    watch_webhook_networks: tuple = ()  # networks the webhook may reach besides loopback (serve.remote)
    watch_queue: int = 64  # change events buffered per /watch/events subscriber (then the oldest is dropped)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _error(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(oa.error_body(message, type=type, param=param, code=code), status_code=status,
                        headers=headers)


def sse(obj) -> str:
    return "data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n\n"


def check_auth(request: Request, settings: ServeSettings, *, allow_query: bool = False) -> None:
    """Refuse (401) a request without the server's API key (none set: everyone may call)."""
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


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------


def create_app(engines: Engine | Sequence[Engine], settings: ServeSettings | None = None, *, camera=None) -> FastAPI:
    """The server app. `camera`: a frame source (see vila_edge.serve.live) enables `/`, `/stream.mjpg`, `/captions`;
    with `settings.watch_question` also the watch (`/watch/events`, `/watch/state`)."""
    from vila_edge.serve.routes_camera import camera_router
    from vila_edge.serve.routes_openai import openai_router

    settings = settings or ServeSettings()
    engine_list = [engines] if not isinstance(engines, (list, tuple)) else list(engines)
    if not engine_list:
        raise ValueError("at least one engine is needed")
    # text that no engine's context could hold is refused before it is tokenized (tokenizing 20 MB holds the
    # GIL for seconds and stalls every other request)
    text_bound = max(getattr(e, "max_prompt_chars", settings.limits.max_text_chars) for e in engine_list)
    limits = dataclasses.replace(settings.limits, max_text_chars=min(settings.limits.max_text_chars, text_bound))
    scheduler = Scheduler(max_queue=settings.max_queue)
    metrics = ServerMetrics(lambda: scheduler.queue_length, lambda: scheduler.active)
    scheduler.metrics = metrics
    metrics.add_runtime_stats(lambda: runtime_stats(engine_list))
    watch = make_watch(settings)
    if watch is not None and camera is None:
        raise VilaEdgeError("--watch-ask needs --camera SRC: the watch asks about the camera's frames (for a video "
                            "file without a server: vila-edge watch ENGINES VIDEO --ask ... --schema ...)")
    live = None
    if camera is not None:
        from vila_edge.serve.live import LiveCaptioner

        live = LiveCaptioner(camera, engine_list[0], scheduler, settings, watch=watch)
        metrics.add_camera(live.dedup.counts.as_dict)
        if watch is not None:
            metrics.add_watch(watch.counts)

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
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [e.model_id for e in engine_list], "queue_length": scheduler.queue_length,
                "active": scheduler.active, "max_queue": settings.max_queue}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        check_auth(request, settings)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/stats")
    async def stats(request: Request):
        """The runtime's cache counts as JSON (the same numbers /metrics shows), summed over the models."""
        check_auth(request, settings)
        out = {"models": [e.model_id for e in engine_list], **runtime_stats(engine_list)}
        if watch is not None:
            out["watch"] = watch.counts()
        return out

    app.include_router(openai_router(engine_list, scheduler, metrics, settings, limits))
    if live is not None:
        app.include_router(camera_router(live, settings))
    return app


def make_watch(settings: ServeSettings):
    """The camera watch `settings` ask for (a `LiveWatch`), or None."""
    if settings.watch_question is None:
        return None
    from vila_edge.serve.live_watch import LiveWatch
    from vila_edge.watch import check_webhook_url, watch_params

    if not settings.watch_question.strip():
        raise VilaEdgeError("--watch-ask: the question is empty")
    if settings.watch_schema is None:
        raise VilaEdgeError("--watch-ask needs --watch-schema FILE: the JSON schema of the answer (events compare "
                            "structured answers)")
    check_webhook_url(settings.watch_webhook, "--watch-webhook")
    if settings.watch_queue < 1:
        raise VilaEdgeError(f"watch_queue {settings.watch_queue}: must be >= 1")
    return LiveWatch(settings.watch_question, watch_params(settings.watch_schema, settings.watch_max_tokens),
                     webhook=settings.watch_webhook, allowed_networks=settings.watch_webhook_networks,
                     queue_bound=settings.watch_queue)


def runtime_stats(engines: Sequence[Engine]) -> dict:
    """`Pipeline.stats()` summed over the distinct pipelines behind `engines` (two model names may share one);
    engines without a pipeline (the stand-in) count nothing."""
    pipes = {id(p): p for p in (getattr(e, "pipeline", None) for e in engines) if hasattr(p, "stats")}
    total: dict[str, dict] = {}
    for p in pipes.values():
        for group, counts in p.stats().items():
            g = total.setdefault(group, {})
            for k, v in counts.items():
                g[k] = g.get(k, 0) + v
    return total


def _add_error_handlers(app: FastAPI) -> None:
    """Errors always in the OpenAI shape, never a traceback (what escapes a route: serve.guards answers it)."""

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
