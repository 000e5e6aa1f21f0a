"""Byte ranges of a source over HTTP: small index reads, and parallel span fetches.

The cut engine reads a source's container index with a few small Range
requests (:class:`RangeFetcher`), then fetches the byte spans a clip needs on
several connections at once (:class:`Prefetch`): a CDN that limits each
connection's rate serves a clip several times faster than one connection
(FFmpeg's own reader) can take it.

Blocking code by design: it runs in worker threads of the service (index
reads) and in the join processes (span fetches), never on the event loop.
Connections are kept alive and reused; each request reads its whole answer.
"""

from __future__ import annotations

import bisect
import contextlib
import http.client
import math
import os
import queue
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from urllib.parse import urlsplit

USER_AGENT = "clipservice"
READ_TIMEOUT_S = 15.0
# A span is split into parts of at least this size for parallel connections
# (smaller parts would spend more on request round trips than they save).
MIN_PART_BYTES = 256 * 1024
DEFAULT_CONNECTIONS = 4
# A span's answer is read in chunks of this size when progress is wanted.
_CHUNK_BYTES = 64 * 1024

_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class FetchError(Exception):
    """A read of the source failed: network, protocol, or an HTTP error status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def expired(self) -> bool:
        """The URL answered as a signed stream URL does once it expired (403/410)."""
        return self.status in (403, 410)


class RangeUnsupported(FetchError):
    """The server ignores Range requests: only a whole download would work."""


class Cancelled(Exception):
    """The fetch was stopped by its owner (the clip was cancelled or timed out)."""


@cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


@dataclass
class FetchStats:
    """What a fetcher has read: for logs, the benchmark and tests."""

    requests: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, size: int) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += size


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a given address (the host name only in headers)."""

    def __init__(self, host: str, port: int, *, timeout: float, address: str | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        if self._address is None:
            super().connect()
            return
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a given address, its certificate checked against
    the host name (SNI too)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        context: ssl.SSLContext,
        address: str | None,
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._tls = context

    def connect(self) -> None:
        if self._address is None:
            super().connect()
            return
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


class RangeFetcher:
    """Blocking Range reads of one URL over kept-alive connections (thread-safe).

    ``size_bytes`` is known after the first read (from ``Content-Range``).
    Redirects are not followed: the URL guard follows them itself, checking
    every hop, and hands over the final URL.
    """

    def __init__(
        self, url: str, *, timeout_s: float = READ_TIMEOUT_S, connect_to: str | None = None
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"not an http(s) URL: {url[:200]}")
        self.url = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._host_header = parts.netloc.rpartition("@")[2]
        self.timeout_s = timeout_s
        # The address to connect to, checked by the URL guard when it was
        # resolved: connections never resolve the host again (DNS rebinding).
        # TLS still checks the certificate against the host name.
        self.connect_to = connect_to
        self.size_bytes: int | None = None
        self.stats = FetchStats()
        # Hears each chunk's size as it arrives (a span's answer is read in
        # chunks): a slow source's clip shows progress while it downloads.
        self.on_bytes: Callable[[int], None] | None = None
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        if self._https:
            return _PinnedHTTPS(
                self._host,
                self._port,
                timeout=self.timeout_s,
                context=_tls_context(),
                address=self.connect_to,
            )
        return _PinnedHTTP(self._host, self._port, timeout=self.timeout_s, address=self.connect_to)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            # (After close(), a read still under way must not keep its socket.)
            if not self._closed and len(self._idle) < 16:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- reads ---------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end)."""
        if length <= 0:
            return b""
        if self.size_bytes is not None:
            if offset >= self.size_bytes:
                return b""
            length = min(length, self.size_bytes - offset)
        for attempt in range(2):
            # The retry takes a new connection: the other idle ones are likely
            # as stale (a server's keep-alive timeout closes them all).
            conn, reused = self._take() if attempt == 0 else (self._connect(), False)
            try:
                data = self._request(conn, offset, length)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if reused and attempt == 0:
                    continue  # a kept-alive connection the server had closed
                raise FetchError(f"the source closed the connection at byte {offset}") from None
            except FetchError:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise FetchError(f"reading the source failed: {exc}") from exc
            self._give_back(conn)
            self.stats.add(len(data))
            return data
        raise AssertionError("unreachable")

    def _request(self, conn: http.client.HTTPConnection, offset: int, length: int) -> bytes:
        conn.request(
            "GET",
            self._target,
            headers={
                "Host": self._host_header,
                "Range": f"bytes={offset}-{offset + length - 1}",
                "User-Agent": USER_AGENT,
                "Accept-Encoding": "identity",
            },
        )
        resp = conn.getresponse()
        if resp.status == 416:
            resp.read()
            total = _total_from(resp.getheader("Content-Range"))
            if total is not None:
                self.size_bytes = total
            return b""
        if resp.status == 200:
            total = _int_header(resp.getheader("Content-Length"))
            if offset == 0 and total is not None and total <= length:
                self.size_bytes = total
                return resp.read()
            conn.close()  # never read a whole video we did not ask for
            raise RangeUnsupported("the source does not answer Range requests", 200)
        if resp.status != 206:
            resp.read(64 * 1024)
            raise FetchError(f"the source answered: HTTP error {resp.status}", resp.status)
        match = _CONTENT_RANGE.fullmatch((resp.getheader("Content-Range") or "").strip())
        if match is None or match.group(1) is None or int(match.group(1)) != offset:
            raise FetchError("the source answered a different range than asked")
        if match.group(3) != "*":
            self.size_bytes = int(match.group(3))
        want = int(match.group(2)) - offset + 1
        if want > length:  # (before reading: it may be the rest of a whole video)
            raise FetchError(f"the source answered {want} bytes at byte {offset}, not {length}")
        if self.on_bytes is None:
            data = resp.read(want)
        else:
            chunks = []
            got = 0
            while got < want:
                chunk = resp.read(min(_CHUNK_BYTES, want - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
                self.on_bytes(len(chunk))
            data = b"".join(chunks)
        if len(data) != want:
            raise FetchError(f"short read at byte {offset}: {len(data)} of {want}")
        return data

    def probe_size(self) -> int:
        """The resource's size (one small read if not known yet)."""
        if self.size_bytes is None:
            self.read(0, 1)
        if self.size_bytes is None:
            raise FetchError("the source did not say its size")
        return self.size_bytes


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _total_from(content_range: str | None) -> int | None:
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None or match.group(3) == "*":
        return None
    return int(match.group(3))


