"""Operations: /readyz, /metrics, request ids, trusted proxies, public URLs, access log."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from clipservice.api.appkeys import READINESS
from clipservice.api.middleware import client_address, parse_networks
from clipservice.config import ConfigError, load_settings
from tests.conftest import Service, ServiceFactory


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event, with the context variables merged in as in production."""
    capture = structlog.testing.LogCapture()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, capture],
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.reset_defaults()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_readyz_ok_and_ffmpeg_check_cached(service: Service) -> None:
    """/readyz is 200 with every check ok; the FFmpeg check is run once, not per request."""
    async with service.http.get(f"{service.base_url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"] == {"storage": "ok", "ffmpeg": "ok"}
    checked_at = service.app[READINESS]._ffmpeg.checked_at
    async with service.http.get(f"{service.base_url}/readyz") as resp:
        assert resp.status == 200
    assert service.app[READINESS]._ffmpeg.checked_at == checked_at


async def test_readyz_503_without_ffmpeg_or_storage(
    make_service: ServiceFactory, tmp_path: Path
) -> None:
    """/readyz answers 503 problem JSON naming the failed check: FFmpeg not runnable, or a
    data folder that cannot be written."""
    no_ffmpeg = await make_service(cut={"ffmpeg_path": str(tmp_path / "no-such-ffmpeg")})
    async with no_ffmpeg.http.get(f"{no_ffmpeg.base_url}/readyz") as resp:
        assert resp.status == 503
        assert resp.content_type == "application/problem+json"
        assert "ffmpeg" in (await resp.json())["detail"]
    broken = await make_service(tmp_path / "data2")
    broken.app[READINESS].data_dir = tmp_path / "gone" / "away"
    async with broken.http.get(f"{broken.base_url}/readyz") as resp:
        assert resp.status == 503
        assert "storage" in (await resp.json())["detail"]


async def test_metrics_after_a_job(make_service: ServiceFactory) -> None:
    """/metrics is Prometheus text with jobs by state, clips by outcome and mode, cut time,
    queue wait, resolver latency and errors, bytes written, FFmpeg processes; each service
    has its own registry."""
    service = await make_service()
    other = await make_service()  # a second app in the same process: no collision
    resp = await service.create(
        {"video_id": "m1", "clips": [{"start": 1, "end": 2}, {"start": 3, "end": 99}]}
    )
    doc = await service.wait((await resp.json())["job_id"])
    assert doc["status"] == "finished"
    failed = await service.wait(
        (
            await (
                await service.create({"video_id": "error500", "clips": [{"start": 1, "end": 3}]})
            ).json()
        )["job_id"]
    )
    assert failed["status"] == "failed"
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        s = samples(await resp.text())
    assert s[("clipservice_jobs", (("state", "finished"),))] == 1
    assert s[("clipservice_jobs", (("state", "failed"),))] >= 1
    assert s[("clipservice_clips_total", (("mode", "accurate"), ("outcome", "ok")))] == 1
    assert s[("clipservice_clips_total", (("mode", "accurate"), ("outcome", "invalid_range")))] == 1
    assert s[("clipservice_clip_cut_seconds_count", (("mode", "accurate"),))] == 1
    assert s[("clipservice_clip_queue_wait_seconds_count", ())] == 1
    assert s[("clipservice_resolve_seconds_count", ())] >= 2
    assert s[("clipservice_resolve_errors_total", (("code", "source_unavailable"),))] >= 1
    assert s[("clipservice_clip_bytes_written_total", ())] == doc["results"][0]["size_bytes"]
    assert s[("clipservice_ffmpeg_processes", ())] == 0
    assert s[("clipservice_draining", ())] == 0
    assert ("clipservice_event_loop_lag_seconds_count", ()) in s
    key = (
        "clipservice_http_requests_total",
        (("method", "POST"), ("route", "/api/create-clips"), ("status", "202")),
    )
    assert s[key] >= 2
    async with other.http.get(f"{other.base_url}/metrics") as resp:
        assert ("clipservice_clip_bytes_written_total", ()) in (o := samples(await resp.text()))
        assert o[("clipservice_clip_bytes_written_total", ())] == 0


async def test_request_id_echoed_generated_and_logged(
    service: Service, logs: list[dict[str, Any]]
) -> None:
    """A valid X-Request-ID is echoed and bound into the request's log lines (and the job's);
    a bad one is replaced; errors and SSE streams carry it too; one access line per request."""
    rid = "req-123.abc"
    resp = await service.create(
        {"video_id": "rid", "clips": [{"start": 1, "end": 2}]}, headers={"X-Request-ID": rid}
    )
    assert resp.headers["X-Request-ID"] == rid
    job_id = (await resp.json())["job_id"]
    await service.wait(job_id)
    async with service.http.get(
        f"{service.base_url}/api/jobs/{'0' * 32}", headers={"X-Request-ID": "bad id\u00e9" * 3}
    ) as resp:
        assert resp.status == 404
        generated = resp.headers["X-Request-ID"]
        assert len(generated) == 32 and generated != rid
    async with service.http.get(
        f"{service.base_url}/api/jobs/{job_id}/events", headers={"X-Request-ID": "sse-1"}
    ) as resp:
        assert resp.headers["X-Request-ID"] == "sse-1"
        await resp.read()
    access = [e for e in logs if e["event"] == "request"]
    created = [e for e in access if e["route"] == "/api/create-clips"]
    assert len(created) == 1
    assert created[0]["request_id"] == rid and created[0]["status"] == 202
    assert created[0]["method"] == "POST" and created[0]["duration_ms"] >= 0
    assert any(e["request_id"] == generated and e["status"] == 404 for e in access)
    # The job started by that request logs with its request id as well as its job id
    # (its end is logged just after the ended document is saved: give it a moment).
    async with asyncio.timeout(5):
        while not (
            job_lines := [
                e for e in logs if e.get("job_id") == job_id and e["event"] == "job_ended"
            ]
        ):
            await asyncio.sleep(0.02)
    assert job_lines[0]["request_id"] == rid


