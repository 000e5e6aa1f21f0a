"""Soft captions as an MP4 text track (3GPP timed text, FFmpeg's ``mov_text``).

Pure functions over plain ``(start_s, end_s, text)`` cues, so a join process
can mux the track beside the clip's video and audio in the same pass (the cue
tuples pickle without the captions module and its HTTP client).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from typing import Any

import av

CueTuple = tuple[float, float, str]

# The default style FFmpeg gives a text track (its mov_text encoder reads the
# track's sample description from an ASS header): players draw soft captions
# in their own style, this is only the fallback.
HEADER = "\n".join(
    (
        "[Script Info]",
        "ScriptType: v4.00+",
        "PlayResX: 384",
        "PlayResY: 288",
        "",
        "[V4+ Styles]",
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour,"
        " BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle,"
        " BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding",
        "Style: Default,Arial,16,&Hffffff,&Hffffff,&H0,&H0,0,0,0,0,100,100,0,0,1,1,0,2,10,10,10,0",
        "",
        "[Events]",
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
        "",
    )
).encode()
MS = Fraction(1, 1000)
_MAX_SAMPLE_TEXT = 0xFFFF  # a mov_text sample's text length is 16 bits


def clip_cues(cues: Iterable[CueTuple], start_s: float, end_s: float) -> list[CueTuple]:
    """The cues shown within [start_s, end_s), clipped to it and shifted so
    ``start_s`` is 0 (the clip's first frame)."""
    out = []
    for cue_start, cue_end, text in cues:
        if cue_end <= start_s or cue_start >= end_s:
            continue
        a, b = max(cue_start, start_s) - start_s, min(cue_end, end_s) - start_s
        if b - a >= 0.001:
            out.append((a, b, text))
    return out


def text_samples(cues: Iterable[CueTuple]) -> list[tuple[int, int, bytes]]:
    """(start ms, duration ms, sample) of each cue: a 16-bit length and the UTF-8
    text (3GPP timed text). Cues starting at the same millisecond become one
    sample (a track shows one sample at a time; a cue that starts while
    another shows cuts it short)."""
    merged: list[tuple[int, int, str]] = []
    for cue_start, cue_end, cue_text in sorted(cues, key=lambda c: c[0]):
        start, end = round(cue_start * 1000), round(cue_end * 1000)
        if merged and merged[-1][0] == start:
            _, last_end, text = merged[-1]
            merged[-1] = (start, max(end, last_end), f"{text}\n{cue_text}")
        elif end > start:
            merged.append((start, end, cue_text))
    out = []
    for start, end, text in merged:
        data = text.encode()[:_MAX_SAMPLE_TEXT].decode(errors="ignore").encode()
        out.append((start, end - start, len(data).to_bytes(2, "big") + data))
    return out


def add_stream(oc: Any) -> Any:
    """A mov_text stream in the output container ``oc``, in milliseconds."""
    text = oc.add_stream("mov_text")
    text.codec_context.subtitle_header = HEADER
    text.time_base = MS
    return text


def packets(stream: Any, samples: list[tuple[int, int, bytes]]) -> Iterator[Any]:
    """The samples as packets of ``stream``, in time order."""
    for start, duration, data in samples:
        packet = av.Packet(data)
        packet.stream = stream
        packet.time_base = MS
        packet.pts = packet.dts = start
        packet.duration = duration
        yield packet
