"""The async Python client of clipservice.

::

    async with ClipClient("http://127.0.0.1:8080") as client:
        job = await client.create_clips(video_id="dQw4w9WgXcQ", clips=[(10, 20)])
        job = await client.wait(job.job_id, on_progress=print)
        paths = await client.download(job, "clips/")

        preview = await client.preview(video_id="dQw4w9WgXcQ")   # title, duration, streams
        sprite, vtt = await client.storyboard(preview), await client.storyboard_vtt(preview)

Jobs come back as :class:`~clipservice.jobs.models.JobDocument`, the model the server
answers with, so client and server never disagree on a field. Every error
answer raises :class:`ClipServiceError` carrying the RFC 9457 problem body.
503 and 429 answers are retried a bounded number of times, honouring
``Retry-After``. Progress comes from the job's Server-Sent Events stream;
when the server has none (404/405), or the stream breaks, the client polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import urljoin

import aiofiles
import aiofiles.os
import aiohttp

from clipservice.api.preview_models import SourcePreview
from clipservice.domain import OutputOptions
from clipservice.jobs.models import JobDocument as Job

__all__ = ["ClipClient", "ClipRange", "ClipServiceError", "SourcePreview"]

# A clip as ``(start, end)`` (seconds or ``[HH:]MM:SS[.fff]``) or as the HTTP body's dict.
ClipRange = tuple[float | str, float | str] | Mapping[str, Any]
ProgressCallback = Callable[[Job], Awaitable[None] | None]

_RETRY_STATUSES = frozenset({429, 503})
_CHUNK_BYTES = 256 * 1024


class ClipServiceError(Exception):
    """An error answer from the service, with its problem JSON.

    ``status`` is the HTTP status (0 when the service could not be reached),
    ``title``/``detail``/``errors``/``code`` come from the RFC 9457 body and
    ``problem`` is that whole body.
    """

    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem: dict[str, Any] = dict(problem)
        self.title: str = str(problem.get("title") or f"HTTP {status}")
        self.detail: str = str(problem.get("detail") or "")
        self.code: str | None = problem.get("code")
        self.errors: list[dict[str, Any]] = list(problem.get("errors") or [])
        text = f"{status} {self.title}"
        if self.detail:
            text += f": {self.detail}"
        for err in self.errors:
            loc = ".".join(str(p) for p in err.get("loc", []))
            text += f"\n  {loc}: {err.get('msg', '')}" if loc else f"\n  {err.get('msg', '')}"
        super().__init__(text)


class _NoEvents(Exception):
    """The server has no usable event stream for this job: poll instead."""


def _retry_after_s(value: str | None, default_s: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date)."""
    if not value:
        return default_s
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default_s
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _clip_body(clip: ClipRange) -> dict[str, Any]:
    if isinstance(clip, Mapping):
        body = dict(clip)
        if "output" in body and body["output"] is not None:
            body["output"] = _output_body(body["output"])
        return body
    start, end = clip
    return {"start": start, "end": end}


def _output_body(output: OutputOptions | Mapping[str, Any]) -> dict[str, Any]:
    """Output options as the request body carries them: the fields given only."""
    if isinstance(output, OutputOptions):
        return output.model_dump(mode="json", exclude_unset=True)
    return dict(output)


