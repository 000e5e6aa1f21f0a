"""What a source's preview shows before any job, and how long it may be kept.

:func:`preview_info` gathers a resolved source's title, duration, cover,
the streams a job would cut (their height, codec, frame rate and container:
from the source's container index when it is given, else from what the
resolver's answer says) and the low-resolution preview stream, the one a
storyboard (:mod:`.storyboard`) and a preview player should read.

A stream URL lives as long as its signature: YouTube's carry an
``expire=<unix time>`` parameter. :func:`cache_ttl_s` turns it into how
long a preview or storyboard made from that URL may be cached (a default
for URLs without one), :func:`cache_key` into a key that does not hold the
signed URL itself, and :class:`TTLCache` is a small in-memory cache with one
maker per key at a time, for the API layer.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from clipservice.domain import StreamSummary
from clipservice.errors import SourceError
from clipservice.media.containers.base import ContainerIndex, Track
from clipservice.media.fetch import FetchError
from clipservice.media.source import SourceIndex, Stream
from clipservice.sources.base import ResolvedSource, StreamInfo

# A URL without an expiry: its preview is kept this long.
DEFAULT_TTL_S = 3600.0
# Never longer than this, whatever the URL says (YouTube's last about 6 h).
MAX_TTL_S = 6 * 3600.0
# Dropped this long before the URL expires: a storyboard read from the cache
# is no use if the stream it came from stops answering right after.
EXPIRY_MARGIN_S = 300.0

V = TypeVar("V")


class PreviewInfo(BaseModel):
    """What the preview page shows of a source."""

    model_config = ConfigDict(frozen=True)

    title: str | None = None
    duration_s: float | None = None
    cover_url: str | None = Field(None, description="The source's poster image")
    video: StreamSummary | None = Field(None, description="The video stream a job would cut")
    audio: StreamSummary | None = Field(
        None, description="The separate audio stream a job would cut, if any"
    )
    preview: StreamSummary | None = Field(None, description="The low-resolution preview stream")
    # Signed stream URL: for the service's own reads and its proxy, never
    # sent to a client (excluded from every dump).
    preview_url: str = Field(exclude=True)


async def preview_info(resolved: ResolvedSource, index: SourceIndex | None = None) -> PreviewInfo:
    """The preview of a resolved source. With ``index`` (the source's
    :class:`SourceIndex`, opened here if it is not yet: a few small reads),
    the chosen streams are described from their containers; without it, from
    the resolver's answer alone (no read).

    Raises ``SourceError("source_unavailable")`` when the index cannot be read.
    """
    video_stream: Stream | None = None
    audio_stream: Stream | None = None
    if index is not None:
        try:
            await index.open()
        except FetchError as exc:
            raise SourceError("source_unavailable", f"reading the stream failed: {exc}") from exc
        video_stream, audio_stream = index.video, index.audio
    video_kind = "video_with_audio" if resolved.audio_url is None else "video_only"
    if video_stream is not None and resolved.audio_url is None and audio_stream is None:
        video_kind = "video_only"  # the container says: no audio at all
    video = _summary(resolved.video, video_stream, video_kind)
    audio = None
    if resolved.audio_url is not None:
        audio = _summary(resolved.audio, audio_stream, "audio")
    duration_s = resolved.duration_s
    if duration_s is None and video_stream is not None:
        duration_s = video_stream.track.duration_s
    preview = None
    if resolved.preview_url is not None:
        # (The preview stream is read by the storyboard, not here.)
        preview = _summary(resolved.preview, None, "video_with_audio")
    return PreviewInfo(
        title=resolved.title,
        duration_s=duration_s,
        cover_url=resolved.cover_url,
        video=video,
        audio=audio,
        preview=preview,
        preview_url=storyboard_url(resolved),
    )


def storyboard_url(resolved: ResolvedSource) -> str:
    """The stream a storyboard or a preview player reads: the preview stream
    (the same keyframes for far fewer bytes), else the job's video."""
    return resolved.preview_url or resolved.video_url


def _summary(info: StreamInfo | None, stream: Stream | None, kind: str) -> StreamSummary:
    """The resolver's word, corrected by the container's where it speaks."""
    track: Track | None = stream.track if stream is not None else None
    container = _container(stream.index) if stream is not None else None
    if track is None:
        return StreamSummary(
            kind=info.kind if info is not None else kind,
            container=(info.ext or None) if info is not None else None,
            codec=info.codec if info is not None else None,
            height=info.height if info is not None else None,
            fps=info.fps if info is not None else None,
        )
    fps = track.fps if track.fps is not None else (info.fps if info is not None else None)
    return StreamSummary(
        kind=kind,
        container=container,
        codec=track.codec,
        width=track.width or None,
        height=track.height or (info.height if info is not None else None),
        fps=round(fps, 3) if fps is not None else None,
    )


