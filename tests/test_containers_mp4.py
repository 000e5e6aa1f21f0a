"""MP4 index read with Range: tracks, samples and windows against PyAV's demuxer
on files FFmpeg made (progressive, moov at the end, fragmented with and without
sidx or mfra, DASH, HEVC, AV1, AAC, muxed), read costs counted, hostile bytes
refused."""

from __future__ import annotations

import io
import itertools
import os
import pickle
import random
import struct
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import pytest

from clipservice.media.containers.base import ContainerError, Sample, Window
from clipservice.media.containers.mp4 import FragmentReader, Mp4Index, open_file, open_mp4
from clipservice.media.ffmpeg import bundled_ffmpeg

SECONDS = 10
TIMESCALE = 15360  # FFmpeg's mp4 muxer for 30 fps
VIDEO_SRC = ["-f", "lavfi", "-i", f"testsrc2=size=320x180:rate=30:duration={SECONDS}"]
AUDIO_SRC = ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={SECONDS}"]
X264 = [
    "-c:v", "libx264", "-preset", "veryfast", "-crf", "32", "-pix_fmt", "yuv420p",
    "-g", "60", "-keyint_min", "60", "-sc_threshold", "0", "-bf", "2",
]  # fmt: skip
FRAG = "frag_keyframe+empty_moov+default_base_moof"
PROGRESSIVE = ["faststart", "moov-end", "delay", "aac", "opus", "muxed"]
FRAGMENTED = [
    "frag-sidx", "frag-mfra", "frag-plain", "frag-nonkey", "dash", "aac-frag", "hevc", "av1",
    "muxed-frag", "muxed-frag-abs",
]  # fmt: skip
ALL = PROGRESSIVE + FRAGMENTED
# Fragments that do not open with a sync sample, behind a sidx that says they all
# do (FFmpeg's global_sidx always sets starts_with_SAP): caught at open, searched.
LYING_SIDX = "sidx-nonkey"
CODECS = {
    "faststart": ["h264"], "moov-end": ["h264"], "delay": ["h264"], "aac": ["aac"], "opus": ["opus"],
    "muxed": ["h264", "aac"], "frag-sidx": ["h264"], "frag-mfra": ["h264"],
    "frag-plain": ["h264"], "dash": ["h264"], "aac-frag": ["aac"], "hevc": ["hevc"],
    "av1": ["av1"], "muxed-frag": ["h264", "aac"], "muxed-frag-abs": ["h264", "aac"],
    "frag-nonkey": ["h264"], LYING_SIDX: ["h264"],
}  # fmt: skip


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y", *args],
        check=True,
        timeout=120,
        capture_output=True,
        env={**os.environ, "SVT_LOG": "1"},  # SVT-AV1 prints its banner unless told
    )


