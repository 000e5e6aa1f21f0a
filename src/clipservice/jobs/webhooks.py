"""Webhook delivery: POST the final job document to the job's ``callback_url``.

The body is signed with ``X-Clipservice-Signature: t=<unix time>,v1=<hex
HMAC-SHA256 of "<t>.<body>">`` (key: ``security.webhook_secret``); the
timestamp lets receivers refuse replays. Each request also carries
``X-Clipservice-Delivery`` (the same on every attempt of one delivery: the
job id) and ``X-Clipservice-Attempt`` (1, 2, …). A non-2xx answer or a
network error is retried with exponential backoff from about 1 s, for up to
``security.webhook_retry_s`` after the job ended. Every attempt is logged and
appended to the job document's ``webhook_attempts`` while the job exists.

Delivery is at least once. When a job ends, its delivery (the body is a
snapshot of the final document) is written to the outbox
(:mod:`clipservice.jobs.outbox`) before the first attempt, and stays there
until a 2xx, a refused URL or the end of the retry window, whether or not the
job has been deleted meanwhile. Every process that can send (the in-process
service; API nodes and workers in the distributed mode) runs a
:class:`WebhookSender` that takes up due deliveries from the outbox, its own
and those of processes that stopped or died, so a restart loses nothing.

A process that dies between ending a job and writing its delivery leaves an
ended job with a callback and no attempt: senders look for those at start
and every minute (:meth:`WebhookSender.recover`) and put them in the outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import structlog

from clipservice.config import Settings
from clipservice.errors import SourceError
from clipservice.jobs import bookkeeping
from clipservice.jobs.models import Job, WebhookAttempt, utcnow
from clipservice.jobs.outbox import Delivery, Outbox
from clipservice.jobs.store import JobStore

log = structlog.get_logger(__name__)

SIGNATURE_HEADER = "X-Clipservice-Signature"
# The same on every attempt of one delivery, so receivers can drop repeats.
DELIVERY_HEADER = "X-Clipservice-Delivery"
ATTEMPT_HEADER = "X-Clipservice-Attempt"
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
    """Delivers job-end webhooks from the outbox: on schedule, with retries, across restarts.

    :meth:`job_ended` puts a delivery in the outbox; a loop started by
    :meth:`start` claims due deliveries (this process's and any other's) and
    runs each attempt as a bounded background task; :meth:`close` stops it
    and hands unfinished attempts back to the outbox.
    """

    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        store: JobStore,
        url_check: UrlCheck,
        *,
        outbox: Outbox,
    ) -> None:
        self.settings = settings
        self.session = session
        self.store = store
        self.outbox = outbox
        # The service passes its URL guard (sources/guard.py): refused URLs are
        # recorded as a source_forbidden attempt and never contacted.
        self.url_check = url_check
        self.first_delay_s = 1.0
        # A claim holds a delivery this long; an attempt is cut off at half of it,
        # so another sender only takes it over from one that died.
        self.lease_s = 60.0
        # How often the outbox is looked at for deliveries other processes left.
        self.poll_s = 1.0
        self.max_in_flight = 16
        # Looking for ended jobs whose delivery never reached the outbox: how
        # often, and how long after the end (its ender is still writing it).
        self.recover_interval_s = 60.0
        self.recover_grace_s = 30.0
        self._adds: set[asyncio.Future[Any]] = set()
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        # Outbox and job writes outlive a cancelled attempt; close() waits for them.
        self._saves: set[asyncio.Future[Any]] = set()
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None

    # -- putting deliveries in the outbox ---------------------------------------

    def delivery_for(self, job: Job) -> Delivery | None:
        """The delivery of ``job``'s final document, or None if it has no callback_url."""
        if not job.callback_url:
            return None
        body = json.dumps(
            job.public(self.settings.server.public_url), separators=(",", ":")
        ).encode()
        ended_at = job.finished_at or job.updated_at
        return Delivery(
            delivery_id=job.job_id,
            job_id=job.job_id,
            url=job.callback_url,
            body=body,
            ended_at_s=ended_at.timestamp(),
            next_at_s=time.time(),
        )

    def job_ended(self, job: Job) -> None:
        """Put ``job``'s delivery in the outbox (a runner's on_job_end hook; returns at once)."""
        delivery = self.delivery_for(job)
        if delivery is None:
            return
        add = asyncio.ensure_future(self._add(delivery))
        self._adds.add(add)
        add.add_done_callback(self._adds.discard)

    async def _add(self, delivery: Delivery) -> None:
        try:
            if await self.outbox.add(delivery):
                log.info("webhook_queued", job_id=delivery.job_id, delivery_id=delivery.delivery_id)
        except Exception as exc:
            # recover() finds the job again while it exists (ended, no attempt).
            log.error("webhook_queue_failed", job_id=delivery.job_id, error=str(exc))
        self._wake.set()

    async def recover(self, now_s: float | None = None) -> int:
        """Put in the outbox the deliveries of ended jobs that never got there; how many.

        Those are ended jobs with a callback_url, no attempt recorded and no
        delivery in the outbox (the process that ended them died first), ended
        at least ``recover_grace_s`` ago and within the retry window.
        """
        now_s = time.time() if now_s is None else now_s
        added = 0
        for job in await self.store.all():
            if not (job.status.ended and job.callback_url) or job.webhook_attempts:
                continue
            delivery = self.delivery_for(job)
            assert delivery is not None
            age_s = now_s - delivery.ended_at_s
            if age_s < self.recover_grace_s or age_s > self.settings.security.webhook_retry_s:
                continue
            if await self.outbox.add(delivery):
                log.warning("webhook_recovered", job_id=job.job_id)
                added += 1
        if added:
            self._wake.set()
        return added

    # -- the delivery loop ---------------------------------------------------------

    async def start(self) -> None:
        """Open the outbox and start delivering (what is due now, then on schedule)."""
        await self.outbox.open()
        self._loop = asyncio.create_task(self._run(), name="webhook-sender")

    async def close(self) -> None:
        """Stop delivering; attempts in flight are cut off and handed back to the outbox."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        # A delivery put in the outbox now is not lost: the next start sends it.
        await asyncio.gather(*self._adds, return_exceptions=True)
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while self._saves:
            await asyncio.gather(*self._saves, return_exceptions=True)
        await self.outbox.close()

    async def wait_idle(self) -> None:
        """Wait until the outbox is empty and nothing is in flight (for tests and benchmarks)."""
        while self._adds or self._in_flight or await self.outbox.count():
            await asyncio.sleep(0.02)

    async def _run(self) -> None:
        next_recover = 0.0  # at once
        failing = False
        while True:
            # Cleared before looking, so a wake-up during the look is not lost.
            self._wake.clear()
            wait_s = self.poll_s
            try:
                if time.monotonic() >= next_recover:
                    next_recover = time.monotonic() + self.recover_interval_s
                    await self.recover()
                free = self.max_in_flight - len(self._in_flight)
                for delivery in await self.outbox.claim_due(time.time(), free, self.lease_s):
                    self._launch(delivery)
                if len(self._in_flight) < self.max_in_flight:
                    due_s = await self.outbox.next_due_s()
                    if due_s is not None:
                        wait_s = min(wait_s, max(0.0, due_s - time.time()))
                if failing:
                    log.info("webhook_outbox_back")
                    failing = False
            except Exception as exc:  # Redis down, a disk error: try again on the next round
                if not failing:
                    log.warning("webhook_outbox_unreachable", error=str(exc))
                failing = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._wake.wait()

    def _launch(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._deliver(delivery), name=f"webhook-{delivery.job_id}")
        self._in_flight[delivery.delivery_id] = task
        task.add_done_callback(functools.partial(self._attempt_done, delivery.delivery_id))

    def _attempt_done(self, delivery_id: str, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(delivery_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook_attempt_failed", error=str(task.exception()))
        self._wake.set()  # a slot is free, and the next attempt may be due soon

    # -- one attempt -------------------------------------------------------------------

    async def _deliver(self, delivery: Delivery) -> None:
        with structlog.contextvars.bound_contextvars(
            job_id=delivery.job_id, delivery_id=delivery.delivery_id
        ):
            try:
                status, error = await self._attempt(delivery)
            except asyncio.CancelledError:
                # Shutting down: due again at once, for whichever sender comes next.
                self._protect(self.outbox.retry_at(delivery, time.time()))
                raise
            try:
                await asyncio.shield(self._protect(self._settle(delivery, status, error)))
            except Exception as exc:
                # The job store or the outbox failed: try again once a lease would have run out.
                log.error("webhook_settle_failed", error=str(exc))
                self._protect(self._retry_later(delivery))

    async def _retry_later(self, delivery: Delivery) -> None:
        with contextlib.suppress(Exception):  # Redis down: the lease runs out on its own
            await self.outbox.retry_at(delivery, time.time() + self.lease_s)

    async def _settle(self, delivery: Delivery, status: int | None, error: str | None) -> None:
        """Record the attempt, then remove the delivery or schedule its next attempt."""
        # A job deleted after its retention is not written again: the attempt is only logged.
        await bookkeeping.add_webhook_attempt(
            self.store, delivery.job_id, WebhookAttempt(at=utcnow(), status=status, error=error)
        )
        ok = status is not None and 200 <= status < 300
        log.info(
            "webhook_attempt", attempt=delivery.attempts, http_status=status, error=error, ok=ok
        )
        if ok:
            await self.outbox.remove(delivery)
            return
        if error and error.startswith("source_forbidden"):
            log.warning("webhook_refused", error=error)
            await self.outbox.remove(delivery)
            return
        exponent = min(delivery.attempts - 1, 30)
        # ±10 % jitter, so many failed receivers are not retried in lockstep.
        wait_s = min(self.first_delay_s * 2**exponent, _MAX_DELAY_S) * random.uniform(0.9, 1.1)
        next_at_s = time.time() + wait_s
        if next_at_s > delivery.ended_at_s + self.settings.security.webhook_retry_s:
            log.warning("webhook_given_up", attempts=delivery.attempts)
            await self.outbox.remove(delivery)
            return
        if not await self.outbox.retry_at(delivery, next_at_s):
            log.warning("webhook_lease_lost", attempt=delivery.attempts)

    async def _attempt(self, delivery: Delivery) -> tuple[int | None, str | None]:
        # Well within the lease, so no other sender takes the delivery meanwhile.
        try:
            async with asyncio.timeout(min(_ATTEMPT_TIMEOUT_S, self.lease_s / 2)):
                return await self._post(delivery)
        except TimeoutError:
            return None, "TimeoutError: the attempt took too long"

    async def _post(self, delivery: Delivery) -> tuple[int | None, str | None]:
        try:
            await self.url_check(delivery.url)
        except SourceError as exc:
            return None, f"{exc.code}: {exc.message}"
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.settings.security.webhook_secret, delivery.body, timestamp),
            DELIVERY_HEADER: delivery.delivery_id,
            ATTEMPT_HEADER: str(delivery.attempts),
        }
        try:
            async with self.session.post(
                delivery.url,
                data=delivery.body,
                headers=headers,
                allow_redirects=False,  # a redirect could lead past the URL check
                timeout=aiohttp.ClientTimeout(total=_ATTEMPT_TIMEOUT_S),
            ) as resp:
                await resp.read()
                return resp.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:300]

    def _protect(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
        # Bookkeeping outlives a cancelled attempt; close() waits for it.
        save = asyncio.ensure_future(coro)
        self._saves.add(save)
        save.add_done_callback(self._saves.discard)
        return save
