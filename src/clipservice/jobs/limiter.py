"""A fair limit on FFmpeg processes shared by all jobs.

A plain semaphore serves waiters first come, first served, so a 50-clip job
queued first would hold back a 1-clip job queued after it. This limiter keeps
one queue per job and hands free slots round-robin between jobs.

It also tells how far behind it is (:mod:`clipservice.jobs.backlog`): how
many wait, since when the oldest has, and how many slots it has granted so
far (whose rate is how fast the wait drains).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator


class FairLimiter:
    """At most ``slots`` holders at once; waiters served round-robin by key."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = slots
        self._queues: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        # When each waiter began waiting (the event loop's clock), until it stops.
        self._since: dict[asyncio.Future[None], float] = {}
        # Slots granted since creation: clips that started.
        self.granted = 0

    @property
    def in_use(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def oldest_wait_s(self, now_s: float) -> float:
        """How long the longest waiter has waited at ``now_s`` (the loop's clock); 0 if none."""
        return max(0.0, now_s - min(self._since.values())) if self._since else 0.0

    async def acquire(self, key: str) -> None:
        if self._free > 0 and not self._queues:
            self._free -= 1
            self.granted += 1
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._queues.setdefault(key, deque()).append(fut)
        self._since[fut] = loop.time()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed to us as we were cancelled
            else:
                queue = self._queues.get(key)
                if queue is not None:
                    with contextlib.suppress(ValueError):
                        queue.remove(fut)
                    if not queue:
                        del self._queues[key]
            raise
        finally:
            self._since.pop(fut, None)

    def release(self) -> None:
        while self._queues:
            key, queue = next(iter(self._queues.items()))
            fut = queue.popleft()
            if queue:
                self._queues.move_to_end(key)  # the next slot goes to the next job
            else:
                del self._queues[key]
            if not fut.done():
                fut.set_result(None)
                self.granted += 1
                return
        self._free += 1

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release()
