"""The job store: atomic writes, stale temp files, reload after restart."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from clipservice.jobs.models import ClipSpec, Job, JobSource, JobStatus, new_job_id
from clipservice.jobs.store import FileJobStore


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
