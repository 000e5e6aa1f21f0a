"""Probing media with PyAV: stream parameters, duration, and output validation.

PyAV reads over HTTP with Range requests, so probing a remote source fetches
only its index and the packets it looks at. PyAV calls block, so every public
coroutine here runs its work in a thread.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import av

from clipservice.errors import ClipFailure, SourceError
from clipservice.media.containers.base import ContainerError
from clipservice.media.containers.mp4 import open_file
from clipservice.media.fetch import FetchError
from clipservice.media.ffmpeg import SOURCE_INPUT_OPTIONS, egress_proxy

if TYPE_CHECKING:
    from clipservice.media.containers.base import Track
    from clipservice.media.source import SourceIndex

_OPEN_TIMEOUT_S = 15.0


def open_source(url: str) -> Any:
    """A source opened by PyAV under the same rules as FFmpeg's inputs (for
    sources the service cannot index itself).

    The time limit is FFmpeg's own ``rw_timeout`` on every network read, not
    PyAV's ``timeout``: that one is an interrupt callback which takes the GIL
    on every read.
    """
    options = {**SOURCE_INPUT_OPTIONS, "rw_timeout": str(int(_OPEN_TIMEOUT_S * 1e6))}
    proxy = egress_proxy()
    if proxy is not None:
        # Through the egress proxy, as FFmpeg's runs: it resolves and checks the
        # host in the same step as it connects (no DNS rebinding).
        options["http_proxy"] = proxy.url
    return av.open(url, options=options)


T = TypeVar("T")


@dataclass(frozen=True)
class StreamInfo:
    """What a cut plan needs to know about one source stream."""

    codec: str
    duration_s: float | None
    width: int = 0
    height: int = 0
    pix_fmt: str | None = None
    profile: str | None = None
    fps: float | None = None
    time_base: Fraction | None = None
    start_time_s: float = 0.0


@dataclass(frozen=True)
class SourceInfo:
    """The probed source of a job: its video, and its audio (separate or muxed)."""

    duration_s: float
    video: StreamInfo
    audio: StreamInfo | None


def _stream_duration(stream: Any, container: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return None


def _video_info(container: Any) -> StreamInfo | None:
    if not container.streams.video:
        return None
    s = container.streams.video[0]
    cc = s.codec_context
    rate = s.average_rate or s.guessed_rate
    start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
    return StreamInfo(
        codec=cc.name,
        duration_s=_stream_duration(s, container),
        width=cc.width,
        height=cc.height,
        pix_fmt=cc.format.name if cc.format is not None else None,
        profile=cc.profile,
        fps=float(rate) if rate else None,
        time_base=s.time_base,
        start_time_s=start,
    )


def _audio_info(container: Any) -> StreamInfo | None:
    if not container.streams.audio:
        return None
    s = container.streams.audio[0]
    start = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
    return StreamInfo(
        codec=s.codec_context.name,
        duration_s=_stream_duration(s, container),
        time_base=s.time_base,
        start_time_s=start,
    )


def _read_source(read: Callable[[], T]) -> T:
    started = time.monotonic()
    try:
        return read()
    except av.FFmpegError as exc:
        proxy = egress_proxy()
        refused = proxy.refused_since(started) if proxy is not None else []
        if refused:
            # The egress proxy refused the host (policy), not a broken source.
            raise SourceError(
                "source_forbidden",
                f"refused to connect to {refused[0]}: it resolves to a non-public address",
            ) from exc
        if isinstance(exc, av.error.HTTPForbiddenError):
            raise SourceError("source_unavailable", f"source answered 403: {exc}") from exc
        raise SourceError("source_unavailable", f"cannot read source: {exc}") from exc


def _track_info(track: Track) -> StreamInfo:
    return StreamInfo(
        codec=track.codec,
        duration_s=track.duration_s,
        width=track.width,
        height=track.height,
        fps=track.fps,
        time_base=Fraction(1, track.timescale),
    )


async def probe_source(
    video_url: str, audio_url: str | None, index: SourceIndex | None = None
) -> SourceInfo:
    """Probe a job's source once: duration and stream parameters.

    With ``index`` (the job's index of the source) the container indexes
    read for the cuts answer; a source in a container they cannot read (or
    without an index) is probed with PyAV, video and separate audio side by
    side.
    """
    if index is not None:
        try:
            await index.open()
        except FetchError as exc:
            raise SourceError("source_unavailable", f"cannot read source: {exc}") from exc
        if index.video is not None:
            video_info = _track_info(index.video.track)
            audio_info = _track_info(index.audio.track) if index.audio is not None else None
            if not video_info.duration_s:
                raise SourceError("source_unavailable", "source has no known duration")
            return SourceInfo(video_info.duration_s, video_info, audio_info)
    return await _probe_with_pyav(video_url, audio_url)


async def _probe_with_pyav(video_url: str, audio_url: str | None) -> SourceInfo:
    def video() -> tuple[StreamInfo | None, StreamInfo | None]:
        with open_source(video_url) as c:
            return _video_info(c), _audio_info(c) if audio_url is None else None

    def audio() -> StreamInfo | None:
        assert audio_url is not None
        with open_source(audio_url) as c:
            return _audio_info(c)

    async def no_audio() -> StreamInfo | None:
        return None

    (video_info, audio_info), separate_audio = await asyncio.gather(
        asyncio.to_thread(_read_source, video),
        asyncio.to_thread(_read_source, audio) if audio_url is not None else no_audio(),
    )
    if video_info is None:
        raise SourceError("source_unavailable", "the video URL holds no video stream")
    if audio_url is not None:
        audio_info = separate_audio
        if audio_info is None:
            raise SourceError("source_unavailable", "the audio URL holds no audio stream")
    if not video_info.duration_s:
        raise SourceError("source_unavailable", "source has no known duration")
    return SourceInfo(duration_s=video_info.duration_s, video=video_info, audio=audio_info)


@dataclass(frozen=True)
class OutputInfo:
    """What validation learned about a finished output file."""

    duration_s: float
    video_duration_s: float
    has_audio: bool
    frames: int
    size_bytes: int
    width: int = 0
    height: int = 0
    subtitle_streams: int = 0


def _size_of(path: Path) -> int:
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise ClipFailure("output_invalid", "output file is missing or empty")
    return size


def _check_duration(got_s: float, expected_s: float, tol_s: float) -> None:
    if abs(got_s - expected_s) > tol_s:
        raise ClipFailure(
            "output_invalid",
            f"output lasts {got_s:.3f}s, expected {expected_s:.3f}s (±{tol_s:.3f}s)",
        )


def _first_frame(container: Any, stream: Any) -> Any:
    """The stream's first frame, decoded from its first packet alone: no decoder
    threads (they would start for one frame and, frame-threaded, wait for as
    many packets) and no reorder delay (the decoder is flushed after that one
    packet instead of fed the next ones, which B-frames would need)."""
    stream.thread_type = "NONE"
    stream.thread_count = 1
    packet = next((p for p in container.demux(stream) if p.size), None)
    if packet is None:
        return None
    cc = stream.codec_context
    frames = cc.decode(packet) or cc.decode(None)
    return frames[0] if frames else None


def _validate_sync(path: Path, expected_s: float, expect_audio: bool, tol_s: float) -> OutputInfo:
    size = _size_of(path)
    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise ClipFailure("output_invalid", "output has no video stream")
            has_audio = bool(c.streams.audio)
            if expect_audio and not has_audio:
                raise ClipFailure("output_invalid", "output has no audio stream")
            vs = c.streams.video[0]
            duration = float(c.duration / av.time_base) if c.duration else 0.0
            vdur = float(vs.duration * vs.time_base) if vs.duration and vs.time_base else duration
            first = _first_frame(c, vs)
            if first is None:
                raise ClipFailure("output_invalid", "output's first video frame does not decode")
            frames = vs.frames
            subtitles = len(c.streams.subtitles)
    except av.FFmpegError as exc:
        raise ClipFailure("output_invalid", f"output does not decode: {exc}") from exc
    _check_duration(vdur, expected_s, tol_s)
    return OutputInfo(duration, vdur, has_audio, frames, size, first.width, first.height, subtitles)


def _validate_joined(
    path: Path,
    expected_s: float,
    expect_audio: bool,
    tol_s: float,
    frame: tuple[int, int],
    frames: int,
) -> OutputInfo:
    size = _size_of(path)
    try:
        index = open_file(path)
    except (ContainerError, OSError) as exc:
        raise ClipFailure("output_invalid", f"output does not open: {exc}") from exc
    video, audio = index.track("video"), index.track("audio")
    if video is None:
        raise ClipFailure("output_invalid", "output has no video stream")
    if expect_audio and audio is None:
        raise ClipFailure("output_invalid", "output has no audio stream")
    written = index.sample_count(video.track_id)
    if written != frames:
        raise ClipFailure("output_invalid", f"output holds {written} of {frames} video samples")
    vdur = index.samples_s(video.track_id) or 0.0
    adur = (index.samples_s(audio.track_id) or 0.0) if audio is not None else 0.0
    duration = max(vdur, adur)
    _check_duration(vdur, expected_s, tol_s)
    subtitles = sum(1 for h in index.handlers if h in (b"sbtl", b"text", b"subt"))
    return OutputInfo(
        duration, vdur, audio is not None, frames, size, frame[0], frame[1], subtitles
    )


async def validate_joined(
    path: Path,
    expected_s: float,
    *,
    expect_audio: bool,
    tol_s: float,
    first_frame: tuple[int, int],
    frames: int,
) -> OutputInfo:
    """Check a clip a join made (whose first sample it decoded as it muxed,
    ``first_frame`` its size): it opens as an MP4 by its index (every box and
    sample table read, nothing decoded), has its streams and the ``frames``
    video samples the join wrote, and lasts as expected."""
    return await asyncio.to_thread(
        _validate_joined, path, expected_s, expect_audio, tol_s, first_frame, frames
    )


async def validate_output(
    path: Path, expected_s: float, *, expect_audio: bool, tol_s: float
) -> OutputInfo:
    """Check a cut output: non-empty, streams present, first frame decodes, duration right."""
    return await asyncio.to_thread(_validate_sync, path, expected_s, expect_audio, tol_s)


# -- outputs that are not an MP4 clip ---------------------------------------------

OutputKind = Literal["video", "audio", "animation", "image"]


def _validate_audio(path: Path, expected_s: float, tol_s: float) -> OutputInfo:
    size = _size_of(path)
    try:
        with av.open(str(path)) as c:
            if c.streams.video:
                raise ClipFailure("output_invalid", "audio output has a video stream")
            if not c.streams.audio:
                raise ClipFailure("output_invalid", "output has no audio stream")
            a = c.streams.audio[0]
            duration = float(c.duration / av.time_base) if c.duration else 0.0
            if a.duration and a.time_base:
                duration = float(a.duration * a.time_base)
            if next(c.decode(audio=0), None) is None:
                raise ClipFailure("output_invalid", "output's first audio frame does not decode")
    except av.FFmpegError as exc:
        raise ClipFailure("output_invalid", f"output does not decode: {exc}") from exc
    _check_duration(duration, expected_s, tol_s)
    return OutputInfo(duration, 0.0, True, 0, size)


@dataclass(frozen=True)
class WebpInfo:
    """An animated WebP's canvas, its frames' durations, and its first frame as
    a still WebP (FFmpeg decodes still WebP, not animated)."""

    width: int
    height: int
    durations_ms: list[int]
    first_frame: bytes


def webp_info(data: bytes) -> WebpInfo:
    """Read an animated WebP's RIFF chunks (VP8X canvas, ANMF frames); raise
    ValueError if it is not one."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise ValueError("not a WebP file")
    pos, width, height = 12, 0, 0
    durations: list[int] = []
    first = b""
    while pos + 8 <= len(data):
        fourcc, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + size]
        if len(body) < size:
            raise ValueError("truncated WebP chunk")
        if fourcc == b"VP8X" and size >= 10:
            width = int.from_bytes(body[4:7], "little") + 1
            height = int.from_bytes(body[7:10], "little") + 1
        elif fourcc == b"ANMF" and size >= 16:
            durations.append(int.from_bytes(body[12:15], "little"))
            if not first:
                frame = body[16:]
                first = b"RIFF" + (4 + len(frame)).to_bytes(4, "little") + b"WEBP" + frame
        pos += 8 + size + (size & 1)
    if not width or not durations:
        raise ValueError("not an animated WebP (no VP8X canvas or no frames)")
    return WebpInfo(width, height, durations, first)


