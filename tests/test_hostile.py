"""Hand-written hostile inputs: every one gets a 4xx problem JSON, nothing is read
or written outside data_dir, and the service stays healthy and still cuts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from clipservice.api import routes as api_routes
from clipservice.api.appkeys import SETTINGS
from tests.conftest import (
    PROBLEM_CONTENT_TYPE,
    MediaServer,
    Service,
    ServiceFactory,
    assert_problem,
)

SECRET = "TOP-SECRET-MARKER-7f3a"
JOB = "0123456789abcdef0123456789abcdef"

# Traversal payloads for a path segment, already percent-encoded as sent on the wire.
TRAVERSALS = [
    "../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fsecret.mp4",
    "%2E%2E/%2E%2E/secret.mp4", "%252e%252e%252fsecret.mp4", "..%252f..%252fsecret.mp4",
    "..%5C..%5Csecret.mp4", "..\\..\\secret.mp4", "%00", "abc-1-2-fast.mp4%00.json",
    "abc-1-2-fast.mp4%0A", "abc-1-2-fast.mp4%0D%0A", "%E2%80%A4%E2%80%A4%2Fsecret.mp4",
    "%EF%BC%8E%EF%BC%8E%EF%BC%8Fsecret.mp4", "%C0%AE%C0%AE%2Fsecret.mp4", "..",
    "%2e%2e", ".", "..%00", "%2Fetc%2Fpasswd", "....//....//secret.mp4",
    "..;/secret.mp4", "%u002e%u002e%u2215secret.mp4", "clips%2F..%2F..%2Fsecret.mp4",
    f"{JOB}%00", f"{JOB}%0A", f"{JOB.upper()}", f"{JOB}/..%2F..%2Fsecret.mp4",
    "%EF%BC%90" * 32,
    "jobs%2F" + JOB, "x" * 3000,
]  # fmt: skip
PATH_TEMPLATES = [
    ("GET", "/api/check-job/{}"),
    ("GET", "/api/jobs/{}"),
    ("DELETE", "/api/jobs/{}"),
    ("GET", "/api/jobs/{}/events"),
    ("GET", "/api/clips/{}"),
]

BAD_BODIES: list[tuple[bytes, int]] = [
    (b'{"video_id": "a", "clips": [{"start": NaN, "end": 2}]}', 400),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": Infinity}]}', 400),
    (b'{"video_id": "a", "clips": [{"start": -Infinity, "end": 2}]}', 400),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": 1e308}]}', 422),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": 1e400}]}', 422),
    (b'{"video_id": "a", "clips": [{"start": -1, "end": 2}]}', 422),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": ' + b"9" * 5000 + b"}]}", 400),
    (b'{"video_id": "a", "clips": [{"start": "1e3", "end": "99:99"}]}', 422),
    (b'{"video_id": "a", "clips": [{"start": true, "end": 2}]}', 422),
    (b'{"video_id": "a", "video_id": "b", "clips": [{"start": 1, "end": 2}]}', 400),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": 2, "start": 0}]}', 400),
    (b'{"video_id": "abc\\u0000", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_id": "abc\\n", "clips": [{"start": 1, "end": 2}]}', 422),
    ('{"video_id": "ａｂｃ", "clips": [{"start": 1, "end": 2}]}'.encode(), 422),
    (b'{"video_id": "abc\\u202egpj", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_id": "../../etc", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_id": "\\ud800", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_url": "file:///etc/passwd", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_url": "http://a/\\u0000", "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_url": "concat:http://a|http://b", "clips": [{"start": 1, "end": 2}]}', 422),
    (
        b'{"callback_url": "gopher://127.0.0.1:6379/_", "video_id": "a", "clips": [{"start": 1, "end": 2}]}',
        422,
    ),
    (
        b'{"video_id": "a", "clips": ['
        + b'{"start": 1, "end": 2},' * 2500
        + b'{"start": 1, "end": 2}]}',
        422,
    ),
    (b'{"video_id": "a", "clips": [' + b"[" * 20000 + b"]" * 20000 + b"]}", 400),
    (b"[" * 60000, 400),
    (b'{"a":' * 10000 + b"1" + b"}" * 10000, 400),
    (b'{"video_id": "a", "clips": [{"start": [[[[[[[[[[1]]]]]]]]]], "end": 2}]}', 422),
    (b'{"video_id": {"$ne": 1}, "clips": [{"start": 1, "end": 2}]}', 422),
    (b'{"video_id": "a", "clips": [], "__proto__": {}}', 422),
    (b'"just a string"', 422),
    (b"null", 422),
    (b"[]", 422),
    (b"", 400),
    (b"\xef\xbb\xbf{}", 400),
    (b"\xff\xfe{\x00}\x00", 400),
    (b'{"video_id": "a", "clips": [{"start": 1, "end": 2}]} trailing', 400),
]


async def _problem(resp: Any, status: int | None = None) -> dict[str, Any]:
    """A 4xx problem JSON (``status`` when given) that shows none of the planted secret."""
    body = await assert_problem(resp, status)
    assert SECRET not in json.dumps(body), body
    return body


async def _still_healthy(svc: Service, media_server: MediaServer) -> None:
    async with svc.http.get(f"{svc.base_url}/healthz") as r:
        assert r.status == 200
    async with await svc.create(
        {
            "video_url": media_server.url("muxed.mp4"),
            "clips": [{"start": 1, "end": 2, "mode": "fast"}],
        }
    ) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["job_id"]
    doc = await svc.wait(job_id)
    assert doc["status"] == "finished", doc


def _plant_secrets(data_dir: Path) -> None:
    """Files a traversal would reach: beside and above the clips folder."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "secret.mp4").write_text(SECRET)
    (data_dir.parent / "secret.mp4").write_text(SECRET)
    (data_dir / "jobs").mkdir(exist_ok=True)


