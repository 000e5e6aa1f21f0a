"""The Python client against the real service on a loopback port.

Some tests put a small loopback proxy between client and service, to answer
503/429 first, hide the event stream, or break it half-way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from clipservice.api.appkeys import STORE
from clipservice.client import ClipClient, ClipServiceError
from clipservice.jobs.models import JobDocument, JobStatus
from clipservice.jobs.models import JobDocument as Job
from tests.conftest import MediaServer, Service, _start_site


async def test_create_wait_download(service: Service, tmp_path: Path) -> None:
    """create_clips → wait (with progress callbacks) → download gives whole files, typed as Job."""
    seen: list[Job] = []
    async with ClipClient(service.base_url) as client:
        job = await client.create_clips(
            video_id="dQw4w9WgXcQ", clips=[(1, 3), {"start": "0:05", "end": "0:07"}], mode="fast"
        )
        assert isinstance(job, JobDocument) and job.total == 2
        done = await client.wait(job.job_id, on_progress=seen.append)
        assert done.status is JobStatus.FINISHED and done.processed == 2
        assert seen and seen[-1] == done
        assert [j.progress for j in seen] == sorted(j.progress for j in seen)
        paths = await client.download(done, tmp_path / "out")
    assert [p.name for p in paths] == [r.file for r in done.results]
    for path, result in zip(paths, done.results, strict=True):
        assert path.stat().st_size == result.size_bytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


async def test_progress_iterator_and_async_callback(service: Service) -> None:
    """progress() yields documents until the terminal one; wait() also takes async callbacks."""
    calls: list[float] = []

    async def on_progress(job: Job) -> None:
        calls.append(job.progress)

    async with ClipClient(service.base_url) as client:
        job = await client.create_clips(video_id="iterjob", clips=[(2, 4)], mode="fast")
        docs = [j async for j in client.progress(job.job_id)]
        assert docs[-1].status.ended and all(not j.status.ended for j in docs[:-1])
        await client.wait(job.job_id, on_progress=on_progress)
    assert calls == [1.0]  # an ended job: one terminal document


async def test_problem_errors_are_raised(service: Service) -> None:
    """A 422 or 404 answer raises ClipServiceError with the problem JSON's fields."""
    async with ClipClient(service.base_url) as client:
        with pytest.raises(ClipServiceError) as bad:
            await client.create_clips(video_id="x", clips=[(5, 3)], mode="fast")
        assert bad.value.status == 422 and bad.value.problem["status"] == 422
        assert bad.value.errors and "start must be before end" in str(bad.value)
        with pytest.raises(ClipServiceError) as missing:
            await client.get_job("0" * 32)
        assert missing.value.status == 404 and missing.value.title == "Job not found"


async def test_unreachable_service_is_a_clean_error() -> None:
    """A refused connection raises ClipServiceError with status 0, not a raw aiohttp error."""
    async with ClipClient("http://127.0.0.1:9") as client:
        with pytest.raises(ClipServiceError) as err:
            await client.get_job("0" * 32)
    assert err.value.status == 0


async def test_cancel_running_then_no_op(service: Service) -> None:
    """cancel() stops a running job; once ended it is a no-op that keeps the job."""
    async with ClipClient(service.base_url) as client:
        job = await client.create_clips(video_id="stall", clips=[(20, 25)], mode="reencode")
        await service.wait_processing_on_disk(job.job_id)  # see test_webhooks
        cancelled = await client.cancel(job.job_id)
        assert cancelled.status is JobStatus.CANCELLED
        again = await client.cancel(job.job_id)
        assert again.status is JobStatus.CANCELLED
        assert (await client.get_job(job.job_id)).status is JobStatus.CANCELLED
        await client.delete(job.job_id)
        with pytest.raises(ClipServiceError) as gone:
            await client.get_job(job.job_id)
        assert gone.value.status == 404


@dataclass
class Proxy:
    """A loopback proxy to the service; ``fail`` answers the first requests with errors."""

    base_url: str = ""
    fail: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    events: str = "pass"  # pass | hide | break
    paths: list[str] = field(default_factory=list)


ProxyFactory = Callable[[Service], Awaitable[Proxy]]


@pytest.fixture
async def make_proxy() -> AsyncIterator[ProxyFactory]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def factory(service: Service) -> Proxy:
        proxy = Proxy()
        http = aiohttp.ClientSession(auto_decompress=False)
        sessions.append(http)

        async def forward(request: web.Request) -> web.StreamResponse:
            proxy.paths.append(f"{request.method} {request.path}")
            if proxy.fail and request.path.startswith("/api/create-clips"):
                status, headers = proxy.fail.pop(0)
                return web.json_response(
                    {"title": "Busy", "status": status}, status=status, headers=headers
                )
            is_events = request.path.endswith("/events")
            if is_events and proxy.events == "hide":
                return web.json_response({"title": "Not Found", "status": 404}, status=404)
            async with http.request(
                request.method,
                service.base_url + request.path_qs,
                data=await request.read(),
                headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            ) as upstream:
                resp = web.StreamResponse(status=upstream.status)
                for k, v in upstream.headers.items():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        resp.headers[k] = v
                await resp.prepare(request)
                if is_events and proxy.events == "break":
                    # One event, then the connection drops mid-stream.
                    head = await upstream.content.readuntil(b"\n\nevent: job")
                    await resp.write(head + await upstream.content.readuntil(b"\n\n"))
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner, proxy.base_url = await _start_site(app)
        runners.append(runner)
        return proxy

    yield factory
    for s in sessions:
        await s.close()
    for r in runners:
        await r.cleanup()


