"""H.264 avcC records and AV1 OBUs: parsing, merging, and hostile bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipservice.media.bitstream import av1, h264
from clipservice.media.bitstream.av1 import Av1Unsupported
from clipservice.media.bitstream.h264 import (
    H264Unsupported,
    annexb_config,
    build_avcc,
    free_ids,
    merge_avcc,
    parse_avcc,
    pps_id,
    sps_id,
    to_length_prefixed,
)
from tests.conftest import Shapes

# -- H.264 --------------------------------------------------------------------------

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
    assert cfg.trailer == bytes.fromhex("fdf8f800")  # High profile's chroma/bit depth bytes
    assert [sps_id(s) for s in cfg.sps] == [0] and [pps_id(p) for p in cfg.pps] == [0]
    head = parse_avcc(HEAD_AVCC)
    assert build_avcc(head) == HEAD_AVCC
    assert [sps_id(s) for s in head.sps] == [3] and [pps_id(p) for p in head.pps] == [3]
    assert h264.level_name(cfg.level_idc) == "3.0" and h264.PROFILES[cfg.profile_idc] == "high"


def test_merge_lists_both_parameter_sets() -> None:
    """The merged avcC holds the source's and the re-encoded sets, source first,
    the source's header and High-profile trailer."""
    merged_bytes = merge_avcc(parse_avcc(SOURCE_AVCC), parse_avcc(HEAD_AVCC))
    merged = parse_avcc(merged_bytes)
    assert [sps_id(s) for s in merged.sps] == [0, 3]
    assert [pps_id(p) for p in merged.pps] == [0, 3]
    assert merged.profile_idc == 100 and merged.level_idc == 30
    assert merged.trailer == parse_avcc(SOURCE_AVCC).trailer
    assert build_avcc(merged) == merged_bytes
    # A set both list is listed once.
    again = parse_avcc(merge_avcc(merged, parse_avcc(HEAD_AVCC), parse_avcc(SOURCE_AVCC)))
    assert (again.sps, again.pps) == (merged.sps, merged.pps)


def test_merge_refuses_colliding_ids() -> None:
    """Two different parameter sets with one id cannot share an avcC."""
    source = parse_avcc(SOURCE_AVCC)
    changed_sps = dataclasses.replace(source, sps=(source.sps[0][:-1] + b"\x01",))
    with pytest.raises(H264Unsupported, match="collide"):
        merge_avcc(source, changed_sps)
    changed_pps = dataclasses.replace(source, pps=(source.pps[0][:-1] + b"\x01",))
    with pytest.raises(H264Unsupported, match="collide"):
        merge_avcc(source, changed_pps)


def test_merge_refuses_different_length_sizes() -> None:
    """Samples with 2-byte and 4-byte NAL lengths cannot share one track."""
    head = dataclasses.replace(parse_avcc(HEAD_AVCC), length_size=2)
    with pytest.raises(H264Unsupported, match="length"):
        merge_avcc(parse_avcc(SOURCE_AVCC), head)


def test_free_ids_avoid_the_sources() -> None:
    """Re-encoded parts get parameter-set ids the source does not use."""
    assert free_ids(parse_avcc(SOURCE_AVCC), 2) == [1, 2]
    assert free_ids(parse_avcc(HEAD_AVCC), 3) == [1, 2, 4]
    merged = parse_avcc(merge_avcc(parse_avcc(SOURCE_AVCC), parse_avcc(HEAD_AVCC)))
    assert free_ids(merged, 2) == [1, 2]
    with pytest.raises(H264Unsupported):
        free_ids(merged, 31)  # 1..31 but 3


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
    assert to_length_prefixed(au, 2) == b"\x00\x04" + sei + b"\x00\x08" + slice_nal
    with pytest.raises(H264Unsupported):
        annexb_config(b"\x00\x00\x01" + sei, 4)  # no parameter sets


def _ue(value: int) -> str:
    """Exp-Golomb bits of ``value``."""
    bits = bin(value + 1)[2:]
    return "0" * (len(bits) - 1) + bits


