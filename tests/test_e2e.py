"""End to end: request → job → FFmpeg → clip files, against real loopback servers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av

from tests.conftest import FakeVidfly, MediaServer, Service, ServiceFactory


def _probe(path: Path) -> tuple[float, bool, bool]:
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        vdur = float(vs.duration * vs.time_base)
        return vdur, bool(c.streams.video), bool(c.streams.audio)


async def test_full_path_video_id(
    service: Service, media_server: MediaServer, tmp_path: Path
) -> None:
    """A video_id job resolves through Vidfly, cuts both clips, and they download and decode."""
    resp = await service.create(
        {
            "video_id": "dQw4w9WgXcQ",
            "clips": [{"start": 3, "end": 5}, {"start": "00:00:10.5", "end": "0:13"}],
        }
    )
    assert resp.status == 202, await resp.text()
    created = await resp.json()
    assert created["status"] == "pending" and created["total"] == 2
    assert resp.headers["Location"] == f"/api/jobs/{created['job_id']}"
    doc = await service.wait(created["job_id"])
    assert doc["status"] == "finished", doc
    assert doc["processed"] == 2 and doc["progress"] == 1.0 and doc["errors"] == []
    assert [r["index"] for r in doc["results"]] == [0, 1]
    r1 = doc["results"][1]
    assert (r1["start"], r1["end"]) == (10.5, 13.0)
    assert abs(r1["duration_s"] - 2.5) < 0.07
    assert doc["finished_at"] and doc["expires_at"]
    for r in doc["results"]:
        async with service.http.get(service.base_url + r["url"]) as clip:
            assert clip.status == 200
            assert clip.headers["Content-Type"] == "video/mp4"
            assert "ETag" in clip.headers
            out = tmp_path / r["file"]
            out.write_bytes(await clip.read())
        assert out.stat().st_size == r["size_bytes"]
        vdur, has_v, has_a = _probe(out)
        assert has_v and has_a
        assert abs(vdur - (r["end"] - r["start"])) < 0.07


async def test_direct_urls_read_only_byte_ranges(
    service: Service, media_server: MediaServer, media: dict[str, Path]
) -> None:
    """A video_url + audio_url job fetches far less than the whole files (HTTP Range)."""
    resp = await service.create(
        {
            "video_url": media_server.url("video.mp4"),
            "audio_url": media_server.url("audio.m4a"),
            "clips": [{"start": 20, "end": 22, "mode": "reencode"}],
        }
    )
    assert resp.status == 202
    doc = await service.wait((await resp.json())["job_id"])
    assert doc["status"] == "finished", doc
    whole = media["long-video"].stat().st_size + media["long-audio"].stat().st_size
    assert media_server.bytes_served < whole * 0.3, media_server.requests
    assert any(r["range"] for r in media_server.requests)


async def test_range_reuse_and_range_requests(service: Service, media_server: MediaServer) -> None:
    """A second job for the same source, range and mode reuses the file; Range works on clips."""
    body = {"video_id": "reuse1", "clips": [{"start": 1, "end": 3, "mode": "reencode"}]}
    first = await service.wait((await (await service.create(body)).json())["job_id"])
    assert first["status"] == "finished"
    path = service.settings.clips_dir / first["results"][0]["file"]
    mtime = path.stat().st_mtime_ns
    second = await service.wait((await (await service.create(body)).json())["job_id"])
    assert second["status"] == "finished"
    assert second["results"][0]["file"] == first["results"][0]["file"]
    assert path.stat().st_mtime_ns == mtime
    # The reused clip is described as the cut one was, its frame size included.
    size = [(r["width"], r["height"]) for r in (first["results"][0], second["results"][0])]
    assert size[0] == size[1] and size[0][0] > 0, size
    async with service.http.get(
        service.base_url + first["results"][0]["url"], headers={"Range": "bytes=0-99"}
    ) as resp:
        assert resp.status == 206
        assert len(await resp.read()) == 100


async def test_mixed_job_and_concurrent_job_unaffected(make_service: ServiceFactory) -> None:
    """Good, out-of-range and timed-out clips: the job finishes with results and errors,
    and a concurrent job on a healthy source finishes untouched."""
    service = await make_service(jobs={"clip_timeout_s": 3})
    bad = await service.create(
        {
            "video_id": "stall",
            "clips": [
                {"start": 1, "end": 2, "mode": "reencode"},
                {"start": 25, "end": 27, "mode": "reencode"},
                {"start": 40, "end": 45},
            ],
        }
    )
    good = await service.create({"video_id": "healthy", "clips": [{"start": 5, "end": 7}]})
    assert bad.status == 202 and good.status == 202
    good_doc = await service.wait((await good.json())["job_id"])
    bad_doc = await service.wait((await bad.json())["job_id"])
    assert good_doc["status"] == "finished" and good_doc["errors"] == []
    assert bad_doc["status"] == "finished", bad_doc
    assert bad_doc["processed"] == 3
    assert [r["index"] for r in bad_doc["results"]] == [0]
    codes = {e["index"]: e["code"] for e in bad_doc["errors"]}
    assert codes == {1: "timeout", 2: "invalid_range"}
    # No partial file is left behind by the killed FFmpeg.
    leftovers = [p.name for p in service.settings.clips_dir.iterdir() if ".part-" in p.name]
    assert leftovers == []


async def test_job_fails_when_source_unavailable(service: Service) -> None:
    """Resolver errors end the job as failed with source_unavailable and a message."""
    for vid in ("error500", "malformed", "noitems"):
        resp = await service.create({"video_id": vid, "clips": [{"start": 1, "end": 2}]})
        doc = await service.wait((await resp.json())["job_id"])
        assert doc["status"] == "failed", doc
        assert doc["error"]["code"] == "source_unavailable"
        assert doc["error"]["message"]
        assert doc["results"] == []


async def test_resolver_timeout(make_service: ServiceFactory) -> None:
    """A resolver that never answers fails the job (resolver.timeout_s), not hangs it."""
    service = await make_service(resolver={"timeout_s": 0.5})
    resp = await service.create({"video_id": "slowupstream", "clips": [{"start": 1, "end": 2}]})
    doc = await service.wait((await resp.json())["job_id"], timeout_s=20)
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "source_unavailable"
    assert "timed out" in doc["error"]["message"]


async def test_all_clips_invalid_fails_job(service: Service) -> None:
    """A job whose every clip fails ends as failed, with each clip's error listed."""
    resp = await service.create({"video_id": "x1", "clips": [{"start": 100, "end": 110}]})
    doc = await service.wait((await resp.json())["job_id"])
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == "invalid_range"
    assert doc["errors"][0]["code"] == "invalid_range"


