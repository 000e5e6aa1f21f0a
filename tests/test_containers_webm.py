"""WebM/Matroska index read with Range: tracks, samples and windows against PyAV's
demuxer on files FFmpeg made, read costs counted, and hostile bytes refused."""

from __future__ import annotations

import io
import itertools
import pickle
import random
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

from clipservice.media.containers.base import ContainerError, Sample, Window
from clipservice.media.containers.webm import ClusterReader, WebmIndex, open_webm
from clipservice.media.ffmpeg import bundled_ffmpeg

SECONDS = 12
VP9 = [
    "-c:v", "libvpx-vp9", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "200k",
    "-g", "60", "-keyint_min", "60", "-row-mt", "0", "-threads", "1",
]  # fmt: skip
VIDEO_SRC = ["-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={SECONDS}"]
AUDIO_SRC = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SECONDS}"]
# Files with Cues (read at open) and without (searched by bisection).
WITH_CUES = ["vp9-end", "vp9-front", "vp9-altref", "opus", "muxed", "av1", "mkv-h264"]
WITHOUT_CUES = ["nocues", "nocues-unknown"]


def _ffmpeg(*args: str, stdout: Path | None = None) -> None:
    out = subprocess.PIPE if stdout is None else stdout.open("wb")
    try:
        subprocess.run(
            [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *args],
            check=True,
            timeout=120,
            stdout=out,
            stderr=subprocess.PIPE,
        )
    finally:
        if stdout is not None:
            out.close()  # type: ignore[union-attr]


def _unknown_cluster_sizes(data: bytes) -> bytes:
    """The same file with every Cluster's size rewritten as 'unknown' (all ones,
    same length), as a live recorder writes them."""
    out = bytearray(data)
    pos = data.index(bytes.fromhex("1f43b675"))
    while pos < len(data):
        assert data[pos : pos + 4] == bytes.fromhex("1f43b675")
        length = 9 - data[pos + 4].bit_length()
        size = int.from_bytes(data[pos + 4 : pos + 4 + length], "big") & ((1 << 7 * length) - 1)
        unknown = bytes([(2 << (8 - length)) - 1]) + b"\xff" * (length - 1)
        out[pos + 4 : pos + 4 + length] = unknown
        pos += 4 + length + size
    return bytes(out)


@pytest.fixture(scope="session")
def webm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("webm")
    f = {name: folder / f"{name}.webm" for name in WITH_CUES + WITHOUT_CUES}
    f["mkv-h264"] = folder / "h264.mkv"
    _ffmpeg(*VIDEO_SRC, *VP9, "-an", str(f["vp9-end"]))
    _ffmpeg(*VIDEO_SRC, *VP9, "-an", "-cues_to_front", "1", str(f["vp9-front"]))
    # Alt-ref (hidden) frames: libvpx packs them with a shown frame in superframes.
    _ffmpeg(
        *VIDEO_SRC[:-1], "testsrc2=size=160x90:rate=30:duration=8",
        "-c:v", "libvpx-vp9", "-deadline", "good", "-cpu-used", "8", "-b:v", "100k",
        "-g", "60", "-auto-alt-ref", "1", "-lag-in-frames", "16", "-an", str(f["vp9-altref"]),
    )  # fmt: skip
    _ffmpeg(*AUDIO_SRC, "-c:a", "libopus", "-b:a", "48k", str(f["opus"]))
    _ffmpeg(
        "-i", str(f["vp9-end"]), "-i", str(f["opus"]), "-map", "0:v", "-map", "1:a",
        "-c", "copy", str(f["muxed"]),
    )  # fmt: skip
    _ffmpeg(*VIDEO_SRC, "-c:v", "libsvtav1", "-preset", "12", "-g", "60", "-an", str(f["av1"]))
    # Matroska proper: CRC-32 elements in every Cluster, H.264 with B-frames, AAC.
    _ffmpeg(
        *VIDEO_SRC, *AUDIO_SRC, "-c:v", "libx264", "-preset", "ultrafast", "-bf", "2",
        "-g", "60", "-c:a", "aac", "-b:a", "64k", str(f["mkv-h264"]),
    )  # fmt: skip
    # A pipe is not seekable: FFmpeg writes no Cues, no sizes to patch later
    # (unknown Segment size), and short Clusters that start mid-GOP.
    _ffmpeg(
        "-i", str(f["vp9-end"]), "-i", str(f["opus"]), "-map", "0:v", "-map", "1:a",
        "-c", "copy", "-f", "webm", "pipe:1", stdout=f["nocues"],
    )  # fmt: skip
    f["nocues-unknown"].write_bytes(_unknown_cluster_sizes(f["nocues"].read_bytes()))
    return f


