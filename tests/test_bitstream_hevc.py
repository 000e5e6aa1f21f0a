"""HEVC parameter-set id rewriting, hvcC merging and a real hvc1 join (x265 via PyAV)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import subprocess
import sys
from array import array
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from av.codec.context import Flags

from clipservice.media.bitstream import hevc
from clipservice.media.bitstream.hevc import HevcUnsupported, ParamIds
from clipservice.media.ffmpeg import bundled_ffmpeg

WIDTH, HEIGHT, FPS = 320, 180, 25
GOP = 25  # source frames per GOP (closed, 2 GOPs)
HEAD_FRAMES = 8
SOURCE_LEVEL = 93  # level 3.1: not what x265 would pick for 320x180 (2), so it must be asked
PIX_FMTS = {8: "yuv420p", 10: "yuv420p10le"}


def _ffmpeg(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bundled_ffmpeg(), "-hide_banner", "-nostdin", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _encode_source(out: Path, depth: int, x265_params: str, frames: int = 2 * GOP) -> Path:
    """testsrc2 through the ffmpeg CLI's libx265, muxed as hvc1."""
    run = _ffmpeg(
        "-y", "-v", "error",
        "-f", "lavfi", "-i", f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}",
        "-frames:v", str(frames), "-pix_fmt", PIX_FMTS[depth],
        "-c:v", "libx265", "-preset", "ultrafast", "-crf", "28",
        "-x265-params", f"log-level=error:{x265_params}",
        "-tag:v", "hvc1", "-an", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return out


def _luma_value(x: int, y: int, i: int, depth: int, turn: bool) -> int:
    ramp = 2 * x + y if turn else x + 2 * y
    return (16 + (ramp + 12 * i) % 200) << (depth - 8)


def _head_frame(i: int, depth: int, *, turn: bool = False) -> Any:
    """A diagonal gradient that moves with ``i``, flat chroma: nothing like testsrc2
    (``turn``: another diagonal, a scene change)."""
    frame = av.VideoFrame(WIDTH, HEIGHT, PIX_FMTS[depth])
    for index, plane in enumerate(frame.planes):
        w, h = plane.width, plane.height
        rows = []
        for y in range(h):
            if index == 0:
                values = [_luma_value(x, y, i, depth, turn) for x in range(w)]
            else:
                values = [128 << (depth - 8)] * w
            rows.append(_sample_bytes(values, depth).ljust(plane.line_size, b"\0"))
        plane.update(b"".join(rows))
    frame.pts = i
    return frame


def _sample_bytes(values: list[int], depth: int) -> bytes:
    if depth == 8:
        return bytes(values)
    words = array("H", values)
    if sys.byteorder == "big":
        words.byteswap()  # 10-bit planes are little-endian
    return words.tobytes()


def _luma(frame: Any) -> bytes:
    """The luma plane's samples, row padding removed."""
    plane = frame.planes[0]
    size = 2 if frame.format.name.endswith("10le") else 1
    data = bytes(plane)
    return b"".join(
        data[y * plane.line_size : y * plane.line_size + plane.width * size]
        for y in range(plane.height)
    )


def _luma_values(frame: Any) -> list[int]:
    data = _luma(frame)
    if not frame.format.name.endswith("10le"):
        return list(data)
    words = array("H")
    words.frombytes(data)
    if sys.byteorder == "big":
        words.byteswap()
    return list(words)


def _encode_x265(
    frames: list[Any], depth: int, options: dict[str, str]
) -> tuple[list[bytes], list[bytes]]:
    """Encode with PyAV's libx265, global header: (parameter sets, Annex B packets)."""
    enc = av.CodecContext.create("libx265", "w")
    enc.width, enc.height, enc.pix_fmt = WIDTH, HEIGHT, PIX_FMTS[depth]
    enc.time_base = Fraction(1, FPS)
    enc.framerate = Fraction(FPS)
    enc.flags |= Flags.global_header
    enc.options = {"preset": "ultrafast", "crf": "16", **options}
    enc.open()
    packets = [bytes(p) for frame in frames for p in enc.encode(frame)]
    packets += [bytes(p) for p in enc.encode(None)]
    return hevc.split_annexb(bytes(enc.extradata)), packets