@pytest.fixture(scope="session")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mp4")
    f = {name: folder / f"{name}.mp4" for name in [*ALL, LYING_SIDX]}
    f["aac"] = folder / "aac.m4a"
    f["aac-frag"] = folder / "aac-frag.m4a"
    f["long"] = folder / "long.mp4"
    _ffmpeg(*VIDEO_SRC, *X264, "-movflags", "+faststart", str(f["faststart"]))
    src = str(f["faststart"])
    _ffmpeg("-i", src, "-c", "copy", str(f["moov-end"]))
    # -itsoffset writes an empty edit before the media (a 1 s delay).
    _ffmpeg("-itsoffset", "1", "-i", src, "-c", "copy", str(f["delay"]))
    _ffmpeg(*AUDIO_SRC, "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", str(f["aac"]))
    _ffmpeg(*AUDIO_SRC, "-c:a", "libopus", "-b:a", "48k", str(f["opus"]))
    _ffmpeg(
        "-i", src, "-i", str(f["aac"]), "-map", "0:v", "-map", "1:a", "-c", "copy",
        "-movflags", "+faststart", str(f["muxed"]),
    )  # fmt: skip
    # YouTube-like: ftyp, moov with mvex, one global sidx, a moof/mdat per GOP.
    _ffmpeg("-i", src, "-c", "copy", "-movflags", f"{FRAG}+global_sidx", str(f["frag-sidx"]))
    _ffmpeg("-i", src, "-c", "copy", "-movflags", FRAG, str(f["frag-mfra"]))
    _ffmpeg("-i", src, "-c", "copy", "-movflags", f"{FRAG}+skip_trailer", str(f["frag-plain"]))
    # 0.7 s fragments, 2 s GOPs: most fragments open with a non-sync sample.
    nonkey = ["-c", "copy", "-frag_duration", "700000", "-movflags"]
    _ffmpeg("-i", src, *nonkey, "empty_moov+default_base_moof+skip_trailer", str(f["frag-nonkey"]))
    _ffmpeg("-i", src, *nonkey, "empty_moov+default_base_moof+global_sidx", str(f[LYING_SIDX]))
    # FFmpeg's DASH muxer in one file: a sidx before each fragment, an edit list.
    _ffmpeg(
        "-i", src, "-c", "copy", "-f", "dash", "-single_file", "1", "-seg_duration", "2",
        "-single_file_name", f["dash"].name, str(folder / "dash.mpd"),
    )  # fmt: skip
    _ffmpeg(
        "-i", str(f["aac"]), "-c", "copy", "-frag_duration", "2000000",
        "-movflags", f"{FRAG}+global_sidx", str(f["aac-frag"]),
    )  # fmt: skip
    _ffmpeg(
        *VIDEO_SRC[:-1], "testsrc2=size=320x180:rate=30:duration=6",
        "-c:v", "libx265", "-preset", "ultrafast", "-tag:v", "hvc1",
        "-x265-params", "log-level=error:keyint=60:min-keyint=60:scenecut=0:bframes=2",
        "-movflags", f"{FRAG}+global_sidx", str(f["hevc"]),
    )  # fmt: skip
    _ffmpeg(
        *VIDEO_SRC[:-1], "testsrc2=size=320x180:rate=30:duration=6",
        "-c:v", "libsvtav1", "-preset", "12", "-g", "60",
        "-movflags", f"{FRAG}+global_sidx", str(f["av1"]),
    )  # fmt: skip
    _ffmpeg(
        "-i", src, "-i", str(f["aac"]), "-map", "0:v", "-map", "1:a", "-c", "copy",
        "-movflags", f"{FRAG}+global_sidx", str(f["muxed-frag"]),
    )  # fmt: skip
    # Without default_base_moof: each traf names an absolute base-data-offset.
    _ffmpeg(
        "-i", src, "-i", str(f["aac"]), "-map", "0:v", "-map", "1:a", "-c", "copy",
        "-movflags", "frag_keyframe+empty_moov", str(f["muxed-frag-abs"]),
    )  # fmt: skip
    # Ten minutes at 64x64 with 1 s fragments, neither sidx nor mfra: searched.
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=30:duration=600",
        "-c:v", "libx264", "-preset", "ultrafast", "-crf", "30", "-pix_fmt", "yuv420p",
        "-g", "30", "-keyint_min", "30", "-sc_threshold", "0",
        "-movflags", f"{FRAG}+skip_trailer", str(f["long"]),
    )  # fmt: skip
    return f


# --------------------------------------------------------------------------- helpers


@dataclass
class Counted:
    """A read callback over a file's bytes that counts calls and bytes."""

    data: bytes
    calls: int = 0
    bytes_read: int = 0

    def __call__(self, offset: int, length: int) -> bytes:
        self.calls += 1
        chunk = self.data[offset : offset + length]
        self.bytes_read += len(chunk)
        return chunk

    def reset(self) -> None:
        self.calls = self.bytes_read = 0


@dataclass(frozen=True)
class Packet:
    pts: int
    dts: int
    size: int
    pos: int
    key: bool
    data: bytes


def _open(path: Path) -> tuple[Mp4Index, Counted]:
    read = Counted(path.read_bytes())
    return open_mp4(read, len(read.data)), read


def _packets(path: Path, track_id: int) -> list[Packet]:
    """PyAV's packets of the stream with that MP4 track_ID (the oracle)."""
    with av.open(str(path)) as container:
        stream = next(s for s in container.streams if s.id == track_id)
        return [
            Packet(p.pts, p.dts, p.size, p.pos, p.is_keyframe, bytes(p))
            for p in container.demux(stream)
            if p.size
        ]


