"""The application factory: ``create_app(settings) -> web.Application``.

Nothing runs at import time. Each resource has one ``cleanup_ctx`` entry, so
its start-up and shutdown sit together: the outbound HTTP session, the URL
guard, the clip storage (``[storage] kind``: a folder or an S3 bucket), and
the jobs: the job store, the event hub SSE listens to, the runner
(which resumes unfinished jobs on start and stops its tasks on shutdown) and
the webhook sender it tells of every ended job. Without ``[queue] url`` the
runner is the in-process one (:mod:`clipservice.jobs.runner`); with it, jobs
go to ``clipservice worker`` processes (:mod:`clipservice.jobs.dispatch`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from clipservice.api import middleware, ops, page, preview, sse
from clipservice.api.appkeys import (
    EVENTS,
    GUARD,
    HTTP,
    METRICS,
    READINESS,
    RUNNER,
    SETTINGS,
    STORAGE,
    STORE,
    WEBHOOKS,
)
from clipservice.api.auth import auth_middleware
from clipservice.api.openapi import setup_openapi
from clipservice.api.problems import problem_middleware
from clipservice.api.ratelimit import ratelimit_middleware, setup_ratelimit
from clipservice.api.routes import MAX_BODY_BYTES, routes
from clipservice.config import Settings
from clipservice.jobs.dispatch import DistributedRunner
from clipservice.jobs.events import LocalJobEvents
from clipservice.jobs.outbox import FileOutbox, RedisOutbox
from clipservice.jobs.redis_events import RedisJobEvents
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.jobs.webhooks import WebhookSender
from clipservice.media.cutter import Cutter
from clipservice.metrics import Metrics
from clipservice.sources.egress import ffmpeg_egress
from clipservice.sources.factory import make_resolver
from clipservice.sources.guard import UrlGuard
from clipservice.storage_factory import open_storage


def _absolute(settings: Settings) -> Settings:
    # FFmpeg gets absolute output paths: a relative one could start with "-".
    return settings.replace(storage={"data_dir": settings.storage.data_dir.resolve()})


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(
        headers={"User-Agent": "clipservice"}, trust_env=False
    ) as session:
        app[HTTP] = session
        yield


async def _url_guard(app: web.Application) -> AsyncIterator[None]:
    # Checks every client-supplied URL before it is fetched (see sources/guard.py).
    settings = app[SETTINGS]
    # FFmpeg and PyAV reach sources through the egress proxy (sources/egress.py).
    async with (
        UrlGuard(
            allow_private=settings.security.allow_private_sources,
            timeout_s=settings.resolver.timeout_s,
        ) as guard,
        ffmpeg_egress(allow_private=settings.security.allow_private_sources),
    ):
        app[GUARD] = guard
        yield


async def _storage(app: web.Application) -> AsyncIterator[None]:
    # Before the jobs (which cut into it) and closed after them.
    settings = app[SETTINGS]
    async with open_storage(settings) as storage:
        app[STORAGE] = storage
        if settings.storage.kind == "s3":
            app[READINESS].add_check("bucket", storage.check, ttl_s=ops.BUCKET_CHECK_TTL_S)
        yield


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    events = LocalJobEvents()
    # Every change the store writes reaches this node's SSE listeners.
    store = FileJobStore(settings.jobs_dir, on_change=events.notify)
    await store.open()
    resolver = make_resolver(settings, app[HTTP], app[GUARD])
    runner = LocalRunner(
        settings,
        store,
        resolver,
        Cutter(settings.cut.ffmpeg_path),
        app[METRICS],
        storage=app[STORAGE],
    )
    app[EVENTS] = events
    # Webhook URLs come from clients: checked by the guard, posted through its
    # session, whose resolver refuses forbidden addresses at connect time too.
    guard = app[GUARD]
    # Deliveries wait in data_dir/webhooks until answered, whatever the job's retention.
    outbox = FileOutbox(settings.storage.data_dir / "webhooks")
    webhooks = WebhookSender(settings, guard.session, store, url_check=guard.check, outbox=outbox)
    runner.on_job_end.append(webhooks.job_ended)
    app[STORE] = store
    app[RUNNER] = runner
    app[WEBHOOKS] = webhooks
    # Started first: jobs the runner resumes may end at once.
    await webhooks.start()
    await runner.start()
    yield
    await runner.stop()
    await webhooks.close()
    await store.close()


async def _distributed_jobs(app: web.Application) -> AsyncIterator[None]:
    # [queue] url set: jobs and events live in Redis and workers cut the clips;
    # this node only takes requests (see jobs/dispatch.py and jobs/worker.py).
    settings = app[SETTINGS]
    store = RedisJobStore.from_url(settings.queue.url)
    events = RedisJobEvents(store)
    runner = DistributedRunner(settings, store, app[STORAGE], app[METRICS])
    guard = app[GUARD]
    # API nodes deliver from the shared outbox too: a worker's delivery outlives the worker.
    outbox = RedisOutbox(store.redis, store.prefix)
    webhooks = WebhookSender(settings, guard.session, store, url_check=guard.check, outbox=outbox)
    runner.on_job_end.append(webhooks.job_ended)  # jobs cancelled here
    app[READINESS].add_check("queue", runner.check_queue)
    app[EVENTS] = events
    app[STORE] = store
    app[RUNNER] = runner
    app[WEBHOOKS] = webhooks
    try:
        await events.start()
        await webhooks.start()
        await runner.start()
        yield
    finally:
        await runner.stop()
        await webhooks.close()
        await events.close()
        await store.close()


async def _close_event_streams(app: web.Application) -> None:
    # Open SSE streams end here, so they do not hold up the server's shutdown.
    if EVENTS in app:
        await app[EVENTS].close()


def create_app(settings: Settings) -> web.Application:
    """Build the clipservice application for ``settings``."""
    settings = _absolute(settings)
    # The problem middleware is outermost, so it shapes the 401s and 429s too.
    app = web.Application(
        middlewares=[problem_middleware, auth_middleware, ratelimit_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[SETTINGS] = settings
    setup_ratelimit(app)
    app[METRICS] = Metrics()
    middleware.setup(app, settings.server.trusted_proxies)
    ops.setup(app)
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_url_guard)
    app.cleanup_ctx.append(_storage)
    app.cleanup_ctx.append(_distributed_jobs if settings.queue.url else _jobs)
    app.add_routes(routes)
    app.add_routes(sse.routes)
    app.add_routes(page.routes)
    preview.setup(app)
    app.on_shutdown.append(_close_event_streams)
    setup_openapi(app)
    return app
