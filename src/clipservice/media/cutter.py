"""The cutter: one clip from a probed source to a validated file at its final name.

The output is written under a temporary name in the clips folder and renamed
only once validated, so a file at its final name is always complete. On any
failure, timeout or cancellation the partial file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import structlog

from clipservice.config import CutMode
from clipservice.errors import ClipFailure
from clipservice.media import joinproc, plan
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.keyframes import EPS_S, Gop, KeyframeIndex, ProbeError
from clipservice.media.probe import SourceInfo, validate_output
from clipservice.media.smartcut import (
    AudioCopy,
    AvcConfig,
    CopySpan,
    EncoderSpec,
    GopEncode,
    JoinPlan,
    SmartCutUnsupported,
    VideoParams,
    check_supported,
    free_ids,
)

log = structlog.get_logger(__name__)

PART_MARKER = ".part-"


@dataclass(frozen=True)
class CutOutcome:
    """Where the output really starts and ends in the source, and what it is."""

    actual_start: float
    actual_end: float
    duration_s: float
    size_bytes: int
    note: str | None = None


def part_path(final: Path) -> Path:
    return final.with_name(f".{final.stem}{PART_MARKER}{uuid.uuid4().hex[:8]}.mp4")


def _sibling(tmp: Path, role: str) -> Path:
    """A work file beside the temporary output (same marker: stale ones get removed)."""
    return tmp.with_name(f"{tmp.stem}-{role}.mp4")


def remove_stale_parts(clips_dir: Path) -> int:
    """Delete temporary outputs left by a process that died mid-cut."""
    removed = 0
    for entry in os.scandir(clips_dir):
        if PART_MARKER in entry.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def _frame_s(info: SourceInfo) -> float:
    return 1.0 / info.video.fps if info.video.fps else 1 / 30


def _ticks_at_or_after(t_s: float, origin: int, tb: Fraction) -> int:
    """The first tick of time base ``tb`` at or after ``t_s`` (minus the tolerance)."""
    return origin + math.ceil(Fraction(t_s - EPS_S) / tb)


# Threads that wait on the join processes' answers (never the loop's default
# executor, which serves file and probe work).
_WAITERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="clip-join")
# How long a killed join process's waiter is given to see it end.
_JOIN_STOP_S = 2.0


async def _in_join_process(join_plan: JoinPlan, tmp: Path, budget: _Budget) -> None:
    """Run the join in a worker process (see :mod:`clipservice.media.joinproc`);
    on timeout or cancellation kill it, as FFmpeg would be killed."""
    loop = asyncio.get_running_loop()
    proc = await loop.run_in_executor(_WAITERS, joinproc.POOL.acquire)
    done = loop.run_in_executor(_WAITERS, proc.call, join_plan, tmp, budget.deadline)
    done.add_done_callback(_retrieve)
    healthy = False
    try:
        await asyncio.wait_for(asyncio.shield(done), budget.left_s())
        healthy = True
    except SmartCutUnsupported:
        healthy = True  # the process answered: it stays in the pool
        raise
    finally:
        if not healthy:
            proc.signal_kill()
            await asyncio.wait({done}, timeout=_JOIN_STOP_S)
        # Reaping (and recycling) may wait on the process: not on the loop.
        await loop.run_in_executor(
            _WAITERS, functools.partial(joinproc.POOL.release, proc, healthy=healthy)
        )


def warm_join_processes(concurrency: int) -> None:
    """Size the pool of join processes for ``concurrency`` clips at once and
    start one in the background (not awaited), so the first clip does not
    wait a quarter of a second for it."""
    warming = asyncio.get_running_loop().run_in_executor(_WAITERS, joinproc.POOL.warm, concurrency)
    warming.add_done_callback(_retrieve)


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a join's error as seen (a killed join's own error is expected)."""
    if not future.cancelled():
        future.exception()


