"""Benchmark of the cut engine per source shape, mode and network.

A 10 s clip that starts mid-GOP (90.5-100.5 s) from a 3-minute 720p30 source
in each shape YouTube serves (progressive MP4, DASH fMP4, WebM VP9, HEVC MP4,
AV1 fMP4; separate video and audio files, from ``tests/media_shapes.py``), on
a loopback media server at full speed and throttled to 8 MB/s per connection
(``--throttle-mbps``), in each mode, against in the same run: the floor (bare
``ffmpeg -ss … -c copy`` on the two URLs) and yt-dlp ``--download-sections
--force-keyframes-at-cuts`` (given the pair as a DASH manifest, so it cuts the
same two URLs). Then the clip-position case: a clip at 1:00 and one at 58:00
of a 60-minute source.

Columns: median wall time; the ratio to the floor of the same source and
network; CPU s (the clip's CPU-seconds: this process, the join processes and
every child reaped, e.g. FFmpeg or yt-dlp); the CPU bound (CPU s / cores:
the time if every core were busy); the ratio to it; megabytes the server
sent; the cut's note (a fallback to re-encoding shows there). Every figure
is a ratio against a baseline measured in the same run, never a fixed time.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.sources            # generate the sources (once, ~15 min)
    .venv/bin/python -m bench.bench_cut [--runs 3] [--only TEXT] [--skip-naive]

``--only TEXT`` runs the cases whose name ("<source> | <network> | <case>")
holds TEXT, with their floor. The legacy H.264 table (a 10-minute 720p
source: naive download-and-re-encode, yt-dlp with and without forced
keyframes, a job of 10 clips against one) runs only when ``--only`` selects
it, e.g. ``--only legacy``. The sources are cached under ``bench/.cache/``;
results go to ``bench/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.media_server import MediaServer
from bench.sources import (
    CACHE,
    LONG_SHAPES,
    TABLE_SHAPES,
    Source,
    legacy_source,
    long_label,
    long_source,
    table_label,
    table_source,
)
from clipservice.domain import CutMode, StreamUrls
from clipservice.media import joinproc
from clipservice.media.cutter import CutSpec, Cutter
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.probe import probe_source
from clipservice.media.source import SourceIndex

HERE = Path(__file__).parent
RESULTS = HERE / "results"
CLIP_S = 10.0
POSITION_CLIPS = {"@1:00": (60.5, 70.5), "@58:00": (3480.5, 3490.5)}
LEGACY_CLIP = (300.5, 310.5)
LEGACY_LABEL = "legacy h264 720p 10min"
LOOPBACK = "loopback"
FLOOR = "floor: ffmpeg -ss … -c copy"
YTDLP_FORCED = "yt-dlp --force-keyframes-at-cuts"
CUT_TIMEOUT_S = 300.0
SUBPROCESS_TIMEOUT_S = 900.0
CORES = os.cpu_count() or 1
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


# -- CPU accounting ----------------------------------------------------------


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process, from /proc (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # fields from the 3rd (state) on
    return (int(fields[11]) + int(fields[12])) * _TICK_S


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU-seconds used so far: this process, its reaped children, the join pool."""

    self_s: float
    children_s: float
    pool_s: dict[int, float]

    @classmethod
    def now(cls) -> CpuSnapshot:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        pool = {}
        for pid in joinproc.POOL.pids:
            used = _proc_cpu_s(pid)
            if used is not None:
                pool[pid] = used
        return cls(me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime, pool)

    def used_since(self, before: CpuSnapshot) -> float:
        used = self.self_s - before.self_s + self.children_s - before.children_s
        for pid, cpu_s in self.pool_s.items():
            used += cpu_s - before.pool_s.get(pid, 0.0)
        for pid, cpu_s in before.pool_s.items():
            # A join process that ended meanwhile was reaped: its whole life is
            # in the children's figure, of which only the part since is this clip's.
            if pid not in self.pool_s:
                used -= cpu_s
        return used


