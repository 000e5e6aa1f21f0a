"""A job's stream URLs in one process: resolved once, resolved again when they expire.

Stream URLs handed out by a resolver are signed and expire (the server then
answers 403 or 410). :class:`JobStreams` holds the current generation of a
job's URLs with the :class:`~clipservice.media.source.SourceIndex` over them
and the probe of the source; :meth:`JobStreams.run` runs a read of the source
and, when the URLs turn out to have expired, renews them and runs it again,
at most :data:`MAX_SOURCE_REFRESHES` times per job.

Who renews differs by runner: the in-process runner resolves again itself;
a worker of the distributed mode renews through Redis, so one resolve serves
every worker of the job (see :mod:`clipservice.jobs.worker`). Clips of this
process that hit the same expiry share one renewal either way.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from clipservice.domain import JobSource, StreamUrls
from clipservice.errors import ClipFailure, SourceError
from clipservice.media.probe import SourceInfo, probe_source
from clipservice.media.source import SourceIndex
from clipservice.metrics import Metrics
from clipservice.sources.base import Resolver

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Times one job may resolve its source again because its stream URLs expired.
MAX_SOURCE_REFRESHES = 3

_EXPIRED_RE = re.compile(
    r"(?:HTTP error|Server returned|answered) (?:403|410)\b|\b(?:403|410) (?:Forbidden|Gone)\b"
)


def source_expired(message: str) -> bool:
    """Whether an error says a stream URL answered 403 or 410 (signed URLs expire)."""
    return _EXPIRED_RE.search(message) is not None


async def resolve_source(resolver: Resolver, source: JobSource, metrics: Metrics) -> StreamUrls:
    """Resolve a job's source into stream URLs, timed and counted in ``metrics``."""
    t0 = time.monotonic()
    try:
        resolved = await resolver.resolve(source)
    except SourceError as exc:
        metrics.resolve_errors.labels(exc.code).inc()
        raise
    finally:
        metrics.resolve_seconds.observe(time.monotonic() - t0)
    return StreamUrls(resolved.video_url, resolved.audio_url)


@dataclass(frozen=True)
class StreamSet:
    """One generation of a job's stream URLs, with the source index over them."""

    urls: StreamUrls
    index: SourceIndex
    generation: int


# Given the generation that expired, the URLs of a newer one and its number.
Renew = Callable[[int], Awaitable[tuple[StreamUrls, int]]]


class JobStreams:
    """A job's streams in this process, shared by its clips here."""

    def __init__(
        self, urls: StreamUrls, renew: Renew, *, generation: int = 0, allow_private: bool = True
    ) -> None:
        self._allow_private = allow_private
        self.current = self._set(urls, generation)
        self._renew = renew
        self._lock = asyncio.Lock()
        self._retired: list[SourceIndex] = []
        self._probe: asyncio.Future[SourceInfo] | None = None

    def _set(self, urls: StreamUrls, generation: int) -> StreamSet:
        index = SourceIndex(urls.video_url, urls.audio_url, allow_private=self._allow_private)
        return StreamSet(urls, index, generation)

    def adopt(self, urls: StreamUrls, generation: int) -> None:
        """Switch to a newer generation another process renewed (older ones are ignored)."""
        if generation > self.current.generation:
            self._retired.append(self.current.index)
            self.current = self._set(urls, generation)

    async def refresh(self, used: StreamSet) -> StreamSet:
        """A generation newer than ``used``: renewed now, unless a clip already did."""
        async with self._lock:
            if self.current.generation <= used.generation:
                urls, generation = await self._renew(used.generation)
                self.adopt(urls, max(generation, used.generation + 1))
            return self.current

    async def run(self, read: Callable[[StreamSet], Awaitable[T]]) -> T:
        """``read(current)``; when the URLs expired, renew them and read again."""
        while True:
            used = self.current
            try:
                return await read(used)
            except ClipFailure as exc:
                if not source_expired(exc.message) or used.generation >= MAX_SOURCE_REFRESHES:
                    raise
                log.info("source_expired", generation=used.generation, error=exc.message[:300])
                await self.refresh(used)

    async def info(self) -> SourceInfo:
        """The source's probe, read once (through the index) and shared by the job's clips."""
        if self._probe is None or (self._probe.done() and self._probe.exception() is not None):
            self._probe = asyncio.ensure_future(self.run(self._read_info))
            # Retrieved here too: every caller may have been cancelled meanwhile.
            self._probe.add_done_callback(_retrieve)
        return await asyncio.shield(self._probe)

    @staticmethod
    async def _read_info(streams: StreamSet) -> SourceInfo:
        urls = streams.urls
        return await probe_source(urls.video_url, urls.audio_url, streams.index)

    async def aclose(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        for index in (*self._retired, self.current.index):
            await index.aclose()


def _retrieve(future: asyncio.Future[SourceInfo]) -> None:
    if not future.cancelled():
        future.exception()
