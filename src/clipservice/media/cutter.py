"""The cutter: one clip from a probed source to a validated file at its final name.

The output is written under a temporary name in the clips folder and renamed
only once validated, so a file at its final name is always complete. On any
failure, timeout or cancellation the partial file is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from clipservice.config import CutMode
from clipservice.errors import ClipFailure
from clipservice.media import joinproc, plan
from clipservice.media.fetch import FetchError
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.join import CutFailed, CutRequest, CutResult
from clipservice.media.probe import SourceInfo, validate_output
from clipservice.media.source import SourceIndex, SourceUnsupported

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
    """Delete temporary outputs (and their joins' spill files) left by a
    process that died mid-cut."""
    removed = 0
    for entry in os.scandir(clips_dir):
        if PART_MARKER in entry.name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def _frame_s(info: SourceInfo) -> float:
    return 1.0 / info.video.fps if info.video.fps else 1 / 30


# Threads that wait on the join processes' answers (never the loop's default
# executor, which serves file and probe work).
_WAITERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="clip-join")
# How long a killed join process's waiter is given to see it end.
_JOIN_STOP_S = 2.0


async def _in_join_process(request: CutRequest, budget: _Budget) -> CutResult:
    """Run the cut in a worker process (see :mod:`clipservice.media.joinproc`);
    on timeout or cancellation kill it, as FFmpeg would be killed."""
    loop = asyncio.get_running_loop()
    proc = await loop.run_in_executor(_WAITERS, joinproc.POOL.acquire)
    done = loop.run_in_executor(_WAITERS, proc.call, request)
    done.add_done_callback(_retrieve)
    healthy = False
    try:
        result: CutResult = await asyncio.wait_for(asyncio.shield(done), budget.left_s())
        healthy = True
        return result
    except (CutFailed, FetchError):
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
    """What is left of one clip's time limit, shared by all its work."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s

    def left_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left


class Cutter:
    """Cuts clips in the requested mode.

    ``fast`` copies from the keyframe at or before the start; ``accurate``
    smart-cuts (re-encodes only the partial GOPs at the ends, copies the
    rest); both run in a join process from the source's container index
    (:mod:`clipservice.media.join`). ``reencode`` encodes the whole clip with
    FFmpeg. A source or clip that cannot be smart-cut safely, and an output
    that fails validation, are cut again with FFmpeg and the result says so.
    """

    def __init__(self, ffmpeg_path: str = "") -> None:
        self.ffmpeg_path = ffmpeg_path
        self._running = 0  # cuts in flight here: their encoders share the cores

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
        keyframes: SourceIndex | None = None,
    ) -> CutOutcome:
        """Cut [start_s, end_s) into ``final``; raise ClipFailure with a stable code.

        ``keyframes`` is the job's index of the source; without one the
        source is indexed for this clip.
        """
        tmp = part_path(final)
        budget = _Budget(timeout_s)
        source = keyframes or SourceIndex(src.video_url, src.audio_url)
        self._running += 1
        try:
            try:
                outcome = await self._cut_mode(
                    src, info, start_s, end_s, mode, tmp, budget, on_progress, source
                )
            except (CutFailed, SourceUnsupported) as exc:
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
        except FetchError as exc:
            raise ClipFailure("source_unavailable", str(exc)) from exc
        finally:
            self._running -= 1
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, tmp)

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
        source: SourceIndex,
    ) -> CutOutcome:
        if mode == "reencode":
            return await self._reencode(src, info, start_s, end_s, tmp, budget, on_progress)
        await asyncio.wait_for(source.open(), budget.left_s())
        threads = max(1, (os.cpu_count() or 1) // max(1, self._running))
        # (A window may read the source: a file without an index is searched.)
        request = await asyncio.wait_for(
            asyncio.to_thread(
                source.request, start_s, end_s, mode, str(tmp), budget.deadline, threads=threads
            ),
            budget.left_s(),
        )
        result = await _in_join_process(request, budget)
        if on_progress is not None:
            on_progress(result.end_s - result.first_s)
        out = await validate_output(
            tmp,
            result.end_s - result.first_s,
            expect_audio=result.has_audio,
            tol_s=1.5 * _frame_s(info),
        )
        note = None
        if info.audio is not None and not result.has_audio:
            note = "the source has no audio in this range"
        return CutOutcome(
            result.first_s,
            result.first_s + out.video_duration_s,
            out.video_duration_s,
            out.size_bytes,
            note,
        )

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
