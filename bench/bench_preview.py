"""Benchmark of storyboards: an hour-long source's thumbnails, keyframes read with Range.

Each source is served by the loopback media server (``bench/media_server.py``,
its own process, which counts the bytes and requests it answers). Cases, in
the same run:

- ``storyboard``: :func:`clipservice.media.storyboard.build_storyboard` on the
  stream URL (index read included): 100 thumbnails 160 px wide, 10 a row;
- ``ffmpeg keyframes``: the usual one-liner, ``ffmpeg -skip_frame nokey -i URL
  -vf fps=…,scale=160:-2,tile=10x10 -frames:v 1 sprite.jpg``: it decodes only
  keyframes but reads the whole file;
- ``ffmpeg -ss per thumb``: one ``ffmpeg -ss T -i URL -frames:v 1`` per
  thumbnail (4 at a time; no tiling), each reading the index again. Slow:
  one run only, and only with ``--seek-baseline``.

Sources (``tests/media_shapes.make_long_source``, cached under
``bench/.cache/shapes``, generated at nice 10 on first use): 60 minutes of
progressive MP4 and of DASH fMP4 at 640x360 (YouTube's muxed preview stream,
itag 18, is 360p progressive H.264) and at 160x90 (the cut benchmark's
long sources), and 10 minutes of WebM VP9 at 256x144 (an hour of two-pass
VP9 costs ~15 min of CPU to make). Generating the 360p hours costs ~5 min of
CPU each.

Columns: median wall time of ``--runs`` runs (after a warm-up), its ratio to
the storyboard's, CPU seconds (this process for the storyboard, the reaped
FFmpeg children for the baselines), megabytes and requests the server
answered. Results are printed and written to ``bench/results/``.

    .venv/bin/python -m bench.bench_preview [--runs 3] [--only TEXT] [--seek-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.media_server import MediaServer
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.storyboard import build_storyboard
from tests.media_shapes import make_long_source

HERE = Path(__file__).parent
SHAPES_DIR = HERE / ".cache" / "shapes"
RESULTS = HERE / "results"
THUMBS = 100
THUMB_WIDTH = 160
COLUMNS = 10
SEEK_PARALLEL = 4
SUBPROCESS_TIMEOUT_S = 900.0
# (shape, minutes, size): the sources, in table order.
SOURCES = (
    ("progressive", 60.0, "640x360"),
    ("dash_fmp4", 60.0, "640x360"),
    ("progressive", 60.0, "160x90"),
    ("dash_fmp4", 60.0, "160x90"),
    ("webm_vp9", 10.0, "256x144"),
)
STORYBOARD = "storyboard"
KEYFRAMES = "ffmpeg keyframes (whole file)"
SEEKS = f"ffmpeg -ss per thumb (x{THUMBS}, {SEEK_PARALLEL} at a time)"


@dataclass
class Source:
    label: str
    video: Path
    duration_s: float

    @property
    def size_mb(self) -> float:
        return self.video.stat().st_size / 1e6


@dataclass
class Outcome:
    """One case's runs."""

    source: str
    case: str
    wall_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    mb: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    error: str | None = None
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.wall_s)

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "case": self.case,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "mb_served": self.mb,
            "requests": self.requests,
            "error": self.error,
            "note": self.note,
        }


def _label(name: str, minutes: float, size: str) -> str:
    return f"{name} {size.split('x')[1]}p {minutes:g}min"


def _source(name: str, minutes: float, size: str, *, generate: bool) -> Source | None:
    """The cached source, made first (in a child at nice 10) when ``generate``."""
    stem = f"long-{name}-{minutes:g}min-{size}"
    if not (SHAPES_DIR / f"{stem}.json").exists():
        if not generate:
            return None
        code = (
            "import os; from pathlib import Path; os.nice(10);"
            "from tests.media_shapes import make_long_source as m;"
            f"m(Path({str(SHAPES_DIR)!r}), {name!r}, {minutes!r}, size={size!r})"
        )
        print(f"generating {stem} (nice 10)…", file=sys.stderr)
        subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, check=True)
    shape = make_long_source(SHAPES_DIR, name, minutes, size=size)  # cached by now
    return Source(_label(name, minutes, size), shape.files["video"], shape.duration_s)


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _measure(
    outcome: Outcome, server: MediaServer, run: Callable[[], str], *, runs: int, warmup: bool
) -> None:
    for i in range(runs + int(warmup)):
        sent, asked = server.bytes_sent, server.requests
        cpu_self, cpu_kids = _cpu()
        t0 = time.monotonic()
        try:
            note = run()
        except Exception as exc:  # a failed case is a row, not the end of the run
            outcome.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            return
        wall = time.monotonic() - t0
        after_self, after_kids = _cpu()
        if warmup and i == 0:
            continue
        outcome.wall_s.append(round(wall, 4))
        outcome.cpu_s.append(round(after_self - cpu_self + after_kids - cpu_kids, 3))
        outcome.mb.append(round((server.bytes_sent - sent) / 1e6, 3))
        outcome.requests.append(server.requests - asked)
        outcome.note = note


