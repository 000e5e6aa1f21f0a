"""Autoscaling signals and backpressure: the queue gauges of ``/metrics`` (depth, oldest
queued task's age, clips in flight per worker, workers) in both runners, and job creation
refused with 503 ``queue_full`` + Retry-After past ``[queue] max_depth``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clipservice.api.appkeys import STORE
from clipservice.jobs.backlog import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    DrainRate,
    retry_after_s,
)
from clipservice.jobs.models import JobStatus
from tests.conftest import (
    FakeVidfly,
    MediaServer,
    Service,
    ServiceFactory,
    assert_problem,
)
from tests.test_distributed import WAIT_S, Cluster, make_cluster, redis_url  # noqa: F401 (a fixture)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Past half of muxed.mp4 (30 s): its reads hang on a /stall/ URL until unstalled.
STALLED = {"start": 20, "end": 22, "mode": "reencode"}


# -- the drain rate and Retry-After -------------------------------------------------


def test_retry_after_is_the_excess_over_the_drain_rate_bounded() -> None:
    """Retry-After is ceil(excess / rate), at least 1 s, at most MAX_RETRY_AFTER_S, and the
    default while the rate is unknown or zero."""
    assert retry_after_s(10, 2.0) == 5
    assert retry_after_s(3, 2.0) == 2  # 1.5 s rounds up
    assert retry_after_s(1, 50.0) == 1
    assert retry_after_s(10_000, 0.5) == MAX_RETRY_AFTER_S
    assert retry_after_s(5, None) == DEFAULT_RETRY_AFTER_S
    assert retry_after_s(5, 0.0) == DEFAULT_RETRY_AFTER_S


def test_drain_rate_counts_what_workers_finished_over_the_window() -> None:
    """The rate is the finished tasks (summed over workers, from their running totals) over
    the time observed; unknown before min_span_s; a new worker only sets its baseline, a
    counter that went back (a restarted worker) adds nothing; old events leave the window."""
    rate = DrainRate(window_s=60, min_span_s=10)
    rate.observe(0, {"a": 100})
    assert rate.per_s(5) is None
    rate.observe(10, {"a": 110, "b": 7})  # b is new: its 7 are from before
    assert rate.per_s(10) == pytest.approx(10 / 10)
    rate.observe(20, {"a": 120, "b": 17})
    assert rate.per_s(20) == pytest.approx(30 / 20)
    rate.observe(30, {"a": 5, "b": 27})  # a restarted: its total went back
    assert rate.per_s(30) == pytest.approx(40 / 30)
    # 80 s in, the events of 10 s have left the 60 s window.
    rate.observe(80, {"a": 5, "b": 27})
    assert rate.per_s(80) == pytest.approx(30 / 60)
    assert rate.per_s(200) == 0.0


def test_drain_rate_after_a_long_gap_starts_again() -> None:
    """Totals read after a gap longer than the window are not crowded into it: the reading
    only sets a new baseline, so the rate is unknown again rather than overstated."""
    rate = DrainRate(window_s=60, min_span_s=10)
    rate.observe(0, {"a": 0})
    rate.observe(20, {"a": 20})
    assert rate.per_s(20) == pytest.approx(1.0)
    rate.observe(500, {"a": 2000})  # 1980 more, but over 480 s
    assert rate.per_s(500) is None
    rate.observe(510, {"a": 2010})
    assert rate.per_s(510) == pytest.approx(1.0)


# -- helpers ------------------------------------------------------------------------


def samples(text: str) -> Samples:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: Samples, name: str, **labels: str) -> float | None:
    return found.get((name, tuple(sorted(labels.items()))))


def in_flight(found: Samples) -> dict[str, float]:
    return {
        dict(labels)["worker"]: v
        for (name, labels), v in found.items()
        if name == "clipservice_clips_in_flight"
    }


async def scrape(service: Service) -> Samples:
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        assert resp.status == 200
        return samples(await resp.text())


async def scrape_until(service: Service, ok: Callable[[Samples], bool]) -> Samples:
    """Scrape until ``ok`` holds (within WAIT_S); the samples that satisfied it."""
    async with asyncio.timeout(WAIT_S):
        while not ok(found := await scrape(service)):
            await asyncio.sleep(0.1)
    return found


async def create(service: Service, body: dict[str, Any], **kw: Any) -> tuple[int, Any, Any]:
    async with await service.create(body, **kw) as resp:
        return resp.status, resp.headers.copy(), await resp.json(content_type=None)


# -- in-process runner --------------------------------------------------------------


async def test_local_queue_full_refuses_then_accepts_after_the_drain(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """In-process, one FFmpeg slot, max_depth 1: a stalled clip holds the slot, two more wait
    for it (the gauges say so), and the next creation answers 503 queue_full with Retry-After,
    creating nothing, while a replay of a taken job still gets that job; once the source
    answers and the queue drains, a creation is taken again."""
    service = await make_service(
        jobs={"max_concurrent_clips": 1, "clip_timeout_s": 60}, queue={"max_depth": 1}
    )
    url = media_server.url("muxed.mp4", stall=True)
    status, _, first = await create(service, {"video_url": url, "clips": [STALLED]})
    assert status == 202, first
    found = await scrape_until(
        service, lambda s: value(s, "clipservice_clips_in_flight", worker="local") == 1
    )
    assert value(found, "clipservice_workers") == 1
    waiting = {"video_url": url, "clips": [STALLED, {**STALLED, "start": 21}]}
    status, _, second = await create(service, waiting, headers={"Idempotency-Key": "second"})
    assert status == 202, second
    found = await scrape_until(
        service, lambda s: value(s, "clipservice_queue_depth", queue="clips") == 2
    )
    assert value(found, "clipservice_queue_depth", queue="jobs") == 0
    assert value(found, "clipservice_clips_in_flight", worker="local") == 1
    # The oldest waiting clip's age grows while nothing starts.
    age = value(found, "clipservice_queue_oldest_age_seconds", queue="clips")
    assert age is not None and age > 0
    later = await scrape_until(
        service,
        lambda s: (value(s, "clipservice_queue_oldest_age_seconds", queue="clips") or 0) > age,
    )
    assert value(later, "clipservice_queue_depth", queue="clips") == 2

    third = {"video_url": url, "clips": [{"start": 1, "end": 2}]}
    async with await service.create(third) as resp:
        problem = await assert_problem(resp, 503)
        retry_after = resp.headers["Retry-After"]
    assert problem["code"] == "queue_full" and problem["detail"].startswith("2 clips wait")
    assert retry_after.isdigit() and 1 <= int(retry_after) <= MAX_RETRY_AFTER_S
    jobs = await service.app[STORE].all()
    assert sorted(j.job_id for j in jobs) == sorted([first["job_id"], second["job_id"]])
    # A replay of a job already taken is answered with it, queue full or not.
    status, _, replay = await create(service, waiting, headers={"Idempotency-Key": "second"})
    assert status == 200 and replay["job_id"] == second["job_id"]
    found = await scrape(service)
    assert value(found, "clipservice_jobs_refused_total", reason="queue_full") == 1

    media_server.unstall.set()
    for job_id in (first["job_id"], second["job_id"]):
        assert (await service.wait(job_id, WAIT_S))["status"] == "finished"
    found = await scrape(service)
    assert value(found, "clipservice_queue_depth", queue="clips") == 0
    assert value(found, "clipservice_queue_oldest_age_seconds", queue="clips") == 0
    assert value(found, "clipservice_clips_in_flight", worker="local") == 0
    status, _, again = await create(service, third)
    assert status == 202, again
    assert (await service.wait(again["job_id"], WAIT_S))["status"] == "finished"


async def test_no_limit_by_default(make_service: ServiceFactory, media_server: MediaServer) -> None:
    """max_depth 0 (the default) refuses nothing, however many clips wait."""
    service = await make_service(jobs={"max_concurrent_clips": 1})
    url = media_server.url("muxed.mp4", stall=True)
    body = {"video_url": url, "clips": [STALLED] * 3}
    for _ in range(2):
        status, _, doc = await create(service, body)
        assert status == 202, doc
    found = await scrape_until(
        service, lambda s: value(s, "clipservice_queue_depth", queue="clips") == 5
    )
    assert value(found, "clipservice_jobs_refused_total", reason="queue_full") == 0
    media_server.unstall.set()


# -- distributed runner -------------------------------------------------------------


async def test_distributed_gauges_and_queue_full(
    tmp_path: Path,
    vidfly: FakeVidfly,
    make_service: ServiceFactory,
    redis_url: str,  # noqa: F811 (the fixture)
    media_server: MediaServer,
) -> None:
    """On the Redis queue: with no worker, the jobs queue's depth and oldest age rise and
    creation past max_depth answers 503 queue_full with Retry-After (nothing created); a
    worker then prepares the jobs and cuts a clip whose source stalls, shown in flight under
    its id while the other clips wait on the clips queue (still past the limit); the source
    answering again, all drain and creation is taken again."""
    async with make_cluster(tmp_path, vidfly, make_service, redis_url) as cluster:
        # A third node of the same cluster, with the limit (the cluster's nodes have none).
        node = await make_service(cluster.data_dir, queue={"url": redis_url, "max_depth": 2})
        found = await scrape(node)
        assert value(found, "clipservice_workers") == 0
        assert value(found, "clipservice_queue_depth", queue="clips") == 0
        assert value(found, "clipservice_queue_depth", queue="jobs") == 0
        assert in_flight(found) == {}

        stalled = media_server.url("muxed.mp4", stall=True)
        first = await submit(node, stalled)
        second = await submit(node, stalled)
        found = await scrape(node)
        assert value(found, "clipservice_queue_depth", queue="jobs") == 2
        age = value(found, "clipservice_queue_oldest_age_seconds", queue="jobs")
        assert age is not None and age >= 0
        later = await scrape_until(
            node,
            lambda s: (value(s, "clipservice_queue_oldest_age_seconds", queue="jobs") or 0) > age,
        )
        assert value(later, "clipservice_queue_depth", queue="jobs") == 2
        # Two jobs (one clip each, as far as is known before their source is resolved)
        # are not past 2: a third is taken, a fourth is not.
        third = await submit(node, stalled)
        body = {"video_url": media_server.url("muxed.mp4"), "clips": [{"start": 1, "end": 2}]}
        async with await node.create(body) as resp:
            problem = await assert_problem(resp, 503)
            retry_after = resp.headers["Retry-After"]
        assert problem["code"] == "queue_full"
        assert retry_after.isdigit() and 1 <= int(retry_after) <= MAX_RETRY_AFTER_S
        assert sorted(j.job_id for j in await cluster.store.all()) == sorted([first, second, third])
        found = await scrape(node)
        assert value(found, "clipservice_jobs_refused_total", reason="queue_full") == 1
        fourth = await submit(cluster.api, stalled)  # the cluster's own nodes have no limit

        # One worker, one clip at a time: it prepares the jobs, and its first clip stalls.
        worker = cluster.start_worker()
        wid = cluster.worker_id(worker)
        found = await scrape_until(
            node,
            lambda s: (
                in_flight(s).get(wid) == 1
                and value(s, "clipservice_queue_depth", queue="jobs") == 0
                and value(s, "clipservice_queue_depth", queue="clips") == 3
            ),
        )
        assert value(found, "clipservice_workers") == 1
        assert in_flight(found) == {wid: 1}
        age = value(found, "clipservice_queue_oldest_age_seconds", queue="clips")
        assert age is not None and age >= 0
        # Three clips wait on the clips queue: still past the limit.
        async with await node.create(body) as resp:
            await assert_problem(resp, 503)

        media_server.unstall.set()
        for job_id in (first, second, third, fourth):
            done = await cluster.wait(job_id)
            assert done.status is JobStatus.FINISHED, (done.errors, cluster.logs())
        found = await scrape_until(node, lambda s: in_flight(s).get(wid) == 0)
        assert value(found, "clipservice_queue_depth", queue="clips") == 0
        assert value(found, "clipservice_queue_oldest_age_seconds", queue="clips") == 0
        assert value(found, "clipservice_jobs_refused_total", reason="queue_full") == 2
        async with await node.create(body) as resp:
            assert resp.status == 202, await resp.text()
            last = (await resp.json())["job_id"]
        assert (await cluster.wait(last)).status is JobStatus.FINISHED


async def submit(node: Service, url: str) -> str:
    """Create a one-clip job (its clip past the middle of the source) on ``node``; its id."""
    body = {"video_url": url, "clips": [STALLED]}
    async with await node.create(body) as resp:
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id


async def test_metrics_without_redis_answer_without_the_queue_gauges(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """An API node whose Redis is down still answers /metrics (queue_up 0), leaving the queue
    gauges out rather than showing stale numbers."""
    api = await make_service(tmp_path / "d", queue={"url": "redis://127.0.0.1:1/0"})
    found = await scrape(api)
    assert value(found, "clipservice_queue_up") == 0
    assert not [name for name, _ in found if name.startswith("clipservice_queue_depth")]
    assert value(found, "clipservice_workers") is None
    assert value(found, "clipservice_jobs_refused_total", reason="queue_full") == 0


async def test_create_without_redis_is_a_503_problem(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """An API node whose Redis is down answers create-clips and a job lookup with a 503
    problem (code queue_unavailable, Retry-After), not a 500: nothing was taken."""
    api = await make_service(tmp_path / "d", queue={"url": "redis://127.0.0.1:1/0"})
    async with await api.create({"video_id": "abc", "clips": [{"start": 0, "end": 1}]}) as resp:
        body = await assert_problem(resp, 503)
        assert body["code"] == "queue_unavailable" and int(resp.headers["Retry-After"]) > 0
    async with api.http.get(f"{api.base_url}/api/check-job/{'0' * 32}") as resp:
        body = await assert_problem(resp, 503)
        assert body["code"] == "queue_unavailable"
