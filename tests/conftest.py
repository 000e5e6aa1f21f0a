"""Shared fixtures: generated media, a loopback media server with Range, a
loopback fake of the Vidfly API, and the service itself on a real port."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from clipservice.api.protocol import make_runner
from clipservice.app import create_app
from clipservice.config import Settings
from clipservice.media.codecs import normal_scheduling
from clipservice.media.ffmpeg import bundled_ffmpeg
from tests.media_shapes import Shape, make_shape

FIXTURES = Path(__file__).parent / "fixtures"
MEDIA_SECONDS = 30
GOP_FRAMES = 60  # 2 s at 30 fps


@pytest.fixture(autouse=True)
def _normal_scheduling() -> Iterator[None]:
    """Every test starts and ends with this process's threads under the normal policy:
    an SVT-AV1 encoder opened here as root (tests encode AV1 in-process) switches threads
    to SCHED_FIFO, which every process started later (the service, workers, Chromium)
    would inherit."""
    normal_scheduling()
    yield
    normal_scheduling()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


PROBLEM_CONTENT_TYPE = "application/problem+json"


async def assert_problem(resp: aiohttp.ClientResponse, status: int | None = None) -> dict[str, Any]:
    """Check ``resp`` is RFC 9457 problem JSON and return its body.

    With ``status`` the answer must have exactly that status, else any 4xx
    (never a 5xx: hostile input is the client's fault). The body's ``status``
    matches the response's, ``type``, ``title`` and ``detail`` are strings
    (the title not empty), and no traceback leaks.
    """
    text = await resp.text()
    if status is None:
        assert 400 <= resp.status < 500, (resp.status, text)
    else:
        assert resp.status == status, (resp.status, text)
    assert resp.headers.get("Content-Type", "").startswith(PROBLEM_CONTENT_TYPE), text
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == resp.status, body
    assert isinstance(body["title"], str) and body["title"], body
    assert isinstance(body["type"], str) and isinstance(body["detail"], str), body
    assert "Traceback" not in text, text
    return body


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *args],
        check=True,
        timeout=120,
    )


def make_media(
    out: Path, seconds: int = MEDIA_SECONDS, *, prefix: str = "", crf: int = 32
) -> dict[str, Path]:
    """Separate video-only MP4 (fixed 2 s GOP), audio-only m4a, and a muxed MP4."""
    out.mkdir(parents=True, exist_ok=True)
    video = out / f"{prefix}video.mp4"
    audio = out / f"{prefix}audio.m4a"
    muxed = out / f"{prefix}muxed.mp4"
    x264 = [
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-g", str(GOP_FRAMES), "-keyint_min", str(GOP_FRAMES), "-sc_threshold", "0",
    ]  # fmt: skip
    _ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={seconds}",
        *x264, "-an", "-movflags", "+faststart", str(video),
    )  # fmt: skip
    _ffmpeg(
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}",
        "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", str(audio),
    )  # fmt: skip
    _ffmpeg(
        "-i", str(video), "-i", str(audio), "-map", "0:v", "-map", "1:a", "-c", "copy",
        "-movflags", "+faststart", str(muxed),
    )  # fmt: skip
    return {"video": video, "audio": audio, "muxed": muxed}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("media")
    files = make_media(folder)
    # A longer, heavier source, where reading only the needed ranges shows.
    long = make_media(folder, 120, prefix="long-", crf=18)
    files.update({f"long-{k}": v for k, v in long.items()})
    # Sources the cut engine must handle: H.264 with B-frames (reordered
    # frames), and a codec it cannot smart-cut (MPEG-4 Part 2).
    files["bf-video"] = folder / "bf-video.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={MEDIA_SECONDS}",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "30", "-pix_fmt", "yuv420p",
        "-g", str(GOP_FRAMES), "-keyint_min", str(GOP_FRAMES), "-sc_threshold", "0",
        "-bf", "2", "-an", "-movflags", "+faststart", str(files["bf-video"]),
    )  # fmt: skip
    files["mpeg4-video"] = folder / "mpeg4-video.mp4"
    _ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={MEDIA_SECONDS}",
        "-c:v", "mpeg4", "-q:v", "8", "-g", str(GOP_FRAMES), "-an",
        "-movflags", "+faststart", str(files["mpeg4-video"]),
    )  # fmt: skip
    return files


class Shapes:
    """Test media in YouTube's adaptive shapes (tests/media_shapes.py), each made on first use."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._made: dict[str, Shape] = {}

    def get(self, name: str) -> Shape:
        if name not in self._made:
            self._made[name] = make_shape(name, self._folder)
        return self._made[name]


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Shapes:
    return Shapes(tmp_path_factory.mktemp("shapes"))


# Names the Vidfly fixture uses, mapped to the generated files.
FIXTURE_FILES = {
    "video-1080.mp4": "video",
    "video-720.mp4": "video",
    "video-720.webm": "video",
    "muxed-360.mp4": "muxed",
    "audio.m4a": "audio",
    "audio.webm": "audio",
    "video.mp4": "video",
    "muxed.mp4": "muxed",
    "long-video.mp4": "long-video",
    "long-audio.m4a": "long-audio",
    "bf-video.mp4": "bf-video",
    "mpeg4-video.mp4": "mpeg4-video",
}


@dataclass
class MediaServer:
    """A loopback HTTP server for media files, with Range, that counts what it serves."""

    base_url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Requests under /stall/ for a Range starting past this fraction of the file hang.
    stall_after_fraction: float = 0.5
    # Requests under /slow/ are sent at this rate (a slow CDN: cuts take a while).
    slow_bytes_per_s: int = 64 * 1024
    # Set it to release the stalled requests (and stop stalling new ones).
    unstall: asyncio.Event = field(default_factory=asyncio.Event)
    # Files served besides FIXTURE_FILES (see add), by name.
    files: dict[str, Path] = field(default_factory=dict)

    def add(self, name: str, path: Path) -> str:
        """Serve ``path`` as ``name`` too (every prefix works for it); its plain URL."""
        if "/" in name or name in FIXTURE_FILES:
            raise ValueError(f"cannot serve a file as {name!r}")
        self.files[name] = path
        return self.url(name)

    def url(self, name: str, *, stall: bool = False, slow: bool = False) -> str:
        prefix = "stall/" if stall else "slow/" if slow else ""
        return f"{self.base_url}/{prefix}{name}"

    @property
    def bytes_served(self) -> int:
        return sum(r["bytes"] for r in self.requests)


async def _start_site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = make_runner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def _range(header: str | None, size: int) -> tuple[int, int]:
    """(first byte, bytes that will be sent) of a single-range request."""
    if not header or not header.startswith("bytes="):
        return 0, size
    first, _, last = header[6:].split(",")[0].partition("-")
    if not first.isdigit():
        return 0, size
    end = min(int(last), size - 1) if last.isdigit() else size - 1
    return int(first), max(0, end - int(first) + 1)


@pytest.fixture
async def media_server(media: dict[str, Path]) -> AsyncIterator[MediaServer]:
    server = MediaServer(base_url="")

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        stall = request.match_info.get("stall") is not None
        slow = request.match_info.get("slow") is not None
        expired = request.match_info.get("expired") is not None
        key = FIXTURE_FILES.get(name)
        path = media[key] if key is not None else server.files.get(name)
        if path is None:
            raise web.HTTPNotFound()
        size = path.stat().st_size
        range_header = request.headers.get("Range")
        start, length = _range(range_header, size)
        entry = {"name": name, "range": range_header, "bytes": 0}
        server.requests.append(entry)
        if stall and start > size * server.stall_after_fraction and not server.unstall.is_set():
            await server.unstall.wait()
        if expired and start > size * server.stall_after_fraction:
            # A signed stream URL that expired mid-job: the later ranges answer 403.
            raise web.HTTPForbidden()
        resp = web.StreamResponse(status=206 if range_header else 200)
        resp.content_type = "video/webm" if path.suffix == ".webm" else "video/mp4"
        resp.content_length = length
        resp.headers["Accept-Ranges"] = "bytes"
        if range_header:
            resp.headers["Content-Range"] = f"bytes {start}-{start + length - 1}/{size}"
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            # Small kernel buffers, so "sent" is close to "read by the client".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        await resp.prepare(request)
        # Count what was really sent: clients hang up once they have enough.
        with path.open("rb") as fh:
            fh.seek(start)
            left = length
            try:
                while left > 0:
                    chunk = fh.read(min(4096 if slow else 64 * 1024, left))
                    if not chunk:
                        break
                    if slow:
                        await asyncio.sleep(len(chunk) / server.slow_bytes_per_s)
                    await resp.write(chunk)
                    entry["bytes"] += len(chunk)
                    left -= len(chunk)
            except (ConnectionResetError, ConnectionError):
                return resp
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/{name}", serve)
    app.router.add_get("/{stall:stall}/{name}", serve)
    app.router.add_get("/{slow:slow}/{name}", serve)
    app.router.add_get("/{expired:expired}/{name}", serve)
    runner, server.base_url = await _start_site(app)
    yield server
    await runner.cleanup()


@dataclass
class FakeVidfly:
    """A loopback fake of the Vidfly API. The video id picks the behaviour."""

    base_url: str
    calls: list[str] = field(default_factory=list)


@pytest.fixture
async def vidfly(media_server: MediaServer) -> AsyncIterator[FakeVidfly]:
    fake = FakeVidfly(base_url="")
    template = (FIXTURES / "vidfly-response.json").read_text()

    async def download(request: web.Request) -> web.StreamResponse:
        url = request.query.get("url", "")
        fake.calls.append(url)
        video_id = url.rsplit("v=", 1)[-1]
        if video_id == "error500":
            return web.Response(status=500, text="upstream broke")
        if video_id == "malformed":
            return web.Response(text="{not json", content_type="application/json")
        if video_id == "noitems":
            return web.json_response({"code": 1, "success": False, "message": "video is private"})
        if video_id == "slowupstream":
            await asyncio.sleep(30)
        base = media_server.base_url + ("/stall" if video_id == "stall" else "")
        if video_id == "expiring" and fake.calls.count(url) == 1:
            base = media_server.base_url + "/expired"  # fresh URLs from the second call on
        body = json.loads(template.replace("{MEDIA_BASE}", base))
        body["data"]["duration"] = MEDIA_SECONDS
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/api/media/youtube/download", download)
    runner, fake.base_url = await _start_site(app)
    yield fake
    await runner.cleanup()


@dataclass
class Service:
    """The service under test, on a real loopback port."""

    base_url: str
    app: web.Application
    settings: Settings
    http: aiohttp.ClientSession
    runner: web.AppRunner | None = None

    async def stop(self) -> None:
        """Shut the service down as on SIGTERM (to restart another on the same data_dir)."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def create(self, body: dict[str, Any], **kw: Any) -> aiohttp.ClientResponse:
        return await self.http.post(f"{self.base_url}/api/create-clips", json=body, **kw)

    async def job(self, job_id: str) -> dict[str, Any]:
        async with self.http.get(f"{self.base_url}/api/check-job/{job_id}") as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    async def wait_processing_on_disk(self, job_id: str, timeout_s: float = 60) -> None:
        """Wait until the job file itself says processing (its first save is complete)."""
        path = self.settings.jobs_dir / f"{job_id}.json"
        async with asyncio.timeout(timeout_s):
            while True:
                text = await asyncio.to_thread(lambda: path.read_text() if path.exists() else "")
                if '"status":"processing"' in text:
                    return
                await asyncio.sleep(0.02)

    async def wait(self, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                doc = await self.job(job_id)
                if doc["status"] in ("finished", "failed", "cancelled"):
                    return doc
                await asyncio.sleep(0.05)


def settings_for(
    data_dir: Path, vidfly_url: str = "http://127.0.0.1:9", **sections: Any
) -> Settings:
    base = Settings().replace(
        storage={"data_dir": data_dir},
        resolver={"base_url": vidfly_url, "timeout_s": 3},
        security={"allow_private_sources": True},
        jobs={"clip_timeout_s": 60},
    )
    return base.replace(**sections) if sections else base


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def make_service(tmp_path: Path, vidfly: FakeVidfly) -> AsyncIterator[ServiceFactory]:
    services: list[Service] = []

    async def factory(data_dir: Path | None = None, **sections: Any) -> Service:
        settings = settings_for(data_dir or tmp_path / "data", vidfly.base_url, **sections)
        app = create_app(settings)
        runner, base_url = await _start_site(app)
        service = Service(base_url, app, settings, aiohttp.ClientSession(), runner)
        services.append(service)
        return service

    yield factory
    for service in reversed(services):
        await service.http.close()
        await service.stop()


@pytest.fixture
async def service(make_service: ServiceFactory) -> Service:
    return await make_service()


def ffmpeg_children(pid: int) -> list[int]:
    """The FFmpeg processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        # The command name sits in parentheses and may hold spaces or ")": split around it.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if ppid == pid and comm.startswith("ffmpeg"):
            found.append(int(entry.name))
    return found
