"""The SAQ queues of the distributed mode, and the tasks put on them.

Two queues on the Redis of ``[queue] url``:

- ``clipservice-jobs``: one ``prepare_job`` task per job (key: the job id).
- ``clipservice-clips``: one ``cut_clip`` task per clip (key: ``{job_id}:{index}``),
  the unit of distribution, so the clips of one job spread over every worker.

SAQ's defaults suit short tasks, not FFmpeg runs, so clip tasks get a timeout
above ``clip_timeout_s``, a heartbeat, and retries with exponential backoff.

Failover: a running task's worker beats every :func:`beat_interval_s`
(``heartbeat_s / 5``); a task whose last beat is older than ``heartbeat_s`` is
taken back by the next sweep (every ``sweep_interval_s``, by whichever worker
holds the sweep lock) and queued again. With the defaults (5 s, 1 s, a first
retry within 0.5 s and SAQ's 1 s schedule poll) a dead worker's clip starts
again elsewhere 4 to 8.5 s after the worker died.

:class:`FreshSweepQueue` changes SAQ's sweep and writes so that this is safe:

- each task is judged on its state read just before (SAQ 0.26 judges every
  task on one read made at the start, after waiting for earlier ones);
- a stale task is queued again in one transaction (SAQ aborts it, waits for
  the dead worker to answer, then queues it: a sweeper killed in between lost
  the task for good);
- writes of a task's run are fenced by its run number (SAQ's ``attempts``): a
  worker that was presumed dead and comes back cannot write over the run that
  replaced it, and its beats tell it that it lost the task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError
from saq.job import TERMINAL_STATUSES, Status
from saq.job import Job as SaqJob
from saq.queue.redis import RedisQueue
from saq.utils import now

from clipservice.config import Settings

log = structlog.get_logger(__name__)

JOBS_QUEUE = "clipservice-jobs"
CLIPS_QUEUE = "clipservice-clips"

# Clip task timeout on top of clip_timeout_s: resolving, probing and
# validating happen outside the FFmpeg bound.
_TASK_TIMEOUT_MARGIN_S = 60
_PREPARE_TIMEOUT_S = 120
# How long SAQ keeps a finished task's record (ours lives in the job store).
_TASK_TTL_S = 600
# The sweep lock is held at least this long while a sweep runs (then released
# to expire one sweep interval after the sweep began): two sweeps never overlap.
_SWEEP_HOLD_S = 30
# Beats per heartbeat_s: one late or failed write never costs a live task.
_BEATS_PER_EXPIRY = 5

Write = Callable[["Pipeline", SaqJob | None], None]


def beat_interval_s(heartbeat_s: float) -> float:
    """How often a worker writes the heartbeat of each task it runs."""
    return max(0.5, heartbeat_s / _BEATS_PER_EXPIRY)


def _stale(task: SaqJob, now_ms: int) -> bool:
    """A running task that shows no sign of life (or is past its timeout)."""
    if task.heartbeat and now_ms - task.touched > task.heartbeat * 1000:
        return True
    return bool(task.timeout and task.started and now_ms - task.started > task.timeout * 1000)


class FreshSweepQueue(RedisQueue):
    """SAQ's Redis queue, with a crash-safe sweep and writes fenced by the task's run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Tasks seen in the active list still "queued" (dequeued, not yet marked
        # active by their worker), by id: when this sweeper first saw them.
        self._dequeued_seen: dict[str, float] = {}

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        """Queue again the active tasks whose worker stopped beating; their ids.

        ``lock`` is the sweep interval (SAQ passes it); ``abort`` is unused: a
        stale task is queued again at once, without waiting for a worker that
        is most likely dead (a live one learns it lost the task from its beat).
        """
        t0 = time.monotonic()
        if not await self.redis.set(self._sweep, 1, ex=max(lock, _SWEEP_HOLD_S), nx=True):
            return []
        swept: list[str] = []
        try:
            active: list[bytes] = await self.redis.lrange(self._active, 0, -1)  # type: ignore[misc]
            ids = {raw.decode() for raw in active}
            self._dequeued_seen = {k: v for k, v in self._dequeued_seen.items() if k in ids}
            for raw_id in active:
                job_id = raw_id.decode()
                task = await self._get_job_by_id(job_id)
                if task is None or task.status in TERMINAL_STATUSES:
                    # A record gone (expired) or finished: nothing runs it.
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.lrem(self._active, 0, job_id)
                        if task is None:
                            pipe.zrem(self._incomplete, job_id)
                        await pipe.execute()
                    swept.append(job_id)
                    continue
                if task.status == Status.QUEUED:
                    # Dequeued a moment ago, or its worker died right after
                    # dequeuing it: its touch is from when it was queued.
                    seen = self._dequeued_seen.setdefault(job_id, time.monotonic())
                    if time.monotonic() - seen <= task.heartbeat:
                        continue
                elif not _stale(task, now()):
                    continue
                log.warning(
                    "task_swept",
                    task=task.key,
                    worker=task.worker_id,
                    status=task.status.value,
                    silent_s=round((now() - task.touched) / 1000, 1),
                    run=task.attempts,
                )
                swept.append(job_id)
                if task.retryable:
                    await self.retry(task, error=self.swept_error_message)
                else:
                    await self.finish(task, Status.ABORTED, error=self.swept_error_message)
        finally:
            left_ms = int((lock - (time.monotonic() - t0)) * 1000)
            if left_ms > 0:
                await self.redis.pexpire(self._sweep, left_ms)
            else:
                await self.redis.delete(self._sweep)
        return swept

    async def beat(self, task: SaqJob, **fields: Any) -> bool:
        """The heartbeat of a running task: touch it (and set ``fields``, e.g. progress).

        False, writing nothing, when the stored task is no longer this run
        (swept and queued again, taken by another worker, or ended). A task
        whose record is gone is left to its run (nothing else can run it).
        """

        def owned(stored: SaqJob | None) -> bool:
            return stored is None or (
                stored.status == Status.ACTIVE
                and stored.attempts == task.attempts
                and stored.worker_id == task.worker_id
            )

        task.touched = now()
        for name, value in fields.items():
            setattr(task, name, value)

        def write(pipe: Pipeline, stored: SaqJob | None) -> None:
            if stored is not None:
                pipe.set(task.id, self.serialize(task))

        return await self._fenced(task, write, owned)

    # -- SAQ's writes of a task's record, fenced by its run number -------------

    async def _update(self, job: SaqJob, status: Status | None = None, **kwargs: Any) -> None:
        def write(pipe: Pipeline, stored: SaqJob | None) -> None:
            job.status = status or (stored.status if stored else None) or job.status
            pipe.set(job.id, self.serialize(job))

        if await self._fenced(job, write):
            await self.notify(job)

    async def _retry(self, job: SaqJob, error: str | None) -> None:
        delay_s = job.next_retry_delay()

        def write(pipe: Pipeline, stored: SaqJob | None) -> None:
            pipe.lrem(self._active, 1, job.id)
            pipe.lrem(self._queued, 1, job.id)
            if delay_s:
                pipe.zadd(self._incomplete, {job.id: time.time() + delay_s})
            else:
                pipe.zadd(self._incomplete, {job.id: job.scheduled})
                pipe.rpush(self._queued, job.id)
            pipe.set(job.id, self.serialize(job))

        if await self._fenced(job, write):
            await self.notify(job)

    async def _finish(
        self,
        job: SaqJob,
        status: Status,
        *,
        result: Any = None,
        error: str | None = None,
    ) -> None:
        def write(pipe: Pipeline, stored: SaqJob | None) -> None:
            pipe.lrem(self._active, 1, job.id)
            pipe.zrem(self._incomplete, job.id)
            if job.ttl > 0:
                pipe.setex(job.id, job.ttl, self.serialize(job))
            elif job.ttl == 0:
                pipe.set(job.id, self.serialize(job))
            else:
                pipe.delete(job.id)

        if await self._fenced(job, write):
            await self.notify(job)

    async def _fenced(
        self,
        job: SaqJob,
        write: Write,
        allowed: Callable[[SaqJob | None], bool] | None = None,
    ) -> bool:
        """Run ``write``'s commands in one transaction on the task's current record,
        unless a later run of the task is stored (or ``allowed`` says no); True if written."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(job.id)
                    stored = self.deserialize(await pipe.get(job.id))
                    ok = allowed(stored) if allowed is not None else True
                    if not ok or (stored is not None and stored.attempts > job.attempts):
                        await pipe.reset()  # type: ignore[no-untyped-call]  # redis-py: untyped
                        if allowed is None:
                            log.warning(
                                "task_write_fenced",
                                task=job.key,
                                run=job.attempts,
                                stored_run=stored.attempts if stored else None,
                            )
                        return False
                    pipe.multi()  # type: ignore[no-untyped-call]  # redis-py: untyped
                    write(pipe, stored)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue


def make_queue(url: str, name: str) -> FreshSweepQueue:
    queue = FreshSweepQueue.from_url(url, name=name)
    assert isinstance(queue, FreshSweepQueue)
    return queue


def clip_task_key(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"


def prepare_task(job_id: str, heartbeat_s: int) -> SaqJob:
    """The ``prepare_job`` task of a job (queueing it twice is a no-op: its key is the job id)."""
    return SaqJob(
        function="prepare_job",
        kwargs={"job_id": job_id},
        key=job_id,
        timeout=_PREPARE_TIMEOUT_S,
        heartbeat=heartbeat_s,
        retries=3,
        retry_delay=1.0,
        retry_backoff=30.0,
        ttl=_TASK_TTL_S,
    )


def clip_task(settings: Settings, job_id: str, index: int) -> SaqJob:
    """The ``cut_clip`` task of one clip."""
    q = settings.queue
    return SaqJob(
        function="cut_clip",
        kwargs={"job_id": job_id, "index": index},
        key=clip_task_key(job_id, index),
        timeout=int(settings.jobs.clip_timeout_s) + _TASK_TIMEOUT_MARGIN_S,
        heartbeat=q.heartbeat_s,
        # One more than clip_attempts: the last run only records "interrupted".
        retries=q.clip_attempts + 1,
        retry_delay=q.retry_delay_s,
        retry_backoff=max(q.retry_delay_s * 16, 1.0),
        ttl=_TASK_TTL_S,
    )


def merge_task(settings: Settings, job_id: str) -> SaqJob:
    """The ``merge_job`` task making a job's reel (queued once: its key is per job;
    retried if its worker dies)."""
    return SaqJob(
        function="merge_job",
        kwargs={"job_id": job_id},
        key=f"{job_id}:reel",
        timeout=int(settings.jobs.clip_timeout_s) + _TASK_TIMEOUT_MARGIN_S,
        heartbeat=settings.queue.heartbeat_s,
        retries=2,
        retry_delay=settings.queue.retry_delay_s,
        ttl=_TASK_TTL_S,
    )