async def test_cleanup_after_retention(make_service: ServiceFactory, tmp_path: Path) -> None:
    """Ended jobs and their clip files are deleted retention_s after they end."""
    service = await make_service(jobs={"retention_s": 0.5})
    resp = await service.create({"video_id": "cleanme", "clips": [{"start": 1, "end": 2}]})
    job_id = (await resp.json())["job_id"]
    doc = await service.wait(job_id)
    assert doc["status"] == "finished"
    clip = service.settings.clips_dir / doc["results"][0]["file"]
    job_file = service.settings.jobs_dir / f"{job_id}.json"
    assert clip.exists() and job_file.exists()
    async with asyncio.timeout(10):
        while job_file.exists() or clip.exists():
            await asyncio.sleep(0.05)
    async with service.http.get(f"{service.base_url}/api/check-job/{job_id}") as r:
        assert r.status == 404
    async with service.http.get(service.base_url + doc["results"][0]["url"]) as r:
        assert r.status == 404


async def test_cleanup_keeps_files_of_other_live_jobs(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """A file also used by another, still live job survives the first job's cleanup."""
    service = await make_service(jobs={"retention_s": 0.3})
    shared = {"start": 1, "end": 2}
    a = await service.wait(
        (await (await service.create({"video_id": "stall", "clips": [shared]})).json())["job_id"]
    )
    # b reuses a's file for its first clip and stays live on its second (reads past
    # half of the source hang until the test releases them).
    stalled = {"start": 20, "end": 25, "mode": "reencode"}
    b_resp = await service.create({"video_id": "stall", "clips": [shared, stalled]})
    b_id = (await b_resp.json())["job_id"]
    async with asyncio.timeout(30):
        while not (b := await service.job(b_id))["results"]:
            await asyncio.sleep(0.05)
    assert a["results"][0]["file"] == b["results"][0]["file"]
    clip = service.settings.clips_dir / a["results"][0]["file"]
    job_a = service.settings.jobs_dir / f"{a['job_id']}.json"
    async with asyncio.timeout(10):
        while job_a.exists():
            await asyncio.sleep(0.05)
    assert (await service.job(b_id))["status"] == "processing"
    assert clip.exists()  # a is gone; the live b still names the file
    media_server.unstall.set()
    assert (await service.wait(b_id))["status"] == "finished"


async def test_cancel_running_job(make_service: ServiceFactory) -> None:
    """DELETE on a running job cancels it: status cancelled, no FFmpeg, no partial file."""
    from clipservice.media.ffmpeg import running_processes

    service = await make_service(jobs={"clip_timeout_s": 30})
    resp = await service.create(
        {"video_id": "stall", "clips": [{"start": 25, "end": 27, "mode": "reencode"}]}
    )
    job_id = (await resp.json())["job_id"]
    async with asyncio.timeout(10):
        while not running_processes:
            await asyncio.sleep(0.05)
    async with service.http.delete(f"{service.base_url}/api/jobs/{job_id}") as r:
        assert r.status == 200
        doc = await r.json()
    assert doc["status"] == "cancelled"
    assert doc["errors"][0]["code"] == "cancelled"
    assert not running_processes
    assert not [p for p in service.settings.clips_dir.iterdir() if ".part-" in p.name]
    async with service.http.delete(f"{service.base_url}/api/jobs/{job_id}") as r:
        assert r.status == 204
    async with service.http.get(f"{service.base_url}/api/jobs/{job_id}") as r:
        assert r.status == 404


async def test_expired_stream_urls_are_resolved_again(
    service: Service, vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """Stream URLs that start answering 403 mid-job are resolved again once, and the clip
    is cut from the fresh URLs."""
    resp = await service.create(
        {"video_id": "expiring", "clips": [{"start": 20, "end": 22, "mode": "reencode"}]}
    )
    doc = await service.wait((await resp.json())["job_id"])
    assert doc["status"] == "finished", doc
    assert doc["errors"] == []
    assert len(vidfly.calls) == 2  # the first resolve, and one more after the 403
    assert doc["results"][0]["duration_s"] == 2.0


def test_source_expired_recognises_ffmpeg_and_probe_messages() -> None:
    """403/410 answers are recognised in FFmpeg's and the prober's words, other errors are not."""
    from clipservice.jobs.runner import source_expired

    assert source_expired("[https @ 0x1] HTTP error 403 Forbidden | Server returned 403 Forbidden")
    assert source_expired("[https @ 0x1] HTTP error 410 Gone")
    assert source_expired("source answered 403: Forbidden")
    assert not source_expired("Server returned 404 Not Found")
    assert not source_expired("Invalid data found when processing input (4030 bytes)")