def _container(index: ContainerIndex) -> str:
    from clipservice.media.containers.mp4 import Mp4Index
    from clipservice.media.containers.webm import WebmIndex

    if isinstance(index, Mp4Index):
        return "fmp4" if index.fragmented else "mp4"
    if isinstance(index, WebmIndex):
        return "webm"
    return type(index).__name__


# -- caching for the URL's life ---------------------------------------------------


def url_expiry(url: str) -> float | None:
    """The Unix time a signed stream URL expires at, if it says (YouTube's
    ``expire=`` query parameter, or its ``/expire/<time>/`` path form)."""
    parts = urlsplit(url)
    values = parse_qs(parts.query).get("expire")
    if not values:
        segments = parts.path.split("/")
        values = [segments[i + 1] for i, s in enumerate(segments[:-1]) if s == "expire"]
    for value in values:
        try:
            expiry = float(value)
        except ValueError:
            continue
        if math.isfinite(expiry) and expiry > 0:
            return expiry
    return None


def cache_ttl_s(
    url: str,
    *,
    now_s: float | None = None,
    default_s: float = DEFAULT_TTL_S,
    max_s: float = MAX_TTL_S,
    margin_s: float = EXPIRY_MARGIN_S,
) -> float:
    """How long what was made from ``url`` may be cached: until the URL
    expires less ``margin_s`` (0 when that is past), ``default_s`` for a URL
    that does not say, never more than ``max_s``. ``now_s``: Unix time."""
    expiry = url_expiry(url)
    if expiry is None:
        return min(default_s, max_s)
    now = time.time() if now_s is None else now_s
    return max(0.0, min(max_s, expiry - margin_s - now))


def cache_key(kind: str, url: str, *params: object) -> str:
    """A cache key for ``kind`` ("preview", "storyboard"…) made from ``url`` with
    ``params``: a hash, so the signed URL (a secret) is not kept or logged as a key."""
    digest = hashlib.sha256()
    for part in (kind, url, *params):
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return f"{kind}:{digest.hexdigest()}"


@dataclass
class _Entry(Generic[V]):
    value: V
    expires: float


class _MakerGone(Exception):
    """The caller making a value was cancelled: a waiter makes it instead."""


class TTLCache(Generic[V]):
    """An in-memory cache whose entries expire, at most ``max_entries`` of them
    (the least recently used go first); one maker per key at a time.

    ``clock``: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self, max_entries: int = 256, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()
        self._making: dict[str, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        """The value, if it is there and has not expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: str, value: V, ttl_s: float) -> None:
        """Keep ``value`` for ``ttl_s`` seconds (not at all when that is 0 or less)."""
        if not ttl_s > 0:
            self._entries.pop(key, None)
            return
        self._entries[key] = _Entry(value, self._clock() + ttl_s)
        self._entries.move_to_end(key)
        now = self._clock()
        for old in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[old]
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    async def get_or_make(self, key: str, ttl_s: float, make: Callable[[], Awaitable[V]]) -> V:
        """The cached value, or ``await make()`` kept for ``ttl_s``. Callers
        asking for a key being made wait for that value (or its error)
        instead of making it again."""
        loop = asyncio.get_running_loop()
        while True:
            cached = self.get(key)
            if cached is not None:
                return cached
            making = self._making.get(key)
            if making is None:
                break
            try:
                # Shielded: a waiter that is cancelled does not cancel the maker.
                return await asyncio.shield(making)
            except _MakerGone:
                continue
        future: asyncio.Future[V] = loop.create_future()
        # Read every outcome so none is reported as "never retrieved".
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._making[key] = future
        try:
            value = await make()
        except asyncio.CancelledError:
            future.set_exception(_MakerGone())
            raise
        except Exception as exc:
            future.set_exception(exc)
            raise
        finally:
            if self._making.get(key) is future:
                del self._making[key]
        self.put(key, value, ttl_s)
        future.set_result(value)
        return value


__all__ = [
    "PreviewInfo",
    "StreamSummary",
    "TTLCache",
    "cache_key",
    "cache_ttl_s",
    "preview_info",
    "storyboard_url",
    "url_expiry",
]
