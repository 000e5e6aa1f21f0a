"""One clip's work and the job bookkeeping around it, as small shared functions.

The distributed runner calls these from SAQ worker functions; they hold no
state of their own, so the same rules (range check, reuse of a complete
output, what a result records, when a job ends and how) apply whichever
runner cut the clip.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from clipservice.domain import StreamUrls
from clipservice.errors import ClipFailure
from clipservice.jobs.models import ClipResult, ClipSpec
from clipservice.media.cutter import CutSpec, Cutter
from clipservice.media.ffmpeg import ProgressCallback
from clipservice.media.probe import SourceInfo
from clipservice.media.source import SourceIndex
from clipservice.storage import ClipStorage

log = structlog.get_logger(__name__)

# Ranges may end this far past the probed duration (container rounding).
RANGE_SLACK_S = 0.05


def check_range(clip: ClipSpec, info: SourceInfo) -> None:
    """Refuse a clip that ends past the source's end (``invalid_range``)."""
    if clip.end > info.duration_s + RANGE_SLACK_S:
        raise ClipFailure(
            "invalid_range",
            f"clip ends at {clip.end}s but the video lasts {info.duration_s:.3f}s",
        )


async def produce_clip(
    cutter: Cutter,
    storage: ClipStorage,
    clip: ClipSpec,
    src: StreamUrls,
    info: SourceInfo,
    name: str,
    *,
    timeout_s: float,
    on_progress: ProgressCallback | None = None,
    keyframes: SourceIndex | None = None,
    on_written: Callable[[int], None] | None = None,
) -> ClipResult:
    """Cut ``clip`` into ``name`` (or reuse a complete earlier output) and describe it.

    ``on_written`` hears the size of a newly written output (not of a reused one).
    """
    final = storage.staging_path(name)
    if await storage.exists(name):
        log.info("clip_reused", file=name)
        outcome = await cutter.describe_existing(final, clip.start, clip.end, clip.mode)
    else:
        outcome = await cutter.cut(
            CutSpec(
                streams=src,
                info=info,
                start_s=clip.start,
                end_s=clip.end,
                mode=clip.mode,
                final=final,
                timeout_s=timeout_s,
                source=keyframes,
                on_progress=on_progress,
            )
        )
        await storage.publish(name)
        if on_written is not None:
            on_written(outcome.size_bytes)
    return ClipResult(
        index=clip.index,
        start=clip.start,
        end=clip.end,
        mode=clip.mode,
        file=name,
        url=f"/api/clips/{name}",
        size_bytes=outcome.size_bytes,
        duration_s=round(outcome.duration_s, 3),
        actual_start=round(outcome.actual_start, 3),
        actual_end=round(outcome.actual_end, 3),
        note=outcome.note,
    )
