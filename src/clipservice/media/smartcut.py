"""Smart cut: re-encode only the partial GOPs at a clip's ends, copy the rest.

The classic trap of smart cutting is that the re-encoded frames come with
their own SPS/PPS (the H.264 parameter sets), which differ from the source's.
Joining them naively (concat with one ``avcC``) leaves the decoder applying
the wrong parameter sets to half of the stream, or relies on in-band
parameter sets that ``avc1`` players need not honour. Here the re-encoded
parts are made with their own parameter-set *ids* (x264 ``sps-id``), and the
output's ``avcC`` lists the source's sets and the re-encoded sets side by
side. Every slice names the PPS it was coded with, so a standard decoder
(browsers included) decodes both parts with no in-band sets and no reset.

The join itself is a packet remux done with PyAV: the re-encoded head, the
source's packets from the next keyframe (read over HTTP Range), the
re-encoded tail, and the AAC audio, interleaved by time into a ``+faststart``
MP4. Every packet gets its presentation time from the source's own frame
times, so the output holds exactly the frames of [start, end).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from clipservice.media.ffmpeg import NETWORK_PROTOCOLS

_OPEN_TIMEOUT_S = 15.0
_H264_PROFILES = {
    66: "baseline",  # includes Constrained Baseline
    77: "main",
    100: "high",
}


class SmartCutUnsupported(Exception):
    """This source or clip cannot be smart-cut safely; re-encode instead."""


# -- avcC (AVCDecoderConfigurationRecord) ----------------------------------


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
        raise SmartCutUnsupported("the source's H.264 configuration is not avcC")
    pos = 5
    sets: list[list[bytes]] = []
    for mask in (0x1F, 0xFF):
        count = data[pos] & mask
        pos += 1
        items = []
        for _ in range(count):
            size = int.from_bytes(data[pos : pos + 2], "big")
            items.append(bytes(data[pos + 2 : pos + 2 + size]))
            pos += 2 + size
        sets.append(items)
    if pos > len(data):
        raise SmartCutUnsupported("truncated avcC")
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
            raise SmartCutUnsupported("NAL length sizes differ")
        sps += [s for s in other.sps if s not in sps]
        pps += [p for p in other.pps if p not in pps]
    ids = [sps_id(s) for s in sps]
    pids = [pps_id(p) for p in pps]
    if len(set(ids)) != len(ids) or len(set(pids)) != len(pids):
        raise SmartCutUnsupported("parameter-set ids collide")
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
        byte = self.data[self.pos >> 3]
        value = (byte >> (7 - (self.pos & 7))) & 1
        self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise SmartCutUnsupported("bad Exp-Golomb code")
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
        raise SmartCutUnsupported("no free parameter-set id")
    return free[:count]


# -- source stream parameters ----------------------------------------------


@dataclass(frozen=True)
class VideoParams:
    """What the re-encoded frames must match, read from the source stream."""

    codec: str
    profile_idc: int
    level_idc: int
    pix_fmt: str | None
    width: int
    height: int
    time_base: Fraction
    extradata: bytes
    color: tuple[tuple[str, str], ...]


def video_params(stream: Any) -> VideoParams:
    cc = stream.codec_context
    color: list[tuple[str, str]] = []
    for flag, attr in (
        ("-color_primaries", "color_primaries"),
        ("-color_trc", "color_trc"),
        ("-colorspace", "colorspace"),
        ("-color_range", "color_range"),
    ):
        value = getattr(cc, attr, None)
        name = _color_name(attr, value)
        if name:
            color.append((flag, name))
    extradata = bytes(cc.extradata or b"")
    cfg = parse_avcc(extradata) if cc.name == "h264" else None
    return VideoParams(
        codec=cc.name,
        profile_idc=cfg.profile_idc if cfg else 0,
        level_idc=cfg.level_idc if cfg else 0,
        pix_fmt=cc.format.name if cc.format is not None else None,
        width=cc.width,
        height=cc.height,
        time_base=stream.time_base,
        extradata=extradata,
        color=tuple(color),
    )


_COLOR_NAMES = {
    "color_primaries": {1: "bt709", 5: "bt470bg", 6: "smpte170m", 9: "bt2020"},
    "color_trc": {1: "bt709", 6: "smpte170m", 13: "iec61966-2-1", 14: "bt2020-10"},
    "colorspace": {1: "bt709", 5: "bt470bg", 6: "smpte170m", 9: "bt2020nc"},
    "color_range": {1: "tv", 2: "pc"},
}


def _color_name(attr: str, value: object) -> str | None:
    if value is None:
        return None
    number = int(value) if isinstance(value, int) else getattr(value, "value", None)
    if not isinstance(number, int):
        return None
    return _COLOR_NAMES[attr].get(number)


def check_supported(params: VideoParams) -> AvcConfig:
    """The source's avcC if x264 can make frames that join it, else raise."""
    if params.codec != "h264":
        raise SmartCutUnsupported(f"smart cut needs H.264, the source is {params.codec}")
    if params.pix_fmt not in ("yuv420p", "yuvj420p"):
        raise SmartCutUnsupported(f"pixel format {params.pix_fmt} is not supported")
    if params.profile_idc not in _H264_PROFILES:
        raise SmartCutUnsupported(f"H.264 profile {params.profile_idc} is not supported")
    return parse_avcc(params.extradata)


