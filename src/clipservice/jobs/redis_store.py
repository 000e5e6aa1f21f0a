"""Job store in Redis, for the distributed mode: any node answers for any job.

Each job document is one JSON string (``{prefix}job:{id}``, the same
``Job.stored()`` shape as the local files). Several workers finish clips of
one job at the same time, so :meth:`RedisJobStore.transact` is a
read-modify-write under ``WATCH``/``MULTI``: a transaction that lost a race
is run again on the new state, never written over it.

Each clip's attempt number lives in ``{prefix}attempt:{id}`` (a hash of clip
index → attempt, and ``w:{index}`` → the worker that claimed it), running
clips' fractions in ``{prefix}progress:{id}``; see
:mod:`clipservice.jobs.bookkeeping` for how a stale worker is fenced off.
Ended jobs are scored by expiry time in ``{prefix}expiry``, so whichever node
removes one from that set owns its deletion. Every change is published on
``{prefix}events:{id}`` with the stored document.

The job's resolved stream URLs (``{prefix}source:{id}``) are shared by every
worker of the job, with a generation number that grows each time they are
resolved again after expiring.

Clip files are indexed by name: ``{prefix}file:{name}`` is a sorted set (all
scores 0) of ``{owner}|{job_id}`` for each stored job whose results name the
file, written in the same transaction that adds the result and removed in the
one that deletes the job. Whether a key may read a clip is one ``ZRANGEBYLEX``
over its owner's prefix (``O(log n)`` however many jobs reuse the file), and
whether any job uses it one ``EXISTS``. Idempotency keys are per owner.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import redis.asyncio as aioredis
import structlog
from redis.exceptions import LockError, WatchError

from clipservice.domain import StreamUrls
from clipservice.jobs.models import JOB_ID_PATTERN, Job
from clipservice.jobs.store import Change, JobTx

log = structlog.get_logger(__name__)

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
DEFAULT_PREFIX = "clipservice:"
_MGET_CHUNK = 200

T = TypeVar("T")


@dataclass(frozen=True)
class StoredSource:
    """A job's stream URLs as every worker reads them, and how often they were resolved again."""

    urls: StreamUrls
    generation: int = 0


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

    def _idempotency_key(self, key: str, owner: str | None = None) -> str:
        # Without an owner (no API keys) the digest is the key's alone, as before owners.
        scoped = key if owner is None else f"{owner}\0{key}"
        digest = hashlib.sha256(scoped.encode("utf-8", "surrogateescape")).hexdigest()
        return f"{self.prefix}idem:{digest}"

    def _file_key(self, name: str) -> str:
        return f"{self.prefix}file:{name}"

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

    # -- documents ---------------------------------------------------------

    async def save(self, job: Job) -> None:
        """Write the whole document (a new job)."""
        data = dump_job(job)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._job_key(job.job_id), data)
            pipe.sadd(self._index_key, job.job_id)
            if job.idempotency_key:
                pipe.set(self._idempotency_key(job.idempotency_key, job.owner), job.job_id)
            for name in job.files():
                pipe.zadd(self._file_key(name), {_file_member(job): 0})
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
        if not _JOB_ID_RE.match(job_id):
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # Watched, so a result written meanwhile cannot outlive the job in
                    # the file index.
                    await pipe.watch(self._job_key(job_id))
                    raw = await pipe.get(self._job_key(job_id))
                    job = load_job(raw) if raw else None
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if job is not None:
                        if job.idempotency_key:
                            pipe.delete(self._idempotency_key(job.idempotency_key, job.owner))
                        for name in job.files():
                            pipe.zrem(self._file_key(name), _file_member(job))
                    pipe.delete(
                        self._job_key(job_id),
                        self._attempt_key(job_id),
                        self._progress_key(job_id),
                        self._source_key(job_id),
                    )
                    pipe.srem(self._index_key, job_id)
                    pipe.zrem(self.expiry_key, job_id)
                    await pipe.execute()
                    return
                except WatchError:
                    continue

    async def by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The live job ``owner`` created with this Idempotency-Key (one lookup, not a scan)."""
        job_id = await self.redis.get(self._idempotency_key(key, owner))
        return await self.get(str(job_id)) if job_id else None

    async def file_owned(self, name: str, owner: str | None) -> bool:
        """Whether a stored job of ``owner`` names ``name`` in its results (one lookup)."""
        prefix = _owner_prefix(owner)
        # Every member of this owner sorts from "{owner}|" up to, not including, "{owner}}".
        found = await self.redis.zrangebylex(
            self._file_key(name), f"[{prefix}|", f"({prefix}}}", start=0, num=1
        )
        return bool(found)

    async def file_used(self, name: str) -> bool:
        """Whether any stored job names ``name`` in its results (an empty set is no key)."""
        return bool(await self.redis.exists(self._file_key(name)))

    async def all(self) -> list[Job]:
        ids = sorted(await _aw(self.redis.smembers(self._index_key)))
        jobs: list[Job] = []
        for i in range(0, len(ids), _MGET_CHUNK):
            chunk = ids[i : i + _MGET_CHUNK]
            for raw in await self.redis.mget([self._job_key(j) for j in chunk]):
                if raw:
                    jobs.append(load_job(raw))
        return jobs

    # -- atomic changes ----------------------------------------------------

    async def transact(self, job_id: str, change: Change, *, durable: bool = True) -> JobTx | None:
        """Run ``change`` on the current state and write it if it returns True.

        ``change`` runs again when another writer got in first, so it must be
        pure. Every change is written (``durable`` only matters to the file store).
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
                    tx = JobTx(
                        job=load_job(raw),
                        attempts={int(k): int(v) for k, v in fence.items() if k.isdigit()},
                        workers={int(k[2:]): v for k, v in fence.items() if k.startswith("w:")},
                        partials={int(k): float(v) for k, v in partials.items()},
                    )
                    files_before = tx.job.files()
                    if not change(tx):
                        await pipe.reset()  # type: ignore[no-untyped-call]
                        return tx
                    data = dump_job(tx.job)
                    files_after = tx.job.files()
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
                    member = _file_member(tx.job)
                    for name in files_after - files_before:
                        pipe.zadd(self._file_key(name), {member: 0})
                    for name in files_before - files_after:
                        pipe.zrem(self._file_key(name), member)
                    pipe.publish(self.events_channel(job_id), data)
                    await pipe.execute()
                    tx.written = True
                    return tx
                except WatchError:
                    continue

    async def clip_workers(self, job_id: str) -> dict[int, str]:
        """Which worker last claimed each clip (for operators and tests)."""
        fence: dict[str, str] = await _aw(self.redis.hgetall(self._attempt_key(job_id)))
        return {int(k[2:]): v for k, v in fence.items() if k.startswith("w:")}

    async def clip_attempts(self, job_id: str) -> dict[int, int]:
        fence: dict[str, str] = await _aw(self.redis.hgetall(self._attempt_key(job_id)))
        return {int(k): int(v) for k, v in fence.items() if k.isdigit()}

    # -- the resolved source (shared by every worker of the job) ------------

    async def set_source(self, job_id: str, source: StoredSource) -> None:
        data = {
            "video_url": source.urls.video_url,
            "audio_url": source.urls.audio_url,
            "generation": source.generation,
        }
        await self.redis.set(self._source_key(job_id), json.dumps(data))

    async def get_source(self, job_id: str) -> StoredSource | None:
        raw = await self.redis.get(self._source_key(job_id))
        if not raw:
            return None
        data = json.loads(raw)
        urls = StreamUrls(data["video_url"], data.get("audio_url"))
        return StoredSource(urls, int(data.get("generation", 0)))

    @asynccontextmanager
    async def source_lock(self, job_id: str, timeout_s: float) -> AsyncIterator[None]:
        """Hold the job's source-refresh lock (one resolver call per expiry, cluster-wide).

        Waits while another node holds it; a holder that died loses it after ``timeout_s``.
        """
        lock = self.redis.lock(f"{self.prefix}source-lock:{job_id}", timeout=timeout_s, sleep=0.1)
        await lock.acquire()
        try:
            yield
        finally:
            with contextlib.suppress(LockError):  # it expired: another node may hold it now
                await lock.release()

    # -- expiry --------------------------------------------------------------

    async def due(self, now_epoch_s: float, limit: int = 100) -> list[str]:
        """Ended jobs whose retention has run out."""
        ids: list[str] = await self.redis.zrangebyscore(
            self.expiry_key, "-inf", now_epoch_s, start=0, num=limit
        )
        return ids

    async def take_due(self, job_id: str) -> bool:
        """Claim the deletion of one ended job; True for exactly one caller."""
        return bool(await self.redis.zrem(self.expiry_key, job_id))


async def _aw(value: Awaitable[T] | T) -> T:
    # redis-py types its commands as "sync or async result"; ours are async.
    if inspect.isawaitable(value):
        return await value
    return value


def _owner_prefix(owner: str | None) -> str:
    # Owners are "key:<hex>" (api/auth.key_id), never holding "|"; no owner is "".
    return owner or ""


def _file_member(job: Job) -> str:
    """A job's member in the index of each file its results name."""
    return f"{_owner_prefix(job.owner)}|{job.job_id}"


def dump_job(job: Job) -> str:
    return json.dumps(job.stored(), separators=(",", ":"))


def load_job(raw: str | bytes) -> Job:
    return Job.model_validate_json(raw)
