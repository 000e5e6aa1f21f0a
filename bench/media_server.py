"""The benchmark's media server: loopback HTTP with Range, optionally throttled.

It runs in its own process, as a CDN would: the cases timed in the benchmark's
process (clipservice's threads) and those run as subprocesses (FFmpeg,
yt-dlp) meet the same server, none sharing a GIL with it.

One server answers both networks: ``/f/<path>`` at loopback speed and
``/t/<path>`` throttled per connection (a token bucket per TCP connection, as
a CDN limits each connection: several connections get several times the
rate). ``<path>`` is relative to the served root. It counts the bytes and
requests it answers, so a case's "MB fetched" is what really crossed the
wire (not what the client says it read).
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

_CHUNK_FAST = 256 * 1024
# Small writes when throttled: the rate is smooth at the scale of a frame.
_CHUNK_THROTTLED = 16 * 1024
# The bucket's depth: what a connection may send at once after being idle.
_BURST_BYTES = 128 * 1024
_TYPES = {
    ".mp4": "video/mp4",
    ".m4a": "audio/mp4",
    ".webm": "video/webm",
    ".mpd": "application/dash+xml",
}


class _Bucket:
    """A token bucket: ``rate`` bytes a second, at most ``_BURST_BYTES`` saved up."""

    def __init__(self, rate_bytes_s: float) -> None:
        self.rate = rate_bytes_s
        self.tokens = float(_BURST_BYTES)
        self.stamp = time.monotonic()

    def take(self, size: int) -> None:
        now = time.monotonic()
        self.tokens = min(_BURST_BYTES, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= size
        if self.tokens < 0:
            time.sleep(-self.tokens / self.rate)


def _serve_forever(root: Path, rate_bytes_s: float, port: Any, sent: Any, requests: Any) -> None:
    """The server process's body."""
    root = root.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def setup(self) -> None:
            # Bounded kernel buffers, so "sent" stays close to "read by the
            # client" (a client that has enough hangs up). Not smaller: a send
            # buffer under one write stalls on delayed ACKs (~40 ms each).
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().setup()
            self.bucket = _Bucket(rate_bytes_s)  # one per connection, kept across requests

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _file(self) -> tuple[Path | None, bool]:
            route, _, rel = unquote(self.path.split("?")[0]).lstrip("/").partition("/")
            if route not in ("f", "t"):
                return None, False
            path = (root / rel).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                return None, False
            return path, route == "t"

        def _serve(self, body: bool) -> None:
            with requests.get_lock():
                requests.value += 1
            path, throttled = self._file()
            if path is None:
                self.send_error(404)
                return
            size = path.stat().st_size
            first, last = 0, size - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].split(",")[0].partition("-")
                if a:
                    first, last = int(a), min(int(b), size - 1) if b else size - 1
                else:  # a suffix range: the last N bytes
                    first = max(0, size - int(b))
                if first > last:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", _TYPES.get(path.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            if not body:
                return
            self.wfile.flush()
            chunk = _CHUNK_THROTTLED if throttled else _CHUNK_FAST
            with path.open("rb") as fh:
                offset, left = first, last - first + 1
                try:
                    while left > 0:
                        size_now = min(chunk, left)
                        if throttled:
                            self.bucket.take(size_now)
                        done = self.connection.sendfile(fh, offset, size_now)
                        if not done:
                            break
                        with sent.get_lock():
                            sent.value += done
                        offset += done
                        left -= done
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port.value = httpd.server_address[1]
    httpd.serve_forever()


class MediaServer:
    """Serves the files under ``root`` at ``/f/…`` (loopback speed) and ``/t/…``
    (``throttle_mb_s`` megabytes a second per connection), in its own process."""

    def __init__(self, root: Path, *, throttle_mb_s: float) -> None:
        ctx = multiprocessing.get_context("fork")
        self.root = root.resolve()
        self.throttle_mb_s = throttle_mb_s
        self._port = ctx.Value("i", 0)
        self._sent = ctx.Value("q", 0)
        self._requests = ctx.Value("q", 0)
        self._proc = ctx.Process(
            target=_serve_forever,
            args=(self.root, throttle_mb_s * 1e6, self._port, self._sent, self._requests),
            daemon=True,
        )
        self.base = ""

    @property
    def bytes_sent(self) -> int:
        return int(self._sent.value)

    @property
    def requests(self) -> int:
        return int(self._requests.value)

    def __enter__(self) -> MediaServer:
        self._proc.start()
        deadline = time.monotonic() + 10
        while not self._port.value:
            if time.monotonic() > deadline or not self._proc.is_alive():
                raise RuntimeError("the media server did not start")
            time.sleep(0.01)
        self.base = f"http://127.0.0.1:{self._port.value}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)

    def url(self, path: Path, *, throttled: bool) -> str:
        rel = path.resolve().relative_to(self.root)
        return f"{self.base}/{'t' if throttled else 'f'}/{rel.as_posix()}"
