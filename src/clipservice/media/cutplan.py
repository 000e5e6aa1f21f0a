"""Which frames of a clip are re-encoded and which are copied: pure functions.

Given a track's samples in decode order (times in track ticks) and a clip's
[start, end), a cut plan says:

- ``head``: frames from ``start`` to the next keyframe, re-encoded (decoded
  from the keyframe at or before ``start``);
- ``copy``: the samples stream-copied, a run in decode order;
- ``tail``: with B-frames, the last frames before ``end`` that no copy can
  keep (a copy keeps a prefix of a GOP in decode order, and some prefixes
  leave holes), re-encoded (decoded from their GOP's keyframe).

``fast`` plans copy from the keyframe at or before ``start`` (nothing
re-encoded). Times within ``EPS_S`` of each other are the same instant.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from clipservice.media.containers.base import Sample

# Times closer than this are the same instant (well under one frame).
EPS_S = 1e-3


class PlanUnsupported(Exception):
    """The samples cannot be cut this way safely (the caller re-encodes instead)."""


@dataclass(frozen=True)
class Reencode:
    """Frames to re-encode: decoded from the keyframe at sample ``key``, the
    frames shown at ``frame_pts`` (sorted) are encoded."""

    key: int  # index of the GOP's keyframe in the sample list
    frame_pts: tuple[int, ...]


@dataclass(frozen=True)
class CutPlan:
    """What to do with each sample of the window for one clip."""

    head: Reencode | None
    copy: range  # indexes of the copied samples (decode order); may be empty
    tail: Reencode | None
    first_pts: int  # pts of the clip's first frame (the output's time 0)
    end_pts: int  # where the clip's shown frames end (source ticks)
    reorder_ticks: int  # pts - dts of the source's keyframes (0 without B-frames)

    @property
    def reencoded_frames(self) -> int:
        return sum(len(p.frame_pts) for p in (self.head, self.tail) if p is not None)

    @property
    def frame_count(self) -> int:
        return self.reencoded_frames + len(self.copy)


@dataclass(frozen=True)
class Gop:
    """One GOP of the window: samples ``first`` .. ``stop - 1`` in decode order."""

    first: int
    stop: int  # index of the next keyframe, or len(samples)
    next_key_pts: int | None  # pts of the keyframe that follows, if known


class Track:
    """A window's samples with the lookups a plan needs."""

    def __init__(
        self,
        samples: Sequence[Sample],
        timescale: int,
        *,
        following_key_pts: int | None = None,
    ) -> None:
        if not samples:
            raise PlanUnsupported("no samples in the clip's range")
        self.samples = samples
        self.timescale = timescale
        self.eps = max(1, round(EPS_S * timescale))
        self.keys = [i for i, s in enumerate(samples) if s.key]
        self._key_pts = [samples[i].pts for i in self.keys]
        self.following_key_pts = following_key_pts

    def ticks(self, t_s: float) -> int:
        return round(t_s * self.timescale)

    def gop(self, key: int) -> Gop:
        """The GOP that starts at sample ``key`` (a keyframe)."""
        k = bisect.bisect_left(self.keys, key)
        if k == len(self.keys) or self.keys[k] != key:
            raise ValueError(f"sample {key} is not a keyframe")
        if k + 1 < len(self.keys):
            nxt = self.keys[k + 1]
            return Gop(key, nxt, self.samples[nxt].pts)
        return Gop(key, len(self.samples), self.following_key_pts)

    def key_at_or_before(self, pts: int) -> int:
        """The last keyframe (decode order) whose pts is at or before ``pts``."""
        best = None
        for i in self.keys:
            if self.samples[i].pts <= pts + self.eps:
                best = i
            else:
                break
        if best is None:
            raise PlanUnsupported("no keyframe at or before the clip's start in the source")
        return best

    def leading(self, gop: Gop) -> list[int]:
        """Samples after the GOP's keyframe (decode order) shown before it: an
        open GOP's leading pictures, which refer to the GOP before."""
        key_pts = self.samples[gop.first].pts
        return [i for i in range(gop.first + 1, gop.stop) if self.samples[i].pts < key_pts]

    def reordered(self, gop: Gop) -> bool:
        pts = [self.samples[i].pts for i in range(gop.first, gop.stop)]
        return any(b < a for a, b in itertools.pairwise(pts))

    def frames(self, gop: Gop, start: int, end: int) -> list[int]:
        """Sorted pts of the GOP's frames in [start, end) (with the tolerance)."""
        return sorted(
            s.pts
            for s in self.samples[gop.first : gop.stop]
            if start - self.eps <= s.pts < end - self.eps
        )

    def copy_prefix(self, gop: Gop, end: int) -> tuple[int, int]:
        """The longest copy of the GOP that shows nothing at or after ``end``.

        A copy keeps a prefix of the GOP's samples in decode order; with
        B-frames some prefixes leave holes (a frame kept, a frame shown before
        it not): only hole-free prefixes count. Returns (index of the first
        sample not copied, pts the copy shows until).
        """
        ordered = sorted(s.pts for s in self.samples[gop.first : gop.stop])
        best = (gop.first, self.samples[gop.first].pts)
        highest: int | None = None
        for n, i in enumerate(range(gop.first, gop.stop)):
            pts = self.samples[i].pts
            if pts >= end - self.eps:
                break
            highest = pts if highest is None else max(highest, pts)
            if highest != ordered[n]:
                continue  # a hole: a frame shown before this one is not kept yet
            best = (i + 1, self._after(gop, ordered, n + 1))
        return best

    def copy_nearest(self, gop: Gop, end: int) -> tuple[int, int]:
        """The hole-free prefix of the GOP whose shown end is nearest ``end``
        (fast mode: a frame or two off rather than a re-encode)."""
        ordered = sorted(s.pts for s in self.samples[gop.first : gop.stop])
        best: tuple[int, int, int] | None = None  # (distance, -length, stop)
        highest: int | None = None
        for n, i in enumerate(range(gop.first, gop.stop)):
            pts = self.samples[i].pts
            highest = pts if highest is None else max(highest, pts)
            if highest != ordered[n]:
                continue
            shown_until = self._after(gop, ordered, n + 1)
            candidate = (abs(shown_until - end), -(n + 1), i + 1)
            if best is None or candidate < best:
                best = candidate
        if best is None:
            return gop.first, self.samples[gop.first].pts
        stop = best[2]
        return stop, self._after(gop, ordered, stop - gop.first)

    def _after(self, gop: Gop, ordered: list[int], count: int) -> int:
        """Where the first ``count`` frames (in pts order) stop showing."""
        if count < len(ordered):
            return ordered[count]
        if gop.next_key_pts is not None:
            return gop.next_key_pts
        last = self.samples[gop.first : gop.stop]
        tail = max(last, key=lambda s: s.pts)
        return tail.pts + max(tail.duration, 1)


