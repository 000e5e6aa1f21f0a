"""The worker side of the distributed mode: ``clipservice worker`` processes.

A worker runs SAQ workers for both queues (see :mod:`clipservice.jobs.queue`):

- ``prepare_job`` resolves the job's source once, probes it, stores the
  stream URLs for every worker and enqueues one ``cut_clip`` task per clip
  (or fails the job when the source is unusable).
- ``cut_clip`` claims its clip in the job store, makes one attempt at it
  (:func:`~clipservice.jobs.attempt.attempt_clip`, as the in-process runner
  does) and records the outcome; the store ends the job when its last clip
  has one.

Stream URLs that expire mid-job are resolved again by one worker under a
Redis lock and stored with the next generation number; the job's other
workers pick that generation up instead of resolving again.

What only the workers do: the heartbeat and the SAQ retries. A worker that
dies stops its heartbeat; another worker's sweep queues the task again within
seconds (see :mod:`clipservice.jobs.queue` for the numbers), and the clip's
attempt number in the job store fences off anything the old worker might
still write (see :mod:`clipservice.jobs.bookkeeping`).

The heartbeat says the task is live, and that is what "live" means here: the
worker process runs, its event loop is not stuck (it runs the beat loop every
``heartbeat_s / 5``), and the task's coroutine is still within its time limit
(``clip_timeout_s`` bounds every cut, whatever it waits on). Each beat carries
the clip's real progress (FFmpeg's ``out_time``, the join process's progress
messages) and a clip that has not moved for ``heartbeat_s`` is logged
(``clip_quiet``), but it keeps its task: a stalled source read is the cut's
own business, ended by its timeout, not a reason to cut it twice. A beat that
finds the task no longer this run's (swept while this worker stalled, and
queued again) stops the clip here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import aiohttp
import structlog
from saq import Queue, Worker
from saq.job import Job as SaqJob
from saq.types import Context, PartialTimersDict

from clipservice.config import Settings
from clipservice.domain import JobSource, StreamUrls
from clipservice.errors import SourceError
from clipservice.jobs import bookkeeping, retention
from clipservice.jobs.attempt import ClipWork, attempt_clip
from clipservice.jobs.base import announce_end
from clipservice.jobs.bookkeeping import StaleAttempt
from clipservice.jobs.models import ClipResult, Job, JobError
from clipservice.jobs.outbox import RedisOutbox
from clipservice.jobs.queue import (
    CLIPS_QUEUE,
    JOBS_QUEUE,
    FreshSweepQueue,
    beat_interval_s,
    clip_task,
    make_queue,
    merge_task,
)
from clipservice.jobs.redis_store import RedisJobStore, StoredSource
from clipservice.jobs.reel import make_reel
from clipservice.jobs.streams import JobStreams, resolve_source
from clipservice.jobs.webhooks import WebhookSender
from clipservice.media.cutter import Cutter, warm_join_processes
from clipservice.metrics import Metrics
from clipservice.sources.base import Resolver
from clipservice.sources.egress import ffmpeg_egress
from clipservice.sources.factory import make_resolver
from clipservice.sources.guard import UrlGuard
from clipservice.storage import ClipStorage
from clipservice.storage_factory import open_storage

log = structlog.get_logger(__name__)

# Jobs whose streams (source index and probe) this process keeps.
_STREAMS_CACHE_SIZE = 16


class ClipWorker:
    """The worker side: SAQ task functions with the state they share in one process."""

    def __init__(
        self,
        settings: Settings,
        store: RedisJobStore,
        storage: ClipStorage,
        resolver: Resolver,
        clips_queue: Queue,
        worker_id: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.resolver = resolver
        self.clips_queue = clips_queue
        self.worker_id = worker_id
        self.metrics = metrics if metrics is not None else Metrics()
        self.work = ClipWork.of(settings, Cutter(settings.cut.ffmpeg_path), storage, self.metrics)
        # Set when the worker process stops: the clips it cancels are cut again elsewhere.
        self.stopping = False
        self._streams: OrderedDict[str, JobStreams] = OrderedDict()
        self._users: Counter[str] = Counter()  # clips (and prepares) using each job's streams
        self._background: set[asyncio.Task[Any]] = set()
        # Called with the job when this worker ended it (its webhook).
        self.on_job_end: list[Callable[[Job], None]] = []

    # -- prepare: resolve once, probe, enqueue the clips ----------------------

    async def prepare_job(self, ctx: Context, *, job_id: str) -> str:
        keepalive = self._start_keepalive(ctx["job"])
        try:
            return await self._prepare(job_id)
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _prepare(self, job_id: str) -> str:
        with structlog.contextvars.bound_contextvars(job_id=job_id, worker=self.worker_id):
            job = await bookkeeping.start_job(self.store, job_id)
            if job is None:
                return "skipped"
            if await self.store.get_source(job_id) is None:
                t0 = time.monotonic()
                try:
                    stored = StoredSource(
                        await resolve_source(self.resolver, job.source, self.metrics)
                    )
                    await self.store.set_source(job_id, stored)
                    # Read through the job's streams here: this worker's clips reuse them.
                    with self._streams_of(job_id, job.source, stored) as streams:
                        info = await streams.info()
                except SourceError as exc:
                    log.warning("source_failed", code=exc.code, error=exc.message)
                    failed = await bookkeeping.fail_job(
                        self.store,
                        job_id,
                        JobError(code=exc.code, message=exc.message),
                        self.settings.jobs.retention_s,
                    )
                    if failed is not None:
                        await self._ended(failed)
                    return "failed"
                log.info(
                    "source_ready",
                    duration_s=info.duration_s,
                    codec=info.video.codec,
                    resolve_probe_s=round(time.monotonic() - t0, 3),
                )
            # A job whose every clip has an outcome (a prepare run again) ends here.
            ended = await bookkeeping.finish_if_done(
                self.store, job_id, self.settings.jobs.retention_s
            )
            if ended is not None:
                await self._ended(ended)
                return "ended"
            if bookkeeping.reel_due(job):
                await self.clips_queue.enqueue(merge_task(self.settings, job_id))
                return "merging"
            done = job.done_indexes()
            for clip in job.clips:
                if clip.index not in done:
                    await self.clips_queue.enqueue(clip_task(self.settings, job_id, clip.index))
            return "enqueued"

    # -- cut one clip -----------------------------------------------------------

    async def cut_clip(self, ctx: Context, *, job_id: str, index: int) -> str:
        task: SaqJob = ctx["job"]
        with structlog.contextvars.bound_contextvars(
            job_id=job_id, clip_index=index, worker=self.worker_id, task_attempt=task.attempts
        ):
            attempt = await bookkeeping.claim_clip(self.store, job_id, index, self.worker_id)
            if attempt is None:
                return "skipped"  # done already, or the job ended or is gone
            job = await self.store.get(job_id)
            stored = await self.store.get_source(job_id)
            if job is None or stored is None:
                return "skipped"

            pulse = _Pulse()

            def on_progress(fraction: float) -> None:
                pulse.moved(fraction)  # the next beat carries it
                self._spawn(bookkeeping.clip_progress(self.store, job_id, index, attempt, fraction))

            keepalive = self._start_keepalive(task, pulse)
            try:
                # Cancelled (job cancelled, or this worker stopping: SAQ queues
                # the clip again): the cutter kills FFmpeg and removes the
                # partial file; nothing to record.
                with self._streams_of(job_id, job.source, stored) as streams:
                    outcome = await attempt_clip(
                        self.work,
                        job.source,
                        job.clips[index],
                        streams,
                        # Each claim is a begin: the ones before ended without an outcome.
                        begun_before=attempt - 1,
                        on_progress=on_progress,
                        waited_s=(task.duration("start") or 0) / 1000,
                        stopping=lambda: self.stopping,
                    )
            finally:
                keepalive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keepalive
            try:
                after = await bookkeeping.record_clip(
                    self.store, job_id, attempt, outcome, self.settings.jobs.retention_s
                )
            except StaleAttempt:
                log.warning("clip_stale", attempt=attempt)
                return "stale"
            if after.status.ended:
                await self._ended(after)
            elif bookkeeping.reel_due(after):
                await self.clips_queue.enqueue(merge_task(self.settings, job_id))
            return "ok" if isinstance(outcome, ClipResult) else outcome.code

    # -- the job's reel ---------------------------------------------------------

    async def merge_job(self, ctx: Context, *, job_id: str) -> str:
        """Make the job's reel (every clip has an outcome) and end the job."""
        with structlog.contextvars.bound_contextvars(job_id=job_id, worker=self.worker_id):
            job = await self.store.get(job_id)
            if job is None or not bookkeeping.reel_due(job):
                return "skipped"
            reel = await make_reel(job, self.storage, timeout_s=self.settings.jobs.clip_timeout_s)
            ended = await bookkeeping.set_reel(
                self.store, job_id, reel, self.settings.jobs.retention_s
            )
            if ended is not None:
                await self._ended(ended)
            return "ok" if reel.error is None else reel.error.code

    async def _ended(self, job: Job) -> None:
        announce_end(job, self.on_job_end)
        if not self._users[job.job_id]:  # a stale attempt may still be reading them
            streams = self._streams.pop(job.job_id, None)
            if streams is not None:
                await streams.aclose()

    # -- the job's streams, shared through Redis --------------------------------

    @contextlib.contextmanager
    def _streams_of(
        self, job_id: str, source: JobSource, stored: StoredSource
    ) -> Iterator[JobStreams]:
        """The job's streams in this process, at the newest generation stored, while in use.

        One set per job, shared by its clips here; the least recently used
        sets no clip is using are closed past :data:`_STREAMS_CACHE_SIZE`.
        """
        streams = self._streams.get(job_id)
        if streams is None:
            streams = self._streams[job_id] = JobStreams(
                stored.urls,
                lambda generation: self._renew(job_id, source, generation),
                generation=stored.generation,
                allow_private=self.settings.security.allow_private_sources,
            )
        else:
            streams.adopt(stored.urls, stored.generation)
        self._streams.move_to_end(job_id)
        self._users[job_id] += 1
        try:
            yield streams
        finally:
            self._users[job_id] -= 1
            if not self._users[job_id]:
                del self._users[job_id]
            idle = [j for j in self._streams if not self._users[j]]  # oldest first
            for old in idle[: max(0, len(self._streams) - _STREAMS_CACHE_SIZE)]:
                self._spawn(self._streams.pop(old).aclose())

    async def _renew(
        self, job_id: str, source: JobSource, generation: int
    ) -> tuple[StreamUrls, int]:
        """Stream URLs newer than ``generation``: resolved here, unless another worker did."""
        # Long enough for a resolve; a holder that died frees the lock after it.
        lock_s = self.settings.resolver.timeout_s * 2 + 10
        async with self.store.source_lock(job_id, lock_s):
            stored = await self.store.get_source(job_id)
            if stored is None:
                raise SourceError("source_unavailable", "the job is gone")
            if stored.generation > generation:
                return stored.urls, stored.generation
            fresh = StoredSource(
                await resolve_source(self.resolver, source, self.metrics), generation + 1
            )
            await self.store.set_source(job_id, fresh)
            log.info("source_renewed", generation=fresh.generation)
            return fresh.urls, fresh.generation

    # -- heartbeat ----------------------------------------------------------------

    def _start_keepalive(self, task: SaqJob, pulse: _Pulse | None = None) -> asyncio.Task[None]:
        owner = asyncio.current_task()
        assert owner is not None
        return asyncio.create_task(self._keepalive(task, owner, pulse))

    async def _keepalive(
        self, task: SaqJob, owner: asyncio.Task[Any], pulse: _Pulse | None
    ) -> None:
        """Beat for ``task`` while ``owner`` (its coroutine) runs; see the module's "live"."""
        queue = task.get_queue()
        assert isinstance(queue, FreshSweepQueue)
        heartbeat_s = self.settings.queue.heartbeat_s
        interval_s = beat_interval_s(heartbeat_s)
        last_ok = time.monotonic()
        quiet_logged = False
        while True:
            await asyncio.sleep(interval_s)
            fields = {"progress": pulse.fraction} if pulse is not None else {}
            try:
                ours = await queue.beat(task, **fields)
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc))
                if time.monotonic() - last_ok > heartbeat_s:
                    # Cut off from Redis past the heartbeat: another worker is
                    # about to take this task over, so stop working on it here.
                    log.error("heartbeat_lost", task=task.key)
                    owner.cancel()
                    return
                continue
            if not ours:
                log.error("task_taken_over", task=task.key, run=task.attempts)
                owner.cancel()
                return
            last_ok = time.monotonic()
            if pulse is not None:
                quiet_s = last_ok - pulse.moved_at
                if quiet_s <= heartbeat_s:
                    quiet_logged = False
                elif not quiet_logged:
                    log.info("clip_quiet", quiet_s=round(quiet_s, 1), progress=pulse.fraction)
                    quiet_logged = True

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("progress_write_failed", error=str(task.exception()))

    async def close(self) -> None:
        for t in self._background:
            t.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for streams in self._streams.values():
            await streams.aclose()
        self._streams.clear()