def _decode_annexb(
    parameter_sets: list[bytes] | tuple[bytes, ...], units: list[bytes]
) -> list[Any]:
    """Decode an Annex B stream: parameter sets, then one access unit per entry."""
    dec = av.CodecContext.create("hevc", "r")
    frames: list[Any] = []
    prefix = b"".join(b"\0\0\0\1" + nal for nal in parameter_sets)
    for index, unit in enumerate(units):
        frames += dec.decode(av.Packet((prefix if index == 0 else b"") + unit))
    frames += dec.decode(None)
    return frames


def _as_annexb(nals: list[bytes]) -> bytes:
    return b"".join(b"\0\0\0\1" + nal for nal in nals)


def _source_config(path: Path) -> hevc.HvcConfig:
    with av.open(str(path)) as container:
        return hevc.parse_hvcc(bytes(container.streams.video[0].codec_context.extradata))


def _decoded(path: Path) -> list[Any]:
    with av.open(str(path)) as container:
        return list(container.decode(video=0))


@pytest.fixture(scope="module", params=[8, 10], ids=["8bit", "10bit"])
def depth(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, depth: int) -> Path:
    """Two closed GOPs with B-frames, parameter-set ids 0, level 3.1."""
    out = tmp_path_factory.mktemp("hevc") / f"source{depth}.mp4"
    params = f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes=3:open-gop=0:level-idc=3.1"
    return _encode_source(out, depth, params)


@dataclasses.dataclass
class Head:
    frames: list[Any]  # what was encoded
    parameter_sets: list[bytes]  # as x265 wrote them
    packets: list[bytes]  # Annex B, as x265 wrote them
    rewriter: hevc.IdRewriter


@pytest.fixture(scope="module")
def head(source: Path, depth: int) -> Head:
    """The re-encoded part: X265_PARAMS at the source's profile and level, ids rewritten."""
    cfg = _source_config(source)
    frames = [_head_frame(i, depth) for i in range(HEAD_FRAMES)]
    sets, packets = _encode_x265(frames, depth, hevc.x265_profile_options(cfg))
    return Head(frames, sets, packets, hevc.rewrite_ids(sets, hevc.free_ids(cfg)))


def _join(
    source: Path, head: Head, out: Path, *, eos: bool = False, drop_rasl: bool = False
) -> Path:
    """Mux the head's samples, then the source's second GOP, into one hvc1 MP4."""
    with av.open(str(source)) as src:
        vin = src.streams.video[0]
        cfg = hevc.parse_hvcc(bytes(vin.codec_context.extradata))
        merged = hevc.merge_hvcc(cfg, head.rewriter.hvcc(cfg.length_size))
        packets = [p for p in src.demux(vin) if p.size]
        tb = vin.time_base
        frame_ticks = int(1 / (FPS * tb))
        keys = [p for p in packets if p.is_keyframe]
        key = keys[1]
        reorder = key.pts - key.dts
        gop = [p for p in packets if p.dts >= key.dts]
        samples = [head.rewriter.sample(p, cfg.length_size) for p in head.packets]
        if eos:
            samples[-1] += hevc.join_sample([hevc.eos_nal()], cfg.length_size)
        with av.open(str(out), "w", format="mp4") as oc:
            vout = oc.add_stream_from_template(vin)
            vout.codec_context.extradata = merged
            vout.codec_context.codec_tag = "hvc1"  # the template's tag is not kept
            vout.time_base = tb
            for index, sample in enumerate(samples):
                packet = av.Packet(sample)
                packet.stream, packet.time_base = vout, tb
                packet.pts = index * frame_ticks
                packet.dts = packet.pts - reorder
                packet.is_keyframe = index == 0
                oc.mux(packet)
            shift = len(samples) * frame_ticks - key.pts
            for packet in gop:
                if drop_rasl and hevc.is_leading(bytes(packet), cfg.length_size):
                    continue
                packet.stream, packet.time_base = vout, tb
                packet.pts += shift
                packet.dts += shift
                oc.mux(packet)
    return out