def _rbsp(bits: str) -> bytes:
    bits += "1"  # rbsp_stop_one_bit
    bits += "0" * (-len(bits) % 8)
    return int(bits, 2).to_bytes(len(bits) // 8, "big")


def test_parameter_set_ids_read_exp_golomb_codes() -> None:
    """Ids are read as Exp-Golomb codes past emulation prevention bytes; broken
    codes raise H264Unsupported."""
    for value in (0, 1, 7, 31):
        assert sps_id(b"\x67\x64\x00\x1f" + _rbsp(_ue(value) + "1")) == value
    for value in (0, 5, 255):
        assert pps_id(b"\x68" + _rbsp(_ue(value) + _ue(0))) == value
    # An id coded with 22 leading zeros: its RBSP starts 00 00 02, which the NAL
    # unit carries as 00 00 03 02 (emulation prevention).
    value = (1 << 22) + 4
    rbsp = _rbsp(_ue(value))
    assert rbsp.startswith(b"\x00\x00\x02")
    assert pps_id(b"\x68" + b"\x00\x00\x03" + rbsp[2:]) == value
    for sps in (b"\x67\x64\x00\x1f", b"\x67\x64\x00\x1f\x00", b"\x67"):
        with pytest.raises(H264Unsupported):
            sps_id(sps)  # truncated
    with pytest.raises(H264Unsupported):
        pps_id(b"\x68" + b"\x00" * 8)  # more than 31 leading zeros


def _decoded(packets: list[Any], extradata: bytes) -> dict[int, bytes]:
    dec: Any = av.CodecContext.create("h264", "r")
    dec.extradata = extradata
    out = {}
    for packet in [*packets, None]:
        for frame in dec.decode(packet):
            out[frame.pts] = bytes(frame.planes[0])
    return out


def test_non_reference_pictures_can_be_left_out(shapes: Shapes) -> None:
    """x264's non-reference B-frames are found by their slices' nal_ref_idc; a
    GOP decoded without them gives every other picture bit for bit (what the
    thumbnail path relies on); keyframes and P-frames are never disposable."""
    path = shapes.get("progressive").files["video"]
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        extradata = bytes(v.codec_context.extradata)
        packets = [p for p in c.demux(v) if p.size]
    length_size = parse_avcc(extradata).length_size
    gop = packets[: next(i for i, p in enumerate(packets) if i and p.is_keyframe)]
    flags = [h264.disposable(bytes(p), length_size) for p in gop]
    assert not flags[0] and any(flags) and not all(flags)
    full = _decoded([_copy(p) for p in gop], extradata)
    kept = _decoded([_copy(p) for p, f in zip(gop, flags, strict=True) if not f], extradata)
    assert len(kept) == flags.count(False) and len(full) == len(gop)
    assert all(full[pts] == data for pts, data in kept.items())
    # Not a slice, or not length-prefixed as said: never disposable.
    assert not h264.disposable(b"\x00\x00\x00\x02\x06\x05", 4)  # SEI only
    assert not h264.disposable(b"\x00\x00\x00\x09\x01", 4)  # runs past the end
    assert h264.disposable(b"\x00\x00\x00\x02\x01\x9a", 4)  # nal_ref_idc 0 slice
    assert not h264.disposable(b"\x00\x00\x00\x02\x21\x9a", 4)  # nal_ref_idc 1


def _copy(packet: Any) -> Any:
    out = av.Packet(bytes(packet))
    out.pts, out.dts, out.time_base = packet.pts, packet.dts, packet.time_base
    return out


def test_truncated_avcc_is_refused_cleanly() -> None:
    """Every truncation of an avcC either parses (into exactly its bytes) or raises
    H264Unsupported, never an IndexError."""
    for n in range(len(SOURCE_AVCC)):
        try:
            cfg = parse_avcc(SOURCE_AVCC[:n])
        except H264Unsupported:
            continue
        assert build_avcc(cfg) == SOURCE_AVCC[:n]
        assert n >= len(SOURCE_AVCC) - 4  # only the High-profile trailer may be cut
    with pytest.raises(H264Unsupported):
        parse_avcc(b"\x02" + SOURCE_AVCC[1:])  # not version 1


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=64))
def test_hostile_avcc_bytes(data: bytes) -> None:
    """Arbitrary bytes after an avcC header parse (into a record that rebuilds to the
    same parts) or raise H264Unsupported; so do the ids of what parsed."""
    try:
        cfg = parse_avcc(b"\x01\x64\x00\x1e\xff" + data)
    except H264Unsupported:
        return
    assert cfg.sps and cfg.pps and parse_avcc(build_avcc(cfg)) == cfg
    for nal in cfg.sps:
        with contextlib.suppress(H264Unsupported):
            assert 0 <= sps_id(nal) < 1 << 32
    for nal in cfg.pps:
        with contextlib.suppress(H264Unsupported):
            assert 0 <= pps_id(nal) < 1 << 32


