"""The source preview API: the document, the storyboard routes and their cache, the
Range proxy of the preview stream, the guard, auth, limits and every error as problem JSON.

Sources come from the fake Vidfly and the loopback media server of conftest; the proxy's
Range answers are checked against a server answering like a CDN (aiohttp's FileResponse:
206, 416 with Content-Range), and covers come from a stub resolver.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from clipservice.api.preview import PREVIEWS, STORYBOARD_COLUMNS, STORYBOARD_COUNT
from clipservice.api.preview_models import SourcePreview
from clipservice.domain import JobSource
from clipservice.media.storyboard import build_storyboard
from clipservice.sources.base import ResolvedSource
from tests.conftest import (
    FIXTURE_FILES,
    MEDIA_SECONDS,
    FakeVidfly,
    MediaServer,
    Service,
    ServiceFactory,
    _start_site,
    assert_problem,
)

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
# A small but real JPEG's first bytes are enough for the cover proxy: it passes bytes on.
COVER = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9"


@dataclass
class CdnServer:
    """Media answered as a CDN does (FileResponse: Range, 206, 416), and a few odd URLs."""

    base_url: str
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"


@pytest.fixture
async def cdn(media: dict[str, Path]) -> AsyncIterator[CdnServer]:
    server = CdnServer("")

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        server.requests.append((request.method, name, request.headers.get("Range")))
        if name == "cover.jpg":
            return web.Response(body=COVER, content_type="image/jpeg")
        if name == "page.html":
            return web.Response(text="<html>not media</html>", content_type="text/html")
        if name == "moved.mp4":
            raise web.HTTPFound("/muxed.mp4")
        return web.FileResponse(media[FIXTURE_FILES[name]])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    runner, server.base_url = await _start_site(app)
    yield server
    await runner.cleanup()


async def _preview(svc: Service, headers: dict[str, str] | None = None, **query: str) -> Any:
    async with svc.http.get(
        f"{svc.base_url}/api/sources/preview", params=query, headers=headers
    ) as resp:
        if resp.status != 200:
            return await assert_problem(resp, resp.status)
        assert resp.headers["Cache-Control"] == "private, no-store"
        return await resp.json()


async def _get(
    svc: Service, path: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Any]:
    async with svc.http.get(f"{svc.base_url}{path}", headers=headers) as resp:
        return resp.status, await resp.read(), resp.headers


async def test_preview_document(
    service: Service, media_server: MediaServer, vidfly: FakeVidfly
) -> None:
    """A video id gives title, duration, the chosen streams read from their containers,
    and only the service's own URLs (storyboard, cover, proxied preview), never the CDN's."""
    doc = await _preview(service, video_id="dQw4w9WgXcQ")
    SourcePreview.model_validate(doc)
    key = doc["key"]
    assert KEY_RE.match(key)
    assert doc["title"] == "Test pattern, ten minutes"
    assert doc["duration_s"] == MEDIA_SECONDS
    root = f"/api/sources/{key}"
    assert doc["preview_url"] == f"{root}/preview"
    assert doc["cover_url"] == f"{root}/cover"
    assert doc["storyboard"] == {
        "sprite_url": f"{root}/storyboard.jpg",
        "vtt_url": f"{root}/storyboard.vtt",
        "count": STORYBOARD_COUNT,
        "thumb_width": 160,
        "columns": STORYBOARD_COLUMNS,
    }
    # The job's streams as their containers say (the resolver's answer named only "1080p").
    assert doc["video"] == {
        "kind": "video_only", "container": "mp4", "codec": "h264",
        "width": 320, "height": 180, "fps": 30.0,
    }  # fmt: skip
    assert doc["audio"]["kind"] == "audio" and doc["audio"]["codec"] == "aac"
    assert doc["preview"]["kind"] == "video_with_audio" and doc["preview"]["height"] == 360
    assert 60 <= doc["expires_in_s"] <= 3600
    assert media_server.base_url not in json.dumps(doc)
    assert len(vidfly.calls) == 1


async def test_storyboard_is_build_storyboards_and_cached(
    service: Service, media_server: MediaServer, vidfly: FakeVidfly
) -> None:
    """The sprite and VTT are build_storyboard's own for the preview stream; asking again
    (document, sprite, VTT) fetches nothing more and builds nothing, even all at once."""
    doc = await _preview(service, video_id="sbcache")
    status, sprite, headers = await _get(service, doc["storyboard"]["sprite_url"])
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    status, vtt, vtt_headers = await _get(service, doc["storyboard"]["vtt_url"])
    assert status == 200 and vtt_headers["Content-Type"] == "text/vtt; charset=utf-8"

    expected = await build_storyboard(
        media_server.url("muxed-360.mp4"),
        count=STORYBOARD_COUNT,
        thumb_width=160,
        columns=STORYBOARD_COLUMNS,
        sprite_url="storyboard.jpg",
    )
    assert sprite == expected.sprite and sprite[:2] == b"\xff\xd8"
    assert vtt.decode() == expected.vtt
    assert vtt.decode().count("storyboard.jpg#xywh=") == STORYBOARD_COUNT

    previews = service.app[PREVIEWS]
    assert previews.builds == 1
    served, requests = media_server.bytes_served, len(media_server.requests)
    again = await _preview(service, video_id="sbcache")
    assert again["key"] == doc["key"]
    answers = await asyncio.gather(
        *[_get(service, doc["storyboard"][u]) for u in ("sprite_url", "vtt_url") * 3]
    )
    assert [a[1] for a in answers] == [sprite, vtt] * 3
    assert (media_server.bytes_served, len(media_server.requests)) == (served, requests)
    assert previews.builds == 1 and len(vidfly.calls) == 1

    # Another stream: six concurrent first requests still make one storyboard.
    other = await _preview(service, video_url=media_server.url("bf-video.mp4"))
    answers = await asyncio.gather(
        *[_get(service, other["storyboard"][u]) for u in ("sprite_url", "vtt_url") * 3]
    )
    assert all(a[0] == 200 for a in answers)
    assert previews.builds == 2


async def test_proxy_passes_ranges(
    service: Service, cdn: CdnServer, media: dict[str, Path]
) -> None:
    """The preview route answers Range as the CDN does (206 exact bytes, 200 whole, 416
    with Content-Range), refuses multi-ranges without asking upstream, and HEAD works."""
    whole = media["muxed"].read_bytes()
    doc = await _preview(service, video_url=cdn.url("muxed.mp4"))
    url = f"{service.base_url}{doc['preview_url']}"
    async with service.http.get(url, headers={"Range": "bytes=100-1099"}) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(whole)}"
        assert resp.headers["Content-Type"] == "video/mp4"
        assert await resp.read() == whole[100:1100]
    async with service.http.get(url, headers={"Range": f"bytes={len(whole) - 10}-"}) as resp:
        assert resp.status == 206 and await resp.read() == whole[-10:]
    async with service.http.get(url) as resp:
        assert resp.status == 200 and resp.headers["Accept-Ranges"] == "bytes"
        assert await resp.read() == whole
    async with service.http.get(url, headers={"Range": f"bytes={len(whole) + 5}-"}) as resp:
        body = await assert_problem(resp, 416)
        assert resp.headers["Content-Range"] == f"bytes */{len(whole)}"
        assert "range" in body["detail"]
    asked = len(cdn.requests)
    for bad in ("bytes=0-1,5-6", "items=0-1", "bytes=x-"):
        async with service.http.get(url, headers={"Range": bad}) as resp:
            await assert_problem(resp, 416)
    assert len(cdn.requests) == asked  # refused before any upstream request
    async with service.http.head(url, headers={"Range": "bytes=0-9"}) as resp:
        assert resp.status == 206 and resp.headers["Content-Range"].startswith("bytes 0-9/")
        assert await resp.read() == b""


async def test_proxy_streams_and_stops_with_the_browser(
    service: Service, media_server: MediaServer, media: dict[str, Path]
) -> None:
    """The proxy streams: a client that leaves after 64 KiB of a long stream makes the
    service stop reading it upstream (it never fetches the whole file first)."""
    size = media["long-muxed"].stat().st_size
    doc = await _preview(service, video_url=media_server.add("long.mp4", media["long-muxed"]))
    before = media_server.bytes_served
    async with aiohttp.ClientSession() as own:
        async with own.get(f"{service.base_url}{doc['preview_url']}") as resp:
            assert resp.status == 200 and resp.content_length == size
            first = await resp.content.readexactly(64 * 1024)
        assert first == media["long-muxed"].read_bytes()[: 64 * 1024]
    await asyncio.sleep(0.5)  # the proxy sees the hang-up and closes upstream
    assert size > 2 * 1024 * 1024
    assert media_server.bytes_served - before < size // 2


async def test_proxy_upstream_refusals(
    service: Service, cdn: CdnServer, media_server: MediaServer, media: dict[str, Path]
) -> None:
    """Upstream answers other than 200/206/416 of media are 502 problems: an HTML page, and an
    expired URL (403), which also drops the key so the next preview resolves anew."""
    # A preview stream that answers HTML (a CDN's error page, with 200).
    previews = service.app[PREVIEWS]
    original = previews.resolver
    previews.resolver = _StubResolver(
        ResolvedSource(video_url=cdn.url("muxed.mp4"), preview_url=cdn.url("page.html"))
    )
    doc = await _preview(service, video_id="htmlpreview")
    async with service.http.get(f"{service.base_url}{doc['preview_url']}") as resp:
        body = await assert_problem(resp, 502)
    assert body["code"] == "source_unavailable" and "not media" in body["detail"]

    # The media server's /expired/ URLs answer 403 past half the file.
    previews.resolver = original
    expiring = media_server.base_url + "/expired/muxed.mp4"
    doc = await _preview(service, video_url=expiring)
    url = f"{service.base_url}{doc['preview_url']}"
    late = media["muxed"].stat().st_size * 9 // 10
    async with service.http.get(url, headers={"Range": f"bytes={late}-"}) as resp:
        body = await assert_problem(resp, 502)
    assert body["code"] == "source_unavailable" and "expired" in body["detail"]
    async with service.http.get(url, headers={"Range": "bytes=0-9"}) as resp:
        await assert_problem(resp, 404)
    again = await _preview(service, video_url=expiring)
    assert again["key"] == doc["key"]  # the same URL: the same key, resolved anew


async def test_guard_refuses_loopback_without_a_request(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """With private sources refused, a loopback video_url is a 422 source_forbidden problem
    and the media server is never asked."""
    svc = await make_service(security={"allow_private_sources": False})
    body = await _preview(svc, video_url=media_server.url("muxed.mp4"))
    assert body["status"] == 422 and body["code"] == "source_forbidden"
    assert "127.0.0.1" in body["detail"] and "/muxed.mp4" not in body["detail"]
    assert media_server.requests == []


async def test_query_validation(service: Service, vidfly: FakeVidfly) -> None:
    """The query is validated like create-clips' source: every bad form is a 422 problem
    naming the query, and nothing is resolved."""
    cases: list[Any] = [
        {},
        {"video_id": "a", "url": "https://example.com/watch?v=a"},
        {"video_id": "no spaces!"},
        {"url": "ftp://example.com/x"},
        {"video_url": "https://example.com/v.mp4 x"},
        {"video_id": "a", "audio_url": "https://example.com/a.m4a"},
        {"video_id": "a", "clips": "1-2"},
        [("video_id", "a"), ("video_id", "b")],
    ]
    for query in cases:
        async with service.http.get(
            f"{service.base_url}/api/sources/preview", params=query
        ) as resp:
            body = await assert_problem(resp, 422)
        assert body["errors"] and all(e["loc"][0] == "query" for e in body["errors"]), body
    assert vidfly.calls == []


async def test_source_failures_are_problems(service: Service) -> None:
    """A source the resolver cannot resolve is a 422 problem with code source_unavailable."""
    body = await _preview(service, video_id="error500")
    assert body["status"] == 422 and body["code"] == "source_unavailable"
    assert "HTTP 500" in body["detail"]


async def test_unknown_keys_are_404(service: Service) -> None:
    """Unknown, malformed and hostile keys answer 404 problems on every key route."""
    for key in ("0" * 32, "xyz", "..", "%2e%2e", "A" * 32, "0" * 33):
        for leaf in ("storyboard.jpg", "storyboard.vtt", "cover", "preview"):
            async with service.http.get(f"{service.base_url}/api/sources/{key}/{leaf}") as resp:
                await assert_problem(resp, 404)


async def test_auth_and_owner(make_service: ServiceFactory, media_server: MediaServer) -> None:
    """With API keys every preview route needs one (401 problem), and a key's previews are
    its own: another key gets the unknown key's 404."""
    svc = await make_service(security={"api_keys": ("k-one", "k-two")})
    body = await _preview(svc, video_id="authpreview")
    assert body["status"] == 401
    for leaf in ("storyboard.jpg", "preview"):
        status, _, _ = await _get(svc, f"/api/sources/{'0' * 32}/{leaf}")
        assert status == 401
    doc = await _preview(svc, {"X-API-Key": "k-one"}, video_id="authpreview")
    status, sprite, _ = await _get(svc, doc["storyboard"]["sprite_url"], {"X-API-Key": "k-one"})
    assert status == 200 and sprite[:2] == b"\xff\xd8"
    async with svc.http.get(
        svc.base_url + doc["preview_url"], headers={"X-API-Key": "k-two"}
    ) as resp:
        await assert_problem(resp, 404)
    other = await _preview(svc, {"Authorization": "Bearer k-two"}, video_id="authpreview")
    assert other["key"] != doc["key"]


