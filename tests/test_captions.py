"""Captions: WebVTT and SRT read tolerantly, cut and shifted to a clip, written
as SRT (for mov_text) and ASS (for burning), and fetched from a URL under the
URL guard's rules (loopback refused unless allowed, size-capped, redirects
checked hop by hop)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import av
import pytest
from aiohttp import web

from clipservice.domain import Captions
from clipservice.errors import ClipFailure
from clipservice.media.captions import (
    FONTS_DIR,
    MAX_CAPTIONS_BYTES,
    CaptionsError,
    Cue,
    caption_style,
    cut_cues,
    decode_text,
    fetch_captions,
    load_cues,
    parse_captions,
    to_ass,
    to_srt,
)
from clipservice.media.ffmpeg import bundled_ffmpeg
from clipservice.sources.guard import UrlGuard

VTT = """\ufeffWEBVTT - a title

NOTE a comment block
with two lines

STYLE
::cue { color: yellow }

intro
00:01.000 --> 00:02.500 align:start position:10%
<v Roger>Hello <b>there</b></v> &amp; welcome

00:00:03.250 --> 00:00:04.000
<c.yellow>Second</c> line one
<00:00:03.500>line two

00:00:05.000 --> 00:00:04.000
ends before it starts: skipped
"""

SRT = (
    "1\r\n00:00:01,000 --> 00:00:02,500\r\n{\\an8}<i>Hello</i>\r\n\r\n"
    "garbage block without a timing line\r\n\r\n"
    "3\r\n00:00:03,250 --> 00:00:04,000 X1:10 X2:20\r\nSecond\r\nline\r\n\r\n"
    "00:00:06,5 --> 00:00:07,25\r\nno number, short fractions\r\n"
)


def test_webvtt_cues_are_read_with_tags_and_blocks_dropped() -> None:
    """WebVTT: header, NOTE/STYLE blocks, cue ids and settings, mm:ss times, voice
    and class tags, inner timestamps and entities are handled; a cue ending
    before it starts is skipped."""
    assert parse_captions(VTT) == [
        Cue(1.0, 2.5, "Hello there & welcome"),
        Cue(3.25, 4.0, "Second line one\nline two"),
    ]


def test_srt_cues_are_read_tolerantly() -> None:
    """SRT: CRLF, comma milliseconds, ASS override tags, coordinates after the
    end time, a missing cue number and short fractions; a damaged block is
    skipped, not fatal."""
    assert parse_captions(SRT) == [
        Cue(1.0, 2.5, "Hello"),
        Cue(3.25, 4.0, "Second\nline"),
        Cue(6.5, 7.25, "no number, short fractions"),
    ]


@pytest.mark.parametrize(
    "text",
    ["", "   \n\n", "<html><body>Not found</body></html>", "WEBVTT\n\n", "a\x00b --> c"],
)
def test_nothing_readable_is_refused(text: str) -> None:
    """A text with no readable cue (empty, an HTML error page, a header alone,
    binary) is an error, not an empty track."""
    with pytest.raises(CaptionsError):
        parse_captions(text)


def test_cues_are_cut_to_the_clip_and_shifted() -> None:
    """Cues overlapping [start, end) are clipped to it and shifted so the clip's
    first frame is 0; cues outside are dropped."""
    cues = [
        Cue(0.0, 1.0, "before"),
        Cue(1.5, 3.0, "over the start"),
        Cue(4.0, 5.0, "inside"),
        Cue(6.0, 9.0, "over the end"),
        Cue(7.0, 8.0, "after"),
    ]
    assert cut_cues(cues, 2.0, 7.0) == [
        Cue(0.0, 1.0, "over the start"),
        Cue(2.0, 3.0, "inside"),
        Cue(4.0, 5.0, "over the end"),
    ]


def test_srt_output_reads_back_the_same_cues() -> None:
    """to_srt writes millisecond times and escapes a timing-like line; parsing
    it back gives the same cues."""
    cues = [Cue(0.0, 1.234, "one\ntwo"), Cue(61.5, 3725.007, "a --> b")]
    text = to_srt(cues)
    assert "00:01:01,500 --> 01:02:05,007" in text
    assert parse_captions(text) == [cues[0], Cue(61.5, 3725.007, "a -> b")]


def test_ffmpeg_reads_the_srt_we_write(tmp_path: Path) -> None:
    """FFmpeg's SRT demuxer finds every cue of to_srt's output at its times."""
    srt = tmp_path / "c.srt"
    srt.write_text(to_srt([Cue(0.5, 1.25, "first"), Cue(2.0, 3.0, "second & <more>")]))
    with av.open(str(srt)) as c:
        s = c.streams.subtitles[0]
        got = [
            (float(p.pts * s.time_base), float(p.duration * s.time_base))
            for p in c.demux(s)
            if p.pts is not None
        ]
    assert [g for g in got if g[1] > 0] == [(0.5, 0.75), (2.0, 1.0)]


def test_ass_script_has_the_frame_size_style_and_escaped_text() -> None:
    """to_ass sets PlayRes to the frame, a white outlined bottom-centred style
    sized from the frame, centisecond times, and keeps braces, backslashes
    and line breaks as text."""
    text = to_ass([Cue(1.0, 2.345, "a {b}\\n c\nnext")], 1080, 1920)
    assert "PlayResX: 1080" in text and "PlayResY: 1920" in text
    style = caption_style(1080, 1920)
    assert f"Style: Default,DejaVu Sans,{style.font_px},&H00FFFFFF," in text
    assert (
        f",{style.outline_px},0,2,{style.margin_h_px},{style.margin_h_px},{style.margin_v_px},1"
        in text
    )
    assert "Dialogue: 0,0:00:01.00,0:00:02.35,Default,,0,0,0,,a \\{b\\}\\\u2060n c\\Nnext" in text


def test_caption_style_scales_with_the_frame() -> None:
    """The font follows the frame's smaller side; portrait frames keep the text
    higher (clear of the apps' buttons)."""
    landscape, portrait = caption_style(1920, 1080), caption_style(1080, 1920)
    assert landscape.font_px == portrait.font_px == 65
    assert landscape.margin_v_px == 65 and portrait.margin_v_px == 230
    assert caption_style(320, 180).font_px == 12  # never unreadably small
    assert caption_style(1280, 720).font_px < landscape.font_px


def test_burned_ass_draws_where_the_style_says(tmp_path: Path) -> None:
    """libass (the FFmpeg build's) draws the script on a black frame: white
    pixels in the bottom band during the cue, none above it, none after it. On a
    host without a single font (fontconfig given an empty configuration, as in
    python:slim): the package's own font is drawn."""
    ass = tmp_path / "odd 'name', [x]; y:z.ass"  # every character filter escaping handles
    ass.write_text(to_ass([Cue(0.0, 0.5, "Readable caption")], 320, 180))
    from clipservice.media.ffmpeg_args import burn_filter

    no_fonts = tmp_path / "fonts.conf"
    no_fonts.write_text(
        '<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd">'
        f"<fontconfig><cachedir>{tmp_path / 'fc-cache'}</cachedir></fontconfig>"
    )
    out = tmp_path / "f.mp4"
    subprocess.run(
        [bundled_ffmpeg(), "-v", "error", "-f", "lavfi", "-i", "color=black:size=320x180:rate=10:duration=1",
         "-vf", burn_filter(str(ass), str(FONTS_DIR)), "-c:v", "libx264", "-preset", "ultrafast", "-qp", "0",
         "-pix_fmt", "yuv444p", str(out)],
        check=True, timeout=60, env={**os.environ, "FONTCONFIG_FILE": str(no_fonts)},
    )  # fmt: skip
    with av.open(str(out)) as c:
        decoded = list(c.decode(video=0))
        frames = [bytes(f.planes[0]) for f in decoded]
        line = decoded[0].planes[0].line_size
    style = caption_style(320, 180)
    band_top = 180 - style.margin_v_px - 2 * style.font_px

    def bright(frame: bytes, rows: range) -> int:
        return sum(1 for r in rows for v in frame[r * line : r * line + 320] if v > 200)

    assert bright(frames[2], range(band_top, 180)) > 50
    assert bright(frames[2], range(0, band_top)) == 0
    assert bright(frames[8], range(180)) == 0


def test_text_encodings() -> None:
    """UTF-8 with or without BOM, UTF-16 with a BOM, and Windows-1252 decode."""
    assert decode_text("é".encode()) == "é"
    assert decode_text("\ufeffé".encode()) == "é"
    assert decode_text("é --> x".encode("utf-16")) == "é --> x"
    assert decode_text("café".encode("cp1252")) == "café"


# -- fetching ---------------------------------------------------------------------------


@pytest.fixture
async def captions_site() -> AsyncIterator[str]:
    """A loopback site: /ok.vtt, /big.srt (past the cap), /missing (404),
    /hop (redirects to /ok.vtt), /loop (redirects to itself)."""
    big = "1\n00:00:01,000 --> 00:00:02,000\n" + "x" * (MAX_CAPTIONS_BYTES + 10) + "\n"

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=VTT, content_type="text/vtt")

    async def large(request: web.Request) -> web.Response:
        return web.Response(text=big)

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok.vtt")

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    app = web.Application()
    app.router.add_get("/ok.vtt", ok)
    app.router.add_get("/big.srt", large)
    app.router.add_get("/hop", hop)
    app.router.add_get("/loop", loop)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_fetch_follows_a_redirect_and_reads_the_cues(captions_site: str) -> None:
    """A captions URL is fetched through the guard (a redirect followed) and parsed."""
    async with UrlGuard(allow_private=True) as guard:
        cues = await load_cues(Captions(url=f"{captions_site}/hop"), guard=guard)
    assert cues == parse_captions(VTT)