def _fetch(window: Window, data: bytes) -> list[Sample]:
    return window.samples({offset: data[offset : offset + size] for offset, size in window.spans})


def _same(samples: list[Sample], packets: list[Packet], data: bytes) -> None:
    assert [(s.pts, s.dts, s.size, s.offset, s.key) for s in samples] == [
        (p.pts, p.dts, p.size, p.pos, p.key) for p in packets
    ]
    for sample, packet in zip(samples, packets, strict=True):
        assert data[sample.offset : sample.offset + sample.size] == packet.data


def _top_level(data: bytes) -> list[str]:
    kinds, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        size = struct.unpack_from(">Q", data, pos + 8)[0] if size == 1 else size
        kinds.append(kind.decode())
        pos += size or len(data) - pos
    return kinds


def _check_window(
    window: Window,
    packets: list[Packet],
    data: bytes,
    start: float,
    end: float,
    timescale: int,
    exact: bool,
) -> None:
    """The window's samples are the oracle's from a sync sample at or before
    ``start`` through the GOP holding ``end``; ``exact``: no more than that."""
    samples = _fetch(window, data)
    keys = [i for i, p in enumerate(packets) if p.key]
    k0 = max([i for i in keys if packets[i].pts <= start * timescale] or [keys[0]])
    after = [i for i in keys if i > k0 and packets[i].pts > end * timescale]
    k1 = after[0] if after else len(packets)
    i0 = next(i for i, p in enumerate(packets) if p.pos == samples[0].offset)
    i1 = i0 + len(samples)
    _same(samples, packets[i0:i1], data)
    assert packets[i0].key and window.starts_on_key
    assert window.start_pts == packets[i0].pts
    assert i0 <= k0 and i1 >= k1
    if exact:
        assert (i0, i1) == (k0, k1)
    assert window.at_track_end == (i1 == len(packets))
    if window.following_key_pts is not None:
        assert packets[i1].key and window.following_key_pts == packets[i1].pts
    elif not window.at_track_end:
        # Unknown (a sync sample inside the last fragment): the GOP ends inside.
        assert not exact and i1 > k1
    spans = window.spans
    assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))


# --------------------------------------------------------------------------- samples


def test_moov_position_and_header_size(mp4: dict[str, Path]) -> None:
    """The index says where the moov is (before the media: faststart) and how
    many bytes the ftyp and moov take, as the file's top-level boxes do."""
    for name, first in (("faststart", True), ("moov-end", False)):
        data = mp4[name].read_bytes()
        pos, sizes = 0, {}
        while pos + 8 <= len(data):
            size = int.from_bytes(data[pos : pos + 4], "big")
            sizes[data[pos + 4 : pos + 8]] = size
            pos += size
        index = open_file(mp4[name])
        assert index.moov_first is first
        assert index.header_bytes == sizes[b"ftyp"] + sizes[b"moov"]


def test_samples_duration_is_what_the_edit_list_shows(mp4: dict[str, Path], tmp_path: Path) -> None:
    """A track whose first sample shows two frames after it decodes and whose
    last (a B-frame) one frame after: the muxer's mdhd counts a frame more
    than the samples show; samples_s is their sum, what FFmpeg reports
    (a clip cut like this was reported a frame too long)."""
    tb = Fraction(1, 15360)
    times = [(-1024, 0), (-512, 1536), (0, 512), (512, 1024), (1024, 2560), (1536, 2048)]
    out = tmp_path / "delay.mp4"
    with av.open(str(mp4["faststart"])) as ic:
        v = ic.streams.video[0]
        data = [bytes(p) for p in ic.demux(v) if p.size][: len(times)]
        with av.open(str(out), "w", format="mp4", options={"movflags": "+faststart"}) as oc:
            s = oc.add_stream_from_template(v)
            s.time_base = tb
            for payload, (dts, pts) in zip(data, times, strict=True):
                packet = av.Packet(payload)
                packet.stream, packet.time_base = s, tb
                packet.dts, packet.pts, packet.duration = dts, pts, 512
                packet.is_keyframe = dts == -1024
                oc.mux(packet)
    index, _ = _open(out)
    track = index.tracks[0]
    with av.open(str(out)) as c:
        shown = float(c.streams.video[0].duration * c.streams.video[0].time_base)
    assert index.samples_s(track.track_id) == pytest.approx(shown) == pytest.approx(0.2)
    assert track.duration_s == pytest.approx(0.2 + 512 / 15360)  # the header's view


