"""The application factory: ``create_app(settings) -> web.Application``.

Nothing runs at import time. Each resource has one ``cleanup_ctx`` entry, so
its start-up and shutdown sit together: the outbound HTTP session, the job
store, and the runner (which resumes unfinished jobs on start and stops its
tasks on shutdown).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from clipservice.api import events as sse
from clipservice.api import middleware, ops
from clipservice.api.keys import EVENTS, HTTP, METRICS, RUNNER, SETTINGS, STORE
from clipservice.api.problems import problem_middleware
from clipservice.api.routes import MAX_BODY_BYTES, routes
from clipservice.config import Settings
from clipservice.jobs.events import LocalJobEvents
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.media.cutter import Cutter
from clipservice.metrics import Metrics
from clipservice.sources.base import DirectResolver, Resolver
from clipservice.sources.vidfly import VidflyResolver


def _absolute(settings: Settings) -> Settings:
    # FFmpeg gets absolute output paths: a relative one could start with "-".
    return settings.replace(storage={"data_dir": settings.storage.data_dir.resolve()})


async def _http_session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(
        headers={"User-Agent": "clipservice"}, trust_env=False
    ) as session:
        app[HTTP] = session
        yield


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    store = FileJobStore(settings.jobs_dir)
    await store.open()
    resolver: Resolver
    if settings.resolver.kind == "direct":
        resolver = DirectResolver()
    else:
        resolver = VidflyResolver(
            app[HTTP],
            settings.resolver.base_url,
            settings.resolver.timeout_s,
            settings.resolver.max_height,
        )
    events = LocalJobEvents()
    runner = LocalRunner(
        settings, store, resolver, Cutter(settings.cut.ffmpeg_path), events, app[METRICS]
    )
    app[EVENTS] = events
    app[STORE] = store
    app[RUNNER] = runner
    await runner.start()
    yield
    await runner.stop()


async def _close_event_streams(app: web.Application) -> None:
    # Open SSE streams end here, so they do not hold up the server's shutdown.
    if EVENTS in app:
        await app[EVENTS].close()


def create_app(settings: Settings) -> web.Application:
    """Build the clipservice application for ``settings``."""
    settings = _absolute(settings)
    app = web.Application(middlewares=[problem_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    middleware.setup(app, settings.server.trusted_proxies)
    ops.setup(app)
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_jobs)
    app.add_routes(routes)
    app.add_routes(sse.routes)
    app.on_shutdown.append(_close_event_streams)
    return app
