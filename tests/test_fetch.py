"""Range reads and parallel span fetches against a real loopback HTTP server."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from clipservice.media.fetch import Cancelled, FetchError, Prefetch, RangeFetcher, RangeUnsupported

MIB = 1024 * 1024
# The resource's bytes: a random block repeated (any size, computed, never stored).
BLOCK = random.Random(1).randbytes(65521)


def content(offset: int, size: int) -> bytes:
    out = bytearray()
    while size > 0:
        at = offset % len(BLOCK)
        chunk = BLOCK[at : at + size]
        out += chunk
        offset += len(chunk)
        size -= len(chunk)
    return bytes(out)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll ``predicate`` until it holds (a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never held")
        time.sleep(0.005)


@dataclass
class Request:
    """One request as the server saw it."""

    connection: int
    range: tuple[int, int] | None  # as asked
    status: int = 0
    sent_bytes: int = 0  # body bytes written
    done: bool = False


class Loopback:
    """A threaded HTTP/1.1 server on 127.0.0.1 serving ``/<size>`` resources.

    Options (server-wide in ``options``, or per URL in the query):
    ``range=ignore`` (200 with the whole body), ``range=open`` (206 with the
    rest of the resource from the asked start), ``status=N`` (answer N),
    ``rate=B`` (bytes per second per connection), ``drop=1`` (close the
    connection after each answer without saying so), ``short=close|length``
    (send half the body, then close, or with a Content-Length saying half),
    ``fail_at=O`` (500 for a range starting at O), ``hold=1`` (answer once
    ``release`` is set), ``hangup=1`` (close without answering), ``gate=N`` (the first N requests wait until N have
    arrived: proof of N requests at once).
    """

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.connections = 0
        self.open_connections = 0
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.options: dict[str, str] = {}
        self.release = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.loopback = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def url(self, size: int, **query: Any) -> str:
        host, port = self.httpd.server_address[:2]
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"http://{host!s}:{port}/{size}" + (f"?{qs}" if qs else "")

    @property
    def bytes_sent(self) -> int:
        with self.lock:
            return sum(r.sent_bytes for r in self.requests)

    def ranges(self) -> list[tuple[int, int] | None]:
        with self.lock:
            return [r.range for r in self.requests]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle kept-alive connections end on their own

    @property
    def loopback(self) -> Loopback:
        return self.server.loopback  # type: ignore[attr-defined,no-any-return]

    def setup(self) -> None:
        super().setup()
        # (Headers and body go out as separate writes: no Nagle delay between them.)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.loopback.lock:
            self.loopback.connections += 1
            self.loopback.open_connections += 1
            self.connection_id = self.loopback.connections

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.loopback.lock:
            self.loopback.open_connections -= 1

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()

    def do_GET(self) -> None:
        lb = self.loopback
        url = urlsplit(self.path)
        size = int(url.path.strip("/"))
        opts = {**lb.options, **dict(parse_qsl(url.query))}
        asked = None
        header = self.headers.get("Range", "")
        if header.startswith("bytes="):
            a, _, b = header[6:].partition("-")
            asked = (int(a), int(b))
        req = Request(self.connection_id, asked)
        with lb.lock:
            lb.requests.append(req)
            lb.in_flight += 1
            lb.max_in_flight = max(lb.max_in_flight, lb.in_flight)
            lb.lock.notify_all()
            if "gate" in opts:
                lb.lock.wait_for(lambda: len(lb.requests) >= int(opts["gate"]), timeout=10)
        try:
            if "hold" in opts:
                lb.release.wait(10)
            self._answer(req, size, opts)
        finally:
            with lb.lock:
                lb.in_flight -= 1
                req.done = True
                lb.lock.notify_all()

    def _answer(self, req: Request, size: int, opts: dict[str, str]) -> None:
        rate = int(opts.get("rate", 0))
        if "hangup" in opts:
            self.close_connection = True
            return
        if "status" in opts or (req.range and opts.get("fail_at") == str(req.range[0])):
            req.status = int(opts.get("status", 500))
            self._head(req.status, {"Content-Length": "4"})
            self._send(req, b"nope", rate)
            return
        if opts.get("range") == "ignore" or req.range is None:
            req.status = 200
            self._head(200, {"Content-Length": str(size)})
            self._send_content(req, 0, size, rate)
            return
        start, last = req.range
        if start >= size:
            req.status = 416
            self._head(416, {"Content-Range": f"bytes */{size}", "Content-Length": "0"})
            return
        last = size - 1 if opts.get("range") == "open" else min(last, size - 1)
        length = last - start + 1
        short = opts.get("short")
        sent = length // 2 if short else length
        req.status = 206
        self._head(
            206,
            {
                "Content-Range": f"bytes {start}-{last}/{size}",
                "Content-Length": str(sent if short == "length" else length),
            },
        )
        self._send_content(req, start, sent, rate)
        if short == "close" or opts.get("drop"):
            self.close_connection = True  # (no "Connection: close" was said)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def _send_content(self, req: Request, offset: int, size: int, rate: int) -> None:
        step = 64 * 1024 if not rate else max(1024, rate // 50)
        end = offset + size
        while offset < end:
            n = min(step, end - offset)
            if not self._send(req, content(offset, n), rate):
                return
            offset += n

    def _send(self, req: Request, data: bytes, rate: int) -> bool:
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
            return False
        with self.loopback.lock:
            req.sent_bytes += len(data)
        if rate:
            time.sleep(len(data) / rate)
        return True


@pytest.fixture
def server() -> Iterator[Loopback]:
    lb = Loopback()
    lb.start()
    yield lb
    lb.stop()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[BaseException]:
    """Exceptions that escape any thread during the test."""
    seen: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_value))
    return seen


# -- RangeFetcher ---------------------------------------------------------------------

SIZE = 100_000


def test_read_returns_exact_bytes_and_learns_the_size(server: Loopback) -> None:
    """Reads return exactly the asked bytes (fewer only at the end) and learn the size."""
    fetcher = RangeFetcher(server.url(SIZE))
    assert fetcher.size_bytes is None
    assert fetcher.read(1000, 5000) == content(1000, 5000)
    assert fetcher.size_bytes == SIZE
    assert fetcher.read(0, 1) == content(0, 1)
    assert fetcher.read(SIZE - 10, 100) == content(SIZE - 10, 10)
    assert server.ranges() == [(1000, 5999), (0, 0), (SIZE - 10, SIZE - 1)]
    # Past the end, with the size known: no request at all.
    assert fetcher.read(SIZE, 10) == b"" and fetcher.read(5, 0) == b""
    assert len(server.requests) == 3
    assert (fetcher.stats.requests, fetcher.stats.bytes) == (3, 5011)
    assert fetcher.probe_size() == SIZE and len(server.requests) == 3
    fetcher.close()


def test_on_bytes_hears_an_answer_in_chunks_as_it_arrives(server: Loopback) -> None:
    """With ``on_bytes`` set, a large answer is read in chunks and each chunk's size is
    heard before the read returns: the sizes add up to the bytes read, in several calls."""
    fetcher = RangeFetcher(server.url(SIZE))
    heard: list[int] = []
    fetcher.on_bytes = heard.append
    assert fetcher.read(0, SIZE) == content(0, SIZE)
    assert sum(heard) == SIZE and len(heard) >= 2 and max(heard) <= 64 * 1024
    fetcher.close()


def test_416_past_the_end_learns_the_size(server: Loopback) -> None:
    """A read past the end of a resource of unknown size answers nothing and learns the size."""
    fetcher = RangeFetcher(server.url(SIZE))
    assert fetcher.read(SIZE + 50, 10) == b""
    assert server.requests[0].status == 416
    assert fetcher.size_bytes == SIZE
    fetcher.close()


def test_connections_are_kept_alive_and_reused(server: Loopback) -> None:
    """Sequential reads share one TCP connection; parallel reads open one each, then reuse them."""
    fetcher = RangeFetcher(server.url(SIZE))
    for i in range(20):
        assert fetcher.read(i * 1000, 1000) == content(i * 1000, 1000)
    assert server.connections == 1 and len(server.requests) == 20
    # Three reads at once (the server holds requests until the 23rd arrived).
    server.options["gate"] = "23"
    results: dict[int, bytes] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, fetcher.read(i * 7, 700)))
        for i in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: content(i * 7, 700) for i in range(3)}
    assert server.connections == 3 and server.max_in_flight == 3
    for i in range(10):
        fetcher.read(i, 10)
    assert server.connections == 3
    fetcher.close()


def test_a_stale_kept_alive_connection_is_retried_once(server: Loopback) -> None:
    """A kept-alive connection the server has closed since is retried on a new one."""
    server.options["drop"] = "1"
    fetcher = RangeFetcher(server.url(SIZE))
    for i in range(3):
        assert fetcher.read(i * 100, 100) == content(i * 100, 100)
    # Each read after the first found its connection closed, and asked again.
    assert server.connections == 3 and len(server.requests) == 3
    fetcher.close()


def test_every_idle_connection_stale_still_reads(server: Loopback) -> None:
    """When the server dropped all kept-alive connections (an idle timeout), a read
    does not retry on another dead one: it succeeds on a new connection."""
    server.options.update(drop="1", gate="3")
    fetcher = RangeFetcher(server.url(SIZE))
    threads = [threading.Thread(target=fetcher.read, args=(i, 10)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.connections == 3
    wait_until(lambda: all(r.done for r in server.requests))
    assert fetcher.read(500, 10) == content(500, 10)
    assert server.connections == 4
    fetcher.close()


def test_a_new_connection_closed_early_is_an_error(server: Loopback) -> None:
    """A new connection closed without an answer is not retried: FetchError."""
    fetcher = RangeFetcher(server.url(SIZE, hangup=1))
    with pytest.raises(FetchError, match="closed the connection"):
        fetcher.read(0, 1000)
    assert len(server.requests) == 1 and server.connections == 1


@pytest.mark.parametrize("short", ["close", "length"])
def test_fewer_bytes_than_content_range_says(server: Loopback, short: str) -> None:
    """A body shorter than its Content-Range (connection closed, or a Content-Length
    saying so) is an error, never short data; the next read works."""
    fetcher = RangeFetcher(server.url(SIZE, short=short))
    with pytest.raises(FetchError, match="short read"):
        fetcher.read(1000, 2000)
    assert fetcher.stats.bytes == 0
    good = RangeFetcher(server.url(SIZE))
    assert good.read(1000, 2000) == content(1000, 2000)
    good.close()
    fetcher.close()


def test_a_200_answer_is_never_downloaded(server: Loopback) -> None:
    """A server ignoring Range offers a whole (1 GiB) body: RangeUnsupported, and
    the connection is dropped after the headers (the server gets to send little)."""
    fetcher = RangeFetcher(server.url(1024 * MIB, range="ignore"))
    with pytest.raises(RangeUnsupported) as caught:
        fetcher.read(5000, 100)
    assert caught.value.status == 200 and not caught.value.expired
    with pytest.raises(RangeUnsupported):
        fetcher.read(0, 100)  # from the start too: the body is larger than asked
    wait_until(lambda: len(server.requests) == 2 and all(r.done for r in server.requests))
    # (What the kernel's socket buffers took before the close: tens of MiB at most.)
    assert server.bytes_sent < 64 * MIB
    assert fetcher.stats.bytes == 0
    fetcher.close()


def test_a_206_answer_larger_than_asked_is_not_downloaded(server: Loopback) -> None:
    """A 206 answer with more than the asked range (the rest of a 1 GiB resource)
    is an error before its body is read."""
    fetcher = RangeFetcher(server.url(1024 * MIB, range="open"))
    with pytest.raises(FetchError, match="not 100"):
        fetcher.read(5000, 100)
    wait_until(lambda: all(r.done for r in server.requests))
    assert server.requests[0].range == (5000, 5099) and server.requests[0].status == 206
    assert server.bytes_sent < 64 * MIB  # of 1024 (socket buffers at most)
    fetcher.close()


def test_a_200_answer_smaller_than_asked_is_read(server: Loopback) -> None:
    """A whole body no larger than a read from byte 0 asked for is the answer (a tiny file)."""
    fetcher = RangeFetcher(server.url(5000, range="ignore"))
    assert fetcher.read(0, 8000) == content(0, 5000)
    assert fetcher.size_bytes == 5000
    fetcher.close()


@pytest.mark.parametrize(
    ("status", "expired"), [(403, True), (410, True), (404, False), (500, False)]
)
def test_http_errors(server: Loopback, status: int, expired: bool) -> None:
    """Error statuses raise FetchError with the status; 403/410 mean an expired URL,
    and the message says "HTTP error <status>" (the runner re-resolves on that text)."""
    fetcher = RangeFetcher(server.url(SIZE, status=status))
    with pytest.raises(FetchError) as caught:
        fetcher.read(0, 100)
    assert not isinstance(caught.value, RangeUnsupported)
    assert caught.value.status == status and caught.value.expired is expired
    assert f"HTTP error {status}" in str(caught.value)
    fetcher.close()


def test_a_server_too_slow_times_out(server: Loopback) -> None:
    """A server that does not answer within the timeout raises FetchError."""
    fetcher = RangeFetcher(server.url(SIZE, hold=1), timeout_s=0.2)
    with pytest.raises(FetchError, match="failed"):
        fetcher.read(0, 100)
    server.release.set()
    fetcher.close()


def test_not_http_urls_are_refused() -> None:
    """Only http(s) URLs are fetched."""
    for url in ("ftp://host/x", "file:///etc/passwd", "http:///nohost"):
        with pytest.raises(FetchError):
            RangeFetcher(url)


# -- Prefetch -------------------------------------------------------------------------


def test_prefetch_splits_a_span_over_parallel_connections(server: Loopback) -> None:
    """One 4 MiB span is fetched as four parts on four connections at once; any
    byte range of it reads back exactly, across part boundaries too."""
    server.options["gate"] = "4"
    fetcher = RangeFetcher(server.url(8 * MIB))
    span = (MIB // 2, 4 * MIB)
    prefetch = Prefetch(fetcher, [span], connections=4)
    assert prefetch.read(*span) == content(*span)
    assert sorted(server.ranges()) == [
        (MIB // 2 + i * MIB, MIB // 2 + (i + 1) * MIB - 1) for i in range(4)
    ]
    assert server.max_in_flight == 4 and server.connections == 4
    for offset, size in ((MIB // 2 + MIB - 10, 20), (MIB, 3 * MIB), (4 * MIB + MIB // 2 - 1, 1)):
        assert prefetch.read(offset, size) == content(offset, size)
    with pytest.raises(ValueError):
        prefetch.read(MIB // 2 - 1, 10)  # outside the spans
    prefetch.close()
    fetcher.close()


def test_prefetch_asks_for_priority_spans_first(server: Loopback) -> None:
    """Priority spans are requested first (unknown or repeated indexes ignored),
    the others in file order."""
    spans = [(0, MIB), (2 * MIB, MIB), (4 * MIB, MIB)]
    fetcher = RangeFetcher(server.url(8 * MIB))
    prefetch = Prefetch(fetcher, spans, priority=[2, 7, -1, 2], connections=1)
    assert prefetch.read(0, MIB) == content(0, MIB)
    assert prefetch.read(4 * MIB, MIB) == content(4 * MIB, MIB)
    wait_until(lambda: len(server.requests) == 3)
    assert server.ranges() == [(4 * MIB, 5 * MIB - 1), (0, MIB - 1), (2 * MIB, 3 * MIB - 1)]
    prefetch.close()
    fetcher.close()


def test_prefetch_parts_of_priority_spans_go_out_together(server: Loopback) -> None:
    """On two connections, the first two requests are the two parts of the priority span."""
    server.options["gate"] = "2"
    spans = [(0, MIB), (2 * MIB, MIB), (4 * MIB, MIB)]
    fetcher = RangeFetcher(server.url(8 * MIB))
    prefetch = Prefetch(fetcher, spans, priority=[1], connections=2)
    for offset, size in spans:
        assert prefetch.read(offset, size) == content(offset, size)
    ranges = server.ranges()
    assert len(ranges) == 6
    assert sorted(ranges[:2]) == [
        (2 * MIB, 2 * MIB + MIB // 2 - 1),
        (2 * MIB + MIB // 2, 3 * MIB - 1),
    ]
    prefetch.close()
    fetcher.close()


def test_prefetch_spills_to_a_file(server: Loopback, tmp_path: Path) -> None:
    """Spans larger than spill_over_bytes go to the spill file: it exists while the
    prefetch is open, serves the exact bytes, and is removed on close."""
    spill = tmp_path / "spill.bin"
    spans = [(100, 300_000), (1_000_000, 700_000)]
    fetcher = RangeFetcher(server.url(2 * MIB))
    prefetch = Prefetch(fetcher, spans, connections=3, spill_path=str(spill), spill_over_bytes=1000)
    assert spill.exists()
    for offset, size in (*spans, (1_000_000 + 350_000, 10), (100 + 299_990, 10)):
        assert prefetch.read(offset, size) == content(offset, size)
    assert spill.stat().st_size == 1_000_000
    prefetch.close()
    assert not spill.exists()
    with pytest.raises(Cancelled):
        prefetch.read(100, 10)
    # Under the limit, nothing is written.
    small = Prefetch(fetcher, spans, spill_path=str(spill), spill_over_bytes=10 * MIB)
    assert small.read(100, 10) == content(100, 10)
    assert not spill.exists()
    small.close()
    fetcher.close()


def test_check_stops_a_waiting_read(server: Loopback) -> None:
    """What ``check`` raises ends a read that waits for bytes that do not come."""
    calls = 0

    def check() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise TimeoutError("the clip's deadline passed")

    fetcher = RangeFetcher(server.url(SIZE, hold=1))
    prefetch = Prefetch(fetcher, [(0, 50_000)], check=check)
    with pytest.raises(TimeoutError, match="deadline"):
        prefetch.read(0, 10)
    assert calls == 3
    prefetch.close()
    server.release.set()
    prefetch.join()
    fetcher.close()


def test_an_error_in_one_part_is_raised_by_read(server: Loopback) -> None:
    """A part the server refuses makes read raise that fetch's error."""
    spans = [(0, 1000), (5000, 1000)]
    fetcher = RangeFetcher(server.url(SIZE, fail_at=5000))
    prefetch = Prefetch(fetcher, spans, connections=1)
    with pytest.raises(FetchError, match="HTTP error 500") as caught:
        prefetch.read(5000, 10)
    assert caught.value.status == 500
    with pytest.raises(FetchError):
        prefetch.read(5500, 10)
    assert prefetch.read(0, 1000) == content(0, 1000)  # (that part did arrive)
    prefetch.close()
    fetcher.close()