@pytest.mark.parametrize("name", [*ALL, LYING_SIDX])
def test_every_sample_matches_pyav(mp4: dict[str, Path], name: str) -> None:
    """For every track, the index's samples (pts, dts, size, offset, sync, bytes)
    are PyAV's packets, one for one."""
    index, read = _open(mp4[name])
    assert [t.codec for t in index.tracks] == CODECS[name]
    assert index.fragmented == (name in FRAGMENTED or name == LYING_SIDX)
    for track in index.tracks:
        window = index.window(track.track_id, -1.0, 1e9)
        assert window.at_track_end and window.following_key_pts is None
        _same(_fetch(window, read.data), _packets(mp4[name], track.track_id), read.data)


def test_timeline_follows_the_edit_list(mp4: dict[str, Path]) -> None:
    """pts = composition time − the edit's media_time + empty edits: B-frames
    shifted so the first frame shows at 0 (dts negative), a 1 s empty edit
    delays everything by 1 s, and without an edit list (FFmpeg's fragments)
    the composition offset stays."""
    index, read = _open(mp4["faststart"])
    first = _fetch(index.window(1, 0, 0), read.data)[0]
    assert (first.pts, first.dts) == (0, -2 * 512)  # two B-frames of 512 ticks
    delayed, read = _open(mp4["delay"])
    first = _fetch(delayed.window(1, 0, 0), read.data)[0]
    assert (first.pts, first.dts) == (TIMESCALE, TIMESCALE - 2 * 512)
    assert delayed.tracks[0].first_pts == TIMESCALE
    fragmented, read = _open(mp4["frag-sidx"])
    first = _fetch(fragmented.window(1, 0, 0), read.data)[0]
    assert (first.pts, first.dts) == (2 * 512, 0)
    # DASH: the same fragments behind an edit list that takes the offset back.
    dash, read = _open(mp4["dash"])
    first = _fetch(dash.window(1, 0, 0), read.data)[0]
    assert (first.pts, first.dts) == (0, -2 * 512)
    aac, _ = _open(mp4["aac"])
    assert aac.tracks[0].first_pts == -1024  # the encoder's priming, cut by the edit
    opus, _ = _open(mp4["opus"])
    assert opus.tracks[0].first_pts == -312  # the pre-skip, likewise


@pytest.mark.parametrize("name", [*ALL, LYING_SIDX])
def test_track_description(mp4: dict[str, Path], name: str) -> None:
    """Track fields agree with PyAV: codec, size, rate, channels, time base,
    codec configuration (the stream's extradata), first pts, duration."""
    index, _ = _open(mp4[name])
    with av.open(str(mp4[name])) as container:
        for track in index.tracks:
            stream = next(s for s in container.streams if s.id == track.track_id)
            ctx = stream.codec_context
            assert track.kind == stream.type
            assert stream.time_base.denominator == track.timescale
            assert stream.time_base.numerator == 1
            if track.codec == "opus":
                # The dOps body; FFmpeg's extradata is the OpusHead made from it.
                assert track.config[2:4] == ctx.extradata[10:12][::-1]  # pre-skip
                assert track.codec_delay == 312
            else:
                assert track.config == (ctx.extradata or b"")
                assert track.codec_delay == 0
            packets = _packets(mp4[name], track.track_id)
            assert track.first_pts == min(p.pts for p in packets)
            assert track.duration_s is not None
            assert track.duration_s == pytest.approx(
                float(stream.duration * stream.time_base), abs=0.1
            )
            if track.kind == "video":
                assert (track.width, track.height) == (ctx.width, ctx.height) == (320, 180)
                assert track.fps == pytest.approx(30)
            else:
                assert (track.sample_rate, track.channels) == (ctx.sample_rate, ctx.channels)
    assert index.track("video") is next((t for t in index.tracks if t.kind == "video"), None)
    assert index.track("audio") is next((t for t in index.tracks if t.kind == "audio"), None)


