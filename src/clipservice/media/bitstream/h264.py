"""H.264 parameter sets for smart cuts: ``avcC`` records, set ids, sample format.

Re-encoded frames come with their own SPS/PPS, which differ from the
source's. x264 is told to number them with ids the source does not use
(``sps-id``), and the output's one ``avcC`` lists the source's sets and the
re-encoded sets side by side: every slice names the PPS it was coded with, so
a standard decoder (browsers included) decodes both parts with no in-band
parameter sets and no reset.
"""

from __future__ import annotations

from dataclasses import dataclass


class H264Unsupported(Exception):
    """These H.264 parameters cannot be joined safely."""


@dataclass(frozen=True)
class AvcConfig:
    """The parts of an ``avcC`` record."""

    profile_idc: int
    compat: int
    level_idc: int
    length_size: int
    sps: tuple[bytes, ...]
    pps: tuple[bytes, ...]
    trailer: bytes  # High-profile extension bytes, kept as they are


def parse_avcc(data: bytes) -> AvcConfig:
    if len(data) < 7 or data[0] != 1:
        raise H264Unsupported("the source's H.264 configuration is not avcC")
    pos = 5
    sets: list[list[bytes]] = []
    try:
        for mask in (0x1F, 0xFF):
            count = data[pos] & mask
            pos += 1
            items = []
            for _ in range(count):
                size = int.from_bytes(data[pos : pos + 2], "big")
                items.append(bytes(data[pos + 2 : pos + 2 + size]))
                pos += 2 + size
            sets.append(items)
    except IndexError:
        raise H264Unsupported("truncated avcC") from None
    if pos > len(data) or not sets[0] or not sets[1]:
        raise H264Unsupported("truncated avcC")
    return AvcConfig(
        profile_idc=data[1],
        compat=data[2],
        level_idc=data[3],
        length_size=(data[4] & 3) + 1,
        sps=tuple(sets[0]),
        pps=tuple(sets[1]),
        trailer=bytes(data[pos:]),
    )


def build_avcc(cfg: AvcConfig) -> bytes:
    out = bytearray([1, cfg.profile_idc, cfg.compat, cfg.level_idc, 0xFC | (cfg.length_size - 1)])
    out.append(0xE0 | len(cfg.sps))
    for item in cfg.sps:
        out += len(item).to_bytes(2, "big") + item
    out.append(len(cfg.pps))
    for item in cfg.pps:
        out += len(item).to_bytes(2, "big") + item
    return bytes(out + cfg.trailer)


def merge_avcc(base: AvcConfig, *others: AvcConfig) -> bytes:
    """One ``avcC`` listing the parameter sets of every part (ids must differ)."""
    sps, pps = list(base.sps), list(base.pps)
    for other in others:
        if other.length_size != base.length_size:
            raise H264Unsupported("NAL length sizes differ")
        sps += [s for s in other.sps if s not in sps]
        pps += [p for p in other.pps if p not in pps]
    ids = [sps_id(s) for s in sps]
    pids = [pps_id(p) for p in pps]
    if len(set(ids)) != len(ids) or len(set(pids)) != len(pids):
        raise H264Unsupported("parameter-set ids collide")
    merged = AvcConfig(
        base.profile_idc, base.compat, base.level_idc, base.length_size, (*sps,), (*pps,), b""
    )
    return build_avcc(merged) + base.trailer


class _Bits:
    """Reads Exp-Golomb codes from an RBSP (emulation prevention removed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data.replace(b"\x00\x00\x03", b"\x00\x00")
        self.pos = 0

    def bit(self) -> int:
        if self.pos >> 3 >= len(self.data):
            raise H264Unsupported("truncated parameter set")
        byte = self.data[self.pos >> 3]
        value = (byte >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise H264Unsupported("bad Exp-Golomb code")
        value = 0
        for _ in range(zeros):
            value = (value << 1) | self.bit()
        return (1 << zeros) - 1 + value


def sps_id(nal: bytes) -> int:
    """seq_parameter_set_id of an SPS NAL unit (after the 3 profile/level bytes)."""
    return _Bits(nal[4:]).ue()


def pps_id(nal: bytes) -> int:
    return _Bits(nal[1:]).ue()


def free_ids(cfg: AvcConfig, count: int) -> list[int]:
    """Parameter-set ids the source does not use, for the re-encoded parts."""
    used = {sps_id(s) for s in cfg.sps} | {pps_id(p) for p in cfg.pps}
    free = [i for i in range(1, 32) if i not in used]
    if len(free) < count:
        raise H264Unsupported("no free parameter-set id")
    return free[:count]


def nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (start codes removed)."""
    units = []
    pos = data.find(b"\x00\x00\x01")
    while pos >= 0:
        begin = pos + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        unit = data[begin : nxt if nxt >= 0 else len(data)].rstrip(b"\x00")
        if unit:
            units.append(unit)
        pos = nxt
    return units


def annexb_config(extradata: bytes, length_size: int) -> AvcConfig:
    """The SPS and PPS of an encoder's Annex B global header, as an avcC record."""
    units = nal_units(extradata)
    sps = tuple(u for u in units if u[0] & 0x1F == 7)
    pps = tuple(u for u in units if u[0] & 0x1F == 8)
    if not sps or not pps:
        raise H264Unsupported("the encoder gave no parameter sets")
    return AvcConfig(sps[0][1], sps[0][2], sps[0][3], length_size, sps, pps, b"")


def to_length_prefixed(data: bytes, length_size: int) -> bytes:
    """An Annex B access unit as MP4 samples carry it; parameter sets and access
    unit delimiters are dropped (the avcC holds the sets)."""
    return b"".join(
        len(u).to_bytes(length_size, "big") + u
        for u in nal_units(data)
        if u[0] & 0x1F not in (7, 8, 9)
    )


# x264 profile names by profile_idc; other profiles (High 10, 4:2:2…) are not
# smart-cut (x264's fastest settings cannot be told to match them safely).
PROFILES = {
    66: "baseline",  # includes Constrained Baseline
    77: "main",
    100: "high",
}


def level_name(level_idc: int) -> str:
    return f"{level_idc // 10}.{level_idc % 10}"


def disposable(sample: bytes, length_size: int) -> bool:
    """Whether a length-prefixed sample is a non-reference picture: every slice
    of it has ``nal_ref_idc`` 0, so no other picture is decoded from it and a
    decoder that skips it decodes the rest alike (FFmpeg's ``skip_frame
    nonref``). False for anything it cannot read."""
    pos, slices = 0, 0
    while pos + length_size <= len(sample):
        size = int.from_bytes(sample[pos : pos + length_size], "big")
        pos += length_size
        if size == 0 or pos + size > len(sample):
            return False
        header = sample[pos]
        if 1 <= header & 0x1F <= 5:  # a slice (partition) of a picture
            if header & 0x60:
                return False
            slices += 1
        pos += size
    return slices > 0 and pos == len(sample)
