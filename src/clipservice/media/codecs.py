"""Per video codec: how a smart cut decodes the source and re-encodes partial GOPs
so they join the copied samples.

- H.264: x264 numbers its parameter sets with ids the source does not use;
  the output's ``avcC`` lists both (:mod:`clipservice.media.bitstream.h264`).
- HEVC: x265 cannot be told ids, so its parameter sets and slice headers are
  rewritten to free ids; the output's ``hvcC`` lists both
  (:mod:`clipservice.media.bitstream.hevc`).
- VP9: no parameter sets; every keyframe resets the decoder, so the
  re-encoded part (libvpx, profile and bit depth of the source) needs nothing
  but to end where a source keyframe starts.
- AV1: likewise; the re-encoded part (SVT-AV1) carries its own sequence
  header in its first sample, and the first copied keyframe gets the
  source's sequence header if it lacks one, so each coded video sequence
  starts with its own (the ``av1C`` stays the source's).

Every encoder works in presentation order (no B-frames) and is opened on the
first decoded frame, whose format, size and colour it takes.
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import av
from av.codec.context import Flags

from clipservice.media.bitstream import av1 as av1_bits
from clipservice.media.bitstream import h264


class JoinUnsupported(Exception):
    """This source or clip cannot be smart-cut safely; re-encode instead."""


@dataclass(frozen=True)
class Encoded:
    """One re-encoded frame as an MP4 sample, and whether it is a keyframe."""

    data: bytes
    key: bool


# Colour description copied from the decoded source frames to the encoder.
_COLOR_ATTRS = ("color_primaries", "color_trc", "colorspace", "color_range")


class PartEncoder:
    """An encoder for one re-encoded part, opened on its first frame."""

    def __init__(
        self,
        codec: CodecJoin,
        part: int,
        time_base: Fraction,
        threads: int,
        frame_rate: Fraction | None = None,
    ) -> None:
        self.codec = codec
        self.part = part
        self.time_base = time_base
        self.frame_rate = frame_rate
        self.threads = max(1, threads)
        self.context: Any = None

    def encode(self, frame: Any | None) -> list[Encoded]:
        if self.context is None:
            if frame is None:
                return []
            self.context = self.codec.open_encoder(frame, self, self.part)
        if frame is not None:
            frame.pict_type = av.video.frame.PictureType.NONE  # the encoder decides
        return [
            self.codec.sample(bytes(p), bool(p.is_keyframe), self)
            for p in self.context.encode(frame)
        ]


def normal_scheduling() -> None:
    """Put every thread of this process back under the normal scheduling policy.

    SVT-AV1, run as root, switches the thread that opens an encoder (and
    threads of its own) to SCHED_FIFO: a real-time thread busy encoding, and
    every process started from it later (FFmpeg inherits the policy), would
    starve the rest of the machine, the API's event loop included."""
    with contextlib.suppress(OSError):
        tids = os.listdir("/proc/self/task")
        for tid in tids:
            with contextlib.suppress(OSError, ValueError):
                if os.sched_getscheduler(int(tid)) != os.SCHED_OTHER:
                    os.sched_setscheduler(int(tid), os.SCHED_OTHER, os.sched_param(0))


class CodecJoin(ABC):
    """What a smart cut of one codec needs (one instance per clip)."""

    decoder: str  # PyAV/FFmpeg decoder name
    skips_nonref: bool = False  # the decoder can skip non-reference frames

    def __init__(self, config: bytes) -> None:
        self.config = config

    def check_frame(self, frame: Any) -> None:  # noqa: B027 - optional hook
        """Raise JoinUnsupported if frames like this cannot be re-encoded to join."""

    @abstractmethod
    def open_encoder(self, frame: Any, part: PartEncoder, index: int) -> Any: ...

    def sample(self, packet: bytes, key: bool, part: PartEncoder) -> Encoded:
        return Encoded(packet, key)

    def output_config(self, parts: list[PartEncoder]) -> bytes | None:
        """The output track's codec configuration, or None to keep the source's."""
        return None

    def copied(self, data: bytes, first: bool) -> bytes:
        """A copied source sample as the output carries it."""
        return data


def _new_encoder(name: str, frame: Any, part: PartEncoder) -> Any:
    enc: Any = av.CodecContext.create(name, "w")
    enc.width, enc.height = frame.width, frame.height
    enc.pix_fmt = frame.format.name
    enc.time_base = part.time_base
    if part.frame_rate:
        enc.framerate = part.frame_rate  # rate control and level checks use it
    enc.thread_count = part.threads
    for attr in _COLOR_ATTRS:
        value = getattr(frame, attr, None)
        number = int(value) if isinstance(value, int) else getattr(value, "value", None)
        unspecified = (0,) if attr == "color_range" else (0, 2)
        if isinstance(number, int) and number not in unspecified:
            with contextlib.suppress(AttributeError, TypeError, ValueError):
                setattr(enc, attr, number)
    return enc


def _open(enc: Any) -> Any:
    try:
        enc.open()
    except av.FFmpegError as exc:
        raise JoinUnsupported(f"the encoder cannot match the source: {exc}") from exc
    return enc


# -- H.264 ----------------------------------------------------------------------

# Visually transparent for frames that sit between copied source frames.
X264_CRF = 16
# x264 writes the lowest profile its features need, and ultrafast needs only
# Baseline: one cheap feature of the source's profile makes the parameter
# sets say that profile (8x8 transforms cost ~10 % more time, weighted
# prediction nothing measurable).
_X264_PROFILE_FEATURES: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "main": ("weightp=1",),
    "high": ("8x8dct=1",),
}


