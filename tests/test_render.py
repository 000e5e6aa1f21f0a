"""Clips made ready for their destination, checked by content.

The pure parts first (platform sizes, crop regions, filter graphs, which
option sets are refused). Then every option set through ``Cutter.cut`` on a
generated 320x180 source (``testsrc2``: every region and frame differs)
served by the loopback Range server: a crop shows the source's region at the
asked position (pixels compared), pad and blur fill what the frame does not
cover, an audio file has no video and the clip's duration (AAC copied
packet for packet, only audio bytes fetched), a GIF and a WebP have the
asked frame count and size, a thumbnail is the source's frame at the asked
time, soft captions are a mov_text track with shifted cue times on the
unchanged fast cut, burned captions change the caption area at a cue and
nothing else, a reel lasts the sum of its clips and shows them in order.
Then time limits and cancellation leave nothing behind.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import subprocess
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from clipservice.domain import Captions, CutMode, OutputOptions, StreamUrls
from clipservice.errors import ClipFailure
from clipservice.media import ffmpeg, render
from clipservice.media import ffmpeg_args as fa
from clipservice.media.captions import Cue, caption_style
from clipservice.media.cutter import CutOutcome, CutSpec, Cutter
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.join import CutFailed, Guard
from clipservice.media.probe import probe_source, webp_info
from clipservice.media.render import (
    check_options,
    extension,
    merge_clips,
    render_path,
    text_samples,
)
from clipservice.media.source import SourceIndex
from clipservice.sources.guard import UrlGuard
from tests.conftest import MediaServer, Shapes
from tests.media_shapes import Shape

W, H = 320, 180  # the generated sources' frame
CLIP = (4.0, 6.0)  # two seconds, one whole GOP of the source (keyframes every 2 s)
VTT = (
    "WEBVTT\n\n"
    "00:00:01.000 --> 00:00:01.500\nbefore the clip\n\n"
    "00:00:04.000 --> 00:00:05.500\nHello there\n\n"
    "00:00:06.000 --> 00:00:07.000\nSecond <i>cue</i>\n"
)


# -- pure: sizes, regions, graphs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "aspect", "max_height", "size"),
    [
        ((1920, 1080), "9:16", 1920, (1080, 1920)),
        ((1920, 1080), "1:1", 1080, (1080, 1080)),
        ((1920, 1080), "4:5", 1350, (1080, 1350)),
        ((1080, 1920), "16:9", 1080, (1920, 1080)),
        ((320, 180), "9:16", 1920, (1080, 1920)),  # asked: scaled up
        ((1280, 720), "9:16", None, (404, 720)),  # not asked: the region at source size
        ((1280, 720), "1:1", None, (720, 720)),
        ((1080, 1920), "16:9", None, (1080, 608)),
        ((1280, 720), "source", 360, (640, 360)),
        ((1280, 720), "source", None, (1280, 720)),
        ((853, 480), "source", None, (852, 480)),  # odd widths become even
    ],
)
def test_frame_sizes(
    src: tuple[int, int], aspect: Any, max_height: int | None, size: tuple[int, int]
) -> None:
    """Platform sizes at an asked height (9:16 at 1920 is 1080x1920); without one,
    the largest frame of the aspect inside the source; always even."""
    assert fa.frame_size(*src, aspect, max_height) == size


def test_crop_regions_follow_crop_x() -> None:
    """The crop region is the largest of the aspect, at crop_x across (even
    offsets), centred vertically; a tall crop of a wide frame spans its height."""
    ratio = Fraction(9, 16)
    assert fa.crop_region(W, H, ratio, 0.0) == fa.Region(0, 0, 102, 180)
    assert fa.crop_region(W, H, ratio, 1.0) == fa.Region(218, 0, 102, 180)
    assert fa.crop_region(W, H, ratio, 0.5) == fa.Region(108, 0, 102, 180)
    assert fa.crop_region(1080, 1920, Fraction(16, 9), 0.5) == fa.Region(0, 656, 1080, 608)


def test_fitted_frame_is_centred() -> None:
    """pad/blur: the whole frame scaled to fit, centred on even offsets."""
    assert fa.fitted(W, H, 180, 180) == fa.Region(0, 38, 180, 102)
    assert fa.fitted(W, H, 1080, 1920) == fa.Region(0, 656, 1080, 608)
    assert fa.fitted(1080, 1920, 1920, 1080) == fa.Region(656, 0, 608, 1080)


def test_shape_graphs() -> None:
    """Each fit's filter graph, with plain numbers and SAR 1 at the end."""
    g = fa.shape_graph(W, H, 1080, 1920, aspect="9:16", fit="crop", crop_x=0.5)
    assert g == "crop=102:180:108:0,scale=1080:1920,setsar=1"
    g = fa.shape_graph(W, H, 102, 180, aspect="9:16", fit="crop", crop_x=0.0)
    assert g == "crop=102:180:0:0,setsar=1"
    g = fa.shape_graph(W, H, 180, 180, aspect="1:1", fit="pad", crop_x=0.5)
    assert g == "scale=180:102,pad=180:180:0:38:black,setsar=1"
    g = fa.shape_graph(W, H, 1080, 1920, aspect="9:16", fit="blur", crop_x=0.5)
    assert g.startswith("split=2[bgsrc][fgsrc];[bgsrc]scale=427:240,crop=136:240,boxblur=17:2,")
    assert g.endswith("[fgsrc]scale=1080:608[fg];[bg][fg]overlay=0:656,setsar=1")
    assert fa.shape_graph(W, H, W, H, aspect="source", fit="crop", crop_x=0.5) == "setsar=1"


def test_animation_sizes() -> None:
    """A GIF/WebP is 480 wide unless asked, never wider than the frame unasked."""
    assert fa.animation_size(1920, 1080, None) == (480, 270)
    assert fa.animation_size(W, H, None) == (320, 180)
    assert fa.animation_size(1080, 1920, 300) == (300, 534)


def test_merge_graph_offsets() -> None:
    """A crossfaded reel chains xfade at the running offsets (sum minus fades)."""
    parts = [fa.MergePart(f"/c{i}.mp4", d, True) for i, d in enumerate((2.0, 3.0, 4.0))]
    args = fa.merge_args(parts, "/r.mp4", width=W, height=H, fps=Fraction(30), crossfade_s=0.5)
    graph = args[args.index("-filter_complex") + 1]
    assert "xfade=transition=fade:duration=0.5:offset=1.5[vx1]" in graph
    assert "xfade=transition=fade:duration=0.5:offset=4[v]" in graph
    assert graph.count("acrossfade=d=0.5") == 2
    plain = fa.merge_args(parts, "/r.mp4", width=W, height=H, fps=Fraction(30))
    assert "concat=n=3:v=1:a=1[v][a]" in plain[plain.index("-filter_complex") + 1]


@pytest.mark.parametrize(
    ("options", "path", "ext"),
    [
        ({}, "clip", ".mp4"),
        ({"captions": {"text": VTT}}, "soft_captions", ".mp4"),
        ({"captions": {"text": VTT, "mode": "burn"}}, "reencode", ".mp4"),
        ({"aspect": "9:16"}, "reencode", ".mp4"),
        ({"max_height": 720}, "reencode", ".mp4"),
        ({"format": "m4a"}, "audio", ".m4a"),
        ({"format": "mp3"}, "audio", ".mp3"),
        ({"format": "gif"}, "reencode", ".gif"),
        ({"format": "webp"}, "reencode", ".webp"),
        ({"format": "jpg"}, "thumbnail", ".jpg"),
        ({"format": "png", "aspect": "1:1"}, "thumbnail", ".png"),
    ],
)
def test_render_paths(options: dict[str, Any], path: str, ext: str) -> None:
    """Each option set goes down the path the issue asks for (no re-encode where
    none is needed), with its file extension."""
    o = OutputOptions.model_validate(options)
    assert render_path(o) == path
    assert extension(o) == ext


