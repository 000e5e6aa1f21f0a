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

from clipservice.api.auth import auth_middleware
from clipservice.api.keys import GUARD, HTTP, RUNNER, SETTINGS, STORE
from clipservice.api.openapi import setup_openapi
from clipservice.api.problems import problem_middleware
from clipservice.api.ratelimit import ratelimit_middleware, setup_ratelimit
from clipservice.api.routes import MAX_BODY_BYTES, routes
from clipservice.config import Settings
from clipservice.jobs.runner import LocalRunner
from clipservice.jobs.store import FileJobStore
from clipservice.media.cutter import Cutter
from clipservice.sources.base import DirectResolver, Resolver
from clipservice.sources.guard import GuardedResolver, UrlGuard
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


async def _url_guard(app: web.Application) -> AsyncIterator[None]:
    # Checks every client-supplied URL before it is fetched (see sources/guard.py).
    settings = app[SETTINGS]
    async with UrlGuard(
        allow_private=settings.security.allow_private_sources,
        timeout_s=settings.resolver.timeout_s,
    ) as guard:
        app[GUARD] = guard
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
    resolver = GuardedResolver(resolver, app[GUARD])
    runner = LocalRunner(settings, store, resolver, Cutter(settings.cut.ffmpeg_path))
    app[STORE] = store
    app[RUNNER] = runner
    await runner.start()
    yield
    await runner.stop()


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
    app.cleanup_ctx.append(_http_session)
    app.cleanup_ctx.append(_url_guard)
    app.cleanup_ctx.append(_jobs)
    app.add_routes(routes)
    setup_openapi(app)
    return app
