"""Progressive and fragmented MP4 (ISO BMFF) read through byte ranges.

:func:`open_mp4` finds the ``moov`` box with a handful of Range reads
(faststart, moov at the end, fragmented with or without ``sidx``), reads
every track's description and, for progressive files, its whole sample
table into compact arrays. :meth:`Mp4Index.window` then says which bytes
hold the samples of a time range:

* progressive: the samples themselves, listed from the tables
  (:class:`~.base.KnownSamples`), their byte ranges coalesced;
* fragmented with a ``sidx`` (or an ``mfra``): whole fragments, chosen
  from the index without a read; :class:`FragmentReader` parses the
  fetched ``moof``/``mdat`` bytes;
* fragmented without either: the fragments holding the range's ends are
  found by an interpolation search over byte offsets (a few reads of at
  most 256 KiB wherever the range sits in the file).

Timeline: ``pts = composition time − media_time of the first non-empty
edit + empty edits before it`` and ``dts`` shifted alike (ISO/IEC 14496-12
§8.6.6, and what FFmpeg's demuxer reports for such files).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import struct
import sys
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import add, sub
from pathlib import Path
from typing import Literal, NamedTuple

from .base import ContainerError, KnownSamples, Read, Sample, Track, Window

FIRST_CHUNK_BYTES = 64 * 1024
MAX_PROBE_BYTES = 256 * 1024
MIN_PROBE_BYTES = 8 * 1024
# In a muxed file the other track's chunks sit between ours: fetching a gap
# this small costs less than another request.
SPAN_MERGE_GAP_BYTES = 64 * 1024
# Bounds that turn absurd or malicious headers into a ContainerError instead
# of a huge allocation or an endless walk.
MAX_MOOV_BYTES = 256 * 1024 * 1024
MAX_MOOF_BYTES = 16 * 1024 * 1024
MAX_SIDX_BYTES = 16 * 1024 * 1024
MAX_MFRA_BYTES = 16 * 1024 * 1024
MAX_SAMPLES_PER_TRACK = 1 << 24
MAX_SAMPLES_PER_MOOF = 1 << 18  # over an hour at 60 fps
MAX_TOP_LEVEL_BOXES = 100_000
MAX_TOP_LEVEL_READS = 16  # box headers read one by one (jumping over mdat) to find moov
MAX_SIDX_BOXES = 1024
MAX_SIDX_DEPTH = 8
MAX_SEARCH_PROBES = 64
MAX_STEPS_TO_SYNC = 16
SAP_FLAG = 0x8000_0000
SAMPLE_IS_NON_SYNC = 0x0001_0000

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct(">I4s")
_LITTLE = sys.byteorder == "little"

if array("I").itemsize != 4 or array("q").itemsize != 8:  # pragma: no cover - exotic platforms
    raise ImportError("mp4 index needs 4-byte array('I') and 8-byte array('q')")

# Sample entry four-character codes → FFmpeg codec names (mp4a and mp4v are
# refined by the esds objectTypeIndication).
_CODECS: dict[bytes, str] = {
    b"avc1": "h264", b"avc3": "h264", b"dva1": "h264", b"dvav": "h264",
    b"hvc1": "hevc", b"hev1": "hevc", b"dvh1": "hevc", b"dvhe": "hevc",
    b"vvc1": "vvc", b"vvi1": "vvc",
    b"vp09": "vp9", b"vp08": "vp8", b"av01": "av1", b"mp4v": "mpeg4",
    b"mp4a": "aac", b"Opus": "opus", b"ac-3": "ac3", b"ec-3": "eac3",
    b"fLaC": "flac", b".mp3": "mp3", b"alac": "alac",
}  # fmt: skip
_ESDS_CODECS = {
    0x20: "mpeg4", 0x21: "h264", 0x23: "hevc", 0x40: "aac", 0x66: "aac", 0x67: "aac",
    0x68: "aac", 0x69: "mp3", 0x6B: "mp3", 0xA5: "ac3", 0xA6: "eac3", 0xAD: "opus",
}  # fmt: skip
_CONFIG_BOXES = {b"avcC", b"hvcC", b"av1C", b"vpcC", b"dOps", b"dfLa", b"dac3", b"dec3", b"vvcC"}
_AAC_RATES = (
    96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350,
)  # fmt: skip


# --------------------------------------------------------------------------- boxes


class _Box(NamedTuple):
    kind: bytes
    start: int  # first byte of the header
    body: int  # first byte of the payload
    end: int  # one past the box


def _boxes(buf: bytes, start: int, end: int) -> Iterator[_Box]:
    """The boxes laid end to end in ``buf[start:end]``; a box running past
    ``end`` or with an impossible size is a ContainerError."""
    pos = start
    while pos < end:
        box = _box_at(buf, pos, end)
        yield box
        pos = box.end


def _box_at(buf: bytes, pos: int, end: int) -> _Box:
    if end - pos < 8:
        raise ContainerError(f"truncated box header at {pos}")
    size, kind = _HEADER.unpack_from(buf, pos)
    body = pos + 8
    if size == 1:
        if end - pos < 16:
            raise ContainerError(f"truncated 64-bit box header at {pos}")
        size = _U64.unpack_from(buf, pos + 8)[0]
        body = pos + 16
        if size < 16:
            raise ContainerError(f"{kind!r} box with a 64-bit size of {size}")
    elif size == 0:
        size = end - pos
    elif size < 8:
        raise ContainerError(f"{kind!r} box with a size of {size}")
    if pos + size > end:
        raise ContainerError(f"{kind!r} box at {pos} runs past its parent")
    return _Box(kind, pos, body, pos + size)


def _children(buf: bytes, box: _Box) -> dict[bytes, _Box]:
    """The first child box of each kind."""
    found: dict[bytes, _Box] = {}
    for child in _boxes(buf, box.body, box.end):
        found.setdefault(child.kind, child)
    return found


def _full_box(buf: bytes, box: _Box) -> tuple[int, int]:
    """(version, flags) of a full box."""
    _need(box, 4)
    vf = _U32.unpack_from(buf, box.body)[0]
    return vf >> 24, vf & 0xFFFFFF


def _need(box: _Box, payload_bytes: int) -> None:
    if box.end - box.body < payload_bytes:
        raise ContainerError(f"{box.kind!r} box too short")


def _u32_table(buf: bytes, pos: int, count: int, end: int, width: int = 1) -> array[int]:
    """``count`` entries of ``width`` big-endian u32 each at ``pos``."""
    nbytes = count * width * 4
    if count < 0 or pos + nbytes > end:
        raise ContainerError(f"table of {count} entries larger than its box")
    table = array("I")
    table.frombytes(buf[pos : pos + nbytes])
    if _LITTLE:
        table.byteswap()
    return table


def _box_bytes(kind: bytes, payload: bytes) -> bytes:
    return _HEADER.pack(8 + len(payload), kind) + payload


# --------------------------------------------------------------------------- reading


class _Source:
    """The resource through ``read``: bounds checks and one cached chunk."""

    def __init__(self, read: Read, size_bytes: int) -> None:
        self.read = read
        self.size = size_bytes
        self.reads = 0
        # (offset, bytes), replaced in one assignment: windows may be asked
        # for from several threads.
        self._cached: tuple[int, bytes] = (0, b"")

    def cached_from(self, offset: int, at_least: int) -> bytes:
        """The cached bytes from ``offset`` on if there are ``at_least`` of them,
        else a read of ``FIRST_CHUNK_BYTES`` there."""
        cached_offset, cached = self._cached
        rel = offset - cached_offset
        if rel >= 0 and rel + at_least <= len(cached):
            return cached[rel:]
        return self.get(offset, min(FIRST_CHUNK_BYTES, self.size - offset))

    def get(self, offset: int, length: int, chunk_bytes: int = 0) -> bytes:
        """Exactly ``length`` bytes at ``offset``; a miss reads at least
        ``chunk_bytes`` (clipped to the resource) so what follows is cached."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ContainerError(f"{length} bytes at {offset} lie past the end ({self.size})")
        cached_offset, cached = self._cached
        rel = offset - cached_offset
        if rel >= 0 and rel + length <= len(cached):
            return cached[rel : rel + length]
        want = max(length, min(chunk_bytes, self.size - offset))
        if want == 0:
            return b""
        data = self.read(offset, want)
        self.reads += 1
        if len(data) < want:
            raise ContainerError(f"short read: {len(data)} of {want} bytes at {offset}")
        data = bytes(data[:want])
        self._cached = (offset, data)
        return data[:length]


# --------------------------------------------------------------------------- moov


@dataclass(frozen=True, slots=True)
class _Trex:
    """A track's fragment defaults (trex)."""

    description_index: int = 1
    duration: int = 0
    size: int = 0
    flags: int = 0


@dataclass
class _TrakInfo:
    track: Track
    shift: int  # ticks subtracted from media times: edit media_time − empty edits
    table: _SampleTable | None
    trex: _Trex


