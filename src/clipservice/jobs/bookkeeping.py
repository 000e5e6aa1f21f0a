"""Job bookkeeping: every change a runner makes to a job, each one store transaction.

The pure functions at the top change a :class:`~clipservice.jobs.models.Job`
in place (what a result records, when a job ends and how). The async
functions below apply them through :meth:`JobStore.transact
<clipservice.jobs.store.JobStore.transact>`, so the in-process runner (file
store) and the distributed workers (Redis store) keep jobs by the same rules.

Fencing: a runner claims a clip (:func:`claim_clip`) before cutting it, which
bumps the clip's attempt number, and writes that clip's progress and outcome
only while the number is still its own. A worker that was presumed dead and
whose clip was handed to another gets its late writes refused
(:class:`StaleAttempt`), and so does every write to a job that has ended
(cancelled, say).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from datetime import datetime, timedelta

from clipservice.jobs.models import (
    ClipError,
    ClipResult,
    ClipSpec,
    Job,
    JobError,
    JobStatus,
    Reel,
    WebhookAttempt,
    utcnow,
)
from clipservice.jobs.store import JobStore, JobTx

ClipOutcome = ClipResult | ClipError


class StaleAttempt(Exception):
    """A write by an attempt that no longer owns its clip (fenced off)."""


def clip_error(clip: ClipSpec, code: str, message: str) -> ClipError:
    return ClipError(index=clip.index, start=clip.start, end=clip.end, code=code, message=message)


# -- pure: mutate the Job passed in -------------------------------------------


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


def reel_due(job: Job) -> bool:
    """Every clip has an outcome, some succeeded, and the job asked for a reel
    not made yet: the job ends once the reel is made (or failed)."""
    return (
        job.merge
        and job.reel is None
        and not job.status.ended
        and bool(job.results)
        and len(job.done_indexes()) >= job.total
    )


def end_if_complete(job: Job, now: datetime, retention_s: float) -> bool:
    """Finish or fail the job once every clip has an outcome (and its reel, if it
    asked for one, is made); True if it ended now."""
    if job.status.ended or len(job.done_indexes()) < job.total or reel_due(job):
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


def cancel_clips(job: Job, now: datetime, retention_s: float) -> None:
    """Mark every clip without an outcome as cancelled and end the job as cancelled."""
    done = job.done_indexes()
    for clip in job.clips:
        if clip.index not in done:
            job.errors.append(clip_error(clip, "cancelled", "the job was cancelled"))
    job.errors.sort(key=lambda e: e.index)
    finalize(job, JobStatus.CANCELLED, None, now, retention_s)


# -- store transactions ---------------------------------------------------------


async def start_job(store: JobStore, job_id: str) -> Job | None:
    """pending → processing; the job, or None if it is gone or has ended."""

    def change(tx: JobTx) -> bool:
        if tx.job.status is not JobStatus.PENDING:
            return False
        tx.job.status = JobStatus.PROCESSING
        tx.job.updated_at = utcnow()
        return True

    tx = await store.transact(job_id, change)
    if tx is None or tx.job.status.ended:
        return None
    return tx.job


async def claim_clip(store: JobStore, job_id: str, index: int, worker_id: str) -> int | None:
    """Take a clip for a new attempt: its attempt number, or None if there is nothing to do.

    Stored before the cut starts, so a crash from here on counts as an attempt.
    """

    def change(tx: JobTx) -> bool:
        if tx.job.status.ended or index in tx.job.done_indexes():
            return False
        if tx.job.status is JobStatus.PENDING:
            tx.job.status = JobStatus.PROCESSING
        tx.attempts[index] = tx.attempts.get(index, 0) + 1
        tx.workers[index] = worker_id
        tx.partials.pop(index, None)
        update_progress(tx.job, tx.partials, utcnow())
        return True

    tx = await store.transact(job_id, change)
    return tx.attempts[index] if tx is not None and tx.written else None


async def clip_progress(
    store: JobStore, job_id: str, index: int, attempt: int, fraction: float
) -> bool:
    """Record a running clip's fraction done; False if this attempt is stale."""

    def change(tx: JobTx) -> bool:
        if tx.attempts.get(index) != attempt or tx.job.status.ended:
            return False
        tx.partials[index] = max(0.0, min(1.0, fraction))
        update_progress(tx.job, tx.partials, utcnow())
        return True

    tx = await store.transact(job_id, change, durable=False)
    return tx is not None and tx.written