@pytest.fixture(scope="session")
def long_webm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Ten minutes of tiny video, with and without Cues: where cost by position shows."""
    folder = tmp_path_factory.mktemp("webm-long")
    with_cues, without = folder / "long.webm", folder / "long-nocues.webm"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=10:duration=600",
        *VP9[:-8], "-b:v", "30k", "-g", "20", "-keyint_min", "20", "-an", str(with_cues),
    )  # fmt: skip
    _ffmpeg("-i", str(with_cues), "-c", "copy", "-f", "webm", "pipe:1", stdout=without)
    return {"cues": with_cues, "nocues": without}


@dataclass
class Counting:
    """A read callback over a local file that counts its calls and bytes."""

    data: bytes
    reads: int = 0
    bytes_read: int = 0

    def __call__(self, offset: int, length: int) -> bytes:
        self.reads += 1
        chunk = self.data[offset : offset + length]
        self.bytes_read += len(chunk)
        return chunk


def _open(path: Path) -> tuple[WebmIndex, Counting]:
    read = Counting(path.read_bytes())
    return open_webm(read, len(read.data)), read


# (pts, size, key, bytes) of every packet of each stream, in file order.
Oracle = list[tuple[int, int, bool, bytes]]


def _oracle(path: Path) -> list[Oracle]:
    with av.open(str(path)) as container:
        packets: list[Oracle] = [[] for _ in container.streams]
        for packet in container.demux():
            if packet.size:
                packets[packet.stream.index].append(
                    (packet.pts, packet.size, packet.is_keyframe, bytes(packet))
                )
    return packets


def _got(samples: list[Sample], data: bytes) -> Oracle:
    return [(s.pts, s.size, s.key, data[s.offset : s.offset + s.size]) for s in samples]


def _samples(window: Window, data: bytes) -> list[Sample]:
    fetched = {offset: data[offset : offset + size] for offset, size in window.spans}
    # Windows travel to a join process: read them the way it will.
    return pickle.loads(pickle.dumps(window)).samples(fetched)


@pytest.mark.parametrize("name", WITH_CUES + WITHOUT_CUES)
def test_every_sample_matches_pyav(webm: dict[str, Path], name: str) -> None:
    """A window over the whole file gives each track's packets exactly as PyAV
    demuxes them: pts, size, key flag, and the bytes at the sample's offset."""
    index, read = _open(webm[name])
    oracle = _oracle(webm[name])
    assert len(index.tracks) == len(oracle)
    for stream, track in enumerate(index.tracks):
        window = index.window(track.track_id, 0, 3600)
        got = _got(_samples(window, read.data), read.data)
        assert got == oracle[stream], f"{name} track {track.track_id}"
        assert window.at_track_end and window.following_key_pts is None


def test_tracks_describe_the_streams(webm: dict[str, Path]) -> None:
    """Track fields: codec names, sizes, rates, Opus CodecDelay and SeekPreRoll,
    the millisecond timeline, the duration and the first pts."""
    index, _ = _open(webm["muxed"])
    video, audio = index.track("video"), index.track("audio")
    assert video is not None and audio is not None
    assert (video.track_id, video.codec, video.width, video.height) == (1, "vp9", 320, 180)
    assert (audio.codec, audio.sample_rate, audio.channels) == ("opus", 48000, 1)
    assert video.timescale == audio.timescale == 1000
    assert audio.codec_delay == 7  # 6.5 ms, rounded as FFmpeg does
    assert audio.config[:8] == b"OpusHead"
    assert index.seek_pre_roll_s == {2: 0.08}
    assert video.first_pts == 0 and audio.first_pts == -7
    assert video.duration_s is not None and abs(video.duration_s - SECONDS) < 0.1
    av1, _ = _open(webm["av1"])
    assert av1.tracks[0].codec == "av1" and av1.tracks[0].config[:1] == b"\x81"  # av1C
    assert av1.track("audio") is None


