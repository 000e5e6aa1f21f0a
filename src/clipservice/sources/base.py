"""What a resolver returns, and the interface every resolver implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from clipservice.domain import JobSource


@dataclass(frozen=True)
class ResolvedSource:
    """Stream URLs for one job: a video (maybe with audio) and an optional separate audio."""

    video_url: str
    audio_url: str | None = None
    title: str | None = None
    duration_s: float | None = None


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
