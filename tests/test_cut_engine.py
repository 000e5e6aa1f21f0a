"""The cut engine on the media the service really gets, over a loopback Range server.

Every shape of ``tests/media_shapes.py`` (progressive MP4, DASH fMP4 with and
without sidx, WebM VP9 + Opus, AV1, HEVC, 60 fps, VFR, open GOPs, audio and
video of different lengths, muxed) in ``fast`` and ``accurate``: the clip is
made without a re-encode note where a smart cut is promised, its first and
last frames are the source's by content, it holds exactly the source's
frames of its range, audio starts with the video, FFmpeg decodes it cleanly
with ``-xerror``, and only byte ranges are fetched. Then failures: stalls,
time limits, cancellation, expired URLs, a dying worker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest

from clipservice.domain import CutMode, StreamUrls
from clipservice.errors import ClipFailure
from clipservice.media import cutter as cutter_module
from clipservice.media import join as join_module
from clipservice.media import joinproc
from clipservice.media.bitstream import h264, hevc
from clipservice.media.cutter import CutOutcome, CutSpec, Cutter
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.probe import probe_source
from clipservice.media.source import SourceIndex
from tests.conftest import MediaServer, Shapes
from tests.media_shapes import Shape

EPS = 1e-3
# Shapes a smart cut is promised for (no note), and those that fall back.
SMART_SHAPES = (
    "progressive",
    "progressive_moov_end",
    "dash_fmp4",
    "fmp4_nosidx",
    "webm_vp9",
    "av1_fmp4",
    "hevc_mp4",
    "h264_60fps",
    "h264_vfr",
    "av_mismatch",
    "muxed",
)
OPEN_GOP_SHAPES = ("hevc_open_gop", "h264_open_gop")
# Mid-GOP at both ends (2 s GOPs): a head and, with B-frames, a tail re-encoded.
CLIP = (3.5, 8.3)


@dataclass
class Frames:
    """A video decoded: each frame's time (s from the first frame) and luma plane."""

    times: list[float]
    luma: list[bytes]

    def index_at(self, t: float) -> int:
        """The frame shown at ``t``: the first one at or after it."""
        return next(i for i, x in enumerate(self.times) if x >= t - EPS)

    def between(self, a: float, b: float) -> list[int]:
        return [i for i, x in enumerate(self.times) if a - EPS <= x < b - EPS]


def _luma(frame: Any) -> bytes:
    plane = frame.planes[0]
    data = bytes(plane)
    width = frame.width
    return b"".join(
        data[row * plane.line_size : row * plane.line_size + width] for row in range(frame.height)
    )


def decode(path: Path) -> Frames:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        frames = [(float(f.pts * v.time_base), _luma(f)) for f in c.decode(v)]
    frames.sort(key=lambda x: x[0])
    origin = frames[0][0]
    return Frames([t - origin for t, _ in frames], [luma for _, luma in frames])


_SOURCES: dict[Path, Frames] = {}


def source_frames(path: Path) -> Frames:
    if path not in _SOURCES:
        _SOURCES[path] = decode(path)
    return _SOURCES[path]


def mad(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two luma planes."""
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def ffmpeg_errors(path: Path) -> str:
    run = subprocess.run(
        [bundled_ffmpeg(), "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"rc={run.returncode} {run.stderr}" if run.returncode or run.stderr else ""


def stream_starts(path: Path) -> tuple[float, float | None, float | None]:
    """(video start, audio start, audio duration) in seconds."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        a = c.streams.audio[0] if c.streams.audio else None
        vstart = float(v.start_time * v.time_base)
        if a is None:
            return vstart, None, None
        astart = float(a.start_time * a.time_base)
        adur = float(a.duration * a.time_base) if a.duration else None
        return vstart, astart, adur


def urls(media_server: MediaServer, shape: Shape) -> StreamUrls:
    video = media_server.add(shape.files["video"].name, shape.files["video"])
    audio = shape.files.get("audio")
    return StreamUrls(video, media_server.add(audio.name, audio) if audio else None)


async def cut(
    media_server: MediaServer,
    src: StreamUrls,
    start: float,
    end: float,
    mode: CutMode,
    out: Path,
    *,
    index: SourceIndex | None = None,
    timeout_s: float = 60,
) -> CutOutcome:
    own = index or SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, own)
    return await Cutter().cut(
        CutSpec(
            streams=src,
            info=info,
            start_s=start,
            end_s=end,
            mode=mode,
            final=out,
            timeout_s=timeout_s,
            source=own,
        )
    )