@pytest.mark.parametrize("name", WITH_CUES + WITHOUT_CUES)
def test_init_opens_with_pyav(webm: dict[str, Path], name: str) -> None:
    """``init`` alone opens in PyAV with each stream's codec, size and extradata."""
    index, _ = _open(webm[name])
    with av.open(str(webm[name])) as original, av.open(io.BytesIO(index.init)) as init:
        assert len(init.streams) == len(original.streams)
        for a, b in zip(init.streams, original.streams, strict=True):
            assert a.codec_context.codec.canonical_name == b.codec_context.codec.canonical_name
            assert a.codec_context.extradata == b.codec_context.extradata
            if a.type == "video":
                assert (a.codec_context.width, a.codec_context.height) == (
                    b.codec_context.width,
                    b.codec_context.height,
                )
            else:
                assert a.codec_context.sample_rate == b.codec_context.sample_rate
    assert len(index.init) < 1024


RANGES = [(0.0, 0.5), (0.9, 2.0), (3.1, 5.2), (4.0, 4.0), (6.5, 9.9), (10.5, 30.0)]


@pytest.mark.parametrize("name", WITH_CUES + WITHOUT_CUES)
@pytest.mark.parametrize(("start_s", "end_s"), RANGES)
def test_window_covers_the_range(
    webm: dict[str, Path], name: str, start_s: float, end_s: float
) -> None:
    """A window's samples are a run of PyAV's packets that starts at or before the
    range (on a key frame when it says so) and runs through the GOP holding its end,
    stopping right before ``following_key_pts``."""
    index, read = _open(webm[name])
    oracle = _oracle(webm[name])
    for stream, track in enumerate(index.tracks):
        expected = oracle[stream]
        window = index.window(track.track_id, start_s, end_s)
        got = _got(_samples(window, read.data), read.data)
        assert got, f"{name} track {track.track_id}: empty window"
        first = expected.index(got[0])
        assert expected[first : first + len(got)] == got
        start, end = start_s * track.timescale, end_s * track.timescale
        assert got[0][0] <= max(start, expected[0][0])
        if window.starts_on_key:
            assert got[0][2]
        after = first + len(got)
        if window.at_track_end:
            assert after == len(expected)
        else:
            assert expected[after][0] > end
        if window.following_key_pts is not None:
            assert expected[after][2] and expected[after][0] == window.following_key_pts
        if track.kind == "video" and name in WITH_CUES:
            # Own cues: a key frame start, and the whole GOP at the end.
            assert window.starts_on_key
            assert window.at_track_end or window.following_key_pts is not None


def test_window_starts_at_the_latest_key(webm: dict[str, Path]) -> None:
    """With Cues the window starts at the key frame at or before the start, not earlier,
    and ends at the first key frame after the end."""
    index, read = _open(webm["vp9-end"])
    window = index.window(1, 5.0, 6.2)
    samples = _samples(window, read.data)
    assert samples[0].key and samples[0].pts == 4000
    assert window.following_key_pts == 8000 and samples[-1].pts < 8000
    assert sum(s.key for s in samples) == 2


def test_open_reads_little(webm: dict[str, Path]) -> None:
    """Opening costs one read with Cues at the front and two at the end, a few KiB
    past the first chunk; a window then costs no read."""
    for name, most in [("vp9-front", 1), ("vp9-end", 2), ("muxed", 2), ("opus", 2)]:
        index, read = _open(webm[name])
        assert read.reads <= most, name
        assert read.bytes_read <= 64 * 1024 + 4096
        before = read.reads
        for track in index.tracks:
            index.window(track.track_id, 2.5, 7.5)
        assert read.reads == before, name