def _validate_animation(path: Path, expected_s: float, tol_s: float) -> OutputInfo:
    size = _size_of(path)
    if path.read_bytes()[:4] == b"RIFF":
        try:
            info = webp_info(path.read_bytes())
            with av.open(io.BytesIO(info.first_frame), "r", format="webp_pipe") as c:
                if next(c.decode(video=0), None) is None:
                    raise ClipFailure("output_invalid", "the WebP's first frame does not decode")
        except (ValueError, av.FFmpegError) as exc:
            raise ClipFailure("output_invalid", f"output is not an animated WebP: {exc}") from exc
        duration = sum(info.durations_ms) / 1000
        frames, width, height = len(info.durations_ms), info.width, info.height
    else:
        try:
            with av.open(str(path)) as c:
                if not c.streams.video:
                    raise ClipFailure("output_invalid", "output has no video stream")
                vs = c.streams.video[0]
                decoded = list(c.decode(video=0))
                if not decoded:
                    raise ClipFailure("output_invalid", "output's first frame does not decode")
                duration = float(c.duration / av.time_base) if c.duration else 0.0
                if vs.duration and vs.time_base:
                    duration = float(vs.duration * vs.time_base)
                frames, width, height = len(decoded), decoded[0].width, decoded[0].height
        except av.FFmpegError as exc:
            raise ClipFailure("output_invalid", f"output does not decode: {exc}") from exc
    _check_duration(duration, expected_s, tol_s)
    return OutputInfo(duration, duration, False, frames, size, width, height)