# -- cases -------------------------------------------------------------------


@dataclass
class Case:
    """One timed way of cutting one clip (or a job) from one source on one network."""

    source: str  # the source's label
    net: str
    what: str
    run: Callable[[], str | None]  # returns the cut's note, if any
    runs: int
    warmup: bool = True

    @property
    def name(self) -> str:
        return f"{self.source} | {self.net} | {self.what}"


@dataclass
class Outcome:
    """What the runs of one case measured (medians), or why it failed."""

    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    note: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"note": self.note, "error": self.error}
        if self.ok:
            out |= {
                "median_s": self.median_s,
                "min_s": min(self.times_s),
                "times_s": self.times_s,
                "cpu_s": self.median_cpu_s,
                "cpu_bound_s": self.median_cpu_s / CORES,
                "bytes": statistics.median(self.bytes),
                "requests": statistics.median(self.requests),
            }
        return out


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        tail = (exc.stderr or b"")[-300:]
        text = tail.decode(errors="replace") if isinstance(tail, bytes) else str(tail)
        return f"exit {exc.returncode}: {text.strip()}"
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}{f' {code}' if code else ''}: {message}"[:400]


def measure(case: Case, server: MediaServer) -> Outcome:
    """Run ``case`` (after a warm-up run, if it has one); a failure ends its runs
    and is recorded, never raised."""
    result = Outcome()
    try:
        if case.warmup:
            case.run()  # imports, join processes, page cache, connections
        for _ in range(case.runs):
            sent, requests = server.bytes_sent, server.requests
            cpu = CpuSnapshot.now()
            t0 = time.perf_counter()
            note = case.run()
            took = time.perf_counter() - t0
            result.cpu_s.append(CpuSnapshot.now().used_since(cpu))
            result.times_s.append(took)
            result.bytes.append(server.bytes_sent - sent)
            result.requests.append(server.requests - requests)
            result.note = note or result.note
    except Exception as exc:  # a failing case is a row of the table, not the end of the run
        result.error = _error_text(exc)
    return result