def x264_profile(params: VideoParams) -> str:
    return _H264_PROFILES[params.profile_idc]


def x264_level(params: VideoParams) -> str:
    return f"{params.level_idc // 10}.{params.level_idc % 10}"


# -- the join --------------------------------------------------------------


@dataclass(frozen=True)
class EncodedPart:
    """A re-encoded partial GOP on disk and the source times of its frames."""

    path: Path
    frame_pts: tuple[int, ...]  # source ticks, one per frame, in order


@dataclass(frozen=True)
class CopySpan:
    """Source packets to copy: the GOPs from the keyframe at ``key_pts`` on,
    the frames before ``end_pts`` (source ticks)."""

    key_pts: int
    end_pts: int
    expected_frames: int | None
    stop_at_keyframe: bool  # end_pts is a keyframe: stop there (B-frame safe)
    cutoff_dts: int | None = None  # fast mode with B-frames: stop at this decode time


@dataclass(frozen=True)
class AudioCopy:
    """AAC audio copied straight from the source for [start_s, end_s).

    Copying starts at the audio frame that holds ``start_s``; its first few
    milliseconds before ``start_s`` get a negative time, which the MP4 muxer
    trims with the usual AAC edit list, so audio and video start together.
    """

    url: str
    start_s: float
    end_s: float


@dataclass(frozen=True)
class JoinPlan:
    """Everything the join needs, in the source's time base."""

    video_url: str
    time_base: Fraction
    origin_pts: int  # source ticks of the clip's first frame
    reorder_ticks: int  # pts - dts of the source's keyframes
    head: EncodedPart | None
    copy: CopySpan | None
    tail: EncodedPart | None
    audio: Path | None  # re-encoded audio of exactly the clip's span, or
    audio_copy: AudioCopy | None  # AAC packets copied from the source
    extradata: bytes | None  # None: keep the source's


def _open_url(url: str) -> Any:
    return av.open(url, options={"protocol_whitelist": NETWORK_PROTOCOLS}, timeout=_OPEN_TIMEOUT_S)


def join(plan: JoinPlan, out: Path, deadline: float) -> int:
    """Write the joined clip to ``out``; return its video frame count."""
    with av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as oc:
        source = _open_url(plan.video_url)
        try:
            vin = source.streams.video[0]
            vout = oc.add_stream_from_template(vin)
            if plan.extradata is not None:
                vout.codec_context.extradata = plan.extradata
            vout.time_base = plan.time_base
            audio_in = None
            if plan.audio is not None:
                audio_in = av.open(str(plan.audio))
            elif plan.audio_copy is not None:
                audio_in = _open_url(plan.audio_copy.url)
            try:
                aout = None
                if audio_in is not None:
                    aout = oc.add_stream_from_template(audio_in.streams.audio[0])
                counter = [0]
                video = _video_packets(plan, source, vin, vout, counter, deadline)
                streams: list[Iterator[tuple[float, int, Any]]] = [video]
                if audio_in is not None and aout is not None:
                    if plan.audio_copy is not None:
                        streams.append(_copied_audio(audio_in, aout, plan.audio_copy))
                    else:
                        streams.append(_audio_packets(audio_in, aout))
                last_dts: int | None = None
                for _, _, packet in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
                    if packet.stream is vout:
                        if last_dts is not None and packet.dts <= last_dts:
                            raise SmartCutUnsupported("joined decode times do not increase")
                        last_dts = packet.dts
                    oc.mux(packet)
                return counter[0]
            finally:
                if audio_in is not None:
                    audio_in.close()
        finally:
            source.close()