async def test_traversal_in_every_path_parameter(
    make_service: ServiceFactory, media_server: MediaServer, tmp_path: Path
) -> None:
    """Raw, encoded, double-encoded, NUL, backslash and unicode-dot traversals in every path parameter are 4xx problems and serve nothing."""
    _plant_secrets(tmp_path / "data")
    svc = await make_service()
    count = 0
    for method, template in PATH_TEMPLATES:
        for payload in TRAVERSALS:
            url = URL(svc.base_url + template.format(payload), encoded=True)
            async with svc.http.request(method, url) as r:
                await _problem(r)
            count += 1
    assert count == len(PATH_TEMPLATES) * len(TRAVERSALS)
    # Raw (unencoded) non-ASCII bytes in the request line never reach the app:
    # aiohttp's HTTP parser answers 400 itself (plain text, before any middleware).
    raw_unicode = "０１２３４５６７８９ａｂｃｄｅｆ" * 2
    reader, writer = await asyncio.open_connection(URL(svc.base_url).host, URL(svc.base_url).port)
    writer.write(f"GET /api/jobs/{raw_unicode} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.read(4096), 30)
    assert head.split(b" ", 2)[1] == b"400", head
    assert SECRET.encode() not in head
    writer.close()
    await writer.wait_closed()
    # Nothing was written beside data_dir.
    entries = await asyncio.to_thread(lambda: sorted(x.name for x in tmp_path.iterdir()))
    assert entries == ["data", "secret.mp4"], entries
    await _still_healthy(svc, media_server)


@pytest.mark.parametrize(("raw", "status"), BAD_BODIES)
async def test_hostile_bodies(service: Service, raw: bytes, status: int) -> None:
    """NaN/Infinity, 1e308, huge numbers and arrays, deep nesting, duplicate keys, NUL and unicode tricks get 400/422 problem JSON."""
    async with service.http.post(
        f"{service.base_url}/api/create-clips",
        data=raw,
        headers={"Content-Type": "application/json"},
    ) as r:
        await _problem(r, status)


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json-patch+json", "application/jsonx", "text/json", "application/xml", "*/*"],
)  # fmt: skip
async def test_wrong_content_types(service: Service, content_type: str | None) -> None:
    """A JSON body under any other Content-Type (or none) is 415."""
    headers = {"Content-Type": content_type} if content_type else {}
    body = b'{"video_id": "a", "clips": [{"start": 1, "end": 2}]}'
    async with service.http.post(
        f"{service.base_url}/api/create-clips",
        data=body,
        headers=headers,
        skip_auto_headers=["Content-Type"],
    ) as r:
        await _problem(r, 415)


async def test_oversized_body(service: Service) -> None:
    """A body over 64 KiB is 413, with or without a Content-Length (chunked)."""
    big = b'{"video_id": "' + b"a" * 70_000 + b'"}'

    async def chunks() -> Any:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    url = f"{service.base_url}/api/create-clips"
    for data in (big, chunks()):
        async with service.http.post(
            url, data=data, headers={"Content-Type": "application/json"}
        ) as r:
            await _problem(r, 413)


async def test_slow_loris_body(
    service: Service, media_server: MediaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body that stops arriving gets 408 problem JSON, and other clients are served meanwhile."""
    monkeypatch.setattr(api_routes, "BODY_READ_TIMEOUT_S", 0.5)
    host, port = URL(service.base_url).host, URL(service.base_url).port
    assert host and port
    conns = []
    for _ in range(5):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /api/create-clips HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"video_id": "a", '
        )
        await writer.drain()
        conns.append((reader, writer))
    async with service.http.get(f"{service.base_url}/healthz") as r:
        assert r.status == 200
    for reader, writer in conns:
        head = await asyncio.wait_for(reader.read(4096), 30)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert PROBLEM_CONTENT_TYPE.encode() in head
        writer.close()
        await writer.wait_closed()
    await _still_healthy(service, media_server)


async def test_hostile_idempotency_keys(service: Service) -> None:
    """An empty or 300-character Idempotency-Key gets 400 problem JSON, never a job or a 5xx."""
    url = f"{service.base_url}/api/create-clips"
    body = {"video_id": "error500", "clips": [{"start": 1, "end": 2}]}
    for key in ("", "k" * 300):
        async with service.http.post(url, json=body, headers={"Idempotency-Key": key}) as r:
            await _problem(r, 400)


async def test_range_requests_on_a_clip(service: Service, media_server: MediaServer) -> None:
    """GET /api/clips/{file} answers a Range with 206, its Content-Range and exactly those bytes; an unsatisfiable or absurd Range gets 416 problem JSON."""
    async with await service.create(
        {
            "video_url": media_server.url("muxed.mp4"),
            "clips": [{"start": 1, "end": 2, "mode": "fast"}],
        }
    ) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["job_id"]
    doc = await service.wait(job_id)
    assert doc["status"] == "finished", doc
    url = service.base_url + doc["results"][0]["url"]
    path = service.app[SETTINGS].clips_dir / doc["results"][0]["file"]
    data = await asyncio.to_thread(path.read_bytes)
    size = len(data)
    assert size > 1000, size

    async with service.http.get(url) as r:
        assert r.status == 200
        assert r.headers["Accept-Ranges"] == "bytes" and r.headers["ETag"]
        assert await r.read() == data
    satisfiable = [
        ("bytes=10-19", 10, 19),
        ("bytes=0-0", 0, 0),
        ("bytes=-7", size - 7, size - 1),  # the last 7 bytes
        (f"bytes={size - 5}-", size - 5, size - 1),
        (f"bytes=100-{size + 1000}", 100, size - 1),  # an end past the file is clamped
    ]
    for header, first, last in satisfiable:
        async with service.http.get(url, headers={"Range": header}) as r:
            assert r.status == 206, (header, r.status)
            assert r.headers["Content-Type"] == "video/mp4"
            assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", header
            assert await r.read() == data[first : last + 1], header
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=999999999-1",
                   "bytes=20-10", "bytes=abc"):  # fmt: skip
        async with service.http.get(url, headers={"Range": header}) as r:
            problem = await _problem(r, 416)
            assert r.headers["Content-Range"] == f"bytes */{size}", header
            assert str(size) in problem["detail"]
    # A stale If-Range means "send the whole file", even with a Range past its end.
    stale = {"Range": f"bytes={size}-", "If-Range": "Thu, 01 Jan 1970 00:00:00 GMT"}
    async with service.http.get(url, headers=stale) as r:
        assert r.status == 200
        assert await r.read() == data