@pytest.mark.parametrize(
    ("path", "allow_private", "message"),
    [
        ("/ok.vtt", False, "non-public address"),
        ("/big.srt", True, "larger than"),
        ("/missing", True, "HTTP 404"),
        ("/loop", True, "redirects"),
    ],
)
async def test_fetch_refusals_are_captions_invalid(
    captions_site: str, path: str, allow_private: bool, message: str
) -> None:
    """A loopback URL without allow_private, a file past 1 MiB, an HTTP error and
    a redirect loop each fail the clip as captions_invalid, saying why."""
    async with UrlGuard(allow_private=allow_private) as guard:
        with pytest.raises(ClipFailure) as info:
            await load_cues(Captions(url=captions_site + path), guard=guard)
    assert info.value.code == "captions_invalid"
    assert message in info.value.message


async def test_without_a_guard_private_addresses_are_refused(captions_site: str) -> None:
    """With no guard given, the captions URL is fetched with private addresses refused."""
    with pytest.raises(ClipFailure) as info:
        await load_cues(Captions(url=f"{captions_site}/ok.vtt"), guard=None)
    assert info.value.code == "captions_invalid"


async def test_only_http_urls_are_fetched() -> None:
    """file: and other schemes are refused before any request."""
    async with UrlGuard(allow_private=True) as guard:
        with pytest.raises(CaptionsError, match="http"):
            await fetch_captions("file:///etc/passwd", guard)


async def test_bad_text_is_captions_invalid() -> None:
    """Captions given as text that holds no cue fail as captions_invalid."""
    with pytest.raises(ClipFailure) as info:
        await load_cues(Captions(text="not subtitles"), guard=None)
    assert info.value.code == "captions_invalid"
