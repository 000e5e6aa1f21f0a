"""The outbound URL guard: SSRF into private networks, redirects, playlists and
local files are refused, and a refused URL never receives a request."""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from clipservice.domain import StreamUrls
from clipservice.errors import SourceError
from clipservice.media import ffmpeg_args
from clipservice.media.ffmpeg import FFmpegError, bundled_ffmpeg, run_ffmpeg
from clipservice.media.probe import probe_source
from clipservice.sources.guard import (
    ForbiddenAddressError,
    UrlGuard,
    check_url,
    guarded_connector,
    is_forbidden_address,
)
from tests.conftest import FakeVidfly, MediaServer, ServiceFactory

FORBIDDEN = [
    "127.0.0.1", "127.255.255.254", "10.0.0.1", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "169.254.0.1", "100.64.0.1", "100.127.255.254", "0.0.0.0",
    "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "192.0.0.8", "198.18.0.1", "192.0.2.1", "::1", "::", "fe80::1", "fc00::1", "fd12::1",
    "ff02::1", "fec0::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
    "::127.0.0.1", "::10.1.2.3", "2002:7f00:1::", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::a00:1", "2001::1", "2001:db8::1", "fe80::1%1",
]  # fmt: skip
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8", "2002:808:808::1"]  # fmt: skip


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    """Loopback, private, link-local, shared, multicast, reserved and their IPv6 embeddings are refused."""
    assert is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses(address: str) -> None:
    """Public IPv4 and IPv6 addresses (also IPv4-mapped or 6to4 of a public one) pass."""
    assert not is_forbidden_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x", "http://localhost:8080/x", "https://[::1]/x",
        "http://[::ffff:127.0.0.1]/x", "http://[::ffff:7f00:1]/x", "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/x", "http://0x7f.1/x", "http://0177.0.0.1/x", "http://127.1/x",
        "http://0/x", "http://[fe80::1]/x", "http://10.1.2.3:9000/x", "http://100.64.1.1/x",
        "file:///etc/passwd", "ftp://example.com/x", "gopher://127.0.0.1:6379/_x",
        "data:text/plain,hi", "concat:http://a|http://b", "subfile:,start,0,end,0,:/etc/passwd",
        "http:///nohost", "not a url",
    ],
)  # fmt: skip
async def test_check_url_refuses(url: str) -> None:
    """Private hosts in every spelling (decimal, hex, octal, short forms) and non-http schemes end as source_forbidden."""
    with pytest.raises(SourceError) as info:
        await check_url(url, allow_private=False)
    assert info.value.code == "source_forbidden"


async def test_check_url_allow_private() -> None:
    """allow_private_sources lets loopback through but never other schemes."""
    await check_url("http://127.0.0.1:1/x", allow_private=True)
    with pytest.raises(SourceError):
        await check_url("file:///etc/passwd", allow_private=True)


async def test_check_url_unresolvable_is_unavailable() -> None:
    """A name that does not resolve is source_unavailable, not forbidden."""
    with pytest.raises(SourceError) as info:
        await check_url("http://no-such-host.invalid/x", allow_private=False)
    assert info.value.code == "source_unavailable"


@dataclass(frozen=True)
class Body:
    """A fixed answer of a :class:`Hop` route."""

    text: str
    content_type: str = "text/plain"


@dataclass
class Hop:
    """A loopback server that redirects, serves a playlist or counts hits."""

    base_url: str = ""
    hits: list[str] = field(default_factory=list)
    routes: dict[str, Body | str] = field(default_factory=dict)


async def _hop_server(host: str = "127.0.0.1") -> tuple[web.AppRunner, Hop]:
    hop = Hop()

    async def handle(request: web.Request) -> web.StreamResponse:
        hop.hits.append(request.path)
        target = hop.routes.get(request.path)
        if isinstance(target, str):
            raise web.HTTPFound(target)
        if target is None:
            raise web.HTTPNotFound()
        return web.Response(text=target.text, content_type=target.content_type)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    hop.base_url = f"http://{host}:{port}"
    return runner, hop


@pytest.fixture
async def hops() -> AsyncIterator[tuple[Hop, Hop]]:
    """Two servers: one on 127.0.0.1 (treated as public by a test policy) and one on 127.0.0.2."""
    r1, h1 = await _hop_server("127.0.0.1")
    r2, h2 = await _hop_server("127.0.0.2")
    yield h1, h2
    await r1.cleanup()
    await r2.cleanup()


