"""FFmpeg argument lists for each way of cutting: pure functions, unit-tested.

Input seeking (``-ss`` before ``-i``) makes FFmpeg jump through the source
with HTTP Range requests, so only the bytes around the clip are fetched.
Separate video and audio streams are merged in the same run.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Inputs:
    """Where the video (and maybe separate audio) come from."""

    video_url: str
    audio_url: str | None


def _inputs(src: Inputs, seek_s: float) -> list[str]:
    args = [*_NET_INPUT, "-ss", ts(seek_s), "-i", src.video_url]
    if src.audio_url:
        args += [*_NET_INPUT, "-ss", ts(seek_s), "-i", src.audio_url]
    return args


def _maps(src: Inputs) -> list[str]:
    audio = "1:a:0" if src.audio_url else "0:a:0?"
    return ["-map", "0:v:0", "-map", audio]


MP4_OUT = ("-movflags", "+faststart", "-f", "mp4")
AAC_OUT = ("-c:a", "aac", "-b:a", "160k")


def reencode_args(src: Inputs, start_s: float, end_s: float, out: str) -> list[str]:
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


def copy_args(
    src: Inputs, start_s: float, end_s: float, out: str, *, audio_codec: str | None
) -> list[str]:
    """Stream copy of the video from ``start_s`` (a keyframe) to ``end_s``; audio
    copied when it is AAC, re-encoded otherwise."""
    audio = ["-c:a", "copy"] if audio_codec == "aac" else list(AAC_OUT)
    return [
        *_inputs(src, start_s),
        "-t",
        ts(end_s - start_s),
        *_maps(src),
        "-c:v",
        "copy",
        *audio,
        "-avoid_negative_ts",
        "make_zero",
        *MP4_OUT,
        out,
    ]


def fast_args(
    src: Inputs,
    key_s: float,
    video_s: float,
    audio_s: float,
    out: str,
    *,
    audio_codec: str | None,
) -> list[str]:
    """Stream copy of ``video_s`` of video from the keyframe at ``key_s``, with
    ``audio_s`` of audio seeked to the same instant so both start together.

    The video is seeked a hair past the keyframe (FFmpeg lands on the keyframe
    at or before the seek point, and rounding must not step back a GOP). Each
    input gets its own ``-t``: a stream copy stops by decode time, which with
    B-frames is not the presentation end. AAC audio is copied (its first frame
    trimmed by the usual AAC edit list), anything else becomes AAC.
    """
    audio = ["-c:a", "copy"] if audio_codec == "aac" else list(AAC_OUT)
    seek = key_s + 0.0005
    args = [*_NET_INPUT, "-ss", ts(seek), "-t", ts(video_s - 0.0005), "-i", src.video_url]
    if src.audio_url:
        args += [*_NET_INPUT, "-ss", ts(key_s), "-t", ts(audio_s), "-i", src.audio_url]
    else:
        audio = ["-t", ts(audio_s), *audio]
    return [*args, *_maps(src), "-c:v", "copy", *audio, *MP4_OUT, out]


def audio_args(src: Inputs, start_s: float, duration_s: float, out: str) -> list[str]:
    """The audio of exactly [start_s, start_s + duration_s) as AAC, for a smart
    cut whose source audio is not AAC (so cannot be copied)."""
    audio_url = src.audio_url or src.video_url
    return [
        *_NET_INPUT,
        "-ss",
        ts(start_s),
        "-i",
        audio_url,
        "-map",
        "0:a:0",
        "-t",
        ts(duration_s),
        "-vn",
        *AAC_OUT,
        "-f",
        "mp4",
        out,
    ]
