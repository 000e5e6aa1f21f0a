"""One clip attempt, the same in both runners: from a claimed clip to its outcome.

:func:`attempt_clip` is the whole of it: the source's probe (shared by the
job's clips in this process), the range check, the attempt limit (a clip
begun ``queue.clip_attempts`` times without an outcome, the process dying
under it each time, ends ``interrupted`` instead of taking the service down
in a loop), the wait for a slot, then the cut under ``jobs.clip_timeout_s``:
a complete earlier output of the same clip is reused, and stream URLs that
expired mid-cut are renewed and the cut run again. Every ending becomes a
result or an error with a stable code (a failure to write the output because
its disk is full is ``storage_full``, whichever step met it), and every attempt ends with one
``clip_done`` log line and the clip metrics.

What the runner does around it (claiming the clip in the job store,
recording the outcome, its FFmpeg slots and progress reports) stays in the
runner: :mod:`clipservice.jobs.runner` and :mod:`clipservice.jobs.worker`.

Reuse works the same on every storage: a new output is published with its
outcome as metadata (:func:`outcome_metadata`), and a reuse rebuilds the
outcome from it, so an object in a bucket is described without being
downloaded; a file without it (the shared folder) is described by probing
the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import aiofiles.os
import structlog
from pydantic import TypeAdapter, ValidationError

from clipservice.config import Settings
from clipservice.domain import JobSource
from clipservice.errors import ClipFailure
from clipservice.jobs.bookkeeping import ClipOutcome, clip_error
from clipservice.jobs.models import ClipResult, ClipSpec
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.streams import JobStreams, StreamSet
from clipservice.media.cutter import CutOutcome, CutSpec, Cutter
from clipservice.media.probe import SourceInfo
from clipservice.metrics import Metrics
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)

# Ranges may end this far past the probed duration (container rounding).
RANGE_SLACK_S = 0.05
# A running clip reports its progress at most this often.
PROGRESS_INTERVAL_S = 0.5
# The metadata key a published output carries its outcome under (x-amz-meta-…).
OUTCOME_KEY = "clipservice-outcome"
# S3 keeps at most 2 KB of user metadata per object; a long note is dropped first.
_MAX_METADATA_CHARS = 1800
_OUTCOME = TypeAdapter(CutOutcome)


def outcome_metadata(outcome: CutOutcome) -> dict[str, str]:
    """The outcome as publish metadata: compact ASCII JSON (safe in a header)."""
    data = dataclasses.asdict(outcome)
    text = json.dumps(data, separators=(",", ":"))
    if len(text) > _MAX_METADATA_CHARS:
        text = json.dumps({**data, "note": None}, separators=(",", ":"))
    return {OUTCOME_KEY: text}


def outcome_from_metadata(metadata: Mapping[str, str]) -> CutOutcome | None:
    """The outcome :func:`outcome_metadata` stored, or None if absent or unreadable."""
    raw = metadata.get(OUTCOME_KEY)
    if not raw:
        return None
    try:
        outcome: CutOutcome = _OUTCOME.validate_json(raw)
    except ValidationError:
        return None
    return outcome


class _NameLocks:
    """One lock per output name while in use: two jobs of this process wanting the
    same output make it once (the second reuses it) instead of racing on its file."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, name: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (asyncio.Lock(), 0))
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


# A full disk in the OS's and FFmpeg's words (FFmpeg reports it only on stderr).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_WORDS = ("No space left on device", "Disk quota exceeded")


def storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it came from) says the disk is full."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE_ERRNOS:
            return True
        text = seen.message if isinstance(seen, ClipFailure) else str(seen)
        if any(words in text for words in _NO_SPACE_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class ClipWork:
    """What every clip attempt needs, whichever runner makes it."""

    cutter: Cutter
    storage: ClipStorage
    metrics: Metrics
    clip_timeout_s: float
    # Times a clip may be begun without an outcome before it ends "interrupted".
    max_attempts: int
    names: _NameLocks = field(default_factory=_NameLocks, compare=False)

    @classmethod
    def of(
        cls, settings: Settings, cutter: Cutter, storage: ClipStorage, metrics: Metrics
    ) -> ClipWork:
        return cls(
            cutter,
            storage,
            metrics,
            settings.jobs.clip_timeout_s,
            settings.queue.clip_attempts,
        )


def check_range(clip: ClipSpec, info: SourceInfo) -> None:
    """Refuse a clip that ends past the source's end (``invalid_range``)."""
    if clip.end > info.duration_s + RANGE_SLACK_S:
        raise ClipFailure(
            "invalid_range",
            f"clip ends at {clip.end}s but the video lasts {info.duration_s:.3f}s",
        )


async def _reused(work: ClipWork, clip: ClipSpec, name: str, final: Path) -> CutOutcome | None:
    """The outcome of a complete stored output of this name, or None to cut it."""
    stored = await work.storage.metadata(name)
    if stored is None:
        return None
    outcome = outcome_from_metadata(stored)
    if outcome is not None:
        log.info("clip_reused", file=name, described_by="metadata")
        return outcome
    if not await aiofiles.os.path.isfile(final):
        # An object stored without its outcome: cut again (the upload replaces it).
        return None
    log.info("clip_reused", file=name, described_by="file")
    return await work.cutter.describe_existing(final, clip.start, clip.end, clip.mode, clip.output)


def _never() -> bool:
    return False


async def attempt_clip(
    work: ClipWork,
    source: JobSource,
    clip: ClipSpec,
    streams: JobStreams,
    *,
    begun_before: int,
    slot: AbstractAsyncContextManager[object] | None = None,
    on_progress: Callable[[float], None] | None = None,
    waited_s: float = 0.0,
    stopping: Callable[[], bool] = _never,
) -> ClipOutcome:
    """Make one attempt at ``clip``: its result, or its error with a stable code.

    ``begun_before``: how often cutting this clip began before without an
    outcome. ``slot`` is entered right before the cut (the in-process
    runner's FFmpeg slot and claim); the time until then, plus ``waited_s``
    already spent on a queue, is the clip's queue wait. ``on_progress`` hears
    the fraction done, at most every :data:`PROGRESS_INTERVAL_S`.
    Cancellation is raised, not turned into an outcome; it counts in the
    metrics as "cancelled" unless ``stopping()`` says the service itself
    stops the clip (it will be cut again).
    """
    t_queued = time.monotonic()
    t_started: float | None = None
    code = "ok"
    try:
        try:
            info = await streams.info()
            check_range(clip, info)
            if begun_before >= work.max_attempts:
                raise ClipFailure(
                    "interrupted",
                    f"cutting this clip began {begun_before} times and the process stopped"
                    " each time; it is not tried again",
                )
            async with slot if slot is not None else contextlib.nullcontext():
                t_started = time.monotonic()
                work.metrics.queue_wait_seconds.observe(waited_s + t_started - t_queued)
                report = _Throttled(clip, on_progress)

                async def cut(current: StreamSet) -> ClipResult:
                    return await produce_clip(work, source, clip, current, info, report)

                return await asyncio.wait_for(streams.run(cut), work.clip_timeout_s)
        except ClipFailure as exc:
            code, message = exc.code, exc.message
            if code in ("ffmpeg_failed", "output_invalid") and storage_full(exc):
                code, message = "storage_full", f"the clip's storage is full: {message}"
        except TimeoutError:
            code, message = "timeout", f"clip took over {work.clip_timeout_s}s"
        except asyncio.CancelledError:
            code = "cancelled"
            raise
        except Exception as exc:  # a bug must not leave the clip without an outcome
            if storage_full(exc):
                code, message = "storage_full", f"the clip's storage is full: {exc}"
            else:
                code, message = "ffmpeg_failed", f"internal error: {exc}"
                log.exception("clip_crashed")
        log.warning("clip_failed", code=code, error=message[:500])
        return clip_error(clip, code, message)
    finally:
        now = time.monotonic()
        if code != "cancelled" or not stopping():
            work.metrics.clips.labels(code, clip.mode).inc()
        if t_started is not None and code != "cancelled":
            work.metrics.cut_seconds.labels(clip.mode).observe(now - t_started)
        log.info(
            "clip_done",
            outcome=code,
            mode=clip.mode,
            start=clip.start,
            end=clip.end,
            attempt=begun_before + 1,
            queued_s=round((t_started or now) - t_queued, 3),
            cut_s=round(now - t_started, 3) if t_started is not None else None,
        )


class _Throttled:
    """FFmpeg's output time turned into the clip's fraction done, reported now and then."""

    def __init__(self, clip: ClipSpec, listener: Callable[[float], None] | None) -> None:
        self._duration_s = max(clip.end - clip.start, 1e-3)
        self._listener = listener
        self._last = float("-inf")

    def __call__(self, out_s: float) -> None:
        now = time.monotonic()
        if self._listener is None or now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        self._listener(min(1.0, out_s / self._duration_s))


async def produce_clip(
    work: ClipWork,
    source: JobSource,
    clip: ClipSpec,
    streams: StreamSet,
    info: SourceInfo,
    on_progress: Callable[[float], None],
) -> ClipResult:
    """Cut ``clip`` into its file (or reuse a complete earlier output) and describe it."""
    name = clip_file_name(source, clip)
    final = work.storage.staging_path(name)
    async with work.names.hold(name):
        outcome = await _reused(work, clip, name, final)
        if outcome is None:
            outcome = await work.cutter.cut(
                CutSpec(
                    streams=streams.urls,
                    info=info,
                    start_s=clip.start,
                    end_s=clip.end,
                    mode=clip.mode,
                    final=final,
                    timeout_s=work.clip_timeout_s,
                    source=streams.index,
                    on_progress=on_progress,
                    options=clip.output,
                )
            )
            await work.storage.publish(name, metadata=outcome_metadata(outcome))
            work.metrics.bytes_written.inc(outcome.size_bytes)
    return ClipResult(
        index=clip.index,
        start=clip.start,
        end=clip.end,
        mode=clip.mode,
        file=name,
        url=f"/api/clips/{name}",
        size_bytes=outcome.size_bytes,
        duration_s=round(outcome.duration_s, 3),
        actual_start=round(outcome.actual_start, 3),
        actual_end=round(outcome.actual_end, 3),
        note=outcome.note,
        format=outcome.format,
        width=outcome.width,
        height=outcome.height,
    )
