"""Source previews: what a source is before any job, its storyboard, its preview stream.

The routes, all under ``/api`` (so the same API keys as jobs):

- ``GET /api/sources/preview?video_id=…`` (or ``url=``, or ``video_url=`` with
  an optional ``audio_url=``), validated like create-clips: the source is
  resolved by the app's resolver behind the URL guard (a job's own path), the
  chosen streams' container indexes are read (a few small Range reads) and a
  :class:`~clipservice.api.preview_models.SourcePreview` answers: title,
  duration, streams, and the service's own URLs of the storyboard, cover and
  preview stream under an opaque ``key``.
- ``GET /api/sources/{key}/storyboard.jpg`` and ``…/storyboard.vtt``: the
  storyboard (:func:`~clipservice.media.storyboard.build_storyboard`:
  keyframes only, read with Range) of the preview stream.
- ``GET /api/sources/{key}/cover``: the poster image, fetched through the guard.
- ``GET /api/sources/{key}/preview``: the preview stream (the low-resolution
  muxed one) proxied with the browser's Range, streamed, never buffered whole.

Everything is cached in memory for the stream URLs' life
(:func:`~clipservice.media.preview.cache_ttl_s`): the resolve by the request's
source fields, the storyboard and cover by the stream URL, each made once
however many requests ask at the same time (``TTLCache.get_or_make``). A key
names one resolve for one caller (their API key's hash is part of it), so
another key's preview answers 404 like an unknown one; it expires with the
resolve. A resolve that is not cached spends a token of the caller's bucket
at the job-creation rate (``security.create_rate_per_min``): previews cost the
upstream resolver a call, like jobs.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from pydantic import ValidationError

from clipservice.api.appkeys import GUARD, HTTP, SETTINGS
from clipservice.api.auth import CLIENT_ID, client_id
from clipservice.api.preview_models import (
    SOURCE_KEY_PATTERN,
    SourcePreview,
    SourcePreviewQuery,
    StoryboardLinks,
)
from clipservice.api.problems import validation_errors
from clipservice.api.ratelimit import RateLimiter
from clipservice.config import Settings
from clipservice.domain import JobSource
from clipservice.errors import ProblemError, SourceError
from clipservice.media.preview import (
    PreviewInfo,
    TTLCache,
    cache_key,
    cache_ttl_s,
    preview_info,
    storyboard_url,
)
from clipservice.media.source import SourceIndex
from clipservice.media.storyboard import (
    Storyboard,
    StoryboardTimeout,
    StoryboardUnsupported,
    build_storyboard,
)
from clipservice.sources.base import ResolvedSource, Resolver
from clipservice.sources.factory import make_resolver
from clipservice.sources.guard import ForbiddenAddressError, UrlGuard

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

# The storyboard every preview gets: 100 thumbnails 160 px wide, 10 a row.
STORYBOARD_COUNT = 100
STORYBOARD_THUMB_WIDTH = 160
STORYBOARD_COLUMNS = 10
# The VTT's cues name the sprite relative to the VTT's own URL (…/storyboard.vtt).
SPRITE_NAME = "storyboard.jpg"
# Storyboards built at once (each reads on 8 connections and decodes on a thread).
MAX_BUILDS = 2
# Previews and storyboards kept; the least recently used go first.
MAX_ENTRIES = 128
MAX_STORYBOARDS = 64  # a sprite of 100 thumbnails is 0.2-0.3 MB
# Indexes read for a preview's description kept for its storyboard (which the page asks
# for at once): an hour of progressive MP4 holds some 10 MB of sample tables.
MAX_KEPT_INDEXES = 4
# A key lives at least this long, even when its stream URL expires sooner.
MIN_TTL_S = 60.0
# Reading the streams' indexes to describe them: past this the preview
# describes them from the resolver's answer alone.
INDEX_TIMEOUT_S = 10.0
MAX_COVER_BYTES = 2 * 1024 * 1024
_COVER_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")
_PROXY_CHUNK_BYTES = 64 * 1024
_PROXY_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=15.0, sock_read=30.0)
_SINGLE_RANGE = re.compile(r"bytes=(?:\d{1,15}-\d{0,15}|-\d{1,15})")
_KEY_RE = re.compile(SOURCE_KEY_PATTERN)
_URL_RE = re.compile(r"(https?://[^/\s?#'\"]+)[/?#][^\s'\"]*")
# What the proxy hands on of the upstream answer.
_PASSED_HEADERS = ("Content-Length", "Content-Range", "ETag", "Last-Modified")


@dataclass(frozen=True)
class PreviewSource:
    """One resolved source: its answer, description and preview stream, until ``expires_at``."""

    resolve_key: str  # its entry in the resolve cache
    resolved: ResolvedSource
    info: PreviewInfo
    media_url: str  # the stream the storyboard and the player read
    expires_at: float  # time.monotonic()

    def ttl_s(self) -> float:
        return self.expires_at - time.monotonic()


@dataclass(frozen=True)
class _Handle:
    """What a key names: a source, for one caller."""

    owner: str | None
    source: PreviewSource


@dataclass(frozen=True)
class _Cover:
    body: bytes
    content_type: str


class SourcePreviews:
    """The preview routes' state: the resolver, the caches and the limits."""

    def __init__(self, settings: Settings, resolver: Resolver, guard: UrlGuard) -> None:
        self.settings = settings
        self.resolver = resolver
        self.guard = guard
        self.limiter = RateLimiter(settings.security.create_rate_per_min)
        self.resolves: TTLCache[PreviewSource] = TTLCache(MAX_ENTRIES)
        self.handles: TTLCache[_Handle] = TTLCache(MAX_ENTRIES)
        self.storyboards: TTLCache[Storyboard | StoryboardUnsupported] = TTLCache(MAX_STORYBOARDS)
        self.covers: TTLCache[_Cover] = TTLCache(MAX_ENTRIES)
        # By stream URL: an index already read, for the storyboard of that stream.
        self._indexes: OrderedDict[str, SourceIndex] = OrderedDict()
        self._builds = asyncio.Semaphore(MAX_BUILDS)
        self.builds = 0  # storyboards built (for tests and logs)

    # -- the preview document ----------------------------------------------------

    async def describe(self, query: SourcePreviewQuery, caller: str, owner: str | None) -> str:
        """The key of ``query``'s source for ``owner``, resolving it unless cached."""
        fields = query.fields()
        resolve_key = cache_key("resolve", repr(sorted(fields.items())))
        if self.resolves.get(resolve_key) is None:
            wait_s = self.limiter.take(caller)
            if wait_s > 0:
                limit = self.settings.security.create_rate_per_min
                raise ProblemError(
                    429,
                    "Too Many Requests",
                    f"at most {limit} previews of new sources per minute; retry later",
                    headers={"Retry-After": str(max(1, int(wait_s + 0.999)))},
                )
        # Kept with its own life once made (the URLs say how long): made once
        # for concurrent callers, then put with that life.
        source = await self.resolves.get_or_make(
            resolve_key, 0.0, lambda: self._resolve(resolve_key, fields)
        )
        self.resolves.put(resolve_key, source, source.ttl_s())
        key = cache_key("source", source.media_url, owner).partition(":")[2][:32]
        self.handles.put(key, _Handle(owner, source), source.ttl_s())
        return key

    async def _resolve(self, resolve_key: str, fields: dict[str, str]) -> PreviewSource:
        started = time.monotonic()
        resolved = await self.resolver.resolve(JobSource(**fields))
        index = SourceIndex(
            resolved.video_url,
            resolved.audio_url,
            allow_private=self.settings.security.allow_private_sources,
        )
        try:
            async with asyncio.timeout(INDEX_TIMEOUT_S):
                info = await preview_info(resolved, index)
        except SourceError as exc:
            if exc.code == "source_forbidden":
                raise
            log.warning("preview_index_unread", error=_safe(exc.message))
            info = await preview_info(resolved, None)
        except TimeoutError:
            log.warning("preview_index_unread", error=f"timed out after {INDEX_TIMEOUT_S:g} s")
            info = await preview_info(resolved, None)
        media_url = storyboard_url(resolved)
        if media_url == resolved.video_url and index.video is not None:
            self._indexes[media_url] = index
            while len(self._indexes) > MAX_KEPT_INDEXES:
                self._indexes.popitem(last=False)
        urls = [media_url, resolved.video_url] + (
            [resolved.audio_url] if resolved.audio_url else []
        )
        ttl_s = max(MIN_TTL_S, min(cache_ttl_s(url) for url in urls))
        log.info(
            "source_previewed",
            title=info.title,
            duration_s=info.duration_s,
            elapsed_s=round(time.monotonic() - started, 3),
            ttl_s=round(ttl_s),
        )
        return PreviewSource(resolve_key, resolved, info, media_url, time.monotonic() + ttl_s)

    def lookup(self, key: str, owner: str | None) -> PreviewSource:
        """The source ``key`` names for ``owner``, or the 404 of an unknown one."""
        handle = self.handles.get(key) if _KEY_RE.fullmatch(key) else None
        if handle is None or handle.owner != owner:
            raise ProblemError(
                404,
                "Preview not found",
                "no such source preview (it may have expired): ask /api/sources/preview again",
            )
        return handle.source

    def forget(self, key: str, source: PreviewSource) -> None:
        """Drop ``key`` and the resolve behind it (its stream URL expired): the
        next preview of the source resolves it anew."""
        handle = self.handles.get(key)
        if handle is not None and handle.source is source:
            self.handles.put(key, handle, 0)
        if self.resolves.get(source.resolve_key) is source:
            # (Not a newer resolve of the same source, made meanwhile.)
            self.resolves.put(source.resolve_key, source, 0)

    # -- storyboard and cover ----------------------------------------------------

    async def storyboard(self, source: PreviewSource) -> Storyboard:
        """The source's storyboard, built once for its stream URL's life."""
        key = cache_key(
            "storyboard",
            source.media_url,
            STORYBOARD_COUNT,
            STORYBOARD_THUMB_WIDTH,
            STORYBOARD_COLUMNS,
        )
        made = await self.storyboards.get_or_make(key, source.ttl_s(), lambda: self._build(source))
        if isinstance(made, StoryboardUnsupported):
            raise made
        return made

    async def _build(self, source: PreviewSource) -> Storyboard | StoryboardUnsupported:
        async with self._builds:
            # The description's index of this stream if it is still kept, else a new one.
            index = self._indexes.pop(source.media_url, None) or SourceIndex(
                source.media_url, None, allow_private=self.settings.security.allow_private_sources
            )
            try:
                board = await build_storyboard(
                    index,
                    count=STORYBOARD_COUNT,
                    thumb_width=STORYBOARD_THUMB_WIDTH,
                    columns=STORYBOARD_COLUMNS,
                    duration_s=source.info.duration_s,
                    sprite_url=SPRITE_NAME,
                )
            except StoryboardUnsupported as exc:
                # Kept like a storyboard: the source will not change its mind.
                return exc
        self.builds += 1
        log.info(
            "storyboard_built",
            thumbs=len(board.thumbs),
            keyframes=board.keyframes,
            bytes_fetched=board.bytes_fetched,
            requests=board.requests,
            elapsed_s=round(board.elapsed_s, 3),
        )
        return board

    async def cover(self, source: PreviewSource) -> _Cover:
        """The source's poster image, fetched once through the guard."""
        url = source.info.cover_url
        if url is None:
            raise ProblemError(404, "No cover", "the source has no cover image")
        return await self.covers.get_or_make(
            cache_key("cover", url), source.ttl_s(), lambda: self._fetch_cover(url)
        )

    async def _fetch_cover(self, url: str) -> _Cover:
        final = await self.guard.final_url(url)
        try:
            async with self.guard.session.get(
                final, allow_redirects=False, timeout=_PROXY_TIMEOUT
            ) as resp:
                content_type = resp.content_type
                if resp.status != 200 or content_type not in _COVER_TYPES:
                    raise SourceError(
                        "source_unavailable",
                        f"the cover answered HTTP {resp.status} ({content_type})",
                    )
                body = await resp.content.read(MAX_COVER_BYTES + 1)
        except aiohttp.ClientConnectorError as exc:
            raise _connect_failure(exc) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SourceError("source_unavailable", f"fetching the cover failed: {exc}") from exc
        if len(body) > MAX_COVER_BYTES:
            raise SourceError("source_unavailable", "the cover is larger than 2 MiB")
        return _Cover(body, content_type)


