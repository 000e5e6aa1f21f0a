"""The cutter: one clip from a probed source to a validated file at its final name.

The output is written under a temporary name in the clips folder and renamed
only once validated, so a file at its final name is always complete. On any
failure, timeout or cancellation the partial file is removed. A clip's
output options (shape, format, captions) are made by :mod:`.render`; the
default options are the plain cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from clipservice.domain import CutMode, OutputFormat, OutputOptions, StreamUrls
from clipservice.errors import ClipFailure
from clipservice.media import ffmpeg_args, joinproc, render
from clipservice.media.captions import NO_CUES_NOTE, Cue, cue_tuples, load_cues
from clipservice.media.fetch import FetchError
from clipservice.media.ffmpeg import FFmpegError, ProgressCallback, run_ffmpeg
from clipservice.media.join import CutFailed, CutRequest, CutResult
from clipservice.media.probe import (
    OutputInfo,
    SourceInfo,
    validate_joined,
    validate_media,
    validate_output,
)
from clipservice.media.source import SourceIndex, SourceUnsupported

if TYPE_CHECKING:
    from clipservice.sources.guard import UrlGuard

log = structlog.get_logger(__name__)

PART_MARKER = ".part-"


@dataclass(frozen=True)
class CutOutcome:
    """Where the output really starts and ends in the source, and what it is.

    A thumbnail starts and ends at the frame it shows (``duration_s`` 0);
    ``width``/``height`` are the output's frame (0 for audio).
    """

    actual_start: float
    actual_end: float
    duration_s: float
    size_bytes: int
    note: str | None = None
    format: OutputFormat = "mp4"
    width: int = 0
    height: int = 0

    @classmethod
    def of_video(cls, start_s: float, out: OutputInfo, note: str | None = None) -> CutOutcome:
        """A validated MP4 clip whose first frame is at ``start_s`` (source time)."""
        return cls(
            start_s,
            start_s + out.video_duration_s,
            out.video_duration_s,
            out.size_bytes,
            note,
            width=out.width,
            height=out.height,
        )


def part_path(final: Path) -> Path:
    """A temporary name beside ``final`` (with its extension: .mp4 if it has none)."""
    suffix = final.suffix or ".mp4"
    return final.with_name(f".{final.stem}{PART_MARKER}{uuid.uuid4().hex[:8]}{suffix}")


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


async def _in_join_process(
    request: CutRequest, budget: _Budget, on_progress: ProgressCallback | None = None
) -> CutResult:
    """Run the cut in a worker process (see :mod:`clipservice.media.joinproc`);
    on timeout or cancellation kill it, as FFmpeg would be killed. Its
    progress messages reach ``on_progress`` on the loop."""
    loop = asyncio.get_running_loop()
    proc = await loop.run_in_executor(_WAITERS, joinproc.POOL.acquire)

    def progress(out_s: float) -> None:
        if on_progress is not None:
            loop.call_soon_threadsafe(on_progress, out_s)

    done = loop.run_in_executor(_WAITERS, proc.call, request, progress)
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


@dataclass(frozen=True)
class CutSpec:
    """One clip to cut: from which streams, which range, how, into which file."""

    streams: StreamUrls
    info: SourceInfo
    start_s: float
    end_s: float
    mode: CutMode
    final: Path
    timeout_s: float
    # The job's index of the source (read once per job); without one the
    # source is indexed for this clip.
    source: SourceIndex | None = None
    on_progress: ProgressCallback | None = None
    # What the clip is made into (default: the plain MP4 cut).
    options: OutputOptions = dataclasses.field(default_factory=OutputOptions)
    # Fetches a captions URL under the service's URL rules (without one, a
    # captions URL is fetched with private addresses refused).
    url_guard: UrlGuard | None = None


@dataclass(frozen=True)
class _Work:
    """One cut under way: its spec, its temporary output and its time budget."""

    spec: CutSpec
    tmp: Path
    budget: _Budget


def ffmpeg_failure(exc: FFmpegError) -> ClipFailure:
    """The clip's failure for a failed FFmpeg run: ``source_forbidden`` when the
    egress proxy refused a host FFmpeg asked for, else ``ffmpeg_failed``."""
    if exc.forbidden:
        return ClipFailure(
            "source_forbidden",
            f"refused to connect to {exc.forbidden[0]}: it resolves to a non-public address",
        )
    return ClipFailure("ffmpeg_failed", exc.stderr_tail or str(exc))


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

    async def cut(self, spec: CutSpec) -> CutOutcome:
        """Cut ``spec``'s range into its ``final`` file, made as its options say;
        raise ClipFailure with a stable code (or TimeoutError past its time limit)."""
        work = _Work(spec, part_path(spec.final), _Budget(spec.timeout_s))
        self._running += 1
        try:
            path = render.render_path(spec.options)
            cues = await self._cues(work)
            if path in ("clip", "soft_captions"):
                soft = cues if path == "soft_captions" else None
                outcome, captioned = await self._cut_clip(work, soft)
                if soft is not None and not captioned:
                    outcome = await self._add_captions(work, outcome, soft)
            else:
                made = await render.render(
                    spec, work.tmp, work.budget, cues, ffmpeg_path=self.ffmpeg_path
                )
                outcome = CutOutcome(
                    made.actual_start,
                    made.actual_end,
                    made.duration_s,
                    made.size_bytes,
                    made.note,
                    spec.options.format,
                    made.width,
                    made.height,
                )
            await asyncio.to_thread(os.replace, work.tmp, spec.final)
            return outcome
        except FFmpegError as exc:
            raise ffmpeg_failure(exc) from exc
        except FetchError as exc:
            raise ClipFailure("source_unavailable", str(exc)) from exc
        finally:
            self._running -= 1
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, work.tmp)

    async def _cues(self, work: _Work) -> list[Cue] | None:
        """The captions' cues (fetched if they are a URL), before anything is cut:
        bad captions fail the clip at once."""
        captions = work.spec.options.captions
        if captions is None:
            return None
        loading = load_cues(captions, guard=work.spec.url_guard)
        return await asyncio.wait_for(loading, work.budget.left_s())

    async def _cut_clip(
        self, work: _Work, cues: list[Cue] | None = None
    ) -> tuple[CutOutcome, bool]:
        """The plain cut in the spec's mode, re-encoded when that mode cannot make
        it; and whether ``cues`` were dealt with (a join muxes them as it cuts)."""
        spec = work.spec
        try:
            return await self._cut_mode(work, cues)
        except (CutFailed, SourceUnsupported) as exc:
            log.info("cut_fallback", mode=spec.mode, reason=str(exc))
            note = f"{spec.mode} cut not possible ({exc}); the clip was re-encoded"
            return await self._reencode(work, note), False
        except ClipFailure as exc:
            if exc.code != "output_invalid" or spec.mode == "reencode":
                raise
            log.warning("output_invalid_retry", mode=spec.mode, reason=exc.message)
            note = f"the {spec.mode} output failed validation ({exc.message}); re-encoded"
            return await self._reencode(work, note), False

    async def _add_captions(self, work: _Work, outcome: CutOutcome, cues: list[Cue]) -> CutOutcome:
        out, note = await render.add_soft_captions(
            work.tmp, cues, outcome.actual_start, outcome.actual_end, work.budget
        )
        if out is None:
            notes = [n for n in (outcome.note, note) if n]
            return dataclasses.replace(outcome, note="; ".join(notes) or None)
        return dataclasses.replace(outcome, size_bytes=out)

    async def _cut_mode(self, work: _Work, cues: list[Cue] | None) -> tuple[CutOutcome, bool]:
        spec, budget = work.spec, work.budget
        if spec.mode == "reencode":
            return await self._reencode(work), False
        source = spec.source or SourceIndex(spec.streams.video_url, spec.streams.audio_url)
        await asyncio.wait_for(source.open(), budget.left_s())
        threads = max(1, (os.cpu_count() or 1) // max(1, self._running))
        # (A window may read the source: a file without an index is searched.)
        request = await asyncio.wait_for(
            asyncio.to_thread(
                source.request,
                spec.start_s,
                spec.end_s,
                spec.mode,
                str(work.tmp),
                budget.deadline,
                threads=threads,
            ),
            budget.left_s(),
        )
        if cues is not None:
            request = dataclasses.replace(request, captions=cue_tuples(cues))
        result = await _in_join_process(request, budget, spec.on_progress)
        if spec.on_progress is not None:
            spec.on_progress(result.end_s - result.first_s)
        out = await validate_joined(
            work.tmp,
            result.end_s - result.first_s,
            expect_audio=result.has_audio,
            tol_s=1.5 * _frame_s(spec.info),
            first_frame=result.first_frame,
            frames=result.frames,
        )
        notes = []
        if spec.info.audio is not None and not result.has_audio:
            notes.append("the source has no audio in this range")
        if cues is not None and not result.captions:
            notes.append(NO_CUES_NOTE)
        if out.subtitle_streams != (1 if result.captions else 0):
            raise ClipFailure("output_invalid", f"{out.subtitle_streams} subtitle streams")
        return CutOutcome.of_video(result.first_s, out, "; ".join(notes) or None), True

    async def _reencode(self, work: _Work, note: str | None = None) -> CutOutcome:
        spec = work.spec
        args = ffmpeg_args.reencode_args(spec.streams, spec.start_s, spec.end_s, str(work.tmp))
        await run_ffmpeg(
            args,
            timeout_s=work.budget.left_s(),
            ffmpeg_path=self.ffmpeg_path,
            on_progress=spec.on_progress,
        )
        out = await validate_output(
            work.tmp,
            spec.end_s - spec.start_s,
            expect_audio=spec.info.audio is not None,
            tol_s=2 * _frame_s(spec.info),
        )
        return CutOutcome.of_video(spec.start_s, out, note)

    async def describe_existing(
        self,
        final: Path,
        start_s: float,
        end_s: float,
        mode: CutMode,
        options: OutputOptions | None = None,
    ) -> CutOutcome:
        """The outcome of a complete output from an earlier job (reused, not cut
        again: the job layer names outputs by their options' key)."""
        if options is None or options.is_default:
            out = await validate_output(final, end_s - start_s, expect_audio=False, tol_s=10.0)
            actual_start = start_s if mode != "fast" else max(0.0, end_s - out.video_duration_s)
            # (The same description as when it was cut, its frame size included.)
            return CutOutcome.of_video(actual_start, out)
        kind = render.output_kind(options)
        out = await validate_media(final, kind, end_s - start_s, tol_s=10.0)
        fmt = options.format
        if kind == "image":
            at = options.thumbnail_at if options.thumbnail_at is not None else start_s
            return CutOutcome(at, at, 0.0, out.size_bytes, None, fmt, out.width, out.height)
        duration = out.video_duration_s if kind == "video" else out.duration_s
        actual_start = start_s
        if mode == "fast" and render.render_path(options) == "soft_captions":
            actual_start = max(0.0, end_s - duration)  # the plain fast cut's own start
        return CutOutcome(
            actual_start,
            actual_start + duration,
            duration,
            out.size_bytes,
            None,
            fmt,
            out.width,
            out.height,
        )