class _SampleTable:
    """A progressive track's samples as parallel arrays (decode order)."""

    __slots__ = (
        "dts", "durations", "offsets", "pts", "sample_ticks", "sizes", "sync", "sync_max",
        "sync_pts",
    )  # fmt: skip

    def __init__(
        self,
        pts: array[int],
        dts: array[int],
        durations: array[int],
        offsets: array[int],
        sizes: array[int],
        sync: array[int] | None,
        sample_ticks: int = 0,
    ) -> None:
        self.sample_ticks = sample_ticks  # the most common sample duration
        self.pts = pts
        self.dts = dts
        self.durations = durations
        self.offsets = offsets
        self.sizes = sizes
        self.sync = sync  # indices of sync samples; None: every sample is one
        self.sync_pts = pts if sync is None else array("q", map(pts.__getitem__, sync))
        self.sync_max = array("q", accumulate(self.sync_pts, max))

    def __len__(self) -> int:
        return len(self.sizes)


def _parse_moov(moov: bytes, size_bytes: int) -> tuple[list[_TrakInfo], bool, float | None]:
    """Tracks (video and audio with a sample entry), fragmented?, mehd seconds."""
    root = _box_at(moov, 0, len(moov))
    kids = _children(moov, root)
    if b"mvhd" not in kids:
        raise ContainerError("moov without mvhd")
    mvhd = kids[b"mvhd"]
    version, _ = _full_box(moov, mvhd)
    _need(mvhd, 32 if version == 1 else 20)
    movie_timescale = _U32.unpack_from(moov, mvhd.body + (20 if version == 1 else 12))[0]
    if movie_timescale == 0:
        raise ContainerError("mvhd timescale 0")

    fragmented = b"mvex" in kids
    trex: dict[int, _Trex] = {}
    mehd_s: float | None = None
    if fragmented:
        for box in _boxes(moov, kids[b"mvex"].body, kids[b"mvex"].end):
            if box.kind == b"trex":
                _need(box, 24)
                tid, sdi, dur, size, flags = struct.unpack_from(">5I", moov, box.body + 4)
                trex[tid] = _Trex(sdi, dur, size, flags)
            elif box.kind == b"mehd":
                version, _ = _full_box(moov, box)
                _need(box, 12 if version == 1 else 8)
                unpack = _U64 if version == 1 else _U32
                mehd_s = unpack.unpack_from(moov, box.body + 4)[0] / movie_timescale

    infos: list[_TrakInfo] = []
    for box in _boxes(moov, root.body, root.end):
        if box.kind == b"trak":
            info = _parse_trak(moov, box, movie_timescale, size_bytes, fragmented, trex)
            if info is not None:
                infos.append(info)
    return infos, fragmented, mehd_s


def _handlers(moov: bytes) -> tuple[bytes, ...]:
    """The handler type of each trak of a moov, in order."""
    root = _box_at(moov, 0, len(moov))
    out = []
    for box in _boxes(moov, root.body, root.end):
        if box.kind == b"trak":
            mdia = _children(moov, box).get(b"mdia")
            hdlr = _children(moov, mdia).get(b"hdlr") if mdia is not None else None
            if hdlr is not None and hdlr.end - hdlr.body >= 12:
                out.append(moov[hdlr.body + 8 : hdlr.body + 12])
    return tuple(out)


def _parse_trak(
    buf: bytes,
    trak: _Box,
    movie_timescale: int,
    size_bytes: int,
    fragmented: bool,
    trex: dict[int, _Trex],
) -> _TrakInfo | None:
    kids = _children(buf, trak)
    for need in (b"tkhd", b"mdia"):
        if need not in kids:
            raise ContainerError(f"trak without {need.decode()}")
    tkhd = kids[b"tkhd"]
    version, _ = _full_box(buf, tkhd)
    _need(tkhd, 24 if version == 1 else 16)
    track_id = _U32.unpack_from(buf, tkhd.body + (20 if version == 1 else 12))[0]

    mdia = _children(buf, kids[b"mdia"])
    for need in (b"mdhd", b"hdlr", b"minf"):
        if need not in mdia:
            raise ContainerError(f"mdia without {need.decode()}")
    hdlr = mdia[b"hdlr"]
    _need(hdlr, 12)
    handler = buf[hdlr.body + 8 : hdlr.body + 12]
    kind: Literal["video", "audio"]
    if handler == b"vide":
        kind = "video"
    elif handler == b"soun":
        kind = "audio"
    else:
        return None
    mdhd = mdia[b"mdhd"]
    version, _ = _full_box(buf, mdhd)
    if version == 1:
        _need(mdhd, 32)
        timescale, duration = struct.unpack_from(">IQ", buf, mdhd.body + 20)
    else:
        _need(mdhd, 20)
        timescale, duration = struct.unpack_from(">II", buf, mdhd.body + 12)
        if duration == 0xFFFF_FFFF:
            duration = 0
    if timescale == 0:
        raise ContainerError(f"track {track_id}: mdhd timescale 0")

    minf = _children(buf, mdia[b"minf"])
    if b"stbl" not in minf:
        raise ContainerError(f"track {track_id}: minf without stbl")
    stbl = _children(buf, minf[b"stbl"])
    if b"stsd" not in stbl:
        raise ContainerError(f"track {track_id}: stbl without stsd")
    codec, config, width, height, sample_rate, channels = _parse_stsd(buf, stbl[b"stsd"], kind)

    shift = 0
    if b"edts" in kids:
        elst = _children(buf, kids[b"edts"]).get(b"elst")
        if elst is not None:
            shift = _edit_shift(buf, elst, movie_timescale, timescale)

    table = _parse_sample_table(buf, stbl, shift, size_bytes, track_id)
    if fragmented and len(table):
        raise ContainerError(f"track {track_id}: fragmented MP4 with samples in moov")
    duration_s = duration / timescale if duration else None
    codec_delay = 0
    if codec == "opus" and len(config) >= 4:
        # dOps PreSkip, at 48 kHz (the edit list usually cuts as much).
        codec_delay = _U16.unpack_from(config, 2)[0] * timescale // 48000
    first_pts: int | None = None
    fps: float | None = None
    if len(table):
        first_pts = min(table.pts)
        if kind == "video" and table.sample_ticks:
            fps = timescale / table.sample_ticks
    track = Track(
        track_id=track_id,
        kind=kind,
        codec=codec,
        timescale=timescale,
        duration_s=duration_s,
        config=config,
        width=width,
        height=height,
        sample_rate=sample_rate,
        channels=channels,
        codec_delay=codec_delay,
        first_pts=first_pts,
        fps=fps,
    )
    return _TrakInfo(track, shift, None if fragmented else table, trex.get(track_id, _Trex()))


def _edit_shift(buf: bytes, elst: _Box, movie_timescale: int, timescale: int) -> int:
    """Ticks to subtract from media times: the first non-empty edit's
    media_time, less the empty edits (a delay) before it."""
    version, _ = _full_box(buf, elst)
    _need(elst, 8)
    count = _U32.unpack_from(buf, elst.body + 4)[0]
    entry = struct.Struct(">Qqhh" if version == 1 else ">Iihh")
    if elst.body + 8 + count * entry.size > elst.end:
        raise ContainerError("elst entry count larger than its box")
    delay_movie = 0
    for i in range(count):
        duration, media_time, _, _ = entry.unpack_from(buf, elst.body + 8 + i * entry.size)
        if media_time == -1:
            delay_movie += duration
            continue
        delay = delay_movie * timescale // movie_timescale
        return int(media_time) - delay
    return 0


def _parse_stsd(
    buf: bytes, stsd: _Box, kind: Literal["video", "audio"]
) -> tuple[str, bytes, int, int, int, int]:
    """(codec, config, width, height, sample_rate, channels) of the first entry."""
    _need(stsd, 8)
    if _U32.unpack_from(buf, stsd.body + 4)[0] == 0:
        raise ContainerError("stsd without entries")
    entry = _box_at(buf, stsd.body + 8, stsd.end)
    fourcc = entry.kind
    codec = _CODECS.get(fourcc, fourcc.decode("latin-1").strip().lower())
    width = height = sample_rate = channels = 0
    if kind == "video":
        _need(entry, 78)
        width, height = struct.unpack_from(">HH", buf, entry.body + 24)
        children_at = entry.body + 78
    else:
        _need(entry, 28)
        version = _U16.unpack_from(buf, entry.body + 8)[0]
        channels = _U16.unpack_from(buf, entry.body + 16)[0]
        sample_rate = _U32.unpack_from(buf, entry.body + 24)[0] >> 16
        children_at = entry.body + 28
        if version == 1:
            children_at += 16
        elif version == 2:
            _need(entry, 64)
            sample_rate = round(struct.unpack_from(">d", buf, entry.body + 32)[0])
            channels = _U32.unpack_from(buf, entry.body + 40)[0]
            children_at += 36
    config = b""
    try:
        kids = list(_boxes(buf, children_at, entry.end))
    except ContainerError:
        kids = []  # trailing junk in a sample entry (seen in the wild): no config
    for child in kids:
        if child.kind in _CONFIG_BOXES and not config:
            config = buf[child.body : child.end]
        elif child.kind == b"esds":
            oti, specific = _parse_esds(buf, child)
            codec = _ESDS_CODECS.get(oti, codec)
            config = specific
    if codec == "aac" and len(config) >= 2:
        sample_rate, channels = _aac_rate_channels(config, sample_rate, channels)
    if codec == "opus":
        sample_rate = 48000
    return codec, config, width, height, sample_rate, channels


