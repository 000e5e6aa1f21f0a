"""Chaos: SIGKILL the service (embedded mode) or a worker (distributed mode) at random
points of random jobs, start it again, repeat; then every job ends (none lost, none
stuck), no clip is in two files, no job file is ever torn, and no FFmpeg or join process
outlives the process that started it.

The trials are random but reproducible: the seed is printed and in every failure
message; ``CHAOS_SEED=<n>`` replays one. Each kill point is counted (reached, or
missed and killed anyway) and the counts printed, so a run shows what it tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import select
import signal
import struct
import sys
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from clipservice.jobs.models import Job
from clipservice.jobs.queue import CLIPS_QUEUE, JOBS_QUEUE, make_queue
from clipservice.media.cutter import PART_MARKER
from tests.conftest import (
    FIXTURES,
    MEDIA_SECONDS,
    FakeVidfly,
    MediaServer,
    ServiceFactory,
    alive,
    free_port,
)
from tests.test_distributed import Cluster, make_cluster, redis_url  # noqa: F401 (a fixture)

# Ten trials take about half a minute on an idle two-core machine; the bound is for a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# To explore beyond the suite's budget: CHAOS_TRIALS=<n> per mode, CHAOS_POINTS=cut,...
SEED = int(os.environ.get("CHAOS_SEED", random.SystemRandom().randrange(2**32)))
EMBEDDED_TRIALS = DISTRIBUTED_TRIALS = int(os.environ.get("CHAOS_TRIALS", "10"))
_ONLY = set(filter(None, os.environ.get("CHAOS_POINTS", "").split(",")))
WAIT_S = 90
# A kill point not reached this long after the trial's jobs were created is
# missed (counted), and the kill happens there and then.
REACH_S = 6
SLOW_BYTES_PER_S = 192 * 1024
# Where a trial kills: a random moment, or a point of a job's life.
EMBEDDED_POINTS = tuple(
    p for p in ("delay", "resolve", "cut", "job_write", "after_result") if not _ONLY or p in _ONLY
)
DISTRIBUTED_POINTS = tuple(
    p for p in ("delay", "resolve", "cut", "after_result") if not _ONLY or p in _ONLY
)
# A clip killed under its cut this often ends "interrupted" (queue.clip_attempts):
# the only error code a trial may leave.
ALLOWED_CODES = {"interrupted"}
# Each process the service starts inherits this variable: a process carrying
# the run's value after the end is an orphan (found by its environment).
MARK_VAR = "CHAOS_TEST_MARK"


def children(pid: int) -> list[int]:
    """Every live process whose parent is ``pid`` (its FFmpeg and join processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def marked(mark: str) -> list[str]:
    """Live processes started under this run's mark: "pid command" each."""
    needle = f"{MARK_VAR}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environ = (entry / "environ").read_bytes()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            except OSError:
                continue
            if needle in environ.split(b"\0") and alive(int(entry.name)):
                found.append(f"{entry.name} {cmd}")
    return found


async def until_dead(pids: list[int], timeout_s: float = 15) -> list[int]:
    """Wait for ``pids`` to end; those still alive after ``timeout_s``."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while any(alive(p) for p in pids):
                await asyncio.sleep(0.05)
    return [p for p in pids if alive(p)]


class CreateWatch:
    """Runs ``hit`` (on a thread) the moment a file whose name holds ``infix`` is created
    in ``folder`` (inotify: no polling), once per arming."""

    _IN_CREATE = 0x100
    _EVENT = struct.Struct("iIII")

    def __init__(self, folder: Path, infix: str) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        assert self._fd >= 0, ctypes.get_errno()
        wd = self._libc.inotify_add_watch(self._fd, str(folder).encode(), self._IN_CREATE)
        assert wd >= 0, ctypes.get_errno()
        self._infix = infix.encode()
        self._hit: Callable[[], None] | None = None
        self._stop = threading.Event()
        self.hits = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def arm(self, hit: Callable[[], None] | None) -> None:
        self._hit = hit

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.1)
            if not ready:
                continue
            data = os.read(self._fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, size = self._EVENT.unpack_from(data, offset)
                name = data[offset + self._EVENT.size : offset + self._EVENT.size + size]
                offset += self._EVENT.size + size
                hit, self._hit = self._hit, None
                if hit is not None and self._infix in name:
                    hit()
                    self.hits += 1
                elif hit is not None:
                    self._hit = hit

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)


@dataclass
class SlowResolver:
    """A fake Vidfly whose first answer for a video id comes after a while (a kill lands
    during the resolve), and every later one at once."""

    media_base: str
    base_url: str = ""
    delay_s: float = 2.0
    asked: dict[str, asyncio.Event] = field(default_factory=dict)

    def event(self, video_id: str) -> asyncio.Event:
        return self.asked.setdefault(video_id, asyncio.Event())

    async def download(self, request: web.Request) -> web.Response:
        video_id = request.query.get("url", "").rsplit("v=", 1)[-1]
        first = not self.event(video_id).is_set()
        self.event(video_id).set()
        if first:
            await asyncio.sleep(self.delay_s)
        body = json.loads(
            (FIXTURES / "vidfly-response.json").read_text().replace("{MEDIA_BASE}", self.media_base)
        )
        body["data"]["duration"] = MEDIA_SECONDS
        return web.json_response(body)


@pytest.fixture
async def slow_resolver(media_server: MediaServer) -> AsyncIterator[SlowResolver]:
    # Slow sources at a rate where a clip takes a second or so: long enough to be
    # killed mid-cut, short enough for twenty trials.
    media_server.slow_bytes_per_s = SLOW_BYTES_PER_S
    fake = SlowResolver(media_base=media_server.url("x", slow=True).rsplit("/", 1)[0])
    app = web.Application()
    app.router.add_get("/api/media/youtube/download", fake.download)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.base_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield fake
    await runner.cleanup()


def random_job(rng: random.Random, media_server: MediaServer, video_id: str) -> dict[str, Any]:
    """A job of 1 to 3 short clips in random modes, from a random kind of source."""
    clips = []
    for _ in range(rng.randint(1, 3)):
        start = round(rng.uniform(0, MEDIA_SECONDS - 3), 2)
        clips.append(
            {
                "start": start,
                "end": round(start + rng.uniform(0.5, 2.0), 2),
                "mode": rng.choice(("fast", "accurate", "reencode")),
            }
        )
    kind = rng.choice(("muxed", "slow", "separate", "resolved"))
    if kind == "resolved":
        source: dict[str, Any] = {"video_id": video_id}
    elif kind == "separate":
        source = {
            "video_url": media_server.url("video.mp4"),
            "audio_url": media_server.url("audio.m4a"),
        }
    else:
        source = {"video_url": media_server.url("muxed.mp4", slow=kind == "slow")}
    return {**source, "clips": clips}


def check_ended(jobs: list[Job], clips_dir: Path, seed: int) -> Counter[str]:
    """Every job ended with an outcome for each clip, only allowed error codes, each result's
    file whole on disk, and no clip file that no result names (a clip cut into two files)."""
    outcomes: Counter[str] = Counter()
    named: set[str] = set()
    for job in jobs:
        assert job.status.ended, (seed, job.job_id, job.status)
        assert job.done_indexes() == {c.index for c in job.clips}, (seed, job)
        for result in job.results:
            assert (clips_dir / result.file).stat().st_size == result.size_bytes, (seed, result)
            named.add(result.file)
        outcomes.update(["ok"] * len(job.results) + [e.code for e in job.errors])
        assert {e.code for e in job.errors} <= ALLOWED_CODES, (seed, job.errors)
    # (Temporary outputs a killed cut left are not clips: a start, or the reaper, removes them.)
    on_disk = {p.name for p in clips_dir.iterdir() if PART_MARKER not in p.name}
    assert on_disk == named, (seed, sorted(on_disk - named), sorted(named - on_disk))
    return outcomes


# -- embedded: a real `clipservice serve`, killed and started again -------------------


@dataclass
class Serve:
    proc: asyncio.subprocess.Process
    base_url: str
    http: aiohttp.ClientSession

    async def create(self, body: dict[str, Any]) -> str:
        async with self.http.post(f"{self.base_url}/api/create-clips", json=body) as resp:
            assert resp.status == 202, await resp.text()
            return str((await resp.json())["job_id"])

    async def job(self, job_id: str) -> Job:
        async with self.http.get(f"{self.base_url}/api/jobs/{job_id}") as resp:
            assert resp.status == 200, await resp.text()
            return Job.model_validate(await resp.json())


async def start_serve(
    data: Path, resolver_url: str, mark: str, http: aiohttp.ClientSession, log: Path
) -> Serve:
    port = free_port()
    env = {
        **os.environ,
        "CLIPSERVICE_STORAGE__DATA_DIR": str(data),
        "CLIPSERVICE_RESOLVER__BASE_URL": resolver_url,
        "CLIPSERVICE_SECURITY__ALLOW_PRIVATE_SOURCES": "true",
        "CLIPSERVICE_JOBS__MAX_CONCURRENT_CLIPS": "2",
        "CLIPSERVICE_SERVER__SHUTDOWN_GRACE_S": "2",
        MARK_VAR: mark,
    }
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "clipservice", "serve", "--port", str(port),
            cwd=data.parent, env=env, stdout=out, stderr=out,
        )  # fmt: skip
    serve = Serve(proc, f"http://127.0.0.1:{port}", http)
    async with asyncio.timeout(30):
        while True:
            assert proc.returncode is None, _tail(log)
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{serve.base_url}/healthz") as resp:
                    if resp.status == 200:
                        return serve
            await asyncio.sleep(0.1)


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def job_files(data: Path) -> dict[str, Any]:
    """Every job file as JSON; a torn one fails the parse here."""
    return {
        p.stem: json.loads(p.read_text()) for p in (data / "jobs").iterdir() if p.suffix == ".json"
    }


async def reach_embedded(
    point: str,
    rng: random.Random,
    data: Path,
    resolver: SlowResolver,
    video_id: str,
    watch: CreateWatch,
    kill: Callable[[], None],
) -> bool:
    """Wait for ``point`` (in any job of the run: older ones resume) for at most REACH_S;
    False if it did not come."""
    try:
        async with asyncio.timeout(REACH_S):
            if point == "delay":
                await asyncio.sleep(rng.uniform(0.1, 2.0))
            elif point == "resolve":
                await resolver.event(video_id).wait()
                await asyncio.sleep(rng.uniform(0, 0.3))
            elif point == "job_write":
                killed = asyncio.Event()
                loop = asyncio.get_running_loop()

                def hit() -> None:
                    kill()  # from the watch's thread: at the write itself
                    loop.call_soon_threadsafe(killed.set)

                watch.arm(hit)
                await killed.wait()
            else:
                before = {j: len(d["results"]) for j, d in job_files(data).items()}
                while True:
                    docs = list(job_files(data).values())
                    if point == "cut" and any(
                        c["attempts"] and c["index"] not in _done(d) and d["status"] == "processing"
                        for d in docs
                        for c in d["clips"]
                    ):
                        await asyncio.sleep(rng.uniform(0, 1.0))
                        break
                    if point == "after_result" and any(
                        len(d["results"]) > before.get(d["job_id"], 0) for d in docs
                    ):
                        break
                    await asyncio.sleep(0.02)
            return True
    except TimeoutError:
        return False
    finally:
        watch.arm(None)


def _done(doc: dict[str, Any]) -> set[int]:
    return {r["index"] for r in doc["results"]} | {e["index"] for e in doc["errors"]}


async def test_embedded_service_survives_random_kills(
    tmp_path: Path,
    media_server: MediaServer,
    slow_resolver: SlowResolver,
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL a real `clipservice serve` at random points of random jobs, restart it on the
    same data_dir, ten times: every job file parses after every kill, the killed process's
    FFmpeg and join processes die with it, and once restarted for good every job ends with
    each clip's outcome, no clip file twice and no process left behind."""
    rng = random.Random(SEED)
    data = tmp_path / "data"
    data.mkdir()
    log = tmp_path / "serve.log"
    mark = uuid.uuid4().hex
    job_ids: list[str] = []
    reached: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    procs: list[asyncio.subprocess.Process] = []
    async with aiohttp.ClientSession() as http:
        watch: CreateWatch | None = None
        try:
            for trial in range(EMBEDDED_TRIALS):
                serve = await start_serve(data, slow_resolver.base_url, mark, http, log)
                procs.append(serve.proc)
                if watch is None:
                    watch = CreateWatch(data / "jobs", ".tmp-")
                point = rng.choice(EMBEDDED_POINTS)
                video_id = f"chaos{trial}"
                new = []
                for _ in range(rng.randint(1, 2)):
                    body = random_job(rng, media_server, video_id)
                    if point == "resolve" and not new:
                        body = {"video_id": video_id, "clips": body["clips"]}
                    new.append(await serve.create(body))
                job_ids += new

                def kill(proc: asyncio.subprocess.Process = serve.proc) -> None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)

                ok = await reach_embedded(point, rng, data, slow_resolver, video_id, watch, kill)
                (reached if ok else missed)[point] += 1
                kids = children(serve.proc.pid)
                kill()
                await serve.proc.wait()
                context = (SEED, trial, point)
                job_files(data)  # never torn, whatever the kill interrupted
                assert await until_dead(kids) == [], (context, "orphans")
            serve = await start_serve(data, slow_resolver.base_url, mark, http, log)
            procs.append(serve.proc)
            async with asyncio.timeout(WAIT_S):
                while not all(j.status.ended for j in [await serve.job(j) for j in job_ids]):
                    await asyncio.sleep(0.2)
            jobs = [await serve.job(j) for j in job_ids]
            outcomes = check_ended(jobs, data / "clips", SEED)
            assert set(job_files(data)) == set(job_ids)
            serve.proc.send_signal(signal.SIGTERM)
            assert await serve.proc.wait() == 0
        finally:
            if watch is not None:
                watch.close()
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
    async with asyncio.timeout(15):
        while left := marked(mark):
            await asyncio.sleep(0.1)
    assert left == [], (SEED, left)
    assert not [p.name for p in data.rglob("*") if ".tmp-" in p.name or ".part-" in p.name]
    summary = {
        "seed": SEED,
        "trials": EMBEDDED_TRIALS,
        "reached": dict(reached),
        "missed": dict(missed),
        "jobs": len(job_ids),
        "clip_outcomes": dict(outcomes),
        "job_writes_hit": watch.hits if watch else 0,
    }
    record_property("chaos_embedded", summary)
    print(f"chaos embedded: {summary}")


