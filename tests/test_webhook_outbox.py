"""The webhook outbox: deliveries written durably before the first attempt, kept apart from the
job's retention, resumed after a restart or a kill -9 (in-process, a real `clipservice serve`,
a worker of the distributed mode), leased so one sender works on a delivery at a time."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import tests.test_distributed as distributed
import tests.test_lifecycle as lifecycle
import tests.test_webhooks as webhooks
from clipservice.api.appkeys import WEBHOOKS
from clipservice.jobs.models import Job, JobSource, JobStatus, WebhookAttempt, new_job_id
from clipservice.jobs.outbox import Delivery, FileOutbox, RedisOutbox
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.store import FileJobStore
from clipservice.jobs.webhooks import WebhookSender, verify
from tests.conftest import FakeVidfly, ServiceFactory, settings_for
from tests.test_webhooks import SECRET, Receiver, _sections

# Fixtures from the modules that own them (assigned, so they register here too).
receiver = webhooks.receiver
start_serve = lifecycle.start_serve
redis_url = distributed.redis_url

REDIS_URL = "redis://127.0.0.1:6379/13"  # a database of its own: other tests flush theirs
WAIT_S = 60
FAILED_JOB = {"video_id": "error500", "clips": [{"start": 1, "end": 2}]}


def _record(data_dir: Path, job_id: str) -> dict[str, Any] | None:
    """The job's outbox file as it is on disk, or None."""
    path = data_dir / "webhooks" / f"{job_id}.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return data


async def _backing_off(data_dir: Path, job_id: str, attempts: int) -> dict[str, Any]:
    """Wait until the outbox file says ``attempts`` were made and the next one is in the future."""
    async with asyncio.timeout(WAIT_S):
        while True:
            rec = _record(data_dir, job_id)
            if rec and int(rec["attempts"]) == attempts and float(rec["next_at_s"]) > time.time():
                return rec
            await asyncio.sleep(0.02)


async def _call_after(receiver: Receiver, after_s: float) -> dict[str, Any]:
    async with asyncio.timeout(WAIT_S):
        while True:
            later = [c for c in receiver.calls if c["at"] > after_s]
            if later:
                return later[0]
            await asyncio.sleep(0.02)


def _assert_one_delivery(receiver: Receiver, job_id: str) -> None:
    """Every call: the job's delivery id, attempts 1, 2, …, the same body, a valid signature."""
    assert [c["delivery"] for c in receiver.calls] == [job_id] * len(receiver.calls)
    assert [c["attempt"] for c in receiver.calls] == [
        str(n) for n in range(1, len(receiver.calls) + 1)
    ]
    assert len({c["body"] for c in receiver.calls}) == 1
    for call in receiver.calls:
        assert verify(SECRET, call["signature"], call["body"], tolerance_s=300), (
            call["attempt"],
            call["signature"],
        )


def _delivery(delivery_id: str | None = None, body: bytes = b'{"x":1}') -> Delivery:
    job_id = delivery_id or new_job_id()
    return Delivery(job_id, job_id, "http://127.0.0.1:9/hook", body, time.time(), 0, time.time())


# -- the file outbox -------------------------------------------------------------


async def test_file_outbox_keeps_attempts_and_schedule_across_reopen(tmp_path: Path) -> None:
    """A claim counts the attempt on disk; a reopened outbox (a restart) has it due at once."""
    folder = tmp_path / "webhooks"
    outbox = FileOutbox(folder)
    await outbox.open()
    d = _delivery(body='{"title":"café ✂"}'.encode())
    assert await outbox.add(d) and not await outbox.add(d)
    (claimed,) = await outbox.claim_due(time.time(), 10, 60)
    assert claimed.attempts == 1
    assert await outbox.claim_due(time.time(), 10, 60) == []  # claimed: not handed out twice

    # Killed mid-attempt: the next start finds the attempt counted and the delivery due.
    again = FileOutbox(folder)
    await again.open()
    (reclaimed,) = await again.claim_due(time.time(), 10, 60)
    assert reclaimed.attempts == 2 and reclaimed.body == d.body
    later = time.time() + 100
    assert await again.retry_at(reclaimed, later)
    assert await again.claim_due(time.time(), 10, 60) == []
    assert await again.next_due_s() == pytest.approx(later)
    (due,) = await again.claim_due(later, 10, 60)
    assert due.attempts == 3
    assert await again.remove(due)
    assert list(folder.iterdir()) == [] and await again.count() == 0
    await again.close()


