"""Keyframe lookups around a cut point, over HTTP Range, cached per job.

A lookup seeks the source's video to the keyframe at or before a time and
demuxes packets (never decodes) up to the next keyframe and a few packets
past it, so it reads about one GOP of bytes, never the whole file. The same
PyAV container stays open for the whole job (behind a lock, in a thread), so
the source's index is read once per job, and each GOP looked up is cached:
several clips of one source in the same GOP probe it once.

Times given to and returned by this module are seconds from the start of the
video stream (what FFmpeg's input ``-ss`` means); ``pts`` values are ticks of
the stream's time base.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import av

from clipservice.media.smartcut import VideoParams, open_source, video_params

# Packets read past the next keyframe to catch leading pictures of an open GOP.
_LOOKAHEAD_PACKETS = 8
# Stop a lookup that finds no next keyframe after this many packets.
_MAX_GOP_PACKETS = 2000
T = TypeVar("T")
# Times closer than this are the same instant (well under one frame).
EPS_S = 1e-3


class ProbeError(Exception):
    """The source's keyframes cannot be found or look unsafe to smart-cut."""


@dataclass(frozen=True)
class Gop:
    """One group of pictures: its keyframe, its frames, and the next keyframe."""

    time_base: Fraction
    origin_pts: int  # the stream's first pts; user time 0
    key_pts: int
    key_dts: int
    frame_pts: tuple[int, ...]  # presentation times of the GOP's frames, sorted
    next_key_pts: int | None  # None: the GOP runs to the end of the stream
    open_gop: bool  # pictures after the next keyframe (decode order) show before it
    reorder: bool  # frames are stored out of presentation order (B-frames)
    packets: tuple[tuple[int, int], ...] = ()  # (pts, dts) of the GOP, decode order

    def seconds(self, pts: int) -> float:
        return float((pts - self.origin_pts) * self.time_base)

    @property
    def key_s(self) -> float:
        return self.seconds(self.key_pts)

    @property
    def next_key_s(self) -> float | None:
        return None if self.next_key_pts is None else self.seconds(self.next_key_pts)

    def covers(self, t_s: float) -> bool:
        end = self.next_key_s
        return self.key_s - EPS_S <= t_s and (end is None or t_s < end - EPS_S)

    def copy_cut(self, end_pts: int) -> tuple[int, int]:
        """Where a stream copy of this GOP should stop to end nearest ``end_pts``.

        A copy can only keep a prefix of the packets in decode order. With
        B-frames some prefixes leave holes (a reference frame kept, the
        B-frames shown before it not); only hole-free prefixes are candidates,
        and the one whose shown end is nearest ``end_pts`` wins. Returns
        (decode time to stop at, presentation time the copy shows until).
        """
        ordered = sorted(self.frame_pts)
        best: tuple[int, int, int] | None = None  # (distance, -length, index)
        kept: list[int] = []
        for i, (pts, _) in enumerate(self.packets):
            kept.append(pts)
            if sorted(kept) != ordered[: len(kept)]:
                continue
            shown_until = self._after(ordered, len(kept))
            candidate = (abs(shown_until - end_pts), -len(kept), i)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return self.key_dts, self.key_pts
        i = best[2]
        stop = self.packets[i + 1][1] if i + 1 < len(self.packets) else self.packets[i][1] + 1
        return stop, self._after(ordered, i + 1)

    def copy_prefix(self, end_pts: int) -> tuple[int, int]:
        """The longest copy of this GOP that shows nothing at or after ``end_pts``.

        Like :meth:`copy_cut` a copy keeps a hole-free prefix of the packets in
        decode order; this one never overshoots, and the frames from where it
        ends to ``end_pts`` are for the caller to re-encode. Returns (decode
        time to stop at, presentation time the copy shows until); a copy of
        nothing stops at the keyframe.
        """
        ordered = sorted(self.frame_pts)
        best = (self.key_dts, self.key_pts)
        highest = None
        for i, (pts, _) in enumerate(self.packets):
            if pts >= end_pts:
                break
            highest = pts if highest is None else max(highest, pts)
            if highest != ordered[i]:
                continue  # a hole: a frame shown before this one is not kept yet
            stop = self.packets[i + 1][1] if i + 1 < len(self.packets) else self.packets[i][1] + 1
            best = (stop, self._after(ordered, i + 1))
        return best

    def _after(self, ordered: list[int], count: int) -> int:
        if count < len(ordered):
            return ordered[count]
        if self.next_key_pts is not None:
            return self.next_key_pts
        step = ordered[-1] - ordered[-2] if len(ordered) > 1 else 1
        return ordered[-1] + step

    def frames_from(self, t_s: float, until_s: float | None = None) -> list[int]:
        """The GOP's frames at or after ``t_s`` (and before ``until_s``)."""
        return [
            p
            for p in self.frame_pts
            if self.seconds(p) >= t_s - EPS_S
            and (until_s is None or self.seconds(p) < until_s - EPS_S)
        ]


