"""GET /api/jobs/{id}/events: Server-Sent Events of the job document until its end."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from clipservice.api.sse import event_id
from clipservice.jobs.models import Job
from tests.conftest import Service

ENDED = ("finished", "failed", "cancelled")
ORDER = {"pending": 0, "processing": 1, "finished": 2, "failed": 2, "cancelled": 2}
STALLED_CLIP = {"start": 10, "end": 25, "mode": "reencode"}


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, str]]:
    """A small SSE parser after the WHATWG rules: fields until a blank line make an event."""
    event: dict[str, str] = {}
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in event:
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        event[name] = event[name] + "\n" + value if name == "data" and name in event else value


async def collect(service: Service, job_id: str) -> list[dict[str, Any]]:
    """Every job document streamed until the server closes the stream."""
    docs = []
    async with service.http.get(f"{service.base_url}/api/jobs/{job_id}/events") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        async for ev in sse_events(resp):
            assert ev["event"] == "job" and ev["id"]
            docs.append(json.loads(ev["data"]))
    return docs


async def test_stream_until_terminal_with_several_listeners(service: Service) -> None:
    """Two listeners each get the full document on changes, in order, ending with the
    terminal state, after which the server closes the stream."""
    resp = await service.create(
        {"video_id": "sse1", "clips": [{"start": 1, "end": 3}, {"start": 5, "end": 8}]}
    )
    job_id = (await resp.json())["job_id"]
    streams = await asyncio.gather(collect(service, job_id), collect(service, job_id))
    final = await service.job(job_id)
    assert final["status"] == "finished"
    for docs in streams:
        assert docs, "at least the current state is sent"
        ranks = [ORDER[d["status"]] for d in docs]
        assert ranks == sorted(ranks)
        assert [d["status"] for d in docs].count("finished") == 1
        assert docs[-1] == final
        progress = [d["progress"] for d in docs]
        assert progress == sorted(progress)


async def test_first_event_at_once_and_cancel_ends_stream(service: Service) -> None:
    """A listener of a job stuck mid-clip gets its current state at once; cancelling the
    job sends the cancelled document and ends the stream."""
    resp = await service.create({"video_id": "stall", "clips": [STALLED_CLIP]})
    job_id = (await resp.json())["job_id"]
    docs: list[dict[str, Any]] = []
    async with service.http.get(f"{service.base_url}/api/jobs/{job_id}/events") as stream:
        events = sse_events(stream)
        first = json.loads((await anext(events))["data"])
        assert first["job_id"] == job_id and first["status"] in ("pending", "processing")
        # Progress within the stalled clip reaches listeners even though the job file
        # is rewritten only a few times a second.
        while True:
            doc = json.loads((await anext(events))["data"])
            if 0 < doc["progress"] < 1:
                break
        async with service.http.delete(f"{service.base_url}/api/jobs/{job_id}") as deleted:
            assert deleted.status == 200
        async for ev in events:
            docs.append(json.loads(ev["data"]))
    assert docs[-1]["status"] == "cancelled"
    assert docs[-1]["errors"][0]["code"] == "cancelled"


async def test_ended_job_sends_one_event_and_reconnect_gets_204(service: Service) -> None:
    """An ended job streams its document once and closes; an EventSource coming back with
    the terminal event's id gets 204, which stops its reconnecting."""
    resp = await service.create({"video_id": "sse3", "clips": [{"start": 1, "end": 2}]})
    job_id = (await resp.json())["job_id"]
    await service.wait(job_id)
    docs = await collect(service, job_id)
    assert len(docs) == 1 and docs[0]["status"] == "finished"
    job = Job.model_validate(docs[0])
    url = f"{service.base_url}/api/jobs/{job_id}/events"
    async with service.http.get(url, headers={"Last-Event-ID": event_id(job)}) as again:
        assert again.status == 204
    async with service.http.get(url, headers={"Last-Event-ID": "0-processing"}) as stale:
        assert stale.status == 200
        assert len([ev async for ev in sse_events(stale)]) == 1


async def test_unknown_job_is_404_problem(service: Service) -> None:
    """Events of an unknown job: 404 problem JSON, not a stream."""
    async with service.http.get(f"{service.base_url}/api/jobs/{'0' * 32}/events") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["status"] == 404


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_reads_the_stream(service: Service) -> None:
    """`curl -N` prints the events of a job and exits when the stream ends."""
    resp = await service.create({"video_id": "sse5", "clips": [{"start": 1, "end": 2}]})
    job_id = (await resp.json())["job_id"]
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sN", "--max-time", "60", f"{service.base_url}/api/jobs/{job_id}/events",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    lines = out.decode().splitlines()
    data = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert lines[0].startswith("retry: ")
    assert data[-1]["status"] == "finished"
    assert all(line == "event: job" for line in lines if line.startswith("event"))
