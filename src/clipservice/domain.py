"""The types every layer shares: what a client asks to cut, and where its streams are.

This module is the bottom of the package: the API, the jobs, the resolvers and
the cut engine all speak these types, and it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

CutMode = Literal["fast", "accurate", "reencode"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class JobSource(_Model):
    """What the client asked to cut from: exactly one of video_id, url or video_url."""

    video_id: str | None = None
    url: str | None = None
    video_url: str | None = None
    audio_url: str | None = None


class ClipSpec(_Model):
    """One requested clip, normalised to seconds and a concrete mode."""

    index: int
    start: float
    end: float
    mode: CutMode
    attempts: int = Field(
        0, description="Times cutting this clip began (a crash mid-clip makes it begin again)."
    )


@dataclass(frozen=True)
class StreamUrls:
    """Where a job's streams are: a video (maybe with audio) and an optional
    separate audio, as the resolver found them."""

    video_url: str
    audio_url: str | None = None
