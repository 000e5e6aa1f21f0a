"""Per-key ownership: with API keys a job and its clips are the creating key's (and the
admins'); any other key gets exactly the unknown job's or missing clip's 404. Idempotency
keys are per API key, and the clip file index (file → jobs) follows results, DELETE and
retention in both stores, and in the distributed mode where the API node reads Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from clipservice.api.appkeys import STORE
from clipservice.api.auth import key_id
from clipservice.jobs import bookkeeping
from clipservice.jobs.models import ClipResult, ClipSpec, Job, JobSource, new_job_id
from clipservice.jobs.naming import clip_file_name
from clipservice.jobs.redis_store import RedisJobStore
from clipservice.jobs.store import FileJobStore, JobStore
from tests.conftest import Service, ServiceFactory, assert_problem

REDIS_TEST_URL = "redis://127.0.0.1:6379/14"

OWNER = "owner-key-0123456789abcdef"
OTHER = "other-key-fedcba9876543210"
THIRD = "third-key-00112233445566"
ADMIN = "admin-key-99887766554433"
SECURITY = {"api_keys": [OWNER, OTHER, THIRD], "admin_keys": [ADMIN]}
UNKNOWN_JOB = "0123456789abcdef0123456789abcdef"

# A 2 s stream copy of the 320x180 test source: cheap.
CUT = {"video_id": "owned1", "clips": [{"start": 1, "end": 3, "mode": "fast"}]}


def as_key(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


async def create(svc: Service, body: dict[str, Any], key: str | None, **headers: str) -> str:
    async with await svc.create(body, headers={**as_key(key), **headers}) as r:
        assert r.status == 202, await r.text()
        job_id: str = (await r.json())["job_id"]
        return job_id


async def wait_ended(svc: Service, job_id: str, key: str | None) -> dict[str, Any]:
    async with asyncio.timeout(60):
        while True:
            async with svc.http.get(f"{svc.base_url}/api/jobs/{job_id}", headers=as_key(key)) as r:
                assert r.status == 200, await r.text()
                doc: dict[str, Any] = await r.json()
            if doc["status"] in ("finished", "failed", "cancelled"):
                return doc
            await asyncio.sleep(0.05)


async def status_of(
    svc: Service, method: str, path: str, key: str | None
) -> tuple[int, dict[str, Any] | None]:
    """The status of one call, and its problem body (checked as problem JSON) when not 2xx."""
    headers = as_key(key)
    if path.startswith("/api/clips/"):
        # After a file answer the server drops the connection (the access-log middleware
        # prepares a FileResponse that aiohttp 3.14 then prepares again): a fresh one each.
        headers["Connection"] = "close"
    async with svc.http.request(method, svc.base_url + path, headers=headers) as r:
        assert r.status < 500, await r.text()
        if r.status < 300:
            await r.read()
            return r.status, None
        return r.status, await assert_problem(r)


async def same_404_as_unknown(
    svc: Service, method: str, path: str, job_id: str, key: str = OTHER
) -> None:
    """``key`` gets exactly the 404 of a job id that was never created."""
    status, body = await status_of(svc, method, path, key)
    unknown_status, unknown = await status_of(svc, method, path.replace(job_id, UNKNOWN_JOB), key)
    assert status == unknown_status == 404
    assert body is not None and unknown is not None
    assert body == {**unknown, "detail": unknown["detail"].replace(UNKNOWN_JOB, job_id)}


def store_of(svc: Service) -> JobStore:
    return svc.app[STORE]


@pytest.fixture
async def keyed(make_service: ServiceFactory) -> Service:
    return await make_service(security=SECURITY)


async def test_job_routes_by_caller(keyed: Service) -> None:
    """Owner and admin read the job, its events and its clip; another key gets the unknown 404s; no key 401."""
    svc = keyed
    job_id = await create(svc, CUT, OWNER)
    doc = await wait_ended(svc, job_id, OWNER)
    assert doc["status"] == "finished", doc
    assert "owner" not in doc
    clip = doc["results"][0]["url"]
    job_paths = [f"/api/check-job/{job_id}", f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/events"]
    for path in [*job_paths, clip]:
        for key in (OWNER, ADMIN):
            assert (await status_of(svc, "GET", path, key))[0] == 200, (path, key)
        for key in (None, "not-a-key"):
            assert (await status_of(svc, "GET", path, key))[0] == 401, (path, key)
    for path in job_paths:
        await same_404_as_unknown(svc, "GET", path, job_id)
    # The clip answers another key as a missing file of a valid name does.
    status, body = await status_of(svc, "GET", clip, OTHER)
    missing = "/api/clips/" + "f" * 16 + "-1000-3000-fast.mp4"
    assert (await status_of(svc, "GET", missing, OWNER)) == (404, body)
    assert status == 404
    # What the owner reads is the file itself.
    async with svc.http.get(
        svc.base_url + clip, headers={**as_key(OWNER), "Connection": "close"}
    ) as r:
        assert len(await r.read()) == doc["results"][0]["size_bytes"]
    # The store keeps the owner (a hash, never the key); the API never shows it.
    stored = await store_of(svc).get(job_id)
    assert stored is not None and stored.owner == key_id(OWNER)


async def test_delete_by_caller(keyed: Service) -> None:
    """DELETE: another key gets the unknown job's 404 and nothing changes; the admin deletes any job."""
    svc = keyed
    job_id = await create(svc, CUT, OWNER)
    doc = await wait_ended(svc, job_id, OWNER)
    name = doc["results"][0]["file"]
    await same_404_as_unknown(svc, "DELETE", f"/api/jobs/{job_id}", job_id)
    assert (await status_of(svc, "DELETE", f"/api/jobs/{job_id}", None))[0] == 401
    assert (await status_of(svc, "GET", f"/api/jobs/{job_id}", OWNER))[0] == 200
    assert (svc.settings.clips_dir / name).exists()
    assert (await status_of(svc, "DELETE", f"/api/jobs/{job_id}", ADMIN))[0] == 204
    for key in (OWNER, ADMIN):
        assert (await status_of(svc, "GET", f"/api/jobs/{job_id}", key))[0] == 404
        assert (await status_of(svc, "GET", doc["results"][0]["url"], key))[0] == 404
    assert not (svc.settings.clips_dir / name).exists()
    assert not await store_of(svc).file_used(name)


