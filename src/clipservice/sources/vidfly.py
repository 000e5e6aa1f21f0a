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
from clipservice.sources.base import ResolvedSource

log = structlog.get_logger(__name__)

YOUTUBE_WATCH = "https://www.youtube.com/watch?v={video_id}"
_HEIGHT_RE = re.compile(r"(\d{3,4})\s*[pP]")
_BITRATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*k", re.IGNORECASE)


@dataclass(frozen=True)
class StreamItem:
    """One stream of the upstream answer, normalised."""

    kind: str  # video_with_audio | video_only | audio
    url: str
    ext: str
    height: int | None
    bitrate_k: float | None
    filesize: int | None


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
        items.append(
            StreamItem(kind, url, ext, height, bitrate, _to_int(_first(raw, "filesize", "size")))
        )
    return items, data


def _is_http(url: str) -> bool:
    head = url.strip()[:8].lower()
    return head.startswith(("http://", "https://"))


def choose_streams(items: list[StreamItem], max_height: int) -> tuple[str, str | None]:
    """Best video_only at or below max_height (MP4 first) + best audio (m4a first),
    else the best video_with_audio stream."""

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
        return max(videos, key=video_key).url, max(audios, key=audio_key).url
    if muxed:
        return max(muxed, key=video_key).url, None
    if videos:
        return max(videos, key=video_key).url, None
    raise SourceError("source_unavailable", "resolver answer has no usable video stream")


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
        video_url, audio_url = choose_streams(items, self._max_height)
        duration = data.get("duration")
        try:
            duration_s = float(duration) if duration is not None else None
        except (TypeError, ValueError):
            duration_s = None
        title = data.get("title")
        return ResolvedSource(
            video_url=video_url,
            audio_url=audio_url,
            title=title if isinstance(title, str) else None,
            duration_s=duration_s,
        )
