"""Storyboards: a source's thumbnails at regular intervals, from keyframes only.

A storyboard (the strip a player shows over its timeline) is made without
downloading the source. For each target time the source's container index
(:mod:`.containers`, opened with a few Range reads) says where the nearest
keyframe is; only that sample's bytes are fetched, on parallel connections;
each keyframe is decoded alone (it needs no other frame), scaled, and the
thumbnails are tiled into one JPEG sprite (FFmpeg's ``tile`` filter, the
``mjpeg`` encoder) with a WebVTT index of ``sprite.jpg#xywh=…`` cues.

Where a keyframe's bytes are, per container:

- progressive MP4: the sample table lists every sample with its sync flag,
  offset and size: nothing to read to find it, one read of exactly the
  sample;
- fragmented MP4 (fragments from a ``sidx``, an ``mfra``, or the index's
  search): the window's first fragment starts at (or, found by the search,
  holds) the sync sample; its ``moof``, read with a small Range read at the
  fragment's start, gives the sample's offset and size. The same read
  usually holds the keyframe too (a low-resolution keyframe is a few KiB);
- WebM/Matroska (Cues, or the index's bisection): the window's first
  Cluster; its first key block is read out of the Cluster's head, read
  further (doubling) when the keyframe is larger than the head.

Sources in containers the service cannot index (MPEG-TS, FLV…) have no
keyframe index: :class:`StoryboardUnsupported`.

The blocking work (reads, decoding, tiling, encoding) runs on a thread, the
reads on a pool of ``connections`` threads sharing kept-alive connections;
the whole build has a time budget. Decoding a low-resolution keyframe costs
about a millisecond and the sprite's encode a few: not worth a process.
"""

from __future__ import annotations

import asyncio
import collections
import math
import struct
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import av
from av.video.reformatter import VideoReformatter

from clipservice.errors import SourceError
from clipservice.media.containers.base import (
    ContainerError,
    ContainerIndex,
    KnownSamples,
    Sample,
    Track,
    Window,
)

# The MP4 index's moof parser, on the one moof read at a fragment's start
# (the index's public API parses whole fragments only).
from clipservice.media.containers.mp4 import FragmentReader, _box_at, _traf_samples
from clipservice.media.containers.webm import ClusterReader, WebmIndex
from clipservice.media.fetch import Cancelled, FetchError, RangeFetcher, RangeUnsupported
from clipservice.media.source import SourceIndex, SourceUnsupported, open_index

DEFAULT_COUNT = 100
MAX_THUMBS = 1000
MIN_THUMB_WIDTH = 16
MAX_THUMB_WIDTH = 1280
# Browsers and JPEG decoders cope with far larger images; a sprite this large
# is a request for trouble (and memory) rather than a storyboard.
MAX_SPRITE_SIDE = 16384
DEFAULT_CONNECTIONS = 8
DEFAULT_TIMEOUT_S = 20.0
# The first reads at a fragment or Cluster: a moof of a few seconds of video
# and, most of the time, the whole low-resolution keyframe after it. Later
# reads are sized after the keyframes found so far (HEAD_MARGIN over the
# largest of the last HEAD_HISTORY), between MIN_ and MAX_HEAD_BYTES.
HEAD_BYTES = 16 * 1024
MIN_HEAD_BYTES = 4 * 1024
MAX_HEAD_BYTES = 1024 * 1024
HEAD_MARGIN = 1.15
HEAD_HISTORY = 16
# A WebM keyframe not found within this much of its Cluster: damage.
MAX_KEY_SEARCH_BYTES = 16 * 1024 * 1024
MAX_BOXES_TO_MOOF = 64
# FFmpeg decoders where the codec's name is not one (FFmpeg's native AV1
# decoder needs a hardware accelerator).
_DECODERS = {"av1": "libdav1d"}
_MP4_HEADER = struct.Struct(">I4s")


class StoryboardUnsupported(SourceError):
    """The source has no keyframe index the service can read (its container or codec)."""

    def __init__(self, message: str) -> None:
        super().__init__("source_unavailable", message)


class StoryboardTimeout(SourceError):
    """The storyboard was not made within its time budget."""

    def __init__(self, message: str) -> None:
        super().__init__("source_unavailable", message)