def test_long_source_costs_the_same_early_and_late(long_webm: dict[str, Path]) -> None:
    """Ten minutes of video: opening stays within four reads, a window with Cues reads
    nothing, and without Cues a late window costs no more reads than an early one."""
    index, read = _open(long_webm["cues"])
    assert read.reads <= 4
    before = read.reads
    early = index.window(1, 20.0, 25.0)
    late = index.window(1, 560.0, 565.0)
    assert read.reads == before
    assert late.size_bytes < 2 * early.size_bytes

    costs = []
    for start_s in (20.0, 300.0, 560.0):
        index, read = _open(long_webm["nocues"])
        assert not index.has_cues
        before_reads, before_bytes = read.reads, read.bytes_read
        window = index.window(1, start_s, start_s + 5)
        costs.append((read.reads - before_reads, read.bytes_read - before_bytes))
        samples = _samples(window, read.data)
        assert samples[0].pts <= start_s * 1000 and samples[-1].pts >= (start_s + 5) * 1000
    reads = [c[0] for c in costs]
    assert max(reads) <= min(reads) + 2, costs
    # A bisection over 2.5 MB: about log2(size / 64 KiB) probes, not a walk.
    assert max(reads) <= 16, costs


# --- Hand-built Matroska -----------------------------------------------------------------------


