"""The runner interface: what the API needs from whoever runs the jobs.

Two implementations: :class:`~clipservice.jobs.runner.LocalRunner` (jobs as
tasks of the serving process, the embedded default) and
:class:`~clipservice.jobs.dispatch.DistributedRunner` (jobs queued to
``clipservice worker`` processes over Redis), chosen by ``[queue] url``.
Each also tells its backlog (:class:`~clipservice.jobs.backlog.Backlog`), for
``/metrics`` and for refusing jobs past ``[queue] max_depth``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Protocol

import structlog

from clipservice.jobs.backlog import Backlog
from clipservice.jobs.models import Job

log = structlog.get_logger(__name__)


class Runner(Backlog, Protocol):
    """Runs submitted jobs, cancels and deletes them, and drains on shutdown."""

    on_job_end: list[Callable[[Job], None]]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def drain(self, grace_s: float, abort: asyncio.Event | None = None) -> int:
        """Start no more clips here; give running ones ``grace_s``; clips still running."""
        ...

    async def submit(self, job: Job) -> None:
        """Run a job that is saved as pending."""
        ...

    async def cancel(self, job_id: str) -> bool:
        """Cancel a pending or running job; True if this call cancelled it."""
        ...

    async def delete_ended(self, job: Job) -> None:
        """Delete an ended job and its files now."""
        ...


def announce_end(job: Job, hooks: Iterable[Callable[[Job], None]]) -> None:
    """Log the end of a job (once, by whoever ended it) and tell the ``on_job_end`` hooks."""
    log.info(
        "job_ended",
        job_id=job.job_id,
        status=job.status.value,
        results=len(job.results),
        errors=len(job.errors),
    )
    for hook in hooks:
        try:
            hook(job)
        except Exception:  # a broken hook must not break the job's end
            log.exception("job_end_hook_failed")
