"""Pure parts of the cut engine: FFmpeg argument lists, avcC handling, GOP maths."""

from __future__ import annotations

from fractions import Fraction

import av
import pytest

from clipservice.media import plan
from clipservice.media.keyframes import ProbeError, _gop_from_packets
from clipservice.media.smartcut import (
    EncoderSpec,
    SmartCutUnsupported,
    annexb_config,
    build_avcc,
    free_ids,
    merge_avcc,
    parse_avcc,
    pps_id,
    sps_id,
    to_length_prefixed,
)

SRC = plan.Inputs("https://cdn.test/v.mp4", "https://cdn.test/a.m4a")
# avcC of an x264 High@3.0 stream (SPS id 0, PPS id 0) and of one made with sps-id=3.
SOURCE_AVCC = bytes.fromhex(
    "0164001effe1001a6764001eacd940a02ff970110000030001000003003c0f162d9601000468ef8fcbfdf8f800"
)
HEAD_AVCC = bytes.fromhex(
    "0164001effe100196764001e22cb405017fcb80880000003008000001e078b175001000568212f0fcbfdf8f800"
)


def test_avcc_round_trip_and_ids() -> None:
    """avcC records parse and rebuild byte for byte; parameter-set ids are read."""
    cfg = parse_avcc(SOURCE_AVCC)
    assert build_avcc(cfg) == SOURCE_AVCC
    assert (cfg.profile_idc, cfg.level_idc, cfg.length_size) == (100, 30, 4)
    assert [sps_id(s) for s in cfg.sps] == [0] and [pps_id(p) for p in cfg.pps] == [0]
    head = parse_avcc(HEAD_AVCC)
    assert [sps_id(s) for s in head.sps] == [3] and [pps_id(p) for p in head.pps] == [3]


def test_merge_lists_both_parameter_sets() -> None:
    """The merged avcC holds the source's and the re-encoded sets, source first."""
    merged = parse_avcc(merge_avcc(parse_avcc(SOURCE_AVCC), parse_avcc(HEAD_AVCC)))
    assert [sps_id(s) for s in merged.sps] == [0, 3]
    assert [pps_id(p) for p in merged.pps] == [0, 3]
    assert merged.profile_idc == 100 and merged.level_idc == 30


def test_merge_refuses_colliding_ids() -> None:
    """Two different parameter sets with one id cannot share an avcC."""
    other = parse_avcc(SOURCE_AVCC)
    changed = other.__class__(**{**other.__dict__, "sps": (other.sps[0][:-1] + b"\x01",)})
    with pytest.raises(SmartCutUnsupported):
        merge_avcc(other, changed)


def test_free_ids_avoid_the_sources() -> None:
    """Re-encoded parts get parameter-set ids the source does not use."""
    assert free_ids(parse_avcc(SOURCE_AVCC), 2) == [1, 2]
    assert 3 not in free_ids(parse_avcc(HEAD_AVCC), 2)


def test_fast_args_seek_both_inputs_to_the_keyframe() -> None:
    """Fast mode seeks video just past the keyframe and audio to it, each with its own -t."""
    args = plan.fast_args(SRC, 2.0, 7.2, 7.2, "/o.mp4", audio_codec="aac")
    iv, ia = args.index(SRC.video_url), args.index(SRC.audio_url)
    assert args[iv - 5 : iv] == ["-ss", "2.0005", "-t", "7.1995", "-i"]
    assert args[ia - 5 : ia] == ["-ss", "2", "-t", "7.2", "-i"]
    assert args[args.index("-c:v") + 1] == "copy" and args[args.index("-c:a") + 1] == "copy"
    assert "+faststart" in args


def test_audio_args_cut_exactly_the_clip_span() -> None:
    """A non-AAC source's audio is cut to the clip's span as AAC (from the muxed file if need be)."""
    args = plan.audio_args(SRC, 3.5, 5.7, "/a.mp4")
    assert args[args.index("-i") + 1] == SRC.audio_url and args.count("-i") == 1
    assert args[args.index("-ss") + 1] == "3.5" and args[args.index("-t") + 1] == "5.7"
    assert args[args.index("-c:a") + 1] == "aac" and "libx264" not in args
    muxed = plan.audio_args(plan.Inputs("https://cdn.test/m.mp4", None), 4, 6, "/a")
    assert muxed[muxed.index("-i") + 1] == "https://cdn.test/m.mp4" and "0:a:0" in muxed


def test_annexb_parameter_sets_and_samples() -> None:
    """An encoder's Annex B header becomes an avcC; its access units become
    length-prefixed samples without in-band parameter sets."""
    head = parse_avcc(HEAD_AVCC)
    annexb = b"\x00\x00\x00\x01" + head.sps[0] + b"\x00\x00\x01" + head.pps[0]
    cfg = annexb_config(annexb, 4)
    assert (cfg.sps, cfg.pps, cfg.profile_idc, cfg.length_size) == (head.sps, head.pps, 100, 4)
    merged = parse_avcc(merge_avcc(parse_avcc(SOURCE_AVCC), cfg))
    assert [sps_id(s) for s in merged.sps] == [0, 3]
    slice_nal = bytes([0x65, 0x88, 0x84, 0x00, 0x00, 0x03, 0x01, 0x20])
    sei = bytes([0x06, 0x05, 0x01, 0x80])
    au = b"\x00\x00\x00\x01\x09\xf0" + b"\x00\x00\x01" + head.sps[0] + b"\x00\x00\x01" + sei
    au += b"\x00\x00\x00\x01" + slice_nal
    sample = to_length_prefixed(au, 4)
    assert sample == b"\x00\x00\x00\x04" + sei + b"\x00\x00\x00\x08" + slice_nal