def window_bytes(shape: Shape, start: float, end: float) -> int:
    """What a clip needs, from the local files: the video from the keyframe at or
    before ``start`` to the keyframe after ``end``, and the audio around the
    clip (its windows hold whole 2 s fragments and half a second of pre-roll)."""
    total = 0
    with av.open(str(shape.files["video"])) as c:
        v = c.streams.video[0]
        packets = [
            (float(p.pts * v.time_base), p.size, p.is_keyframe) for p in c.demux(v) if p.size
        ]
        origin = min(t for t, _, _ in packets)
        keys = [i for i, (t, _, key) in enumerate(packets) if key]
        first = max(i for i in keys if packets[i][0] - origin <= start + EPS)
        last = next((i for i in keys if packets[i][0] - origin >= end - EPS), len(packets))
        total += sum(size for _, size, _ in packets[first:last])
    with av.open(str(shape.files.get("audio", shape.files["video"]))) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            total += sum(
                p.size
                for p in c.demux(a)
                if p.size and start - 2.6 <= float(p.pts * a.time_base) <= end + 2.1
            )
    return total


def check_clip(
    out: Path, shape: Shape, outcome: CutOutcome, start: float, end: float, mode: CutMode
) -> Frames:
    """The clip holds exactly the source's frames of its range (by count and by
    content at both ends), decodes cleanly, and its audio starts with the video."""
    assert not ffmpeg_errors(out), ffmpeg_errors(out)
    clip = decode(out)
    source = source_frames(shape.files["video"])
    if mode == "accurate":
        first = source.index_at(start)
        assert outcome.actual_start == pytest.approx(source.times[first], abs=EPS)
        expected = source.between(start, end)
    else:  # from the keyframe at or before start, to where the copy stops
        first = source.index_at(outcome.actual_start)
        assert source.times[first] <= start + EPS
        expected = source.between(outcome.actual_start, outcome.actual_end)
    assert len(clip.luma) == len(expected), (len(clip.luma), len(expected))
    assert expected[0] == first
    for got, want in ((0, expected[0]), (-1, expected[-1])):
        here = mad(clip.luma[got], source.luma[want])
        neighbour = want + 1 if want + 1 < len(source.luma) else want - 1
        other = mad(clip.luma[got], source.luma[neighbour])
        assert here < 3 and here < other / 2, (got, here, other)
    # Frame times follow the source's (VFR included).
    offsets = [t - source.times[first] for t in (source.times[i] for i in expected)]
    assert clip.times == pytest.approx(offsets, abs=2e-3)
    vstart, astart, adur = stream_starts(out)
    assert vstart == pytest.approx(0, abs=EPS)
    if shape.audio_codec is not None:
        frame_s = 1 / (shape.fps or 30)
        assert astart is not None and abs(astart - vstart) <= frame_s, (astart, vstart)
        audio_end = (shape.audio_duration_s or shape.duration_s) - outcome.actual_start
        wanted = min(outcome.duration_s, audio_end)
        assert adur is not None and adur == pytest.approx(wanted, abs=frame_s + 0.03)
    return clip


@pytest.mark.parametrize("mode", ["accurate", "fast"])
@pytest.mark.parametrize("name", SMART_SHAPES)
async def test_every_shape_cuts_without_reencoding(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, name: str, mode: CutMode
) -> None:
    """Each shape YouTube serves is cut in fast and accurate mode with no fallback
    note: frame-exact by content and count, A/V together, clean decode, and only
    the clip's byte ranges fetched."""
    shape = shapes.get(name)
    src = urls(media_server, shape)
    out = tmp_path / "clip.mp4"
    index = SourceIndex(src.video_url, src.audio_url)
    outcome = await cut(media_server, src, *CLIP, mode, out, index=index)
    assert outcome.note is None, outcome.note
    check_clip(out, shape, outcome, *CLIP, mode)
    # Past the index (a few small reads), only the GOPs of the clip and the audio
    # around it: box and cluster headers aside, nothing else.
    fetched = media_server.bytes_served - index.bytes_read
    assert fetched <= 1.1 * window_bytes(shape, *CLIP) + 48 * 1024, fetched


