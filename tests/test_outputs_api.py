"""Output options through the API: shapes, formats, captions and reels, end to end.

The render engine's own content checks live in tests/test_render.py; here the
options travel the whole way: request body (and 422 problems naming the
field), the job document, the file's name (reuse keyed on every option), its
Content-Type, and the merged reel.
"""

from __future__ import annotations

import io
from typing import Any

import av
import pytest

from tests.conftest import MediaServer, Service, ServiceFactory, assert_problem

SRT = "1\n00:00:01,000 --> 00:00:02,500\nHello reel\n\n2\n00:00:03,000 --> 00:00:04,000\nBye\n"


def _job(media_server: MediaServer, clips: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"video_url": media_server.url("muxed.mp4"), "clips": clips, **extra}


async def _run(service: Service, body: dict[str, Any]) -> dict[str, Any]:
    async with await service.create(body) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
    return await service.wait(job_id, timeout_s=120)


async def _download(service: Service, url: str) -> tuple[str, bytes]:
    async with service.http.get(f"{service.base_url}{url}") as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers["Content-Type"], await resp.read()


def _streams(data: bytes) -> dict[str, Any]:
    with av.open(io.BytesIO(data)) as c:
        out: dict[str, Any] = {"kinds": sorted(s.type for s in c.streams)}
        if c.streams.video:
            v = c.streams.video[0]
            out["size"] = (v.codec_context.width, v.codec_context.height)
            out["codec"] = v.codec_context.name
        if c.streams.subtitles:
            out["subtitles"] = len(c.streams.subtitles)
        out["duration_s"] = float(c.duration / av.time_base) if c.duration else 0.0
    return out


async def test_each_format_is_made_named_and_served(
    service: Service, media_server: MediaServer
) -> None:
    """A 9:16 crop, an m4a, a GIF and a jpg thumbnail of one source: each result says
    its format and size, its file's extension and Content-Type match, and its
    content is what was asked (picture size, streams)."""
    doc = await _run(
        service,
        _job(
            media_server,
            [
                {"start": 1, "end": 3, "output": {"aspect": "9:16", "max_height": 320}},
                {"start": 1, "end": 3, "output": {"format": "m4a"}},
                {"start": 1, "end": 2, "output": {"format": "gif", "fps": 5, "width": 120}},
                {"start": 1, "end": 3, "output": {"format": "jpg", "thumbnail_at": 2.0}},
            ],
        ),
    )
    assert doc["status"] == "finished" and not doc["errors"], doc["errors"]
    results = {r["index"]: r for r in doc["results"]}
    vertical, audio, gif, thumb = (results[i] for i in range(4))
    assert (vertical["format"], vertical["width"], vertical["height"]) == ("mp4", 180, 320)
    assert audio["format"] == "m4a" and audio["width"] == 0
    assert (gif["format"], gif["width"]) == ("gif", 120)
    assert thumb["format"] == "jpg" and thumb["duration_s"] == 0
    expected = {
        0: ("video/mp4", ".mp4"),
        1: ("audio/mp4", ".m4a"),
        2: ("image/gif", ".gif"),
        3: ("image/jpeg", ".jpg"),
    }
    for index, (ctype, ext) in expected.items():
        assert results[index]["file"].endswith(ext)
        got_type, data = await _download(service, results[index]["url"])
        assert got_type == ctype
        if index == 0:
            assert _streams(data)["size"] == (180, 320)
        if index == 1:
            assert _streams(data)["kinds"] == ["audio"]
        if index == 3:
            assert data[:3] == b"\xff\xd8\xff"


async def test_job_default_output_and_per_clip_override(
    service: Service, media_server: MediaServer
) -> None:
    """The body's ``output`` applies to clips without their own; a clip's own wins."""
    doc = await _run(
        service,
        _job(
            media_server,
            [{"start": 1, "end": 2}, {"start": 3, "end": 4, "output": {"format": "mp3"}}],
            output={"format": "m4a"},
        ),
    )
    formats = [r["format"] for r in sorted(doc["results"], key=lambda r: r["index"])]
    assert formats == ["m4a", "mp3"]
    assert [c["output"]["format"] for c in doc["clips"]] == ["m4a", "mp3"]


async def test_soft_captions_are_muxed_and_shifted(
    service: Service, media_server: MediaServer
) -> None:
    """SRT text sent with a clip comes back as a subtitle track of the MP4."""
    doc = await _run(
        service,
        _job(media_server, [{"start": 0.5, "end": 3.5, "output": {"captions": {"text": SRT}}}]),
    )
    assert doc["status"] == "finished", doc
    _, data = await _download(service, doc["results"][0]["url"])
    assert _streams(data).get("subtitles") == 1


async def test_reuse_keys_on_every_option(service: Service, media_server: MediaServer) -> None:
    """The same range with other options is another file; with the same options, the
    same file, reused (not cut again)."""
    clips = [
        {"start": 1, "end": 3},
        {"start": 1, "end": 3, "output": {"aspect": "1:1", "max_height": 160}},
        {"start": 1, "end": 3, "output": {"aspect": "1:1", "max_height": 200}},
    ]
    first = await _run(service, _job(media_server, clips))
    names = [r["file"] for r in sorted(first["results"], key=lambda r: r["index"])]
    assert len(set(names)) == 3
    before = {n: (service.settings.clips_dir / n).stat().st_mtime_ns for n in names}
    again = await _run(service, _job(media_server, clips))
    assert [r["file"] for r in sorted(again["results"], key=lambda r: r["index"])] == names
    assert {n: (service.settings.clips_dir / n).stat().st_mtime_ns for n in names} == before