def _parse_esds(buf: bytes, esds: _Box) -> tuple[int, bytes]:
    """(objectTypeIndication, DecoderSpecificInfo) of an esds box."""
    pos, end = esds.body + 4, esds.end
    oti = 0

    def descriptor(at: int) -> tuple[int, int, int]:
        if at >= end:
            raise ContainerError("truncated esds")
        tag, length, at = buf[at], 0, at + 1
        for _ in range(4):
            if at >= end:
                raise ContainerError("truncated esds")
            byte = buf[at]
            at += 1
            length = (length << 7) | (byte & 0x7F)
            if not byte & 0x80:
                break
        if at + length > end:
            raise ContainerError("esds descriptor past its box")
        return tag, at, at + length

    tag, pos, end = descriptor(pos)
    if tag != 0x03 or end - pos < 3:
        return 0, b""
    es_flags = buf[pos + 2]
    pos += 3
    if es_flags & 0x80:
        pos += 2
    if es_flags & 0x40:
        if pos >= end:
            raise ContainerError("truncated esds")
        pos += 1 + buf[pos]
    if es_flags & 0x20:
        pos += 2
    while pos < end:
        tag, body, stop = descriptor(pos)
        if tag == 0x04 and stop - body >= 13:
            oti = buf[body]
            inner = body + 13
            while inner < stop:
                tag, sbody, sstop = descriptor(inner)
                if tag == 0x05:
                    return oti, buf[sbody:sstop]
                inner = sstop
            return oti, b""
        pos = stop
    return oti, b""


def _aac_rate_channels(asc: bytes, rate: int, channels: int) -> tuple[int, int]:
    """Sample rate and channels from an AudioSpecificConfig (ISO/IEC 14496-3
    §1.6.2.1), where the sample entry's fields may be stale; a channel
    configuration of 0 (a program config element) keeps the entry's."""
    nbits = 64
    bits = int.from_bytes(asc[:8].ljust(8, b"\0"), "big")
    obj = bits >> (nbits - 5)
    used = 5
    if obj == 31:
        used += 6
    index = (bits >> (nbits - used - 4)) & 0xF
    used += 4
    if index == 0xF:
        rate = (bits >> (nbits - used - 24)) & 0xFF_FFFF
        used += 24
    elif index < len(_AAC_RATES):
        rate = _AAC_RATES[index]
    config = (bits >> (nbits - used - 4)) & 0xF
    if 0 < config < 7:
        channels = config
    elif config == 7:
        channels = 8
    return rate, channels


def _parse_sample_table(
    buf: bytes, stbl: dict[bytes, _Box], shift: int, size_bytes: int, track_id: int
) -> _SampleTable:
    """Every sample's times, place and sync flag, with whole-table unpacking."""
    sizes = _sample_sizes(buf, stbl, size_bytes)
    count = len(sizes)
    empty = array("q")
    if count == 0:
        return _SampleTable(empty, empty, empty, empty, sizes, None)
    for need in (b"stts", b"stsc"):
        if need not in stbl:
            raise ContainerError(f"track {track_id}: stbl without {need.decode()}")

    # stts: runs of (count, delta) → per-sample durations → dts.
    stts = stbl[b"stts"]
    _need(stts, 8)
    runs = _u32_table(buf, stts.body + 8, _U32.unpack_from(buf, stts.body + 4)[0], stts.end, 2)
    counts, deltas = runs[0::2], runs[1::2]
    if sum(counts) < count:
        raise ContainerError(f"track {track_id}: stts times fewer samples than stsz holds")
    durations = array("q", chain.from_iterable(map(repeat, deltas, _clip_runs(counts, count))))
    dts_all = array("q", accumulate(durations, initial=-shift))
    dts = dts_all[:count]

    # ctts: composition offsets (signed: v1 by the spec, v0 as FFmpeg reads it).
    ctts = stbl.get(b"ctts")
    if ctts is not None:
        _need(ctts, 8)
        n = _U32.unpack_from(buf, ctts.body + 4)[0]
        runs = _u32_table(buf, ctts.body + 8, n, ctts.end, 2)
        offsets_signed = array("i", runs[1::2].tobytes())
        comp = array(
            "q", chain.from_iterable(map(repeat, offsets_signed, _clip_runs(runs[0::2], count)))
        )
        if len(comp) < count:
            comp.extend(repeat(0, count - len(comp)))
        pts = array("q", map(add, dts, comp))
    else:
        pts = array("q", dts)

    # stco/co64 + stsc → chunk of each sample → offset.
    chunk_box = stbl.get(b"stco") or stbl.get(b"co64")
    if chunk_box is None:
        raise ContainerError(f"track {track_id}: stbl without stco/co64")
    _need(chunk_box, 8)
    nchunks = _U32.unpack_from(buf, chunk_box.body + 4)[0]
    chunk_offsets: array[int]
    if chunk_box.kind == b"stco":
        chunk_offsets = array("q", _u32_table(buf, chunk_box.body + 8, nchunks, chunk_box.end))
    else:
        raw = _u32_table(buf, chunk_box.body + 8, nchunks, chunk_box.end, 2)
        chunk_offsets = array("q", map(lambda hi, lo: (hi << 32) | lo, raw[0::2], raw[1::2]))
    stsc = stbl[b"stsc"]
    _need(stsc, 8)
    entries = _u32_table(buf, stsc.body + 8, _U32.unpack_from(buf, stsc.body + 4)[0], stsc.end, 3)
    firsts, per_chunk = entries[0::3], entries[1::3]
    if not firsts or firsts[0] != 1 or any(map(lambda a, b: a >= b, firsts, firsts[1:])):
        raise ContainerError(f"track {track_id}: malformed stsc")
    run_chunks = [
        max(0, min(b, nchunks + 1) - a)
        for a, b in zip(firsts, [*firsts[1:], nchunks + 1], strict=True)
    ]
    samples_per_chunk = chain.from_iterable(map(repeat, per_chunk, run_chunks))
    first_sample = [min(x, count) for x in accumulate(samples_per_chunk, initial=0)]
    if first_sample[-1] < count:
        raise ContainerError(f"track {track_id}: chunks hold fewer samples than stsz")
    in_chunk = list(map(sub, first_sample[1:], first_sample[:-1]))
    starts = array("q", accumulate(sizes, initial=0))
    chunk_base = map(sub, chunk_offsets, map(starts.__getitem__, first_sample[:-1]))
    base = chain.from_iterable(map(repeat, chunk_base, in_chunk))
    offsets = array("q", map(add, base, starts[:count]))
    if min(offsets) < 0 or max(map(add, offsets, sizes)) > size_bytes:
        raise ContainerError(f"track {track_id}: a sample lies outside the resource")

    sync: array[int] | None = None
    stss = stbl.get(b"stss")
    if stss is not None:
        _need(stss, 8)
        numbers = _u32_table(buf, stss.body + 8, _U32.unpack_from(buf, stss.body + 4)[0], stss.end)
        if numbers:  # an empty stss is read as absent, as FFmpeg does
            sync = array("q", sorted({n - 1 for n in numbers if 1 <= n <= count}))
    sample_ticks = max(zip(counts, deltas, strict=True))[1] if counts else 0
    return _SampleTable(pts, dts, durations, offsets, sizes, sync, sample_ticks)


def _clip_runs(counts: array[int], total: int) -> list[int]:
    """Run lengths cut so that they add up to at most ``total``."""
    if sum(counts) <= total:
        return list(counts)
    clipped: list[int] = []
    left = total
    for n in counts:
        if left <= 0:
            break
        clipped.append(min(n, left))
        left -= clipped[-1]
    return clipped


def _sample_sizes(buf: bytes, stbl: dict[bytes, _Box], size_bytes: int) -> array[int]:
    stsz = stbl.get(b"stsz")
    if stsz is not None:
        _need(stsz, 12)
        fixed: int
        count: int
        fixed, count = struct.unpack_from(">II", buf, stsz.body + 4)
        if count > MAX_SAMPLES_PER_TRACK:
            raise ContainerError(f"{count} samples in one track")
        if fixed:
            if fixed * count > size_bytes:
                raise ContainerError("samples larger than the resource")
            return array("I", [fixed]) * count
        return _u32_table(buf, stsz.body + 12, count, stsz.end)
    stz2 = stbl.get(b"stz2")
    if stz2 is None:
        raise ContainerError("stbl without stsz/stz2")
    _need(stz2, 12)
    field_bits = buf[stz2.body + 7]
    count = _U32.unpack_from(buf, stz2.body + 8)[0]
    if count > MAX_SAMPLES_PER_TRACK:
        raise ContainerError(f"{count} samples in one track")
    pos = stz2.body + 12
    nbytes = (count * field_bits + 7) // 8
    if field_bits not in (4, 8, 16) or pos + nbytes > stz2.end:
        raise ContainerError("malformed stz2")
    raw = buf[pos : pos + nbytes]
    if field_bits == 16:
        table = array("H")
        table.frombytes(raw)
        if _LITTLE:
            table.byteswap()
        return array("I", table)
    if field_bits == 8:
        return array("I", raw)
    return array("I", chain.from_iterable((b >> 4, b & 0xF) for b in raw))[:count]


