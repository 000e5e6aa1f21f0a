"""API keys, the job-creation rate limit and the per-job limits."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from clipservice.api.auth import key_matches
from clipservice.api.ratelimit import RateLimiter
from tests.conftest import ServiceFactory, assert_problem

# A job that fails at once (the fake resolver answers 500): nothing heavy runs.
CHEAP_JOB: dict[str, Any] = {"video_id": "error500", "clips": [{"start": 1, "end": 2}]}
KEYS = ("s3cret-key-one-0123456789", "s3cret-key-two-9876543210")


async def _ended(svc: Any, job_id: str, headers: dict[str, str] | None = None) -> None:
    """Wait for a job to end, so teardown never cancels it mid-write."""
    async with asyncio.timeout(30):
        while True:
            async with svc.http.get(f"{svc.base_url}/api/jobs/{job_id}", headers=headers) as r:
                if (await r.json())["status"] in ("finished", "failed", "cancelled"):
                    return
            await asyncio.sleep(0.02)


async def test_api_keys_required_on_every_api_route(make_service: ServiceFactory) -> None:
    """With keys set, every /api route answers 401 problem JSON with WWW-Authenticate without a valid key."""
    svc = await make_service(security={"api_keys": list(KEYS)})
    base = svc.base_url
    job = "0123456789abcdef0123456789abcdef"
    calls = [
        ("POST", "/api/create-clips"),
        ("GET", f"/api/check-job/{job}"),
        ("GET", f"/api/jobs/{job}"),
        ("DELETE", f"/api/jobs/{job}"),
        ("GET", f"/api/jobs/{job}/events"),
        ("GET", "/api/clips/abc-1-2-fast.mp4"),
        ("GET", "/api/openapi.json"),
        ("GET", "/api/no-such-route"),
    ]
    bad_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEYS[0]}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": KEYS[0][:-1]},
        {"X-API-Key": KEYS[0] + "x"},
        {"Authorization": f"Bearer {KEYS[0].upper()}"},
    ]
    for method, path in calls:
        for headers in bad_headers:
            async with svc.http.request(method, base + path, headers=headers, json=CHEAP_JOB) as r:
                await assert_problem(r, 401)
                assert r.headers["WWW-Authenticate"].startswith("Bearer")


async def test_valid_keys_in_both_headers(make_service: ServiceFactory) -> None:
    """Either configured key works as Bearer or as X-API-Key; health stays open without a key."""
    svc = await make_service(security={"api_keys": list(KEYS)})
    for headers in (
        {"Authorization": f"Bearer {KEYS[0]}"},
        {"Authorization": f"bearer {KEYS[1]}"},
        {"X-API-Key": KEYS[1]},
    ):
        async with await svc.create(CHEAP_JOB, headers=headers) as r:
            assert r.status == 202, await r.text()
            job_id = (await r.json())["job_id"]
        async with svc.http.get(f"{svc.base_url}/api/jobs/{job_id}", headers=headers) as r:
            assert r.status == 200
            assert KEYS[0] not in await r.text() and KEYS[1] not in await r.text()
        await _ended(svc, job_id, headers)
    async with svc.http.get(f"{svc.base_url}/healthz") as r:
        assert r.status == 200


async def test_keys_never_logged(
    make_service: ServiceFactory,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Neither a valid nor a wrong key appears in any log line or stored job file."""
    caplog.set_level(logging.DEBUG)
    svc = await make_service(security={"api_keys": list(KEYS)})
    async with await svc.create(CHEAP_JOB, headers={"X-API-Key": KEYS[0]}) as r:
        job_id = (await r.json())["job_id"]
    await _ended(svc, job_id, {"X-API-Key": KEYS[0]})
    async with await svc.create(CHEAP_JOB, headers={"X-API-Key": "wrong-key-abcdef"}) as r:
        assert r.status == 401
    async with svc.http.get(
        f"{svc.base_url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {KEYS[0]}"}
    ):
        pass
    out = capsys.readouterr()
    for text in (
        caplog.text,
        out.out,
        out.err,
        *(p.read_text() for p in svc.settings.jobs_dir.glob("*.json")),
    ):
        assert KEYS[0] not in text and "wrong-key-abcdef" not in text


def test_key_compare() -> None:
    """The comparison accepts exactly the configured keys, including non-ASCII input safely."""
    assert key_matches("a", ("b", "a"))
    assert not key_matches("", ("a",))
    assert not key_matches("ä\udcff", ("a",))
    assert not key_matches("a", ())


async def test_create_rate_limit(make_service: ServiceFactory) -> None:
    """Past create_rate_per_min a client gets 429 with Retry-After; another key has its own allowance."""
    svc = await make_service(security={"api_keys": list(KEYS), "create_rate_per_min": 2})
    one = {"X-API-Key": KEYS[0]}
    for _ in range(2):
        async with await svc.create(CHEAP_JOB, headers=one) as r:
            assert r.status == 202
            await _ended(svc, (await r.json())["job_id"], one)
    async with await svc.create(CHEAP_JOB, headers=one) as r:
        await assert_problem(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
    async with await svc.create(CHEAP_JOB, headers={"X-API-Key": KEYS[1]}) as r:
        assert r.status == 202
        # (The job is the second key's: only that key reads it.)
        await _ended(svc, (await r.json())["job_id"], {"X-API-Key": KEYS[1]})
    # Reads are not limited.
    async with svc.http.get(f"{svc.base_url}/api/jobs/{'0' * 32}", headers=one) as r:
        assert r.status == 404


async def test_create_rate_limit_by_address(make_service: ServiceFactory) -> None:
    """Without keys the limit applies per client address; 0 turns it off."""
    svc = await make_service(security={"create_rate_per_min": 1})
    async with await svc.create(CHEAP_JOB) as r:
        assert r.status == 202
        await _ended(svc, (await r.json())["job_id"])
    async with await svc.create(CHEAP_JOB) as r:
        await assert_problem(r, 429)
    free = await make_service(security={"create_rate_per_min": 0})
    for _ in range(5):
        async with await free.create(CHEAP_JOB) as r:
            assert r.status == 202
            await _ended(free, (await r.json())["job_id"])


def test_token_bucket_refills() -> None:
    """The bucket allows a burst of `rate`, then one more every 60/rate seconds, and says how long to wait."""
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(30.0)
    now[0] = 29.0
    assert limiter.take("a") == pytest.approx(1.0)
    now[0] = 30.0
    assert limiter.take("a") == 0
    assert limiter.take("b") == 0
    assert RateLimiter(0).take("a") == 0


@pytest.mark.parametrize(
    ("jobs", "clips"),
    [
        ({"max_clips_per_job": 3}, [{"start": i, "end": i + 1} for i in range(4)]),
        ({"max_clip_duration_s": 5}, [{"start": 0, "end": 5.001}]),
        ({"max_job_duration_s": 10}, [{"start": 0, "end": 6}, {"start": 10, "end": 16}]),
    ],
)
async def test_job_limits(
    make_service: ServiceFactory, jobs: dict[str, Any], clips: list[Any]
) -> None:
    """Clips per job, clip duration and total requested seconds per job are enforced with 422."""
    svc = await make_service(jobs=jobs)
    async with await svc.create({"video_id": "error500", "clips": clips}) as r:
        body = await assert_problem(r, 422)
        assert body["errors"]
    ok = clips[:1] if "max_clips_per_job" in jobs else [{"start": 0, "end": 1}]
    async with await svc.create({"video_id": "error500", "clips": ok}) as r:
        assert r.status == 202
        await _ended(svc, (await r.json())["job_id"])
