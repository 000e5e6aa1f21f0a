"""The SAQ queues of the distributed mode, and the tasks put on them.

Two queues on the Redis of ``[queue] url``:

- ``clipservice-jobs``: one ``prepare_job`` task per job (key: the job id).
- ``clipservice-clips``: one ``cut_clip`` task per clip (key: ``{job_id}:{index}``),
  the unit of distribution, so the clips of one job spread over every worker.

SAQ's defaults suit short tasks, not FFmpeg runs, so clip tasks get a timeout
above ``clip_timeout_s``, a heartbeat, and retries with exponential backoff.
SAQ's sweep is patched (:class:`FreshSweepQueue`) so a live worker never
loses its clip to it.
"""

from __future__ import annotations

import contextlib

import structlog
from saq import Queue
from saq.job import Job as SaqJob
from saq.job import Status
from saq.queue.redis import RedisQueue

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


class FreshSweepQueue(RedisQueue):
    """SAQ's Redis queue, with a sweep that judges each task on its current state.

    SAQ 0.26 reads every active task once, then handles them one by one,
    waiting up to ``abort`` seconds for each dead one. A live task checked
    after such a wait looks stale by then and is swept too: its clip would be
    cancelled and cut again. Re-reading each task just before judging it
    keeps live workers' clips with them.
    """

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        lock_key = self.namespace("sweep")
        if not await self.redis.set(lock_key, 1, ex=lock, nx=True):
            return []
        swept: list[str] = []
        active: list[bytes] = await self.redis.lrange(self.namespace("active"), 0, -1)  # type: ignore[misc]
        for raw_id in active:
            job_id = raw_id.decode()
            job = await self._get_job_by_id(job_id)
            if job is None:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lrem(self.namespace("active"), 0, job_id)
                    pipe.zrem(self.namespace("incomplete"), job_id)
                    await pipe.execute()
                swept.append(job_id)
                continue
            if job.status == Status.ACTIVE and not job.stuck:
                continue
            log.warning("task_swept", task=job.key, worker=job.worker_id, status=job.status.value)
            swept.append(job_id)
            await self.abort(job, error=self.swept_error_message)
            with contextlib.suppress(TimeoutError):
                await job.refresh(abort)
            if job.retryable:
                await self.retry(job, error=self.swept_error_message)
            else:
                await self.finish(job, Status.ABORTED, error=self.swept_error_message)
        return swept


def make_queue(url: str, name: str) -> Queue:
    return FreshSweepQueue.from_url(url, name=name)


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
