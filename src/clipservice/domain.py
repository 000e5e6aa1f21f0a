"""The types every layer shares: what a client asks to cut, and where its streams are.

This module is the bottom of the package: the API, the jobs, the resolvers and
the cut engine all speak these types, and it imports none of them.
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class StreamUrls:
    """Where a job's streams are: a video (maybe with audio) and an optional
    separate audio, as the resolver found them."""

    video_url: str
    audio_url: str | None = None


class StreamSummary(BaseModel):
    """One stream of a source as a preview describes it (None: not known)."""

    model_config = ConfigDict(frozen=True)

    kind: str = Field(description="video_with_audio, video_only or audio")
    container: str | None = Field(None, description="mp4, fmp4 (fragmented MP4), webm, m4a…")
    codec: str | None = Field(None, description="FFmpeg's codec name: h264, vp9, av1, aac, opus…")
    width: int | None = None
    height: int | None = None
    fps: float | None = None


# -- output options: what a clip is made into ---------------------------------------

Aspect = Literal["source", "9:16", "1:1", "4:5", "16:9"]
Fit = Literal["crop", "pad", "blur"]
OutputFormat = Literal["mp4", "m4a", "mp3", "gif", "webp", "jpg", "png"]
CaptionMode = Literal["soft", "burn"]


# What each output file is served as, by its extension.
CONTENT_TYPES = {
    ".mp4": "video/mp4",
    ".m4a": "audio/mp4",
    ".mp3": "audio/mpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".jpg": "image/jpeg",
    ".png": "image/png",
}


def content_type(name: str) -> str:
    """The MIME type a clip file of this name is served as."""
    dot = name.rfind(".")
    return CONTENT_TYPES.get(name[dot:].lower() if dot >= 0 else "", "application/octet-stream")


class Captions(_Model):
    """Subtitles to cut to the clip: WebVTT or SRT text, or a URL to fetch it from."""

    text: str | None = None
    url: str | None = None
    mode: CaptionMode = "soft"


class OutputOptions(_Model):
    """What one clip is made into: its shape, its format, its captions.

    The defaults are the plain clip (an MP4 of the source frame). Options that
    need no re-encode keep the fast paths (audio copied into an m4a, a
    thumbnail from one decoded frame); the others re-encode once.
    """

    aspect: Aspect = "source"
    fit: Fit = "crop"
    crop_x: float = Field(0.5, ge=0, le=1, description="Horizontal crop position, 0 = left.")
    max_height: int | None = Field(
        None,
        description=(
            "Output height (even): the frame is scaled to it, up as well as down (9:16 at"
            " 1920 is 1080x1920). Without it, the largest frame of the aspect that fits in"
            " the source's (never scaled up)."
        ),
    )
    format: OutputFormat = "mp4"
    fps: float | None = Field(None, description="Frame rate of a GIF or animated WebP.")
    width: int | None = Field(None, description="Width of a GIF or animated WebP.")
    thumbnail_at: float | None = Field(
        None, description="Source time of a jpg/png thumbnail (default: the clip's start)."
    )
    captions: Captions | None = None

    @property
    def is_default(self) -> bool:
        return self == OutputOptions()

    def key(self) -> str:
        """A short, stable digest of every option that changes the output (file reuse)."""
        if self.is_default:
            return ""
        blob = self.model_dump_json(exclude_defaults=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


class ClipSpec(_Model):
    """One requested clip, normalised to seconds, a concrete mode and output options."""

    index: int
    start: float
    end: float
    mode: CutMode
    attempts: int = Field(
        0, description="Times cutting this clip began (a crash mid-clip makes it begin again)."
    )
    output: OutputOptions = Field(
        default_factory=lambda: OutputOptions(),
        description="What the clip is made into (shape, format, captions).",
    )