# -- parallel span fetches ------------------------------------------------------


@dataclass
class _Part:
    offset: int
    size: int
    done: bool = False
    data: bytes | None = None  # in memory (else in the spill file)


class Prefetch:
    """Fetches byte spans of one resource on several connections at once, in
    priority order, and hands out any byte range of them once it has arrived.

    Each span is cut into parts (at least ``MIN_PART_BYTES``) so even one big
    span is read on every connection. ``priority`` lists span indexes whose
    parts are requested first (the others follow in file order): the cut
    engine asks for the GOPs it decodes first. Parts are kept in memory, or
    when the spans add up to more than ``spill_over_bytes``, written to
    ``spill_path`` (a long clip's bytes never sit in memory). ``check`` is
    called while waiting and may raise to stop (a deadline, a cancel flag).
    """

    def __init__(
        self,
        fetcher: RangeFetcher,
        spans: Sequence[tuple[int, int]],
        *,
        priority: Sequence[int] = (),
        connections: int = DEFAULT_CONNECTIONS,
        check: Callable[[], None] | None = None,
        spill_path: str | None = None,
        spill_over_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.fetcher = fetcher
        self.spans = list(spans)
        self._check = check
        total = sum(size for _, size in self.spans)
        connections = max(1, connections)
        self._fd: int | None = None
        self.spill_path = spill_path if spill_path and total > spill_over_bytes else None
        if self.spill_path is not None:
            self._fd = os.open(self.spill_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Parts as large as they can be while every connection gets work.
        part_bytes = max(MIN_PART_BYTES, math.ceil(total / (connections * 2)) if total else 1)
        first = list(dict.fromkeys(i for i in priority if 0 <= i < len(self.spans)))
        order = first + [i for i in range(len(self.spans)) if i not in set(first)]
        todo: list[_Part] = []
        for i in order:
            offset, size = self.spans[i]
            count = max(1, min(connections, math.ceil(size / part_bytes)))
            step = math.ceil(size / count)
            for k in range(count):
                begin = offset + k * step
                end = min(offset + size, begin + step)
                if end > begin:
                    todo.append(_Part(begin, end - begin))
        self._parts = sorted(todo, key=lambda p: p.offset)
        self._starts = [p.offset for p in self._parts]
        # Where each part lives in the spill file: parts packed in file order.
        self._spill_at: dict[int, int] = {}
        at = 0
        for part in self._parts:
            self._spill_at[part.offset] = at
            at += part.size
        self._todo: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        for part in todo:
            self._todo.put(part)
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, daemon=True, name="clip-fetch")
            for _ in range(min(connections, len(todo)))
        ]
        for _ in self._threads:
            self._todo.put(None)
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while True:
            part = self._todo.get()
            if part is None or self._stopped:
                return
            try:
                data = self.fetcher.read(part.offset, part.size)
                if len(data) != part.size:
                    raise FetchError(f"the source ended at byte {part.offset + len(data)}")
                with self._cond:  # (close() takes it too: never a write to a closed file)
                    if self._stopped:
                        return
                    if self._fd is not None:
                        os.pwrite(self._fd, data, self._spill_at[part.offset])
                    else:
                        part.data = data
                    part.done = True
                    self._cond.notify_all()
            except BaseException as exc:  # handed to the waiting reader
                with self._cond:
                    if self._error is None:
                        self._error = exc
                    self._cond.notify_all()
                return

    def _covering(self, offset: int, size: int) -> list[_Part]:
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        parts = []
        while i < len(self._parts) and self._parts[i].offset < offset + size:
            part = self._parts[i]
            if part.offset + part.size > offset:
                parts.append(part)
            i += 1
        covered = sum(min(p.offset + p.size, offset + size) - max(p.offset, offset) for p in parts)
        if covered != size:
            raise ValueError(f"bytes {offset}+{size} are not in the prefetched spans")
        return parts

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset + size) of the spans, waiting for them to arrive
        (raises the fetch's error, or what ``check`` raises)."""
        if size <= 0:
            return b""
        parts = self._covering(offset, size)
        with self._cond:
            while not all(p.done for p in parts):
                if self._error is not None:
                    raise self._error
                if self._stopped:
                    raise Cancelled
                self._cond.wait(0.1)
                if self._check is not None:
                    self._check()
            chunks = []
            for part in parts:
                begin = max(part.offset, offset) - part.offset
                end = min(part.offset + part.size, offset + size) - part.offset
                if part.data is not None:
                    chunks.append(part.data[begin:end])
                elif self._fd is not None:
                    at = self._spill_at[part.offset] + begin
                    chunks.append(os.pread(self._fd, end - begin, at))
                else:
                    raise Cancelled
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        """Stop fetching (parts under way finish their request; nothing new
        starts) and remove the spill file."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self.spill_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.spill_path)

    def join(self, timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
