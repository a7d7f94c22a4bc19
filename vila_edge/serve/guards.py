"""The server's outermost layer (pure ASGI): browser-borne attacks refused, every response counted, and no
request ends its connection with an unhandled exception.

- A web page the user visits can POST to a loopback server (CSRF) or, after pointing its own domain at
  127.0.0.1, read the answers (DNS rebinding). So the API takes only `application/json` bodies (a browser
  cannot send those cross-origin without a preflight, which this server does not grant), and when no API key
  is set the Host header must be an IP literal, `localhost` or a configured name, and an Origin header, if
  present, must name the same host.
- Responses are counted by route and status here, 5xx included: an exception that escapes a route becomes a
  JSON 500 sent by this layer (Starlette would re-raise it after its own 500, and the server would drop the
  keep-alive connection).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from urllib.parse import urlsplit

from vila_edge.serve import openai_schema as oa

log = logging.getLogger("vila_edge.serve")

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/stats", "/", "/stream.mjpg", "/captions",
          "/camera/state", "/watch/events", "/watch/state")
JSON_POSTS = ("/v1/chat/completions",)


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/static/"):
        return "/static"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return "other"


def host_name(value: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1', '[::1]:8000' -> '::1', 'Example.COM' -> 'example.com'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def trusted_host(name: str, allowed_names: Sequence[str]) -> bool:
    if name in ("localhost", *allowed_names):
        return True
    try:
        ipaddress.ip_address(name)  # an address, not a name an attacker's DNS could point here
        return True
    except ValueError:
        return False


class RequestGuard:
    def __init__(self, app, metrics, api_key_set: bool, allowed_hosts: Sequence[str] = ()):
        self.app, self.metrics = app, metrics
        self.api_key_set = api_key_set
        self.allowed_hosts = tuple(host_name(h) for h in allowed_hosts if h)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = route_label(scope.get("path", ""))
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.inc(1, route, str(message["status"]))
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            return await self._send_error(counting_send, refusal)
        try:
            await self.app(scope, receive, counting_send)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer 500, keep the connection
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await self._send_error(counting_send, oa.APIError(
                    500, "internal server error (see the server log)", type="server_error", code="internal_error"))

    def refusal(self, scope) -> oa.APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.api_key_set:
            host = host_name(headers.get("host", ""))
            if not trusted_host(host, self.allowed_hosts):
                return oa.APIError(403, f"Host {host!r} is not this server's; use its address or localhost",
                                   type="permission_error", code="untrusted_host")
            origin = headers.get("origin")
            if origin is not None and origin != "null" and host_name(urlsplit(origin).netloc) != host:
                return oa.APIError(403, "cross-origin requests are refused; call the API from your own code or set "
                                        "--api-key", type="permission_error", code="cross_origin")
        if scope.get("method") == "POST" and scope.get("path") in JSON_POSTS:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                return oa.APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                                   code="unsupported_media_type")
        return None

    @staticmethod
    async def _send_error(send, err: oa.APIError) -> None:
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), str(v).encode()) for k, v in (err.headers or {}).items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
