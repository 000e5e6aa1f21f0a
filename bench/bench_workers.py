"""Jobs per minute: the embedded runner vs 1, 2 and 4 ``clipservice worker`` processes.

The same fixed batch of fast-mode (stream copy) clip jobs is run by each
set-up, from a loopback media server, on the real Redis (db 13, flushed).
Every job gets a distinct source URL so no output is reused between jobs.
Workers are started and registered before the clock starts.

Run: ``.venv/bin/python -m bench.bench_workers [--jobs 16 --clips 4]``.
Prints a table and writes ``bench/results/bench_workers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.dispatch import DistributedRunner
from clipservice.jobs.models import ClipSpec, Job, JobSource, new_job_id
from clipservice.jobs.queue import CLIPS_QUEUE, make_queue
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.media.cutter import Cutter
from clipservice.sources.base import DirectResolver
from clipservice.storage import SharedFolderStorage
from tests.conftest import make_media

REDIS_URL = "redis://127.0.0.1:6379/13"
RESULTS = Path(__file__).parent / "results"


def make_jobs(base_url: str, n_jobs: int, n_clips: int) -> list[Job]:
    jobs = []
    for j in range(n_jobs):
        clips = [
            ClipSpec(index=i, start=i * 6.0 + 1, end=i * 6.0 + 5, mode="fast")
            for i in range(n_clips)
        ]
        jobs.append(
            Job(
                job_id=new_job_id(),
                source=JobSource(video_url=f"{base_url}/muxed.mp4?job={j}"),
                clips=clips,
                total=n_clips,
            )
        )
    return jobs


async def wait_all(store: Any, jobs: list[Job], timeout_s: float = 600) -> dict[str, int]:
    statuses: dict[str, int] = {}
    async with asyncio.timeout(timeout_s):
        pending = {j.job_id for j in jobs}
        while pending:
            for job_id in list(pending):
                job = await store.get(job_id)
                if job is not None and job.status.ended:
                    pending.discard(job_id)
                    statuses[job.status.value] = statuses.get(job.status.value, 0) + 1
            await asyncio.sleep(0.05)
    return statuses


def settings_for(data_dir: Path, **queue: Any) -> Settings:
    return Settings().replace(
        storage={"data_dir": data_dir.resolve()},
        resolver={"kind": "direct"},
        security={"allow_private_sources": True},
        queue=queue,
    )


async def run_embedded(base_url: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data_dir = work / "embedded"
    settings = settings_for(data_dir)
    store = FileJobStore(settings.jobs_dir)
    await store.open()
    runner = LocalRunner(settings, store, DirectResolver(), Cutter())
    await runner.start()
    jobs = make_jobs(base_url, args.jobs, args.clips)
    t0 = time.perf_counter()
    for job in jobs:
        await store.save(job)
        await runner.submit(job)
    statuses = await wait_all(store, jobs)
    elapsed = time.perf_counter() - t0
    await runner.stop()
    return {"setup": "embedded (in-process)", "workers": 0, "elapsed_s": elapsed, **statuses}


async def run_distributed(
    base_url: str, n_workers: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    data_dir = work / f"dist{n_workers}"
    settings = settings_for(data_dir, url=REDIS_URL)
    store = RedisJobStore.from_url(REDIS_URL)
    await store.redis.flushdb()
    storage = SharedFolderStorage(settings.clips_dir)
    runner = DistributedRunner(settings, store, storage)
    await runner.start()
    config = work / f"worker{n_workers}.toml"
    config.write_text(
        f'[storage]\ndata_dir = "{data_dir.resolve()}"\n'
        '[resolver]\nkind = "direct"\n'
        "[security]\nallow_private_sources = true\n"
        f'[queue]\nurl = "{REDIS_URL}"\n'
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "clipservice", "worker", "--config", str(config)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(n_workers)
    ]
    queue = make_queue(REDIS_URL, CLIPS_QUEUE)
    await queue.connect()
    try:
        async with asyncio.timeout(120):
            while len((await queue.info())["workers"]) < n_workers:
                await asyncio.sleep(0.2)
        jobs = make_jobs(base_url, args.jobs, args.clips)
        t0 = time.perf_counter()
        for job in jobs:
            await store.save(job)
            await runner.submit(job)
        statuses = await wait_all(store, jobs)
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            await asyncio.wait_for(p.wait(), 60)
        await queue.disconnect()
        await runner.stop()
        await store.redis.flushdb()
        await store.close()
    return {
        "setup": f"{n_workers} worker process{'es' if n_workers > 1 else ''}",
        "workers": n_workers,
        "elapsed_s": elapsed,
        **statuses,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--clips", type=int, default=4, help="4 s fast-mode clips per job")
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    try:
        media = make_media(work / "media")
        app = web.Application()
        app.router.add_static("/", media["muxed"].parent)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base_url = f"http://127.0.0.1:{port}"
        rows = [await run_embedded(base_url, args, work)]
        for n in (int(x) for x in args.workers.split(",")):
            rows.append(await run_distributed(base_url, n, args, work))
        await runner.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clips = args.jobs * args.clips
    print(
        f"\n{args.jobs} jobs x {args.clips} fast-mode clips of 4 s "
        f"({clips} clips), {os.cpu_count()} cores, max_concurrent_clips=4 per process\n"
    )
    print(f"{'setup':<24} {'elapsed s':>10} {'jobs/min':>9} {'clips/s':>8}  ended")
    for r in rows:
        r["jobs_per_min"] = args.jobs / r["elapsed_s"] * 60
        r["clips_per_s"] = clips / r["elapsed_s"]
        ended = {k: v for k, v in r.items() if k in ("finished", "failed", "cancelled")}
        print(
            f"{r['setup']:<24} {r['elapsed_s']:>10.2f} {r['jobs_per_min']:>9.1f} "
            f"{r['clips_per_s']:>8.2f}  {ended}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_workers.json"
    out.write_text(json.dumps({"jobs": args.jobs, "clips": args.clips, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
