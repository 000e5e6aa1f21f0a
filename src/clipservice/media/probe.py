"""Probing media with PyAV: stream parameters, duration, and output validation.

PyAV reads over HTTP with Range requests, so probing a remote source fetches
only its index and the packets it looks at. PyAV calls block, so every public
coroutine here runs its work in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import av

from clipservice.errors import ClipFailure, SourceError
from clipservice.media.fetch import FetchError
from clipservice.media.ffmpeg import SOURCE_INPUT_OPTIONS

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
    try:
        return read()
    except av.error.HTTPForbiddenError as exc:
        raise SourceError("source_unavailable", f"source answered 403: {exc}") from exc
    except av.FFmpegError as exc:
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


def _validate_sync(path: Path, expected_s: float, expect_audio: bool, tol_s: float) -> OutputInfo:
    size = path.stat().st_size if path.is_file() else 0
    if size == 0:
        raise ClipFailure("output_invalid", "output file is missing or empty")
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
            first = next(c.decode(video=0), None)
            if first is None:
                raise ClipFailure("output_invalid", "output's first video frame does not decode")
            frames = vs.frames
    except av.FFmpegError as exc:
        raise ClipFailure("output_invalid", f"output does not decode: {exc}") from exc
    if abs(vdur - expected_s) > tol_s:
        raise ClipFailure(
            "output_invalid",
            f"output lasts {vdur:.3f}s, expected {expected_s:.3f}s (±{tol_s:.3f}s)",
        )
    return OutputInfo(duration, vdur, has_audio, frames, size)


async def validate_output(
    path: Path, expected_s: float, *, expect_audio: bool, tol_s: float
) -> OutputInfo:
    """Check a cut output: non-empty, streams present, first frame decodes, duration right."""
    return await asyncio.to_thread(_validate_sync, path, expected_s, expect_audio, tol_s)
