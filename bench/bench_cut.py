"""Benchmark of the cut engine against the usual ways of cutting a clip.

Times a 10 s clip from a 10-minute 720p H.264 source (separate video-only MP4
and m4a audio, served by a loopback HTTP server with Range that counts the
bytes it sends) in each mode, against: bare ``ffmpeg -ss … -c copy`` (the
floor), yt-dlp ``--download-sections`` with and without
``--force-keyframes-at-cuts``, and the naive path (download both files whole,
then re-encode the cut). Then a job of 10 clips from one source against one
clip. Prints a table of medians and writes JSON to ``bench/results/``.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.bench_cut [--runs 5]

The source is generated once and cached under ``bench/.cache/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from clipservice.config import CutMode
from clipservice.media import plan
from clipservice.media.cutter import Cutter
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.keyframes import KeyframeIndex
from clipservice.media.probe import probe_source

HERE = Path(__file__).parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
SOURCE_S = 600
CLIP = (300.5, 310.5)  # between keyframes on purpose


def make_source() -> dict[str, Path]:
    """10-minute 720p30 H.264 (High, B-frames, 2 s GOP) + AAC, cached."""
    CACHE.mkdir(exist_ok=True)
    files = {
        "video": CACHE / "video-720p.mp4",
        "audio": CACHE / "audio.m4a",
        "muxed": CACHE / "muxed-720p.mp4",
    }
    ff = [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y"]
    if not files["video"].exists():
        print("generating the 10-minute 720p source (once)…", file=sys.stderr)
        tmp = files["video"].with_suffix(".tmp.mp4")
        subprocess.run(
            [*ff, "-f", "lavfi", "-i", f"testsrc2=size=1280x720:rate=30:duration={SOURCE_S}",
             "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
             "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
             "-movflags", "+faststart", str(tmp)],
            check=True,
        )  # fmt: skip
        tmp.rename(files["video"])
    if not files["audio"].exists():
        subprocess.run(
            [*ff, "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SOURCE_S}",
             "-ac", "2", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
             str(files["audio"])],
            check=True,
        )  # fmt: skip
    if not files["muxed"].exists():
        subprocess.run(
            [*ff, "-i", str(files["video"]), "-i", str(files["audio"]), "-map", "0:v",
             "-map", "1:a", "-c", "copy", "-movflags", "+faststart", str(files["muxed"])],
            check=True,
        )  # fmt: skip
    return files


def _serve_forever(files: dict[str, Path], port: Any, sent: Any) -> None:
    """The media server's process: a threaded HTTP server with single-range
    support that adds every byte it sends to the shared counter ``sent``."""
    by_name = {p.name: p for p in files.values()}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def setup(self) -> None:
            # Bounded kernel buffers, so "sent" stays close to "read by the
            # client" (a client that has enough hangs up). Not smaller: a send
            # buffer under one write stalls on delayed ACKs (~40 ms each).
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 128 * 1024)
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            super().setup()

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = by_name.get(self.path.lstrip("/").split("?")[0])
            if path is None:
                self.send_error(404)
                return
            size = path.stat().st_size
            first, last = 0, size - 1
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                a, _, b = rng[6:].split(",")[0].partition("-")
                first = int(a) if a else 0
                last = min(int(b), size - 1) if b else size - 1
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            else:
                self.send_response(200)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(last - first + 1))
            self.end_headers()
            if not body:
                return
            with path.open("rb") as fh:
                fh.seek(first)
                left = last - first + 1
                try:
                    while left > 0:
                        chunk = fh.read(min(65536, left))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        with sent.get_lock():
                            sent.value += len(chunk)
                        left -= len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    port.value = httpd.server_address[1]
    httpd.serve_forever()


class RangeServer:
    """A loopback HTTP server with Range support that counts the bytes it sends.

    It runs in its own process, as a CDN would: the cases timed in this process
    (clipservice's PyAV threads) and those run as subprocesses (FFmpeg, yt-dlp)
    then meet the same server, none sharing a GIL with it.
    """

    def __init__(self, files: dict[str, Path]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._port = ctx.Value("i", 0)
        self._sent = ctx.Value("q", 0)
        self._proc = ctx.Process(
            target=_serve_forever, args=(files, self._port, self._sent), daemon=True
        )
        self.base = ""

    @property
    def bytes_sent(self) -> int:
        return int(self._sent.value)

    def __enter__(self) -> RangeServer:
        self._proc.start()
        deadline = time.monotonic() + 10
        while not self._port.value:
            if time.monotonic() > deadline or not self._proc.is_alive():
                raise RuntimeError("the media server did not start")
            time.sleep(0.01)
        self.base = f"http://127.0.0.1:{self._port.value}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.join(5)

    def url(self, path: Path) -> str:
        return f"{self.base}/{path.name}"


def timed(fn: Callable[[], None], server: RangeServer, runs: int) -> dict[str, float]:
    times, sent = [], []
    for _ in range(runs):
        before = server.bytes_sent
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        sent.append(server.bytes_sent - before)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "bytes": statistics.median(sent),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--only", default="", help="run only the cases whose name holds this text (and the floor)"
    )
    args = parser.parse_args()
    files = make_source()
    ff = bundled_ffmpeg()
    work = Path(tempfile.mkdtemp(prefix="bench-cut-"))
    start, end = CLIP
    results: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    try:
        with RangeServer(files) as server:
            video, audio, muxed = (server.url(files[k]) for k in ("video", "audio", "muxed"))
            src = plan.Inputs(video, audio)

            def floor() -> None:
                subprocess.run(
                    [ff, "-v", "error", "-y", "-ss", str(start), "-i", video, "-ss", str(start),
                     "-i", audio, "-t", str(end - start), "-map", "0:v", "-map", "1:a",
                     "-c", "copy", str(work / "floor.mp4")],
                    check=True,
                )  # fmt: skip

            def service_clip(mode: CutMode) -> Callable[[], None]:
                async def one() -> None:
                    # What the service does for a job of one clip (but the
                    # resolve): probe through the job's keyframe index, cut.
                    index = KeyframeIndex(video)
                    try:
                        info = await probe_source(video, audio, index)
                        out = work / f"{mode}.mp4"
                        out.unlink(missing_ok=True)
                        outcome = await Cutter().cut(
                            src, info, start, end, mode, out, timeout_s=300, keyframes=index
                        )
                    finally:
                        await index.aclose()
                    if outcome.note:
                        notes[mode] = outcome.note

                return lambda: asyncio.run(one())

            def ytdlp(force: bool) -> Callable[[], None]:
                def run() -> None:
                    out = work / f"ytdlp-{int(force)}.mp4"
                    out.unlink(missing_ok=True)
                    cmd = [
                        sys.executable, "-m", "yt_dlp", "--quiet", "--no-warnings",
                        "--no-part", "--ffmpeg-location", ff,
                        "--download-sections", f"*{start}-{end}",
                        "-o", str(out), muxed,
                    ]  # fmt: skip
                    if force:
                        cmd.insert(-3, "--force-keyframes-at-cuts")
                    subprocess.run(cmd, check=True, capture_output=True)

                return run

            def naive() -> None:
                local_v, local_a = work / "whole-v.mp4", work / "whole-a.m4a"
                for url, path in ((video, local_v), (audio, local_a)):
                    with urllib.request.urlopen(url) as resp, path.open("wb") as fh:
                        shutil.copyfileobj(resp, fh, 1 << 20)
                subprocess.run(
                    [ff, "-v", "error", "-y", "-ss", str(start), "-i", str(local_v),
                     "-ss", str(start), "-i", str(local_a), "-t", str(end - start),
                     "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "veryfast",
                     "-crf", "20", "-c:a", "aac", str(work / "naive.mp4")],
                    check=True,
                )  # fmt: skip

            cases: list[tuple[str, Callable[[], None]]] = [
                ("floor: ffmpeg -ss … -c copy", floor),
                ("clipservice fast", service_clip("fast")),
                ("clipservice accurate", service_clip("accurate")),
                ("clipservice reencode", service_clip("reencode")),
                ("yt-dlp --download-sections", ytdlp(False)),
                ("yt-dlp … --force-keyframes-at-cuts", ytdlp(True)),
            ]
            if not args.skip_naive:
                cases.append(("naive: download whole, re-encode", naive))
            cases = [c for c in cases if args.only in c[0] or c[0].startswith("floor")]
            for name, fn in cases:
                fn()  # warm-up (page cache, imports)
                results[name] = timed(fn, server, args.runs)
                print(f"  {name}: {results[name]['median_s']:.3f}s", file=sys.stderr)

            # A job of 10 clips from one source vs one clip: one probe, one
            # keyframe index, clips under the default limit of 4 at once.
            def job(clips: int) -> Callable[[], None]:
                async def run() -> None:
                    index = KeyframeIndex(video)
                    info = await probe_source(video, audio, index)
                    limit = asyncio.Semaphore(4)

                    async def clip(i: int) -> None:
                        a = 20.5 + 50 * i
                        out = work / f"job-{i}.mp4"
                        out.unlink(missing_ok=True)
                        async with limit:
                            await Cutter().cut(
                                src, info, a, a + 10, "accurate", out,
                                timeout_s=300, keyframes=index,
                            )  # fmt: skip

                    try:
                        await asyncio.gather(*(clip(i) for i in range(clips)))
                    finally:
                        await index.aclose()

                return lambda: asyncio.run(run())

            for name, n in (("job: 1 accurate clip", 1), ("job: 10 accurate clips", 10)):
                if args.only not in name:
                    continue
                job(n)()
                results[name] = timed(job(n), server, max(3, args.runs // 2))
                print(f"  {name}: {results[name]['median_s']:.3f}s", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(results, notes, args.runs, start, end)


def report(
    results: dict[str, dict[str, float]], notes: dict[str, str], runs: int, start: float, end: float
) -> None:
    """The table (ratios to the floor and to yt-dlp with forced keyframes),
    the targets, and a JSON copy under bench/results/."""
    floor_s = results["floor: ffmpeg -ss … -c copy"]["median_s"]
    forced_r = results.get("yt-dlp … --force-keyframes-at-cuts")
    forced = forced_r["median_s"] if forced_r else None
    print(f"\n10 s clip at {start}-{end}s of a 10-min 720p30 H.264 source, {runs} runs, "
          f"{os.cpu_count()} cores\n")  # fmt: skip
    print(f"| {'case':<38} | median s | × floor | × yt-dlp forced | MB fetched |")
    print(f"|{'-' * 40}|---------:|--------:|----------------:|-----------:|")
    for name, r in results.items():
        vs_forced = f"{r['median_s'] / forced:15.2f}" if forced else f"{'':15}"
        print(
            f"| {name:<38} | {r['median_s']:8.3f} | {r['median_s'] / floor_s:7.2f} "
            f"| {vs_forced} | {r['bytes'] / 1e6:10.1f} |"
        )
    summary: dict[str, float] = {}
    one, ten = results.get("job: 1 accurate clip"), results.get("job: 10 accurate clips")
    if one and ten:
        summary["ten_vs_one"] = ten["median_s"] / one["median_s"]
        print(f"\njob of 10 clips / job of 1 clip: {summary['ten_vs_one']:.2f}× (target ≤ 4×)")
        print(f"job of 10 clips / 10 jobs of 1 clip in turn: "
              f"{ten['median_s'] / (10 * one['median_s']):.2f}")  # fmt: skip
    for name, key, target in (
        ("clipservice accurate", "accurate_vs_floor", 2.0),
        ("clipservice fast", "fast_vs_floor", 1.3),
    ):
        if name in results:
            summary[key] = results[name]["median_s"] / floor_s
            print(f"{name} / floor: {summary[key]:.2f}× (target ≤ {target}×)")
    if forced and "clipservice accurate" in results:
        summary["accurate_vs_forced"] = results["clipservice accurate"]["median_s"] / forced
        print(f"clipservice accurate / yt-dlp forced: {summary['accurate_vs_forced']:.2f}× "
              "(target ≤ 0.25×)")  # fmt: skip
    for mode, note in notes.items():
        print(f"note ({mode}): {note}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_cut-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps({"clip": CLIP, "runs": runs, "results": results,
                               "summary": summary, "notes": notes}, indent=2))  # fmt: skip
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