# -- distributed: two workers, one killed at random and started again -----------------


async def reach_distributed(
    point: str,
    rng: random.Random,
    cluster: Cluster,
    job_ids: list[str],
    resolver: SlowResolver,
    video_id: str,
    resolve_job: str,
) -> str | None:
    """Wait for ``point`` (in any job of the run: older ones may still run); the id of the
    live worker to kill there (None: any, or the point was not reached)."""
    try:
        async with asyncio.timeout(REACH_S):
            if point == "delay":
                await asyncio.sleep(rng.uniform(0.1, 2.0))
                return None
            if point == "resolve":
                await resolver.event(video_id).wait()
                await asyncio.sleep(rng.uniform(0, 0.3))
                return await _prepare_worker(cluster, resolve_job)
            results = {j: len((await cluster.job(j)).results) for j in job_ids}
            while True:
                live = {cluster.worker_id(p) for p in cluster.workers if p.poll() is None}
                for job_id in job_ids:
                    doc = await cluster.job(job_id)
                    if doc.status.ended:
                        continue
                    workers = await cluster.store.clip_workers(job_id)
                    done = doc.done_indexes()
                    running = [w for i, w in workers.items() if i not in done and w in live]
                    if point == "cut" and running:
                        await asyncio.sleep(rng.uniform(0, 1.0))
                        return rng.choice(sorted(running))
                    if point == "after_result" and len(doc.results) > results[job_id]:
                        return workers.get(doc.results[-1].index)
                await asyncio.sleep(0.02)
    except TimeoutError:
        return None


