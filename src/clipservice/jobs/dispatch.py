"""The API node's runner in the distributed mode: jobs go on the queue, workers cut.

Same interface as the in-process runner (:mod:`clipservice.jobs.runner`).
Submitting puts a ``prepare_job`` task on the jobs queue; cancelling ends the
job in the store and aborts its tasks on whichever workers run them (SAQ's
abort poll cancels a running clip within a second, killing FFmpeg). The node
also reaps expired jobs and keeps the queue gauges of ``/metrics`` current.

Its backlog (:class:`~clipservice.jobs.backlog.Backlog`) is read from SAQ's
keys in Redis, never by walking the tasks: list lengths, the head of each
queued list, the active list (at most workers x concurrency long) and the
workers' stats entries, in two round trips (see :meth:`DistributedRunner.queue_stats`).
A job whose ``prepare_job`` task waits counts as one queued clip: its clips
are known only once a worker has resolved its source and queued them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog
from prometheus_client import Gauge
from redis.exceptions import RedisError
from saq.job import TERMINAL_STATUSES, Status
from saq.utils import now

from clipservice.config import Settings
from clipservice.jobs import bookkeeping, retention
from clipservice.jobs.backlog import DrainRate, QueueStats
from clipservice.jobs.base import announce_end
from clipservice.jobs.models import Job, JobStatus
from clipservice.jobs.queue import (
    CLIPS_QUEUE,
    JOBS_QUEUE,
    FreshSweepQueue,
    clip_task_key,
    make_queue,
    prepare_task,
)
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.metrics import Metrics
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)

# The SAQ worker stats that count tasks gone from the queue for good (not "retried").
_FINISHED_STATS = ("complete", "failed", "aborted")


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
        # Clip tasks the workers finished (their SAQ stats, written every 10 s).
        self._drain = DrainRate()
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
        """Update the queue gauges and the drain rate (called by the reaper loop)."""
        try:
            info = await self.clips_queue.info()
        except Exception:
            if self._gauges is not None:
                self._gauges[0].set(0)
            return
        self._observe_drain(info["workers"])
        if self._gauges is None:
            return
        up, tasks, workers = self._gauges
        up.set(1)
        tasks.labels("queued").set(info["queued"])
        tasks.labels("active").set(info["active"])
        workers.set(len(info["workers"]))

    # -- backlog: autoscaling signals and backpressure ----------------------

    async def queued_clips(self) -> int:
        """Clip tasks queued, plus one per queued ``prepare_job`` (two LLENs, one round trip)."""
        async with self.clips_queue.redis.pipeline(transaction=False) as pipe:
            pipe.llen(self.clips_queue.namespace("queued"))
            pipe.llen(self.jobs_queue.namespace("queued"))
            clips, jobs = await pipe.execute()
        return int(clips) + int(jobs)

    async def queue_stats(self) -> QueueStats:
        """Both queues' depth and oldest task, and the clip tasks running on each live worker.

        Seven commands in two round trips: the live workers' stats keys, both
        queued lists' length and head, and the active list; then one MGET of
        the workers' stats, the running tasks and the two heads.
        """
        clips, jobs, redis = self.clips_queue, self.jobs_queue, self.clips_queue.redis
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(clips.namespace("stats"), now(), "inf")
            pipe.lrange(clips.namespace("active"), 0, -1)
            for queue in (clips, jobs):
                pipe.llen(queue.namespace("queued"))
                pipe.lindex(queue.namespace("queued"), 0)
            stat_keys, active, clips_depth, clips_head, jobs_depth, jobs_head = await pipe.execute()
        heads = [h for h in (clips_head, jobs_head) if h is not None]
        keys = [*stat_keys, *active, *heads]
        values: list[bytes | None] = await redis.mget(keys) if keys else []
        stats_raw = values[: len(stat_keys)]
        active_raw = values[len(stat_keys) : len(stat_keys) + len(active)]
        head_tasks = dict(zip(heads, values[len(stat_keys) + len(active) :], strict=True))

        worker_stats: dict[str, Mapping[str, Any]] = {}
        for key, raw in zip(stat_keys, stats_raw, strict=True):
            if raw is not None:  # expired since the stats entry was read
                worker_stats[key.decode().rsplit("worker_info:", 1)[-1]] = json.loads(raw)
        self._observe_drain(worker_stats)
        in_flight = dict.fromkeys(worker_stats, 0)
        for raw in active_raw:
            task = clips.deserialize(raw)
            # A task dequeued but not yet marked active has no worker yet.
            if task is not None and task.status == Status.ACTIVE and task.worker_id:
                in_flight[task.worker_id] = in_flight.get(task.worker_id, 0) + 1

        now_ms = now()

        def age_s(queue: FreshSweepQueue, head: bytes | None) -> float:
            task = queue.deserialize(head_tasks.get(head)) if head is not None else None
            if task is None:  # none waits, or it started meanwhile
                return 0.0
            # Waiting since it was queued, queued again (a retry), or due (scheduled).
            since_ms = max(task.queued, task.touched, task.scheduled * 1000)
            return max(0.0, (now_ms - since_ms) / 1000)

        return QueueStats(
            depth={"clips": int(clips_depth), "jobs": int(jobs_depth)},
            oldest_age_s={"clips": age_s(clips, clips_head), "jobs": age_s(jobs, jobs_head)},
            in_flight=in_flight,
            workers=len(worker_stats),
        )

    def drain_per_s(self) -> float | None:
        """Clip tasks finished per second lately, by all workers (None until known)."""
        return self._drain.per_s(time.monotonic())

    def _observe_drain(self, workers: Mapping[str, Any]) -> None:
        finished = {}
        for worker_id, info in workers.items():
            stats = info.get("stats") or {}
            finished[worker_id] = sum(int(stats.get(k, 0)) for k in _FINISHED_STATS)
        self._drain.observe(time.monotonic(), finished)
