"""FFmpeg argument lists for each way of cutting: pure functions, unit-tested.

Input seeking (``-ss`` before ``-i``) makes FFmpeg jump through the source
with HTTP Range requests, so only the bytes around the clip are fetched.
Separate video and audio streams are merged in the same run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

from clipservice.domain import Aspect, Fit, StreamUrls
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


# -- output options: shapes, formats, captions, reels ---------------------------------
#
# Sizes are computed here from the probed source size, so every filter gets
# plain numbers (no expressions that would need escaping) and the tests can
# say exactly which source pixels land where. Every size is even (4:2:0
# chroma) and every picture leaves with SAR 1.

ASPECTS: dict[Aspect, Fraction] = {
    "9:16": Fraction(9, 16),
    "1:1": Fraction(1, 1),
    "4:5": Fraction(4, 5),
    "16:9": Fraction(16, 9),
}
ANIMATION_WIDTH = 480  # a GIF or WebP this wide unless asked (never wider than the frame)
ANIMATION_FPS = 12.0
# The blurred background is made small, blurred, and scaled up: as blurred as
# a large radius at full size, for a sixty-fourth of the work.
_BLUR_SHRINK = 8
X264 = ("-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p")


def even_floor(x: float | Fraction) -> int:
    """The even integer at or below ``x`` (at least 2)."""
    return max(2, int(x) // 2 * 2)


def even_round(x: float | Fraction) -> int:
    """The even integer nearest ``x`` (at least 2)."""
    return max(2, round(x / 2) * 2)


def _even_offset(x: float | Fraction) -> int:
    """An offset in pixels, even (4:2:0 chroma), at or below ``x``, at least 0."""
    return max(0, int(x) // 2 * 2)


def aspect_ratio(aspect: Aspect, src_w: int, src_h: int) -> Fraction:
    """Width over height of the output frame ("source": the source's own)."""
    return ASPECTS[aspect] if aspect != "source" else Fraction(src_w, src_h)


def frame_size(src_w: int, src_h: int, aspect: Aspect, max_height: int | None) -> tuple[int, int]:
    """The output frame (width, height), even.

    With ``max_height``: that height (platform sizes: 9:16 at 1920 is
    1080x1920), scaling up if the source is smaller (the caller asked for
    it). Without: the largest frame of the aspect that fits inside the
    source's own frame (for a crop, the crop region at source resolution),
    so nothing is ever scaled up unasked.
    """
    ratio = aspect_ratio(aspect, src_w, src_h)
    if max_height is not None:
        height = even_floor(max_height)
        return even_round(height * ratio), height
    if Fraction(src_w, src_h) > ratio:  # the source is wider: its height bounds
        height = even_floor(src_h)
        return min(even_round(height * ratio), even_floor(src_w)), height
    width = even_floor(src_w)
    return width, min(even_round(width / ratio), even_floor(src_h))


def animation_size(frame_w: int, frame_h: int, width: int | None) -> tuple[int, int]:
    """A GIF's or WebP's size: ``width`` if asked, else at most ANIMATION_WIDTH
    (never wider than the shaped frame), the height by its aspect, both even."""
    w = even_floor(width if width is not None else min(ANIMATION_WIDTH, frame_w))
    return w, even_round(w * frame_h / frame_w)


@dataclass(frozen=True)
class Region:
    """A rectangle of the source frame, in source pixels."""

    x: int
    y: int
    w: int
    h: int


def crop_region(src_w: int, src_h: int, ratio: Fraction, crop_x: float) -> Region:
    """The largest region of the source with the ``ratio`` (even sizes and
    offsets), at ``crop_x`` across (0 left, 1 right), centred vertically."""
    if Fraction(src_w, src_h) > ratio:
        h = even_floor(src_h)
        w = min(even_round(h * ratio), even_floor(src_w))
    else:
        w = even_floor(src_w)
        h = min(even_round(w / ratio), even_floor(src_h))
    return Region(_even_offset((src_w - w) * crop_x), _even_offset((src_h - h) / 2), w, h)


def fitted(src_w: int, src_h: int, out_w: int, out_h: int) -> Region:
    """Where the whole source frame sits, scaled to fit inside out_w x out_h, centred."""
    if src_w * out_h >= src_h * out_w:  # wider than the frame: full width
        w, h = out_w, min(out_h, even_round(out_w * src_h / src_w))
    else:
        w, h = min(out_w, even_round(out_h * src_w / src_h)), out_h
    return Region(_even_offset((out_w - w) / 2), _even_offset((out_h - h) / 2), w, h)


def shape_graph(
    src_w: int,
    src_h: int,
    out_w: int,
    out_h: int,
    *,
    aspect: Aspect,
    fit: Fit,
    crop_x: float,
) -> str:
    """The video filter graph (one input, one output) that makes the source
    frame an out_w x out_h frame with SAR 1.

    - ``crop``: the region of :func:`crop_region`, scaled to the output;
    - ``pad``: the whole frame scaled to fit (:func:`fitted`), black around it;
    - ``blur``: the whole frame fitted over a copy of itself scaled to fill
      the output, blurred (made small, box-blurred, scaled up);
    - ``aspect="source"``: scaled only.

    The graph's last filter is a plain chain link: more filters are added
    with ``,``.
    """
    scale = f"scale={out_w}:{out_h}"
    if aspect == "source":
        return f"{scale},setsar=1" if (out_w, out_h) != (src_w, src_h) else "setsar=1"
    if fit == "crop":
        r = crop_region(src_w, src_h, aspect_ratio(aspect, src_w, src_h), crop_x)
        resize = f",{scale}" if (r.w, r.h) != (out_w, out_h) else ""
        return f"crop={r.w}:{r.h}:{r.x}:{r.y}{resize},setsar=1"
    inner = fitted(src_w, src_h, out_w, out_h)
    fg = f"scale={inner.w}:{inner.h}"
    if fit == "pad":
        return f"{fg},pad={out_w}:{out_h}:{inner.x}:{inner.y}:black,setsar=1"
    bw, bh = even_round(out_w / _BLUR_SHRINK), even_round(out_h / _BLUR_SHRINK)
    # Scaled to cover the small background, then its middle cut out.
    cover = max(bw / src_w, bh / src_h)
    cw, ch = max(bw, math.ceil(src_w * cover)), max(bh, math.ceil(src_h * cover))
    radius = max(1, min(bw, bh) // 8)
    background = (
        f"scale={cw}:{ch},crop={bw}:{bh},boxblur={radius}:2,scale={out_w}:{out_h}:flags=bilinear"
    )
    return (
        f"split=2[bgsrc][fgsrc];[bgsrc]{background}[bg];[fgsrc]{fg}[fg];"
        f"[bg][fg]overlay={inner.x}:{inner.y},setsar=1"
    )


def filter_value(value: str) -> str:
    """``value`` escaped as one filter option value inside a filter graph
    (both of FFmpeg's escaping levels): for file names in ``ass=filename=…``."""
    level1 = re.sub(r"([\\':])", r"\\\1", value)
    return re.sub(r"([\\'\[\],;])", r"\\\1", level1)


def burn_filter(ass_path: str, fonts_dir: str) -> str:
    """libass drawing an ASS script onto the frames (times from the clip's start),
    with the fonts in ``fonts_dir`` besides the system's (which may have none)."""
    return f"ass=filename={filter_value(ass_path)}:fontsdir={filter_value(fonts_dir)}"


def gif_palette_graph() -> str:
    """A palette made for this clip in the same graph: the frames are split,
    one copy makes the palette (the colours of what moves count most), the
    other is mapped onto it (ordered dither: stable from frame to frame,
    and only the changed rectangle of each frame is re-dithered)."""
    return (
        "split[gifa][gifb];[gifa]palettegen=stats_mode=diff[gifp];"
        "[gifb][gifp]paletteuse=dither=bayer:bayer_scale=5:diff_mode=rectangle"
    )


def mp4_args(
    src: StreamUrls,
    start_s: float,
    end_s: float,
    out: str,
    video_filter: str,
    *,
    subtitles: str | None = None,
) -> list[str]:
    """The clip re-encoded once through ``video_filter`` (H.264 + AAC),
    frame-accurate like :func:`reencode_args`; ``subtitles`` (a local SRT
    file, times from the clip's start) becomes a mov_text track."""
    args = _inputs(src, start_s)
    maps = _maps(src)
    if subtitles is not None:
        args += ["-f", "srt", "-i", subtitles]
        maps += ["-map", f"{2 if src.audio_url else 1}:s:0"]
    return [
        *args,
        "-t",
        ts(end_s - start_s),
        *maps,
        "-vf",
        video_filter,
        *X264,
        *AAC_OUT,
        *(("-c:s", "mov_text") if subtitles is not None else ()),
        *MP4_OUT,
        out,
    ]


def animation_args(
    video_url: str,
    start_s: float,
    end_s: float,
    out: str,
    video_filter: str,
    fmt: Literal["gif", "webp"],
) -> list[str]:
    """A GIF or animated WebP of the clip (no audio; the video input only).

    The length is an input option: the GIF palette is made once its input
    ends, so an output limit would let FFmpeg decode the source to its end.
    """
    codec = (
        ["-c:v", "gif", "-loop", "0", "-f", "gif"]
        if fmt == "gif"
        else ["-c:v", "libwebp_anim", "-loop", "0", "-quality", "75",
              "-compression_level", "3", "-pix_fmt", "yuv420p", "-f", "webp"]
    )  # fmt: skip
    return [
        *_NET_INPUT,
        "-ss",
        ts(start_s),
        "-t",
        ts(end_s - start_s),
        "-i",
        video_url,
        "-map",
        "0:v:0",
        "-an",
        "-vf",
        video_filter,
        *codec,
        out,
    ]


def audio_codec_args(fmt: Literal["m4a", "mp3"]) -> list[str]:
    if fmt == "mp3":
        return ["-c:a", "libmp3lame", "-b:a", "192k", "-f", "mp3"]
    return [*AAC_OUT, "-movflags", "+faststart", "-f", "ipod"]


def audio_args(
    audio_url: str, start_s: float, end_s: float, out: str, fmt: Literal["m4a", "mp3"]
) -> list[str]:
    """The clip's audio alone, encoded (AAC in an m4a, or MP3), from a source
    URL with input seeking: frame-accurate, no video read or written."""
    return [
        *_NET_INPUT,
        "-ss",
        ts(start_s),
        "-i",
        audio_url,
        "-t",
        ts(end_s - start_s),
        "-map",
        "0:a:0",
        "-vn",
        "-sn",
        "-dn",
        *audio_codec_args(fmt),
        out,
    ]


def pcm_audio_args(
    pcm: str, rate: int, channels: int, out: str, fmt: Literal["m4a", "mp3"]
) -> list[str]:
    """Raw PCM read from standard input (the clip's exact audio) encoded to ``fmt``."""
    return [
        "-f", pcm, "-ar", str(rate), "-ac", str(channels), "-i", "pipe:0",
        "-map", "0:a:0", *audio_codec_args(fmt), out,
    ]  # fmt: skip


def transcode_audio_args(local: str, out: str, fmt: Literal["m4a", "mp3"]) -> list[str]:
    """A local audio file (already the clip's audio) encoded to ``fmt``."""
    return ["-i", local, "-map", "0:a:0", "-vn", *audio_codec_args(fmt), out]


def image_codec_args(fmt: Literal["jpg", "png"]) -> list[str]:
    codec = ["-c:v", "mjpeg", "-q:v", "2"] if fmt == "jpg" else ["-c:v", "png"]
    return [*codec, "-frames:v", "1", "-update", "1", "-f", "image2"]


def thumbnail_args(
    video_url: str, at_s: float, out: str, video_filter: str, fmt: Literal["jpg", "png"]
) -> list[str]:
    """One frame, the first shown at or after ``at_s``, from a source URL (input
    seeking: decoded from the keyframe before it)."""
    return [
        *_NET_INPUT, "-ss", ts(at_s), "-i", video_url, "-map", "0:v:0", "-an", "-sn",
        "-vf", video_filter, *image_codec_args(fmt), out,
    ]  # fmt: skip


def local_thumbnail_args(
    gop: str, frame_index: int, out: str, video_filter: str, fmt: Literal["jpg", "png"]
) -> list[str]:
    """Frame number ``frame_index`` (in presentation order) of a local file that
    holds one GOP: decoded from its keyframe, the frames before it dropped."""
    select = f"select=eq(n\\,{frame_index})"
    return [
        "-i", gop, "-map", "0:v:0", "-an", "-sn",
        "-vf", f"{select},{video_filter}", *image_codec_args(fmt), out,
    ]  # fmt: skip


def concat_copy_args(list_file: str, out: str, *, moov_bytes: int = 0) -> list[str]:
    """Clips joined by stream copy (the concat demuxer over a local list). With
    ``moov_bytes``, that much room is left at the front for the moov (one
    pass; FFmpeg fails if it is short) instead of ``+faststart``'s second
    pass over the file."""
    mp4 = ("-moov_size", str(moov_bytes), "-f", "mp4") if moov_bytes > 0 else MP4_OUT
    return [
        "-f", "concat", "-safe", "0", "-i", list_file, "-map", "0", "-c", "copy",
        *mp4, out,
    ]  # fmt: skip


@dataclass(frozen=True)
class MergePart:
    """One clip of a reel, as the re-encoding merge needs to know it."""

    path: str
    duration_s: float
    has_audio: bool


def merge_args(
    parts: list[MergePart],
    out: str,
    *,
    width: int,
    height: int,
    fps: Fraction,
    crossfade_s: float = 0.0,
    audio: bool = True,
) -> list[str]:
    """Clips joined by one re-encode: each fitted to width x height (padded,
    SAR 1, ``fps``), audio made 48 kHz stereo (silence for a clip without),
    then concatenated, or with ``crossfade_s`` chained through ``xfade`` and
    ``acrossfade`` (the reel is (n-1) crossfades shorter)."""
    args: list[str] = []
    for part in parts:
        args += ["-i", part.path]
    graph: list[str] = []
    rate = f"{fps.numerator}/{fps.denominator}"
    for i, part in enumerate(parts):
        fit = fitted_graph(width, height)
        graph.append(f"[{i}:v:0]{fit},fps={rate},format=yuv420p,settb=AVTB[v{i}]")
        if not audio:
            continue
        if part.has_audio:
            graph.append(
                f"[{i}:a:0]aformat=sample_rates=48000:channel_layouts=stereo,"
                f"apad,atrim=end={ts(part.duration_s)},asetpts=PTS-STARTPTS[a{i}]"
            )
        else:
            graph.append(
                f"anullsrc=r=48000:cl=stereo,atrim=end={ts(part.duration_s)},"
                f"asetpts=PTS-STARTPTS[a{i}]"
            )
    n = len(parts)
    if crossfade_s <= 0 or n == 1:
        ins = "".join(f"[v{i}]" + (f"[a{i}]" if audio else "") for i in range(n))
        graph.append(f"{ins}concat=n={n}:v=1:a={1 if audio else 0}[v]" + ("[a]" if audio else ""))
    else:
        at = 0.0
        vlast, alast = "v0", "a0"
        for i in range(1, n):
            at += parts[i - 1].duration_s - crossfade_s
            vout = "v" if i == n - 1 else f"vx{i}"
            graph.append(
                f"[{vlast}][v{i}]xfade=transition=fade:duration={ts(crossfade_s)}"
                f":offset={ts(at)}[{vout}]"
            )
            vlast = vout
            if audio:
                aout = "a" if i == n - 1 else f"ax{i}"
                graph.append(f"[{alast}][a{i}]acrossfade=d={ts(crossfade_s)}[{aout}]")
                alast = aout
    maps = ["-map", "[v]"] + (["-map", "[a]"] if audio else [])
    return [
        *args,
        "-filter_complex",
        ";".join(graph),
        *maps,
        *X264,
        *(AAC_OUT if audio else ("-an",)),
        *MP4_OUT,
        out,
    ]


def fitted_graph(width: int, height: int) -> str:
    """Any frame scaled to fit width x height, padded black, SAR 1 (expressions:
    the clips' sizes are read by FFmpeg, not known here)."""
    return (
        f"scale={width}:{height}:force_original_aspect_ratio=decrease:force_divisible_by=2,"
        f"pad={width}:{height}:(ow-iw)/2:(oh-ih)/2:black,setsar=1"
    )
