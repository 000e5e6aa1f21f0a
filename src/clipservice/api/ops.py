"""Operations routes: ``/readyz`` and ``/metrics``, and the draining switch.

``/readyz`` answers 200 when the service can take jobs: not draining, the
storage folder writable, FFmpeg runnable, and any extra check another part
registers (the distributed mode adds its queue, S3 storage its bucket). Checking FFmpeg spawns a
process, so its answer is cached for ``FFMPEG_CHECK_TTL_S`` and refreshed by
at most one request at a time; a readiness probe never costs a process per
request. While draining it answers 503 at once, as does job creation.

``/metrics`` reads the runner's backlog on every scrape (the autoscaling
signals: see :mod:`clipservice.jobs.backlog`); job creation is refused with
503 ``queue_full`` while more clips wait than ``[queue] max_depth``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from clipservice.api.appkeys import METRICS, READINESS, RUNNER, SETTINGS, STORE
from clipservice.api.problems import problem_response
from clipservice.errors import ProblemError
from clipservice.jobs.backlog import retry_after_s
from clipservice.media.ffmpeg import ffmpeg_exe
from clipservice.metrics import CONTENT_TYPE

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

FFMPEG_CHECK_TTL_S = 60.0
STORAGE_CHECK_TTL_S = 1.0
# The object store's check is a HEAD of the bucket: a probe every second from
# each orchestrator should not become a request to the store each time.
BUCKET_CHECK_TTL_S = 5.0
# What a client is told to wait before retrying while this instance drains
# (by then another instance, or this one restarted, takes the request).
RETRY_AFTER_S = 5
# A scrape answers without the queue gauges rather than hang on a Redis that does not answer.
QUEUE_READ_TIMEOUT_S = 2.0

ReadyCheck = Callable[[], Awaitable[str | None]]
"""An extra readiness check: None when fine, else a short reason."""


@dataclass
class _Cached:
    error: str | None = None
    checked_at: float = -1e9
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Readiness:
    """Whether the service takes work, and the checks behind ``/readyz``."""

    data_dir: Path
    ffmpeg_path: str = ""
    draining: bool = False
    extra: dict[str, ReadyCheck] = field(default_factory=dict)
    _ffmpeg: _Cached = field(default_factory=_Cached)
    _storage: _Cached = field(default_factory=_Cached)

    def add_check(self, name: str, check: ReadyCheck, *, ttl_s: float = 0.0) -> None:
        """Add a check (e.g. the queue's reachability) to ``/readyz``.

        With ``ttl_s``, its answer is reused that long and refreshed by one probe
        at a time (a check that costs a request to another service).
        """
        if ttl_s > 0:
            slot = _Cached()

            async def cached() -> str | None:
                return await self._cached(slot, ttl_s, check)

            self.extra[name] = cached
        else:
            self.extra[name] = check

    async def _cached(
        self, slot: _Cached, ttl_s: float, check: Callable[[], Awaitable[str | None]]
    ) -> str | None:
        if time.monotonic() - slot.checked_at < ttl_s:
            return slot.error
        async with slot.lock:  # concurrent probes share one check
            if time.monotonic() - slot.checked_at >= ttl_s:
                slot.error = await check()
                slot.checked_at = time.monotonic()
            return slot.error

    async def _check_storage(self) -> str | None:
        def probe() -> None:
            path = self.data_dir / f".readyz-{uuid.uuid4().hex[:8]}"
            try:
                with path.open("wb") as fh:
                    fh.write(b"ok")
            finally:
                # A full disk fails the write, not the open: no empty file left per probe.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

        try:
            await asyncio.to_thread(probe)
        except OSError as exc:
            return f"storage not writable: {exc.strerror or exc}"
        return None

    async def _check_ffmpeg(self) -> str | None:
        try:
            proc = await asyncio.create_subprocess_exec(
                ffmpeg_exe(self.ffmpeg_path),
                "-hide_banner",
                "-version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                code = await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return "ffmpeg -version did not answer"
        except OSError as exc:
            return f"ffmpeg not runnable: {exc}"
        return None if code == 0 else f"ffmpeg -version exited with {code}"

    async def checks(self) -> dict[str, str]:
        """Each check's result: "ok" or why not."""
        results: dict[str, str | None] = {
            "storage": await self._cached(self._storage, STORAGE_CHECK_TTL_S, self._check_storage),
            "ffmpeg": await self._cached(self._ffmpeg, FFMPEG_CHECK_TTL_S, self._check_ffmpeg),
        }
        for name, check in self.extra.items():
            try:
                results[name] = await check()
            except Exception as exc:  # a check that breaks means "not ready", not a 500
                results[name] = f"check failed: {exc}"
        return {name: error or "ok" for name, error in results.items()}


def refuse_if_draining(request: web.Request) -> None:
    """New jobs get 503 (with Retry-After) once the service is shutting down."""
    if request.app[READINESS].draining:
        raise ProblemError(
            503,
            "Service draining",
            "the service is shutting down and takes no new jobs; retry shortly",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )


async def refuse_if_queue_full(request: web.Request) -> None:
    """503 ``queue_full`` (with Retry-After at the drain rate) past ``[queue] max_depth``."""
    max_depth = request.app[SETTINGS].queue.max_depth
    if not max_depth:
        return
    runner = request.app[RUNNER]
    queued = await runner.queued_clips()
    if queued <= max_depth:
        return
    wait_s = retry_after_s(queued - max_depth, runner.drain_per_s())
    request.app[METRICS].jobs_refused.labels("queue_full").inc()
    log.warning("queue_full", queued_clips=queued, max_depth=max_depth, retry_after_s=wait_s)
    raise ProblemError(
        503,
        "Queue full",
        f"{queued} clips wait to start, more than this service's limit of {max_depth}; "
        "retry after Retry-After seconds",
        code="queue_full",
        headers={"Retry-After": str(wait_s)},
    )


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    if readiness.draining:
        return problem_response(
            503,
            "Service draining",
            "the service is shutting down",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    checks = await readiness.checks()
    failed = {name: result for name, result in checks.items() if result != "ok"}
    if failed:
        log.warning("not_ready", **failed)
        return problem_response(503, "Not ready", "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return web.json_response({"status": "ready", "checks": checks})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    m.draining.set(1 if request.app[READINESS].draining else 0)
    # With Redis away the scrape still answers (clipservice_queue_up says so).
    try:
        m.set_jobs(await request.app[STORE].all())
    except (RedisError, OSError) as exc:
        log.warning("metrics_jobs_unread", error=str(exc))
    try:
        async with asyncio.timeout(QUEUE_READ_TIMEOUT_S):
            m.queue.stats = await request.app[RUNNER].queue_stats()
    except (TimeoutError, RedisError, OSError) as exc:
        log.warning("metrics_queue_unread", error=str(exc) or type(exc).__name__)
        m.queue.stats = None
    return web.Response(body=m.export(), headers={"Content-Type": CONTENT_TYPE})


LOOP_LAG_PROBE_S = 0.1


async def _loop_lag_probe(app: web.Application) -> AsyncIterator[None]:
    """Measure how late a short sleep wakes up: the event loop's responsiveness."""
    histogram = app[METRICS].loop_lag_seconds

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(LOOP_LAG_PROBE_S)
            histogram.observe(max(0.0, loop.time() - t0 - LOOP_LAG_PROBE_S))

    task = asyncio.create_task(probe(), name="loop-lag-probe")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def setup(app: web.Application) -> None:
    """Register the routes, the readiness state and the loop-lag probe on ``app``."""
    settings = app[SETTINGS]
    app[READINESS] = Readiness(settings.storage.data_dir, settings.cut.ffmpeg_path)
    app.add_routes(routes)
    app.cleanup_ctx.append(_loop_lag_probe)
