"""Cut plans on synthetic sample lists: which frames are re-encoded, which are copied."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipservice.media.containers.base import Sample
from clipservice.media.cutplan import EPS_S, CutPlan, PlanUnsupported, Track, plan_cut

# -- synthetic streams ------------------------------------------------------------


def _b_order(lo: int, hi: int, pyramid: bool) -> list[int]:
    """Decode order of the B-frames shown at lo..hi (display indexes) between two anchors."""
    if lo > hi:
        return []
    if not pyramid or hi == lo:
        return list(range(lo, hi + 1))
    mid = (lo + hi) // 2  # the referenced middle B of a pyramid is coded first
    return [mid, *_b_order(lo, mid - 1, True), *_b_order(mid + 1, hi, True)]


def stream(
    times: Sequence[int],
    keys: Sequence[int],
    bframes: int = 0,
    *,
    pyramid: bool = False,
    open_gop: bool = False,
) -> list[Sample]:
    """Samples, in decode order, of frames shown at ``times`` (display order) with
    keyframes at the display indexes ``keys``, coded as x264 codes them: an
    anchor (I or P) every ``bframes + 1`` frames, the B-frames between two
    anchors coded after the later one. Closed GOPs end on an anchor (no B-frame
    crosses a keyframe); open GOPs let the B-frames before a keyframe follow
    it in decode order (its leading pictures)."""
    count = len(times)
    key_set = set(keys)
    assert 0 in key_set and list(times) == sorted(set(times))
    anchors = [0]
    while anchors[-1] < count - 1:
        a = anchors[-1]
        nxt = min(a + bframes + 1, count - 1)
        later_keys = [k for k in key_set if a < k <= nxt]
        if later_keys:
            k = min(later_keys)
            nxt = k if open_gop or k - 1 == a else k - 1
        anchors.append(nxt)
    order = [0]
    for a, c in itertools.pairwise(anchors):
        order += [c, *_b_order(a + 1, c - 1, pyramid)]
    assert sorted(order) == list(range(count))
    pts_dec = [times[i] for i in order]
    # x264/MP4 decode times: the display times, shifted so no frame is decoded
    # after it is shown.
    shift = max(times[n] - pts_dec[n] for n in range(count))
    durations = [b - a for a, b in itertools.pairwise(times)]
    durations.append(durations[-1] if durations else 1)
    out = []
    offset = 1000
    for n, i in enumerate(order):
        size = 100 + i
        out.append(Sample(times[i], times[n] - shift, durations[i], offset, size, i in key_set))
        offset += size
    return out


def cfr(count: int, step: int, start: int = 0) -> list[int]:
    return [start + i * step for i in range(count)]


def vfr(count: int, seed: int) -> list[int]:
    """Irregular display times (a phone's variable frame rate), ticks of 1/90000 s."""
    rng = random.Random(seed)
    times, t = [], 0
    for _ in range(count):
        times.append(t)
        t += rng.choice((1500, 2999, 3000, 3003, 3750, 4500, 6006))
    return times


def expected(track: Track, start: int, end: int) -> list[int]:
    """The source frames a clip [start, end) holds (with the plan's tolerance)."""
    eps = track.eps
    return sorted(s.pts for s in track.samples if start - eps <= s.pts < end - eps)


def shown(track: Track, plan: CutPlan) -> list[int]:
    """Every frame the plan outputs: re-encoded and copied."""
    frames = [track.samples[i].pts for i in plan.copy]
    for part in (plan.head, plan.tail):
        if part is not None:
            frames += part.frame_pts
    return sorted(frames)


def gop_of(track: Track, index: int) -> range:
    """Decode-order indexes of the GOP holding sample ``index``."""
    key = max(k for k in track.keys if k <= index)
    nxt = next((k for k in track.keys if k > key), len(track.samples))
    return range(key, nxt)


def check_accurate(track: Track, plan: CutPlan, start: int, end: int) -> None:
    """What every accurate plan promises, whatever the stream."""
    want = expected(track, start, end)
    assert shown(track, plan) == want
    assert plan.frame_count == len(want)
    assert plan.first_pts == want[0] and plan.end_pts == end
    samples = track.samples
    if plan.copy:
        assert samples[plan.copy[0]].key
        # The copy shows nothing outside the clip, and within the GOP it ends
        # in it keeps the frames shown first (no hole a decoder would show).
        copied = sorted(samples[i].pts for i in plan.copy)
        assert copied[0] >= start - track.eps and copied[-1] < end - track.eps
        last = gop_of(track, plan.copy[-1])
        kept = sorted(samples[i].pts for i in last if i in plan.copy)
        assert kept == sorted(samples[i].pts for i in last)[: len(kept)]
    if plan.head is not None:
        assert samples[plan.head.key].key
        gop = [samples[i].pts for i in gop_of(track, plan.head.key)]
        assert set(plan.head.frame_pts) <= set(gop)
        assert list(plan.head.frame_pts) == sorted(plan.head.frame_pts)
        if plan.copy:
            assert max(plan.head.frame_pts) < samples[plan.copy[0]].pts
    if plan.tail is not None:
        assert plan.copy and samples[plan.tail.key].key
        gop = gop_of(track, plan.tail.key)
        assert plan.tail.key in plan.copy
        assert set(plan.tail.frame_pts) <= {samples[i].pts for i in gop}
        copied = [samples[i].pts for i in plan.copy]
        assert min(plan.tail.frame_pts) > max(copied)


# -- a GOP with B-frames, as the old keyframes.Gop tests had it --------------------

F = 512  # ticks of one frame at 30 fps in a 1/15360 timescale
TB = 15360
# Decode order I0 P3 B1 B2 P6 B4 B5, then the next GOP's I7 (and a P8 after it).
BGOP = stream(cfr(9, F), keys=[0, 7], bframes=2)


def test_generator_writes_x264_orders() -> None:
    """The synthetic streams have x264's decode orders and decode times never after display."""
    assert [s.pts // F for s in BGOP] == [0, 3, 1, 2, 6, 4, 5, 7, 8]
    assert [s.key for s in BGOP] == [True] + [False] * 6 + [True, False]
    assert all(s.dts <= s.pts for s in BGOP)
    assert [s.dts for s in BGOP] == sorted({s.dts for s in BGOP})
    pyramid = stream(cfr(9, F), keys=[0], bframes=3, pyramid=True)
    assert [s.pts // F for s in pyramid] == [0, 4, 2, 1, 3, 8, 6, 5, 7]
    assert pyramid[0].pts - pyramid[0].dts == 2 * F  # two frames of reorder delay
    opened = stream(cfr(13, F), keys=[0, 9], bframes=2, open_gop=True)
    assert [s.pts // F for s in opened] == [0, 3, 1, 2, 6, 4, 5, 9, 7, 8, 12, 10, 11]


def test_copy_nearest_never_leaves_holes() -> None:
    """Fast copies end at the hole-free decode-order prefix nearest the wanted end."""
    track = Track(BGOP, TB)
    gop = track.gop(0)
    assert gop.next_key_pts == 7 * F
    # End at frame 4: prefix I0 P3 B1 B2 shows 0..3 exactly.
    assert track.copy_nearest(gop, 4 * F) == (4, 4 * F)
    # End at frame 2: no prefix shows exactly 0..1; I0 alone (ends at 1) or
    # I0 P3 B1 B2 (ends at 4): the nearer one wins.
    assert track.copy_nearest(gop, 2 * F) == (1, F)
    # End at the next keyframe: the whole GOP.
    assert track.copy_nearest(gop, 7 * F) == (7, 7 * F)


def test_copy_prefix_never_overshoots_the_end() -> None:
    """With B-frames the tail copy keeps the longest hole-free prefix showing
    nothing at or after the end; the rest up to the end is re-encoded."""
    track = Track(BGOP, TB)
    gop = track.gop(0)
    # End at frame 4 (exclusive): I0 P3 B1 B2 shows exactly 0..3.
    assert track.copy_prefix(gop, 4 * F) == (4, 4 * F)
    # End at frame 3: P3 would show at the end, so only I0 (0..0) is copied.
    assert track.copy_prefix(gop, 3 * F) == (1, F)
    # End at frame 6: I0 P3 B1 B2 (0..3); P6 would show at 6, B4 B5 are re-encoded.
    assert track.copy_prefix(gop, 6 * F) == (4, 4 * F)
    # End at frame 1: only the keyframe itself.
    assert track.copy_prefix(gop, F) == (1, F)
    # End before the keyframe shows: nothing (stop at the keyframe).
    assert track.copy_prefix(gop, 0) == (0, 0)


def test_copy_prefix_skips_prefixes_ending_on_an_undecoded_b_frame_hole() -> None:
    """With both references coded before their B-frames (I0 P3 P6 B1 B2 B4 B5), a copy
    ending at 5 cannot keep I0 P3: B1 B2 would be missing; only I0 is a copy."""
    order = [0, 3, 6, 1, 2, 4, 5]
    samples = [Sample(p * F, (n - 1) * F, F, 0, 1, p == 0) for n, p in enumerate(order)]
    track = Track(samples, TB, following_key_pts=7 * F)
    gop = track.gop(0)
    assert track.copy_prefix(gop, 5 * F) == (1, F)
    assert track.copy_prefix(gop, 7 * F) == (7, 7 * F)
    plan = plan_cut(track, 0, 5 * F, "accurate")
    assert plan.copy == range(0, 1)
    assert plan.tail is not None and plan.tail.frame_pts == (F, 2 * F, 3 * F, 4 * F)
    check_accurate(track, plan, 0, 5 * F)


def test_gop_lookups() -> None:
    """GOPs end at the next keyframe (or the window's end, with the following key's pts)."""
    track = Track(BGOP, TB, following_key_pts=14 * F)
    assert track.keys == [0, 7]
    assert track.gop(7).stop == 9 and track.gop(7).next_key_pts == 14 * F
    assert track.reordered(track.gop(0)) and not track.reordered(track.gop(7))
    assert track.key_at_or_before(6 * F) == 0 and track.key_at_or_before(7 * F) == 7
    with pytest.raises(ValueError):
        track.gop(1)
    with pytest.raises(PlanUnsupported):
        Track([], TB)


# -- accurate plans -----------------------------------------------------------------

# 30 fps, GOPs of 10 frames without B-frames: I P P P ...
IPPP = stream(cfr(40, F), keys=[0, 10, 20, 30])


def test_start_on_a_keyframe_copies_from_it() -> None:
    """A clip starting on a keyframe has no head: the copy starts at that keyframe."""
    track = Track(IPPP, TB)
    plan = plan_cut(track, 10 * F, 30 * F, "accurate")
    assert plan.head is None and plan.tail is None
    assert plan.copy == range(10, 30)
    assert plan.first_pts == 10 * F and plan.reorder_ticks == 0
    check_accurate(track, plan, 10 * F, 30 * F)


def test_start_mid_gop_reencodes_up_to_the_next_keyframe() -> None:
    """A clip starting mid-GOP re-encodes the GOP's frames from the start to
    the next keyframe (decoded from the GOP's keyframe); the copy starts there."""
    track = Track(IPPP, TB)
    plan = plan_cut(track, 13 * F, 25 * F, "accurate")
    assert plan.head is not None and plan.head.key == 10
    assert plan.head.frame_pts == tuple(i * F for i in range(13, 20))
    assert plan.copy == range(20, 25) and plan.tail is None
    check_accurate(track, plan, 13 * F, 25 * F)


def test_clip_inside_one_gop_is_only_a_head() -> None:
    """A clip that starts and ends inside one GOP is re-encoded whole, nothing copied."""
    for samples in (IPPP, stream(cfr(40, F), keys=[0, 10, 20, 30], bframes=3, pyramid=True)):
        track = Track(samples, TB)
        plan = plan_cut(track, 12 * F, 17 * F, "accurate")
        assert plan.head is not None and plan.head.key == 10
        assert plan.head.frame_pts == tuple(i * F for i in range(12, 17))
        assert not plan.copy and plan.tail is None
        check_accurate(track, plan, 12 * F, 17 * F)


def test_end_on_a_keyframe_copies_the_whole_gop() -> None:
    """A clip ending on a keyframe copies the last GOP whole, with no tail."""
    for samples in (IPPP, stream(cfr(40, F), keys=[0, 10, 20, 30], bframes=2)):
        track = Track(samples, TB)
        plan = plan_cut(track, 5 * F, 20 * F, "accurate")
        assert plan.tail is None
        assert plan.copy == range(10, 20)
        check_accurate(track, plan, 5 * F, 20 * F)


# Two closed GOPs with B-frames: I0 P3 B1 B2 P6 B4 B5 | I7 P10 B8 B9 P13 B11 B12, next key at 14.
TWO_GOPS = stream(cfr(14, F), keys=[0, 7], bframes=2)


def test_end_mid_gop_with_b_frames_reencodes_the_missing_frames() -> None:
    """Ending mid-GOP with B-frames, the copy is the longest hole-free prefix
    showing nothing at or after the end, and the tail re-encodes exactly the
    frames from where the copy stops showing to the end."""
    track = Track(TWO_GOPS, TB, following_key_pts=14 * F)
    # End at 13: of the second GOP, I7 P10 B8 B9 shows 7..10; 11 and 12 are re-encoded.
    plan = plan_cut(track, 0, 13 * F, "accurate")
    assert plan.head is None and plan.copy == range(0, 11)
    assert plan.tail is not None and plan.tail.key == 7
    assert plan.tail.frame_pts == (11 * F, 12 * F)
    check_accurate(track, plan, 0, 13 * F)
    # End at 3, in the first GOP: only I0 can be copied, 1 and 2 are re-encoded.
    plan = plan_cut(track, 0, 3 * F, "accurate")
    assert plan.copy == range(0, 1) and plan.tail is not None
    assert plan.tail.key == 0 and plan.tail.frame_pts == (F, 2 * F)
    check_accurate(track, plan, 0, 3 * F)
    # End at 4: I0 P3 B1 B2 shows exactly 0..3, nothing to re-encode.
    plan = plan_cut(track, 0, 4 * F, "accurate")
    assert plan.copy == range(0, 4) and plan.tail is None
    check_accurate(track, plan, 0, 4 * F)
    # End at the following keyframe (known from the index): the whole GOP.
    plan = plan_cut(track, 0, 14 * F, "accurate")
    assert plan.copy == range(0, 14) and plan.tail is None
    check_accurate(track, plan, 0, 14 * F)


def test_head_copy_and_tail_together() -> None:
    """A clip from mid-GOP to mid-GOP with B-frames: head, copy and tail, each
    frame of the range exactly once."""
    track = Track(TWO_GOPS, TB, following_key_pts=14 * F)
    plan = plan_cut(track, 2 * F, 12 * F, "accurate")
    assert plan.head is not None and plan.head.key == 0
    assert plan.head.frame_pts == tuple(i * F for i in range(2, 7))
    assert plan.copy == range(7, 11)  # I7 P10 B8 B9
    assert plan.tail is not None and plan.tail.frame_pts == (11 * F,)
    assert plan.reorder_ticks == F  # x264's one frame of delay with B-frames
    check_accurate(track, plan, 2 * F, 12 * F)


def test_b_pyramid_tail() -> None:
    """With a B-pyramid (P8 B4 b2 b1 b3 ...), the copy stops where no frame is missing."""
    track = Track(stream(cfr(24, F), keys=[0, 12], bframes=3, pyramid=True), TB)
    # Second GOP in decode order: I12 P16 B14 b13 b15 P20 B18 b17 b19 P23 B21 b22 (closing).
    decode_order = [12, 16, 14, 13, 15, 20, 18, 17, 19, 23, 21, 22]
    assert [s.pts // F for s in track.samples[12:]] == decode_order
    plan = plan_cut(track, 12 * F, 19 * F, "accurate")
    assert plan.head is None and plan.copy == range(12, 17)  # shows 12..16
    assert plan.tail is not None and plan.tail.key == 12
    assert plan.tail.frame_pts == (17 * F, 18 * F)
    check_accurate(track, plan, 12 * F, 19 * F)


def test_start_tolerance_and_empty_ranges() -> None:
    """A start within EPS_S of a keyframe starts on it; a range holding no frame is refused."""
    track = Track(IPPP, TB)
    eps = round(EPS_S * TB) // 2
    for start in (10 * F - eps, 10 * F + eps):
        plan = plan_cut(track, start, 15 * F, "accurate")
        assert plan.head is None and plan.copy == range(10, 15)
        check_accurate(track, plan, start, 15 * F)
    with pytest.raises(PlanUnsupported):
        plan_cut(track, 10 * F + 100, 10 * F + 300, "accurate")  # between two frames
    with pytest.raises(PlanUnsupported):
        plan_cut(track, 5 * F, 5 * F, "accurate")


def test_vfr_timestamps() -> None:
    """Irregular frame times: every clip holds exactly the source frames of its range."""
    times = vfr(64, seed=7)
    track = Track(stream(times, keys=[0, 16, 32, 48], bframes=2), 90000)
    rng = random.Random(3)
    cuts = 0
    for _ in range(300):
        a, b = sorted(rng.sample(range(times[0], times[-1]), 2))
        if not expected(track, a, b):
            continue
        check_accurate(track, plan_cut(track, a, b, "accurate"), a, b)
        cuts += 1
    assert cuts > 200
    # Cuts on the frames' own times.
    for a, b in ((times[5], times[40]), (times[16], times[33]), (times[1], times[2])):
        check_accurate(track, plan_cut(track, a, b, "accurate"), a, b)


def test_sixty_fps_timeline_in_seconds() -> None:
    """At 60 fps (90 kHz ticks, GOPs of one second, B-pyramid) a clip given in
    seconds re-encodes from its start to the next second, copies, then re-encodes
    the frames the copy cannot end on."""
    track = Track(stream(cfr(180, 1500), keys=[0, 60, 120], bframes=3, pyramid=True), 90000)
    start, end = track.ticks(0.5), track.ticks(1.75)
    plan = plan_cut(track, start, end, "accurate")
    assert plan.head is not None and plan.head.frame_pts == tuple(range(45000, 90000, 1500))
    assert track.samples[plan.copy[0]].pts == 90000
    check_accurate(track, plan, start, end)
    assert plan.frame_count == 75
    # A 59.94 fps-like timeline (1001/60000 s frames): seconds fall between frames.
    track = Track(stream(cfr(180, 1001), keys=[0, 60, 120], bframes=3, pyramid=True), 60000)
    start, end = track.ticks(0.5), track.ticks(2.5)
    check_accurate(track, plan_cut(track, start, end, "accurate"), start, end)


def test_open_gop_is_refused() -> None:
    """Samples after a keyframe in decode order that are shown before it (an open GOP)
    make the plan refuse: their references lie outside any copy or re-encode."""
    track = Track(stream(cfr(30, F), keys=[0, 9, 18], bframes=2, open_gop=True), TB)
    assert track.leading(track.gop(7)) == [8, 9]  # B7 B8 after I9
    for mode in ("accurate", "fast"):
        with pytest.raises(PlanUnsupported, match="open GOP"):
            plan_cut(track, 10 * F, 15 * F, mode)  # starts in an open GOP
        with pytest.raises(PlanUnsupported, match="open GOP"):
            plan_cut(track, 2 * F, 12 * F, mode)  # ends in one
    # Ending on (or just before) the open GOP's keyframe: its leading pictures
    # B7 B8 are in the range but belong to no plan's part.
    for start, end in ((0, 9 * F), (2 * F, 9 * F), (2 * F, 8 * F)):
        with pytest.raises(PlanUnsupported, match="open GOP"):
            plan_cut(track, start, end, "accurate")


def test_no_keyframe_before_the_start_is_refused() -> None:
    """Samples that start after a keyframe cannot be decoded from the clip's start."""
    track = Track(TWO_GOPS[1:], TB)  # P3 B1 B2 P6 B4 B5 I7 ...
    for mode in ("accurate", "fast"):
        with pytest.raises(PlanUnsupported, match="no keyframe"):
            plan_cut(track, 2 * F, 9 * F, mode)
    check_accurate(track, plan_cut(track, 7 * F, 9 * F, "accurate"), 7 * F, 9 * F)


@pytest.mark.parametrize("bframes", [0, 2])
def test_samples_ending_before_the_clip_are_refused(bframes: int) -> None:
    """A window whose samples stop before the clip's end is refused, with or without B-frames."""
    samples = stream(cfr(14, F), keys=[0, 7], bframes=bframes)
    with pytest.raises(PlanUnsupported, match="end before"):
        plan_cut(Track(samples, TB), 2 * F, 20 * F, "accurate")
    with pytest.raises(PlanUnsupported, match="end before"):
        plan_cut(Track(samples, TB, following_key_pts=14 * F), 2 * F, 20 * F, "accurate")
    with pytest.raises(PlanUnsupported, match="end before"):
        plan_cut(Track(samples[:7], TB), 2 * F, 9 * F, "accurate")  # only a head
    # Up to the last frame's end is fine.
    plan = plan_cut(Track(samples, TB), 2 * F, 14 * F, "accurate")
    assert plan.frame_count == 12


# -- property: every accurate plan holds exactly its range's frames ---------------------

TRACKS = {
    "pyramid": Track(
        stream(cfr(60, F), keys=[0, 12, 24, 36, 48], bframes=3, pyramid=True),
        TB,
        following_key_pts=60 * F,
    ),
    "b2-vfr": Track(stream(vfr(60, 11), keys=[0, 10, 30, 45], bframes=2), 90000),
    "60fps": Track(stream(cfr(90, 1500), keys=[0, 30, 60], bframes=3, pyramid=True), 90000),
}


@st.composite
def clips(draw: st.DrawFn) -> tuple[str, int, int]:
    name = draw(st.sampled_from(sorted(TRACKS)))
    track = TRACKS[name]
    times = sorted(s.pts for s in track.samples)
    eps = track.eps
    # Mostly frame times (give or take the tolerance), sometimes anywhere.
    instant = st.one_of(
        st.builds(
            lambda t, d: t + d,
            st.sampled_from(times),
            st.sampled_from([0, 0, -eps, eps, -eps // 2, eps // 2, -eps - 1, eps + 1]),
        ),
        st.integers(times[0], times[-1]),
    )
    # (Not before the first keyframe: that is refused, see above.)
    a, b = max(draw(instant), times[0]), max(draw(instant), times[0])
    return name, min(a, b), max(a, b)


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(clips())
def test_accurate_plans_hold_exactly_the_range(clip: tuple[str, int, int]) -> None:
    """For any start/end on B-frame tracks, head + copy + tail show each source frame
    with start ≤ pts < end exactly once (or the plan is refused: no frame in the range)."""
    name, start, end = clip
    track = TRACKS[name]
    if not expected(track, start, end):
        with pytest.raises(PlanUnsupported):
            plan_cut(track, start, end, "accurate")
        return
    check_accurate(track, plan_cut(track, start, end, "accurate"), start, end)


# -- fast plans ---------------------------------------------------------------------


def hole_free_ends(track: Track, key: int) -> list[tuple[int, int]]:
    """(stop, shown until) of each hole-free decode-order prefix of the GOP at ``key``."""
    gop = track.gop(key)
    pts = [track.samples[i].pts for i in range(gop.first, gop.stop)]
    ordered = sorted(pts)
    after = gop.next_key_pts
    if after is None:
        last = max(track.samples[gop.first : gop.stop], key=lambda s: s.pts)
        after = last.pts + last.duration
    out = []
    for n in range(1, len(pts) + 1):
        if sorted(pts[:n]) == ordered[:n]:
            out.append((gop.first + n, ordered[n] if n < len(ordered) else after))
    return out


def test_fast_copies_from_the_keyframe_before_the_start() -> None:
    """Fast plans re-encode nothing: the copy starts at the keyframe at or before the start."""
    track = Track(IPPP, TB)
    plan = plan_cut(track, 13 * F, 25 * F, "fast")
    assert plan.head is None and plan.tail is None and plan.reencoded_frames == 0
    assert plan.copy == range(10, 25)
    assert (plan.first_pts, plan.end_pts) == (10 * F, 25 * F)
    plan = plan_cut(track, 13 * F, 40 * F, "fast")
    assert plan.copy == range(10, 40) and plan.end_pts == 40 * F


def test_fast_ends_at_the_nearest_hole_free_prefix() -> None:
    """With B-frames a fast copy ends where the hole-free prefix nearest the end stops showing."""
    track = Track(TWO_GOPS, TB, following_key_pts=14 * F)
    # Second GOP I7 P10 B8 B9 P13 B11 B12: prefixes show until 8, 11 or 14.
    # Half way between two ends (9.5), the longer copy wins.
    cases = [
        (12 * F, 11, 11 * F),
        (13 * F, 14, 14 * F),
        (9 * F, 8, 8 * F),
        (9 * F + F // 2, 11, 11 * F),
    ]
    for end, stop, shown_until in cases:
        plan = plan_cut(track, 3 * F, end, "fast")
        assert plan.copy == range(0, stop) and plan.end_pts == shown_until, end
        assert plan.head is None and plan.tail is None
    # Ending on the next keyframe: the whole GOP.
    plan = plan_cut(track, 8 * F, 14 * F, "fast")
    assert plan.copy == range(7, 14) and plan.first_pts == 7 * F and plan.end_pts == 14 * F


def test_fast_clip_shorter_than_a_frame_copies_the_keyframe() -> None:
    """A fast clip that ends before any frame after its keyframe still copies that keyframe."""
    track = Track(IPPP, TB)
    eps = track.eps
    plan = plan_cut(track, 10 * F - eps // 2, 10 * F + eps // 2, "fast")
    assert plan.copy == range(10, 11) and plan.end_pts == 11 * F


@pytest.mark.parametrize("name", sorted(TRACKS))
def test_fast_plans_end_nearest(name: str) -> None:
    """Any fast plan (500 random clips a track) copies a decode-order run from the
    keyframe at or before the start to the hole-free prefix of the last GOP that
    ends nearest the clip's end."""
    track = TRACKS[name]
    rng = random.Random(name)
    times = sorted(s.pts for s in track.samples)
    eps = track.eps
    for _ in range(500):
        a, b = (
            rng.choice(times) + rng.choice((0, -eps, eps, rng.randrange(-999, 999))) for _ in "ab"
        )
        start, end = min(a, b), max(a, b)
        if end - start <= eps or start < 0:
            continue
        plan = plan_cut(track, start, end, "fast")
        key = track.key_at_or_before(start)
        assert plan.copy.start == key and plan.first_pts == track.samples[key].pts
        assert plan.head is None and plan.tail is None
        last_key = max(k for k in track.keys if k < plan.copy.stop)
        ends = hole_free_ends(track, last_key)
        assert (plan.copy.stop, plan.end_pts) in ends
        if track.samples[last_key].pts < end - eps:
            assert abs(plan.end_pts - end) == min(abs(e - end) for _, e in ends)


def test_a_window_ending_before_open_gop_leading_pictures_is_refused() -> None:
    """A window stops before the next keyframe: an open GOP's leading pictures
    (shown before that keyframe, decoded after it) are not in it. The gap they
    leave before the next keyframe is seen, and the plan refused rather than
    cut short."""
    full = stream(cfr(40, 10), [0, 20], bframes=3, open_gop=True)
    key = next(i for i, s in enumerate(full) if s.key and s.pts == 200)
    window = full[:key]  # up to the open keyframe, not included
    track = Track(window, 1000, following_key_pts=200)
    with pytest.raises(PlanUnsupported, match="open GOP"):
        plan_cut(track, 50, 195, "accurate")
    # The same window of a closed-GOP stream (no gap) is cut.
    closed = stream(cfr(40, 10), [0, 20], bframes=3)
    ckey = next(i for i, s in enumerate(closed) if s.key and s.pts == 200)
    plan = plan_cut(Track(closed[:ckey], 1000, following_key_pts=200), 50, 195, "accurate")
    assert plan.frame_count == 15
