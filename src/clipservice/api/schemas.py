"""Request and response bodies of the HTTP API.

The same models validate requests, feed the OpenAPI document and type the
Python client, so the three never disagree. Limits that depend on the
configuration come in through the validation context (``{"settings": …}``).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Protocol

from pydantic import (
    AnyUrl,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from clipservice.config import Settings
from clipservice.domain import Captions, CutMode, OutputOptions

_TIMESTAMP_RE = re.compile(r"^(?:(\d{1,3}):([0-5]\d)|(\d{1,4})):([0-5]\d)(?:\.(\d{1,6}))?$")
_SECONDS_RE = re.compile(r"^\d{1,7}(?:\.\d{1,6})?$")
VIDEO_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_URL_LENGTH = 4096
MAX_CROSSFADE_S = 2.0


# The largest time accepted (seconds): far past any video, and small enough
# that every arithmetic on it (sums of clips, float rounding, FFmpeg's
# timestamps in microseconds) stays exact and finite.
MAX_TIME_S = 10_000_000


def parse_time(value: Any) -> float:
    """Seconds (a number ≥ 0) or ``[HH:]MM:SS[.fff]`` → seconds, rounded to the microsecond.

    Every input outside 0 ≤ t ≤ ``MAX_TIME_S`` is a ValueError (a 422 to the
    client), whatever its type or size: an integer of a thousand digits is
    refused before it is ever converted to a float (which would overflow),
    non-finite floats (JSON ``1e400`` reads as infinity) are refused, and
    ``-0`` is 0.
    """
    if isinstance(value, bool):
        raise ValueError("expected seconds or [HH:]MM:SS[.fff], not a boolean")
    if isinstance(value, int):
        if not 0 <= value <= MAX_TIME_S:
            raise ValueError(f"time must be between 0 and {MAX_TIME_S} seconds")
        return float(value)
    if isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        if _SECONDS_RE.fullmatch(text):
            seconds = float(text)
        elif m := _TIMESTAMP_RE.fullmatch(text):
            hours = int(m.group(1) or 0)
            minutes = int(m.group(2) or m.group(3))
            secs = int(m.group(4))
            frac = float("0." + m.group(5)) if m.group(5) else 0.0
            seconds = hours * 3600 + minutes * 60 + secs + frac
        else:
            raise ValueError(f"{value[:40]!r} is not seconds or [HH:]MM:SS[.fff]")
    else:
        raise ValueError("expected seconds or [HH:]MM:SS[.fff]")
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_TIME_S:
        raise ValueError(f"time must be a finite number of seconds between 0 and {MAX_TIME_S}")
    return round(seconds, 6) + 0.0  # (+ 0.0 turns -0.0 into 0.0)


# A time in a request: a number or a timestamp string, parsed into seconds at
# validation, so every model and every caller after it sees a float.
TimeValue = Annotated[
    float,
    BeforeValidator(parse_time),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_TIME_S},
                {"type": "string", "pattern": f"{_SECONDS_RE.pattern}|{_TIMESTAMP_RE.pattern}"},
            ],
            "description": "Seconds (number ≥ 0) or a timestamp [HH:]MM:SS[.fff].",
            "examples": [10, "00:01:05.5"],
        }
    ),
]


def _settings(info: ValidationInfo) -> Settings | None:
    ctx = info.context
    if isinstance(ctx, dict):
        s = ctx.get("settings")
        return s if isinstance(s, Settings) else None
    return None


def _http_url(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"URL longer than {MAX_URL_LENGTH} characters")
    try:
        parsed = AnyUrl(value)
    except ValueError:
        raise ValueError("not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError("must be an http(s) URL")
    if any(ord(c) < 0x21 for c in value):
        raise ValueError("URL contains whitespace or control characters")
    return value


# Subtitles sent in a request's body are bounded by the body's own limit
# (64 KiB); longer ones come by URL (fetched under a 1 MiB cap at cut time).
MAX_CAPTIONS_CHARS = 64 * 1024


class _SourceFields(Protocol):
    video_id: str | None
    url: str | None
    video_url: str | None
    audio_url: str | None


def check_one_source(body: _SourceFields) -> None:
    """A request names exactly one source (video_id, url or video_url), and
    audio_url only beside video_url. Raises ValueError (a 422) otherwise."""
    given = [n for n in ("video_id", "url", "video_url") if getattr(body, n)]
    if len(given) != 1:
        raise ValueError("give exactly one source: video_id, url or video_url")
    if body.audio_url and not body.video_url:
        raise ValueError("audio_url goes with video_url")


class CaptionsRequest(Captions):
    """Subtitles for a clip: WebVTT or SRT text, or an http(s) URL of such a file."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=MAX_CAPTIONS_CHARS)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return _http_url(value)

    @model_validator(mode="after")
    def _one(self) -> CaptionsRequest:
        if (self.text is None) == (self.url is None):
            raise ValueError("give the captions as text or as url (one of them)")
        return self


