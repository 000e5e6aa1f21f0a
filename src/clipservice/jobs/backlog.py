"""How far behind the clip queue is: what an autoscaler scales on and backpressure refuses on.

Both runners answer the :class:`Backlog` questions from what they already
keep: the in-process runner from its clips waiting for an FFmpeg slot, the
distributed one from the SAQ lists in Redis (a handful of commands per read).
``/metrics`` exports :class:`QueueStats` on every scrape, and job creation
compares :meth:`Backlog.queued_clips` with ``[queue] max_depth``.

Retry-After when refusing: the clips over the limit divided by how fast the
queue drains (:class:`DrainRate`, clips finished per second over the last
minute), bounded to [1, :data:`MAX_RETRY_AFTER_S`]; before a rate is known,
:data:`DEFAULT_RETRY_AFTER_S`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

# Told to a refused client while the drain rate is unknown (no clip finished lately).
DEFAULT_RETRY_AFTER_S = 30
MAX_RETRY_AFTER_S = 300
DRAIN_WINDOW_S = 60.0
# Less observation than this says nothing about a rate (SAQ's worker stats move every 10 s).
DRAIN_MIN_SPAN_S = 10.0


@dataclass(frozen=True)
class QueueStats:
    """A snapshot of the queues, read when asked (a scrape, a refused creation)."""

    # Tasks queued and not started, by queue name.
    depth: Mapping[str, int]
    # How long the oldest of them has waited to start (0 when none waits), by queue name.
    oldest_age_s: Mapping[str, float]
    # Clip tasks (cuts and reels) running, by worker; live idle workers show 0.
    in_flight: Mapping[str, int] = field(default_factory=dict)
    # Live worker processes (1 for the in-process runner).
    workers: int = 0


class Backlog(Protocol):
    """What a runner tells about the work it has not started yet."""

    async def queued_clips(self) -> int:
        """Clips waiting to start: what ``[queue] max_depth`` is compared with (cheap)."""
        ...

    async def queue_stats(self) -> QueueStats:
        """Depth and oldest age of each queue, and clips in flight per worker."""
        ...

    def drain_per_s(self) -> float | None:
        """Clips finished per second lately, or None before that is known."""
        ...


class DrainRate:
    """Tasks finished per second over the last ``window_s``, from cumulative counters.

    Fed with each worker's running total of finished tasks whenever they are
    read; a worker seen for the first time only sets its baseline, and one
    that went away simply stops counting.
    """

    def __init__(self, window_s: float = DRAIN_WINDOW_S, min_span_s: float = DRAIN_MIN_SPAN_S):
        self.window_s = window_s
        self.min_span_s = min_span_s
        self._last: dict[str, int] = {}
        self._events: deque[tuple[float, int]] = deque()
        self._since_s: float | None = None
        self._last_s = 0.0

    def observe(self, now_s: float, finished: Mapping[str, int]) -> None:
        """Record the totals read at ``now_s`` (a monotonic clock).

        What finished since the last reading is dated ``now_s``; after a gap
        longer than the window that would crowd a long time's work into it,
        so such a reading only starts the observation again.
        """
        if self._since_s is None or now_s - self._last_s > self.window_s:
            self._since_s = now_s
            self._last = {}
            self._events.clear()
        new = sum(max(0, n - self._last[w]) for w, n in finished.items() if w in self._last)
        self._last = dict(finished)
        self._last_s = now_s
        if new:
            self._events.append((now_s, new))
        self._prune(now_s)

    def per_s(self, now_s: float) -> float | None:
        """The rate, or None while observed for less than ``min_span_s``."""
        if self._since_s is None:
            return None
        span_s = min(self.window_s, now_s - self._since_s)
        if span_s < self.min_span_s:
            return None
        self._prune(now_s)
        return sum(n for _, n in self._events) / span_s

    def _prune(self, now_s: float) -> None:
        while self._events and self._events[0][0] < now_s - self.window_s:
            self._events.popleft()


def retry_after_s(excess_clips: int, drain_per_s: float | None) -> int:
    """Seconds until ``excess_clips`` more clips have started, at the drain rate."""
    if not drain_per_s:
        return DEFAULT_RETRY_AFTER_S
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(excess_clips / drain_per_s)))