async def test_file_outbox_writes_are_atomic(tmp_path: Path) -> None:
    """A reader sees a whole outbox file at every moment of many rewrites; a torn temp file
    left by a kill is dropped at the next start."""
    folder = tmp_path / "webhooks"
    outbox = FileOutbox(folder)
    await outbox.open()
    body = json.dumps({"pad": "é" * 100_000}).encode()  # large enough that writes take time
    d = _delivery(body=body)
    await outbox.add(d)
    path = folder / f"{d.delivery_id}.json"
    stop = threading.Event()
    reads: list[int] = []
    torn: list[str] = []

    def read_forever() -> None:
        while not stop.is_set():
            raw = path.read_bytes()
            try:
                record = json.loads(raw)
                assert Delivery.from_record(record).body == body
            except (ValueError, AssertionError) as exc:
                torn.append(f"{len(raw)} bytes: {exc}")
                continue
            reads.append(int(record["attempts"]))

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for _ in range(25):
            (claimed,) = await outbox.claim_due(time.time(), 1, 60)
            await outbox.retry_at(claimed, time.time())
    finally:
        stop.set()
        await asyncio.to_thread(reader.join)
    assert torn == []
    assert len(set(reads)) > 1  # the reader did see the file change
    assert sorted(p.name for p in folder.iterdir()) == [path.name]

    (folder / f"{path.name}.tmp-deadbeef").write_text('{"delivery_id": "torn')
    reopened = FileOutbox(folder)
    await reopened.open()
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
    (claimed,) = await reopened.claim_due(time.time(), 1, 60)
    assert claimed.attempts == 26 and claimed.body == body


# -- the Redis outbox ---------------------------------------------------------------


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisJobStore]:
    store = RedisJobStore.from_url(REDIS_URL)
    await store.redis.flushdb()
    yield store
    await store.redis.flushdb()
    await store.close()


async def test_redis_outbox_lease(redis_store: RedisJobStore) -> None:
    """A claim is a lease: nobody else gets the delivery until it runs out; then another
    sender takes it (attempt counted again), and the old holder can no longer change it."""
    a = RedisOutbox(redis_store.redis, redis_store.prefix)
    b = RedisOutbox(redis_store.redis, redis_store.prefix)
    d = _delivery(body='{"title":"café ✂"}'.encode())
    assert await a.add(d) and not await b.add(d)
    now = time.time()
    (held,) = await a.claim_due(now, 10, lease_s=30)
    assert held.attempts == 1 and held.lease and held.body == d.body
    assert await b.claim_due(now + 29, 10, lease_s=30) == []
    assert await a.next_due_s() == pytest.approx(now + 30)

    # The holder died: once the lease has run out, another sender takes over.
    (taken,) = await b.claim_due(now + 31, 10, lease_s=30)
    assert taken.attempts == 2 and taken.lease != held.lease
    assert not await a.retry_at(held, now + 1) and not await a.remove(held)
    assert await b.retry_at(taken, now + 100)
    assert await a.next_due_s() == pytest.approx(now + 100)
    stored = await a.get(d.delivery_id)
    assert stored is not None and stored.attempts == 2 and stored.lease == ""
    assert await a.claim_due(now + 99, 10, lease_s=30) == []
    (last,) = await a.claim_due(now + 100, 10, lease_s=30)
    assert await a.remove(last)
    assert await a.count() == 0 and await a.get(d.delivery_id) is None
    assert await redis_store.redis.keys("*") == []


async def test_redis_outbox_one_claim_among_concurrent_senders(redis_store: RedisJobStore) -> None:
    """Eight senders on their own connections claim at once: each due delivery goes to one."""
    clients = [RedisJobStore.from_url(REDIS_URL) for _ in range(8)]
    try:
        outboxes = [RedisOutbox(c.redis, c.prefix) for c in clients]
        deliveries = [_delivery() for _ in range(5)]
        for d in deliveries:
            await outboxes[0].add(d)
        got = await asyncio.gather(*(o.claim_due(time.time(), 5, 60) for o in outboxes))
        ids = [d.delivery_id for batch in got for d in batch]
        assert sorted(ids) == sorted(d.delivery_id for d in deliveries)
    finally:
        for c in clients:
            await c.close()


# -- deliveries lost between a job's end and the outbox ------------------------------