def _frames(count: int, size: int = 64) -> list[av.VideoFrame]:
    frames = []
    for i in range(count):
        frame = av.VideoFrame(size, size, "yuv420p")
        for n, plane in enumerate(frame.planes):
            plane.update(bytes([(40 * i + 60 * n) % 256]) * plane.buffer_size)
        frame.pts = i
        frames.append(frame)
    return frames


def test_x264_parts_join_a_source_stream(tmp_path: Path) -> None:
    """A real x264 source (avcC from its MP4) and a part encoded with a free
    parameter-set id: the merged avcC decodes the source's samples and the
    part's length-prefixed frames, with no in-band parameter sets."""
    path = tmp_path / "src.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "profile": "high", "bf": "2"}
        for frame in [*_frames(6), None]:
            out.mux(stream.encode(frame))
    with av.open(str(path)) as src:
        source_avcc = bytes(src.streams.video[0].codec_context.extradata)
        samples = [bytes(p) for p in src.demux(video=0) if p.size]
    source = parse_avcc(source_avcc)
    assert source.profile_idc == 100 and build_avcc(source) == source_avcc
    ids = free_ids(source, 1)
    enc: Any = av.CodecContext.create("libx264", "w")
    enc.width = enc.height = 64
    enc.pix_fmt = "yuv420p"
    enc.time_base = Fraction(1, 30)
    enc.flags |= av.codec.context.Flags.global_header
    enc.options = {"preset": "ultrafast", "profile": "high", "x264-params": f"sps-id={ids[0]}"}
    part_packets = [bytes(p) for f in [*_frames(3), None] for p in enc.encode(f)]
    part = annexb_config(bytes(enc.extradata), source.length_size)
    assert [sps_id(s) for s in part.sps] == ids and [pps_id(p) for p in part.pps] == ids
    merged = merge_avcc(source, part)
    dec: Any = av.CodecContext.create("h264", "r")
    dec.extradata = merged
    decoded = []
    for data in [*samples, *(to_length_prefixed(p, source.length_size) for p in part_packets)]:
        decoded += dec.decode(av.Packet(data))
    decoded += dec.decode(None)
    assert len(decoded) == 9 and all((f.width, f.height) == (64, 64) for f in decoded)


# -- AV1 ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def svt_av1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Six 64x64 frames from SVT-AV1: the encoder's packets (with temporal
    delimiters), the MP4's samples and its av1C, and the encoder's sequence header."""
    path = tmp_path_factory.mktemp("av1") / "svt.mp4"
    packets = []
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libsvtav1", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "12", "svtav1-params": "lp=1"}
        for frame in [*_frames(6), None]:
            for packet in stream.encode(frame):
                packets.append((bytes(packet), packet.is_keyframe))
                out.mux(packet)
        sequence_header = bytes(stream.codec_context.extradata or b"")
    with av.open(str(path)) as src:
        video = src.streams.video[0]
        av1c = bytes(video.codec_context.extradata)
        samples = [bytes(p) for p in src.demux(video) if p.size]
    return {
        "packets": packets,
        "samples": samples,
        "av1c": av1c,
        "sequence_header": sequence_header,
    }


def test_obus_of_real_samples(svt_av1: dict[str, Any]) -> None:
    """The OBUs of SVT-AV1 samples tile them; the keyframe opens with the sequence
    header, the encoder's packets with a temporal delimiter."""
    for data, key in svt_av1["packets"]:
        units = av1.obus(data)
        assert units[0][:2] == (av1.OBU_TEMPORAL_DELIMITER, 0)
        assert [u[2] for u in units[:-1]] == [u[1] for u in units[1:]]
        assert units[-1][2] == len(data)
        assert av1.has_sequence_header(data) is key
    keyframe = svt_av1["samples"][0]
    assert av1.obus(keyframe)[0][0] == av1.OBU_SEQUENCE_HEADER
    assert [av1.has_sequence_header(s) for s in svt_av1["samples"]] == [True] + [False] * 5


