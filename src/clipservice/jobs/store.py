"""Job stores: where job documents live, and the one way runners change them.

Two stores, one interface (:class:`JobStore`): :class:`FileJobStore` here
(local disk, the in-process mode) and
:class:`~clipservice.jobs.redis_store.RedisJobStore` (the distributed mode).
Runners change a job only through :meth:`JobStore.transact`: a pure change
function applied to the current state (:class:`JobTx`) and written whole, so
the bookkeeping in :mod:`clipservice.jobs.bookkeeping` is written once for
both stores.

On disk each job is ``data_dir/jobs/{job_id}.json``. A write goes to a
temporary file in the same folder, is fsynced, then renamed over the old
file, so a reader (or a restart after ``kill -9``) never sees a torn
document. Writes of one job are serialised by a per-job lock and always write
the newest state.

A full disk (ENOSPC, EDQUOT) fails a write cleanly: the temporary file is
removed and the previous version of the document stays. A new job that cannot
be saved is not kept (:class:`StorageFull` to the caller); a change to a saved
job stays in memory, this process's truth, and is written with the next write
that succeeds, once the disk has room again.

Both stores index the clip files that jobs' results name (file → jobs), kept
with every change that adds results and every deletion, so "may this key read
this clip" is one lookup (:meth:`JobStore.file_owned`), not a scan of jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiofiles
import aiofiles.os
import structlog

from clipservice.jobs.models import JOB_ID_PATTERN, Job

log = structlog.get_logger(__name__)

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
TMP_MARKER = ".tmp-"


@dataclass
class JobTx:
    """What one store transaction reads and may change: a job and its clips' running state.

    ``attempts`` is each clip's attempt number: a runner claims a clip by
    bumping it and writes that clip's progress and outcome only while the
    number is still its own. ``partials`` holds the fraction done of running
    clips. The store sets ``written`` once the change is stored.
    """

    job: Job
    attempts: dict[int, int]
    workers: dict[int, str] = field(default_factory=dict)
    partials: dict[int, float] = field(default_factory=dict)
    written: bool = False


# A change applied by JobStore.transact: it mutates the JobTx and returns True
# to have it written, or returns False having changed nothing. It may run more
# than once (the Redis store runs it again when another writer got in first).
Change = Callable[[JobTx], bool]


class JobStore(Protocol):
    """Where job documents live (local files here; Redis in the distributed mode)."""

    async def save(self, job: Job) -> None:
        """Write the whole document (a new job)."""
        ...

    async def get(self, job_id: str) -> Job | None: ...
    async def delete(self, job_id: str) -> None: ...
    async def all(self) -> list[Job]: ...
    async def by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The stored job ``owner`` created with this Idempotency-Key (keys are per owner)."""
        ...

    async def file_owned(self, name: str, owner: str | None) -> bool:
        """Whether a stored job of ``owner`` names the clip file ``name`` in its results."""
        ...

    async def file_used(self, name: str) -> bool:
        """Whether any stored job names the clip file ``name`` in its results."""
        ...

    async def transact(self, job_id: str, change: Change, *, durable: bool = True) -> JobTx | None:
        """Apply ``change`` to the job's current state and store it, atomically.

        Returns the transaction (``written`` says whether it was stored), or
        None when the job does not exist. Every stored change is published to
        the job's listeners. ``durable=False`` (progress) lets a store keep
        the change in memory until its next durable write.
        """
        ...

    async def due(self, now_epoch_s: float, limit: int = 100) -> list[str]:
        """Ended jobs whose retention has run out."""
        ...

    async def take_due(self, job_id: str) -> bool:
        """Claim the deletion of one ended job; True for exactly one caller."""
        ...

    async def close(self) -> None: ...


