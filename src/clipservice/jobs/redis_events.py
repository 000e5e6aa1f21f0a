"""Job change notifications over Redis pub/sub, for SSE on any API node.

The Redis job store publishes every change it writes (from any worker or API
node) as the stored document on ``{prefix}events:{job_id}``. Each API node
keeps one pattern subscription for all jobs and hands a message to the local
subscribers of that job, so an SSE stream costs no Redis connection of its
own. Like the in-process hub, a subscription keeps only the newest document:
a slow reader skips intermediate states and never makes a publisher wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog

from clipservice.jobs.events import LocalJobEvents
from clipservice.jobs.redis_store import RedisJobStore, load_job

log = structlog.get_logger(__name__)

_RECONNECT_DELAY_S = 1.0


class RedisJobEvents(LocalJobEvents):
    """Publish and subscribe to job changes through Redis (all nodes see all changes).

    This node's subscribers are kept as in :class:`LocalJobEvents`; what differs
    is that a reader task delivers every node's changes to them, as the Redis
    store publishes them.
    """

    def __init__(self, store: RedisJobStore) -> None:
        super().__init__()
        self.store = store
        self._prefix = store.events_channel("")
        self._reader: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Start listening; returns once the subscription is in place."""
        self._reader = asyncio.create_task(self._read(), name="redis-job-events")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait([ready, self._reader], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()

    async def _read(self) -> None:
        while not self._closed:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.psubscribe(f"{self._prefix}*")
                self._ready.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is not None and msg.get("type") == "pmessage":
                        self._deliver(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: listen again shortly
                log.warning("job_events_reconnect", error=str(exc))
                self._ready.set()  # do not hold start-up hostage to Redis
                await asyncio.sleep(_RECONNECT_DELAY_S)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]

    def _deliver(self, msg: dict[str, Any]) -> None:
        channel = str(msg["channel"])
        subs = self._subscribers.get(channel[len(self._prefix) :])
        if not subs:
            return
        try:
            job = load_job(msg["data"])
        except ValueError:
            log.warning("job_event_unreadable", channel=channel)
            return
        for sub in subs:
            sub.put(job)

    async def close(self) -> None:
        """Wake every subscriber with None and stop listening."""
        await super().close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