def test_unknown_track_is_a_key_error(mp4: dict[str, Path]) -> None:
    """window() of a track the index does not list raises KeyError."""
    index, _ = _open(mp4["faststart"])
    with pytest.raises(KeyError):
        index.window(99, 0, 1)


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("name", [*ALL, LYING_SIDX])
def test_windows_start_on_a_key_and_end_with_the_gop(mp4: dict[str, Path], name: str) -> None:
    """Random windows start at the last sync sample at or before the start and
    end right before the first sync sample after the end, with the oracle's
    samples and bytes (fragmented: whole fragments, at least that)."""
    index, read = _open(mp4[name])
    rnd = random.Random(name)
    for track in index.tracks:
        packets = _packets(mp4[name], track.track_id)
        assert track.duration_s is not None
        # One GOP per fragment for fragmented video: exact there too.
        exact = name in PROGRESSIVE or (
            track.kind == "video" and name not in ("frag-nonkey", LYING_SIDX)
        )
        edges = [(0.0, 0.0), (-5.0, 0.5), (2.0, 2.0), (track.duration_s - 0.1, 1e6)]
        for start, end in edges + [
            (a, a + rnd.uniform(0, 4)) for a in (rnd.uniform(0, 9) for _ in range(12))
        ]:
            window = index.window(track.track_id, start, end)
            _check_window(window, packets, read.data, start, end, track.timescale, exact)


def test_muxed_progressive_spans_are_coalesced(mp4: dict[str, Path]) -> None:
    """In a muxed progressive file a window's spans skip the other track's
    chunks only where the gap is larger than 64 KiB: far fewer spans than samples."""
    index, read = _open(mp4["muxed"])
    for track in index.tracks:
        window = index.window(track.track_id, 2.0, 6.0)
        samples = _fetch(window, read.data)
        assert len(window.spans) < len(samples) / 10
        for (a, n), (b, _) in itertools.pairwise(window.spans):
            assert b - (a + n) > 64 * 1024
        for s in samples:
            assert any(a <= s.offset and s.offset + s.size <= a + n for a, n in window.spans)


@pytest.mark.parametrize("name", ["faststart", "frag-sidx", "frag-plain", "muxed-frag"])
def test_windows_pickle(mp4: dict[str, Path], name: str) -> None:
    """A window survives pickling (it travels to a join process) and reads the
    same samples after."""
    index, read = _open(mp4[name])
    window = index.window(index.tracks[0].track_id, 3.0, 5.0)
    copy = pickle.loads(pickle.dumps(window))
    assert copy == window
    assert _fetch(copy, read.data) == _fetch(window, read.data)


