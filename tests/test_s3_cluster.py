"""Scale-out without a shared disk: two API nodes and two ``clipservice worker``
processes, each with a data_dir of its own, sharing nothing but the real Redis
and a bucket on moto's S3 server (server mode, started by the suite). Every
clip and the reel are downloadable from either node (streamed with Range, or by
a redirect to a presigned URL), an identical job reuses the objects without
uploading them again, DELETE and retention empty the bucket, and no node keeps
a clip in its staging folder."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from clipservice.config import StorageSettings
from clipservice.jobs.attempt import OUTCOME_KEY
from clipservice.jobs.models import Job, JobStatus
from clipservice.jobs.store import JobTx
from clipservice.s3storage import S3Storage
from tests.conftest import FakeVidfly, MediaServer, Service, ServiceFactory, assert_problem
from tests.test_distributed import WAIT_S, Cluster, make_cluster, redis_url  # noqa: F401 (a fixture)
from tests.test_storage_s3 import aws_env, moto_url  # noqa: F401 (fixtures; aws_env is autouse)

# Marks an object whose metadata the test rewrote: a new upload would drop it.
PROBE = {"probe": "kept"}


@pytest.fixture
async def bucket(moto_url: str, tmp_path: Path) -> AsyncIterator[S3Storage]:  # noqa: F811
    """A new bucket on the moto server, and a storage of the test's own to look inside it."""
    settings = StorageSettings(
        kind="s3",
        bucket=f"clips-{uuid.uuid4().hex[:12]}",
        endpoint_url=moto_url,
        addressing_style="path",
    )
    storage = S3Storage(settings, tmp_path / "inspector")
    await storage.open()
    try:
        await storage.client.create_bucket(Bucket=storage.bucket)
        yield storage
    finally:
        await storage.close()


def _storage_section(bucket: S3Storage, **more: Any) -> dict[str, Any]:
    s = bucket.settings
    return {
        "kind": "s3",
        "bucket": s.bucket,
        "endpoint_url": s.endpoint_url,
        "addressing_style": "path",
        **more,
    }


@pytest.fixture
async def s3_cluster(
    tmp_path: Path,
    vidfly: FakeVidfly,
    make_service: ServiceFactory,
    redis_url: str,  # noqa: F811
    bucket: S3Storage,
) -> AsyncIterator[Cluster]:
    """Two streaming API nodes (data_dirs api0, api1) on the bucket; workers get worker<n>."""
    async with make_cluster(
        tmp_path,
        vidfly,
        make_service,
        redis_url,
        storage=_storage_section(bucket, serve="stream"),
        separate_data_dirs=True,
    ) as c:
        yield c


async def _keys(bucket: S3Storage) -> set[str]:
    listed = await bucket.client.list_objects_v2(Bucket=bucket.bucket)
    return {obj["Key"] for obj in listed.get("Contents", [])}


async def _object_bytes(bucket: S3Storage, name: str) -> bytes:
    obj = await bucket.client.get_object(Bucket=bucket.bucket, Key=bucket.key(name))
    async with obj["Body"] as body:
        data: bytes = await body.read()
        return data