@dataclass(frozen=True)
class Thumb:
    """One tile of the sprite: the time span its cue covers, and where it is."""

    start_s: float  # the cue's span (user time: 0 is the video's first frame)
    end_s: float
    frame_s: float | None  # the keyframe shown (None: left blank, it did not decode)
    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True)
class Storyboard:
    """A sprite of thumbnails (JPEG), its WebVTT index, and what making it cost."""

    sprite: bytes
    vtt: str
    thumbs: tuple[Thumb, ...]
    width: int  # of the sprite
    height: int
    columns: int
    rows: int
    duration_s: float
    keyframes: int  # distinct keyframes fetched and decoded
    keyframe_bytes: int  # their sizes: what bytes_fetched would be with a free index and no headers
    bytes_fetched: int  # every byte read for it, opening the index included
    # Range requests on its own connections: opening the index included when it
    # was given a URL; a given SourceIndex's own reads (its searches) not.
    requests: int
    elapsed_s: float

    @property
    def missing(self) -> tuple[int, ...]:
        """Tiles left blank (their keyframe did not decode)."""
        return tuple(i for i, t in enumerate(self.thumbs) if t.frame_s is None)


@dataclass(frozen=True)
class _Video:
    """The video track a storyboard is made of, and its user-time origin."""

    index: ContainerIndex
    track: Track
    origin_ticks: int

    def ticks(self, user_s: float) -> float:
        return user_s * self.track.timescale + self.origin_ticks

    def user_s(self, pts: int) -> float:
        return (pts - self.origin_ticks) / self.track.timescale


@dataclass(frozen=True)
class _Key:
    """A located keyframe, and as many of its first bytes as the read that found
    it held (all of them, often)."""

    sample: Sample
    head: bytes = b""


async def build_storyboard(
    source: SourceIndex | str,
    *,
    count: int | None = None,
    interval_s: float | None = None,
    thumb_width: int = 160,
    columns: int = 10,
    duration_s: float | None = None,
    sprite_url: str = "sprite.jpg",
    connections: int = DEFAULT_CONNECTIONS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    jpeg_quality: int = 8,
) -> Storyboard:
    """The storyboard of ``source``'s video: ``count`` thumbnails (or one every
    ``interval_s``; neither: ``DEFAULT_COUNT``), ``thumb_width`` pixels wide,
    ``columns`` to a row.

    ``source`` is an opened or unopened :class:`SourceIndex` (its video
    stream is used), or a stream URL (prefer the low-resolution preview
    stream: the same keyframes for fewer bytes). Either must have passed
    the URL guard. ``duration_s`` is used when the container does not say
    its duration. ``sprite_url`` is what the VTT cues point at.
    ``jpeg_quality`` is the mjpeg quantiser (2 best … 31 worst).

    Raises :class:`StoryboardUnsupported` for a source without a keyframe
    index (or a codec without a decoder), :class:`StoryboardTimeout` past
    ``timeout_s``, ``SourceError("source_unavailable")`` when the source
    cannot be read, and ValueError for impossible parameters.
    """
    if count is not None and interval_s is not None:
        raise ValueError("give count or interval_s, not both")
    if count is not None and not 1 <= count <= MAX_THUMBS:
        raise ValueError(f"count must be between 1 and {MAX_THUMBS}")
    if interval_s is not None and not (math.isfinite(interval_s) and interval_s > 0):
        raise ValueError("interval_s must be a positive number")
    if not MIN_THUMB_WIDTH <= thumb_width <= MAX_THUMB_WIDTH:
        raise ValueError(f"thumb_width must be between {MIN_THUMB_WIDTH} and {MAX_THUMB_WIDTH}")
    if columns < 1 or columns * thumb_width > MAX_SPRITE_SIDE:
        raise ValueError(
            f"columns must be at least 1 and the sprite at most {MAX_SPRITE_SIDE} wide"
        )
    if not 2 <= jpeg_quality <= 31:
        raise ValueError("jpeg_quality must be between 2 and 31")
    started = time.monotonic()
    deadline = started + timeout_s
    stop = threading.Event()
    try:
        async with asyncio.timeout(timeout_s):
            if isinstance(source, SourceIndex):
                video, fetcher, index_reads = await _from_source_index(source, timeout_s)
            else:
                video, fetcher, index_reads = await _from_url(source, timeout_s)
    except TimeoutError:
        raise StoryboardTimeout(f"the source's index was not read within {timeout_s:g} s") from None
    total_s = video.track.duration_s or duration_s
    if total_s is None or not math.isfinite(total_s) or total_s <= 0:
        fetcher.close()
        raise StoryboardUnsupported("the source's duration is not known (give duration_s)")
    cues = cue_spans(total_s, count, interval_s)
    rows = math.ceil(len(cues) / columns)
    builder = _Builder(
        video, fetcher, index_reads, deadline=deadline, stop=stop, connections=connections
    )
    try:
        made = await asyncio.to_thread(
            builder.run, cues, thumb_width, columns, rows, jpeg_quality, timeout_s
        )
    finally:
        stop.set()  # (a cancelled caller: the thread stops at its next check)
    sprite, thumbs, size, keyframes = made
    return Storyboard(
        sprite=sprite,
        vtt=storyboard_vtt(thumbs, sprite_url),
        thumbs=thumbs,
        width=size[0],
        height=size[1],
        columns=min(columns, len(cues)),
        rows=rows,
        duration_s=total_s,
        keyframes=keyframes,
        keyframe_bytes=builder.keyframe_bytes,
        bytes_fetched=builder.bytes_fetched,
        requests=builder.requests,
        elapsed_s=time.monotonic() - started,
    )


