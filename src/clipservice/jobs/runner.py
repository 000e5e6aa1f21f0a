"""The in-process runner: each job an asyncio task on the service's loop.

A job resolves its source once and probes it once, then runs one attempt
(:func:`~clipservice.jobs.attempt.attempt_clip`) per clip concurrently, under
the shared :class:`FairLimiter`'s FFmpeg slots. Every change to the job goes
through the store's transactions (:mod:`clipservice.jobs.bookkeeping`): a clip
is claimed (its ``attempts`` saved) right before its FFmpeg starts, its
outcome is recorded when it ends, and the last outcome ends the job. Ended
jobs are deleted by the reaper of :mod:`clipservice.jobs.retention`.

Durability: after a crash, a resumed job redoes the clip that was mid-cut,
its ``attempts`` showing it began; past ``queue.clip_attempts`` such begins
it ends ``interrupted``. A graceful stop (:meth:`LocalRunner.drain`, then
:meth:`LocalRunner.stop`) does not count against a clip: its attempt is given
back when its FFmpeg is killed.

What only this runner does: the FFmpeg slots shared fairly between jobs, the
drain (no clip starts; running ones get a grace), and cancelling a job's task.

Its backlog (:class:`~clipservice.jobs.backlog.Backlog`): the clips waiting
for an FFmpeg slot, plus those of jobs still resolving their source (taken,
not yet at the limiter); in flight, the slots held; one worker, this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import structlog

from clipservice.config import Settings
from clipservice.domain import JobSource, StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.jobs import bookkeeping, retention
from clipservice.jobs.attempt import ClipWork, attempt_clip
from clipservice.jobs.backlog import DrainRate, QueueStats
from clipservice.jobs.base import announce_end
from clipservice.jobs.bookkeeping import StaleAttempt
from clipservice.jobs.limiter import FairLimiter
from clipservice.jobs.models import ClipSpec, Job, JobError
from clipservice.jobs.reel import make_reel
from clipservice.jobs.store import FileJobStore
from clipservice.jobs.streams import JobStreams, resolve_source, source_expired
from clipservice.media.cutter import Cutter, warm_join_processes
from clipservice.media.ffmpeg import running_processes, terminate
from clipservice.metrics import Metrics
from clipservice.sources.base import Resolver
from clipservice.storage import ClipStorage
from clipservice.storage_factory import make_storage

# source_expired lives in jobs/streams.py; the cut engine's tests import it from here.
__all__ = ["LocalRunner", "source_expired"]

log = structlog.get_logger(__name__)

# Who claims clips in the job store (there is one runner per data folder).
_WORKER_ID = "local"


class LocalRunner:
    """Runs jobs as tasks of this process; ended jobs are reaped after their retention."""

    def __init__(
        self,
        settings: Settings,
        store: FileJobStore,
        resolver: Resolver,
        cutter: Cutter,
        metrics: Metrics | None = None,
        storage: ClipStorage | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.resolver = resolver
        self.metrics = metrics if metrics is not None else Metrics()
        # The app passes the storage it opened; one made here is closed by stop().
        self._owns_storage = storage is None
        self.storage = storage if storage is not None else make_storage(settings)
        self.work = ClipWork.of(settings, cutter, self.storage, self.metrics)
        self.limiter = FairLimiter(settings.jobs.max_concurrent_clips)
        # Called with each job once it has ended and been saved (webhooks); must not block.
        self.on_job_end: list[Callable[[Job], None]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._cancel_requested: set[str] = set()
        # Draining: no clip starts; stopping: running clips are being cancelled
        # by the service, not by their job, and resume on the next start.
        self._draining = False
        self._stopping = False
        # Clips past their slot, until their outcome (and so their job's end,
        # for the last one) is saved: a drain waits for them.
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Jobs submitted whose clips are not at the limiter yet (resolving their
        # source): their clips left to cut and since when (the loop's clock).
        self._preparing: dict[str, tuple[int, float]] = {}
        self._drain = DrainRate()

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
            retention.reap_forever(self.store, self.storage, self.settings, self._observe_drain),
            name="reaper",
        )

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
        """Cancel running jobs (they resume on the next start) and the reaper.

        Every FFmpeg is terminated and reaped before this returns, and the
        attempts of the clips it interrupted are given back.
        """
        self._draining = self._stopping = True
        tasks = [*self._tasks.values(), *self._background]
        if self._reaper is not None:
            tasks.append(self._reaper)
        for task in tasks:
            task.cancel("service stopping")
        await asyncio.gather(*tasks, return_exceptions=True)
        # Belt and braces: every run_ffmpeg reaps its process when cancelled.
        for proc in list(running_processes):
            await terminate(proc)
        if self._owns_storage:
            await self.storage.close()

    # -- API-facing -------------------------------------------------------

    async def submit(self, job: Job) -> None:
        """Run a job that is saved as pending (or was left unfinished)."""
        left = len(job.clips) - len(job.done_indexes())
        self._preparing[job.job_id] = (left, asyncio.get_running_loop().time())
        task = asyncio.create_task(self._run_job(job.job_id), name=f"job-{job.job_id}")
        self._tasks[job.job_id] = task
        task.add_done_callback(functools.partial(self._forget_task, job.job_id))

    def _forget_task(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)
        self._preparing.pop(job_id, None)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a pending or running job; True if this call cancelled it."""
        task = self._tasks.get(job_id)
        if task is None:
            return await self._cancel_job(job_id)
        self._cancel_requested.add(job_id)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return True

    async def delete_ended(self, job: Job) -> None:
        """Delete an ended job and its files now."""
        await retention.delete_now(self.store, self.storage, job)

    # -- backlog: autoscaling signals and backpressure ----------------------

    async def queued_clips(self) -> int:
        """Clips waiting for a slot, and those of jobs still resolving their source."""
        return self.limiter.waiting + sum(left for left, _ in self._preparing.values())

    async def queue_stats(self) -> QueueStats:
        """The jobs resolving and the clips waiting for a slot; in flight, the slots held."""
        now_s = self._observe()
        since = [t for _, t in self._preparing.values()]
        return QueueStats(
            depth={"jobs": len(self._preparing), "clips": self.limiter.waiting},
            oldest_age_s={
                "jobs": max(0.0, now_s - min(since)) if since else 0.0,
                "clips": self.limiter.oldest_wait_s(now_s),
            },
            in_flight={_WORKER_ID: self.limiter.in_use},
            workers=1,
        )

    def drain_per_s(self) -> float | None:
        """Slots granted per second lately: how fast waiting clips start."""
        return self._drain.per_s(self._observe())

    def _observe(self) -> float:
        """Feed the drain rate the slots granted so far; the loop's time."""
        now_s = asyncio.get_running_loop().time()
        self._drain.observe(now_s, {_WORKER_ID: self.limiter.granted})
        return now_s

    async def _observe_drain(self) -> None:
        # Every reaper round too, so the rate is known when a creation is refused.
        self._observe()

    # -- running a job ----------------------------------------------------

    async def _run_job(self, job_id: str) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            try:
                await self._process(job_id)
            except asyncio.CancelledError:
                if job_id in self._cancel_requested:
                    self._cancel_requested.discard(job_id)
                    await asyncio.shield(self._cancel_job(job_id))
                # Otherwise the service is stopping: the job stays pending or
                # processing on disk and resumes on the next start.
                raise
            except Exception as exc:  # a bug must not leave the job hanging
                log.exception("job_crashed")
                await self._fail(job_id, JobError(code="ffmpeg_failed", message=f"internal: {exc}"))

    async def _process(self, job_id: str) -> None:
        job = await bookkeeping.start_job(self.store, job_id)
        if job is None:
            return
        t0 = time.monotonic()
        streams: JobStreams | None = None
        try:
            urls = await resolve_source(self.resolver, job.source, self.metrics)
            streams = JobStreams(
                urls,
                functools.partial(self._renew, job.source),
                allow_private=self.settings.security.allow_private_sources,
            )
            info = await streams.info()
        except SourceError as exc:
            if streams is not None:
                await streams.aclose()
            log.warning("source_failed", code=exc.code, error=exc.message)
            await self._fail(job_id, JobError(code=exc.code, message=exc.message))
            return
        except BaseException:
            if streams is not None:
                await asyncio.shield(streams.aclose())
            raise
        log.info(
            "source_ready",
            duration_s=info.duration_s,
            codec=info.video.codec,
            height=info.video.height,
            separate_audio=urls.audio_url is not None,
            resolve_probe_s=round(time.monotonic() - t0, 3),
        )
        done = job.done_indexes()
        try:
            async with asyncio.TaskGroup() as tg:
                for clip in job.clips:
                    if clip.index not in done:
                        tg.create_task(self._run_clip(job_id, job.source, clip, streams))
                # They wait at the limiter from their first step on.
                self._preparing.pop(job_id, None)
        finally:
            await asyncio.shield(streams.aclose())
        # Each outcome ends the job once it is the last, unless it asked for a
        # reel: that is made now, then the job ends. This also ends a resumed
        # job that had nothing left to cut (its reel made if still missing).
        retention_s = self.settings.jobs.retention_s
        current = await self.store.get(job_id)
        if current is not None and bookkeeping.reel_due(current):
            reel = await make_reel(
                current, self.storage, timeout_s=self.settings.jobs.clip_timeout_s
            )
            ended = await bookkeeping.set_reel(self.store, job_id, reel, retention_s)
        else:
            ended = await bookkeeping.finish_if_done(self.store, job_id, retention_s)
        if ended is not None:
            announce_end(ended, self.on_job_end)

    async def _renew(self, source: JobSource, generation: int) -> tuple[StreamUrls, int]:
        return await resolve_source(self.resolver, source, self.metrics), generation + 1

    async def _run_clip(
        self, job_id: str, source: JobSource, clip: ClipSpec, streams: JobStreams
    ) -> None:
        claimed: int | None = None
        held = False

        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            nonlocal claimed, held
            async with self.limiter.slot(job_id):
                if self._draining:
                    await self._gate()
                self._hold()
                held = True
                # On disk before FFmpeg starts: a crash from here on counts.
                claimed = await bookkeeping.claim_clip(self.store, job_id, clip.index, _WORKER_ID)
                if claimed is None:
                    raise ClipFailure("cancelled", "the job ended before this clip began")
                yield

        def on_progress(fraction: float) -> None:
            if claimed is not None:
                self._spawn(
                    bookkeeping.clip_progress(self.store, job_id, clip.index, claimed, fraction)
                )

        with structlog.contextvars.bound_contextvars(clip_index=clip.index):
            try:
                outcome = await attempt_clip(
                    self.work,
                    source,
                    clip,
                    streams,
                    begun_before=clip.attempts,
                    slot=slot(),
                    on_progress=on_progress,
                    stopping=lambda: self._stopping,
                )
                # A clip that ended before its claim (out of range, interrupted)
                # is recorded under the attempt number it has.
                attempt = claimed if claimed is not None else clip.attempts
                try:
                    after = await asyncio.shield(
                        bookkeeping.record_clip(
                            self.store, job_id, attempt, outcome, self.settings.jobs.retention_s
                        )
                    )
                except StaleAttempt:
                    log.warning("clip_stale", attempt=attempt)
                    return
                if after.status.ended:
                    announce_end(after, self.on_job_end)
            except asyncio.CancelledError:
                if self._stopping and claimed is not None and job_id not in self._cancel_requested:
                    # The service stopped it: it resumes as if never begun.
                    await asyncio.shield(
                        bookkeeping.release_clip(self.store, job_id, clip.index, claimed)
                    )
                raise
            finally:
                if held:
                    self._unhold()

    async def _gate(self) -> None:
        """Hold a clip that got its slot while draining until the stop cancels it."""
        await asyncio.get_running_loop().create_future()

    def _hold(self) -> None:
        self._active += 1
        self._idle.clear()

    def _unhold(self) -> None:
        self._active -= 1
        if not self._active:
            self._idle.set()

    # -- the job's end ----------------------------------------------------

    async def _fail(self, job_id: str, error: JobError) -> None:
        ended = await bookkeeping.fail_job(
            self.store, job_id, error, self.settings.jobs.retention_s
        )
        if ended is not None:
            announce_end(ended, self.on_job_end)

    async def _cancel_job(self, job_id: str) -> bool:
        job, cancelled = await bookkeeping.cancel_job(
            self.store, job_id, self.settings.jobs.retention_s
        )
        if job is not None and cancelled:
            log.info("job_cancelled", job_id=job_id)
            announce_end(job, self.on_job_end)
        return cancelled

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
