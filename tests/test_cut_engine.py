"""The cut engine on real media over a loopback Range server: frame accuracy by
content, frame counts, A/V start, clean decoding, fallbacks and caching."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest

from clipservice.config import CutMode
from clipservice.errors import ClipFailure
from clipservice.media import cutter as cutter_module
from clipservice.media import joinproc, plan
from clipservice.media.cutter import CutOutcome, Cutter
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.media.keyframes import KeyframeIndex
from clipservice.media.probe import probe_source
from clipservice.media.smartcut import parse_avcc
from tests.conftest import MediaServer

FPS = 30


@dataclass
class Output:
    """What a cut produced, decoded."""

    outcome: CutOutcome
    frames: list[bytes]  # luma plane of every frame, in order
    pts_s: list[float]
    video_start_s: float
    audio_start_s: float | None
    sps_count: int


def _luma(frame: Any) -> bytes:
    plane = frame.planes[0]
    return bytes(plane)[: plane.line_size * frame.height]


def _decode(path: Path) -> tuple[list[bytes], list[float], float, float | None, int]:
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        sps = len(parse_avcc(bytes(v.codec_context.extradata)).sps)
        a = c.streams.audio[0] if c.streams.audio else None
        vstart = float(v.start_time * v.time_base)
        astart = float(a.start_time * a.time_base) if a is not None else None
        frames, pts = [], []
        for frame in c.decode(v):
            frames.append(_luma(frame))
            pts.append(float(frame.pts * v.time_base))
    return frames, pts, vstart, astart, sps


def _source_frame(path: Path, t_s: float) -> bytes:
    """The source's frame shown at ``t_s``: the first one at or after it."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        for frame in c.decode(v):
            if float(frame.pts * v.time_base) >= t_s - 1e-3:
                return _luma(frame)
    raise AssertionError("no frame")


