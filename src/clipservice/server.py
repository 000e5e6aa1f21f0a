"""Running the service until a signal, then shutting down like a script.

``aiohttp.web.run_app`` closes its listening sockets the moment SIGTERM
arrives, then waits for in-flight requests, then runs the app's cleanup.
That leaves nothing to answer ``/readyz`` with 503 while clips finish, so
``serve`` drives the ``AppRunner`` itself:

1. SIGTERM or SIGINT: stop taking work. ``/readyz`` and ``POST
   /api/create-clips`` answer 503 at once; everything else (polls, SSE,
   downloads) is still served.
2. Running clips get ``server.shutdown_grace_s`` to finish; clips not yet
   started stay queued. A second signal ends the grace at once.
3. Close the listeners, end SSE streams, give in-flight requests
   ``HTTP_CLOSE_S``, then run the app's cleanup: the runner cancels what is
   left (FFmpeg terminated, killed, reaped; the attempts given back, so the
   clips resume on the next start as if never begun) and the job store
   finishes its writes.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from aiohttp import web

from clipservice.api.appkeys import READINESS, RUNNER
from clipservice.api.protocol import make_runner
from clipservice.app import create_app
from clipservice.config import Settings

log = structlog.get_logger(__name__)

HTTP_CLOSE_S = 5.0


class ListenError(Exception):
    """The listening socket could not be opened (port taken, address not ours, …)."""


class _Signals:
    """First SIGTERM/SIGINT: ``stopping``; any later one: ``hurry``."""

    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            log.warning("shutdown_hurried", signal=sig.name)
            self.hurry.set()
        else:
            log.info("shutdown_started", signal=sig.name)
            self.stopping.set()

    def remove(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.remove_signal_handler(sig)


async def serve(settings: Settings) -> None:
    """Serve ``settings`` until SIGTERM/SIGINT, then drain and stop."""
    signals = _Signals()
    app = create_app(settings)
    # (Problem JSON even for what aiohttp's HTTP parser refuses: api/protocol.py.)
    runner = make_runner(app, access_log=None, handle_signals=False, shutdown_timeout=HTTP_CLOSE_S)
    try:
        await runner.setup()  # the app's start-up: the store opens, unfinished jobs resume
        site = web.TCPSite(runner, settings.server.host, settings.server.port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}"
            ) from exc
        log.info("listening", host=settings.server.host, port=settings.server.port)
        print(
            f"clipservice listening on http://{settings.server.host}:{settings.server.port}",
            file=sys.stderr,
            flush=True,
        )
        await signals.stopping.wait()

        app[READINESS].draining = True
        grace_s = settings.server.shutdown_grace_s
        left = await app[RUNNER].drain(grace_s, abort=signals.hurry)
        log.info("drain_done", clips_to_resume=left, grace_s=grace_s)
    finally:
        await runner.cleanup()
        signals.remove()
        log.info("shutdown_complete")