def _safe(message: str) -> str:
    """``message`` with URLs cut to their scheme and host (signed URLs are secrets)."""
    return _URL_RE.sub(lambda m: f"{m.group(1)}/…", message)


def _connect_failure(exc: aiohttp.ClientConnectorError) -> SourceError:
    if isinstance(exc.os_error, ForbiddenAddressError):
        return SourceError("source_forbidden", f"refused: {exc.os_error}")
    return SourceError("source_unavailable", f"cannot connect: {exc.os_error}")


def source_problem(exc: SourceError, *, gateway: bool = True) -> ProblemError:
    """The API's answer to a source that could not be previewed.

    ``gateway``: the failure is the stream's (or resolver's) answer to a
    request relayed for a known key: 502. Without it (the preview document)
    a source that cannot be resolved or read is the request's to fix or
    retry: 422, like one the guard refused, the ``code`` saying which.
    """
    detail = _safe(exc.message)
    if exc.code == "source_forbidden":
        return ProblemError(422, "Source refused", detail, code="source_forbidden")
    if isinstance(exc, StoryboardUnsupported):
        return ProblemError(422, "No storyboard", detail, code="storyboard_unsupported")
    if isinstance(exc, StoryboardTimeout):
        return ProblemError(504, "Storyboard timed out", detail, code="timeout")
    status = 502 if gateway else 422
    return ProblemError(status, "Source unavailable", detail, code="source_unavailable")


