"""Output storage: where finished clip files live and how every node reaches them.

The cutter always writes into a local folder (FFmpeg needs a file path). A
storage decides what happens next: the shared-folder storage here keeps the
file where the cutter renamed it, on a volume every node mounts at
``storage.data_dir``; :class:`~clipservice.s3storage.S3Storage` uploads it in
:meth:`~ClipStorage.publish`. Everything else reaches clips only through
:class:`ClipStorage`: the clip attempt (reuse, publish), the reel (local
copies of its clips), retention (delete) and ``GET /api/clips/{file}``
(:meth:`~ClipStorage.response`). Build one with
:func:`clipservice.storage_factory.open_storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Protocol

import aiofiles.os
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from clipservice.api.problems import PROBLEM_CONTENT_TYPE, problem_response
from clipservice.domain import content_type
from clipservice.errors import ProblemError
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


def clip_not_found() -> ProblemError:
    """The one answer for a clip that is not there (never made, expired, or not yours)."""
    return ProblemError(404, "Clip not found", "no such clip (it may have expired)")


def range_unsatisfiable(request: web.BaseRequest, size_bytes: int, mtime_s: float) -> bool:
    """Whether ``FileResponse`` would answer 416, decided first so the 416 is problem JSON.

    It mirrors aiohttp's own rules: a stale ``If-Range`` means the whole file
    (200), a Range header aiohttp cannot parse (malformed, several ranges, start
    after end) or one starting at or past the end is unsatisfiable, a suffix
    range (``bytes=-N``) never is (but on an empty file).
    """
    if "Range" not in request.headers:
        return False
    if_range = request.if_range
    if if_range is not None and mtime_s > if_range.timestamp():
        return False
    try:
        rng = request.http_range
    except ValueError:
        return True
    start: int | None = rng.start
    if start is None:
        return False
    if start < 0 and rng.stop is None:
        return size_bytes == 0
    return start >= size_bytes


class ClipFileResponse(web.FileResponse):
    """A clip file with Range, whose unsatisfiable ranges get a 416 problem JSON body.

    aiohttp's ``FileResponse`` answers those with an empty 416; the decision is
    made here first, when the response is prepared (after the handler returned,
    too late for the problem middleware), in the canonical problem shape.
    """

    def __init__(self, path: Path, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self._clip_path = path

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        try:
            st = await aiofiles.os.stat(self._clip_path)
        except OSError:
            return await super().prepare(request)  # gone meanwhile: aiohttp's 404
        if not range_unsatisfiable(request, st.st_size, st.st_mtime):
            return await super().prepare(request)
        problem = problem_response(
            416,
            "Range Not Satisfiable",
            f"the clip has {st.st_size} bytes; ask for a single range within them",
            headers={"Content-Range": f"bytes */{st.st_size}"},
        )
        body = problem.body
        assert isinstance(body, bytes)
        self.headers.update(problem.headers)
        self.set_status(416)
        self.content_type = PROBLEM_CONTENT_TYPE
        self.content_length = len(body)
        # StreamResponse's prepare: FileResponse's would send the file.
        writer = await web.StreamResponse.prepare(self, request)
        if request.method != "HEAD":
            await self.write(body)
        return writer


class ClipStorage(Protocol):
    """Where clip outputs are kept; every method takes a checked clip file name."""

    async def open(self) -> None:
        """Get ready to store clips (create the folder)."""
        ...

    async def close(self) -> None:
        """Let go of what :meth:`open` took (a client and its connections)."""
        ...

    async def check(self) -> str | None:
        """Why stored clips cannot be reached right now, or None (for /readyz)."""
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

    async def metadata(self, name: str) -> Mapping[str, str] | None:
        """What :meth:`publish` stored with the output (maybe nothing), or None when
        there is no such output."""
        ...

    async def publish(self, name: str, metadata: Mapping[str, str] | None = None) -> None:
        """Make the validated file at :meth:`staging_path` readable by every node.

        ``metadata`` (short ASCII strings) is kept with the output where the
        storage can (an object's user metadata) and given back by :meth:`metadata`.
        """
        ...

    def local_file(self, name: str) -> AbstractAsyncContextManager[Path]:
        """A local path holding the stored output for the block (a download, if need be)."""
        ...

    async def delete(self, name: str) -> bool:
        """Remove the stored output; True if something was removed."""
        ...

    async def response(self, name: str) -> web.StreamResponse:
        """The HTTP answer serving the clip (a file with Range, or a redirect).

        A missing clip raises the 404 :class:`~clipservice.errors.ProblemError`;
        an unsatisfiable Range is answered with a 416 problem, never a bare 416.
        """
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

    async def close(self) -> None:
        return None

    async def check(self) -> str | None:
        # The folder's writability is the readiness probe's own "storage" check.
        return None

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

    async def metadata(self, name: str) -> Mapping[str, str] | None:
        # A file keeps no metadata: a reuse describes the file itself.
        return {} if await self.exists(name) else None

    async def publish(self, name: str, metadata: Mapping[str, str] | None = None) -> None:
        # Already visible: the cutter renamed it into the shared folder.
        return None

    @asynccontextmanager
    async def local_file(self, name: str) -> AsyncIterator[Path]:
        yield self.clips_dir / name

    async def delete(self, name: str) -> bool:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(self.clips_dir / name)
            return True
        return False

    async def response(self, name: str) -> web.StreamResponse:
        path = self.clips_dir / name
        try:
            st = await aiofiles.os.stat(path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            raise clip_not_found()
        return ClipFileResponse(path, headers={"Content-Type": content_type(name)})

    def writable(self) -> bool:
        """True when the folder accepts new files (for /readyz)."""
        return os.access(self.clips_dir, os.W_OK)
