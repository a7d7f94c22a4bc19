"""Fetch an image_url over http(s) without letting a client reach what only the server can reach (SSRF).

- Every connection's address is checked when it is made (a network backend wraps the TCP connect): the host
  name is resolved once, and every address must be public (not loopback, private, link-local, multicast,
  reserved, unspecified) unless an operator allowed its network (`--allow-image-network 192.168.1.0/24` for
  LAN cameras). Checking at connect time, not before the request, leaves no window for DNS rebinding.
- Redirects are followed by hand (at most 3), each hop checked the same way; only http and https.
- One deadline for the whole fetch (slow-drip servers cannot hold a request), a byte cap while reading.
- One generic error for every failure: the client learns nothing about ports, statuses or hosts behind us.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from urllib.parse import urljoin, urlsplit

import httpcore

from vila_edge.serve import openai_schema as oa

MAX_REDIRECTS = 3
FETCH_FAILED = "cannot fetch the image from this URL; send it as a data URL instead"


class BlockedAddress(Exception):
    pass


class TooLarge(Exception):
    pass


def parse_networks(specs: Sequence[str], flag: str = "--allow-image-network",
                   ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    from vila_edge.errors import VilaEdgeError

    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec, strict=False))
        except ValueError:
            raise VilaEdgeError(f"{flag} {spec!r}: not a network; use CIDR, e.g. 192.168.1.0/24") from None
    return tuple(out)


LOOPBACK_NETWORKS = parse_networks(["127.0.0.0/8", "::1/128"])


async def post_json(url: str, payload: dict, deadline_s: float, allowed_networks: Sequence = ()) -> int:
    """POST `payload` to a webhook: only loopback and `allowed_networks` addresses (never public ones unless
    allowed), checked at connect time like image fetches; no redirects. Returns the HTTP status; raises
    BlockedAddress, ValueError (not http/https) or httpcore's errors."""
    import json

    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(url)
    body = json.dumps(payload).encode()
    timeouts = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
    backend = CheckedBackend((*LOOPBACK_NETWORKS, *allowed_networks), public=False)
    async with httpcore.AsyncConnectionPool(network_backend=backend, retries=0, max_connections=1) as pool:
        resp = await asyncio.wait_for(pool.request(
            "POST", url, content=body, extensions={"timeout": timeouts},
            headers={"Content-Type": "application/json", "User-Agent": "vila-edge"}), deadline_s)
        return resp.status


def address_allowed(ip: str, allowed_networks: Sequence = (), *, public: bool = True) -> bool:
    """May we connect to `ip`? Addresses in `allowed_networks`, else public ones (`public`: image fetches;
    webhooks pass False and list loopback themselves)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if any(addr in net for net in allowed_networks):
        return True
    return public and addr.is_global and not addr.is_multicast


class CheckedBackend(httpcore.AnyIOBackend):
    """httpcore's own backend, connecting only to addresses that `address_allowed` accepts."""

    def __init__(self, allowed_networks: Sequence = (), *, public: bool = True):
        self.allowed_networks = tuple(allowed_networks)
        self.public = public

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [info[4][0] for info in infos]
        if not addresses or not all(address_allowed(a, self.allowed_networks, public=self.public)
                                    for a in addresses):
            raise BlockedAddress(host)
        # Connect to the checked address itself; TLS still verifies the certificate against the URL's host name.
        return await super().connect_tcp(addresses[0], port, timeout=timeout, local_address=local_address,
                                         socket_options=socket_options)


async def fetch_image(ref: oa.ImageRef, limits: oa.Limits, deadline_s: float, allowed_networks: Sequence = ()) -> bytes:
    """The bytes at `ref.url` (at most `limits.max_image_bytes`), or a 400 APIError with one generic message."""
    try:
        return await asyncio.wait_for(_fetch(ref.url, limits.max_image_bytes, deadline_s, allowed_networks), deadline_s)
    except TooLarge:
        raise oa.bad(f"the remote image exceeds {limits.max_image_bytes} bytes", ref.param, "image_too_large") from None
    except (asyncio.TimeoutError, BlockedAddress, httpcore.TimeoutException, httpcore.NetworkError,
            httpcore.ProtocolError, httpcore.UnsupportedProtocol, OSError, ValueError, UnicodeError):
        raise oa.bad(FETCH_FAILED, ref.param, "image_fetch_failed") from None


async def _fetch(url: str, max_bytes: int, deadline_s: float, allowed_networks) -> bytes:
    timeouts = {"connect": deadline_s, "read": deadline_s, "write": deadline_s, "pool": deadline_s}
    async with httpcore.AsyncConnectionPool(network_backend=CheckedBackend(allowed_networks), retries=0,
                                            max_connections=1) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(url)
            async with pool.stream("GET", url, headers={"Accept": "image/*", "User-Agent": "vila-edge"},
                                   extensions={"timeout": timeouts}) as resp:
                if resp.status in (301, 302, 303, 307, 308):
                    location = dict((k.lower(), v) for k, v in resp.headers).get(b"location")
                    if not location:
                        raise ValueError("redirect without a location")
                    url = urljoin(url, location.decode("latin-1"))
                    continue
                if resp.status != 200:
                    raise ValueError(resp.status)
                buf = bytearray()
                async for piece in resp.aiter_stream():
                    buf += piece
                    if len(buf) > max_bytes:
                        raise TooLarge
                return bytes(buf)
        raise ValueError("too many redirects")
