"""HEVC smart cuts: x265 parts whose parameter sets get ids the source does not use.

x265 always numbers its VPS, SPS and PPS 0, like most sources. Each
re-encoded part's sets and slice headers are rewritten to free ids
(:class:`~clipservice.media.bitstream.hevc.IdRewriter`), and the output's
``hvcC`` lists the source's sets and every part's side by side: an ``hvc1``
track as Safari and every other player expect it, no in-band sets.
"""

from __future__ import annotations

from typing import Any

from av.codec.context import Flags

from clipservice.media.bitstream import hevc
from clipservice.media.codecs import (
    CodecJoin,
    Encoded,
    JoinUnsupported,
    PartEncoder,
    _new_encoder,
    _open,
)

# Visually transparent for frames that sit between copied source frames.
X265_CRF = 18


class HevcJoin(CodecJoin):
    decoder = "hevc"
    skips_nonref = True

    def __init__(self, config: bytes) -> None:
        super().__init__(config)
        try:
            self.hvcc = hevc.parse_hvcc(config)
            self.options = hevc.x265_profile_options(self.hvcc)
        except hevc.HevcUnsupported as exc:
            raise JoinUnsupported(str(exc)) from exc
        self.length_size = self.hvcc.length_size
        self._rewriters: dict[int, hevc.IdRewriter] = {}
        self._taken = self.hvcc  # the source's sets and the parts' so far

    def check_frame(self, frame: Any) -> None:
        expected = "yuv420p" if self.hvcc.bit_depth_luma == 8 else "yuv420p10le"
        if frame.format.name != expected:
            raise JoinUnsupported(f"pixel format {frame.format.name} is not supported")

    def open_encoder(self, frame: Any, part: PartEncoder, index: int) -> Any:
        """libx265 at its fastest preset with the source's profile, tier and
        level, the parameter sets in the global header, then an id rewriter
        for its output."""
        self.check_frame(frame)
        enc = _new_encoder("libx265", frame, part)
        enc.flags |= Flags.global_header
        threads = part.threads
        enc.options = {
            "preset": "ultrafast",
            "crf": str(X265_CRF),
            "profile": self.options["profile"],
            "x265-params": (
                f"{self.options['x265-params']}:pools={threads}:frame-threads={min(threads, 2)}"
            ),
        }
        _open(enc)
        try:
            ids = hevc.free_ids(self._taken)
            rewriter = hevc.IdRewriter(hevc.split_annexb(bytes(enc.extradata)), ids)
            self._taken = hevc.parse_hvcc(
                hevc.merge_hvcc(self._taken, rewriter.hvcc(self.length_size))
            )
        except hevc.HevcUnsupported as exc:
            raise JoinUnsupported(str(exc)) from exc
        self._rewriters[index] = rewriter
        return enc

    def sample(self, packet: bytes, key: bool, part: PartEncoder) -> Encoded:
        try:
            return Encoded(self._rewriters[part.part].sample(packet, self.length_size), key)
        except hevc.HevcUnsupported as exc:
            raise JoinUnsupported(str(exc)) from exc

    def output_config(self, parts: list[PartEncoder]) -> bytes | None:
        if not self._rewriters:
            return None
        try:
            return hevc.merge_hvcc(
                self.hvcc, *(r.hvcc(self.length_size) for r in self._rewriters.values())
            )
        except hevc.HevcUnsupported as exc:
            raise JoinUnsupported(str(exc)) from exc