def test_strip_temporal_delimiters_matches_the_mp4_muxer(svt_av1: dict[str, Any]) -> None:
    """Stripping the encoder's packets gives FFmpeg's MP4 samples byte for byte;
    samples without delimiters come back as they are."""
    packets = [data for data, _ in svt_av1["packets"]]
    assert len(packets) == len(svt_av1["samples"])
    for data, sample in zip(packets, svt_av1["samples"], strict=True):
        assert data != sample
        assert av1.strip_temporal_delimiters(data) == sample
        assert av1.strip_temporal_delimiters(sample) is sample
    # Padding OBUs go too (type 15, with a size).
    padding = bytes([(av1.OBU_PADDING << 3) | 2, 2, 0xAA, 0xBB])
    assert av1.strip_temporal_delimiters(padding + svt_av1["samples"][1]) == svt_av1["samples"][1]


def test_config_sequence_header_of_real_av1c(svt_av1: dict[str, Any]) -> None:
    """The av1C's sequence header OBU is the one the encoder gave the muxer."""
    av1c = svt_av1["av1c"]
    assert av1c[0] == 0x81
    header = av1.config_sequence_header(av1c)
    assert header and header == svt_av1["sequence_header"]
    assert av1.obus(header) == [(av1.OBU_SEQUENCE_HEADER, 0, len(header))]
    # (SVT-AV1's in-band header, in the keyframe, differs from it in a few bits.)
    kind, start, end = av1.obus(svt_av1["samples"][0])[0]
    assert kind == av1.OBU_SEQUENCE_HEADER and end - start == len(header)
    assert av1.config_sequence_header(av1c[:4]) == b""  # no configOBUs
    assert av1.config_sequence_header(b"") == b""


def test_hostile_av1_bytes_raise_av1unsupported() -> None:
    """Truncated sizes, forbidden bits, sizes past the end, bad av1C: Av1Unsupported."""
    cases = [
        b"\x0a",  # sequence header with a size field, no size
        b"\x0a\x80",  # leb128 that continues past the end
        b"\x0a" + b"\xff" * 8 + b"\x01",  # leb128 longer than 8 bytes
        b"\x8a\x00",  # forbidden bit
        b"\x12\x00\x0a\x05\x00",  # a delimiter, then a size past the end
        b"\x0c",  # an extension flag with no extension byte
        b"\x0e",  # the same, with a size field
    ]
    for data in cases:
        with pytest.raises(Av1Unsupported):
            av1.obus(data)
        assert av1.has_sequence_header(data) is False
        assert av1.strip_temporal_delimiters(data) is data
        with pytest.raises(Av1Unsupported):
            av1.config_sequence_header(b"\x81\x00\x0c\x00" + data)
    for av1c in (b"\x81\x00\x0c", b"\x01\x00\x0c\x00\x0a\x00"):
        with pytest.raises(Av1Unsupported):
            av1.config_sequence_header(av1c)
    # An extension byte, then no size: the OBU runs to the end.
    assert av1.obus(b"\x0c\x00\x01\x02") == [(1, 0, 4)]


@settings(
    max_examples=500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.binary(max_size=40))
def test_arbitrary_bytes_never_crash_the_obu_reader(data: bytes) -> None:
    """Any bytes are OBUs tiling them, or Av1Unsupported: never another exception."""
    try:
        units = av1.obus(data)
    except Av1Unsupported:
        assert not av1.has_sequence_header(data)
        assert av1.strip_temporal_delimiters(data) is data
        return
    ends = [0, *(end for _, _, end in units)]
    assert [start for _, start, _ in units] == ends[:-1] and ends[-1] == len(data)
    stripped = av1.strip_temporal_delimiters(data)
    assert len(stripped) <= len(data)
    try:
        av1.config_sequence_header(b"\x81\x00\x0c\x00" + data)
    except Av1Unsupported:
        pytest.fail("OBUs that parse are a valid av1C body")


def test_svt_av1_encoder_leaves_no_real_time_thread() -> None:
    """Opening SVT-AV1 as root switches threads to SCHED_FIFO (a busy real-time thread, and
    every process started from it, would starve the machine); normal_scheduling, which the
    AV1 smart cut runs after opening its encoder, puts every thread back."""
    from clipservice.media.codecs import normal_scheduling

    enc = av.CodecContext.create("libsvtav1", "w")
    enc.width, enc.height, enc.pix_fmt = 64, 64, "yuv420p"
    enc.time_base, enc.framerate = Fraction(1, 30), Fraction(30)
    enc.options = {"preset": "12"}
    enc.open()
    try:
        normal_scheduling()
        policies = {os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}
        assert policies == {os.SCHED_OTHER}, policies
    finally:
        del enc
