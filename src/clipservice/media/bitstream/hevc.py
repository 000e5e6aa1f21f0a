"""HEVC parameter sets and slice headers for smart cuts: ``hvcC`` records, set ids.

An ``hvc1`` track carries every parameter set out of band, in the one
``hvcC`` record of its sample entry (array_completeness = 1; Safari and
QuickTime refuse ``hev1``, whose sets may travel in band). A smart cut joins
re-encoded frames to the source's copied frames, so that record must list
both parts' VPS/SPS/PPS side by side, and every slice must name its own
part's PPS. x265 has no option for parameter-set ids (it writes id 0, like
most sources), so the re-encoded part's sets and every one of its slice
segment headers are rewritten here to ids the source does not use.

Ids are Exp-Golomb codes (``ue(v)``): a new id may take more or fewer bits
than the old one, and everything after it shifts. A parameter set is short
and is re-coded whole (its RBSP shifted, its trailing bits redone). A slice
is not: its header is parsed to its end (``byte_alignment()``) with the
syntax of its PPS and SPS, the header bits are rebuilt, and the slice data
bytes are kept exactly as they were (they start byte-aligned, after a
non-zero byte, so their emulation prevention does not change either).
Anything this parser does not know raises :class:`HevcUnsupported`: a join
falls back to re-encoding rather than guess.

Syntax references are to ITU-T H.265 (clause numbers of the 2016+ editions).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "EOS_NUT",
    "PPS_NUT",
    "SPS_NUT",
    "VPS_NUT",
    "X265_PARAMS",
    "BitReader",
    "BitWriter",
    "HevcUnsupported",
    "HvcArray",
    "HvcConfig",
    "IdRewriter",
    "ParamIds",
    "Pps",
    "ProfileTierLevel",
    "ShortTermRps",
    "SliceHeader",
    "Sps",
    "Vps",
    "build_hvcc",
    "eos_nal",
    "escape",
    "free_ids",
    "hvcc_from_parameter_sets",
    "is_irap",
    "is_leading",
    "join_sample",
    "merge_hvcc",
    "nal_type",
    "nal_types",
    "parse_hvcc",
    "parse_pps",
    "parse_slice_header",
    "parse_sps",
    "parse_vps",
    "rewrite_ids",
    "split_annexb",
    "split_sample",
    "unescape",
    "x265_profile_options",
]


class HevcUnsupported(ValueError):
    """These HEVC bytes are malformed, or use syntax this module does not rewrite."""


# NAL unit types (Table 7-1).
RADL_N, RADL_R, RASL_N, RASL_R = 6, 7, 8, 9
BLA_W_LP, IDR_W_RADL, IDR_N_LP, CRA_NUT = 16, 19, 20, 21
VPS_NUT, SPS_NUT, PPS_NUT = 32, 33, 34
AUD_NUT, EOS_NUT, EOB_NUT, FD_NUT = 35, 36, 37, 38
PREFIX_SEI_NUT, SUFFIX_SEI_NUT = 39, 40
_PARAMETER_SETS = (VPS_NUT, SPS_NUT, PPS_NUT)
_MAX_IDS = {VPS_NUT: 16, SPS_NUT: 16, PPS_NUT: 64}

# Slice types (Table 7-7).
SLICE_B, SLICE_P, SLICE_I = 0, 1, 2


# -- NAL units: framing and emulation prevention -----------------------------


def split_annexb(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes and trailing zeros removed)."""
    units = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        begin = pos + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        # A NAL unit never ends in 0x00: zeros before a start code are the
        # byte stream's (a 4-byte start code, trailing_zero_8bits).
        unit = data[begin : nxt if nxt >= 0 else len(data)].rstrip(b"\x00")
        if unit:
            units.append(bytes(unit))
        pos = nxt
    return units


