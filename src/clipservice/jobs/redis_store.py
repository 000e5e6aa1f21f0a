"""Job store in Redis, for the distributed mode: any node answers for any job.

Each job document is one JSON string (``{prefix}job:{id}``, the same
``Job.stored()`` shape as the local files). Several workers finish clips of
one job at the same time, so every change is a read-modify-write under
``WATCH``/``MULTI``: a transaction that lost a race is retried on the new
state, never written over it.

Each clip has an attempt number (``{prefix}attempt:{id}``, a hash of clip
index → attempt). A worker claims a clip by bumping it and then writes
progress and its outcome only while the number is still its own. A worker
that was presumed dead and whose clip was handed to another (or whose job
was cancelled, which bumps every number) gets its stale writes refused.

Running clips' fractions live in ``{prefix}progress:{id}``; ended jobs are
scored by expiry time in ``{prefix}expiry``, so whichever node removes one
from that set owns its cleanup. Every change is published on
``{prefix}events:{id}`` with the stored document.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import WatchError

from clipservice.jobs import clipwork
from clipservice.jobs.models import JOB_ID_PATTERN, Job, JobError, JobStatus, utcnow

log = structlog.get_logger(__name__)

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
DEFAULT_PREFIX = "clipservice:"
_MGET_CHUNK = 200

T = TypeVar("T")


@dataclass
class _Tx:
    """What a transaction reads and may change: the job and its clip state."""

    job: Job
    attempts: dict[int, int]
    workers: dict[int, str]
    partials: dict[int, float]
    result: Any = None
    publish: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class StaleAttempt(Exception):
    """A write by an attempt that no longer owns its clip (fenced off)."""


class RedisJobStore:
    """Job documents in Redis, changed only by atomic compare-and-set transactions."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self.redis = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str, prefix: str = DEFAULT_PREFIX) -> RedisJobStore:
        return cls(aioredis.Redis.from_url(url, decode_responses=True), prefix)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> bool:
        """True when Redis answers (for /readyz)."""
        try:
            return bool(await _aw(self.redis.ping()))
        except (aioredis.RedisError, OSError):
            return False

    # -- keys --------------------------------------------------------------

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def _attempt_key(self, job_id: str) -> str:
        return f"{self.prefix}attempt:{job_id}"

    def _progress_key(self, job_id: str) -> str:
        return f"{self.prefix}progress:{job_id}"

    def _idempotency_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.prefix}idem:{digest}"

    def _source_key(self, job_id: str) -> str:
        return f"{self.prefix}source:{job_id}"

    @property
    def _index_key(self) -> str:
        return f"{self.prefix}jobs"

    @property
    def expiry_key(self) -> str:
        return f"{self.prefix}expiry"

    def events_channel(self, job_id: str) -> str:
        return f"{self.prefix}events:{job_id}"

    # -- the JobStore protocol ---------------------------------------------

    async def save(self, job: Job) -> None:
        """Write the whole document (creation, or a node that owns the job alone)."""
        data = dump_job(job)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._job_key(job.job_id), data)
            pipe.sadd(self._index_key, job.job_id)
            if job.idempotency_key:
                pipe.set(self._idempotency_key(job.idempotency_key), job.job_id)
            if job.status.ended and job.expires_at is not None:
                pipe.zadd(self.expiry_key, {job.job_id: job.expires_at.timestamp()})
            pipe.publish(self.events_channel(job.job_id), data)
            await pipe.execute()

    async def get(self, job_id: str) -> Job | None:
        if not _JOB_ID_RE.match(job_id):
            return None
        raw = await self.redis.get(self._job_key(job_id))
        return load_job(raw) if raw else None

    async def delete(self, job_id: str) -> None:
        job = await self.get(job_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            if job is not None and job.idempotency_key:
                pipe.delete(self._idempotency_key(job.idempotency_key))
            pipe.delete(
                self._job_key(job_id),
                self._attempt_key(job_id),
                self._progress_key(job_id),
                self._source_key(job_id),
            )
            pipe.srem(self._index_key, job_id)
            pipe.zrem(self.expiry_key, job_id)
            await pipe.execute()

    async def by_idempotency_key(self, key: str) -> Job | None:
        """The live job created with this Idempotency-Key (one lookup, not a scan)."""
        job_id = await self.redis.get(self._idempotency_key(key))
        return await self.get(str(job_id)) if job_id else None

    async def all(self) -> list[Job]:
        ids = sorted(await _aw(self.redis.smembers(self._index_key)))
        jobs: list[Job] = []
        for i in range(0, len(ids), _MGET_CHUNK):
            chunk = ids[i : i + _MGET_CHUNK]
            for raw in await self.redis.mget([self._job_key(j) for j in chunk]):
                if raw:
                    jobs.append(load_job(raw))
        return jobs

    # -- the resolved source (resolved once per job, read by every worker) --

    async def set_source(self, job_id: str, source: dict[str, Any]) -> None:
        await self.redis.set(self._source_key(job_id), json.dumps(source))

    async def get_source(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(self._source_key(job_id))
        return json.loads(raw) if raw else None

    # -- atomic changes ----------------------------------------------------

    async def _transact(self, job_id: str, change: Callable[[_Tx], bool]) -> _Tx | None:
        """Run ``change`` on the current state and write it if it returns True.

        Returns the transaction state (``None`` if the job does not exist).
        ``change`` must be pure: it runs again when another writer got in first.
        """
        keys = (self._job_key(job_id), self._attempt_key(job_id), self._progress_key(job_id))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*keys)
                    raw = await pipe.get(keys[0])
                    if not raw:
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return None
                    fence: dict[str, str] = await _aw(pipe.hgetall(keys[1]))
                    partials: dict[str, str] = await _aw(pipe.hgetall(keys[2]))
                    tx = _Tx(
                        job=load_job(raw),
                        attempts={int(k): int(v) for k, v in fence.items() if k.isdigit()},
                        workers={int(k[2:]): v for k, v in fence.items() if k.startswith("w:")},
                        partials={int(k): float(v) for k, v in partials.items()},
                    )
                    if not change(tx):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return tx
                    data = dump_job(tx.job)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(keys[0], data)
                    pipe.delete(keys[1], keys[2])
                    fence_out: dict[str, str | int] = {str(i): n for i, n in tx.attempts.items()}
                    fence_out.update({f"w:{i}": w for i, w in tx.workers.items()})
                    if fence_out:
                        pipe.hset(keys[1], mapping=fence_out)
                    if tx.partials:
                        pipe.hset(keys[2], mapping={str(i): f for i, f in tx.partials.items()})
                    if tx.job.status.ended and tx.job.expires_at is not None:
                        pipe.zadd(self.expiry_key, {job_id: tx.job.expires_at.timestamp()})
                    if tx.publish:
                        pipe.publish(self.events_channel(job_id), data)
                    await pipe.execute()
                    return tx
                except WatchError:
                    continue

    async def start_processing(self, job_id: str) -> Job | None:
        """pending → processing; None if the job is gone or already ended."""

        def change(tx: _Tx) -> bool:
            if tx.job.status is not JobStatus.PENDING:
                return False
            tx.job.status = JobStatus.PROCESSING
            tx.job.updated_at = utcnow()
            return True

        tx = await self._transact(job_id, change)
        if tx is None or tx.job.status.ended:
            return None
        return tx.job

    async def claim_clip(self, job_id: str, index: int, worker_id: str) -> int | None:
        """Take a clip for a new attempt: its attempt number, or None if nothing to do."""

        def change(tx: _Tx) -> bool:
            tx.result = None
            if tx.job.status.ended or index in tx.job.done_indexes():
                return False
            if tx.job.status is JobStatus.PENDING:
                tx.job.status = JobStatus.PROCESSING
            tx.attempts[index] = tx.attempts.get(index, 0) + 1
            tx.workers[index] = worker_id
            tx.partials.pop(index, None)
            clipwork.update_progress(tx.job, tx.partials, utcnow())
            tx.result = tx.attempts[index]
            return True

        tx = await self._transact(job_id, change)
        return None if tx is None else tx.result

    async def clip_progress(self, job_id: str, index: int, attempt: int, fraction: float) -> bool:
        """Record a running clip's fraction done; False if this attempt is stale."""

        def change(tx: _Tx) -> bool:
            if tx.attempts.get(index) != attempt or tx.job.status.ended:
                tx.result = False
                return False
            tx.partials[index] = max(0.0, min(1.0, fraction))
            clipwork.update_progress(tx.job, tx.partials, utcnow())
            tx.result = True
            return True

        tx = await self._transact(job_id, change)
        return bool(tx and tx.result)

    async def record_clip(
        self, job_id: str, attempt: int, outcome: clipwork.ClipOutcome, retention_s: float
    ) -> Job:
        """Record a clip's result or error and end the job if it was the last clip.

        Raises :class:`StaleAttempt` when this attempt no longer owns the clip
        (reclaimed by another worker, or the job was cancelled or deleted).
        """

        def change(tx: _Tx) -> bool:
            if tx.attempts.get(outcome.index) != attempt or tx.job.status.ended:
                tx.result = False
                return False
            if not clipwork.add_outcome(tx.job, outcome):
                tx.result = False
                return False
            now = utcnow()
            tx.partials.pop(outcome.index, None)
            clipwork.update_progress(tx.job, tx.partials, now)
            if clipwork.end_if_complete(tx.job, now, retention_s):
                tx.partials.clear()
            tx.result = True
            return True

        tx = await self._transact(job_id, change)
        if tx is None or not tx.result:
            raise StaleAttempt(f"job {job_id} clip {outcome.index} attempt {attempt}")
        return tx.job

    async def fail(self, job_id: str, error: JobError, retention_s: float) -> Job | None:
        """End a job that could not start (its source failed); None if it already ended."""

        def change(tx: _Tx) -> bool:
            if tx.job.status.ended:
                return False
            clipwork.finalize(tx.job, JobStatus.FAILED, error, utcnow(), retention_s)
            tx.partials.clear()
            tx.result = True
            return True

        tx = await self._transact(job_id, change)
        return tx.job if tx is not None and tx.result else None

    async def cancel(self, job_id: str, retention_s: float) -> tuple[Job | None, bool]:
        """Cancel a job that has not ended: (the job, whether this call cancelled it).

        Every clip's attempt number is bumped, so a worker still cutting one
        of its clips can no longer write to the job.
        """

        def change(tx: _Tx) -> bool:
            if tx.job.status.ended:
                tx.result = False
                return False
            clipwork.cancel(tx.job, utcnow(), retention_s)
            for clip in tx.job.clips:
                tx.attempts[clip.index] = tx.attempts.get(clip.index, 0) + 1
            tx.partials.clear()
            tx.result = True
            return True

        tx = await self._transact(job_id, change)
        if tx is None:
            return None, False
        return tx.job, bool(tx.result)

    async def clip_workers(self, job_id: str) -> dict[int, str]:
        """Which worker last claimed each clip (for operators and tests)."""
        fence: dict[str, str] = await _aw(self.redis.hgetall(self._attempt_key(job_id)))
        return {int(k[2:]): v for k, v in fence.items() if k.startswith("w:")}

    async def clip_attempts(self, job_id: str) -> dict[int, int]:
        fence: dict[str, str] = await _aw(self.redis.hgetall(self._attempt_key(job_id)))
        return {int(k): int(v) for k, v in fence.items() if k.isdigit()}

    # -- expiry --------------------------------------------------------------

    async def due(self, now_epoch_s: float, limit: int = 100) -> list[str]:
        """Ended jobs whose retention has run out."""
        ids: list[str] = await self.redis.zrangebyscore(
            self.expiry_key, "-inf", now_epoch_s, start=0, num=limit
        )
        return ids

    async def take_due(self, job_id: str) -> bool:
        """Claim the cleanup of one expired job; True for exactly one caller."""
        return bool(await self.redis.zrem(self.expiry_key, job_id))


async def _aw(value: Awaitable[T] | T) -> T:
    # redis-py types its commands as "sync or async result"; ours are async.
    if inspect.isawaitable(value):
        return await value
    return value


def dump_job(job: Job) -> str:
    return json.dumps(job.stored(), separators=(",", ":"))


def load_job(raw: str | bytes) -> Job:
    return Job.model_validate_json(raw)