@pytest.mark.parametrize(
    ("options", "fields"),
    [
        ({}, []),
        ({"aspect": "9:16", "fit": "blur", "max_height": 1920}, []),
        ({"format": "gif", "fps": 15, "width": 320, "captions": {"text": VTT, "mode": "burn"}}, []),
        ({"format": "jpg", "thumbnail_at": 12.5, "aspect": "1:1"}, []),
        ({"format": "mp4", "fps": 10}, ["fps"]),
        ({"format": "mp4", "width": 320}, ["width"]),
        ({"format": "gif", "fps": 0}, ["fps"]),
        ({"format": "gif", "fps": 120}, ["fps"]),
        ({"format": "webp", "width": 8}, ["width"]),
        ({"fit": "pad"}, ["fit"]),
        ({"crop_x": 0.2}, ["crop_x"]),
        ({"aspect": "9:16", "fit": "pad", "crop_x": 0.2}, ["crop_x"]),
        ({"max_height": 721}, ["max_height"]),
        ({"max_height": 8}, ["max_height"]),
        ({"format": "m4a", "aspect": "9:16", "max_height": 720}, ["aspect", "max_height"]),
        ({"format": "jpg", "thumbnail_at": 9.0}, ["thumbnail_at"]),
        ({"format": "jpg", "thumbnail_at": 15.0}, ["thumbnail_at"]),  # the clip's end is out
        ({"format": "mp4", "thumbnail_at": 12.0}, ["thumbnail_at"]),
        ({"format": "m4a", "captions": {"text": VTT}}, ["captions"]),
        ({"format": "jpg", "captions": {"text": VTT, "mode": "burn"}}, ["captions"]),
        ({"format": "gif", "captions": {"text": VTT}}, ["captions.mode"]),
        ({"captions": {"mode": "burn"}}, ["captions"]),
        ({"captions": {"text": VTT, "url": "https://example.com/c.vtt"}}, ["captions"]),
        ({"captions": {"url": "file:///etc/passwd"}}, ["captions.url"]),
        ({"captions": {"text": "no cues here"}}, ["captions.text"]),
    ],
)
def test_check_options_names_the_field(options: dict[str, Any], fields: list[str]) -> None:
    """Every bad combination is reported with the field the API's 422 names;
    good ones pass (clip [10, 15))."""
    problems = check_options(OutputOptions.model_validate(options), 10.0, 15.0)
    assert [field for field, _ in problems] == fields
    assert all(message for _, message in problems)


# -- helpers for the content checks -------------------------------------------------------


def luma(frame: Any, size: tuple[int, int] | None = None) -> bytes:
    """The frame's full-range luma (whatever its pixel format: limited or full
    range YUV, RGB, a palette), packed, scaled to ``size`` first if given."""
    w, h = size or (frame.width, frame.height)
    gray = frame.reformat(width=w, height=h, format="gray")
    plane = gray.planes[0]
    data = bytes(plane)
    return b"".join(data[r * plane.line_size : r * plane.line_size + w] for r in range(h))


def max_step(plane: bytes, width: int) -> int:
    """The largest difference between horizontally or vertically adjacent pixels."""
    rows = [plane[i : i + width] for i in range(0, len(plane), width)]
    across = max(abs(r[i] - r[i + 1]) for r in rows for i in range(width - 1))
    down = max(abs(a[i] - b[i]) for a, b in itertools.pairwise(rows) for i in range(width))
    return max(across, down)


def region(plane: bytes, width: int, x: int, y: int, w: int, h: int) -> bytes:
    return b"".join(plane[(y + r) * width + x : (y + r) * width + x + w] for r in range(h))


def mad(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two equal-size planes."""
    assert len(a) == len(b)
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def frames(path: Path) -> list[tuple[float, Any]]:
    """(time from the first frame, frame) of every video frame, in order."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        out = [(float(f.pts * v.time_base), f) for f in c.decode(v)]
    out.sort(key=lambda x: x[0])
    return [(t - out[0][0], f) for t, f in out]


_SOURCES: dict[Path, list[tuple[float, Any]]] = {}


def source_frame(shape: Shape, t: float) -> Any:
    """The source frame shown at ``t`` (the first at or after it)."""
    path = shape.files["video"]
    if path not in _SOURCES:
        _SOURCES[path] = frames(path)
    return next(f for ft, f in _SOURCES[path] if ft >= t - 1e-3)


def frame_at(path: Path, t: float) -> Any:
    return next(f for ft, f in frames(path) if ft >= t - 1e-3)


def urls(media_server: MediaServer, shape: Shape) -> StreamUrls:
    video = media_server.add(shape.files["video"].name, shape.files["video"])
    audio = shape.files.get("audio")
    return StreamUrls(video, media_server.add(audio.name, audio) if audio else None)


def _prepared(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _parts(folder: Path) -> list[str]:
    """Temporary files left in ``folder`` (outputs and side files)."""
    return [p.name for p in folder.iterdir() if ".part-" in p.name]


@dataclass
class Made:
    """A clip made with options: its outcome, file, and the requests its cut sent."""

    outcome: CutOutcome
    path: Path
    requests: list[dict[str, Any]]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.outcome, self.path))


async def make(
    media_server: MediaServer,
    shape: Shape,
    folder: Path,
    options: OutputOptions,
    clip: tuple[float, float] = CLIP,
    *,
    mode: CutMode = "accurate",
    name: str = "clip",
    **spec: Any,
) -> Made:
    """Cut ``clip`` of ``shape`` with ``options`` into ``folder`` (the source's
    index read first, as a job does once: ``requests`` are the cut's own)."""
    src = urls(media_server, shape)
    index = SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, index)
    final = _prepared(folder) / f"{name}{extension(options)}"
    fields: dict[str, Any] = {"timeout_s": 60, "source": index, **spec}
    seen = len(media_server.requests)
    outcome = await Cutter().cut(
        CutSpec(src, info, clip[0], clip[1], mode, final, options=options, **fields)
    )
    assert final.is_file() and outcome.size_bytes == final.stat().st_size
    assert _parts(folder) == []
    return Made(outcome, final, media_server.requests[seen:])


