"""``GET /api/openapi.json``: the OpenAPI 3.1 document of the running service.

Schemas are not written by hand: request and response bodies come from the
same pydantic models the handlers use (``model_json_schema``), path parameter
patterns from the same constants the handlers check, and limits that depend
on the configuration (clips per job) from the settings. Only the operations
the app's router really has are listed, so the document never promises a
route that is not there; a route missing from :data:`OPERATIONS` still appears
(as an undocumented operation) and a test fails until it is described.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic.json_schema import models_json_schema

from clipservice import __version__
from clipservice.api.appkeys import SETTINGS
from clipservice.api.page import STATIC_NAME_PATTERN
from clipservice.api.preview_models import SOURCE_KEY_PATTERN, SourcePreview
from clipservice.api.routes import MAX_BODY_BYTES
from clipservice.api.schemas import (
    MAX_URL_LENGTH,
    VIDEO_ID_PATTERN,
    CreateClipsRequest,
    JobCreated,
    ProblemDetail,
)
from clipservice.config import Settings
from clipservice.jobs.models import JOB_ID_PATTERN, Job
from clipservice.jobs.naming import CLIP_FILE_PATTERN

REF = "#/components/schemas/{model}"
PROBLEM_TYPE = "application/problem+json"

_ERROR_TEXT = {
    400: "The body is not strict JSON, or a header is malformed.",
    401: "An API key is required (Authorization: Bearer <key> or X-API-Key).",
    404: "No such job, clip, source preview or route.",
    405: "Method not allowed.",
    408: "The body did not arrive in time.",
    409: "Conflict with the job's state or an earlier request.",
    413: f"The body is larger than {MAX_BODY_BYTES} bytes.",
    415: "Content-Type is not application/json.",
    416: "The Range cannot be satisfied.",
    422: "The request failed validation (every problem in errors), or its source (code).",
    429: "Too many jobs (or previews of new sources); retry after Retry-After seconds.",
    502: "The source (its resolver or stream) failed; code source_unavailable.",
    503: "The service is draining or not ready; for create-clips also code queue_full: "
    "more clips wait to start than [queue] max_depth. Retry after Retry-After seconds.",
    504: "The storyboard was not made in time.",
}


@dataclass(frozen=True)
class Operation:
    """One documented route: what it answers, beyond the shared error responses."""

    operation_id: str
    summary: str
    responses: dict[str, Any]
    errors: tuple[int, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    request_body: dict[str, Any] | None = None
    links: dict[str, dict[str, Any]] = field(default_factory=dict)
    api: bool = True  # under /api: needs a key when keys are configured


def _json(schema_name: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(model=schema_name)}}},
        **extra,
    }


def _path_param(name: str, pattern: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": pattern},
    }


JOB_ID = _path_param("job_id", JOB_ID_PATTERN, "The job's id (from create-clips).")
CLIP_FILE = _path_param("file", CLIP_FILE_PATTERN, "A clip file name from a job's results.")
_JOB_LINKS = {
    "GetJob": {"operationId": "getJob", "parameters": {"job_id": "$response.body#/job_id"}},
    "CheckJob": {"operationId": "checkJob", "parameters": {"job_id": "$response.body#/job_id"}},
    "JobEvents": {"operationId": "jobEvents", "parameters": {"job_id": "$response.body#/job_id"}},
    "DeleteJob": {"operationId": "deleteJob", "parameters": {"job_id": "$response.body#/job_id"}},
}
_LOCATION = {
    "headers": {
        "Location": {"description": "/api/jobs/{job_id}", "schema": {"type": "string"}},
    }
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "string"}}}
SOURCE_KEY = _path_param("key", SOURCE_KEY_PATTERN, "A source's key (from its preview).")


def _query_param(name: str, description: str, **schema: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string", **schema},
    }


_HTTP_URL = {"pattern": "^https?://", "maxLength": MAX_URL_LENGTH}
_SOURCE_QUERY = (
    _query_param("video_id", "A YouTube video id.", pattern=VIDEO_ID_PATTERN),
    _query_param("url", "A page URL the resolver accepts.", **_HTTP_URL),
    _query_param("video_url", "A video (or muxed) stream URL.", **_HTTP_URL),
    _query_param("audio_url", "A separate audio stream URL (with video_url).", **_HTTP_URL),
)
_BINARY = {"type": "string", "format": "binary"}
_KEY_CACHE = {
    "headers": {"Cache-Control": {"description": "private, for the key's life.", "schema": {}}}
}

OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/api/create-clips"): Operation(
        "createClips",
        "Create a job that cuts clips; returns at once.",
        {
            "202": _json("JobCreated", "The job was created.", **_LOCATION),
            "200": _json(
                "JobCreated", "Same Idempotency-Key and body: the earlier job.", **_LOCATION
            ),
        },
        errors=(400, 408, 409, 413, 415, 422, 429, 503),
        parameters=(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "Same key and body within the retention period: the same job.",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            },
        ),
        request_body={
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": REF.format(model="CreateClipsRequest")}}
            },
        },
        links=_JOB_LINKS,
    ),
    ("GET", "/api/check-job/{job_id}"): Operation(
        "checkJob",
        "The job document.",
        {"200": _json("Job", "The job.")},
        errors=(404,),
        parameters=(JOB_ID,),
    ),
    ("GET", "/api/jobs/{job_id}"): Operation(
        "getJob",
        "The job document (alias of check-job).",
        {"200": _json("Job", "The job.")},
        errors=(404,),
        parameters=(JOB_ID,),
    ),
    ("DELETE", "/api/jobs/{job_id}"): Operation(
        "deleteJob",
        "Cancel a pending or running job (200), or delete an ended one with its files (204).",
        {"200": _json("Job", "The job, now cancelled."), "204": {"description": "Deleted."}},
        errors=(404, 409),
        parameters=(JOB_ID,),
    ),
    ("GET", "/api/jobs/{job_id}/events"): Operation(
        "jobEvents",
        "Server-Sent Events: one `job` event with the job document on every change.",
        {
            "200": {
                "description": "An event stream, closed after the terminal state.",
                # OpenAPI 3.1 has no itemSchema; tools (schemathesis among them)
                # read `schema` as the shape of one parsed event.
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "object",
                            "required": ["event", "data"],
                            "properties": {
                                "event": {"const": "job"},
                                "id": {"type": "string"},
                                "retry": {"type": "integer"},
                                "data": {
                                    "type": "string",
                                    "contentMediaType": "application/json",
                                    "contentSchema": {"$ref": REF.format(model="Job")},
                                },
                            },
                        }
                    }
                },
            }
        },
        errors=(404,),
        parameters=(JOB_ID,),
    ),
    ("GET", "/api/clips/{file}"): Operation(
        "getClip",
        "A clip file, with Range requests.",
        {
            "200": {
                "description": "The clip.",
                "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
            },
            "206": {
                "description": "Part of the clip (Range).",
                "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}},
            },
        },
        errors=(404, 416),
        parameters=(CLIP_FILE,),
    ),
    ("GET", "/api/sources/preview"): Operation(
        "sourcePreview",
        "What a source is before any job: title, duration, streams, and the service's "
        "URLs of its storyboard, cover and preview stream. One of video_id, url or video_url.",
        {"200": _json("SourcePreview", "The source's preview.")},
        errors=(422, 429),
        parameters=_SOURCE_QUERY,
    ),
    ("GET", "/api/sources/{key}/storyboard.jpg"): Operation(
        "sourceStoryboardSprite",
        "The storyboard: thumbnails at regular intervals from keyframes, in one JPEG sprite.",
        {
            "200": {
                "description": "The sprite.",
                "content": {"image/jpeg": {"schema": _BINARY}},
                **_KEY_CACHE,
            }
        },
        errors=(404, 422, 502, 504),
        parameters=(SOURCE_KEY,),
    ),
    ("GET", "/api/sources/{key}/storyboard.vtt"): Operation(
        "sourceStoryboardVtt",
        "The storyboard's WebVTT index: a cue a thumbnail, `storyboard.jpg#xywh=x,y,w,h`.",
        {
            "200": {
                "description": "WebVTT.",
                "content": {"text/vtt": {"schema": {"type": "string"}}},
                **_KEY_CACHE,
            }
        },
        errors=(404, 422, 502, 504),
        parameters=(SOURCE_KEY,),
    ),
    ("GET", "/api/sources/{key}/cover"): Operation(
        "sourceCover",
        "The source's poster image, fetched by the service.",
        {
            "200": {
                "description": "The image.",
                "content": {"image/*": {"schema": _BINARY}},
                **_KEY_CACHE,
            }
        },
        errors=(404, 422, 502),
        parameters=(SOURCE_KEY,),
    ),
    ("GET", "/api/sources/{key}/preview"): Operation(
        "sourcePreviewStream",
        "The low-resolution preview stream through the service; Range requests pass through.",
        {
            "200": {
                "description": "The whole stream.",
                "content": {"video/*": {"schema": _BINARY}, "audio/*": {"schema": _BINARY}},
            },
            "206": {
                "description": "Part of the stream (Range).",
                "content": {"video/*": {"schema": _BINARY}, "audio/*": {"schema": _BINARY}},
            },
        },
        errors=(404, 416, 422, 502),
        parameters=(
            SOURCE_KEY,
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "description": "One byte range (bytes=first-[last] or bytes=-suffix).",
                "schema": {"type": "string"},
            },
        ),
    ),
    ("GET", "/api/openapi.json"): Operation(
        "openapi",
        "This document.",
        {
            "200": {
                "description": "OpenAPI 3.1.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
    ),
    ("GET", "/healthz"): Operation(
        "healthz",
        "The process is alive.",
        {
            "200": {
                "description": "Alive.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        api=False,
    ),
    ("GET", "/readyz"): Operation(
        "readyz",
        "Ready to take jobs: storage writable, FFmpeg runnable, queue reachable.",
        {
            "200": {
                "description": "Ready.",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        errors=(503,),
        api=False,
    ),
    ("GET", "/metrics"): Operation(
        "metrics",
        "Prometheus metrics.",
        {
            "200": {
                "description": "Prometheus text format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
        api=False,
    ),
    ("GET", "/"): Operation(
        "webPage",
        "A small web page to submit a job, watch it and play the clips.",
        {"200": {"description": "HTML.", "content": {"text/html": {"schema": {"type": "string"}}}}},
        api=False,
    ),
    ("GET", "/static/{name}"): Operation(
        "webAsset",
        "The web page's script and style sheet.",
        {
            "200": {
                "description": "A static file.",
                "content": {
                    "text/javascript": {"schema": {"type": "string"}},
                    "text/css": {"schema": {"type": "string"}},
                },
            }
        },
        errors=(404,),
        parameters=(_path_param("name", STATIC_NAME_PATTERN, "One of the page's static files."),),
        api=False,
    ),
}


def _problem_response(status: int, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": _ERROR_TEXT.get(status, "Error."),
        "content": {PROBLEM_TYPE: {"schema": {"$ref": REF.format(model="ProblemDetail")}}},
    }
    if headers:
        out["headers"] = headers
    return out


def component_schemas(settings: Settings) -> dict[str, Any]:
    """JSON Schemas of the bodies, from the models the handlers use."""
    _, top = models_json_schema(
        [
            (CreateClipsRequest, "validation"),
            (JobCreated, "serialization"),
            (Job, "serialization"),
            (ProblemDetail, "serialization"),
            (SourcePreview, "serialization"),
        ],
        ref_template=REF,
    )
    schemas: dict[str, Any] = copy.deepcopy(top.get("$defs", {}))
    # Limits that live in the configuration, not the model.
    clips = schemas["CreateClipsRequest"]["properties"]["clips"]
    clips["maxItems"] = settings.jobs.max_clips_per_job
    return schemas


def _operation(op: Operation, keys_configured: bool, present: set[str]) -> dict[str, Any]:
    errors = set(op.errors)
    if op.api and keys_configured:
        errors.add(401)
    responses = dict(op.responses)
    for status in sorted(errors):
        headers = _RETRY_AFTER if status in (429, 503) else None
        if status == 401:
            headers = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[str(status)] = _problem_response(status, headers)
    links = {k: v for k, v in op.links.items() if v["operationId"] in present}
    if links:
        for code in ("200", "202"):
            if code in responses:
                responses[code] = {**responses[code], "links": links}
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "responses": responses,
    }
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.request_body:
        out["requestBody"] = op.request_body
    if op.api and keys_configured:
        out["security"] = [{"bearer": []}, {"apiKey": []}]
    return out


def registered_operations(app: web.Application) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves (HEAD twins of GET left out)."""
    seen: list[tuple[str, str]] = []
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        key = (route.method, route.resource.canonical)
        if key not in seen:
            seen.append(key)
    return seen


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes."""
    settings = app[SETTINGS]
    keys_configured = bool(settings.security.all_keys)
    paths: dict[str, dict[str, Any]] = {}
    ops: list[tuple[str, str, Operation]] = []
    for method, path in registered_operations(app):
        op = OPERATIONS.get((method, path))
        if op is None:
            op = Operation(
                f"undocumented_{method.lower()}_{path}",
                "Undocumented.",
                {"200": {"description": "OK"}},
            )
        ops.append((method, path, op))
    present = {op.operation_id for _, _, op in ops}
    for method, path, op in ops:
        paths.setdefault(path, {})[method.lower()] = _operation(op, keys_configured, present)
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "clipservice",
            "version": __version__,
            "description": "Cuts clips out of online videos. Errors are RFC 9457 problem JSON.",
        },
        "paths": paths,
        "components": {"schemas": component_schemas(settings)},
    }
    if keys_configured:
        doc["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }
    return doc


OPENAPI_DOC = web.AppKey("openapi_doc", dict)
routes = web.RouteTableDef()


async def _build_on_startup(app: web.Application) -> None:
    # The router is complete (frozen) at start-up: build the document once.
    app[OPENAPI_DOC] = build_openapi(app)


def setup_openapi(app: web.Application) -> None:
    """Add ``GET /api/openapi.json`` to ``app``."""
    app.add_routes(routes)
    app.on_startup.append(_build_on_startup)


@routes.get("/api/openapi.json")
async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI_DOC])
