"""RedisJobStore and worker state against the real Redis: documents, concurrent writers,
reaping, events across nodes, a worker cut off from Redis, and expired stream URLs resolved
once for every worker of a job. (The bookkeeping rules are tested on both stores in
test_store.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from saq.job import Job as SaqJob

from clipservice.domain import StreamUrls
from clipservice.jobs import bookkeeping, retention
from clipservice.jobs.models import (
    ClipResult,
    ClipSpec,
    Job,
    JobSource,
    JobStatus,
    new_job_id,
)
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.queue import CLIPS_QUEUE, make_queue
from clipservice.jobs.redis_store import RedisJobStore, StoredSource
from clipservice.jobs.retention import delete_job_and_files, reap_expired
from clipservice.jobs.store import FileJobStore, JobStore
from clipservice.jobs.worker import ClipWorker
from clipservice.metrics import Metrics
from clipservice.s3storage import StorageError
from clipservice.sources.base import ResolvedSource
from clipservice.storage import SharedFolderStorage
from tests.conftest import MediaServer, settings_for

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


async def test_concurrent_writers_lose_nothing(store: RedisJobStore) -> None:
    """Outcomes recorded at once from separate connections are all kept (compare-and-set)."""
    job = make_job(12)
    await store.save(job)
    others = [RedisJobStore.from_url(REDIS_TEST_URL) for _ in range(4)]
    try:

        async def one(i: int) -> None:
            s = others[i % len(others)]
            a = await bookkeeping.claim_clip(s, job.job_id, i, f"w{i % 4}")
            assert a == 1
            await bookkeeping.clip_progress(s, job.job_id, i, a, 0.3)
            await bookkeeping.record_clip(s, job.job_id, a, result(job, i), 60)

        await asyncio.gather(*(one(i) for i in range(12)))
    finally:
        for s in others:
            await s.close()
    final = await store.get(job.job_id)
    assert final is not None and final.status is JobStatus.FINISHED
    assert [r.index for r in final.results] == list(range(12)) and final.processed == 12


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
        n = await bookkeeping.claim_clip(store, a.job_id, i, "w")
        assert n is not None
        await bookkeeping.record_clip(store, a.job_id, n, result(a, i), 0)
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
            attempt = await bookkeeping.claim_clip(writer, job.job_id, 0, "w")
            assert attempt is not None
            got = await asyncio.wait_for(sub.next(), 30)
            assert got is not None and got.status is JobStatus.PROCESSING
            await bookkeeping.record_clip(writer, job.job_id, attempt, result(job, 0), 60)
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
    from clipservice.config import Settings
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


class CountingResolver:
    """Hands out the same stream URL every time, and counts the calls."""

    def __init__(self, video_url: str) -> None:
        self.video_url = video_url
        self.calls = 0

    async def resolve(self, source: JobSource) -> ResolvedSource:
        self.calls += 1
        return ResolvedSource(video_url=self.video_url)


async def test_workers_share_one_resolve_of_expired_urls(
    store: RedisJobStore, tmp_path: Path, media_server: MediaServer
) -> None:
    """Two workers whose clips hit expired stream URLs (403) at once: one resolves again,
    under the job's lock; the other takes the new generation from Redis; both clips are cut
    from the fresh URLs, and each worker records the clip metrics the in-process runner does."""
    settings = settings_for(tmp_path / "data").replace(queue={"url": REDIS_TEST_URL})
    storage = SharedFolderStorage(settings.clips_dir)
    await storage.open()
    expired = f"{media_server.base_url}/expired/muxed.mp4"  # ranges past half answer 403
    resolver = CountingResolver(media_server.url("muxed.mp4"))
    job = Job(
        job_id=new_job_id(),
        source=JobSource(video_url=expired),
        clips=[ClipSpec(index=i, start=s, end=s + 2, mode="fast") for i, s in enumerate((20, 24))],
        total=2,
    )
    await store.save(job)
    await store.set_source(job.job_id, StoredSource(StreamUrls(expired)))
    queue = make_queue(REDIS_TEST_URL, CLIPS_QUEUE)
    await queue.connect()
    workers = [
        ClipWorker(settings, store, storage, resolver, queue, f"w{i}", Metrics()) for i in range(2)
    ]
    try:
        answers = await asyncio.gather(
            *(
                w.cut_clip(
                    {"job": SaqJob(function="cut_clip", key=f"k{i}", queue=queue)},  # type: ignore[typeddict-item]
                    job_id=job.job_id,
                    index=i,
                )
                for i, w in enumerate(workers)
            )
        )
    finally:
        for w in workers:
            await w.close()
        await queue.disconnect()
    assert answers == ["ok", "ok"]
    assert resolver.calls == 1
    stored = await store.get_source(job.job_id)
    assert stored is not None and stored.generation == 1
    assert stored.urls.video_url == resolver.video_url
    done = await store.get(job.job_id)
    assert done is not None and done.status is JobStatus.FINISHED and done.errors == []
    assert [r.duration_s for r in done.results] == [pytest.approx(2.0, abs=0.1)] * 2
    for w in workers:
        sample = w.metrics.registry.get_sample_value
        assert sample("clipservice_clips_total", {"outcome": "ok", "mode": "fast"}) == 1
        assert sample("clipservice_clip_cut_seconds_count", {"mode": "fast"}) == 1
        assert sample("clipservice_clip_queue_wait_seconds_count") == 1
        assert (sample("clipservice_clip_bytes_written_total") or 0) > 0
    resolves = [
        w.metrics.registry.get_sample_value("clipservice_resolve_seconds_count") for w in workers
    ]
    assert sorted(resolves) == [0, 1]


class _FlakyStorage(SharedFolderStorage):
    """A folder whose deletes fail (as an object store that does not answer) while ``down``."""

    down = True

    async def delete(self, name: str) -> bool:
        if self.down:
            raise StorageError("delete", name, "the store did not answer")
        return await super().delete(name)


@pytest.mark.parametrize("kind", ["file", "redis"])
async def test_a_failed_delete_keeps_the_job_and_is_retried_later(
    kind: str, store: RedisJobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention whose storage fails a delete keeps the job and its file, pushes its expiry
    DELETE_RETRY_S ahead (not due before then, on either store), and deletes both on the
    round after that once the storage answers."""
    monkeypatch.setattr(retention, "DELETE_RETRY_S", 0.3)
    jobs: JobStore = store
    if kind == "file":
        jobs = FileJobStore(tmp_path / "jobs")
        await jobs.open()
    storage = _FlakyStorage(tmp_path / "clips")
    await storage.open()
    job = make_job(1)
    await jobs.save(job)
    (tmp_path / "clips" / result(job, 0).file).write_bytes(b"x")
    n = await bookkeeping.claim_clip(jobs, job.job_id, 0, "w")
    assert n is not None
    await bookkeeping.record_clip(jobs, job.job_id, n, result(job, 0), 0)  # ends, expires now
    await asyncio.sleep(0.01)

    assert await retention.reap_expired(jobs, storage) == 0
    kept = await jobs.get(job.job_id)
    assert kept is not None and kept.expires_at is not None
    assert kept.expires_at.timestamp() > time.time()  # pushed ahead
    assert await jobs.due(time.time()) == []  # not before its new expiry
    assert (tmp_path / "clips" / result(job, 0).file).exists()

    storage.down = False
    await asyncio.sleep(0.35)
    assert await jobs.due(time.time()) == [job.job_id]
    assert await retention.reap_expired(jobs, storage) == 1
    assert await jobs.get(job.job_id) is None
    assert not (tmp_path / "clips" / result(job, 0).file).exists()


async def test_one_round_deletes_jobs_that_share_a_file_and_the_file(
    store: RedisJobStore, tmp_path: Path
) -> None:
    """Two ended jobs naming the same clip file, due in the same round: the round reads
    the jobs once and still deletes both and, with the second, the file they shared."""
    storage = SharedFolderStorage(tmp_path / "clips")
    await storage.open()
    a, b = make_job(1), make_job(1)  # same source and range: one file
    (tmp_path / "clips" / result(a, 0).file).write_bytes(b"x")
    for job in (a, b):
        await store.save(job)
        n = await bookkeeping.claim_clip(store, job.job_id, 0, "w")
        assert n is not None
        await bookkeeping.record_clip(store, job.job_id, n, result(job, 0), 0)
    await asyncio.sleep(0.01)
    assert await reap_expired(store, storage) == 2
    assert await store.all() == []
    assert list((tmp_path / "clips").iterdir()) == []