def ffmpeg_errors(path: Path) -> str:
    """What FFmpeg says decoding the picture and sound of ``path`` with -xerror,
    the text track read into ASS (empty: clean)."""
    run = subprocess.run(
        [bundled_ffmpeg(), "-v", "error", "-xerror", "-i", str(path), "-map", "0", "-c:s", "ass",
         "-f", "null", "-"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    return f"rc={run.returncode} {run.stderr}" if run.returncode or run.stderr else ""


def streams(path: Path) -> dict[str, Any]:
    with av.open(str(path)) as c:
        v = c.streams.video[0] if c.streams.video else None
        return {
            "video": v.codec_context.name if v else None,
            "audio": c.streams.audio[0].codec_context.name if c.streams.audio else None,
            "subtitles": [s.codec_context.name for s in c.streams.subtitles],
            "size": (v.codec_context.width, v.codec_context.height) if v else None,
            "sar": v.sample_aspect_ratio if v else None,
            "pix_fmt": v.codec_context.pix_fmt if v else None,
            "duration_s": float(c.duration / av.time_base) if c.duration else None,
        }


@pytest.fixture
def progressive(shapes: Shapes) -> Shape:
    """H.264 (B-frames, 2 s GOPs) and AAC in separate files, 12 s of 320x180."""
    return shapes.get("progressive")


# -- shapes ---------------------------------------------------------------------------------


async def test_crop_shows_the_source_region_at_crop_x(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """9:16 crop at crop_x 0.25 without a height: the 102x180 region at x=54 of
    the source, pixel for pixel, frame-accurate from the start, H.264 yuv420p
    SAR 1 with AAC, and clearly not the region at 0.75."""
    options = OutputOptions(aspect="9:16", crop_x=0.25)
    outcome, out = await make(media_server, progressive, tmp_path, options)
    info = streams(out)
    assert info["size"] == (102, 180) and (outcome.width, outcome.height) == (102, 180)
    assert info["video"] == "h264" and info["audio"] == "aac" and info["pix_fmt"] == "yuv420p"
    assert info["sar"] in (None, Fraction(1, 1))
    assert outcome.actual_start == CLIP[0] and outcome.duration_s == pytest.approx(2.0, abs=0.04)
    right = fa.crop_region(W, H, Fraction(9, 16), 0.25)
    wrong = fa.crop_region(W, H, Fraction(9, 16), 0.75)
    assert right.x == 54
    for t in (0.0, 1.5):
        got = luma(frame_at(out, t))
        src = luma(source_frame(progressive, CLIP[0] + t))
        here = mad(got, region(src, W, right.x, right.y, right.w, right.h))
        there = mad(got, region(src, W, wrong.x, wrong.y, wrong.w, wrong.h))
        assert here < 3 and here < there / 4, (t, here, there)


async def test_platform_size_1080x1920(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """9:16 at max_height 1920 is a real 1080x1920 frame (scaled up, as asked)
    showing the centre region of the source."""
    options = OutputOptions(aspect="9:16", max_height=1920)
    _, out = await make(media_server, progressive, tmp_path, options, (4.0, 4.5))
    assert streams(out)["size"] == (1080, 1920) and streams(out)["sar"] in (None, Fraction(1))
    r = fa.crop_region(W, H, Fraction(9, 16), 0.5)
    got = luma(frame_at(out, 0.0), (r.w, r.h))
    src = luma(source_frame(progressive, 4.0))
    here = mad(got, region(src, W, r.x, r.y, r.w, r.h))
    there = mad(got, region(src, W, 0, 0, r.w, r.h))
    assert here < 6 and here < there / 3, (here, there)


async def test_pad_fills_with_black(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """1:1 pad at 180: the whole source frame scaled to 180x102 in the middle,
    black above and below."""
    options = OutputOptions(aspect="1:1", fit="pad", max_height=180)
    _, out = await make(media_server, progressive, tmp_path, options)
    assert streams(out)["size"] == (180, 180)
    inner = fa.fitted(W, H, 180, 180)
    got = luma(frame_at(out, 0.5))
    # (4 rows kept clear of the frame's edge: the encoder's blocks straddle it.)
    assert max(got[: (inner.y - 4) * 180]) <= 6
    assert max(got[(inner.y + inner.h + 4) * 180 :]) <= 6
    middle = region(got, 180, 0, inner.y, inner.w, inner.h)
    assert mad(middle, luma(source_frame(progressive, 4.5), (inner.w, inner.h))) < 6


async def test_blur_fills_with_a_blurred_copy(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """9:16 blur at 360: the whole frame in the middle, and above and below it a
    bright, smooth picture made from the frame (not black, not sharp)."""
    options = OutputOptions(aspect="9:16", fit="blur", max_height=360)
    _, out = await make(media_server, progressive, tmp_path, options)
    w, h = streams(out)["size"]
    assert (w, h) == (202, 360)
    inner = fa.fitted(W, H, w, h)
    got = luma(frame_at(out, 0.5))
    src = luma(source_frame(progressive, 4.5), (inner.w, inner.h))
    assert mad(region(got, w, 0, inner.y, inner.w, inner.h), src) < 6
    top = got[: (inner.y - 4) * w]
    bottom = got[(inner.y + inner.h + 4) * w :]
    assert max_step(src, inner.w) > 60  # the frame has sharp edges…
    for band in (top, bottom):
        assert sum(band) / len(band) > 40  # filled, not black
        assert max_step(band, w) < 16  # …its blurred copy none


# -- audio ----------------------------------------------------------------------------------


def _packets(path: Path) -> list[tuple[float, bytes]]:
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        return [(float(p.pts * a.time_base), bytes(p)) for p in c.demux(a) if p.size]


async def test_m4a_copies_the_aac_and_reads_only_audio_bytes(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """m4a from an AAC source: no video stream, the clip's exact duration, every
    packet the source's own bytes (copied, not encoded), and of the source
    only the audio around the clip fetched (nothing of the video)."""
    made = await make(media_server, progressive, tmp_path, OutputOptions(format="m4a"), (3.3, 8.1))
    s = streams(made.path)
    assert s["video"] is None and s["audio"] == "aac"
    assert s["duration_s"] == pytest.approx(4.8, abs=0.001)
    assert made.outcome.duration_s == pytest.approx(4.8, abs=0.001)
    assert made.outcome.format == "m4a"
    source = _packets(progressive.files["audio"])
    got = _packets(made.path)
    assert got and all(data in {d for _, d in source} for _, data in got)
    assert {r["name"] for r in made.requests} == {progressive.files["audio"].name}
    window = sum(len(d) for t, d in source if 3.3 - 0.1 <= t < 8.1 + 0.1)
    assert sum(r["bytes"] for r in made.requests) <= window * 1.05


async def test_mp3_and_opus_to_m4a(
    media_server: MediaServer, progressive: Shape, shapes: Shapes, tmp_path: Path
) -> None:
    """mp3 is MP3 of the clip's duration; Opus audio (WebM) becomes an AAC m4a;
    neither has a video stream, and neither reads anything of the video."""
    made = await make(media_server, progressive, tmp_path, OutputOptions(format="mp3"))
    s = streams(made.path)
    assert s["video"] is None and s["audio"] in ("mp3", "mp3float")  # (the decoder's name)
    assert s["duration_s"] == pytest.approx(2.0, abs=0.06)
    assert {r["name"] for r in made.requests} == {progressive.files["audio"].name}
    webm = shapes.get("webm_vp9")
    made = await make(
        media_server, webm, tmp_path, OutputOptions(format="m4a"), (3.5, 6.5), name="opus"
    )
    s = streams(made.path)
    assert (s["video"], s["audio"]) == (None, "aac")
    assert s["duration_s"] == pytest.approx(3.0, abs=0.03)
    assert {r["name"] for r in made.requests} == {webm.files["audio"].name}


def _mono(path: Path) -> tuple[list[float], int]:
    """A file's audio decoded and mixed to one channel of floats, and its rate."""
    samples: list[float] = []
    rate = 0
    resampler: Any = None
    with av.open(str(path)) as c:
        for frame in c.decode(audio=0):
            if resampler is None:
                rate = frame.sample_rate
                resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            for out in resampler.resample(frame):
                samples.extend(array("f", bytes(out.planes[0]))[: out.samples])
    return samples, rate


def beeps(path: Path, window_s: float = 0.005) -> list[float]:
    """When the test tone's beeps start (its 880 Hz beep every second, over a
    440 Hz tone): windows whose zero crossings jump to the beep's rate."""
    x, rate = _mono(path)
    w = int(rate * window_s)
    out, high = [], False
    for i in range(0, len(x) - w, w):
        seg = x[i : i + w]
        crossings = sum(1 for a, b in itertools.pairwise(seg) if (a < 0) != (b < 0))
        now = crossings > 0.75 * 880 * 2 * window_s
        if now and not high:
            out.append(i / rate)
        high = now
    return out


@pytest.mark.parametrize("fmt", ["m4a", "mp3"])
async def test_audio_is_the_clips_audio_to_the_sample(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, fmt: Any
) -> None:
    """An m4a or mp3 of 3.3-5.8 s holds the source's beeps at 4 s and 5 s at
    0.7 s and 1.7 s (within a 5 ms window), lasts 2.5 s, and reads only the
    audio file."""
    made = await make(media_server, progressive, tmp_path, OutputOptions(format=fmt), (3.3, 5.8))
    assert streams(made.path)["video"] is None
    assert made.outcome.duration_s == pytest.approx(2.5, abs=0.06)
    got = beeps(made.path)
    assert len(got) == 2 and got == pytest.approx([0.7, 1.7], abs=0.01), got
    assert {r["name"] for r in made.requests} == {progressive.files["audio"].name}


def _pcm_of(path: Path) -> tuple[bytes, int, int]:
    """A file's audio as PyAV decodes it, interleaved float32: bytes, rate, channels."""
    out = bytearray()
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
        resampler = av.AudioResampler(format="flt", layout=stream.codec_context.layout, rate=rate)
        for frame in c.decode(stream):
            for packed in resampler.resample(frame):
                out += bytes(packed.planes[0])[: packed.samples * 4 * channels]
    return bytes(out), rate, channels


async def test_piped_audio_is_the_exact_clip(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """What the mp3 encoder is fed: the AAC of 3.3-5.8 s decoded and cut to the
    sample, the same audio (bit for bit) as the AAC copy decodes to within its
    edit list, 2.5 s of it exactly."""
    src = urls(media_server, progressive)
    index = SourceIndex(src.video_url, src.audio_url)
    await index.open()
    stream = render._audio_input(index, 3.3, 5.8)
    assert stream is not None
    guard = Guard(time.monotonic() + 60)
    copy = tmp_path / "copy.m4a"
    await asyncio.to_thread(render.copy_aac, stream, 3.3, 5.8, copy, guard)
    expected, rate, channels = _pcm_of(copy)

    read, write = os.pipe()
    pipe = render.PipeEnd(write)
    with os.fdopen(read, "rb") as reader:
        piped, covered = await asyncio.gather(
            asyncio.to_thread(reader.read),
            asyncio.to_thread(
                render.pipe_aac_pcm, stream, 3.3, 5.8, pipe, tmp_path / "spill", guard
            ),
        )
    assert not pipe.claim()  # the writer owned the pipe's end, and closed it
    assert (rate, channels) == (stream.track.sample_rate, stream.track.channels)
    assert len(piped) == round(2.5 * rate) * 4 * channels
    assert covered == pytest.approx((3.3, 5.8), abs=1 / rate)
    # (The copy's last AAC frame is shortened by the edit list, but decodes whole.)
    assert piped == expected[: len(piped)]


async def test_mp3_falls_back_to_the_aac_copy(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, monkeypatch: Any
) -> None:
    """When the audio cannot be piped (here: it fails at once), the mp3 is made from
    the AAC copy, as exact, and nothing of the failed try is left."""
    calls: list[str] = []

    def broken(*args: Any) -> Any:
        calls.append("pipe")
        raise CutFailed("no pipe today")

    monkeypatch.setattr(render, "_pipe_pcm", broken)
    made = await make(media_server, progressive, tmp_path, OutputOptions(format="mp3"), (3.3, 5.8))
    assert calls == ["pipe"]
    assert beeps(made.path) == pytest.approx([0.7, 1.7], abs=0.01)
    assert made.outcome.duration_s == pytest.approx(2.5, abs=0.06)


async def test_mp3_encoder_that_fails_fails_the_clip(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """An encoder that dies before reading its input fails the clip with its own
    message (the writer's broken pipe is not the story), leaves no file, and
    does not hang the writer."""
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\necho 'encoder exploded' >&2\nexit 1\n")
    fake.chmod(0o755)
    src = urls(media_server, progressive)
    index = SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, index)
    final = _prepared(tmp_path / "out") / "clip.mp3"
    spec = CutSpec(src, info, 3.3, 5.8, "accurate", final, 60, source=index,
                   options=OutputOptions(format="mp3"))  # fmt: skip
    with pytest.raises(ClipFailure) as failed:
        await Cutter(ffmpeg_path=str(fake)).cut(spec)
    assert failed.value.code == "ffmpeg_failed" and "encoder exploded" in failed.value.message
    assert list(final.parent.iterdir()) == []


async def test_mp3_cancelled_while_piping_leaves_nothing(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, monkeypatch: Any
) -> None:
    """An mp3 clip cancelled while its encoder waits for audio that does not come
    (the source stalls): the encoder is killed and reaped, the decoding thread
    stops, no file is left."""
    video = media_server.add("mp3-cancel.mp4", progressive.files["video"])
    media_server.add("mp3-cancel.m4a", progressive.files["audio"])
    audio = media_server.url("mp3-cancel.m4a", stall=True)
    index = SourceIndex(video, audio)
    info = await probe_source(video, audio, index)
    final = _prepared(tmp_path / "out") / "clip.mp3"
    spec = CutSpec(StreamUrls(video, audio), info, 8.0, 10.0, "accurate", final, 60,
                   source=index, options=OutputOptions(format="mp3"))  # fmt: skip
    ended: list[BaseException | None] = []
    pipe_pcm = render._pipe_pcm

    def watched(*args: Any) -> Any:
        try:
            result = pipe_pcm(*args)
        except BaseException as exc:
            ended.append(exc)
            raise
        ended.append(None)
        return result

    monkeypatch.setattr(render, "_pipe_pcm", watched)
    task = asyncio.ensure_future(Cutter().cut(spec))
    async with asyncio.timeout(10):
        while not ffmpeg.running_processes:
            await asyncio.sleep(0.02)
    encoder = next(iter(ffmpeg.running_processes))
    await asyncio.sleep(0.2)  # (the thread is waiting for the stalled bytes)
    assert ended == []
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert encoder.returncode is not None and not ffmpeg.running_processes
    assert list(final.parent.iterdir()) == []
    async with asyncio.timeout(10):  # the thread stops at its next check
        while not ended:
            await asyncio.sleep(0.05)
    assert ended[0] is not None  # it gave up; it did not go on to write the clip
    media_server.unstall.set()


# -- animations -----------------------------------------------------------------------------


async def test_gif_frame_count_size_and_content(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A 2 s GIF at 10 fps, 160 wide: 20 frames of 160x90, 2 s long, its first
    frame the source's first frame of the clip (palette and all), the tenth
    the source 1 s later."""
    options = OutputOptions(format="gif", fps=10, width=160)
    outcome, out = await make(media_server, progressive, tmp_path, options)
    got = frames(out)
    assert len(got) == 20 and (got[0][1].width, got[0][1].height) == (160, 90)
    assert outcome.duration_s == pytest.approx(2.0, abs=0.05)
    assert (outcome.width, outcome.height) == (160, 90)
    for i, t in ((0, 0.0), (10, 1.0)):
        frame = luma(got[i][1])
        here = mad(frame, luma(source_frame(progressive, CLIP[0] + t), (160, 90)))
        other = mad(frame, luma(source_frame(progressive, CLIP[0] + t + 0.5), (160, 90)))
        assert here < 10 and here < other / 2, (i, here, other)


async def test_gif_reads_only_the_clip(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """A GIF of 2 s from a 120 s source reads the bytes around the clip, not the
    source to its end (the palette waits for its input's end: the input is
    limited, not the output)."""
    url = media_server.url("long-video.mp4")
    index = SourceIndex(url, None)
    info = await probe_source(url, None, index)
    seen = len(media_server.requests)
    final = _prepared(tmp_path) / "g.gif"
    await Cutter().cut(
        CutSpec(StreamUrls(url), info, 10.0, 12.0, "accurate", final, 60, source=index,
                options=OutputOptions(format="gif", width=160))
    )  # fmt: skip
    with av.open(str(media["long-video"])) as c:
        v = c.streams.video[0]
        around = sum(
            p.size for p in c.demux(v) if p.pts is not None and 8.0 <= p.pts * v.time_base < 14.0
        )
    assert sum(r["bytes"] for r in media_server.requests[seen:]) < 2 * around


async def test_animated_webp(media_server: MediaServer, progressive: Shape, tmp_path: Path) -> None:
    """An animated WebP at 8 fps, 160 wide: 16 frames on a 160x90 canvas lasting
    2 s, its first frame the clip's first."""
    options = OutputOptions(format="webp", fps=8, width=160)
    _, out = await make(media_server, progressive, tmp_path, options)
    info = webp_info(out.read_bytes())
    assert (info.width, info.height) == (160, 90)
    assert len(info.durations_ms) == 16 and sum(info.durations_ms) == pytest.approx(2000, abs=10)
    with av.open(io.BytesIO(info.first_frame), "r", format="webp_pipe") as c:
        first = next(c.decode(video=0))
    assert mad(luma(first), luma(source_frame(progressive, CLIP[0]), (160, 90))) < 6


# -- thumbnails -----------------------------------------------------------------------------


@pytest.mark.parametrize("at", [4.0, 4.1, 4.9, 5.9666])
async def test_thumbnail_frames_anywhere_in_a_gop(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, at: float
) -> None:
    """The keyframe, a frame just after it, one mid-GOP and the GOP's last one
    (decoded from the GOP's pictures up to it, its non-reference ones left
    out) are each the source's frame at that time, not a neighbour."""
    options = OutputOptions(format="png", thumbnail_at=at)
    made = await make(media_server, progressive, tmp_path, options, (4.0, 8.0))
    with av.open(str(made.path)) as c:
        got = luma(next(c.decode(video=0)))
    here = mad(got, luma(source_frame(progressive, at)))
    assert here < 1.5
    for t in (at - 1 / 30, at + 1 / 30):
        assert here < mad(got, luma(source_frame(progressive, t))) / 2


@pytest.mark.parametrize("shape", ["dash_fmp4", "webm_vp9", "hevc_mp4", "av1_fmp4"])
async def test_thumbnail_of_every_source_shape(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, shape: str
) -> None:
    """A mid-GOP thumbnail of each shape YouTube serves is the source's frame."""
    src = shapes.get(shape)
    options = OutputOptions(format="png", thumbnail_at=5.2)
    made = await make(media_server, src, tmp_path, options, (4.0, 8.0))
    with av.open(str(made.path)) as c:
        got = luma(next(c.decode(video=0)))
    here = mad(got, luma(source_frame(src, 5.2)))
    assert here < 1.5
    for t in (5.2 - 1 / 30, 5.2 + 1 / 30):
        assert here < mad(got, luma(source_frame(src, t))) / 2


async def test_thumbnail_is_the_source_frame_from_one_gop(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A jpg at 5.2 s (mid-GOP) is the source's frame at 5.2 s, pixel for pixel
    (not its neighbours), and only that GOP of the video is fetched."""
    options = OutputOptions(format="jpg", thumbnail_at=5.2)
    made = await make(media_server, progressive, tmp_path, options, (4.0, 8.0))
    assert made.outcome.actual_start == pytest.approx(5.2, abs=1e-3)
    assert made.outcome.format == "jpg"
    with av.open(str(made.path)) as c:
        image = next(c.decode(video=0))
    assert (image.width, image.height) == (W, H)
    got = luma(image)
    here = mad(got, luma(source_frame(progressive, 5.2)))
    for t in (5.2 - 1 / 30, 5.2 + 1 / 30):
        assert here < mad(got, luma(source_frame(progressive, t))) / 2
    assert here < 3
    with av.open(str(progressive.files["video"])) as c:
        v = c.streams.video[0]
        gop = sum(
            p.size for p in c.demux(v) if p.pts is not None and 4.0 <= p.pts * v.time_base < 6.1
        )
    assert {r["name"] for r in made.requests} == {progressive.files["video"].name}
    assert sum(r["bytes"] for r in made.requests) <= gop * 1.1


async def test_shaped_png_thumbnail_at_the_clip_start(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A png with 9:16 crop at 640 is 360x640 and shows the centre region of
    the clip's first frame."""
    options = OutputOptions(format="png", aspect="9:16", max_height=640)
    outcome, out = await make(media_server, progressive, tmp_path, options)
    assert outcome.actual_start == pytest.approx(CLIP[0], abs=1e-3)
    with av.open(str(out)) as c:
        image = next(c.decode(video=0))
    assert (image.width, image.height) == (360, 640)
    r = fa.crop_region(W, H, Fraction(9, 16), 0.5)
    src = luma(source_frame(progressive, CLIP[0]))
    assert mad(luma(image, (r.w, r.h)), region(src, W, r.x, r.y, r.w, r.h)) < 6


# -- captions -------------------------------------------------------------------------------


def _cues(path: Path) -> list[tuple[float, float, str]]:
    """(start, duration, text) of a mov_text track's non-empty samples."""
    with av.open(str(path)) as c:
        s = c.streams.subtitles[0]
        out = []
        for p in c.demux(s):
            data = bytes(p)
            size = int.from_bytes(data[:2], "big") if len(data) >= 2 else 0
            if p.pts is not None and size:
                text = data[2 : 2 + size].decode()
                out.append((float(p.pts * s.time_base), float(p.duration * s.time_base), text))
        return out


def _audio_timing(path: Path) -> tuple[Any, ...]:
    with av.open(str(path)) as c:
        a = c.streams.audio[0]
        packets = [bytes(p) for p in c.demux(a) if p.size]
        return a.start_time, float(a.duration * a.time_base), a.frames, packets


def testtext_samples_merge_cues_that_start_together() -> None:
    """mov_text samples: a 16-bit length and UTF-8 text, millisecond times; cues
    starting at the same time are one sample (a track shows one at a time)."""
    cues = [Cue(1.0, 2.0, "b"), Cue(0.0, 0.5, "é"), Cue(1.0, 3.0, "c")]
    assert text_samples(cues) == [(0, 500, b"\x00\x02\xc3\xa9"), (1000, 2000, b"\x00\x03b\nc")]


def _video_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


async def test_soft_captions_on_the_fast_cut(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """Soft captions keep the fast cut (its video packets byte for byte) and add
    a mov_text track whose cues are shifted to the clip's actual start (the
    keyframe at 2 s), cut at its end, the cue before it dropped."""
    plain, plain_out = await make(
        media_server, progressive, tmp_path, OutputOptions(), (3.5, 6.5), mode="fast", name="p"
    )
    options = OutputOptions(captions=Captions(text=VTT))
    outcome, out = await make(
        media_server, progressive, tmp_path, options, (3.5, 6.5), mode="fast", name="s"
    )
    assert plain.actual_start == outcome.actual_start == pytest.approx(2.0, abs=1e-3)
    assert streams(out)["subtitles"] == ["mov_text"]
    assert _video_packets(out) == _video_packets(plain_out)
    assert ffmpeg_errors(out) == ""
    # The audio copied, packet for packet, trimmed alike (the edit list to 2 ms).
    (start, duration, frames, packets), plain_audio = _audio_timing(out), _audio_timing(plain_out)
    assert (start, frames, packets) == (plain_audio[0], *plain_audio[2:])
    assert duration == pytest.approx(plain_audio[1], abs=0.002)
    end = outcome.actual_end - 2.0
    cues = _cues(out)
    assert [text for _, _, text in cues] == ["Hello there", "Second cue"]
    assert cues[0][:2] == pytest.approx((2.0, 1.5), abs=0.002)
    assert cues[1][0] == pytest.approx(4.0, abs=0.002)
    assert cues[1][0] + cues[1][1] == pytest.approx(min(5.0, end), abs=0.002)


@pytest.mark.parametrize(
    ("shape", "mode", "start"),
    [("progressive", "accurate", 3.5), ("dash_fmp4", "fast", 2.0), ("webm_vp9", "accurate", 3.5)],
)
async def test_soft_captions_are_muxed_as_the_join_cuts(
    media_server: MediaServer,
    shapes: Shapes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shape: str,
    mode: CutMode,
    start: float,
) -> None:
    """The join process writes the text track in its one pass (no remux after
    it): same video packets as the plain cut, cues from the clip's first frame."""

    async def no_remux(*_: Any) -> Any:
        raise AssertionError("the soft captions were added by a second pass")

    monkeypatch.setattr(render, "add_soft_captions", no_remux)
    src = shapes.get(shape)
    plain, plain_out = await make(
        media_server, src, tmp_path, OutputOptions(), (start, 6.5), mode=mode, name="p"
    )
    options = OutputOptions(captions=Captions(text=VTT))
    outcome, out = await make(
        media_server, src, tmp_path, options, (start, 6.5), mode=mode, name="s"
    )
    assert outcome.actual_start == pytest.approx(plain.actual_start, abs=1e-3)
    assert outcome.note == plain.note
    assert streams(out)["subtitles"] == ["mov_text"]
    assert _video_packets(out) == _video_packets(plain_out)
    assert ffmpeg_errors(out) == ""
    first = outcome.actual_start
    cues = _cues(out)
    assert [text for _, _, text in cues] == ["Hello there", "Second cue"]
    assert cues[0][0] == pytest.approx(max(0.0, 4.0 - first), abs=0.002)
    assert cues[0][0] + cues[0][1] == pytest.approx(5.5 - first, abs=0.002)
    assert cues[1][0] == pytest.approx(6.0 - first, abs=0.002)
    assert cues[1][0] + cues[1][1] == pytest.approx(outcome.actual_end - first, abs=0.002)


async def test_soft_captions_outside_the_clip_leave_no_track(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """No cue within the clip: no text track, and the note says why."""
    options = OutputOptions(captions=Captions(text=VTT))
    outcome, out = await make(media_server, progressive, tmp_path, options, (8.0, 10.0))
    assert streams(out)["subtitles"] == []
    assert outcome.note == "no caption cue falls within the clip"


async def test_soft_captions_after_a_fallback_are_remuxed(
    media_server: MediaServer,
    progressive: Shape,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cut the join cannot make is re-encoded by FFmpeg; the captions are then
    added by a stream-copy remux, shifted alike."""

    async def unsupported(*_: Any) -> Any:
        raise CutFailed("not this time")

    monkeypatch.setattr(Cutter, "_cut_mode", unsupported)
    options = OutputOptions(captions=Captions(text=VTT))
    outcome, out = await make(media_server, progressive, tmp_path, options, (3.5, 6.5))
    assert outcome.note is not None and "not this time" in outcome.note
    assert streams(out)["subtitles"] == ["mov_text"]
    cues = _cues(out)
    assert [text for _, _, text in cues] == ["Hello there", "Second cue"]
    assert cues[0][0] == pytest.approx(0.5, abs=0.002)


async def test_burned_captions_change_only_the_caption_area(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """Burned captions: at a cue's time the caption area differs from the source
    frame and the rest does not; after the cue nothing differs."""
    options = OutputOptions(captions=Captions(text=VTT, mode="burn"))
    _, out = await make(media_server, progressive, tmp_path, options, (3.5, 6.0))
    assert streams(out)["subtitles"] == [] and streams(out)["size"] == (W, H)
    style = caption_style(W, H)
    top = H - style.margin_v_px - 2 * style.font_px
    caption = (32, top, W - 64, H - style.margin_v_px + style.outline_px - top)
    above = (0, 0, W, top - 4)

    def areas(t: float) -> tuple[float, float]:
        got, src = luma(frame_at(out, t)), luma(source_frame(progressive, 3.5 + t))
        return mad(region(got, W, *caption), region(src, W, *caption)), mad(
            region(got, W, *above), region(src, W, *above)
        )

    in_cue, outside = areas(1.0)  # 4.5 s: "Hello there"
    assert in_cue > 4 and outside < 2.5, (in_cue, outside)
    after, _ = areas(2.2)  # 5.7 s: between the cues
    assert after < 2.5, after


async def test_captions_from_a_url(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """Captions at a URL are fetched through the given guard; without a guard
    allowing loopback the clip fails as captions_invalid and leaves no file."""
    vtt = tmp_path / "c.vtt"
    vtt.write_text(VTT)
    url = media_server.add("c.vtt", vtt)
    options = OutputOptions(captions=Captions(url=url))
    async with UrlGuard(allow_private=True) as guard:
        _, out = await make(
            media_server, progressive, tmp_path / "ok", options, (3.5, 6.5), url_guard=guard
        )
    assert [text for _, _, text in _cues(out)] == ["Hello there", "Second cue"]
    with pytest.raises(ClipFailure) as info:
        await make(media_server, progressive, tmp_path / "refused", options)
    assert info.value.code == "captions_invalid"
    assert list((tmp_path / "refused").iterdir()) == []


# -- reels ----------------------------------------------------------------------------------


async def test_reel_by_stream_copy_is_the_sum_in_order(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """Three fast clips of one source join by stream copy: the reel lasts the
    sum of the clips, and at each clip's offset shows that clip's first frame."""
    clips = []
    for i, clip in enumerate(((0.5, 2.5), (4.2, 6.0), (8.0, 9.5))):
        outcome, path = await make(
            media_server, progressive, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        clips.append((outcome, path))
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips([p for _, p in clips], reel, timeout_s=60)
    assert merged.copied
    total = sum(o.duration_s for o, _ in clips)
    assert merged.duration_s == pytest.approx(total, abs=0.04)
    at = 0.0
    firsts = [luma(frame_at(p, 0.0)) for _, p in clips]
    for i, (outcome, _) in enumerate(clips):
        got = luma(frame_at(reel, at))
        assert mad(got, firsts[i]) < 1
        assert all(mad(got, firsts[j]) > 3 for j in range(3) if j != i)
        at += outcome.duration_s
    assert streams(reel)["audio"] == "aac" and ffmpeg_errors(reel) == ""
    assert _parts(tmp_path) == []
    # One pass: the moov written into the room left for it at the front (the
    # rest a padding free box), not moved there by a second pass over the file.
    boxes = _top_level(reel)
    assert [kind for kind, _ in boxes[:2]] == [b"ftyp", b"moov"]
    assert boxes[2][0] == b"free" and boxes[2][1] > 1024
    assert [kind for kind, _ in boxes].index(b"mdat") > 2
    # The clips as the reel reads them (their moov) and as FFmpeg does (decoding).
    for _, path in clips:
        by_index, decoded = render._describe_clip(path), render._describe_decoded(path)
        assert by_index.header_bytes > 0
        assert by_index.duration_s == pytest.approx(decoded.duration_s, abs=1e-3)
        assert (by_index.width, by_index.height, by_index.fps, by_index.has_audio) == (
            decoded.width,
            decoded.height,
            decoded.fps,
            decoded.has_audio,
        )


def _packets_by_stream(path: Path) -> dict[str, list[tuple[int, int, bytes]]]:
    """(pts, dts, bytes) of every packet of an MP4, by stream kind, in file order."""
    out: dict[str, list[tuple[int, int, bytes]]] = {}
    with av.open(str(path)) as c:
        for p in c.demux():
            if p.dts is not None:
                out.setdefault(p.stream.type, []).append((p.pts, p.dts, bytes(p)))
    return out


async def test_reel_copied_here_is_the_clips_packets_end_to_end(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, monkeypatch: Any
) -> None:
    """A copied reel is made in this process (no FFmpeg started): its packets are
    the clips' own, byte for byte, in order, each clip's shifted as FFmpeg's
    concat shifts them (all its streams by the clips' lengths before it), so
    the first clip keeps its timing (its audio's edit list) and every clip its
    own audio/video sync."""
    paths = []
    for i, clip in enumerate(((0.5, 2.5), (4.2, 6.0), (8.0, 9.5))):
        _, path = await make(
            media_server, progressive, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        paths.append(path)

    async def no_ffmpeg(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("FFmpeg was started for a reel copied by this process")

    monkeypatch.setattr(render, "run_ffmpeg", no_ffmpeg)
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips(paths, reel, timeout_s=60)
    assert merged.copied and _parts(tmp_path) == []
    got = _packets_by_stream(reel)
    offset = Fraction(0)
    expected: dict[str, list[tuple[int, int, bytes]]] = {"video": [], "audio": []}
    for path in paths:
        with av.open(str(path)) as c:
            bases = {st.type: st.time_base for st in c.streams}
            length = Fraction(c.duration, av.time_base)
        for kind, packets in _packets_by_stream(path).items():
            shift = round(offset / bases[kind])
            expected[kind] += [(pts + shift, dts + shift, data) for pts, dts, data in packets]
        offset += length
    assert got == expected
    assert merged.duration_s == pytest.approx(float(offset), abs=0.04)
    assert _audio_timing(reel)[0] == pytest.approx(_audio_timing(paths[0])[0], abs=1e-6)
    assert ffmpeg_errors(reel) == ""
    boxes = _top_level(reel)
    assert [kind for kind, _ in boxes[:3]] == [b"ftyp", b"moov", b"free"]


async def test_reel_copied_here_that_fails_its_check_is_made_by_ffmpeg(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, monkeypatch: Any
) -> None:
    """A reel the copy here made but its check refuses (here: the copy left a
    clip out, so it is too short) is made again by FFmpeg's concat, whole."""
    paths = []
    for i, clip in enumerate(((0.5, 2.5), (4.2, 6.0))):
        _, path = await make(
            media_server, progressive, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        paths.append(path)
    copy_reel = render.copy_reel

    def short(paths: list[Path], *args: Any) -> None:
        copy_reel(paths[:1], *args)

    monkeypatch.setattr(render, "copy_reel", short)
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips(paths, reel, timeout_s=60)
    total = sum(render._describe_clip(p).duration_s for p in paths)
    assert merged.copied and merged.duration_s == pytest.approx(total, abs=0.04)
    assert ffmpeg_errors(reel) == "" and _parts(tmp_path) == []


def _sample_entry(path: Path) -> bytes:
    """The video track's sample entry type (avc1, hvc1, hev1, av01, vp09)."""
    header = path.read_bytes()[:65536]  # (ftyp and moov: the clips are faststart)
    return next(tag for tag in (b"avc1", b"hvc1", b"hev1", b"av01", b"vp09") if tag in header)


@pytest.mark.parametrize(
    ("name", "here"), [("hevc_mp4", True), ("av1_fmp4", True), ("webm_vp9", False)]
)
async def test_reel_copy_keeps_each_codecs_sample_entry(
    media_server: MediaServer,
    shapes: Shapes,
    tmp_path: Path,
    monkeypatch: Any,
    name: str,
    here: bool,
) -> None:
    """HEVC and AV1 clips are copied here too, each keeping its sample entry (an
    HEVC reel stays hvc1, which Apple's players need, not the muxer's default
    hev1); clips whose audio starts with a whole priming frame (AAC encoded from
    WebM's Opus) would overlap at the join: FFmpeg's concat joins those."""
    shape = shapes.get(name)
    paths = []
    for i, clip in enumerate(((2.0, 4.5), (6.0, 8.0))):
        _, path = await make(
            media_server, shape, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        paths.append(path)
    started: list[list[str]] = []
    run_ffmpeg = render.run_ffmpeg

    async def counted(args: list[str], **kwargs: Any) -> None:
        started.append(args)
        await run_ffmpeg(args, **kwargs)

    monkeypatch.setattr(render, "run_ffmpeg", counted)
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips(paths, reel, timeout_s=60)
    assert merged.copied and (started == []) == here
    assert _sample_entry(reel) == _sample_entry(paths[0])
    assert render._describe_clip(reel).signature == render._describe_clip(paths[0]).signature
    assert ffmpeg_errors(reel) == ""


async def test_reel_copy_here_that_fails_is_made_by_ffmpeg(
    media_server: MediaServer, progressive: Shape, tmp_path: Path, monkeypatch: Any
) -> None:
    """Whatever stops the copy here (an error it did not foresee), the reel is
    made by FFmpeg's concat instead, complete, and the failed try leaves nothing."""
    paths = []
    for i, clip in enumerate(((0.5, 2.5), (4.2, 6.0))):
        _, path = await make(
            media_server, progressive, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        paths.append(path)

    def broken(paths: list[Path], out: Path, *args: Any) -> None:
        out.write_bytes(b"half a reel")
        raise ValueError("unforeseen")

    monkeypatch.setattr(render, "copy_reel", broken)
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips(paths, reel, timeout_s=60)
    assert merged.copied and ffmpeg_errors(reel) == ""
    assert _top_level(reel)[1][0] == b"moov"
    assert _parts(tmp_path) == []


async def test_reel_of_captioned_clips_is_copied_by_ffmpeg(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """Clips with a text track are joined by FFmpeg's concat (the copy here joins
    one video and one audio stream only): the reel keeps the captions."""
    options = OutputOptions(captions=Captions(text=VTT))
    paths = []
    for i, clip in enumerate(((3.5, 6.5), (3.5, 6.5))):
        _, path = await make(
            media_server, progressive, tmp_path, options, clip, mode="fast", name=f"s{i}"
        )
        paths.append(path)
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips(paths, reel, timeout_s=60)
    assert merged.copied
    assert streams(reel)["subtitles"] == ["mov_text"] and ffmpeg_errors(reel) == ""
    assert _parts(tmp_path) == []


def _top_level(path: Path) -> list[tuple[bytes, int]]:
    """(kind, size) of each top-level box of an MP4."""
    data, pos, boxes = path.read_bytes(), 0, []
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos : pos + 4], "big")
        boxes.append((data[pos + 4 : pos + 8], size))
        pos += size
    return boxes


async def test_reel_whose_moov_outgrows_its_room_is_made_in_two_passes(
    media_server: MediaServer,
    progressive: Shape,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Too little room for the moov fails FFmpeg's one pass; the reel is made
    again with the moov moved to the front (+faststart), complete."""
    paths = []
    for i, clip in enumerate(((0.5, 2.5), (4.2, 6.0))):
        _, path = await make(
            media_server, progressive, tmp_path, OutputOptions(), clip, mode="fast", name=f"c{i}"
        )
        paths.append(path)
    monkeypatch.setattr(render, "_moov_reserve", lambda clips: 64)
    merged = await merge_clips(paths, tmp_path / "reel.mp4", timeout_s=60)
    assert merged.copied
    boxes = _top_level(tmp_path / "reel.mp4")
    assert [kind for kind, _ in boxes[:2]] == [b"ftyp", b"moov"]
    assert all(size <= 8 for kind, size in boxes if kind == b"free")  # no room left
    assert ffmpeg_errors(tmp_path / "reel.mp4") == ""
    assert _parts(tmp_path) == []


async def test_reel_with_crossfade_and_mixed_shapes(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A crossfaded reel is re-encoded and lasts the sum minus the fades; clips of
    different shapes are fitted to the first one's frame; a crossfade longer
    than a clip is refused."""
    a, pa = await make(media_server, progressive, tmp_path, OutputOptions(), (1.0, 3.0), name="a")
    b, pb = await make(
        media_server, progressive, tmp_path, OutputOptions(aspect="1:1"), (7.0, 9.0), name="b"
    )
    reel = tmp_path / "reel.mp4"
    merged = await merge_clips([pa, pb], reel, crossfade_s=0.5, timeout_s=60)
    assert not merged.copied and (merged.width, merged.height) == (W, H)
    assert merged.duration_s == pytest.approx(a.duration_s + b.duration_s - 0.5, abs=0.07)
    assert mad(luma(frame_at(reel, 0.0)), luma(frame_at(pa, 0.0))) < 3
    # After the fade, b fitted (pillarboxed) in a's frame.
    late = luma(frame_at(reel, merged.duration_s - 0.5))
    inner = fa.fitted(b.width, b.height, W, H)
    assert max(late[: inner.x]) <= 20
    want = luma(frame_at(pb, b.duration_s - 0.5), (inner.w, inner.h))
    assert mad(region(late, W, inner.x, inner.y, inner.w, inner.h), want) < 6
    with pytest.raises(ValueError, match="crossfade"):
        await merge_clips([pa, pb], tmp_path / "bad.mp4", crossfade_s=3.0, timeout_s=60)


# -- progress, limits, reuse ----------------------------------------------------------------


async def test_reencode_reports_progress(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A re-encoding option set reports FFmpeg's progress, up to the clip's length."""
    seen: list[float] = []
    await make(
        media_server, progressive, tmp_path, OutputOptions(aspect="1:1"), on_progress=seen.append
    )
    assert seen and seen == sorted(seen) and seen[-1] == pytest.approx(2.0, abs=0.1)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _no_leftovers_once_released(media_server: MediaServer, folder: Path) -> list[str]:
    media_server.unstall.set()
    for _ in range(200):
        if not _leftovers(folder):
            break
        await asyncio.sleep(0.05)
    return _leftovers(folder)


@pytest.mark.parametrize(
    "options",
    [
        OutputOptions(aspect="9:16"),  # one FFmpeg run
        OutputOptions(format="jpg"),  # a GOP fetched on threads, then FFmpeg
        OutputOptions(format="m4a"),  # AAC copied on a thread
    ],
    ids=["ffmpeg", "thumbnail", "audio"],
)
@pytest.mark.parametrize("how", ["timeout", "cancel"])
async def test_stalled_source_ends_at_the_limit_and_leaves_nothing(
    media_server: MediaServer, tmp_path: Path, options: OutputOptions, how: str
) -> None:
    """A source that stalls mid-read ends the clip at its time limit, or when
    cancelled, with no file (nor side file) left."""
    src = StreamUrls(
        media_server.url("video.mp4", stall=True), media_server.url("audio.m4a", stall=True)
    )
    index = SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, index)
    out_dir = tmp_path / "clips"
    out_dir.mkdir()
    spec = CutSpec(src, info, 20.5, 25.5, "accurate", out_dir / f"c{extension(options)}",
                   timeout_s=3, source=index, options=options)  # fmt: skip
    seen = len(media_server.requests)
    if how == "timeout":
        with pytest.raises(TimeoutError):
            await Cutter().cut(spec)
    else:
        task = asyncio.create_task(Cutter().cut(spec))
        while not any(r["bytes"] == 0 for r in media_server.requests[seen:]):
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await _no_leftovers_once_released(media_server, out_dir) == []


async def test_audio_of_a_silent_source_is_no_audio(
    media_server: MediaServer, tmp_path: Path
) -> None:
    """An m4a of a source without audio fails as no_audio, leaving no file."""
    url = media_server.url("video.mp4")
    index = SourceIndex(url, None)
    info = await probe_source(url, None, index)
    folder = _prepared(tmp_path / "clips")
    with pytest.raises(ClipFailure) as failure:
        await Cutter().cut(
            CutSpec(StreamUrls(url), info, 2.0, 4.0, "accurate", folder / "a.m4a", 60,
                    source=index, options=OutputOptions(format="m4a"))
        )  # fmt: skip
    assert failure.value.code == "no_audio"
    assert _leftovers(folder) == []


def test_webp_reader_refuses_what_is_not_an_animated_webp() -> None:
    """webp_info reads RIFF chunks only as far as they are there: a still WebP,
    a truncated chunk or another file is a ValueError."""
    still = b"RIFF" + (12).to_bytes(4, "little") + b"WEBPVP8 " + (0).to_bytes(4, "little")
    for data in (b"", b"GIF89a....", still, b"RIFF\x00\x00\x00\x00WEBPANMF\xff\xff\x00\x00"):
        with pytest.raises(ValueError):
            webp_info(data)


async def test_existing_outputs_are_described_by_kind(
    media_server: MediaServer, progressive: Shape, tmp_path: Path
) -> None:
    """A complete earlier output with options (reused by the job layer) is
    described from the file: an m4a's duration, a thumbnail's frame."""
    cutter = Cutter()
    m4a = OutputOptions(format="m4a")
    made, out = await make(media_server, progressive, tmp_path, m4a)
    again = await cutter.describe_existing(out, *CLIP, "accurate", m4a)
    assert again.format == "m4a" and again.duration_s == pytest.approx(made.duration_s, abs=0.01)
    jpg = OutputOptions(format="jpg", thumbnail_at=5.0)
    _, out = await make(media_server, progressive, tmp_path, jpg, name="t")
    again = await cutter.describe_existing(out, *CLIP, "accurate", jpg)
    assert (again.actual_start, again.width, again.height) == (5.0, W, H)