def _only_127_0_0_2(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return str(ip) == "127.0.0.2"


async def test_redirect_hops_are_checked(hops: tuple[Hop, Hop]) -> None:
    """A redirect to a forbidden address is refused before any request reaches it."""
    public, private = hops
    public.routes["/a"] = "/b"
    public.routes["/b"] = f"{private.base_url}/secret"
    async with UrlGuard(allow_private=False, policy=_only_127_0_0_2) as guard:
        with pytest.raises(SourceError) as info:
            await guard.final_url(f"{public.base_url}/a")
    assert info.value.code == "source_forbidden"
    assert public.hits == ["/a", "/b"]
    assert private.hits == []


async def test_redirect_via_hostname_is_checked(hops: tuple[Hop, Hop]) -> None:
    """A redirect to a name that resolves to a forbidden address is refused too."""
    public, _private = hops
    public.routes["/a"] = "http://localhost:1/x"
    async with UrlGuard(allow_private=False) as guard:
        with pytest.raises(SourceError) as info:
            await guard.final_url("http://localhost:1/x")
    assert info.value.code == "source_forbidden"


async def test_redirects_resolved_to_final_url(hops: tuple[Hop, Hop]) -> None:
    """Allowed redirect chains end at the final URL; loops end as source_unavailable."""
    public, _ = hops
    public.routes["/a"] = "/b"
    public.routes["/b"] = "/c"
    public.routes["/c"] = Body("ok")
    public.routes["/loop"] = "/loop"
    async with UrlGuard(allow_private=True) as guard:
        assert await guard.final_url(f"{public.base_url}/a") == f"{public.base_url}/c"
        with pytest.raises(SourceError) as info:
            await guard.final_url(f"{public.base_url}/loop")
    assert info.value.code == "source_unavailable"


async def test_guarded_connector_refuses_private_names(hops: tuple[Hop, Hop]) -> None:
    """A session on the guarded connector (for webhooks) cannot connect to a name that resolves to loopback."""
    public, _ = hops
    port = public.base_url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession(connector=guarded_connector(allow_private=False)) as s:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            await s.get(f"http://localhost:{port}/x")
    assert isinstance(info.value.os_error, ForbiddenAddressError)
    assert public.hits == []


async def test_ffmpeg_and_pyav_do_not_follow_redirects(
    hops: tuple[Hop, Hop], media_server: MediaServer, tmp_path: Path
) -> None:
    """PyAV probing and FFmpeg cutting refuse a redirect themselves (max_redirects=0)."""
    public, _ = hops
    public.routes["/r"] = media_server.url("muxed.mp4")
    with pytest.raises(SourceError):
        await probe_source(f"{public.base_url}/r", None)
    args = ffmpeg_args.reencode_args(
        StreamUrls(f"{public.base_url}/r", None), 0, 1, str(tmp_path / "o.mp4")
    )
    with pytest.raises(FFmpegError):
        await run_ffmpeg(args, timeout_s=30)
    assert media_server.requests == []


@pytest.fixture(scope="module")
def secret_ts(tmp_path_factory: pytest.TempPathFactory, media: dict[str, Path]) -> Path:
    """A valid MPEG-TS file on local disk that a playlist will try to read."""
    out = tmp_path_factory.mktemp("secret") / "secret.ts"
    subprocess.run(
        [bundled_ffmpeg(), "-loglevel", "error", "-y", "-i", str(media["muxed"]), "-c", "copy", "-f", "mpegts", str(out)],
        check=True,
        timeout=60,
    )  # fmt: skip
    return out


async def test_playlists_cannot_read_files_or_reach_hosts(
    hops: tuple[Hop, Hop], media_server: MediaServer, secret_ts: Path, tmp_path: Path
) -> None:
    """HLS and concat playlists (local file, loopback segment) are refused by probe and by FFmpeg."""
    public, _ = hops
    segment = media_server.url("muxed.mp4")
    bodies = {
        "/file.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:30\n#EXTINF:30,\nfile://{secret_ts}\n#EXT-X-ENDLIST\n",
        "/net.m3u8": f"#EXTM3U\n#EXT-X-TARGETDURATION:30\n#EXTINF:30,\n{segment}\n#EXT-X-ENDLIST\n",
        "/list.ffconcat": f"ffconcat version 1.0\nfile '{secret_ts}'\n",
    }
    for path, text in bodies.items():
        public.routes[path] = Body(text, "application/vnd.apple.mpegurl")
        url = public.base_url + path
        with pytest.raises(SourceError):
            await probe_source(url, None)
        out = tmp_path / "o.mp4"
        args = ffmpeg_args.reencode_args(StreamUrls(url, None), 0, 1, str(out))
        with pytest.raises(FFmpegError):
            await run_ffmpeg(args, timeout_s=30)
        assert not out.exists() or out.stat().st_size == 0
    assert media_server.requests == []


async def test_service_refuses_loopback_direct_url(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """With allow_private_sources=false a loopback video_url fails the job as source_forbidden and gets zero requests."""
    svc = await make_service(security={"allow_private_sources": False})
    async with await svc.create(
        {
            "video_url": media_server.url("video.mp4"),
            "audio_url": media_server.url("audio.m4a"),
            "clips": [{"start": 1, "end": 2}],
        }
    ) as r:
        assert r.status == 202
        job_id = (await r.json())["job_id"]
    doc = await svc.wait(job_id)
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "source_forbidden"
    assert "?" not in doc["error"]["message"]
    assert media_server.requests == []


async def test_service_refuses_loopback_from_resolver(
    make_service: ServiceFactory, media_server: MediaServer, vidfly: FakeVidfly
) -> None:
    """Stream URLs in the (trusted) resolver's answer that point at loopback are refused; no request reaches them."""
    svc = await make_service(security={"allow_private_sources": False})
    async with await svc.create(
        {"video_id": "dQw4w9WgXcQ", "clips": [{"start": 1, "end": 2}]}
    ) as r:
        job_id = (await r.json())["job_id"]
    doc = await svc.wait(job_id)
    assert doc["error"]["code"] == "source_forbidden"
    assert len(vidfly.calls) == 1
    assert media_server.requests == []


async def test_service_follows_checked_redirect(
    make_service: ServiceFactory, media_server: MediaServer, hops: tuple[Hop, Hop]
) -> None:
    """A video_url that redirects to the media is resolved hop by hop and FFmpeg gets the final URL."""
    public, _ = hops
    public.routes["/v"] = media_server.url("muxed.mp4")
    svc = await make_service()
    async with await svc.create(
        {"video_url": f"{public.base_url}/v", "clips": [{"start": 1, "end": 2, "mode": "fast"}]}
    ) as r:
        job_id = (await r.json())["job_id"]
    doc = await svc.wait(job_id)
    assert doc["status"] == "finished", doc
    assert public.hits == ["/v"]


@pytest.mark.parametrize(
    "stream_url",
    [
        "file:///etc/passwd",
        "FILE:///proc/self/environ",
        "ftp://127.0.0.1/video.mp4",
        "data:video/mp4;base64,AAAAIGZ0eXBpc29t",
        "gopher://127.0.0.1:6379/_INFO",
        "//cdn.example/v.mp4",
    ],
)
async def test_non_http_urls_from_the_resolver_are_forbidden(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path, stream_url: str
) -> None:
    """A resolver answer whose stream URLs are not http(s) is a policy refusal:
    the job fails with source_forbidden, nothing is fetched, no file is read."""
    answers: list[str] = []

    async def download(request: web.Request) -> web.Response:
        answers.append(request.query.get("url", ""))
        return web.json_response({"data": {"items": [
            {"type": "video_only", "label": "720p", "ext": "mp4", "url": stream_url},
            {"type": "audio", "label": "128kbps", "ext": "m4a", "url": stream_url},
            {"type": "video_with_audio", "label": "360p", "ext": "mp4", "url": stream_url},
        ]}})  # fmt: skip

    app = web.Application()
    app.router.add_get("/api/media/youtube/download", download)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        svc = await make_service(
            resolver={"base_url": f"http://127.0.0.1:{port}"},
            security={"allow_private_sources": True},
        )
        async with await svc.create(
            {"video_id": "dQw4w9WgXcQ", "clips": [{"start": 1, "end": 2}]}
        ) as r:
            job_id = (await r.json())["job_id"]
        doc = await svc.wait(job_id)
    finally:
        await runner.cleanup()
    assert answers, "the resolver was asked"
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "source_forbidden", doc["error"]
    assert "non-HTTP" in doc["error"]["message"]
    assert media_server.requests == []
    clips = svc.settings.clips_dir
    assert not clips.exists() or list(clips.iterdir()) == []
