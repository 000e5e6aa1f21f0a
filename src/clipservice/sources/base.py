"""What a resolver returns, and the interface every resolver implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from clipservice.domain import JobSource


@dataclass(frozen=True)
class StreamInfo:
    """What a resolver's answer says of one stream (None: the answer does not say)."""

    kind: str  # video_with_audio | video_only | audio
    ext: str = ""  # the container's usual extension: mp4, webm, m4a…
    height: int | None = None
    # FFmpeg's codec name when the answer names a known one (h264, hevc, vp9,
    # av1, aac, opus…), else the answer's own text.
    codec: str | None = None
    fps: float | None = None
    bitrate_k: float | None = None
    filesize: int | None = None


@dataclass(frozen=True)
class ResolvedSource:
    """Stream URLs for one job: a video (maybe with audio) and an optional separate audio.

    Stream URLs live in the ``*_url`` fields only (the URL guard rewrites
    them after following redirects); ``video``, ``audio`` and ``preview``
    describe those streams as far as the resolver's answer says.
    """

    video_url: str
    audio_url: str | None = None
    title: str | None = None
    duration_s: float | None = None
    cover_url: str | None = None  # the source's poster image (for a browser to show)
    # The low-resolution stream for previews and storyboards: the lowest
    # video_with_audio stream, else the smallest video-only one. None: the
    # resolver offers none (use video_url).
    preview_url: str | None = None
    video: StreamInfo | None = None
    audio: StreamInfo | None = None
    preview: StreamInfo | None = None


class Resolver(Protocol):
    """Turns a job's source into stream URLs."""

    async def resolve(self, source: JobSource) -> ResolvedSource: ...


class DirectResolver:
    """The caller already has stream URLs: use them as they are."""

    async def resolve(self, source: JobSource) -> ResolvedSource:
        from clipservice.errors import SourceError

        if not source.video_url:
            raise SourceError(
                "source_unavailable", "the direct resolver takes only video_url/audio_url"
            )
        return ResolvedSource(video_url=source.video_url, audio_url=source.audio_url)