class _Budget:
    """What is left of one clip's time limit, shared by all its FFmpeg runs."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s

    def left_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class Cutter:
    """Cuts clips with FFmpeg in the requested mode.

    ``fast`` copies from the keyframe at or before the start; ``accurate``
    smart-cuts (see :mod:`clipservice.media.smartcut`); ``reencode`` encodes
    the whole clip. A source that cannot be smart-cut safely, and an output that
    fails validation, are cut again with ``reencode`` and the result says so.
    """

    def __init__(self, ffmpeg_path: str = "") -> None:
        self.ffmpeg_path = ffmpeg_path

    async def cut(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        mode: CutMode,
        final: Path,
        *,
        timeout_s: float,
        on_progress: ProgressCallback | None = None,
        keyframes: KeyframeIndex | None = None,
    ) -> CutOutcome:
        """Cut [start_s, end_s) into ``final``; raise ClipFailure with a stable code.

        ``keyframes`` is the job's shared index of the source; without one a
        private index is opened (and closed) for this clip.
        """
        tmp = part_path(final)
        budget = _Budget(timeout_s)
        own_index = keyframes is None
        index = keyframes or KeyframeIndex(src.video_url)
        try:
            try:
                outcome = await self._cut_mode(
                    src, info, start_s, end_s, mode, tmp, budget, on_progress, index
                )
            except (SmartCutUnsupported, ProbeError) as exc:
                # Also when the join could not read the source (PyAV says
                # little: a 403 on a seek reads as "invalid data"): FFmpeg's
                # run retries once and names an HTTP error if there is one.
                log.info("cut_fallback", mode=mode, reason=str(exc))
                outcome = await self._reencode(
                    src, info, start_s, end_s, tmp, budget, on_progress,
                    note=f"{mode} cut not possible ({exc}); the clip was re-encoded",
                )  # fmt: skip
            except ClipFailure as exc:
                if exc.code != "output_invalid" or mode == "reencode":
                    raise
                log.warning("output_invalid_retry", mode=mode, reason=exc.message)
                outcome = await self._reencode(
                    src, info, start_s, end_s, tmp, budget, on_progress,
                    note=f"the {mode} output failed validation ({exc.message}); re-encoded",
                )  # fmt: skip
            await asyncio.to_thread(os.replace, tmp, final)
            return outcome
        except FFmpegError as exc:
            raise ClipFailure("ffmpeg_failed", exc.stderr_tail or str(exc)) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, tmp)
            if own_index:
                await index.aclose()

    async def _cut_mode(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        mode: CutMode,
        tmp: Path,
        budget: _Budget,
        on_progress: ProgressCallback | None,
        index: KeyframeIndex,
    ) -> CutOutcome:
        if mode == "fast":
            return await self._fast(src, info, start_s, end_s, tmp, budget, on_progress, index)
        if mode == "accurate":
            return await self._accurate(src, info, start_s, end_s, tmp, budget, on_progress, index)
        return await self._reencode(src, info, start_s, end_s, tmp, budget, on_progress)

    async def _run(
        self, args: list[str], budget: _Budget, on_progress: ProgressCallback | None
    ) -> None:
        await run_ffmpeg(
            args,
            timeout_s=budget.left_s(),
            ffmpeg_path=self.ffmpeg_path,
            on_progress=on_progress,
        )

    async def _reencode(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        tmp: Path,
        budget: _Budget,
        on_progress: ProgressCallback | None,
        note: str | None = None,
    ) -> CutOutcome:
        args = plan.reencode_args(src, start_s, end_s, str(tmp))
        await self._run(args, budget, on_progress)
        out = await validate_output(
            tmp, end_s - start_s, expect_audio=info.audio is not None, tol_s=2 * _frame_s(info)
        )
        return CutOutcome(
            start_s, start_s + out.video_duration_s, out.video_duration_s, out.size_bytes, note
        )

    async def _fast(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        tmp: Path,
        budget: _Budget,
        on_progress: ProgressCallback | None,
        index: KeyframeIndex,
    ) -> CutOutcome:
        first = await asyncio.wait_for(index.gop_at(start_s), budget.left_s())
        end_pts = _ticks_at_or_after(end_s, first.origin_pts, first.time_base)
        cutoff = None
        shown_end_s = end_s
        if first.reorder:
            # With B-frames a copy can only end where no kept frame refers to a
            # dropped one: the nearest such point to the end (a frame or two off).
            last = await asyncio.wait_for(index.gop_at(end_s - 2 * EPS_S), budget.left_s())
            cutoff, shown_until = last.copy_cut(end_pts)
            shown_end_s = last.seconds(shown_until)
        copy = CopySpan(first.key_pts, end_pts, False, cutoff)
        return await self._assemble(
            src, info, first, None, None, copy, first.key_pts, shown_end_s, tmp, budget,
            on_progress, params=None, avcc=None,
        )  # fmt: skip

    async def _accurate(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        tmp: Path,
        budget: _Budget,
        on_progress: ProgressCallback | None,
        index: KeyframeIndex,
    ) -> CutOutcome:
        params = await asyncio.wait_for(index.video_params(), budget.left_s())
        avcc = check_supported(params)
        first = await asyncio.wait_for(index.gop_at(start_s), budget.left_s())
        if first.open_gop:
            raise SmartCutUnsupported("the source uses open GOPs")
        head_sps, tail_sps = free_ids(avcc, 2)
        end_pts = _ticks_at_or_after(end_s, first.origin_pts, first.time_base)
        next_key = first.next_key_pts

        # The start: frames from start to the next keyframe are re-encoded
        # (decoded from this GOP's keyframe); on a keyframe nothing is.
        head: GopEncode | None = None
        head_frames = [p for p in first.frames_from(start_s) if p < end_pts]
        if not head_frames:  # start falls after the GOP's last frame
            if next_key is None or next_key >= end_pts:
                raise SmartCutUnsupported("no frame in the clip's range")
            copy_from = next_key
        elif head_frames[0] == first.key_pts:
            copy_from = first.key_pts
        else:
            head = GopEncode(first.key_pts, tuple(head_frames), head_sps)
            copy_from = next_key if next_key is not None else end_pts
        clip_start_pts = head.frame_pts[0] if head is not None else copy_from

        # The end: without reordering a copy stops anywhere. With B-frames it
        # keeps the longest prefix of the last GOP that refers to no dropped
        # frame, and the few frames from there to the end are re-encoded.
        copy: CopySpan | None = None
        tail: GopEncode | None = None
        if copy_from < end_pts:
            copy = CopySpan(copy_from, end_pts, False)
            if first.reorder:
                last = await asyncio.wait_for(index.gop_at(end_s - EPS_S * 2), budget.left_s())
                if last.open_gop:
                    raise SmartCutUnsupported("the source uses open GOPs")
                next_s = last.next_key_s
                if last.next_key_pts is not None and next_s is not None and next_s <= end_s + EPS_S:
                    copy = CopySpan(copy_from, last.next_key_pts, True)  # ends on a key
                else:
                    stop, shown_until = last.copy_prefix(end_pts)
                    copy = CopySpan(copy_from, end_pts, False, stop)
                    if stop <= last.key_dts and last.key_pts == copy_from:
                        copy = None  # nothing of the GOP can be copied
                    frames = tuple(p for p in last.frame_pts if shown_until <= p < end_pts)
                    if frames:
                        tail = GopEncode(last.key_pts, frames, tail_sps)
        return await self._assemble(
            src, info, first, head, tail, copy, clip_start_pts, end_s, tmp, budget,
            on_progress, params=params, avcc=avcc,
        )  # fmt: skip

    async def _assemble(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        first: Gop,
        head: GopEncode | None,
        tail: GopEncode | None,
        copy: CopySpan | None,
        clip_start_pts: int,
        end_s: float,
        tmp: Path,
        budget: _Budget,
        on_progress: ProgressCallback | None,
        *,
        params: VideoParams | None,
        avcc: AvcConfig | None,
    ) -> CutOutcome:
        """Join the re-encoded partial GOPs, the copied packets and the audio
        into the output (see :func:`clipservice.media.smartcut.join`)."""
        clip_start_s = first.seconds(clip_start_pts)
        audio = audio_copy = None
        try:
            if info.audio is not None and info.audio.codec == "aac":
                # AAC is copied in the join: no encode, the span exact to one
                # audio frame, whose lead-in the MP4 edit list trims.
                audio_copy = AudioCopy(src.audio_url or src.video_url, clip_start_s, end_s)
            elif info.audio is not None:
                audio = _sibling(tmp, "audio")
                args = plan.audio_args(src, clip_start_s, end_s - clip_start_s, str(audio))
                await self._run(args, budget, on_progress)
            join_plan = JoinPlan(
                video_url=src.video_url,
                time_base=first.time_base,
                origin_pts=clip_start_pts,
                reorder_ticks=first.key_pts - first.key_dts,
                head=head,
                copy=copy,
                tail=tail,
                audio=audio,
                audio_copy=audio_copy,
                encoder=EncoderSpec.matching(params) if params is not None else None,
                avcc=avcc,
            )
            await _in_join_process(join_plan, tmp, budget)
        finally:
            if audio is not None:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(os.unlink, audio)
        out = await validate_output(
            tmp,
            end_s - clip_start_s,
            expect_audio=info.audio is not None,
            tol_s=1.5 * _frame_s(info),
        )
        return CutOutcome(
            clip_start_s,
            clip_start_s + out.video_duration_s,
            out.video_duration_s,
            out.size_bytes,
        )

    async def describe_existing(
        self, final: Path, start_s: float, end_s: float, mode: CutMode
    ) -> CutOutcome:
        """The outcome of a complete output from an earlier job (reused, not cut again)."""
        out = await validate_output(final, end_s - start_s, expect_audio=False, tol_s=10.0)
        actual_start = start_s if mode != "fast" else max(0.0, end_s - out.video_duration_s)
        return CutOutcome(
            actual_start,
            actual_start + out.video_duration_s,
            out.video_duration_s,
            out.size_bytes,
        )
