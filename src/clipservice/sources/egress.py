"""The egress proxy: FFmpeg and PyAV reach sources only through it.

FFmpeg and PyAV resolve host names themselves, after the URL guard has
checked them: a name that answers a public address to the check and a
private one to FFmpeg a moment later (DNS rebinding) would reach the private
address. So they are given this proxy (FFmpeg's ``http_proxy`` option), which
resolves the destination itself, checks every address with the guard's rules
(:func:`~clipservice.sources.guard.approved_address`) and connects to the
checked address, in one step: the check and the connection cannot disagree.

It speaks the two forms an HTTP client uses with a proxy: ``CONNECT
host:port`` (a tunnel, for https: TLS still runs end to end between FFmpeg
and the source) and absolute-form requests (``GET http://host/path``, for
plain http). It listens on loopback only, one thread per connection, and
carries only what FFmpeg's reads need (the cut engine's own connections do
not go through it: they connect to checked addresses directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from clipservice.errors import SourceError
from clipservice.media.ffmpeg import egress_proxy, use_egress_proxy
from clipservice.sources.guard import AddressPolicy, approved_address, is_forbidden_address

_HEAD_LIMIT = 64 * 1024
_IDLE_TIMEOUT_S = 60.0
_CONNECT_TIMEOUT_S = 15.0
_BUFFER = 256 * 1024


@dataclass
class EgressStats:
    """What the proxy did (for tests and logs)."""

    tunnels: int = 0
    requests: int = 0
    refused: int = 0
    # (monotonic time, host) of the latest refusals: a failed FFmpeg run asks
    # whether the proxy refused it (a policy refusal, not a broken source).
    refusals: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=64))


class EgressProxy:
    """A loopback proxy that connects only to addresses the URL guard allows.

    ``start()`` binds an ephemeral port on 127.0.0.1 and serves on a daemon
    thread; ``url`` is what FFmpeg's ``http_proxy`` option takes; ``close()``
    stops it.
    """

    def __init__(
        self, *, allow_private: bool, policy: AddressPolicy = is_forbidden_address
    ) -> None:
        self.allow_private = allow_private
        self.policy = policy
        self.stats = EgressStats()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    @property
    def url(self) -> str:
        if self._listener is None:
            raise RuntimeError("the egress proxy is not started")
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def start(self) -> EgressProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        listener.settimeout(0.5)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, daemon=True, name="egress-proxy")
        self._thread.start()
        return self

    def refused_since(self, t0: float) -> list[str]:
        """Hosts the proxy refused (as forbidden) since monotonic time ``t0``."""
        with self._lock:
            return [host for at, host in self.stats.refusals if at >= t0]

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._listener is not None:
            self._listener.close()

    def _serve(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(
                target=self._handle, args=(client,), daemon=True, name="egress-conn"
            ).start()

    # -- one client connection ---------------------------------------------------

    def _handle(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(_IDLE_TIMEOUT_S)
            head, rest = _read_head(client)
            if head is None:
                return
            request_line, _, header_block = head.partition(b"\r\n")
            parts = request_line.decode("latin-1").split(" ")
            if len(parts) != 3:
                _answer(client, 400, "Bad Request")
                return
            method, target, version = parts
            if method.upper() == "CONNECT":
                host, _, port_text = target.rpartition(":")
                if not host or not port_text.isdigit():
                    _answer(client, 400, "Bad Request")
                    return
                upstream = self._connect(client, host.strip("[]"), int(port_text))
                if upstream is None:
                    return
                with self._lock:
                    self.stats.tunnels += 1
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                if rest:
                    upstream.sendall(rest)
            else:
                url = urlsplit(target)
                if url.scheme != "http" or not url.hostname:
                    _answer(client, 400, "Bad Request")
                    return
                upstream = self._connect(client, url.hostname, url.port or 80)
                if upstream is None:
                    return
                with self._lock:
                    self.stats.requests += 1
                path = (url.path or "/") + (f"?{url.query}" if url.query else "")
                headers = [
                    line
                    for line in header_block.split(b"\r\n")
                    if line
                    and not line.lower().startswith((b"proxy-", b"connection:", b"keep-alive:"))
                ]
                upstream.sendall(
                    f"{method} {path} {version}\r\n".encode("latin-1")
                    + b"".join(line + b"\r\n" for line in headers)
                    + b"Connection: close\r\n\r\n"
                    + rest
                )
            _pipe(client, upstream)
        except (OSError, UnicodeError):
            pass
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _connect(self, client: socket.socket, host: str, port: int) -> socket.socket | None:
        """Resolve, check and connect in one step; answer the client if refused."""
        try:
            address = approved_address(
                host, port, allow_private=self.allow_private, policy=self.policy
            )
        except SourceError as exc:
            with self._lock:
                self.stats.refused += 1
                if exc.code == "source_forbidden":
                    self.stats.refusals.append((time.monotonic(), host))
            if exc.code == "source_forbidden":
                _answer(client, 403, "Forbidden", exc.message)
            else:
                _answer(client, 502, "Bad Gateway", exc.message)
            return None
        try:
            sock = socket.create_connection((str(address), port), _CONNECT_TIMEOUT_S)
        except OSError as exc:
            _answer(client, 502, "Bad Gateway", f"cannot connect to {host}: {exc}")
            return None
        sock.settimeout(_IDLE_TIMEOUT_S)
        return sock


@contextlib.asynccontextmanager
async def ffmpeg_egress(*, allow_private: bool) -> AsyncIterator[EgressProxy | None]:
    """While inside, this process's FFmpeg runs and PyAV opens of sources go
    through an egress proxy (see :func:`clipservice.media.ffmpeg.use_egress_proxy`).

    With ``allow_private`` there is no address to refuse, so no proxy: FFmpeg
    connects directly.
    """
    if allow_private:
        yield None
        return
    proxy = EgressProxy(allow_private=False).start()
    use_egress_proxy(proxy)
    try:
        yield proxy
    finally:
        if egress_proxy() is proxy:
            use_egress_proxy(None)
        await asyncio.to_thread(proxy.close)


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    """The request head (up to the blank line) and any bytes read past it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(8192)
        if not chunk:
            return None, b""
        data += chunk
        if len(data) > _HEAD_LIMIT:
            _answer(sock, 431, "Request Header Fields Too Large")
            return None, b""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _answer(sock: socket.socket, status: int, reason: str, detail: str = "") -> None:
    body = (detail or reason).encode()
    with contextlib.suppress(OSError):
        sock.sendall(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes (or stays idle too long)."""
    selector = selectors.DefaultSelector()
    selector.register(a, selectors.EVENT_READ, b)
    selector.register(b, selectors.EVENT_READ, a)
    try:
        while True:
            events = selector.select(_IDLE_TIMEOUT_S)
            if not events:
                return
            for key, _ in events:
                source: socket.socket = key.fileobj  # type: ignore[assignment]
                data = source.recv(_BUFFER)
                if not data:
                    return
                key.data.sendall(data)
    finally:
        selector.close()
