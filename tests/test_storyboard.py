"""Storyboards and previews: keyframe thumbnails read with Range, the sprite,
its WebVTT index, what is fetched, the errors; the resolver's preview fields;
the preview summary and its cache.

Sources are the shapes of ``tests/media_shapes.py`` (12 s, 320x180, a
keyframe every 2 s) over the loopback media server. The oracle is PyAV
decoding the local file: each tile must show the keyframe the storyboard
names, closer to it than to the keyframes around it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest
from av.video.reformatter import VideoReformatter

from clipservice.domain import JobSource
from clipservice.errors import SourceError
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.preview import (
    PreviewInfo,
    TTLCache,
    cache_key,
    cache_ttl_s,
    preview_info,
    storyboard_url,
    url_expiry,
)
from clipservice.media.source import SourceIndex
from clipservice.media.storyboard import (
    HEAD_BYTES,
    Storyboard,
    StoryboardTimeout,
    StoryboardUnsupported,
    Thumb,
    build_storyboard,
    cue_spans,
    storyboard_vtt,
)
from clipservice.sources.base import ResolvedSource
from clipservice.sources.vidfly import VidflyResolver, choose_preview, parse_items, resolved_from
from tests.conftest import FIXTURES, MEDIA_SECONDS, FakeVidfly, MediaServer, Shapes

THUMB = (160, 90)  # a 320x180 source at 160 wide
# Five cues over 12 s start at 0, 2.4, 4.8, 7.2, 9.6: the nearest keyframes
# (every 2 s) are before, before, before, after and after them.
FIVE_KEYS_S = [0.0, 2.0, 4.0, 8.0, 10.0]
SHAPES = ("progressive", "dash_fmp4", "fmp4_nosidx", "webm_vp9", "av1_fmp4", "hevc_mp4")


@dataclass(frozen=True)
class Keyframe:
    """A keyframe of a local file: user time, its bytes' place, its picture's luma."""

    time_s: float
    pos: int
    size: int
    luma: bytes  # scaled to THUMB, rows packed


def _luma(frame: Any) -> bytes:
    """A frame's Y plane without the line padding."""
    plane = frame.planes[0]
    data = bytes(plane)
    return b"".join(
        data[row * plane.line_size : row * plane.line_size + frame.width]
        for row in range(frame.height)
    )


def _keyframes(path: Path) -> list[Keyframe]:
    """Every keyframe of the file's video, decoded by PyAV, in user time (0 = first frame)."""
    reformatter = VideoReformatter()
    places: dict[int, tuple[int, int]] = {}
    pictures: dict[int, bytes] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            if packet.is_keyframe:
                places[packet.pts] = (packet.pos, packet.size)
            for frame in packet.decode():
                if frame.pts in places or frame.key_frame:
                    small = reformatter.reformat(
                        frame, width=THUMB[0], height=THUMB[1], format="yuvj420p",
                        interpolation="AREA",
                    )  # fmt: skip
                    pictures[frame.pts] = _luma(small)
        tb = stream.time_base
    assert tb is not None
    first = min(places)
    return [
        Keyframe(float((pts - first) * tb), *places[pts], pictures[pts])
        for pts in sorted(places)
        if pts in pictures
    ]