# -- wiring -------------------------------------------------------------------------

PREVIEWS = web.AppKey("source_previews", SourcePreviews)


async def _previews(app: web.Application) -> AsyncIterator[None]:
    # The resolver a job's sources go through (same settings, guard and session).
    settings = app[SETTINGS]
    app[PREVIEWS] = SourcePreviews(
        settings, make_resolver(settings, app[HTTP], app[GUARD]), app[GUARD]
    )
    yield


def setup(app: web.Application) -> None:
    """Add the preview routes and their state to ``app`` (after the HTTP session and guard)."""
    app.cleanup_ctx.append(_previews)
    app.add_routes(routes)


def _owner(request: web.Request) -> str | None:
    # With API keys, the caller's key hash; None without keys.
    return request.get(CLIENT_ID)


def _links(request: web.Request, key: str, source: PreviewSource) -> SourcePreview:
    base = request.app[SETTINGS].server.public_url.rstrip("/")
    root = f"{base}/api/sources/{key}"
    info = source.info
    return SourcePreview(
        key=key,
        title=info.title,
        duration_s=info.duration_s,
        cover_url=f"{root}/cover" if info.cover_url else None,
        video=info.video,
        audio=info.audio,
        preview=info.preview,
        preview_url=f"{root}/preview",
        storyboard=StoryboardLinks(
            sprite_url=f"{root}/storyboard.jpg",
            vtt_url=f"{root}/storyboard.vtt",
            count=STORYBOARD_COUNT,
            thumb_width=STORYBOARD_THUMB_WIDTH,
            columns=STORYBOARD_COLUMNS,
        ),
        expires_in_s=round(max(0.0, source.ttl_s()), 1),
    )