def _validate_image(path: Path) -> OutputInfo:
    size = _size_of(path)
    try:
        with av.open(str(path)) as c:
            frame = next(c.decode(video=0), None)
    except av.FFmpegError as exc:
        raise ClipFailure("output_invalid", f"output image does not decode: {exc}") from exc
    if frame is None:
        raise ClipFailure("output_invalid", "output image does not decode")
    return OutputInfo(0.0, 0.0, False, 1, size, frame.width, frame.height)


async def validate_media(
    path: Path,
    kind: OutputKind,
    expected_s: float = 0.0,
    *,
    tol_s: float = 0.0,
    expect_audio: bool = False,
    expect_subtitles: bool = False,
    size: tuple[int, int] | None = None,
) -> OutputInfo:
    """Check an output of any kind: non-empty, the streams its kind has (an
    audio file has no video; an image or animation its picture), its first
    frame decodes, its duration is right (not for images), its frame is
    ``size`` if given, and it has a subtitle track if expected."""

    def check() -> OutputInfo:
        if kind == "video":
            info = _validate_sync(path, expected_s, expect_audio, tol_s)
            if expect_subtitles and not info.subtitle_streams:
                raise ClipFailure("output_invalid", "output has no subtitle stream")
        elif kind == "audio":
            info = _validate_audio(path, expected_s, tol_s)
        elif kind == "animation":
            info = _validate_animation(path, expected_s, tol_s)
        else:
            info = _validate_image(path)
        if size is not None and (info.width, info.height) != size:
            raise ClipFailure(
                "output_invalid",
                f"output is {info.width}x{info.height}, expected {size[0]}x{size[1]}",
            )
        return info

    return await asyncio.to_thread(check)
