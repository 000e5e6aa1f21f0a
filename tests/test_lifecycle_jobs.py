"""Job lifecycle inside one service: resuming from job files, interrupted clips,
rescheduled cleanups, cancellation that kills FFmpeg, fair scheduling between jobs."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from clipservice.api.appkeys import RUNNER
from clipservice.config import Settings
from clipservice.jobs.models import (
    ClipResult,
    ClipSpec,
    Job,
    JobSource,
    JobStatus,
    new_job_id,
    utcnow,
)
from clipservice.media import ffmpeg
from tests.conftest import MediaServer, ServiceFactory

STALLED = {"start": 20, "end": 25, "mode": "reencode"}


def write_job(data_dir: Path, job: Job) -> None:
    jobs = data_dir / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    (jobs / f"{job.job_id}.json").write_text(json.dumps(job.stored()))


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the autogroup of ``pid``, None without autogroup scheduling."""
    try:
        with open(f"/proc/{pid}/autogroup") as fh:
            return int(fh.read().split()[-1])
    except OSError:
        return None


def make_job(video_id: str, clips: list[tuple[float, float]], **fields: Any) -> Job:
    specs = [ClipSpec(index=i, start=s, end=e, mode="reencode") for i, (s, e) in enumerate(clips)]
    return Job(
        job_id=new_job_id(),
        video_id=video_id,
        source=JobSource(video_id=video_id),
        clips=specs,
        total=len(specs),
        **fields,
    )


async def test_clip_begun_too_often_ends_interrupted(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """A resumed job's clip that already began queue.clip_attempts times without an outcome
    ends with code "interrupted"; its other clips are cut and the job finishes."""
    data = tmp_path / "data"
    job = make_job("resume1", [(1, 2), (3, 4)], status=JobStatus.PROCESSING)
    job.clips[0].attempts = Settings().queue.clip_attempts
    write_job(data, job)
    service = await make_service(data)
    doc = await service.wait(job.job_id)
    assert doc["status"] == "finished", doc
    assert [(e["index"], e["code"]) for e in doc["errors"]] == [(0, "interrupted")]
    assert [r["index"] for r in doc["results"]] == [1]
    assert doc["processed"] == 2


async def test_pending_job_from_disk_resumes(make_service: ServiceFactory, tmp_path: Path) -> None:
    """A job left pending on disk by a stopped service runs to its end on the next start."""
    data = tmp_path / "data"
    job = make_job("resume2", [(1, 2)])
    write_job(data, job)
    service = await make_service(data)
    doc = await service.wait(job.job_id)
    assert doc["status"] == "finished" and doc["clips"][0]["attempts"] == 1


async def test_cleanups_rescheduled_on_start(make_service: ServiceFactory, tmp_path: Path) -> None:
    """On start, an ended job past its expiry is deleted with its clip file at once; one not
    yet expired stays."""
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    ended = utcnow() - timedelta(hours=1)

    def finished(video_id: str, expires_in_s: float, file: str) -> Job:
        result = ClipResult(
            index=0, start=1, end=2, mode="reencode", file=file, url=f"/api/clips/{file}",
            size_bytes=3, duration_s=1, actual_start=1, actual_end=2,
        )  # fmt: skip
        (data / "clips" / file).write_bytes(b"mp4")
        return make_job(
            video_id, [(1, 2)], status=JobStatus.FINISHED, results=[result], processed=1,
            progress=1.0, finished_at=ended, expires_at=utcnow() + timedelta(seconds=expires_in_s),
        )  # fmt: skip

    overdue = finished("old", -60, "old-1-2-reencode.mp4")
    fresh = finished("new", 3600, "new-1-2-reencode.mp4")
    write_job(data, overdue)
    write_job(data, fresh)
    service = await make_service(data)
    async with asyncio.timeout(30):
        while True:
            async with service.http.get(f"{service.base_url}/api/jobs/{overdue.job_id}") as r:
                if r.status == 404:
                    break
            await asyncio.sleep(0.05)
    assert not (data / "clips" / "old-1-2-reencode.mp4").exists()
    assert (await service.job(fresh.job_id))["status"] == "finished"
    assert (data / "clips" / "new-1-2-reencode.mp4").exists()


async def test_cancel_kills_ffmpeg_and_queued_job(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """DELETE cancels a job whose clip waits for a slot and a job whose FFmpeg runs (at a
    lower CPU priority): when the answer comes FFmpeg has exited and no partial file is left."""
    service = await make_service(jobs={"max_concurrent_clips": 1})
    running = (await (await service.create({"video_id": "stall", "clips": [STALLED]})).json())[
        "job_id"
    ]
    async with asyncio.timeout(30):
        while not ffmpeg.running_processes:
            await asyncio.sleep(0.02)
    procs = list(ffmpeg.running_processes)
    # FFmpeg yields the CPU to the API (see media/ffmpeg.py FFMPEG_NICE).
    assert os.getpriority(os.PRIO_PROCESS, procs[0].pid) >= ffmpeg.FFMPEG_NICE
    group_nice = autogroup_nice(procs[0].pid)
    if group_nice is not None:  # Linux autogroup scheduling: FFmpeg's session is lowered too
        assert group_nice == ffmpeg.FFMPEG_NICE
    queued = (
        await (await service.create({"video_id": "q", "clips": [{"start": 1, "end": 2}]})).json()
    )["job_id"]
    async with asyncio.timeout(30):
        while service.app[RUNNER].limiter.waiting < 1:
            await asyncio.sleep(0.02)

    for job_id in (queued, running):
        async with service.http.delete(f"{service.base_url}/api/jobs/{job_id}") as resp:
            assert resp.status == 200
            doc = await resp.json()
        assert doc["status"] == "cancelled"
        assert [e["code"] for e in doc["errors"]] == ["cancelled"]
    assert all(p.returncode is not None for p in procs)
    assert not ffmpeg.running_processes
    assert not [p for p in service.settings.clips_dir.iterdir() if ".part-" in p.name]
    # Cancelled jobs stay readable until their retention ends.
    assert (await service.job(running))["status"] == "cancelled"


async def test_small_job_not_held_back_by_big_one(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """With one FFmpeg slot, a 1-clip job submitted after a 6-clip job finishes first: free
    slots alternate between jobs instead of going first come, first served."""
    service = await make_service(jobs={"max_concurrent_clips": 1})
    limiter = service.app[RUNNER].limiter
    big_clips = [STALLED] + [{"start": s, "end": s + 1, "mode": "reencode"} for s in range(1, 6)]
    big = (await (await service.create({"video_id": "stall", "clips": big_clips})).json())["job_id"]
    async with asyncio.timeout(30):
        while limiter.waiting < 5:  # its first clip holds the slot, stalled
            await asyncio.sleep(0.02)
    body = {"video_id": "small", "clips": [{"start": 2, "end": 3}]}
    small = (await (await service.create(body)).json())["job_id"]
    async with asyncio.timeout(30):
        while limiter.waiting < 6:
            await asyncio.sleep(0.02)
    media_server.unstall.set()  # the big job's first clip ends; the queue starts moving
    small_doc = await service.wait(small)
    big_doc = await service.wait(big)
    assert small_doc["status"] == big_doc["status"] == "finished"
    assert datetime.fromisoformat(small_doc["finished_at"]) < datetime.fromisoformat(
        big_doc["finished_at"]
    )