# -- the join -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def joined(source: Path, head: Head, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _join(source, head, tmp_path_factory.mktemp("joined") / "out.mp4")


def test_join_decodes_cleanly(joined: Path) -> None:
    """FFmpeg decodes the joined hvc1 file with -xerror and reports nothing."""
    run = _ffmpeg("-v", "error", "-xerror", "-i", str(joined), "-f", "null", "-")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert b"hvc1" in joined.read_bytes() and b"hev1" not in joined.read_bytes()


def test_join_frames_are_the_parts_frames(
    joined: Path, source: Path, head: Head, depth: int
) -> None:
    """Every frame is there; the head's decode to what was encoded, the source's bit-exactly."""
    out = _decoded(joined)
    assert len(out) == HEAD_FRAMES + GOP
    alone = _decode_annexb(head.parameter_sets, head.packets)  # x265's own ids, no rewriting
    assert len(alone) == HEAD_FRAMES
    for index, (got, want) in enumerate(zip(out, alone, strict=False)):
        assert _luma(got) == _luma(want), f"head frame {index}"
        encoded = _luma_values(head.frames[index])
        error = sum(abs(a - b) for a, b in zip(_luma_values(got), encoded, strict=True))
        assert error / len(encoded) < 2 << (depth - 8), (
            f"head frame {index} is not what was encoded"
        )
    reference = _decoded(source)[GOP:]
    for index, (got, want) in enumerate(zip(out[HEAD_FRAMES:], reference, strict=True)):
        assert _luma(got) == _luma(want), f"source frame {GOP + index}"