@pytest.mark.parametrize("name", OPEN_GOP_SHAPES)
async def test_open_gop_sources_fall_back_with_a_note(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, name: str
) -> None:
    """Open-GOP sources (leading pictures refer to the GOP before) are not spliced:
    the clip is re-encoded, frame-exact, and the note says why."""
    shape = shapes.get(name)
    out = tmp_path / "clip.mp4"
    outcome = await cut(media_server, urls(media_server, shape), *CLIP, "accurate", out)
    assert outcome.note is not None and "open GOP" in outcome.note and "re-encoded" in outcome.note
    check_clip(out, shape, outcome, *CLIP, "accurate")


@pytest.mark.parametrize(
    ("name", "start", "end"),
    [
        ("progressive", 4.0, 8.0),  # on keyframes: nothing re-encoded
        ("progressive", 0.0, 5.1),  # from the first frame
        ("progressive", 11.0, 12.0),  # the last second
        ("progressive", 6.3, 7.1),  # inside one GOP
        ("dash_fmp4", 0.4, 11.9),  # nearly all of it
        ("webm_vp9", 10.5, 12.0),
        ("hevc_mp4", 6.3, 7.1),
        ("av1_fmp4", 0.0, 2.0),
        ("h264_60fps", 5.01, 5.2),
    ],
)
async def test_accurate_edges(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, name: str, start: float, end: float
) -> None:
    """Accurate clips at the source's edges, on keyframes and inside one GOP."""
    shape = shapes.get(name)
    out = tmp_path / "clip.mp4"
    outcome = await cut(media_server, urls(media_server, shape), start, end, "accurate", out)
    assert outcome.note is None, outcome.note
    check_clip(out, shape, outcome, start, end, "accurate")


async def test_audio_shorter_than_video(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path
) -> None:
    """Where the audio ends before the video, the clip keeps all the video and the
    audio it has, starting together."""
    shape = shapes.get("av_mismatch")
    assert shape.audio_duration_s is not None and shape.audio_duration_s < shape.duration_s - 1
    out = tmp_path / "clip.mp4"
    start, end = shape.audio_duration_s - 1.5, shape.duration_s - 0.5
    outcome = await cut(media_server, urls(media_server, shape), start, end, "accurate", out)
    check_clip(out, shape, outcome, start, end, "accurate")
    _, _, adur = stream_starts(out)
    assert adur == pytest.approx(1.5, abs=0.05)


@pytest.mark.parametrize("name", ["progressive", "hevc_mp4"])
async def test_reencoded_parts_carry_their_own_parameter_sets(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, name: str
) -> None:
    """A smart cut's output lists the source's parameter sets and the re-encoded
    parts' side by side (distinct ids), all of the source's profile and level,
    out of band (avc1 / hvc1): no in-band sets, no edit list hiding frames."""
    shape = shapes.get(name)
    out = tmp_path / "clip.mp4"
    await cut(media_server, urls(media_server, shape), *CLIP, "accurate", out)
    with av.open(str(shape.files["video"])) as c:
        source_config = bytes(c.streams.video[0].codec_context.extradata)
    with av.open(str(out)) as c:
        config = bytes(c.streams.video[0].codec_context.extradata)
        tag = c.streams.video[0].codec_context.codec_tag
    if name == "progressive":
        src, got = h264.parse_avcc(source_config), h264.parse_avcc(config)
        assert len(got.sps) >= 2 and len({h264.sps_id(s) for s in got.sps}) == len(got.sps)
        assert {(s[1], s[3]) for s in got.sps} == {(src.profile_idc, src.level_idc)}
        assert tag == "avc1"
    else:
        src_h, got_h = hevc.parse_hvcc(source_config), hevc.parse_hvcc(config)
        sps = [hevc.parse_sps(n) for n in got_h.units(hevc.SPS_NUT)]
        assert len(sps) >= 2 and len({s.sps_id for s in sps}) == len(sps)
        assert {(s.ptl.profile_idc, s.ptl.level_idc) for s in sps} == {
            (src_h.profile_idc, src_h.level_idc)
        }
        assert tag == "hvc1"
    data = out.read_bytes()
    assert b"elst" not in data[: data.find(b"mdat")] or _video_edit_is_shift_only(out)


