"""Captions for a clip: WebVTT or SRT read, cut to the clip, and written for FFmpeg.

A small tolerant parser rather than a library: the two formats are a list of
timed blocks, and what a clip needs of them is only each cue's times and
plain text (styling, positions and regions are dropped: the soft track is
mov_text, the burned one gets one readable default style). Tolerant means a
damaged block is skipped, not fatal: CRLF or CR line ends, a BOM, missing
cue numbers, ``,`` or ``.`` before the milliseconds, ``mm:ss.ttt`` WebVTT
times, cue settings after the end time, tags (``<i>``, ``<c.x>``, ``<v Name>``,
``{\\an8}``) and HTML entities in the text. A text in which no cue at all can
be read is refused (:class:`CaptionsError`), so an error page fetched instead
of a subtitle file is not taken for an empty one.

Times: cues are in source seconds (the clip's ``start`` is user time, the
same timeline); :func:`cut_cues` keeps what overlaps the clip's
[actual_start, actual_end) and shifts it to the clip's own zero.
"""

from __future__ import annotations

import codecs
import html
import re
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from yarl import URL

from clipservice.domain import Captions
from clipservice.errors import ClipFailure, SourceError
from clipservice.media import movtext
from clipservice.sources.guard import MAX_REDIRECTS, ForbiddenAddressError, UrlGuard

MAX_CAPTIONS_BYTES = 1024 * 1024
MAX_CUES = 20_000
FETCH_TIMEOUT_S = 15.0
# The font the burned style names. It comes with the package (FONTS_DIR, given
# to libass): a host or image without fonts (python:slim has none) would
# otherwise burn nothing at all, silently.
FONT_NAME = "DejaVu Sans"
FONTS_DIR = Path(__file__).parent / "fonts"

_TIME = r"(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d{1,3}))?"
_TIMING = re.compile(rf"^\s*{_TIME}\s*-->\s*{_TIME}")
_TAG = re.compile(r"<[^>\n]*>")
_ASS_OVERRIDE = re.compile(r"\{\\[^}\n]*\}")
_BLOCKS = re.compile(r"\n[ \t]*\n")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class CaptionsError(ValueError):
    """The captions cannot be used (nothing readable, too large, not fetched)."""


@dataclass(frozen=True)
class Cue:
    """One caption: shown from ``start_s`` until ``end_s``, plain text (lines by ``\\n``)."""

    start_s: float
    end_s: float
    text: str


def _seconds(hours: str | None, minutes: str, seconds: str, fraction: str | None) -> float:
    frac = int(fraction) / 10 ** len(fraction) if fraction else 0.0
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + frac


def _clean(lines: list[str]) -> str:
    out = []
    for line in lines:
        line = _ASS_OVERRIDE.sub("", _TAG.sub("", line))
        line = html.unescape(line).replace("\u200e", "").replace("\u200f", "").strip()
        if line:
            out.append(line)
    return "\n".join(out)


def parse_captions(text: str) -> list[Cue]:
    """The cues of a WebVTT or SRT text, sorted by start; raise CaptionsError
    when none can be read (or there are more than MAX_CUES)."""
    if "\x00" in text:
        raise CaptionsError("the captions are not text")
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    cues: list[Cue] = []
    for block in _BLOCKS.split(text):
        lines = block.strip("\n").split("\n")
        head = lines[0].strip()
        if head.startswith(("NOTE", "STYLE", "REGION")) and "-->" not in head:
            continue  # WebVTT comment and definition blocks
        at = next((i for i, line in enumerate(lines) if "-->" in line), None)
        if at is None:
            continue
        match = _TIMING.match(lines[at])
        if match is None:
            continue
        g = match.groups()
        start, end = _seconds(*g[:4]), _seconds(*g[4:])
        body = _clean(lines[at + 1 :])
        if end <= start or not body:
            continue
        cues.append(Cue(start, end, body))
        if len(cues) > MAX_CUES:
            raise CaptionsError(f"more than {MAX_CUES} cues")
    if not cues:
        raise CaptionsError("no cue could be read (WebVTT or SRT expected)")
    cues.sort(key=lambda c: c.start_s)
    return cues


NO_CUES_NOTE = "no caption cue falls within the clip"


def cut_cues(cues: list[Cue], start_s: float, end_s: float) -> list[Cue]:
    """The cues shown within [start_s, end_s), clipped to it and shifted so
    ``start_s`` is 0 (the clip's first frame)."""
    return [Cue(*c) for c in movtext.clip_cues(cue_tuples(cues), start_s, end_s)]


def cue_tuples(cues: list[Cue]) -> tuple[movtext.CueTuple, ...]:
    """The cues as plain tuples (what a join process is sent)."""
    return tuple((c.start_s, c.end_s, c.text) for c in cues)