def test_a_short_resource_is_an_error(server: Loopback) -> None:
    """A span past the resource's end is an error, not short bytes."""
    fetcher = RangeFetcher(server.url(SIZE))
    prefetch = Prefetch(fetcher, [(SIZE - 100, 200)])
    with pytest.raises(FetchError, match="ended"):
        prefetch.read(SIZE - 100, 10)
    prefetch.close()
    fetcher.close()


def test_close_while_parts_are_in_flight(
    server: Loopback, tmp_path: Path, thread_errors: list[BaseException]
) -> None:
    """Closing while throttled parts are still arriving stops the fetch cleanly:
    no exception in any thread, no spill file, and a waiting read is cancelled."""
    spill = tmp_path / "spill.bin"
    fetcher = RangeFetcher(server.url(8 * MIB, rate=2 * MIB))
    prefetch = Prefetch(
        fetcher, [(0, 4 * MIB)], connections=4, spill_path=str(spill), spill_over_bytes=0
    )
    wait_until(lambda: server.in_flight == 4 and server.bytes_sent > 0)
    waiting: list[BaseException] = []

    def reader() -> None:
        try:
            prefetch.read(0, 4 * MIB)
        except BaseException as exc:
            waiting.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    prefetch.close()
    fetcher.close()  # (as the join's feed does: the parts are still under way)
    assert not spill.exists()
    thread.join(5)
    assert not thread.is_alive() and [type(e) for e in waiting] == [Cancelled]
    prefetch.join(10)
    assert not any(t.is_alive() for t in prefetch._threads)
    assert not spill.exists() and thread_errors == []
    assert len(server.requests) == 4  # nothing new started
    # The parts that were under way when the fetcher closed kept no connection open.
    wait_until(lambda: server.open_connections == 0)