def test_join_hvcc_lists_both_parts(joined: Path, source: Path, depth: int) -> None:
    """The output's hvcC lists 2 VPS/SPS/PPS with distinct ids, all at the source's level."""
    cfg = _source_config(joined)
    src = _source_config(source)
    assert (cfg.profile_idc, cfg.level_idc) == (src.profile_idc, SOURCE_LEVEL)
    assert cfg.profile_idc == {8: 1, 10: 2}[depth]
    vps = [hevc.parse_vps(n) for n in cfg.units(hevc.VPS_NUT)]
    sps = [hevc.parse_sps(n) for n in cfg.units(hevc.SPS_NUT)]
    pps = [hevc.parse_pps(n) for n in cfg.units(hevc.PPS_NUT)]
    assert sorted(v.vps_id for v in vps) == [0, 1]
    assert sorted(s.sps_id for s in sps) == [0, 1]
    assert sorted((p.pps_id, p.sps_id) for p in pps) == [(0, 0), (1, 1)]
    for s in sps:
        assert (s.ptl.profile_idc, s.ptl.tier, s.ptl.level_idc) == (
            cfg.profile_idc,
            0,
            SOURCE_LEVEL,
        )
        assert s.bit_depth_luma == s.bit_depth_chroma == depth
    # Coded sizes: x265 pads to whole minimum coding blocks, the conformance window crops.
    assert {(s.width, s.height) for s in sps} == {(WIDTH, -(-HEIGHT // 16) * 16)}
    for v in vps:
        assert (v.ptl.profile_idc, v.ptl.level_idc) == (cfg.profile_idc, SOURCE_LEVEL)
    assert all(a.complete for a in cfg.arrays if a.nal_type in (32, 33, 34))


def test_head_samples_name_the_new_pps(head: Head) -> None:
    """Every rewritten slice names the free PPS id; the originals named 0."""
    rewriter = head.rewriter
    assert rewriter.ids == ParamIds(1, 1, 1)
    pps = {1: hevc.parse_pps(rewriter.parameter_sets[2])}
    sps = {1: hevc.parse_sps(rewriter.parameter_sets[1])}
    types = []
    for packet in head.packets:
        for nal in hevc.split_sample(rewriter.sample(packet, 4), 4):
            header = hevc.parse_slice_header(nal, pps, sps)
            assert header.pps_id == 1
            types.append(header.slice_type)
    assert types == [hevc.SLICE_I] + [hevc.SLICE_P] * (HEAD_FRAMES - 1)


# -- bit-exact rewriting over x265 settings --------------------------------------------

SETTINGS = {
    "join": hevc.X265_PARAMS,
    # B-frames with a pyramid, open GOPs (CRA, RASL), several references,
    # weighted prediction, WPP entry points, two slices per picture, SAO,
    # deblocking offsets, transform skip, lossless CUs, scaling lists, temporal MVP.
    "features": (
        "bframes=3:b-pyramid=1:ref=3:keyint=6:min-keyint=6:open-gop=1:weightp=1:weightb=1"
        ":wpp=1:slices=2:sao=1:deblock=1,-1:tskip=1:cu-lossless=1:scaling-list=default"
        ":temporal-mvp=1:info=0:log-level=error"
    ),
    "long-poc": "bframes=2:keyint=-1:log2-max-poc-lsb=16:info=0:log-level=error",
}


@dataclasses.dataclass
class Encoded:
    """x265 output under one group of settings."""

    settings: str
    sets: list[bytes]
    packets: list[bytes]  # Annex B


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def encoded(request: pytest.FixtureRequest, depth: int) -> Encoded:
    # A scene change half way: I, P and B slices mix.
    frames = [_head_frame(i, depth, turn=i >= 7) for i in range(14)]
    options = {"x265-params": SETTINGS[request.param]}
    if depth == 10:
        options["profile"] = "main10"
    return Encoded(request.param, *_encode_x265(frames, depth, options))


def test_rewrite_to_same_ids_is_identity(encoded: Encoded) -> None:
    """Rewriting to the ids the stream already has gives back every byte."""
    sets, packets = encoded.sets, encoded.packets
    same = hevc.rewrite_ids(sets, ParamIds(0, 0, 0))
    assert list(same.parameter_sets) == sets
    nals = [nal for packet in packets for nal in hevc.split_annexb(packet)]
    assert [same.rewrite(nal) for nal in nals] == nals


def test_rewrite_round_trip_and_decode(encoded: Encoded) -> None:
    """With far ids the stream decodes the same; rewritten back it is x265's, byte for byte."""
    sets, packets = encoded.sets, encoded.packets
    far = hevc.rewrite_ids(sets, ParamIds(9, 14, 61))
    back = hevc.rewrite_ids(far.parameter_sets, ParamIds(0, 0, 0))
    assert list(back.parameter_sets) == sets
    units = [hevc.split_annexb(packet) for packet in packets]
    moved = [[far.rewrite(nal) for nal in unit] for unit in units]
    assert moved != units
    assert [[back.rewrite(nal) for nal in unit] for unit in moved] == units
    want = _decode_annexb(sets, [_as_annexb(unit) for unit in units])
    got = _decode_annexb(far.parameter_sets, [_as_annexb(unit) for unit in moved])
    assert len(got) == len(want) == 14
    assert [_luma(f) for f in got] == [_luma(f) for f in want]


def test_settings_exercise_the_syntax(encoded: Encoded) -> None:
    """The parsed headers show what each group of settings is meant to cover."""
    sets, packets = encoded.sets, encoded.packets
    rewriter = hevc.rewrite_ids(sets, ParamIds(0, 0, 0))
    pps, sps = rewriter.pps, rewriter.sps
    headers = [
        hevc.parse_slice_header(nal, {pps.pps_id: pps}, {sps.sps_id: sps})
        for packet in packets
        for nal in hevc.split_annexb(packet)
        if hevc.nal_type(nal) < 32
    ]
    kinds = {h.slice_type for h in headers}
    if encoded.settings == "features":
        assert kinds == {hevc.SLICE_I, hevc.SLICE_P, hevc.SLICE_B}
        assert pps.weighted_pred and pps.weighted_bipred and sps.sample_adaptive_offset
        assert pps.entropy_coding_sync and sps.temporal_mvp and pps.num_ref_idx_default == (0, 0)
        assert any(not h.first_slice_segment_in_pic for h in headers)
        assert any(h.nal_type == hevc.CRA_NUT for h in headers)
        assert any(hevc.RASL_N <= h.nal_type <= hevc.RASL_R for h in headers)
    elif encoded.settings == "long-poc":
        assert sps.log2_max_poc_lsb == 16 and hevc.SLICE_B in kinds
    else:
        assert [h.slice_type for h in headers] == [hevc.SLICE_I] + [hevc.SLICE_P] * 13
        assert not (pps.tiles or pps.entropy_coding_sync)  # no entry points with X265_PARAMS


# -- emulation prevention ------------------------------------------------------------


def test_escape_and_unescape() -> None:
    """0x03 goes after every 0x0000 before a byte <= 3 and after a final 0x0000, only there."""
    assert hevc.escape(b"\x00\x00\x00") == b"\x00\x00\x03\x00"
    assert hevc.escape(b"\x00\x00\x01\x00\x00\x02") == b"\x00\x00\x03\x01\x00\x00\x03\x02"
    assert hevc.escape(b"\x00\x00\x00\x00\x00") == b"\x00\x00\x03\x00\x00\x03\x00"
    assert hevc.escape(b"\x05\x00\x00") == b"\x05\x00\x00\x03"
    assert hevc.escape(b"\x00\x00\x04\x00\x01") == b"\x00\x00\x04\x00\x01"
    rng = random.Random(7)
    for _ in range(500):
        rbsp = bytes(rng.choice((0, 0, 0, 1, 2, 3, 4, 0x80)) for _ in range(rng.randrange(1, 40)))
        escaped = hevc.escape(rbsp)
        assert hevc.unescape(escaped) == rbsp
        for bad in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
            assert bad not in escaped


def _sps_rbsp(
    vps_sps_ptl: bytes,
    width: int,
    height: int,
    rps: Callable[[hevc.BitWriter], None] | None = None,
) -> bytes:
    """An SPS with this picture size (2^n - 1: ue(v) codes with long zero runs) and
    short-term RPSs (``rps`` writes their count and syntax; none if not given)."""
    w = hevc.BitWriter()
    w.copy(vps_sps_ptl, 0, len(vps_sps_ptl) * 8)  # vps id .. profile_tier_level
    w.ue(0)  # sps_seq_parameter_set_id
    w.ue(1)  # chroma_format_idc 4:2:0
    w.ue(width)
    w.ue(height)
    w.u(1, 0)  # conformance_window_flag
    for value in (0, 0, 4):  # bit depths 8, log2_max_pic_order_cnt_lsb 8
        w.ue(value)
    w.u(1, 1)  # sps_sub_layer_ordering_info_present_flag
    for value in (1, 0, 0, 0, 2, 0, 3, 1, 1):  # DPB, CTB 32, TB sizes, depths
        w.ue(value)
    w.u(4, 0)  # scaling lists, AMP, SAO, PCM: off
    if rps is None:
        w.ue(0)  # num_short_term_ref_pic_sets
    else:
        rps(w)
    w.u(4, 0)  # long-term refs, temporal MVP, strong intra smoothing, VUI: off
    w.u(1, 0)  # sps_extension_present_flag
    w.trailing_bits()
    return w.to_bytes()


def test_rewrite_inserts_emulation_prevention(head: Head) -> None:
    """An id shifting zero runs onto byte boundaries gets 0x03 inserted; back, it is undone."""
    vps_nal, sps_nal, pps_nal = head.parameter_sets
    ptl_bytes = 1 + 12  # vps id, max sub layers, nesting; profile_tier_level
    rbsp = _sps_rbsp(hevc.unescape(sps_nal[2:])[:ptl_bytes], 4095, 4095)
    sps = sps_nal[:2] + hevc.escape(rbsp)
    parsed = hevc.parse_sps(sps)
    assert (parsed.width, parsed.height, parsed.sps_id) == (4095, 4095, 0)
    escapes = {}
    for sps_id in range(16):
        rewritten = hevc.rewrite_ids([vps_nal, sps, pps_nal], ParamIds(0, sps_id, 0))
        new = rewritten.parameter_sets[1]
        assert hevc.parse_sps(new).sps_id == sps_id
        assert (hevc.parse_sps(new).width, hevc.parse_sps(new).height) == (4095, 4095)
        for bad in (b"\x00\x00\x00", b"\x00\x00\x01", b"\x00\x00\x02"):
            assert bad not in new[2:]
        escapes[sps_id] = len(new) - 2 - len(hevc.unescape(new[2:]))
        back = hevc.rewrite_ids(rewritten.parameter_sets, ParamIds(0, 0, 0))
        assert back.parameter_sets[1] == sps
    # Between the width's and the height's one bits run 24 zero bits: two whole
    # zero bytes, then a byte that is <= 3 only for some alignments. Ids 7-14
    # (7-bit codes, a 6-bit shift) make it so: one 0x03 more than the original
    # has; id 15 (a shift of 8 bits) has the original's alignment again.
    assert escapes[0] >= 1  # the profile_tier_level's zero bytes, never shifted
    assert [escapes[i] - escapes[0] for i in range(16)] == [0] * 7 + [1] * 8 + [0]


def test_sps_inter_rps_prediction(head: Head) -> None:
    """Inter-predicted RPSs list the pictures (and used flags) that H.265 7.4.8 derives."""
    # The reference RPS's pictures shifted by deltaRps, plus the reference
    # picture itself, each kept or dropped by use_delta_flag.

    def rps(w: hevc.BitWriter) -> None:
        w.ue(3)  # num_short_term_ref_pic_sets
        # 0: before -1 (used) and -3 (not used), after +2 (used)
        w.ue(2), w.ue(1)
        w.ue(0), w.u(1, 1), w.ue(1), w.u(1, 0), w.ue(1), w.u(1, 1)
        # 1: from 0 with deltaRps -1: j = -1, -3, +2, the reference picture itself
        w.u(1, 1), w.u(1, 1), w.ue(0)
        w.u(1, 1), w.u(2, 0b01), w.u(1, 1), w.u(2, 0b00)  # used, (unused, kept), used, dropped
        # 2: from 1 with deltaRps +2, every picture used
        w.u(1, 1), w.u(1, 0), w.ue(1)
        w.u(4, 0b1111)

    ptl = hevc.unescape(head.parameter_sets[1][2:])[:13]
    sps = hevc.parse_sps(head.parameter_sets[1][:2] + hevc.escape(_sps_rbsp(ptl, 64, 64, rps)))
    got = [(r.negative, r.positive) for r in sps.short_term_rps]
    assert got == [
        (((-1, True), (-3, False)), ((2, True),)),
        (((-2, True), (-4, False)), ((1, True),)),
        (((-2, True),), ((2, True), (3, True))),
    ]
    assert [r.used_by_curr for r in sps.short_term_rps] == [2, 2, 3]
    assert sps.temporal_mvp is False and (sps.width, sps.height) == (64, 64)


def _sei(*messages: tuple[int, bytes]) -> bytes:
    body = b"".join(bytes([kind, len(data)]) + data for kind, data in messages)
    return bytes([hevc.PREFIX_SEI_NUT << 1, 1]) + hevc.escape(body + b"\x80")


def test_sei_naming_a_parameter_set_raises(head: Head) -> None:
    """SEI messages naming a set id (buffering period...) are refused; others pass unchanged."""
    user_data = (5, bytes(16) + b"x265 settings")
    recovery = (6, b"\x80")
    plain = _sei(recovery, user_data)
    assert head.rewriter.rewrite(plain) == plain
    for kind in (0, 129):
        with pytest.raises(HevcUnsupported, match="names a set id"):
            head.rewriter.rewrite(_sei(user_data, (kind, b"\x88\x80")))
    with pytest.raises(HevcUnsupported):
        head.rewriter.rewrite(_sei((5, bytes(8)))[:-3])  # payload cut short


# -- hvcC and ids ----------------------------------------------------------------------


def test_hvcc_parse_build_round_trip(source: Path, joined: Path) -> None:
    """Parsing and building an hvcC gives back the same bytes (FFmpeg's and ours)."""
    for path in (source, joined):
        with av.open(str(path)) as container:
            data = bytes(container.streams.video[0].codec_context.extradata)
        assert hevc.build_hvcc(hevc.parse_hvcc(data)) == data


def test_merge_refuses_colliding_ids(source: Path, head: Head) -> None:
    """Different sets with one id do not merge, equal ones are listed once; free ids move on."""
    cfg = _source_config(source)
    unrewritten = hevc.hvcc_from_parameter_sets(head.parameter_sets, cfg.length_size)
    with pytest.raises(HevcUnsupported, match="use id 0"):
        hevc.merge_hvcc(cfg, unrewritten)
    assert hevc.merge_hvcc(cfg, cfg) == hevc.merge_hvcc(cfg)
    assert hevc.free_ids(cfg) == ParamIds(1, 1, 1)
    merged = hevc.merge_hvcc(cfg, head.rewriter.hvcc(cfg.length_size))
    assert hevc.free_ids(merged) == ParamIds(2, 2, 2)
    other_depth = dataclasses.replace(unrewritten, bit_depth_luma=12)
    with pytest.raises(HevcUnsupported, match="bit_depth_luma"):
        hevc.merge_hvcc(cfg, other_depth)


def test_x265_profile_options(source: Path, depth: int) -> None:
    """The options ask for the source's profile, level and tier; other profiles raise."""
    cfg = _source_config(source)
    options = hevc.x265_profile_options(cfg)
    assert options["profile"] == {8: "main", 10: "main10"}[depth]
    assert options["x265-params"].startswith(hevc.X265_PARAMS)
    assert options["x265-params"].endswith(":level-idc=3.1:high-tier=0")
    for bad in (
        dataclasses.replace(cfg, profile_idc=4),  # range extensions
        dataclasses.replace(cfg, chroma_format=2),
        dataclasses.replace(cfg, profile_idc=2, bit_depth_luma=8, bit_depth_chroma=8),
        dataclasses.replace(cfg, level_idc=94),
    ):
        with pytest.raises(HevcUnsupported):
            hevc.x265_profile_options(bad)


# -- leading pictures and end of sequence --------------------------------------------


@pytest.fixture(scope="module")
def open_gop(tmp_path_factory: pytest.TempPathFactory, depth: int) -> Path:
    """An open-GOP source: CRA keyframes with RASL pictures before them."""
    out = tmp_path_factory.mktemp("open") / "open.mp4"
    # Mini-GOPs of 5 frames: the 4 B-frames before the CRA at frame 25 are its RASL.
    params = f"keyint={GOP}:min-keyint={GOP}:scenecut=0:bframes=4:open-gop=1:level-idc=3.1"
    return _encode_source(out, depth, params)


def test_leading_and_irap_samples(open_gop: Path) -> None:
    """CRA keyframes are IRAP; the frames shown before them but decoded after are RASL."""
    with av.open(str(open_gop)) as src:
        vin = src.streams.video[0]
        packets = [(bytes(p), p.pts, p.is_keyframe) for p in src.demux(vin) if p.size]
    keys = [pts for data, pts, key in packets if key]
    assert [hevc.is_irap(data) for data, _, _ in packets] == [key for _, _, key in packets]
    key_types = {_vcl_type(data) for data, _, key in packets if key}
    assert key_types == {hevc.IDR_W_RADL, hevc.CRA_NUT} or key_types == {
        hevc.IDR_N_LP,
        hevc.CRA_NUT,
    }
    leading = [pts for data, pts, _ in packets if hevc.is_leading(data)]
    assert leading and all(keys[0] < pts < keys[1] for pts in leading)
    assert all(
        hevc.RASL_N <= _vcl_type(data) <= hevc.RASL_R
        for data, _, _ in packets
        if hevc.is_leading(data)
    )


def _vcl_type(sample: bytes) -> int:
    return next(t for t in hevc.nal_types(sample) if t < hevc.VPS_NUT)


def _rasl_count(path: Path) -> int:
    with av.open(str(path)) as src:
        vin = src.streams.video[0]
        packets = [p for p in src.demux(vin) if p.size]
    second_key = [p for p in packets if p.is_keyframe][1]
    return sum(1 for p in packets if p.dts >= second_key.dts and hevc.is_leading(bytes(p)))


def test_eos_before_cra_drops_its_rasl(open_gop: Path, head: Head, tmp_path: Path) -> None:
    """An EOS NAL before an open-GOP CRA makes the decoder skip its RASL frames: a clean join."""
    # Without it, the decoder tries them and misses their references (frames
    # before the cut).
    assert _rasl_count(open_gop) > 0  # the copied GOP holds RASL samples
    runs = {}
    for eos in (False, True):
        out = _join(open_gop, head, tmp_path / f"eos-{eos}.mp4", eos=eos)
        runs[eos] = _ffmpeg("-v", "error", "-xerror", "-i", str(out), "-f", "null", "-")
        if eos:
            assert len(_decoded(out)) == HEAD_FRAMES + GOP
    assert runs[True].returncode == 0 and runs[True].stderr == "", runs[True].stderr
    assert "Could not find ref" in runs[False].stderr
    # Or the RASL samples are left out: clean too, with no frame missing.
    out = _join(open_gop, head, tmp_path / "no-rasl.mp4", drop_rasl=True)
    run = _ffmpeg("-v", "error", "-xerror", "-i", str(out), "-f", "null", "-")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert len(_decoded(out)) == HEAD_FRAMES + GOP


# -- hostile bytes ---------------------------------------------------------------------


def test_truncated_records_raise(joined: Path) -> None:
    """Every truncation of an hvcC record raises HevcUnsupported."""
    with av.open(str(joined)) as container:
        data = bytes(container.streams.video[0].codec_context.extradata)
    for size in range(len(data)):
        with pytest.raises(HevcUnsupported):
            hevc.parse_hvcc(data[:size])
    with pytest.raises(HevcUnsupported):
        hevc.parse_hvcc(b"\x02" + data[1:])


def test_truncated_nals_raise(encoded: Encoded) -> None:
    """Truncated parameter sets and slices raise HevcUnsupported (or parse), nothing else."""
    sets, packets = encoded.sets, encoded.packets
    rewriter = hevc.rewrite_ids(sets, ParamIds(2, 3, 4))
    parsers = {32: hevc.parse_vps, 33: hevc.parse_sps, 34: hevc.parse_pps}
    raised = 0
    for nal in sets:
        for size in range(len(nal)):
            try:
                parsers[hevc.nal_type(nal)](nal[:size])
            except HevcUnsupported:
                raised += 1
    slices = [nal for packet in packets[:4] for nal in hevc.split_annexb(packet)]
    for nal in slices:
        for size in range(min(len(nal), 64)):
            try:
                rewriter.rewrite(nal[:size])
            except HevcUnsupported:
                raised += 1
    assert raised > 40
    with pytest.raises(HevcUnsupported):
        rewriter.rewrite(slices[0][:3])
    with pytest.raises(HevcUnsupported):
        hevc.split_sample(b"\x00\x00\x00\x09abc", 4)
    with pytest.raises(HevcUnsupported):
        hevc.split_sample(b"\x00\x00", 4)


def test_random_bytes_raise_cleanly(head: Head) -> None:
    """Random payloads behind real NAL headers raise HevcUnsupported or parse: no IndexError."""
    rng = random.Random(2024)
    rewriter = head.rewriter
    headers = [bytes([kind << 1, 1]) for kind in (0, 1, 19, 20, 21, 32, 33, 34, 39)]
    for _ in range(3000):
        size = rng.randrange(0, 48)
        body = bytes(rng.choice((0, 0, 0xFF, rng.randrange(256))) for _ in range(size))
        nal = rng.choice(headers) + body
        for call in (hevc.parse_vps, hevc.parse_sps, hevc.parse_pps, rewriter.rewrite):
            with contextlib.suppress(HevcUnsupported):
                call(nal)
        with contextlib.suppress(HevcUnsupported):
            hevc.parse_hvcc(bytes([1]) + body)
