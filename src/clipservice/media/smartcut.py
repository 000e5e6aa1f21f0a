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

import contextlib
import heapq
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av.codec.context import Flags
from av.video.frame import PictureType

from clipservice.media.ffmpeg import SOURCE_INPUT_OPTIONS

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
    color: tuple[tuple[str, int], ...]  # (codec context attribute, value)
    frame_rate: Fraction | None = None


def video_params(stream: Any) -> VideoParams:
    cc = stream.codec_context
    color: list[tuple[str, int]] = []
    for attr in _COLOR_ATTRS:
        value = getattr(cc, attr, None)
        number = int(value) if isinstance(value, int) else getattr(value, "value", None)
        unspecified = (0,) if attr == "color_range" else (0, 2)
        if isinstance(number, int) and number not in unspecified:
            color.append((attr, number))
    extradata = bytes(cc.extradata or b"")
    cfg = parse_avcc(extradata) if cc.name == "h264" else None
    rate = stream.average_rate or stream.guessed_rate
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
        frame_rate=Fraction(rate) if rate else None,
    )


# Colour description copied from the source into the re-encoded frames' VUI.
_COLOR_ATTRS = ("color_primaries", "color_trc", "colorspace", "color_range")


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


# -- re-encoding partial GOPs, in process ------------------------------------
#
# The partial GOPs are decoded and encoded with PyAV (libavcodec and libx264
# in this process, the GIL released while they work) rather than by an FFmpeg
# process: no process start, no second read of the source's index, no part
# files to write and read back, and the head, the copied middle and the tail
# are fetched side by side. Every loop checks the clip's deadline and its
# cancel flag between packets, so a cut stops within one frame's work.


@dataclass(frozen=True)
class EncoderSpec:
    """x264 settings that make re-encoded frames fit the source's stream."""

    profile: str  # x264 profile name: baseline | main | high
    level: str  # e.g. "3.1"
    pix_fmt: str
    width: int
    height: int
    time_base: Fraction
    frame_rate: Fraction | None
    color: tuple[tuple[str, int], ...] = ()

    @classmethod
    def matching(cls, params: VideoParams) -> EncoderSpec:
        return cls(
            profile=x264_profile(params),
            level=x264_level(params),
            pix_fmt=params.pix_fmt or "yuv420p",
            width=params.width,
            height=params.height,
            time_base=params.time_base,
            frame_rate=params.frame_rate,
            color=params.color,
        )

    def open(self, sps: int) -> Any:
        """An open libx264 encoder whose parameter sets use id ``sps``.

        The fastest preset (a GOP or two of frames) at a low CRF, one thread
        (clips cut side by side share the cores), no B-frames (packets come
        in presentation order), and the parameter sets out of band (global
        header) so they are known before the first frame is encoded.
        """
        enc = av.CodecContext.create("libx264", "w")
        enc.width, enc.height, enc.pix_fmt = self.width, self.height, self.pix_fmt
        enc.time_base = self.time_base
        if self.frame_rate:
            enc.framerate = self.frame_rate
        for attr, value in self.color:
            setattr(enc, attr, value)
        enc.thread_count = 1
        enc.flags |= Flags.global_header
        enc.options = {
            "preset": "ultrafast",
            "crf": str(ENCODE_CRF),
            "profile": self.profile,
            "level": self.level,
            "bf": "0",
            "x264-params": ":".join((f"sps-id={sps}", *_PROFILE_FEATURES[self.profile])),
        }
        try:
            enc.open()
        except av.FFmpegError as exc:
            raise SmartCutUnsupported(f"x264 cannot match the source: {exc}") from exc
        return enc


# Visually transparent for frames that sit between copied source frames.
ENCODE_CRF = 16
# x264 writes the lowest profile its features need, and ultrafast needs only
# Baseline: one cheap feature of the source's profile makes the parameter
# sets say that profile (8x8 transforms cost ~10 % more time, weighted
# prediction nothing measurable).
_PROFILE_FEATURES: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "main": ("weightp=1",),
    "high": ("8x8dct=1",),
}


@dataclass(frozen=True)
class GopEncode:
    """Frames of one source GOP to re-encode: decoded from the GOP's keyframe
    at ``key_pts``, encoded are the frames shown at ``frame_pts`` (sorted)."""

    key_pts: int
    frame_pts: tuple[int, ...]
    sps_id: int