class ClipClient:
    """An async client for one clipservice server.

    Use it as an async context manager (it owns an :class:`aiohttp.ClientSession`
    unless one is passed in). ``max_retries`` bounds the retries of a 503/429
    answer and ``max_retry_wait_s`` the wait before each; ``poll_interval_s`` is
    the polling period when there is no event stream.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        max_retry_wait_s: float = 30.0,
        poll_interval_s: float = 0.5,
        use_events: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self.poll_interval_s = poll_interval_s
        self.use_events = use_events
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env off: a proxy from the environment must not see loopback traffic.
            self._session = aiohttp.ClientSession(trust_env=False)
            self._own_session = True
        return self._session

    def _url(self, path: str) -> str:
        return urljoin(self.base_url, path.lstrip("/") if not path.startswith("http") else path)

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": "clipservice-client"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if extra:
            headers.update(extra)
        return headers

    # -- plumbing ---------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        ok: Sequence[int] = (200,),
        params: Mapping[str, str] | None = None,
        raw: bool = False,
    ) -> tuple[int, Any]:
        """One API call with bounded 503/429 retries; returns (status, JSON or None),
        or (status, the body's bytes) with ``raw``."""
        attempt = 0
        while True:
            try:
                async with self.session.request(
                    method,
                    self._url(path),
                    json=json_body,
                    params=params,
                    headers=self._headers(headers),
                    timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                ) as resp:
                    if resp.status in ok:
                        if resp.status == 204:
                            return resp.status, None
                        if raw:
                            return resp.status, await resp.read()
                        return resp.status, await resp.json(content_type=None)
                    if resp.status in _RETRY_STATUSES and attempt < self.max_retries:
                        wait_s = _retry_after_s(resp.headers.get("Retry-After"), 2.0**attempt)
                        attempt += 1
                        await resp.read()
                        await asyncio.sleep(min(wait_s, self.max_retry_wait_s))
                        continue
                    raise await self._error(resp)
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                raise ClipServiceError(
                    0, {"title": "Service unreachable", "detail": f"{method} {path}: {exc!r}"}
                ) from exc

    @staticmethod
    async def _error(resp: aiohttp.ClientResponse) -> ClipServiceError:
        text = await resp.text(errors="replace")
        try:
            problem = json.loads(text)
        except ValueError:
            problem = None
        if not isinstance(problem, dict):
            problem = {"title": resp.reason or f"HTTP {resp.status}", "detail": text[:500]}
        return ClipServiceError(resp.status, problem)

    # -- jobs ---------------------------------------------------------------

    async def create_clips(
        self,
        *,
        clips: Sequence[ClipRange],
        video_id: str | None = None,
        url: str | None = None,
        video_url: str | None = None,
        audio_url: str | None = None,
        mode: str | None = None,
        callback_url: str | None = None,
        idempotency_key: str | None = None,
        output: OutputOptions | Mapping[str, Any] | None = None,
        merge: bool = False,
        crossfade_s: float = 0.0,
    ) -> Job:
        """Submit a job and return its document (status ``pending`` or later).

        Fields are those of ``POST /api/create-clips``; ``idempotency_key``
        goes in the ``Idempotency-Key`` header. ``output`` (an
        :class:`~clipservice.domain.OutputOptions` or a dict of its fields) is
        the default for clips that give none (a clip dict may carry its own
        ``output``); ``merge`` asks for the reel. A 503/429 is retried; the
        retry reuses the key, so it never creates a second job. Without a
        key the client makes one up for the retries of this call.
        """
        body: dict[str, Any] = {"clips": [_clip_body(c) for c in clips]}
        for name, value in (
            ("video_id", video_id),
            ("url", url),
            ("video_url", video_url),
            ("audio_url", audio_url),
            ("mode", mode),
            ("callback_url", callback_url),
        ):
            if value is not None:
                body[name] = value
        if output is not None:
            body["output"] = _output_body(output)
        if merge:
            body["merge"] = True
            if crossfade_s:
                body["crossfade_s"] = crossfade_s
        key = idempotency_key or f"client-{uuid.uuid4().hex}"
        _, created = await self._request(
            "POST",
            "/api/create-clips",
            json_body=body,
            headers={"Idempotency-Key": key},
            ok=(200, 201, 202),
        )
        return await self.get_job(str(created["job_id"]))

    async def get_job(self, job_id: str) -> Job:
        """The job's current document."""
        _, doc = await self._request("GET", f"/api/jobs/{job_id}")
        return Job.model_validate(doc)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a pending or running job; a no-op (returning the job) once it ended."""
        job = await self.get_job(job_id)
        if job.status.ended:
            return job
        try:
            _, doc = await self._request("DELETE", f"/api/jobs/{job_id}", ok=(200,))
        except ClipServiceError as exc:
            if exc.status != 409:  # 409: it ended on its own meanwhile
                raise
            return await self.get_job(job_id)
        return Job.model_validate(doc)

    async def delete(self, job_id: str) -> None:
        """Delete an ended job and its files now (cancels it first if it still runs)."""
        job = await self.cancel(job_id)
        await self._request("DELETE", f"/api/jobs/{job.job_id}", ok=(200, 204))

    # -- source previews ------------------------------------------------------

    async def preview(
        self,
        *,
        video_id: str | None = None,
        url: str | None = None,
        video_url: str | None = None,
        audio_url: str | None = None,
    ) -> SourcePreview:
        """What a source is before any job (``GET /api/sources/preview``): title,
        duration, the streams a job would cut, and the URLs of its storyboard, cover
        and preview stream. One of ``video_id``, ``url`` or ``video_url`` (with an
        optional ``audio_url``), as for :meth:`create_clips`."""
        params = {
            name: value
            for name, value in (
                ("video_id", video_id),
                ("url", url),
                ("video_url", video_url),
                ("audio_url", audio_url),
            )
            if value is not None
        }
        _, doc = await self._request("GET", "/api/sources/preview", params=params)
        return SourcePreview.model_validate(doc)

    async def storyboard(self, preview: SourcePreview) -> bytes:
        """The source's storyboard sprite (JPEG): ``preview.storyboard.count``
        thumbnails ``thumb_width`` pixels wide, ``columns`` to a row. The service
        builds it on the first request (a few seconds for an hour of video)."""
        _, sprite = await self._request("GET", preview.storyboard.sprite_url, raw=True)
        return bytes(sprite)

    async def storyboard_vtt(self, preview: SourcePreview) -> str:
        """The storyboard's WebVTT index: a cue a thumbnail, ``storyboard.jpg#xywh=x,y,w,h``."""
        _, vtt = await self._request("GET", preview.storyboard.vtt_url, raw=True)
        return bytes(vtt).decode("utf-8")

    async def download_storyboard(
        self, preview: SourcePreview, directory: str | os.PathLike[str]
    ) -> tuple[Path, Path]:
        """Write ``storyboard.jpg`` and ``storyboard.vtt`` into ``directory``; their paths.

        The VTT's cues name the sprite by that file name, so the pair works as is.
        """
        folder = Path(directory)
        await aiofiles.os.makedirs(folder, exist_ok=True)
        sprite, vtt = await self.storyboard(preview), await self.storyboard_vtt(preview)
        paths = (folder / "storyboard.jpg", folder / "storyboard.vtt")
        for path, data in zip(paths, (sprite, vtt.encode("utf-8")), strict=True):
            part = path.with_name(f".{path.name}.part-{uuid.uuid4().hex[:8]}")
            try:
                async with aiofiles.open(part, "wb") as fh:
                    await fh.write(data)
                await aiofiles.os.replace(part, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    await aiofiles.os.remove(part)
        return paths

    # -- progress -----------------------------------------------------------

    async def progress(self, job_id: str) -> AsyncIterator[Job]:
        """Yield the job's document on every change, ending after its terminal state.

        Reads ``GET /api/jobs/{id}/events``; if the server has no such stream
        (404/405, another content type) or it breaks before the end, it
        switches to polling ``GET /api/jobs/{id}`` every ``poll_interval_s``.
        """
        last: dict[str, Any] | None = None
        if self.use_events:
            try:
                async for job in self._events(job_id):
                    last = job.model_dump(mode="json")
                    yield job
                    if job.status.ended:
                        return
            except _NoEvents:
                pass
        while True:
            job = await self.get_job(job_id)
            doc = job.model_dump(mode="json")
            if doc != last:
                last = doc
                yield job
            if job.status.ended:
                return
            await asyncio.sleep(self.poll_interval_s)

    async def _events(self, job_id: str) -> AsyncIterator[Job]:
        try:
            async with self.session.get(
                self._url(f"/api/jobs/{job_id}/events"),
                headers=self._headers({"Accept": "text/event-stream"}),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s),
            ) as resp:
                if resp.status in (404, 405) or (
                    resp.status == 200 and resp.content_type != "text/event-stream"
                ):
                    # No such route here (or the job is gone: polling then says which).
                    await resp.read()
                    raise _NoEvents
                if resp.status != 200:
                    raise await self._error(resp)
                event, data = "message", list[str]()
                async for raw in resp.content:
                    line = raw.decode("utf-8").rstrip("\r\n")
                    if line == "":
                        if data and event == "job":
                            yield Job.model_validate_json("\n".join(data))
                        event, data = "message", list[str]()
                    elif line.startswith(":"):
                        continue  # a comment: keep-alive
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "event":
                            event = value
                        elif name == "data":
                            data.append(value)
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError, ValueError) as exc:
            raise _NoEvents from exc
        # The stream ended; if it was before the terminal state, the caller polls.
        raise _NoEvents

    async def wait(
        self,
        job_id: str,
        on_progress: ProgressCallback | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Job:
        """Wait until the job ends and return its final document.

        ``on_progress`` (plain or async) gets each new document on the way.
        """
        job: Job | None = None
        async with asyncio.timeout(timeout_s):
            async for job in self.progress(job_id):
                if on_progress is not None:
                    result = on_progress(job)
                    if inspect.isawaitable(result):
                        await result
        assert job is not None and job.status.ended
        return job

    # -- files ----------------------------------------------------------------

    async def download(self, job: Job, directory: str | os.PathLike[str]) -> list[Path]:
        """Download every clip of ``job`` into ``directory``, and its reel if it has
        one (last); the local paths, in clip order.

        Each file is streamed to a temporary name beside its target and
        renamed when complete, so a path returned is always a whole clip.
        """
        folder = Path(directory)
        await aiofiles.os.makedirs(folder, exist_ok=True)
        paths = []
        files = [(r.file, r.url) for r in sorted(job.results, key=lambda r: r.index)]
        if job.reel is not None and job.reel.file and job.reel.url:
            files.append((job.reel.file, job.reel.url))
        for name, url in files:
            target = folder / Path(name).name
            await self._download_one(url, target)
            paths.append(target)
        return paths

    async def _download_one(self, url: str, target: Path) -> None:
        part = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        try:
            async with self.session.get(
                self._url(url),
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self.timeout_s),
            ) as resp:
                if resp.status != 200:
                    raise await self._error(resp)
                async with aiofiles.open(part, "wb") as fh:
                    async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
                        await fh.write(chunk)
            await aiofiles.os.replace(part, target)
        except aiohttp.ClientError as exc:
            raise ClipServiceError(
                0, {"title": "Download failed", "detail": f"{url}: {exc!r}"}
            ) from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(part)
