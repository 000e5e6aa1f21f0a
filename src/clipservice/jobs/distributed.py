"""The distributed mode: API nodes enqueue, ``clipservice worker`` processes cut.

Two SAQ queues on the Redis of ``[queue] url``:

- ``clipservice-jobs``: one ``prepare_job`` task per job. It resolves the
  source once, probes it, stores the stream URLs for the workers and enqueues
  one task per clip (or fails the job when the source is unusable).
- ``clipservice-clips``: one ``cut_clip`` task per clip, the unit of
  distribution, so the clips of one job spread over every worker. Each worker
  runs ``jobs.max_concurrent_clips`` of them at once.

SAQ's defaults suit short tasks, not FFmpeg runs, so clip tasks get a timeout
above ``clip_timeout_s``, a heartbeat (refreshed by FFmpeg progress and by a
keep-alive while the cut coroutine lives), retries with exponential backoff,
and ``DELETE /api/jobs/{id}`` aborts them. A worker that dies stops its
heartbeat; another worker's sweep aborts the task and queues it again, and the
clip's attempt number in the job store fences off anything the old worker
might still write (see :mod:`clipservice.jobs.redis_store`).

Job-level bookkeeping (processed, progress, the end of the job when its last
clip ends) is done by the store's atomic transactions. Retention is enforced
by every node: whoever removes an expired job from the expiry set deletes it
and its files, keeping any file another stored job still names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import structlog
from prometheus_client import Gauge
from redis.exceptions import RedisError
from saq import Queue, Worker
from saq.job import TERMINAL_STATUSES, Status
from saq.job import Job as SaqJob
from saq.queue.redis import RedisQueue
from saq.types import Context, PartialTimersDict

from clipservice.config import Settings
from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.jobs import clipwork
from clipservice.jobs.models import ClipResult, ClipSpec, Job, JobError, JobStatus
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.redis_store import RedisJobStore, StaleAttempt
from clipservice.jobs.webhooks import WebhookSender
from clipservice.media.cutter import Cutter, warm_join_processes
from clipservice.media.probe import SourceInfo, probe_source
from clipservice.media.source import SourceIndex
from clipservice.metrics import Metrics
from clipservice.sources.base import Resolver
from clipservice.sources.factory import make_resolver
from clipservice.sources.guard import UrlGuard
from clipservice.storage import SharedFolderStorage

log = structlog.get_logger(__name__)

JOBS_QUEUE = "clipservice-jobs"
CLIPS_QUEUE = "clipservice-clips"

# Clip task timeout on top of clip_timeout_s: resolving, probing and
# validating happen outside the FFmpeg bound.
_TASK_TIMEOUT_MARGIN_S = 60
_PREPARE_TIMEOUT_S = 120
# How long SAQ keeps a finished task's record (ours lives in the job store).
_TASK_TTL_S = 600
# Progress is written to the job store at most this often per clip.
_PROGRESS_INTERVAL_S = 0.5
_PROBE_CACHE_SIZE = 64
# Open source containers kept for keyframe lookups (jobs this worker cuts).
_KEYFRAME_CACHE_SIZE = 16


class FreshSweepQueue(RedisQueue):
    """SAQ's Redis queue, with a sweep that judges each task on its current state.

    SAQ 0.26 reads every active task once, then handles them one by one,
    waiting up to ``abort`` seconds for each dead one. A live task checked
    after such a wait looks stale by then and is swept too: its clip would be
    cancelled and cut again. Re-reading each task just before judging it
    keeps live workers' clips with them.
    """

    async def sweep(self, lock: int = 60, abort: float = 5.0) -> list[str]:
        lock_key = self.namespace("sweep")
        if not await self.redis.set(lock_key, 1, ex=lock, nx=True):
            return []
        swept: list[str] = []
        active: list[bytes] = await self.redis.lrange(self.namespace("active"), 0, -1)  # type: ignore[misc]
        for raw_id in active:
            job_id = raw_id.decode()
            job = await self._get_job_by_id(job_id)
            if job is None:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.lrem(self.namespace("active"), 0, job_id)
                    pipe.zrem(self.namespace("incomplete"), job_id)
                    await pipe.execute()
                swept.append(job_id)
                continue
            if job.status == Status.ACTIVE and not job.stuck:
                continue
            log.warning("task_swept", task=job.key, worker=job.worker_id, status=job.status.value)
            swept.append(job_id)
            await self.abort(job, error=self.swept_error_message)
            with contextlib.suppress(TimeoutError):
                await job.refresh(abort)
            if job.retryable:
                await self.retry(job, error=self.swept_error_message)
            else:
                await self.finish(job, Status.ABORTED, error=self.swept_error_message)
        return swept


def _safe_url(url: str) -> str:
    """The URL without a password, for messages."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"***@{netloc}"))
    return url


def make_queue(url: str, name: str) -> Queue:
    return FreshSweepQueue.from_url(url, name=name)


def clip_task_key(job_id: str, index: int) -> str:
    return f"{job_id}:{index}"


def reaper_interval_s(settings: Settings) -> float:
    return min(5.0, max(0.2, settings.jobs.retention_s / 2))