class _Pulse:
    """A running clip's real progress, for its heartbeat: the fraction done and when it moved."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self.moved_at = time.monotonic()

    def moved(self, fraction: float) -> None:
        # FFmpeg repeats its output time while stalled: only a rise is progress.
        if fraction > self.fraction:
            self.fraction = fraction
            self.moved_at = time.monotonic()


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


async def run_worker(settings: Settings, *, worker_id: str | None = None) -> None:
    """Run SAQ workers for both queues until SIGTERM/SIGINT, then stop gracefully.

    On the signal: no new tasks are taken; running clips get
    ``server.shutdown_grace_s`` to finish, then are cancelled and SAQ puts
    them back on the queue for another worker.
    """
    if not settings.queue.url:
        raise ValueError("queue.url is empty: the worker needs the Redis URL of the queue")
    worker_id = worker_id or default_worker_id()
    url = settings.queue.url
    store = RedisJobStore.from_url(url)
    jobs_queue = make_queue(url, JOBS_QUEUE)
    clips_queue = make_queue(url, CLIPS_QUEUE)
    grace_s = int(settings.server.shutdown_grace_s + 0.999)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with (
        aiohttp.ClientSession(headers={"User-Agent": "clipservice"}, trust_env=False) as http,
        UrlGuard(
            allow_private=settings.security.allow_private_sources,
            timeout_s=settings.resolver.timeout_s,
        ) as guard,
        ffmpeg_egress(allow_private=settings.security.allow_private_sources),
        # The shared folder, or the bucket (with kind = s3 nothing else is shared).
        open_storage(settings) as storage,
    ):
        state = ClipWorker(
            settings,
            store,
            storage,
            make_resolver(settings, http, guard),
            clips_queue,
            worker_id,
            # Recorded like the in-process runner's; this process serves no /metrics.
            Metrics(),
        )
        warm_join_processes(settings.jobs.max_concurrent_clips)
        # The worker that ends a job puts its webhook in the shared outbox;
        # every worker and API node delivers from it, so a worker that dies
        # mid-delivery (or mid-backoff) loses nothing.
        webhooks = WebhookSender(
            settings,
            guard.session,
            store,
            url_check=guard.check,
            outbox=RedisOutbox(store.redis, store.prefix),
        )
        state.on_job_end.append(webhooks.job_ended)
        common: dict[str, Any] = {
            "dequeue_timeout": 1.0,
            "shutdown_grace_period_s": grace_s,
            "cancellation_hard_deadline_s": 5.0,
            "metadata": {"worker": worker_id},
        }
        timers: PartialTimersDict = {
            "schedule": 1,
            "worker_info": 10,
            "sweep": settings.queue.sweep_interval_s,
            "abort": 1,
        }
        workers = [
            Worker(
                jobs_queue,
                [("prepare_job", state.prepare_job)],
                id=f"{worker_id}-jobs",
                concurrency=2,
                timers=timers,
                **common,
            ),
            Worker(
                clips_queue,
                [("cut_clip", state.cut_clip), ("merge_job", state.merge_job)],
                id=worker_id,
                concurrency=settings.jobs.max_concurrent_clips,
                timers=timers,
                **common,
            ),
        ]
        for w in workers:
            # One handler for both workers (a second add_signal_handler would
            # replace the first).
            w.SIGNALS = []
        await jobs_queue.connect()
        await clips_queue.connect()
        reaper = asyncio.create_task(retention.reap_forever(store, storage, settings))
        await webhooks.start()
        runs = [asyncio.create_task(w.start()) for w in workers]
        log.info("worker_started", worker=worker_id, concurrency=settings.jobs.max_concurrent_clips)
        try:
            await stop.wait()
        finally:
            log.info("worker_stopping", worker=worker_id, grace_s=grace_s)
            state.stopping = True
            for w in workers:
                w.event.set()
            await asyncio.gather(*runs, return_exceptions=True)
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)
            await state.close()
            await webhooks.close()
            await jobs_queue.disconnect()
            await clips_queue.disconnect()
            await store.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            log.info("worker_stopped", worker=worker_id)
