"""Request context: request ids, trusted X-Forwarded-* headers, one access log line.

- ``X-Request-ID``: a caller's id is kept when it is 1-128 characters of
  ``[A-Za-z0-9._:-]`` (so it is safe in logs and headers), else a new one is
  made; it is bound into structlog's context for every line logged while the
  request is handled (and by the job it creates), and echoed on the response.
- ``X-Forwarded-For`` / ``-Proto`` / ``-Host`` are believed only when the
  connection comes from ``server.trusted_proxies`` (addresses or CIDR
  networks). The client is the rightmost address in X-Forwarded-For that is
  not itself a trusted proxy, so a client cannot forge its address by
  sending the header itself.
- One canonical ``request`` log line per request, with method, route, status,
  time and bytes, also counted in the Prometheus metrics.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from clipservice.api.appkeys import METRICS

access_log = structlog.get_logger("clipservice.access")

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID = web.RequestKey("request_id", str)
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Trusted proxies as networks; a bare address is a one-address network."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in entries)


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # "[::1]:443"
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # "1.2.3.4:5678"
        value = value.split(":")[0]
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def _trusted(addr: str | None, networks: tuple[Network, ...]) -> bool:
    ip = _ip(addr) if addr else None
    return ip is not None and any(ip in net for net in networks)


def client_address(peer: str | None, forwarded_for: str, networks: tuple[Network, ...]) -> str:
    """The client's address: walk X-Forwarded-For from the right past trusted proxies."""
    if not _trusted(peer, networks):
        return peer or ""
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if _ip(hop) is None:
            break  # garbage: stop believing the chain here
        if not _trusted(hop, networks):
            return str(_ip(hop))
    return peer or ""


def request_id_for(header: str | None) -> str:
    if header and _REQUEST_ID_RE.match(header):
        return header
    return uuid.uuid4().hex


def make_context_middleware(trusted_proxies: Iterable[str]) -> Middleware:
    networks = parse_networks(trusted_proxies)

    @web.middleware
    async def context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = request_id_for(request.headers.get(REQUEST_ID_HEADER))
        request[REQUEST_ID] = rid
        peer = request.remote
        if networks and _trusted(peer, networks):
            forwarded_for = request.headers.get("X-Forwarded-For", "")
            proto = request.headers.get("X-Forwarded-Proto", "").strip().lower()
            host = request.headers.get("X-Forwarded-Host", "").strip()
            request = request.clone(
                remote=client_address(peer, forwarded_for, networks),
                scheme=proto if proto in ("http", "https") else request.scheme,
                host=host if host and host.isprintable() and " " not in host else request.host,
            )
        status = 500
        response: web.StreamResponse | None = None
        deferred = False
        with structlog.contextvars.bound_contextvars(request_id=rid):
            try:
                response = await handler(request)
                status = response.status
                if isinstance(response, web.FileResponse) and not response.prepared:
                    # A file's answer (200, 206, 304, 416) is decided only
                    # when aiohttp prepares it, after this middleware: the
                    # line is written then (see _log_when_prepared).
                    request[_DEFERRED_LOG] = functools.partial(
                        _log_request, request, t0, structlog.contextvars.get_contextvars()
                    )
                    deferred = True
                return response
            except web.HTTPException as exc:  # redirects; the problem middleware took the rest
                status = exc.status
                exc.headers[REQUEST_ID_HEADER] = rid
                raise
            finally:
                if not deferred:
                    _log_request(request, t0, None, status, _body_bytes(response))

    return context_middleware


# (Typed as object: a RequestKey cannot name a callable's type; read back with cast.)
_DEFERRED_LOG = web.RequestKey("deferred_log", object)


def _log_request(
    request: web.Request,
    t0: float,
    context: dict[str, Any] | None,
    status: int,
    size: int | None,
) -> None:
    """The request's one access line and its HTTP metrics."""
    elapsed_s = time.perf_counter() - t0
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.http_requests.labels(request.method, route, str(status)).inc()
        metrics.http_seconds.labels(route).observe(elapsed_s)
    with structlog.contextvars.bound_contextvars(**(context or {})):
        access_log.info(
            "request",
            method=request.method,
            path=request.path,
            route=route,
            status=status,
            duration_ms=round(elapsed_s * 1000, 2),
            bytes=size,
            remote=request.remote,
            scheme=request.scheme,
            user_agent=request.headers.get("User-Agent"),
        )


async def _log_when_prepared(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the deferred line of a file answer, with its real status."""
    deferred = cast("Callable[[int, int | None], None] | None", request.get(_DEFERRED_LOG))
    if deferred is not None:
        del request[_DEFERRED_LOG]
        deferred(response.status, response.content_length)


def _body_bytes(response: web.StreamResponse | None) -> int | None:
    """The response body's size as far as it is known when the request is logged."""
    if response is None:
        return None
    if response.content_length is not None:
        return response.content_length
    body = getattr(response, "body", None)
    return len(body) if isinstance(body, bytes | bytearray) else None


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones too, carries the request id."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[REQUEST_ID_HEADER] = rid


def setup(app: web.Application, trusted_proxies: Iterable[str]) -> None:
    """Put the context middleware first (outermost) and tag every response."""
    app.middlewares.insert(0, make_context_middleware(trusted_proxies))
    app.on_response_prepare.append(add_request_id_header)
    app.on_response_prepare.append(_log_when_prepared)
