"""The public job document: every way it leaves the service shows contract fields only.

A job document leaves by ``GET /api/check-job/{id}``, ``GET /api/jobs/{id}``,
each SSE ``job`` event, the 200 body of ``DELETE /api/jobs/{id}``, the webhook
POST, and as the Python client's ``Job``. None of them may show what the
service keeps for itself (the idempotency key, the request hash, the caller).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web

from clipservice.client import ClipClient
from tests.conftest import Service, _start_site
from tests.test_sse import collect, sse_events

# The job document of CONTRACT.md ("GET /api/check-job/{job_id}"), and the
# additions the README documents.
CONTRACT_FIELDS = {
    "job_id", "status", "video_id", "total", "processed", "progress", "results", "errors",
    "error", "created_at", "updated_at", "finished_at", "expires_at",
}  # fmt: skip
DOCUMENTED_ADDITIONS = {"source", "clips", "webhook_attempts", "reel"}
PUBLIC_FIELDS = CONTRACT_FIELDS | DOCUMENTED_ADDITIONS
INTERNAL_FIELDS = {"client_id", "request_hash", "idempotency_key"}
# Fields of the objects inside the document: contract fields plus documented
# additions (results[].note, clips[].attempts).
LIST_ITEM_FIELDS = {
    "results": {
        "index", "start", "end", "mode", "file", "url", "size_bytes", "duration_s",
        "actual_start", "actual_end", "note", "format", "width", "height",
    },
    "errors": {"index", "start", "end", "code", "message"},
    "clips": {"index", "start", "end", "mode", "attempts", "output"},
    "webhook_attempts": {"at", "status", "error"},
}  # fmt: skip
OBJECT_FIELDS = {
    "error": {"code", "message"},
    "source": {"video_id", "url", "video_url", "audio_url"},
}
STALLED_CLIP = {"start": 10, "end": 25, "mode": "reencode"}


def _keys(value: Any) -> Iterator[str]:
    """Every key anywhere in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _keys(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keys(item)


def _check_public(where: str, doc: dict[str, Any]) -> None:
    """No internal field at any depth, every contract field, nested objects as documented."""
    leaked = INTERNAL_FIELDS & set(_keys(doc))
    assert not leaked, (where, leaked)
    assert set(doc) >= CONTRACT_FIELDS, (where, CONTRACT_FIELDS - set(doc))
    for name, allowed in LIST_ITEM_FIELDS.items():
        for item in doc[name]:
            assert set(item) <= allowed, (where, name, set(item) - allowed)
    for name, allowed in OBJECT_FIELDS.items():
        if doc[name] is not None:
            assert set(doc[name]) <= allowed, (where, name, set(doc[name]) - allowed)


@pytest.fixture
async def documents(service: Service) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Job documents from every way out, as (where, document), of two jobs made with
    an Idempotency-Key and a callback_url: one that finishes and one cancelled mid-clip."""
    hooks: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        hooks.append(await request.read())
        return web.Response()

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    runner, hook_base = await _start_site(receiver)
    base = service.base_url
    out: list[tuple[str, dict[str, Any]]] = []
    try:
        done = await service.create(
            {
                "video_id": "publicdoc",
                "clips": [{"start": 1, "end": 2, "mode": "fast"}],
                "callback_url": f"{hook_base}/hook",
            },
            headers={"Idempotency-Key": "public-doc-1"},
        )
        assert done.status == 202, await done.text()
        done_id = (await done.json())["job_id"]
        out += [("sse", doc) for doc in await collect(service, done_id)]
        out.append(("check-job", await service.job(done_id)))
        async with service.http.get(f"{base}/api/jobs/{done_id}") as r:
            assert r.status == 200
            out.append(("jobs", await r.json()))

        stalled = await service.create(
            {"video_id": "stall", "clips": [STALLED_CLIP], "callback_url": f"{hook_base}/hook"},
            headers={"Idempotency-Key": "public-doc-2"},
        )
        assert stalled.status == 202, await stalled.text()
        stalled_id = (await stalled.json())["job_id"]
        async with service.http.get(f"{base}/api/jobs/{stalled_id}/events") as stream:
            first = await anext(sse_events(stream))
            out.append(("sse", json.loads(first["data"])))
        async with service.http.delete(f"{base}/api/jobs/{stalled_id}") as r:
            assert r.status == 200, await r.text()
            out.append(("delete", await r.json()))

        async with asyncio.timeout(30):
            while len(hooks) < 2:
                await asyncio.sleep(0.02)
        out += [("webhook", json.loads(body)) for body in hooks]
        assert {doc["status"] for where, doc in out if where == "webhook"} == {
            "finished",
            "cancelled",
        }
        yield out
    finally:
        await runner.cleanup()


async def test_no_internal_field_leaves_the_service(
    documents: list[tuple[str, dict[str, Any]]],
) -> None:
    """GET check-job and jobs, SSE events, DELETE's 200 and webhook bodies never show client_id, request_hash or idempotency_key, and nested objects hold documented fields only."""
    assert {where for where, _ in documents} == {"sse", "check-job", "jobs", "delete", "webhook"}
    for where, doc in documents:
        _check_public(where, doc)


async def test_only_contract_fields_leave_the_service(
    documents: list[tuple[str, dict[str, Any]]],
) -> None:
    """Every way out shows exactly the contract's job fields and the documented additions."""
    for where, doc in documents:
        assert set(doc) == PUBLIC_FIELDS, (where, set(doc) ^ PUBLIC_FIELDS)


async def test_client_job_model_has_public_fields_only(service: Service) -> None:
    """The Job the Python client returns declares the public fields only, none of the service's own."""
    async with ClipClient(service.base_url) as client:
        job = await client.create_clips(
            video_id="error500", clips=[(1, 2)], idempotency_key="public-doc-3"
        )
        await client.wait(job.job_id)
    fields = set(type(job).model_fields)
    assert not fields & INTERNAL_FIELDS, fields & INTERNAL_FIELDS
    assert fields == PUBLIC_FIELDS, fields ^ PUBLIC_FIELDS
