"""The cutter: one clip from a probed source to a validated file at its final name.

The output is written under a temporary name in the clips folder and renamed
only once validated, so a file at its final name is always complete. On any
failure, timeout or cancellation the partial file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
import uuid
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import structlog

from clipservice.config import CutMode
from clipservice.errors import ClipFailure
from clipservice.media import plan
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.keyframes import EPS_S, Gop, KeyframeIndex, ProbeError
from clipservice.media.probe import SourceInfo, validate_output
from clipservice.media.smartcut import (
    AudioCopy,
    AvcConfig,
    CopySpan,
    EncodedPart,
    JoinPlan,
    SmartCutUnsupported,
    VideoParams,
    check_supported,
    free_ids,
    join,
    merge_avcc,
    parse_avcc,
    x264_level,
    x264_profile,
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


def _part_configs(paths: list[Path]) -> list[AvcConfig]:
    configs = []
    for path in paths:
        with av.open(str(path)) as c:
            configs.append(parse_avcc(bytes(c.streams.video[0].codec_context.extradata or b"")))
    return configs


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
        copy = CopySpan(first.key_pts, end_pts, None, False, cutoff)
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
        tb, origin = first.time_base, first.origin_pts
        end_pts = _ticks_at_or_after(end_s, origin, tb)
        head_frames = [p for p in first.frames_from(start_s) if p < end_pts]
        next_key = first.next_key_pts
        whole_in_first = next_key is None or next_key >= end_pts
        starts_on_key = bool(head_frames) and head_frames[0] == first.key_pts
        if not head_frames:  # start falls after the GOP's last frame
            if next_key is None or next_key >= end_pts:
                raise SmartCutUnsupported("no frame in the clip's range")
            head_frames, copy_from, whole_in_first = [], next_key, False
        elif starts_on_key and (not whole_in_first or not first.reorder):
            head_frames, copy_from = [], first.key_pts
        elif whole_in_first:
            # The clip lies inside one GOP and needs re-encoding: all of it.
            return await self._reencode(src, info, start_s, end_s, tmp, budget, on_progress)
        else:
            assert next_key is not None
            copy_from = next_key
        clip_start_pts = head_frames[0] if head_frames else copy_from

        # The end: without reordering, copied frames may stop anywhere; with
        # B-frames, the last partial GOP is re-encoded so no kept frame refers
        # to a dropped one.
        tail_frames: list[int] = []
        copy_end, stop_at_key = end_pts, False
        cutoff: int | None = None
        if first.reorder:
            last = await asyncio.wait_for(index.gop_at(end_s - EPS_S * 2), budget.left_s())
            if last.open_gop:
                raise SmartCutUnsupported("the source uses open GOPs")
            if last.key_pts > copy_from:
                tail_frames = [p for p in last.frame_pts if p < end_pts]
                copy_end, stop_at_key = last.key_pts, True
            elif last.key_pts == copy_from:
                tail_frames = [p for p in last.frame_pts if p < end_pts]
                copy_end = copy_from  # nothing to copy
            next_s = last.next_key_s
            if last.next_key_pts is not None and next_s is not None and next_s <= end_s + EPS_S:
                # The clip ends exactly on a keyframe: copy up to it, no tail.
                copy_end, stop_at_key, tail_frames = last.next_key_pts, True, []
            elif tail_frames and last.key_pts >= copy_from:
                # Often a copy of the last GOP can end exactly at the end (the
                # end falls between mini-GOPs): then nothing needs re-encoding.
                stop, shown_until = last.copy_cut(end_pts)
                wanted = min((p for p in last.frame_pts if p >= end_pts), default=None)
                if shown_until == (wanted if wanted is not None else last.next_key_pts):
                    copy_end, cutoff, tail_frames = end_pts, stop, []

        copy = None
        if cutoff is not None:
            copy = CopySpan(copy_from, copy_end, None, False, cutoff)
        elif copy_end > copy_from:
            copy = CopySpan(copy_from, copy_end, None, stop_at_key)
        return await self._assemble(
            src, info, first, head_frames, tail_frames, copy, clip_start_pts, end_s, tmp,
            budget, on_progress, params=params, avcc=avcc,
        )  # fmt: skip

    async def _assemble(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        first: Gop,
        head_frames: list[int] | None,
        tail_frames: list[int] | None,
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
        """Re-encode the partial GOPs and the audio in one FFmpeg run, then join
        them with the copied packets into the output."""
        tb = first.time_base
        parts: list[Path] = []
        try:
            segments: list[plan.Segment] = []
            head = tail = None
            encoded: list[EncodedPart] = []
            if head_frames or tail_frames:
                assert params is not None and avcc is not None
                ids = free_ids(avcc, 2)
                for role, frames, sps in (
                    ("head", head_frames, ids[0]),
                    ("tail", tail_frames, ids[1]),
                ):
                    if not frames:
                        continue
                    path = _sibling(tmp, role)
                    parts.append(path)
                    segments.append(
                        plan.Segment(first.seconds(frames[0]), len(frames), str(path), sps)
                    )
                    part = EncodedPart(path, tuple(frames))
                    encoded.append(part)
                    if role == "head":
                        head = part
                    else:
                        tail = part
            audio = audio_copy = None
            clip_start_s = first.seconds(clip_start_pts)
            if info.audio is not None and info.audio.codec == "aac":
                # AAC is copied in the join: no encode, the span exact to one
                # audio frame, whose lead-in the MP4 edit list trims.
                audio_copy = AudioCopy(src.audio_url or src.video_url, clip_start_s, end_s)
            elif info.audio is not None:
                audio = _sibling(tmp, "audio")
                parts.append(audio)
            if segments or audio:
                enc = None
                if params is not None:
                    enc = plan.EncodeParams(
                        profile=x264_profile(params),
                        level=x264_level(params),
                        pix_fmt=params.pix_fmt or "yuv420p",
                        width=params.width,
                        height=params.height,
                        timescale=tb.denominator,
                        color=params.color,
                    )
                args = plan.smart_parts_args(
                    src, segments, enc, clip_start_s, end_s - clip_start_s,
                    str(audio) if audio else None,
                )  # fmt: skip
                await self._run(args, budget, on_progress)
            extradata = None
            if encoded:
                assert avcc is not None
                configs = await asyncio.to_thread(_part_configs, [p.path for p in encoded])
                extradata = merge_avcc(avcc, *configs)
            join_plan = JoinPlan(
                video_url=src.video_url,
                time_base=tb,
                origin_pts=clip_start_pts,
                reorder_ticks=first.key_pts - first.key_dts,
                head=head,
                copy=copy,
                tail=tail,
                audio=audio,
                audio_copy=audio_copy,
                extradata=extradata,
            )
            await asyncio.wait_for(
                asyncio.to_thread(join, join_plan, tmp, budget.deadline), budget.left_s()
            )
        finally:
            for path in parts:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread(os.unlink, path)
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
