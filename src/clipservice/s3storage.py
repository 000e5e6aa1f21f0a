"""Clip outputs in an S3-compatible bucket (AWS S3, MinIO, R2, GCS interop…).

With this storage, API nodes and workers share nothing but Redis and the
bucket. The cutter still writes into a local staging folder (FFmpeg needs a
file path); :meth:`S3Storage.publish` uploads the validated file, in parts
read from disk one at a time when it is big, then removes the local copy.
Downloads are streamed through the API node with Range support, or answered
by a redirect to a short-lived presigned URL.

Client: aiobotocore. It is botocore (the engine of boto3) driven by aiohttp,
kept by aio-libs beside aiohttp itself, so it brings the standard credential
chain (environment, shared config and profiles, SSO, container and instance
roles), SigV4 presigning, retries and custom endpoints without a second HTTP
stack; the types-aiobotocore stubs type it for ``mypy --strict``. aioboto3
only adds boto3's resource layer and transfer manager on top of it, which
would hide the part loop this module keeps explicit (one part in memory,
abort on failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiofiles
import aiofiles.os
import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from botocore.exceptions import BotoCoreError, ClientError

from clipservice.api.problems import PROBLEM_CONTENT_TYPE, problem_response
from clipservice.config import StorageSettings
from clipservice.domain import content_type
from clipservice.errors import ClipFailure, ProblemError
from clipservice.media.cutter import part_path
from clipservice.storage import SharedFolderStorage

if TYPE_CHECKING:
    from aiofiles.threadpool.binary import AsyncBufferedReader
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = structlog.get_logger(__name__)

# Bytes handed to the client per write while streaming a download.
STREAM_CHUNK_BYTES = 256 * 1024


_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_CREDENTIAL_CODES = frozenset(
    {"403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken"}
)


class StorageError(ClipFailure):
    """The object store refused a request or could not be reached.

    The message names the operation, the key and the store's error code, never
    a credential; as a :class:`ClipFailure` a failed upload fails the clip with
    the stable code ``storage_unavailable`` instead of an internal error.
    """

    def __init__(self, operation: str, key: str, reason: str) -> None:
        super().__init__("storage_unavailable", f"S3 {operation} of {key!r} failed: {reason}")
        self.operation = operation
        self.key = key
        self.reason = reason


def _error_code(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    return str(error.get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))


def _is_missing(exc: ClientError) -> bool:
    return _error_code(exc) in _MISSING_CODES


def _reason(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = _error_code(exc)
        message = error.get("Message") or ""
        if code in _CREDENTIAL_CODES:
            message = (message + " " if message else "") + "(check the credentials and policy)"
        return f"{code} {message}".strip()
    # BotoCoreError: no credentials, endpoint unreachable, timeouts; its text
    # names the endpoint or the missing piece, not a secret.
    return f"{type(exc).__name__}: {exc}"


async def _read_part(fh: AsyncBufferedReader, size_bytes: int) -> bytes:
    """One part of an upload, read from disk (a seam the tests spy on)."""
    return await fh.read(size_bytes)


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a HEAD request tells about a stored output."""

    size_bytes: int
    etag: str
    last_modified: datetime
    # User metadata given to publish (x-amz-meta-*), e.g. the cut's outcome for reuse.
    metadata: Mapping[str, str] = field(default_factory=dict)


