"""S3 clip storage against real S3-compatible servers started by the suite.

moto's server mode (in this process, on a free loopback port) serves most
tests; SeaweedFS (a real object store shipped as a pip wheel, on free
loopback ports) serves what moto does not check: signatures (wrong
credentials are refused) and the expiry of presigned URLs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import botocore.session
import pytest
from aiohttp import web
from botocore.exceptions import BotoCoreError, ClientError
from moto.server import ThreadedMotoServer

from clipservice import s3storage
from clipservice.api.problems import problem_middleware
from clipservice.config import MIB, ConfigError, Settings, StorageSettings, load_settings
from clipservice.s3storage import S3Storage, StorageError
from clipservice.storage import SharedFolderStorage
from clipservice.storage_factory import make_storage, open_storage
from tests.conftest import assert_problem, free_port
from tests.s3_servers import remove_weed_sockets, seaweed_command

ACCESS_KEY = "clipservice-test"
SECRET_KEY = "clipservice-test-secret"
NAME = "vid-1.000-3.000-fast.mp4"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials and region through the standard chain (environment), nothing else."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # No shared files of the machine, and never the instance metadata address.
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _sync_client(endpoint: str) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture(scope="session")
def seaweed_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SeaweedFS master, volume, filer and S3 gateway that check SigV4 signatures."""
    root = tmp_path_factory.mktemp("seaweedfs")
    command, url, grpc_ports = seaweed_command(root, ACCESS_KEY, SECRET_KEY)
    log = (root / "weed.log").open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = _sync_client(url)
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "weed.log").read_text()[-2000:]
            try:
                client.list_buckets()
                break
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        # Test data only: no graceful shutdown to wait for (SIGTERM takes it many seconds).
        proc.kill()
        proc.wait()
        log.close()
        remove_weed_sockets(grpc_ports)


StorageFactory = Callable[..., Awaitable[S3Storage]]


@pytest.fixture
async def make_s3(tmp_path: Path, moto_url: str) -> AsyncIterator[StorageFactory]:
    """Opened S3 storages, each on a new bucket of ``endpoint`` (moto by default)."""
    opened: list[S3Storage] = []

    async def factory(endpoint: str = moto_url, **overrides: Any) -> S3Storage:
        bucket = overrides.pop("bucket", f"clips-{uuid.uuid4().hex[:12]}")
        create_bucket = overrides.pop("create_bucket", True)
        fields = {"kind": "s3", "bucket": bucket, "endpoint_url": endpoint, **overrides}
        storage = S3Storage(StorageSettings(**fields), tmp_path / f"staging-{len(opened)}")
        await storage.open()
        opened.append(storage)
        if create_bucket:
            await storage.client.create_bucket(Bucket=bucket)
        return storage

    yield factory
    for storage in opened:
        await storage.close()


@pytest.fixture
async def s3(make_s3: StorageFactory) -> S3Storage:
    return await make_s3()


def _stage(storage: S3Storage, name: str, data: bytes) -> Path:
    path = storage.staging_path(name)
    path.write_bytes(data)
    return path


async def _object_bytes(storage: S3Storage, name: str) -> bytes:
    obj = await storage.client.get_object(Bucket=storage.bucket, Key=storage.key(name))
    async with obj["Body"] as body:
        return await body.read()