def plan_cut(track: Track, start: int, end: int, mode: Literal["fast", "accurate"]) -> CutPlan:
    """The plan for the clip [start, end) (ticks) of ``track``."""
    if end <= start:
        raise PlanUnsupported("the clip is empty")
    samples = track.samples
    first = track.gop(track.key_at_or_before(start))
    key = samples[first.first]
    reorder = max(0, key.pts - key.dts)
    if any(track.leading(track.gop(k)) for k in track.keys if k >= first.first):
        # Leading pictures (decoded after their keyframe, shown before it) refer
        # to the GOP before theirs: a copy starting at their keyframe cannot
        # show them, and when they follow the clip's last GOP no part of a
        # plan holds them although they are shown before its end.
        raise PlanUnsupported("the source uses open GOPs")
    _check_closed(track, track.gop(track.keys[-1]))
    if mode == "fast":
        return _plan_fast(track, first, end, reorder)
    return _plan_accurate(track, first, start, end, reorder)


def _last_gop(track: Track, end: int, not_before: int) -> Gop:
    """The GOP holding the clip's last frame (the frame just before ``end``)."""
    last_key = not_before
    for i in track.keys:
        if i < not_before:
            continue
        if track.samples[i].pts < end - track.eps:
            last_key = i
        else:
            break
    return track.gop(last_key)