async def test_cancel_by_caller(keyed: Service) -> None:
    """A running job: another key's DELETE is a 404 that cancels nothing; the owner's cancels it."""
    svc = keyed
    job_id = await create(svc, {"video_id": "stall", "clips": [{"start": 20, "end": 24}]}, OWNER)
    await same_404_as_unknown(svc, "DELETE", f"/api/jobs/{job_id}", job_id)
    async with svc.http.get(f"{svc.base_url}/api/jobs/{job_id}", headers=as_key(OWNER)) as r:
        assert (await r.json())["status"] in ("pending", "processing")
    async with svc.http.delete(f"{svc.base_url}/api/jobs/{job_id}", headers=as_key(OWNER)) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"


async def test_reused_clip_readable_by_each_owner_only(keyed: Service) -> None:
    """One file in two owners' jobs (output reuse): both read it, a third key cannot; each
    owner loses it with its own job, and it goes with the last one."""
    svc = keyed
    first = await wait_ended(svc, await create(svc, CUT, OWNER), OWNER)
    second = await wait_ended(svc, await create(svc, CUT, OTHER), OTHER)
    assert first["status"] == second["status"] == "finished"
    url, name = first["results"][0]["url"], first["results"][0]["file"]
    assert second["results"][0]["file"] == name
    for key, status in ((OWNER, 200), (OTHER, 200), (ADMIN, 200), (THIRD, 404), (None, 401)):
        assert (await status_of(svc, "GET", url, key))[0] == status, key
    # The third key sees neither job.
    for doc in (first, second):
        await same_404_as_unknown(svc, "GET", f"/api/jobs/{doc['job_id']}", doc["job_id"], THIRD)
    assert (await status_of(svc, "DELETE", f"/api/jobs/{first['job_id']}", OWNER))[0] == 204
    assert (svc.settings.clips_dir / name).exists()  # the other job still uses it
    for key, status in ((OWNER, 404), (OTHER, 200), (ADMIN, 200), (THIRD, 404)):
        assert (await status_of(svc, "GET", url, key))[0] == status, key
    assert (await status_of(svc, "DELETE", f"/api/jobs/{second['job_id']}", OTHER))[0] == 204
    for key in (OWNER, OTHER, ADMIN):
        assert (await status_of(svc, "GET", url, key))[0] == 404, key
    assert not await store_of(svc).file_used(name)


