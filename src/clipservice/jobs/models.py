"""The job document: the one model the store writes, the API returns and clients read.

(``JobSource`` and ``ClipSpec`` live in :mod:`clipservice.domain`; they are
re-exported here as parts of the document.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clipservice.domain import ClipSpec, CutMode, JobSource, OutputFormat


def utcnow() -> datetime:
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_job_id() -> str:
    return uuid.uuid4().hex


JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


class JobStatus(StrEnum):
    """Where a job is in its life: pending → processing → finished | failed | cancelled."""

    PENDING = "pending"
    PROCESSING = "processing"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELLED)


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ClipResult(_Model):
    """A clip that was cut: where to fetch it and what it really holds."""

    index: int
    start: float
    end: float
    mode: CutMode
    file: str
    url: str
    size_bytes: int
    duration_s: float
    actual_start: float
    actual_end: float
    note: str | None = Field(
        None, description="Set when the clip was not cut the way its mode asked (a fallback)."
    )
    format: OutputFormat = Field("mp4", description="The file's format (its output options).")
    width: int = Field(0, description="The picture's width (0 for audio).")
    height: int = Field(0, description="The picture's height (0 for audio).")


class ClipError(_Model):
    """A clip that failed, with a stable error code."""

    index: int
    start: float
    end: float
    code: str
    message: str


class JobError(_Model):
    """Why a whole job failed."""

    code: str
    message: str


class WebhookAttempt(_Model):
    """One delivery attempt of the job's webhook."""

    at: datetime
    status: int | None = None
    error: str | None = None


class Reel(_Model):
    """The job's clips joined in order into one file (``merge: true``)."""

    clips: list[int] = Field(default_factory=list, description="Indexes of the clips joined.")
    file: str | None = None
    url: str | None = None
    size_bytes: int = 0
    duration_s: float = 0.0
    error: JobError | None = Field(None, description="Why the reel could not be made.")


class JobDocument(_Model):
    """The job document as it leaves the service: the API's answers, SSE events,
    webhook bodies, and the Python client's model. Contract fields, and the
    documented additions (``source``, ``clips``, ``webhook_attempts``)."""

    job_id: str
    status: JobStatus = JobStatus.PENDING
    video_id: str | None = None
    source: JobSource
    clips: list[ClipSpec]
    total: int
    processed: int = 0
    progress: float = 0.0
    results: list[ClipResult] = Field(default_factory=list)
    errors: list[ClipError] = Field(default_factory=list)
    error: JobError | None = None
    webhook_attempts: list[WebhookAttempt] = Field(default_factory=list)
    reel: Reel | None = Field(None, description="The merged reel, once made (merge: true).")
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    expires_at: datetime | None = None

    def done_indexes(self) -> set[int]:
        return {r.index for r in self.results} | {e.index for e in self.errors}

    def files(self) -> set[str]:
        """Every output file of the job: its clips', and its reel's."""
        files = {r.file for r in self.results}
        if self.reel is not None and self.reel.file:
            files.add(self.reel.file)
        return files


_PUBLIC_FIELDS = frozenset(JobDocument.model_fields)


class Job(JobDocument):
    """The job as the service keeps it (``jobs/{job_id}.json``, Redis): the
    document and what only the service reads — where to deliver the webhook
    (a callback URL may carry the receiver's token), the idempotency key and
    request hash, and whose job it is."""

    callback_url: str | None = None
    # merge: true asks for a reel of the clips, joined with this crossfade.
    merge: bool = False
    crossfade_s: float = 0.0
    idempotency_key: str | None = None
    request_hash: str | None = None
    # A short hash of the API key that created the job (None without keys):
    # the job and its clips are that key's.
    owner: str | None = None

    def stored(self) -> dict[str, Any]:
        """Everything, as the stores write it."""
        return self.model_dump(mode="json")

    def public(self, public_url: str = "") -> dict[str, Any]:
        """The document as the API returns it; clip URLs absolute when ``public_url`` is set."""
        data = self.model_dump(mode="json", include=set(_PUBLIC_FIELDS))
        if public_url:
            base = public_url.rstrip("/")
            for r in data["results"]:
                r["url"] = base + r["url"]
        return data


__all__ = [
    "ClipError",
    "ClipResult",
    "ClipSpec",
    "CutMode",
    "Job",
    "JobDocument",
    "JobError",
    "JobSource",
    "JobStatus",
    "Reel",
    "WebhookAttempt",
    "new_job_id",
    "utcnow",
]
