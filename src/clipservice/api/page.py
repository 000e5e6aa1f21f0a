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
    # Everything comes from this service; the page never loads anything else (the preview
    # stream and the cover come through the service too). blob: media and images are what
    # the page fetched itself with an API key header (clips, the preview, the storyboard).
    "Content-Security-Policy": (
        "default-src 'self'; media-src 'self' blob:; img-src 'self' data: blob:; "
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
