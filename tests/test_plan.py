"""FFmpeg argument building: pure functions, checked without running FFmpeg."""

from __future__ import annotations

from clipservice.domain import StreamUrls
from clipservice.media import ffmpeg_args

SRC = StreamUrls("https://cdn.test/v.mp4", "https://cdn.test/a.m4a")


def test_ts_formatting() -> None:
    """Seconds are written plainly, without float noise."""
    assert ffmpeg_args.ts(10) == "10"
    assert ffmpeg_args.ts(65.5) == "65.5"
    assert ffmpeg_args.ts(0) == "0"
    assert ffmpeg_args.ts(1 / 3) == "0.333333"


def test_reencode_seeks_both_inputs_and_merges() -> None:
    """Both inputs are seeked before -i (Range reads), mapped together, H.264/AAC MP4."""
    args = ffmpeg_args.reencode_args(SRC, 10, 20, "/data/clips/x.mp4")
    i_video = args.index("https://cdn.test/v.mp4")
    i_audio = args.index("https://cdn.test/a.m4a")
    assert args[i_video - 1] == "-i" and args[i_audio - 1] == "-i"
    assert args[i_video - 3 : i_video - 1] == ["-ss", "10"]
    assert args[i_audio - 3 : i_audio - 1] == ["-ss", "10"]
    assert args[args.index("-t") + 1] == "10"
    assert args[args.index("-map") : args.index("-map") + 4] == ["-map", "0:v:0", "-map", "1:a:0"]
    assert "libx264" in args and "aac" in args
    assert "+faststart" in args
    assert args[-1] == "/data/clips/x.mp4"


def test_inputs_restricted_to_network_protocols() -> None:
    """Every input is opened with a protocol whitelist that has no local protocols (httpproxy is
    the CONNECT tunnel through the egress proxy, for https)."""
    args = ffmpeg_args.reencode_args(SRC, 1, 2, "/o.mp4")
    whitelists = [args[i + 1] for i, a in enumerate(args) if a == "-protocol_whitelist"]
    assert len(whitelists) == 2
    for w in whitelists:
        assert set(w.split(",")) == {"http", "https", "tcp", "tls", "httpproxy"}


def test_muxed_source_maps_optional_audio() -> None:
    """Without a separate audio URL, audio comes from the video input if it has any."""
    args = ffmpeg_args.reencode_args(StreamUrls("https://cdn.test/m.mp4", None), 1, 2, "/o.mp4")
    assert args.count("-i") == 1
    assert "0:a:0?" in args