async def test_idempotency_keys_are_per_api_key(keyed: Service) -> None:
    """One Idempotency-Key: the same key gets its job again (409 for another body); another key gets its own job."""
    svc = keyed
    body = {"video_id": "error500", "clips": [{"start": 1, "end": 2}]}
    other_body = {"video_id": "error500", "clips": [{"start": 2, "end": 3}]}
    idem = {"Idempotency-Key": "order-42"}
    mine = await create(svc, body, OWNER, **idem)
    theirs = await create(svc, body, OTHER, **idem)
    admins = await create(svc, other_body, ADMIN, **idem)
    assert len({mine, theirs, admins}) == 3
    for key, job_id in ((OWNER, mine), (OTHER, theirs), (ADMIN, admins)):
        again = body if key != ADMIN else other_body
        async with await svc.create(again, headers={**as_key(key), **idem}) as r:
            assert r.status == 200 and (await r.json())["job_id"] == job_id, key
        changed = other_body if key != ADMIN else body
        async with await svc.create(changed, headers={**as_key(key), **idem}) as r:
            await assert_problem(r, 409)
        await wait_ended(svc, job_id, key)
    # A different key's job is not the caller's to read, even through its Idempotency-Key.
    assert (await status_of(svc, "GET", f"/api/jobs/{theirs}", OWNER))[0] == 404


async def test_without_keys_everything_stays_open(make_service: ServiceFactory) -> None:
    """No security.api_keys: no owner is recorded and every route answers every caller, as before."""
    svc = await make_service()
    job_id = await create(svc, CUT, None)
    doc = await wait_ended(svc, job_id, None)
    stored = await store_of(svc).get(job_id)
    assert stored is not None and stored.owner is None
    for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/events", doc["results"][0]["url"]):
        for key in (None, "any-string-at-all"):
            assert (await status_of(svc, "GET", path, key))[0] == 200, path
    # Idempotency-Keys are global without keys: a header is no identity.
    idem = {"Idempotency-Key": "open-1"}
    first = await create(svc, CUT, None, **idem)
    async with await svc.create(CUT, headers={"X-API-Key": "whatever", **idem}) as r:
        assert r.status == 200 and (await r.json())["job_id"] == first
    await wait_ended(svc, first, None)
    assert (await status_of(svc, "DELETE", f"/api/jobs/{job_id}", "x"))[0] == 204


async def test_admin_keys_alone_turn_authentication_on(make_service: ServiceFactory) -> None:
    """With only admin_keys set the API needs a key, and the admin sees its own jobs."""
    svc = await make_service(security={"admin_keys": [ADMIN]})
    async with await svc.create(CUT) as r:
        await assert_problem(r, 401)
    job_id = await create(svc, {"video_id": "error500", "clips": [{"start": 1, "end": 2}]}, ADMIN)
    await wait_ended(svc, job_id, ADMIN)
    stored = await store_of(svc).get(job_id)
    assert stored is not None and stored.owner == key_id(ADMIN)


async def test_retention_clears_the_index(make_service: ServiceFactory) -> None:
    """When retention deletes a job its clip leaves the index: 404 for owner and admin, nothing left."""
    svc = await make_service(security=SECURITY, jobs={"retention_s": 0.5})
    job_id = await create(svc, CUT, OWNER)
    doc = await wait_ended(svc, job_id, OWNER)
    name = doc["results"][0]["file"]
    store = store_of(svc)
    assert await store.file_owned(name, key_id(OWNER))
    async with asyncio.timeout(20):
        while await store.get(job_id) is not None:
            await asyncio.sleep(0.05)
    assert not await store.file_used(name)
    assert not await store.file_owned(name, key_id(OWNER))
    for key in (OWNER, ADMIN):
        assert (await status_of(svc, "GET", doc["results"][0]["url"], key))[0] == 404