def _video_edit_is_shift_only(path: Path) -> bool:
    """An edit list that only shifts decode times (B-frame delay) hides no frame:
    every decoded frame is shown, the first at time 0."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        return bool(v.start_time == 0)


@pytest.mark.parametrize("name", ["dash_fmp4", "fmp4_nosidx", "webm_vp9", "progressive"])
async def test_cost_does_not_grow_with_the_clips_position(
    media_server: MediaServer, tmp_path: Path, name: str
) -> None:
    """A clip late in a long source costs what an early one costs: the index is
    read with a few small requests (sidx / moov / Cues, or a search), never by
    walking the file, and each clip fetches only its own byte ranges."""
    from tests.media_shapes import make_long_source

    shape = make_long_source(tmp_path / "long", name, 2.0, size="64x36")
    src = urls(media_server, shape)
    size = sum(p.stat().st_size for p in {*shape.files.values()})
    costs = []
    for start in (5.5, 110.5):
        index = SourceIndex(src.video_url, src.audio_url)
        before_bytes, before_requests = media_server.bytes_served, len(media_server.requests)
        outcome = await cut(
            media_server, src, start, start + 3, "accurate", tmp_path / f"{start}.mp4", index=index
        )
        assert outcome.note is None, outcome.note
        costs.append(
            (media_server.bytes_served - before_bytes, len(media_server.requests) - before_requests)
        )
        # The index: a few small reads (a search without sidx), wherever the clip is.
        assert index.bytes_read <= 8 * 64 * 1024
    (early_bytes, early_requests), (late_bytes, late_requests) = costs
    assert late_requests <= early_requests + 3, costs
    assert late_bytes <= 1.3 * early_bytes + 64 * 1024, costs
    assert late_bytes < 0.1 * size + 4 * 64 * 1024, (late_bytes, size)


async def test_index_is_read_once_per_job(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path
) -> None:
    """Clips sharing a job's source index read only their own spans: no index read
    after the first clip."""
    shape = shapes.get("dash_fmp4")
    src = urls(media_server, shape)
    index = SourceIndex(src.video_url, src.audio_url)
    await cut(media_server, src, 1.5, 3.0, "accurate", tmp_path / "a.mp4", index=index)
    opened = index.bytes_read
    assert opened > 0
    await cut(media_server, src, 5.5, 7.0, "fast", tmp_path / "b.mp4", index=index)
    assert index.bytes_read == opened


async def test_reencode_mode_is_frame_exact(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path
) -> None:
    """Reencode mode (FFmpeg) starts on the source's frame at start."""
    shape = shapes.get("progressive")
    out = tmp_path / "clip.mp4"
    outcome = await cut(media_server, urls(media_server, shape), *CLIP, "reencode", out)
    check_clip(out, shape, outcome, *CLIP, "accurate")


