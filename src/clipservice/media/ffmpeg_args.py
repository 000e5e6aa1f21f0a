"""FFmpeg argument lists for each way of cutting: pure functions, unit-tested.

Input seeking (``-ss`` before ``-i``) makes FFmpeg jump through the source
with HTTP Range requests, so only the bytes around the clip are fetched.
Separate video and audio streams are merged in the same run.
"""

from __future__ import annotations

from clipservice.domain import StreamUrls
from clipservice.media.ffmpeg import SOURCE_INPUT_OPTIONS

# Network inputs: only network protocols, bounded reads, reconnect on drops.
_NET_INPUT = (
    *(arg for name, value in SOURCE_INPUT_OPTIONS.items() for arg in (f"-{name}", value)),
    "-rw_timeout",
    "20000000",
    "-reconnect",
    "1",
    "-reconnect_on_network_error",
    "1",
)


def ts(seconds: float) -> str:
    """Seconds as FFmpeg wants them: plain decimal, microsecond precision."""
    return f"{seconds:.6f}".rstrip("0").rstrip(".") or "0"


def _inputs(src: StreamUrls, seek_s: float) -> list[str]:
    args = [*_NET_INPUT, "-ss", ts(seek_s), "-i", src.video_url]
    if src.audio_url:
        args += [*_NET_INPUT, "-ss", ts(seek_s), "-i", src.audio_url]
    return args


def _maps(src: StreamUrls) -> list[str]:
    audio = "1:a:0" if src.audio_url else "0:a:0?"
    return ["-map", "0:v:0", "-map", audio]


MP4_OUT = ("-movflags", "+faststart", "-f", "mp4")
AAC_OUT = ("-c:a", "aac", "-b:a", "160k")


def reencode_args(src: StreamUrls, start_s: float, end_s: float, out: str) -> list[str]:
    """The whole clip re-encoded to H.264/AAC, frame-accurate (decode-and-discard seek)."""
    return [
        *_inputs(src, start_s),
        "-t",
        ts(end_s - start_s),
        *_maps(src),
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
        "-crf",
        "20",
        "-pix_fmt",
        "yuv420p",
        *AAC_OUT,
        *MP4_OUT,
        out,
    ]