def split_sample(sample: bytes, length_size: int) -> list[bytes]:
    """The NAL units of a length-prefixed sample (as MP4 stores them)."""
    if length_size not in (1, 2, 4):
        raise HevcUnsupported(f"NAL length size {length_size}")
    units = []
    pos = 0
    while pos < len(sample):
        if pos + length_size > len(sample):
            raise HevcUnsupported("truncated NAL length")
        size = int.from_bytes(sample[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > len(sample):
            raise HevcUnsupported("NAL unit runs past the end of its sample")
        units.append(bytes(sample[pos : pos + size]))
        pos += size
    return units


def join_sample(nals: Iterable[bytes], length_size: int) -> bytes:
    """NAL units as one length-prefixed sample."""
    if length_size not in (1, 2, 4):
        raise HevcUnsupported(f"NAL length size {length_size}")
    out = bytearray()
    for nal in nals:
        if not nal or len(nal) >= 1 << (8 * length_size):
            raise HevcUnsupported(f"NAL unit of {len(nal)} bytes for length size {length_size}")
        out += len(nal).to_bytes(length_size, "big") + nal
    return bytes(out)


def unescape(payload: bytes) -> bytes:
    """The RBSP of a NAL unit payload: every emulation_prevention_three_byte removed."""
    # Left-to-right, non-overlapping: exactly the decoder's rule (7.3.1.1).
    return payload.replace(b"\x00\x00\x03", b"\x00\x00")


def _escaped_offset(payload: bytes, rbsp_offset: int) -> int:
    """Where byte ``rbsp_offset`` of the RBSP sits in the escaped ``payload``."""
    pos = rbsp_offset
    at = payload.find(b"\x00\x00\x03")
    while at >= 0 and at + 2 <= pos:
        pos += 1  # the 0x03 at ``at + 2`` was removed before this byte
        at = payload.find(b"\x00\x00\x03", at + 3)
    return pos


def escape(rbsp: bytes) -> bytes:
    """An RBSP with emulation prevention: 0x03 after every 0x0000 that precedes
    a byte <= 0x03, and after a final 0x0000 (7.4.2)."""
    out = bytearray()
    start = 0
    at = rbsp.find(b"\x00\x00")
    while at >= 0:
        nxt = at + 2
        if nxt == len(rbsp) or rbsp[nxt] <= 3:
            out += rbsp[start:nxt]
            out.append(3)
            start = nxt
        at = rbsp.find(b"\x00\x00", nxt)
    out += rbsp[start:]
    return bytes(out)


def nal_type(nal: bytes) -> int:
    """nal_unit_type from the two-byte NAL unit header."""
    if len(nal) < 2:
        raise HevcUnsupported("NAL unit shorter than its header")
    return (nal[0] >> 1) & 0x3F


def _header(nal: bytes, expected: int | None = None) -> int:
    """Check a NAL unit header this module can rewrite; return the type."""
    kind = nal_type(nal)
    if nal[0] & 0x80:
        raise HevcUnsupported("forbidden_zero_bit is set")
    layer = ((nal[0] & 1) << 5) | (nal[1] >> 3)
    if layer != 0:
        raise HevcUnsupported(f"nuh_layer_id {layer}: layered HEVC is not supported")
    if nal[1] & 7 == 0:
        raise HevcUnsupported("nuh_temporal_id_plus1 is 0")
    if expected is not None and kind != expected:
        raise HevcUnsupported(f"NAL unit type {kind}, expected {expected}")
    return kind


def eos_nal() -> bytes:
    """An end-of-sequence NAL unit (type 36): the next picture starts a new coded
    video sequence, so a CRA after it drops its RASL pictures (open-GOP joins)."""
    return bytes([EOS_NUT << 1, 1])


def nal_types(sample: bytes, length_size: int = 4) -> list[int]:
    """nal_unit_type of every NAL unit of a length-prefixed sample, in order."""
    return [nal_type(nal) for nal in split_sample(sample, length_size)]


def _picture_type(sample: bytes, length_size: int) -> int | None:
    """The type of the sample's VCL NAL units (one picture: all alike), if any."""
    return next((t for t in nal_types(sample, length_size) if t < VPS_NUT), None)


def is_leading(sample: bytes, length_size: int = 4) -> bool:
    """A leading picture (RADL 6/7, RASL 8/9): shown before its IRAP, decoded after it."""
    kind = _picture_type(sample, length_size)
    return kind is not None and RADL_N <= kind <= RASL_R


def is_irap(sample: bytes, length_size: int = 4) -> bool:
    """An intra random access point (BLA, IDR, CRA: types 16-23)."""
    kind = _picture_type(sample, length_size)
    return kind is not None and BLA_W_LP <= kind <= 23


# -- bits ----------------------------------------------------------------------


class BitReader:
    """Reads u(n), ue(v) and se(v) from an RBSP, most significant bit first.

    Reading past the end raises :class:`HevcUnsupported`, never IndexError.
    """

    def __init__(self, data: bytes, pos_bits: int = 0) -> None:
        self.data = data
        self.pos = pos_bits
        self.size_bits = len(data) * 8

    def u(self, n: int) -> int:
        if n == 0:
            return 0
        end = self.pos + n
        if end > self.size_bits:
            raise HevcUnsupported("truncated: read past the end of the NAL unit")
        first, last = self.pos >> 3, (end + 7) >> 3
        chunk = int.from_bytes(self.data[first:last], "big")
        value = (chunk >> (last * 8 - end)) & ((1 << n) - 1)
        self.pos = end
        return value

    def flag(self) -> bool:
        return self.u(1) == 1

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise HevcUnsupported("Exp-Golomb code longer than 32 bits")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) >> 1 if code & 1 else -(code >> 1)

    def skip(self, n: int) -> None:
        if self.pos + n > self.size_bits:
            raise HevcUnsupported("truncated: read past the end of the NAL unit")
        self.pos += n

    def more_rbsp_data(self) -> bool:
        """Bits left before the rbsp_stop_one_bit (7.2)."""
        return self.pos < _stop_bit(self.data)


class BitWriter:
    """Writes u(n), ue(v), se(v) and copies of bit ranges, then the bytes."""

    def __init__(self) -> None:
        self._value = 0
        self.size_bits = 0

    def u(self, n: int, value: int) -> None:
        if value < 0 or value >> n:
            raise ValueError(f"{value} does not fit in {n} bits")
        self._value = (self._value << n) | value
        self.size_bits += n

    def ue(self, value: int) -> None:
        if not 0 <= value < (1 << 32) - 1:
            raise ValueError(f"{value} is out of ue(v) range")
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def copy(self, data: bytes, start_bits: int, end_bits: int) -> None:
        """Append bits [start_bits, end_bits) of ``data``."""
        n = end_bits - start_bits
        if n <= 0:
            return
        first, last = start_bits >> 3, (end_bits + 7) >> 3
        chunk = int.from_bytes(data[first:last], "big")
        self.u(n, (chunk >> (last * 8 - end_bits)) & ((1 << n) - 1))

    def trailing_bits(self) -> None:
        """rbsp_trailing_bits() / byte_alignment(): a one, then zeros to a byte."""
        self.u(1, 1)
        self.u(-self.size_bits % 8, 0)

    def to_bytes(self) -> bytes:
        if self.size_bits % 8:
            raise ValueError("not byte-aligned")
        return self._value.to_bytes(self.size_bits // 8, "big")


def _stop_bit(rbsp: bytes) -> int:
    """Bit position of the rbsp_stop_one_bit: the last one bit of the RBSP."""
    end = len(rbsp.rstrip(b"\x00"))
    if end == 0:
        raise HevcUnsupported("no rbsp_stop_one_bit")
    last = rbsp[end - 1]
    return end * 8 - (last & -last).bit_length()


def _ceil_log2(value: int) -> int:
    return (value - 1).bit_length() if value > 1 else 0


def _bounded(value: int, limit: int, what: str) -> int:
    if value > limit:
        raise HevcUnsupported(f"{what} = {value} is out of range (max {limit})")
    return value


# -- parameter sets ------------------------------------------------------------


@dataclass(frozen=True)
class ProfileTierLevel:
    """The general part of profile_tier_level() (7.3.3), as hvcC repeats it."""

    profile_space: int
    tier: int
    profile_idc: int
    compat_flags: int  # general_profile_compatibility_flag[0..31], flag 0 first (MSB)
    constraint_flags: int  # 48 bits: progressive, interlaced, non-packed, frame-only, 44 more
    level_idc: int
    level_pos_bits: int  # where general_level_idc sits in the RBSP


def _profile_tier_level(r: BitReader, max_sub_layers_minus1: int) -> ProfileTierLevel:
    profile_space, tier, profile_idc = r.u(2), r.u(1), r.u(5)
    compat = r.u(32)
    constraints = r.u(48)
    level_pos = r.pos
    level = r.u(8)
    present = [(r.flag(), r.flag()) for _ in range(max_sub_layers_minus1)]
    if max_sub_layers_minus1 > 0:
        r.skip(2 * (8 - max_sub_layers_minus1))  # reserved_zero_2bits
    for profile_present, level_present in present:
        if profile_present:
            r.skip(88)
        if level_present:
            r.skip(8)
    return ProfileTierLevel(profile_space, tier, profile_idc, compat, constraints, level, level_pos)


@dataclass(frozen=True)
class Vps:
    """A video parameter set: only its id matters here (a fixed 4-bit field)."""

    vps_id: int
    max_sub_layers: int
    temporal_id_nesting: bool
    ptl: ProfileTierLevel


def parse_vps(nal: bytes) -> Vps:
    _header(nal, VPS_NUT)
    r = BitReader(unescape(nal[2:]))
    vps_id = r.u(4)
    r.skip(2 + 6)  # base layer internal/available flags, vps_max_layers_minus1
    max_sub_layers_minus1 = _bounded(r.u(3), 6, "vps_max_sub_layers_minus1")
    nesting = r.flag()
    r.skip(16)  # vps_reserved_0xffff_16bits
    ptl = _profile_tier_level(r, max_sub_layers_minus1)
    return Vps(vps_id, max_sub_layers_minus1 + 1, nesting, ptl)


@dataclass(frozen=True)
class ShortTermRps:
    """One st_ref_pic_set (7.3.7, 7.4.8): pictures before and after the current one,
    each (delta POC, used by the current picture)."""

    negative: tuple[tuple[int, bool], ...]
    positive: tuple[tuple[int, bool], ...]

    @property
    def num_delta_pocs(self) -> int:
        return len(self.negative) + len(self.positive)

    @property
    def used_by_curr(self) -> int:
        return sum(used for _, used in self.negative + self.positive)


_MAX_DPB = 16  # MaxDpbSize's ceiling: no RPS lists more pictures


def _st_ref_pic_set(
    r: BitReader, idx: int, count: int, sets: Sequence[ShortTermRps]
) -> ShortTermRps:
    """st_ref_pic_set(idx) of an SPS (idx < count) or a slice header (idx == count)."""
    if idx != 0 and r.flag():  # inter_ref_pic_set_prediction_flag
        delta_idx = r.ue() + 1 if idx == count else 1
        if delta_idx > idx:
            raise HevcUnsupported("delta_idx_minus1 names no earlier RPS")
        ref = sets[idx - delta_idx]
        sign = r.u(1)
        delta_rps = (1 - 2 * sign) * (_bounded(r.ue(), 1 << 15, "abs_delta_rps_minus1") + 1)
        used: list[bool] = []
        use_delta: list[bool] = []
        for _ in range(ref.num_delta_pocs + 1):
            used_flag = r.flag()
            used.append(used_flag)
            use_delta.append(True if used_flag else r.flag())
        # (7-61) and (7-62): the reference RPS's pictures shifted by delta_rps;
        # entry j < NumNegativePics of the reference is its S0[j], then S1, then
        # the reference picture itself (index NumDeltaPocs).
        n_neg, n_all = len(ref.negative), ref.num_delta_pocs
        negative: list[tuple[int, bool]] = []
        for j in range(len(ref.positive) - 1, -1, -1):
            d = ref.positive[j][0] + delta_rps
            if d < 0 and use_delta[n_neg + j]:
                negative.append((d, used[n_neg + j]))
        if delta_rps < 0 and use_delta[n_all]:
            negative.append((delta_rps, used[n_all]))
        for j in range(n_neg):
            d = ref.negative[j][0] + delta_rps
            if d < 0 and use_delta[j]:
                negative.append((d, used[j]))
        positive: list[tuple[int, bool]] = []
        for j in range(n_neg - 1, -1, -1):
            d = ref.negative[j][0] + delta_rps
            if d > 0 and use_delta[j]:
                positive.append((d, used[j]))
        if delta_rps > 0 and use_delta[n_all]:
            positive.append((delta_rps, used[n_all]))
        for j in range(len(ref.positive)):
            d = ref.positive[j][0] + delta_rps
            if d > 0 and use_delta[n_neg + j]:
                positive.append((d, used[n_neg + j]))
        if len(negative) + len(positive) > _MAX_DPB:
            raise HevcUnsupported("short-term RPS lists too many pictures")
        return ShortTermRps(tuple(negative), tuple(positive))
    num_negative = _bounded(r.ue(), _MAX_DPB, "num_negative_pics")
    num_positive = _bounded(r.ue(), _MAX_DPB - num_negative, "num_positive_pics")
    lists: list[list[tuple[int, bool]]] = [[], []]
    for side, count_side, sign in ((0, num_negative, -1), (1, num_positive, 1)):
        poc = 0
        for _ in range(count_side):
            poc += sign * (_bounded(r.ue(), 1 << 15, "delta_poc_minus1") + 1)
            lists[side].append((poc, r.flag()))
    return ShortTermRps(tuple(lists[0]), tuple(lists[1]))


def _skip_scaling_list_data(r: BitReader) -> None:
    """scaling_list_data() (7.3.4): read past it."""
    for size_id in range(4):
        for _ in range(0, 6, 3 if size_id == 3 else 1):
            if not r.flag():  # scaling_list_pred_mode_flag
                r.ue()  # scaling_list_pred_matrix_id_delta
                continue
            if size_id > 1:
                r.se()  # scaling_list_dc_coef_minus8
            for _ in range(min(64, 1 << (4 + (size_id << 1)))):
                r.se()


# Profiles whose slice headers this parser knows: Main, Main 10, Main Still
# Picture, format range extensions. Screen content coding (9) adds slice
# header syntax announced only past the SPS's VUI, which is not parsed.
_KNOWN_PROFILES = (1, 2, 3, 4)


@dataclass(frozen=True)
class Sps:
    """A sequence parameter set: what slice headers and ``hvcC`` need (7.3.2.2)."""

    vps_id: int
    max_sub_layers: int
    temporal_id_nesting: bool
    ptl: ProfileTierLevel
    sps_id: int
    sps_id_bits: tuple[int, int]  # where the ue(v) id sits in the RBSP
    chroma_format_idc: int
    separate_colour_plane: bool
    width: int
    height: int
    bit_depth_luma: int
    bit_depth_chroma: int
    log2_max_poc_lsb: int
    ctb_log2_size: int
    sample_adaptive_offset: bool
    short_term_rps: tuple[ShortTermRps, ...]
    long_term_ref_pics_present: bool
    lt_used_by_curr: tuple[bool, ...]  # used_by_curr_pic_lt_sps_flag per candidate
    temporal_mvp: bool

    @property
    def chroma_array_type(self) -> int:
        return 0 if self.separate_colour_plane else self.chroma_format_idc

    @property
    def pic_size_in_ctbs(self) -> int:
        ctb = 1 << self.ctb_log2_size
        return -(-self.width // ctb) * -(-self.height // ctb)


def parse_sps(nal: bytes) -> Sps:
    """Parse an SPS NAL unit up to sps_temporal_mvp_enabled_flag (VUI not read)."""
    _header(nal, SPS_NUT)
    r = BitReader(unescape(nal[2:]))
    vps_id = r.u(4)
    max_sub_layers_minus1 = _bounded(r.u(3), 6, "sps_max_sub_layers_minus1")
    nesting = r.flag()
    ptl = _profile_tier_level(r, max_sub_layers_minus1)
    id_start = r.pos
    sps_id = _bounded(r.ue(), 15, "sps_seq_parameter_set_id")
    id_bits = (id_start, r.pos)
    chroma = _bounded(r.ue(), 3, "chroma_format_idc")
    separate = r.flag() if chroma == 3 else False
    width, height = r.ue(), r.ue()
    if not (0 < width <= 1 << 16 and 0 < height <= 1 << 16):
        raise HevcUnsupported(f"picture size {width}x{height}")
    if r.flag():  # conformance_window_flag
        for _ in range(4):
            r.ue()
    depth_luma = _bounded(r.ue(), 8, "bit_depth_luma_minus8") + 8
    depth_chroma = _bounded(r.ue(), 8, "bit_depth_chroma_minus8") + 8
    log2_poc = _bounded(r.ue(), 12, "log2_max_pic_order_cnt_lsb_minus4") + 4
    ordering_all = r.flag()
    for _ in range(0 if ordering_all else max_sub_layers_minus1, max_sub_layers_minus1 + 1):
        r.ue(), r.ue(), r.ue()  # max_dec_pic_buffering, num_reorder, latency_increase
    min_cb = _bounded(r.ue(), 3, "log2_min_luma_coding_block_size_minus3") + 3
    ctb_log2 = min_cb + _bounded(r.ue(), 3, "log2_diff_max_min_luma_coding_block_size")
    if not 4 <= ctb_log2 <= 6:
        raise HevcUnsupported(f"CTB size 2^{ctb_log2}")
    for _ in range(4):  # transform block sizes, transform hierarchy depths
        r.ue()
    if r.flag() and r.flag():  # scaling_list_enabled, sps_scaling_list_data_present
        _skip_scaling_list_data(r)
    r.skip(1)  # amp_enabled_flag
    sao = r.flag()
    if r.flag():  # pcm_enabled_flag
        r.skip(8)
        r.ue(), r.ue()
        r.skip(1)
    count = _bounded(r.ue(), 64, "num_short_term_ref_pic_sets")
    rps: list[ShortTermRps] = []
    for idx in range(count):
        rps.append(_st_ref_pic_set(r, idx, count, rps))
    lt_present = r.flag()
    lt_used: list[bool] = []
    if lt_present:
        for _ in range(_bounded(r.ue(), 32, "num_long_term_ref_pics_sps")):
            r.skip(log2_poc)  # lt_ref_pic_poc_lsb_sps
            lt_used.append(r.flag())
    tmvp = r.flag()
    return Sps(
        vps_id=vps_id,
        max_sub_layers=max_sub_layers_minus1 + 1,
        temporal_id_nesting=nesting,
        ptl=ptl,
        sps_id=sps_id,
        sps_id_bits=id_bits,
        chroma_format_idc=chroma,
        separate_colour_plane=separate,
        width=width,
        height=height,
        bit_depth_luma=depth_luma,
        bit_depth_chroma=depth_chroma,
        log2_max_poc_lsb=log2_poc,
        ctb_log2_size=ctb_log2,
        sample_adaptive_offset=sao,
        short_term_rps=tuple(rps),
        long_term_ref_pics_present=lt_present,
        lt_used_by_curr=tuple(lt_used),
        temporal_mvp=tmvp,
    )


@dataclass(frozen=True)
class Pps:
    """A picture parameter set: what slice headers need (7.3.2.3)."""

    pps_id: int
    sps_id: int
    id_bits: tuple[int, int, int]  # starts of pps id and sps id, end of sps id
    dependent_slice_segments: bool
    output_flag_present: bool
    num_extra_slice_header_bits: int
    cabac_init_present: bool
    num_ref_idx_default: tuple[int, int]  # num_ref_idx_l0/l1_default_active_minus1
    slice_chroma_qp_offsets_present: bool
    weighted_pred: bool
    weighted_bipred: bool
    tiles: bool
    entropy_coding_sync: bool
    loop_filter_across_slices: bool
    deblocking_override_enabled: bool
    deblocking_disabled: bool
    lists_modification_present: bool
    slice_header_extension_present: bool
    chroma_qp_offset_list: bool


def parse_pps(nal: bytes) -> Pps:
    """Parse a PPS NAL unit through its extensions' flags."""
    _header(nal, PPS_NUT)
    r = BitReader(unescape(nal[2:]))
    pps_start = r.pos
    pps_id = _bounded(r.ue(), 63, "pps_pic_parameter_set_id")
    sps_start = r.pos
    sps_id = _bounded(r.ue(), 15, "pps_seq_parameter_set_id")
    id_bits = (pps_start, sps_start, r.pos)
    dependent = r.flag()
    output_flag = r.flag()
    extra_bits = r.u(3)
    r.skip(1)  # sign_data_hiding_enabled_flag
    cabac_init = r.flag()
    ref_default = (
        _bounded(r.ue(), 14, "num_ref_idx_l0_default_active_minus1"),
        _bounded(r.ue(), 14, "num_ref_idx_l1_default_active_minus1"),
    )
    r.se()  # init_qp_minus26
    r.skip(1)  # constrained_intra_pred_flag
    transform_skip = r.flag()
    if r.flag():  # cu_qp_delta_enabled_flag
        r.ue()
    r.se(), r.se()  # pps_cb_qp_offset, pps_cr_qp_offset
    chroma_offsets = r.flag()
    weighted_pred, weighted_bipred = r.flag(), r.flag()
    r.skip(1)  # transquant_bypass_enabled_flag
    tiles, sync = r.flag(), r.flag()
    if tiles:
        columns = _bounded(r.ue(), 19, "num_tile_columns_minus1")
        rows = _bounded(r.ue(), 21, "num_tile_rows_minus1")
        if not r.flag():  # uniform_spacing_flag
            for _ in range(columns + rows):
                r.ue()
        r.skip(1)  # loop_filter_across_tiles_enabled_flag
    across_slices = r.flag()
    override = disabled = False
    if r.flag():  # deblocking_filter_control_present_flag
        override, disabled = r.flag(), r.flag()
        if not disabled:
            r.se(), r.se()
    if r.flag():  # pps_scaling_list_data_present_flag
        _skip_scaling_list_data(r)
    lists_mod = r.flag()
    r.ue()  # log2_parallel_merge_level_minus2
    header_ext = r.flag()
    chroma_qp_list = False
    if r.flag():  # pps_extension_present_flag
        range_ext, multilayer, ext_3d, scc = r.flag(), r.flag(), r.flag(), r.flag()
        if multilayer or ext_3d or scc:
            raise HevcUnsupported("PPS with multilayer, 3D or screen content extensions")
        r.skip(4)  # pps_extension_4bits: data the slice header does not depend on
        if range_ext:
            if transform_skip:
                r.ue()  # log2_max_transform_skip_block_size_minus2
            r.skip(1)  # cross_component_prediction_enabled_flag
            chroma_qp_list = r.flag()
    return Pps(
        pps_id=pps_id,
        sps_id=sps_id,
        id_bits=id_bits,
        dependent_slice_segments=dependent,
        output_flag_present=output_flag,
        num_extra_slice_header_bits=extra_bits,
        cabac_init_present=cabac_init,
        num_ref_idx_default=ref_default,
        slice_chroma_qp_offsets_present=chroma_offsets,
        weighted_pred=weighted_pred,
        weighted_bipred=weighted_bipred,
        tiles=tiles,
        entropy_coding_sync=sync,
        loop_filter_across_slices=across_slices,
        deblocking_override_enabled=override,
        deblocking_disabled=disabled,
        lists_modification_present=lists_mod,
        slice_header_extension_present=header_ext,
        chroma_qp_offset_list=chroma_qp_list,
    )


# -- slice segment headers -----------------------------------------------------


@dataclass(frozen=True)
class SliceHeader:
    """A parsed slice_segment_header() (7.3.6.1): the fields a join looks at and
    where the header's bits are, in the RBSP of the slice segment."""

    nal_type: int
    first_slice_segment_in_pic: bool
    pps_id: int
    pps_id_bits: tuple[int, int]
    dependent: bool
    slice_type: int | None  # None for a dependent slice segment (its slice's type)
    end_bits: int  # where byte_alignment() starts
    data_offset: int  # RBSP byte where slice_segment_data() starts


def parse_slice_header(
    nal: bytes, pps_by_id: dict[int, Pps], sps_by_id: dict[int, Sps]
) -> SliceHeader:
    """Parse a slice segment's header with its PPS and SPS (given by id)."""
    kind = _header(nal)
    if not (kind <= RASL_R or BLA_W_LP <= kind <= CRA_NUT):
        raise HevcUnsupported(f"NAL unit type {kind} is not a slice segment")
    return _parse_slice_header(kind, unescape(nal[2:]), pps_by_id, sps_by_id)


def _parse_slice_header(
    kind: int, rbsp: bytes, pps_by_id: dict[int, Pps], sps_by_id: dict[int, Sps]
) -> SliceHeader:
    r = BitReader(rbsp)
    first = r.flag()
    if BLA_W_LP <= kind <= 23:
        r.skip(1)  # no_output_of_prior_pics_flag
    pps_start = r.pos
    pps_id = r.ue()
    pps_bits = (pps_start, r.pos)
    pps = pps_by_id.get(pps_id)
    sps = sps_by_id.get(pps.sps_id) if pps is not None else None
    if pps is None or sps is None:
        raise HevcUnsupported(f"slice names PPS {pps_id}, which is not known (or its SPS)")
    dependent = False
    if not first:
        if pps.dependent_slice_segments:
            dependent = r.flag()
        r.skip(_ceil_log2(sps.pic_size_in_ctbs))  # slice_segment_address
    slice_type = None
    if not dependent:
        slice_type = _independent_fields(r, kind, pps, sps)
    if pps.tiles or pps.entropy_coding_sync:
        offsets = _bounded(r.ue(), sps.pic_size_in_ctbs, "num_entry_point_offsets")
        if offsets:
            bits = _bounded(r.ue(), 31, "offset_len_minus1") + 1
            r.skip(offsets * bits)
    if pps.slice_header_extension_present:
        r.skip(8 * _bounded(r.ue(), 256, "slice_segment_header_extension_length"))
    end = r.pos
    # byte_alignment(): a one bit, then zeros. Checking it catches a parse that
    # went astray (a header syntax this parser got wrong) before anything is
    # written.
    if r.u(1) != 1 or r.u(-r.pos % 8) != 0:
        raise HevcUnsupported("slice header does not end in byte_alignment()")
    return SliceHeader(
        nal_type=kind,
        first_slice_segment_in_pic=first,
        pps_id=pps_id,
        pps_id_bits=pps_bits,
        dependent=dependent,
        slice_type=slice_type,
        end_bits=end,
        data_offset=r.pos // 8,
    )


def _independent_fields(r: BitReader, kind: int, pps: Pps, sps: Sps) -> int:
    """The fields of an independent slice segment header; returns slice_type."""
    r.skip(pps.num_extra_slice_header_bits)  # slice_reserved_flag
    slice_type = r.ue()
    if slice_type > SLICE_I:
        raise HevcUnsupported(f"slice_type {slice_type}")
    if pps.output_flag_present:
        r.skip(1)  # pic_output_flag
    if sps.separate_colour_plane:
        r.skip(2)  # colour_plane_id
    temporal_mvp = False
    num_pic_total_curr = 0
    if kind not in (IDR_W_RADL, IDR_N_LP):
        r.skip(sps.log2_max_poc_lsb)  # slice_pic_order_cnt_lsb
        count = len(sps.short_term_rps)
        if not r.flag():  # short_term_ref_pic_set_sps_flag
            rps = _st_ref_pic_set(r, count, count, sps.short_term_rps)
        else:
            if count == 0:
                raise HevcUnsupported("slice uses an SPS RPS, the SPS has none")
            idx = r.u(_ceil_log2(count))  # short_term_ref_pic_set_idx
            if idx >= count:
                raise HevcUnsupported("short_term_ref_pic_set_idx out of range")
            rps = sps.short_term_rps[idx]
        num_pic_total_curr = rps.used_by_curr
        if sps.long_term_ref_pics_present:
            candidates = len(sps.lt_used_by_curr)
            num_sps = _bounded(r.ue(), candidates, "num_long_term_sps") if candidates else 0
            num_pics = _bounded(r.ue(), 32, "num_long_term_pics")
            for i in range(num_sps + num_pics):
                if i < num_sps:
                    lt_idx = r.u(_ceil_log2(candidates))  # lt_idx_sps
                    if lt_idx >= candidates:
                        raise HevcUnsupported("lt_idx_sps out of range")
                    num_pic_total_curr += sps.lt_used_by_curr[lt_idx]
                else:
                    r.skip(sps.log2_max_poc_lsb)  # poc_lsb_lt
                    num_pic_total_curr += r.u(1)  # used_by_curr_pic_lt_flag
                if r.flag():  # delta_poc_msb_present_flag
                    r.ue()
        if sps.temporal_mvp:
            temporal_mvp = r.flag()
    sao_luma = sao_chroma = False
    if sps.sample_adaptive_offset:
        sao_luma = r.flag()
        if sps.chroma_array_type != 0:
            sao_chroma = r.flag()
    if slice_type != SLICE_I:
        _inter_fields(r, slice_type, pps, sps, temporal_mvp, num_pic_total_curr)
    r.se()  # slice_qp_delta
    if pps.slice_chroma_qp_offsets_present:
        r.se(), r.se()
    if pps.chroma_qp_offset_list:
        r.skip(1)  # cu_chroma_qp_offset_enabled_flag
    deblocking_disabled = pps.deblocking_disabled
    if pps.deblocking_override_enabled and r.flag():  # deblocking_filter_override_flag
        deblocking_disabled = r.flag()
        if not deblocking_disabled:
            r.se(), r.se()  # slice_beta_offset_div2, slice_tc_offset_div2
    if pps.loop_filter_across_slices and (sao_luma or sao_chroma or not deblocking_disabled):
        r.skip(1)  # slice_loop_filter_across_slices_enabled_flag
    return slice_type


def _inter_fields(
    r: BitReader, slice_type: int, pps: Pps, sps: Sps, temporal_mvp: bool, total_curr: int
) -> None:
    """P and B slice fields: reference counts, list modification, collocated
    picture, weighted prediction, merge candidates."""
    is_b = slice_type == SLICE_B
    active = list(pps.num_ref_idx_default)
    if r.flag():  # num_ref_idx_active_override_flag
        active[0] = _bounded(r.ue(), 14, "num_ref_idx_l0_active_minus1")
        if is_b:
            active[1] = _bounded(r.ue(), 14, "num_ref_idx_l1_active_minus1")
    lists = (0, 1) if is_b else (0,)
    if pps.lists_modification_present and total_curr > 1:
        for lx in lists:
            if r.flag():  # ref_pic_list_modification_flag_lX
                r.skip((active[lx] + 1) * _ceil_log2(total_curr))  # list_entry_lX
    if is_b:
        r.skip(1)  # mvd_l1_zero_flag
    if pps.cabac_init_present:
        r.skip(1)  # cabac_init_flag
    if temporal_mvp:
        from_l0 = r.flag() if is_b else True  # collocated_from_l0_flag
        if active[0 if from_l0 else 1] > 0:
            r.ue()  # collocated_ref_idx
    if (pps.weighted_pred and not is_b) or (pps.weighted_bipred and is_b):
        _pred_weight_table(r, sps, [active[lx] + 1 for lx in lists])
    r.ue()  # five_minus_max_num_merge_cand


def _pred_weight_table(r: BitReader, sps: Sps, counts: list[int]) -> None:
    """pred_weight_table() (7.3.6.3). Every reference is another picture (no
    screen content current-picture referencing), so every flag is present."""
    chroma = sps.chroma_array_type != 0
    r.ue()  # luma_log2_weight_denom
    if chroma:
        r.se()  # delta_chroma_log2_weight_denom
    for count in counts:
        luma = [r.flag() for _ in range(count)]
        chroma_flags = [r.flag() for _ in range(count)] if chroma else [False] * count
        for i in range(count):
            if luma[i]:
                r.se(), r.se()  # delta_luma_weight, luma_offset
            if chroma_flags[i]:
                for _ in range(4):  # delta_chroma_weight, delta_chroma_offset for Cb, Cr
                    r.se()


# -- hvcC ------------------------------------------------------------------------


@dataclass(frozen=True)
class HvcArray:
    """One array of an ``hvcC`` record: NAL units of one type."""

    nal_type: int
    complete: bool
    units: tuple[bytes, ...]


@dataclass(frozen=True)
class HvcConfig:
    """An HEVCDecoderConfigurationRecord (ISO/IEC 14496-15, 8.3.3.1)."""

    profile_space: int
    tier: int
    profile_idc: int
    compat_flags: int
    constraint_flags: int
    level_idc: int
    min_spatial_segmentation: int
    parallelism_type: int
    chroma_format: int
    bit_depth_luma: int
    bit_depth_chroma: int
    avg_frame_rate: int
    constant_frame_rate: int
    num_temporal_layers: int
    temporal_id_nested: bool
    length_size: int
    arrays: tuple[HvcArray, ...]
    trailer: bytes = field(default=b"")  # bytes after the arrays, kept as they are

    def units(self, kind: int) -> list[bytes]:
        """Every NAL unit of one type, over all arrays."""
        return [unit for array in self.arrays if array.nal_type == kind for unit in array.units]


def _take(data: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(data):
        raise HevcUnsupported("truncated hvcC record")
    return data[pos : pos + size]


def parse_hvcc(data: bytes) -> HvcConfig:
    """Parse an ``hvcC`` record body."""
    head = _take(data, 0, 23)
    if head[0] != 1:
        raise HevcUnsupported(f"hvcC configurationVersion {head[0]}, expected 1")
    pos = 23
    arrays = []
    for _ in range(head[22]):
        kind_byte = _take(data, pos, 1)[0]
        count = int.from_bytes(_take(data, pos + 1, 2), "big")
        pos += 3
        units = []
        for _ in range(count):
            size = int.from_bytes(_take(data, pos, 2), "big")
            units.append(bytes(_take(data, pos + 2, size)))
            pos += 2 + size
        arrays.append(HvcArray(kind_byte & 0x3F, bool(kind_byte & 0x80), tuple(units)))
    return HvcConfig(
        profile_space=head[1] >> 6,
        tier=(head[1] >> 5) & 1,
        profile_idc=head[1] & 0x1F,
        compat_flags=int.from_bytes(head[2:6], "big"),
        constraint_flags=int.from_bytes(head[6:12], "big"),
        level_idc=head[12],
        min_spatial_segmentation=int.from_bytes(head[13:15], "big") & 0xFFF,
        parallelism_type=head[15] & 3,
        chroma_format=head[16] & 3,
        bit_depth_luma=(head[17] & 7) + 8,
        bit_depth_chroma=(head[18] & 7) + 8,
        avg_frame_rate=int.from_bytes(head[19:21], "big"),
        constant_frame_rate=head[21] >> 6,
        num_temporal_layers=(head[21] >> 3) & 7,
        temporal_id_nested=bool(head[21] & 4),
        length_size=(head[21] & 3) + 1,
        arrays=tuple(arrays),
        trailer=bytes(data[pos:]),
    )


def build_hvcc(cfg: HvcConfig) -> bytes:
    """An ``hvcC`` record body (reserved bits set to one, as the format says)."""
    if cfg.length_size not in (1, 2, 4):
        raise HevcUnsupported(f"NAL length size {cfg.length_size}")
    out = bytearray([1, (cfg.profile_space << 6) | (cfg.tier << 5) | cfg.profile_idc])
    out += cfg.compat_flags.to_bytes(4, "big") + cfg.constraint_flags.to_bytes(6, "big")
    out.append(cfg.level_idc)
    out += (0xF000 | cfg.min_spatial_segmentation).to_bytes(2, "big")
    out += bytes([0xFC | cfg.parallelism_type, 0xFC | cfg.chroma_format])
    out += bytes([0xF8 | (cfg.bit_depth_luma - 8), 0xF8 | (cfg.bit_depth_chroma - 8)])
    out += cfg.avg_frame_rate.to_bytes(2, "big")
    out.append(
        (cfg.constant_frame_rate << 6)
        | (cfg.num_temporal_layers << 3)
        | (cfg.temporal_id_nested << 2)
        | (cfg.length_size - 1)
    )
    out.append(len(cfg.arrays))
    for array in cfg.arrays:
        out.append((array.complete << 7) | array.nal_type)
        out += len(array.units).to_bytes(2, "big")
        for unit in array.units:
            if len(unit) > 0xFFFF:
                raise HevcUnsupported("NAL unit too large for hvcC")
            out += len(unit).to_bytes(2, "big") + unit
    return bytes(out + cfg.trailer)


def _as_config(record: HvcConfig | bytes) -> HvcConfig:
    return record if isinstance(record, HvcConfig) else parse_hvcc(record)


def hvcc_from_parameter_sets(nals: Iterable[bytes], length_size: int) -> HvcConfig:
    """An ``hvcC`` record for an encoder's parameter sets, its header read from
    the (first) SPS. Stream-wide promises the SPS cannot tell are left at
    "unknown": min_spatial_segmentation 0, parallelismType 0, frame rate 0."""
    by_type: dict[int, list[bytes]] = {}
    for nal in nals:
        by_type.setdefault(nal_type(nal), []).append(nal)
    if not all(by_type.get(kind) for kind in _PARAMETER_SETS):
        raise HevcUnsupported("a VPS, an SPS and a PPS are needed")
    sps = parse_sps(by_type[SPS_NUT][0])
    return HvcConfig(
        profile_space=sps.ptl.profile_space,
        tier=sps.ptl.tier,
        profile_idc=sps.ptl.profile_idc,
        compat_flags=sps.ptl.compat_flags,
        constraint_flags=sps.ptl.constraint_flags,
        level_idc=sps.ptl.level_idc,
        min_spatial_segmentation=0,
        parallelism_type=0,
        chroma_format=sps.chroma_format_idc,
        bit_depth_luma=sps.bit_depth_luma,
        bit_depth_chroma=sps.bit_depth_chroma,
        avg_frame_rate=0,
        constant_frame_rate=0,
        num_temporal_layers=sps.max_sub_layers,
        temporal_id_nested=sps.temporal_id_nesting,
        length_size=length_size,
        arrays=tuple(
            HvcArray(kind, kind in _PARAMETER_SETS, tuple(units))
            for kind, units in sorted(by_type.items())
        ),
    )


def _set_id(nal: bytes, kind: int) -> int:
    """The own id of a VPS, SPS or PPS NAL unit (of type ``kind``, else raise)."""
    if kind == VPS_NUT:
        return parse_vps(nal).vps_id
    if kind == SPS_NUT:
        return parse_sps(nal).sps_id
    return parse_pps(nal).pps_id


def merge_hvcc(base: HvcConfig | bytes, *others: HvcConfig | bytes) -> bytes:
    """One ``hvcC`` listing the parameter sets of every part.

    The header is the base's (the source's): its profile, tier and level
    are what the output says. Parts must share the base's chroma format,
    bit depths and NAL length size. Sets equal to one already listed are
    listed once; two different sets of one type with one id raise. Arrays
    other than parameter sets (declarative SEI) come from the base only: a
    re-encoded part's would claim the whole stream. Where a part breaks a
    stream-wide promise of the base (parallelism, segmentation, temporal id
    nesting), the merged record says "unknown" instead.
    """
    cfg = _as_config(base)
    parts = [_as_config(other) for other in others]
    # Stream-wide promises; 0 says "unknown" (or "not nested") for each.
    promises = {
        "min_spatial_segmentation": cfg.min_spatial_segmentation,
        "parallelism_type": cfg.parallelism_type,
        "num_temporal_layers": cfg.num_temporal_layers,
        "temporal_id_nested": int(cfg.temporal_id_nested),
    }
    for part in parts:
        for attr in ("chroma_format", "bit_depth_luma", "bit_depth_chroma", "length_size"):
            if getattr(part, attr) != getattr(cfg, attr):
                raise HevcUnsupported(
                    f"parts differ in {attr}: {getattr(cfg, attr)} vs {getattr(part, attr)}"
                )
        for attr, value in promises.items():
            if int(getattr(part, attr)) != value:
                promises[attr] = 0
    arrays: list[HvcArray] = []
    for kind in _PARAMETER_SETS:
        units: list[bytes] = []
        ids: dict[int, bytes] = {}
        for config in (cfg, *parts):
            for unit in config.units(kind):
                if unit in units:
                    continue
                set_id = _set_id(unit, kind)
                if set_id in ids:
                    raise HevcUnsupported(f"two parameter sets of type {kind} use id {set_id}")
                ids[set_id] = unit
                units.append(unit)
        if units:
            arrays.append(HvcArray(kind, True, tuple(units)))
    arrays += [array for array in cfg.arrays if array.nal_type not in _PARAMETER_SETS]
    merged = HvcConfig(
        profile_space=cfg.profile_space,
        tier=cfg.tier,
        profile_idc=cfg.profile_idc,
        compat_flags=cfg.compat_flags,
        constraint_flags=cfg.constraint_flags,
        level_idc=cfg.level_idc,
        min_spatial_segmentation=promises["min_spatial_segmentation"],
        parallelism_type=promises["parallelism_type"],
        chroma_format=cfg.chroma_format,
        bit_depth_luma=cfg.bit_depth_luma,
        bit_depth_chroma=cfg.bit_depth_chroma,
        avg_frame_rate=cfg.avg_frame_rate,
        constant_frame_rate=cfg.constant_frame_rate,
        num_temporal_layers=promises["num_temporal_layers"],
        temporal_id_nested=bool(promises["temporal_id_nested"]),
        length_size=cfg.length_size,
        arrays=tuple(arrays),
        trailer=cfg.trailer,
    )
    return build_hvcc(merged)


# -- id rewriting ----------------------------------------------------------------


class ParamIds(NamedTuple):
    """Ids of one VPS, SPS and PPS."""

    vps: int
    sps: int
    pps: int


def free_ids(hvcc: HvcConfig | bytes) -> ParamIds:
    """The lowest VPS, SPS and PPS ids the record does not use.

    For a second re-encoded part, ask again with the record that already
    lists the first part's sets (or give both parts the same ids when their
    sets are equal: :func:`merge_hvcc` lists equal sets once).
    """
    cfg = _as_config(hvcc)
    free = []
    for kind in _PARAMETER_SETS:
        used = {_set_id(unit, kind) for unit in cfg.units(kind)}
        first = next((i for i in range(_MAX_IDS[kind]) if i not in used), None)
        if first is None:
            raise HevcUnsupported(f"no free id for NAL unit type {kind}")
        free.append(first)
    return ParamIds(*free)


def _recode(
    rbsp: bytes, fields: Sequence[tuple[int, int, int, int | None]], end_bits: int
) -> bytes:
    """Copy the RBSP's bits up to ``end_bits`` with some fields replaced, then
    trailing bits. Each field is (start, end, value, width): ``width`` None
    writes ue(v), else u(width)."""
    out = BitWriter()
    pos = 0
    for start, end, value, width in fields:
        out.copy(rbsp, pos, start)
        if width is None:
            out.ue(value)
        else:
            out.u(width, value)
        pos = end
    out.copy(rbsp, pos, end_bits)
    out.trailing_bits()
    return out.to_bytes()


def _with_payload(nal: bytes, rbsp: bytes) -> bytes:
    return nal[:2] + escape(rbsp)


class IdRewriter:
    """Rewrites one encoded stream's VPS, SPS and PPS ids, in its parameter sets
    and in every slice segment header.

    Made from the stream's parameter sets (an encoder's global header: one
    VPS, SPS and PPS, as x265 writes them), :attr:`parameter_sets` are the
    rewritten sets for the ``hvcC``, and :meth:`rewrite` / :meth:`sample` do
    the stream's NAL units. A NAL unit whose syntax is not known raises
    :class:`HevcUnsupported`.
    """

    def __init__(self, parameter_sets: Iterable[bytes], ids: ParamIds) -> None:
        by_type: dict[int, list[bytes]] = {}
        for nal in parameter_sets:
            by_type.setdefault(_header(nal), []).append(bytes(nal))
        if sorted(by_type) != list(_PARAMETER_SETS) or any(len(v) != 1 for v in by_type.values()):
            kinds = {kind: len(units) for kind, units in by_type.items()}
            raise HevcUnsupported(f"expected one VPS, SPS and PPS, got {kinds} (type: count)")
        for kind, value in zip(_PARAMETER_SETS, ids, strict=True):
            if not 0 <= value < _MAX_IDS[kind]:
                raise HevcUnsupported(f"id {value} for NAL unit type {kind}")
        (vps_nal,), (sps_nal,), (pps_nal,) = (by_type[kind] for kind in _PARAMETER_SETS)
        self.ids = ids
        self.vps, self.sps, self.pps = parse_vps(vps_nal), parse_sps(sps_nal), parse_pps(pps_nal)
        if self.sps.vps_id != self.vps.vps_id or self.pps.sps_id != self.sps.sps_id:
            raise HevcUnsupported("the parameter sets do not refer to each other")
        if self.sps.ptl.profile_idc not in _KNOWN_PROFILES:
            raise HevcUnsupported(f"HEVC profile {self.sps.ptl.profile_idc} is not supported")
        self._originals = {VPS_NUT: vps_nal, SPS_NUT: sps_nal, PPS_NUT: pps_nal}
        self._pps_by_id = {self.pps.pps_id: self.pps}
        self._sps_by_id = {self.sps.sps_id: self.sps}
        self._rewritten = {
            VPS_NUT: self._rewrite_vps(vps_nal),
            SPS_NUT: self._rewrite_sps(sps_nal),
            PPS_NUT: self._rewrite_pps(pps_nal),
        }
        self.parameter_sets: tuple[bytes, ...] = tuple(self._rewritten.values())

    def _rewrite_vps(self, nal: bytes) -> bytes:
        rbsp = unescape(nal[2:])
        fields = [(0, 4, self.ids.vps, 4)]
        return _with_payload(nal, _recode(rbsp, fields, _stop_bit(rbsp)))

    def _rewrite_sps(self, nal: bytes) -> bytes:
        rbsp = unescape(nal[2:])
        start, end = self.sps.sps_id_bits
        fields = [(0, 4, self.ids.vps, 4), (start, end, self.ids.sps, None)]
        return _with_payload(nal, _recode(rbsp, fields, _stop_bit(rbsp)))

    def _rewrite_pps(self, nal: bytes) -> bytes:
        rbsp = unescape(nal[2:])
        pps_start, sps_start, sps_end = self.pps.id_bits
        fields = [
            (pps_start, sps_start, self.ids.pps, None),
            (sps_start, sps_end, self.ids.sps, None),
        ]
        return _with_payload(nal, _recode(rbsp, fields, _stop_bit(rbsp)))

    def hvcc(self, length_size: int) -> HvcConfig:
        """An ``hvcC`` record of the rewritten parameter sets."""
        return hvcc_from_parameter_sets(self.parameter_sets, length_size)

    def rewrite(self, nal: bytes) -> bytes:
        """One NAL unit of the stream with the new ids."""
        kind = _header(nal)
        if kind in self._originals:
            if nal != self._originals[kind]:
                raise HevcUnsupported(f"an in-band parameter set (type {kind}) that differs")
            return self._rewritten[kind]
        if kind <= RASL_R or BLA_W_LP <= kind <= CRA_NUT:
            return self._rewrite_slice(kind, nal)
        if kind == PREFIX_SEI_NUT:
            _check_sei(nal)
        elif kind < VPS_NUT:  # reserved VCL types: 10-15, 22-31
            raise HevcUnsupported(f"reserved VCL NAL unit type {kind}")
        return nal

    def _rewrite_slice(self, kind: int, nal: bytes) -> bytes:
        payload = nal[2:]
        rbsp = unescape(payload)
        header = _parse_slice_header(kind, rbsp, self._pps_by_id, self._sps_by_id)
        start, end = header.pps_id_bits
        new_header = _recode(rbsp, [(start, end, self.ids.pps, None)], header.end_bits)
        # The slice data bytes are kept as they are, escaped: both the old and
        # the new header end in a non-zero byte (byte_alignment's one bit), so
        # no 0x0000 pattern spans the boundary and the data's emulation
        # prevention (which entry point offsets count) stays valid.
        data = payload[_escaped_offset(payload, header.data_offset) :]
        return nal[:2] + escape(new_header) + data

    def sample(self, packet: bytes, length_size: int) -> bytes:
        """An encoder packet (Annex B) as an MP4 sample with the new ids. Parameter
        sets (in the ``hvcC`` of an ``hvc1`` track) and delimiters are dropped."""
        nals = []
        for nal in split_annexb(packet):
            rewritten = self.rewrite(nal)
            if nal_type(nal) not in (*_PARAMETER_SETS, AUD_NUT):
                nals.append(rewritten)
        return join_sample(nals, length_size)


def rewrite_ids(parameter_sets: Iterable[bytes], ids: ParamIds) -> IdRewriter:
    """A rewriter of the stream whose parameter sets are given to ``ids``."""
    return IdRewriter(parameter_sets, ids)


# SEI messages that name a parameter set: buffering period (its SPS),
# active parameter sets, and scalable nesting (which may hold either).
_SEI_WITH_IDS = {0: "buffering period", 129: "active parameter sets", 133: "scalable nesting"}


def _sei_number(r: BitReader) -> int:
    """payloadType or payloadSize: 0xFF bytes (255 each), then the last byte."""
    value = 0
    while (byte := r.u(8)) == 0xFF:
        value += 255
    return value + byte


def _check_sei(nal: bytes) -> None:
    """Raise if a prefix SEI carries a message that names a parameter set."""
    r = BitReader(unescape(nal[2:]))
    while r.more_rbsp_data():
        payload_type, payload_size = _sei_number(r), _sei_number(r)
        if payload_type in _SEI_WITH_IDS:
            raise HevcUnsupported(f"SEI message {_SEI_WITH_IDS[payload_type]} names a set id")
        r.skip(8 * payload_size)


# -- x265 --------------------------------------------------------------------------

# x265 settings for re-encoded parts, chosen so that their slice headers stay
# simple to rewrite and the part joins the source cleanly:
# - bframes=0: packets come in presentation order;
# - keyint=-1, scenecut=0, open-gop=0: one IDR at the start, no other keyframe;
# - repeat-headers=0, annexb=1: parameter sets once, in the global header;
# - info=0, hrd=0, aud=0: no SEI with encoder settings, no buffering period SEI
#   (it names an SPS id), no delimiters;
# - wpp=0 (one slice per picture is x265's default): no entry points in slice
#   headers. On 2 cores at ultrafast, 720p, x265 makes up for WPP with frame
#   threads: 30 frames took 1.06-1.13 s with WPP off and 1.10-1.38 s with it on.
# - log-level=error: level enforcement warns about VBV on every open.
X265_PARAMS = ":".join(
    (
        "bframes=0",
        "keyint=-1",
        "scenecut=0",
        "open-gop=0",
        "repeat-headers=0",
        "annexb=1",
        "info=0",
        "hrd=0",
        "aud=0",
        "wpp=0",
        "slices=1",
        "log-level=error",
    )
)

_X265_PROFILES = {(1, 8): "main", (2, 10): "main10"}


def x265_profile_options(source: HvcConfig | bytes) -> dict[str, str]:
    """libx265 options (``profile``, ``x265-params``) for frames that join the source.

    With ``level-idc`` and ``high-tier`` given, x265 writes that level and tier
    in its VPS and SPS (it enables VBV at the level's limits, which it warns
    about), so the re-encoded part's sets say the source's profile, tier and
    level. A level too low for the picture size fails the encoder's open.
    ``x265-params`` includes :data:`X265_PARAMS`. Main and Main 10 (4:2:0)
    only; the encoder's pixel format must be the source's (x265 writes Main
    for 8-bit input whatever the profile asked).
    """
    cfg = _as_config(source)
    depth = cfg.bit_depth_luma
    profile = _X265_PROFILES.get((cfg.profile_idc, depth))
    if profile is None or cfg.chroma_format != 1 or cfg.bit_depth_chroma != depth:
        raise HevcUnsupported(
            f"HEVC profile {cfg.profile_idc} at {depth} bits, chroma format"
            f" {cfg.chroma_format}: x265 cannot match it"
        )
    level = cfg.level_idc
    if level % 3 or not 30 <= level <= 186:
        raise HevcUnsupported(f"HEVC level_idc {level}")
    major, minor = divmod(level // 3, 10)
    params = f"{X265_PARAMS}:level-idc={major}.{minor}:high-tier={cfg.tier}"
    return {"profile": profile, "x265-params": params}