async def test_unsupported_codec_falls_back_to_reencode(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """A codec with no smart cut (MPEG-4 Part 2) is re-encoded, and the result says so."""
    src = StreamUrls(media_server.url("mpeg4-video.mp4"), media_server.url("audio.m4a"))
    outcome = await cut(media_server, src, 3.5, 9.2, "accurate", tmp_path / "c.mp4")
    assert outcome.note is not None and "re-encoded" in outcome.note
    assert len(decode(tmp_path / "c.mp4").luma) == 171


async def test_invalid_output_is_retried_in_reencode(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An output failing validation is cut again in reencode mode, with a note
    (the join's output is checked by its index, FFmpeg's by decoding)."""
    real = cutter_module.validate_output
    calls = []

    async def failing(path: Path, expected_s: float, **kw: Any) -> Any:
        calls.append(("joined", kw["first_frame"]))
        raise ClipFailure("output_invalid", "moov damaged")

    async def decoded(path: Path, expected_s: float, **kw: Any) -> Any:
        calls.append(("decoded", None))
        return await real(path, expected_s, **kw)

    monkeypatch.setattr(cutter_module, "validate_joined", failing)
    monkeypatch.setattr(cutter_module, "validate_output", decoded)
    shape = shapes.get("progressive")
    out = tmp_path / "clip.mp4"
    outcome = await cut(media_server, urls(media_server, shape), *CLIP, "accurate", out)
    assert outcome.note is not None and "failed validation" in outcome.note
    assert calls == [("joined", (320, 180)), ("decoded", None)]
    check_clip(out, shape, outcome, *CLIP, "accurate")


@pytest.mark.parametrize(
    ("shape", "mode", "clip"),
    [("progressive", "accurate", CLIP), ("dash_fmp4", "fast", CLIP),
     ("webm_vp9", "accurate", CLIP), ("hevc_mp4", "accurate", CLIP), ("av1_fmp4", "fast", CLIP),
     ("dash_fmp4", "accurate", (2.0, 6.0)), ("dash_fmp4", "fast", (3.0, 6.5)),
     ("progressive", "accurate", (2.5, 7.3))],
)  # fmt: skip
async def test_join_check_agrees_with_decoding(
    media_server: MediaServer,
    shapes: Shapes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    shape: str,
    mode: CutMode,
    clip: tuple[float, float],
) -> None:
    """What the join's own check learns of its clip (the first sample decoded as
    it muxed, the rest from the MP4's index) is what decoding the file says."""
    seen: list[Any] = []
    real = cutter_module.validate_joined

    async def recording(path: Path, expected_s: float, **kw: Any) -> Any:
        info = await real(path, expected_s, **kw)
        decoded = await cutter_module.validate_output(
            path, expected_s, expect_audio=kw["expect_audio"], tol_s=kw["tol_s"]
        )
        seen.append((info, decoded))
        return info

    monkeypatch.setattr(cutter_module, "validate_joined", recording)
    src = shapes.get(shape)
    await cut(media_server, urls(media_server, src), *clip, mode, tmp_path / "c.mp4")
    ((info, decoded),) = seen
    assert (info.width, info.height, info.has_audio, info.subtitle_streams, info.size_bytes) == (
        decoded.width, decoded.height, decoded.has_audio, 0, decoded.size_bytes
    )  # fmt: skip
    assert info.video_duration_s == pytest.approx(decoded.video_duration_s, abs=1e-3)
    assert info.frames == decoded.frames
    # A sample the muxer did not write, or a length off by more than the
    # tolerance, fails the check.
    size = (info.width, info.height)
    with pytest.raises(ClipFailure, match="video samples"):
        await real(tmp_path / "c.mp4", info.video_duration_s, expect_audio=True, tol_s=0.05,
                   first_frame=size, frames=info.frames + 1)  # fmt: skip
    with pytest.raises(ClipFailure, match="lasts"):
        await real(tmp_path / "c.mp4", info.video_duration_s + 0.5, expect_audio=True,
                   tol_s=0.05, first_frame=size, frames=info.frames)  # fmt: skip


async def test_a_first_frame_that_does_not_decode_fails_the_join(
    media_server: MediaServer, shapes: Shapes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join decodes its clip's first sample as it muxes; when that fails the
    join fails as unsupported (the cutter then re-encodes) and leaves no file."""

    def undecodable(*_: Any) -> Any:
        raise join_module.JoinUnsupported("the clip's first frame does not decode")

    monkeypatch.setattr(join_module, "_first_frame_size", undecodable)
    src = urls(media_server, shapes.get("progressive"))
    index = SourceIndex(src.video_url, src.audio_url)
    await index.open()
    out = tmp_path / "c.mp4"
    deadline = asyncio.get_running_loop().time() + 60
    request = index.request(*CLIP, "fast", str(out), deadline)
    with pytest.raises(join_module.CutFailed, match="first frame") as info:
        await asyncio.to_thread(join_module.run_cut, request)
    assert info.value.unsupported
    assert _leftovers(tmp_path) == []


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _no_leftovers_once_released(media_server: MediaServer, folder: Path) -> list[str]:
    """Release the stalled reads, let the stopped threads finish, list what is left."""
    media_server.unstall.set()
    for _ in range(200):
        if not _leftovers(folder):
            break
        await asyncio.sleep(0.05)
    return _leftovers(folder)


async def _until_a_join_read_hangs(media_server: MediaServer, seen: int) -> None:
    while not (any(r["bytes"] == 0 for r in media_server.requests[seen:])
               and joinproc.POOL.busy_pids):  # fmt: skip
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.parametrize("mode", ["accurate", "fast"])
async def test_stalled_cut_stops_and_leaves_nothing(
    media_server: MediaServer, tmp_path: Path, how: str, mode: CutMode
) -> None:
    """A cut whose source stalls mid-fetch ends at its time limit, or when
    cancelled: its worker process is killed (as FFmpeg would be) and no partial
    file is left."""
    src = StreamUrls(
        media_server.url("video.mp4", stall=True), media_server.url("audio.m4a", stall=True)
    )
    index = SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, index)  # the head: no stall
    seen = len(media_server.requests)
    out_dir = tmp_path / "clips"
    out_dir.mkdir()
    job = Cutter().cut(
        CutSpec(
            streams=src,
            info=info,
            start_s=20.5,
            end_s=25.5,
            mode=mode,
            final=out_dir / "c.mp4",
            timeout_s=3,
            source=index,
        )
    )
    busy: list[int] = []
    if how == "timeout":
        with pytest.raises(TimeoutError):
            await job
    else:
        task = asyncio.create_task(job)
        await _until_a_join_read_hangs(media_server, seen)
        busy = joinproc.POOL.busy_pids
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert joinproc.POOL.busy_pids == []
    for pid in busy:  # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert await _no_leftovers_once_released(media_server, out_dir) == []


async def test_source_expiring_mid_cut_reports_403(
    media_server: MediaServer, tmp_path: Path
) -> None:
    """A stream URL that starts answering 403 while a cut fetches it fails the clip
    with a message the runner recognises (it resolves the source again)."""
    from clipservice.jobs.runner import source_expired

    base = f"{media_server.base_url}/expired"
    src = StreamUrls(f"{base}/video.mp4", f"{base}/audio.m4a")
    with pytest.raises(ClipFailure) as failure:
        await cut(media_server, src, 20.5, 25.0, "accurate", tmp_path / "c.mp4", timeout_s=30)
    assert source_expired(failure.value.message), failure.value.message
    assert _leftovers(tmp_path) == []


async def test_cut_process_that_dies_falls_back_to_ffmpeg(
    media_server: MediaServer, tmp_path: Path
) -> None:
    """Cuts run in worker processes: one that dies mid-cut (a decoder crash on a
    hostile source, say) costs the service nothing, and FFmpeg re-encodes the clip."""
    src = StreamUrls(
        media_server.url("video.mp4", stall=True), media_server.url("audio.m4a", stall=True)
    )
    index = SourceIndex(src.video_url, src.audio_url)
    info = await probe_source(src.video_url, src.audio_url, index)
    seen = len(media_server.requests)
    task = asyncio.create_task(
        Cutter().cut(
            CutSpec(
                streams=src,
                info=info,
                start_s=20.5,
                end_s=25.5,
                mode="accurate",
                final=tmp_path / "c.mp4",
                timeout_s=60,
                source=index,
            )
        )
    )
    await _until_a_join_read_hangs(media_server, seen)
    for pid in joinproc.POOL.busy_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    media_server.unstall.set()  # FFmpeg's re-encode may read on
    outcome = await task
    assert outcome.note is not None and "re-encoded" in outcome.note
    assert "ended unexpectedly" in outcome.note
    assert len(decode(tmp_path / "c.mp4").luma) == 150
    assert _leftovers(tmp_path) == ["c.mp4"]


def test_join_pool_keeps_as_many_idle_processes_as_clips_run_at_once() -> None:
    """Idle worker processes are kept up to the configured concurrency (recycled
    ones beyond it are killed and reaped); warm() raises the limit."""
    pool = joinproc.JoinPool()
    try:
        pool.max_idle = 2
        procs = [pool.acquire() for _ in range(3)]
        assert len(set(pool.busy_pids)) == 3
        for proc in procs:
            pool.release(proc, healthy=True)
        assert len(pool.pids) == 2 and pool.busy_pids == []
        assert procs[2].proc.returncode is not None  # the third: killed and reaped
        pool.warm(6)
        assert pool.max_idle == 6 and len(pool.pids) == 2  # no extra start: some are idle
        again = pool.acquire()
        assert again in procs[:2]  # reused, not started anew
        pool.release(again, healthy=False)
        assert again.proc.returncode is not None and len(pool.pids) == 1
    finally:
        pool.close()
