"""Requests aiohttp's HTTP parser refuses before any handler runs get problem JSON too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from clipservice.api.protocol import make_runner
from clipservice.app import create_app
from tests.conftest import settings_for

MALFORMED = [
    b"GET /healthz HTTP/1.1 extra\r\nHost: x\r\n\r\n",
    b"GE\x01T /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /he\xffalthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
    b"POST /api/create-clips HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /api/create-clips HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    b"GET " + b"/x" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[int]:
    runner = make_runner(create_app(settings_for(tmp_path / "data")), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await runner.cleanup()


async def _raw(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


@pytest.mark.parametrize("data", MALFORMED)
async def test_malformed_requests_get_problem_json(server: int, data: bytes) -> None:
    """Each request the parser refuses gets a 4xx RFC 9457 body, not aiohttp's plain text."""
    status, headers, body = await _raw(server, data)
    assert 400 <= status < 500, (status, body[:200])
    assert headers["content-type"].startswith("application/problem+json"), headers
    problem = json.loads(body)
    assert problem["status"] == status and problem["title"] and isinstance(problem["detail"], str)
    assert "Traceback" not in body.decode("utf-8", "replace")


async def test_the_server_still_answers_afterwards(server: int) -> None:
    """After a burst of malformed requests, a good one is answered normally."""
    for data in MALFORMED:
        await _raw(server, data)
    status, _, body = await _raw(
        server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and json.loads(body)["status"] == "ok"
