"""The API node's runner in the distributed mode: jobs go on the queue, workers cut.

Same interface as the in-process runner (:mod:`clipservice.jobs.runner`).
Submitting puts a ``prepare_job`` task on the jobs queue; cancelling ends the
job in the store and aborts its tasks on whichever workers run them (SAQ's
abort poll cancels a running clip within a second, killing FFmpeg). The node
also reaps expired jobs and keeps the queue gauges of ``/metrics`` current.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import structlog
from prometheus_client import Gauge
from redis.exceptions import RedisError
from saq.job import TERMINAL_STATUSES

from clipservice.config import Settings
from clipservice.jobs import bookkeeping, retention
from clipservice.jobs.base import announce_end
from clipservice.jobs.models import Job, JobStatus
from clipservice.jobs.queue import (
    CLIPS_QUEUE,
    JOBS_QUEUE,
    clip_task_key,
    make_queue,
    prepare_task,
)
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.metrics import Metrics
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)


def _safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return url


class DistributedRunner:
    """The API node's runner: puts jobs on the queue, cancels and deletes them."""

    def __init__(
        self,
        settings: Settings,
        store: RedisJobStore,
        storage: ClipStorage,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.store = store
        self.storage = storage
        self.jobs_queue = make_queue(settings.queue.url, JOBS_QUEUE)
        self.clips_queue = make_queue(settings.queue.url, CLIPS_QUEUE)
        self.on_job_end: list[Callable[[Job], None]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._gauges: tuple[Gauge, Gauge, Gauge] | None = None
        if metrics is not None:
            r = metrics.registry
            self._gauges = (
                Gauge("clipservice_queue_up", "1 when Redis (the queue) answers.", registry=r),
                Gauge(
                    "clipservice_queue_clip_tasks",
                    "Clip tasks on the queue, by state (queued, active).",
                    ["state"],
                    registry=r,
                ),
                Gauge("clipservice_queue_workers", "Live worker processes.", registry=r),
            )

    async def start(self) -> None:
        await self.storage.open()
        await self.jobs_queue.connect()
        await self.clips_queue.connect()
        # A node that crashed between saving a job and queueing it left it
        # pending; queueing is idempotent (the task key is the job id).
        try:
            for job in await self.store.all():
                if job.status is JobStatus.PENDING:
                    await self.submit(job)
        except (RedisError, OSError) as exc:
            # Start anyway: /readyz says the queue is unreachable until it is back.
            log.warning("queue_unreachable", error=str(exc))
        self._reaper = asyncio.create_task(
            retention.reap_forever(self.store, self.storage, self.settings, self.refresh_metrics),
            name="reaper",
        )

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> int:
        """Nothing to wait for: clips run on the workers, which drain on their own."""
        return 0

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for queue in (self.jobs_queue, self.clips_queue):
            with contextlib.suppress(RedisError, OSError):  # Redis may be gone already
                await queue.disconnect()

    async def submit(self, job: Job) -> None:
        """Put the job on the queue (it is already saved as pending)."""
        await self.jobs_queue.enqueue(prepare_task(job.job_id, self.settings.queue.heartbeat_s))

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job on whichever workers run it; True if this call cancelled it."""
        job, cancelled = await bookkeeping.cancel_job(
            self.store, job_id, self.settings.jobs.retention_s
        )
        if not cancelled:
            return False
        keys = [(self.jobs_queue, job_id)]
        if job is not None:
            keys += [(self.clips_queue, clip_task_key(job_id, c.index)) for c in job.clips]
        for queue, key in keys:
            task = await queue.job(key)
            if task is not None and task.status not in TERMINAL_STATUSES:
                # Queued tasks are dropped; running ones are cancelled by their
                # worker within a second (SAQ's abort poll), killing FFmpeg.
                await queue.abort(task, "cancelled")
        log.info("job_cancelled", job_id=job_id)
        if job is not None:
            announce_end(job, self.on_job_end)
        return True

    async def delete_ended(self, job: Job) -> None:
        """Delete an ended job and its files now."""
        await retention.delete_now(self.store, self.storage, job)

    async def check_queue(self) -> str | None:
        """The /readyz check: None when Redis answers, else why not."""
        up = await self.store.ping()
        if self._gauges is not None:
            self._gauges[0].set(1 if up else 0)
        return None if up else f"queue unreachable at {_safe_url(self.settings.queue.url)}"

    async def refresh_metrics(self) -> None:
        """Update the queue gauges (called by the reaper loop; /metrics reads them)."""
        if self._gauges is None:
            return
        up, tasks, workers = self._gauges
        try:
            info = await self.queue_info()
        except Exception:
            up.set(0)
            return
        up.set(1)
        tasks.labels("queued").set(info["queued"])
        tasks.labels("active").set(info["active"])
        workers.set(info["workers"])

    async def queue_info(self) -> dict[str, int]:
        """Queued and running clip tasks and live workers (for /metrics)."""
        info = await self.clips_queue.info()
        return {
            "queued": int(info["queued"]),
            "active": int(info["active"]),
            "workers": len(info["workers"]),
        }