async def test_retries_503_and_429_with_retry_after(
    service: Service, make_proxy: ProxyFactory
) -> None:
    """503 and 429 answers are retried (Retry-After seconds or date) and one job results."""
    proxy = await make_proxy(service)
    proxy.fail = [
        (503, {"Retry-After": "0"}),
        (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),  # a past date: at once
    ]
    async with ClipClient(proxy.base_url) as client:
        job = await client.create_clips(video_id="retry1", clips=[(1, 2)], mode="fast")
        done = await client.wait(job.job_id)
    assert done.status is JobStatus.FINISHED
    assert proxy.paths.count("POST /api/create-clips") == 3
    assert len(await service.app[STORE].all()) == 1


async def test_retries_are_bounded(service: Service, make_proxy: ProxyFactory) -> None:
    """After max_retries busy answers the client raises the last problem instead of looping."""
    proxy = await make_proxy(service)
    proxy.fail = [(503, {"Retry-After": "0"})] * 10
    async with ClipClient(proxy.base_url, max_retries=2) as client:
        with pytest.raises(ClipServiceError) as err:
            await client.create_clips(video_id="busy", clips=[(1, 2)])
    assert err.value.status == 503 and err.value.title == "Busy"
    assert proxy.paths.count("POST /api/create-clips") == 3


@pytest.mark.parametrize("events", ["hide", "break"])
async def test_polling_fallback(service: Service, make_proxy: ProxyFactory, events: str) -> None:
    """Without an event stream (404) or with one that breaks, wait() polls to the end."""
    proxy = await make_proxy(service)
    proxy.events = events
    async with ClipClient(proxy.base_url, poll_interval_s=0.05) as client:
        job = await client.create_clips(video_id="poll1", clips=[(1, 3), (4, 6)], mode="fast")
        done = await client.wait(job.job_id, timeout_s=60)
    assert done.status is JobStatus.FINISHED and len(done.results) == 2
    assert f"GET /api/jobs/{job.job_id}" in proxy.paths


async def test_polling_only_client(service: Service) -> None:
    """use_events=False waits by polling alone."""
    async with ClipClient(service.base_url, use_events=False, poll_interval_s=0.05) as client:
        job = await client.create_clips(video_id="poll2", clips=[(1, 2)], mode="fast")
        done = await client.wait(job.job_id)
    assert done.status is JobStatus.FINISHED


async def test_idempotency_key_header(service: Service) -> None:
    """idempotency_key goes in the Idempotency-Key header: the same key gives the same job."""
    async with ClipClient(service.base_url) as client:
        a = await client.create_clips(video_id="idem", clips=[(1, 2)], idempotency_key="k-1")
        b = await client.create_clips(video_id="idem", clips=[(1, 2)], idempotency_key="k-1")
        assert a.job_id == b.job_id
        await client.wait(a.job_id)


async def test_wait_uses_event_stream(service: Service, make_proxy: ProxyFactory) -> None:
    """With the server's SSE stream, wait() reads events and never polls the job."""
    proxy = await make_proxy(service)
    seen: list[Job] = []
    async with ClipClient(proxy.base_url, poll_interval_s=0.05) as client:
        job = await client.create_clips(video_id="sse1", clips=[(1, 4), (5, 8)], mode="reencode")
        done = await client.wait(job.job_id, on_progress=seen.append)
    assert done.status is JobStatus.FINISHED
    assert f"GET /api/jobs/{job.job_id}/events" in proxy.paths
    # One GET from create_clips itself; none after it.
    assert proxy.paths.count(f"GET /api/jobs/{job.job_id}") == 1
    assert seen[-1].status is JobStatus.FINISHED and len(seen) >= 2


async def test_output_options_and_reel_through_the_client(
    service: Service, media_server: MediaServer, tmp_path: Path
) -> None:
    """create_clips takes OutputOptions (or dicts, per clip too) and merge; download
    brings the clips and the reel."""
    from clipservice.domain import OutputOptions

    async with ClipClient(service.base_url) as client:
        job = await client.create_clips(
            video_url=media_server.url("muxed.mp4"),
            clips=[(1, 2), {"start": 4, "end": 5, "output": {"aspect": "1:1", "max_height": 120}}],
            output=OutputOptions(aspect="1:1", max_height=160),
            merge=False,
        )
        job = await client.wait(job.job_id)
        assert [(r.width, r.height) for r in sorted(job.results, key=lambda r: r.index)] == [
            (160, 160),
            (120, 120),
        ]
        reel_job = await client.create_clips(
            video_url=media_server.url("muxed.mp4"), clips=[(1, 2), (4, 5)], merge=True
        )
        reel_job = await client.wait(reel_job.job_id)
        assert reel_job.reel is not None and reel_job.reel.error is None
        paths = await client.download(reel_job, tmp_path)
    assert [p.name for p in paths][-1] == f"reel-{reel_job.job_id}.mp4"
    assert all(p.stat().st_size > 0 for p in paths) and len(paths) == 3