def _srt_time(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def to_srt(cues: list[Cue]) -> str:
    """SubRip text (what FFmpeg reads to make a mov_text track)."""
    blocks = []
    for n, cue in enumerate(cues, 1):
        # A line that looks like a timing line would start a new cue.
        text = cue.text.replace("-->", "->")
        blocks.append(f"{n}\n{_srt_time(cue.start_s)} --> {_srt_time(cue.end_s)}\n{text}\n")
    return "\n".join(blocks)


@dataclass(frozen=True)
class CaptionStyle:
    """The burned captions' look, in pixels of the output frame."""

    font_px: int
    outline_px: int
    margin_v_px: int
    margin_h_px: int


def caption_style(width: int, height: int) -> CaptionStyle:
    """White bold text with a black outline, centred at the bottom.

    The size follows the frame's smaller side (its height for landscape
    frames): 6 % of it, at least 12 px. Portrait frames keep the text higher
    (12 % of the height) so the short-video apps' buttons and titles at the
    bottom do not cover it.
    """
    font = max(12, round(min(width, height) * 0.06))
    margin_v = round(height * (0.12 if height > width else 0.06))
    return CaptionStyle(font, max(1, round(font * 0.08)), margin_v, round(width * 0.05))


def _ass_time(seconds: float) -> str:
    cs = round(seconds * 100)
    return f"{cs // 360_000}:{cs // 6000 % 60:02d}:{cs // 100 % 60:02d}.{cs % 100:02d}"


def _ass_text(text: str) -> str:
    # Only \n, \N and \h are escapes outside override blocks: a word joiner
    # after a backslash keeps the text's own backslashes literal. Braces
    # would open override blocks.
    text = text.replace("\\", "\\\u2060").replace("{", "\\{").replace("}", "\\}")
    return text.replace("\n", "\\N")


def to_ass(cues: list[Cue], width: int, height: int) -> str:
    """An ASS script of the cues in the default style, for a width x height frame."""
    s = caption_style(width, height)
    lines = [
        "[Script Info]",
        "ScriptType: v4.00+",
        f"PlayResX: {width}",
        f"PlayResY: {height}",
        "WrapStyle: 0",
        "ScaledBorderAndShadow: yes",
        "",
        "[V4+ Styles]",
        "Format: Name, Fontname, Fontsize, PrimaryColour, SecondaryColour, OutlineColour,"
        " BackColour, Bold, Italic, Underline, StrikeOut, ScaleX, ScaleY, Spacing, Angle,"
        " BorderStyle, Outline, Shadow, Alignment, MarginL, MarginR, MarginV, Encoding",
        f"Style: Default,{FONT_NAME},{s.font_px},&H00FFFFFF,&H000000FF,&H00000000,&H80000000,"
        f"-1,0,0,0,100,100,0,0,1,{s.outline_px},0,2,{s.margin_h_px},{s.margin_h_px},"
        f"{s.margin_v_px},1",
        "",
        "[Events]",
        "Format: Layer, Start, End, Style, Name, MarginL, MarginR, MarginV, Effect, Text",
    ]
    for cue in cues:
        lines.append(
            f"Dialogue: 0,{_ass_time(cue.start_s)},{_ass_time(cue.end_s)},Default,,0,0,0,,"
            f"{_ass_text(cue.text)}"
        )
    return "\n".join(lines) + "\n"


# -- where the captions come from ------------------------------------------------


def decode_text(data: bytes) -> str:
    """Subtitle bytes as text: UTF-8 (with or without BOM), UTF-16 with a BOM,
    else Windows-1252 (what older SRT files are)."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


async def fetch_captions(
    url: str,
    guard: UrlGuard,
    *,
    max_bytes: int = MAX_CAPTIONS_BYTES,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> str:
    """The text at ``url``, fetched under the URL guard's rules (http(s) only,
    every hop of a redirect checked, private addresses refused unless the
    guard allows them) and at most ``max_bytes`` long; raise CaptionsError."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    for _ in range(MAX_REDIRECTS + 1):
        try:
            await guard.check(url)
            async with guard.session.get(url, allow_redirects=False, timeout=timeout) as resp:
                if resp.status in _REDIRECTS:
                    location = resp.headers.get("Location")
                    if not location:
                        raise CaptionsError("the captions URL redirects nowhere")
                    url = str(resp.url.join(URL(location)))
                    continue
                if resp.status != 200:
                    raise CaptionsError(f"the captions URL answered HTTP {resp.status}")
                if (resp.content_length or 0) > max_bytes:
                    raise CaptionsError(f"the captions are larger than {max_bytes} bytes")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    data += chunk
                    if len(data) > max_bytes:
                        raise CaptionsError(f"the captions are larger than {max_bytes} bytes")
                return decode_text(bytes(data))
        except CaptionsError:
            raise
        except SourceError as exc:
            raise CaptionsError(exc.message) from exc
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, ForbiddenAddressError):
                raise CaptionsError(f"refused to fetch the captions: {exc.os_error}") from exc
            raise CaptionsError(f"cannot connect for the captions: {exc.os_error}") from exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CaptionsError(f"fetching the captions failed: {exc!r}") from exc
    raise CaptionsError(f"more than {MAX_REDIRECTS} redirects for the captions")


async def load_cues(captions: Captions, *, guard: UrlGuard | None) -> list[Cue]:
    """The cues of ``captions`` (its text, or fetched from its URL through
    ``guard``; without a guard, one that refuses private addresses); raise
    ``ClipFailure("captions_invalid", …)``."""
    try:
        if captions.text is not None:
            if len(captions.text.encode()) > MAX_CAPTIONS_BYTES:
                raise CaptionsError(f"the captions are larger than {MAX_CAPTIONS_BYTES} bytes")
            return parse_captions(captions.text)
        if captions.url is None:
            raise CaptionsError("captions need a text or a url")
        if guard is not None:
            return parse_captions(await fetch_captions(captions.url, guard))
        async with UrlGuard(allow_private=False) as own:
            return parse_captions(await fetch_captions(captions.url, own))
    except CaptionsError as exc:
        raise ClipFailure("captions_invalid", f"captions: {exc}") from exc
