"""WebM/Matroska index read with HTTP Range: tracks, cues, and cluster windows.

Opening reads the EBML header, the SeekHead, Info and Tracks (normally all in
the first 64 KiB) and the Cues, wherever they are (one more read or two when
they sit at the end, as FFmpeg writes them by default). A window is then a
byte range of whole Clusters found from the Cues alone, without a read; a file
without Cues is searched by bisection over byte offsets (a few reads whatever
the position). The Clusters' bytes, once fetched, are parsed by
:class:`ClusterReader` (picklable) into the track's samples.

Times: Matroska stores each block's presentation time (cluster Timecode +
the block's relative time, in TimecodeScale units). Like FFmpeg's demuxer,
this index shifts a track's times back by its CodecDelay (Opus pre-skip), so
the first Opus packet of an FFmpeg-made file sits at -7 ms, exactly where
PyAV puts it. ``dts`` is set equal to ``pts``: right for VP8/VP9/AV1 and the
audio codecs, which never reorder frames; H.264/HEVC with B-frames in
Matroska have no stored decode times, and their ``dts`` here are not
monotonic.

Hostile input (sizes past the end, bad vints, unknown sizes where none may be,
absurd lengths) raises :class:`ContainerError`; parsing never recurses into
elements it does not need, so deep nesting costs nothing.
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from clipservice.media.containers.base import ContainerError, Read, Sample, Track, Window

# Element IDs (with their length marker bits, as written).
_EBML = 0x1A45DFA3
_DOCTYPE = 0x4282
_SEGMENT = 0x18538067
_SEEKHEAD = 0x114D9B74
_SEEK = 0x4DBB
_SEEK_ID = 0x53AB
_SEEK_POSITION = 0x53AC
_INFO = 0x1549A966
_TIMECODE_SCALE = 0x2AD7B1
_DURATION = 0x4489
_TRACKS = 0x1654AE6B
_TRACK_ENTRY = 0xAE
_TRACK_NUMBER = 0xD7
_TRACK_TYPE = 0x83
_CODEC_ID = 0x86
_CODEC_PRIVATE = 0x63A2
_DEFAULT_DURATION = 0x23E383
_TRACK_TIMECODE_SCALE = 0x23314F
_CODEC_DELAY = 0x56AA
_SEEK_PRE_ROLL = 0x56BB
_CONTENT_ENCODINGS = 0x6D80
_VIDEO = 0xE0
_PIXEL_WIDTH = 0xB0
_PIXEL_HEIGHT = 0xBA
_AUDIO = 0xE1
_SAMPLING_FREQUENCY = 0xB5
_CHANNELS = 0x9F
_CUES = 0x1C53BB6B
_CUE_POINT = 0xBB
_CUE_TIME = 0xB3
_CUE_TRACK_POSITIONS = 0xB7
_CUE_TRACK = 0xF7
_CUE_CLUSTER_POSITION = 0xF1
_CUE_RELATIVE_POSITION = 0xF0
_CLUSTER = 0x1F43B675
_TIMECODE = 0xE7
_SIMPLE_BLOCK = 0xA3
_BLOCK_GROUP = 0xA0
_BLOCK = 0xA1
_BLOCK_DURATION = 0x9B
_REFERENCE_BLOCK = 0xFB
_TAGS = 0x1254C367
_CHAPTERS = 0x1043A770
_ATTACHMENTS = 0x1941A469
_VOID = 0xEC
_CRC32 = 0xBF

# Elements that sit directly in the Segment: an unknown-size Cluster ends
# where the next of these (or a new EBML header) starts.
_LEVEL1 = frozenset(
    {_SEEKHEAD, _INFO, _TRACKS, _CUES, _CLUSTER, _TAGS, _CHAPTERS, _ATTACHMENTS, _EBML, _SEGMENT}
)

_CODECS = {
    "V_VP9": "vp9",
    "V_VP8": "vp8",
    "V_AV1": "av1",
    "V_MPEG4/ISO/AVC": "h264",
    "V_MPEGH/ISO/HEVC": "hevc",
    "V_MPEG4/ISO/ASP": "mpeg4",
    "V_MPEG2": "mpeg2video",
    "V_THEORA": "theora",
    "A_OPUS": "opus",
    "A_VORBIS": "vorbis",
    "A_MPEG/L3": "mp3",
    "A_MPEG/L2": "mp2",
    "A_FLAC": "flac",
    "A_AC3": "ac3",
    "A_EAC3": "eac3",
}

_CHUNK_BYTES = 64 * 1024
# Bounds on what one open may read: the header elements and the Cues of a
# many-hour file fit well within these; more means damage or a hostile file.
_MAX_HEADER_ELEMENT_BYTES = 16 * 1024 * 1024
_MAX_CUES_BYTES = 64 * 1024 * 1024
_MAX_LEVEL1_STEPS = 256
# A Cluster's ID, size (8 bytes at most) and the start of its data.
_MAX_CLUSTER_HEADER_BYTES = 12
# Without cues of its own, a track's window starts and ends this much
# further out than asked: another track's cue times and cluster starts say
# where that track's frames are, while an audio frame near the boundary may
# have been muxed into the neighbouring cluster.
_FOREIGN_MARGIN_S = 0.25
# Bisection without Cues: bytes read per probe, and how far a probe may look
# forward for the next Cluster start (doubling reads) before giving up.
_PROBE_BYTES = 64 * 1024
_MAX_PROBE_BYTES = 64 * 1024 * 1024
# Clusters looked at, one by one, before the start and after the end of a
# Cue-less window for one that starts on a key frame of the track.
_MAX_STEP_CLUSTERS = 8
# A probe looks for a Cluster's first blocks in at least this many bytes.
_MIN_PROBE_BYTES = 8 * 1024
_CLUSTER_ID = b"\x1f\x43\xb6\x75"
_NANOSECONDS = 1_000_000_000


class _Truncated(ContainerError):
    """An element runs past the end of the bytes at hand (not necessarily damage:
    the caller may read on)."""


@contextmanager
def _damaged(what: str) -> Iterator[None]:
    """Turn the slip of a parser on bytes it did not expect into a ContainerError."""
    try:
        yield
    except (IndexError, ValueError, OverflowError, struct.error) as exc:
        raise ContainerError(f"damaged WebM {what}: {exc}") from exc


# --- EBML primitives ---------------------------------------------------------------------------


def _read_id(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """An element ID (marker bits kept) at ``pos`` -> (id, position after it)."""
    if pos >= end:
        raise _Truncated("element ID past the end")
    first = buf[pos]
    if first == 0:
        raise ContainerError(f"bad element ID at {pos}")
    length = 9 - first.bit_length()
    if length > 4:
        raise ContainerError(f"element ID longer than 4 bytes at {pos}")
    if pos + length > end:
        raise _Truncated("element ID past the end")
    return int.from_bytes(buf[pos : pos + length], "big"), pos + length


def _read_vint(buf: bytes, pos: int, end: int) -> tuple[int | None, int]:
    """A variable-size integer (an element size) -> (value or None if 'unknown', next pos)."""
    if pos >= end:
        raise _Truncated("size past the end")
    first = buf[pos]
    if first == 0:
        raise ContainerError(f"bad variable-size integer at {pos}")
    length = 9 - first.bit_length()
    if pos + length > end:
        raise _Truncated("size past the end")
    all_ones = (1 << (7 * length)) - 1
    value = int.from_bytes(buf[pos : pos + length], "big") & all_ones
    return (None if value == all_ones else value), pos + length


def _header(buf: bytes, pos: int, end: int) -> tuple[int, int | None, int]:
    """An element's header at ``pos`` -> (id, data size or None, data start)."""
    eid, pos = _read_id(buf, pos, end)
    size, pos = _read_vint(buf, pos, end)
    return eid, size, pos