async def test_forwarded_headers_only_from_trusted_proxies(
    make_service: ServiceFactory, logs: list[dict[str, Any]]
) -> None:
    """X-Forwarded-For/Proto change the client address and scheme only when the peer is a
    trusted proxy; otherwise they are ignored."""
    headers = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9", "X-Forwarded-Proto": "https"}
    untrusted = await make_service(server={"trusted_proxies": ["10.0.0.0/8"]})
    trusted = await make_service(server={"trusted_proxies": ["127.0.0.0/8", "::1"]})
    for svc in (untrusted, trusted):
        async with svc.http.get(f"{svc.base_url}/healthz", headers=headers) as resp:
            assert resp.status == 200
    lines = [e for e in logs if e["event"] == "request" and e["route"] == "/healthz"]
    assert (lines[0]["remote"], lines[0]["scheme"]) == ("127.0.0.1", "http")
    assert (lines[1]["remote"], lines[1]["scheme"]) == ("203.0.113.9", "https")


def test_client_address_walks_past_trusted_hops() -> None:
    """The client is the rightmost X-Forwarded-For hop that is not a trusted proxy; garbage
    or an untrusted peer stops the walk."""
    nets = parse_networks(["10.0.0.0/8", "192.0.2.1"])
    assert client_address("10.1.1.1", "1.2.3.4, 192.0.2.1, 10.0.0.5", nets) == "1.2.3.4"
    assert client_address("10.1.1.1", "6.6.6.6, 1.2.3.4", nets) == "1.2.3.4"
    assert client_address("8.8.8.8", "1.2.3.4", nets) == "8.8.8.8"
    assert client_address("10.1.1.1", "nonsense", nets) == "10.1.1.1"
    assert client_address("10.1.1.1", "[2001:db8::1]:443", nets) == "2001:db8::1"


def test_bad_trusted_proxy_stops_startup(tmp_path: Path) -> None:
    """A trusted_proxies entry that is not an address or network is refused, naming the key."""
    with pytest.raises(ConfigError, match="trusted_proxies"):
        load_settings(environ={"CLIPSERVICE_SERVER__TRUSTED_PROXIES": '["10.0.0.0/33"]'})


async def test_public_url_makes_clip_urls_absolute(make_service: ServiceFactory) -> None:
    """With server.public_url, clip URLs are absolute in the job document and SSE events."""
    service = await make_service(server={"public_url": "https://clips.example.com/base/"})
    resp = await service.create({"video_id": "pub", "clips": [{"start": 1, "end": 2}]})
    job_id = (await resp.json())["job_id"]
    doc = await service.wait(job_id)
    url = doc["results"][0]["url"]
    assert url == f"https://clips.example.com/base/api/clips/{doc['results'][0]['file']}"
    async with service.http.get(f"{service.base_url}/api/jobs/{job_id}/events") as resp:
        text = await resp.text()
    event = json.loads(next(line[6:] for line in text.splitlines() if line.startswith("data: ")))
    assert event["results"][0]["url"] == url


async def test_file_answers_are_logged_with_their_real_status(
    service: Service, media_server: Any, logs: list[dict[str, Any]]
) -> None:
    """A clip download's access line and metric say what was really sent: 206 and the
    range's length for a Range request, 304 for a matching If-None-Match."""
    async with await service.create(
        {
            "video_url": media_server.url("video.mp4"),
            "clips": [{"start": 1, "end": 2, "mode": "fast"}],
        }
    ) as resp:
        job_id = (await resp.json())["job_id"]
    doc = await service.wait(job_id)
    url = f"{service.base_url}{doc['results'][0]['url']}"
    async with service.http.get(url, headers={"Range": "bytes=10-109"}) as resp:
        assert resp.status == 206 and len(await resp.read()) == 100
        etag = resp.headers["ETag"]
    async with service.http.get(url, headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    lines = [e for e in logs if e["event"] == "request" and e["route"] == "/api/clips/{file}"]
    assert (lines[-2]["status"], lines[-2]["bytes"]) == (206, 100)
    assert lines[-1]["status"] == 304
    async with service.http.get(f"{service.base_url}/metrics") as resp:
        text = await resp.text()
    assert 'route="/api/clips/{file}",status="206"' in text
