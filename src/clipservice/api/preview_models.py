"""Bodies of the source preview routes (``/api/sources/…``).

A module of its own, free of the media stack (PyAV), because the Python
client types its answers with the same models the handlers validate and
document with: the three never disagree.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from clipservice.api.schemas import VIDEO_ID_PATTERN, _http_url, _settings, check_one_source
from clipservice.domain import StreamSummary

# The opaque name of a previewed source in the /api/sources/{key}/… routes.
SOURCE_KEY_PATTERN = r"^[0-9a-f]{32}$"


class SourcePreviewQuery(BaseModel):
    """Query of ``GET /api/sources/preview``: one source, named as in create-clips."""

    model_config = ConfigDict(extra="forbid")

    video_id: str | None = Field(None, pattern=VIDEO_ID_PATTERN, examples=["dQw4w9WgXcQ"])
    url: str | None = Field(None, description="A page URL the resolver accepts.")
    video_url: str | None = Field(None, description="A video (or muxed) stream URL.")
    audio_url: str | None = Field(None, description="A separate audio stream URL.")

    @field_validator("url", "video_url", "audio_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> SourcePreviewQuery:
        check_one_source(self)
        settings = _settings(info)
        if settings and settings.resolver.kind == "direct" and not self.video_url:
            raise ValueError("this service resolves only video_url/audio_url (resolver: direct)")
        return self

    def fields(self) -> dict[str, str]:
        """The source fields given (what a job for this source would be created with)."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class StoryboardLinks(BaseModel):
    """Where the source's storyboard is: a JPEG sprite of thumbnails and its WebVTT index."""

    sprite_url: str = Field(description="The sprite: thumbnails in rows, left to right.")
    vtt_url: str = Field(
        description="One cue per thumbnail, its text `storyboard.jpg#xywh=x,y,w,h` "
        "(relative to this URL: the sprite)."
    )
    count: int = Field(description="Thumbnails in the sprite, at regular intervals.")
    thumb_width: int = Field(description="Width of one thumbnail in pixels.")
    columns: int = Field(description="Thumbnails a row.")


class SourcePreview(BaseModel):
    """Answer of ``GET /api/sources/preview``: what the source is, before any job.

    Every URL in it is the service's own: the preview stream and the cover
    are proxied, so a browser never talks to the source's servers.
    """

    key: str = Field(
        pattern=SOURCE_KEY_PATTERN,
        description="The source's opaque name in /api/sources/{key}/…; it expires with them.",
    )
    title: str | None = None
    duration_s: float | None = None
    cover_url: str | None = Field(None, description="The source's poster image (proxied).")
    video: StreamSummary | None = Field(None, description="The video stream a job would cut.")
    audio: StreamSummary | None = Field(
        None, description="The separate audio stream a job would cut, if any."
    )
    preview: StreamSummary | None = Field(
        None, description="The low-resolution stream the preview player and storyboard read."
    )
    preview_url: str = Field(
        description="The preview stream through the service (Range requests pass through)."
    )
    storyboard: StoryboardLinks
    expires_in_s: float = Field(
        description="Seconds the key and its URLs stay valid (the stream URLs' life)."
    )


__all__ = [
    "SOURCE_KEY_PATTERN",
    "SourcePreview",
    "SourcePreviewQuery",
    "StoryboardLinks",
    "StreamSummary",
]
