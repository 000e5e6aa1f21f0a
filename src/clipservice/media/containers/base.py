"""The shapes every container index speaks: tracks, samples, and windows.

A *sample* is one coded frame (video) or one coded audio frame, with its
times in the track's ticks and its bytes' place in the resource. A *window*
is what the cut engine asks an index for: the byte spans that hold every
sample needed for a clip, and how to read the samples out of those bytes
once fetched (in another process, possibly: windows pickle).

Times: every ``pts``/``dts`` is in ticks of the track's ``timescale`` on the
container's presentation timeline (an MP4 edit list's shift already
applied), so two tracks of one resource share an origin and a frame shown
at pts ``p`` shows at ``p / timescale`` seconds into the resource.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

# read(offset, length) -> up to ``length`` bytes from ``offset`` (fewer only at
# the end of the resource). Raises what the fetcher raises (HTTP errors...).
Read = Callable[[int, int], bytes]


class ContainerError(Exception):
    """The bytes are not a container this index can read (or are damaged)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One coded frame: times in track ticks, bytes at ``offset`` in the resource."""

    pts: int
    dts: int
    duration: int
    offset: int
    size: int
    key: bool  # a sync sample: decoding can start here


@dataclass(frozen=True)
class Track:
    """One track of a container, as the cut engine needs to know it."""

    track_id: int  # MP4 track_ID, Matroska TrackNumber
    kind: Literal["video", "audio"]
    codec: str  # FFmpeg's codec name: h264, hevc, vp9, av1, aac, opus, mp3, vorbis...
    timescale: int  # ticks per second of every time of this track
    duration_s: float | None  # from the container's own header, if it says
    # Codec configuration as the container stores it: the avcC / hvcC / av1C /
    # vpcC record body, an AAC AudioSpecificConfig, Matroska's CodecPrivate...
    config: bytes = b""
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0
    # Ticks the decoder discards at the start (Opus pre-skip, Matroska
    # CodecDelay), already part of the timeline: informational.
    codec_delay: int = 0
    first_pts: int | None = None  # pts of the first sample in presentation order, if known
    fps: float | None = None  # nominal frame rate, if the container says or shows it


@dataclass(frozen=True)
class Window:
    """Byte spans of a resource holding every sample of one track over a time range.

    ``spans`` are (offset, size), sorted and disjoint. A window is made by an
    index (in the service) and read (in a join process): :meth:`samples`
    turns the fetched bytes of its spans into the track's samples. The
    window starts at a sync sample at or before the range's start when the
    index knows where one is (``starts_on_key``), and runs through the whole
    GOP holding the range's end: up to the next sync sample after it (not
    included), or to the end of the track.
    """

    track_id: int
    spans: tuple[tuple[int, int], ...]
    reader: WindowReader
    # The first sample of the window is a sync sample at or before the start
    # (False: the index could not tell; the reader of the samples checks).
    starts_on_key: bool = True
    # The pts of the sync sample that comes right after the window's last
    # sample, when the index knows it without fetching it (a fragment or
    # cluster boundary, a sync sample table): the last GOP in the window is
    # then complete. None: unknown, or the window runs to the track's end.
    following_key_pts: int | None = None
    at_track_end: bool = False
    # The pts of the window's first sample (its keyframe), when the index knows
    # it without fetching (a sample table, a sidx or cue time).
    start_pts: int | None = None

    def samples(self, data: dict[int, bytes]) -> list[Sample]:
        """The track's samples in decode order; ``data`` maps each span's offset
        to its bytes."""
        return self.reader.samples(self, data)

    @property
    def size_bytes(self) -> int:
        return sum(size for _, size in self.spans)


class WindowReader(Protocol):
    """How a container's samples are read out of a window's fetched bytes
    (picklable: a window travels to the join process)."""

    def samples(self, window: Window, data: dict[int, bytes]) -> list[Sample]: ...


@dataclass(frozen=True)
class KnownSamples:
    """A window whose samples were known from the index itself (progressive MP4's
    sample tables): the bytes are only the samples' payloads."""

    listed: tuple[Sample, ...]

    def samples(self, window: Window, data: dict[int, bytes]) -> list[Sample]:
        return list(self.listed)


class ContainerIndex(Protocol):
    """What every container index offers once opened."""

    tracks: list[Track]
    # Bytes PyAV can open on their own (ftyp+moov, EBML header to Tracks): the
    # output streams are made from these streams' parameters.
    init: bytes
    size_bytes: int

    def track(self, kind: Literal["video", "audio"]) -> Track | None: ...

    def window(self, track_id: int, start_s: float, end_s: float) -> Window: ...
