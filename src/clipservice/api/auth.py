"""API keys: with ``security.api_keys`` (or ``admin_keys``) set, every ``/api`` route needs one.

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and is
compared in constant time against every configured key (no early exit, so
timing tells nothing about which key or how much of it matched). Health,
readiness, metrics and the web page stay open. Keys are never logged nor
stored: the request carries only a short hash of the key (``client_id``),
which the rate limiter counts by and which a new job records as its owner.

Ownership: with keys configured a job and its clips are the key's that
created it. :func:`may_see` says whether the caller may see a job of a given
owner (its own, or any with an admin key); routes answer every other job
exactly as an unknown one.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiohttp import web

from clipservice.api.appkeys import SETTINGS
from clipservice.errors import ProblemError

# Everything under /api needs a key; nothing else does (/, /healthz, /readyz, /metrics).
PROTECTED_PREFIX = "/api/"
CLIENT_ID = web.RequestKey("client_id", str)
# Set by the middleware: whether the caller's key is one of security.admin_keys.
IS_ADMIN = web.RequestKey("is_admin", bool)

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="clipservice"'}


def presented_key(request: web.Request) -> str | None:
    """The key the client sent, from ``Authorization: Bearer`` or ``X-API-Key``."""
    auth = request.headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = request.headers.get("X-API-Key")
    return key.strip() if key and key.strip() else None


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every configured key."""
    given = presented.encode("utf-8", "surrogateescape")
    matches = [hmac.compare_digest(given, k.encode("utf-8")) for k in keys]
    return any(matches)


def key_id(key: str) -> str:
    """A short, non-reversible name for a key (what the rate limiter counts by)."""
    return "key:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


def client_id(request: web.Request) -> str:
    """Who is calling: the key's hash when authenticated, else the client address."""
    if CLIENT_ID in request:
        return request[CLIENT_ID]
    return f"addr:{request.remote or 'unknown'}"


def job_owner(request: web.Request) -> str | None:
    """The owner a new job records: the caller's key hash, or None without keys."""
    if not request.app[SETTINGS].security.all_keys:
        return None
    return request.get(CLIENT_ID)


def is_admin(request: web.Request) -> bool:
    """Whether the caller authenticated with one of ``security.admin_keys``."""
    return bool(request.get(IS_ADMIN, False))


def may_see(request: web.Request, owner: str | None) -> bool:
    """Whether the caller may see (read, stream, delete) a job owned by ``owner``.

    Without keys everyone may; with keys the owner and the admin keys may. A
    job created before keys were configured (owner None) is then the admins'.
    """
    if not request.app[SETTINGS].security.all_keys:
        return True
    if is_admin(request):
        return True
    caller = request.get(CLIENT_ID)
    return caller is not None and owner == caller


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    security = request.app[SETTINGS].security
    keys = security.all_keys
    if keys and request.path.startswith(PROTECTED_PREFIX):
        presented = presented_key(request)
        if presented is None:
            raise ProblemError(
                401,
                "Unauthorized",
                "send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                headers=_CHALLENGE,
            )
        if not key_matches(presented, keys):
            raise ProblemError(
                401,
                "Unauthorized",
                "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="clipservice", error="invalid_token"'},
            )
        request[CLIENT_ID] = key_id(presented)
        # Checked against every admin key too (constant time, no early exit).
        request[IS_ADMIN] = bool(security.admin_keys) and key_matches(
            presented, security.admin_keys
        )
    response: web.StreamResponse = await handler(request)
    return response