class FileJobStore:
    """Job documents as JSON files, cached in memory for fast reads.

    The cache is the truth in this process: a transaction changes the cached
    job in place (no await between reading and changing it, so nothing comes
    between), then writes it. Clip attempt numbers are the clips' ``attempts``
    in the document; the fractions of running clips live only in memory.
    """

    def __init__(self, jobs_dir: Path, on_change: Callable[[Job], None] | None = None) -> None:
        self.jobs_dir = jobs_dir
        # Told of every stored change (the in-process event hub's notify).
        self.on_change = on_change
        self._cache: dict[str, Job] = {}
        self._partials: dict[str, dict[int, float]] = {}
        self._workers: dict[str, dict[int, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._writes: set[asyncio.Future[None]] = set()
        self._taken: set[str] = set()  # ended jobs being deleted
        # Jobs whose last write failed for want of space: written again after the next
        # write that succeeds.
        self._unsaved: set[str] = set()
        # (owner, Idempotency-Key) -> job id
        self._idempotent: dict[tuple[str | None, str], str] = {}
        # Clip file name -> owner -> that owner's jobs whose results name it
        # (rebuilt at open): whether a key may read a clip is two dict lookups.
        self._file_jobs: dict[str, dict[str | None, set[str]]] = {}

    def _path(self, job_id: str) -> Path:
        if not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        return self.jobs_dir / f"{job_id}.json"

    async def open(self) -> None:
        """Create the folder, drop stale temp files and load every job."""
        await aiofiles.os.makedirs(self.jobs_dir, exist_ok=True)
        self._cache = await asyncio.to_thread(self._load_all)
        self._idempotent = {
            (job.owner, job.idempotency_key): job.job_id
            for job in self._cache.values()
            if job.idempotency_key
        }
        self._file_jobs = {}
        for job in self._cache.values():
            self._index_files(job, job.files(), set())

    async def close(self) -> None:
        """Wait for the writes still in flight (a cancelled caller does not stop its write)."""
        while self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _load_all(self) -> dict[str, Job]:
        jobs: dict[str, Job] = {}
        for entry in os.scandir(self.jobs_dir):
            if TMP_MARKER in entry.name:
                # A write that never reached its rename: the old file is intact.
                os.unlink(entry.path)
                continue
            if not entry.name.endswith(".json") or not _JOB_ID_RE.fullmatch(entry.name[:-5]):
                continue
            try:
                with open(entry.path, "rb") as fh:
                    jobs[entry.name[:-5]] = Job.model_validate(json.load(fh))
            except (OSError, ValueError) as exc:
                log.error("job_file_unreadable", path=entry.path, error=str(exc))
        return jobs

    async def save(self, job: Job) -> None:
        old = self._cache.get(job.job_id)
        self._cache[job.job_id] = job
        if job.idempotency_key:
            self._idempotent[(job.owner, job.idempotency_key)] = job.job_id
        self._index_files(job, job.files(), old.files() if old else set())
        try:
            await self._write(job.job_id)
        except StorageFull:
            await self.delete(job.job_id)  # not on disk: it was never created
            raise
        self._notify(job.job_id)

    async def get(self, job_id: str) -> Job | None:
        if not _JOB_ID_RE.fullmatch(job_id):
            return None
        return self._cache.get(job_id)

    async def delete(self, job_id: str) -> None:
        job = self._cache.pop(job_id, None)
        if job is not None and job.idempotency_key:
            self._idempotent.pop((job.owner, job.idempotency_key), None)
        if job is not None:
            self._index_files(job, set(), job.files())
        self._partials.pop(job_id, None)
        self._workers.pop(job_id, None)
        self._taken.discard(job_id)
        self._unsaved.discard(job_id)
        lock = self._locks.pop(job_id, None) or asyncio.Lock()
        async with lock:
            await _unlink_quiet(self._path(job_id))

    async def all(self) -> list[Job]:
        return list(self._cache.values())

    async def by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The live job ``owner`` created with this Idempotency-Key (an index, not a scan)."""
        job_id = self._idempotent.get((owner, key))
        return self._cache.get(job_id) if job_id else None

    async def file_owned(self, name: str, owner: str | None) -> bool:
        return bool(self._file_jobs.get(name, {}).get(owner))

    async def file_used(self, name: str) -> bool:
        return bool(self._file_jobs.get(name))

    def _index_files(self, job: Job, now: set[str], before: set[str]) -> None:
        """Keep the file index: ``job``'s results name ``now`` instead of ``before``."""
        for name in now - before:
            self._file_jobs.setdefault(name, {}).setdefault(job.owner, set()).add(job.job_id)
        for name in before - now:
            owners = self._file_jobs.get(name, {})
            jobs = owners.get(job.owner)
            if jobs is None:
                continue
            jobs.discard(job.job_id)
            if not jobs:
                del owners[job.owner]
            if not owners:
                del self._file_jobs[name]

    async def transact(self, job_id: str, change: Change, *, durable: bool = True) -> JobTx | None:
        job = await self.get(job_id)
        if job is None:
            return None
        tx = JobTx(
            job=job,
            attempts={c.index: c.attempts for c in job.clips},
            workers=dict(self._workers.get(job_id, {})),
            partials=dict(self._partials.get(job_id, {})),
        )
        files_before, expiry_before = job.files(), job.expires_at
        if not change(tx):
            return tx
        if job.status.ended and job.expires_at != expiry_before:
            # A new expiry lists the job as due again at that time, even if its
            # deletion was taken (as the Redis store's expiry index does).
            self._taken.discard(job_id)
        self._index_files(job, job.files(), files_before)
        for clip in job.clips:
            clip.attempts = tx.attempts.get(clip.index, clip.attempts)
        self._workers[job_id] = tx.workers
        self._partials[job_id] = tx.partials
        tx.written = True
        if durable:
            with contextlib.suppress(StorageFull):  # kept in memory; written later (see _write)
                await self._write(job_id)
        self._notify(job_id)
        return tx

    async def due(self, now_epoch_s: float, limit: int = 100) -> list[str]:
        due = [
            job.job_id
            for job in self._cache.values()
            if job.status.ended
            and job.job_id not in self._taken
            # An ended job without an expiry (an old file) has outlived it.
            and (job.expires_at is None or job.expires_at.timestamp() <= now_epoch_s)
        ]
        return due[:limit]

    async def take_due(self, job_id: str) -> bool:
        if job_id not in self._cache or job_id in self._taken:
            return False
        self._taken.add(job_id)
        return True

    def _notify(self, job_id: str) -> None:
        job = self._cache.get(job_id)
        if job is not None and self.on_change is not None:
            self.on_change(job)

    async def _write(self, job_id: str) -> None:
        lock = self._locks.setdefault(job_id, asyncio.Lock())
        async with lock:
            latest = self._cache.get(job_id)
            if latest is None:  # deleted while we waited
                return
            data = json.dumps(latest.stored(), separators=(",", ":")).encode()
            # Bookkeeping is protected from cancellation: a cancelled caller
            # returns at once, but the write (and the file's close) completes,
            # and close() waits for it.
            write = asyncio.ensure_future(self._write_file(job_id, data))
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)
            write.add_done_callback(_retrieve)
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Keep the lock until the file is renamed: writes of one job stay in order.
                await asyncio.wait([write])
                raise

    async def _write_file(self, job_id: str, data: bytes) -> None:
        try:
            await _write_atomic(self._path(job_id), data)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            self._unsaved.add(job_id)
            log.error("job_write_failed", job_id=job_id, error=exc.strerror)
            raise StorageFull(exc.errno, f"job {job_id} not written: {exc.strerror}") from exc
        self._unsaved.discard(job_id)
        if self._unsaved:  # there is room again: write what could not be written
            unsaved, self._unsaved = self._unsaved, set()
            for other in unsaved:
                flush = asyncio.ensure_future(self._flush(other))
                self._writes.add(flush)
                flush.add_done_callback(self._writes.discard)

    async def _flush(self, job_id: str) -> None:
        try:
            await self._write(job_id)
        except StorageFull:
            pass  # logged; tried again after the next write that succeeds
        except OSError as exc:
            log.error("job_write_failed", job_id=job_id, error=str(exc))


class StorageFull(OSError):
    """A job file could not be written for want of space (its previous version is intact)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a write's error as seen (its caller, if not cancelled, gets it too)."""
    if not future.cancelled():
        future.exception()


async def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename: a reader sees the old or the new document."""
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        async with aiofiles.open(tmp, "wb") as fh:
            await fh.write(data)
            await fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        await _unlink_quiet(tmp)
        raise


async def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(path)
