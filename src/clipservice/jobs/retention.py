"""Retention: ended jobs and their clip files are deleted ``retention_s`` after they end.

Both runners run :func:`reap_forever` (the in-process one, and every node of
the distributed mode): whoever takes an expired job off the store's expiry
list (:meth:`JobStore.take_due <clipservice.jobs.store.JobStore.take_due>`)
deletes it and its files, keeping every file another stored job still uses
(:func:`still_used`). The loop also removes temporary outputs that crashed
cuts left behind.

An object store that fails a delete (:class:`~clipservice.s3storage.StorageError`)
does not cost the object: the job is kept and its expiry pushed
:data:`DELETE_RETRY_S` ahead; both stores list a job whose expiry was set
again as due at that time, so any node (or this one after a restart) takes it
up again then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

import structlog
from redis.exceptions import RedisError

from clipservice.config import Settings
from clipservice.errors import ProblemError
from clipservice.jobs.models import Job
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.store import JobStore, JobTx
from clipservice.s3storage import StorageError
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)

# A clip's work outside clip_timeout_s (resolving, probing, validating) takes
# far less than this; a temporary output untouched this much longer is stale.
_PART_GRACE_S = 120
# A job whose files the store failed to delete is tried again this much later.
DELETE_RETRY_S = 30.0


def reap_interval_s(settings: Settings) -> float:
    return min(5.0, max(0.2, settings.jobs.retention_s / 2))


def part_age_s(settings: Settings) -> float:
    """Age past which a temporary output belongs to no live cut."""
    return settings.jobs.clip_timeout_s + _PART_GRACE_S


def still_used(jobs: Iterable[Job], but: str) -> set[str]:
    """The clip files the jobs other than ``but`` still use.

    An ended job uses the files of its results; a live job any file of its
    clips, since it may be cutting one or about to reuse it.
    """
    used: set[str] = set()
    for job in jobs:
        if job.job_id == but:
            continue
        if job.status.ended:
            used |= job.files()
        else:
            used |= {clip_file_name(job.source, c) for c in job.clips}
    return used


async def delete_job_and_files(
    store: JobStore, storage: ClipStorage, job_id: str, jobs: Iterable[Job] | None = None
) -> int:
    """Delete a job and every file of it no other stored job uses; files removed.

    ``jobs``: the stored jobs, when the caller has just read them (a round of
    deletions reads them once, not once per job)."""
    job = await store.get(job_id)
    if job is None:
        return 0
    removed = 0
    if jobs is None:
        jobs = await store.all()
    try:
        for name in sorted(job.files() - still_used(jobs, job_id)):
            removed += await storage.delete(name)
    except StorageError as exc:
        await _defer(store, job_id, exc)
        raise
    await store.delete(job_id)
    log.info("job_deleted", job_id=job_id, files_removed=removed)
    return removed


async def _defer(store: JobStore, job_id: str, exc: StorageError) -> None:
    """Keep a job whose files could not be deleted, to be tried again later."""
    retry_at = time.time() + DELETE_RETRY_S
    log.warning("job_delete_deferred", job_id=job_id, retry_in_s=DELETE_RETRY_S, error=exc.message)

    def push_expiry(tx: JobTx) -> bool:
        tx.job.expires_at = datetime.fromtimestamp(retry_at, UTC)
        return True

    await store.transact(job_id, push_expiry)


async def delete_now(store: JobStore, storage: ClipStorage, job: Job) -> None:
    """Delete an ended job and its files before its retention ends (DELETE on an ended job).

    The object store failing answers 503 (the job and its files are deleted
    later, as by retention).
    """
    await store.take_due(job.job_id)  # the reaper must not take it too
    try:
        await delete_job_and_files(store, storage, job.job_id)
    except StorageError as exc:
        raise ProblemError(
            503,
            "Storage unavailable",
            "the clip store did not answer; the job is deleted later, or retry shortly",
            code="storage_unavailable",
            headers={"Retry-After": str(int(DELETE_RETRY_S))},
        ) from exc


async def reap_expired(store: JobStore, storage: ClipStorage) -> int:
    """Delete the jobs whose retention ran out; each by exactly one node.

    A job whose files the storage failed to delete stays, and is tried again
    :data:`DELETE_RETRY_S` later.
    """
    count = 0
    due = await store.due(time.time())
    if not due:
        return 0
    # The stored jobs, read once for the round (each deletion asks which files
    # the others use); a deleted job leaves the snapshot.
    jobs = {job.job_id: job for job in await store.all()}
    for job_id in due:
        if not await store.take_due(job_id):
            continue
        try:
            await delete_job_and_files(store, storage, job_id, jobs.values())
        except StorageError:
            continue  # deferred (logged): due again DELETE_RETRY_S later
        jobs.pop(job_id, None)
        count += 1
    return count


async def reap_forever(
    store: JobStore,
    storage: ClipStorage,
    settings: Settings,
    also: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Reap expired jobs and stale temporary outputs every few seconds, until cancelled."""
    while True:
        try:
            if also is not None:
                await also()
            await reap_expired(store, storage)
            # A process killed mid-cut leaves its temporary file behind (on the
            # shared volume, in the distributed mode); one older than any clip
            # may run belongs to nobody.
            await storage.remove_stale_parts(older_than_s=part_age_s(settings))
        except (RedisError, OSError) as exc:  # Redis away for a moment: next round
            log.warning("reaper_failed", error=str(exc))
        except Exception:
            log.exception("reaper_failed")
        await asyncio.sleep(reap_interval_s(settings))
