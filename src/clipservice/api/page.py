"""The web page: ``GET /`` and its static assets, shipped inside the package.

Plain HTML, CSS and JavaScript: nothing to build and nothing loaded from
another host, so the page works wherever the service runs.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

from clipservice.errors import ProblemError

routes = web.RouteTableDef()

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
# Only these files are served: a fixed list, never a path taken from the request.
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
STATIC_NAME_PATTERN = "^(" + "|".join(re.escape(n) for n in _ASSETS) + ")$"
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Everything comes from this service; the page never loads anything else. Media may
    # also be the source URL (to read its length) or, with an API key, a clip the page
    # fetched with the key header and plays from a blob: URL.
    "Content-Security-Policy": (
        "default-src 'self'; media-src 'self' blob: http: https:; img-src 'self' data:; "
        "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


@routes.get("/")
async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(
        STATIC_DIR / "index.html",
        headers={**_PAGE_HEADERS, "Content-Type": "text/html; charset=utf-8"},
    )


@routes.get("/static/{name}")
async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    content_type = _ASSETS.get(name)
    if content_type is None:
        raise ProblemError(404, "Not Found", f"no static file {name!r}")
    return web.FileResponse(
        STATIC_DIR / name,
        headers={"Content-Type": content_type, "Cache-Control": "no-cache"},
    )
