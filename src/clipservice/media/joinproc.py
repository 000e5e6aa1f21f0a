"""Cuts in worker processes, kept warm between clips.

A cut fetches, decodes and encodes video (PyAV: libavcodec, libx264…). Done in the
service's own process it would share the GIL and the CPU share with the event
loop that serves the API, and a decoder crash on a hostile source would take
the service down. So joins run in separate Python processes, like FFmpeg:

- each runs one join at a time; idle ones wait for the next (no start-up cost
  after the first: importing PyAV takes a quarter of a second);
- they get the same set-up as FFmpeg: their own session and a lower priority
  (nice 10, autogroup too), and a parent-death signal so none outlives the
  service, even after kill -9;
- on timeout or cancellation the process is killed, as FFmpeg would be, and
  the caller removes the partial output; a process that dies is replaced.

Requests and answers are pickles over the child's stdin and stdout; both ends
are this package. While a cut runs, the child sends ``("progress", seconds)``
messages (the output time made so far, rising, at most every
:data:`PROGRESS_INTERVAL_S`) before its one answer: the clip's progress and
heartbeat, as FFmpeg's ``-progress`` is for FFmpeg runs.
"""

from __future__ import annotations

import atexit
import contextlib
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from clipservice.media.fetch import FetchError
from clipservice.media.ffmpeg import _child_setup
from clipservice.media.join import CutFailed, CutRequest, CutResult

_HEADER = struct.Struct(">I")
# A process is replaced after this many joins (allocator growth stays bounded).
MAX_JOINS_PER_PROCESS = 100
# A join sends its progress at most this often.
PROGRESS_INTERVAL_S = 0.5


def _send(stream: IO[bytes], obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)  # our own child process's answer


class JoinProcess:
    """One worker process."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(  # our own interpreter and module
            [sys.executable, "-m", "clipservice.media.joinproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_child_setup,  # tiny and lock-free by design
        )
        self.joins = 0

    def call(
        self, request: CutRequest, on_progress: Callable[[float], None] | None = None
    ) -> CutResult:
        """Run one cut (blocking); raise what the cut raised, or CutFailed if
        the process died. ``on_progress`` hears the progress messages (on
        this thread)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.joins += 1
        try:
            _send(self.proc.stdin, request)
            kind, value = _receive(self.proc.stdout)
            while kind == "progress":
                if on_progress is not None:
                    on_progress(value)
                kind, value = _receive(self.proc.stdout)
        except (EOFError, OSError, pickle.UnpicklingError) as exc:
            raise CutFailed("the cutting process ended unexpectedly") from exc
        if kind == "ok":
            assert isinstance(value, CutResult)
            return value
        if kind == "timeout":
            raise TimeoutError
        if kind == "fetch":
            status, message = value
            raise FetchError(message, status)
        if kind == "unsupported":
            raise CutFailed(value)
        raise CutFailed(f"cutting failed: {value}")

    def signal_kill(self) -> None:
        """SIGKILL, without waiting (safe on the event loop); reaped by kill()."""
        with contextlib.suppress(OSError):
            self.proc.kill()

    def kill(self) -> None:
        """Kill, reap and close (blocking briefly: call it from a thread)."""
        self.signal_kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class JoinPool:
    """Worker processes shared by every clip of this service process.

    Thread-safe; usable from any event loop (the calls block, so callers run
    them in threads).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[JoinProcess] = []
        self._busy: set[JoinProcess] = set()
        # Idle processes kept for the next joins: as many as clips may run at
        # once (jobs.max_concurrent_clips: its default here, raised by warm()).
        self.max_idle = 4

    def acquire(self) -> JoinProcess:
        with self._lock:
            while self._idle:
                proc = self._idle.pop()
                if proc.alive:
                    self._busy.add(proc)
                    return proc
                proc.kill()
        proc = JoinProcess()  # outside the lock: starting one takes a moment
        with self._lock:
            self._busy.add(proc)
        return proc

    def release(self, proc: JoinProcess, *, healthy: bool) -> None:
        with self._lock:
            self._busy.discard(proc)
            keep = (
                healthy
                and proc.alive
                and proc.joins < MAX_JOINS_PER_PROCESS
                and len(self._idle) < self.max_idle
            )
            if keep:
                self._idle.append(proc)
                return
        proc.kill()

    def warm(self, concurrency: int) -> None:
        """Keep up to ``concurrency`` idle processes from now on, and start one
        now so the first clip does not wait for it (blocking: use a thread)."""
        with self._lock:
            self.max_idle = max(self.max_idle, concurrency)
            if self._idle or self._busy:
                return
        proc = JoinProcess()
        with self._lock:
            self._idle.append(proc)

    def close(self) -> None:
        """Kill every process, idle or busy (at shutdown)."""
        with self._lock:
            procs = [*self._idle, *self._busy]
            self._idle.clear()
            self._busy.clear()
        for proc in procs:
            proc.kill()

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [p.proc.pid for p in (*self._idle, *self._busy)]

    @property
    def busy_pids(self) -> list[int]:
        with self._lock:
            return [p.proc.pid for p in self._busy]


POOL = JoinPool()
atexit.register(POOL.close)  # (and the parent-death signal, if we die harder)


class _Progress:
    """Sends a cut's rising output time to the parent, at most every PROGRESS_INTERVAL_S."""

    def __init__(self, answers: IO[bytes]) -> None:
        self._answers = answers
        self._best = 0.0
        self._sent_at = float("-inf")

    def __call__(self, out_s: float) -> None:
        if out_s <= self._best:
            return
        self._best = out_s
        now = time.monotonic()
        if now - self._sent_at >= PROGRESS_INTERVAL_S:
            self._sent_at = now
            _send(self._answers, ("progress", out_s))


def _serve() -> None:
    """The worker process: runs cut requests from stdin until it closes."""
    import os

    from clipservice.media.join import run_cut

    # SVT-AV1 prints its settings on every encoder it opens; errors only.
    os.environ.setdefault("SVT_LOG", "1")
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the answer channel
    while True:
        try:
            request = _receive(requests)
        except EOFError:
            return
        try:
            answer: tuple[str, object] = ("ok", run_cut(request, _Progress(answers)))
        except TimeoutError:
            answer = ("timeout", None)
        except FetchError as exc:
            answer = ("fetch", (exc.status, str(exc)))
        except CutFailed as exc:
            answer = ("unsupported", str(exc))
        except Exception as exc:  # every failure goes back to the caller
            answer = ("error", f"{type(exc).__name__}: {exc}")
        _send(answers, answer)


if __name__ == "__main__":
    _serve()