# --------------------------------------------------------------------------- fragments


def _traf_samples(
    buf: bytes,
    moof: _Box,
    moof_offset: int,
    track_id: int,
    trex: _Trex,
    shift: int,
    next_dts: int | None,
) -> tuple[list[Sample], int | None] | None:
    """The samples of ``track_id`` in one moof (``moof_offset``: its place in
    the resource), and the media decode time after them; None if the moof
    holds no fragment of that track. ``next_dts`` continues the previous
    fragment when a traf has no tfdt."""
    samples: list[Sample] = []
    found = False
    data_end = moof_offset  # base of a traf that names none: the moof, then the previous traf's end
    first_traf = True
    for traf in _boxes(buf, moof.body, moof.end):
        if traf.kind != b"traf":
            continue
        kids = list(_boxes(buf, traf.body, traf.end))
        if not kids or kids[0].kind != b"tfhd":
            raise ContainerError("traf without tfhd first")
        tfhd = kids[0]
        _, flags = _full_box(buf, tfhd)
        _need(tfhd, 8)
        tid = _U32.unpack_from(buf, tfhd.body + 4)[0]
        pos = tfhd.body + 8
        base = data_end if not first_traf else moof_offset
        first_traf = False
        if flags & 0x01:
            _need(tfhd, pos - tfhd.body + 8)
            base = _U64.unpack_from(buf, pos)[0]
            pos += 8
        elif flags & 0x02_0000:
            base = moof_offset
        default_duration, default_size, default_flags = trex.duration, trex.size, trex.flags
        if flags & 0x02:
            pos += 4
        for bit in (0x08, 0x10, 0x20):
            if flags & bit:
                if pos + 4 > tfhd.end:
                    raise ContainerError("truncated tfhd")
                value = _U32.unpack_from(buf, pos)[0]
                pos += 4
                if bit == 0x08:
                    default_duration = value
                elif bit == 0x10:
                    default_size = value
                else:
                    default_flags = value
        dts: int | None = None
        for box in kids:
            if box.kind == b"tfdt":
                version, _ = _full_box(buf, box)
                _need(box, 12 if version == 1 else 8)
                dts = (_U64 if version == 1 else _U32).unpack_from(buf, box.body + 4)[0]
        if tid != track_id:
            # Only the data end matters: a later traf without a base continues from it.
            for box in kids:
                if box.kind == b"trun":
                    data_end = _trun_data_end(buf, box, base, data_end, default_size)
                    base = data_end
            continue
        found = True
        if dts is None:
            if next_dts is None:
                raise ContainerError(f"track {track_id}: fragment without tfdt")
            dts = next_dts
        data = base
        for box in kids:
            if box.kind != b"trun":
                continue
            dts, data = _trun_samples(
                buf, box, base, data, dts, shift, samples,
                default_duration, default_size, default_flags,
            )  # fmt: skip
        data_end = data
        next_dts = dts
    if not found:
        return None
    return samples, next_dts


def _trun_header(buf: bytes, trun: _Box) -> tuple[int, int, int, int | None, int | None, int]:
    """(version, flags, count, data_offset, first_sample_flags, table position)."""
    version, flags = _full_box(buf, trun)
    _need(trun, 8)
    count = _U32.unpack_from(buf, trun.body + 4)[0]
    if count > MAX_SAMPLES_PER_MOOF:
        raise ContainerError(f"trun of {count} samples")
    pos = trun.body + 8
    data_offset = first_flags = None
    if flags & 0x01:
        _need(trun, pos - trun.body + 4)
        data_offset = _I32.unpack_from(buf, pos)[0]
        pos += 4
    if flags & 0x04:
        _need(trun, pos - trun.body + 4)
        first_flags = _U32.unpack_from(buf, pos)[0]
        pos += 4
    return version, flags, count, data_offset, first_flags, pos


def _trun_data_end(buf: bytes, trun: _Box, base: int, data: int, default_size: int) -> int:
    _, flags, count, data_offset, _, pos = _trun_header(buf, trun)
    start = base + data_offset if data_offset is not None else data
    width = sum(1 for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit)
    table = _u32_table(buf, pos, count, trun.end, width)
    if flags & 0x200:
        column = 1 if flags & 0x100 else 0
        return start + sum(table[column::width])
    return start + count * default_size


def _trun_samples(
    buf: bytes,
    trun: _Box,
    base: int,
    data: int,
    dts: int,
    shift: int,
    out: list[Sample],
    default_duration: int,
    default_size: int,
    default_flags: int,
) -> tuple[int, int]:
    """Append one trun's samples to ``out``; returns (next dts, data end)."""
    version, flags, count, data_offset, first_flags, pos = _trun_header(buf, trun)
    if len(out) + count > MAX_SAMPLES_PER_MOOF:
        raise ContainerError(f"more than {MAX_SAMPLES_PER_MOOF} samples in one moof")
    offset = base + data_offset if data_offset is not None else data
    present = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
    width = len(present)
    table = _u32_table(buf, pos, count, trun.end, width)
    column = 0

    def field(bit: int, default: int) -> array[int] | list[int]:
        nonlocal column
        if flags & bit:
            values = table[column::width]
            column += 1
            return values
        return [default] * count

    durations = field(0x100, default_duration)
    sizes = field(0x200, default_size)
    sample_flags = field(0x400, default_flags)
    if flags & 0x800:
        comp: array[int] | list[int] = array("i", table[column::width].tobytes())
    else:
        comp = [0] * count
    if first_flags is not None and count:
        sample_flags = list(sample_flags)
        sample_flags[0] = first_flags
    del version  # v1 only makes the composition offsets signed; they are read signed anyway
    for duration, size, sflags, cto in zip(durations, sizes, sample_flags, comp, strict=True):
        out.append(
            Sample(
                pts=dts + cto - shift,
                dts=dts - shift,
                duration=duration,
                offset=offset,
                size=size,
                key=not sflags & SAMPLE_IS_NON_SYNC,
            )
        )
        dts += duration
        offset += size
    return dts, offset


@dataclass(frozen=True)
class FragmentReader:
    """Reads one track's samples out of fetched whole fragments (moof + mdat).

    Spans that touch are parsed as one run of boxes; boxes other than moof
    (mdat, styp, sidx, emsg, free...) are skipped. Sample offsets are
    absolute in the resource.
    """

    track_id: int
    shift: int
    trex: _Trex
    # Media decode time of the window's first fragment when it has no tfdt.
    start_dts: int | None = None
    # Drop the samples before the first sync sample (a window that starts
    # inside a fragment, at a sync sample that does not open it).
    from_key: bool = False

    def samples(self, window: Window, data: dict[int, bytes]) -> list[Sample]:
        try:
            return self._samples(window, data)
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise ContainerError(f"damaged fragment: {exc}") from exc

    def _samples(self, window: Window, data: dict[int, bytes]) -> list[Sample]:
        out: list[Sample] = []
        next_dts = self.start_dts
        for run_offset, run in _runs(window.spans, data):
            for box in _boxes(run, 0, len(run)):
                if box.kind != b"moof":
                    continue
                parsed = _traf_samples(
                    run, box, run_offset + box.start, self.track_id, self.trex, self.shift,
                    next_dts,
                )  # fmt: skip
                if parsed is not None:
                    samples, next_dts = parsed
                    out.extend(samples)
        end = max((o + s for o, s in window.spans), default=0)
        for sample in out:
            if sample.offset < window.spans[0][0] or sample.offset + sample.size > end:
                raise ContainerError("a fragment's sample lies outside the window's bytes")
        if self.from_key:
            out = out[next((i for i, s in enumerate(out) if s.key), len(out)) :]
        return out


def _runs(spans: tuple[tuple[int, int], ...], data: dict[int, bytes]) -> list[tuple[int, bytes]]:
    """The spans' bytes joined where spans touch."""
    runs: list[tuple[int, bytes]] = []
    parts: list[bytes] = []
    run_start = run_end = -1
    for offset, size in spans:
        chunk = data.get(offset)
        if chunk is None or len(chunk) < size:
            raise ContainerError(f"span at {offset} not fetched whole")
        if offset != run_end and parts:
            runs.append((run_start, b"".join(parts)))
            parts = []
        if not parts:
            run_start = offset
        parts.append(bytes(chunk[:size]))
        run_end = offset + size
    if parts:
        runs.append((run_start, b"".join(parts)))
    return runs


