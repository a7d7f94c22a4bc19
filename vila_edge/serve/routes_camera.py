"""The live camera page's routes: `/` (the page), `/static/{name}`, `/stream.mjpg`, `/captions` (server-sent
events), `/camera/state`, and the watch's `/watch/events` (server-sent events) and `/watch/state`; all read from
the `LiveCaptioner` (vila_edge.serve.live) and its `LiveWatch` (vila_edge.serve.live_watch). The page and its
streams take the API key as `?key=` too (browsers cannot set headers on <img> and EventSource)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from vila_edge.serve import openai_schema as oa
from vila_edge.serve.app import SSE_HEADERS, ServeSettings, check_auth

STATIC_TYPES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def _static(name: str, media_type: str) -> Response:
    return Response((resources.files("vila_edge") / "static" / name).read_bytes(), media_type=media_type,
                    headers={"Cache-Control": "no-cache"})


def camera_router(live, settings: ServeSettings) -> APIRouter:
    router = APIRouter()

    @router.get("/")
    async def index(request: Request):
        check_auth(request, settings, allow_query=True)
        return _static("index.html", "text/html; charset=utf-8")

    @router.get("/static/{name}")
    async def static_file(name: str, request: Request):
        if name not in STATIC_TYPES:
            raise oa.APIError(404, f"no static file {name!r}", code="not_found")
        return _static(name, STATIC_TYPES[name])

    @router.get("/stream.mjpg")
    async def mjpeg(request: Request):
        check_auth(request, settings, allow_query=True)
        return StreamingResponse(live.mjpeg(), media_type=f"multipart/x-mixed-replace; boundary={live.BOUNDARY}",
                                 headers={"Cache-Control": "no-cache, no-store", "Pragma": "no-cache"})

    @router.get("/captions")
    async def captions(request: Request):
        check_auth(request, settings, allow_query=True)
        return StreamingResponse(live.captions(), media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/camera/state")
    async def camera_state(request: Request):
        check_auth(request, settings, allow_query=True)
        return live.state()

    def the_watch():
        if live.watch is None:
            raise oa.APIError(404, "the camera watch is off: start the server with --watch-ask QUESTION "
                              "--watch-schema FILE", code="not_found")
        return live.watch

    @router.get("/watch/events")
    async def watch_events(request: Request):
        check_auth(request, settings, allow_query=True)
        return StreamingResponse(the_watch().events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @router.get("/watch/state")
    async def watch_state(request: Request):
        check_auth(request, settings, allow_query=True)
        return the_watch().state()

    return router
