"""``GET /api/jobs/{job_id}/events``: the job as Server-Sent Events.

One ``job`` event carries the full public job document (the same JSON as
``GET /api/jobs/{job_id}``) and is sent at once on connecting, then on every
change, including progress within a clip. The stream ends after the event
with a terminal state (``finished``, ``failed``, ``cancelled``). Works with
``curl -N`` and a browser ``EventSource``.

Each event's ``id`` names the document's version. A browser reconnects on
its own when a stream ends; if it comes back with ``Last-Event-ID`` equal to
the terminal event's id it gets ``204 No Content``, which tells an
EventSource to stop reconnecting (a client should still ``close()`` it on a
terminal state). A comment line every ``HEARTBEAT_S`` keeps proxies from
closing a quiet stream and notices clients that went away.
"""

from __future__ import annotations

import asyncio
import json

import structlog
from aiohttp import web

from clipservice.api.appkeys import EVENTS, METRICS, SETTINGS, STORE
from clipservice.api.routes import visible_job_or_404
from clipservice.jobs.models import Job

log = structlog.get_logger(__name__)

routes = web.RouteTableDef()

HEARTBEAT_S = 15.0
# How long a browser waits before reconnecting after a dropped stream.
RECONNECT_MS = 2000


def event_id(job: Job) -> str:
    """The version of a job document: its update time in ms and its state."""
    return f"{int(job.updated_at.timestamp() * 1000)}-{job.status.value}"


def format_event(job: Job, public_url: str) -> bytes:
    """One SSE ``job`` event; JSON never holds a raw newline, so ``data`` is one line."""
    data = json.dumps(job.public(public_url), separators=(",", ":"))
    return f"id: {event_id(job)}\nevent: job\ndata: {data}\n\n".encode()


@routes.get("/api/jobs/{job_id}/events")
async def job_events(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    public_url = request.app[SETTINGS].server.public_url
    # Subscribe before reading the current state, so no change falls in between.
    async with request.app[EVENTS].subscribe(job_id) as sub:
        # Another key's job answers as an unknown one (see api/auth.py).
        job = visible_job_or_404(request, await request.app[STORE].get(job_id), job_id)
        if job.status.ended and request.headers.get("Last-Event-ID") == event_id(job):
            return web.Response(status=204)
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: pass events through unbuffered
            }
        )
        await resp.prepare(request)
        last = format_event(job, public_url)
        listeners = request.app[METRICS].sse_listeners
        listeners.inc()
        try:
            await resp.write(f"retry: {RECONNECT_MS}\n\n".encode() + last)
            while not job.status.ended:
                try:
                    changed = await asyncio.wait_for(sub.next(), HEARTBEAT_S)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if changed is None:  # the service is stopping; the client reconnects
                    break
                job = changed
                event = format_event(job, public_url)
                if event != last:
                    await resp.write(event)
                    last = event
            await resp.write_eof()
        except ConnectionResetError:
            log.debug("sse_client_gone", job_id=job_id)
        finally:
            listeners.dec()
        return resp
