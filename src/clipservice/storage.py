"""Output storage: where finished clip files live and how every node reaches them.

The cutter always writes into a local folder (FFmpeg needs a file path). A
storage decides what happens next: the shared-folder storage here keeps the
file where the cutter renamed it, on a volume every node mounts at
``storage.data_dir``; :class:`~clipservice.s3storage.S3Storage` uploads it in
:meth:`~ClipStorage.publish`. The runners reach their storage only through
:class:`ClipStorage` (the clip attempt and retention).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Protocol

import aiofiles.os
from aiohttp import web

from clipservice.domain import content_type
from clipservice.media.cutter import PART_MARKER, remove_stale_parts


def _remove_old_parts(clips_dir: Path, older_than_s: float) -> int:
    removed = 0
    cutoff = time.time() - older_than_s
    for entry in os.scandir(clips_dir):
        if PART_MARKER not in entry.name:
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
    return removed


class ClipStorage(Protocol):
    """Where clip outputs are kept; every method takes a checked clip file name."""

    async def open(self) -> None:
        """Get ready to store clips (create the folder)."""
        ...

    async def remove_stale_parts(self, older_than_s: float | None = None) -> int:
        """Drop temporary outputs of crashed cuts (all, or those older than ``older_than_s``)."""
        ...

    def staging_path(self, name: str) -> Path:
        """The local path the cutter writes the final, validated file to."""
        ...

    async def exists(self, name: str) -> bool:
        """True when a complete output of that name is stored (and may be reused)."""
        ...

    async def publish(self, name: str) -> None:
        """Make the validated file at :meth:`staging_path` readable by every node."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove the stored output; True if something was removed."""
        ...

    async def response(self, name: str) -> web.StreamResponse:
        """The HTTP answer serving the clip (a file with Range, or a redirect)."""
        ...


class SharedFolderStorage:
    """Clips in ``data_dir/clips`` on a local disk or a volume shared by all nodes.

    Files land at their final name only by an atomic rename after validation
    (see :class:`~clipservice.media.cutter.Cutter`), so a reader on any node
    never sees a partial clip.
    """

    def __init__(self, clips_dir: Path) -> None:
        self.clips_dir = clips_dir

    async def open(self) -> None:
        await aiofiles.os.makedirs(self.clips_dir, exist_ok=True)

    async def remove_stale_parts(self, older_than_s: float | None = None) -> int:
        """Drop temporary outputs of crashed cuts.

        With no age, every one (only safe while no cut runs anywhere); with an
        age, only those untouched that long, which no live cut can own.
        """
        if older_than_s is None:
            return await asyncio.to_thread(remove_stale_parts, self.clips_dir)
        return await asyncio.to_thread(_remove_old_parts, self.clips_dir, older_than_s)

    def staging_path(self, name: str) -> Path:
        return self.clips_dir / name

    async def exists(self, name: str) -> bool:
        return await aiofiles.os.path.isfile(self.clips_dir / name)

    async def publish(self, name: str) -> None:
        # Already visible: the cutter renamed it into the shared folder.
        return None

    async def delete(self, name: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self.clips_dir / name)
            return True
        return False

    async def response(self, name: str) -> web.StreamResponse:
        return web.FileResponse(self.clips_dir / name, headers={"Content-Type": content_type(name)})

    def writable(self) -> bool:
        """True when the folder accepts new files (for /readyz)."""
        return os.access(self.clips_dir, os.W_OK)