async def _prepare_worker(cluster: Cluster, job_id: str) -> str | None:
    """The worker running the job's prepare task (its SAQ worker id ends in -jobs)."""
    queue = make_queue(cluster.redis_url, JOBS_QUEUE)
    try:
        task = await queue.job(job_id)
        return task.worker_id.removesuffix("-jobs") if task and task.worker_id else None
    finally:
        await queue.disconnect()


async def test_distributed_workers_survive_random_kills(
    tmp_path: Path,
    vidfly: FakeVidfly,
    make_service: ServiceFactory,
    redis_url: str,  # noqa: F811 (the fixture imported above)
    media_server: MediaServer,
    slow_resolver: SlowResolver,
    record_property: Callable[[str, object], None],
) -> None:
    """Two workers; ten times, random jobs and one worker SIGKILLed at a random point (during
    a resolve, mid-cut, after a result, at a random moment) and started again: its FFmpeg and
    join processes die with it, every job ends with each clip's outcome (none lost or stuck),
    no task is left on the queues, no clip file twice and no process left behind."""
    rng = random.Random(SEED + 1)
    mark = uuid.uuid4().hex
    job_ids: list[str] = []
    reached: Counter[str] = Counter()
    missed: Counter[str] = Counter()
    async with make_cluster(
        tmp_path, vidfly, make_service, redis_url, resolver_url=slow_resolver.base_url
    ) as cluster:
        cluster.worker_env[MARK_VAR] = mark
        cluster.start_worker(), cluster.start_worker()
        await cluster.wait_workers(2)
        for trial in range(DISTRIBUTED_TRIALS):
            point = rng.choice(DISTRIBUTED_POINTS)
            video_id = f"chaos{trial}"
            new = []
            for _ in range(rng.randint(1, 2)):
                body = random_job(rng, media_server, video_id)
                if point == "resolve" and not new:
                    body = {"video_id": video_id, "clips": body["clips"]}
                async with await cluster.api.create(body) as resp:
                    assert resp.status == 202, await resp.text()
                    new.append((await resp.json())["job_id"])
            job_ids += new
            target = await reach_distributed(
                point, rng, cluster, job_ids, slow_resolver, video_id, new[0]
            )
            running = [p for p in cluster.workers if p.poll() is None]
            assert len(running) == 2, [cluster.log(p) for p in cluster.workers if p not in running]
            ids = {cluster.worker_id(p): p for p in running}
            (reached if target in ids or point == "delay" else missed)[point] += 1
            victim = ids.get(target) if target else None
            victim = victim or rng.choice(running)
            kids = children(victim.pid)
            victim.kill()
            await asyncio.to_thread(victim.wait)
            assert await until_dead(kids) == [], ((SEED + 1, trial, point), "orphans")
            cluster.start_worker()
        async with asyncio.timeout(WAIT_S):
            while not all(j.status.ended for j in [await cluster.job(j) for j in job_ids]):
                await asyncio.sleep(0.2)
        jobs = [await cluster.job(j) for j in job_ids]
        outcomes = check_ended(jobs, cluster.data_dir / "clips", SEED + 1)
        for name in (CLIPS_QUEUE, JOBS_QUEUE):
            queue = make_queue(cluster.redis_url, name)
            try:
                info = await queue.info()
            finally:
                await queue.disconnect()
            assert (info["queued"], info["active"]) == (0, 0), (SEED + 1, name, info)
    async with asyncio.timeout(15):
        while left := marked(mark):
            await asyncio.sleep(0.1)
    assert left == [], (SEED + 1, left)
    summary = {
        "seed": SEED + 1,
        "trials": DISTRIBUTED_TRIALS,
        "reached": dict(reached),
        "missed": dict(missed),
        "jobs": len(job_ids),
        "clip_outcomes": dict(outcomes),
    }
    record_property("chaos_distributed", summary)
    print(f"chaos distributed: {summary}")