def _children(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """The child elements of a master element held whole in ``buf[start:end]``:
    (id, data start, data end)."""
    pos = start
    while pos < end:
        try:
            eid, size, data = _header(buf, pos, end)
        except _Truncated as exc:
            raise ContainerError(f"element header runs past its parent at {pos}") from exc
        if size is None:
            raise ContainerError(f"unknown size inside a sized element at {pos}")
        if data + size > end:
            raise ContainerError(f"element at {pos} runs past its parent")
        yield eid, data, data + size
        pos = data + size


def _uint(buf: bytes, start: int, end: int) -> int:
    if end - start > 8:
        raise ContainerError("unsigned integer longer than 8 bytes")
    return int.from_bytes(buf[start:end], "big")


def _float(buf: bytes, start: int, end: int) -> float:
    size = end - start
    if size == 0:
        return 0.0
    if size == 4:
        value: float = struct.unpack(">f", buf[start:end])[0]
    elif size == 8:
        value = struct.unpack(">d", buf[start:end])[0]
    else:
        raise ContainerError("float neither 4 nor 8 bytes")
    if not math.isfinite(value):
        raise ContainerError("float not finite")
    return value


def _string(buf: bytes, start: int, end: int) -> str:
    return buf[start:end].split(b"\0", 1)[0].decode("ascii", "replace")


def _round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, halves away from
    zero (FFmpeg's av_rescale rounding), for a positive denominator."""
    if numerator >= 0:
        return (2 * numerator + denominator) // (2 * denominator)
    return -((-2 * numerator + denominator) // (2 * denominator))


# --- The window reader -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterReader:
    """Reads one track's samples out of the fetched bytes of whole Clusters.

    A sample's pts is ``(cluster Timecode + block time) * tick_mult -
    delay_ticks`` in ticks of the track's timescale. ``trim_to_key`` drops the
    track's samples before its first key frame (a Cluster may start mid-GOP);
    ``stop_key_pts`` drops the key frame at that time and everything after it
    (the part of the next GOP that shares a Cluster with the window's end);
    ``partial_tail``: the last span ends inside a Cluster, and parsing stops
    at its first incomplete element.
    """

    track_number: int
    tick_mult: int
    delay_ticks: int
    timecode_scale_ns: int
    default_duration_ns: int | None
    trim_to_key: bool = False
    stop_key_pts: int | None = None
    partial_tail: bool = False

    def samples(self, window: Window, data: dict[int, bytes]) -> list[Sample]:
        blocks: list[_Block] = []
        last = len(window.spans) - 1
        for i, (offset, size) in enumerate(window.spans):
            try:
                buf = data[offset]
            except KeyError:
                raise ContainerError(f"no bytes given for the span at {offset}") from None
            if len(buf) != size:
                raise ContainerError(f"span at {offset}: {len(buf)} bytes, expected {size}")
            with _damaged("cluster"):
                try:
                    self._parse_span(buf, offset, blocks)
                except _Truncated:
                    if not (self.partial_tail and i == last):
                        raise
        return self._to_samples(blocks)

    # Parsing --------------------------------------------------------------------------------

    def _parse_span(self, buf: bytes, base: int, blocks: list[_Block]) -> None:
        pos, end = 0, len(buf)
        while pos < end:
            eid, size, data = _header(buf, pos, end)
            if eid == _CLUSTER:
                pos = self._parse_cluster(buf, base, data, size, blocks)
            elif eid in _LEVEL1 or eid in (_VOID, _CRC32):
                if size is None:
                    raise ContainerError(f"unknown-size element {eid:X} between clusters")
                if data + size > end:
                    raise _Truncated("element past the end of the span")
                pos = data + size
            else:
                raise ContainerError(
                    f"element {eid:X} where a Cluster was expected at {base + pos}"
                )

    def _parse_cluster(
        self, buf: bytes, base: int, start: int, size: int | None, blocks: list[_Block]
    ) -> int:
        """Parses the Cluster whose data starts at ``start``; returns where it ends."""
        end = len(buf) if size is None else start + size
        # A Cluster cut by the end of the bytes: its blocks before the cut are
        # still read, and _Truncated comes at the cut.
        limit = min(end, len(buf))
        timecode: int | None = None
        pos = start
        while pos < end:
            if size is None and pos < limit:
                # An unknown-size Cluster ends at the next top-level element.
                eid, _ = _read_id(buf, pos, limit)
                if eid in _LEVEL1:
                    return pos
            eid, child_size, data = _header(buf, pos, limit)
            if child_size is None:
                raise ContainerError(f"unknown size inside a Cluster at {base + pos}")
            child_end = data + child_size
            if size is not None and child_end > end:
                raise ContainerError(f"element at {base + pos} runs past its Cluster")
            if child_end > limit:
                raise _Truncated("cluster past the end of the span")
            if eid == _TIMECODE:
                timecode = _uint(buf, data, child_end)
            elif eid == _SIMPLE_BLOCK:
                block = _BlockAt(base + pos, data, child_end)
                self._parse_block(buf, base, block, timecode, None, None, blocks)
            elif eid == _BLOCK_GROUP:
                self._parse_group(buf, base, base + pos, data, child_end, timecode, blocks)
            pos = child_end
        return pos

    def _parse_group(
        self,
        buf: bytes,
        base: int,
        at: int,
        start: int,
        end: int,
        timecode: int | None,
        blocks: list[_Block],
    ) -> None:
        block: _BlockAt | None = None
        duration: int | None = None
        referenced = False
        for eid, data, data_end in _children(buf, start, end):
            if eid == _BLOCK:
                block = _BlockAt(at, data, data_end)
            elif eid == _BLOCK_DURATION:
                duration = _uint(buf, data, data_end)
            elif eid == _REFERENCE_BLOCK:
                referenced = True
        if block is not None:
            self._parse_block(buf, base, block, timecode, not referenced, duration, blocks)

    def _parse_block(
        self,
        buf: bytes,
        base: int,
        block: _BlockAt,
        timecode: int | None,
        group_key: bool | None,
        duration: int | None,
        blocks: list[_Block],
    ) -> None:
        start, end = block.start, block.end
        track, pos = _read_vint(buf, start, end)
        if track != self.track_number:
            return
        if pos + 3 > end:
            raise ContainerError(f"block header runs past the block at {base + start}")
        if timecode is None:
            raise ContainerError(f"block before its Cluster's Timecode at {base + start}")
        relative = int.from_bytes(buf[pos : pos + 2], "big", signed=True)
        flags = buf[pos + 2]
        pos += 3
        key = bool(flags & 0x80) if group_key is None else group_key
        frames = _laced_frames(buf, pos, end, (flags >> 1) & 3)
        blocks.append(
            _Block(
                raw_time=timecode + relative,
                key=key,
                frames=[(base + offset, size) for offset, size in frames],
                raw_duration=duration,
                at=block.at,
            )
        )

    # Samples --------------------------------------------------------------------------------

    def _to_samples(self, blocks: list[_Block]) -> list[Sample]:
        # (pts, offset, size, key, known duration or None)
        frames: list[tuple[int, int, int, bool, int | None]] = []
        starts = [b.raw_time * self.tick_mult - self.delay_ticks for b in blocks]
        for i, block in enumerate(blocks):
            pts, count = starts[i], len(block.frames)
            # Like FFmpeg: a block's duration (its own, else DefaultDuration
            # per frame) is shared evenly by its laced frames. Without either,
            # the frames share the time up to the next block (FFmpeg leaves
            # them untimed).
            raw_duration = block.raw_duration
            if raw_duration is None and self.default_duration_ns is not None:
                raw_duration = self.default_duration_ns * count // self.timecode_scale_ns
            lace_ticks = None if raw_duration is None else raw_duration // count * self.tick_mult
            spread = lace_ticks
            if spread is None and count > 1 and i + 1 < len(blocks) and starts[i + 1] > pts:
                spread = (starts[i + 1] - pts) // count
            for j, (offset, size) in enumerate(block.frames):
                frames.append((pts + j * (spread or 0), offset, size, block.key, lace_ticks))
        samples: list[Sample] = []
        for i, (pts, offset, size, key, known) in enumerate(frames):
            duration = 0
            if i + 1 < len(frames) and frames[i + 1][0] > pts:
                duration = frames[i + 1][0] - pts
            elif known is not None:
                duration = known
            samples.append(Sample(pts, pts, duration, offset, size, key))
        if self.trim_to_key:
            first_key = next((i for i, s in enumerate(samples) if s.key), len(samples))
            samples = samples[first_key:]
        if self.stop_key_pts is not None:
            stop = next(
                (i for i, s in enumerate(samples) if s.key and s.pts >= self.stop_key_pts),
                len(samples),
            )
            samples = samples[:stop]
        return samples


@dataclass(slots=True)
class _Block:
    raw_time: int
    key: bool
    frames: list[tuple[int, int]]  # absolute (offset, size) of each frame
    raw_duration: int | None
    at: int  # absolute position of the SimpleBlock or BlockGroup element


class _BlockAt(NamedTuple):
    at: int  # absolute position of the SimpleBlock or BlockGroup element
    start: int  # the Block's data in the buffer
    end: int


def _laced_frames(buf: bytes, pos: int, end: int, lacing: int) -> list[tuple[int, int]]:
    """A block's frames as (offset in buf, size): one, or up to 256 when laced
    (1 Xiph, 2 fixed-size, 3 EBML lacing)."""
    if lacing == 0:
        return [(pos, end - pos)]
    if pos >= end:
        raise ContainerError("laced block without a frame count")
    count = buf[pos] + 1
    pos += 1
    sizes: list[int] = []
    if lacing == 1:
        for _ in range(count - 1):
            size = 0
            while True:
                if pos >= end:
                    raise ContainerError("Xiph lace sizes run past the block")
                byte = buf[pos]
                pos += 1
                size += byte
                if byte != 255:
                    break
            sizes.append(size)
    elif lacing == 3:
        first, pos = _lace_vint(buf, pos, end)
        sizes.append(first)
        for _ in range(count - 2):
            raw, after = _lace_vint(buf, pos, end)
            length = after - pos
            sizes.append(sizes[-1] + raw - ((1 << (7 * length - 1)) - 1))
            pos = after
    else:
        total = end - pos
        if total % count:
            raise ContainerError("fixed-size lacing does not divide the block")
        sizes = [total // count] * (count - 1)
    if any(size < 0 for size in sizes) or sum(sizes) > end - pos:
        raise ContainerError("laced frame sizes run past the block")
    sizes.append(end - pos - sum(sizes))
    frames = []
    for size in sizes:
        frames.append((pos, size))
        pos += size
    return frames


def _lace_vint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    try:
        value, after = _read_vint(buf, pos, end)
    except _Truncated as exc:
        raise ContainerError("EBML lace sizes run past the block") from exc
    if value is None:
        raise ContainerError("EBML lace size is 'unknown'")
    return value, after


# --- The index ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cue:
    raw_time: int
    cluster_pos: int  # absolute
    relative_pos: int | None  # of the block, from the Cluster's data start


@dataclass
class _TrackInfo:
    number: int
    kind: Literal["video", "audio"]
    codec_id: str
    config: bytes = b""
    default_duration_ns: int | None = None
    codec_delay_ns: int = 0
    seek_pre_roll_ns: int = 0
    width: int = 0
    height: int = 0
    sample_rate: float = 0.0
    channels: int = 1


@dataclass
class _Probe:
    """What a look at a Cluster's first bytes tells."""

    pos: int
    raw_time: int
    # The track's blocks in the bytes at hand: (raw time, key, element position).
    blocks: list[tuple[int, bool, int]] = field(default_factory=list)


class _Fetcher:
    """``read`` with the first chunk and the last read kept: a range inside
    either costs no read (a bisection steps through the Clusters of its last
    read)."""

    def __init__(self, read: Read, size_bytes: int) -> None:
        self._read = read
        self.size_bytes = size_bytes
        self.head = b""
        self._last: tuple[int, bytes] = (0, b"")

    def get(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.size_bytes - offset))
        if offset < 0 or length == 0:
            return b""
        held = len(self.head)
        if offset + length <= held:
            return self.head[offset : offset + length]
        last_offset, last = self._last
        if last_offset <= offset and offset + length <= last_offset + len(last):
            return last[offset - last_offset : offset + length - last_offset]
        if offset < held:
            data = self.head[offset:] + self._fetch(held, offset + length - held)
            self._last = (offset, data)
            return data
        return self._fetch(offset, length)

    def cached(self, offset: int) -> bytes:
        """The bytes from ``offset`` to the end of the first chunk or of the last
        read, whichever holds it (none: empty)."""
        last_offset, last = self._last
        from_last = last[offset - last_offset :] if last_offset <= offset else b""
        from_head = self.head[offset:] if offset >= 0 else b""
        return max(from_last, from_head, key=len)

    def _fetch(self, offset: int, length: int) -> bytes:
        data = self._read(offset, length)
        if len(data) > length:
            data = data[:length]
        self._last = (offset, data)
        return data


@dataclass
class WebmIndex:
    """An opened WebM/Matroska resource: its tracks, init bytes, and windows.

    ``seek_pre_roll_s`` maps a track to its SeekPreRoll (Opus: 80 ms of audio a
    decoder must see before the first sample it outputs after a seek): an
    audio re-encode asks for a window starting that much earlier.
    """

    tracks: list[Track]
    init: bytes
    size_bytes: int
    seek_pre_roll_s: dict[int, float] = field(default_factory=dict)
    has_cues: bool = False
    _fetcher: _Fetcher | None = field(default=None, repr=False)
    _readers: dict[int, ClusterReader] = field(default_factory=dict, repr=False)
    _cues: dict[int, list[_Cue]] = field(default_factory=dict, repr=False)
    _all_cues: list[_Cue] = field(default_factory=list, repr=False)
    _first_cluster: int = 0
    _clusters_end: int = 0
    _segment_end: int = 0

    def track(self, kind: Literal["video", "audio"]) -> Track | None:
        return next((t for t in self.tracks if t.kind == kind), None)

    def window(self, track_id: int, start_s: float, end_s: float) -> Window:
        """The Clusters holding ``track_id``'s samples from the key frame at or
        before ``start_s`` through the GOP holding ``end_s``."""
        track = next((t for t in self.tracks if t.track_id == track_id), None)
        if track is None:
            raise ContainerError(f"no track {track_id}")
        if not (math.isfinite(start_s) and math.isfinite(end_s)):
            raise ValueError("window times must be finite")
        end_s = max(start_s, end_s)
        start_ticks = math.floor(start_s * track.timescale)
        end_ticks = math.ceil(end_s * track.timescale)
        own = self._cues.get(track_id, [])
        if own:
            return self._window_own_cues(track, own, start_ticks, end_ticks)
        if self._all_cues:
            return self._window_foreign_cues(track, start_ticks, end_ticks)
        return self._window_bisect(track, start_ticks, end_ticks)

    # With Cues ------------------------------------------------------------------------------

    def _pts(self, track: Track, raw_time: int) -> int:
        reader = self._readers[track.track_id]
        return raw_time * reader.tick_mult - reader.delay_ticks

    def _window_own_cues(
        self, track: Track, cues: list[_Cue], start_ticks: int, end_ticks: int
    ) -> Window:
        times = [self._pts(track, c.raw_time) for c in cues]
        at = bisect.bisect_right(times, start_ticks) - 1
        if at >= 0:
            span_start, on_key = cues[at].cluster_pos, True
        else:
            span_start = min(self._first_cluster, cues[0].cluster_pos)
            on_key = span_start == cues[0].cluster_pos
        after = bisect.bisect_right(times, end_ticks)
        reader = replace(self._readers[track.track_id], trim_to_key=on_key)
        if after >= len(cues):
            return self._make_window(
                track, span_start, self._clusters_end, reader, on_key, None, at_end=True
            )
        following = cues[after]
        following_pts = times[after]
        if following.relative_pos is None:
            # Without a relative position the key frame is taken to start its
            # Cluster (WebM DASH and YouTube write Clusters that way).
            span_end, partial = following.cluster_pos, False
        else:
            # Also fetch the following Cluster up to its key frame: frames of
            # the window's last GOP (or of other tracks) may come first.
            span_end = following.cluster_pos + _MAX_CLUSTER_HEADER_BYTES + following.relative_pos
            partial = True
        span_end = min(span_end, self._segment_end)
        reader = replace(reader, stop_key_pts=following_pts, partial_tail=partial)
        return self._make_window(track, span_start, span_end, reader, on_key, following_pts)

    def _window_foreign_cues(self, track: Track, start_ticks: int, end_ticks: int) -> Window:
        cues = self._all_cues
        margin = self._margin_ticks(track)
        times = [self._pts(track, c.raw_time) for c in cues]
        at = bisect.bisect_right(times, start_ticks - margin) - 1
        span_start = cues[at].cluster_pos if at >= 0 else self._first_cluster
        after = bisect.bisect_right(times, end_ticks + margin)
        reader = self._readers[track.track_id]
        if after >= len(cues):
            return self._make_window(
                track, span_start, self._clusters_end, reader, False, None, at_end=True
            )
        return self._make_window(track, span_start, cues[after].cluster_pos, reader, False, None)

    def _margin_ticks(self, track: Track) -> int:
        reader = self._readers[track.track_id]
        margin_ns = max(_FOREIGN_MARGIN_S * _NANOSECONDS, reader.default_duration_ns or 0)
        return math.ceil(margin_ns * track.timescale / _NANOSECONDS)

    def _make_window(
        self,
        track: Track,
        span_start: int,
        span_end: int,
        reader: ClusterReader,
        starts_on_key: bool,
        following_key_pts: int | None,
        *,
        at_end: bool = False,
    ) -> Window:
        span_end = min(span_end, self.size_bytes)
        if span_end <= span_start:
            raise ContainerError("cues out of order: the window's end comes before its start")
        return Window(
            track_id=track.track_id,
            spans=((span_start, span_end - span_start),),
            reader=reader,
            starts_on_key=starts_on_key,
            following_key_pts=following_key_pts,
            at_track_end=at_end,
        )

    # Without Cues ---------------------------------------------------------------------------

    def _window_bisect(self, track: Track, start_ticks: int, end_ticks: int) -> Window:
        margin = 0 if track.kind == "video" else self._margin_ticks(track)
        first = self._probe_cluster(self._first_cluster, track)
        if first is None:
            raise ContainerError("no Cluster found")
        target = start_ticks - margin
        start = self._last_cluster_at_or_before(first, target, track)
        # Clusters may start mid-GOP: the window starts at the Cluster holding
        # the last key frame at or before the start, as far as the bytes read
        # show; a few Clusters back at most.
        on_key = False
        for _ in range(_MAX_STEP_CLUSTERS):
            if any(key and self._pts(track, t) <= target for t, key, _ in start.blocks):
                on_key = True
                break
            if start.pos <= first.pos:
                break
            start = self._previous_cluster(start, first, track)
        reader = replace(self._readers[track.track_id], trim_to_key=on_key)
        # It ends at the first key frame after the end: in the middle of a
        # Cluster, the span stops right before that key frame's block.
        target = end_ticks + margin
        probe: _Probe | None = self._last_cluster_at_or_before(start, target, track, gallop=True)
        for _ in range(_MAX_STEP_CLUSTERS):
            if probe is None:
                return self._make_window(
                    track, start.pos, self._clusters_end, reader, on_key, None, at_end=True
                )
            for raw_time, key, at in probe.blocks:
                pts = self._pts(track, raw_time)
                if key and pts > target:
                    reader = replace(reader, stop_key_pts=pts, partial_tail=True)
                    return self._make_window(track, start.pos, at, reader, on_key, pts)
            probe = self._next_cluster(probe, track)
        end_pos = self._clusters_end if probe is None else probe.pos
        return self._make_window(
            track, start.pos, end_pos, reader, on_key, None, at_end=probe is None
        )

    def _last_cluster_at_or_before(
        self, first: _Probe, ticks: int, track: Track, *, gallop: bool = False
    ) -> _Probe:
        """Bisection over byte offsets: the last Cluster from ``first`` on whose
        Timecode is at or before ``ticks`` (``first`` when none is). ``gallop``:
        the answer is likely near ``first``; probe at doubling distances first."""
        lo, hi = first, self._clusters_end
        step = _PROBE_BYTES
        while gallop and lo.pos + step < hi:
            probe = self._probe_cluster(lo.pos + step, track, limit=hi)
            if probe is None or self._pts(track, probe.raw_time) > ticks:
                hi = lo.pos + step
                break
            lo, step = probe, 2 * step
        while hi - lo.pos > _PROBE_BYTES:
            middle = (lo.pos + hi) // 2
            probe = self._probe_cluster(middle, track, limit=hi)
            if probe is None or self._pts(track, probe.raw_time) > ticks:
                hi = middle
            else:
                lo = probe
        # Few Clusters are left between lo and hi: step through them.
        while True:
            following = self._next_cluster(lo, track)
            if following is None or self._pts(track, following.raw_time) > ticks:
                return lo
            lo = following

    def _previous_cluster(self, probe: _Probe, first: _Probe, track: Track) -> _Probe:
        """The Cluster right before ``probe`` (bisection over byte offsets)."""
        lo, hi = first, probe.pos
        while hi - lo.pos > _PROBE_BYTES:
            middle = (lo.pos + hi) // 2
            found = self._probe_cluster(middle, track, limit=hi)
            if found is None:
                hi = middle
            else:
                lo = found
        while True:
            following = self._probe_cluster(lo.pos + 1, track, limit=probe.pos)
            if following is None:
                return lo
            lo = following

    def _next_cluster(self, probe: _Probe, track: Track) -> _Probe | None:
        return self._probe_cluster(probe.pos + 1, track, limit=self._clusters_end)

    def _probe_cluster(self, pos: int, track: Track, limit: int | None = None) -> _Probe | None:
        """The first plausible Cluster starting at or after ``pos`` (before
        ``limit``): its Timecode and the track's first block in its first bytes.
        Bytes already read are looked at first."""
        assert self._fetcher is not None
        fetcher = self._fetcher
        limit = self._clusters_end if limit is None else limit
        length = _PROBE_BYTES
        overlap = _MAX_CLUSTER_HEADER_BYTES + 32
        scan_end = min(limit, pos + _MAX_PROBE_BYTES)  # no Cluster that far: damage
        while pos < scan_end:
            buf = fetcher.cached(pos)
            if len(buf) < _MIN_PROBE_BYTES:
                buf = fetcher.get(pos, length + overlap)
                length = min(2 * length, _MAX_PROBE_BYTES)
            if not buf:
                return None
            at = buf.find(_CLUSTER_ID)
            while at >= 0 and pos + at < limit:
                view, view_at = buf, at
                if len(buf) - at < _MIN_PROBE_BYTES and pos + len(buf) < self.size_bytes:
                    # Too little of this Cluster at hand to see its first blocks.
                    view, view_at = fetcher.get(pos + at, _PROBE_BYTES), 0
                probe = self._plausible_cluster(view, view_at, pos + at - view_at, track)
                if probe is not None:
                    return probe
                at = buf.find(_CLUSTER_ID, at + 1)
            if pos + len(buf) >= self.size_bytes:
                return None
            pos += max(1, len(buf) - overlap)
        return None

    def _plausible_cluster(self, buf: bytes, at: int, base: int, track: Track) -> _Probe | None:
        """A Cluster at ``buf[at]`` if its size fits the segment and a Timecode
        comes first (after an optional CRC-32)."""
        try:
            _, size, data = _header(buf, at, len(buf))
            if size is not None and base + data + size > self._segment_end:
                return None
            pos = data
            eid, child_size, child = _header(buf, pos, len(buf))
            if eid == _CRC32 and child_size == 4:
                pos = child + 4
                eid, child_size, child = _header(buf, pos, len(buf))
            if eid != _TIMECODE or child_size is None or not 1 <= child_size <= 8:
                return None
            if child + child_size > len(buf):
                return None
            raw_time = _uint(buf, child, child + child_size)
        except ContainerError:
            return None
        probe = _Probe(pos=base + at, raw_time=raw_time)
        # The track's first block, from what this read brought.
        reader = replace(self._readers[track.track_id], partial_tail=True)
        blocks: list[_Block] = []
        try:
            with _damaged("cluster"):
                reader._parse_cluster(buf[at:], base + at, data - at, size, blocks)
        except ContainerError:
            pass
        probe.blocks = [(b.raw_time, b.key, b.at) for b in blocks]
        return probe


# --- Opening -----------------------------------------------------------------------------------


def open_webm(read: Read, size_bytes: int) -> WebmIndex:
    """Reads a WebM/Matroska resource's header and Cues through ``read``."""
    if size_bytes < 16:
        raise ContainerError("too small to be WebM")
    fetcher = _Fetcher(read, size_bytes)
    fetcher.head = fetcher.get(0, _CHUNK_BYTES)
    head = fetcher.head
    with _damaged("header"):
        segment_data, segment_end = _segment(head, size_bytes)
        layout = _walk_level1(fetcher, segment_data, segment_end)
        info = _element(fetcher, layout, _INFO, segment_end, required=True)
        tracks_element = _element(fetcher, layout, _TRACKS, segment_end, required=True)
        assert info is not None and tracks_element is not None
        timecode_scale, duration = _parse_info(info)
        entries = _parse_tracks(tracks_element)
        cues_element = _element(fetcher, layout, _CUES, segment_end, required=False)
        cues = [] if cues_element is None else _parse_cues(cues_element, segment_data, segment_end)
    if not entries:
        raise ContainerError("no audio or video track")

    divisor = math.gcd(_NANOSECONDS, timecode_scale)
    timescale = _NANOSECONDS // divisor
    tick_mult = timecode_scale // divisor
    duration_s = None if duration is None else duration * timecode_scale / _NANOSECONDS

    first_cluster = layout.first_cluster
    if not layout.saw_cluster and cues:
        first_cluster = min(c.cluster_pos for _, c in cues)
    # The Clusters run from the first to the next other top-level element
    # after the last one known (the Cues or Tags at the end), or the Segment's end.
    last_known = max([first_cluster] + [c.cluster_pos for _, c in cues])
    clusters_end = min(
        [p for i, p in layout.positions.items() if p > last_known and i != _CLUSTER] + [segment_end]
    )
    readers: dict[int, ClusterReader] = {}
    by_track: dict[int, list[_Cue]] = {}
    for entry in entries:
        readers[entry.number] = ClusterReader(
            track_number=entry.number,
            tick_mult=tick_mult,
            delay_ticks=_round_half_up(entry.codec_delay_ns, timecode_scale) * tick_mult,
            timecode_scale_ns=timecode_scale,
            default_duration_ns=entry.default_duration_ns,
        )
        by_track[entry.number] = sorted(
            {c for track, c in cues if track == entry.number}, key=lambda c: c.raw_time
        )
    all_cues = sorted({c for _, c in cues}, key=lambda c: (c.raw_time, c.cluster_pos))

    first_blocks = _first_blocks(head, first_cluster, readers)
    tracks: list[Track] = []
    pre_roll: dict[int, float] = {}
    for entry in entries:
        reader = readers[entry.number]
        first_pts = first_blocks.get(entry.number)
        if first_pts is None and by_track[entry.number]:
            first_pts = by_track[entry.number][0].raw_time * tick_mult - reader.delay_ticks
        tracks.append(
            Track(
                track_id=entry.number,
                kind=entry.kind,
                codec=_codec_name(entry.codec_id),
                timescale=timescale,
                duration_s=duration_s,
                config=entry.config,
                width=entry.width,
                height=entry.height,
                sample_rate=round(entry.sample_rate) if entry.kind == "audio" else 0,
                channels=entry.channels if entry.kind == "audio" else 0,
                codec_delay=reader.delay_ticks,
                first_pts=first_pts,
            )
        )
        if entry.seek_pre_roll_ns:
            pre_roll[entry.number] = entry.seek_pre_roll_ns / _NANOSECONDS

    return WebmIndex(
        tracks=tracks,
        init=_init_bytes(head, info, tracks_element),
        size_bytes=size_bytes,
        seek_pre_roll_s=pre_roll,
        has_cues=bool(all_cues),
        _fetcher=fetcher,
        _readers=readers,
        _cues=by_track,
        _all_cues=all_cues,
        _first_cluster=first_cluster,
        _clusters_end=clusters_end,
        _segment_end=segment_end,
    )


def _segment(head: bytes, size_bytes: int) -> tuple[int, int]:
    """The EBML header's DocType checked -> (Segment data start, Segment end)."""
    eid, size, data = _header(head, 0, len(head))
    if eid != _EBML:
        raise ContainerError("not EBML (no EBML header)")
    if size is None or data + size > len(head):
        raise ContainerError("EBML header size is absurd")
    doctype = "matroska"  # the spec's default
    for child, start, end in _children(head, data, data + size):
        if child == _DOCTYPE:
            doctype = _string(head, start, end)
    if doctype not in ("webm", "matroska"):
        raise ContainerError(f"DocType {doctype!r} is neither webm nor matroska")
    pos = data + size
    for _ in range(_MAX_LEVEL1_STEPS):
        eid, size, data = _header(head, pos, len(head))
        if eid == _SEGMENT:
            if size is None:
                return data, size_bytes
            if data + size > size_bytes:
                raise ContainerError("the Segment runs past the end of the resource")
            return data, data + size
        if eid not in (_VOID, _CRC32) or size is None:
            raise ContainerError(f"element {eid:X} where the Segment was expected")
        pos = data + size
    raise ContainerError("no Segment")


@dataclass
class _Layout:
    """Where the Segment's top-level elements are, and those held whole."""

    positions: dict[int, int] = field(default_factory=dict)  # id -> absolute position
    held: dict[int, bytes] = field(default_factory=dict)  # id -> the whole element
    first_cluster: int = 0
    saw_cluster: bool = False


def _walk_level1(fetcher: _Fetcher, segment_data: int, segment_end: int) -> _Layout:
    """Top-level elements from the Segment's start up to the first Cluster,
    reading on past the first chunk only when Info or Tracks are not found
    there or through a SeekHead."""
    layout = _Layout()
    pos = segment_data
    buf, base = fetcher.head, 0
    for _ in range(_MAX_LEVEL1_STEPS):
        if pos >= segment_end:
            break
        try:
            eid, size, data = _header(buf, pos - base, len(buf))
        except _Truncated:
            if _INFO in layout.positions and _TRACKS in layout.positions:
                break
            buf, base = fetcher.get(pos, _CHUNK_BYTES), pos
            eid, size, data = _header(buf, 0, len(buf))
        if eid == _CLUSTER:
            layout.first_cluster, layout.saw_cluster = pos, True
            break
        if size is None:
            raise ContainerError(f"unknown-size element {eid:X} in the Segment")
        end = base + data + size
        if end > segment_end:
            raise ContainerError(f"element {eid:X} at {pos} runs past the Segment")
        layout.positions.setdefault(eid, pos)
        wanted = eid in (_SEEKHEAD, _INFO, _TRACKS, _CUES) and eid not in layout.held
        if wanted and end - base <= len(buf):
            layout.held[eid] = buf[pos - base : end - base]
        if eid == _SEEKHEAD and layout.positions[_SEEKHEAD] == pos and eid in layout.held:
            _read_seekhead(fetcher, layout, segment_data, segment_end)
        pos = end
        if pos - base >= len(buf) and _INFO in layout.positions and _TRACKS in layout.positions:
            break
    if not layout.saw_cluster:
        # Not seen: the Clusters start after the last element walked (or, with
        # Cues, at the first Cue's Cluster).
        layout.first_cluster = pos
    return layout


def _read_seekhead(fetcher: _Fetcher, layout: _Layout, segment_data: int, segment_end: int) -> None:
    """Records the SeekHead's entries; follows one further SeekHead it points
    to (mkvmerge may put a second one at the end)."""
    seekhead = layout.held[_SEEKHEAD]
    entries = _seek_entries(seekhead, segment_data, segment_end)
    for eid, position in entries:
        if eid == _SEEKHEAD and position != layout.positions.get(_SEEKHEAD):
            more = _fetch_element(fetcher, position, _SEEKHEAD, segment_end)
            entries.extend(
                e for e in _seek_entries(more, segment_data, segment_end) if e[0] != _SEEKHEAD
            )
            break
    for eid, position in entries:
        if eid != _SEEKHEAD:
            layout.positions.setdefault(eid, position)


def _seek_entries(seekhead: bytes, segment_data: int, segment_end: int) -> list[tuple[int, int]]:
    _, _, data = _header(seekhead, 0, len(seekhead))
    entries = []
    for eid, start, end in _children(seekhead, data, len(seekhead)):
        if eid != _SEEK:
            continue
        target, position = None, None
        for child, cstart, cend in _children(seekhead, start, end):
            if child == _SEEK_ID:
                target = _uint(seekhead, cstart, cend)
            elif child == _SEEK_POSITION:
                position = _uint(seekhead, cstart, cend)
        if target is None or position is None:
            continue
        if segment_data + position >= segment_end:
            raise ContainerError(f"SeekHead points past the Segment ({target:X})")
        entries.append((target, segment_data + position))
    return entries


def _element(
    fetcher: _Fetcher, layout: _Layout, eid: int, segment_end: int, *, required: bool
) -> bytes | None:
    if eid in layout.held:
        return layout.held[eid]
    position = layout.positions.get(eid)
    if position is None:
        if required:
            raise ContainerError(f"no {_NAMES[eid]} element")
        return None
    element = _fetch_element(fetcher, position, eid, segment_end)
    layout.held[eid] = element
    return element


_NAMES = {_INFO: "Info", _TRACKS: "Tracks", _CUES: "Cues", _SEEKHEAD: "SeekHead"}


def _fetch_element(fetcher: _Fetcher, position: int, eid: int, segment_end: int) -> bytes:
    """The whole element of ID ``eid`` at ``position``: one read, two if it is
    larger than a chunk."""
    limit = _MAX_CUES_BYTES if eid == _CUES else _MAX_HEADER_ELEMENT_BYTES
    buf = fetcher.get(position, min(_CHUNK_BYTES, segment_end - position))
    try:
        found, size, data = _header(buf, 0, len(buf))
    except _Truncated as exc:
        raise ContainerError(f"{_NAMES.get(eid, hex(eid))} at {position} is cut off") from exc
    if found != eid:
        raise ContainerError(f"expected {_NAMES.get(eid, hex(eid))} at {position}, found {found:X}")
    if size is None:
        raise ContainerError(f"{_NAMES.get(eid, hex(eid))} has an unknown size")
    total = data + size
    if size > limit or position + total > segment_end:
        raise ContainerError(f"{_NAMES.get(eid, hex(eid))} at {position} has an absurd size")
    if total > len(buf):
        rest = fetcher.get(position + len(buf), total - len(buf))
        buf += rest
        if len(buf) < total:
            raise ContainerError(f"{_NAMES.get(eid, hex(eid))} at {position} is cut off")
    return buf[:total]


def _parse_info(info: bytes) -> tuple[int, float | None]:
    _, _, data = _header(info, 0, len(info))
    timecode_scale, duration = 1_000_000, None
    for eid, start, end in _children(info, data, len(info)):
        if eid == _TIMECODE_SCALE:
            timecode_scale = _uint(info, start, end)
        elif eid == _DURATION:
            duration = _float(info, start, end)
    if not 0 < timecode_scale <= 10 * _NANOSECONDS:
        raise ContainerError(f"TimecodeScale {timecode_scale} is absurd")
    if duration is not None and duration < 0:
        duration = None
    return timecode_scale, duration


def _parse_tracks(tracks: bytes) -> list[_TrackInfo]:
    _, _, data = _header(tracks, 0, len(tracks))
    entries: list[_TrackInfo] = []
    for eid, start, end in _children(tracks, data, len(tracks)):
        if eid != _TRACK_ENTRY:
            continue
        values: dict[int, tuple[int, int]] = {}
        for child, cstart, cend in _children(tracks, start, end):
            values.setdefault(child, (cstart, cend))
        kind_code = _uint(tracks, *values[_TRACK_TYPE]) if _TRACK_TYPE in values else 0
        if kind_code not in (1, 2) or _TRACK_NUMBER not in values:
            continue
        kind: Literal["video", "audio"] = "video" if kind_code == 1 else "audio"
        entry = _TrackInfo(
            number=_uint(tracks, *values[_TRACK_NUMBER]),
            kind=kind,
            codec_id=_string(tracks, *values[_CODEC_ID]) if _CODEC_ID in values else "",
        )
        if entry.number == 0:
            raise ContainerError("TrackNumber 0")
        if _CONTENT_ENCODINGS in values:
            # Header stripping or encryption: the bytes at a block's offset are
            # not the frame, so they cannot be copied or decoded as they are.
            raise ContainerError(f"track {entry.number} uses content encoding")
        scale = values.get(_TRACK_TIMECODE_SCALE)
        if scale is not None and _float(tracks, *scale) != 1.0:
            raise ContainerError("a TrackTimecodeScale other than 1 is not supported")
        if _CODEC_PRIVATE in values:
            entry.config = tracks[slice(*values[_CODEC_PRIVATE])]
        if _DEFAULT_DURATION in values:
            entry.default_duration_ns = _uint(tracks, *values[_DEFAULT_DURATION]) or None
        if _CODEC_DELAY in values:
            entry.codec_delay_ns = _uint(tracks, *values[_CODEC_DELAY])
        if _SEEK_PRE_ROLL in values:
            entry.seek_pre_roll_ns = _uint(tracks, *values[_SEEK_PRE_ROLL])
        if _VIDEO in values and kind == "video":
            for child, cstart, cend in _children(tracks, *values[_VIDEO]):
                if child == _PIXEL_WIDTH:
                    entry.width = _uint(tracks, cstart, cend)
                elif child == _PIXEL_HEIGHT:
                    entry.height = _uint(tracks, cstart, cend)
        if _AUDIO in values and kind == "audio":
            entry.sample_rate = 8000.0
            for child, cstart, cend in _children(tracks, *values[_AUDIO]):
                if child == _SAMPLING_FREQUENCY:
                    entry.sample_rate = _float(tracks, cstart, cend)
                elif child == _CHANNELS:
                    entry.channels = _uint(tracks, cstart, cend)
            if not 0 < entry.sample_rate < 10_000_000:
                raise ContainerError(f"SamplingFrequency {entry.sample_rate} is absurd")
        if any(e.number == entry.number for e in entries):
            raise ContainerError(f"two tracks numbered {entry.number}")
        entries.append(entry)
    return entries


def _parse_cues(cues: bytes, segment_data: int, segment_end: int) -> list[tuple[int, _Cue]]:
    _, _, data = _header(cues, 0, len(cues))
    found: list[tuple[int, _Cue]] = []
    for eid, start, end in _children(cues, data, len(cues)):
        if eid != _CUE_POINT:
            continue
        time = None
        positions: list[tuple[int, int, int | None]] = []
        for child, cstart, cend in _children(cues, start, end):
            if child == _CUE_TIME:
                time = _uint(cues, cstart, cend)
            elif child == _CUE_TRACK_POSITIONS:
                track, cluster, relative = None, None, None
                for grandchild, gstart, gend in _children(cues, cstart, cend):
                    if grandchild == _CUE_TRACK:
                        track = _uint(cues, gstart, gend)
                    elif grandchild == _CUE_CLUSTER_POSITION:
                        cluster = _uint(cues, gstart, gend)
                    elif grandchild == _CUE_RELATIVE_POSITION:
                        relative = _uint(cues, gstart, gend)
                if track is not None and cluster is not None:
                    positions.append((track, cluster, relative))
        if time is None:
            continue
        for track, cluster, relative in positions:
            if segment_data + cluster >= segment_end:
                raise ContainerError("a cue points past the Segment")
            found.append((track, _Cue(time, segment_data + cluster, relative)))
    return found


def _first_blocks(
    head: bytes, first_cluster: int, readers: dict[int, ClusterReader]
) -> dict[int, int]:
    """Each track's first pts, from the part of the first Cluster the first
    chunk holds (no read)."""
    found: dict[int, int] = {}
    if not first_cluster or first_cluster >= len(head):
        return found
    for number, reader in readers.items():
        partial = replace(reader, partial_tail=True)
        blocks: list[_Block] = []
        try:
            with _damaged("cluster"):
                _, size, data = _header(head, first_cluster, len(head))
                partial._parse_cluster(head, 0, data, size, blocks)
        except ContainerError:
            pass
        if blocks:
            found[number] = blocks[0].raw_time * reader.tick_mult - reader.delay_ticks
    return found


def _init_bytes(head: bytes, info: bytes, tracks: bytes) -> bytes:
    """EBML header, a Segment header of unknown size, Info, Tracks, and an empty
    Cluster.

    Nothing else: a SeekHead or Cues copied here would point at positions the
    copy does not have. FFmpeg's demuxer reads the header up to the first
    Cluster and fails at an end of file before one, hence the empty Cluster."""
    _, ebml_size, ebml_data = _header(head, 0, len(head))
    assert ebml_size is not None
    return head[: ebml_data + ebml_size] + _UNKNOWN_SIZE_SEGMENT + info + tracks + _EMPTY_CLUSTER


_UNKNOWN_SIZE_SEGMENT = bytes.fromhex("18538067 01ffffffffffffff")
_EMPTY_CLUSTER = bytes.fromhex("1f43b675 83 e78100")  # Timecode 0, no blocks


def _codec_name(codec_id: str) -> str:
    if codec_id.startswith("A_AAC"):
        return "aac"
    return _CODECS.get(codec_id, codec_id.lower() or "unknown")