def cue_spans(
    duration_s: float, count: int | None = None, interval_s: float | None = None
) -> list[tuple[float, float]]:
    """The (start, end) of each thumbnail's cue: ``count`` equal spans over the
    duration, or spans of ``interval_s`` (the last one shorter)."""
    if interval_s is not None:
        n = max(1, math.ceil(duration_s / interval_s - 1e-9))
        if n > MAX_THUMBS:
            raise ValueError(f"one thumbnail every {interval_s:g} s is more than {MAX_THUMBS}")
        return [(i * interval_s, min(duration_s, (i + 1) * interval_s)) for i in range(n)]
    n = count or DEFAULT_COUNT
    return [(duration_s * i / n, duration_s * (i + 1) / n) for i in range(n)]


def storyboard_vtt(thumbs: Iterable[Thumb], sprite_url: str = "sprite.jpg") -> str:
    """The WebVTT index: one cue per thumbnail, ``<sprite_url>#xywh=x,y,w,h``."""
    lines = ["WEBVTT", ""]
    for t in thumbs:
        lines.append(f"{_vtt_time(t.start_s)} --> {_vtt_time(t.end_s)}")
        lines.append(f"{sprite_url}#xywh={t.x},{t.y},{t.width},{t.height}")
        lines.append("")
    return "\n".join(lines)


def _vtt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}.{ms:03d}"


# -- opening ----------------------------------------------------------------------


async def _from_source_index(
    source: SourceIndex, timeout_s: float
) -> tuple[_Video, RangeFetcher, Callable[[], int]]:
    try:
        await source.open()
    except FetchError as exc:
        raise _fetch_failure(exc) from exc
    if source.video is None:
        raise StoryboardUnsupported(
            f"no keyframe index for this source: {source.reason or 'not indexed'}"
        )
    stream = source.video
    video = _Video(stream.index, stream.track, source.video_origin_ticks)
    before = source.bytes_read
    # Searches of an index without sidx/Cues read through the index's own
    # fetcher: counted as the difference.
    # The keyframes are read from the address the index approved (pinned: the
    # name is not resolved again, so it cannot be rebound to a private one).
    fetcher = RangeFetcher(
        stream.url, timeout_s=timeout_s, connect_to=source.addresses.get(stream.url)
    )
    return video, fetcher, lambda: source.bytes_read - before


