"""Benchmark of the output options: each one beside the FFmpeg command a user would write.

For each output option (a 9:16 crop, blur and a 1:1 pad at platform sizes,
burned and soft captions, m4a, mp3, GIF, animated WebP, a jpg thumbnail, and
reels of three clips joined by copy or with crossfades) the same 10 s cut
(30.5-40.5 s) is made by the service (``Cutter.cut`` with the options, from a
fresh index of the source, as a one-clip job does) and by the plain FFmpeg
command line a user would type for it (input seeking on the same two URLs,
FFmpeg's defaults: libx264 ``medium``/CRF 23, the well-known palette recipe
for GIF...), side by side in one run, alternating, on 720p and 1080p DASH
fMP4 sources (H.264 + AAC, ``tests/media_shapes.py``) served at loopback
speed by ``bench/media_server.py``. Both sides' FFmpeg runs alike: its own
session, nice 10 for the process and its autogroup (as the service runs it).

Columns: seconds per 10 s of output (median wall time; a thumbnail is one
image, a reel 30 s of output), the user command's, their ratio, the target
"no slower than that command" (met: ratio <= 1.00; "~" within 5 %, timing
noise on a shared machine; NOT met above), CPU seconds of each side, and
megabytes fetched from the server and written. Results go to
``bench/results/bench_outputs-<time>.json``.

    .venv/bin/python -m bench.bench_outputs [--runs 3] [--only TEXT] [--sizes 720p,1080p]

Sources are made once and cached under ``bench/.cache/shapes`` (the 720p
3-minute one is the cut benchmark's; the 1080p one is 1 minute: ~2 min to
make at nice 10 on the shared 2 cores).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_cut import CpuSnapshot
from bench.media_server import MediaServer
from clipservice.domain import Captions, CutMode, OutputOptions, StreamUrls
from clipservice.media import joinproc
from clipservice.media.captions import cut_cues, parse_captions, to_srt
from clipservice.media.cutter import CutSpec, Cutter
from clipservice.media.ffmpeg import _child_setup, bundled_ffmpeg
from clipservice.media.probe import probe_source
from clipservice.media.render import extension, merge_clips
from clipservice.media.source import SourceIndex
from tests.media_shapes import Shape, make_long_source

HERE = Path(__file__).parent
RESULTS = HERE / "results"
SHAPES_DIR = HERE / ".cache" / "shapes"
SOURCES = {"720p": ("dash_fmp4", 3.0, "1280x720"), "1080p": ("dash_fmp4", 1.0, "1920x1080")}
CLIP = (30.5, 40.5)
THUMB_AT = 35.25
REEL = ((5.5, 15.5), (30.5, 40.5), (45.5, 55.5))
CROSSFADE_S = 0.5
TIMEOUT_S = 900.0
NICE = 10
# A caption every 2 s over the whole source: "cue N" shown for 1.5 s.
VTT = "WEBVTT\n\n" + "\n".join(
    f"00:{t // 60:02d}:{t % 60:02d}.000 --> 00:{t // 60:02d}:{t % 60:02d}.500\ncue {t}\n"
    for t in range(0, 180, 2)
)


def _source(name: str, minutes: float, size: str) -> Shape:
    """The cached source, made first if needed (in a child process at nice 10)."""
    code = (
        f"import os; os.nice({NICE}); from pathlib import Path;"
        "from tests.media_shapes import make_long_source as m;"
        f"m(Path({str(SHAPES_DIR)!r}), {name!r}, {minutes!r}, size={size!r})"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], cwd=HERE.parent, check=True)
    took = time.monotonic() - t0
    if took > 5:
        print(f"made {name} {size} {minutes:g} min in {took:.0f}s", file=sys.stderr)
    return make_long_source(SHAPES_DIR, name, minutes, size=size)


def _run_ffmpeg(args: list[str]) -> None:
    """The user's command, set up as the service sets up its FFmpeg: its own
    session, nice 10 for the process and its autogroup (without that, on a
    shared machine the two sides would not compete for the cores alike)."""
    cmd = [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(
        cmd,
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
        start_new_session=True,
        preexec_fn=_child_setup,
    )


@dataclass
class Setup:
    """One source as both sides see it, and the files the cases share."""

    label: str
    video: str
    audio: str
    work: Path
    srt: Path  # the clip's captions, already shifted: what a user would hand FFmpeg
    reel: list[Path] = field(default_factory=list)  # three cut clips, for the reel cases


@dataclass(frozen=True)
class Option:
    """One output option: the service's way and the user's command."""

    name: str
    options: OutputOptions | None  # None: a reel (merge_clips)
    user: Callable[[Setup, Path], list[str]]
    ext: str
    output_s: float | None = 10.0  # seconds of output (None: one image)
    crossfade_s: float = 0.0
    # The service's cut mode ("fast" where the user's command copies from the
    # keyframe before the start, as fast mode does; re-encodes are frame-accurate
    # whatever the mode).
    mode: CutMode = "accurate"


def _inputs(s: Setup) -> list[str]:
    return ["-ss", str(CLIP[0]), "-i", s.video, "-ss", str(CLIP[0]), "-i", s.audio]


def _av(s: Setup) -> list[str]:
    return [*_inputs(s), "-t", str(CLIP[1] - CLIP[0]), "-map", "0:v", "-map", "1:a"]


def _user_reel(crossfade_s: float) -> Callable[[Setup, Path], list[str]]:
    def args(s: Setup, out: Path) -> list[str]:
        if crossfade_s <= 0:
            listing = s.work / "reel.txt"
            listing.write_text("".join(f"file '{p}'\n" for p in s.reel))
            return ["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", str(out)]
        inputs = [a for p in s.reel for a in ("-i", str(p))]
        d = CLIP[1] - CLIP[0]
        graph = (
            f"[0:v][1:v]xfade=transition=fade:duration={crossfade_s}:offset={d - crossfade_s}[v1];"
            f"[v1][2:v]xfade=transition=fade:duration={crossfade_s}"
            f":offset={2 * d - 2 * crossfade_s}[v];"
            f"[0:a][1:a]acrossfade=d={crossfade_s}[a1];[a1][2:a]acrossfade=d={crossfade_s}[a]"
        )
        return [*inputs, "-filter_complex", graph, "-map", "[v]", "-map", "[a]", str(out)]

    return args


BLUR_RECIPE = (
    "[0:v]split[a][b];[a]scale=1080:1920:force_original_aspect_ratio=increase,"
    "crop=1080:1920,boxblur=20:5[bg];[b]scale=1080:-2[fg];[bg][fg]overlay=(W-w)/2:(H-h)/2"
)
GIF_RECIPE = "fps=12,scale=480:-1:flags=lanczos,split[s0][s1];[s0]palettegen[p];[s1][p]paletteuse"

OPTIONS = [
    Option("plain cut, fast (default)", OutputOptions(),
           lambda s, o: [*_av(s), "-c", "copy", str(o)], ".mp4", mode="fast"),
    Option("plain cut, accurate (default)", OutputOptions(),
           lambda s, o: [*_av(s), "-c:v", "libx264", "-c:a", "aac", str(o)], ".mp4"),
    Option("9:16 crop 1080x1920", OutputOptions(aspect="9:16", max_height=1920),
           lambda s, o: [*_av(s), "-vf", "crop=ih*9/16:ih,scale=1080:1920", str(o)], ".mp4"),
    Option("9:16 blur 1080x1920", OutputOptions(aspect="9:16", fit="blur", max_height=1920),
           lambda s, o: [*_inputs(s), "-t", "10", "-filter_complex", BLUR_RECIPE, "-map", "1:a",
                         str(o)], ".mp4"),
    Option("1:1 pad 1080x1080", OutputOptions(aspect="1:1", fit="pad", max_height=1080),
           lambda s, o: [*_av(s), "-vf", "scale=1080:1080:force_original_aspect_ratio=decrease,"
                         "pad=1080:1080:(ow-iw)/2:(oh-ih)/2", str(o)], ".mp4"),
    Option("burned captions", OutputOptions(captions=Captions(text=VTT, mode="burn")),
           lambda s, o: [*_av(s), "-vf", f"subtitles={s.srt}", str(o)], ".mp4"),
    Option("soft captions, fast", OutputOptions(captions=Captions(text=VTT)),
           lambda s, o: [*_inputs(s), "-i", str(s.srt), "-t", "10", "-map", "0:v", "-map", "1:a",
                         "-map", "2", "-c", "copy", "-c:s", "mov_text", str(o)], ".mp4",
           mode="fast"),
    Option("m4a (AAC copied)", OutputOptions(format="m4a"),
           lambda s, o: ["-ss", str(CLIP[0]), "-i", s.audio, "-t", "10", "-c", "copy", str(o)],
           ".m4a"),
    Option("mp3", OutputOptions(format="mp3"),
           lambda s, o: ["-ss", str(CLIP[0]), "-i", s.audio, "-t", "10", "-c:a", "libmp3lame",
                         "-b:a", "192k", str(o)], ".mp3"),
    Option("gif 480 12fps", OutputOptions(format="gif"),
           lambda s, o: ["-ss", str(CLIP[0]), "-t", "10", "-i", s.video, "-vf", GIF_RECIPE, str(o)],
           ".gif"),
    Option("webp 480 12fps", OutputOptions(format="webp"),
           lambda s, o: ["-ss", str(CLIP[0]), "-t", "10", "-i", s.video, "-vf",
                         "fps=12,scale=480:-2", "-c:v", "libwebp_anim", "-loop", "0", str(o)],
           ".webp"),
    Option("jpg thumbnail", OutputOptions(format="jpg", thumbnail_at=THUMB_AT),
           lambda s, o: ["-ss", str(THUMB_AT), "-i", s.video, "-frames:v", "1", "-q:v", "2",
                         str(o)], ".jpg", output_s=None),
    Option("reel 3 clips, copy", None, _user_reel(0.0), ".mp4", output_s=30.0),
    Option(f"reel 3 clips, {CROSSFADE_S:g}s crossfades", None, _user_reel(CROSSFADE_S), ".mp4",
           output_s=30.0 - 2 * CROSSFADE_S, crossfade_s=CROSSFADE_S),
]  # fmt: skip


async def _ours(s: Setup, option: Option, out: Path) -> None:
    if option.options is None:
        await merge_clips(s.reel, out, crossfade_s=option.crossfade_s, timeout_s=TIMEOUT_S)
        return
    index = SourceIndex(s.video, s.audio)
    info = await probe_source(s.video, s.audio, index)
    spec = CutSpec(StreamUrls(s.video, s.audio), info, *CLIP, option.mode, out, TIMEOUT_S,
                   source=index, options=option.options)  # fmt: skip
    await Cutter().cut(spec)


def _run_ours(s: Setup, option: Option, out: Path) -> None:
    asyncio.run(_ours(s, option, out))


async def _cut_reel_clips(s: Setup) -> None:
    index = SourceIndex(s.video, s.audio)
    info = await probe_source(s.video, s.audio, index)
    for i, (start, end) in enumerate(REEL):
        out = s.work / f"reel-{i}.mp4"
        spec = CutSpec(StreamUrls(s.video, s.audio), info, start, end, "accurate", out,
                       TIMEOUT_S, source=index)  # fmt: skip
        await Cutter().cut(spec)
        s.reel.append(out)


@dataclass
class Side:
    """One side's measurements of one case."""

    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)
    fetched: list[int] = field(default_factory=list)
    out_bytes: int = 0
    error: str | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