# --------------------------------------------------------------------------- sidx / tfra


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of whole fragments: bytes, and the presentation time it starts at."""

    offset: int
    size: int
    pts: int  # track ticks, on the presentation timeline
    sap: bool  # starts with a sync sample


class _RawSegment(NamedTuple):
    offset: int
    size: int
    ept: int  # earliest presentation time, in ``timescale`` ticks as written
    duration: int
    timescale: int
    sap: bool
    reference_id: int


def _parse_sidx(src: _Source, offset: int, depth: int, seen: set[int]) -> list[_RawSegment]:
    """A sidx at ``offset`` and, for reference_type 1, the sidx boxes it points
    to (``seen``: the sidx offsets read so far, each read once)."""
    if depth > MAX_SIDX_DEPTH:
        raise ContainerError("sidx nested too deep")
    if offset in seen:
        return []
    seen.add(offset)
    if len(seen) > MAX_SIDX_BOXES:
        raise ContainerError("too many sidx boxes")
    header = src.get(offset, min(16, src.size - offset), FIRST_CHUNK_BYTES)
    if len(header) < 8 or header[4:8] != b"sidx":
        raise ContainerError(f"sidx reference at {offset} points to {header[4:8]!r}")
    size = _box_size(header, src.size - offset)
    if size > MAX_SIDX_BYTES or offset + size > src.size:
        raise ContainerError("sidx box too large")
    buf = src.get(offset, size, FIRST_CHUNK_BYTES)
    box = _box_at(buf, 0, size)
    version, _ = _full_box(buf, box)
    _need(box, 32 if version else 24)
    reference_id, timescale = struct.unpack_from(">II", buf, box.body + 4)
    if version == 0:
        ept, first = struct.unpack_from(">II", buf, box.body + 12)
        pos = box.body + 20
    else:
        ept, first = struct.unpack_from(">QQ", buf, box.body + 12)
        pos = box.body + 28
    if timescale == 0:
        raise ContainerError("sidx timescale 0")
    count = _U16.unpack_from(buf, pos + 2)[0]
    refs = _u32_table(buf, pos + 4, count, box.end, 3)
    at = offset + size + first  # anchor: the first byte after the sidx
    segments: list[_RawSegment] = []
    for i in range(count):
        word, duration, sap = refs[3 * i], refs[3 * i + 1], refs[3 * i + 2]
        ref_size = word & 0x7FFF_FFFF
        if at + ref_size > src.size or ref_size == 0:
            raise ContainerError("sidx reference past the end of the resource")
        if word & 0x8000_0000:
            segments.extend(_parse_sidx(src, at, depth + 1, seen))
        else:
            segments.append(
                _RawSegment(
                    at, ref_size, ept, duration, timescale, bool(sap & SAP_FLAG), reference_id
                )
            )
        at += ref_size
        ept += duration
    return segments


# --------------------------------------------------------------------------- the index


@dataclass(frozen=True, slots=True)
class _Frag:
    """A fragment of one track found in the resource."""

    offset: int  # the moof's first byte
    # The box boundary after its mdat (after the moof alone when no mdat
    # follows, or when later learnt: after boxes holding none of the track).
    next_offset: int
    first_pts: int  # the track's first sample in decode order
    first_sync: bool
    min_pts: int  # the earliest pts in the fragment
    keys: tuple[int, ...]  # the pts of its sync samples, in decode order
    end_pts: int  # the end of its last sample in presentation
    sample_ticks: int  # its most common sample duration


@dataclass
class _FragTrack:
    """What a fragmented track's windows are made from."""

    info: _TrakInfo
    first: _Frag  # the track's first fragment
    segments: list[_Segment] | None  # from sidx or tfra; None: search
    end_pts: int | None  # presentation end of the track, if known


class Mp4Index:
    """The tracks of an MP4 resource and where each sample of them is.

    Made by :func:`open_mp4`; :meth:`window` answers from memory, except for
    fragmented files without sidx or mfra, where it reads a few chunks.
    """

    tracks: list[Track]
    init: bytes
    size_bytes: int
    fragmented: bool
    handlers: tuple[bytes, ...]  # every track's handler type ("vide", "soun", "sbtl"...)
    header_bytes: int  # the ftyp and moov boxes' sizes
    moov_first: bool  # the moov comes before the media (faststart, or fragmented)

    def __init__(
        self,
        src: _Source,
        top: _TopLevel,
        infos: list[_TrakInfo],
        init: bytes,
        frag_tracks: dict[int, _FragTrack] | None = None,
        fragments_end: int = 0,
    ) -> None:
        self._src = src
        self._infos = {info.track.track_id: info for info in infos}
        self._frag_tracks = frag_tracks or {}
        self._fragments_end = fragments_end
        self.tracks = [info.track for info in infos]
        self.init = init
        self.size_bytes = src.size
        self.fragmented = frag_tracks is not None
        self.handlers = _handlers(top.moov)
        self.header_bytes = len(top.ftyp) + len(top.moov)
        first_media = min(
            (min(i.table.offsets) for i in infos if i.table is not None and len(i.table)),
            default=src.size,
        )
        self.moov_first = top.moov_offset < first_media

    def track(self, kind: Literal["video", "audio"]) -> Track | None:
        """The first track of that kind."""
        return next((t for t in self.tracks if t.kind == kind), None)

    def sample_count(self, track_id: int) -> int | None:
        """How many samples a progressive file's track has (None: fragmented)."""
        table = self._infos[track_id].table
        return len(table) if table is not None else None

    def samples_s(self, track_id: int) -> float | None:
        """How long a progressive file's track shows its samples: the sum of
        their durations (what an edit list of the whole track presents; the
        header's duration may also count a composition delay). None:
        fragmented."""
        info = self._infos[track_id]
        if info.table is None:
            return None
        return sum(info.table.durations) / info.track.timescale

    def window(self, track_id: int, start_s: float, end_s: float) -> Window:
        """The bytes holding every sample from the sync sample at or before
        ``start_s`` through the whole GOP holding ``end_s`` (both clamped to
        the track). KeyError for a track the index does not list."""
        info = self._infos[track_id]
        ticks = info.track.timescale
        start = start_s * ticks
        end = max(end_s * ticks, start)
        try:
            if info.table is not None:
                return _table_window(info, info.table, start, end)
            frag = self._frag_tracks[track_id]
            if frag.segments is not None:
                return _segment_window(info, frag.segments, start, end)
            return _Search(self._src, frag, self._fragments_end).window(start, end)
        except (struct.error, IndexError, ValueError, OverflowError) as exc:
            raise ContainerError(f"damaged MP4: {exc}") from exc


def _table_window(info: _TrakInfo, table: _SampleTable, start: float, end: float) -> Window:
    count = len(table)
    if count == 0:
        raise ContainerError(f"track {info.track.track_id} has no samples")
    # Bisect on the running maximum: with sync samples out of presentation
    # order it still finds one at or before ``start`` and the first after ``end``.
    j0 = max(0, bisect.bisect_right(table.sync_max, start) - 1)
    j1 = max(j0 + 1, bisect.bisect_right(table.sync_max, end))
    nsync = len(table.sync_pts)
    keys: set[int] | None = None
    if table.sync is None:
        k0, k1 = j0, min(j1, count)
    else:
        k0 = table.sync[j0] if nsync else 0
        k1 = table.sync[j1] if j1 < nsync else count
        keys = set(table.sync[j0:j1])
    samples = tuple(
        Sample(pts, dts, duration, offset, size, keys is None or k in keys)
        for k, pts, dts, duration, offset, size in zip(
            range(k0, k1),
            table.pts[k0:k1],
            table.dts[k0:k1],
            table.durations[k0:k1],
            table.offsets[k0:k1],
            table.sizes[k0:k1],
            strict=True,
        )
    )
    return Window(
        track_id=info.track.track_id,
        spans=_coalesce((s.offset, s.size) for s in samples),
        reader=KnownSamples(samples),
        starts_on_key=samples[0].key,
        following_key_pts=table.sync_pts[j1] if j1 < nsync else None,
        at_track_end=k1 == count,
        start_pts=samples[0].pts,
    )


