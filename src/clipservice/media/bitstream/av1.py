"""AV1 OBUs for smart cuts: sequence headers in samples and in ``av1C``.

An AV1 sample in MP4 is a temporal unit of OBUs (Low Overhead Bitstream
Format) without temporal delimiters. A new coded video sequence starts at a
key frame with a sequence header; a smart cut's re-encoded part brings its
own, and the first copied source keyframe must carry the source's.
"""

from __future__ import annotations

OBU_SEQUENCE_HEADER = 1
OBU_TEMPORAL_DELIMITER = 2
OBU_PADDING = 15


class Av1Unsupported(Exception):
    """The bytes are not AV1 OBUs this module can read."""


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if pos + i >= len(data):
            raise Av1Unsupported("truncated OBU size")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise Av1Unsupported("OBU size longer than 8 bytes")


def obus(data: bytes) -> list[tuple[int, int, int]]:
    """(type, start, end) of each OBU in a sample (the last may lack a size)."""
    out = []
    pos = 0
    while pos < len(data):
        header = data[pos]
        if header & 0x80:
            raise Av1Unsupported("forbidden bit set in an OBU header")
        kind = (header >> 3) & 0x0F
        has_extension = bool(header & 0x04)
        has_size = bool(header & 0x02)
        body = pos + 1 + (1 if has_extension else 0)
        if body > len(data):
            raise Av1Unsupported("truncated OBU header")
        if has_size:
            size, body = _leb128(data, body)
            end = body + size
        else:
            end = len(data)
        if end > len(data):
            raise Av1Unsupported("OBU runs past the sample")
        out.append((kind, pos, end))
        pos = end
    return out


def has_sequence_header(sample: bytes) -> bool:
    try:
        return any(kind == OBU_SEQUENCE_HEADER for kind, _, _ in obus(sample))
    except Av1Unsupported:
        return False


def strip_temporal_delimiters(sample: bytes) -> bytes:
    """The sample without temporal delimiter and padding OBUs (not stored in MP4)."""
    try:
        parts = obus(sample)
    except Av1Unsupported:
        return sample
    if all(kind not in (OBU_TEMPORAL_DELIMITER, OBU_PADDING) for kind, _, _ in parts):
        return sample
    return b"".join(
        sample[a:b] for kind, a, b in parts if kind not in (OBU_TEMPORAL_DELIMITER, OBU_PADDING)
    )


def config_sequence_header(av1c: bytes) -> bytes:
    """The sequence header OBU of an ``av1C`` record ("" if it holds none)."""
    if not av1c:
        return b""
    if len(av1c) < 4 or av1c[0] != 0x81:
        raise Av1Unsupported("the source's AV1 configuration is not av1C")
    config = av1c[4:]
    for kind, a, b in obus(config):
        if kind == OBU_SEQUENCE_HEADER:
            return config[a:b]
    return b""
