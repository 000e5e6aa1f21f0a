"""DNS rebinding is closed: a name that answers a public address to the check and a
private one to the connection reaches nothing.

The cut engine connects to the address the guard approved (pinned), and
FFmpeg connects through the egress proxy, which resolves, checks and connects
in one step. A stand-in for DNS (``guard.lookup``) lets a name change its
answer between two lookups, as a rebinding name server does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from yarl import URL

from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.media.cutter import CutSpec, Cutter, ffmpeg_failure
from clipservice.media.fetch import RangeFetcher
from clipservice.media.ffmpeg import FFmpegError, egress_proxy, run_ffmpeg
from clipservice.media.probe import _probe_with_pyav, probe_source
from clipservice.media.source import SourceIndex
from clipservice.media.storyboard import build_storyboard
from clipservice.sources import guard
from clipservice.sources.egress import EgressProxy, ffmpeg_egress
from tests.conftest import MediaServer, ServiceFactory

PUBLIC = ipaddress.ip_address("93.184.216.34")
LOOPBACK = ipaddress.ip_address("127.0.0.1")
WHITELIST = ["-protocol_whitelist", "http,https,tcp,tls,httpproxy"]


class Rebinding:
    """A name server for ``rebind.test``: the answers given in turn, then the last."""

    def __init__(self, *answers: ipaddress.IPv4Address) -> None:
        self.answers = list(answers)
        self.asked = 0

    def __call__(self, host: str, port: int) -> list[guard.IPAddress]:
        if host != "rebind.test":
            raise SourceError("source_unavailable", f"cannot resolve {host!r}")
        answer = self.answers[min(self.asked, len(self.answers) - 1)]
        self.asked += 1
        return [answer]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rebinding]:
    """``guard.lookup`` replaced: first a public answer, then loopback."""
    fake = Rebinding(PUBLIC, LOOPBACK)
    monkeypatch.setattr(guard, "lookup", fake)
    yield fake


def _rebound(media_server: MediaServer, name: str, scheme: str = "http") -> str:
    port = URL(media_server.base_url).port
    return f"{scheme}://rebind.test:{port}/{name}"


async def test_the_check_passes_then_the_connection_is_refused(
    dns: Rebinding, media_server: MediaServer
) -> None:
    """The guard's check sees the public answer; the job's index then resolves the
    name for its connections, gets loopback, and refuses: no byte is fetched."""
    url = _rebound(media_server, "video.mp4")
    await guard.check_url(url, allow_private=False)  # the first answer: public
    index = SourceIndex(url, None, allow_private=False)
    with pytest.raises(SourceError) as failure:
        await index.open()
    assert failure.value.code == "source_forbidden"
    assert dns.asked == 2
    assert media_server.requests == []


async def test_cut_connections_go_to_the_approved_address(
    monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    """Once the index approved an address, every read of the job goes there, even if
    the name answers something else afterwards (here: nothing at all)."""
    fake = Rebinding(LOOPBACK)
    monkeypatch.setattr(guard, "lookup", fake)
    url = _rebound(media_server, "video.mp4")
    index = SourceIndex(url, None, allow_private=True)
    await index.open()
    assert index.addresses[url] == "127.0.0.1"
    monkeypatch.setattr(guard, "lookup", Rebinding(PUBLIC))  # would go elsewhere now
    fetcher = RangeFetcher(url, connect_to=index.addresses[url])
    try:
        data = await asyncio.to_thread(fetcher.read, 0, 8)
    finally:
        fetcher.close()
    assert data[4:8] == b"ftyp"
    assert media_server.requests[-1]["name"] == "video.mp4"


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_ffmpeg_through_the_egress_proxy_cannot_be_rebound(
    dns: Rebinding, media_server: MediaServer, tmp_path: Path, scheme: str
) -> None:
    """FFmpeg resolves names itself; through the egress proxy it cannot: the proxy
    resolves, gets loopback after the check saw a public address, and refuses
    (a 403 FFmpeg reports), for plain requests and CONNECT tunnels alike."""
    url = _rebound(media_server, "video.mp4", scheme)
    await guard.check_url(url, allow_private=False)
    proxy = EgressProxy(allow_private=False).start()
    try:
        with pytest.raises(FFmpegError) as failure:
            await run_ffmpeg(
                ["-http_proxy", proxy.url, *WHITELIST, "-i", url, "-t", "1", "-c", "copy",
                 str(tmp_path / "o.mp4")],
                timeout_s=30,
            )  # fmt: skip
    finally:
        proxy.close()
    assert "403" in failure.value.stderr_tail
    assert proxy.stats.refused == 1
    assert media_server.requests == []
    assert not (tmp_path / "o.mp4").exists() or (tmp_path / "o.mp4").stat().st_size == 0


async def test_ffmpeg_through_the_egress_proxy_reads_allowed_sources(
    monkeypatch: pytest.MonkeyPatch, media_server: MediaServer, tmp_path: Path
) -> None:
    """Where the rules allow the address, FFmpeg's ranged reads pass through the
    proxy unchanged and the cut is made."""
    monkeypatch.setattr(guard, "lookup", Rebinding(LOOPBACK))
    proxy = EgressProxy(allow_private=True).start()
    out = tmp_path / "o.mp4"
    try:
        await run_ffmpeg(
            ["-http_proxy", proxy.url, *WHITELIST, "-ss", "3", "-i",
             _rebound(media_server, "video.mp4"), "-t", "2", "-c", "copy", str(out)],
            timeout_s=30,
        )  # fmt: skip
    finally:
        proxy.close()
    assert out.stat().st_size > 0
    assert proxy.stats.requests >= 1 and proxy.stats.refused == 0
    assert media_server.requests and all(r["name"] == "video.mp4" for r in media_server.requests)


async def test_the_proxy_answers_only_proxy_requests(media_server: MediaServer) -> None:
    """Origin-form requests, other schemes and garbage get a 4xx and no connection."""
    proxy = EgressProxy(allow_private=True).start()
    port = int(proxy.url.rsplit(":", 1)[1])
    try:
        for raw in (
            b"GET /video.mp4 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET ftp://127.0.0.1/x HTTP/1.1\r\n\r\n",
            b"CONNECT nohostport HTTP/1.1\r\n\r\n",
            b"\x16\x03\x01garbage\r\n\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            status = await reader.readline()
            writer.close()
            assert status.startswith(b"HTTP/1.1 4"), (raw, status)
    finally:
        proxy.close()
    assert media_server.requests == []


# -- the service's own FFmpeg runs and PyAV opens -------------------------------


async def test_every_ffmpeg_run_goes_through_the_process_proxy(
    dns: Rebinding, media_server: MediaServer, tmp_path: Path
) -> None:
    """Inside ``ffmpeg_egress`` no argument is needed: FFmpeg gets the proxy from
    its environment, and its refusal is reported as a policy refusal."""
    url = _rebound(media_server, "video.mp4")
    await guard.check_url(url, allow_private=False)
    async with ffmpeg_egress(allow_private=False) as proxy:
        assert proxy is not None and egress_proxy() is proxy
        with pytest.raises(FFmpegError) as failure:
            await run_ffmpeg(
                [*WHITELIST, "-i", url, "-t", "1", "-c", "copy", str(tmp_path / "o.mp4")],
                timeout_s=30,
            )
    assert egress_proxy() is None
    assert failure.value.forbidden == ["rebind.test"]
    refused = ffmpeg_failure(failure.value)
    assert refused.code == "source_forbidden" and "rebind.test" in refused.message
    assert media_server.requests == []


async def test_a_refused_pyav_probe_is_source_forbidden(
    dns: Rebinding, media_server: MediaServer
) -> None:
    """PyAV's opens (the probe of a source the service cannot index) take the same
    proxy: the rebound name is refused, not read."""
    url = _rebound(media_server, "video.mp4")
    await guard.check_url(url, allow_private=False)
    async with ffmpeg_egress(allow_private=False):
        with pytest.raises(SourceError) as failure:
            await _probe_with_pyav(url, None)
    assert failure.value.code == "source_forbidden"
    assert media_server.requests == []


async def test_a_reencoded_clip_of_a_rebound_name_fails_source_forbidden(
    monkeypatch: pytest.MonkeyPatch, media_server: MediaServer, tmp_path: Path
) -> None:
    """A whole cut: the reencode mode hands FFmpeg the source URLs; the name now
    answers loopback, so the clip fails ``source_forbidden``, nothing is read and no
    file is left."""
    info = await probe_source(media_server.url("video.mp4"), media_server.url("audio.m4a"))
    media_server.requests.clear()
    monkeypatch.setattr(guard, "lookup", Rebinding(LOOPBACK))
    streams = StreamUrls(
        video_url=_rebound(media_server, "video.mp4"),
        audio_url=_rebound(media_server, "audio.m4a"),
    )
    out = tmp_path / "clip.mp4"
    async with ffmpeg_egress(allow_private=False):
        with pytest.raises(ClipFailure) as failure:
            await Cutter().cut(
                CutSpec(
                    streams=streams, info=info, start_s=1, end_s=3, mode="reencode",
                    final=out, timeout_s=60,
                )
            )  # fmt: skip
    assert failure.value.code == "source_forbidden"
    assert media_server.requests == []
    assert not out.exists() and not list(await asyncio.to_thread(lambda: list(tmp_path.iterdir())))


@pytest.mark.parametrize("allow_private", [False, True])
async def test_the_service_runs_the_proxy_unless_private_sources_are_allowed(
    make_service: ServiceFactory, allow_private: bool
) -> None:
    """The service starts the proxy with its guard and stops it at shutdown; with
    ``allow_private_sources`` there is nothing to refuse, so FFmpeg connects directly."""
    service = await make_service(security={"allow_private_sources": allow_private})
    proxy = egress_proxy()
    assert (proxy is None) == allow_private
    await service.stop()
    assert egress_proxy() is None
    if proxy is not None:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(proxy.url.rsplit(":", 1)[1])), 1)


async def test_storyboard_keyframes_are_read_from_the_approved_address(
    monkeypatch: pytest.MonkeyPatch, media_server: MediaServer
) -> None:
    """A storyboard's keyframe reads, like a cut's, go to the address its index
    approved, not to what the name answers later (here: a public address that
    would not connect)."""
    monkeypatch.setattr(guard, "lookup", Rebinding(LOOPBACK))
    index = SourceIndex(_rebound(media_server, "video.mp4"), None, allow_private=True)
    await index.open()
    monkeypatch.setattr(guard, "lookup", Rebinding(PUBLIC))
    board = await build_storyboard(index, count=4, timeout_s=60)
    assert len(board.thumbs) == 4 and board.sprite[:2] == b"\xff\xd8"
    assert all(r["name"] == "video.mp4" for r in media_server.requests)
