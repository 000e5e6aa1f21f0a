"""HTTP handlers: create jobs, read and cancel them, serve clips, health."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

from clipservice.api.appkeys import RUNNER, SETTINGS, STORAGE, STORE
from clipservice.api.auth import CLIENT_ID, is_admin, job_owner, may_see
from clipservice.api.ops import refuse_if_draining, refuse_if_queue_full
from clipservice.api.schemas import CreateClipsRequest, JobCreated, OutputRequest
from clipservice.domain import OutputOptions
from clipservice.errors import ProblemError
from clipservice.jobs.models import ClipSpec, Job, JobSource, JobStatus, new_job_id
from clipservice.jobs.naming import is_clip_file_name
from clipservice.media.render import check_options
from clipservice.storage import clip_not_found

routes = web.RouteTableDef()

MAX_BODY_BYTES = 64 * 1024
# A body that trickles in slower than this (slow-loris) is cut off with 408.
BODY_READ_TIMEOUT_S = 10.0


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json_body(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity, no duplicate keys; 400 otherwise."""
    try:
        return json.loads(
            body.decode("utf-8"),
            parse_constant=_reject_constant,
            object_pairs_hook=_no_duplicate_keys,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProblemError(400, "Malformed JSON", f"the body is not valid JSON: {exc}") from exc


def job_not_found(job_id: str) -> ProblemError:
    """The one answer for a job the caller cannot see: unknown, expired or another key's."""
    return ProblemError(404, "Job not found", f"no job {job_id!r} (it may have expired)")


def visible_job_or_404(request: web.Request, job: Job | None, job_id: str) -> Job:
    """The job if it exists and the caller may see it; else the unknown job's 404.

    Another key's job answers exactly like a missing one (same status, body and
    work done: the store was read either way), so ids cannot be probed.
    """
    if job is None or not may_see(request, job.owner):
        raise job_not_found(job_id)
    return job


def _job_response(request: web.Request, job: Job, status: int = 200) -> web.Response:
    doc = job.public(request.app[SETTINGS].server.public_url)
    return web.json_response(doc, status=status)


def _request_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@routes.post("/api/create-clips")
async def create_clips(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    store = request.app[STORE]
    refuse_if_draining(request)
    if request.content_type != "application/json":
        raise ProblemError(
            415, "Unsupported Media Type", "send the body as Content-Type: application/json"
        )
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError:
        raise ProblemError(
            408,
            "Request Timeout",
            "the body did not arrive in time",
            headers={"Connection": "close"},
        ) from None
    payload = parse_json_body(raw)
    body = CreateClipsRequest.model_validate(payload, context={"settings": settings})

    idem_key = request.headers.get("Idempotency-Key")
    owner = job_owner(request)
    req_hash = _request_hash(payload)
    if idem_key is not None:
        if not 1 <= len(idem_key) <= 255 or not idem_key.isprintable():
            raise ProblemError(400, "Bad Idempotency-Key", "1 to 255 printable characters")
        # Scoped by key: the same Idempotency-Key from two keys makes two jobs.
        other = await store.by_idempotency_key(idem_key, owner)
        if other is not None:
            if other.request_hash != req_hash:
                raise ProblemError(
                    409,
                    "Idempotency-Key reused",
                    "this Idempotency-Key was used with a different body",
                )
            return _created_response(other, 200)

    default_mode = body.mode or settings.cut.default_mode
    clips = [
        ClipSpec(
            index=i,
            start=c.start,
            end=c.end,
            mode=c.mode or default_mode,
            output=_output(c.output or body.output),
        )
        for i, c in enumerate(body.clips)
    ]
    _check_outputs(body, clips)
    # After the replay above: a retried request for a job already taken still gets it.
    await refuse_if_queue_full(request)
    job = Job(
        job_id=new_job_id(),
        video_id=body.video_id,
        source=JobSource(
            video_id=body.video_id, url=body.url, video_url=body.video_url, audio_url=body.audio_url
        ),
        clips=clips,
        total=len(clips),
        callback_url=body.callback_url,
        merge=body.merge,
        crossfade_s=body.crossfade_s,
        idempotency_key=idem_key,
        request_hash=req_hash,
        owner=owner,
    )
    await store.save(job)
    await request.app[RUNNER].submit(job)
    return _created_response(job, 202)


def _output(request: OutputRequest | None) -> OutputOptions:
    return request.options() if request is not None else OutputOptions()


def _check_outputs(body: CreateClipsRequest, clips: list[ClipSpec]) -> None:
    """422, naming each field, for output options that cannot be made for their clip."""
    errors: list[dict[str, Any]] = []
    for clip, asked in zip(clips, body.clips, strict=True):
        where = ["body", "clips", clip.index, "output"] if asked.output else ["body", "output"]
        for field, message in check_options(clip.output, clip.start, clip.end):
            loc = [*where, *field.split(".")]
            errors.append({"loc": loc, "msg": message, "type": "value_error"})
    if body.merge:
        formats = {c.output.format for c in clips}
        if not formats <= {"mp4"}:
            errors.append(
                {
                    "loc": ["body", "merge"],
                    "msg": "a reel joins video clips: every clip's format must be mp4",
                    "type": "value_error",
                }
            )
    elif body.crossfade_s:
        errors.append(
            {
                "loc": ["body", "crossfade_s"],
                "msg": "crossfade_s needs merge",
                "type": "value_error",
            }
        )
    if errors:
        # The same entry may come from the job's default options for every clip.
        unique = list({(tuple(e["loc"]), e["msg"]): e for e in errors}.values())
        raise ProblemError(422, "Invalid request", "the request failed validation", errors=unique)


def _created_response(job: Job, status: int) -> web.Response:
    created = JobCreated(
        job_id=job.job_id,
        status=job.status.value,
        total=job.total,
        status_url=f"/api/check-job/{job.job_id}",
    )
    return web.json_response(
        created.model_dump(), status=status, headers={"Location": f"/api/jobs/{job.job_id}"}
    )


@routes.get("/api/check-job/{job_id}")
@routes.get("/api/jobs/{job_id}")
async def get_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    job = visible_job_or_404(request, await request.app[STORE].get(job_id), job_id)
    return _job_response(request, job)


@routes.delete("/api/jobs/{job_id}")
async def delete_job(request: web.Request) -> web.StreamResponse:
    job_id = request.match_info["job_id"]
    store = request.app[STORE]
    runner = request.app[RUNNER]
    job = visible_job_or_404(request, await store.get(job_id), job_id)
    if job.status.ended:
        await runner.delete_ended(job)
        return web.Response(status=204)
    await runner.cancel(job_id)
    job = visible_job_or_404(request, await store.get(job_id), job_id)
    if job.status is not JobStatus.CANCELLED:
        raise ProblemError(409, "Job ended", f"the job ended as {job.status.value} meanwhile")
    return _job_response(request, job)


@routes.get("/api/clips/{file}")
async def get_clip(request: web.Request) -> web.StreamResponse:
    name = request.match_info["file"]
    if not is_clip_file_name(name):
        raise ProblemError(404, "Clip not found", "no such clip")
    settings = request.app[SETTINGS]
    if settings.security.all_keys:
        # A clip is readable by the owners of the stored jobs whose results name
        # it (several, through output reuse) and by admins; to anyone else it
        # answers like a missing file. One index lookup, not a scan of jobs.
        store = request.app[STORE]
        caller = request.get(CLIENT_ID)
        if is_admin(request):
            readable = await store.file_used(name)
        else:
            readable = caller is not None and await store.file_owned(name, caller)
        if not readable:
            raise clip_not_found()
    # The storage answers: a file with Range, the object streamed, or a redirect;
    # a missing clip is its 404 and an unsatisfiable range its 416 problem.
    return await request.app[STORAGE].response(name)


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})
