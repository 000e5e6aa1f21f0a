"""Retention: ended jobs and their clip files are deleted ``retention_s`` after they end.

Every node runs :func:`reap_forever`: whoever takes an expired job off the
store's expiry list deletes it and its files, keeping any file another stored
job still names. The loop also removes temporary outputs that crashed cuts
left behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from clipservice.config import Settings
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.queue import TASK_TIMEOUT_MARGIN_S
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.storage import SharedFolderStorage

log = structlog.get_logger(__name__)


def reap_interval_s(settings: Settings) -> float:
    return min(5.0, max(0.2, settings.jobs.retention_s / 2))


def part_age_s(settings: Settings) -> float:
    """Age past which a temporary output belongs to no live cut."""
    return settings.jobs.clip_timeout_s + TASK_TIMEOUT_MARGIN_S * 2


async def delete_job_and_files(
    store: RedisJobStore, storage: SharedFolderStorage, job_id: str
) -> int:
    """Delete a job and every file of it no other stored job names; files removed."""
    job = await store.get(job_id)
    if job is None:
        return 0
    still_used: set[str] = set()
    for other in await store.all():
        if other.job_id == job_id:
            continue
        if other.status.ended:
            still_used |= other.files()
        else:
            # A live job may be cutting or about to reuse any of its clips.
            still_used |= {clip_file_name(other.source, c) for c in other.clips}
    removed = 0
    for name in sorted(job.files() - still_used):
        removed += await storage.delete(name)
    await store.delete(job_id)
    log.info("job_deleted", job_id=job_id, files_removed=removed)
    return removed


async def reap_expired(store: RedisJobStore, storage: SharedFolderStorage) -> int:
    """Delete the jobs whose retention ran out; each by exactly one node."""
    count = 0
    for job_id in await store.due(time.time()):
        if await store.take_due(job_id):
            await delete_job_and_files(store, storage, job_id)
            count += 1
    return count


async def reap_forever(
    store: RedisJobStore,
    storage: SharedFolderStorage,
    settings: Settings,
    also: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Reap expired jobs and stale temporary outputs every few seconds, until cancelled."""
    while True:
        try:
            if also is not None:
                await also()
            await reap_expired(store, storage)
            # A worker killed mid-cut leaves its temporary file on the shared
            # volume; one older than any clip may run belongs to nobody.
            await storage.remove_stale_parts(older_than_s=part_age_s(settings))
        except (RedisError, OSError) as exc:  # Redis away for a moment: next round
            log.warning("reaper_failed", error=str(exc))
        except Exception:
            log.exception("reaper_failed")
        await asyncio.sleep(reap_interval_s(settings))
