"""Idempotency-Key on POST /api/create-clips: same job, 409 on reuse, restart, expiry."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from clipservice.api.appkeys import STORE
from tests.conftest import Service, ServiceFactory

BODY: dict[str, Any] = {"video_id": "idem1", "clips": [{"start": 1, "end": 2, "mode": "fast"}]}


async def _post(service: Service, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    resp = await service.create(body, headers={"Idempotency-Key": key})
    async with resp:
        return resp.status, await resp.json(content_type=None)


async def test_same_key_same_body_same_job(service: Service) -> None:
    """The same key and body give the first job back with 200, not a new one."""
    status, first = await _post(service, BODY, "key-a")
    assert status == 202
    status, again = await _post(service, dict(reversed(list(BODY.items()))), "key-a")
    assert status == 200 and again["job_id"] == first["job_id"]
    assert len(await service.app[STORE].all()) == 1


async def test_same_key_other_body_409(service: Service) -> None:
    """The same key with a different body is a 409 problem and creates nothing."""
    await _post(service, BODY, "key-b")
    other = {**BODY, "clips": [{"start": 1, "end": 3}]}
    status, problem = await _post(service, other, "key-b")
    assert status == 409
    assert problem["status"] == 409 and problem["title"] == "Idempotency-Key reused"
    assert len(await service.app[STORE].all()) == 1


async def test_different_key_new_job(service: Service) -> None:
    """A different key always makes a new job, even for the same body."""
    _, a = await _post(service, BODY, "key-c1")
    status, b = await _post(service, BODY, "key-c2")
    assert status == 202 and a["job_id"] != b["job_id"]


async def test_bad_key_400(service: Service) -> None:
    """An over-long key is refused with a 400 problem."""
    status, problem = await _post(service, BODY, "k" * 300)
    assert status == 400 and problem["status"] == 400


async def test_key_survives_restart(make_service: ServiceFactory, tmp_path: Path) -> None:
    """After a restart on the same data_dir the key still maps to its job (and still 409s)."""
    data = tmp_path / "idem"
    first = await make_service(data)
    _, created = await _post(first, BODY, "key-d")
    await first.wait(created["job_id"])
    await first.stop()
    second = await make_service(data)
    status, again = await _post(second, BODY, "key-d")
    assert status == 200 and again["job_id"] == created["job_id"]
    status, _ = await _post(second, {**BODY, "video_id": "idem2"}, "key-d")
    assert status == 409


async def test_key_expires_with_the_job(make_service: ServiceFactory) -> None:
    """Once the job is deleted after its retention, the key makes a new job."""
    service = await make_service(jobs={"retention_s": 0.2, "clip_timeout_s": 60})
    _, created = await _post(service, BODY, "key-e")
    job_id = created["job_id"]
    async with asyncio.timeout(60):
        while True:
            async with service.http.get(f"{service.base_url}/api/jobs/{job_id}") as resp:
                if resp.status == 404:
                    break
            await asyncio.sleep(0.05)
    status, fresh = await _post(service, BODY, "key-e")
    assert status == 202 and fresh["job_id"] != job_id