# -- the index in each store -------------------------------------------------------


@pytest.fixture(params=["file", "redis"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStore]:
    """A FileJobStore and a RedisJobStore: the file index must behave the same in both."""
    if request.param == "file":
        files = FileJobStore(tmp_path / "jobs")
        await files.open()
        yield files
        await files.close()
        return
    redis = RedisJobStore.from_url(REDIS_TEST_URL)
    await redis.redis.flushdb()
    yield redis
    await redis.redis.flushdb()
    await redis.close()


def owned_job(owner: str | None, video_id: str = "vid") -> Job:
    clips = [ClipSpec(index=i, start=float(i), end=float(i) + 1, mode="fast") for i in range(2)]
    return Job(
        job_id=new_job_id(),
        video_id=video_id,
        source=JobSource(video_id=video_id),
        clips=clips,
        total=2,
        owner=owner,
    )


async def record(store: JobStore, job: Job, index: int) -> str:
    """Cut clip ``index`` as a runner records it (claim, then result); the file's name."""
    attempt = await bookkeeping.claim_clip(store, job.job_id, index, "w1")
    assert attempt is not None
    name = clip_file_name(job.source, job.clips[index])
    result = ClipResult(
        index=index,
        start=job.clips[index].start,
        end=job.clips[index].end,
        mode="fast",
        file=name,
        url=f"/api/clips/{name}",
        size_bytes=1,
        duration_s=1.0,
        actual_start=job.clips[index].start,
        actual_end=job.clips[index].end,
    )
    await bookkeeping.record_clip(store, job.job_id, attempt, result, retention_s=60)
    return name


async def test_index_follows_results_and_deletes(any_store: JobStore) -> None:
    """The index names a file for each owner whose stored job has it in its results, and drops it with the job."""
    a, b = key_id(OWNER), key_id(OTHER)
    job_a, job_b, job_none = owned_job(a), owned_job(b), owned_job(None)
    for job in (job_a, job_b, job_none):
        await any_store.save(job)
    name = clip_file_name(job_a.source, job_a.clips[0])
    assert not await any_store.file_used(name)  # clips not cut yet name nothing
    assert await record(any_store, job_a, 0) == name
    assert await any_store.file_owned(name, a) and await any_store.file_used(name)
    assert not await any_store.file_owned(name, b)
    assert not await any_store.file_owned(name, None)
    # Owners are compared whole: a prefix of one is not it.
    assert not await any_store.file_owned(name, a[:-1])
    await record(any_store, job_b, 0)
    await record(any_store, job_none, 0)
    assert await any_store.file_owned(name, b) and await any_store.file_owned(name, None)
    other = await record(any_store, job_a, 1)
    assert await any_store.file_owned(other, a) and not await any_store.file_owned(other, b)
    await any_store.delete(job_a.job_id)
    assert not await any_store.file_owned(name, a) and not await any_store.file_used(other)
    assert await any_store.file_owned(name, b)
    await any_store.delete(job_b.job_id)
    await any_store.delete(job_none.job_id)
    assert not await any_store.file_used(name)
    if isinstance(any_store, RedisJobStore):
        # Nothing is left behind in Redis once the last job naming a file is gone.
        assert await any_store.redis.keys(f"{any_store.prefix}file:*") == []


async def test_idempotency_index_per_owner(any_store: JobStore) -> None:
    """The Idempotency-Key index is per owner, and forgets a job once it is deleted."""
    a, b = owned_job(key_id(OWNER)), owned_job(key_id(OTHER))
    open_job = owned_job(None)
    for job in (a, b, open_job):
        job.idempotency_key = "same"
        await any_store.save(job)
    for owner, job in ((key_id(OWNER), a), (key_id(OTHER), b), (None, open_job)):
        found = await any_store.by_idempotency_key("same", owner)
        assert found is not None and found.job_id == job.job_id
    assert await any_store.by_idempotency_key("same", key_id(THIRD)) is None
    await any_store.delete(a.job_id)
    assert await any_store.by_idempotency_key("same", key_id(OWNER)) is None
    found = await any_store.by_idempotency_key("same", key_id(OTHER))
    assert found is not None and found.job_id == b.job_id


async def test_file_index_rebuilt_at_open(tmp_path: Path) -> None:
    """The file store's in-memory index comes back from the job files after a restart."""
    store = FileJobStore(tmp_path / "jobs")
    await store.open()
    job = owned_job(key_id(OWNER))
    await store.save(job)
    name = await record(store, job, 0)
    await store.close()
    reopened = FileJobStore(tmp_path / "jobs")
    await reopened.open()
    assert await reopened.file_owned(name, key_id(OWNER))
    assert not await reopened.file_owned(name, key_id(OTHER))
    await reopened.delete(job.job_id)
    assert not await reopened.file_used(name)
    await reopened.close()


# -- distributed mode: the API node reads jobs and the index from Redis ---------------


@pytest.fixture
async def redis_api(make_service: ServiceFactory, tmp_path: Path) -> AsyncIterator[Service]:
    """An API node of the distributed mode (no workers: jobs stay pending unless a test records)."""
    store = RedisJobStore.from_url(REDIS_TEST_URL)
    await store.redis.flushdb()
    svc = await make_service(tmp_path / "shared", security=SECURITY, queue={"url": REDIS_TEST_URL})
    yield svc
    await svc.stop()
    await store.redis.flushdb()
    await store.close()


async def test_distributed_routes_by_caller(redis_api: Service) -> None:
    """On an API node backed by Redis: owner and admin see the job and its clip, another key the unknown 404s."""
    svc = redis_api
    body = {"video_id": "owned2", "clips": [{"start": 1, "end": 2}, {"start": 3, "end": 4}]}
    job_id = await create(svc, body, OWNER)
    store = store_of(svc)
    assert isinstance(store, RedisJobStore)
    for path in (f"/api/check-job/{job_id}", f"/api/jobs/{job_id}"):
        for key in (OWNER, ADMIN):
            assert (await status_of(svc, "GET", path, key))[0] == 200
        assert (await status_of(svc, "GET", path, None))[0] == 401
        await same_404_as_unknown(svc, "GET", path, job_id)
    events = f"/api/jobs/{job_id}/events"
    await same_404_as_unknown(svc, "GET", events, job_id)
    for key in (OWNER, ADMIN):
        # A pending job's stream stays open: its first event is enough.
        async with svc.http.get(svc.base_url + events, headers=as_key(key)) as r:
            assert r.status == 200
            async with asyncio.timeout(10):
                while not (line := await r.content.readline()).startswith(b"data:"):
                    pass
            assert json.loads(line[5:])["job_id"] == job_id
    await same_404_as_unknown(svc, "DELETE", f"/api/jobs/{job_id}", job_id)
    # A worker records a clip (the same bookkeeping transaction the workers run).
    job = await store.get(job_id)
    assert job is not None and job.owner == key_id(OWNER)
    name = await record(store, job, 0)
    (svc.settings.clips_dir).mkdir(parents=True, exist_ok=True)
    (svc.settings.clips_dir / name).write_bytes(b"\0" * 64)
    url = f"/api/clips/{name}"
    for key, status in ((OWNER, 200), (ADMIN, 200), (OTHER, 404), (None, 401)):
        assert (await status_of(svc, "GET", url, key))[0] == status, key
    # The owner cancels, then deletes the ended job: its file leaves the index and the disk.
    async with svc.http.delete(f"{svc.base_url}/api/jobs/{job_id}", headers=as_key(OWNER)) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"
    assert (await status_of(svc, "GET", url, OWNER))[0] == 200  # results stay with the job
    assert (await status_of(svc, "DELETE", f"/api/jobs/{job_id}", OWNER))[0] == 204
    assert not await store.file_used(name)
    for key in (OWNER, ADMIN):
        assert (await status_of(svc, "GET", url, key))[0] == 404
    assert not (svc.settings.clips_dir / name).exists()
