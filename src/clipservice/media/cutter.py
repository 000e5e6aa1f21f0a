"""The cutter: one clip from a probed source to a validated file at its final name.

The output is written under a temporary name in the clips folder and renamed
only once validated, so a file at its final name is always complete. On any
failure, timeout or cancellation the partial file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from clipservice.config import CutMode
from clipservice.errors import ClipFailure
from clipservice.media import plan
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.probe import SourceInfo, validate_output

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


class Cutter:
    """Cuts clips with FFmpeg in the requested mode."""

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
    ) -> CutOutcome:
        """Cut [start_s, end_s) into ``final``; raise ClipFailure with a stable code."""
        tmp = part_path(final)
        try:
            if mode == "fast":
                outcome = await self._fast(src, info, start_s, end_s, tmp, timeout_s, on_progress)
            else:
                # Frame-accurate smart cutting lands with the cut engine; until then
                # accurate is correct (a full re-encode), just not yet fast.
                outcome = await self._reencode(
                    src, info, start_s, end_s, tmp, timeout_s, on_progress
                )
            await asyncio.to_thread(os.replace, tmp, final)
            return outcome
        except FFmpegError as exc:
            raise ClipFailure("ffmpeg_failed", exc.stderr_tail or str(exc)) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, tmp)

    async def _reencode(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        tmp: Path,
        timeout_s: float,
        on_progress: ProgressCallback | None,
    ) -> CutOutcome:
        args = plan.reencode_args(src, start_s, end_s, str(tmp))
        await run_ffmpeg(
            args, timeout_s=timeout_s, ffmpeg_path=self.ffmpeg_path, on_progress=on_progress
        )
        out = await validate_output(
            tmp, end_s - start_s, expect_audio=info.audio is not None, tol_s=2 * _frame_s(info)
        )
        return CutOutcome(
            start_s, start_s + out.video_duration_s, out.video_duration_s, out.size_bytes
        )

    async def _fast(
        self,
        src: plan.Inputs,
        info: SourceInfo,
        start_s: float,
        end_s: float,
        tmp: Path,
        timeout_s: float,
        on_progress: ProgressCallback | None,
    ) -> CutOutcome:
        args = plan.copy_args(
            src, start_s, end_s, str(tmp), audio_codec=info.audio.codec if info.audio else None
        )
        await run_ffmpeg(
            args, timeout_s=timeout_s, ffmpeg_path=self.ffmpeg_path, on_progress=on_progress
        )
        # Stream copy starts at the keyframe at or before start: up to one GOP early.
        out = await validate_output(
            tmp, end_s - start_s, expect_audio=info.audio is not None, tol_s=10.0
        )
        actual_start = max(0.0, end_s - out.video_duration_s)
        return CutOutcome(actual_start, end_s, out.video_duration_s, out.size_bytes)

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