async def delete_job_and_files(
    store: RedisJobStore, storage: SharedFolderStorage, job_id: str
) -> int:
    """Delete a job and every file of it no other stored job names; files removed."""
    job = await store.get(job_id)
    if job is None:
        return 0
    still_used: set[str] = set()
    for other in await store.all():
        if other.job_id == job_id:
            continue
        if other.status.ended:
            still_used |= other.files()
        else:
            # A live job may be cutting or about to reuse any of its clips.
            still_used |= {clip_file_name(other.source, c) for c in other.clips}
    removed = 0
    for name in sorted(job.files() - still_used):
        removed += await storage.delete(name)
    await store.delete(job_id)
    log.info("job_deleted", job_id=job_id, files_removed=removed)
    return removed


async def reap_expired(store: RedisJobStore, storage: SharedFolderStorage) -> int:
    """Delete the jobs whose retention ran out; each by exactly one node."""
    count = 0
    for job_id in await store.due(time.time()):
        if await store.take_due(job_id):
            await delete_job_and_files(store, storage, job_id)
            count += 1
    return count


async def _reaper(
    store: RedisJobStore,
    storage: SharedFolderStorage,
    interval_s: float,
    part_age_s: float,
    also: Callable[[], Awaitable[None]] | None = None,
) -> None:
    while True:
        try:
            if also is not None:
                await also()
            await reap_expired(store, storage)
            # A worker killed mid-cut leaves its temporary file on the shared
            # volume; one older than any clip may run belongs to nobody.
            await storage.remove_stale_parts(older_than_s=part_age_s)
        except (RedisError, OSError) as exc:  # Redis away for a moment: next round
            log.warning("reaper_failed", error=str(exc))
        except Exception:
            log.exception("reaper_failed")
        await asyncio.sleep(interval_s)


def _part_age_s(settings: Settings) -> float:
    return settings.jobs.clip_timeout_s + _TASK_TIMEOUT_MARGIN_S * 2