@dataclass(frozen=True)
class CopySpan:
    """Source packets to copy: the GOPs from the keyframe at ``key_pts`` on,
    the frames before ``end_pts`` (source ticks)."""

    key_pts: int
    end_pts: int
    stop_at_keyframe: bool  # end_pts is a keyframe: stop there (B-frame safe)
    cutoff_dts: int | None = None  # with B-frames: stop at this decode time


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
    head: GopEncode | None
    copy: CopySpan | None
    tail: GopEncode | None
    audio: Path | None  # re-encoded audio of exactly the clip's span, or
    audio_copy: AudioCopy | None  # AAC packets copied from the source
    encoder: EncoderSpec | None = None  # needed when head or tail is set
    avcc: AvcConfig | None = None  # the source's, needed when head or tail is set


class Cancelled(Exception):
    """The cut was cancelled (its job was deleted or the service is stopping)."""


@dataclass
class _Guard:
    """A clip's deadline and cancel flag, checked by every loop of the join,
    and the first error any of its threads met (the one to report)."""

    deadline: float
    cancel: threading.Event
    error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not isinstance(exc, Cancelled):
            self.error = exc
        self.cancel.set()  # the other parts stop too

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise TimeoutError


def open_source(url: str) -> Any:
    """A source opened by PyAV under the same rules as FFmpeg's inputs.

    The time limit is FFmpeg's own ``rw_timeout`` on every network read, not
    PyAV's ``timeout``: that one is an interrupt callback which takes the GIL
    on every read, so clips read on several threads would queue for the GIL.
    """
    options = {**SOURCE_INPUT_OPTIONS, "rw_timeout": str(int(_OPEN_TIMEOUT_S * 1e6))}
    return av.open(url, options=options)


def _nal_units(data: bytes) -> list[bytes]:
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
    units = _nal_units(extradata)
    sps = tuple(u for u in units if u[0] & 0x1F == 7)
    pps = tuple(u for u in units if u[0] & 0x1F == 8)
    if not sps or not pps:
        raise SmartCutUnsupported("the encoder gave no parameter sets")
    return AvcConfig(sps[0][1], sps[0][2], sps[0][3], length_size, sps, pps, b"")


def to_length_prefixed(data: bytes, length_size: int) -> bytes:
    """An Annex B access unit as MP4 samples carry it; parameter sets and access
    unit delimiters are dropped (the avcC holds the sets)."""
    return b"".join(
        len(u).to_bytes(length_size, "big") + u
        for u in _nal_units(data)
        if u[0] & 0x1F not in (7, 8, 9)
    )


@dataclass(frozen=True)
class _Encoded:
    """One re-encoded frame, ready to mux: MP4 sample bytes and its source time."""

    data: bytes
    pts: int
    keyframe: bool


def _reencode_gop(
    url: str, part: GopEncode, enc: Any, length_size: int, guard: _Guard
) -> list[_Encoded]:
    """Decode the GOP at ``part.key_pts`` and encode the frames ``part`` wants.

    Only what those frames need is decoded: frames before the first wanted one
    that no other frame refers to (most B-frames) are skipped. Decoding and
    encoding run on two threads, so one clip's ends are cut on two cores.
    """
    wanted = set(part.frame_pts)
    # Bounded: a long GOP of large frames must not pile up decoded pictures
    # (a 4K frame is 12 MB) while the encoder catches up.
    frames: queue.Queue[Any] = queue.Queue(maxsize=_FRAME_QUEUE)
    encoder = _Worker(lambda: _encode_frames(frames, enc, guard), guard)
    got = 0

    def encode(decoded: list[Any]) -> None:
        nonlocal got
        for frame in decoded:
            if frame.pts in wanted:
                got += 1
                frame.pict_type = PictureType.NONE  # the encoder decides
                _put(frames, frame, guard)

    try:
        with open_source(url) as source:
            vin = source.streams.video[0]
            dec = av.CodecContext.create(vin.codec_context.name, "r")
            dec.extradata = vin.codec_context.extradata
            dec.thread_count = 1
            for packet in _packets_from(source, part.key_pts, guard):
                if packet.is_keyframe and packet.pts != part.key_pts:
                    break  # the next GOP
                dec.skip_frame = "DEFAULT" if packet.pts in wanted else "NONREF"
                encode(_decode(dec, packet))
                if got == len(wanted):
                    break
            if got < len(wanted):
                encode(_decode(dec, None))
    finally:
        _put(frames, None, guard, stopping=True)  # the encoder flushes and ends
    packets: list[Any] = encoder.result()
    if got != len(wanted) or len(packets) != len(part.frame_pts):
        raise SmartCutUnsupported(
            f"re-encoded {len(packets)} of {len(part.frame_pts)} frames (decoded {got})"
        )
    return [
        _Encoded(to_length_prefixed(bytes(p), length_size), pts, bool(p.is_keyframe))
        for p, pts in zip(packets, part.frame_pts, strict=True)
    ]


