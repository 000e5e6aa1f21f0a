"""RedisJobStore against the real Redis: atomic bookkeeping and attempt fencing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from clipservice.jobs.models import (
    ClipError,
    ClipResult,
    ClipSpec,
    Job,
    JobError,
    JobSource,
    JobStatus,
    new_job_id,
)
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.redis_store import RedisJobStore, StaleAttempt
from clipservice.jobs.retention import delete_job_and_files, reap_expired
from clipservice.storage import SharedFolderStorage

REDIS_TEST_URL = "redis://127.0.0.1:6379/11"


@pytest.fixture
async def store() -> AsyncIterator[RedisJobStore]:
    s = RedisJobStore.from_url(REDIS_TEST_URL)
    await s.redis.flushdb()
    yield s
    await s.redis.flushdb()
    await s.close()


def make_job(n: int = 3, video_id: str = "vid") -> Job:
    clips = [ClipSpec(index=i, start=float(i), end=float(i) + 1, mode="fast") for i in range(n)]
    return Job(
        job_id=new_job_id(),
        video_id=video_id,
        source=JobSource(video_id=video_id),
        clips=clips,
        total=n,
    )


def result(job: Job, i: int) -> ClipResult:
    name = clip_file_name(job.source, job.clips[i])
    return ClipResult(
        index=i, start=float(i), end=float(i) + 1, mode="fast", file=name, url=f"/api/clips/{name}",
        size_bytes=10, duration_s=1.0, actual_start=float(i), actual_end=float(i) + 1,
    )  # fmt: skip


def error(i: int, code: str = "ffmpeg_failed") -> ClipError:
    return ClipError(index=i, start=float(i), end=float(i) + 1, code=code, message="boom")


async def test_roundtrip(store: RedisJobStore) -> None:
    """A saved job reads back equal (hidden fields too), is listed, and is deleted."""
    job = make_job()
    job.idempotency_key = "k1"
    await store.save(job)
    got = await store.get(job.job_id)
    assert got is not None and got.stored() == job.stored()
    assert [j.job_id for j in await store.all()] == [job.job_id]
    assert await store.get("not-an-id") is None
    await store.delete(job.job_id)
    assert await store.get(job.job_id) is None and await store.all() == []


async def test_idempotency_key_lookup(store: RedisJobStore) -> None:
    """A job is found by its Idempotency-Key with one lookup, and no longer once deleted."""
    job = make_job()
    job.idempotency_key = "retry-me"
    await store.save(job)
    found = await store.by_idempotency_key("retry-me")
    assert found is not None and found.job_id == job.job_id
    assert await store.by_idempotency_key("other") is None
    await store.delete(job.job_id)
    assert await store.by_idempotency_key("retry-me") is None


async def test_last_clip_ends_the_job(store: RedisJobStore) -> None:
    """processed/progress move with each outcome and the last one finishes the job."""
    job = make_job(3)
    await store.save(job)
    attempts = [await store.claim_clip(job.job_id, i, "w") for i in range(3)]
    assert attempts == [1, 1, 1]
    assert await store.clip_progress(job.job_id, 2, 1, 0.5)
    after = await store.record_clip(job.job_id, 1, result(job, 0), 60)
    assert after.status is JobStatus.PROCESSING and after.processed == 1
    assert after.progress == pytest.approx((1 + 0.5) / 3, abs=1e-3)
    await store.record_clip(job.job_id, 1, error(1), 60)
    final = await store.record_clip(job.job_id, 1, result(job, 2), 60)
    assert final.status is JobStatus.FINISHED and final.processed == 3 and final.progress == 1.0
    assert final.expires_at is not None and final.finished_at is not None
    assert [e.index for e in final.errors] == [1]
    assert await store.due(time.time() + 120) == [job.job_id]


async def test_every_clip_failed_fails_the_job(store: RedisJobStore) -> None:
    """A job whose clips all failed ends as failed with the most common code."""
    job = make_job(2)
    await store.save(job)
    for i in range(2):
        a = await store.claim_clip(job.job_id, i, "w")
        assert a is not None
        await store.record_clip(job.job_id, a, error(i, "timeout"), 60)
    final = await store.get(job.job_id)
    assert final is not None and final.status is JobStatus.FAILED
    assert final.error is not None and final.error.code == "timeout"


async def test_concurrent_writers_lose_nothing(store: RedisJobStore) -> None:
    """Outcomes recorded at once from separate connections are all kept (compare-and-set)."""
    job = make_job(12)
    await store.save(job)
    others = [RedisJobStore.from_url(REDIS_TEST_URL) for _ in range(4)]
    try:

        async def one(i: int) -> None:
            s = others[i % len(others)]
            a = await s.claim_clip(job.job_id, i, f"w{i % 4}")
            assert a == 1
            await s.clip_progress(job.job_id, i, a, 0.3)
            await s.record_clip(job.job_id, a, result(job, i), 60)

        await asyncio.gather(*(one(i) for i in range(12)))
    finally:
        for s in others:
            await s.close()
    final = await store.get(job.job_id)
    assert final is not None and final.status is JobStatus.FINISHED
    assert [r.index for r in final.results] == list(range(12)) and final.processed == 12


async def test_reclaimed_clip_fences_the_old_attempt(store: RedisJobStore) -> None:
    """After a clip is claimed again, the earlier attempt's progress and outcome are refused."""
    job = make_job(1)
    await store.save(job)
    old = await store.claim_clip(job.job_id, 0, "dead-worker")
    new = await store.claim_clip(job.job_id, 0, "live-worker")
    assert (old, new) == (1, 2)
    assert not await store.clip_progress(job.job_id, 0, 1, 0.9)
    with pytest.raises(StaleAttempt):
        await store.record_clip(job.job_id, 1, error(0), 60)
    final = await store.record_clip(job.job_id, 2, result(job, 0), 60)
    assert final.status is JobStatus.FINISHED and final.errors == []
    assert await store.clip_workers(job.job_id) == {0: "live-worker"}
    # A finished clip is not claimed again (a duplicate task is a no-op).
    assert await store.claim_clip(job.job_id, 0, "late") is None