async def _from_url(url: str, timeout_s: float) -> tuple[_Video, RangeFetcher, Callable[[], int]]:
    try:
        fetcher = RangeFetcher(url, timeout_s=timeout_s)
    except FetchError as exc:
        raise SourceError("source_forbidden", f"not an http(s) stream URL: {exc}") from exc
    try:
        index = await asyncio.to_thread(open_index, fetcher)
    except (SourceUnsupported, ContainerError) as exc:
        fetcher.close()
        raise StoryboardUnsupported(f"no keyframe index for this source: {exc}") from exc
    except FetchError as exc:
        fetcher.close()
        raise _fetch_failure(exc) from exc
    track = index.track("video")
    if track is None:
        fetcher.close()
        raise StoryboardUnsupported("the stream holds no video")
    # One fetcher for the index and the keyframes: its counts are everything.
    return _Video(index, track, track.first_pts or 0), fetcher, lambda: 0


def _fetch_failure(exc: FetchError) -> SourceError:
    if exc.expired:
        return SourceError("source_unavailable", "the stream URL has expired (HTTP 403/410)")
    if isinstance(exc, RangeUnsupported):
        return SourceError("source_unavailable", "the stream server does not answer Range reads")
    return SourceError("source_unavailable", f"reading the stream failed: {exc}")


# -- the build (blocking) ------------------------------------------------------------


