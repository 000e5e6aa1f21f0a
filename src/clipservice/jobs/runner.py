"""The in-process job runner: each job an asyncio task on the service's loop.

A job resolves its source once, probes it once, then cuts its clips
concurrently under the shared :class:`FairLimiter`. Every clip ends in
``results`` or ``errors`` whatever happens to it, and the job document is
saved after each one. Ended jobs are deleted ``retention_s`` after they end
by the reaper of :mod:`clipservice.jobs.retention`.

Durability: the job file records each clip's ``attempts`` (saved before its
FFmpeg starts), so after a crash a resumed job redoes the clip that was
mid-cut. A clip whose cutting was begun ``MAX_CLIP_ATTEMPTS`` times without
an outcome (the process died during it each time, e.g. a clip that makes the
service run out of memory) ends with code ``interrupted`` instead of taking
the service down in a loop. A graceful stop (``drain`` then ``stop``) does
not count against a clip: its attempt is given back when its FFmpeg is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from clipservice.config import Settings
from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.jobs import retention
from clipservice.jobs.clipwork import check_range, produce_clip
from clipservice.jobs.events import JobEvents, LocalJobEvents
from clipservice.jobs.limiter import FairLimiter
from clipservice.jobs.models import (
    ClipError,
    ClipResult,
    ClipSpec,
    Job,
    JobError,
    JobStatus,
    utcnow,
)
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.store import FileJobStore
from clipservice.media.cutter import Cutter, warm_join_processes
from clipservice.media.ffmpeg import running_processes, terminate
from clipservice.media.probe import SourceInfo, probe_source
from clipservice.media.source import SourceIndex
from clipservice.metrics import Metrics
from clipservice.sources.base import ResolvedSource, Resolver
from clipservice.storage import SharedFolderStorage

log = structlog.get_logger(__name__)

# The job file is rewritten for progress at most this often.
_PROGRESS_SAVE_INTERVAL_S = 0.5
# Starts of one clip that may end without an outcome before it is given up as
# "interrupted": a clip that kills the process is not retried forever.
MAX_CLIP_ATTEMPTS = 3
# Times one job may resolve its source again because its stream URLs expired.
MAX_SOURCE_REFRESHES = 3

_EXPIRED_RE = re.compile(
    r"(?:HTTP error|Server returned|answered) (?:403|410)\b|\b(?:403|410) (?:Forbidden|Gone)\b"
)


def source_expired(message: str) -> bool:
    """Whether an error says a stream URL answered 403 or 410 (signed URLs expire)."""
    return _EXPIRED_RE.search(message) is not None


@dataclass
class StreamSet:
    """One generation of a job's stream URLs, with the keyframe index over them."""

    src: StreamUrls
    keyframes: SourceIndex
    generation: int = 0


class JobStreams:
    """A job's streams: resolved once, and again when they expire mid-job.

    Clips that hit the same expiry share one new resolve: a clip passes the
    generation it used, and only the first to report it resolves again.
    """

    def __init__(
        self,
        src: StreamUrls,
        resolve: Callable[[], Awaitable[ResolvedSource]],
        keyframes: SourceIndex | None = None,
    ) -> None:
        self.current = StreamSet(src, keyframes or SourceIndex(src.video_url, src.audio_url))
        self._resolve = resolve
        self._lock = asyncio.Lock()
        self._retired: list[SourceIndex] = []

    async def refresh(self, used: StreamSet) -> StreamSet:
        async with self._lock:
            if self.current is used:
                resolved = await self._resolve()
                src = StreamUrls(resolved.video_url, resolved.audio_url)
                self._retired.append(used.keyframes)
                self.current = StreamSet(
                    src, SourceIndex(src.video_url, src.audio_url), used.generation + 1
                )
            return self.current

    async def aclose(self) -> None:
        for index in (*self._retired, self.current.keyframes):
            await index.aclose()


