"""Job store: job documents on local disk, written atomically.

Each job lives in ``data_dir/jobs/{job_id}.json``. A write goes to a temporary
file in the same folder, is fsynced, then renamed over the old file, so a
reader (or a restart after ``kill -9``) never sees a torn document. Writes of
one job are serialised by a per-job lock and always write the newest state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Protocol

import aiofiles
import aiofiles.os
import structlog

from clipservice.jobs.models import JOB_ID_PATTERN, Job

log = structlog.get_logger(__name__)

_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
TMP_MARKER = ".tmp-"


class JobStore(Protocol):
    """Where job documents live (local files here; Redis in the distributed mode)."""

    async def save(self, job: Job) -> None: ...
    async def get(self, job_id: str) -> Job | None: ...
    async def delete(self, job_id: str) -> None: ...
    async def all(self) -> list[Job]: ...
    async def by_idempotency_key(self, key: str) -> Job | None: ...


class FileJobStore:
    """Job documents as JSON files, cached in memory for fast reads."""

    def __init__(self, jobs_dir: Path) -> None:
        self.jobs_dir = jobs_dir
        self._cache: dict[str, Job] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._idempotent: dict[str, str] = {}  # Idempotency-Key -> job id
        self._loaded = False

    def _path(self, job_id: str) -> Path:
        if not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"bad job id {job_id!r}")
        return self.jobs_dir / f"{job_id}.json"

    async def open(self) -> None:
        """Create the folder, drop stale temp files and load every job."""
        await aiofiles.os.makedirs(self.jobs_dir, exist_ok=True)
        self._cache = await asyncio.to_thread(self._load_all)
        self._idempotent = {
            job.idempotency_key: job.job_id for job in self._cache.values() if job.idempotency_key
        }
        self._loaded = True

    def _load_all(self) -> dict[str, Job]:
        jobs: dict[str, Job] = {}
        for entry in os.scandir(self.jobs_dir):
            if TMP_MARKER in entry.name:
                # A write that never reached its rename: the old file is intact.
                os.unlink(entry.path)
                continue
            if not entry.name.endswith(".json") or not _JOB_ID_RE.fullmatch(entry.name[:-5]):
                continue
            try:
                with open(entry.path, "rb") as fh:
                    jobs[entry.name[:-5]] = Job.model_validate(json.load(fh))
            except (OSError, ValueError) as exc:
                log.error("job_file_unreadable", path=entry.path, error=str(exc))
        return jobs

    async def save(self, job: Job) -> None:
        path = self._path(job.job_id)
        self._cache[job.job_id] = job
        if job.idempotency_key:
            self._idempotent[job.idempotency_key] = job.job_id
        lock = self._locks.setdefault(job.job_id, asyncio.Lock())
        async with lock:
            latest = self._cache.get(job.job_id)
            if latest is None:  # deleted while we waited
                return
            data = json.dumps(latest.stored(), separators=(",", ":")).encode()
            # Bookkeeping is protected from cancellation: a cancelled caller
            # returns at once, but the write (and the file's close) completes.
            await asyncio.shield(_write_atomic(path, data))

    async def get(self, job_id: str) -> Job | None:
        if not _JOB_ID_RE.fullmatch(job_id):
            return None
        return self._cache.get(job_id)

    async def delete(self, job_id: str) -> None:
        job = self._cache.pop(job_id, None)
        if job is not None and job.idempotency_key:
            self._idempotent.pop(job.idempotency_key, None)
        lock = self._locks.pop(job_id, None) or asyncio.Lock()
        async with lock:
            await _unlink_quiet(self._path(job_id))

    async def all(self) -> list[Job]:
        return list(self._cache.values())

    async def by_idempotency_key(self, key: str) -> Job | None:
        """The live job created with this Idempotency-Key (an index, not a scan)."""
        job_id = self._idempotent.get(key)
        return self._cache.get(job_id) if job_id else None


async def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename: a reader sees the old or the new document."""
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{uuid.uuid4().hex[:8]}")
    try:
        async with aiofiles.open(tmp, "wb") as fh:
            await fh.write(data)
            await fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        await _unlink_quiet(tmp)
        raise


async def _unlink_quiet(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        await aiofiles.os.remove(path)
