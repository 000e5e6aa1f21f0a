"""A job's reel: its clips joined in order into one more file (``merge: true``).

Made once every clip has an outcome, before the job ends (the ended job's
document has it), by whichever process recorded the last clip: the in-process
runner at the end of the job, or, in the distributed mode, a ``merge_job``
task that the queue retries if its worker dies. A reel that cannot be made
does not fail the job: the reel says why.

The join needs local files: the storage lends them (the shared folder's own
files, or downloads from the bucket into the staging folder, removed after),
and the reel is published like any output.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import structlog

from clipservice.errors import ClipFailure
from clipservice.jobs.models import Job, JobError, Reel
from clipservice.jobs.naming import reel_file_name
from clipservice.media.ffmpeg import FFmpegError
from clipservice.media.render import merge_clips
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)


async def make_reel(job: Job, storage: ClipStorage, *, timeout_s: float) -> Reel:
    """Join the job's results in clip order into ``reel-{job_id}.mp4`` (published
    to the storage); the reel, or why it could not be made."""
    results = sorted(job.results, key=lambda r: r.index)
    indexes = [r.index for r in results]
    name = reel_file_name(job.job_id)
    try:
        async with asyncio.timeout(timeout_s), AsyncExitStack() as local:
            inputs = [await local.enter_async_context(storage.local_file(r.file)) for r in results]
            # (merge_clips writes under a temporary name and renames when valid.)
            outcome = await merge_clips(
                inputs, storage.staging_path(name), crossfade_s=job.crossfade_s, timeout_s=timeout_s
            )
        await storage.publish(name)
    except ClipFailure as exc:
        return _failed(indexes, exc.code, exc.message)
    except FFmpegError as exc:
        return _failed(indexes, "ffmpeg_failed", exc.stderr_tail or str(exc))
    except TimeoutError:
        return _failed(indexes, "timeout", f"the reel took over {timeout_s}s")
    log.info("reel_made", file=name, clips=len(indexes), duration_s=outcome.duration_s)
    return Reel(
        clips=indexes,
        file=name,
        url=f"/api/clips/{name}",
        size_bytes=outcome.size_bytes,
        duration_s=round(outcome.duration_s, 3),
    )


def _failed(indexes: list[int], code: str, message: str) -> Reel:
    log.warning("reel_failed", code=code, error=message[:300])
    return Reel(clips=indexes, error=JobError(code=code, message=message))
