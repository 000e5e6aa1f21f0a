"""Job change notifications: the job store tells, SSE listeners subscribe.

Every change of a job (state, a clip done, progress within a clip) is
delivered as the whole job. A listener only ever needs the newest document,
so a subscription keeps just the latest job and wakes its reader: a slow
listener skips intermediate states instead of buffering them, and a change
never waits for a listener.

:class:`JobEvents` is the interface SSE subscribes through.
:class:`LocalJobEvents` serves one process: the file store calls its
:meth:`~LocalJobEvents.notify` with every change it stores. The distributed
mode's :class:`~clipservice.jobs.redis_events.RedisJobEvents` listens to what
the Redis store publishes, so the SSE route works unchanged on any ``serve``
node.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from clipservice.jobs.models import Job


class Subscription(Protocol):
    """The changes of one job; only the newest is kept, so intermediate states may be skipped."""

    async def next(self) -> Job | None:
        """Wait for the next change and return the newest job; None once the hub closed."""
        ...


class JobEvents(Protocol):
    """Subscribe to the changes of one job."""

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe for the lifetime of the ``async with`` block.

        Subscribe *before* reading the job's current state, so no change made
        between that read and the subscription is missed.
        """
        ...

    async def close(self) -> None:
        """Wake every subscriber with None (the service is stopping)."""
        ...


class Mailbox:
    """A one-slot mailbox: the newest job and a flag saying it is unread.

    Shared by the in-process and the Redis hubs: a slow listener skips states
    and publishing never waits for it.
    """

    def __init__(self) -> None:
        self._latest: Job | None = None
        self._changed = asyncio.Event()
        self._closed = False

    def put(self, job: Job) -> None:
        self._latest = job
        self._changed.set()

    def close(self) -> None:
        self._closed = True
        self._changed.set()

    async def next(self) -> Job | None:
        await self._changed.wait()
        self._changed.clear()
        if self._closed:
            return None
        return self._latest


class LocalJobEvents:
    """In-process notifications: subscribers of this process, woken on the event loop."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Mailbox]] = {}
        self._closed = False

    def notify(self, job: Job) -> None:
        """Tell every subscriber of ``job.job_id`` about its new state (never blocks on them)."""
        for sub in self._subscribers.get(job.job_id, ()):
            sub.put(job)

    @contextlib.asynccontextmanager
    async def _subscription(self, job_id: str) -> AsyncIterator[Subscription]:
        sub = Mailbox()
        if self._closed:
            sub.close()
        subs = self._subscribers.setdefault(job_id, set())
        subs.add(sub)
        try:
            yield sub
        finally:
            subs.discard(sub)
            if not subs:
                self._subscribers.pop(job_id, None)

    def subscribe(self, job_id: str) -> AbstractAsyncContextManager[Subscription]:
        return self._subscription(job_id)

    async def close(self) -> None:
        self._closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                sub.close()