TB = Fraction(1, 15360)
# A closed GOP with B-frames, decode order: I0 P3 B1 B2 P6 B4 B5, then the next I at 7.
F = 512
BGOP = [(0, -F, True), (3 * F, 0, False), (F, F, False), (2 * F, 2 * F, False)]
BGOP += [(6 * F, 3 * F, False), (4 * F, 4 * F, False), (5 * F, 5 * F, False), (7 * F, 6 * F, True)]


def test_gop_from_packets_with_b_frames() -> None:
    """A probed GOP knows its frames, the next keyframe and that frames are reordered."""
    gop = _gop_from_packets(BGOP, TB, 0)
    assert gop.frame_pts == tuple(i * F for i in range(7))
    assert gop.next_key_pts == 7 * F and gop.reorder and not gop.open_gop
    assert gop.covers(6 * F / 15360) and not gop.covers(7 * F / 15360)


def test_open_gop_is_detected() -> None:
    """Frames after the next keyframe that show before it mark an open GOP."""
    packets = [*BGOP, (5 * F + F // 2, 7 * F, False)]
    assert _gop_from_packets(packets, TB, 0).open_gop
    with pytest.raises(ProbeError):
        _gop_from_packets([(F, 0, True), (0, F, False), (2 * F, 2 * F, True)], TB, 0)


def test_copy_cut_never_leaves_holes() -> None:
    """A copy ends at the hole-free decode-order prefix nearest the wanted end."""
    gop = _gop_from_packets(BGOP, TB, 0)
    # End at frame 4: prefix I0 P3 B1 B2 shows 0..3 exactly.
    assert gop.copy_cut(4 * F) == (3 * F, 4 * F)
    # End at frame 2: no prefix shows exactly 0..1; I0 alone (ends at 1) or
    # I0 P3 B1 B2 (ends at 4): the nearer one wins.
    assert gop.copy_cut(2 * F) == (0, F)
    # End at the next keyframe: the whole GOP (stop past the last packet's dts).
    stop, shown_until = gop.copy_cut(7 * F)
    assert 5 * F < stop <= 6 * F and shown_until == 7 * F


def test_copy_prefix_never_overshoots_the_end() -> None:
    """With B-frames the tail copy keeps the longest hole-free prefix showing
    nothing at or after the end; the rest up to the end is re-encoded."""
    gop = _gop_from_packets(BGOP, TB, 0)
    # End at frame 4 (exclusive): I0 P3 B1 B2 shows exactly 0..3.
    assert gop.copy_prefix(4 * F) == (3 * F, 4 * F)
    # End at frame 3: P3 would show at the end, so only I0 (0..0) is copied.
    assert gop.copy_prefix(3 * F) == (0, F)
    # End at frame 6: I0 P3 B1 B2 (0..3); P6 would show at 6, B4 B5 are re-encoded.
    assert gop.copy_prefix(6 * F) == (3 * F, 4 * F)
    # End at frame 1: only the keyframe itself.
    assert gop.copy_prefix(F) == (0, F)
    # End before the keyframe shows: nothing (stop at the keyframe's decode time).
    assert gop.copy_prefix(0) == (-F, 0)


def test_encoder_matches_the_source_and_its_frames_join_the_stream() -> None:
    """The in-process encoder takes the source's size, colour description and a
    parameter-set id of its own; its frames, as MP4 samples with the merged avcC,
    decode with the colour the source declares."""
    spec = EncoderSpec(
        profile="high", level="3.1", pix_fmt="yuv420p", width=320, height=180,
        time_base=Fraction(1, 15360), frame_rate=Fraction(30),
        color=(("color_primaries", 1), ("color_trc", 1), ("colorspace", 1), ("color_range", 2)),
    )  # fmt: skip
    enc = spec.open(3)
    frames = []
    for i in range(3):
        frame = av.VideoFrame(320, 180, "yuv420p")
        frame.pts = i * 512
        frames.append(frame)
    packets = [p for f in [*frames, None] for p in enc.encode(f)]
    part = annexb_config(bytes(enc.extradata), 4)
    assert [sps_id(s) for s in part.sps] == [3] and [pps_id(p) for p in part.pps] == [3]
    assert (part.profile_idc, part.sps[0][3]) == (100, 31)  # High, level 3.1, as asked
    dec = av.CodecContext.create("h264", "r")
    dec.extradata = merge_avcc(parse_avcc(SOURCE_AVCC), part)
    decoded = [f for p in packets for f in dec.decode(av.Packet(to_length_prefixed(bytes(p), 4)))]
    decoded += dec.decode(None)
    assert len(decoded) == 3 and (decoded[0].width, decoded[0].height) == (320, 180)
    first = decoded[0]
    assert (first.color_primaries, first.color_trc, first.colorspace, first.color_range) == (
        1, 1, 1, 2,
    )  # fmt: skip


@pytest.mark.parametrize(("profile", "idc"), [("baseline", 66), ("main", 77), ("high", 100)])
def test_encoder_writes_the_source_profile(profile: str, idc: int) -> None:
    """x264's fastest preset alone would always say Baseline; the parts say the source's profile."""
    spec = EncoderSpec(profile, "4.0", "yuv420p", 64, 64, Fraction(1, 90000), Fraction(30))
    assert annexb_config(bytes(spec.open(1).extradata), 4).profile_idc == idc