async def release_clip(store: JobStore, job_id: str, index: int, attempt: int) -> None:
    """Give an attempt back: the service stopped the clip itself, so it does not count.

    Only for a runner that writes nothing more for this attempt.
    """

    def change(tx: JobTx) -> bool:
        if tx.attempts.get(index) != attempt or tx.job.status.ended:
            return False
        if index in tx.job.done_indexes():
            return False
        tx.attempts[index] = attempt - 1
        tx.partials.pop(index, None)
        update_progress(tx.job, tx.partials, utcnow())
        return True

    await store.transact(job_id, change)


async def record_clip(
    store: JobStore, job_id: str, attempt: int, outcome: ClipOutcome, retention_s: float
) -> Job:
    """Record a clip's result or error and end the job if it was the last clip.

    Raises :class:`StaleAttempt` when this attempt no longer owns the clip
    (claimed again by another worker, or the job ended or is gone).
    """

    def change(tx: JobTx) -> bool:
        if tx.attempts.get(outcome.index, 0) != attempt or tx.job.status.ended:
            return False
        if not add_outcome(tx.job, outcome):
            return False
        now = utcnow()
        tx.partials.pop(outcome.index, None)
        update_progress(tx.job, tx.partials, now)
        if end_if_complete(tx.job, now, retention_s):
            tx.partials.clear()
        return True

    tx = await store.transact(job_id, change)
    if tx is None or not tx.written:
        raise StaleAttempt(f"job {job_id} clip {outcome.index} attempt {attempt}")
    return tx.job


async def finish_if_done(store: JobStore, job_id: str, retention_s: float) -> Job | None:
    """End a job whose every clip has an outcome; the job if this call ended it."""

    def change(tx: JobTx) -> bool:
        if not end_if_complete(tx.job, utcnow(), retention_s):
            return False
        tx.partials.clear()
        return True

    tx = await store.transact(job_id, change)
    return tx.job if tx is not None and tx.written else None


async def set_reel(store: JobStore, job_id: str, reel: Reel, retention_s: float) -> Job | None:
    """Record the job's reel (made, or why not) and end the job; the job if this
    call ended it (None: the job ended meanwhile, was cancelled or is gone)."""

    def change(tx: JobTx) -> bool:
        if not reel_due(tx.job):
            return False
        tx.job.reel = reel
        tx.job.updated_at = utcnow()
        end_if_complete(tx.job, tx.job.updated_at, retention_s)
        tx.partials.clear()
        return True

    tx = await store.transact(job_id, change)
    return tx.job if tx is not None and tx.written and tx.job.status.ended else None


async def fail_job(store: JobStore, job_id: str, error: JobError, retention_s: float) -> Job | None:
    """End a job that cannot go on (its source failed); the job, or None if it had ended."""

    def change(tx: JobTx) -> bool:
        if tx.job.status.ended:
            return False
        finalize(tx.job, JobStatus.FAILED, error, utcnow(), retention_s)
        tx.partials.clear()
        return True

    tx = await store.transact(job_id, change)
    return tx.job if tx is not None and tx.written else None


async def cancel_job(store: JobStore, job_id: str, retention_s: float) -> tuple[Job | None, bool]:
    """Cancel a job that has not ended: (the job, whether this call cancelled it).

    Its status fences off every running attempt: none can write to it any more.
    """

    def change(tx: JobTx) -> bool:
        if tx.job.status.ended:
            return False
        cancel_clips(tx.job, utcnow(), retention_s)
        tx.partials.clear()
        return True

    tx = await store.transact(job_id, change)
    if tx is None:
        return None, False
    return tx.job, tx.written


async def add_webhook_attempt(store: JobStore, job_id: str, attempt: WebhookAttempt) -> bool:
    """Append one webhook delivery attempt; False if the job is gone (deleted after retention)."""

    def change(tx: JobTx) -> bool:
        tx.job.webhook_attempts.append(attempt)
        return True

    tx = await store.transact(job_id, change)
    return tx is not None
