"""The worker side of the distributed mode: ``clipservice worker`` processes.

A worker runs SAQ workers for both queues (see :mod:`clipservice.jobs.queue`):

- ``prepare_job`` resolves the job's source once, probes it, stores the
  stream URLs for every worker and enqueues one ``cut_clip`` task per clip
  (or fails the job when the source is unusable).
- ``cut_clip`` claims its clip in the job store, cuts it and records the
  outcome; the store ends the job when its last clip has one.

A clip task keeps its heartbeat while it runs (FFmpeg progress, and a
keep-alive while the cut coroutine lives). A worker that dies stops its
heartbeat; another worker's sweep aborts the task and queues it again, and the
clip's attempt number in the job store fences off anything the old worker
might still write (see :mod:`clipservice.jobs.redis_store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import structlog
from saq import Queue, Worker
from saq.job import Job as SaqJob
from saq.types import Context, PartialTimersDict

from clipservice.config import Settings
from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.jobs import bookkeeping, clipwork, retention
from clipservice.jobs.bookkeeping import StaleAttempt
from clipservice.jobs.models import ClipResult, ClipSpec, Job, JobError
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.queue import CLIPS_QUEUE, JOBS_QUEUE, clip_task, make_queue
from clipservice.jobs.redis_store import RedisJobStore, StoredSource
from clipservice.jobs.webhooks import WebhookSender
from clipservice.media.cutter import Cutter, warm_join_processes
from clipservice.media.probe import SourceInfo, probe_source
from clipservice.media.source import SourceIndex
from clipservice.sources.base import Resolver
from clipservice.sources.factory import make_resolver
from clipservice.sources.guard import UrlGuard
from clipservice.storage import SharedFolderStorage

log = structlog.get_logger(__name__)

# Progress is written to the job store at most this often per clip.
_PROGRESS_INTERVAL_S = 0.5
_PROBE_CACHE_SIZE = 64
# Open source containers kept for keyframe lookups (jobs this worker cuts).
_KEYFRAME_CACHE_SIZE = 16


class ClipWorker:
    """The worker side: SAQ task functions with the state they share in one process."""

    def __init__(
        self,
        settings: Settings,
        store: RedisJobStore,
        storage: SharedFolderStorage,
        resolver: Resolver,
        clips_queue: Queue,
        worker_id: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.resolver = resolver
        self.clips_queue = clips_queue
        self.worker_id = worker_id
        self.cutter = Cutter(settings.cut.ffmpeg_path)
        self._probes: OrderedDict[str, asyncio.Future[SourceInfo]] = OrderedDict()
        self._keyframes: OrderedDict[str, SourceIndex] = OrderedDict()
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
            source = await self.store.get_source(job_id)
            if source is None:
                t0 = time.monotonic()
                try:
                    resolved = await self.resolver.resolve(job.source)
                    info = await probe_source(resolved.video_url, resolved.audio_url)
                except SourceError as exc:
                    log.warning("source_failed", code=exc.code, error=exc.message)
                    failed = await bookkeeping.fail_job(
                        self.store,
                        job_id,
                        JobError(code=exc.code, message=exc.message),
                        self.settings.jobs.retention_s,
                    )
                    if failed is not None:
                        self._ended(failed)
                    return "failed"
                source = StoredSource(StreamUrls(resolved.video_url, resolved.audio_url))
                await self.store.set_source(job_id, source)
                log.info(
                    "source_ready",
                    duration_s=info.duration_s,
                    codec=info.video.codec,
                    resolve_probe_s=round(time.monotonic() - t0, 3),
                )
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
            source = await self.store.get_source(job_id)
            if job is None or source is None:
                return "skipped"
            clip = job.clips[index]
            if task.attempts > self.settings.queue.clip_attempts:
                outcome: bookkeeping.ClipOutcome = bookkeeping.clip_error(
                    clip,
                    "interrupted",
                    f"the workers cutting this clip stopped {task.attempts - 1} times",
                )
            else:
                outcome = await self._cut(task, job, clip, source, attempt)
            try:
                after = await bookkeeping.record_clip(
                    self.store, job_id, attempt, outcome, self.settings.jobs.retention_s
                )
            except StaleAttempt:
                log.warning("clip_stale", attempt=attempt)
                return "stale"
            if after.status.ended:
                self._ended(after)
                kf = self._keyframes.pop(job_id, None)
                if kf is not None:
                    await kf.aclose()
            return "ok" if isinstance(outcome, ClipResult) else outcome.code

    async def _cut(
        self,
        task: SaqJob,
        job: Job,
        clip: ClipSpec,
        source: StoredSource,
        attempt: int,
    ) -> bookkeeping.ClipOutcome:
        src = source.urls
        name = clip_file_name(job.source, clip)
        timeout_s = self.settings.jobs.clip_timeout_s
        last_write = 0.0
        t0 = time.monotonic()
        code = "ok"

        def on_progress(out_s: float) -> None:
            nonlocal last_write
            now = time.monotonic()
            if now - last_write < _PROGRESS_INTERVAL_S:
                return
            last_write = now
            fraction = min(1.0, out_s / max(clip.end - clip.start, 1e-3))
            # FFmpeg progress is the heartbeat: it proves the cut is moving.
            self._spawn(task.update(progress=fraction))
            self._spawn(
                bookkeeping.clip_progress(self.store, job.job_id, clip.index, attempt, fraction)
            )

        keepalive = self._start_keepalive(task)
        try:
            try:
                info = await self._probe(job.job_id, src)
                clipwork.check_range(clip, info)
                result = await asyncio.wait_for(
                    clipwork.produce_clip(
                        self.cutter,
                        self.storage,
                        clip,
                        src,
                        info,
                        name,
                        timeout_s=timeout_s,
                        on_progress=on_progress,
                        keyframes=self._keyframes_for(job.job_id, src),
                    ),
                    timeout_s,
                )
                return result
            except ClipFailure as exc:
                code = exc.code
                return bookkeeping.clip_error(clip, exc.code, exc.message)
            except TimeoutError:
                code = "timeout"
                return bookkeeping.clip_error(clip, "timeout", f"clip took over {timeout_s}s")
            except asyncio.CancelledError:
                # Aborted (job cancelled) or the worker is stopping (SAQ queues
                # the clip again): the cutter has killed FFmpeg and removed the
                # partial file; nothing to record.
                code = "cancelled"
                raise
            except Exception as exc:
                code = "ffmpeg_failed"
                log.exception("clip_crashed")
                return bookkeeping.clip_error(clip, "ffmpeg_failed", f"internal error: {exc}")
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            log.info(
                "clip_done",
                outcome=code,
                mode=clip.mode,
                start=clip.start,
                end=clip.end,
                attempt=attempt,
                cut_s=round(time.monotonic() - t0, 3),
            )

    def _ended(self, job: Job) -> None:
        log.info(
            "job_ended",
            job_id=job.job_id,
            status=job.status.value,
            results=len(job.results),
            errors=len(job.errors),
        )
        for hook in self.on_job_end:
            hook(job)

    def _start_keepalive(self, task: SaqJob) -> asyncio.Task[None]:
        owner = asyncio.current_task()
        assert owner is not None
        return asyncio.create_task(self._keepalive(task, owner))

    async def _keepalive(self, task: SaqJob, owner: asyncio.Task[Any]) -> None:
        # A live worker whose FFmpeg is slow to report (a stalled source)
        # must not lose its clip: clip_timeout_s bounds that case. Only a dead
        # worker stops this beat.
        heartbeat_s = self.settings.queue.heartbeat_s
        interval_s = max(0.5, heartbeat_s / 3)
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(interval_s)
            try:
                await task.update()
                last_ok = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat_failed", error=str(exc))
                if time.monotonic() - last_ok > heartbeat_s:
                    # Cut off from Redis past the heartbeat: another worker is
                    # about to take this task over, so stop working on it here.
                    log.error("heartbeat_lost", task=task.key)
                    owner.cancel()
                    return

    async def _probe(self, job_id: str, src: StreamUrls) -> SourceInfo:
        """Probe a job's source once per worker process (clips of a job share it)."""
        fut = self._probes.get(job_id)
        if fut is None or (fut.done() and fut.exception() is not None):
            index = self._keyframes_for(job_id, src)  # the probe reads through it
            fut = asyncio.ensure_future(probe_source(src.video_url, src.audio_url, index))
            self._probes[job_id] = fut
            while len(self._probes) > _PROBE_CACHE_SIZE:
                self._probes.popitem(last=False)
        self._probes.move_to_end(job_id)
        return await asyncio.shield(fut)

    def _keyframes_for(self, job_id: str, src: StreamUrls) -> SourceIndex:
        """One keyframe index per job in this process, shared by its clips here."""
        index = self._keyframes.get(job_id)
        if index is None:
            index = self._keyframes[job_id] = SourceIndex(src.video_url, src.audio_url)
            while len(self._keyframes) > _KEYFRAME_CACHE_SIZE:
                _, old = self._keyframes.popitem(last=False)
                # Closing is safe mid-lookup: the index reopens on its next use.
                self._spawn(old.aclose())
        self._keyframes.move_to_end(job_id)
        return index

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("progress_write_failed", error=str(task.exception()))

    async def close(self) -> None:
        tasks = [*self._background, *self._probes.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for index in self._keyframes.values():
            await index.aclose()
        self._keyframes.clear()


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
    storage = SharedFolderStorage(settings.clips_dir)
    await storage.open()
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
    ):
        state = ClipWorker(
            settings, store, storage, make_resolver(settings, http, guard), clips_queue, worker_id
        )
        warm_join_processes(settings.jobs.max_concurrent_clips)
        # The worker that ends a job sends its webhook. Unlike the embedded
        # mode, a delivery cut short by a worker restart is not resumed.
        webhooks = WebhookSender(settings, guard.session, store, url_check=guard.check)
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
                [("cut_clip", state.cut_clip)],
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
        runs = [asyncio.create_task(w.start()) for w in workers]
        log.info("worker_started", worker=worker_id, concurrency=settings.jobs.max_concurrent_clips)
        try:
            await stop.wait()
        finally:
            log.info("worker_stopping", worker=worker_id, grace_s=grace_s)
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
