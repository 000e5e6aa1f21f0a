"""One clip's work and the job bookkeeping around it, as small shared functions.

The distributed runner calls these from SAQ worker functions; they hold no
state of their own, so the same rules (range check, reuse of a complete
output, what a result records, when a job ends and how) apply whichever
runner cut the clip.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import structlog

from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure
from clipservice.jobs.models import ClipError, ClipResult, ClipSpec, Job, JobError, JobStatus
from clipservice.media.cutter import CutSpec, Cutter
from clipservice.media.ffmpeg import ProgressCallback
from clipservice.media.probe import SourceInfo
from clipservice.media.source import SourceIndex
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)

# Ranges may end this far past the probed duration (container rounding).
RANGE_SLACK_S = 0.05

ClipOutcome = ClipResult | ClipError


def check_range(clip: ClipSpec, info: SourceInfo) -> None:
    """Refuse a clip that ends past the source's end (``invalid_range``)."""
    if clip.end > info.duration_s + RANGE_SLACK_S:
        raise ClipFailure(
            "invalid_range",
            f"clip ends at {clip.end}s but the video lasts {info.duration_s:.3f}s",
        )


async def produce_clip(
    cutter: Cutter,
    storage: ClipStorage,
    clip: ClipSpec,
    src: StreamUrls,
    info: SourceInfo,
    name: str,
    *,
    timeout_s: float,
    on_progress: ProgressCallback | None = None,
    keyframes: SourceIndex | None = None,
    on_written: Callable[[int], None] | None = None,
) -> ClipResult:
    """Cut ``clip`` into ``name`` (or reuse a complete earlier output) and describe it.

    ``on_written`` hears the size of a newly written output (not of a reused one).
    """
    final = storage.staging_path(name)
    if await storage.exists(name):
        log.info("clip_reused", file=name)
        outcome = await cutter.describe_existing(final, clip.start, clip.end, clip.mode)
    else:
        outcome = await cutter.cut(
            CutSpec(
                streams=src,
                info=info,
                start_s=clip.start,
                end_s=clip.end,
                mode=clip.mode,
                final=final,
                timeout_s=timeout_s,
                source=keyframes,
                on_progress=on_progress,
            )
        )
        await storage.publish(name)
        if on_written is not None:
            on_written(outcome.size_bytes)
    return ClipResult(
        index=clip.index,
        start=clip.start,
        end=clip.end,
        mode=clip.mode,
        file=name,
        url=f"/api/clips/{name}",
        size_bytes=outcome.size_bytes,
        duration_s=round(outcome.duration_s, 3),
        actual_start=round(outcome.actual_start, 3),
        actual_end=round(outcome.actual_end, 3),
        note=outcome.note,
    )


def clip_error(clip: ClipSpec, code: str, message: str) -> ClipError:
    return ClipError(index=clip.index, start=clip.start, end=clip.end, code=code, message=message)


# -- job bookkeeping (pure: mutate the Job passed in) ------------------------


def add_outcome(job: Job, outcome: ClipOutcome) -> bool:
    """Record one clip's outcome; False if that clip already had one."""
    if outcome.index in job.done_indexes():
        return False
    if isinstance(outcome, ClipResult):
        job.results.append(outcome)
        job.results.sort(key=lambda r: r.index)
    else:
        job.errors.append(outcome)
        job.errors.sort(key=lambda e: e.index)
    return True


def update_progress(job: Job, partials: Mapping[int, float], now: datetime) -> None:
    """``processed`` from the recorded outcomes, ``progress`` also from running clips."""
    done = job.done_indexes()
    job.processed = len(done)
    partial = sum(f for i, f in partials.items() if i not in done)
    job.progress = round(min(1.0, (job.processed + partial) / job.total), 4)
    job.updated_at = now


def finalize(
    job: Job, status: JobStatus, error: JobError | None, now: datetime, retention_s: float
) -> None:
    """End the job: status, error, timestamps and its expiry."""
    job.status = status
    job.error = error
    job.finished_at = job.updated_at = now
    job.expires_at = now + timedelta(seconds=retention_s)
    job.processed = len(
        {r.index for r in job.results} | {e.index for e in job.errors if e.code != "cancelled"}
    )
    if status is not JobStatus.CANCELLED:
        job.progress = 1.0


def end_if_complete(job: Job, now: datetime, retention_s: float) -> bool:
    """Finish or fail the job once every clip has an outcome; True if it ended now."""
    if job.status.ended or len(job.done_indexes()) < job.total:
        return False
    if job.results:
        finalize(job, JobStatus.FINISHED, None, now, retention_s)
    else:
        codes = Counter(e.code for e in job.errors)
        code = codes.most_common(1)[0][0] if codes else "ffmpeg_failed"
        finalize(
            job,
            JobStatus.FAILED,
            JobError(code=code, message="every clip failed"),
            now,
            retention_s,
        )
    return True


def cancel(job: Job, now: datetime, retention_s: float) -> None:
    """Mark every clip without an outcome as cancelled and end the job as cancelled."""
    done = job.done_indexes()
    for clip in job.clips:
        if clip.index not in done:
            job.errors.append(clip_error(clip, "cancelled", "the job was cancelled"))
    job.errors.sort(key=lambda e: e.index)
    finalize(job, JobStatus.CANCELLED, None, now, retention_s)
