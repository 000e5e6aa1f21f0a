"""API under load: GET /api/check-job while jobs cut, versus idle; RSS with 1,000 jobs.

Starts a real ``clipservice serve`` process on a temporary data folder, a
loopback media server (HTTP Range) in a thread of this process, and a
loopback load generator (aiohttp, keep-alive connections) that polls
``GET /api/check-job/{id}`` as fast as it can for a fixed window:

1. idle: no job running;
2. cutting: while 3 jobs of 4 clips each are being cut (720p re-encodes, so
   FFmpeg keeps both cores busy for the whole window);
3. memory: the service restarted on a folder holding 1,000 retained (ended)
   jobs of 4 clips each, after every one of them has been read once.

Targets: p99 under 20 ms while cutting, throughput while cutting at least
half of idle, RSS under 150 MB. Prints a table and writes JSON to
``bench/results/bench_api.json``.

    .venv/bin/python -m bench.bench_api [--window-s 8] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from clipservice.jobs.models import (
    ClipResult,
    ClipSpec,
    Job,
    JobSource,
    JobStatus,
    new_job_id,
    utcnow,
)
from clipservice.media.ffmpeg import bundled_ffmpeg

RESULTS = Path(__file__).parent / "results"
TARGET_P99_MS = 20.0
TARGET_THROUGHPUT_RATIO = 0.5
TARGET_RSS_MB = 150.0


def make_source(folder: Path, seconds: int = 60) -> Path:
    """A 720p H.264/AAC MP4 with a 2 s GOP: heavy enough that re-encoding takes a while."""
    out = folder / "source.mp4"
    subprocess.run(
        [
            bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-crf", "23", "-pix_fmt", "yuv420p",
            "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
            "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", str(out),
        ],
        check=True,
        timeout=300,
    )  # fmt: skip
    return out


async def _serve_media(folder: Path) -> None:
    """The media server's own process: FileResponse gives Range for free."""

    async def serve_file(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(folder / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/{name}", serve_file)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


@contextlib.contextmanager
def media_server(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over loopback HTTP from a separate process, so serving FFmpeg's
    reads does not compete with the load generator for this process's GIL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_api", "--serve-media", str(folder)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User + system CPU time the process has used."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def server_histograms(
    http: aiohttp.ClientSession, base_url: str
) -> dict[str, dict[float, float]]:
    """Cumulative bucket counts of the service's check-job handling time and loop lag."""
    out: dict[str, dict[float, float]] = {"http": {}, "lag": {}}
    async with http.get(f"{base_url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("clipservice_http_request_seconds_bucket{") and "check-job" in line:
                kind = "http"
            elif line.startswith("clipservice_event_loop_lag_seconds_bucket{"):
                kind = "lag"
            else:
                continue
            le = line.split('le="')[1].split('"')[0]
            out[kind][float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of the requests between two scrapes."""
    edges = sorted(after)
    counts = [after[e] - before.get(e, 0.0) for e in edges]
    total = counts[-1]
    for edge, count in zip(edges, counts, strict=True):
        if count >= q * total:
            return edge
    return float("inf")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    """A ``clipservice serve`` child process."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "CLIPSERVICE_STORAGE__DATA_DIR": str(data_dir),
            "CLIPSERVICE_RESOLVER__KIND": "direct",
            "CLIPSERVICE_SECURITY__ALLOW_PRIVATE_SOURCES": "true",
            "CLIPSERVICE_SECURITY__CREATE_RATE_PER_MIN": "0",
            "CLIPSERVICE_JOBS__RETENTION_S": "86400",
            "CLIPSERVICE_SERVER__SHUTDOWN_GRACE_S": "0",
        }
        env.pop("CLIPSERVICE_SECURITY__API_KEYS", None)
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "clipservice", "serve", "--port", str(self.port)],
            cwd=data_dir.parent,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        async with asyncio.timeout(60):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{self.base_url}/healthz") as resp:
                        if resp.status == 200:
                            return
                assert self.proc.poll() is None, "serve exited"
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


async def load(
    http: aiohttp.ClientSession,
    service: Service,
    job_ids: list[str],
    window_s: float,
    workers: int,
) -> dict[str, float]:
    """Poll check-job from ``workers`` keep-alive connections for ``window_s``."""
    base_url = service.base_url
    hist0 = await server_histograms(http, base_url)
    cpu0 = cpu_s(service.proc.pid)
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + window_s

    async def worker(n: int) -> None:
        nonlocal errors
        i = n
        while time.perf_counter() < deadline:
            url = f"{base_url}/api/check-job/{job_ids[i % len(job_ids)]}"
            i += 1
            t0 = time.perf_counter()
            async with http.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    elapsed = time.perf_counter() - t0
    cpu = cpu_s(service.proc.pid) - cpu0
    hist1 = await server_histograms(http, base_url)
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "errors": errors,
        "window_s": round(elapsed, 2),
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(latencies[-1] * 1000, 2),
        "server_p99_le_ms": histogram_quantile(hist0["http"], hist1["http"], 0.99) * 1000,
        "loop_lag_p99_le_ms": histogram_quantile(hist0["lag"], hist1["lag"], 0.99) * 1000,
        "loop_lag_p50_le_ms": histogram_quantile(hist0["lag"], hist1["lag"], 0.5) * 1000,
        "loop_lag_p90_le_ms": histogram_quantile(hist0["lag"], hist1["lag"], 0.9) * 1000,
        "server_cpu_us_per_request": round(cpu / len(latencies) * 1e6, 1),
    }


async def create(http: aiohttp.ClientSession, base_url: str, body: dict[str, Any]) -> str:
    async with http.post(f"{base_url}/api/create-clips", json=body) as resp:
        assert resp.status == 202, await resp.text()
        return str((await resp.json())["job_id"])


async def job(http: aiohttp.ClientSession, base_url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{base_url}/api/check-job/{job_id}") as resp:
        doc: dict[str, Any] = await resp.json()
        return doc


async def wait_ended(http: aiohttp.ClientSession, base_url: str, job_id: str) -> dict[str, Any]:
    async with asyncio.timeout(600):
        while (doc := await job(http, base_url, job_id))["status"] in ("pending", "processing"):
            await asyncio.sleep(0.2)
    return doc


async def ffmpeg_running(http: aiohttp.ClientSession, base_url: str) -> float:
    async with http.get(f"{base_url}/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("clipservice_ffmpeg_processes "):
                return float(line.split()[1])
    return 0.0


def seed_jobs(data_dir: Path, count: int) -> None:
    """``count`` ended jobs of 4 clips each, as a long-running service would retain them."""
    jobs_dir = data_dir / "jobs"
    jobs_dir.mkdir(parents=True)
    now = utcnow()
    for n in range(count):
        clips = [ClipSpec(index=i, start=i * 10, end=i * 10 + 5, mode="accurate") for i in range(4)]
        results = [
            ClipResult(
                index=c.index, start=c.start, end=c.end, mode=c.mode,
                file=f"vid{n:05d}-{c.index}.mp4", url=f"/api/clips/vid{n:05d}-{c.index}.mp4",
                size_bytes=1_234_567, duration_s=5.0, actual_start=c.start, actual_end=c.end,
            )
            for c in clips
        ]  # fmt: skip
        doc = Job(
            job_id=new_job_id(),
            status=JobStatus.FINISHED,
            video_id=f"vid{n:05d}",
            source=JobSource(video_id=f"vid{n:05d}"),
            clips=clips,
            total=4,
            processed=4,
            progress=1.0,
            results=results,
            finished_at=now,
            expires_at=now + timedelta(days=1),
        )
        (jobs_dir / f"{doc.job_id}.json").write_text(json.dumps(doc.stored()))


async def run(window_s: float, workers: int) -> dict[str, Any]:
    out: dict[str, Any] = {"window_s": window_s, "concurrency": workers}
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "media").mkdir()
        print("generating a 720p source…", file=sys.stderr)
        make_source(tmp / "media")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=workers + 4)) as http:
            with media_server(tmp / "media") as media_url:
                service = Service(tmp / "data", tmp / "serve.log")
                try:
                    await service.ready(http)
                    src = f"{media_url}/source.mp4"
                    warm = await create(
                        http, service.base_url,
                        {"video_url": src, "clips": [{"start": 1, "end": 2, "mode": "fast"}]},
                    )  # fmt: skip
                    await wait_ended(http, service.base_url, warm)
                    print("idle load…", file=sys.stderr)
                    out["idle"] = await load(http, service, [warm], window_s, workers)
                    out["idle"]["rss_mb"] = round(rss_mb(service.proc.pid), 1)

                    body = {
                        "video_url": src,
                        "clips": [
                            {"start": s, "end": s + 12, "mode": "reencode"} for s in (2, 15, 28, 41)
                        ],
                    }
                    ids = [await create(http, service.base_url, body) for _ in range(3)]
                    async with asyncio.timeout(60):
                        while await ffmpeg_running(http, service.base_url) < 1:
                            await asyncio.sleep(0.05)
                    print("load while cutting…", file=sys.stderr)
                    out["cutting"] = await load(http, service, ids, window_s, workers)
                    out["cutting"]["ffmpeg_running_at_end"] = await ffmpeg_running(
                        http, service.base_url
                    )
                    out["cutting"]["rss_mb"] = round(rss_mb(service.proc.pid), 1)
                    docs = [await wait_ended(http, service.base_url, i) for i in ids]
                    out["cutting"]["jobs"] = [d["status"] for d in docs]

                    # Smart cuts run in this process (PyAV threads, not FFmpeg
                    # processes): the loop shares the GIL with them.
                    ids = []
                    for j in range(3):
                        starts = [round(0.5 + 0.3 * j + 1.9 * k, 2) for k in range(28)]
                        clips = [{"start": a, "end": a + 2, "mode": "accurate"} for a in starts]
                        ids.append(await create(
                            http, service.base_url, {"video_url": src, "clips": clips}
                        ))  # fmt: skip
                    print("load while smart-cutting…", file=sys.stderr)
                    out["smartcut"] = await load(http, service, ids, window_s, workers)
                    out["smartcut"]["rss_mb"] = round(rss_mb(service.proc.pid), 1)
                    docs = [await wait_ended(http, service.base_url, i) for i in ids]
                    out["smartcut"]["jobs"] = [d["status"] for d in docs]
                    out["smartcut"]["clips_done"] = sum(len(d["results"]) for d in docs)
                finally:
                    service.stop()

        print("1,000 retained jobs…", file=sys.stderr)
        seed_jobs(tmp / "data1000", 1000)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as http:
            service = Service(tmp / "data1000", tmp / "serve1000.log")
            try:
                await service.ready(http)
                ids = [p.stem for p in (tmp / "data1000" / "jobs").glob("*.json")]
                for i in range(0, len(ids), 50):
                    await asyncio.gather(*(job(http, service.base_url, j) for j in ids[i : i + 50]))
                out["retained_1000"] = {
                    "jobs": len(ids),
                    "rss_mb": round(rss_mb(service.proc.pid), 1),
                }
            finally:
                service.stop()
    out["loadavg"] = [load0, os.getloadavg()[0]]
    idle, cutting = out["idle"], out["cutting"]
    out["targets"] = {
        "p99_cutting_under_20ms": cutting["p99_ms"] < TARGET_P99_MS,
        "p99_smartcut_under_20ms": out["smartcut"]["p99_ms"] < TARGET_P99_MS,
        "throughput_ratio": round(cutting["throughput_rps"] / idle["throughput_rps"], 2),
        "throughput_at_least_half": cutting["throughput_rps"]
        >= TARGET_THROUGHPUT_RATIO * idle["throughput_rps"],
        "rss_1000_under_150mb": out["retained_1000"]["rss_mb"] < TARGET_RSS_MB,
    }
    return out


def table(out: dict[str, Any]) -> str:
    idle, cut, mem = out["idle"], out["cutting"], out["retained_1000"]
    sc = out["smartcut"]
    t = out["targets"]
    rows = [
        ("scenario", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "server p99 ms",
         "loop lag p99 ms", "server CPU us/req", "RSS MB"),
        ("idle", idle["requests"], idle["throughput_rps"], idle["p50_ms"], idle["p99_ms"],
         idle["max_ms"], f"<= {idle['server_p99_le_ms']:g}",
         f"<= {idle['loop_lag_p99_le_ms']:g}", idle["server_cpu_us_per_request"],
         idle["rss_mb"]),
        ("3 jobs x 4 clips cutting", cut["requests"], cut["throughput_rps"], cut["p50_ms"],
         cut["p99_ms"], cut["max_ms"], f"<= {cut['server_p99_le_ms']:g}",
         f"<= {cut['loop_lag_p99_le_ms']:g}", cut["server_cpu_us_per_request"], cut["rss_mb"]),
        ("3 jobs x 28 smart cuts", sc["requests"], sc["throughput_rps"], sc["p50_ms"],
         sc["p99_ms"], sc["max_ms"], f"<= {sc['server_p99_le_ms']:g}",
         f"<= {sc['loop_lag_p99_le_ms']:g}", sc["server_cpu_us_per_request"], sc["rss_mb"]),
        ("1,000 retained jobs", "", "", "", "", "", "", "", "", mem["rss_mb"]),
    ]  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"load average at start {out['loadavg'][0]:.1f}, at end {out['loadavg'][1]:.1f} "
        f"(on {os.cpu_count()} cores; other work on the machine skews every latency"
        f"{'; bench, service and media server at nice -10' if out.get('isolated') else ''})"
    )
    lines.append(
        f"window {out['window_s']} s, {out['concurrency']} connections; FFmpeg running at the "
        f"end of the cutting window: {cut['ffmpeg_running_at_end']:.0f}; jobs: {cut['jobs']}"
    )
    lines.append(
        f"targets: p99 while cutting < {TARGET_P99_MS} ms: {t['p99_cutting_under_20ms']} "
        f"(smart cuts: {t['p99_smartcut_under_20ms']}, {sc['clips_done']} clips); "
        f"throughput ratio {t['throughput_ratio']} >= {TARGET_THROUGHPUT_RATIO}: "
        f"{t['throughput_at_least_half']}; RSS with 1,000 jobs < {TARGET_RSS_MB} MB: "
        f"{t['rss_1000_under_150mb']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-s", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run the bench, the service and the media server at nice -10 (needs root), so "
        "other work on a shared machine does not set the latencies; FFmpeg still runs below "
        "the service (it lowers its own priority)",
    )
    parser.add_argument("--serve-media", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.isolate:
        os.setpriority(os.PRIO_PROCESS, 0, -10)  # inherited by every child started below
        # Under autogroup scheduling nice only counts inside a session's group.
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as fh:
            fh.write("-10")
    if args.serve_media:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_media(Path(args.serve_media)))
        return
    out = asyncio.run(run(args.window_s, args.concurrency))
    out["isolated"] = args.isolate
    print(table(out))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_api.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
