"""Every error, from our code, pydantic or aiohttp itself, is RFC 9457 problem JSON."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Service, ServiceFactory, assert_problem


async def test_framework_errors_are_problems(service: Service) -> None:
    """Unknown route (404), wrong method (405) and a too-large body (413) are problem JSON."""
    base = service.base_url
    async with service.http.get(f"{base}/nope") as r:
        await assert_problem(r, 404)
    async with service.http.put(f"{base}/api/create-clips") as r:
        body = await assert_problem(r, 405)
        assert "POST" in r.headers.get("Allow", "")
        assert body["title"]
    big = b'{"video_id": "' + b"a" * 70_000 + b'"}'
    async with service.http.post(
        f"{base}/api/create-clips", data=big, headers={"Content-Type": "application/json"}
    ) as r:
        await assert_problem(r, 413)


async def test_job_and_clip_not_found(service: Service) -> None:
    """Unknown job ids, malformed ids and traversal in clip names are 404 problems."""
    base = service.base_url
    for path in (
        "/api/check-job/0123456789abcdef0123456789abcdef",
        "/api/jobs/not-a-job",
        "/api/jobs/..%2F..%2Fetc%2Fpasswd",
        "/api/clips/..%2Fjobs%2Fx.json",
        "/api/clips/passwd",
        "/api/clips/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    ):
        async with service.http.get(base + path) as r:
            await assert_problem(r, 404)
    async with service.http.delete(f"{base}/api/jobs/0123456789abcdef0123456789abcdef") as r:
        await assert_problem(r, 404)


async def test_content_type_and_malformed_json(service: Service) -> None:
    """Wrong Content-Type is 415; broken JSON, NaN and duplicate keys are 400."""
    url = f"{service.base_url}/api/create-clips"
    async with service.http.post(url, data="x=1", headers={"Content-Type": "text/plain"}) as r:
        await assert_problem(r, 415)
    for raw in (
        b"{not json",
        b'{"video_id": "a", "clips": [{"start": NaN, "end": 2}]}',
        b'{"video_id": "a", "clips": [{"start": 1, "end": Infinity}]}',
        b'{"video_id": "a", "video_id": "b", "clips": []}',
        b"\xff\xfe",
        b"[" * 100_00,
    ):
        async with service.http.post(
            url, data=raw, headers={"Content-Type": "application/json"}
        ) as r:
            await assert_problem(r, 400)


@pytest.mark.parametrize(
    ("body", "locs"),
    [
        ({"clips": [{"start": 1, "end": 2}]}, [["body"]]),
        ({"video_id": "a b", "clips": [{"start": 1, "end": 2}]}, [["body", "video_id"]]),
        ({"video_id": "a", "clips": []}, [["body", "clips"]]),
        ({"video_id": "a", "clips": [{"start": 2, "end": 1}]}, [["body", "clips", 0]]),
        (
            {
                "video_id": "a",
                "clips": [{"start": -1, "end": "1:xx"}, {"start": 1, "end": 2, "x": 1}],
            },
            [["body", "clips", 0, "start"], ["body", "clips", 0, "end"], ["body", "clips", 1, "x"]],
        ),
        ({"video_id": "a", "clips": [{"start": 1, "end": 2}], "typo": 1}, [["body", "typo"]]),
        (
            {"video_url": "file:///etc/passwd", "clips": [{"start": 1, "end": 2}]},
            [["body", "video_url"]],
        ),
        ({"video_url": "ftp://x/y", "clips": [{"start": 1, "end": 2}]}, [["body", "video_url"]]),
        (
            {"video_id": "a", "url": "https://x.test/", "clips": [{"start": 1, "end": 2}]},
            [["body"]],
        ),
        ({"video_id": "a", "clips": [{"start": 0, "end": 601}]}, [["body", "clips", 0]]),
        ({"video_id": "a", "clips": [{"start": True, "end": 2}]}, [["body", "clips", 0, "start"]]),
        (
            {"video_id": "a", "clips": [{"start": 1e308, "end": 1.5e308}]},
            [["body", "clips", 0, "start"], ["body", "clips", 0, "end"]],
        ),
        (
            {"video_id": "a", "clips": [{"start": 1, "end": 2, "mode": "slow"}]},
            [["body", "clips", 0, "mode"]],
        ),
        ({"video_id": "a", "clips": [{"start": 1, "end": 2}] * 51}, [["body", "clips"]]),
        ([1, 2], [["body"]]),
    ],
)
async def test_invalid_bodies_list_every_problem(
    service: Service, body: Any, locs: list[list[Any]]
) -> None:
    """Bodies that fail validation get 422 with every problem's location listed."""
    resp = await service.create(body)
    problem = await assert_problem(resp, 422)
    got = [e["loc"] for e in problem["errors"]]
    for loc in locs:
        assert loc in got, (loc, got)
    assert all(e["msg"] for e in problem["errors"])
    assert not any(service.settings.jobs_dir.iterdir())


async def test_timestamps_accepted(service: Service) -> None:
    """Times as numbers, plain decimal strings and [HH:]MM:SS[.fff] are all accepted."""
    resp = await service.create(
        {
            "video_id": "ts",
            "clips": [
                {"start": "0:01", "end": "00:00:02.5"},
                {"start": "3", "end": 4.25},
                {"start": "1:00:00", "end": "1:00:01"},
            ],
        }
    )
    assert resp.status == 202
    doc = await service.job((await resp.json())["job_id"])
    assert [(c["start"], c["end"]) for c in doc["clips"]] == [(1, 2.5), (3, 4.25), (3600, 3601)]


async def test_direct_resolver_refuses_video_id(make_service: ServiceFactory) -> None:
    """With resolver.kind = direct, a video_id request is a 422, not a failed job."""
    service = await make_service(resolver={"kind": "direct"})
    resp = await service.create({"video_id": "abc", "clips": [{"start": 1, "end": 2}]})
    await assert_problem(resp, 422)