async def _download(
    node: Service, url: str, **headers: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with node.http.get(f"{node.base_url}{url}", headers=headers) as resp:
        return resp, await resp.read()


async def _check_served(node: Service, url: str, data: bytes, *, redirect: bool) -> None:
    """The whole file and a Range of it, as ``node`` serves them (following a 307)."""
    resp, body = await _download(node, url)
    assert resp.status == 200 and body == data, (resp.status, url)
    hops = [r.status for r in resp.history]
    assert hops == ([307] if redirect else []), hops
    resp, part = await _download(node, url, Range="bytes=100-1099")
    assert resp.status == 206 and part == data[100:1100], (resp.status, url)
    assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"


async def _submit(node: Service, body: dict[str, Any]) -> str:
    async with await node.create(body) as resp:
        assert resp.status == 202, await resp.text()
        job_id: str = (await resp.json())["job_id"]
        return job_id


async def test_clips_from_either_node_with_nothing_shared_but_redis_and_the_bucket(
    s3_cluster: Cluster,
    make_service: ServiceFactory,
    media_server: MediaServer,
    bucket: S3Storage,
    tmp_path: Path,
) -> None:
    """Two workers with their own folders cut one job's clips and its reel into the bucket;
    both streaming nodes and both redirecting nodes serve every file with Range; an
    identical job reuses the objects (none uploaded again); DELETE and retention empty
    the bucket; no data_dir keeps a file in its clips staging folder."""
    cluster = s3_cluster
    a, b = cluster.start_worker(), cluster.start_worker()
    await cluster.wait_workers(2)
    redirecting = [
        await make_service(
            tmp_path / f"redirect{n}",
            queue={"url": cluster.redis_url},
            storage=_storage_section(bucket, serve="redirect"),
        )
        for n in range(2)
    ]
    streaming = [cluster.api, cluster.api2]
    clips = [{"start": i * 4.0 + 0.5, "end": i * 4.0 + 2.5} for i in range(4)]
    body = {
        "video_url": media_server.url("muxed.mp4", slow=True),
        "clips": clips,
        "mode": "accurate",
    }

    first = Job.model_validate(
        await cluster.api2.wait(await _submit(cluster.api, {**body, "merge": True}), WAIT_S)
    )
    assert first.status is JobStatus.FINISHED, (first.errors, cluster.logs())
    assert [r.index for r in first.results] == [0, 1, 2, 3]
    cut_by = await cluster.store.clip_workers(first.job_id)
    assert set(cut_by.values()) == {cluster.worker_id(a), cluster.worker_id(b)}, cut_by
    reel = first.reel
    assert reel is not None and reel.error is None and reel.file and reel.url, reel
    # The reel joins clips some of which the other worker cut: it was made from the objects.
    assert reel.duration_s == pytest.approx(sum(r.duration_s for r in first.results), abs=0.15)
    files = {r.file: r for r in first.results}
    assert await _keys(bucket) == {*files, reel.file}

    for name, url, size_bytes in [
        *((r.file, r.url, r.size_bytes) for r in first.results),
        (reel.file, reel.url, reel.size_bytes),
    ]:
        data = await _object_bytes(bucket, name)
        assert len(data) == size_bytes > 1100, name
        for node in streaming:
            await _check_served(node, url, data, redirect=False)
        for node in redirecting:
            await _check_served(node, url, data, redirect=True)

    # Reuse: mark every clip object; a second upload of one would replace its metadata.
    for name in files:
        info = await bucket.head(name)
        assert info is not None and OUTCOME_KEY in info.metadata, name
        await bucket.client.copy_object(
            Bucket=bucket.bucket,
            Key=bucket.key(name),
            CopySource={"Bucket": bucket.bucket, "Key": bucket.key(name)},
            Metadata={**info.metadata, **PROBE},
            MetadataDirective="REPLACE",
            ContentType="video/mp4",
        )
    second = Job.model_validate(await cluster.api.wait(await _submit(cluster.api2, body), WAIT_S))
    assert second.status is JobStatus.FINISHED, (second.errors, cluster.logs())
    assert [(r.file, r.size_bytes, r.duration_s) for r in second.results] == [
        (r.file, r.size_bytes, r.duration_s) for r in first.results
    ]
    for name in files:
        info = await bucket.head(name)
        assert info is not None and info.metadata.get("probe") == "kept", (name, info)
    logs = cluster.logs()
    assert logs.count("clip_reused") == len(files), logs[-3000:]
    assert logs.count("clip_uploaded") == len(files) + 1, logs[-3000:]  # the clips, the reel

    # DELETE of the first job keeps the clips the second still names; then the second's
    # retention ends and a node's reaper deletes it: nothing is left.
    async with cluster.api2.http.delete(f"{cluster.api2.base_url}/api/jobs/{first.job_id}") as resp:
        assert resp.status == 204, await resp.text()
    assert await _keys(bucket) == set(files)

    def expire(tx: JobTx) -> bool:
        tx.job.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        return True

    await cluster.store.transact(second.job_id, expire)
    async with asyncio.timeout(WAIT_S):
        while await cluster.store.get(second.job_id) is not None:
            await asyncio.sleep(0.1)
    assert await _keys(bucket) == set()
    for node in [*streaming, *redirecting]:
        async with node.http.get(f"{node.base_url}{first.results[0].url}") as resp:
            await assert_problem(resp, 404)

    data_dirs = [node.settings.storage.data_dir for node in [*streaming, *redirecting]]
    data_dirs += [tmp_path / "worker0", tmp_path / "worker1"]
    for data_dir in data_dirs:
        staging = data_dir / "clips"
        assert staging.is_dir() and list(staging.iterdir()) == [], staging
    assert not cluster.data_dir.exists()  # no shared folder was ever made
