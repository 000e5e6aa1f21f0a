"""Job lifecycle with a real `clipservice serve` process: kill -9 and restart,
graceful SIGTERM (drain, grace, no orphan FFmpeg), and resuming afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import FakeVidfly, MediaServer, alive, ffmpeg_children, free_port

STALLED = {"start": 20, "end": 25, "mode": "reencode"}  # reads past half the file: stalls
QUICK = {"start": 1, "end": 3, "mode": "reencode"}


@dataclass
class ServeProcess:
    """`python -m clipservice serve` on a data folder, as a real child process."""

    proc: asyncio.subprocess.Process
    base_url: str
    http: aiohttp.ClientSession

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def get(self, path: str) -> tuple[int, dict[str, Any], Any]:
        async with self.http.get(self.base_url + path) as resp:
            body = await resp.json(content_type=None)
            return resp.status, dict(resp.headers), body

    async def job(self, job_id: str) -> dict[str, Any]:
        status, _, doc = await self.get(f"/api/jobs/{job_id}")
        assert status == 200, doc
        return dict(doc)

    async def until(
        self, job_id: str, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 60
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                doc = await self.job(job_id)
                if ok(doc):
                    return doc
                await asyncio.sleep(0.05)

    async def exit_code(self, timeout_s: float = 60) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()


Starter = Callable[..., Awaitable[ServeProcess]]


@pytest.fixture
async def start_serve(tmp_path: Path, vidfly: FakeVidfly) -> AsyncIterator[Starter]:
    procs: list[asyncio.subprocess.Process] = []
    http = aiohttp.ClientSession()
    logs = []

    async def start(data_dir: Path, **env: str) -> ServeProcess:
        port = free_port()
        full_env = {
            **os.environ,
            "CLIPSERVICE_STORAGE__DATA_DIR": str(data_dir),
            "CLIPSERVICE_RESOLVER__BASE_URL": vidfly.base_url,
            "CLIPSERVICE_SECURITY__ALLOW_PRIVATE_SOURCES": "true",
            **{f"CLIPSERVICE_{k.upper()}": v for k, v in env.items()},
        }
        log = (tmp_path / f"serve-{len(procs)}.log").open("wb")
        logs.append(log)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clipservice", "serve", "--port", str(port),
            cwd=tmp_path, env=full_env, stdout=log, stderr=log,
        )  # fmt: skip
        procs.append(proc)
        serve = ServeProcess(proc, f"http://127.0.0.1:{port}", http)
        async with asyncio.timeout(30):
            while True:
                assert proc.returncode is None, "serve exited at start-up"
                with contextlib.suppress(aiohttp.ClientError):
                    if (await serve.get("/healthz"))[0] == 200:
                        return serve
                await asyncio.sleep(0.1)

    yield start
    for proc in procs:
        children = ffmpeg_children(proc.pid)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    await http.close()
    for log in logs:
        log.close()


async def create(serve: ServeProcess, body: dict[str, Any]) -> str:
    async with serve.http.post(f"{serve.base_url}/api/create-clips", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["job_id"])


async def wait_for_ffmpeg(serve: ServeProcess) -> list[int]:
    async with asyncio.timeout(30):
        while not (pids := ffmpeg_children(serve.pid)):
            await asyncio.sleep(0.05)
    return pids


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.rglob("*") if ".tmp-" in p.name or ".part-" in p.name)


async def test_kill9_mid_clip_then_restart_finishes(
    start_serve: Starter, media_server: MediaServer, tmp_path: Path
) -> None:
    """After kill -9 mid-clip, a restart on the same data folder keeps the done clip, cuts the
    interrupted one again, and ends the job; no torn job file or temp file is left."""
    data = tmp_path / "data"
    serve = await start_serve(data)
    job_id = await create(serve, {"video_id": "stall", "clips": [QUICK, STALLED]})
    job_file = data / "jobs" / f"{job_id}.json"
    # What the disk says counts (the API may be a save ahead of it).
    async with asyncio.timeout(60):
        while True:
            on_disk = json.loads(job_file.read_text()) if job_file.exists() else None
            if on_disk and len(on_disk["results"]) == 1 and on_disk["clips"][1]["attempts"] == 1:
                break
            await asyncio.sleep(0.05)
    orphans = await wait_for_ffmpeg(serve)
    before = on_disk["results"][0]

    serve.proc.kill()  # SIGKILL: no cleanup of any kind runs
    await serve.exit_code()
    # FFmpeg has its own session, but its parent-death signal takes it down too.
    async with asyncio.timeout(10):
        while running := [pid for pid in orphans if alive(pid)]:
            await asyncio.sleep(0.05)
    assert running == []
    doc = json.loads(job_file.read_text())  # never torn
    assert doc["status"] == "processing" and doc["clips"][1]["attempts"] == 1
    # What a kill during a write leaves behind: a job temp file, a partial clip.
    job_file.with_name(f"{job_file.name}.tmp-deadbeef").write_text('{"job_id": "torn')
    (data / "clips" / ".x.part-deadbeef.mp4").write_bytes(b"\0" * 100)

    media_server.unstall.set()
    again = await start_serve(data)
    done = await again.until(job_id, lambda d: d["status"] != "processing")
    assert done["status"] == "finished", done
    assert [r["index"] for r in done["results"]] == [0, 1] and done["errors"] == []
    assert done["results"][0] == before
    assert [c["attempts"] for c in done["clips"]] == [1, 2]
    again.proc.send_signal(signal.SIGTERM)
    assert await again.exit_code() == 0
    # Checked once the service stopped: the API shows the end a save ahead of the disk,
    # so its last write may still be under way when the job reads as finished.
    assert json.loads(job_file.read_text())["status"] == "finished"
    assert leftovers(data) == []


async def test_sigterm_drains_kills_ffmpeg_after_grace_and_resumes(
    start_serve: Starter, media_server: MediaServer, tmp_path: Path
) -> None:
    """SIGTERM: /readyz and job creation answer 503 at once while the rest is served; a second
    signal ends the grace; FFmpeg is killed, no FFmpeg child outlives the service, and the
    clip resumes (its attempt given back) on the next start."""
    data = tmp_path / "data"
    serve = await start_serve(data, server__shutdown_grace_s="60")
    job_id = await create(serve, {"video_id": "stall", "clips": [STALLED]})
    ffmpeg = await wait_for_ffmpeg(serve)
    assert (await serve.get("/readyz"))[0] == 200

    serve.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        while (ready := await serve.get("/readyz"))[0] != 503:
            await asyncio.sleep(0.02)
    assert ready[1]["Content-Type"].startswith("application/problem+json")
    async with serve.http.post(
        f"{serve.base_url}/api/create-clips", json={"video_id": "x", "clips": [QUICK]}
    ) as refused:
        assert refused.status == 503
        assert refused.content_type == "application/problem+json"
        assert int(refused.headers["Retry-After"]) > 0
    assert (await serve.job(job_id))["status"] == "processing"  # still served while draining

    serve.proc.send_signal(signal.SIGTERM)  # second signal: no more grace
    assert await serve.exit_code() == 0
    assert not any(alive(pid) for pid in ffmpeg)
    doc = json.loads((data / "jobs" / f"{job_id}.json").read_text())
    assert doc["status"] == "processing" and doc["clips"][0]["attempts"] == 0
    assert leftovers(data) == []

    media_server.unstall.set()
    again = await start_serve(data)
    done = await again.until(job_id, lambda d: d["status"] != "processing")
    assert done["status"] == "finished", done
    assert done["clips"][0]["attempts"] == 1
    again.proc.send_signal(signal.SIGTERM)
    assert await again.exit_code() == 0


async def test_sigterm_lets_running_clip_finish_within_grace(
    start_serve: Starter, media_server: MediaServer, tmp_path: Path
) -> None:
    """A clip running at SIGTERM may finish within the grace: its job ends finished and the
    service exits 0 as soon as no clip is running, without waiting out the grace."""
    data = tmp_path / "data"
    serve = await start_serve(data, server__shutdown_grace_s="120")
    job_id = await create(serve, {"video_id": "stall", "clips": [STALLED]})
    await wait_for_ffmpeg(serve)
    serve.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        while (await serve.get("/readyz"))[0] != 503:
            await asyncio.sleep(0.02)
    media_server.unstall.set()
    assert await serve.exit_code() == 0
    doc = json.loads((data / "jobs" / f"{job_id}.json").read_text())
    assert doc["status"] == "finished", doc
    assert [r["index"] for r in doc["results"]] == [0]


def test_serve_on_a_taken_port_exits_1(tmp_path: Path) -> None:
    """`serve` on a port already in use exits 1 with a message, not a traceback."""
    import subprocess

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "CLIPSERVICE_STORAGE__DATA_DIR": str(tmp_path / "data")}
        proc = subprocess.run(
            [sys.executable, "-m", "clipservice", "serve", "--port", str(port)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr
