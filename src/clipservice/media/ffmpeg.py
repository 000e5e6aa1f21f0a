"""Running FFmpeg: one subprocess, always bounded, always reaped.

Every run uses an argument list (never a shell), drains stderr into a bounded
tail for error messages, reads ``-progress pipe:1`` for live progress, and is
wrapped in ``asyncio.wait_for``. On timeout or cancellation the process is
terminated, given a moment, killed, and waited for, so no FFmpeg outlives
its clip.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import cache
from typing import TYPE_CHECKING, cast

import structlog

if TYPE_CHECKING:
    from clipservice.sources.egress import EgressProxy

log = structlog.get_logger(__name__)

# Protocols FFmpeg may open for sources. Nothing local (file:, concat:,
# subfile:, pipe:…) so a crafted URL or playlist cannot read the disk.
# (httpproxy: the CONNECT tunnel through the egress proxy, for https.)
NETWORK_PROTOCOLS = "http,https,tcp,tls,httpproxy"

# Demuxers FFmpeg and PyAV may use for sources: plain media containers only.
# Playlist and reference formats (hls, dash, concat, …) are left out, so a
# crafted playlist can neither read local files nor reach addresses the URL
# guard never saw. The mov demuxer keeps external references (drefs) off.
SOURCE_FORMATS = "mov,mp4,m4a,3gp,matroska,webm,mpegts,flv,mp3,aac,ogg,wav"

# Options for every network input (FFmpeg flags and PyAV open options alike).
# Redirects are off: the URL guard follows them itself, checking each hop, and
# hands over the final URL.
SOURCE_INPUT_OPTIONS = {
    "protocol_whitelist": NETWORK_PROTOCOLS,
    "format_whitelist": SOURCE_FORMATS,
    "max_redirects": "0",
}

ProgressCallback = Callable[[float], None]

_TERM_GRACE_S = 0.5
_HTTP_ERROR_RE = re.compile(r"HTTP error [45]\d\d")
# Lines put first in an error's message (its tail may be cut): a full disk.
_NO_SPACE_RE = re.compile(r"No space left on device|Disk quota exceeded")
# FFmpeg runs at a lower CPU priority than the API: with several encodes on a
# few cores the event loop would otherwise wait its turn behind every encoder
# thread, and status polls and event streams would stall while clips cut.
FFMPEG_NICE = 10

running_processes: set[asyncio.subprocess.Process] = set()


class FFmpegError(Exception):
    """FFmpeg exited non-zero; the message is the tail of its stderr. ``forbidden``
    names the hosts the egress proxy refused during the run (a policy refusal)."""

    def __init__(
        self, returncode: int | None, stderr_tail: str, forbidden: Sequence[str] = ()
    ) -> None:
        super().__init__(f"ffmpeg exited with {returncode}: {stderr_tail}")
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.forbidden = list(forbidden)


class _Egress:
    """This process's egress proxy (see :mod:`clipservice.sources.egress`), if any:
    FFmpeg reaches sources through it (the ``http_proxy`` environment variable,
    which FFmpeg's http and tls protocols honour), and PyAV's opens too."""

    proxy: EgressProxy | None = None


def use_egress_proxy(proxy: EgressProxy | None) -> None:
    """Send every FFmpeg run and PyAV open of this process through ``proxy``."""
    _Egress.proxy = proxy


def egress_proxy() -> EgressProxy | None:
    return _Egress.proxy


def _child_env() -> dict[str, str] | None:
    proxy = _Egress.proxy
    if proxy is None:
        return None
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "no_proxy")}
    env["http_proxy"] = proxy.url
    return env


@cache
def bundled_ffmpeg() -> str:
    import imageio_ffmpeg

    return str(imageio_ffmpeg.get_ffmpeg_exe())


def ffmpeg_exe(configured: str = "") -> str:
    return configured or bundled_ffmpeg()


async def _read_progress(
    stream: asyncio.StreamReader, on_progress: ProgressCallback | None
) -> None:
    async for raw in stream:
        line = raw.decode("ascii", "replace").strip()
        if on_progress is None or not line.startswith("out_time_us="):
            continue
        value = line.partition("=")[2]
        if value.isdigit():
            on_progress(int(value) / 1_000_000)


async def _read_stderr(
    stream: asyncio.StreamReader, tail: deque[str], http_errors: list[str], notable: list[str]
) -> None:
    async for raw in stream:
        line = raw.decode("utf-8", "replace").rstrip()
        tail.append(line)
        if len(http_errors) < 3 and _HTTP_ERROR_RE.search(line):
            http_errors.append(line)
        elif len(notable) < 1 and _NO_SPACE_RE.search(line):
            notable.append(line)


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """Terminate, wait briefly, kill, wait: the process is gone when this returns."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        # FFmpeg runs in its own session; signal the group so helpers die too.
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), _TERM_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return cast("Callable[..., int]", ctypes.CDLL(None, use_errno=True).prctl)
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the FFmpeg child between fork and exec (after setsid).

    - Parent-death signal: if the service dies hard (kill -9), the kernel kills
      FFmpeg too, so no FFmpeg outlives it even without a graceful stop.
    - Lower priority for the process and, under Linux autogroup scheduling, for
      its session's group (thread nice values do not count across groups), so
      cutting never starves the event loop that serves the API.

    Only async-signal-safe-ish calls here: no locks, no logging.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    with contextlib.suppress(OSError):
        os.nice(FFMPEG_NICE)
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as fh:
        fh.write(str(FFMPEG_NICE))


async def run_ffmpeg(
    args: Sequence[str],
    *,
    timeout_s: float,
    ffmpeg_path: str = "",
    on_progress: ProgressCallback | None = None,
    stdin_fd: int | None = None,
) -> None:
    """Run FFmpeg with ``args``; raise FFmpegError, TimeoutError or CancelledError.

    ``stdin_fd``: the read end of a pipe FFmpeg reads an input from (``pipe:0``);
    this takes it over and closes it once FFmpeg has its own copy (or could not
    start), so the writer sees a broken pipe as soon as FFmpeg is gone."""
    exe = ffmpeg_exe(ffmpeg_path)
    argv = [exe, "-hide_banner", "-nostdin", "-y", "-progress", "pipe:1", "-nostats", *args]
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL if stdin_fd is None else stdin_fd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env=_child_env(),
            # Tiny, lock-free set-up in the child: see _child_setup.
            preexec_fn=_child_setup,
        )
    finally:
        if stdin_fd is not None:
            os.close(stdin_fd)
    running_processes.add(proc)
    tail: deque[str] = deque(maxlen=20)
    http_errors: list[str] = []
    notable: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None

    async def _run() -> int:
        assert proc.stdout is not None and proc.stderr is not None
        await asyncio.gather(
            _read_progress(proc.stdout, on_progress),
            _read_stderr(proc.stderr, tail, http_errors, notable),
        )
        return await proc.wait()

    try:
        returncode = await asyncio.wait_for(_run(), timeout_s)
    except BaseException:
        # Reap the process even if we are cancelled again while doing it.
        reaper = asyncio.ensure_future(terminate(proc))
        while not reaper.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(reaper)
        raise
    finally:
        running_processes.discard(proc)
    # FFmpeg may exit 0 after an input answered an HTTP error mid-read (the
    # output is then short or missing a stream): a failed read is a failed run.
    if returncode != 0 or http_errors:
        first = [*http_errors, *notable]
        lines = [*first, *(line for line in tail if line and line not in first)]
        proxy = _Egress.proxy
        forbidden = proxy.refused_since(t0) if proxy is not None else []
        raise FFmpegError(returncode, " | ".join(lines)[:2000], forbidden)
