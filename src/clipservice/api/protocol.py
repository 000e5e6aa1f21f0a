"""Problem JSON even for requests aiohttp refuses before any handler runs.

A malformed request line, a bad header, an absurd ``Content-Length`` or raw
non-HTTP bytes are refused by aiohttp's HTTP parser, which answers with its
own plain-text 400 before any middleware sees the request. The contract says
every 4xx/5xx has the RFC 9457 shape, so the service runs on a request
handler whose ``handle_error`` answers problem JSON, through
:class:`ProblemAppRunner` (used wherever the app is served).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

PROBLEM_JSON = "application/problem+json"
_DETAIL_LIMIT = 200


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering its own errors as problem JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own handling first: it logs, and refuses if the response
        # already started (the connection is then broken anyway).
        super().handle_error(request, status, exc, message)
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        if status >= 500:
            detail = "the server could not handle the request"
        else:
            # aiohttp's message names what was malformed; no request bytes
            # beyond a short excerpt are echoed back.
            detail = (message or phrase).splitlines()[0][:_DETAIL_LIMIT]
        body = {"type": "about:blank", "title": phrase, "status": status, "detail": detail}
        response = web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_JSON)
        response.force_close()
        return response


class ProblemServer(web.Server):
    """aiohttp's low-level server, making :class:`ProblemRequestHandler` connections."""

    def __call__(self) -> RequestHandler:
        return ProblemRequestHandler(self, loop=self._loop, **self._kwargs)


class ProblemAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer parser errors as problem JSON."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The same server aiohttp built for the app, with our connection
        # factory: only __call__ differs, so the class can simply be swapped.
        server.__class__ = ProblemServer
        return server


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner every entry point serves the app with."""
    return ProblemAppRunner(app, **kwargs)
