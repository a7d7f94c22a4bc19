"""OpenAI-compatible HTTP server (`vila-edge serve`) and the live camera page.

    from vila_edge.serve import create_app, ServeSettings, BackgroundServer
    with BackgroundServer(create_app(engine)) as srv:   # uvicorn on 127.0.0.1, a free port, in a thread
        openai.OpenAI(base_url=srv.url + "/v1", api_key="-")...

Needs the `serve` extra (fastapi, uvicorn, httpx). `vila_edge.serve.cluster` runs the same app as a Ray Serve
deployment (`vila-edge serve --cluster`, the `ray` extra).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time

from vila_edge.errors import VilaEdgeError


def create_app(*args, **kwargs):
    from vila_edge.serve.app import create_app as _create

    return _create(*args, **kwargs)


def __getattr__(name):
    if name == "ServeSettings":
        from vila_edge.serve.app import ServeSettings

        return ServeSettings
    if name == "Limits":
        from vila_edge.serve.openai_schema import Limits

        return Limits
    raise AttributeError(name)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts, so a busy port is a clear one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise VilaEdgeError(f"--host {host!r}: cannot resolve ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and accepted sockets
    # inherit it. With Nagle on, every keep-alive request after the first waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise VilaEdgeError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, log_level: str, on_stop=None):
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            begin = getattr(getattr(app, "state", None), "begin_shutdown", None)
            if begin is not None:  # end the never-ending streams (camera page) now; chat requests may finish
                begin()
            await super().shutdown(sockets=sockets)
            if on_stop is not None:
                on_stop()

    # keep-alive longer than clients' idle expiry (httpx: 5 s), so a client never reuses a connection that the
    # server is closing at that very moment (a ReadError on a request the server never saw)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=30,
                            timeout_keep_alive=30, lifespan="on", http="h11", ws="none", loop="asyncio")
    return Server(config)


def run(app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info", on_listen=None, on_stop=None,
        sock: socket.socket | None = None) -> None:
    """Serve `app` until Ctrl-C / SIGTERM. `on_listen(url)` is called once the port is bound (port 0: a free one),
    `on_stop()` after a graceful shutdown. As uvicorn does, a SIGTERM is re-raised after the graceful shutdown,
    so the process ends with the usual "terminated by SIGTERM" status."""
    sock = sock or bind_socket(host, port)
    h, p = sock.getsockname()[:2]
    if on_listen is not None:
        on_listen(f"http://{'[' + h + ']' if ':' in h else h}:{p}")
    server = _uvicorn_server(app, log_level, on_stop)
    server.run(sockets=[sock])


class BackgroundServer:
    """uvicorn serving `app` in a daemon thread on 127.0.0.1 and a free port (tests, benchmarks, notebooks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning"):
        self.app = app
        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = _uvicorn_server(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="vila-edge-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 40.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