def _query(request: web.Request) -> SourcePreviewQuery:
    params: dict[str, Any] = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            raise ProblemError(
                422,
                "Invalid request",
                "the request failed validation",
                errors=[{"loc": ["query", name], "msg": "given more than once", "type": "value"}],
            )
        params[name] = values[0]
    try:
        return SourcePreviewQuery.model_validate(
            params, context={"settings": request.app[SETTINGS]}
        )
    except ValidationError as exc:
        errors = [{**e, "loc": ["query", *e["loc"][1:]]} for e in validation_errors(exc)]
        raise ProblemError(
            422, "Invalid request", "the request failed validation", errors=errors
        ) from None


def _cache_control(source: PreviewSource) -> str:
    return f"private, max-age={max(0, int(source.ttl_s()))}"


@routes.get("/api/sources/preview")
async def source_preview(request: web.Request) -> web.Response:
    query = _query(request)
    previews = request.app[PREVIEWS]
    try:
        key = await previews.describe(query, client_id(request), _owner(request))
    except SourceError as exc:
        raise source_problem(exc, gateway=False) from None
    doc = _links(request, key, previews.lookup(key, _owner(request)))
    return web.json_response(
        doc.model_dump(mode="json"), headers={"Cache-Control": "private, no-store"}
    )


async def _storyboard(request: web.Request) -> tuple[PreviewSource, Storyboard]:
    previews = request.app[PREVIEWS]
    source = previews.lookup(request.match_info["key"], _owner(request))
    try:
        return source, await previews.storyboard(source)
    except SourceError as exc:
        raise source_problem(exc) from None


@routes.get("/api/sources/{key}/storyboard.jpg")
async def storyboard_sprite(request: web.Request) -> web.Response:
    source, board = await _storyboard(request)
    return web.Response(
        body=board.sprite,
        content_type="image/jpeg",
        headers={"Cache-Control": _cache_control(source), "X-Content-Type-Options": "nosniff"},
    )