class KeyframeIndex:
    """The keyframes of one source's video, looked up lazily and cached for a job.

    Thread-safe: lookups run in worker threads and take a lock around the one
    open container. Close it when the job ends.
    """

    def __init__(self, video_url: str) -> None:
        self.video_url = video_url
        self._lock = threading.Lock()
        self._container: Any = None
        self._gops: list[Gop] = []  # sorted by key_pts
        self.lookups = 0  # GOPs really probed (not served from cache)
        self._close_when_free = False

    # -- life cycle --------------------------------------------------------

    def close(self) -> None:
        """Close the container; if a lookup still holds it (a read stalled on
        the source, up to its read timeout), that lookup closes it when done,
        so closing never waits on the source."""
        if not self._lock.acquire(timeout=0.2):
            self._close_when_free = True
            if not self._lock.acquire(blocking=False):
                return  # (else the lookup ended meanwhile: close here)
        try:
            self._close_now()
        finally:
            self._lock.release()

    def _close_now(self) -> None:
        self._close_when_free = False
        if self._container is not None:
            self._container.close()
            self._container = None

    def _done_with_lock(self) -> None:
        if self._close_when_free:
            self._close_now()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    # -- lookups -----------------------------------------------------------

    async def video_params(self) -> VideoParams:
        """The source video's coding parameters (from the same open container)."""
        return await asyncio.to_thread(self._video_params_sync)

    def _video_params_sync(self) -> VideoParams:
        with self._lock:
            try:
                return video_params(self._stream())
            except av.FFmpegError as exc:
                raise ProbeError(f"cannot read the source: {exc}") from exc
            finally:
                self._done_with_lock()

    def inspect_sync(self, read: Callable[[Any], T]) -> T:
        """Run ``read`` on the index's open container (opening it if need be):
        the job's metadata probe shares the one open of the video."""
        with self._lock:
            try:
                if self._container is None:
                    self._container = open_source(self.video_url)
                return read(self._container)
            finally:
                self._done_with_lock()

    async def gop_at(self, t_s: float) -> Gop:
        """The GOP holding time ``t_s`` (its keyframe is at or before it)."""
        return await asyncio.to_thread(self.gop_at_sync, t_s)

    def gop_at_sync(self, t_s: float) -> Gop:
        with self._lock:
            for gop in self._gops:
                if gop.covers(t_s):
                    return gop
            try:
                gop = self._probe(t_s)
            except av.FFmpegError as exc:
                raise ProbeError(f"cannot read keyframes: {exc}") from exc
            finally:
                self._done_with_lock()
            self.lookups += 1
            keys = [g.key_pts for g in self._gops]
            i = bisect.bisect_left(keys, gop.key_pts)
            if i == len(keys) or keys[i] != gop.key_pts:
                self._gops.insert(i, gop)
            return gop

    def _stream(self) -> Any:
        if self._container is None:
            self._container = open_source(self.video_url)
        if not self._container.streams.video:
            raise ProbeError("the source has no video stream")
        return self._container.streams.video[0]

    def _probe(self, t_s: float) -> Gop:
        stream = self._stream()
        tb: Fraction = stream.time_base
        origin = stream.start_time or 0
        target = origin + int(Fraction(t_s) / tb)
        # MP4 seeks by decode time, which runs ahead of presentation time with
        # B-frames: step back until the keyframe really is at or before t.
        for _ in range(4):
            packets = self._read_gop(stream, target)
            key_pts = packets[0][0]
            if key_pts <= target + int(Fraction(EPS_S) / tb) or packets[0][1] <= origin:
                break
            target = packets[0][1] - 1
        else:
            raise ProbeError(f"no keyframe found at or before {t_s:.3f}s")
        return _gop_from_packets(packets, tb, origin)

    def _read_gop(self, stream: Any, target: int) -> list[tuple[int, int, bool]]:
        """(pts, dts, keyframe) of packets from the keyframe at or before target
        through the next keyframe and a few packets past it."""
        container = self._container
        container.seek(target, stream=stream, backward=True, any_frame=False)
        packets: list[tuple[int, int, bool]] = []
        after_next = -1
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's end-of-stream flush packet
                continue
            if packet.pts is None or packet.dts is None:
                raise ProbeError("the source has packets without timestamps")
            if not packets and not packet.is_keyframe:
                raise ProbeError("seeking did not land on a keyframe")
            packets.append((packet.pts, packet.dts, packet.is_keyframe))
            if after_next >= 0:
                after_next += 1
                if after_next >= _LOOKAHEAD_PACKETS:
                    break
            elif packet.is_keyframe and len(packets) > 1:
                after_next = 0
            if len(packets) > _MAX_GOP_PACKETS:
                raise ProbeError("no keyframe within a reasonable distance")
        if not packets:
            raise ProbeError("no packets at the cut point")
        return packets


def _gop_from_packets(packets: list[tuple[int, int, bool]], tb: Fraction, origin: int) -> Gop:
    key_pts, key_dts, _ = packets[0]
    nxt = next((i for i in range(1, len(packets)) if packets[i][2]), None)
    body = packets[:nxt] if nxt is not None else packets
    frame_pts = sorted(p for p, _, _ in body)
    if frame_pts[0] != key_pts:
        raise ProbeError("a frame of the GOP shows before its keyframe (open GOP)")
    dts = [d for _, d, _ in packets]
    if any(b <= a for a, b in itertools.pairwise(dts)):
        raise ProbeError("decode timestamps do not increase")
    next_key = packets[nxt][0] if nxt is not None else None
    open_gop = nxt is not None and any(p < packets[nxt][0] for p, _, _ in packets[nxt + 1 :])
    body_pts = [p for p, _, _ in body]
    reorder = any(b < a for a, b in itertools.pairwise(body_pts))
    return Gop(
        time_base=tb,
        origin_pts=origin,
        key_pts=key_pts,
        key_dts=key_dts,
        frame_pts=tuple(frame_pts),
        next_key_pts=next_key,
        open_gop=open_gop,
        reorder=reorder,
        packets=tuple((p, d) for p, d, _ in body),
    )
