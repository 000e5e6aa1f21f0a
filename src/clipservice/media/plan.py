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


@dataclass(frozen=True)
class EncodeParams:
    """x264 settings that make re-encoded frames fit the source's stream."""

    profile: str  # x264 profile name: baseline | main | high
    level: str  # e.g. "3.1"
    pix_fmt: str
    width: int
    height: int
    timescale: int  # MP4 track timescale (the source's time base denominator)
    color: tuple[tuple[str, str], ...] = ()  # (-color_primaries, bt709)…

    def args(self, sps_id: int) -> list[str]:
        color = [a for k, v in self.color for a in (k, v)]
        return [
            # One thread: a GOP of frames gains nothing from x264's frame
            # threads, and clips cut side by side share the cores better.
            "-threads",
            "1",
            "-c:v",
            "libx264",
            # A GOP or two of frames: the fastest preset, a low CRF for quality.
            "-preset",
            "ultrafast",
            "-crf",
            "14",
            "-profile:v",
            self.profile,
            "-level:v",
            self.level,
            "-pix_fmt",
            self.pix_fmt,
            "-s",
            f"{self.width}x{self.height}",
            # No B-frames: packets stay in presentation order, so the joined
            # stream's decode times are easy to keep increasing.
            "-bf",
            "0",
            "-x264-params",
            f"sps-id={sps_id}",
            *color,
            "-fps_mode",
            "passthrough",
            "-video_track_timescale",
            str(self.timescale),
        ]


@dataclass(frozen=True)
class Segment:
    """Frames to re-encode: ``frames`` frames from the one at ``start_s``."""

    start_s: float
    frames: int
    out: str
    sps_id: int


def smart_parts_args(
    src: Inputs,
    segments: list[Segment],
    params: EncodeParams | None,
    audio_start_s: float,
    audio_duration_s: float,
    audio_out: str | None,
) -> list[str]:
    """One FFmpeg run that re-encodes the partial GOPs of a smart cut (each to
    its own MP4) and cuts the audio to exactly the clip's span (AAC).

    Each segment's input is seeked a hair before its first frame (FFmpeg keeps
    frames at or after the seek point) and stops after an exact frame count.
    """
    args: list[str] = []
    outputs: list[str] = []
    for i, seg in enumerate(segments):
        assert params is not None, "segments to encode need encoder parameters"
        args += [
            *_NET_INPUT,
            "-threads",  # decoding one GOP: one thread, as for the encoder
            "1",
            "-ss",
            ts(max(0.0, seg.start_s - 0.0005)),
            "-i",
            src.video_url,
        ]
        outputs += [
            "-map",
            f"{i}:v:0",
            "-frames:v",
            str(seg.frames),
            *params.args(seg.sps_id),
            "-an",
            "-f",
            "mp4",
            seg.out,
        ]
    if audio_out is not None:
        k = len(segments)
        audio_url = src.audio_url or src.video_url
        args += [*_NET_INPUT, "-ss", ts(audio_start_s), "-i", audio_url]
        outputs += [
            "-map",
            f"{k}:a:0",
            "-t",
            ts(audio_duration_s),
            "-vn",
            *AAC_OUT,
            "-f",
            "mp4",
            audio_out,
        ]
    return [*args, *outputs]