def _storyboard(url: str) -> Callable[[], str]:
    def run() -> str:
        board = asyncio.run(
            build_storyboard(url, count=THUMBS, thumb_width=THUMB_WIDTH, columns=COLUMNS)
        )
        return (
            f"{board.width}x{board.height}, {len(board.sprite) // 1000} kB JPEG, "
            f"{board.keyframes} keyframes of {board.keyframe_bytes / 1e6:.2f} MB"
        )

    return run


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        [bundled_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
        check=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )


def _keyframes(url: str, duration_s: float, work: Path) -> Callable[[], str]:
    out = work / "keyframes.jpg"
    interval = duration_s / THUMBS
    vf = f"fps=1/{interval:g},scale={THUMB_WIDTH}:-2,tile={COLUMNS}x{THUMBS // COLUMNS}"

    def run() -> str:
        _ffmpeg("-skip_frame", "nokey", "-i", url, "-an", "-vf", vf, "-frames:v", "1", str(out))
        return f"{out.stat().st_size // 1000} kB JPEG"

    return run


def _seeks(url: str, duration_s: float, work: Path) -> Callable[[], str]:
    interval = duration_s / THUMBS

    def one(i: int) -> None:
        out = work / f"seek-{i:03d}.jpg"
        _ffmpeg(
            "-ss", f"{i * interval:.3f}", "-i", url, "-an", "-frames:v", "1",
            "-vf", f"scale={THUMB_WIDTH}:-2", str(out),
        )  # fmt: skip

    def run() -> str:
        with ThreadPoolExecutor(SEEK_PARALLEL) as pool:
            list(pool.map(one, range(THUMBS)))
        return f"{THUMBS} JPEGs, not tiled"

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="sources whose label holds this text")
    parser.add_argument(
        "--seek-baseline", action="store_true", help="also one ffmpeg -ss per thumbnail"
    )
    parser.add_argument("--no-generate", action="store_true", help="skip uncached sources")
    args = parser.parse_args()
    os.environ.setdefault("SVT_LOG", "1")
    sources: list[Source] = []
    skipped: list[str] = []
    for name, minutes, size in SOURCES:
        label = _label(name, minutes, size)
        if args.only and args.only not in label:
            continue
        src = _source(name, minutes, size, generate=not args.no_generate)
        if src is None:
            skipped.append(label)
        else:
            sources.append(src)
    outcomes: list[Outcome] = []
    with MediaServer(SHAPES_DIR, throttle_mb_s=8) as server, tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for src in sources:
            url = server.url(src.video, throttled=False)
            cases: list[tuple[str, Callable[[], str], int, bool]] = [
                (STORYBOARD, _storyboard(url), args.runs, True),
                (KEYFRAMES, _keyframes(url, src.duration_s, work), args.runs, False),
            ]
            if args.seek_baseline:
                cases.append((SEEKS, _seeks(url, src.duration_s, work), 1, False))
            for case, run, runs, warmup in cases:
                outcome = Outcome(src.label, case)
                print(f"{src.label} | {case}…", file=sys.stderr, flush=True)
                _measure(outcome, server, run, runs=runs, warmup=warmup)
                outcomes.append(outcome)
    report(sources, outcomes, skipped, args)


def report(
    sources: list[Source], outcomes: list[Outcome], skipped: list[str], args: argparse.Namespace
) -> None:
    by_source: dict[str, dict[str, Outcome]] = {}
    for o in outcomes:
        by_source.setdefault(o.source, {})[o.case] = o
    lines = [
        f"Storyboards of {THUMBS} thumbnails {THUMB_WIDTH} px wide over loopback; "
        f"median of {args.runs} runs (ffmpeg -ss per thumb: 1 run)",
        f"{'source':<28} {'case':<40} {'wall s':>8} {'x sb':>7} {'CPU s':>7} "
        f"{'MB':>8} {'req':>6}  note",
    ]
    for src in sources:
        cases = by_source.get(src.label, {})
        base = cases.get(STORYBOARD)
        base_s = base.median_s if base is not None and base.wall_s else None
        title = f"{src.label} ({src.size_mb:.0f} MB)"
        for case, o in cases.items():
            if o.error is not None or not o.wall_s:
                lines.append(f"{title:<28} {case:<40} failed: {o.error}")
                title = ""
                continue
            ratio = f"{o.median_s / base_s:.1f}" if base_s else "-"
            lines.append(
                f"{title:<28} {case:<40} {o.median_s:>8.2f} {ratio:>7} "
                f"{statistics.median(o.cpu_s):>7.2f} {statistics.median(o.mb):>8.1f} "
                f"{statistics.median(o.requests):>6.0f}  {o.note}"
            )
            title = ""
    if skipped:
        lines.append(f"not cached (run without --no-generate): {', '.join(skipped)}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_preview-{time.strftime('%Y%m%dT%H%M%S')}.json"
    document = {
        "thumbs": THUMBS,
        "thumb_width": THUMB_WIDTH,
        "runs": args.runs,
        "cpu_count": os.cpu_count(),
        "sources": {s.label: {"file": str(s.video), "mb": round(s.size_mb, 1)} for s in sources},
        "results": [o.as_json() for o in outcomes],
        "table": text,
    }
    out.write_text(json.dumps(document, indent=2))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