def _coalesce(ranges: Iterable[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for offset, size in sorted(ranges):
        if merged and offset <= merged[-1][1] + SPAN_MERGE_GAP_BYTES:
            merged[-1][1] = max(merged[-1][1], offset + size)
        else:
            merged.append([offset, offset + size])
    return tuple((a, b - a) for a, b in merged)


def _segment_window(info: _TrakInfo, segments: list[_Segment], start: float, end: float) -> Window:
    times = [s.pts for s in segments]
    j0 = max(0, bisect.bisect_right(times, start) - 1)
    while j0 > 0 and not segments[j0].sap:
        j0 -= 1
    j1 = max(j0 + 1, bisect.bisect_right(times, end))
    while j1 < len(segments) and not segments[j1].sap:
        j1 += 1
    return Window(
        track_id=info.track.track_id,
        spans=tuple((s.offset, s.size) for s in segments[j0:j1]),
        reader=FragmentReader(info.track.track_id, info.shift, info.trex),
        starts_on_key=segments[j0].sap,
        following_key_pts=segments[j1].pts if j1 < len(segments) else None,
        at_track_end=j1 == len(segments),
        start_pts=segments[j0].pts,
    )


class _Search:
    """Finds the fragments of a time range in a fragmented MP4 without an
    index: an interpolation search over byte offsets (bisection when the
    interpolation stalls), each probe one read of at most 256 KiB, sized
    after the fragments seen so far."""

    def __init__(self, src: _Source, track: _FragTrack, fragments_end: int) -> None:
        self.src = src
        self.track = track
        self.info = track.info
        self.end = fragments_end
        self.known: dict[int, _Frag] = {track.first.offset: track.first}
        self.empty: list[tuple[int, int]] = []  # ranges holding no moof start of the track
        self.fragment_bytes = track.first.next_offset - track.first.offset

    def window(self, start: float, end: float) -> Window:
        # The start: the fragment holding ``start``, or an earlier one, that
        # opens with a sync sample or holds one at or before ``start`` (then
        # the reader drops what comes before that sample).
        first = self.track.first
        lo, _ = self._locate(start)
        for _ in range(MAX_STEPS_TO_SYNC):
            if lo.first_sync or (lo.keys and lo.keys[0] <= start) or lo.offset == first.offset:
                break
            lo, _ = self._locate(lo.first_pts - 1, before=lo.offset)
        from_key = not lo.first_sync and bool(lo.keys)
        start_pts = lo.keys[0] if from_key else lo.first_pts
        # The end: through the fragment holding the next sync sample after
        # ``end``; when that sample opens a fragment, up to that fragment.
        last, after = self._locate(end)
        if last.offset < lo.offset:
            last, after = lo, self._next(lo)
        complete = any(k > max(end, start_pts) for k in last.keys)
        for _ in range(MAX_STEPS_TO_SYNC):
            if complete or after is None or after.first_sync:
                break
            complete = bool(after.keys)
            after = self._next(after)
        stop = after.offset if after is not None else self.end
        return Window(
            track_id=self.info.track.track_id,
            spans=((lo.offset, stop - lo.offset),),
            reader=FragmentReader(
                self.info.track.track_id, self.info.shift, self.info.trex, from_key=from_key
            ),
            starts_on_key=lo.first_sync or from_key,
            following_key_pts=after.first_pts if after is not None and after.first_sync else None,
            at_track_end=after is None,
            start_pts=start_pts,
        )

    def _neighbours(self, target: float, before: int | None) -> tuple[_Frag, _Frag | None]:
        frags = [self.known[k] for k in sorted(self.known)]
        lo = frags[0]
        for frag in frags:
            if before is not None and frag.offset >= before:
                break
            if frag.first_pts <= target:
                lo = frag
        hi = next((f for f in frags if f.offset > lo.offset), None)
        return lo, hi

    def _locate(self, target: float, before: int | None = None) -> tuple[_Frag, _Frag | None]:
        """(the last fragment whose first sample's pts ≤ target, or the first
        fragment; the fragment right after it, None at the end).

        Each probe reads about two fragments' worth of bytes around where the
        target should be. A probe that found fragments on one side only is
        followed by one next to it, on the side of the target; from the
        fifth probe on, every other one bisects, in case the bitrate is far
        from even."""
        side = ""  # what the last probe found: "below" or "above" the target only
        for probe in range(MAX_SEARCH_PROBES):
            lo, hi = self._neighbours(target, before)
            hi_offset = hi.offset if hi is not None else self.end
            floor = lo.next_offset
            if floor >= hi_offset:
                return lo, hi
            ceiling = self._ceiling(floor, hi_offset)
            size = self._probe_bytes()
            chain = False
            if ceiling - floor <= size or side == "below":
                start, chain = floor, True
            elif side == "above":
                start = ceiling - size
            else:
                hi_pts = hi.first_pts if hi is not None else self.track.end_pts
                if hi_pts is None or hi_pts <= lo.first_pts or (probe >= 4 and probe % 2 == 0):
                    center = (floor + ceiling) // 2
                else:
                    frac = min(1.0, max(0.0, (target - lo.first_pts) / (hi_pts - lo.first_pts)))
                    center = lo.offset + int(frac * (hi_offset - lo.offset))
                start = self._skip_empty(max(floor, min(center - size // 2, ceiling - size)))
                if start + 8 >= ceiling:
                    start, chain = floor, True
            stop = min(hi_offset, start + size)
            frags, resume = self._learn(start, stop, chain)
            if chain and not frags:
                if resume <= floor:
                    raise ContainerError(f"no box boundary found at {floor}")
                # Nothing of the track there: the fragment's bytes reach further.
                self.known[lo.offset] = dataclasses.replace(lo, next_offset=resume)
            elif not chain and not frags:
                self.empty.append((start, stop))
                # Inside a fragment larger than the probes: read more at a time.
                self.fragment_bytes = max(self.fragment_bytes, stop - start)
            below = any(f.first_pts <= target for f in frags)
            above = any(f.first_pts > target for f in frags)
            side = "below" if below and not above else "above" if above and not below else ""
        raise ContainerError("fragment search did not converge")

    def _ceiling(self, floor: int, hi_offset: int) -> int:
        """``hi_offset`` less the ranges known to hold no moof that reach it."""
        ceiling = hi_offset
        moved = True
        while moved:
            moved = False
            for a, b in self.empty:
                if a < ceiling <= b and a >= floor:
                    ceiling, moved = a, True
        return max(floor, ceiling)

    def _skip_empty(self, offset: int) -> int:
        moved = True
        while moved:
            moved = False
            for a, b in self.empty:
                if a <= offset < b:
                    offset, moved = b, True
        return offset

    def _probe_bytes(self) -> int:
        return max(MIN_PROBE_BYTES, min(MAX_PROBE_BYTES, 2 * self.fragment_bytes))

    def _next(self, frag: _Frag) -> _Frag | None:
        """The fragment after ``frag``, None at the end."""
        for _ in range(MAX_SEARCH_PROBES):
            frag = self.known[frag.offset]
            later = [self.known[k] for k in sorted(self.known) if k > frag.offset]
            if frag.next_offset >= self.end:
                return None
            if later and later[0].offset <= frag.next_offset:
                return later[0]
            stop = min(
                later[0].offset if later else self.end, frag.next_offset + self._probe_bytes()
            )
            frags, resume = self._learn(frag.next_offset, stop, chain=True)
            if not frags:
                if resume <= frag.next_offset:
                    return None  # a few trailing bytes that are no box
                self.known[frag.offset] = dataclasses.replace(frag, next_offset=resume)
        raise ContainerError("fragment walk did not converge")

    def _learn(self, start: int, stop: int, chain: bool) -> tuple[list[_Frag], int]:
        """Read ``[start, stop)`` and keep the track's fragments found in it."""
        buf = self.src.get(start, stop - start)
        if chain:
            frags, resume = _walk(buf, 0, start, self.src, self.end, self.info)
        else:
            frags, resume = _scan(buf, start, self.src, self.end, self.info), stop
        frags = [f for f in frags if f.offset not in self.known]
        for frag in frags:
            self.known[frag.offset] = frag
        sizes = [f.next_offset - f.offset for f in frags]
        if sizes:
            self.fragment_bytes = max(self.fragment_bytes, max(sizes))
        return frags, resume


def _walk(
    buf: bytes, pos: int, base: int, src: _Source, limit: int, info: _TrakInfo
) -> tuple[list[_Frag], int]:
    """Walk the boxes of ``buf`` (read at ``base``) from ``pos``, a box
    boundary: the track's fragments whose moof starts in ``buf``, and the
    first boundary not walked past."""
    found: list[_Frag] = []
    while pos + 8 <= len(buf) and base + pos < limit:
        size, kind = _HEADER.unpack_from(buf, pos)
        if size == 1:
            if pos + 16 > len(buf):
                break
            size = _U64.unpack_from(buf, pos + 8)[0]
            if size < 16:
                raise ContainerError(f"box at {base + pos} with a 64-bit size of {size}")
        elif size == 0:
            size = limit - (base + pos)
        if size < 8 or base + pos + size > src.size:
            raise ContainerError(f"box at {base + pos} runs past the end")
        if kind != b"moof":
            pos += size
            continue
        if size > MAX_MOOF_BYTES:
            raise ContainerError(f"moof of {size} bytes")
        if pos + size + 16 <= len(buf):
            local, at = buf, pos
        else:  # the moof (or the mdat header after it) runs past the chunk
            local, at = src.get(base + pos, min(size + 16, src.size - base - pos)), 0
        moof = _box_at(local, at, len(local))
        frag = _fragment(local, moof, base + pos, src.size, info)
        if frag is not None:
            found.append(frag)
            pos = frag.next_offset - base
        else:
            pos = _after_moof(local, moof, base + pos, src.size) - base
    return found, base + pos


def _after_moof(buf: bytes, moof: _Box, moof_offset: int, size_bytes: int) -> int:
    """The boundary after a moof's mdat (after the moof if no mdat follows)."""
    after = moof.end
    moof_end = moof_offset + (moof.end - moof.start)
    if after + 8 <= len(buf) and buf[after + 4 : after + 8] == b"mdat":
        mdat_bytes: int = _U32.unpack_from(buf, after)[0]
        if mdat_bytes == 1 and after + 16 <= len(buf):
            mdat_bytes = _U64.unpack_from(buf, after + 8)[0]
        elif mdat_bytes == 0:
            return size_bytes
        if mdat_bytes >= 8:
            return min(size_bytes, moof_end + mdat_bytes)
    return moof_end


def _fragment(
    buf: bytes, moof: _Box, moof_offset: int, size_bytes: int, info: _TrakInfo
) -> _Frag | None:
    """The track's fragment in ``moof`` (at ``moof_offset`` in the resource),
    None if it has none."""
    track = info.track
    parsed = _traf_samples(buf, moof, moof_offset, track.track_id, info.trex, info.shift, None)
    if parsed is None or not parsed[0]:
        return None
    samples = parsed[0]
    durations: dict[int, int] = {}
    for sample in samples:
        durations[sample.duration] = durations.get(sample.duration, 0) + 1
    return _Frag(
        offset=moof_offset,
        next_offset=_after_moof(buf, moof, moof_offset, size_bytes),
        first_pts=samples[0].pts,
        first_sync=samples[0].key,
        min_pts=min(s.pts for s in samples),
        keys=tuple(s.pts for s in samples if s.key),
        end_pts=max(s.pts + s.duration for s in samples),
        sample_ticks=max(durations, key=lambda d: durations[d]),
    )


def _scan(buf: bytes, base: int, src: _Source, limit: int, info: _TrakInfo) -> list[_Frag]:
    """The track's fragments from the first genuine moof in ``buf`` (read at
    ``base``, from anywhere): a plausible size, mfhd first, each traf opening
    with tfhd, an mdat right after it when seen, and a moof that parses."""
    at = buf.find(b"moof", 4)
    while at != -1:
        pos = at - 4
        if _looks_like_moof(buf, pos):
            try:
                frags, _ = _walk(buf, pos, base, src, limit, info)
            except ContainerError:
                frags = []
            if frags:
                return frags
        at = buf.find(b"moof", at + 1)
    return []


def _looks_like_moof(buf: bytes, pos: int) -> bool:
    size = _U32.unpack_from(buf, pos)[0]
    if not 8 + 16 + 16 <= size <= MAX_MOOF_BYTES or pos + 24 > len(buf):
        return False
    if _HEADER.unpack_from(buf, pos + 8) != (16, b"mfhd"):
        return False
    if pos + size > len(buf):
        return True  # read whole and parsed before it counts
    try:
        trafs = [k for k in _boxes(buf, pos + 8, pos + size) if k.kind == b"traf"]
        if not trafs or any(_box_at(buf, t.body, t.end).kind != b"tfhd" for t in trafs):
            return False
    except ContainerError:
        return False
    after = pos + size
    return after + 8 > len(buf) or buf[after + 4 : after + 8] == b"mdat"


# --------------------------------------------------------------------------- open


def open_mp4(read: Read, size_bytes: int) -> Mp4Index:
    """Read an MP4's index through ``read`` (a few Range reads).

    Raises ContainerError when the bytes are not an MP4 this index can read.
    """
    if size_bytes < 16:
        raise ContainerError("too small to be an MP4")
    src = _Source(read, size_bytes)
    try:
        return _open(src)
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        raise ContainerError(f"damaged MP4: {exc}") from exc


def open_file(path: Path) -> Mp4Index:
    """The index of a local MP4 file (its moov read, nothing decoded)."""
    with path.open("rb") as f:
        fd = f.fileno()
        return open_mp4(lambda offset, length: os.pread(fd, length, offset), os.fstat(fd).st_size)


class _TopLevel(NamedTuple):
    ftyp: bytes
    moov: bytes
    moov_offset: int
    sidx_offsets: list[int]
    first_moof: int | None


def _scan_top_level(src: _Source) -> _TopLevel:
    """Walk the top-level boxes from the start (jumping over mdat) to moov,
    and for fragmented files on to the first moof, noting sidx boxes."""
    pos = 0
    ftyp = moov = b""
    moov_offset = -1
    sidx: list[int] = []
    src.get(0, min(FIRST_CHUNK_BYTES, src.size))
    for _ in range(MAX_TOP_LEVEL_BOXES):
        if pos >= src.size:
            break
        header_bytes = min(16, src.size - pos)
        if header_bytes < 8:
            raise ContainerError(f"trailing bytes at {pos}")
        if src.reads > MAX_TOP_LEVEL_READS:
            raise ContainerError(f"no moov within {MAX_TOP_LEVEL_READS} reads")
        header = src.get(pos, header_bytes, FIRST_CHUNK_BYTES)
        size = _box_size(header, src.size - pos)
        kind = header[4:8]
        end = pos + size
        if end > src.size:
            raise ContainerError(f"{kind!r} box at {pos} runs past the end of the resource")
        if kind == b"moov":
            if moov:
                raise ContainerError("two moov boxes")
            if size > MAX_MOOV_BYTES:
                raise ContainerError(f"moov of {size} bytes")
            moov, moov_offset = src.get(pos, size, FIRST_CHUNK_BYTES), pos
            if not _has_child(moov, b"mvex"):
                break
        elif kind == b"ftyp" and not ftyp:
            if size > 4096:
                raise ContainerError("ftyp too large")
            ftyp = src.get(pos, size)
        elif kind == b"sidx":
            sidx.append(pos)
        elif kind == b"moof":
            if not moov:
                raise ContainerError("moof before moov")
            return _TopLevel(ftyp, moov, moov_offset, sidx, pos)
        elif kind == b"mfra" and moov:
            break
        pos = end
    else:
        raise ContainerError("too many top-level boxes")
    if not moov:
        raise ContainerError("no moov box")
    return _TopLevel(ftyp, moov, moov_offset, sidx, None)


def _box_size(header: bytes, left: int) -> int:
    size: int = _U32.unpack_from(header, 0)[0]
    if size == 1:
        if len(header) < 16:
            raise ContainerError("truncated 64-bit box header")
        size = _U64.unpack_from(header, 8)[0]
        if size < 16:
            raise ContainerError(f"box with a 64-bit size of {size}")
    elif size == 0:
        size = left
    elif size < 8:
        raise ContainerError(f"box with a size of {size}")
    return size


def _has_child(buf: bytes, kind: bytes) -> bool:
    root = _box_at(buf, 0, len(buf))
    return any(box.kind == kind for box in _boxes(buf, root.body, root.end))


def _open(src: _Source) -> Mp4Index:
    top = _scan_top_level(src)
    infos, fragmented, mehd_s = _parse_moov(top.moov, src.size)
    if not infos:
        raise ContainerError("no audio or video track")
    if not fragmented:
        init = top.ftyp + _init_moov(top.moov, {i.track.track_id for i in infos})
        return Mp4Index(src, top, infos, init)

    init = src.get(0, top.moov_offset + len(top.moov))
    if top.first_moof is None:
        raise ContainerError("fragmented MP4 without fragments")
    heads = {info.track.track_id: _first_fragments(src, top.first_moof, info) for info in infos}
    firsts = {tid: frags[0] for tid, frags in heads.items()}

    raw: list[_RawSegment] = []
    if top.sidx_offsets:
        seen: set[int] = set()
        for offset in top.sidx_offsets:
            # A top-level sidx already reached from one before it is read once.
            raw.extend(_parse_sidx(src, offset, 0, seen))
        if not _covers_fragments(src, raw):
            raw = []  # one sidx per segment (DASH-style): search instead
    found: dict[int, tuple[list[_Segment], int]] = {}
    for info in infos:
        tid = info.track.track_id
        mine = [s for s in raw if s.reference_id == tid] or [
            s for s in raw if s.reference_id == raw[0].reference_id
        ]
        from_sidx = _sidx_segments(mine, info.track.timescale, firsts[tid]) if mine else None
        if from_sidx is not None and _agrees(from_sidx[0], heads[tid]):
            found[tid] = from_sidx

    fragments_end = src.size
    tfra: list[_TfraEntry] = []
    tail, tail_offset = b"", src.size
    if len(found) < len(infos):
        # The fragments' extent, an mfra, and the track's end are at the tail.
        fragment_bytes = max(f.next_offset - f.offset for f in firsts.values())
        tail_bytes = max(MIN_PROBE_BYTES, min(MAX_PROBE_BYTES, 3 * fragment_bytes))
        tail_offset = max(top.first_moof, src.size - tail_bytes)
        tail = src.get(tail_offset, src.size - tail_offset)
        mfra_offset, tfra = _read_mfra(src, tail, tail_offset)
        if mfra_offset is not None:
            fragments_end = mfra_offset

    updated: list[_TrakInfo] = []
    frag_tracks: dict[int, _FragTrack] = {}
    for info in infos:
        track, tid = info.track, info.track.track_id
        first = firsts[tid]
        duration_s = track.duration_s or mehd_s
        segments: list[_Segment] | None = None
        end_pts: int | None = None
        if tid in found:
            segments, end_pts = found[tid]
        else:
            entries = [e for e in tfra if e.track_id == tid]
            if entries:
                segments = _tfra_segments(entries, first, fragments_end)
                if segments is not None and not _agrees(segments, heads[tid]):
                    segments = None
            last = _last_fragment(src, tail, tail_offset, fragments_end, info)
            if last is not None:
                end_pts = last.end_pts
            elif mehd_s is not None:
                end_pts = first.min_pts + round(mehd_s * track.timescale)
        if duration_s is None and end_pts is not None:
            duration_s = (end_pts - first.min_pts) / track.timescale
        video = track.kind == "video" and first.sample_ticks > 0
        track = dataclasses.replace(
            track,
            duration_s=duration_s,
            first_pts=first.min_pts,
            fps=track.timescale / first.sample_ticks if video else None,
        )
        info = _TrakInfo(track, info.shift, None, info.trex)
        updated.append(info)
        frag_tracks[tid] = _FragTrack(info, first, segments, end_pts)
    return Mp4Index(src, top, updated, init, frag_tracks, fragments_end)


def _first_fragments(src: _Source, first_moof: int, info: _TrakInfo) -> list[_Frag]:
    """The track's first fragments (at least one), walking from the first
    moof (in the chunk already read, most of the time)."""
    pos = first_moof
    for _ in range(MAX_SEARCH_PROBES):
        if pos >= src.size:
            break
        buf = src.cached_from(pos, 4096)
        frags, resume = _walk(buf, 0, pos, src, src.size, info)
        if frags:
            return frags
        if resume <= pos:
            break
        pos = resume
    raise ContainerError(f"track {info.track.track_id}: no fragment found")


def _agrees(segments: list[_Segment], frags: list[_Frag]) -> bool:
    """Whether an index's sync flags hold for the fragments already parsed.

    FFmpeg's global_sidx says every fragment starts with a SAP, and its tfra
    lists every fragment's first sample, even when fragments are cut by
    duration and open with a non-sync sample. Such an index is not trusted
    (the search finds sync samples wherever they are); a lie past the
    fragments seen at open goes unnoticed.
    """
    for seg in segments:
        inside = [f for f in frags if seg.offset <= f.offset < seg.offset + seg.size]
        if inside and inside[0].first_sync != seg.sap:
            return False
    return True


def _covers_fragments(src: _Source, raw: list[_RawSegment]) -> bool:
    """Whether the sidx segments reach the last fragment (not one sidx per segment)."""
    if not raw:
        return False
    end = max(s.offset + s.size for s in raw)
    if end >= src.size:
        return True
    header = src.get(end, min(16, src.size - end), 4096)
    return header[4:8] not in (b"moof", b"styp", b"sidx")


def _sidx_segments(
    raw: list[_RawSegment], timescale: int, first: _Frag
) -> tuple[list[_Segment], int] | None:
    """Segments on the presentation timeline, and the track's end; None when
    the sidx does not start with the track's first fragment.

    Writers disagree on whether sidx times come before or after the edit
    list (FFmpeg's dash muxer: after; its global_sidx: before). The first
    fragment, parsed, settles it: its earliest pts is what the first
    reference says.
    """
    raw = sorted(raw, key=lambda s: s.offset)
    if not raw[0].offset <= first.offset < raw[0].offset + raw[0].size:
        return None
    delta = raw[0].ept * timescale // raw[0].timescale - first.min_pts
    segments = [
        _Segment(s.offset, s.size, s.ept * timescale // s.timescale - delta, s.sap) for s in raw
    ]
    last = raw[-1]
    end = (last.ept + last.duration) * timescale // last.timescale - delta
    return segments, max(end, first.end_pts)


class _TfraEntry(NamedTuple):
    track_id: int
    time: int
    moof_offset: int
    at_moof_start: bool  # the entry is the first sample of the moof's first trun


def _tfra_segments(
    entries: list[_TfraEntry], first: _Frag, fragments_end: int
) -> list[_Segment] | None:
    """Segments from tfra entries, calibrated on the first fragment like
    sidx times; None when the entries do not start at the first fragment."""
    by_offset: dict[int, _TfraEntry] = {}
    for entry in sorted(entries, key=lambda e: (e.moof_offset, e.time)):
        if first.offset <= entry.moof_offset < fragments_end:
            by_offset.setdefault(entry.moof_offset, entry)
    head = by_offset.get(first.offset)
    if head is None or not head.at_moof_start:
        return None
    delta = head.time - first.first_pts
    offsets = sorted(by_offset)
    stops = [*offsets[1:], fragments_end]
    return [
        _Segment(o, stop - o, by_offset[o].time - delta, by_offset[o].at_moof_start)
        for o, stop in zip(offsets, stops, strict=True)
    ]


def _read_mfra(src: _Source, tail: bytes, tail_offset: int) -> tuple[int | None, list[_TfraEntry]]:
    """The mfra's offset and its tfra entries, when the last 16 bytes are an
    mfro pointing at one (a bad pointer is ignored: the search needs none)."""
    if len(tail) < 16 or tail[-12:-8] != b"mfro":
        return None, []
    mfra_size = _U32.unpack_from(tail, len(tail) - 4)[0]
    if not 16 <= mfra_size <= min(MAX_MFRA_BYTES, src.size):
        return None, []
    offset = src.size - mfra_size
    inside = offset >= tail_offset
    buf = tail[offset - tail_offset :] if inside else src.get(offset, mfra_size)
    if buf[4:8] != b"mfra" or _U32.unpack_from(buf, 0)[0] != mfra_size:
        return None, []
    entries: list[_TfraEntry] = []
    mfra = _box_at(buf, 0, len(buf))
    for box in _boxes(buf, mfra.body, mfra.end):
        if box.kind != b"tfra":
            continue
        version, _ = _full_box(buf, box)
        _need(box, 16)
        track_id, lengths, count = struct.unpack_from(">III", buf, box.body + 4)
        widths = [((lengths >> shift) & 3) + 1 for shift in (4, 2, 0)]
        time_bytes = 8 if version == 1 else 4
        pos = box.body + 16
        if pos + count * (2 * time_bytes + sum(widths)) > box.end:
            raise ContainerError("tfra entry count larger than its box")
        for _ in range(count):
            time = int.from_bytes(buf[pos : pos + time_bytes], "big")
            moof = int.from_bytes(buf[pos + time_bytes : pos + 2 * time_bytes], "big")
            pos += 2 * time_bytes
            numbers = []
            for width in widths:
                numbers.append(int.from_bytes(buf[pos : pos + width], "big"))
                pos += width
            entries.append(_TfraEntry(track_id, time, moof, numbers[1] == 1 and numbers[2] == 1))
    return offset, entries


def _last_fragment(
    src: _Source, tail: bytes, tail_offset: int, fragments_end: int, info: _TrakInfo
) -> _Frag | None:
    """The track's last fragment, from the tail (read further back, a few
    times at most, while no moof of the track shows)."""
    buf = tail[: max(0, fragments_end - tail_offset)]
    base = tail_offset if buf else fragments_end
    for _ in range(4):
        frags = _scan(buf, base, src, fragments_end, info)
        if frags:
            return frags[-1]
        if base == 0:
            return None
        start = max(0, base - min(MAX_PROBE_BYTES, max(MIN_PROBE_BYTES, 4 * len(buf))))
        buf, base = src.get(start, base - start) + buf, start
    return None


# --------------------------------------------------------------------------- init


def _init_moov(moov: bytes, keep: set[int]) -> bytes:
    """A copy of a progressive moov that PyAV opens on its own: the kept
    tracks with their descriptions and edit lists, sample tables emptied
    (so the init is small and FFmpeg never looks for the absent mdat)."""
    root = _box_at(moov, 0, len(moov))
    parts: list[bytes] = []
    for box in _boxes(moov, root.body, root.end):
        if box.kind == b"mvhd":
            parts.append(moov[box.start : box.end])
        elif box.kind == b"trak":
            kids = _children(moov, box)
            tkhd = kids[b"tkhd"]
            version = moov[tkhd.body]
            tid = _U32.unpack_from(moov, tkhd.body + (20 if version == 1 else 12))[0]
            if tid in keep:
                parts.append(_rebuild(moov, box))
    return _box_bytes(b"moov", b"".join(parts))


_EMPTY_TABLES = (
    _box_bytes(b"stts", bytes(8)),
    _box_bytes(b"stsc", bytes(8)),
    _box_bytes(b"stsz", bytes(12)),
    _box_bytes(b"stco", bytes(8)),
)


def _rebuild(buf: bytes, box: _Box) -> bytes:
    """``box`` with every stbl reduced to its stsd and empty tables (tref and
    udta dropped: they may name tracks the init leaves out)."""
    if box.kind == b"stbl":
        stsd = _children(buf, box)[b"stsd"]
        return _box_bytes(b"stbl", buf[stsd.start : stsd.end] + b"".join(_EMPTY_TABLES))
    if box.kind not in (b"trak", b"mdia", b"minf"):
        return buf[box.start : box.end]
    inner = [
        _rebuild(buf, child)
        for child in _boxes(buf, box.body, box.end)
        if child.kind not in (b"tref", b"udta", b"meta")
    ]
    return _box_bytes(box.kind, b"".join(inner))
