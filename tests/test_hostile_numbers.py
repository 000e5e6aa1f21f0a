"""Hostile numbers: every numeric field and header answers a 4xx problem, never a 5xx.

The class, not one case: integers of any size (a huge one used to overflow a
float conversion into a 500), exponents past a float (JSON ``1e400`` reads as
infinity), negative zero, floats that round to the same microsecond, times
past any timestamp. Property-based tests drive the request models with
arbitrary JSON values; hand-picked bodies and headers go through the live
service.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from clipservice.api.schemas import MAX_TIME_S, CreateClipsRequest, parse_time
from clipservice.config import Settings
from clipservice.media.render import check_options
from tests.conftest import MediaServer, Service, ServiceFactory, assert_problem

NUMBERS = st.one_of(
    st.integers(),  # unbounded: thousands of digits
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=2 * MAX_TIME_S),
    st.sampled_from([0, -0.0, 0.0, 1e-400, 1e400, -1e400, 2**53, 2**63, 2**64 + 1, MAX_TIME_S]),
    st.decimals(allow_nan=False, allow_infinity=False).map(float),
)
TIME_STRINGS = st.one_of(
    st.text(max_size=24),
    st.from_regex(r"\A[0-9]{1,12}(\.[0-9]{1,9})?\Z"),
    st.from_regex(r"\A([0-9]{1,5}:)?[0-9]{1,5}:[0-9]{2}(\.[0-9]{1,8})?\Z"),
    st.sampled_from(["1e3", "1E400", "-0", "+1", " 12 ", "nan", "inf", "0x10", "1_000", "٣"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | NUMBERS | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
TIMES = st.one_of(NUMBERS, TIME_STRINGS, JSON_VALUES)
CLIPS = st.lists(
    st.fixed_dictionaries(
        {"start": TIMES, "end": TIMES},
        optional={"mode": st.sampled_from(["fast", "accurate", "reencode", "FAST", 1, None])},
    ),
    max_size=4,
)
SETTINGS = Settings()


@given(value=st.one_of(NUMBERS, TIME_STRINGS, JSON_VALUES))
@settings(max_examples=1500, deadline=None, database=None)
def test_parse_time_refuses_the_whole_class(value: Any) -> None:
    """parse_time answers a finite float in [0, MAX_TIME_S] or raises ValueError,
    for any JSON value at all; never OverflowError, TypeError or the like."""
    try:
        seconds = parse_time(value)
    except ValueError:
        return
    assert isinstance(seconds, float) and math.isfinite(seconds)
    assert 0.0 <= seconds <= MAX_TIME_S
    assert math.copysign(1.0, seconds) == 1.0  # never -0.0


@given(clips=CLIPS, video_id=st.sampled_from(["dQw4w9WgXcQ", None, 7, "a" * 65]))
@settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_request_model_accepts_or_refuses_never_breaks(clips: Any, video_id: Any) -> None:
    """The create-clips model validates any clips list to either a request whose
    times are sane (finite, 0 ≤ start < end, within the limits) or a
    ValidationError (a 422) — nothing else escapes."""
    body: dict[str, Any] = {"clips": clips}
    if video_id is not None:
        body["video_id"] = video_id
    try:
        request = CreateClipsRequest.model_validate(body, context={"settings": SETTINGS})
    except ValidationError:
        return
    limits = SETTINGS.jobs
    assert 1 <= len(request.clips) <= limits.max_clips_per_job
    total = 0.0
    for clip in request.clips:
        assert isinstance(clip.start, float) and isinstance(clip.end, float)
        assert 0 <= clip.start < clip.end <= MAX_TIME_S
        assert clip.end - clip.start <= limits.max_clip_duration_s
        total += clip.end - clip.start
    assert total <= limits.max_job_duration_s


OUTPUT_NUMBERS = st.one_of(NUMBERS, TIME_STRINGS, JSON_VALUES)
OUTPUTS = st.fixed_dictionaries(
    {},
    optional={
        "max_height": OUTPUT_NUMBERS,
        "fps": OUTPUT_NUMBERS,
        "width": OUTPUT_NUMBERS,
        "crop_x": OUTPUT_NUMBERS,
        "thumbnail_at": OUTPUT_NUMBERS,
        "aspect": st.sampled_from(["source", "9:16", "1:1", 9, None]),
        "fit": st.sampled_from(["crop", "pad", "blur", 0]),
        "format": st.sampled_from(["mp4", "gif", "webp", "jpg", "png", "m4a", "mp3", 1e400]),
    },
)


@given(output=OUTPUTS, crossfade=OUTPUT_NUMBERS, merge=st.booleans())
@settings(
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_output_numbers_are_accepted_or_refused_never_break(
    output: Any, crossfade: Any, merge: bool
) -> None:
    """The output options' numbers (max_height, fps, width, crop_x, thumbnail_at) and
    crossfade_s, as any JSON value: the model refuses them (a 422) or keeps finite numbers,
    and check_options then answers a list of (field, message) — never an exception."""
    body: dict[str, Any] = {
        "video_id": "dQw4w9WgXcQ",
        "clips": [{"start": 1, "end": 3, "output": output}],
        "merge": merge,
        "crossfade_s": crossfade,
    }
    try:
        request = CreateClipsRequest.model_validate(body, context={"settings": SETTINGS})
    except ValidationError:
        return
    assert 0 <= request.crossfade_s <= 2 and math.isfinite(request.crossfade_s)
    (clip,) = request.clips
    assert clip.output is not None
    options = clip.output.options()
    for value in (options.max_height, options.fps, options.width, options.thumbnail_at):
        assert value is None or (math.isfinite(value) and value >= 0)
    assert 0 <= options.crop_x <= 1
    problems = check_options(options, clip.start, clip.end)
    assert all(isinstance(f, str) and isinstance(m, str) for f, m in problems)


# Raw bodies, so the JSON text itself can hold what Python would not write.
HOSTILE_BODIES = [
    '{"video_id": "abc", "clips": [{"start": 1%s, "end": 2}]}' % ("0" * 400),
    '{"video_id": "abc", "clips": [{"start": 1, "end": 1%s}]}' % ("0" * 5000),
    '{"video_id": "abc", "clips": [{"start": -1%s, "end": 2}]}' % ("0" * 400),
    '{"video_id": "abc", "clips": [{"start": 1e400, "end": 2e400}]}',
    '{"video_id": "abc", "clips": [{"start": 1e308, "end": 1.7976931348623157e308}]}',
    '{"video_id": "abc", "clips": [{"start": -1e-400, "end": 1e-400}]}',
    '{"video_id": "abc", "clips": [{"start": 1.0000001, "end": 1.0000002}]}',
    '{"video_id": "abc", "clips": [{"start": 5, "end": 5.0000000001}]}',
    '{"video_id": "abc", "clips": [{"start": 9007199254740993, "end": 9007199254740994}]}',
    '{"video_id": "abc", "clips": [{"start": 10000000, "end": 10000001}]}',
    '{"video_id": "abc", "clips": [{"start": "9999999.999999", "end": "99999999"}]}',
    '{"video_id": "abc", "clips": [{"start": "999:59:59.999999", "end": "9999:59:59"}]}',
    '{"video_id": "abc", "clips": [{"start": "1e3", "end": "1E400"}]}',
    '{"video_id": "abc", "clips": [{"start": "00:00:01", "end": "00:00:01.0000001"}]}',
    '{"video_id": "abc", "clips": [{"start": true, "end": 2}]}',
    '{"video_id": "abc", "clips": [{"start": [1], "end": {"a": 2}}]}',
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1}], "mode": 1e400}',
    '{"video_id": 1%s, "clips": [{"start": 0, "end": 1}]}' % ("0" * 400),
    '{"video_id": "abc", "clips": [' + ", ".join(['{"start": 0, "end": 600}'] * 7) + "]}",
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1}], "callback_url": 1e400}',
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1, "output": {"max_height": 1%s}}]}'
    % ("0" * 400),
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1, "output": {"format": "gif",'
    ' "fps": 1e400, "width": -0.0}}]}',
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1, "output": {"aspect": "9:16",'
    ' "crop_x": 1e400}}]}',
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1, "output": {"format": "jpg",'
    ' "thumbnail_at": 1%s}}]}' % ("0" * 400),
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1}], "merge": true, "crossfade_s": 1e400}',
    '{"video_id": "abc", "clips": [{"start": 0, "end": 1}], "merge": 1%s}' % ("0" * 400),
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
async def test_hostile_numbers_get_a_problem(service: Service, body: str) -> None:
    """Each hostile numeric body answers a 4xx problem naming what is wrong; no
    job is made."""
    async with service.http.post(
        f"{service.base_url}/api/create-clips",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    ) as resp:
        problem = await assert_problem(resp)
    assert problem["status"] in (400, 422)
    assert list(service.settings.jobs_dir.glob("*.json")) == []


@pytest.mark.parametrize(
    ("start", "end"), [("-0", "1"), ("-0.0", "1e0"), ("0e5", "1.5E0"), ("1E-400", "2")]
)
async def test_negative_zero_and_exponents_are_just_numbers(
    service: Service, start: str, end: str
) -> None:
    """-0 is 0 and JSON exponents within range are plain seconds: such a body makes
    a job whose clip times are those numbers."""
    clip = '{"start": ' + start + ', "end": ' + end + "}"
    body = '{"video_url": "https://cdn.example/v.mp4", "clips": [' + clip + "]}"
    async with service.http.post(
        f"{service.base_url}/api/create-clips",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["job_id"]
    doc = await service.job(job_id)
    assert doc["total"] == 1
    stored = json.loads((service.settings.jobs_dir / f"{job_id}.json").read_text())
    clip = stored["clips"][0]
    assert clip["start"] == float(start) + 0.0 and clip["end"] == float(end)
    assert math.copysign(1.0, clip["start"]) == 1.0


async def _a_clip(service: Service, media_server: MediaServer) -> str:
    async with await service.create(
        {
            "video_url": media_server.url("video.mp4"),
            "clips": [{"start": 1, "end": 2, "mode": "fast"}],
        }
    ) as resp:
        job_id = (await resp.json())["job_id"]
    doc = await service.wait(job_id)
    assert doc["status"] == "finished", doc
    return str(doc["results"][0]["url"])


@pytest.mark.parametrize(
    "header",
    [
        {"Range": "bytes=0-" + "9" * 400},
        {"Range": "bytes=" + "9" * 400 + "-"},
        {"Range": "bytes=-" + "9" * 400},
        {"Range": "bytes=18446744073709551616-18446744073709551617"},
        {"Range": "bytes=1e3-2e3"},
        {"Range": "bytes=-0"},
        {"Range": "bytes=5-1"},
        {"If-Range": "9" * 400},
        {"If-Modified-Since": "Mon, 01 Jan 99999 00:00:00 GMT"},
        {"If-None-Match": "9" * 5000},
    ],
)
async def test_hostile_headers_on_clip_downloads(
    make_service: ServiceFactory, media_server: MediaServer, header: dict[str, str]
) -> None:
    """Ranges and conditional headers with numbers past any file or timestamp
    answer 206, 200, 304 or a 416/400 problem: never a 5xx."""
    service = await make_service()
    url = await _a_clip(service, media_server)
    async with service.http.get(f"{service.base_url}{url}", headers=header) as resp:
        if resp.status >= 400:
            await assert_problem(resp)
        else:
            assert resp.status in (200, 206, 304), resp.status
            await resp.read()
    async with service.http.get(f"{service.base_url}/healthz") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "header",
    [
        {"Idempotency-Key": "9" * 5000},
        {"Idempotency-Key": "1e400"},
        {"Last-Event-ID": "9" * 5000},
        {"Content-Length": "9" * 40},
        {"X-Request-ID": "9" * 5000},
    ],
)
async def test_hostile_numeric_headers_on_the_api(service: Service, header: dict[str, str]) -> None:
    """Numeric-looking headers of any size get a 4xx problem or are ignored, never
    a 5xx."""
    body = {"video_url": "https://cdn.example/v.mp4", "clips": [{"start": 0, "end": 1}]}
    async with service.http.post(
        f"{service.base_url}/api/create-clips", json=body, headers=header
    ) as resp:
        if resp.status >= 400:
            await assert_problem(resp)
        else:
            assert resp.status == 202
    async with service.http.get(f"{service.base_url}/healthz") as resp:
        assert resp.status == 200
