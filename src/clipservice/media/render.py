"""Clips made ready for where they go: shape, format, captions, and reels.

:class:`~clipservice.domain.OutputOptions` say what one clip becomes; the
cutter (:mod:`.cutter`) takes each option set down one of these paths
(:func:`render_path`):

- ``clip``: the default options, today's cut (fast/accurate in a join
  process, or FFmpeg), unchanged;
- ``soft_captions``: that same cut with a mov_text track: muxed by the join
  process as it cuts (:mod:`.movtext`), or, after a cut the join could not
  make, added by a stream copy remux (:func:`add_soft_captions`): no re-encode;
- ``audio``: the audio alone. AAC from an indexed source is copied into the
  m4a from the audio window's own byte ranges (no decode, trimmed to the
  sample by an edit list); MP3 is encoded from that copy; other audio
  (Opus) is encoded by FFmpeg from the audio URL with input seeking;
- ``thumbnail``: one frame. From an indexed source only the GOP holding it
  is fetched, written to a small local file, and FFmpeg decodes it from its
  keyframe and keeps the one frame (then shaped); else FFmpeg seeks in the
  URL;
- ``reencode``: everything else (a new shape, GIF, WebP, burned captions,
  soft captions on a reshaped MP4) is one FFmpeg pass over the source URLs
  with input seeking: frame-accurate, H.264/AAC for MP4, with progress.

:func:`check_options` is the one place that says which option sets are
refused (the API answers 422 with its field names); :func:`merge_clips`
joins a job's clips into a reel.

Every file made on the way is a side file of the clip's temporary output
(its name holds the part marker, so a crash leaves nothing that
``remove_stale_parts`` does not find) and is removed when the clip ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import threading
import time
import uuid
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import av
import structlog

from clipservice.domain import OutputFormat, OutputOptions
from clipservice.errors import ClipFailure
from clipservice.media import ffmpeg_args, movtext
from clipservice.media.bitstream import h264
from clipservice.media.captions import (
    FONTS_DIR,
    MAX_CAPTIONS_BYTES,
    NO_CUES_NOTE,
    CaptionsError,
    Cue,
    cut_cues,
    parse_captions,
    to_ass,
    to_srt,
)
from clipservice.media.containers.base import ContainerError, Sample, Track
from clipservice.media.containers.mp4 import Mp4Index, open_file
from clipservice.media.fetch import Prefetch, RangeFetcher
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.join import CutFailed, Feed, Guard, StreamInput, overlapping
from clipservice.media.probe import OutputInfo, OutputKind, probe_source, validate_media
from clipservice.media.source import SourceIndex

if TYPE_CHECKING:
    from clipservice.media.cutter import CutSpec

log = structlog.get_logger(__name__)

RenderPath = Literal["clip", "soft_captions", "audio", "thumbnail", "reencode"]

EXTENSIONS: dict[OutputFormat, str] = {
    "mp4": ".mp4",
    "m4a": ".m4a",
    "mp3": ".mp3",
    "gif": ".gif",
    "webp": ".webp",
    "jpg": ".jpg",
    "png": ".png",
}
_KINDS: dict[OutputFormat, OutputKind] = {
    "mp4": "video",
    "m4a": "audio",
    "mp3": "audio",
    "gif": "animation",
    "webp": "animation",
    "jpg": "image",
    "png": "image",
}
MAX_FPS = 50.0  # GIF delays are in hundredths of a second: 50 fps is their finest
MIN_SIZE_PX, MAX_WIDTH_PX, MAX_HEIGHT_PX = 16, 1920, 2160
MAX_CROSSFADE_S = 5.0
_AAC_FRAME_S = 1024 / 44100
_THREAD_STOP_S = 5.0


def extension(options: OutputOptions) -> str:
    """The file extension of the output (with its dot)."""
    return EXTENSIONS[options.format]


def output_kind(options: OutputOptions) -> OutputKind:
    return _KINDS[options.format]


def render_path(options: OutputOptions) -> RenderPath:
    """Which way an option set is made (see the module's docstring)."""
    if options.format in ("m4a", "mp3"):
        return "audio"
    if options.format in ("jpg", "png"):
        return "thumbnail"
    if options.format != "mp4" or options.aspect != "source" or options.max_height is not None:
        return "reencode"
    if options.captions is not None:
        return "soft_captions" if options.captions.mode == "soft" else "reencode"
    return "clip"


# -- which option sets are refused -----------------------------------------------------


def check_options(
    options: OutputOptions, clip_start: float, clip_end: float
) -> list[tuple[str, str]]:
    """Every problem with ``options`` for a clip [clip_start, clip_end), as
    (field, message) pairs (dotted fields: ``captions.mode``); empty if they
    can be made. Pure: a captions URL is only checked for its scheme here (it
    is fetched, under the URL guard, when the clip is cut), a captions text
    is parsed."""
    o, given = options, options.model_fields_set
    problems: list[tuple[str, str]] = []
    animated = o.format in ("gif", "webp")
    audio = o.format in ("m4a", "mp3")
    image = o.format in ("jpg", "png")
    if audio:
        for field in ("aspect", "fit", "crop_x", "max_height"):
            if field in given and getattr(o, field) != OutputOptions.model_fields[field].default:
                problems.append((field, f"an audio output ({o.format}) has no picture to shape"))
    else:
        if "fit" in given and o.aspect == "source":
            problems.append(("fit", "fit needs an aspect other than 'source'"))
        if "crop_x" in given and (o.aspect == "source" or o.fit != "crop"):
            problems.append(("crop_x", "crop_x needs fit 'crop' and an aspect other than 'source'"))
    if o.max_height is not None and not audio:
        if not MIN_SIZE_PX <= o.max_height <= MAX_HEIGHT_PX:
            problems.append(
                ("max_height", f"max_height must be between {MIN_SIZE_PX} and {MAX_HEIGHT_PX}")
            )
        elif o.max_height % 2:
            problems.append(("max_height", "max_height must be even"))
    if o.fps is not None:
        if not animated:
            problems.append(("fps", "fps is for gif and webp outputs only"))
        elif not 0 < o.fps <= MAX_FPS:
            problems.append(("fps", f"fps must be above 0 and at most {MAX_FPS:g}"))
    if o.width is not None:
        if not animated:
            problems.append(("width", "width is for gif and webp outputs only"))
        elif not MIN_SIZE_PX <= o.width <= MAX_WIDTH_PX:
            problems.append(("width", f"width must be between {MIN_SIZE_PX} and {MAX_WIDTH_PX}"))
    if o.thumbnail_at is not None:
        if not image:
            problems.append(("thumbnail_at", "thumbnail_at is for jpg and png outputs only"))
        elif not clip_start <= o.thumbnail_at < clip_end:
            problems.append(
                (
                    "thumbnail_at",
                    f"thumbnail_at must be within the clip [{clip_start:g}, {clip_end:g})",
                )
            )
    if o.captions is not None:
        problems += _check_captions(o)
    return problems


def _check_captions(o: OutputOptions) -> list[tuple[str, str]]:
    c = o.captions
    assert c is not None
    if o.format in ("m4a", "mp3", "jpg", "png"):
        return [("captions", f"a {o.format} output cannot carry captions")]
    if c.mode == "soft" and o.format != "mp4":
        return [("captions.mode", "soft captions need an mp4 output; burn them into a gif/webp")]
    if (c.text is None) == (c.url is None):
        return [("captions", "give the captions as text or as url (one of them)")]
    if c.url is not None:
        if not c.url.lower().startswith(("http://", "https://")):
            return [("captions.url", "the captions URL must be http or https")]
        return []
    assert c.text is not None
    if len(c.text.encode()) > MAX_CAPTIONS_BYTES:
        return [("captions.text", f"the captions are larger than {MAX_CAPTIONS_BYTES} bytes")]
    try:
        parse_captions(c.text)
    except CaptionsError as exc:
        return [("captions.text", str(exc))]
    return []


# -- what a render gives back ----------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    """What a path made: where it starts and ends in the source, and its frame."""

    actual_start: float
    actual_end: float
    duration_s: float
    size_bytes: int
    width: int = 0
    height: int = 0
    note: str | None = None


class Budget(Protocol):
    """A clip's time limit (the cutter's)."""

    deadline: float

    def left_s(self) -> float: ...


def side_path(tmp: Path, tag: str) -> Path:
    """A file beside the clip's temporary output, cleaned up with it (and by
    ``remove_stale_parts`` after a crash: the name holds the part marker)."""
    return tmp.with_name(f"{tmp.name}-{uuid.uuid4().hex[:6]}-{tag}")


@contextlib.contextmanager
def _side_files() -> Iterator[list[Path]]:
    files: list[Path] = []
    try:
        yield files
    finally:
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


T = TypeVar("T")


async def _in_thread(fn: Callable[[Guard], T], budget: Budget) -> T:
    """Run ``fn(guard)`` on a thread under the clip's deadline; on timeout or
    cancellation raise the guard's cancel flag and give the thread a moment
    to see it (it stops at its next check), so no file is written after the
    clip has given up."""
    guard = Guard(budget.deadline)
    task = asyncio.ensure_future(asyncio.to_thread(fn, guard))
    try:
        return await asyncio.wait_for(asyncio.shield(task), budget.left_s())
    except BaseException:
        guard.cancel.set()
        await asyncio.wait({task}, timeout=_THREAD_STOP_S)
        if task.done() and not task.cancelled():
            task.exception()  # seen: the clip's own error is the one raised
        raise


def _frame_s(spec: CutSpec) -> float:
    fps = spec.info.video.fps
    return 1.0 / fps if fps else 1 / 30


async def _source_size(spec: CutSpec) -> tuple[int, int]:
    v = spec.info.video
    if v.width and v.height:
        return v.width, v.height
    info = await probe_source(spec.streams.video_url, None)
    if not (info.video.width and info.video.height):
        raise ClipFailure("source_unavailable", "the source's frame size is unknown")
    return info.video.width, info.video.height


async def _open_index(spec: CutSpec, budget: Budget) -> SourceIndex:
    source = spec.source or SourceIndex(spec.streams.video_url, spec.streams.audio_url)
    await asyncio.wait_for(source.open(), budget.left_s())
    return source


async def _ffmpeg(spec: CutSpec, args: list[str], budget: Budget, ffmpeg_path: str) -> None:
    await run_ffmpeg(
        args, timeout_s=budget.left_s(), ffmpeg_path=ffmpeg_path, on_progress=spec.on_progress
    )


def _done(spec: CutSpec, seconds: float) -> None:
    if spec.on_progress is not None:
        spec.on_progress(seconds)


async def render(
    spec: CutSpec, tmp: Path, budget: Budget, cues: list[Cue] | None, *, ffmpeg_path: str = ""
) -> Rendered:
    """Make ``spec``'s clip with its options at ``tmp`` (the audio, thumbnail
    and reencode paths; the cutter makes the others), validated."""
    path = render_path(spec.options)
    with _side_files() as sides:
        if path == "audio":
            return await _audio(spec, tmp, budget, sides, ffmpeg_path)
        if path == "thumbnail":
            return await _thumbnail(spec, tmp, budget, sides, ffmpeg_path)
        if path == "reencode":
            return await _reencode(spec, tmp, budget, cues, sides, ffmpeg_path)
    raise ValueError(f"render() does not make the {path} path")


# -- the one re-encode: shapes, GIF, WebP, burned captions --------------------------------


def _output_size(options: OutputOptions, src_w: int, src_h: int) -> tuple[int, int]:
    size = ffmpeg_args.frame_size(src_w, src_h, options.aspect, options.max_height)
    if options.format in ("gif", "webp"):
        size = ffmpeg_args.animation_size(*size, options.width)
    return size


def video_graph(
    options: OutputOptions,
    src_w: int,
    src_h: int,
    *,
    source_fps: float | None = None,
    ass_path: str | None = None,
) -> tuple[str, tuple[int, int]]:
    """The filter graph of a clip's picture, and the frame it makes: frame
    rate first (GIF/WebP: fewer frames to shape), then the shape, then burned
    captions drawn on the output-size frame, then the GIF palette."""
    o = options
    width, height = _output_size(o, src_w, src_h)
    parts = []
    if o.format in ("gif", "webp"):
        parts.append(f"fps={animation_fps(o, source_fps):g}")
    parts.append(
        ffmpeg_args.shape_graph(
            src_w, src_h, width, height, aspect=o.aspect, fit=o.fit, crop_x=o.crop_x
        )
    )
    if ass_path is not None:
        parts.append(ffmpeg_args.burn_filter(ass_path, str(FONTS_DIR)))
    if o.format == "gif":
        parts.append(ffmpeg_args.gif_palette_graph())
    elif o.format == "mp4":
        parts.append("format=yuv420p")
    return ",".join(parts), (width, height)


def animation_fps(options: OutputOptions, source_fps: float | None) -> float:
    """A GIF's or WebP's frame rate: as asked (default 12), never above the source's."""
    fps = options.fps or ffmpeg_args.ANIMATION_FPS
    return min(fps, source_fps) if source_fps else fps


async def _reencode(
    spec: CutSpec,
    tmp: Path,
    budget: Budget,
    cues: list[Cue] | None,
    sides: list[Path],
    ffmpeg_path: str,
) -> Rendered:
    o = spec.options
    src_w, src_h = await _source_size(spec)
    start, end = spec.start_s, spec.end_s
    size = _output_size(o, src_w, src_h)
    clip_cues = cut_cues(cues, start, end) if cues else []
    note = None
    if o.captions is not None and not clip_cues:
        note = NO_CUES_NOTE
    ass = srt = None
    if clip_cues and o.captions is not None and o.captions.mode == "burn":
        ass = side_path(tmp, "captions.ass")
        sides.append(ass)
        await asyncio.to_thread(ass.write_text, to_ass(clip_cues, *size), "utf-8")
    elif clip_cues:
        srt = side_path(tmp, "captions.srt")
        sides.append(srt)
        await asyncio.to_thread(srt.write_text, to_srt(clip_cues), "utf-8")
    graph, size = video_graph(
        o, src_w, src_h, source_fps=spec.info.video.fps, ass_path=str(ass) if ass else None
    )
    if o.format in ("gif", "webp"):
        fmt: Literal["gif", "webp"] = "gif" if o.format == "gif" else "webp"
        args = ffmpeg_args.animation_args(spec.streams.video_url, start, end, str(tmp), graph, fmt)
        await _ffmpeg(spec, args, budget, ffmpeg_path)
        fps = animation_fps(o, spec.info.video.fps)
        out = await validate_media(tmp, "animation", end - start, tol_s=1.5 / fps + 0.02, size=size)
    else:
        args = ffmpeg_args.mp4_args(
            spec.streams, start, end, str(tmp), graph, subtitles=str(srt) if srt else None
        )
        await _ffmpeg(spec, args, budget, ffmpeg_path)
        out = await validate_media(
            tmp,
            "video",
            end - start,
            tol_s=2 * _frame_s(spec),
            expect_audio=spec.info.audio is not None,
            expect_subtitles=srt is not None,
            size=size,
        )
    duration = out.video_duration_s
    return Rendered(start, start + duration, duration, out.size_bytes, *size, note=note)


# -- soft captions on a cut clip ------------------------------------------------------------


def text_samples(cues: list[Cue]) -> list[tuple[int, int, bytes]]:
    """(start ms, duration ms, sample) of each cue (:func:`.movtext.text_samples`)."""
    return movtext.text_samples((c.start_s, c.end_s, c.text) for c in cues)


def _summary(streams: list[Any]) -> list[tuple[str, int, float]]:
    return [
        (s.type, s.frames, float(s.duration * s.time_base) if s.duration else 0.0) for s in streams
    ]


def _same_streams(a: list[tuple[str, int, float]], b: list[tuple[str, int, float]]) -> bool:
    """Same streams, frames and durations (to 2 ms: the muxer writes the edit
    list that trims the audio again, in the movie's millisecond timescale)."""
    return len(a) == len(b) and all(
        x[:2] == y[:2] and abs(x[2] - y[2]) <= 0.002 for x, y in zip(a, b, strict=True)
    )


def remux_with_cues(clip: Path, cues: list[Cue], out: Path, guard: Guard) -> None:
    """``clip``'s streams copied into ``out`` with a mov_text track of ``cues``
    (times from the clip's first frame), interleaved by time. Blocking: a
    few hundred packets copied, nothing decoded."""
    samples = text_samples(cues)
    with (
        av.open(str(clip)) as ic,
        av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as oc,
    ):
        inputs = [s for s in ic.streams if s.type in ("video", "audio")]
        outs = {s.index: oc.add_stream_from_template(s, opaque=True) for s in inputs}
        text = movtext.add_stream(oc)
        pending = list(reversed(list(movtext.packets(text, samples))))

        def flush_until(ms: float) -> None:
            while pending and pending[-1].pts <= ms:
                oc.mux(pending.pop())

        for n, packet in enumerate(ic.demux(*inputs)):
            if packet.dts is None:
                continue  # the demuxer's end-of-stream marker
            if n % 64 == 0:
                guard.check()
            flush_until(float(packet.dts * packet.time_base) * 1000)
            packet.stream = outs[packet.stream.index]
            oc.mux(packet)
        flush_until(float("inf"))
        before = _summary(inputs)
    # The packets are those of a validated clip: what is left to check is
    # that the muxer wrote them all, and the text track.
    try:
        with av.open(str(out)) as c:
            after = _summary([s for s in c.streams if s.type in ("video", "audio")])
            texts = len(c.streams.subtitles)
    except av.FFmpegError as exc:
        raise ClipFailure("output_invalid", f"the captioned clip does not open: {exc}") from exc
    if not _same_streams(before, after) or texts != 1:
        raise ClipFailure("output_invalid", f"the captioned clip differs: {before} -> {after}")


async def add_soft_captions(
    clip: Path,
    cues: list[Cue],
    actual_start: float,
    actual_end: float,
    budget: Budget,
) -> tuple[int | None, str | None]:
    """Add the cues shown in [actual_start, actual_end) to ``clip`` (a validated
    cut) as a mov_text track, shifted to the clip's first frame, by a
    stream-copy remux in a thread that replaces the file. Returns the new
    file's size (None if no cue falls in the clip: the file is left as it
    is) and a note."""
    clip_cues = cut_cues(cues, actual_start, actual_end)
    if not clip_cues:
        return None, NO_CUES_NOTE
    with _side_files() as sides:
        remuxed = side_path(clip, "captions.mp4")
        sides.append(remuxed)
        await _in_thread(lambda guard: remux_with_cues(clip, clip_cues, remuxed, guard), budget)
        size = (await asyncio.to_thread(remuxed.stat)).st_size
        await asyncio.to_thread(os.replace, remuxed, clip)
    return size, None


# -- byte ranges of one stream, fetched and written without decoding -----------------------


@contextlib.contextmanager
def _feed(stream: StreamInput, guard: Guard, spill: Path) -> Iterator[Feed]:
    fetcher = RangeFetcher(stream.url, connect_to=stream.connect_to)
    prefetch = Prefetch(
        fetcher,
        list(stream.window.spans),
        connections=2,
        check=guard.check,
        spill_path=str(spill),
    )
    try:
        yield Feed(stream, prefetch)
    finally:
        prefetch.close()
        fetcher.close()


def _template(init: bytes, stream: StreamInput) -> tuple[Any, Any]:
    """The source's stream, opened from its header bytes (for its parameters)."""
    container = av.open(io.BytesIO(init))
    kind = stream.track.kind
    streams = [s for s in container.streams if s.type == kind]
    chosen = next((s for s in streams if s.id == stream.track.track_id), None)
    if chosen is None and streams:
        chosen = streams[0]
    if chosen is None:
        container.close()
        raise CutFailed(f"the source's header has no {kind} stream")
    return container, chosen


def _audio_input(source: SourceIndex, start_s: float, end_s: float) -> StreamInput | None:
    """The audio window of [start_s, end_s) (user time), if the source is indexed
    and has audio there."""
    if source.video is None or source.audio is None:
        return None
    a = source.audio
    origin = source.audio_origin_ticks()
    offset = origin / a.track.timescale
    end = a.track.duration_s
    if end is not None and start_s + offset >= end:
        return None
    window = a.index.window(a.track.track_id, start_s + offset, end_s + offset)
    return StreamInput(
        a.url, a.track, window, a.index.init, origin, connect_to=source.addresses.get(a.url)
    )


def _range_ticks(stream: StreamInput, start_s: float, end_s: float) -> tuple[int, int]:
    """[start_s, end_s) (user time) in the stream's track ticks."""
    scale = stream.track.timescale
    return (
        round(start_s * scale) + stream.origin_ticks,
        round(end_s * scale) + stream.origin_ticks,
    )


def copy_aac(
    stream: StreamInput, start_s: float, end_s: float, out: Path, guard: Guard
) -> tuple[float, float]:
    """The AAC samples of [start_s, end_s) (user time) copied into an m4a at
    ``out``, trimmed to the sample at both ends by the MP4 edit list (the
    first sample starts early: its negative time; the last one's duration
    is cut). Returns the user times the audio really covers. Blocking."""
    track = stream.track
    tb = Fraction(1, track.timescale)
    start, end = _range_ticks(stream, start_s, end_s)
    last_end = start
    with _feed(stream, guard, side_path(out, "spill")) as feed:
        samples = feed.samples()
        container, template = _template(stream.init, stream)
        try:
            with av.open(str(out), "w", format="ipod", options={"movflags": "+faststart"}) as oc:
                aout = oc.add_stream_from_template(template)
                aout.time_base = tb
                for sample in overlapping(samples, start, end, guard):
                    packet = av.Packet(feed.data(sample))
                    packet.stream = aout
                    packet.time_base = tb
                    packet.pts = packet.dts = sample.pts - start
                    if sample.duration > 0:
                        packet.duration = min(sample.duration, end - sample.pts)
                    oc.mux(packet)
                    last_end = sample.pts + max(packet.duration or 0, 0)
        finally:
            container.close()
    if last_end <= start:
        out.unlink(missing_ok=True)
        raise ClipFailure("no_audio", "the source has no audio in this range")
    return start_s, min(end_s, (last_end - stream.origin_ticks) / track.timescale)


class PipeEnd:
    """The write end of a pipe, closed exactly once: by the thread that writes
    it, or by its owner if that thread never came to run."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()
        self._claimed = False

    def claim(self) -> bool:
        """True for the first caller only: it then owns (and closes) the fd."""
        with self._lock:
            claimed, self._claimed = self._claimed, True
            return not claimed


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _interleaved(frame: Any, lo: int, hi: int, channels: int) -> bytes:
    """Samples ``lo``..``hi`` of a planar float frame, interleaved."""
    planes = [bytes(plane)[lo * 4 : hi * 4] for plane in frame.planes[:channels]]
    if channels == 1:
        return planes[0]
    out = array("f", bytes(4 * (hi - lo) * channels))
    for c, plane in enumerate(planes):
        out[c::channels] = array("f", plane)
    return out.tobytes()


PCM_FORMAT = "f32le" if sys.byteorder == "little" else "f32be"


def pipe_aac_pcm(
    stream: StreamInput, start_s: float, end_s: float, pipe: PipeEnd, spill: Path, guard: Guard
) -> tuple[float, float]:
    """The AAC samples of [start_s, end_s) (user time) decoded, and exactly that
    range's audio written to ``pipe`` as interleaved 32-bit floats at the
    track's rate and channel count (PCM_FORMAT): the samples before the start
    in the first AAC frame and after the end in the last are left out, a gap
    before the first frame is silence. Closes the pipe. Returns the user times
    written. Blocking."""
    if not pipe.claim():
        raise CutFailed("the audio pipe was closed before it was written")
    try:
        return _pipe_pcm(stream, start_s, end_s, pipe.fd, spill, guard)
    finally:
        os.close(pipe.fd)


def _pipe_pcm(
    stream: StreamInput, start_s: float, end_s: float, fd: int, spill: Path, guard: Guard
) -> tuple[float, float]:
    track = stream.track
    rate, channels, scale = track.sample_rate, track.channels, track.timescale
    start, end = _range_ticks(stream, start_s, end_s)
    total = round((end - start) * rate / scale)  # samples of the clip
    written = 0
    with _feed(stream, guard, spill) as feed:
        decoder: Any = av.CodecContext.create("aac", "r")
        decoder.extradata = track.config
        for sample in overlapping(feed.samples(), start, end, guard):
            if written >= total:
                break
            at = round((sample.pts - start) * rate / scale)  # the frame's first sample
            for frame in decoder.decode(av.Packet(feed.data(sample))):
                if (frame.format.name, frame.sample_rate, frame.layout.nb_channels) != (
                    "fltp",
                    rate,
                    channels,
                ):
                    raise CutFailed(
                        f"the AAC decodes to {frame.format.name} {frame.sample_rate} Hz "
                        f"{frame.layout.nb_channels} ch, not the track's {rate} Hz {channels} ch"
                    )
                lo, hi = max(at, written), min(at + frame.samples, total)
                if hi > lo:
                    if lo > written:  # the audio starts late: silence until it does
                        _write_all(fd, bytes(4 * channels * (lo - written)))
                    _write_all(fd, _interleaved(frame, lo - at, hi - at, channels))
                    written = hi
                at += frame.samples
    if written <= 0:
        raise ClipFailure("no_audio", "the source has no audio in this range")
    return start_s, start_s + written / rate


async def _encode_piped(
    spec: CutSpec,
    stream: StreamInput,
    fmt: Literal["m4a", "mp3"],
    tmp: Path,
    budget: Budget,
    ffmpeg_path: str,
) -> tuple[float, float]:
    """The clip's audio decoded on a thread and piped, as exact PCM, to an FFmpeg
    that encodes it as it comes (the decode on one core, the encoder on the
    other). FFmpeg, whose encoding is the critical path, starts at once."""
    track = stream.track
    read, write = os.pipe()
    pipe = PipeEnd(write)
    spill = side_path(tmp, "spill")
    feed = asyncio.ensure_future(
        _in_thread(
            lambda guard: pipe_aac_pcm(stream, spec.start_s, spec.end_s, pipe, spill, guard),
            budget,
        )
    )
    args = ffmpeg_args.pcm_audio_args(PCM_FORMAT, track.sample_rate, track.channels, str(tmp), fmt)
    try:
        try:
            await run_ffmpeg(
                args,
                timeout_s=budget.left_s(),
                ffmpeg_path=ffmpeg_path,
                on_progress=spec.on_progress,
                stdin_fd=read,
            )
        except BaseException:
            feed.cancel()
            await asyncio.wait({feed})
            if not feed.cancelled():
                failure = feed.exception()
                # The thread's own failure (no audio, a fetch that failed) is the
                # cause; a broken pipe only says that FFmpeg went first.
                if failure is not None and not isinstance(failure, BrokenPipeError):
                    raise failure from None
            raise
        return await feed
    finally:
        if pipe.claim():  # the thread never ran
            os.close(write)


async def _audio(
    spec: CutSpec, tmp: Path, budget: Budget, sides: list[Path], ffmpeg_path: str
) -> Rendered:
    fmt: Literal["m4a", "mp3"] = "mp3" if spec.options.format == "mp3" else "m4a"
    start, end = spec.start_s, spec.end_s
    if spec.info.audio is None:
        raise ClipFailure("no_audio", "the source has no audio")
    covered: tuple[float, float] | None = None
    # An MP3 is encoded from the clip's exact audio: the AAC frames decoded
    # here and trimmed to the sample, piped to the encoder as they come (or,
    # failing that, the AAC copy: a local m4a whose edit list trims it).
    # FFmpeg's input seeking in the URL starts one AAC frame early (23 ms of
    # audio from before the clip): it is the last resort.
    source = await _open_index(spec, budget)
    stream = await asyncio.to_thread(_audio_input, source, start, end)
    if (
        stream is not None
        and fmt == "mp3"
        and stream.track.codec == "aac"
        and stream.track.channels in (1, 2)
        and stream.track.sample_rate > 0
    ):
        try:
            covered = await _encode_piped(spec, stream, fmt, tmp, budget, ffmpeg_path)
        except (CutFailed, ContainerError, av.FFmpegError) as exc:
            log.info("audio_pipe_fallback", reason=str(exc))
    if covered is None and stream is not None and stream.track.codec == "aac":
        target = tmp if fmt == "m4a" else side_path(tmp, "copy.m4a")
        if target != tmp:
            sides.append(target)
        try:
            covered = await _in_thread(
                lambda guard: copy_aac(stream, start, end, target, guard), budget
            )
        except (CutFailed, ContainerError, av.FFmpegError) as exc:
            log.info("audio_copy_fallback", reason=str(exc))
            covered = None
        if covered is not None and fmt == "mp3":
            args = ffmpeg_args.transcode_audio_args(str(target), str(tmp), fmt)
            await _ffmpeg(spec, args, budget, ffmpeg_path)
    if covered is None:
        url = spec.streams.audio_url or spec.streams.video_url
        await _ffmpeg(
            spec, ffmpeg_args.audio_args(url, start, end, str(tmp), fmt), budget, ffmpeg_path
        )
        audio_end = spec.info.audio.duration_s
        covered = (start, min(end, audio_end) if audio_end else end)
    first, last = covered
    tol = 2 * _AAC_FRAME_S + (0.05 if fmt == "mp3" else 0.0)
    out = await validate_media(tmp, "audio", last - first, tol_s=tol)
    _done(spec, out.duration_s)
    return Rendered(first, first + out.duration_s, out.duration_s, out.size_bytes)


# -- thumbnails: one frame ------------------------------------------------------------------


def write_gop(
    stream: StreamInput, at_s: float, out: Path, guard: Guard
) -> tuple[int, float] | None:
    """The GOP holding the frame shown at ``at_s`` (user time) copied into a
    Matroska file at ``out`` (no decoding here). Returns that frame's number
    among the GOP's frames in presentation order and its user time; None
    when the GOP cannot be used alone (it has leading pictures that refer to
    the GOP before). Blocking."""
    track = stream.track
    at = round(at_s * track.timescale) + stream.origin_ticks
    with _feed(stream, guard, side_path(out, "spill")) as feed:
        samples = feed.samples()
        key = next((s for s in samples if s.key), None)
        if key is None:
            return None
        gop: list[Sample] = []
        for s in samples[samples.index(key) :]:
            if s.key and s is not key:
                break
            gop.append(s)
        if any(s.pts < key.pts for s in gop):
            return None  # an open GOP's leading pictures: FFmpeg seeks in the URL instead
        shown = sorted(s.pts for s in gop)
        target_pts = shown[next((i for i, pts in enumerate(shown) if pts >= at), len(shown) - 1)]
        gop = _needed(gop, target_pts, track, feed)
        wanted = sorted(s.pts for s in gop).index(target_pts)
        container, template = _template(stream.init, stream)
        try:
            with av.open(str(out), "w", format="matroska") as oc:
                vout = oc.add_stream_from_template(template, opaque=True)
                tb = Fraction(1, track.timescale)
                vout.time_base = tb
                for s in gop:
                    guard.check()
                    packet = av.Packet(feed.data(s))
                    packet.stream = vout
                    packet.time_base = tb
                    packet.pts, packet.dts = s.pts, s.dts
                    packet.is_keyframe = s.key
                    if s.duration > 0:
                        packet.duration = s.duration
                    oc.mux(packet)
        finally:
            container.close()
    return wanted, (target_pts - stream.origin_ticks) / track.timescale


def _needed(gop: list[Sample], target_pts: int, track: Track, feed: Feed) -> list[Sample]:
    """The samples of a GOP (in decode order) that decoding the picture shown at
    ``target_pts`` needs: none after it in decode order, and, for H.264, no
    non-reference picture but that one (nothing is decoded from them)."""
    end = next(i for i, s in enumerate(gop) if s.pts == target_pts) + 1
    needed = gop[:end]
    if track.codec != "h264":
        return needed
    try:
        length_size = h264.parse_avcc(track.config).length_size
    except h264.H264Unsupported:
        return needed
    return [
        s
        for s in needed
        if s.key or s.pts == target_pts or not h264.disposable(feed.data(s), length_size)
    ]


def _video_input(source: SourceIndex, at_s: float) -> StreamInput | None:
    if source.video is None:
        return None
    v = source.video
    offset = source.video_origin_ticks / v.track.timescale
    window = v.index.window(v.track.track_id, at_s + offset, at_s + offset)
    return StreamInput(
        v.url,
        v.track,
        window,
        v.index.init,
        source.video_origin_ticks,
        connect_to=source.addresses.get(v.url),
    )


async def _thumbnail(
    spec: CutSpec, tmp: Path, budget: Budget, sides: list[Path], ffmpeg_path: str
) -> Rendered:
    o = spec.options
    fmt: Literal["jpg", "png"] = "png" if o.format == "png" else "jpg"
    at = o.thumbnail_at if o.thumbnail_at is not None else spec.start_s
    at = min(max(at, spec.start_s), spec.end_s)
    src_w, src_h = await _source_size(spec)
    graph, size = video_graph(o, src_w, src_h)
    source = await _open_index(spec, budget)
    stream = await asyncio.to_thread(_video_input, source, at)
    picked: tuple[int, float] | None = None
    if stream is not None:
        gop = side_path(tmp, "gop.mkv")
        sides.append(gop)
        try:
            picked = await _in_thread(lambda guard: write_gop(stream, at, gop, guard), budget)
        except (CutFailed, ContainerError, av.FFmpegError) as exc:
            log.info("thumbnail_gop_fallback", reason=str(exc))
        if picked is not None:
            args = ffmpeg_args.local_thumbnail_args(str(gop), picked[0], str(tmp), graph, fmt)
            await run_ffmpeg(args, timeout_s=budget.left_s(), ffmpeg_path=ffmpeg_path)
    if picked is None:
        args = ffmpeg_args.thumbnail_args(spec.streams.video_url, at, str(tmp), graph, fmt)
        await run_ffmpeg(args, timeout_s=budget.left_s(), ffmpeg_path=ffmpeg_path)
    out = await validate_media(tmp, "image", size=size)
    shown = picked[1] if picked is not None else at
    _done(spec, spec.end_s - spec.start_s)  # the clip's whole work is this one frame
    return Rendered(shown, shown, 0.0, out.size_bytes, out.width, out.height)


# -- reels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeOutcome:
    """The reel: its length, size, and whether it was joined by stream copy."""

    duration_s: float
    size_bytes: int
    copied: bool
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class _Clip:
    path: Path
    duration_s: float
    has_video: bool
    has_audio: bool
    # Everything a stream copy must find equal in every clip.
    signature: tuple[Any, ...]
    width: int
    height: int
    fps: Fraction | None
    header_bytes: int = 0  # its ftyp and moov (0: not known)


def _describe_clip(path: Path) -> _Clip:
    """What a reel needs to know of a clip, from its MP4 index (a clip of ours
    is a faststart MP4: its moov alone says it all, nothing decoded); from
    FFmpeg's reading of it when the index cannot be read."""
    try:
        return _describe_clip_index(path)
    except (ContainerError, OSError):
        return _describe_decoded(path)


def _describe_clip_index(path: Path) -> _Clip:
    return _clip_of(path, open_file(path))


def _clip_of(path: Path, index: Mp4Index) -> _Clip:
    v, a = index.track("video"), index.track("audio")
    sig = tuple(
        None
        if t is None
        else (t.kind, t.codec, t.config, t.timescale, t.width, t.height, t.sample_rate, t.channels)
        for t in (v, a)
    )
    first = v if v is not None else a
    duration = (index.samples_s(first.track_id) if first is not None else None) or 0.0
    fps = Fraction(v.fps).limit_denominator(1001) if v is not None and v.fps else None
    return _Clip(
        path,
        duration,
        v is not None,
        a is not None,
        sig,
        v.width if v is not None else 0,
        v.height if v is not None else 0,
        fps,
        index.header_bytes,
    )


# Room left at the front of a copied reel for its moov: the clips' own headers
# (the reel's sample tables are theirs, end to end) and a margin; FFmpeg fills
# what is left with a free box, and fails if it is short (then a second pass).
_MOOV_MARGIN = 1.25
_MOOV_EXTRA_BYTES = 16 * 1024


def _moov_reserve(clips: list[_Clip]) -> int:
    return round(sum(c.header_bytes for c in clips) * _MOOV_MARGIN) + _MOOV_EXTRA_BYTES


def _check_copied_reel(path: Path, expected_s: float, tol_s: float, first: _Clip) -> OutputInfo:
    """A stream-copied reel, checked by its index: it opens as an MP4 with the
    clips' streams and codec parameters (the samples are the validated clips'
    own, nothing to decode again), moov before the media, and lasts the sum."""
    try:
        index = open_file(path)
    except (ContainerError, OSError) as exc:
        raise ClipFailure("output_invalid", f"the reel does not open: {exc}") from exc
    clip = _clip_of(path, index)
    if _streams(clip) != _streams(first):
        raise ClipFailure("output_invalid", "the reel's streams differ from its clips'")
    if not index.moov_first:
        raise ClipFailure("output_invalid", "the reel's moov is not before its media")
    if abs(clip.duration_s - expected_s) > tol_s:
        raise ClipFailure(
            "output_invalid",
            f"output lasts {clip.duration_s:.3f}s, expected {expected_s:.3f}s (±{tol_s:.3f}s)",
        )
    size = path.stat().st_size
    return OutputInfo(
        clip.duration_s, clip.duration_s, clip.has_audio, 0, size, clip.width, clip.height
    )


def _streams(clip: _Clip) -> tuple[Any, ...]:
    """A clip's signature without the tracks' timescales (a muxer may pick its
    own for the joined file)."""
    return tuple(None if t is None else (*t[:3], *t[4:]) for t in clip.signature)


def _describe_decoded(path: Path) -> _Clip:
    try:
        with av.open(str(path)) as c:
            v = c.streams.video[0] if c.streams.video else None
            a = c.streams.audio[0] if c.streams.audio else None
            duration = float(c.duration / av.time_base) if c.duration else 0.0
            if v is not None and v.duration and v.time_base:
                duration = float(v.duration * v.time_base)
            sig: list[Any] = []
            for s in (v, a):
                if s is None:
                    sig.append(None)
                    continue
                cc = s.codec_context
                sig.append(
                    (
                        s.type, cc.name, bytes(cc.extradata or b""), s.time_base,
                        getattr(cc, "width", 0), getattr(cc, "height", 0),
                        getattr(cc, "pix_fmt", None), getattr(cc, "sample_rate", 0),
                        getattr(getattr(cc, "layout", None), "name", None),
                    )
                )  # fmt: skip
            rate = v.average_rate if v is not None else None
            return _Clip(
                path,
                duration,
                v is not None,
                a is not None,
                tuple(sig),
                v.codec_context.width if v is not None else 0,
                v.codec_context.height if v is not None else 0,
                Fraction(rate) if rate else None,
            )
    except (av.FFmpegError, IndexError) as exc:
        raise ClipFailure("output_invalid", f"a clip of the reel does not open: {exc}") from exc


@dataclass
class _Until:
    """A time limit as a Budget (``deadline`` on the monotonic clock)."""

    deadline: float

    def left_s(self) -> float:
        return max(0.001, self.deadline - time.monotonic())


async def _copy_reel_here(
    paths: list[Path],
    out: Path,
    reserve: int,
    budget: Budget,
    on_progress: ProgressCallback | None,
) -> None:
    """The clips joined by stream copy on a thread of this process (no FFmpeg
    started: about half the time of FFmpeg's concat for a reel of a few clips)."""
    loop = asyncio.get_running_loop()

    def progress(out_s: float) -> None:
        if on_progress is not None:
            loop.call_soon_threadsafe(on_progress, out_s)

    await _in_thread(lambda guard: copy_reel(paths, out, reserve, guard, progress), budget)


def copy_reel(
    paths: list[Path],
    out: Path,
    reserve: int,
    guard: Guard,
    progress: Callable[[float], None] = lambda out_s: None,
) -> None:
    """MP4 clips of the same streams and codec parameters joined, in order, by
    stream copy into an MP4 at ``out``, timed as FFmpeg's concat demuxer times
    them: each clip shifted, all its streams by the same amount, to start where
    the clip before ended (that clip's container duration); the moov written
    into ``reserve`` bytes left for it at the front (one pass). Raises
    CutFailed for clips it does not join so (other streams than one video and
    at most one audio, streams unlike the first clip's, timestamps that would
    run backwards at a join), av.FFmpegError if the muxer fails (the room for
    the moov was short). Blocking."""
    inputs: list[Any] = []
    try:
        for path in paths:
            inputs.append(av.open(str(path)))
        first = inputs[0]
        shape = [(st.type, st.time_base) for st in first.streams]
        if [kind for kind, _ in shape] not in (["video"], ["video", "audio"], ["audio", "video"]):
            raise CutFailed("a reel copied here has one video and at most one audio stream")
        with av.open(str(out), "w", format="mp4", options={"moov_size": str(reserve)}) as oc:
            outs = []
            for st in first.streams:
                copy = oc.add_stream_from_template(st, opaque=True)
                copy.time_base = st.time_base
                # The clip's sample entry (hvc1, not the muxer's default hev1,
                # which Apple's players refuse, and its hvcC as it is).
                copy.codec_context.codec_tag = st.codec_context.codec_tag
                outs.append(copy)
            offset = Fraction(0)  # where the clip starts in the reel, in seconds
            last_dts: list[int | None] = [None] * len(outs)
            for clip in inputs:
                if [(st.type, st.time_base) for st in clip.streams] != shape:
                    raise CutFailed("the clips' streams differ")
                if clip.duration is None:
                    raise CutFailed("a clip does not say how long it is")
                begin = Fraction(clip.start_time or 0, av.time_base)
                shifts = [round((offset - begin) / st.time_base) for st in clip.streams]
                for packet in clip.demux():
                    if packet.dts is None:
                        continue  # the demuxer's end-of-stream packets
                    guard.check()
                    i = packet.stream.index
                    packet.dts += shifts[i]
                    if packet.pts is not None:
                        packet.pts += shifts[i]
                    if last_dts[i] is not None and packet.dts <= last_dts[i]:
                        raise CutFailed("the clips' timestamps overlap at a join")
                    last_dts[i] = packet.dts
                    packet.stream = outs[i]
                    packet.time_base = outs[i].time_base
                    oc.mux(packet)
                offset += Fraction(clip.duration, av.time_base)
                progress(float(offset))
    finally:
        for clip in inputs:
            clip.close()


async def _concat_by_ffmpeg(
    paths: list[Path],
    tmp: Path,
    reserve: int,
    sides: list[Path],
    budget: Budget,
    ffmpeg_path: str,
    on_progress: ProgressCallback | None,
) -> None:
    """The clips joined by stream copy by FFmpeg's concat demuxer, the moov in
    ``reserve`` bytes left for it; if that is short, made again with the moov
    moved to the front by a second pass (+faststart)."""
    listing = side_path(tmp, "concat.txt")
    sides.append(listing)
    await asyncio.to_thread(listing.write_text, _concat_list(paths), "utf-8")
    args = ffmpeg_args.concat_copy_args(str(listing), str(tmp), moov_bytes=reserve)
    try:
        await run_ffmpeg(
            args,
            timeout_s=budget.left_s(),
            ffmpeg_path=ffmpeg_path,
            on_progress=on_progress,
        )
    except FFmpegError as exc:
        if "reserved_moov_size is too small" not in (exc.stderr_tail or ""):
            raise
        log.warning("reel_moov_reserve_short", reserved=reserve)
        args = ffmpeg_args.concat_copy_args(str(listing), str(tmp))
        await run_ffmpeg(args, timeout_s=budget.left_s(), ffmpeg_path=ffmpeg_path)


def _concat_list(paths: list[Path]) -> str:
    lines = []
    for path in paths:
        escaped = str(path.resolve()).replace("'", "'\\''")
        lines.append(f"file '{escaped}'")
    return "\n".join(lines) + "\n"


async def merge_clips(
    paths: list[Path],
    out: Path,
    *,
    crossfade_s: float = 0.0,
    timeout_s: float,
    ffmpeg_path: str = "",
    on_progress: ProgressCallback | None = None,
) -> MergeOutcome:
    """Join MP4 clips, in order, into one reel at ``out`` (written under a
    temporary name, validated, then renamed; nothing left on failure).

    A stream copy (the concat demuxer) when every clip has the same codec
    parameters (codec, extradata, frame size, pixel format, time base,
    audio rate and layout) and no crossfade is asked; else one re-encode
    that fits every clip to the first one's frame and rate (padded), gives
    silent audio to clips without, and joins them with ``concat``, or with
    ``xfade``/``acrossfade`` of ``crossfade_s`` seconds (the reel is then
    (n-1) crossfades shorter than the sum). Raise ValueError for a bad call
    (no clips, a crossfade longer than a clip), ClipFailure otherwise.
    """
    if not paths:
        raise ValueError("a reel needs at least one clip")
    if not 0 <= crossfade_s <= MAX_CROSSFADE_S:
        raise ValueError(f"crossfade_s must be between 0 and {MAX_CROSSFADE_S:g}")
    budget = _Until(time.monotonic() + timeout_s)
    # (Described side by side: each is a file open and a few reads.)
    clips = list(await asyncio.gather(*(asyncio.to_thread(_describe_clip, p) for p in paths)))
    if not all(c.has_video for c in clips):
        raise ValueError("a reel joins video clips (mp4)")
    if crossfade_s > 0 and len(clips) > 1 and crossfade_s >= min(c.duration_s for c in clips):
        raise ValueError("the crossfade must be shorter than every clip")
    tmp = out.with_name(f".{out.stem}.part-{uuid.uuid4().hex[:8]}{out.suffix or '.mp4'}")
    copied = crossfade_s <= 0 and len({c.signature for c in clips}) == 1
    n = len(clips)
    if n == 1 or crossfade_s <= 0:
        expected = sum(c.duration_s for c in clips)
    else:
        expected = sum(c.duration_s for c in clips) - (n - 1) * crossfade_s
    first = clips[0]
    fps = first.fps or Fraction(30)
    tol = len(clips) * 2 / float(fps) + 0.05
    audio = any(c.has_audio for c in clips)

    async def check() -> OutputInfo:
        if copied and all(c.header_bytes for c in clips):
            return await asyncio.to_thread(_check_copied_reel, tmp, expected, tol, clips[0])
        return await validate_media(tmp, "video", expected, tol_s=tol, expect_audio=audio)

    info: OutputInfo | None = None
    with _side_files() as sides:
        sides.append(tmp)
        try:
            if copied:
                reserve = _moov_reserve(clips)
                try:
                    await _copy_reel_here(paths, tmp, reserve, budget, on_progress)
                    info = await check()
                except TimeoutError:
                    raise
                except Exception as exc:  # whatever stops the copy here, or a reel its
                    # check refuses: FFmpeg's concat makes the reel
                    log.info("reel_copy_by_ffmpeg", reason=f"{type(exc).__name__}: {exc}")
                if info is None:
                    await _concat_by_ffmpeg(
                        paths, tmp, reserve, sides, budget, ffmpeg_path, on_progress
                    )
            else:
                parts = [
                    ffmpeg_args.MergePart(str(c.path), c.duration_s, c.has_audio) for c in clips
                ]
                args = ffmpeg_args.merge_args(
                    parts,
                    str(tmp),
                    width=ffmpeg_args.even_floor(first.width),
                    height=ffmpeg_args.even_floor(first.height),
                    fps=fps,
                    crossfade_s=crossfade_s if n > 1 else 0.0,
                    audio=audio,
                )
                await run_ffmpeg(
                    args,
                    timeout_s=budget.left_s(),
                    ffmpeg_path=ffmpeg_path,
                    on_progress=on_progress,
                )
        except FFmpegError as exc:
            raise ClipFailure("ffmpeg_failed", exc.stderr_tail or str(exc)) from exc
        if info is None:
            info = await check()
        await asyncio.to_thread(os.replace, tmp, out)
    return MergeOutcome(info.video_duration_s, info.size_bytes, copied, info.width, info.height)