async def test_recover_finds_ended_jobs_never_put_in_the_outbox(tmp_path: Path) -> None:
    """An ended job with a callback, no attempt and no delivery (its process died in between)
    is put in the outbox; fresh, attempted, running and out-of-window jobs are left alone."""
    settings = settings_for(tmp_path, security={"webhook_secret": SECRET, "webhook_retry_s": 3600})
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    now = datetime.now(UTC)

    async def job(ended_ago_s: float | None, attempted: bool = False) -> str:
        j = Job(
            job_id=new_job_id(),
            source=JobSource(video_id="v"),
            clips=[],
            total=0,
            callback_url="http://127.0.0.1:9/hook",
        )
        if ended_ago_s is not None:
            j.status = JobStatus.FAILED
            j.finished_at = now - timedelta(seconds=ended_ago_s)
        if attempted:
            j.webhook_attempts.append(WebhookAttempt(at=now, status=500))
        await store.save(j)
        return j.job_id

    lost = await job(120)
    await job(120, attempted=True)  # its delivery was made (or given up)
    await job(5)  # its ender may still be writing the delivery
    await job(None)  # still running
    await job(7200)  # past the retry window
    outbox = FileOutbox(tmp_path / "webhooks")
    async with aiohttp.ClientSession() as session:

        async def allow(url: str) -> None:
            return None

        sender = WebhookSender(settings, session, store, allow, outbox=outbox)
        await outbox.open()
        assert await sender.recover() == 1
        assert await sender.recover() == 0  # already there
    (d,) = await outbox.claim_due(time.time(), 10, 60)
    assert d.delivery_id == lost and d.ended_at_s == pytest.approx(now.timestamp() - 120)
    assert json.loads(d.body)["job_id"] == lost
    await store.close()


# -- the service: restarts, retention, kill -9 ----------------------------------------


async def test_outbox_written_before_the_first_attempt(
    make_service: ServiceFactory, receiver: Receiver
) -> None:
    """When the first request arrives, the outbox file already holds the exact body sent and
    the attempt; after the 2xx the file is gone."""
    service = await make_service(**_sections())
    data = service.settings.storage.data_dir
    receiver.on_call = lambda: [
        json.loads(p.read_text()) for p in (data / "webhooks").glob("*.json")
    ]
    resp = await service.create({**FAILED_JOB, "callback_url": receiver.url})
    job_id = (await resp.json())["job_id"]
    await webhooks._settle(service, job_id)
    (call,) = receiver.calls
    (seen,) = call["seen"]
    assert seen["delivery_id"] == job_id and seen["attempts"] == "1"
    assert seen["body"].encode() == call["body"] and seen["url"] == receiver.url
    assert _record(data, job_id) is None


async def test_delivery_resumes_across_restarts_with_the_same_id(
    make_service: ServiceFactory, receiver: Receiver, tmp_path: Path
) -> None:
    """A receiver failing twice, the service restarted after each failure: the third start
    delivers, with the same delivery id, the next attempt number and a valid signature."""
    data = tmp_path / "restart"
    receiver.plan = [500, 500]
    first = await make_service(data, **_sections())
    first.app[WEBHOOKS].first_delay_s = 2
    resp = await first.create({**FAILED_JOB, "callback_url": receiver.url})
    job_id = (await resp.json())["job_id"]
    await _backing_off(data, job_id, 1)
    await first.stop()
    assert len(receiver.calls) == 1

    second = await make_service(data, **_sections())
    second.app[WEBHOOKS].first_delay_s = 1  # the next wait is 2 s
    await _backing_off(data, job_id, 2)
    await second.stop()
    assert len(receiver.calls) == 2

    third = await make_service(data, **_sections())
    await third.app[WEBHOOKS].wait_idle()
    assert len(receiver.calls) == 3
    _assert_one_delivery(receiver, job_id)
    assert json.loads(receiver.calls[-1]["body"])["status"] == "failed"
    doc = await third.job(job_id)
    assert [a["status"] for a in doc["webhook_attempts"]] == [500, 500, 200]
    assert _record(data, job_id) is None


async def test_delivery_outlives_the_job_and_a_restart(
    make_service: ServiceFactory, receiver: Receiver, tmp_path: Path
) -> None:
    """A job deleted by retention while its webhook backs off is still delivered after a
    restart, from the outbox."""
    data = tmp_path / "short"
    sections = {**_sections(), "jobs": {"retention_s": 0.05, "clip_timeout_s": 60}}
    receiver.plan = [500]
    first = await make_service(data, **sections)
    first.app[WEBHOOKS].first_delay_s = 3
    resp = await first.create({**FAILED_JOB, "callback_url": receiver.url})
    job_id = (await resp.json())["job_id"]
    await _backing_off(data, job_id, 1)
    async with asyncio.timeout(WAIT_S):
        while (data / "jobs" / f"{job_id}.json").exists():
            await asyncio.sleep(0.02)
    await first.stop()
    assert len(receiver.calls) == 1

    second = await make_service(data, **sections)
    await second.app[WEBHOOKS].wait_idle()
    assert len(receiver.calls) == 2
    _assert_one_delivery(receiver, job_id)
    async with second.http.get(f"{second.base_url}/api/jobs/{job_id}") as gone:
        assert gone.status == 404


