"""Webhook delivery: POST the final job document to the job's ``callback_url``.

The body is signed with ``X-Clipservice-Signature: t=<unix time>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`` (key: ``security.webhook_secret``); the
timestamp lets receivers refuse replays. A non-2xx answer or a network error
is retried with exponential backoff from about 1 s, for up to
``security.webhook_retry_s`` after the job ended. Every attempt is logged and
appended to the job document's ``webhook_attempts``.

Deliveries are background tasks of :class:`WebhookSender`, never awaited by the
runner; they are cancelled and awaited on shutdown, and resumed on the next
start for ended jobs whose webhook has not yet been answered with a 2xx.

The body is a snapshot taken when the job ends. The retry window (a day by
default) is longer than the retention (10 minutes by default): when the job is
deleted, delivery goes on from the snapshot, and later attempts are only
logged, since there is no document left to record them in. A restart after
the deletion loses such a delivery.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aiohttp
import structlog

from clipservice.config import Settings
from clipservice.errors import SourceError
from clipservice.jobs import bookkeeping
from clipservice.jobs.models import Job, WebhookAttempt, utcnow
from clipservice.jobs.store import JobStore

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Clipservice-Signature"
# A hook that raises SourceError("source_forbidden", …) for a URL that must not be called.
UrlCheck = Callable[[str], Awaitable[None]]

_ATTEMPT_TIMEOUT_S = 10.0
_MAX_DELAY_S = 3600.0


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Clipservice-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str, header: str, body: bytes, *, tolerance_s: float = 300, now: float | None = None
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old.

    What a receiver runs: it refuses forged bodies and replays of old ones.
    """
    parts = dict(p.partition("=")[::2] for p in header.split(","))
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).partition(",v1=")[2]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookSender:
    """Delivers job-end webhooks in background tasks, with retries and a record of attempts."""

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        store: JobStore,
        url_check: UrlCheck,
    ) -> None:
        self.settings = settings
        self.session = session
        self.store = store
        # The service passes its URL guard (sources/guard.py): refused URLs are
        # recorded as a source_forbidden attempt and never contacted.
        self.url_check = url_check
        self.first_delay_s = 1.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        # Writes of attempts outlive a cancelled delivery; shutdown waits for them.
        self._saves: set[asyncio.Future[bool]] = set()

    def job_ended(self, job: Job) -> None:
        """Start delivering ``job``'s final document, if it has a callback_url."""
        if not job.callback_url or job.job_id in self._tasks:
            return
        body = json.dumps(
            job.public(self.settings.server.public_url), separators=(",", ":")
        ).encode()
        ended_at = job.finished_at or utcnow()
        task = asyncio.create_task(
            self._deliver(job.job_id, job.callback_url, body, ended_at),
            name=f"webhook-{job.job_id}",
        )
        self._tasks[job.job_id] = task
        task.add_done_callback(functools.partial(self._forget, job.job_id))

    def _forget(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._tasks.pop(job_id, None)

    async def resume(self) -> None:
        """Restart deliveries of ended jobs not yet answered with a 2xx, within the window."""
        for job in await self.store.all():
            if not (job.status.ended and job.callback_url):
                continue
            if any(a.status is not None and 200 <= a.status < 300 for a in job.webhook_attempts):
                continue
            if any(
                a.error and a.error.startswith("source_forbidden") for a in job.webhook_attempts
            ):
                continue
            self.job_ended(job)

    async def close(self) -> None:
        """Cancel pending deliveries and wait for them to stop."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._saves, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait until every delivery in flight has ended (for tests and benchmarks)."""
        while self._tasks:
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _deliver(self, job_id: str, url: str, body: bytes, ended_at: datetime) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job_id):
            deadline = ended_at.timestamp() + self.settings.security.webhook_retry_s
            delay_s = self.first_delay_s
            attempt = 0
            while True:
                attempt += 1
                status, error = await self._attempt(url, body)
                await self._record(job_id, WebhookAttempt(at=utcnow(), status=status, error=error))
                ok = status is not None and 200 <= status < 300
                log.info("webhook_attempt", attempt=attempt, http_status=status, error=error, ok=ok)
                if ok:
                    return
                if error and error.startswith("source_forbidden"):
                    log.warning("webhook_refused", error=error)
                    return
                # ±10 % jitter, so many failed receivers are not retried in lockstep.
                wait_s = min(delay_s, _MAX_DELAY_S) * random.uniform(0.9, 1.1)
                if datetime.now(UTC).timestamp() + wait_s > deadline:
                    log.warning("webhook_given_up", attempts=attempt)
                    return
                await asyncio.sleep(wait_s)
                delay_s *= 2

    async def _attempt(self, url: str, body: bytes) -> tuple[int | None, str | None]:
        try:
            await self.url_check(url)
        except SourceError as exc:
            return None, f"{exc.code}: {exc.message}"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.security.webhook_secret, body, timestamp),
        }
        try:
            async with self.session.post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,  # a redirect could lead past the URL check
                timeout=aiohttp.ClientTimeout(total=_ATTEMPT_TIMEOUT_S),
            ) as resp:
                await resp.read()
                return resp.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    async def _record(self, job_id: str, attempt: WebhookAttempt) -> None:
        # A job deleted after its retention is not written again: the attempt is only logged.
        save = asyncio.ensure_future(bookkeeping.add_webhook_attempt(self.store, job_id, attempt))
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)
        await asyncio.shield(save)