def _el(eid: int, payload: bytes) -> bytes:
    """An EBML element with an 8-byte size."""
    head = eid.to_bytes((eid.bit_length() + 7) // 8, "big")
    return head + (0x01 << 56 | len(payload)).to_bytes(8, "big") + payload


def _uint_el(eid: int, value: int) -> bytes:
    return _el(eid, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _ebml_header(doctype: bytes = b"webm") -> bytes:
    return _el(0x1A45DFA3, _el(0x4282, doctype))


def _opus_tracks(config: bytes, default_duration_ns: int | None) -> bytes:
    entry = (
        _uint_el(0xD7, 1)
        + _uint_el(0x83, 2)
        + _el(0x86, b"A_OPUS")
        + _el(0x63A2, config)
        + _uint_el(0x56AA, 6_500_000)
        + _uint_el(0x56BB, 80_000_000)
        + _el(0xE1, _el(0xB5, struct.pack(">d", 48000.0)) + _uint_el(0x9F, 1))
    )
    if default_duration_ns is not None:
        entry += _uint_el(0x23E383, default_duration_ns)
    return _el(0x1654AE6B, _el(0xAE, entry))


def _lace(kind: str, frames: list[bytes]) -> tuple[int, bytes]:
    """(lacing flag bits, lace header + frames)."""
    count = bytes([len(frames) - 1])
    if kind == "xiph":
        sizes = b""
        for frame in frames[:-1]:
            sizes += b"\xff" * (len(frame) // 255) + bytes([len(frame) % 255])
        return 0x02, count + sizes + b"".join(frames)
    if kind == "ebml":
        sizes = (0x4000 | len(frames[0])).to_bytes(2, "big")
        for previous, frame in itertools.pairwise(frames[:-1]):
            sizes += (0x4000 | (len(frame) - len(previous) + 8191)).to_bytes(2, "big")
        return 0x06, count + sizes + b"".join(frames)
    assert len({len(f) for f in frames}) == 1
    return 0x04, count + b"".join(frames)


def _laced_file(opus: Path, *, default_duration: bool) -> tuple[bytes, int]:
    """A Matroska file of real Opus packets in laced SimpleBlocks (Xiph, EBML,
    fixed-size in turn, 1 to 6 frames a block); returns it and its frame count."""
    with av.open(str(opus)) as container:
        config = bytes(container.streams.audio[0].codec_context.extradata)
        packets = [bytes(p) for p in container.demux() if p.size][:200]
    clusters, at, kinds = b"", 0, ["xiph", "ebml", "fixed"]
    for cluster_start in range(0, len(packets), 40):
        blocks, time_ms = b"", cluster_start * 20
        at = cluster_start
        for n, kind in enumerate(kinds * 10):
            count = 1 + n % 6
            frames = packets[at : min(at + count, cluster_start + 40)]
            if not frames:
                break
            if kind == "fixed":
                frames = [frames[0]] * len(frames)  # the demuxer does not decode
                packets[at : at + len(frames)] = frames
            flags, body = _lace(kind, frames) if len(frames) > 1 else (0, frames[0])
            relative = (at * 20 - time_ms).to_bytes(2, "big")
            blocks += _el(0xA3, b"\x81" + relative + bytes([0x80 | flags]) + body)
            at += len(frames)
        clusters += _el(0x1F43B675, _uint_el(0xE7, time_ms) + blocks)
    info = _el(0x1549A966, _uint_el(0x2AD7B1, 1_000_000))
    tracks = _opus_tracks(config, 20_000_000 if default_duration else None)
    segment = _el(0x18538067, info + tracks + clusters)
    return _ebml_header(b"matroska") + segment, at


def test_laced_audio_matches_pyav(webm: dict[str, Path], tmp_path: Path) -> None:
    """Xiph, EBML and fixed-size laced blocks give one sample per frame, with PyAV's
    sizes, bytes and times (DefaultDuration spreads them)."""
    data, frames = _laced_file(webm["opus"], default_duration=True)
    path = tmp_path / "laced.mka"
    path.write_bytes(data)
    index = open_webm(Counting(data), len(data))
    assert not index.has_cues
    window = index.window(1, 0, 3600)
    got = _got(_samples(window, data), data)
    assert len(got) == frames
    assert got == _oracle(path)[0]
    assert [s.duration for s in _samples(window, data)][:3] == [20, 20, 20]


def test_laced_audio_without_default_duration(webm: dict[str, Path]) -> None:
    """Without DefaultDuration the frames of a lace share the time up to the next block
    (the last block's frames, with no next block, share its time)."""
    data, frames = _laced_file(webm["opus"], default_duration=False)
    index = open_webm(Counting(data), len(data))
    samples = _samples(index.window(1, 0, 3600), data)
    assert len(samples) == frames
    assert [s.pts for s in samples[:190]] == [-7 + 20 * i for i in range(190)]
    assert samples[-1].pts == samples[-2].pts


def _cluster_window(cluster: bytes, reader: ClusterReader, offset: int = 1000) -> list[Sample]:
    window = Window(track_id=1, spans=((offset, len(cluster)),), reader=reader)
    return window.samples({offset: cluster})


READER = ClusterReader(
    track_number=1, tick_mult=1, delay_ticks=0, timecode_scale_ns=1_000_000,
    default_duration_ns=None,
)  # fmt: skip


def test_block_groups_and_unknown_size_clusters() -> None:
    """BlockGroups: a ReferenceBlock makes a frame non-key, BlockDuration times the
    last one; an unknown-size Cluster ends where the next Cluster starts; other
    tracks' blocks are skipped."""
    first = (
        bytes.fromhex("1f43b675 ff")  # unknown size
        + _uint_el(0xE7, 100)
        + _el(0xA3, b"\x81\x00\x00\x80" + b"key")
        + _el(0xA3, b"\x82\x00\x05\x80" + b"other track")
        + _el(0xA0, _el(0xA1, b"\x81\x00\x21\x00" + b"delta") + _uint_el(0xFB, 33))
    )
    second = _el(
        0x1F43B675,
        _uint_el(0xE7, 166)
        + _el(0xA0, _el(0xA1, b"\x81\x00\x00\x00" + b"group key") + _uint_el(0x9B, 40)),
    )
    samples = _cluster_window(first + second, READER)
    assert [(s.pts, s.key, s.size, s.duration) for s in samples] == [
        (100, True, 3, 33),
        (133, False, 5, 33),
        (166, True, 9, 40),
    ]
    cluster = first + second
    assert cluster[samples[1].offset - 1000 :].startswith(b"delta")


@pytest.mark.parametrize(
    "body",
    [
        b"\x81\x00\x00\x82" + b"\xff" + b"\xff" * 300,  # 256 Xiph frames past the block
        b"\x81\x00\x00\x86" + b"\xff" + b"\x7f\xff" + b"\xff" * 400,  # EBML sizes past it
        b"\x81\x00\x00\x84" + b"\xff" + b"x" * 255,  # fixed: 256 frames do not divide 255
        b"\x81\x00\x00\x86" + b"\x02" + b"\x00",  # EBML lace size of vint 0x00
        b"\x81\x00",  # a block header cut short
    ],
)
def test_hostile_lacing(body: bytes) -> None:
    """A lace header claiming more frames or bytes than the block holds is refused."""
    cluster = _el(0x1F43B675, _uint_el(0xE7, 0) + _el(0xA3, body))
    with pytest.raises(ContainerError):
        _cluster_window(cluster, READER)


def test_hostile_cluster_bytes() -> None:
    """Damaged Cluster bytes: a child past its Cluster, an unknown size inside one,
    a block before the Timecode, a short span, a missing span: ContainerError."""
    cases = [
        _el(0x1F43B675, _uint_el(0xE7, 0))[:-1] + b"\xa3\x88",
        bytes.fromhex("1f43b675 85 e7 81 00 a3 ff"),
        _el(0x1F43B675, _el(0xA3, b"\x81\x00\x00\x80x") + _uint_el(0xE7, 0)),
        bytes.fromhex("1f43b675 88 e7 81 00 a3 80"),
        bytes.fromhex("00 00 00 00"),
        bytes.fromhex("1f43b675 84 e7 81 00"),
    ]
    for cluster in cases:
        with pytest.raises(ContainerError):
            _cluster_window(cluster, READER)
    window = Window(track_id=1, spans=((0, 10),), reader=READER)
    with pytest.raises(ContainerError):
        window.samples({})
    with pytest.raises(ContainerError):
        window.samples({0: b"short"})


def _minimal(tracks: bytes | None = None, segment_extra: bytes = b"") -> bytes:
    info = _el(0x1549A966, _uint_el(0x2AD7B1, 1_000_000))
    if tracks is None:
        entry = _uint_el(0xD7, 1) + _uint_el(0x83, 1) + _el(0x86, b"V_VP9")
        tracks = _el(0x1654AE6B, _el(0xAE, entry))
    cluster = _el(0x1F43B675, _uint_el(0xE7, 0) + _el(0xA3, b"\x81\x00\x00\x80frame"))
    return _ebml_header() + _el(0x18538067, info + tracks + segment_extra + cluster)


def test_hand_built_minimal_file_opens() -> None:
    """The hand-built file the hostile cases start from is itself valid."""
    data = _minimal()
    index = open_webm(Counting(data), len(data))
    assert index.tracks[0].codec == "vp9"
    assert len(_samples(index.window(1, 0, 1), data)) == 1


def test_header_past_the_first_chunk() -> None:
    """Info and Tracks after 100 KiB of Void and no SeekHead: the walk reads on, one
    read more."""
    data = _minimal(segment_extra=b"")
    void = _el(0xEC, b"\0" * 100_000)
    segment = data.index(bytes.fromhex("18538067"))
    body = void + data[segment + 12 :]
    data = data[:segment] + _el(0x18538067, body)
    read = Counting(data)
    index = open_webm(read, len(data))
    assert read.reads == 2
    assert index.tracks[0].codec == "vp9"
    assert [s.size for s in _samples(index.window(1, 0, 1), data)] == [5]


def test_cues_without_relative_positions(webm: dict[str, Path]) -> None:
    """Cues that name only Clusters (as YouTube's DASH WebM writes them): windows end
    at the following key frame's Cluster and still hold whole GOPs."""
    original = webm["vp9-end"].read_bytes()
    index = open_webm(Counting(original), len(original))
    segment_data = original.index(bytes.fromhex("18538067")) + 12
    points = b"".join(
        _el(0xBB, _uint_el(0xB3, cue.raw_time) + _el(0xB7, _uint_el(0xF7, 1)
            + _uint_el(0xF1, cue.cluster_pos - segment_data)))
        for cue in index._cues[1]
    )  # fmt: skip
    cues_at = original.rindex(bytes.fromhex("1c53bb6b"))
    data = original[:cues_at] + _el(0x1C53BB6B, points)
    size = len(data) - segment_data
    data = data[: segment_data - 8] + (0x01 << 56 | size).to_bytes(8, "big") + data[segment_data:]
    read = Counting(data)
    index = open_webm(read, len(data))
    assert read.reads == 2
    oracle = _oracle(webm["vp9-end"])[0]
    window = index.window(1, 3.0, 5.0)
    assert window.following_key_pts == 6000 and window.starts_on_key
    got = _got(_samples(window, data), data)
    assert got == [p for p in oracle if 2000 <= p[0] < 6000]


def _nested(depth: int) -> bytes:
    inner = b""
    for _ in range(depth):
        inner = bytes.fromhex("e0") + b"\x01\xff\xff\xff\xff\xff\xff\xff" + inner
    return inner


HOSTILE_FILES = {
    "not EBML": b"RIFF" + b"\0" * 100,
    "other DocType": _ebml_header(b"mp4x") + b"\0" * 100,
    "zero vint": bytes.fromhex("1a45dfa3 00") + b"\0" * 100,
    "ID of 5 bytes": bytes.fromhex("08 45 df a3 00 81") + b"\0" * 100,
    "EBML header past EOF": bytes.fromhex("1a45dfa3 01 00 00 00 00 00 ff ff") + b"\0" * 20,
    "Segment past EOF": _ebml_header() + bytes.fromhex("18538067 01 00 00 00 10 00 00 00")
    + b"\0" * 100,
    "Tracks past EOF": _ebml_header()
    + _el(0x18538067, bytes.fromhex("1654ae6b 01 00 00 00 00 10 00 00") + b"\0" * 100),
    "no Tracks": _ebml_header() + _el(0x18538067, _el(0x1F43B675, _uint_el(0xE7, 0))),
    "deep unknown-size nesting": _minimal(
        _el(0x1654AE6B, _el(0xAE, _uint_el(0xD7, 1) + _uint_el(0x83, 1) + _nested(5000)))
    ),
    "TrackNumber 0": _minimal(
        _el(0x1654AE6B, _el(0xAE, _uint_el(0xD7, 0) + _uint_el(0x83, 1)))
    ),
    "absurd TimecodeScale": _ebml_header()
    + _el(0x18538067, _el(0x1549A966, _uint_el(0x2AD7B1, 0))),
    "SeekHead past the Segment": _minimal(
        segment_extra=_el(0x114D9B74, _el(0x4DBB, _uint_el(0x53AB, 0x1C53BB6B)
                                          + _uint_el(0x53AC, 10**9)))
    ),
    "content encoding": _minimal(
        _el(0x1654AE6B, _el(0xAE, _uint_el(0xD7, 1) + _uint_el(0x83, 1) + _el(0x6D80, b"")))
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_hostile_headers(name: str) -> None:
    """Damaged or hostile headers raise ContainerError."""
    data = HOSTILE_FILES[name]
    with pytest.raises(ContainerError):
        open_webm(Counting(data), len(data))


@pytest.mark.parametrize("name", ["vp9-end", "vp9-front", "muxed"])
def test_truncated_files(webm: dict[str, Path], name: str) -> None:
    """A file cut short anywhere, header or Cues, is refused."""
    data = webm[name].read_bytes()
    for cut in [10, 40, 200, 300, 600, len(data) // 2, len(data) - 30]:
        with pytest.raises(ContainerError):
            open_webm(Counting(data[:cut]), cut)


def test_cues_past_the_end(webm: dict[str, Path]) -> None:
    """A Cues element whose size runs past the Segment is refused, and so is one of
    absurd size."""
    data = bytearray(webm["vp9-end"].read_bytes())
    cues = data.rindex(bytes.fromhex("1c53bb6b"))
    data[cues + 4 : cues + 5] = b"\x08"  # a 5-byte size
    data[cues + 5 : cues + 5] = b"\xff\xff\xff\x00"
    with pytest.raises(ContainerError):
        open_webm(Counting(bytes(data)), len(data))


def test_random_damage_never_escapes(webm: dict[str, Path]) -> None:
    """Bytes flipped at random in the header, the Cues or a Cluster: open and window
    either work or raise ContainerError, never another exception or a hang."""
    original = webm["muxed"].read_bytes()
    cues = original.rindex(bytes.fromhex("1c53bb6b"))
    rng = random.Random(7)
    for trial in range(300):
        data = bytearray(original)
        area = [(0, 700), (cues, len(data)), (600, 2000)][trial % 3]
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(*area)] = rng.randrange(256)
        blob = bytes(data)
        try:
            index = open_webm(Counting(blob), len(blob))
            for track in index.tracks:
                _samples(index.window(track.track_id, 0.0, 1.0), blob)
        except ContainerError:
            pass