def _mad(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def _decode_jpeg(data: bytes) -> Any:
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9", "not a JPEG"
    dec = av.CodecContext.create("mjpeg", "r")
    frames = list(dec.decode(av.Packet(data))) + list(dec.decode(None))
    assert len(frames) == 1
    return frames[0]


def _tile(sprite: Any, x: int, y: int, w: int, h: int) -> bytes:
    plane = sprite.planes[0]
    data = bytes(plane)
    return b"".join(
        data[(y + r) * plane.line_size + x : (y + r) * plane.line_size + x + w] for r in range(h)
    )


def _serve(media_server: MediaServer, path: Path) -> str:
    return media_server.add(path.name, path)


def _requests_for(media_server: MediaServer, name: str, since: int = 0) -> list[dict[str, Any]]:
    return [r for r in media_server.requests[since:] if r["name"] == name]


def _range(entry: dict[str, Any]) -> tuple[int, int]:
    first, _, last = entry["range"][len("bytes=") :].partition("-")
    return int(first), int(last) + 1


# -- the sprite and its index ----------------------------------------------------------


@pytest.mark.parametrize("name", SHAPES)
async def test_tiles_are_the_nearest_keyframes(
    name: str, shapes: Shapes, media_server: MediaServer
) -> None:
    """Each tile is the source's keyframe nearest to its cue's start (before or
    after it), by pixels: closer to that keyframe than to its neighbours; the
    sprite is a JPEG of columns x rows tiles, blank cells left black."""
    shape = shapes.get(name)
    url = _serve(media_server, shape.files["video"])
    board = await build_storyboard(url, count=5, thumb_width=THUMB[0], columns=3)
    assert [t.frame_s for t in board.thumbs] == pytest.approx(FIVE_KEYS_S, abs=1e-3)
    assert (board.width, board.height, board.columns, board.rows) == (480, 180, 3, 2)
    sprite = _decode_jpeg(board.sprite)
    assert (sprite.width, sprite.height) == (480, 180)
    keys = {round(k.time_s, 3): k for k in _keyframes(shape.files["video"])}
    assert sorted(keys)[:6] == pytest.approx([0, 2, 4, 6, 8, 10], abs=1e-3)
    for thumb in board.thumbs:
        assert (thumb.width, thumb.height) == THUMB
        shown = _tile(sprite, thumb.x, thumb.y, thumb.width, thumb.height)
        assert thumb.frame_s is not None
        own = _mad(shown, keys[round(thumb.frame_s, 3)].luma)
        others = [
            _mad(shown, keys[t].luma) for t in (thumb.frame_s - 2, thumb.frame_s + 2) if t in keys
        ]
        assert own < 4, (thumb, own)
        assert all(own * 3 < other for other in others), (thumb, own, others)
    blank = _tile(sprite, 320, 90, 160, 90)
    assert max(blank) < 24  # black, give or take JPEG ringing at its edge


async def test_vtt_cues_cover_the_duration_and_point_at_their_tiles(
    shapes: Shapes, media_server: MediaServer
) -> None:
    """The WebVTT index has one cue per tile, back to back from 0 to the end,
    each pointing at its tile's rectangle of the sprite, row by row."""
    shape = shapes.get("dash_fmp4")
    url = _serve(media_server, shape.files["video"])
    board = await build_storyboard(
        url, interval_s=5, thumb_width=80, columns=2, sprite_url="/s/sprite.jpg"
    )
    lines = board.vtt.split("\n")
    assert lines[0] == "WEBVTT" and lines[1] == ""
    cues = [lines[i : i + 2] for i in range(2, len(lines) - 1, 3)]
    assert len(cues) == len(board.thumbs) == 3  # 0-5, 5-10, 10-12
    expected_times = [
        "00:00:00.000 --> 00:00:05.000",
        "00:00:05.000 --> 00:00:10.000",
        "00:00:10.000 --> 00:00:12.000",
    ]
    assert [c[0] for c in cues] == expected_times
    assert [c[1] for c in cues] == [
        "/s/sprite.jpg#xywh=0,0,80,46",
        "/s/sprite.jpg#xywh=80,0,80,46",
        "/s/sprite.jpg#xywh=0,46,80,46",
    ]
    assert board.duration_s == pytest.approx(12.0, abs=0.05)
    assert (board.width, board.height) == (160, 92)


async def test_jpeg_quality_sets_the_quantiser(shapes: Shapes, media_server: MediaServer) -> None:
    """A coarser quantiser makes a smaller sprite of the same tiles."""
    url = _serve(media_server, shapes.get("progressive").files["video"])
    fine = await build_storyboard(url, count=4, jpeg_quality=2)
    coarse = await build_storyboard(url, count=4, jpeg_quality=20)
    assert len(coarse.sprite) * 2 < len(fine.sprite)
    assert (coarse.width, coarse.height) == (fine.width, fine.height)


def test_cue_spans_and_vtt_times() -> None:
    """Cues split the duration evenly (count) or by interval (the last one
    shorter), and VTT times carry hours."""
    spans = cue_spans(3600.0, interval_s=36)
    assert len(spans) == 100 and spans[0] == (0, 36) and spans[-1] == (3564, 3600)
    assert cue_spans(10.0, interval_s=3)[-1] == (9, 10.0)
    assert cue_spans(10.0, count=4)[1] == (2.5, 5.0)
    assert len(cue_spans(10.0)) == 100  # the default count
    with pytest.raises(ValueError):
        cue_spans(3600.0, interval_s=1)  # more than MAX_THUMBS
    vtt = storyboard_vtt([], "x.jpg")
    assert vtt.startswith("WEBVTT\n")
    late = [Thumb(3599.5, 3725.25, 3600.0, 0, 0, 10, 6)]
    assert "00:59:59.500 --> 01:02:05.250\nx.jpg#xywh=0,0,10,6" in storyboard_vtt(late, "x.jpg")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0},
        {"count": 5, "interval_s": 2},
        {"interval_s": -1},
        {"thumb_width": 4},
        {"columns": 0},
        {"columns": 200, "thumb_width": 160},
        {"jpeg_quality": 1},
    ],
)
async def test_impossible_parameters_are_refused_before_any_read(
    kwargs: dict[str, Any], media_server: MediaServer
) -> None:
    """Parameters that cannot make a storyboard raise ValueError without a read."""
    with pytest.raises(ValueError):
        await build_storyboard(media_server.url("video.mp4"), **kwargs)
    assert media_server.requests == []