async def test_kill9_mid_backoff_then_restart_delivers(
    start_serve: lifecycle.Starter, receiver: Receiver, tmp_path: Path
) -> None:
    """`clipservice serve` killed with SIGKILL while a webhook backs off: the outbox file is
    whole, and the next start delivers the same body with the same id and the next attempt."""
    data = tmp_path / "data"
    env = {"SECURITY__WEBHOOK_SECRET": SECRET}
    receiver.failing = True
    serve = await start_serve(data, **env)
    job_id = await lifecycle.create(serve, {**FAILED_JOB, "callback_url": receiver.url})
    await _backing_off(data, job_id, 1)
    serve.proc.kill()  # SIGKILL: nothing is written on the way out
    await serve.exit_code()
    killed_at = time.time()
    rec = _record(data, job_id)  # never torn
    assert rec is not None and rec["delivery_id"] == job_id
    receiver.failing = False

    again = await start_serve(data, **env)
    call = await _call_after(receiver, killed_at)
    assert call["delivery"] == job_id and call["attempt"] == str(int(rec["attempts"]) + 1)
    assert call["body"] == rec["body"].encode() == receiver.calls[0]["body"]
    assert verify(SECRET, call["signature"], call["body"], tolerance_s=300)
    doc = await again.until(job_id, lambda d: d["webhook_attempts"][-1]["status"] == 200)
    assert [a["status"] for a in doc["webhook_attempts"]][-1] == 200
    async with asyncio.timeout(WAIT_S):
        while _record(data, job_id) is not None:
            await asyncio.sleep(0.02)
    again.proc.send_signal(signal.SIGTERM)
    assert await again.exit_code() == 0


# -- the distributed mode ----------------------------------------------------------------


@pytest.fixture
async def cluster(
    tmp_path: Path,
    vidfly: FakeVidfly,
    make_service: ServiceFactory,
    redis_url: str,
) -> AsyncIterator[distributed.Cluster]:
    """test_distributed's cluster (on a leased Redis database) with a webhook secret."""
    async with distributed.make_cluster(
        tmp_path, vidfly, make_service, redis_url, security=_sections()["security"]
    ) as c:
        yield c


async def test_worker_killed_mid_backoff_delivery_arrives_from_the_api_node(
    cluster: distributed.Cluster, receiver: Receiver
) -> None:
    """The worker that ended a job made the first attempt and was SIGKILLed while backing off:
    an API node delivers it, with the same delivery id, the next attempt and a valid signature."""
    # The API nodes' senders wait, so the worker is the one that sends first.
    for api in (cluster.api, cluster.api2):
        await api.app[WEBHOOKS].close()
    receiver.failing = True
    worker = cluster.start_worker()
    await cluster.wait_workers(1)
    resp = await cluster.api.create({**FAILED_JOB, "callback_url": receiver.url})
    job_id = (await resp.json())["job_id"]
    outbox = RedisOutbox(cluster.store.redis, cluster.store.prefix)
    async with asyncio.timeout(WAIT_S):
        while True:
            d = await outbox.get(job_id)
            if d is not None and d.attempts == 1 and not d.lease and d.next_at_s > time.time():
                break
            assert worker.poll() is None, cluster.log(worker)
            await asyncio.sleep(0.02)
    worker.kill()
    await asyncio.to_thread(worker.wait)
    killed_at = time.time()
    assert len(receiver.calls) == 1 and (await cluster.job(job_id)).status is JobStatus.FAILED
    receiver.failing = False

    await cluster.api2.app[WEBHOOKS].start()
    call = await _call_after(receiver, killed_at)
    assert call["attempt"] == "2"
    _assert_one_delivery(receiver, job_id)
    async with asyncio.timeout(WAIT_S):
        while await outbox.count():
            await asyncio.sleep(0.02)
    job = await cluster.job(job_id)
    assert [a.status for a in job.webhook_attempts] == [500, 200]
    assert worker.returncode == -signal.SIGKILL
