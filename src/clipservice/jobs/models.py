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

from clipservice.domain import ClipSpec, CutMode, JobSource


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


class Job(_Model):
    """The job document, as stored in ``jobs/{job_id}.json`` and served by the API."""

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
    callback_url: str | None = None
    webhook_attempts: list[WebhookAttempt] = Field(default_factory=list)
    idempotency_key: str | None = Field(None, exclude=True)
    request_hash: str | None = Field(None, exclude=True)
    client_id: str | None = Field(None, exclude=True)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    expires_at: datetime | None = None

    def done_indexes(self) -> set[int]:
        return {r.index for r in self.results} | {e.index for e in self.errors}

    def files(self) -> set[str]:
        return {r.file for r in self.results}

    def stored(self) -> dict[str, Any]:
        """Everything, including the fields the API does not show."""
        data = self.model_dump(mode="json")
        data["idempotency_key"] = self.idempotency_key
        data["request_hash"] = self.request_hash
        data["client_id"] = self.client_id
        return data

    def public(self, public_url: str = "") -> dict[str, Any]:
        """The document as the API returns it; clip URLs absolute when ``public_url`` is set."""
        data = self.model_dump(mode="json")
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
    "JobError",
    "JobSource",
    "JobStatus",
    "WebhookAttempt",
    "new_job_id",
    "utcnow",
]