# -- what is read ------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "keyframes"), [(5, 5), (40, 6)])
@pytest.mark.parametrize("name", ["progressive", "dash_fmp4", "webm_vp9"])
async def test_only_keyframe_bytes_are_fetched(
    name: str, count: int, keyframes: int, shapes: Shapes, media_server: MediaServer
) -> None:
    """Past the container index, every request reads bytes of a keyframe the
    storyboard shows (a fragment's or Cluster's head holds its moof or block
    header too), at most two requests a keyframe, no byte twice (keyframes
    shared by several tiles are read once), no more than a head over each
    keyframe's size; every shown keyframe is read whole."""
    shape = shapes.get(name)
    path = shape.files["video"]
    url = _serve(media_server, path)
    index = SourceIndex(url, None)
    await index.open()
    since = len(media_server.requests)
    board = await build_storyboard(index, count=count, thumb_width=80)
    keys = {round(k.time_s, 3): k for k in _keyframes(path)}
    shown = {keys[round(t.frame_s, 3)] for t in board.thumbs if t.frame_s is not None}
    assert len(shown) == board.keyframes == keyframes
    reads = sorted(_range(r) for r in _requests_for(media_server, path.name, since))
    assert len(reads) == board.requests <= 2 * len(shown)
    assert all(b <= c for (_, b), (c, _) in pairwise(reads)), reads
    assert sum(b - a for a, b in reads) == board.bytes_fetched
    assert board.keyframe_bytes == sum(k.size for k in shown)
    assert board.bytes_fetched <= board.keyframe_bytes + len(shown) * HEAD_BYTES
    for a, b in reads:
        assert any(a < k.pos + k.size and k.pos < b for k in shown), (a, b)
    for k in shown:
        covered = [(max(a, k.pos), min(b, k.pos + k.size)) for a, b in reads]
        at = k.pos
        for a, b in covered:
            if a <= at < b:
                at = b
        assert at >= k.pos + k.size, f"keyframe at {k.pos} not read whole"
    if name == "progressive":
        # The sample table gives each keyframe's bytes: one exact read each.
        assert sorted(reads) == sorted((k.pos, k.pos + k.size) for k in shown)


