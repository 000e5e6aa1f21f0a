"""The job stores: atomic writes, stale temp files, reload after restart; and the
bookkeeping transactions, which must behave the same on the file store and on Redis."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clipservice.jobs import bookkeeping
from clipservice.jobs.bookkeeping import StaleAttempt
from clipservice.jobs.models import (
    ClipError,
    ClipResult,
    ClipSpec,
    Job,
    JobError,
    JobSource,
    JobStatus,
    WebhookAttempt,
    new_job_id,
    utcnow,
)
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.store import FileJobStore, JobStore


def _job() -> Job:
    clips = [ClipSpec(index=0, start=1, end=2, mode="fast")]
    return Job(job_id=new_job_id(), source=JobSource(video_id="abc"), clips=clips, total=1)


async def test_save_is_atomic_under_concurrent_readers(tmp_path: Path) -> None:
    """While a job is rewritten many times, a reader never sees a torn or empty file."""
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    job = _job()
    await store.save(job)
    path = tmp_path / "jobs" / f"{job.job_id}.json"
    stop = False
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop:
            with path.open("rb") as fh:
                doc = json.loads(fh.read())  # raises on a torn file
            assert doc["job_id"] == job.job_id
            reads += 1

    task = asyncio.create_task(asyncio.to_thread(reader))
    for i in range(200):
        job.processed = i % 2
        job.errors = []
        job.progress = i / 200
        await store.save(job)
    stop = True
    await task
    assert reads > 0
    assert not [n for n in os.listdir(tmp_path / "jobs") if ".tmp-" in n]


async def test_concurrent_saves_end_with_latest_state(tmp_path: Path) -> None:
    """Overlapping saves of one job leave the newest state on disk."""
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    job = _job()

    async def bump(i: int) -> None:
        job.progress = i / 50
        await store.save(job)

    await asyncio.gather(*(bump(i) for i in range(51)))
    on_disk = json.loads((tmp_path / "jobs" / f"{job.job_id}.json").read_text())
    assert on_disk["progress"] == 1.0


async def test_reload_keeps_hidden_fields_and_drops_stale_temps(tmp_path: Path) -> None:
    """A new store sees saved jobs (with idempotency data) and removes leftover temp files."""
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    job = _job()
    job.idempotency_key = "k1"
    job.request_hash = "h1"
    job.status = JobStatus.PROCESSING
    await store.save(job)
    stale = tmp_path / "jobs" / f"{job.job_id}.json.tmp-deadbeef"
    stale.write_text('{"torn": ')
    (tmp_path / "jobs" / "junk.txt").write_text("x")
    again = FileJobStore(tmp_path / "jobs")
    await again.open()
    loaded = await again.get(job.job_id)
    assert loaded is not None
    assert loaded.status is JobStatus.PROCESSING
    assert (loaded.idempotency_key, loaded.request_hash) == ("k1", "h1")
    assert not stale.exists()
    assert "idempotency_key" not in loaded.public()


async def test_delete_and_bad_ids(tmp_path: Path) -> None:
    """Deleted jobs are gone; ids that are not job ids never touch the disk."""
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    job = _job()
    await store.save(job)
    await store.delete(job.job_id)
    assert await store.get(job.job_id) is None
    assert not (tmp_path / "jobs" / f"{job.job_id}.json").exists()
    assert await store.get("../../etc/passwd") is None


# -- the bookkeeping, through either store's transaction ---------------------------

REDIS_TEST_URL = "redis://127.0.0.1:6379/10"


@pytest.fixture(params=["file", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """A FileJobStore and a RedisJobStore: the bookkeeping must behave the same on both."""
    if request.param == "file":
        files = FileJobStore(tmp_path / "jobs")
        await files.open()
        yield files
        await files.close()
        return
    redis = RedisJobStore.from_url(REDIS_TEST_URL)
    await redis.redis.flushdb()
    yield redis
    await redis.redis.flushdb()
    await redis.close()


def _job_of(n: int) -> Job:
    clips = [ClipSpec(index=i, start=float(i), end=float(i) + 1, mode="fast") for i in range(n)]
    return Job(job_id=new_job_id(), source=JobSource(video_id="vid"), clips=clips, total=n)


def _result(job: Job, i: int) -> ClipResult:
    name = clip_file_name(job.source, job.clips[i])
    return ClipResult(
        index=i, start=float(i), end=float(i) + 1, mode="fast", file=name, url=f"/api/clips/{name}",
        size_bytes=10, duration_s=1.0, actual_start=float(i), actual_end=float(i) + 1,
    )  # fmt: skip


def _error(i: int, code: str = "ffmpeg_failed") -> ClipError:
    return ClipError(index=i, start=float(i), end=float(i) + 1, code=code, message="boom")


async def test_last_clip_ends_the_job(any_store: JobStore) -> None:
    """processed/progress move with each outcome and the last one finishes the job."""
    job = _job_of(3)
    await any_store.save(job)
    attempts = [await bookkeeping.claim_clip(any_store, job.job_id, i, "w") for i in range(3)]
    assert attempts == [1, 1, 1]
    assert await bookkeeping.clip_progress(any_store, job.job_id, 2, 1, 0.5)
    after = await bookkeeping.record_clip(any_store, job.job_id, 1, _result(job, 0), 60)
    assert after.status is JobStatus.PROCESSING and after.processed == 1
    assert after.progress == pytest.approx((1 + 0.5) / 3, abs=1e-3)
    await bookkeeping.record_clip(any_store, job.job_id, 1, _error(1), 60)
    final = await bookkeeping.record_clip(any_store, job.job_id, 1, _result(job, 2), 60)
    assert final.status is JobStatus.FINISHED and final.processed == 3 and final.progress == 1.0
    assert final.expires_at is not None and final.finished_at is not None
    assert [e.index for e in final.errors] == [1]
    assert await any_store.due(time.time() + 120) == [job.job_id]
    assert await any_store.due(time.time()) == []
    assert await any_store.take_due(job.job_id) and not await any_store.take_due(job.job_id)


async def test_every_clip_failed_fails_the_job(any_store: JobStore) -> None:
    """A job whose clips all failed ends as failed with the most common code."""
    job = _job_of(2)
    await any_store.save(job)
    for i in range(2):
        a = await bookkeeping.claim_clip(any_store, job.job_id, i, "w")
        assert a is not None
        await bookkeeping.record_clip(any_store, job.job_id, a, _error(i, "timeout"), 60)
    final = await any_store.get(job.job_id)
    assert final is not None and final.status is JobStatus.FAILED
    assert final.error is not None and final.error.code == "timeout"


async def test_reclaimed_clip_fences_the_old_attempt(any_store: JobStore) -> None:
    """After a clip is claimed again, the earlier attempt's progress and outcome are refused."""
    job = _job_of(1)
    await any_store.save(job)
    old = await bookkeeping.claim_clip(any_store, job.job_id, 0, "dead-worker")
    new = await bookkeeping.claim_clip(any_store, job.job_id, 0, "live-worker")
    assert (old, new) == (1, 2)
    assert not await bookkeeping.clip_progress(any_store, job.job_id, 0, 1, 0.9)
    with pytest.raises(StaleAttempt):
        await bookkeeping.record_clip(any_store, job.job_id, 1, _error(0), 60)
    final = await bookkeeping.record_clip(any_store, job.job_id, 2, _result(job, 0), 60)
    assert final.status is JobStatus.FINISHED and final.errors == []
    # A finished clip is not claimed again (a duplicate task is a no-op).
    assert await bookkeeping.claim_clip(any_store, job.job_id, 0, "late") is None