async def test_rate_limit_on_new_sources(make_service: ServiceFactory) -> None:
    """Previews of sources not cached spend the job-creation rate (429 with Retry-After);
    a cached one does not."""
    svc = await make_service(security={"allow_private_sources": True, "create_rate_per_min": 1})
    first = await _preview(svc, video_id="ratelimited1")
    assert "key" in first
    async with svc.http.get(
        f"{svc.base_url}/api/sources/preview", params={"video_id": "ratelimited2"}
    ) as resp:
        body = await assert_problem(resp, 429)
        assert int(resp.headers["Retry-After"]) >= 1
    assert "previews" in body["detail"]
    assert (await _preview(svc, video_id="ratelimited1"))["key"] == first["key"]


class _StubResolver:
    """Answers one resolved source, whatever is asked."""

    def __init__(self, resolved: ResolvedSource) -> None:
        self.resolved = resolved

    async def resolve(self, source: JobSource) -> ResolvedSource:
        return self.resolved


async def test_cover_is_proxied(service: Service, cdn: CdnServer) -> None:
    """The cover comes through the service (its bytes and type), fetched once; a cover that
    is not an image is a 502 problem, and a source without one answers 404."""
    previews = service.app[PREVIEWS]
    original = previews.resolver
    previews.resolver = _StubResolver(
        ResolvedSource(video_url=cdn.url("muxed.mp4"), cover_url=cdn.url("cover.jpg"))
    )
    doc = await _preview(service, video_id="withcover")
    asked: list[int] = []
    for _ in range(2):
        status, body, headers = await _get(service, doc["cover_url"])
        assert status == 200 and body == COVER and headers["Content-Type"] == "image/jpeg"
        asked.append(len(cdn.requests))
    assert asked[0] == asked[1]  # the second answer came from the cache

    previews.resolver = _StubResolver(
        ResolvedSource(video_url=cdn.url("video.mp4"), cover_url=cdn.url("page.html"))
    )
    doc = await _preview(service, video_id="badcover")
    async with service.http.get(service.base_url + doc["cover_url"]) as resp:
        body = await assert_problem(resp, 502)
    assert body["code"] == "source_unavailable"

    previews.resolver = original
    direct = await _preview(service, video_url=cdn.url("video-720.mp4"))
    assert direct["cover_url"] is None and direct["title"] is None
    assert direct["duration_s"] == pytest.approx(MEDIA_SECONDS, abs=0.1)
    async with service.http.get(f"{service.base_url}/api/sources/{direct['key']}/cover") as resp:
        await assert_problem(resp, 404)


async def test_redirected_stream_is_followed_by_the_guard(service: Service, cdn: CdnServer) -> None:
    """A stream URL that redirects is followed (each hop checked) before the proxy uses it."""
    doc = await _preview(service, video_url=cdn.url("moved.mp4"))
    async with service.http.get(
        service.base_url + doc["preview_url"], headers={"Range": "bytes=0-7"}
    ) as resp:
        assert resp.status == 206 and len(await resp.read()) == 8
    assert ("GET", "muxed.mp4", "bytes=0-7") in cdn.requests