class Cases:
    """Builds the cases of one source on one network (URLs on the shared server)."""

    def __init__(self, server: MediaServer, work: Path, ytdlp_ok: bool) -> None:
        self.server = server
        self.work = work
        self.ytdlp_ok = ytdlp_ok
        self.ffmpeg = bundled_ffmpeg()
        self._outputs = 0

    def _out(self, suffix: str = ".mp4") -> Path:
        self._outputs += 1
        return self.work / f"out-{self._outputs}{suffix}"

    def urls(self, video: Path, audio: Path | None, *, throttled: bool) -> tuple[str, str | None]:
        v = self.server.url(video, throttled=throttled)
        a = self.server.url(audio, throttled=throttled) if audio is not None else None
        return v, a

    def floor(self, video: str, audio: str | None, start: float, end: float) -> Callable[[], None]:
        out = self._out()
        inputs = ["-ss", str(start), "-i", video]
        maps = ["-map", "0:v"]
        if audio is not None:
            inputs += ["-ss", str(start), "-i", audio]
            maps += ["-map", "1:a"]

        def run() -> None:
            cmd = [
                self.ffmpeg,
                "-v",
                "error",
                "-y",
                *inputs,
                "-t",
                str(end - start),
                *maps,
                "-c",
                "copy",
                str(out),
            ]
            _run(cmd)
            _check_output(out)

        return run

    def service(
        self,
        video: str,
        audio: str | None,
        start: float,
        end: float,
        mode: CutMode,
        cutter: Cutter | None = None,
    ) -> Callable[[], str | None]:
        """What the service does for a job of one clip (but the resolve): index
        the source, probe through the index, cut."""
        out = self._out()

        async def one() -> str | None:
            index = SourceIndex(video, audio)
            try:
                info = await probe_source(video, audio, index)
                out.unlink(missing_ok=True)
                outcome = await (cutter or Cutter()).cut(
                    CutSpec(
                        streams=StreamUrls(video, audio),
                        info=info,
                        start_s=start,
                        end_s=end,
                        mode=mode,
                        final=out,
                        timeout_s=CUT_TIMEOUT_S,
                        source=index,
                    )
                )
            finally:
                await index.aclose()
            return outcome.note

        return lambda: asyncio.run(one())

    def ytdlp(self, url: str, start: float, end: float, *, force: bool) -> Callable[[], None]:
        """yt-dlp's --download-sections on one URL (a DASH manifest of the pair,
        or a muxed file); mp4 out, as clipservice writes."""
        out = self._out()

        def run() -> None:
            if not self.ytdlp_ok:
                raise RuntimeError("yt-dlp is not installed (pip install -e '.[bench]')")
            out.unlink(missing_ok=True)
            cmd = [
                sys.executable,
                "-m",
                "yt_dlp",
                "--quiet",
                "--no-warnings",
                "--no-part",
                "--ffmpeg-location",
                self.ffmpeg,
                "--merge-output-format",
                "mp4",
                "--download-sections",
                f"*{start}-{end}",
                *(["--force-keyframes-at-cuts"] if force else []),
                "-o",
                str(out),
                url,
            ]
            _run(cmd)
            _check_output(out)

        return run

    def naive(self, video: str, audio: str | None, start: float, end: float) -> Callable[[], None]:
        """Download both files whole, then re-encode the cut."""
        local_v, local_a, out = self._out(".v"), self._out(".a"), self._out()

        def run() -> None:
            pairs = [(video, local_v)] + ([(audio, local_a)] if audio else [])
            for url, path in pairs:
                with urllib.request.urlopen(url) as resp, path.open("wb") as fh:
                    shutil.copyfileobj(resp, fh, 1 << 20)
            inputs = ["-ss", str(start), "-i", str(local_v)]
            if audio:
                inputs += ["-ss", str(start), "-i", str(local_a)]
            maps = ["-map", "0:v", *(["-map", "1:a"] if audio else [])]
            encode = ["-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-c:a", "aac"]
            duration = ["-t", str(end - start)]
            _run([self.ffmpeg, "-v", "error", "-y", *inputs, *duration, *maps, *encode, str(out)])

        return run


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)