class _Builder:
    """One storyboard's blocking work: locate, fetch, decode, tile, encode."""

    def __init__(
        self,
        video: _Video,
        fetcher: RangeFetcher,
        index_reads: Callable[[], int],
        *,
        deadline: float,
        stop: threading.Event,
        connections: int,
    ) -> None:
        self.video = video
        self.fetcher = fetcher
        self.index_reads = index_reads
        self.deadline = deadline
        self.stop = stop
        self.connections = max(1, connections)
        self.decoder = _DECODERS.get(video.track.codec, video.track.codec)
        # Keyframes being found or found, by the offset of the window they start.
        self._keys: dict[int, Future[_Key]] = {}
        self.keyframe_bytes = 0
        self._recent: collections.deque[int] = collections.deque(maxlen=HEAD_HISTORY)
        # Windows of a WebM index with Cues cost no read.
        self._cues_in_memory = isinstance(video.index, WebmIndex) and video.index.has_cues
        self._lock = threading.Lock()

    @property
    def bytes_fetched(self) -> int:
        return self.fetcher.stats.bytes + self.index_reads()

    @property
    def requests(self) -> int:
        return self.fetcher.stats.requests

    def check(self) -> None:
        if self.stop.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise TimeoutError

    def run(
        self,
        cues: list[tuple[float, float]],
        thumb_width: int,
        columns: int,
        rows: int,
        quality: int,
        timeout_s: float,
    ) -> tuple[bytes, tuple[Thumb, ...], tuple[int, int], int]:
        try:
            _check_decoder(self.decoder, self.video.track)
            pool = ThreadPoolExecutor(self.connections, thread_name_prefix="storyboard-fetch")
            try:
                keys = self._locate_all(pool, [start for start, _ in cues])
                frames = self._decode_all(pool, keys)
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
            self.check()
            return _compose(cues, keys, frames, self.video, thumb_width, columns, rows, quality)
        except TimeoutError:
            raise StoryboardTimeout(f"the storyboard was not made within {timeout_s:g} s") from None
        except FetchError as exc:
            raise _fetch_failure(exc) from exc
        except ContainerError as exc:
            raise SourceError(
                "source_unavailable", f"the stream's index is damaged: {exc}"
            ) from exc
        finally:
            self.fetcher.close()

    # -- reading ----------------------------------------------------------------

    def _map(
        self, pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: list[Any]
    ) -> list[Any]:
        """``fn`` over ``items`` on the pool; the first error (or the deadline) ends it."""
        futures: list[Future[Any]] = [pool.submit(fn, item) for item in items]
        left = self.deadline - time.monotonic()
        done, pending = wait(futures, timeout=max(0.0, left), return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            error = future.exception()
            if error is not None:
                self.stop.set()
                raise error
        if pending:
            self.stop.set()
            raise TimeoutError
        return [f.result() for f in futures]

    def read(self, offset: int, length: int) -> bytes:
        self.check()
        data = self.fetcher.read(offset, length)
        if len(data) < length:
            raise ContainerError(f"the stream ends at byte {offset + len(data)}")
        return data

    def _locate_all(self, pool: ThreadPoolExecutor, starts_s: list[float]) -> list[_Key]:
        """The keyframe nearest to each time (one per time; times often share one)."""
        return self._map(pool, lambda s: self._locate(self.video.ticks(s)), starts_s)

    def _window(self, ticks: float) -> Window:
        self.check()
        video = self.video
        return video.index.window(
            video.track.track_id, ticks / video.track.timescale, ticks / video.track.timescale
        )

    def _locate(self, target: float) -> _Key:
        """The keyframe nearest to ``target`` (ticks): the one at or before it,
        or the next one when that is strictly nearer."""
        window = self._window(target)
        start, following = window.start_pts, window.following_key_pts
        if following is not None and start is None and self._cues_in_memory:
            # WebM windows do not say their keyframe's time, but a window is
            # free here: a keyframe in (2·target − following, target] is
            # nearer than the following one.
            mirror = self._window(2 * target - following - 0.5).following_key_pts
            if mirror is not None and mirror <= target:
                return self._first_key(window)
            return self._first_key(self._window(following + 0.5))
        if start is not None and following is not None and following - target < target - start:
            # (Half a tick past the keyframe: a float's rounding never lands before it.)
            return self._first_key(self._window(following + 0.5))
        key = self._first_key(window)
        if start is None and following is not None and following - target < target - key.sample.pts:
            # Known only now (an index that searches the file for windows).
            key = self._first_key(self._window(following + 0.5))
        return key

    def _first_key(self, window: Window) -> _Key:
        """The window's first sync sample (the keyframe it starts at), found
        once per window however many targets share it."""
        at = window.spans[0][0]
        with self._lock:
            finding = self._keys.get(at)
            mine = finding is None
            if finding is None:
                finding = self._keys[at] = Future()
        if not mine:
            return finding.result(timeout=max(0.0, self.deadline - time.monotonic()))
        try:
            key = self._find_key(window)
        except BaseException as exc:
            finding.set_exception(exc)
            raise
        finding.set_result(key)
        return key

    def _find_key(self, window: Window) -> _Key:
        reader = window.reader
        if isinstance(reader, KnownSamples):
            sample = next((s for s in reader.listed if s.key), None)
            if sample is None:
                raise ContainerError("the sample table lists no sync sample there")
            return _Key(sample)
        if isinstance(reader, FragmentReader):
            return self._key_in_fragment(window, reader)
        if isinstance(reader, ClusterReader):
            return self._key_in_cluster(window, reader)
        raise StoryboardUnsupported(f"no keyframe reader for {type(reader).__name__}")

    def _key_in_fragment(self, window: Window, reader: FragmentReader) -> _Key:
        """The first sync sample of the window's first fragments, from their moof
        boxes: the fragment's head is read, then only what the moof says."""
        offset, size = window.spans[0]
        buf = self.read(offset, min(self._head_bytes(), size))
        pos = 0
        for _ in range(MAX_BOXES_TO_MOOF):
            if pos + 16 > len(buf) and len(buf) < size:
                buf += self.read(offset + len(buf), min(self._head_bytes(), size - len(buf)))
            if pos + 8 > len(buf):
                break
            box_bytes, kind = _MP4_HEADER.unpack_from(buf, pos)
            if box_bytes == 1 and pos + 16 <= len(buf):
                box_bytes = struct.unpack_from(">Q", buf, pos + 8)[0]
            elif box_bytes == 0:
                box_bytes = size - pos
            if box_bytes < 8 or pos + box_bytes > size:
                raise ContainerError(f"a box at {offset + pos} runs past its fragment")
            if kind == b"moof":
                if pos + box_bytes > len(buf):
                    buf += self.read(offset + len(buf), pos + box_bytes - len(buf))
                moof = _box_at(buf, pos, pos + box_bytes)
                parsed = _traf_samples(
                    buf, moof, offset + pos, reader.track_id, reader.trex, reader.shift,
                    reader.start_dts,
                )  # fmt: skip
                key = next((s for s in parsed[0] if s.key), None) if parsed else None
                if key is not None:
                    self._needed(key.offset + key.size - offset)
                    return _Key(key, _held(buf, offset, key))
            pos += box_bytes
        raise ContainerError(f"no sync sample in the fragment at {offset}")

    def _key_in_cluster(self, window: Window, reader: ClusterReader) -> _Key:
        """The first key block of the window's first Cluster, read from its head
        (more, doubling, while the keyframe is not whole in what was read)."""
        offset, size = window.spans[0]
        partial = replace(reader, partial_tail=True, trim_to_key=False, stop_key_pts=None)
        buf = self.read(offset, min(self._head_bytes(), size))
        while True:
            head = Window(window.track_id, ((offset, len(buf)),), partial)
            key = next((s for s in partial.samples(head, {offset: buf}) if s.key), None)
            if key is not None:
                self._needed(key.offset + key.size - offset)
                return _Key(key, _held(buf, offset, key))
            if len(buf) >= min(size, MAX_KEY_SEARCH_BYTES):
                raise ContainerError(f"no key frame in the Cluster at {offset}")
            buf += self.read(offset + len(buf), min(len(buf), size - len(buf)))

    def _head_bytes(self) -> int:
        """How much to read at a fragment's or Cluster's start: a little more
        than the recent keyframes needed (one read each, most of the time,
        and not much past the keyframe)."""
        with self._lock:
            recent = list(self._recent)
        if not recent:
            return HEAD_BYTES
        return min(MAX_HEAD_BYTES, max(MIN_HEAD_BYTES, math.ceil(max(recent) * HEAD_MARGIN)))

    def _needed(self, size: int) -> None:
        """A keyframe ended ``size`` bytes into its fragment or Cluster."""
        with self._lock:
            self._recent.append(size)

    # -- decoding ---------------------------------------------------------------

    def _rest(self, key: _Key) -> bytes:
        """The keyframe's bytes past those already read."""
        held = len(key.head)
        return self.read(key.sample.offset + held, key.sample.size - held)

    def _decode_all(self, pool: ThreadPoolExecutor, keys: list[_Key]) -> dict[int, _Decoded]:
        """Each distinct keyframe fetched (those not read already) and decoded:
        decoded frames by sample offset (a frame that did not decode is absent)."""
        distinct = list({k.sample.offset: k for k in keys}.values())
        self.keyframe_bytes = sum(k.sample.size for k in distinct)
        short = [k for k in distinct if len(k.head) < k.sample.size]
        rest = self._map(pool, self._rest, short)
        data = {k.sample.offset: k.head for k in distinct}
        data.update({k.sample.offset: k.head + r for k, r in zip(short, rest, strict=True)})
        frames: dict[int, _Decoded] = {}
        for key in distinct:
            self.check()
            decoded = _decode_key(
                self.decoder, self.video.track, key.sample, data[key.sample.offset]
            )
            if decoded is not None:
                frames[key.sample.offset] = decoded
        if not frames:
            raise SourceError("source_unavailable", "none of the source's keyframes decoded")
        return frames


def _held(buf: bytes, offset: int, sample: Sample) -> bytes:
    """The sample's first bytes that ``buf`` (read at ``offset``) holds."""
    begin = sample.offset - offset
    if begin < 0:
        return b""
    return buf[begin : begin + sample.size]


def _check_decoder(name: str, track: Track) -> None:
    try:
        av.CodecContext.create(name, "r")
    except (ValueError, av.FFmpegError) as exc:
        raise StoryboardUnsupported(f"no decoder for the source's codec {track.codec!r}") from exc


@dataclass(frozen=True)
class _Decoded:
    frame: Any  # av.VideoFrame
    sample_aspect: Fraction


def _decode_key(name: str, track: Track, sample: Sample, data: bytes) -> _Decoded | None:
    """A keyframe decoded on its own (a fresh decoder each: no state from
    another GOP), or None when it does not decode."""
    dec: Any = av.CodecContext.create(name, "r")
    if track.config:
        dec.extradata = track.config
    dec.thread_count = 1
    packet = av.Packet(data)
    packet.pts = packet.dts = sample.pts
    packet.is_keyframe = True
    try:
        frames = list(dec.decode(packet)) + list(dec.decode(None))
    except av.FFmpegError:
        return None
    if not frames:
        return None
    sar = dec.sample_aspect_ratio
    return _Decoded(frames[0], sar if isinstance(sar, Fraction) and sar > 0 else Fraction(1))


# -- the sprite ---------------------------------------------------------------------


def _thumb_height(decoded: _Decoded, thumb_width: int) -> int:
    """Even, and in the display aspect (the frame's size times its sample aspect)."""
    frame = decoded.frame
    aspect: float = float(frame.width * decoded.sample_aspect) / float(frame.height)
    return max(2, math.floor(thumb_width / aspect / 2 + 0.5) * 2)  # halves round up


def _blank(width: int, height: int) -> Any:
    frame = av.VideoFrame(width, height, "yuvj420p")
    planes = frame.planes
    planes[0].update(bytes(planes[0].buffer_size))  # full-range black
    for plane in planes[1:]:
        plane.update(b"\x80" * plane.buffer_size)
    return frame


def _compose(
    cues: list[tuple[float, float]],
    keys: list[_Key],
    frames: dict[int, _Decoded],
    video: _Video,
    thumb_width: int,
    columns: int,
    rows: int,
    quality: int,
) -> tuple[bytes, tuple[Thumb, ...], tuple[int, int], int]:
    """Scale each cue's keyframe, tile them, encode the sprite: (JPEG, thumbs,
    sprite size, keyframes decoded)."""
    thumb_width -= thumb_width % 2
    first = next(iter(frames.values()))
    thumb_height = _thumb_height(first, thumb_width)
    if rows * thumb_height > MAX_SPRITE_SIDE:
        raise ValueError(f"the sprite would be more than {MAX_SPRITE_SIDE} pixels high")
    columns = min(columns, len(cues))
    graph = av.filter.Graph()
    src = graph.add_buffer(
        width=thumb_width,
        height=thumb_height,
        format=av.VideoFormat("yuvj420p"),
        time_base=Fraction(1, 1),
    )
    tile = graph.add("tile", f"layout={columns}x{rows}:nb_frames={len(cues)}")
    sink = graph.add("buffersink")
    src.link_to(tile)
    tile.link_to(sink)
    graph.configure()
    scaled: dict[int, Any] = {}
    # One reformatter for every frame: it keeps its scaler between calls
    # (a new one per frame costs 30 times the scaling).
    reformatter = VideoReformatter()
    thumbs: list[Thumb] = []
    for i, ((start_s, end_s), key) in enumerate(zip(cues, keys, strict=True)):
        decoded = frames.get(key.sample.offset)
        if decoded is None:
            tile_frame, shown = _blank(thumb_width, thumb_height), None
        else:
            if key.sample.offset not in scaled:
                scaled[key.sample.offset] = reformatter.reformat(
                    decoded.frame,
                    width=thumb_width, height=thumb_height, format="yuvj420p",
                    interpolation="AREA",
                )  # fmt: skip
            # (The same frame for several tiles: the graph takes its own reference
            # at each push, with the pts of that moment.)
            tile_frame = scaled[key.sample.offset]
            shown = round(video.user_s(key.sample.pts), 6)
        tile_frame.pts = i
        tile_frame.time_base = Fraction(1, 1)
        graph.push(tile_frame)
        x, y = (i % columns) * thumb_width, (i // columns) * thumb_height
        thumbs.append(Thumb(start_s, end_s, shown, x, y, thumb_width, thumb_height))
    graph.push(None)
    sprite: Any = graph.pull()
    encoder: Any = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = sprite.width, sprite.height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 1)
    # A fixed quantiser: PyAV's qscale turns on fixed quality, but the frame
    # carries none (it would be 0: the best, clipped to qmin), so qmin and
    # qmax pin it.
    encoder.qscale = quality
    encoder.qmin = encoder.qmax = quality
    packets = encoder.encode(sprite) + encoder.encode(None)
    jpeg = b"".join(bytes(p) for p in packets)
    return jpeg, tuple(thumbs), (sprite.width, sprite.height), len(frames)


__all__ = [
    "DEFAULT_COUNT",
    "Storyboard",
    "StoryboardTimeout",
    "StoryboardUnsupported",
    "Thumb",
    "build_storyboard",
    "cue_spans",
    "storyboard_vtt",
]