class S3Storage:
    """Clips as objects ``s3://bucket/prefix/name``; a :class:`ClipStorage`.

    Call :meth:`open` before use and :meth:`close` at the end (both belong in
    one ``cleanup_ctx`` entry): they hold the client and its connection pool.
    """

    def __init__(self, settings: StorageSettings, staging_dir: Path) -> None:
        if not settings.bucket:
            raise ValueError("S3Storage needs storage.bucket")
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        # The local part (staging folder, crashed cuts' leftovers) is exactly
        # what the shared-folder storage does with its folder.
        self._local = SharedFolderStorage(staging_dir)
        self._stack: AsyncExitStack | None = None
        self._client: S3Client | None = None
        self._presigner: S3Client | None = None

    # -- life cycle ------------------------------------------------------------

    async def open(self) -> None:
        """Create the staging folder and the S3 client (no request is sent yet)."""
        await self._local.open()
        if self._stack is not None:
            return
        s = self.settings
        config = AioConfig(
            connect_timeout=s.request_timeout_s,
            read_timeout=s.request_timeout_s,
            retries={"max_attempts": s.max_attempts, "mode": "standard"},
            s3={"addressing_style": s.addressing_style},
            # botocore would presign with the legacy SigV2 for some endpoints; SigV4 is
            # what every region and compatible store accepts (and what bounds expiry).
            signature_version="s3v4",
            # botocore >= 1.36 adds CRC checksums (aws-chunked bodies) to every upload by
            # default, which MinIO, R2 and GCS interop have refused in some versions;
            # checksums only where S3 requires them keeps every compatible store working.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = get_session()
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=s.endpoint_url or None,
                    region_name=s.region or None,
                    config=config,
                )
            )
            self._presigner = self._client
            if s.public_endpoint_url and s.public_endpoint_url != s.endpoint_url:
                # Signing is local computation, but the host is part of the signature:
                # links for clients must be signed for the address they will use.
                self._presigner = await stack.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=s.public_endpoint_url,
                        region_name=s.region or None,
                        config=config,
                    )
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack

    async def close(self) -> None:
        """Close the client and its connections."""
        stack, self._stack = self._stack, None
        self._client = self._presigner = None
        if stack is not None:
            await stack.aclose()

    @property
    def client(self) -> S3Client:
        if self._client is None:
            raise RuntimeError("S3Storage used before open()")
        return self._client

    def writable(self) -> bool:
        """True when the local staging folder accepts new files (for /readyz)."""
        return self._local.writable()

    async def check(self) -> str | None:
        """Why the bucket cannot be used right now, or None when it can (for /readyz)."""
        try:
            await self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            return f"bucket {self.bucket!r}: {_reason(exc)}"
        return None

    async def remove_stale_parts(self, older_than_s: float | None = None) -> int:
        """Drop temporary outputs of crashed cuts from the staging folder."""
        return await self._local.remove_stale_parts(older_than_s)

    # -- the ClipStorage protocol ---------------------------------------------

    def key(self, name: str) -> str:
        """The object key of an output."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def staging_path(self, name: str) -> Path:
        return self._local.staging_path(name)

    async def exists(self, name: str) -> bool:
        return await self.head(name) is not None

    async def metadata(self, name: str) -> Mapping[str, str] | None:
        """The user metadata :meth:`publish` stored with the object; None when it is missing."""
        info = await self.head(name)
        return None if info is None else info.metadata

    @asynccontextmanager
    async def local_file(self, name: str) -> AsyncIterator[Path]:
        """Download the object into the staging folder for the block, then remove it.

        Streamed to disk a chunk at a time (a reel's clips may be big), under a
        temporary name that the stale-part sweep removes if the process dies.
        """
        key = self.key(name)
        path = part_path(self.staging_path(name))
        try:
            try:
                obj = await self.client.get_object(Bucket=self.bucket, Key=key)
                async with obj["Body"] as body, aiofiles.open(path, "wb") as fh:
                    async for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                        await fh.write(chunk)
            except (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError) as exc:
                raise StorageError("download", key, _reason(exc)) from exc
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                await aiofiles.os.remove(path)

    async def head(self, name: str) -> ObjectInfo | None:
        """Size, ETag and date of the stored output, or None when there is none."""
        key = self.key(name)
        try:
            head = await self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            raise StorageError("HEAD", key, _reason(exc)) from exc
        except BotoCoreError as exc:
            raise StorageError("HEAD", key, _reason(exc)) from exc
        # botocore's dates carry dateutil's UTC; HTTP dates need the standard library's.
        return ObjectInfo(
            head["ContentLength"],
            head["ETag"],
            head["LastModified"].astimezone(UTC),
            head.get("Metadata", {}),
        )

    async def publish(self, name: str, metadata: Mapping[str, str] | None = None) -> None:
        """Upload the validated file at :meth:`staging_path`, then remove the local copy.

        Below ``multipart_threshold_bytes`` one PUT; from there a multipart upload
        whose parts are read from disk one at a time, so memory stays at one part
        whatever the clip's size. A failed or cancelled multipart upload is aborted
        so the store keeps no orphan parts. ``metadata`` (short ASCII strings) is
        stored with the object and comes back in :meth:`head`: a reused output can
        be described without downloading it.
        """
        meta = dict(metadata or {})
        path = self.staging_path(name)
        key = self.key(name)
        size_bytes = (await aiofiles.os.stat(path)).st_size
        started = time.perf_counter()
        try:
            if size_bytes < self.settings.multipart_threshold_bytes:
                async with aiofiles.open(path, "rb") as fh:
                    body = await _read_part(fh, size_bytes)
                await self.client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType=content_type(name),
                    Metadata=meta,
                )
            else:
                await self._multipart_upload(path, key, content_type(name), meta)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError("upload", key, _reason(exc)) from exc
        upload_s = time.perf_counter() - started
        await aiofiles.os.remove(path)
        # upload_s: what storing in a bucket adds to each output (bench_workers sums it).
        log.info(
            "clip_uploaded",
            file=name,
            bucket=self.bucket,
            key=key,
            size_bytes=size_bytes,
            upload_s=round(upload_s, 4),
        )

    async def _multipart_upload(
        self, path: Path, key: str, content_type: str, metadata: dict[str, str]
    ) -> None:
        created = await self.client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type, Metadata=metadata
        )
        upload_id = created["UploadId"]
        try:
            parts: list[CompletedPartTypeDef] = []
            async with aiofiles.open(path, "rb") as fh:
                while chunk := await _read_part(fh, self.settings.part_size_bytes):
                    number = len(parts) + 1
                    uploaded = await self.client.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                    )
                    parts.append({"ETag": uploaded["ETag"], "PartNumber": number})
                    del chunk  # only one part alive at a time
            await self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Shielded: a cancelled clip must still not leave billed orphan parts.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._abort(key, upload_id))
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (ClientError, BotoCoreError) as exc:
            # A bucket lifecycle rule (AbortIncompleteMultipartUpload) is the backstop.
            log.warning("multipart_abort_failed", key=key, error=_reason(exc))

    async def delete(self, name: str) -> bool:
        # DELETE answers 204 whether or not the key existed; the HEAD tells which.
        if not await self.exists(name):
            return False
        key = self.key(name)
        try:
            await self.client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError("DELETE", key, _reason(exc)) from exc
        return True

    async def presigned_url(self, name: str, method: str = "GET") -> str:
        """A URL that fetches the output without credentials for ``presign_expiry_s``."""
        if self._presigner is None:
            raise RuntimeError("S3Storage used before open()")
        operation = "head_object" if method == "HEAD" else "get_object"
        return await self._presigner.generate_presigned_url(
            operation,
            Params={"Bucket": self.bucket, "Key": self.key(name)},
            ExpiresIn=self.settings.presign_expiry_s,
        )

    async def response(self, name: str) -> web.StreamResponse:
        """Stream the object (Range, ETag) or redirect to a presigned URL.

        A missing object raises a 404 :class:`ProblemError`, an unreachable store
        a 503; the Range is read when aiohttp prepares the response, like
        :class:`aiohttp.web.FileResponse` does.
        """
        try:
            info = await self.head(name)
        except StorageError as exc:
            log.warning("storage_unavailable", file=name, error=exc.message)
            raise ProblemError(
                503,
                "Storage unavailable",
                "the clip store did not answer; try again shortly",
                code="storage_unavailable",
                headers={"Retry-After": "5"},
            ) from exc
        if info is None:
            raise ProblemError(404, "Clip not found", "no such clip (it may have expired)")
        if self.settings.serve == "redirect":
            return PresignedRedirect(self, name)
        return S3ObjectResponse(self, name, info)


class PresignedRedirect(web.StreamResponse):
    """307 to a presigned URL for the request's method (GET or HEAD), never cached."""

    def __init__(self, storage: S3Storage, name: str) -> None:
        super().__init__(status=307)
        self._storage = storage
        self._name = name

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if not self.prepared:
            url = await self._storage.presigned_url(self._name, request.method)
            self.headers["Location"] = url
            # The URL expires: a cached redirect would later point at a 403.
            self.headers["Cache-Control"] = "no-store"
            self.content_length = 0
        return await super().prepare(request)


class _Unsatisfiable(Exception):
    pass


def _byte_range(request: web.BaseRequest, info: ObjectInfo) -> tuple[int, int] | None:
    """The inclusive byte range to send, None for the whole object.

    Raises :class:`_Unsatisfiable` where aiohttp's ``FileResponse`` answers 416:
    a malformed header, several ranges, a start at or past the end.
    """
    if "Range" not in request.headers or not _if_range_holds(request, info):
        return None
    try:
        rng = request.http_range
    except ValueError as exc:
        raise _Unsatisfiable from exc
    start, stop = rng.start, rng.stop
    size = info.size_bytes
    if start is None:
        return None
    if start < 0:  # suffix range: the last -start bytes
        if size == 0:
            raise _Unsatisfiable
        return max(0, size + start), size - 1
    if start >= size:
        raise _Unsatisfiable
    end = size - 1 if stop is None else min(stop - 1, size - 1)
    return start, end


def _if_range_holds(request: web.BaseRequest, info: ObjectInfo) -> bool:
    """False when If-Range names another version: then the whole object is sent."""
    value = request.headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        return value == info.etag  # strong comparison: a weak tag never matches
    try:
        since = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    return info.last_modified.replace(microsecond=0) <= since


class S3ObjectResponse(web.StreamResponse):
    """The object's bytes through this node: 200, 206 with Content-Range, 304 or 416.

    Everything that can fail is decided before the status line is sent, so a
    vanished object or an unreachable store still gets problem JSON; a failure
    mid-body can only cut the connection, which the client sees as a short read.
    """

    def __init__(self, storage: S3Storage, name: str, info: ObjectInfo) -> None:
        super().__init__()
        self._storage = storage
        self._name = name
        self._info = info

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        info = self._info
        try:
            byte_range = _byte_range(request, info)
        except _Unsatisfiable:
            return await self._problem(
                request,
                problem_response(
                    416,
                    "Range Not Satisfiable",
                    f"the clip has {info.size_bytes} bytes; ask for a single range within them",
                    headers={"Content-Range": f"bytes */{info.size_bytes}"},
                ),
            )
        self.headers["ETag"] = info.etag
        self.headers["Last-Modified"] = format_datetime(info.last_modified, usegmt=True)
        self.headers["Accept-Ranges"] = "bytes"
        if byte_range is None and _etag_matches(request.headers.get("If-None-Match"), info.etag):
            self.set_status(304)
            return await super().prepare(request)
        if request.method == "HEAD":
            self._set_body_headers(byte_range)
            return await super().prepare(request)

        key = self._storage.key(self._name)
        params: dict[str, Any] = {"Bucket": self._storage.bucket, "Key": key}
        # IfMatch: the bytes must be those of the version the HEAD described.
        params["IfMatch"] = info.etag
        if byte_range is not None:
            params["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        try:
            obj = await self._storage.client.get_object(**params)
        except ClientError as exc:
            if _is_missing(exc) or _error_code(exc) in ("412", "PreconditionFailed"):
                return await self._problem(
                    request,
                    problem_response(404, "Clip not found", "no such clip (it may have expired)"),
                )
            return await self._unavailable(request, key, exc)
        except BotoCoreError as exc:
            return await self._unavailable(request, key, exc)

        self._set_body_headers(byte_range)
        async with obj["Body"] as body:
            writer = await super().prepare(request)
            try:
                async for chunk in body.iter_chunks(STREAM_CHUNK_BYTES):
                    await self.write(chunk)
            except (aiohttp.ClientError, TimeoutError, BotoCoreError) as exc:
                # The status line is gone: all that is left is to end the connection
                # early, which the client sees as a short body (never as a whole clip).
                log.warning("clip_stream_cut", key=key, error=f"{type(exc).__name__}: {exc}")
                self.force_close()
        return writer

    def _set_body_headers(self, byte_range: tuple[int, int] | None) -> None:
        size = self._info.size_bytes
        self.content_type = content_type(self._name)
        if byte_range is None:
            self.set_status(200)
            self.content_length = size
        else:
            start, end = byte_range
            self.set_status(206)
            self.content_length = end - start + 1
            self.headers["Content-Range"] = f"bytes {start}-{end}/{size}"

    async def _unavailable(
        self, request: web.BaseRequest, key: str, exc: Exception
    ) -> AbstractStreamWriter | None:
        log.warning("storage_unavailable", key=key, error=_reason(exc))
        return await self._problem(
            request,
            problem_response(
                503,
                "Storage unavailable",
                "the clip store did not answer; try again shortly",
                code="storage_unavailable",
                headers={"Retry-After": "5"},
            ),
        )

    async def _problem(
        self, request: web.BaseRequest, problem: web.Response
    ) -> AbstractStreamWriter | None:
        # Too late for the middleware (the handler has returned): this response
        # becomes the problem answer itself, in the same canonical shape.
        body = problem.body
        assert isinstance(body, bytes)
        for header in ("ETag", "Last-Modified", "Accept-Ranges"):
            self.headers.pop(header, None)
        self.headers.update(problem.headers)
        self.set_status(problem.status)
        self.content_type = PROBLEM_CONTENT_TYPE
        self.content_length = len(body)
        writer = await super().prepare(request)
        if request.method != "HEAD":
            await self.write(body)
        return writer


def _etag_matches(header: str | None, etag: str) -> bool:
    """If-None-Match's weak comparison: any listed tag (or ``*``) equal to ``etag``."""
    if not header:
        return False
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag.removeprefix("W/") in tags


__all__ = [
    "ObjectInfo",
    "PresignedRedirect",
    "S3ObjectResponse",
    "S3Storage",
    "StorageError",
]