_FRAME_QUEUE = 8


def _put(q: queue.Queue[Any], item: Any, guard: _Guard, *, stopping: bool = False) -> None:
    """Put on a bounded queue, giving up when the cut is stopped (unless this
    is the end marker of a part that is stopping anyway: then drop it)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if guard.cancel.is_set() or time.monotonic() > guard.deadline:
                if stopping:
                    return  # the reader of q stops on its own guard check
                guard.check()


def _get(q: queue.Queue[Any], guard: _Guard) -> Any:
    """Take from a queue, checking between waits that the cut still runs."""
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            guard.check()


def _packets_from(source: Any, key_pts: int, guard: _Guard) -> Iterator[Any]:
    """The video packets from the keyframe at ``key_pts`` on, in decode order
    (the first one checked to be that keyframe), until the caller stops."""
    vin = source.streams.video[0]
    source.seek(key_pts, stream=vin, backward=True, any_frame=False)
    first = True
    for packet in source.demux(vin):
        guard.check()
        if packet.size == 0:  # the demuxer's end-of-stream flush packet
            continue
        if packet.pts is None or packet.dts is None:
            raise SmartCutUnsupported("source packet without timestamps")
        if first and (not packet.is_keyframe or packet.pts != key_pts):
            raise SmartCutUnsupported("reading does not start on the expected keyframe")
        first = False
        yield packet


def _decode(dec: Any, packet: Any) -> list[Any]:
    try:
        return list(dec.decode(packet))
    except av.error.InvalidDataError as exc:  # FFmpeg's own re-encode may cope
        raise SmartCutUnsupported(f"the source does not decode cleanly: {exc}") from exc


def _encode_frames(frames: queue.Queue[Any], enc: Any, guard: _Guard) -> list[Any]:
    """Encode frames from the queue until None, then flush the encoder."""
    packets: list[Any] = []
    while True:
        frame = _get(frames, guard)
        if frame is None:
            packets.extend(enc.encode(None))
            return packets
        guard.check()
        packets.extend(enc.encode(frame))


class _Worker:
    """A function run on its own thread; ``result()`` waits and re-raises."""

    def __init__(self, fn: Callable[[], Any], guard: _Guard) -> None:
        self._fn = fn
        self._guard = guard
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="clip-part")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the joining thread
            self._error = exc
            self._guard.fail(exc)

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value

    def stop(self) -> None:
        self._guard.cancel.set()
        self._thread.join()


_COPY_QUEUE_PACKETS = 256  # read ahead of the muxer by up to ~8 s of video
_END = object()


def _read_copy(source: Any, span: CopySpan, out: queue.Queue[Any], guard: _Guard) -> int:
    """Put the copied span's packets on ``out`` (then _END); return their count.
    Takes over (and closes) the open ``source``."""

    copied = 0
    with source:
        for packet in _packets_from(source, span.key_pts, guard):
            if packet.pts < span.key_pts:
                raise SmartCutUnsupported("open GOP: a frame shows before its keyframe")
            if span.cutoff_dts is not None:
                if packet.dts >= span.cutoff_dts:
                    break
            elif span.stop_at_keyframe and packet.is_keyframe and packet.pts >= span.end_pts:
                break
            elif packet.pts >= span.end_pts:
                if span.stop_at_keyframe:
                    raise SmartCutUnsupported("frames past the end inside a copied GOP")
                break  # no reordering: nothing before the end refers to this frame
            copied += 1
            _put(out, packet, guard)
    _put(out, _END, guard)
    return copied


def join(plan: JoinPlan, out: Path, deadline: float) -> int:
    """Write the clip to ``out``; return its video frame count.

    The re-encoded head and tail and the copied middle are each read on their
    own thread (and connection), so fetching the middle overlaps encoding the
    ends; this thread muxes them in order with the audio.
    """
    guard = _Guard(deadline, threading.Event())
    extradata = None
    encoders: dict[str, Any] = {}
    if plan.head is not None or plan.tail is not None:
        if plan.encoder is None or plan.avcc is None:
            raise ValueError("re-encoding needs the encoder spec and the source's avcC")
        configs = []
        for role, part in (("head", plan.head), ("tail", plan.tail)):
            if part is not None:
                encoders[role] = plan.encoder.open(part.sps_id)
                configs.append(
                    annexb_config(bytes(encoders[role].extradata), plan.avcc.length_size)
                )
        extradata = merge_avcc(plan.avcc, *configs)
    length = plan.avcc.length_size if plan.avcc is not None else 4
    workers: list[_Worker] = []
    copied: queue.Queue[Any] = queue.Queue(maxsize=_COPY_QUEUE_PACKETS)
    source = None
    try:
        # The ends first: their decoding is the long pole, so it starts while
        # the output is set up.
        head = tail = copy = None
        if plan.head is not None:
            part, enc = plan.head, encoders["head"]
            head = _Worker(lambda: _reencode_gop(plan.video_url, part, enc, length, guard), guard)
            workers.append(head)
        if plan.tail is not None:
            tpart, tenc = plan.tail, encoders["tail"]
            tail = _Worker(lambda: _reencode_gop(plan.video_url, tpart, tenc, length, guard), guard)
            workers.append(tail)
        source = open_source(plan.video_url)  # the output's template, then the copy's reader
        with av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as oc:
            vout = oc.add_stream_from_template(source.streams.video[0])
            if extradata is not None:
                vout.codec_context.extradata = extradata
            vout.time_base = plan.time_base
            if plan.copy is not None:
                span, reader, source = plan.copy, source, None
                copy = _Worker(lambda: _read_copy(reader, span, copied, guard), guard)
                workers.append(copy)
            return _mux(plan, oc, vout, head, copy, copied, tail, guard)
    except BaseException as exc:
        guard.fail(exc)  # the parts stop (and are joined below)
        # A failed or stopped join leaves no partial output behind.
        with contextlib.suppress(OSError):
            out.unlink()
        cause = guard.error if guard.error is not None else exc  # not another part's stop
        if isinstance(cause, av.FFmpegError):  # the source failed mid-read (a 403…)
            raise SmartCutUnsupported(f"reading the source failed: {cause}") from cause
        if cause is not exc:
            raise cause from None
        raise
    finally:
        for worker in workers:
            worker.stop()
        if source is not None:
            source.close()


def _mux(
    plan: JoinPlan,
    oc: Any,
    vout: Any,
    head: _Worker | None,
    copy: _Worker | None,
    copied: queue.Queue[Any],
    tail: _Worker | None,
    guard: _Guard,
) -> int:
    tb = plan.time_base
    origin = plan.origin_pts
    counter = 0
    audio_in = None
    if plan.audio is not None:
        audio_in = av.open(str(plan.audio))
    elif plan.audio_copy is not None:
        audio_in = open_source(plan.audio_copy.url)
    try:
        aout = None
        if audio_in is not None:
            aout = oc.add_stream_from_template(audio_in.streams.audio[0])

        def emit(packet: Any, pts: int, dts: int) -> tuple[float, int, Any]:
            nonlocal counter
            counter += 1
            packet.stream = vout
            packet.time_base = tb
            packet.pts = pts
            packet.dts = dts
            return (float(dts * tb), 0, packet)

        def encoded(worker: _Worker) -> Iterator[tuple[float, int, Any]]:
            for frame in worker.result():
                packet = av.Packet(frame.data)
                packet.is_keyframe = frame.keyframe
                pts = frame.pts - origin
                yield emit(packet, pts, pts - plan.reorder_ticks)

        def video() -> Iterator[tuple[float, int, Any]]:
            if head is not None:
                yield from encoded(head)
            if copy is not None:
                while True:
                    packet = _get(copied, guard)
                    if packet is _END:
                        break
                    yield emit(packet, packet.pts - origin, packet.dts - origin)
                copy.result()
            if tail is not None:
                yield from encoded(tail)

        streams: list[Iterator[tuple[float, int, Any]]] = [video()]
        if audio_in is not None and aout is not None:
            if plan.audio_copy is not None:
                streams.append(_copied_audio(audio_in, aout, plan.audio_copy))
            else:
                streams.append(_audio_packets(audio_in, aout))
        last_dts: int | None = None
        for _, _, packet in heapq.merge(*streams, key=lambda x: (x[0], x[1])):
            guard.check()
            if packet.stream is vout:
                if last_dts is not None and packet.dts <= last_dts:
                    raise SmartCutUnsupported("joined decode times do not increase")
                last_dts = packet.dts
            oc.mux(packet)
        return counter
    finally:
        if audio_in is not None:
            audio_in.close()


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