class LocalRunner:
    """Runs jobs as tasks of this process and cleans them up after retention."""

    def __init__(
        self,
        settings: Settings,
        store: FileJobStore,
        resolver: Resolver,
        cutter: Cutter,
        events: JobEvents | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.events: JobEvents = events if events is not None else LocalJobEvents()
        self.metrics = metrics if metrics is not None else Metrics()
        self.store = store
        self.resolver = resolver
        self.cutter = cutter
        self.clips_dir: Path = settings.clips_dir
        # Outputs go to the clips folder; the same clip work as the distributed workers.
        self.storage = SharedFolderStorage(self.clips_dir)
        self.limiter = FairLimiter(settings.jobs.max_concurrent_clips)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._cancel_requested: set[str] = set()
        self._clip_progress: dict[str, dict[int, float]] = {}
        self._last_progress_save: dict[str, float] = {}
        # Called with each job once it has ended and been saved (webhooks); must not block.
        self.on_job_end: list[Callable[[Job], None]] = []
        self._live_jobs: dict[str, Job] = {}
        # Draining: no clip starts; stopping: running clips are being cancelled
        # by the service, not by their job, and resume on the next start.
        self._draining = False
        self._stopping = False
        # Clips past their slot (cutting or saving their outcome); the last one
        # of a job hands its count to the job until the job is saved as ended,
        # so a drain never stops a job between its last clip and its end.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._unfinished_clips: dict[str, int] = {}
        self._ending: set[str] = set()

    # -- life cycle -------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished jobs and start the reaper (which deletes overdue jobs at once)."""
        await self.storage.open()
        # No cut runs yet: every temporary output is a crashed one.
        stale = await self.storage.remove_stale_parts()
        if stale:
            log.info("stale_parts_removed", count=stale)
        warm_join_processes(self.settings.jobs.max_concurrent_clips)
        for job in await self.store.all():
            if not job.status.ended:
                log.info("job_resumed", job_id=job.job_id, done=len(job.done_indexes()))
                await self.submit(job)
        self._reaper = asyncio.create_task(
            retention.reap_forever(self.store, self.storage, self.settings), name="reaper"
        )

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def clips_active(self) -> int:
        return self._active

    def _hold(self) -> None:
        self._active += 1
        self._idle.clear()

    def _unhold(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> int:
        """Start no more clips; give the running ones ``grace_s`` to finish.

        Returns how many clips were still cutting when the grace ended (0 if
        all finished). ``abort`` being set ends the grace early (a second
        signal). Call :meth:`stop` afterwards.
        """
        self._draining = True
        if self._active:
            log.info("drain_waiting", clips=self._active, grace_s=grace_s)
            waits = [asyncio.ensure_future(self._idle.wait())]
            if abort is not None:
                waits.append(asyncio.ensure_future(abort.wait()))
            try:
                await asyncio.wait(waits, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
        return self._active

    async def stop(self) -> None:
        """Cancel running jobs (they resume on the next start) and timers.

        Every FFmpeg is terminated and reaped before this returns, and each
        unfinished job is saved once more, with its interrupted clips'
        attempts given back.
        """
        self._draining = self._stopping = True
        unfinished = list(self._live_jobs.values())
        tasks = [*self._tasks.values(), *self._background]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel("service stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in unfinished:
            if not job.status.ended:
                with contextlib.suppress(OSError):
                    await self.store.save(job)
        # Belt and braces: every run_ffmpeg reaps its process when cancelled.
        for proc in list(running_processes):
            await terminate(proc)

    # -- API-facing -------------------------------------------------------

    async def submit(self, job: Job) -> None:
        task = asyncio.create_task(self._run_job(job), name=f"job-{job.job_id}")
        self._tasks[job.job_id] = task
        self._live_jobs[job.job_id] = job
        task.add_done_callback(functools.partial(self._forget_task, job.job_id))

    def _forget_task(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._live_jobs.pop(job_id, None)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a pending or running job; True if it was running."""
        task = self._tasks.get(job_id)
        if task is None:
            job = await self.store.get(job_id)
            if job is not None and not job.status.ended:
                await self._finish_cancelled(job)
            return False
        self._cancel_requested.add(job_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def delete_ended(self, job: Job) -> None:
        """Delete an ended job and its files now."""
        await retention.delete_now(self.store, self.storage, job)

    # -- running a job ----------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job.job_id):
            try:
                await self._process(job)
            except asyncio.CancelledError:
                if job.job_id in self._cancel_requested:
                    self._cancel_requested.discard(job.job_id)
                    await asyncio.shield(self._finish_cancelled(job))
                # Otherwise the service is stopping: the job stays pending or
                # processing on disk and resumes on the next start.
                raise
            except Exception as exc:  # a bug must not leave the job hanging
                log.exception("job_crashed")
                await self._end(job, JobError(code="ffmpeg_failed", message=f"internal: {exc}"))

    async def _process(self, job: Job) -> None:
        job.status = JobStatus.PROCESSING
        await self._save(job)
        t0 = time.monotonic()
        index: SourceIndex | None = None
        try:
            resolved = await self._resolve(job)
            src = StreamUrls(resolved.video_url, resolved.audio_url)
            # The job's keyframe index; the probe reads the video through it.
            index = SourceIndex(src.video_url, src.audio_url)
            try:
                info = await probe_source(src.video_url, src.audio_url, index)
            except SourceError as exc:
                if not source_expired(exc.message):
                    raise
                log.info("source_expired", error=exc.message[:300])
                await index.aclose()
                resolved = await self._resolve(job)
                src = StreamUrls(resolved.video_url, resolved.audio_url)
                index = SourceIndex(src.video_url, src.audio_url)
                info = await probe_source(src.video_url, src.audio_url, index)
        except SourceError as exc:
            if index is not None:
                await index.aclose()
            log.warning("source_failed", code=exc.code, error=exc.message)
            await self._end(job, JobError(code=exc.code, message=exc.message))
            return
        except BaseException:
            if index is not None:
                await asyncio.shield(index.aclose())
            raise
        log.info(
            "source_ready",
            duration_s=info.duration_s,
            codec=info.video.codec,
            height=info.video.height,
            separate_audio=src.audio_url is not None,
            resolve_probe_s=round(time.monotonic() - t0, 3),
        )
        done = job.done_indexes()
        pending = [c for c in job.clips if c.index not in done]
        self._clip_progress[job.job_id] = {}
        self._unfinished_clips[job.job_id] = len(pending)
        # One set of streams (and keyframe index) per job, shared by its clips.
        streams = JobStreams(src, functools.partial(self._resolve, job), index)
        try:
            try:
                async with asyncio.TaskGroup() as tg:
                    for clip in pending:
                        tg.create_task(self._run_clip(job, clip, streams, info))
            finally:
                self._clip_progress.pop(job.job_id, None)
                self._unfinished_clips.pop(job.job_id, None)
                await asyncio.shield(streams.aclose())
            if job.results:
                await self._end(job, None)
            else:
                codes = Counter(e.code for e in job.errors)
                code = codes.most_common(1)[0][0] if codes else "ffmpeg_failed"
                await self._end(job, JobError(code=code, message="every clip failed"))
        finally:
            if job.job_id in self._ending:
                self._ending.discard(job.job_id)
                self._unhold()

    async def _resolve(self, job: Job) -> ResolvedSource:
        t0 = time.monotonic()
        try:
            return await self.resolver.resolve(job.source)
        except SourceError as exc:
            self.metrics.resolve_errors.labels(exc.code).inc()
            raise
        finally:
            self.metrics.resolve_seconds.observe(time.monotonic() - t0)

    async def _gate(self) -> None:
        """Hold a clip that got its slot while draining until the stop cancels it."""
        await asyncio.get_running_loop().create_future()

    async def _run_clip(
        self, job: Job, clip: ClipSpec, streams: JobStreams, info: SourceInfo
    ) -> None:
        with structlog.contextvars.bound_contextvars(clip_index=clip.index):
            name = clip_file_name(job.source, clip)
            t_queued = time.monotonic()
            t_started: float | None = None
            outcome_code = "ok"
            counted = held = False
            try:
                check_range(clip, info)
                if clip.attempts >= MAX_CLIP_ATTEMPTS:
                    raise ClipFailure(
                        "interrupted",
                        f"the service stopped during this clip {clip.attempts} times;"
                        " it is not tried again",
                    )
                async with self.limiter.slot(job.job_id):
                    if self._draining:
                        await self._gate()
                    t_started = time.monotonic()
                    self.metrics.queue_wait_seconds.observe(t_started - t_queued)
                    # On disk before FFmpeg starts: a crash from here on counts.
                    self._hold()
                    held = True
                    clip.attempts += 1
                    counted = True
                    await self._save(job)
                    result = await asyncio.wait_for(
                        self._produce_fresh(job, clip, streams, info, name),
                        self.settings.jobs.clip_timeout_s,
                    )
                job.results.append(result)
                job.results.sort(key=lambda r: r.index)
            except ClipFailure as exc:
                outcome_code = exc.code
                self._record_error(job, clip, exc.code, exc.message)
            except TimeoutError:
                outcome_code = "timeout"
                self._record_error(
                    job, clip, "timeout", f"clip took over {self.settings.jobs.clip_timeout_s}s"
                )
            except asyncio.CancelledError:
                outcome_code = "cancelled"
                if self._stopping and counted and job.job_id not in self._cancel_requested:
                    clip.attempts -= 1  # the service stopped it; it resumes as if never begun
                raise
            except Exception as exc:
                outcome_code = "ffmpeg_failed"
                log.exception("clip_crashed")
                self._record_error(job, clip, "ffmpeg_failed", f"internal error: {exc}")
            finally:
                now = time.monotonic()
                if outcome_code != "cancelled" or not self._stopping:
                    self.metrics.clips.labels(outcome_code, clip.mode).inc()
                    if t_started is not None and outcome_code != "cancelled":
                        self.metrics.cut_seconds.labels(clip.mode).observe(now - t_started)
                log.info(
                    "clip_done",
                    outcome=outcome_code,
                    mode=clip.mode,
                    start=clip.start,
                    end=clip.end,
                    queued_s=round((t_started or now) - t_queued, 3),
                    cut_s=round(now - t_started, 3) if t_started else None,
                )
                try:
                    if outcome_code != "cancelled":
                        self._clip_progress.get(job.job_id, {}).pop(clip.index, None)
                        self._update_counts(job)
                        await asyncio.shield(self._save(job))
                finally:
                    self._unfinished_clips[job.job_id] -= 1
                    if held:
                        if self._unfinished_clips[job.job_id] == 0 and outcome_code != "cancelled":
                            self._ending.add(job.job_id)  # released once the job is saved
                        else:
                            self._unhold()

    async def _produce_fresh(
        self, job: Job, clip: ClipSpec, streams: JobStreams, info: SourceInfo, name: str
    ) -> ClipResult:
        """Produce the clip; if its stream URLs expired (403/410), resolve again and retry once."""
        used = streams.current
        try:
            return await self._produce(job, clip, used.src, info, name, used.keyframes)
        except ClipFailure as exc:
            if not source_expired(exc.message) or used.generation >= MAX_SOURCE_REFRESHES:
                raise
            log.info("source_expired", error=exc.message[:300])
            fresh = await streams.refresh(used)
            return await self._produce(job, clip, fresh.src, info, name, fresh.keyframes)

    async def _produce(
        self,
        job: Job,
        clip: ClipSpec,
        src: StreamUrls,
        info: SourceInfo,
        name: str,
        keyframes: SourceIndex | None = None,
    ) -> ClipResult:
        duration = clip.end - clip.start

        def on_progress(out_s: float) -> None:
            self._on_progress(job, clip.index, min(1.0, out_s / duration))

        return await produce_clip(
            self.cutter,
            self.storage,
            clip,
            src,
            info,
            name,
            timeout_s=self.settings.jobs.clip_timeout_s,
            on_progress=on_progress,
            keyframes=keyframes,
            on_written=self.metrics.bytes_written.inc,
        )

    # -- bookkeeping ------------------------------------------------------

    def _record_error(self, job: Job, clip: ClipSpec, code: str, message: str) -> None:
        log.warning("clip_failed", code=code, error=message[:500])
        job.errors.append(
            ClipError(index=clip.index, start=clip.start, end=clip.end, code=code, message=message)
        )
        job.errors.sort(key=lambda e: e.index)

    def _update_counts(self, job: Job) -> None:
        job.processed = len(job.done_indexes())
        partial = sum(self._clip_progress.get(job.job_id, {}).values())
        job.progress = round(min(1.0, (job.processed + partial) / job.total), 4)
        job.updated_at = utcnow()

    def _on_progress(self, job: Job, index: int, fraction: float) -> None:
        progress = self._clip_progress.get(job.job_id)
        if progress is None:
            return
        progress[index] = fraction
        self._update_counts(job)
        # Listeners see every move; the file is rewritten only a few times a second.
        self._spawn(self.events.publish(job))
        now = time.monotonic()
        if now - self._last_progress_save.get(job.job_id, 0.0) >= _PROGRESS_SAVE_INTERVAL_S:
            self._last_progress_save[job.job_id] = now
            self._spawn(self._save(job))

    async def _save(self, job: Job) -> None:
        await self.store.save(job)
        await self.events.publish(job)

    async def _end(self, job: Job, error: JobError | None) -> None:
        now = utcnow()
        job.status = JobStatus.FAILED if error else JobStatus.FINISHED
        job.error = error
        self._finalize(job, now)
        await self._save(job)
        log.info(
            "job_ended",
            status=job.status.value,
            results=len(job.results),
            errors=len(job.errors),
        )
        self._job_ended(job)

    async def _finish_cancelled(self, job: Job) -> None:
        done = job.done_indexes()
        for clip in job.clips:
            if clip.index not in done:
                job.errors.append(
                    ClipError(
                        index=clip.index,
                        start=clip.start,
                        end=clip.end,
                        code="cancelled",
                        message="the job was cancelled",
                    )
                )
        job.errors.sort(key=lambda e: e.index)
        job.status = JobStatus.CANCELLED
        self._finalize(job, utcnow())
        await self._save(job)
        log.info("job_cancelled")
        self._job_ended(job)

    def _job_ended(self, job: Job) -> None:
        for hook in self.on_job_end:
            try:
                hook(job)
            except Exception:  # a broken hook must not break the job's end
                log.exception("job_end_hook_failed")

    def _finalize(self, job: Job, now: datetime) -> None:
        job.finished_at = job.updated_at = now
        job.expires_at = now + timedelta(seconds=self.settings.jobs.retention_s)
        job.processed = len(
            {r.index for r in job.results} | {e.index for e in job.errors if e.code != "cancelled"}
        )
        job.progress = 1.0 if job.status is not JobStatus.CANCELLED else job.progress

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