class OutputRequest(OutputOptions):
    """What a clip is made into; every field optional (the defaults: the plain MP4).

    ``aspect`` with ``fit`` (``crop`` at ``crop_x``, ``pad``, ``blur``) and
    ``max_height`` shape the picture; ``format`` picks the file: ``mp4``,
    ``m4a``/``mp3`` (audio only), ``gif``/``webp`` (animated, ``fps`` and
    ``width``), ``jpg``/``png`` (one frame at ``thumbnail_at``); ``captions``
    are cut to the clip and muxed (``soft``) or burned in (``burn``).
    """

    model_config = ConfigDict(extra="forbid")

    max_height: int | None = Field(None, ge=0, le=100_000)
    fps: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False)
    width: int | None = Field(None, ge=0, le=100_000)
    thumbnail_at: TimeValue | None = None
    captions: CaptionsRequest | None = None

    def options(self) -> OutputOptions:
        """As the domain's options, keeping which fields were given."""
        return OutputOptions.model_validate(self.model_dump(exclude_unset=True))


class ClipRequest(BaseModel):
    """One requested time range."""

    model_config = ConfigDict(extra="forbid")

    start: TimeValue
    end: TimeValue
    mode: CutMode | None = Field(None, description="fast | accurate | reencode.")
    output: OutputRequest | None = Field(
        None, description="Output options of this clip (else the job's ``output``)."
    )

    @model_validator(mode="after")
    def _range(self, info: ValidationInfo) -> ClipRequest:
        start, end = self.start, self.end
        if start >= end:
            raise ValueError("start must be before end")
        settings = _settings(info)
        if settings and end - start > settings.jobs.max_clip_duration_s:
            raise ValueError(
                f"clip lasts {end - start:g}s, over max_clip_duration_s="
                f"{settings.jobs.max_clip_duration_s:g}"
            )
        return self


class CreateClipsRequest(BaseModel):
    """Body of ``POST /api/create-clips``: one source and 1..max_clips_per_job clips."""

    model_config = ConfigDict(
        extra="forbid",
        # Examples land in the OpenAPI document: readers and the fuzzer start from them.
        json_schema_extra={
            "examples": [
                {"video_id": "dQw4w9WgXcQ", "clips": [{"start": 10, "end": 20}]},
                {
                    "video_id": "dQw4w9WgXcQ",
                    "clips": [{"start": "00:01:05.5", "end": "00:01:12", "mode": "fast"}],
                    "mode": "accurate",
                },
                {
                    "video_url": "https://media.example.com/v.mp4",
                    "audio_url": "https://media.example.com/a.m4a",
                    "clips": [{"start": 0, "end": 5}],
                },
                {
                    "url": "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
                    "clips": [{"start": 1, "end": 2}],
                },
            ]
        },
    )

    video_id: str | None = Field(None, pattern=VIDEO_ID_PATTERN, examples=["dQw4w9WgXcQ"])
    url: str | None = Field(None, description="A page URL the resolver accepts.")
    video_url: str | None = Field(None, description="A video (or muxed) stream URL.")
    audio_url: str | None = Field(None, description="A separate audio stream URL.")
    clips: list[ClipRequest] = Field(min_length=1)
    mode: CutMode | None = Field(None, description="Default mode for clips that name none.")
    output: OutputRequest | None = Field(
        None, description="Default output options for clips that give none."
    )
    merge: bool = Field(
        False, description="Also join the job's clips, in order, into one more file (a reel)."
    )
    crossfade_s: float = Field(
        0.0,
        ge=0,
        le=MAX_CROSSFADE_S,
        allow_inf_nan=False,
        description="Crossfade between the reel's clips (0: cut straight).",
    )
    callback_url: str | None = Field(None, description="Webhook for the final job document.")

    @field_validator("url", "video_url", "audio_url", "callback_url")
    @classmethod
    def _urls(cls, value: str | None) -> str | None:
        return _http_url(value)

    @field_validator("clips")
    @classmethod
    def _clip_count(cls, value: list[ClipRequest], info: ValidationInfo) -> list[ClipRequest]:
        settings = _settings(info)
        if settings and len(value) > settings.jobs.max_clips_per_job:
            raise ValueError(
                f"{len(value)} clips, over max_clips_per_job={settings.jobs.max_clips_per_job}"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self, info: ValidationInfo) -> CreateClipsRequest:
        check_one_source(self)
        settings = _settings(info)
        total_s = sum(c.end - c.start for c in self.clips)
        if settings and total_s > settings.jobs.max_job_duration_s:
            raise ValueError(
                f"the clips last {total_s:g}s together, over max_job_duration_s="
                f"{settings.jobs.max_job_duration_s:g}"
            )
        if settings and settings.resolver.kind == "direct" and not self.video_url:
            raise ValueError("this service resolves only video_url/audio_url (resolver: direct)")
        return self


class JobCreated(BaseModel):
    """Answer of ``POST /api/create-clips`` (202)."""

    job_id: str
    status: str
    total: int
    status_url: str


class ProblemDetail(BaseModel):
    """RFC 9457 problem details, the body of every error response."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str = ""
    code: str | None = None
    errors: list[dict[str, Any]] | None = None