def _mad(a: bytes, b: bytes) -> float:
    """Mean absolute difference of two luma planes."""
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def _ffmpeg_decodes_cleanly(path: Path) -> str:
    run = subprocess.run(
        [bundled_ffmpeg(), "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return f"rc={run.returncode} {run.stderr}" if run.returncode or run.stderr else ""


async def _cut(
    media_server: MediaServer,
    tmp_path: Path,
    video: str,
    start: float,
    end: float,
    mode: CutMode,
    *,
    keyframes: KeyframeIndex | None = None,
    cutter: Cutter | None = None,
) -> Output:
    src = plan.Inputs(media_server.url(video), media_server.url("audio.m4a"))
    info = await probe_source(src.video_url, src.audio_url)
    out = tmp_path / f"{video}-{start}-{end}-{mode}.mp4"
    outcome = await (cutter or Cutter()).cut(
        src, info, start, end, mode, out, timeout_s=60, keyframes=keyframes
    )
    frames, pts, vstart, astart, sps = _decode(out)
    assert not _ffmpeg_decodes_cleanly(out), _ffmpeg_decodes_cleanly(out)
    return Output(outcome, frames, pts, vstart, astart, sps)


def _check_accuracy(out: Output, source: Path, start: float, end: float) -> None:
    """First frame is the source's frame at start, frames are contiguous and
    as many as [start, end) holds, audio starts with the video."""
    first_index = math.ceil((start - 1e-3) * FPS)
    first_frame_s = first_index / FPS
    expected_frames = math.ceil((end - 1e-3) * FPS) - first_index
    assert len(out.frames) == expected_frames
    assert out.pts_s[0] == pytest.approx(0, abs=1e-3)
    steps = {round((b - a) * FPS, 3) for a, b in zip(out.pts_s, out.pts_s[1:], strict=False)}
    assert steps == {1.0}
    here = _mad(out.frames[0], _source_frame(source, first_frame_s))
    next_frame = _mad(out.frames[0], _source_frame(source, first_frame_s + 1 / FPS))
    assert here < 4 and here < next_frame / 2, (here, next_frame)
    last = _mad(out.frames[-1], _source_frame(source, first_frame_s + (expected_frames - 1) / FPS))
    assert last < 4
    assert out.video_start_s == 0
    assert out.audio_start_s == pytest.approx(0, abs=1e-3)
    assert out.outcome.actual_start == pytest.approx(first_frame_s, abs=1e-3)
    assert out.outcome.duration_s == pytest.approx(end - first_frame_s, abs=1.01 / FPS)


@pytest.mark.parametrize(
    ("start", "end", "reencoded"),
    [
        (4.0, 8.0, False),  # on keyframes: pure copy
        (3.5, 9.2, True),  # between keyframes
        (0.0, 5.1, False),  # at 0
        (29.0, 30.0, True),  # the last second
        (10.3, 11.1, True),  # shorter than a GOP
        (1.1, 25.3, True),  # many GOPs
    ],
)
async def test_accurate_is_frame_exact(
    media_server: MediaServer,
    media: dict[str, Path],
    tmp_path: Path,
    start: float,
    end: float,
    reencoded: bool,
) -> None:
    """Accurate clips hold exactly the source frames of [start, end), decode cleanly."""
    out = await _cut(media_server, tmp_path, "video.mp4", start, end, "accurate")
    _check_accuracy(out, media["video"], start, end)
    assert out.outcome.note is None
    if not reencoded:
        assert out.sps_count == 1  # nothing re-encoded: the source's parameter sets only


async def test_smart_cut_joins_distinct_parameter_sets(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """A smart cut's avcC lists the source's and the re-encoded parameter sets side by side."""
    out = await _cut(media_server, tmp_path, "video.mp4", 3.5, 9.0, "accurate")
    assert out.sps_count == 2
    _check_accuracy(out, media["video"], 3.5, 9.0)
    with av.open(str(tmp_path / "video.mp4-3.5-9.0-accurate.mp4")) as c:
        avcc = parse_avcc(bytes(c.streams.video[0].codec_context.extradata))
    with av.open(str(media["video"])) as c:
        source = parse_avcc(bytes(c.streams.video[0].codec_context.extradata))
    # Every part's parameter sets name the source's profile and level.
    assert {(s[1], s[3]) for s in avcc.sps} == {(source.profile_idc, source.level_idc)}


@pytest.mark.parametrize(
    ("start", "end", "parameter_sets"),
    [
        (3.5, 9.2, 3),  # head and tail re-encoded, each with its own SPS/PPS
        (4.0, 10.0, 1),  # keyframe to keyframe: all copied
        (2.5, 3.5, 2),  # inside one GOP
        (0.0, 29.9, 2),  # from 0 to the last frames: the tail only
        (4.0, 9.1, 2),  # on a keyframe, ends mid-GOP: the tail only
    ],
)
async def test_accurate_with_b_frames(
    media_server: MediaServer,
    media: dict[str, Path],
    tmp_path: Path,
    start: float,
    end: float,
    parameter_sets: int,
) -> None:
    """On a source with B-frames, the frames before the start's next keyframe and
    those after the last copyable prefix of the end's GOP are re-encoded, and the
    join is exact."""
    out = await _cut(media_server, tmp_path, "bf-video.mp4", start, end, "accurate")
    _check_accuracy(out, media["bf-video"], start, end)
    assert out.sps_count == parameter_sets
    assert out.outcome.note is None


@pytest.mark.parametrize("video", ["video.mp4", "bf-video.mp4"])
async def test_fast_starts_on_keyframe(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path, video: str
) -> None:
    """Fast copies from the keyframe at or before start, reports it, and keeps A/V together."""
    out = await _cut(media_server, tmp_path, video, 3.5, 9.2, "fast")
    assert out.outcome.actual_start == 2.0
    assert out.sps_count == 1
    source = media[video.removesuffix(".mp4")]
    assert _mad(out.frames[0], _source_frame(source, 2.0)) == 0  # the very same picture
    assert out.video_start_s == 0 and out.audio_start_s == pytest.approx(0, abs=1e-3)
    steps = {round((b - a) * FPS, 3) for a, b in zip(out.pts_s, out.pts_s[1:], strict=False)}
    assert steps == {1.0}
    # From the keyframe to the end. With B-frames a copy ends where no kept frame
    # refers to a dropped one: the nearest such point, up to two frames off.
    assert abs(len(out.frames) - 216) <= (0 if video == "video.mp4" else 2)
    assert out.outcome.duration_s == pytest.approx(len(out.frames) / FPS, abs=1e-3)


async def test_reencode_is_frame_exact(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """Reencode mode starts on the source's frame at start."""
    out = await _cut(media_server, tmp_path, "video.mp4", 3.5, 9.2, "reencode")
    _check_accuracy(out, media["video"], 3.5, 9.2)


async def test_non_h264_falls_back_to_reencode(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """A source that cannot be smart-cut is re-encoded, and the result says so."""
    out = await _cut(media_server, tmp_path, "mpeg4-video.mp4", 3.5, 9.2, "accurate")
    assert out.outcome.note is not None and "re-encoded" in out.outcome.note
    assert len(out.frames) == 171


async def test_keyframes_probed_once_per_gop(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """Clips sharing a job's index probe each GOP once, reading only byte ranges."""
    index = KeyframeIndex(media_server.url("long-video.mp4"))
    try:
        src = plan.Inputs(media_server.url("long-video.mp4"), media_server.url("long-audio.m4a"))
        info = await probe_source(src.video_url, src.audio_url)
        before = media_server.bytes_served
        for i, (start, end) in enumerate([(60.5, 63.0), (61.0, 64.0), (60.2, 62.0)]):
            await Cutter().cut(
                src, info, start, end, "accurate", tmp_path / f"{i}.mp4",
                timeout_s=60, keyframes=index,
            )  # fmt: skip
        assert index.lookups == 1  # the GOP at 60 s, probed once for all three
        size = media["long-video"].stat().st_size + media["long-audio"].stat().st_size
        # Each open reads ahead a little; no request comes near the whole file.
        assert media_server.bytes_served - before < size / 2
        assert max(r["bytes"] for r in media_server.requests) < size / 8
    finally:
        await index.aclose()


async def test_invalid_output_is_retried_in_reencode(
    media_server: MediaServer,
    media: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An output failing validation is cut again in reencode mode, with a note."""
    real = cutter_module.validate_output
    calls = []

    async def failing_once(path: Path, expected_s: float, **kw: Any) -> Any:
        calls.append(path)
        if len(calls) == 1:
            raise ClipFailure("output_invalid", "first frame does not decode")
        return await real(path, expected_s, **kw)

    monkeypatch.setattr(cutter_module, "validate_output", failing_once)
    out = await _cut(media_server, tmp_path, "video.mp4", 3.5, 9.2, "accurate")
    assert out.outcome.note is not None and "failed validation" in out.outcome.note
    assert len(calls) == 2
    _check_accuracy(out, media["video"], 3.5, 9.2)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def _no_leftovers_once_released(media_server: MediaServer, folder: Path) -> list[str]:
    """Release the stalled reads, let the stopped join threads finish, list what is left."""
    media_server.unstall.set()
    for _ in range(200):  # the threads stop at their next packet
        if not _leftovers(folder):
            break
        await asyncio.sleep(0.05)
    return _leftovers(folder)


@pytest.mark.parametrize("how", ["timeout", "cancel"])
@pytest.mark.parametrize("mode", ["accurate", "fast"])
async def test_stalled_cut_stops_and_leaves_nothing(
    media_server: MediaServer, tmp_path: Path, how: str, mode: CutMode
) -> None:
    """A cut whose source stalls mid-join ends at its time limit, or when
    cancelled: its worker process is killed (as FFmpeg would be) and no partial
    file is left."""
    src = plan.Inputs(
        media_server.url("video.mp4", stall=True), media_server.url("audio.m4a", stall=True)
    )
    info = await probe_source(src.video_url, src.audio_url)
    index = KeyframeIndex(media_server.url("video.mp4"))  # lookups do not stall
    probed = len(media_server.requests)
    out_dir = tmp_path / "clips"
    out_dir.mkdir()
    cut = Cutter().cut(src, info, 20.5, 25.5, mode, out_dir / "c.mp4", timeout_s=3, keyframes=index)
    busy: list[int] = []
    try:
        if how == "timeout":
            with pytest.raises(TimeoutError):
                await cut
        else:
            task = asyncio.create_task(cut)
            while not (any(r["bytes"] == 0 for r in media_server.requests[probed:])
                       and joinproc.POOL.busy_pids):  # fmt: skip
                await asyncio.sleep(0.02)  # until a read of the join hangs
            busy = joinproc.POOL.busy_pids
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    finally:
        await index.aclose()
    assert joinproc.POOL.busy_pids == []
    for pid in busy:  # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert await _no_leftovers_once_released(media_server, out_dir) == []


async def test_source_expiring_mid_join_reports_403(
    media_server: MediaServer, tmp_path: Path
) -> None:
    """A stream URL that starts answering 403 while a smart cut reads it fails the
    clip with a message the runner recognises (it resolves the source again)."""
    from clipservice.jobs.runner import source_expired

    base = f"{media_server.base_url}/expired"
    src = plan.Inputs(f"{base}/video.mp4", f"{base}/audio.m4a")
    info = await probe_source(src.video_url, src.audio_url)
    # The keyframes were probed while the URL still worked (here: another URL
    # to the same file); the ranges the join reads, past half the file, now 403.
    index = KeyframeIndex(media_server.url("video.mp4"))
    try:
        with pytest.raises(ClipFailure) as failure:
            await Cutter().cut(
                src, info, 20.5, 25.0, "accurate", tmp_path / "c.mp4", timeout_s=30,
                keyframes=index,
            )  # fmt: skip
    finally:
        await index.aclose()
    assert source_expired(failure.value.message), failure.value.message
    assert _leftovers(tmp_path) == []


async def test_join_process_that_dies_falls_back_to_ffmpeg(
    media_server: MediaServer, media: dict[str, Path], tmp_path: Path
) -> None:
    """Smart cuts run in worker processes: one that dies mid-cut (a decoder crash on
    a hostile source, say) costs the service nothing, and FFmpeg re-encodes the clip."""
    src = plan.Inputs(
        media_server.url("video.mp4", stall=True), media_server.url("audio.m4a", stall=True)
    )
    info = await probe_source(src.video_url, src.audio_url)
    index = KeyframeIndex(media_server.url("video.mp4"))  # lookups do not stall
    await index.gop_at(20.5)
    await index.gop_at(25.5)
    probed = len(media_server.requests)
    task = asyncio.create_task(
        Cutter().cut(
            src, info, 20.5, 25.5, "accurate", tmp_path / "c.mp4", timeout_s=60, keyframes=index
        )
    )
    while not (any(r["bytes"] == 0 for r in media_server.requests[probed:])
               and joinproc.POOL.busy_pids):  # fmt: skip
        await asyncio.sleep(0.02)  # the join's reads hang
    for pid in joinproc.POOL.busy_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    media_server.unstall.set()  # FFmpeg's re-encode may read on
    try:
        outcome = await task
    finally:
        await index.aclose()
    assert outcome.note is not None and "re-encoded" in outcome.note
    assert "ended unexpectedly" in outcome.note
    frames, *_ = _decode(tmp_path / "c.mp4")
    assert len(frames) == 150
    assert _leftovers(tmp_path) == ["c.mp4"]


def test_join_pool_keeps_as_many_idle_processes_as_clips_run_at_once() -> None:
    """Idle join processes are kept up to the configured concurrency (recycled
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