def _check_output(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        raise RuntimeError(f"no output written to {path.name}")


def _ytdlp_installed() -> bool:
    found = subprocess.run(
        [sys.executable, "-c", "import yt_dlp"], capture_output=True, check=False
    )
    return found.returncode == 0


# -- the run -------------------------------------------------------------------


def shape_cases(b: Cases, src: Source, net: str, throttled: bool, runs: int) -> list[Case]:
    """Floor, fast, accurate, (reencode: loopback only), yt-dlp forced: one shape, one net."""
    video, audio = b.urls(src.video, src.audio, throttled=throttled)
    start, end = table_clip(src)
    cases = [
        Case(src.label, net, FLOOR, b.floor(video, audio, start, end), runs),
        Case(src.label, net, "clipservice fast", b.service(video, audio, start, end, "fast"), runs),
        Case(
            src.label,
            net,
            "clipservice accurate",
            b.service(video, audio, start, end, "accurate"),
            runs,
        ),
    ]
    if not throttled:
        # Slow, and the network barely matters to it: once per shape.
        reencode = b.service(video, audio, start, end, "reencode")
        cases.append(Case(src.label, net, "clipservice reencode", reencode, 1, warmup=False))
    if src.manifest is not None:
        mpd = b.server.url(src.manifest, throttled=throttled)
        forced = b.ytdlp(mpd, start, end, force=True)
        # Re-encodes the whole clip with FFmpeg's default x264 preset: at most 2 runs.
        cases.append(Case(src.label, net, YTDLP_FORCED, forced, min(runs, 2), warmup=False))
    return cases


def table_clip(src: Source) -> tuple[float, float]:
    """10 s from the middle of the source, starting mid-GOP (2 s GOPs) on
    purpose: 90.5-100.5 s of a 3-minute source."""
    start = src.shape.duration_s / 2 + 0.5
    return start, start + CLIP_S


def position_cases(b: Cases, src: Source, net: str, throttled: bool, runs: int) -> list[Case]:
    """An early and a late accurate clip of an hour-long source."""
    video, audio = b.urls(src.video, src.audio, throttled=throttled)
    cases = []
    for label, (start, end) in POSITION_CLIPS.items():
        cut = b.service(video, audio, start, end, "accurate")
        cases.append(Case(src.label, net, f"clipservice accurate {label}", cut, runs))
    return cases


def legacy_cases(b: Cases, runs: int, skip_naive: bool) -> list[Case]:
    """The old H.264 table: one 10-minute source, loopback, every way of cutting."""
    files = legacy_source()
    label = LEGACY_LABEL
    video, audio = b.urls(files["video"], files["audio"], throttled=False)
    muxed = b.server.url(files["muxed"], throttled=False)
    start, end = LEGACY_CLIP

    def job(clips: int) -> Callable[[], str | None]:
        # A job of N clips from one source: one index, one probe, clips under
        # the default limit of 4 at once, one Cutter (its cuts share the cores).
        async def run() -> str | None:
            index = SourceIndex(video, audio)
            cutter = Cutter()
            try:
                info = await probe_source(video, audio, index)
                limit = asyncio.Semaphore(4)

                async def clip(i: int) -> str | None:
                    a = 20.5 + 50 * i
                    out = b.work / f"job-{i}.mp4"
                    out.unlink(missing_ok=True)
                    async with limit:
                        outcome = await cutter.cut(
                            CutSpec(
                                streams=StreamUrls(video, audio),
                                info=info,
                                start_s=a,
                                end_s=a + 10,
                                mode="accurate",
                                final=out,
                                timeout_s=CUT_TIMEOUT_S,
                                source=index,
                            )
                        )
                    return outcome.note

                notes = await asyncio.gather(*(clip(i) for i in range(clips)))
            finally:
                await index.aclose()
            return "; ".join(sorted({n for n in notes if n})) or None

        return lambda: asyncio.run(run())

    cases: list[Case] = []

    def add(what: str, run: Callable[[], str | None], n: int, *, warmup: bool = True) -> None:
        cases.append(Case(label, LOOPBACK, what, run, n, warmup=warmup))

    add(FLOOR, b.floor(video, audio, start, end), runs)
    modes: tuple[CutMode, ...] = ("fast", "accurate", "reencode")
    for mode in modes:
        cut = b.service(video, audio, start, end, mode)
        add(f"clipservice {mode}", cut, runs, warmup=mode != "reencode")
    plain = b.ytdlp(muxed, start, end, force=False)
    add("yt-dlp --download-sections (muxed)", plain, runs, warmup=False)
    add(f"{YTDLP_FORCED} (muxed)", b.ytdlp(muxed, start, end, force=True), runs, warmup=False)
    if not skip_naive:
        naive = b.naive(video, audio, start, end)
        add("naive: download whole, re-encode", naive, runs, warmup=False)
    job_runs = max(3, runs // 2)
    add("job: 1 accurate clip", job(1), job_runs)
    add("job: 10 accurate clips", job(10), job_runs)
    return cases


def select(cases: list[Case], only: str) -> list[Case]:
    """The cases whose name holds ``only``, and the floor of each source and
    network that has one (the ratios need it)."""
    chosen = [c for c in cases if only in c.name]
    groups = {(c.source, c.net) for c in chosen}
    return [c for c in cases if c in chosen or (c.what == FLOOR and (c.source, c.net) in groups)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per case (median)")
    parser.add_argument("--skip-naive", action="store_true", help="legacy table: no naive case")
    parser.add_argument(
        "--only", default="", help="run only the cases whose name holds this text (and the floor)"
    )
    parser.add_argument(
        "--throttle-mbps",
        type=float,
        default=8.0,
        help="the throttled network's rate: megabytes (10^6 bytes) a second per connection",
    )
    args = parser.parse_args()
    throttled_net = f"{args.throttle_mbps:g} MB/s/conn"
    nets = [(LOOPBACK, False), (throttled_net, True)]
    work = Path(tempfile.mkdtemp(prefix="bench-cut-"))
    load_before = os.getloadavg()[0]
    outcomes: dict[str, Outcome] = {}
    ran: list[Case] = []
    sources: dict[str, Source] = {}
    CACHE.mkdir(exist_ok=True)
    try:
        with MediaServer(CACHE, throttle_mb_s=args.throttle_mbps) as server:
            b = Cases(server, work, _ytdlp_installed())
            for prefix, make in plans(b, args, nets, sources):
                if args.only and not _may_match(prefix, args.only):
                    continue
                try:
                    cases = select(make(), args.only)
                except Exception as exc:  # e.g. a source that could not be generated
                    source, net = prefix.split(" | ")
                    failed = Case(source, net, "(making the cases)", lambda: None, 0)
                    outcomes[failed.name] = Outcome(error=_error_text(exc))
                    ran.append(failed)
                    print(f"  {prefix}: FAILED {exc}", file=sys.stderr, flush=True)
                    continue
                joinproc.POOL.warm(1)
                for case in cases:
                    print(f"  {case.name} …", end="", file=sys.stderr, flush=True)
                    outcomes[case.name] = result = measure(case, server)
                    ran.append(case)
                    shown = f"{result.median_s:.3f}s" if result.ok else f"FAILED {result.error}"
                    print(f" {shown}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the table of what ran", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Other work on the machine skews every figure: the table says how busy it was.
    load = (load_before, os.getloadavg()[0])
    report(ran, outcomes, sources, args, throttled_net, load)


def _may_match(prefix: str, only: str) -> bool:
    """Whether a case of the plan named ``prefix`` ("<source> | <network>") can
    hold ``only``, without making the plan's source to find out."""
    return any(only in f"{prefix} | {what}" for what in _ALL_CASES)


_ALL_CASES = (
    FLOOR,
    "clipservice fast",
    "clipservice accurate",
    "clipservice reencode",
    YTDLP_FORCED,
    *(f"clipservice accurate {at}" for at in POSITION_CLIPS),
    "yt-dlp --download-sections (muxed)",
    f"{YTDLP_FORCED} (muxed)",
    "naive: download whole, re-encode",
    "job: 1 accurate clip",
    "job: 10 accurate clips",
)


def plans(
    b: Cases, args: argparse.Namespace, nets: list[tuple[str, bool]], sources: dict[str, Source]
) -> list[tuple[str, Callable[[], list[Case]]]]:
    """("<source> | <network>", a maker of its cases) for every group of the run.

    The makers generate their source on first use: a filter that selects
    none of a source's cases never makes it.
    """

    def shape(name: str, net: str, throttled: bool) -> Callable[[], list[Case]]:
        def make() -> list[Case]:
            src = table_source(name)
            sources[src.label] = src
            return shape_cases(b, src, net, throttled, args.runs)

        return make

    def position(name: str, net: str, throttled: bool) -> Callable[[], list[Case]]:
        def make() -> list[Case]:
            src = long_source(name)
            sources[src.label] = src
            return position_cases(b, src, net, throttled, args.runs)

        return make

    out = [
        (f"{table_label(name)} | {net}", shape(name, net, throttled))
        for name in TABLE_SHAPES
        for net, throttled in nets
    ]
    out += [
        (f"{long_label(name)} | {net}", position(name, net, throttled))
        for name in LONG_SHAPES
        for net, throttled in nets
    ]
    if args.only:  # the legacy table runs only when asked for
        legacy = f"{LEGACY_LABEL} | {LOOPBACK}"
        out.append((legacy, lambda: legacy_cases(b, args.runs, args.skip_naive)))
    return out


# -- the report ------------------------------------------------------------------


@dataclass
class Target:
    """One of the product owner's targets, checked against this run's ratios."""

    what: str
    ratio: float | None  # None: not measured in this run
    limit: float

    @property
    def status(self) -> str:
        if self.ratio is None:
            return "not measured"
        return "met" if self.ratio <= self.limit else "NOT met"


def _ratio(
    outcomes: dict[str, Outcome], num: str, den: str, *, cpu_bound: bool = False
) -> float | None:
    a, b = outcomes.get(num), outcomes.get(den)
    if a is None or b is None or not a.ok or not b.ok:
        return None
    base = b.median_cpu_s / CORES if cpu_bound else b.median_s
    return a.median_s / base if base > 0 else None


def targets(outcomes: dict[str, Outcome], throttled_net: str) -> list[Target]:
    out = []
    for shape in ("dash_fmp4", "progressive"):
        label = f"{table_label(shape)} | {throttled_net}"
        floor = f"{label} | {FLOOR}"
        out.append(
            Target(
                f"{label}: accurate / floor",
                _ratio(outcomes, f"{label} | clipservice accurate", floor),
                1.2,
            )
        )
        out.append(
            Target(
                f"{label}: fast / floor",
                _ratio(outcomes, f"{label} | clipservice fast", floor),
                1.0,
            )
        )
    label = f"{table_label('hevc_mp4')} | {throttled_net}"
    out.append(
        Target(
            f"{label}: accurate / floor",
            _ratio(outcomes, f"{label} | clipservice accurate", f"{label} | {FLOOR}"),
            1.5,
        )
    )
    for shape in LONG_SHAPES:
        for net in (throttled_net, LOOPBACK):
            label = f"{long_label(shape)} | {net}"
            out.append(
                Target(
                    f"{label}: clip @58:00 / clip @1:00",
                    _ratio(
                        outcomes,
                        f"{label} | clipservice accurate @58:00",
                        f"{label} | clipservice accurate @1:00",
                    ),
                    1.2,
                )
            )
    for shape in TABLE_SHAPES:
        name = f"{table_label(shape)} | {LOOPBACK} | clipservice accurate"
        out.append(
            Target(
                f"{table_label(shape)} | {LOOPBACK}: accurate / its CPU bound",
                _ratio(outcomes, name, name, cpu_bound=True),
                1.3,
            )
        )
    return out


def report(
    ran: list[Case],
    outcomes: dict[str, Outcome],
    sources: dict[str, Source],
    args: argparse.Namespace,
    throttled_net: str,
    load: tuple[float, float],
) -> None:
    """The table (per source and network, the floor first), the targets, and
    a JSON copy under bench/results/."""
    print(
        f"\n10 s clips starting mid-GOP, median of {args.runs} runs "
        f"(yt-dlp forced: ≤ 2, reencode: 1), {CORES} cores, throttled = "
        f"{args.throttle_mbps:g} MB/s per connection; CPU bound = CPU s / {CORES} cores; "
        f"1-min load average {load[0]:.1f} at the start, {load[1]:.1f} at the end"
    )
    clips = {label: _clips_text(src) for label, src in sources.items()}
    for label, src in sources.items():
        cost = f"{src.generate_s:.0f} s" if src.generate_s is not None else "not recorded"
        audio = src.shape.audio_codec or "none"
        print(
            f"  {label}: {src.shape.video_codec} {src.video_mbit_s:.2f} Mbit/s + {audio} "
            f"({src.shape.container}, separate files), clip {clips[label]}; generated in {cost}"
        )
    if any(case.what == YTDLP_FORCED for case in ran):
        print("  yt-dlp is given the pair as a DASH manifest (BaseURL per file): it runs FFmpeg on")
        print(
            "  the same two URLs, re-encoding with FFmpeg's defaults (libx264 medium, AAC) to mp4."
        )
    if any(case.source == LEGACY_LABEL for case in ran):
        print(
            f"  {LEGACY_LABEL}: h264 CRF 23 veryfast + aac 128k (faststart MP4 and m4a; yt-dlp "
            "gets a muxed copy), clip {:g}-{:g} s".format(*LEGACY_CLIP)
        )
    header = (
        f"| {'case':<44} | median s | × floor | CPU s | CPU bound s | × CPU bound "
        f"| MB fetched | note |"
    )
    rule = (
        f"|{'-' * 46}|---------:|--------:|------:|------------:|------------:|-----------:|------|"
    )
    group = None
    for case in ran:
        if (case.source, case.net) != group:
            group = (case.source, case.net)
            print(f"\n{case.source} | {case.net}\n{header}\n{rule}")
        r = outcomes[case.name]
        if not r.ok:
            print(f"| {case.what:<44} | FAILED: {r.error} |")
            continue
        floor_name = f"{case.source} | {case.net} | {FLOOR}"
        vs_floor = _ratio(outcomes, case.name, floor_name)
        cpu_bound = r.median_cpu_s / CORES
        vs_bound = r.median_s / cpu_bound if cpu_bound > 0 else None
        print(
            f"| {case.what:<44} | {r.median_s:8.3f} | {_fmt(vs_floor, 7)} | {r.median_cpu_s:5.2f} "
            f"| {cpu_bound:11.2f} | {_fmt(vs_bound, 11)} "
            f"| {statistics.median(r.bytes) / 1e6:10.1f} | {r.note or ''} |"
        )
    summary: dict[str, Any] = {}
    one = outcomes.get(f"{LEGACY_LABEL} | {LOOPBACK} | job: 1 accurate clip")
    ten = outcomes.get(f"{LEGACY_LABEL} | {LOOPBACK} | job: 10 accurate clips")
    if one and ten and one.ok and ten.ok:
        summary["ten_vs_one"] = ten.median_s / one.median_s
        print(f"\njob of 10 clips / job of 1 clip: {summary['ten_vs_one']:.2f}× (target ≤ 4×)")
    checked = targets(outcomes, throttled_net)
    print("\nTargets (ratios within this run):")
    for t in checked:
        if t.ratio is not None:
            print(f"  {t.status:<8} {t.what}: {t.ratio:.2f}× (target ≤ {t.limit}×)")
    unmeasured = sum(t.ratio is None for t in checked)
    if unmeasured:
        print(f"  ({unmeasured} of {len(checked)} targets not measured in this run)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_cut-{time.strftime('%Y%m%dT%H%M%S')}.json"
    document = {
        "runs": args.runs,
        "cores": CORES,
        "throttle_mb_s_per_connection": args.throttle_mbps,
        "only": args.only,
        "load_average_1min": load,
        "sources": {
            label: {
                "shape": src.shape.name,
                "video_codec": src.shape.video_codec,
                "audio_codec": src.shape.audio_codec,
                "container": src.shape.container,
                "duration_s": src.shape.duration_s,
                "video_mbit_s": src.video_mbit_s,
                "generate_s": src.generate_s,
                "clip": clips[label],
            }
            for label, src in sources.items()
        },
        "results": {c.name: outcomes[c.name].as_json() for c in ran},
        "targets": [
            {"what": t.what, "ratio": t.ratio, "limit": t.limit, "status": t.status}
            for t in checked
        ],
        "summary": summary,
    }
    out.write_text(json.dumps(document, indent=2))
    print(f"\nwritten {out}")


def _clips_text(src: Source) -> str:
    if src.label in {long_label(n) for n in LONG_SHAPES}:
        return ", ".join(f"{a:g}-{b:g} s" for a, b in POSITION_CLIPS.values())
    return "{:g}-{:g} s".format(*table_clip(src))


def _fmt(value: float | None, width: int) -> str:
    return f"{value:{width}.2f}" if value is not None else " " * (width - 1) + "—"


if __name__ == "__main__":
    main()
