"""A full disk: the service's data_dir on a small tmpfs, filled while a job runs.

Needs root to mount a tmpfs (as here and in CI); skipped, saying why, where it cannot.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MediaServer, ServiceFactory, assert_problem, ffmpeg_children
from tests.test_lifecycle import leftovers

DISK_BYTES = 8 * 1024 * 1024
WAIT_S = 60


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An empty tmpfs of DISK_BYTES, unmounted after the test."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a file in ``folder`` until the disk has no byte left; the file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler


async def test_full_disk_fails_clips_as_storage_full_and_recovers(
    small_disk: Path, make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """With the disk filled while a clip cuts: that clip fails with code storage_full, the
    job file stays whole (its last complete version, no temporary file), the service answers
    /healthz 200, /readyz 503 naming the storage and a new job 507 storage_full (nothing
    kept); once space is freed /readyz is 200 again, the job file catches up with the job's
    end and a new job is cut and saved."""
    data = small_disk / "data"
    service = await make_service(data)
    http, base = service.http, service.base_url
    url = media_server.url("muxed.mp4", stall=True)  # reads past half the file hang
    async with await service.create(
        {
            "video_url": url,
            "clips": [
                {"start": 1, "end": 2, "mode": "fast"},
                {"start": 20, "end": 22, "mode": "reencode"},
            ],
        }
    ) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
    job_file = data / "jobs" / f"{job_id}.json"
    async with asyncio.timeout(WAIT_S):
        while not (
            job_file.exists()
            and json.loads(job_file.read_text())["results"]
            and ffmpeg_children(os.getpid())
        ):
            await asyncio.sleep(0.05)
    filler = fill(small_disk)
    saved = job_file.read_bytes()
    media_server.unstall.set()  # the stalled cut goes on, into a full disk

    doc = await service.wait(job_id, WAIT_S)
    assert doc["status"] == "finished", doc
    assert [r["index"] for r in doc["results"]] == [0]
    assert [(e["index"], e["code"]) for e in doc["errors"]] == [(1, "storage_full")], doc
    assert job_file.read_bytes() == saved  # the end could not be written: the last version
    assert json.loads(saved)["status"] == "processing"
    assert leftovers(data) == []
    async with http.get(f"{base}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/readyz") as resp:
        assert resp.status == 503
        assert "storage not writable" in (await resp.json())["detail"]
    async with await service.create(
        {"video_url": media_server.url("muxed.mp4"), "clips": [{"start": 3, "end": 4}]}
    ) as resp:
        body = await assert_problem(resp, 507)  # the new job could not be saved
        assert body["code"] == "storage_full" and int(resp.headers["Retry-After"]) > 0
    assert [p.name for p in (data / "jobs").iterdir()] == [job_file.name]

    filler.unlink()
    async with asyncio.timeout(WAIT_S):
        while True:
            async with http.get(f"{base}/readyz") as resp:
                if resp.status == 200:
                    break
            await asyncio.sleep(0.2)
    async with await service.create(
        {"video_url": media_server.url("muxed.mp4"), "clips": [{"start": 3, "end": 4}]}
    ) as resp:
        assert resp.status == 202, await resp.text()
        again = (await resp.json())["job_id"]
    done = await service.wait(again, WAIT_S)
    assert done["status"] == "finished" and done["errors"] == [], done
    # Both jobs' ends reach their files (the document is saved after the API
    # has it: a moment later), the first one's once space is back.
    async with asyncio.timeout(WAIT_S):
        for path in (data / "jobs" / f"{again}.json", job_file):
            while json.loads(path.read_text())["status"] != "finished":
                await asyncio.sleep(0.05)
    assert leftovers(data) == []
    assert not list(data.glob(".readyz-*"))