def test_fragment_reader_refuses_missing_or_short_spans(mp4: dict[str, Path]) -> None:
    """A fragment window read without its bytes, or with part of them, is a
    ContainerError, not garbage samples."""
    index, read = _open(mp4["frag-sidx"])
    window = index.window(1, 3.0, 5.0)
    assert isinstance(window.reader, FragmentReader)
    with pytest.raises(ContainerError):
        window.samples({})
    data = {o: read.data[o : o + n] for o, n in window.spans}
    first = window.spans[0][0]
    data[first] = data[first][: len(data[first]) // 2]
    with pytest.raises(ContainerError):
        window.samples(data)


# --------------------------------------------------------------------------- layout and cost


def test_box_order_of_the_generated_files(mp4: dict[str, Path]) -> None:
    """The fixtures are what they claim: faststart and moov-at-end layouts,
    YouTube-like ftyp/moov/sidx/moof+mdat, fragments without sidx or mfra."""
    boxes = {name: _top_level(mp4[name].read_bytes()) for name in mp4}
    assert boxes["faststart"].index("moov") < boxes["faststart"].index("mdat")
    assert boxes["moov-end"][-1] == "moov"
    sidx = boxes["frag-sidx"]
    assert sidx[:3] == ["ftyp", "moov", "sidx"]
    assert sidx[3:-1] == ["moof", "mdat"] * 5 and sidx[-1] == "mfra"
    assert boxes["frag-mfra"][-1] == "mfra" and "sidx" not in boxes["frag-mfra"]
    for name in ("frag-plain", "long"):
        assert "sidx" not in boxes[name] and "mfra" not in boxes[name]
        assert boxes[name][2:4] == ["moof", "mdat"]
    assert boxes["dash"].count("sidx") == 5


def test_open_costs(mp4: dict[str, Path]) -> None:
    """Opening reads a handful of chunks, never the file: faststart one, moov at
    the end two, fragmented with sidx at most three; window() of a sidx or
    progressive file reads nothing."""
    expected = {"faststart": 1, "moov-end": 2, "frag-sidx": 3, "hevc": 3, "muxed-frag": 3}
    for name, most in expected.items():
        index, read = _open(mp4[name])
        assert read.calls <= most, name
        assert read.bytes_read < len(read.data) / 2, name
        read.reset()
        for start in (0.5, 3.3, 5.9):
            index.window(index.tracks[0].track_id, start, start + 1)
        assert read.calls == 0


def test_search_cost_does_not_grow_with_position(mp4: dict[str, Path]) -> None:
    """Without sidx or mfra, a window near the end of a 10-minute source costs
    about what one near its start does (a few reads of a few KiB), far from
    walking every fragment; both are right."""
    index, read = _open(mp4["long"])
    assert read.calls <= 2
    packets = _packets(mp4["long"], 1)
    costs = []
    for start in (60.0, 300.0, 580.0):
        read.reset()
        window = index.window(1, start, start + 4.5)
        costs.append((read.calls, read.bytes_read))
        _check_window(window, packets, read.data, start, start + 4.5, TIMESCALE, exact=True)
    (early_calls, early_bytes), _, (late_calls, late_bytes) = costs
    assert late_calls <= early_calls + 2 and late_calls <= 8
    assert late_bytes <= early_bytes + 64 * 1024
    for calls, nbytes in costs:
        assert calls <= 8 and nbytes < len(read.data) * 0.03


def test_mfra_gives_windows_without_reads(mp4: dict[str, Path]) -> None:
    """With an mfra (FFmpeg's default trailer) the fragments are known from its
    tfra at open: windows read nothing."""
    index, read = _open(mp4["frag-mfra"])
    assert read.calls <= 3
    read.reset()
    index.window(1, 4.2, 6.1)
    assert read.calls == 0


def _sidx(ref_id: int, timescale: int, ept: int, refs: list[tuple[int, int, int, int]]) -> bytes:
    body = struct.pack(">IIIIIHH", 0, ref_id, timescale, ept, 0, 0, len(refs))
    for kind, size, duration, sap in refs:
        body += struct.pack(">III", kind << 31 | size, duration, sap)
    return struct.pack(">I4s", 8 + len(body), b"sidx") + body


def test_hierarchical_sidx(mp4: dict[str, Path]) -> None:
    """A top sidx whose references are two sidx boxes (reference_type 1), each
    before the fragments it indexes, is followed: same samples, and the
    bytes at the new offsets are the same frames."""
    data = mp4["frag-sidx"].read_bytes()
    pos = 0
    while data[pos + 4 : pos + 8] != b"sidx":
        pos += struct.unpack_from(">I", data, pos)[0]
    size = struct.unpack_from(">I", data, pos)[0]
    _, ref_id, timescale, ept, first_offset, _, count = struct.unpack_from(
        ">IIIQQHH", data, pos + 8
    )
    refs = [struct.unpack_from(">III", data, pos + 40 + 12 * i) for i in range(count)]
    refs = [(0, word & 0x7FFFFFFF, duration, sap) for word, duration, sap in refs]
    media = pos + size + first_offset
    halves = refs[:2], refs[2:]
    sub_a = _sidx(ref_id, timescale, ept, halves[0])
    sub_b = _sidx(ref_id, timescale, ept + sum(r[2] for r in halves[0]), halves[1])
    bytes_a = sum(r[1] for r in halves[0])
    bytes_b = sum(r[1] for r in halves[1])
    top = _sidx(
        ref_id, timescale, ept,
        [(1, len(sub_a) + bytes_a, 0, 0), (1, len(sub_b) + bytes_b, 0, 0)],
    )  # fmt: skip
    built = (
        data[:pos] + top + sub_a + data[media : media + bytes_a]
        + sub_b + data[media + bytes_a : media + bytes_a + bytes_b]
    )  # fmt: skip
    path = mp4["frag-sidx"].with_name("hierarchical.mp4")
    path.write_bytes(built)
    index = open_mp4(Counted(built), len(built))
    packets = _packets(mp4["frag-sidx"], 1)
    window = index.window(1, -1, 1e9)
    samples = _fetch(window, built)
    assert len(window.spans) == count
    assert [(s.pts, s.dts, s.size, s.key) for s in samples] == [
        (p.pts, p.dts, p.size, p.key) for p in packets
    ]
    assert [built[s.offset : s.offset + s.size] for s in samples] == [p.data for p in packets]
    later = index.window(1, 4.5, 5.0)
    assert later.following_key_pts == packets[180].pts and later.spans[0][0] > len(top)


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("name", ALL)
def test_init_opens_with_pyav(mp4: dict[str, Path], name: str) -> None:
    """PyAV opens ``init`` alone and finds every track's stream: codec, size or
    rate and channels, extradata, time base; progressive inits stay small."""
    index, _ = _open(mp4[name])
    if name in PROGRESSIVE:
        assert len(index.init) < 4096
        assert b"mdat" not in index.init
    with av.open(io.BytesIO(index.init)) as init, av.open(str(mp4[name])) as full:
        assert len(init.streams) == len(index.tracks)
        for stream, track in zip(init.streams, index.tracks, strict=True):
            original = next(s for s in full.streams if s.id == track.track_id)
            ctx, want = stream.codec_context, original.codec_context
            assert stream.id == track.track_id
            assert ctx.codec.id == want.codec.id
            assert ctx.extradata == want.extradata
            assert stream.time_base == original.time_base
            if track.kind == "video":
                assert (ctx.width, ctx.height) == (want.width, want.height)
            else:
                assert (ctx.sample_rate, ctx.channels) == (want.sample_rate, want.channels)


# --------------------------------------------------------------------------- hostile


def _refused(data: bytes) -> None:
    """Opening (and reading every window of) ``data`` either works or raises
    ContainerError: no other exception, no hang."""
    try:
        index = open_mp4(Counted(data), len(data))
        for track in index.tracks:
            _fetch(index.window(track.track_id, 1.0, 3.0), data)
            _fetch(index.window(track.track_id, -1, 1e9), data)
    except ContainerError:
        pass


def _box_offset(data: bytes, path: list[bytes]) -> int:
    """Offset of the box reached by ``path`` (first of each kind)."""
    containers = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf"}
    pos, end = 0, len(data)
    for depth, kind in enumerate(path):
        while pos < end:
            size, got = struct.unpack_from(">I4s", data, pos)
            if got == kind:
                break
            pos += size
        else:
            raise AssertionError(f"{kind!r} not found")
        if depth < len(path) - 1:
            assert got in containers
            end = pos + size
            pos += 8
    return pos


def test_truncated_files_are_refused(mp4: dict[str, Path]) -> None:
    """Files cut short anywhere (in the moov, in the middle, before the moov at
    the end) raise ContainerError or still index what is there."""
    for name in ("faststart", "moov-end", "frag-sidx", "frag-plain", "muxed"):
        data = mp4[name].read_bytes()
        for cut in [0, 7, 8, 20, 100, 500, 1000, 2000, len(data) // 2, len(data) - 100]:
            _refused(data[:cut])
    data = mp4["faststart"].read_bytes()
    with pytest.raises(ContainerError):
        open_mp4(Counted(data[:1000]), 1000)
    with pytest.raises(ContainerError):
        open_mp4(Counted(data[:-500]), len(data) - 500)  # samples past the end
    moov_end = mp4["moov-end"].read_bytes()
    with pytest.raises(ContainerError):
        open_mp4(Counted(moov_end[:-10]), len(moov_end) - 10)


def test_short_reads_are_refused(mp4: dict[str, Path]) -> None:
    """A read that returns fewer bytes than asked before the end is a
    ContainerError (a server that lied about the size)."""
    data = mp4["moov-end"].read_bytes()
    with pytest.raises(ContainerError):
        open_mp4(lambda offset, length: data[offset : offset + length // 2], len(data))


def _patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_bad_box_sizes_are_refused(mp4: dict[str, Path]) -> None:
    """Box sizes past the end, below 8, 1 with a bad 64-bit size, or 0 inside
    a container (swallowing its siblings) raise ContainerError."""
    data = mp4["faststart"].read_bytes()
    moov = _box_offset(data, [b"moov"])
    mvhd = _box_offset(data, [b"moov", b"mvhd"])
    stsz = _box_offset(data, [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsz"])
    cases = [
        _patched(data, moov, ">I", len(data)),  # past the end
        _patched(data, moov, ">I", 4),  # smaller than a header
        _patched(data, moov, ">I", 1)[: moov + 8] + struct.pack(">Q", 3) + data[moov + 16 :],
        _patched(data, moov, ">I", 1)[: moov + 8] + struct.pack(">Q", 1 << 62) + data[moov + 16 :],
        _patched(data, mvhd, ">I", 0),  # to the end of moov: the trak is swallowed
        _patched(data, stsz, ">I", 4),
        _patched(data, 0, ">I", 0)[:8] + data[8:],  # ftyp to the end: no moov
    ]
    for case in cases:
        with pytest.raises(ContainerError):
            index = open_mp4(Counted(case), len(case))
            index.window(1, 0, 1)


def test_absurd_counts_are_refused(mp4: dict[str, Path]) -> None:
    """Entry counts larger than their box (stsz, stts, ctts, stsc, stco, stss,
    elst, sidx, trun) raise ContainerError without a huge allocation."""
    stbl = [b"moov", b"trak", b"mdia", b"minf", b"stbl"]
    data = mp4["faststart"].read_bytes()
    for kind, at in [
        (b"stsz", 16),
        (b"stts", 12),
        (b"ctts", 12),
        (b"stsc", 12),
        (b"stco", 12),
        (b"stss", 12),
    ]:
        offset = _box_offset(data, [*stbl, kind]) + at
        with pytest.raises(ContainerError):
            open_mp4(Counted(case := _patched(data, offset, ">I", 0xFFFF_FFF0)), len(case))
    offset = _box_offset(data, [*stbl, b"stsz"])
    fixed = _patched(data, offset + 12, ">II", 7, 0xFFFF_FFF0)  # fixed-size, huge count
    with pytest.raises(ContainerError):
        open_mp4(Counted(fixed), len(fixed))
    elst = _box_offset(data, [b"moov", b"trak", b"edts", b"elst"])
    case = _patched(data, elst + 12, ">I", 0xFFFF_FFF0)
    with pytest.raises(ContainerError):
        open_mp4(Counted(case), len(case))

    frag = mp4["frag-sidx"].read_bytes()
    sidx = _box_offset(frag, [b"sidx"])
    case = _patched(frag, sidx + 8 + 30, ">H", 0xFFFF)
    with pytest.raises(ContainerError):
        open_mp4(Counted(case), len(case))
    index = open_mp4(Counted(frag), len(frag))
    window = index.window(1, 3.0, 3.5)
    trun = _box_offset(frag[window.spans[0][0] :], [b"moof", b"traf", b"trun"])
    case = _patched(frag, window.spans[0][0] + trun + 12, ">I", 0x7FFF_FFFF)
    with pytest.raises(ContainerError):
        _fetch(window, case)


@pytest.mark.parametrize("name", ["faststart", "muxed", "frag-sidx", "frag-plain", "aac-frag"])
def test_random_corruption_raises_only_container_errors(mp4: dict[str, Path], name: str) -> None:
    """Random bytes overwritten in the headers (moov, sidx, first moofs) never
    raise anything but ContainerError, never hang."""
    data = mp4[name].read_bytes()
    header_end = min(len(data), 8 * 1024)
    rnd = random.Random(name)
    for _ in range(150):
        case = bytearray(data)
        for _ in range(rnd.randint(1, 4)):
            at = rnd.randrange(header_end)
            case[at] = rnd.choice([0, 1, 0xFF, 0x7F, 0x80, rnd.randrange(256)])
        _refused(bytes(case))