class H264Join(CodecJoin):
    decoder = "h264"
    skips_nonref = True

    def __init__(self, config: bytes) -> None:
        super().__init__(config)
        try:
            self.avcc = h264.parse_avcc(config)
            if self.avcc.profile_idc not in h264.PROFILES:
                raise JoinUnsupported(
                    f"H.264 profile {self.avcc.profile_idc} is not supported for smart cuts"
                )
            self.ids = h264.free_ids(self.avcc, 2)
        except h264.H264Unsupported as exc:
            raise JoinUnsupported(str(exc)) from exc
        self.length_size = self.avcc.length_size

    def check_frame(self, frame: Any) -> None:
        if frame.format.name not in ("yuv420p", "yuvj420p"):
            raise JoinUnsupported(f"pixel format {frame.format.name} is not supported")

    def open_encoder(self, frame: Any, part: PartEncoder, index: int) -> Any:
        """libx264 with parameter-set id ``ids[index]``: the fastest preset at a
        low CRF, no B-frames (packets in presentation order), the parameter
        sets out of band (global header) so they are known before the first
        frame is encoded, the source's profile and level."""
        self.check_frame(frame)
        enc = _new_encoder("libx264", frame, part)
        enc.flags |= Flags.global_header
        profile = h264.PROFILES[self.avcc.profile_idc]
        enc.options = {
            "preset": "ultrafast",
            "crf": str(X264_CRF),
            "profile": profile,
            "level": h264.level_name(self.avcc.level_idc),
            "bf": "0",
            "x264-params": ":".join(
                (f"sps-id={self.ids[index]}", *_X264_PROFILE_FEATURES[profile])
            ),
        }
        return _open(enc)

    def sample(self, packet: bytes, key: bool, part: PartEncoder) -> Encoded:
        return Encoded(h264.to_length_prefixed(packet, self.length_size), key)

    def output_config(self, parts: list[PartEncoder]) -> bytes | None:
        opened = [p for p in parts if p.context is not None]
        if not opened:
            return None
        try:
            configs = [
                h264.annexb_config(bytes(p.context.extradata), self.length_size) for p in opened
            ]
            return h264.merge_avcc(self.avcc, *configs)
        except h264.H264Unsupported as exc:
            raise JoinUnsupported(str(exc)) from exc


# -- VP9 ------------------------------------------------------------------------


class Vp9Join(CodecJoin):
    decoder = "vp9"

    # Bit depth and chroma of each pixel format libvpx encodes, and its profile.
    _PROFILES: ClassVar[dict[str, int]] = {"yuv420p": 0, "yuv420p10le": 2}

    def check_frame(self, frame: Any) -> None:
        if frame.format.name not in self._PROFILES:
            raise JoinUnsupported(f"VP9 in {frame.format.name} is not supported for smart cuts")

    def open_encoder(self, frame: Any, part: PartEncoder, index: int) -> Any:
        """libvpx-vp9 in real-time mode (a GOP or two of frames, fast), no
        lag (frames out as they go in, no hidden alt-ref frames), a low CRF."""
        self.check_frame(frame)
        enc = _new_encoder("libvpx-vp9", frame, part)
        enc.options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "lag-in-frames": "0",
            "row-mt": "1",
            "crf": "18",
            "b": "0",
            "profile": str(self._PROFILES[frame.format.name]),
        }
        return _open(enc)


# -- AV1 ------------------------------------------------------------------------


class Av1Join(CodecJoin):
    decoder = "libdav1d"

    def __init__(self, config: bytes) -> None:
        super().__init__(config)
        try:
            self.sequence_header = av1_bits.config_sequence_header(config)
        except av1_bits.Av1Unsupported as exc:
            raise JoinUnsupported(str(exc)) from exc

    def check_frame(self, frame: Any) -> None:
        if frame.format.name not in ("yuv420p", "yuv420p10le"):
            raise JoinUnsupported(f"AV1 in {frame.format.name} is not supported for smart cuts")

    def open_encoder(self, frame: Any, part: PartEncoder, index: int) -> Any:
        """SVT-AV1 at its fastest preset, low delay (frames out in order, no
        hidden frames shown later), the sequence header in the first sample."""
        self.check_frame(frame)
        enc = _new_encoder("libsvtav1", frame, part)
        enc.options = {
            "preset": "12",
            "crf": "20",
            "svtav1-params": f"pred-struct=1:lp={part.threads}:keyint=-1",
        }
        try:
            return _open(enc)
        finally:
            normal_scheduling()

    def sample(self, packet: bytes, key: bool, part: PartEncoder) -> Encoded:
        return Encoded(av1_bits.strip_temporal_delimiters(packet), key)

    def copied(self, data: bytes, first: bool) -> bytes:
        if first and self.sequence_header and not av1_bits.has_sequence_header(data):
            return self.sequence_header + data
        return data


def codec_join(codec: str, config: bytes) -> CodecJoin:
    """The smart-cut handling of ``codec`` (raises JoinUnsupported)."""
    if codec == "h264":
        return H264Join(config)
    if codec == "vp9":
        return Vp9Join(config)
    if codec == "av1":
        return Av1Join(config)
    if codec == "hevc":
        from clipservice.media.hevcjoin import HevcJoin

        return HevcJoin(config)
    raise JoinUnsupported(f"smart cuts of {codec} are not supported")