class DistributedRunner:
    """The API node's runner: puts jobs on the queue, cancels and deletes them.

    Same interface as the in-process runner; the cutting happens in
    ``clipservice worker`` processes.
    """

    def __init__(
        self,
        settings: Settings,
        store: RedisJobStore,
        storage: SharedFolderStorage,
        metrics: Metrics | None = None,
    ):
        self.settings = settings
        self.store = store
        self.storage = storage
        self.jobs_queue = make_queue(settings.queue.url, JOBS_QUEUE)
        self.clips_queue = make_queue(settings.queue.url, CLIPS_QUEUE)
        self.on_job_end: list[Callable[[Job], None]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._draining = False
        self._gauges: tuple[Gauge, Gauge, Gauge] | None = None
        if metrics is not None:
            r = metrics.registry
            self._gauges = (
                Gauge("clipservice_queue_up", "1 when Redis (the queue) answers.", registry=r),
                Gauge(
                    "clipservice_queue_clip_tasks",
                    "Clip tasks on the queue, by state (queued, active).",
                    ["state"],
                    registry=r,
                ),
                Gauge("clipservice_queue_workers", "Live worker processes.", registry=r),
            )

    async def start(self) -> None:
        await self.storage.open()
        await self.jobs_queue.connect()
        await self.clips_queue.connect()
        # A node that crashed between saving a job and queueing it left it
        # pending; queueing is idempotent (the task key is the job id).
        try:
            for job in await self.store.all():
                if job.status is JobStatus.PENDING:
                    await self.submit(job)
        except (RedisError, OSError) as exc:
            # Start anyway: /readyz says the queue is unreachable until it is back.
            log.warning("queue_unreachable", error=str(exc))
        self._reaper = asyncio.create_task(
            _reaper(
                self.store,
                self.storage,
                reaper_interval_s(self.settings),
                _part_age_s(self.settings),
                self.refresh_metrics,
            ),
            name="reaper",
        )

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> int:
        """Nothing to wait for: clips run on the workers, which drain on their own."""
        self._draining = True
        return 0

    async def stop(self) -> None:
        tasks = [t for t in (self._reaper, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for queue in (self.jobs_queue, self.clips_queue):
            with contextlib.suppress(RedisError, OSError):  # Redis may be gone already
                await queue.disconnect()

    async def submit(self, job: Job) -> None:
        """Put the job on the queue (it is already saved as pending)."""
        await enqueue_prepare(self.jobs_queue, job.job_id, self.settings.queue.heartbeat_s)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job on whichever workers run it; True if this call cancelled it."""
        job, cancelled = await self.store.cancel(job_id, self.settings.jobs.retention_s)
        if not cancelled:
            return False
        keys = [(self.jobs_queue, job_id)]
        if job is not None:
            keys += [(self.clips_queue, clip_task_key(job_id, c.index)) for c in job.clips]
        for queue, key in keys:
            task = await queue.job(key)
            if task is not None and task.status not in TERMINAL_STATUSES:
                # Queued tasks are dropped; running ones are cancelled by their
                # worker within a second (SAQ's abort poll), killing FFmpeg.
                await queue.abort(task, "cancelled")
        log.info("job_cancelled", job_id=job_id)
        if job is not None:
            for hook in self.on_job_end:
                hook(job)
        return True

    async def delete_ended(self, job: Job) -> None:
        """Delete an ended job and its files now."""
        await self.store.take_due(job.job_id)
        await delete_job_and_files(self.store, self.storage, job.job_id)

    async def check_queue(self) -> str | None:
        """The /readyz check: None when Redis answers, else why not."""
        up = await self.store.ping()
        if self._gauges is not None:
            self._gauges[0].set(1 if up else 0)
        return None if up else f"queue unreachable at {_safe_url(self.settings.queue.url)}"

    async def refresh_metrics(self) -> None:
        """Update the queue gauges (called by the reaper loop; /metrics reads them)."""
        if self._gauges is None:
            return
        up, tasks, workers = self._gauges
        try:
            info = await self.queue_info()
        except Exception:
            up.set(0)
            return
        up.set(1)
        tasks.labels("queued").set(info["queued"])
        tasks.labels("active").set(info["active"])
        workers.set(info["workers"])

    async def queue_info(self) -> dict[str, int]:
        """Queued and running clip tasks and live workers (for /metrics)."""
        info = await self.clips_queue.info()
        return {
            "queued": int(info["queued"]),
            "active": int(info["active"]),
            "workers": len(info["workers"]),
        }


async def enqueue_prepare(queue: Queue, job_id: str, heartbeat_s: int) -> None:
    await queue.enqueue(
        SaqJob(
            function="prepare_job",
            kwargs={"job_id": job_id},
            key=job_id,
            timeout=_PREPARE_TIMEOUT_S,
            heartbeat=heartbeat_s,
            retries=3,
            retry_delay=1.0,
            retry_backoff=30.0,
            ttl=_TASK_TTL_S,
        )
    )


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
            job = await self.store.start_processing(job_id)
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
                    failed = await self.store.fail(
                        job_id,
                        JobError(code=exc.code, message=exc.message),
                        self.settings.jobs.retention_s,
                    )
                    if failed is not None:
                        self._ended(failed)
                    return "failed"
                source = {"video_url": resolved.video_url, "audio_url": resolved.audio_url}
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
                    await self.clips_queue.enqueue(self._clip_task(job_id, clip.index))
            return "enqueued"

    def _clip_task(self, job_id: str, index: int) -> SaqJob:
        q = self.settings.queue
        return SaqJob(
            function="cut_clip",
            kwargs={"job_id": job_id, "index": index},
            key=clip_task_key(job_id, index),
            timeout=int(self.settings.jobs.clip_timeout_s) + _TASK_TIMEOUT_MARGIN_S,
            heartbeat=q.heartbeat_s,
            # One more than clip_attempts: the last run only records "interrupted".
            retries=q.clip_attempts + 1,
            retry_delay=q.retry_delay_s,
            retry_backoff=max(q.retry_delay_s * 16, 1.0),
            ttl=_TASK_TTL_S,
        )

    # -- cut one clip -----------------------------------------------------------

    async def cut_clip(self, ctx: Context, *, job_id: str, index: int) -> str:
        task: SaqJob = ctx["job"]
        with structlog.contextvars.bound_contextvars(
            job_id=job_id, clip_index=index, worker=self.worker_id, task_attempt=task.attempts
        ):
            attempt = await self.store.claim_clip(job_id, index, self.worker_id)
            if attempt is None:
                return "skipped"  # done already, or the job ended or is gone
            job = await self.store.get(job_id)
            source = await self.store.get_source(job_id)
            if job is None or source is None:
                return "skipped"
            clip = job.clips[index]
            if task.attempts > self.settings.queue.clip_attempts:
                outcome: clipwork.ClipOutcome = clipwork.clip_error(
                    clip,
                    "interrupted",
                    f"the workers cutting this clip stopped {task.attempts - 1} times",
                )
            else:
                outcome = await self._cut(task, job, clip, source, attempt)
            try:
                after = await self.store.record_clip(
                    job_id, attempt, outcome, self.settings.jobs.retention_s
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
        source: dict[str, Any],
        attempt: int,
    ) -> clipwork.ClipOutcome:
        src = StreamUrls(source["video_url"], source.get("audio_url"))
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
            self._spawn(self.store.clip_progress(job.job_id, clip.index, attempt, fraction))

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
                return clipwork.clip_error(clip, exc.code, exc.message)
            except TimeoutError:
                code = "timeout"
                return clipwork.clip_error(clip, "timeout", f"clip took over {timeout_s}s")
            except asyncio.CancelledError:
                # Aborted (job cancelled) or the worker is stopping (SAQ queues
                # the clip again): the cutter has killed FFmpeg and removed the
                # partial file; nothing to record.
                code = "cancelled"
                raise
            except Exception as exc:
                code = "ffmpeg_failed"
                log.exception("clip_crashed")
                return clipwork.clip_error(clip, "ffmpeg_failed", f"internal error: {exc}")
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
        reaper = asyncio.create_task(
            _reaper(store, storage, reaper_interval_s(settings), _part_age_s(settings))
        )
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