async def test_a_long_source_costs_a_small_part_of_its_bytes(
    media: dict[str, Path], media_server: MediaServer
) -> None:
    """A 2-minute source at high quality: the storyboard (index included)
    reads under a tenth of the file, in one request per keyframe plus the
    index's few."""
    url = media_server.url("long-video.mp4")
    board = await build_storyboard(url, count=20, thumb_width=80)
    served = sum(r["bytes"] for r in _requests_for(media_server, "long-video.mp4"))
    assert served == board.bytes_fetched
    assert served * 10 < media["long-video"].stat().st_size
    assert board.keyframes == 20
    assert board.requests == len(media_server.requests) <= 20 + 3


# -- errors -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mpegts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ts = tmp_path_factory.mktemp("ts") / "source.ts"
    subprocess.run(
        [
            bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-f", "lavfi",
            "-i", "testsrc2=size=160x90:rate=30:duration=2", "-c:v", "libx264",
            "-preset", "ultrafast", "-f", "mpegts", str(ts),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    return ts


async def test_a_source_without_a_keyframe_index_is_a_clear_error(
    mpegts: Path, media_server: MediaServer
) -> None:
    """MPEG-TS has no index the service reads: StoryboardUnsupported
    (source_unavailable) saying so, from a URL or a SourceIndex, after a
    single read of its head."""
    ts = mpegts
    url = _serve(media_server, ts)
    with pytest.raises(StoryboardUnsupported) as info:
        await build_storyboard(url, count=4)
    assert info.value.code == "source_unavailable"
    assert (
        "no keyframe index" in info.value.message and "neither MP4 nor WebM" in info.value.message
    )
    assert len(_requests_for(media_server, ts.name)) == 1
    with pytest.raises(StoryboardUnsupported):
        await build_storyboard(SourceIndex(url, None), count=4)


async def test_a_non_http_url_is_forbidden() -> None:
    """A file: URL is refused as source_forbidden, nothing read."""
    with pytest.raises(SourceError) as info:
        await build_storyboard("file:///etc/passwd", count=4)
    assert info.value.code == "source_forbidden"


async def test_an_expired_url_is_source_unavailable(
    shapes: Shapes, media_server: MediaServer
) -> None:
    """Keyframes in the second half answer 403 (an expired signature): a
    SourceError source_unavailable that says the URL expired."""
    path = shapes.get("progressive").files["video"]
    _serve(media_server, path)
    url = f"{media_server.base_url}/expired/{path.name}"
    with pytest.raises(SourceError) as info:
        await build_storyboard(url, count=6)
    assert info.value.code == "source_unavailable" and "expired" in info.value.message


async def test_a_stalled_source_ends_at_the_time_budget(
    shapes: Shapes, media_server: MediaServer
) -> None:
    """Reads past half the file hang: StoryboardTimeout (source_unavailable) at
    the budget, not a hang."""
    path = shapes.get("dash_fmp4").files["video"]
    _serve(media_server, path)
    url = media_server.url(path.name, stall=True)
    try:
        with pytest.raises(StoryboardTimeout) as info:
            await build_storyboard(url, count=6, timeout_s=1.0)
        assert info.value.code == "source_unavailable"
    finally:
        media_server.unstall.set()


# -- the resolver and the preview ---------------------------------------------------------


async def test_the_resolver_reports_the_preview_fields(
    vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """From the fixture answer: title, duration, cover, the preview stream (the
    only video_with_audio one, 360p), and what the chosen streams are; the URLs
    chosen for jobs are unchanged."""
    async with aiohttp.ClientSession() as session:
        resolver = VidflyResolver(session, vidfly.base_url, 3, 1080)
        resolved = await resolver.resolve(JobSource(video_id="abc"))
    base = media_server.base_url
    assert resolved.video_url == f"{base}/video-1080.mp4"
    assert resolved.audio_url == f"{base}/audio.m4a"
    assert resolved.title == "Test pattern, ten minutes"
    assert resolved.duration_s == MEDIA_SECONDS
    assert resolved.cover_url == f"{base}/cover.jpg"
    assert resolved.preview_url == f"{base}/muxed-360.mp4"
    assert resolved.preview is not None and resolved.preview.height == 360
    assert resolved.preview.kind == "video_with_audio" and resolved.preview.ext == "mp4"
    assert resolved.video is not None and (resolved.video.height, resolved.video.ext) == (
        1080,
        "mp4",
    )
    assert resolved.audio is not None and resolved.audio.ext == "m4a"
    assert storyboard_url(resolved) == resolved.preview_url


def test_preview_stream_choice_codecs_and_cover() -> None:
    """Without a muxed stream the smallest video-only is the preview; codecs
    come from codec fields or MIME types, frame rates from fields or labels;
    a non-HTTP cover is dropped."""
    payload = {
        "data": {
            "title": "t",
            "cover": "javascript:alert(1)",
            "items": [
                {"type": "video_only", "label": "1080p60", "ext": "mp4", "url": "https://h/1080",
                 "mimeType": 'video/mp4; codecs="avc1.640028"'},
                {"type": "video_only", "label": "144p", "ext": "webm", "url": "https://h/144w",
                 "vcodec": "vp09.00.11.08", "filesize": 900},
                {"type": "video_only", "label": "144p", "ext": "mp4", "url": "https://h/144",
                 "codec": "av01.0.00M.08", "fps": 30, "filesize": 800},
                {"type": "video_only", "label": "240p", "url": "ftp://h/tiny"},
                {"type": "audio", "label": "128kbps", "ext": "m4a", "url": "https://h/a",
                 "mime": 'audio/mp4; codecs="mp4a.40.2"'},
            ],
        }
    }  # fmt: skip
    items, data = parse_items(payload)
    preview = choose_preview(items)
    assert preview is not None and preview.url == "https://h/144"
    resolved = resolved_from(items, data, 1080)
    assert resolved.video_url == "https://h/1080" and resolved.preview_url == "https://h/144"
    assert resolved.video is not None and (resolved.video.codec, resolved.video.fps) == ("h264", 60)
    assert resolved.preview is not None and (resolved.preview.codec, resolved.preview.fps) == (
        "av1",
        30,
    )
    assert resolved.audio is not None and resolved.audio.codec == "aac"
    assert resolved.cover_url is None
    by_url = {i.url: i for i in items}
    assert by_url["https://h/144w"].codec == "vp9"
    assert choose_preview([i for i in items if i.kind == "audio"]) is None


async def test_preview_info_describes_the_streams_from_their_containers(
    vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """With the source's index, the chosen streams are described from their
    containers (the fixture's "1080p" is really 320x180 H.264 at 30 fps), the
    preview from the resolver; the signed preview URL never leaves in a dump."""
    payload = json.loads(
        (FIXTURES / "vidfly-response.json")
        .read_text()
        .replace("{MEDIA_BASE}", media_server.base_url)
    )
    items, data = parse_items(payload)
    resolved = resolved_from(items, data, 1080)
    index = SourceIndex(resolved.video_url, resolved.audio_url)
    info = await preview_info(resolved, index)
    assert isinstance(info, PreviewInfo)
    assert info.title == "Test pattern, ten minutes" and info.duration_s == 600
    assert info.video is not None and info.audio is not None and info.preview is not None
    assert (info.video.kind, info.video.container, info.video.codec) == (
        "video_only",
        "mp4",
        "h264",
    )
    assert (info.video.width, info.video.height, info.video.fps) == (320, 180, 30)
    assert (info.audio.codec, info.audio.container) == ("aac", "mp4")
    assert (info.preview.height, info.preview.container) == (360, "mp4")
    assert info.preview_url == f"{media_server.base_url}/muxed-360.mp4"
    dumped = info.model_dump_json()
    assert "preview_url" not in dumped and "muxed-360" not in dumped
    assert "cover.jpg" in dumped
    # Without an index: the resolver's word alone, nothing read.
    before = len(media_server.requests)
    bare = await preview_info(resolved)
    assert bare.video is not None and (bare.video.height, bare.video.codec) == (1080, None)
    assert len(media_server.requests) == before


async def test_storyboard_of_the_preview_stream(
    vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """The storyboard reads the resolver's preview stream (a muxed MP4: only
    its video keyframes), 30 s at one thumbnail every 3 s."""
    resolved = ResolvedSource(
        video_url=media_server.url("video.mp4"),
        audio_url=media_server.url("audio.m4a"),
        preview_url=media_server.url("muxed-360.mp4"),
    )
    board = await build_storyboard(storyboard_url(resolved), interval_s=3, thumb_width=64)
    assert len(board.thumbs) == 10 and board.keyframes == 10
    assert {r["name"] for r in media_server.requests} == {"muxed-360.mp4"}
    assert board.missing == ()


# -- caching for the URL's life -------------------------------------------------------------


def test_cache_ttl_follows_the_url_expiry() -> None:
    """A signed URL's expire= (query or path form) sets the TTL, less a margin,
    capped; a past one gives 0; a URL without one the default."""
    now = 1_700_000_000.0
    url = f"https://cdn.test/videoplayback?expire={int(now) + 3600}&sig=x"
    assert url_expiry(url) == now + 3600
    assert cache_ttl_s(url, now_s=now) == pytest.approx(3600 - 300)
    assert cache_ttl_s(f"https://cdn.test/videoplayback/expire/{int(now) + 100}/x", now_s=now) == 0
    assert cache_ttl_s(f"https://cdn.test/v?expire={int(now) + 86400}", now_s=now) == 6 * 3600
    assert cache_ttl_s("https://cdn.test/plain.mp4", default_s=42) == 42
    assert url_expiry("https://cdn.test/v?expire=soon") is None
    key = cache_key("storyboard", url, 100, 160)
    assert key.startswith("storyboard:") and "sig" not in key
    assert key == cache_key("storyboard", url, 100, 160) != cache_key("storyboard", url, 100, 80)


def test_ttl_cache_expires_and_evicts() -> None:
    """Entries expire after their TTL; past max_entries the least recently
    used goes; a TTL of 0 keeps nothing."""
    now = [0.0]
    cache: TTLCache[str] = TTLCache(2, clock=lambda: now[0])
    cache.put("a", "A", 10)
    cache.put("b", "B", 5)
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.put("c", "C", 10)
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0
    cache.put("d", "D", 0)
    assert cache.get("d") is None


async def test_ttl_cache_makes_each_value_once() -> None:
    """Concurrent callers of one key share one make(); an error is not cached;
    a cancelled maker hands the making to a waiter."""
    cache: TTLCache[int] = TTLCache()
    calls = 0
    release = asyncio.Event()

    async def make() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return calls

    tasks = [asyncio.create_task(cache.get_or_make("k", 60, make)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*tasks) == [1, 1, 1] and calls == 1

    async def fail() -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await cache.get_or_make("e", 60, fail)
    assert cache.get("e") is None

    release.clear()
    first = asyncio.create_task(cache.get_or_make("x", 60, make))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cache.get_or_make("x", 60, make))
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await waiter == 3 and calls == 3
    assert first.cancelled()


def test_storyboard_result_shape() -> None:
    """A Storyboard lists the tiles left blank."""
    thumbs = (Thumb(0, 1, 0.0, 0, 0, 2, 2), Thumb(1, 2, None, 2, 0, 2, 2))
    board = Storyboard(b"", "", thumbs, 4, 2, 2, 1, 2.0, 1, 10, 0, 0, 0.0)
    assert board.missing == (1,)
