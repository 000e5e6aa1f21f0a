"""Jobs per minute: the embedded runner vs 1, 2 and 4 ``clipservice worker`` processes,
with the clips kept in a local folder and in an S3 bucket.

The same fixed batch of fast-mode (stream copy) clip jobs is run by each
set-up, from a loopback media server, on the real Redis (db 13, flushed).
Every job gets a distinct source URL so no output is reused between jobs.
Workers are started and registered before the clock starts.

Storage ``local``: one data_dir shared by the runner and every worker (the
shared-folder deployment). Storage ``s3``: a new bucket per set-up on an
S3-compatible server the bench starts on loopback (SeaweedFS when its ``weed``
binary is installed, else moto's server, in a process of its own either way),
and every worker a data_dir of its own (its staging folder): nothing shared but
Redis and the bucket. Storages are built from settings by
:func:`~clipservice.storage_factory.open_storage`, as the service does.

Upload overhead per clip is measured from the uploads themselves: each worker
logs ``clip_uploaded`` with the seconds its PUT took (``upload_s``); the table
gives their mean per clip, and the elapsed time the S3 set-up lost per clip
against the same set-up on local storage.

Run: ``.venv/bin/python -m bench.bench_workers [--jobs 48 --clips 4 --storage local,s3]``.
Prints a table and writes ``bench/results/bench_workers.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiobotocore.session import get_session
from aiohttp import web

from clipservice.config import Settings
from clipservice.jobs.dispatch import DistributedRunner
from clipservice.jobs.models import ClipSpec, Job, JobSource, new_job_id
from clipservice.jobs.queue import CLIPS_QUEUE, make_queue
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.logging import configure_logging
from clipservice.media.cutter import Cutter
from clipservice.sources.base import DirectResolver
from clipservice.storage_factory import open_storage
from tests.conftest import free_port, make_media
from tests.s3_servers import remove_weed_sockets, seaweed_command, weed_binary

REDIS_URL = "redis://127.0.0.1:6379/15"  # no test uses it: a bench run beside tests is safe
RESULTS = Path(__file__).parent / "results"
# The bench's own store's credentials (SeaweedFS checks them; moto takes any).
ACCESS_KEY = "clipservice-bench"
SECRET_KEY = "clipservice-bench-secret"


def _store_command(kind: str, root: Path) -> tuple[list[str], str, list[int]]:
    """The command line of an S3 server on loopback, its endpoint URL, and the ports
    whose unix sockets it leaves in /tmp (weed names its gRPC sockets by port)."""
    root.mkdir(parents=True, exist_ok=True)
    if kind == "moto":
        port = free_port()
        moto = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        return moto, f"http://127.0.0.1:{port}", []
    return seaweed_command(root, ACCESS_KEY, SECRET_KEY)


@asynccontextmanager
async def s3_server(kind: str, root: Path) -> AsyncIterator[str]:
    """An S3-compatible server on loopback for the bench; its endpoint URL."""
    command, url, socket_ports = _store_command(kind, root)
    log = (root / "server.log").open("wb")
    proc = await asyncio.create_subprocess_exec(*command, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with asyncio.timeout(60):
            while True:
                assert proc.returncode is None, (root / "server.log").read_text()[-2000:]
                try:
                    async with get_session().create_client("s3", endpoint_url=url) as client:
                        await client.list_buckets()
                    break
                except Exception:  # not up yet
                    await asyncio.sleep(0.3)
        yield url
    finally:
        proc.kill()
        await proc.wait()
        log.close()
        remove_weed_sockets(socket_ports)


async def new_bucket(endpoint_url: str) -> dict[str, Any]:
    """A new, empty bucket; the [storage] keys that use it."""
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client("s3", endpoint_url=endpoint_url) as client:
        await client.create_bucket(Bucket=bucket)
    return {
        "kind": "s3",
        "bucket": bucket,
        "endpoint_url": endpoint_url,
        "addressing_style": "path",
    }


def uploads_logged(logs: list[Path]) -> list[tuple[float, int]]:
    """``(upload_s, size_bytes)`` of every ``clip_uploaded`` line the workers logged
    (JSON lines)."""
    uploads = []
    for path in logs:
        for line in path.read_text().splitlines():
            if '"clip_uploaded"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "clip_uploaded":
                uploads.append((float(event["upload_s"]), int(event["size_bytes"])))
    return uploads


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


def settings_for(data_dir: Path, storage: dict[str, Any], **queue: Any) -> Settings:
    return Settings().replace(
        storage={"data_dir": data_dir.resolve(), **storage},
        resolver={"kind": "direct"},
        security={"allow_private_sources": True},
        queue=queue,
    )


def _label(storage: dict[str, Any]) -> str:
    return str(storage.get("kind", "local"))


async def run_embedded(
    base_url: str, args: argparse.Namespace, work: Path, storage: dict[str, Any]
) -> dict[str, Any]:
    data_dir = work / f"embedded-{_label(storage)}"
    settings = settings_for(data_dir, storage)
    store = FileJobStore(settings.jobs_dir)
    await store.open()
    jobs = make_jobs(base_url, args.jobs, args.clips)
    async with open_storage(settings) as clips:
        runner = LocalRunner(settings, store, DirectResolver(), Cutter(), storage=clips)
        await runner.start()
        t0 = time.perf_counter()
        for job in jobs:
            await store.save(job)
            await runner.submit(job)
        statuses = await wait_all(store, jobs, args.timeout_s)
        elapsed = time.perf_counter() - t0
        await runner.stop()
    return {
        "setup": "embedded (in-process)",
        "storage": _label(storage),
        "workers": 0,
        "elapsed_s": elapsed,
        **statuses,
    }


def _worker_config(path: Path, data_dir: Path, storage: dict[str, Any]) -> Path:
    more = "".join(f"{key} = {json.dumps(value)}\n" for key, value in storage.items())
    path.write_text(
        f'[storage]\ndata_dir = "{data_dir.resolve()}"\n{more}'
        '[resolver]\nkind = "direct"\n'
        "[security]\nallow_private_sources = true\n"
        f'[queue]\nurl = "{REDIS_URL}"\n'
    )
    return path


async def run_distributed(
    base_url: str, n_workers: int, args: argparse.Namespace, work: Path, storage: dict[str, Any]
) -> dict[str, Any]:
    label = _label(storage)
    data_dir = work / f"dist{n_workers}-{label}"
    settings = settings_for(data_dir, storage, url=REDIS_URL)
    store = RedisJobStore.from_url(REDIS_URL)
    await store.redis.flushdb()
    # Local: every worker on the runner's data_dir (shared). S3: a data_dir each.
    configs = [
        _worker_config(
            work / f"worker{n_workers}-{label}-{n}.toml",
            data_dir if label == "local" else work / f"dist{n_workers}-{label}-w{n}",
            storage,
        )
        for n in range(n_workers)
    ]
    logs = [work / f"worker{n_workers}-{label}-{n}.log" for n in range(n_workers)]
    async with open_storage(settings) as clips:
        runner = DistributedRunner(settings, store, clips)
        await runner.start()
        procs = []
        for config, log_path in zip(configs, logs, strict=True):
            with log_path.open("wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        *("-m", "clipservice", "worker", "--config", str(config)),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
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
            try:
                statuses = await wait_all(store, jobs, args.timeout_s)
            except TimeoutError:
                for log_path in logs:
                    print(f"--- {log_path.name}\n{log_path.read_text()[-3000:]}", file=sys.stderr)
                raise
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
    uploads = uploads_logged(logs) if label == "s3" else []
    times = [t for t, _ in uploads]
    return {
        "setup": f"{n_workers} worker process{'es' if n_workers > 1 else ''}",
        "storage": label,
        "workers": n_workers,
        "elapsed_s": elapsed,
        "uploads": len(uploads),
        "upload_s_mean": statistics.fmean(times) if times else None,
        "upload_s_median": statistics.median(times) if times else None,
        "upload_s_total": sum(times),
        "upload_bytes_mean": statistics.fmean(n for _, n in uploads) if uploads else None,
        **statuses,
    }


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f}/{five:.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--clips", type=int, default=4, help="4 s fast-mode clips per job")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--storage", default="local,s3")
    parser.add_argument("--timeout-s", type=float, default=600, help="bound on one set-up's batch")
    parser.add_argument(
        "--s3-server",
        choices=("auto", "seaweedfs", "moto"),
        default="auto",
        help="auto: SeaweedFS when `weed` is installed, else moto's server",
    )
    args = parser.parse_args()
    configure_logging("WARNING")  # the embedded runner's clip lines would bury the table
    server = args.s3_server
    if server == "auto":
        server = "seaweedfs" if weed_binary() else "moto"
    # The bench's store, through the standard credential chain (as the service reads it).
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY,
        AWS_SECRET_ACCESS_KEY=SECRET_KEY,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    kinds = args.storage.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    load_before = _load()
    rows: list[dict[str, Any]] = []
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
        for kind in kinds:
            async with s3_server(server, work / "s3") if kind == "s3" else _no_server() as url:
                # A new bucket per set-up: no set-up reuses another's outputs.
                rows.append(await run_embedded(base_url, args, work, await _storage(url)))
                for n in (int(x) for x in args.workers.split(",")):
                    rows.append(await run_distributed(base_url, n, args, work, await _storage(url)))
        await runner.cleanup()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clips = args.jobs * args.clips
    local = {r["workers"]: r for r in rows if r["storage"] == "local"}
    for r in rows:
        r["jobs_per_min"] = args.jobs / r["elapsed_s"] * 60
        r["clips_per_s"] = clips / r["elapsed_s"]
        same = local.get(r["workers"])
        r["lost_s_per_clip"] = (
            (r["elapsed_s"] - same["elapsed_s"]) / clips
            if r["storage"] == "s3" and same is not None
            else None
        )
    load_after = _load()
    print(
        f"\n{args.jobs} jobs x {args.clips} fast-mode clips of 4 s "
        f"({clips} clips), {os.cpu_count()} cores, max_concurrent_clips=4 per process, "
        f"S3 on {server}; load average (1/5 min) {load_before} before, {load_after} after\n"
    )
    print(
        f"{'setup':<24} {'storage':<8} {'elapsed s':>10} {'jobs/min':>9} {'clips/s':>8} "
        f"{'upload s/clip':>14} {'lost s/clip':>12}  ended"
    )
    for r in rows:
        ended = {k: v for k, v in r.items() if k in ("finished", "failed", "cancelled")}
        upload = f"{r['upload_s_mean']:.4f}" if r.get("upload_s_mean") is not None else "-"
        lost = f"{r['lost_s_per_clip']:+.4f}" if r["lost_s_per_clip"] is not None else "-"
        print(
            f"{r['setup']:<24} {r['storage']:<8} {r['elapsed_s']:>10.2f} "
            f"{r['jobs_per_min']:>9.1f} {r['clips_per_s']:>8.2f} {upload:>14} {lost:>12}  {ended}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "bench_workers.json"
    out.write_text(
        json.dumps(
            {
                "jobs": args.jobs,
                "clips": args.clips,
                "cores": os.cpu_count(),
                "s3_server": server,
                "load_before": load_before,
                "load_after": load_after,
                "rows": rows,
            },
            indent=2,
        )
    )
    sizes = [r["upload_bytes_mean"] for r in rows if r.get("upload_bytes_mean")]
    if sizes:
        print(f"\nuploaded clips: {statistics.fmean(sizes) / 1024:.0f} KiB on average")
    print(f"\nwrote {out}")


@asynccontextmanager
async def _no_server() -> AsyncIterator[str]:
    yield ""


async def _storage(endpoint_url: str) -> dict[str, Any]:
    """The [storage] keys of a set-up: a new bucket on ``endpoint_url``, or local."""
    return await new_bucket(endpoint_url) if endpoint_url else {}


if __name__ == "__main__":
    asyncio.run(main())