def _retime(packet: Any, stream: Any, pts: int, dts: int, tb: Fraction) -> Any:
    packet.stream = stream
    packet.time_base = tb
    packet.pts = pts
    packet.dts = dts
    return packet


def _video_packets(
    plan: JoinPlan, source: Any, vin: Any, vout: Any, counter: list[int], deadline: float
) -> Iterator[tuple[float, int, Any]]:
    tb = plan.time_base
    origin = plan.origin_pts

    def emit(packet: Any, pts: int, dts: int) -> tuple[float, int, Any]:
        counter[0] += 1
        return (float(dts * tb), 0, _retime(packet, vout, pts, dts, tb))

    for part in (plan.head,):
        if part is not None:
            yield from (emit(p, pts, dts) for p, pts, dts in _encoded(part, plan))
    if plan.copy is not None:
        span = plan.copy
        source.seek(span.key_pts, stream=vin, backward=True, any_frame=False)
        copied = 0
        first = True
        for packet in source.demux(vin):
            if time.monotonic() > deadline:
                raise TimeoutError
            if packet.size == 0:
                continue
            if packet.pts is None or packet.dts is None:
                raise SmartCutUnsupported("source packet without timestamps")
            if first:
                if not packet.is_keyframe or packet.pts != span.key_pts:
                    raise SmartCutUnsupported("copy does not start on the expected keyframe")
                first = False
            if packet.pts < span.key_pts:
                raise SmartCutUnsupported("open GOP: a frame shows before its keyframe")
            if span.cutoff_dts is not None:
                if packet.dts >= span.cutoff_dts:
                    break
                copied += 1
                yield emit(packet, packet.pts - origin, packet.dts - origin)
                continue
            if span.stop_at_keyframe and packet.is_keyframe and packet.pts >= span.end_pts:
                break
            if packet.pts >= span.end_pts:
                if span.stop_at_keyframe:
                    raise SmartCutUnsupported("frames past the end inside a copied GOP")
                # No reordering: nothing before the end refers to this frame.
                break
            copied += 1
            yield emit(packet, packet.pts - origin, packet.dts - origin)
        if span.expected_frames is not None and copied != span.expected_frames:
            raise SmartCutUnsupported(f"copied {copied} frames, expected {span.expected_frames}")
    if plan.tail is not None:
        yield from (emit(p, pts, dts) for p, pts, dts in _encoded(plan.tail, plan))


def _encoded(part: EncodedPart, plan: JoinPlan) -> Iterator[tuple[Any, int, int]]:
    """The part's packets with the source times of its frames (no B-frames:
    packet order is presentation order)."""
    with av.open(str(part.path)) as c:
        packets = [p for p in c.demux(c.streams.video[0]) if p.size > 0]
        if len(packets) != len(part.frame_pts):
            raise SmartCutUnsupported(
                f"re-encoded {len(packets)} frames, expected {len(part.frame_pts)}"
            )
        for packet, src_pts in zip(packets, part.frame_pts, strict=True):
            pts = src_pts - plan.origin_pts
            yield packet, pts, pts - plan.reorder_ticks


def _audio_packets(container: Any, aout: Any) -> Iterator[tuple[float, int, Any]]:
    stream = container.streams.audio[0]
    for packet in container.demux(stream):
        if packet.size == 0 or packet.dts is None:
            continue
        tb = packet.time_base
        packet.stream = aout
        yield (float(packet.dts * tb), 1, packet)


def _copied_audio(container: Any, aout: Any, span: AudioCopy) -> Iterator[tuple[float, int, Any]]:
    stream = container.streams.audio[0]
    tb: Fraction = stream.time_base
    origin = stream.start_time or 0
    start = origin + round(Fraction(span.start_s) / tb)
    end = origin + round(Fraction(span.end_s) / tb)
    container.seek(start, stream=stream, backward=True, any_frame=False)
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None or packet.dts is None:
            continue
        if packet.pts >= end:
            break
        if packet.pts + (packet.duration or 0) <= start:
            continue
        packet.stream = aout
        packet.time_base = tb
        packet.pts -= start
        packet.dts -= start
        yield (float(packet.dts * tb), 1, packet)