@routes.get("/api/sources/{key}/storyboard.vtt")
async def storyboard_vtt(request: web.Request) -> web.Response:
    source, board = await _storyboard(request)
    return web.Response(
        text=board.vtt,
        content_type="text/vtt",
        charset="utf-8",
        headers={"Cache-Control": _cache_control(source), "X-Content-Type-Options": "nosniff"},
    )


@routes.get("/api/sources/{key}/cover")
async def source_cover(request: web.Request) -> web.Response:
    previews = request.app[PREVIEWS]
    source = previews.lookup(request.match_info["key"], _owner(request))
    try:
        cover = await previews.cover(source)
    except SourceError as exc:
        raise source_problem(exc) from None
    return web.Response(
        body=cover.body,
        content_type=cover.content_type,
        headers={"Cache-Control": _cache_control(source), "X-Content-Type-Options": "nosniff"},
    )


@routes.get("/api/sources/{key}/preview")
async def preview_stream(request: web.Request) -> web.StreamResponse:
    """The preview stream, the browser's Range passed upstream and the answer streamed back.

    Upstream goes through the guard's session (its resolver refuses forbidden
    addresses at connect time) without following redirects (the URL is the
    final one the guard found). Only 200, 206 and 416 of a media type pass;
    an expired URL (403/410) drops the key, so the next preview resolves anew.
    """
    previews = request.app[PREVIEWS]
    key = request.match_info["key"]
    source = previews.lookup(key, _owner(request))
    headers = {"Accept-Encoding": "identity"}
    byte_range = request.headers.get("Range")
    if byte_range is not None:
        if not _SINGLE_RANGE.fullmatch(byte_range.strip()):
            raise ProblemError(416, "Range Not Satisfiable", "ask for a single byte range")
        headers["Range"] = byte_range.strip()
        if_range = request.headers.get("If-Range")
        if if_range:
            headers["If-Range"] = if_range
    session = previews.guard.session
    try:
        async with session.request(
            "HEAD" if request.method == "HEAD" else "GET",
            source.media_url,
            headers=headers,
            allow_redirects=False,
            timeout=_PROXY_TIMEOUT,
        ) as upstream:
            return await _relay(request, previews, key, source, upstream)
    except aiohttp.ClientConnectorError as exc:
        raise source_problem(_connect_failure(exc)) from None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise source_problem(
            SourceError("source_unavailable", f"the preview stream failed: {exc}")
        ) from None


async def _relay(
    request: web.Request,
    previews: SourcePreviews,
    key: str,
    source: PreviewSource,
    upstream: aiohttp.ClientResponse,
) -> web.StreamResponse:
    if upstream.status == 416:
        content_range = upstream.headers.get("Content-Range")
        raise ProblemError(
            416,
            "Range Not Satisfiable",
            "the range is outside the preview stream",
            headers={"Content-Range": content_range} if content_range else None,
        )
    if upstream.status in (403, 410):
        previews.forget(key, source)
        raise ProblemError(
            502,
            "Source unavailable",
            "the preview stream's URL has expired: ask /api/sources/preview again",
            code="source_unavailable",
        )
    content_type = upstream.content_type
    if upstream.status not in (200, 206):
        raise ProblemError(
            502,
            "Source unavailable",
            f"the preview stream answered HTTP {upstream.status}",
            code="source_unavailable",
        )
    if content_type == "application/octet-stream":
        preview = source.info.preview
        content_type = "video/webm" if preview and preview.container == "webm" else "video/mp4"
    if not content_type.startswith(("video/", "audio/")):
        raise ProblemError(
            502,
            "Source unavailable",
            f"the preview stream is not media ({content_type})",
            code="source_unavailable",
        )
    resp = web.StreamResponse(status=upstream.status)
    resp.content_type = content_type
    for name in _PASSED_HEADERS:
        value = upstream.headers.get(name)
        if value is not None:
            resp.headers[name] = value
    resp.headers["Accept-Ranges"] = "bytes"
    resp.headers["Cache-Control"] = _cache_control(source)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    try:
        async for chunk in upstream.content.iter_chunked(_PROXY_CHUNK_BYTES):
            await resp.write(chunk)
    except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        # The status line is gone (or the browser left): end the connection early,
        # which a client sees as a short body, never as a whole stream.
        log.info("preview_stream_cut", error=f"{type(exc).__name__}")
        resp.force_close()
    return resp


__all__ = ["PREVIEWS", "PreviewSource", "SourcePreviews", "routes", "setup", "source_problem"]
