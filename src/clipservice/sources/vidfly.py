"""Vidfly resolver: ``GET {base_url}/api/media/youtube/download?url=…``.

Upstream answers vary in practice (field names, nesting, labels), so parsing
is tolerant: it looks for the item list under several names, reads a height
from the label or explicit fields, and fails with ``source_unavailable`` and a
clear message when no usable stream is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog

from clipservice.domain import JobSource
from clipservice.errors import SourceError
from clipservice.sources.base import ResolvedSource, StreamInfo

log = structlog.get_logger(__name__)

YOUTUBE_WATCH = "https://www.youtube.com/watch?v={video_id}"
_HEIGHT_RE = re.compile(r"(\d{3,4})\s*[pP]")
_BITRATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*k", re.IGNORECASE)
_LABEL_FPS_RE = re.compile(r"\d{3,4}\s*[pP]\s*(\d{2,3})\b")
_MIME_CODECS_RE = re.compile(r'codecs\s*=\s*"?([^";]+)', re.IGNORECASE)
# Codec strings (RFC 6381, as in a MIME type, or yt-dlp's names) → FFmpeg's names.
_CODEC_PREFIXES = (
    ("avc", "h264"), ("h264", "h264"), ("hvc1", "hevc"), ("hev1", "hevc"), ("hevc", "hevc"),
    ("h265", "hevc"), ("vp09", "vp9"), ("vp9", "vp9"), ("vp8", "vp8"), ("av01", "av1"),
    ("av1", "av1"), ("mp4a", "aac"), ("aac", "aac"), ("opus", "opus"), ("vorbis", "vorbis"),
)  # fmt: skip


@dataclass(frozen=True)
class StreamItem:
    """One stream of the upstream answer, normalised."""

    kind: str  # video_with_audio | video_only | audio
    url: str
    ext: str
    height: int | None
    bitrate_k: float | None
    filesize: int | None
    codec: str | None = None  # FFmpeg's name when recognised
    fps: float | None = None

    def info(self) -> StreamInfo:
        """What the answer says of this stream, without its URL."""
        return StreamInfo(
            self.kind, self.ext, self.height, self.codec, self.fps, self.bitrate_k, self.filesize
        )


def _first(d: dict[str, Any], *names: str) -> Any:
    for n in names:
        if n in d and d[n] not in (None, ""):
            return d[n]
    return None


def _norm_kind(raw: Any, item: dict[str, Any]) -> str | None:
    text = str(raw or "").lower().replace("-", "_").replace(" ", "_")
    if text in ("video_with_audio", "muxed", "video_audio", "av"):
        return "video_with_audio"
    if text in ("video_only", "video"):
        has_audio = item.get("has_audio") or item.get("hasAudio")
        return "video_with_audio" if has_audio else "video_only"
    if text in ("audio", "audio_only"):
        return "audio"
    return None


def _codec(raw: dict[str, Any], kind: str) -> str | None:
    """The stream's codec from a codec field or a MIME type's ``codecs=``."""
    names = ("acodec", "codec", "codecs") if kind == "audio" else ("vcodec", "codec", "codecs")
    text = _first(raw, *names)
    if not isinstance(text, str):
        mime = _first(raw, "mime", "mime_type", "mimeType")
        match = _MIME_CODECS_RE.search(mime) if isinstance(mime, str) else None
        text = match.group(1) if match else None
    if not isinstance(text, str) or not text.strip():
        return None
    # A muxed stream's list names the video first ("avc1.42001E, mp4a.40.2").
    first = text.split(",")[0].strip().lower()
    return next((name for prefix, name in _CODEC_PREFIXES if first.startswith(prefix)), first)


def _fps(raw: dict[str, Any], label: str) -> float | None:
    value = _first(raw, "fps", "frame_rate", "framerate")
    try:
        fps = float(value) if value is not None else None
    except (TypeError, ValueError):
        fps = None
    if fps is None and (m := _LABEL_FPS_RE.search(label)):
        fps = float(m.group(1))
    return fps if fps is not None and 0 < fps < 1000 else None


def _to_int(v: Any) -> int | None:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def parse_items(payload: Any) -> tuple[list[StreamItem], dict[str, Any]]:
    """Find the stream list in an upstream answer; returns (items, the data object)."""
    if not isinstance(payload, dict):
        raise SourceError("source_unavailable", "resolver answer is not a JSON object")
    data = payload.get("data", payload)
    if not isinstance(data, dict):
        raise SourceError("source_unavailable", "resolver answer has no data object")
    raw_items = _first(data, "items", "formats", "medias", "streams")
    if not isinstance(raw_items, list):
        msg = payload.get("message") or payload.get("msg") or "no stream list"
        raise SourceError("source_unavailable", f"resolver answer has no streams: {msg}")
    items: list[StreamItem] = []
    for raw in raw_items:
        if not isinstance(raw, dict):
            continue
        url = _first(raw, "url", "link", "download_url")
        kind = _norm_kind(_first(raw, "type", "kind", "media_type"), raw)
        if not isinstance(url, str) or not url.strip() or not kind:
            continue
        # Non-HTTP URLs (file:, ftp:, data:, javascript:…) are kept, marked,
        # and never chosen: a resolver that offers nothing else is refused
        # as a policy matter (source_forbidden), not as a broken answer.
        label = str(_first(raw, "label", "quality", "format_note") or "")
        height = _to_int(_first(raw, "height"))
        if height is None and (m := _HEIGHT_RE.search(label)):
            height = int(m.group(1))
        bitrate = None
        if m := _BITRATE_RE.search(label):
            bitrate = float(m.group(1))
        ext = str(_first(raw, "ext", "extension", "container") or "").lower().lstrip(".")
        size = _to_int(_first(raw, "filesize", "size"))
        fps = None if kind == "audio" else _fps(raw, label)
        items.append(StreamItem(kind, url, ext, height, bitrate, size, _codec(raw, kind), fps))
    return items, data


def _is_http(url: str) -> bool:
    head = url.strip()[:8].lower()
    return head.startswith(("http://", "https://"))


def choose_streams(items: list[StreamItem], max_height: int) -> tuple[str, str | None]:
    """Best video_only at or below max_height (MP4 first) + best audio (m4a first),
    else the best video_with_audio stream: their URLs."""
    video, audio = choose_items(items, max_height)
    return video.url, audio.url if audio is not None else None


def choose_items(items: list[StreamItem], max_height: int) -> tuple[StreamItem, StreamItem | None]:
    """The streams :func:`choose_streams` picks (a video, and a separate audio or None)."""

    def video_key(i: StreamItem) -> tuple[int, int, int]:
        h = i.height or 0
        # Within the height cap, MP4 (H.264, smart-cuttable) beats a taller WebM.
        return (int(h <= max_height), int(i.ext == "mp4"), h if h <= max_height else -h)

    def audio_key(i: StreamItem) -> tuple[int, float, int]:
        return (int(i.ext in ("m4a", "mp4", "aac")), i.bitrate_k or 0.0, i.filesize or 0)

    fetchable = [i for i in items if _is_http(i.url)]
    videos = [i for i in fetchable if i.kind == "video_only"]
    audios = [i for i in fetchable if i.kind == "audio"]
    muxed = [i for i in fetchable if i.kind == "video_with_audio"]
    refused = [i for i in items if not _is_http(i.url) and i.kind != "audio"]
    if not videos and not muxed and refused:
        scheme = refused[0].url.split(":", 1)[0][:16].lower() or "?"
        raise SourceError(
            "source_forbidden",
            f"the resolver answered only non-HTTP stream URLs ({scheme}:…); only http(s) "
            "URLs are fetched",
        )
    if videos and audios:
        return max(videos, key=video_key), max(audios, key=audio_key)
    if muxed:
        return max(muxed, key=video_key), None
    if videos:
        return max(videos, key=video_key), None
    raise SourceError("source_unavailable", "resolver answer has no usable video stream")


def choose_preview(items: list[StreamItem]) -> StreamItem | None:
    """The preview stream: the lowest video_with_audio stream (a player shows it
    with sound), else the smallest video-only one; None if there is neither.

    Lowest by height; streams without one come last; then the smaller file,
    then MP4 (H.264, which every browser plays).
    """

    def small_key(i: StreamItem) -> tuple[bool, int, float, bool]:
        size = float(i.filesize) if i.filesize is not None else float("inf")
        return (i.height is None, i.height or 0, size, i.ext != "mp4")

    fetchable = [i for i in items if _is_http(i.url)]
    for kind in ("video_with_audio", "video_only"):
        candidates = [i for i in fetchable if i.kind == kind]
        if candidates:
            return min(candidates, key=small_key)
    return None


class VidflyResolver:
    """Resolves video ids and page URLs through the Vidfly API."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, timeout_s: float, max_height: int
    ) -> None:
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_height = max_height

    async def resolve(self, source: JobSource) -> ResolvedSource:
        if source.video_url:
            return ResolvedSource(video_url=source.video_url, audio_url=source.audio_url)
        if source.video_id:
            page_url = YOUTUBE_WATCH.format(video_id=source.video_id)
        elif source.url:
            page_url = source.url
        else:
            raise SourceError("source_unavailable", "job has no source")
        endpoint = f"{self._base_url}/api/media/youtube/download"
        try:
            async with self._session.get(
                endpoint, params={"url": page_url}, timeout=self._timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise SourceError("source_unavailable", f"resolver answered HTTP {resp.status}")
                payload = await resp.json(content_type=None)
        except SourceError:
            raise
        except TimeoutError as exc:
            raise SourceError("source_unavailable", "resolver timed out") from exc
        except (aiohttp.ClientError, ValueError) as exc:
            raise SourceError("source_unavailable", f"resolver request failed: {exc}") from exc
        items, data = parse_items(payload)
        return resolved_from(items, data, self._max_height)


def resolved_from(items: list[StreamItem], data: dict[str, Any], max_height: int) -> ResolvedSource:
    """The resolved source an answer's streams and data object describe."""
    video, audio = choose_items(items, max_height)
    preview = choose_preview(items)
    duration = data.get("duration")
    try:
        duration_s = float(duration) if duration is not None else None
    except (TypeError, ValueError):
        duration_s = None
    title = data.get("title")
    # The cover goes to a browser as an image URL: http(s) only.
    cover = _first(data, "cover", "thumbnail", "thumb", "cover_url", "thumbnail_url", "image")
    return ResolvedSource(
        video_url=video.url,
        audio_url=audio.url if audio is not None else None,
        title=title if isinstance(title, str) else None,
        duration_s=duration_s,
        cover_url=cover.strip() if isinstance(cover, str) and _is_http(cover) else None,
        preview_url=preview.url if preview is not None else None,
        video=video.info(),
        audio=audio.info() if audio is not None else None,
        preview=preview.info() if preview is not None else None,
    )
