"""One middleware renders every error as RFC 9457 problem JSON.

Ours (:class:`ProblemError`), aiohttp's own (404 route, 405, 413, …),
pydantic's validation errors, a full disk (507 ``storage_full``: nothing could
be saved) and anything unexpected (500, logged, with no traceback in the body)
all leave with ``application/problem+json``.
"""

from __future__ import annotations

import errno
import json
from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from clipservice.errors import ProblemError

log = structlog.get_logger(__name__)

PROBLEM_CONTENT_TYPE = "application/problem+json"
# What a client is told to wait before trying again while the disk is full.
STORAGE_FULL_RETRY_AFTER_S = 30
QUEUE_UNAVAILABLE_RETRY_AFTER_S = 5


def problem_response(
    status: int,
    title: str | None = None,
    detail: str = "",
    *,
    code: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title or phrase,
        "status": status,
        "detail": detail,
    }
    if code:
        body["code"] = code
    if errors is not None:
        body["errors"] = errors
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """pydantic errors as ``[{"loc": [...], "msg": "..."}]`` (no input echoed back)."""
    out = []
    for e in exc.errors(include_url=False, include_input=False, include_context=False):
        out.append({"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]})
    return out


@web.middleware
async def problem_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except ProblemError as exc:
        return problem_response(
            exc.status,
            exc.title,
            exc.detail,
            code=exc.code,
            errors=exc.errors,
            headers=exc.headers,
        )
    except ValidationError as exc:
        return problem_response(
            422, "Invalid request", "the request failed validation", errors=validation_errors(exc)
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        detail = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else ""
        return problem_response(exc.status, exc.reason, detail or "", headers=headers)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            log.exception("unhandled_error", path=request.path, method=request.method)
            return problem_response(500, "Internal Server Error", "an unexpected error occurred")
        log.error("storage_full", path=request.path, method=request.method, error=str(exc))
        return problem_response(
            507,
            "Insufficient Storage",
            "the service's storage is full: nothing was saved; try again later",
            code="storage_full",
            headers={"Retry-After": str(STORAGE_FULL_RETRY_AFTER_S)},
        )
    except (RedisConnectionError, RedisTimeoutError) as exc:
        # The job state's Redis is away (the distributed mode): the request
        # changed nothing; another node, or this one shortly, can take it.
        log.error("queue_unavailable", path=request.path, method=request.method, error=str(exc))
        return problem_response(
            503,
            "Service Unavailable",
            "the job store (Redis) does not answer: nothing was changed; try again later",
            code="queue_unavailable",
            headers={"Retry-After": str(QUEUE_UNAVAILABLE_RETRY_AFTER_S)},
        )
    except Exception:
        log.exception("unhandled_error", path=request.path, method=request.method)
        return problem_response(500, "Internal Server Error", "an unexpected error occurred")
    return response