def _measure(side: Side, server: MediaServer, run: Callable[[], None], out: Path) -> None:
    if side.error is not None:
        return
    out.unlink(missing_ok=True)
    sent = server.bytes_sent
    cpu = CpuSnapshot.now()
    t0 = time.perf_counter()
    try:
        run()
    except Exception as exc:  # a failing side is a row of the table, not the end of the run
        detail = getattr(exc, "stderr", b"") or b""
        side.error = f"{type(exc).__name__}: {exc} {detail[-300:]!r}"[:500]
        return
    side.times_s.append(time.perf_counter() - t0)
    side.cpu_s.append(CpuSnapshot.now().used_since(cpu))
    side.fetched.append(server.bytes_sent - sent)
    side.out_bytes = out.stat().st_size


def _per_10s(seconds: float | None, option: Option) -> float | None:
    if seconds is None:
        return None
    return seconds * 10 / option.output_s if option.output_s else seconds


def _verdict(ratio: float | None) -> str:
    if ratio is None:
        return "n/a"
    return "met" if ratio <= 1.0 else "~met" if ratio <= 1.05 else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="", help="run the options whose name holds this")
    parser.add_argument("--sizes", default="720p,1080p")
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    options = [o for o in OPTIONS if args.only.lower() in o.name.lower()]
    joinproc.POOL.warm(1)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    started = time.strftime("%Y%m%dT%H%M%S")
    with MediaServer(SHAPES_DIR, throttle_mb_s=8) as server, tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            name, minutes, frame = SOURCES[size]
            shape = _source(name, minutes, frame)
            work = Path(tmp) / size
            work.mkdir()
            srt = work / "clip.srt"
            srt.write_text(to_srt(cut_cues(parse_captions(VTT), *CLIP)))
            setup = Setup(
                f"{name} {size}",
                server.url(shape.files["video"], throttled=False),
                server.url(shape.files["audio"], throttled=False),
                work,
                srt,
            )
            if any(o.options is None for o in options):
                asyncio.run(_cut_reel_clips(setup))
            asyncio.run(_ours(setup, OPTIONS[0], work / "warm.mp4"))  # join process, caches
            for option in options:
                ours, user = Side(), Side()
                mine, theirs = work / f"ours{option.ext}", work / f"user{option.ext}"
                if option.options is not None:
                    mine = work / f"ours{extension(option.options)}"
                for _ in range(args.runs):
                    _measure(ours, server, functools.partial(_run_ours, setup, option, mine), mine)
                    cmd = option.user(setup, theirs)
                    _measure(user, server, functools.partial(_run_ffmpeg, cmd), theirs)
                row = _row(setup.label, option, ours, user)
                rows.append(row)
                _print_row(row, header=len(rows) == 1)
    document = {
        "started": started,
        "runs": args.runs,
        "clip": CLIP,
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "note": "seconds per 10 s of output; both sides at nice 10; loopback at full speed",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_outputs-{started}.json"
    out.write_text(json.dumps(document, indent=2))
    print(f"\nload average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; results: {out}")


def _row(label: str, option: Option, ours: Side, user: Side) -> dict[str, Any]:
    mine, theirs = _per_10s(ours.median_s, option), _per_10s(user.median_s, option)
    ratio = mine / theirs if mine is not None and theirs else None
    return {
        "source": label,
        "option": option.name,
        "unit": "s per image" if option.output_s is None else "s per 10 s of output",
        "ours_s": mine,
        "user_s": theirs,
        "ratio": ratio,
        "target": _verdict(ratio),
        "ours_cpu_s": statistics.median(ours.cpu_s) if ours.cpu_s else None,
        "user_cpu_s": statistics.median(user.cpu_s) if user.cpu_s else None,
        "ours_fetched_mb": statistics.median(ours.fetched) / 1e6 if ours.fetched else None,
        "user_fetched_mb": statistics.median(user.fetched) / 1e6 if user.fetched else None,
        "ours_out_mb": ours.out_bytes / 1e6,
        "user_out_mb": user.out_bytes / 1e6,
        "ours_times_s": ours.times_s,
        "user_times_s": user.times_s,
        "ours_error": ours.error,
        "user_error": user.error,
    }


def _fmt(value: float | None, spec: str = "6.2f") -> str:
    return format(value, spec) if value is not None else "  -   "


def _print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        print(
            f"{'source':<16} {'option':<30} {'ours':>6} {'user':>6} {'ratio':>6} {'target':<8}"
            f" {'cpu ours/user':>14} {'MB fetched o/u':>15} {'MB out o/u':>12}"
        )
    print(
        f"{row['source']:<16} {row['option']:<30} {_fmt(row['ours_s'])} {_fmt(row['user_s'])}"
        f" {_fmt(row['ratio'])} {row['target']:<8}"
        f" {_fmt(row['ours_cpu_s'], '6.1f')}/{_fmt(row['user_cpu_s'], '<6.1f')}"
        f" {_fmt(row['ours_fetched_mb'], '7.2f')}/{_fmt(row['user_fetched_mb'], '<7.2f')}"
        f" {_fmt(row['ours_out_mb'], '5.2f')}/{_fmt(row['user_out_mb'], '<5.2f')}",
        flush=True,
    )
    for side in ("ours", "user"):
        if row[f"{side}_error"]:
            print(f"    {side} failed: {row[f'{side}_error']}", flush=True)


if __name__ == "__main__":
    main()