async def test_cancel_fences_running_attempts(store: RedisJobStore) -> None:
    """Cancelling marks undone clips cancelled and refuses the running attempts' writes."""
    job = make_job(2)
    await store.save(job)
    a0 = await store.claim_clip(job.job_id, 0, "w")
    a1 = await store.claim_clip(job.job_id, 1, "w")
    assert a0 is not None and a1 is not None
    await store.record_clip(job.job_id, a0, result(job, 0), 60)
    cancelled, changed = await store.cancel(job.job_id, 60)
    assert changed and cancelled is not None and cancelled.status is JobStatus.CANCELLED
    assert [(e.index, e.code) for e in cancelled.errors] == [(1, "cancelled")]
    with pytest.raises(StaleAttempt):
        await store.record_clip(job.job_id, a1, result(job, 1), 60)
    again, changed = await store.cancel(job.job_id, 60)
    assert not changed and again is not None and again.status is JobStatus.CANCELLED
    assert await store.fail(job.job_id, JobError(code="x", message="y"), 60) is None


async def test_expired_jobs_are_reaped_once_keeping_shared_files(
    store: RedisJobStore, tmp_path: Path
) -> None:
    """Cleanup runs once per job and keeps a file that another stored job still names."""
    storage = SharedFolderStorage(tmp_path / "clips")
    await storage.open()
    a, b = make_job(2), make_job(1)  # same source: b's clip 0 is a's clip 0
    for job in (a, b):
        await store.save(job)
    for i in range(2):
        (tmp_path / "clips" / result(a, i).file).write_bytes(b"x")
    for i in range(2):
        n = await store.claim_clip(a.job_id, i, "w")
        assert n is not None
        await store.record_clip(a.job_id, n, result(a, i), 0)
    others = [RedisJobStore.from_url(REDIS_TEST_URL) for _ in range(3)]
    try:
        counts = await asyncio.gather(*(reap_expired(s, storage) for s in others))
    finally:
        for s in others:
            await s.close()
    assert sum(counts) == 1
    assert await store.get(a.job_id) is None
    left = sorted(p.name for p in (tmp_path / "clips").iterdir())
    assert left == [result(a, 0).file]  # b (still live) may reuse it
    await delete_job_and_files(store, storage, b.job_id)
    assert await store.all() == []


async def test_events_reach_subscribers_from_any_writer(store: RedisJobStore) -> None:
    """A change written through another connection reaches this node's subscriber."""
    from clipservice.jobs.redis_events import RedisJobEvents

    events = RedisJobEvents(store)
    await events.start()
    writer = RedisJobStore.from_url(REDIS_TEST_URL)
    try:
        job = make_job(1)
        await store.save(job)
        async with events.subscribe(job.job_id) as sub:
            attempt = await writer.claim_clip(job.job_id, 0, "w")
            assert attempt is not None
            got = await asyncio.wait_for(sub.next(), 30)
            assert got is not None and got.status is JobStatus.PROCESSING
            await writer.record_clip(job.job_id, attempt, result(job, 0), 60)
            async with asyncio.timeout(30):
                while got is not None and not got.status.ended:
                    got = await sub.next()
            assert got is not None and got.status is JobStatus.FINISHED
            await events.close()
            assert await sub.next() is None
    finally:
        await events.close()
        await writer.close()


async def test_worker_cut_off_from_redis_stops_its_clip(
    store: RedisJobStore, tmp_path: Path
) -> None:
    """A worker whose heartbeats fail past heartbeat_s cancels its own clip (self-fencing)."""
    from saq.job import Job as SaqJob

    from clipservice.config import Settings
    from clipservice.jobs.queue import make_queue
    from clipservice.jobs.worker import ClipWorker
    from clipservice.sources.base import DirectResolver

    settings = Settings().replace(queue={"url": REDIS_TEST_URL, "heartbeat_s": 2})
    unreachable = make_queue("redis://127.0.0.1:1/0", "clipservice-clips")
    worker = ClipWorker(
        settings, store, SharedFolderStorage(tmp_path), DirectResolver(), unreachable, "w1"
    )
    task = SaqJob(function="cut_clip", key="k", queue=unreachable)

    async def clip_work() -> None:
        keepalive = worker._start_keepalive(task)
        try:
            await asyncio.sleep(60)
        finally:
            keepalive.cancel()
            await asyncio.gather(keepalive, return_exceptions=True)

    work = asyncio.create_task(clip_work())
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(work, 30)
    await worker.close()
    await unreachable.redis.aclose()
