"""Vidfly answer parsing and stream choice, on the fixture and on odd answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from clipservice.errors import SourceError
from clipservice.sources.vidfly import choose_streams, parse_items

M = "https://media.test"
FIXTURE = json.loads(
    (Path(__file__).parent / "fixtures" / "vidfly-response.json")
    .read_text()
    .replace("{MEDIA_BASE}", M)
)


def _choose(payload: Any, max_height: int = 1080) -> tuple[str, str | None]:
    items, _ = parse_items(payload)
    return choose_streams(items, max_height)


def test_fixture_best_video_and_audio() -> None:
    """The fixture gives the 1080p MP4 video plus the m4a audio."""
    assert _choose(FIXTURE) == (f"{M}/video-1080.mp4", f"{M}/audio.m4a")


def test_max_height_caps_the_choice_and_prefers_mp4() -> None:
    """At max_height 720 the 720p MP4 wins over the 720p WebM."""
    assert _choose(FIXTURE, 720)[0] == f"{M}/video-720.mp4"


def test_falls_back_to_muxed_without_audio() -> None:
    """Without an audio stream, the best video_with_audio stream is used alone."""
    data = json.loads(json.dumps(FIXTURE))
    data["data"]["items"] = [i for i in data["data"]["items"] if i["type"] != "audio"]
    assert _choose(data) == (f"{M}/muxed-360.mp4", None)


def test_only_taller_streams_takes_the_smallest() -> None:
    """When every stream is taller than max_height, the least tall is chosen."""
    payload = {"data": {"items": [
        {"type": "video_only", "label": "1080p", "ext": "mp4", "url": "https://h/1080"},
        {"type": "video_only", "label": "1440p", "ext": "mp4", "url": "https://h/1440"},
        {"type": "audio", "label": "128kbps", "ext": "m4a", "url": "https://h/a"},
    ]}}  # fmt: skip
    assert _choose(payload, 720) == ("https://h/1080", "https://h/a")


def test_tolerates_other_field_names() -> None:
    """Other list names, kinds, heights and missing fields still parse."""
    payload = {
        "result": "ok",
        "data": {
            "formats": [
                {
                    "kind": "Video-Only",
                    "quality": "720P",
                    "extension": "MP4",
                    "link": "https://h/v",
                },
                {"type": "audio_only", "quality": "160kbps", "link": "https://h/a"},
                {"type": "weird", "url": "https://h/w"},
                {"type": "video_only", "url": "javascript:alert(1)"},
                "garbage",
                {"type": "audio"},
            ]
        },
    }
    assert _choose(payload) == ("https://h/v", "https://h/a")


def test_top_level_items_without_data() -> None:
    """An answer with the items at the top level is accepted."""
    payload = {"items": [{"type": "video_with_audio", "label": "360p", "url": "https://h/m"}]}
    assert _choose(payload) == ("https://h/m", None)


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "text",
        {"data": None},
        {"data": {"items": None}},
        {"code": 1, "message": "private video"},
        {"data": {"items": []}},
        {"data": {"items": [{"type": "audio", "url": "https://h/a"}]}},
    ],
)
def test_malformed_answers_are_source_unavailable(payload: Any) -> None:
    """Malformed answers raise source_unavailable with a message."""
    with pytest.raises(SourceError) as info:
        _choose(payload)
    assert info.value.code == "source_unavailable"
    assert info.value.message


def test_non_http_streams_are_never_chosen() -> None:
    """file:, ftp: and data: stream URLs are skipped when http(s) ones exist, and an
    answer with nothing else is refused as a policy matter (source_forbidden)."""
    mixed = {"data": {"items": [
        {"type": "video_only", "label": "1080p", "ext": "mp4", "url": "file:///etc/passwd"},
        {"type": "video_only", "label": "720p", "ext": "mp4", "url": "https://h/720"},
        {"type": "audio", "label": "160kbps", "ext": "m4a", "url": "ftp://h/a"},
        {"type": "audio", "label": "128kbps", "ext": "m4a", "url": "https://h/a"},
    ]}}  # fmt: skip
    assert _choose(mixed) == ("https://h/720", "https://h/a")
    only = {"data": {"items": [
        {"type": "video_with_audio", "label": "360p", "url": "data:video/mp4;base64,AAAA"},
        {"type": "audio", "url": "https://h/a"},
    ]}}  # fmt: skip
    with pytest.raises(SourceError) as info:
        _choose(only)
    assert info.value.code == "source_forbidden" and "data:" in info.value.message