@asynccontextmanager
async def serve(storage: S3Storage) -> AsyncIterator[str]:
    """The clip route as the API serves it: storage.response behind the problem middleware."""

    async def get_clip(request: web.Request) -> web.StreamResponse:
        return await storage.response(request.match_info["file"])

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/api/clips/{file}", get_clip)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/api/clips"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def get(url: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
    """One GET on a fresh client session."""
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as resp:
        yield resp


# -- upload -----------------------------------------------------------------------


async def test_small_output_is_one_put_and_the_local_copy_goes(s3: S3Storage) -> None:
    """A small output is uploaded whole with its content type, then removed from staging."""
    data = os.urandom(100_000)
    path = _stage(s3, NAME, data)
    await s3.publish(NAME)
    assert not path.exists()
    assert await s3.exists(NAME)
    assert await _object_bytes(s3, NAME) == data
    head = await s3.client.head_object(Bucket=s3.bucket, Key=NAME)
    assert head["ContentType"] == "video/mp4" and "-" not in head["ETag"]


async def test_big_output_is_uploaded_in_parts_read_one_at_a_time(
    make_s3: StorageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the threshold: a multipart upload whose disk reads never exceed one part."""
    part = 5 * MIB
    s3 = await make_s3(multipart_threshold_bytes=part, part_size_bytes=part)
    data = os.urandom(2 * part + 123_457)
    _stage(s3, NAME, data)
    reads: list[tuple[int, int]] = []
    real_read = s3storage._read_part

    async def spy(fh: Any, size_bytes: int) -> bytes:
        chunk = await real_read(fh, size_bytes)
        reads.append((size_bytes, len(chunk)))
        return chunk

    monkeypatch.setattr(s3storage, "_read_part", spy)
    await s3.publish(NAME)
    assert reads == [(part, part), (part, part), (part, 123_457), (part, 0)]
    head = await s3.client.head_object(Bucket=s3.bucket, Key=NAME)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts
    assert head["ContentLength"] == len(data)
    assert hashlib.sha256(await _object_bytes(s3, NAME)).digest() == hashlib.sha256(data).digest()
    assert not s3.staging_path(NAME).exists()


async def test_failed_multipart_upload_is_aborted_and_staging_kept(
    make_s3: StorageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read failing mid-upload aborts it: no object, no orphan parts, the file stays for a retry."""
    s3 = await make_s3(multipart_threshold_bytes=5 * MIB, part_size_bytes=5 * MIB)
    path = _stage(s3, NAME, os.urandom(11 * MIB))
    calls = 0
    real_read = s3storage._read_part

    async def failing(fh: Any, size_bytes: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk read failed")
        return await real_read(fh, size_bytes)

    monkeypatch.setattr(s3storage, "_read_part", failing)
    with pytest.raises(OSError, match="disk read failed"):
        await s3.publish(NAME)
    uploads = await s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert uploads.get("Uploads", []) == []
    assert not await s3.exists(NAME)
    assert path.exists()


async def test_cancelled_multipart_upload_is_aborted(
    make_s3: StorageFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a clip mid-upload still aborts the multipart upload (no billed orphans)."""
    s3 = await make_s3(multipart_threshold_bytes=5 * MIB, part_size_bytes=5 * MIB)
    _stage(s3, NAME, os.urandom(11 * MIB))
    second_read = asyncio.Event()
    real_read = s3storage._read_part
    calls = 0

    async def stalling(fh: Any, size_bytes: int) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 2:
            second_read.set()
            await asyncio.Event().wait()
        return await real_read(fh, size_bytes)

    monkeypatch.setattr(s3storage, "_read_part", stalling)
    task = asyncio.create_task(s3.publish(NAME))
    await asyncio.wait_for(second_read.wait(), 30)
    uploads = await s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert len(uploads.get("Uploads", [])) == 1  # one part sent, upload open
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    uploads = await s3.client.list_multipart_uploads(Bucket=s3.bucket)
    assert uploads.get("Uploads", []) == []


@pytest.mark.parametrize("size_bytes", [1000, 5 * MIB + 1])
async def test_metadata_travels_with_the_object(make_s3: StorageFactory, size_bytes: int) -> None:
    """Metadata given to publish (one PUT or multipart) comes back from head, for reuse."""
    s3 = await make_s3(multipart_threshold_bytes=5 * MIB, part_size_bytes=5 * MIB)
    _stage(s3, NAME, os.urandom(size_bytes))
    outcome = {"duration_s": "2.002", "actual_start": "0.968", "actual_end": "2.970"}
    await s3.publish(NAME, metadata=outcome)
    info = await s3.head(NAME)
    assert info is not None and info.size_bytes == size_bytes
    assert dict(info.metadata) == outcome


async def test_prefix_places_objects_under_it(make_s3: StorageFactory) -> None:
    """With a prefix, the object key is prefix/name (slashes around the prefix ignored)."""
    s3 = await make_s3(prefix="/deploy/clips/")
    _stage(s3, NAME, b"abc")
    await s3.publish(NAME)
    listed = await s3.client.list_objects_v2(Bucket=s3.bucket)
    assert [o["Key"] for o in listed["Contents"]] == [f"deploy/clips/{NAME}"]


# -- exists / delete ----------------------------------------------------------------


async def test_exists_and_delete(s3: S3Storage) -> None:
    """exists is a HEAD; delete removes the object and says whether there was one."""
    assert not await s3.exists(NAME)
    assert not await s3.delete(NAME)
    _stage(s3, NAME, b"x" * 10)
    await s3.publish(NAME)
    assert await s3.exists(NAME)
    assert await s3.delete(NAME)
    assert not await s3.exists(NAME)
    assert not await s3.delete(NAME)


# -- downloads: streaming ---------------------------------------------------------


async def test_stream_whole_object_and_ranges(s3: S3Storage) -> None:
    """Streaming: 200 with ETag, 206 with exact bytes for each range form, If-Range, 304."""
    data = os.urandom(300_000)
    _stage(s3, NAME, data)
    await s3.publish(NAME)
    size = len(data)
    async with serve(s3) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/{NAME}") as resp:
            assert resp.status == 200
            assert await resp.read() == data
            etag = resp.headers["ETag"]
            assert etag.startswith('"') and resp.headers["Accept-Ranges"] == "bytes"
            assert resp.headers["Content-Type"] == "video/mp4"
            assert int(resp.headers["Content-Length"]) == size
        cases = {
            "bytes=10-19": (10, 19),
            "bytes=299990-": (299_990, size - 1),
            "bytes=-7": (size - 7, size - 1),
            "bytes=5-999999999": (5, size - 1),
        }
        for header, (start, end) in cases.items():
            async with http.get(f"{base}/{NAME}", headers={"Range": header}) as resp:
                assert resp.status == 206, header
                assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{size}"
                assert await resp.read() == data[start : end + 1], header
        stale = {"Range": "bytes=0-9", "If-Range": '"not-the-etag"'}
        async with http.get(f"{base}/{NAME}", headers=stale) as resp:
            assert resp.status == 200 and await resp.read() == data
        fresh = {"Range": "bytes=0-9", "If-Range": etag}
        async with http.get(f"{base}/{NAME}", headers=fresh) as resp:
            assert resp.status == 206 and await resp.read() == data[:10]
        async with http.get(f"{base}/{NAME}", headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""
        async with http.head(f"{base}/{NAME}", headers={"Range": "bytes=0-9"}) as resp:
            assert resp.status == 206 and resp.headers["Content-Length"] == "10"


@pytest.mark.parametrize(
    "header", ["bytes=300000-", "bytes=400000-400010", "bytes=abc", "bytes=0-1,5-6", "bytes=9-3"]
)
async def test_unsatisfiable_range_is_416_problem(s3: S3Storage, header: str) -> None:
    """A range the object cannot satisfy (or that is malformed) is 416 problem JSON with bytes */size."""
    _stage(s3, NAME, os.urandom(300_000))
    await s3.publish(NAME)
    async with serve(s3) as base, get(f"{base}/{NAME}", headers={"Range": header}) as resp:
        body = await assert_problem(resp, 416)
        assert resp.headers["Content-Range"] == "bytes */300000"
        assert "ETag" not in resp.headers
        assert "300000" in body["detail"]


async def test_missing_object_is_404_problem(s3: S3Storage) -> None:
    """A clip that is not (or no longer) in the bucket is 404 problem JSON, in both modes."""
    async with serve(s3) as base, get(f"{base}/{NAME}") as resp:
        await assert_problem(resp, 404)


async def test_object_deleted_after_head_is_404_problem(s3: S3Storage) -> None:
    """An object that vanishes between the HEAD and the GET still gets 404 problem JSON."""
    _stage(s3, NAME, b"abcdef")
    await s3.publish(NAME)
    response = await s3.response(NAME)
    await s3.delete(NAME)

    async def stale(request: web.Request) -> web.StreamResponse:
        return response

    app = web.Application(middlewares=[problem_middleware])
    app.router.add_get("/x", stale)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with get(f"http://127.0.0.1:{runner.addresses[0][1]}/x") as resp:
            await assert_problem(resp, 404)
    finally:
        await runner.cleanup()


async def test_store_failing_mid_body_cuts_the_connection(
    s3: S3Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store breaking off mid-object ends the download short (never a whole clip), handled."""
    data = os.urandom(3 * s3storage.STREAM_CHUNK_BYTES)
    _stage(s3, NAME, data)
    await s3.publish(NAME)
    real_get = s3.client.get_object

    class BreaksAfterOneChunk:
        """The store's body, cut off after its first chunk (what a dropped connection does)."""

        def __init__(self, body: Any) -> None:
            self.body = body

        async def __aenter__(self) -> BreaksAfterOneChunk:
            await self.body.__aenter__()
            return self

        async def __aexit__(self, *exc: object) -> None:
            await self.body.__aexit__(*exc)

        async def iter_chunks(self, size: int) -> AsyncIterator[bytes]:
            async for chunk in self.body.iter_chunks(size):
                yield chunk
                raise aiohttp.ClientPayloadError("connection to the store lost")

    async def get_object(**params: Any) -> Any:
        obj = await real_get(**params)
        obj["Body"] = BreaksAfterOneChunk(obj["Body"])
        return obj

    monkeypatch.setattr(s3.client, "get_object", get_object)
    async with serve(s3) as base, get(f"{base}/{NAME}") as resp:
        assert resp.status == 200 and int(resp.headers["Content-Length"]) == len(data)
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # Handled by the response, not left to aiohttp's "Unhandled exception" log.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    monkeypatch.setattr(s3.client, "get_object", real_get)
    async with serve(s3) as base, get(f"{base}/{NAME}") as resp:
        assert await resp.read() == data


@pytest.mark.parametrize(
    ("suffix", "content_type"),
    [
        ("mp4", "video/mp4"),
        ("m4a", "audio/mp4"),
        ("mp3", "audio/mpeg"),
        ("gif", "image/gif"),
        ("webp", "image/webp"),
        ("jpg", "image/jpeg"),
        ("png", "image/png"),
    ],
)
async def test_content_type_by_extension(s3: S3Storage, suffix: str, content_type: str) -> None:
    """The stored object and the streamed answer carry the output format's content type."""
    name = f"vid-1.000-3.000-fast.{suffix}"
    _stage(s3, name, b"0123456789")
    await s3.publish(name)
    head = await s3.client.head_object(Bucket=s3.bucket, Key=name)
    assert head["ContentType"] == content_type
    async with serve(s3) as base, get(f"{base}/{name}") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == content_type


# -- downloads: redirect --------------------------------------------------------------


async def test_redirect_mode_sends_a_presigned_url_that_fetches_the_bytes(
    make_s3: StorageFactory,
) -> None:
    """serve = redirect: 307 to a presigned URL (never cached) that a client without keys can fetch."""
    s3 = await make_s3(serve="redirect", presign_expiry_s=120)
    data = os.urandom(50_000)
    _stage(s3, NAME, data)
    await s3.publish(NAME)
    async with serve(s3) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/{NAME}", allow_redirects=False) as resp:
            assert resp.status == 307
            assert resp.headers["Cache-Control"] == "no-store"
            location = resp.headers["Location"]
        assert "X-Amz-Expires=120" in location and "X-Amz-Signature=" in location
        async with http.get(location) as resp:  # no credentials of its own
            assert resp.status == 200 and await resp.read() == data
        async with http.get(f"{base}/{NAME}") as resp:  # followed by the client
            assert resp.status == 200 and await resp.read() == data
        async with http.get(f"{base}/missing-{NAME}", allow_redirects=False) as resp:
            await assert_problem(resp, 404)


async def test_public_endpoint_signs_links_for_the_clients_address(
    make_s3: StorageFactory, moto_url: str
) -> None:
    """With public_endpoint_url, redirects point there (the store as clients reach it)."""
    public = moto_url.replace("127.0.0.1", "localhost")
    s3 = await make_s3(serve="redirect", public_endpoint_url=public, addressing_style="path")
    _stage(s3, NAME, b"public bytes")
    await s3.publish(NAME)
    location = await s3.presigned_url(NAME)
    assert location.startswith(f"{public}/{s3.bucket}/{NAME}?")
    async with aiohttp.ClientSession() as http, http.get(location) as resp:
        assert resp.status == 200 and await resp.read() == b"public bytes"


async def test_presigned_url_expires(make_s3: StorageFactory, seaweed_url: str) -> None:
    """On a store that checks signatures, a presigned URL valid 1 s is refused after 2 s."""
    s3 = await make_s3(seaweed_url, serve="redirect", presign_expiry_s=1)
    _stage(s3, NAME, b"short-lived")
    await s3.publish(NAME)
    url = await s3.presigned_url(NAME)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200 and await resp.read() == b"short-lived"
        await asyncio.sleep(2)
        async with http.get(url) as resp:
            assert resp.status == 403, await resp.text()


# -- a second, signature-checking store, and errors -------------------------------------


async def test_round_trip_on_seaweedfs(make_s3: StorageFactory, seaweed_url: str) -> None:
    """Multipart upload, HEAD, Range streaming and delete work on SeaweedFS as on moto."""
    s3 = await make_s3(seaweed_url, multipart_threshold_bytes=5 * MIB, part_size_bytes=5 * MIB)
    data = os.urandom(5 * MIB + 1000)
    _stage(s3, NAME, data)
    await s3.publish(NAME)
    assert await s3.exists(NAME)
    async with (
        serve(s3) as base,
        get(f"{base}/{NAME}", headers={"Range": "bytes=5242870-5242889"}) as resp,
    ):
        assert resp.status == 206 and await resp.read() == data[5_242_870:5_242_890]
    assert await s3.delete(NAME) and not await s3.exists(NAME)


async def test_wrong_credentials_give_a_clear_error_and_no_traceback(
    make_s3: StorageFactory, seaweed_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused signature: StorageError naming the key and code (no secret); 503 problem JSON."""
    good = await make_s3(seaweed_url)
    _stage(good, NAME, b"abc")
    await good.publish(NAME)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-wrong-secret")
    bad = await make_s3(seaweed_url, bucket=good.bucket, create_bucket=False)
    _stage(bad, NAME, b"abc")
    with pytest.raises(StorageError) as info:
        await bad.publish(NAME)
    message = str(info.value)
    assert info.value.code == "storage_unavailable"
    assert NAME in message and "SignatureDoesNotMatch" in message, message
    assert "check the credentials" in message
    assert "a-wrong-secret" not in message and SECRET_KEY not in message
    assert bad.staging_path(NAME).exists()  # kept for a retry
    assert await bad.check() is not None
    async with serve(bad) as base, get(f"{base}/{NAME}") as resp:
        body = await assert_problem(resp, 503)
        assert body["code"] == "storage_unavailable" and resp.headers["Retry-After"]


async def test_unreachable_store_is_a_storage_error(make_s3: StorageFactory) -> None:
    """Nothing listening at the endpoint: StorageError on exists, and check() names the bucket."""
    dead = f"http://127.0.0.1:{free_port()}"
    s3 = await make_s3(dead, create_bucket=False, bucket="clips", max_attempts=1)
    with pytest.raises(StorageError, match=r"HEAD of .*EndpointConnectionError"):
        await s3.exists(NAME)
    reason = await s3.check()
    assert reason is not None and "'clips'" in reason


async def test_check_reports_a_missing_bucket(make_s3: StorageFactory) -> None:
    """check() is None for a usable bucket and names a missing one."""
    s3 = await make_s3()
    assert await s3.check() is None
    missing = await make_s3(bucket="no-such-bucket-here", create_bucket=False)
    reason = await missing.check()
    assert reason is not None and "no-such-bucket-here" in reason


# -- factory and config ---------------------------------------------------------------


async def test_factory_builds_the_configured_kind(tmp_path: Path, moto_url: str) -> None:
    """make_storage: a shared folder by default, S3 with kind = s3; open_storage closes it."""
    local = Settings().replace(storage={"data_dir": str(tmp_path)})
    assert isinstance(make_storage(local), SharedFolderStorage)
    s3_settings = local.replace(
        storage={"kind": "s3", "bucket": "factory", "endpoint_url": moto_url}
    )
    async with open_storage(s3_settings) as storage:
        assert isinstance(storage, S3Storage)
        assert storage.staging_path(NAME) == tmp_path / "clips" / NAME
        assert storage.writable()
        await storage.client.create_bucket(Bucket="factory")
        assert await storage.check() is None
    with pytest.raises(RuntimeError, match="before open"):
        storage.client  # noqa: B018 - the property raises once closed


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[storage]\nkind = "s3"\n', "storage.bucket is required"),
        ('[storage]\nkind = "gcs"\n', "storage.kind"),
        (
            '[storage]\nkind = "s3"\nbucket = "b"\nendpoint_url = "minio:9000"\n',
            "storage.endpoint_url",
        ),
        ('[storage]\npublic_endpoint_url = "ftp://x"\n', "storage.public_endpoint_url"),
        ("[storage]\npart_size_bytes = 1048576\n", "storage.part_size_bytes"),
        ("[storage]\nmultipart_threshold_bytes = 100\n", "storage.multipart_threshold_bytes"),
        ("[storage]\npresign_expiry_s = 604801\n", "storage.presign_expiry_s"),
        ('[storage]\nserve = "proxy"\n', "storage.serve"),
        ('[storage]\naddressing_style = "dns"\n', "storage.addressing_style"),
        ('[storage]\nprefix = "a/../b"\n', "storage.prefix"),
        ('[storage]\naws_secret_access_key = "x"\n', "storage.aws_secret_access_key: unknown key"),
        ("[storage]\nmax_attempts = 0\n", "storage.max_attempts"),
        ("[queue]\nmax_depth = -1\n", "queue.max_depth"),
    ],
)
def test_bad_storage_config_names_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    """Bad [storage] values (and credentials as config keys) stop loading, naming the key."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    assert needle in str(info.value)


def test_s3_settings_from_the_environment(tmp_path: Path) -> None:
    """CLIPSERVICE_STORAGE__* variables select S3 the way compose sets them."""
    s = load_settings(
        environ={
            "CLIPSERVICE_STORAGE__KIND": "s3",
            "CLIPSERVICE_STORAGE__BUCKET": "clips",
            "CLIPSERVICE_STORAGE__ENDPOINT_URL": "http://minio:9000/",
            "CLIPSERVICE_STORAGE__SERVE": "redirect",
            "CLIPSERVICE_STORAGE__PRESIGN_EXPIRY_S": "60",
            "CLIPSERVICE_QUEUE__MAX_DEPTH": "100",
        },
        default_path=tmp_path / "absent.toml",
    )
    assert (s.storage.kind, s.storage.bucket, s.storage.serve) == ("s3", "clips", "redirect")
    assert s.storage.endpoint_url == "http://minio:9000" and s.storage.presign_expiry_s == 60
    assert s.queue.max_depth == 100