async def test_cancel_fences_running_attempts(any_store: JobStore) -> None:
    """Cancelling marks undone clips cancelled and refuses the running attempts' writes."""
    job = _job_of(2)
    await any_store.save(job)
    a0 = await bookkeeping.claim_clip(any_store, job.job_id, 0, "w")
    a1 = await bookkeeping.claim_clip(any_store, job.job_id, 1, "w")
    assert a0 is not None and a1 is not None
    await bookkeeping.record_clip(any_store, job.job_id, a0, _result(job, 0), 60)
    cancelled, changed = await bookkeeping.cancel_job(any_store, job.job_id, 60)
    assert changed and cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert [(e.index, e.code) for e in cancelled.errors] == [(1, "cancelled")]
    assert not await bookkeeping.clip_progress(any_store, job.job_id, 1, a1, 0.5)
    with pytest.raises(StaleAttempt):
        await bookkeeping.record_clip(any_store, job.job_id, a1, _result(job, 1), 60)
    again, changed = await bookkeeping.cancel_job(any_store, job.job_id, 60)
    assert not changed and again is not None and again.status is JobStatus.CANCELLED
    error = JobError(code="x", message="y")
    assert await bookkeeping.fail_job(any_store, job.job_id, error, 60) is None


async def test_released_attempt_is_not_counted(any_store: JobStore) -> None:
    """An attempt given back (the service stopped its clip) leaves the count as it was, and a
    stale attempt cannot give one back."""
    job = _job_of(1)
    await any_store.save(job)
    first = await bookkeeping.claim_clip(any_store, job.job_id, 0, "w")
    assert first == 1
    await bookkeeping.release_clip(any_store, job.job_id, 0, first)
    assert await bookkeeping.claim_clip(any_store, job.job_id, 0, "w") == 1
    assert await bookkeeping.claim_clip(any_store, job.job_id, 0, "w") == 2
    await bookkeeping.release_clip(any_store, job.job_id, 0, 1)  # stale: ignored
    assert await bookkeeping.claim_clip(any_store, job.job_id, 0, "w") == 3


async def test_webhook_attempt_never_brings_a_deleted_job_back(any_store: JobStore) -> None:
    """A delivery attempt is appended to a stored job, and is only dropped once the job is gone."""
    job = _job_of(1)
    await any_store.save(job)
    attempt = WebhookAttempt(at=utcnow(), status=500)
    assert await bookkeeping.add_webhook_attempt(any_store, job.job_id, attempt)
    stored = await any_store.get(job.job_id)
    assert stored is not None and [a.status for a in stored.webhook_attempts] == [500]
    await any_store.delete(job.job_id)
    assert not await bookkeeping.add_webhook_attempt(any_store, job.job_id, attempt)
    assert await any_store.get(job.job_id) is None and await any_store.all() == []


async def test_file_store_transactions_reach_listeners_and_disk(tmp_path: Path) -> None:
    """Every stored change is told to the listener; a durable one is on disk, a progress-only
    one is not written until the next durable change."""
    seen: list[float] = []
    store = FileJobStore(tmp_path / "jobs", on_change=lambda job: seen.append(job.progress))
    await store.open()
    job = _job_of(2)
    await store.save(job)
    path = tmp_path / "jobs" / f"{job.job_id}.json"
    attempt = await bookkeeping.claim_clip(store, job.job_id, 0, "w")
    assert attempt == 1
    assert json.loads(path.read_text())["clips"][0]["attempts"] == 1
    assert await bookkeeping.clip_progress(store, job.job_id, 0, 1, 0.5)
    assert seen[-1] == 0.25
    assert json.loads(path.read_text())["progress"] == 0.0
    await bookkeeping.record_clip(store, job.job_id, 1, _result(job, 0), 60)
    assert json.loads(path.read_text())["progress"] == 0.5 and seen[-1] == 0.5
    await store.close()
