"""The one place that turns ``[storage]`` settings into a clip storage.

API nodes, workers and the in-process runner all build their storage here,
so ``storage.kind`` means the same thing wherever it is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from clipservice.config import Settings
from clipservice.s3storage import S3Storage
from clipservice.storage import ClipStorage, SharedFolderStorage


class ManagedClipStorage(ClipStorage, Protocol):
    """A :class:`ClipStorage` that also answers the readiness probe's local check."""

    def writable(self) -> bool:
        """True when the local folder accepts new files (for /readyz)."""
        ...


def make_storage(settings: Settings) -> ManagedClipStorage:
    """The clip storage ``settings.storage.kind`` names, not yet opened.

    Prefer :func:`open_storage`, which also closes what needs closing.
    """
    if settings.storage.kind == "s3":
        return S3Storage(settings.storage, settings.clips_dir)
    return SharedFolderStorage(settings.clips_dir)


@asynccontextmanager
async def open_storage(settings: Settings) -> AsyncIterator[ManagedClipStorage]:
    """The configured storage, opened for the block and closed after it."""
    storage = make_storage(settings)
    await storage.open()
    try:
        yield storage
    finally:
        await storage.close()