def _check_closed(track: Track, gop: Gop) -> None:
    if track.leading(gop):
        raise PlanUnsupported("the source uses open GOPs")
    if gop.stop == len(track.samples) and gop.next_key_pts is not None:
        # The window's last GOP: its frames must reach the next keyframe. If
        # they stop short, the frames in between come after that keyframe in
        # decode order (its leading pictures: an open GOP) and are not here.
        shown = sorted(s.pts for s in track.samples[gop.first : gop.stop])
        steps = [b - a for a, b in itertools.pairwise(shown)]
        step = sorted(steps)[len(steps) // 2] if steps else 0
        # (Two frames' worth of slack: a VFR source's frame rate may change there.)
        if step and gop.next_key_pts - shown[-1] > 2.5 * step + track.eps:
            raise PlanUnsupported("the source uses open GOPs")


def _plan_fast(track: Track, first: Gop, end: int, reorder: int) -> CutPlan:
    samples = track.samples
    last = _last_gop(track, end, first.first)
    _check_closed(track, last)
    if not track.reordered(last):
        stop = next(
            (i for i in range(last.first, last.stop) if samples[i].pts >= end - track.eps),
            last.stop,
        )
        shown_until = samples[stop].pts if stop < last.stop else _gop_end(track, last)
    elif last.next_key_pts is not None and last.next_key_pts <= end + track.eps:
        stop, shown_until = last.stop, last.next_key_pts
    else:
        stop, shown_until = track.copy_nearest(last, end)
    if stop <= first.first:
        stop = min(first.first + 1, len(samples))  # at least the keyframe
        shown_until = samples[first.first].pts + max(samples[first.first].duration, 1)
    return CutPlan(
        head=None,
        copy=range(first.first, stop),
        tail=None,
        first_pts=samples[first.first].pts,
        end_pts=shown_until,
        reorder_ticks=reorder,
    )


def _gop_end(track: Track, gop: Gop) -> int:
    if gop.next_key_pts is not None:
        return gop.next_key_pts
    last = max(track.samples[gop.first : gop.stop], key=lambda s: s.pts)
    return last.pts + max(last.duration, 1)


def _plan_accurate(track: Track, first: Gop, start: int, end: int, reorder: int) -> CutPlan:
    samples = track.samples
    key_pts = samples[first.first].pts
    head_frames = [p for p in track.frames(first, start, end)]
    next_key = first.stop if first.stop < len(samples) else None
    head: Reencode | None = None
    if not head_frames:  # the start falls after the GOP's last frame
        if next_key is None or samples[next_key].pts >= end - track.eps:
            raise PlanUnsupported("no frame in the clip's range")
        copy_from = next_key
    elif head_frames[0] == key_pts:
        copy_from = first.first
    else:
        head = Reencode(first.first, tuple(head_frames))
        if next_key is None:
            # The whole rest of the clip is in this GOP (or the samples end early).
            if _gop_end(track, first) < end - track.eps:
                raise PlanUnsupported("the source's samples end before the clip does")
            return CutPlan(head, range(0), None, head_frames[0], end, reorder)
        copy_from = next_key
    first_pts = head.frame_pts[0] if head is not None else samples[copy_from].pts
    if samples[copy_from].pts >= end - track.eps:
        return CutPlan(head, range(0), None, first_pts, end, reorder)

    copy_gop = track.gop(copy_from)
    _check_closed(track, copy_gop)
    last = _last_gop(track, end, copy_from)
    _check_closed(track, last)
    tail: Reencode | None = None
    if not track.reordered(last):
        stop = next(
            (i for i in range(last.first, last.stop) if samples[i].pts >= end - track.eps),
            last.stop,
        )
    elif last.next_key_pts is not None and last.next_key_pts <= end + track.eps:
        stop = last.stop  # the clip ends on the next keyframe: the whole GOP
    else:
        stop, shown_until = track.copy_prefix(last, end)
        frames = tuple(p for p in track.frames(last, shown_until, end))
        if frames:
            tail = Reencode(last.first, frames)
    if stop == last.stop and _gop_end(track, last) < end - track.eps:
        # (With or without B-frames: the window does not hold the clip's end.)
        raise PlanUnsupported("the source's samples end before the clip does")
    return CutPlan(head, range(copy_from, stop), tail, first_pts, end, reorder)