@pytest.mark.parametrize("crossfade_s", [0.0, 0.5])
async def test_merge_makes_a_reel_of_the_clips_in_order(
    service: Service, media_server: MediaServer, crossfade_s: float
) -> None:
    """merge: true gives the job one more file, its clips joined in order; its length
    is their sum (less the crossfades); it is served and deleted with the job."""
    clips = [{"start": 1, "end": 3}, {"start": 6, "end": 7}, {"start": 10, "end": 12}]
    doc = await _run(service, _job(media_server, clips, merge=True, crossfade_s=crossfade_s))
    assert doc["status"] == "finished", doc
    reel = doc["reel"]
    assert reel is not None and reel["error"] is None, reel
    assert reel["clips"] == [0, 1, 2] and reel["file"] == f"reel-{doc['job_id']}.mp4"
    total = sum(r["duration_s"] for r in doc["results"]) - 2 * crossfade_s
    assert reel["duration_s"] == pytest.approx(total, abs=0.15)
    ctype, data = await _download(service, reel["url"])
    assert ctype == "video/mp4" and len(data) == reel["size_bytes"]
    async with service.http.delete(f"{service.base_url}/api/jobs/{doc['job_id']}") as resp:
        assert resp.status == 204
    async with service.http.get(f"{service.base_url}{reel['url']}") as resp:
        await assert_problem(resp, 404)


@pytest.mark.parametrize(
    ("body_extra", "clip_output", "loc"),
    [
        ({}, {"fps": 10}, ["body", "clips", 0, "output", "fps"]),
        ({}, {"format": "m4a", "aspect": "9:16"}, ["body", "clips", 0, "output", "aspect"]),
        ({}, {"fit": "pad"}, ["body", "clips", 0, "output", "fit"]),
        (
            {},
            {"format": "jpg", "thumbnail_at": 9.0},
            ["body", "clips", 0, "output", "thumbnail_at"],
        ),
        ({}, {"max_height": 333}, ["body", "clips", 0, "output", "max_height"]),
        (
            {},
            {"format": "jpg", "captions": {"text": SRT}},
            ["body", "clips", 0, "output", "captions"],
        ),
        ({"merge": True}, {"format": "gif"}, ["body", "merge"]),
        ({"crossfade_s": 0.5}, None, ["body", "crossfade_s"]),
        ({"output": {"width": 100}}, None, ["body", "output", "width"]),
    ],
)
async def test_bad_combinations_are_422_naming_the_field(
    service: Service,
    media_server: MediaServer,
    body_extra: dict[str, Any],
    clip_output: dict[str, Any] | None,
    loc: list[Any],
) -> None:
    """Options that cannot be made for their clip answer 422 with the field's
    location; no job is made."""
    clip: dict[str, Any] = {"start": 1, "end": 3}
    if clip_output is not None:
        clip["output"] = clip_output
    async with await service.create(_job(media_server, [clip], **body_extra)) as resp:
        problem = await assert_problem(resp, 422)
    assert any(e["loc"][: len(loc)] == loc for e in problem["errors"]), problem["errors"]
    assert list(service.settings.jobs_dir.glob("*.json")) == []


@pytest.mark.parametrize(
    "output",
    [
        {"aspect": "2:1"},
        {"format": "avi"},
        {"crop_x": 1.5},
        {"colour": "red"},
        {"captions": {"text": SRT, "url": "https://cdn.example/a.srt"}},
        {"captions": {"url": "file:///etc/passwd"}},
        {"thumbnail_at": 1e400},
        {"fps": -1},
    ],
)
async def test_malformed_options_are_422(
    service: Service, media_server: MediaServer, output: dict[str, Any]
) -> None:
    """Unknown values, unknown fields, out-of-range numbers and non-http captions
    URLs are validation problems."""
    body = _job(media_server, [{"start": 1, "end": 3, "output": output}])
    async with await service.create(body) as resp:
        problem = await assert_problem(resp)
    # (An infinity is not even JSON: a 400.)
    assert problem["status"] in (400, 422)


async def test_captions_longer_than_a_body_are_refused(
    service: Service, media_server: MediaServer
) -> None:
    """Captions text past the 64 KiB body limit is a 413 problem (send a URL instead)."""
    body = _job(
        media_server, [{"start": 1, "end": 3, "output": {"captions": {"text": "x" * 70_000}}}]
    )
    async with await service.create(body) as resp:
        await assert_problem(resp, 413)


async def test_default_options_keep_todays_file_names(
    make_service: ServiceFactory, media_server: MediaServer
) -> None:
    """A clip without options is named as before (no options key) and is an MP4."""
    service = await make_service()
    doc = await _run(service, _job(media_server, [{"start": 1, "end": 2, "mode": "fast"}]))
    name = doc["results"][0]["file"]
    assert name.endswith("-1-2-fast.mp4") and name.count("-") == 3
