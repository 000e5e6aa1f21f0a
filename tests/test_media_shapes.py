"""The generated media shapes are what they promise, checked by an oracle that
does not share code with src/: box and element walks of the files' bytes,
bitstream headers, and PyAV's demuxer for the packets."""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import av
import pytest

from tests.conftest import MediaServer, Shapes
from tests.media_shapes import (
    LONG_SHAPES,
    SHAPE_NAMES,
    Shape,
    make_long_source,
    make_shape,
    mp4_box_paths,
    mp4_boxes,
    mp4_sidx,
    nal_types,
    vp9_frames,
    vp9_shown,
    webm_has_cues,
    webm_top_level,
)


@dataclass(frozen=True)
class Packet:
    pts_s: float
    duration_s: float
    key: bool
    pos: int
    data: bytes


@dataclass(frozen=True)
class Stream:
    codec_id: int
    rate: float  # average frame rate, or sample rate
    packets: list[Packet]  # decode order

    @property
    def start_s(self) -> float:
        return min(p.pts_s for p in self.packets)

    @property
    def end_s(self) -> float:
        return max(p.pts_s + p.duration_s for p in self.packets)

    @property
    def keys(self) -> list[int]:
        return [i for i, p in enumerate(self.packets) if p.key]


def demux(path: Path, kind: str) -> Stream:
    with av.open(str(path)) as container:
        stream = container.streams.video[0] if kind == "video" else container.streams.audio[0]
        tb = stream.time_base
        packets = [
            Packet(float(p.pts * tb), float(p.duration * tb), p.is_keyframe, p.pos, bytes(p))
            for p in container.demux(stream)
            if p.size
        ]
        ctx = stream.codec_context
        rate = float(stream.average_rate) if kind == "video" else float(ctx.sample_rate)
        return Stream(ctx.codec.id, rate, packets)


def codec_id(name: str) -> int:
    return int(av.Codec(name, "r").id)


def leading_pictures(stream: Stream, key: int) -> list[int]:
    """Packets after keyframe ``key`` in decode order that show before it."""
    packets = stream.packets
    return [j for j in range(key + 1, len(packets)) if packets[j].pts_s < packets[key].pts_s]


def _by_pts_pairs(stream: Stream) -> list[tuple[Packet, Packet]]:
    ordered = sorted(stream.packets, key=lambda p: p.pts_s)
    return list(itertools.pairwise(ordered))


def video_of(shape: Shape) -> Stream:
    return demux(shape.files["video"], "video")


def audio_of(shape: Shape) -> Stream:
    return demux(shape.files.get("audio") or shape.files["muxed"], "audio")


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_video_fields_match_the_stream(shapes: Shapes, name: str) -> None:
    """Each shape's video is the codec, frame rate, GOP, duration and reordering its Shape says."""
    shape = shapes.get(name)
    video = video_of(shape)
    assert video.codec_id == codec_id(shape.video_codec)
    frame_s = sorted({round(b.pts_s - a.pts_s, 3) for a, b in _by_pts_pairs(video)})
    if shape.fps is None:
        assert len(frame_s) >= 2 and frame_s[-1] >= 1.5 * frame_s[0], frame_s
    else:
        assert video.rate == pytest.approx(shape.fps)
        assert frame_s[0] == pytest.approx(1 / shape.fps, abs=0.0015), frame_s
        assert frame_s[-1] == pytest.approx(1 / shape.fps, abs=0.0015), frame_s
    assert video.end_s - video.start_s == pytest.approx(shape.duration_s, abs=0.002)
    key_times = [video.packets[i].pts_s for i in video.keys]
    assert len(key_times) == math.ceil(shape.duration_s / shape.gop_s)
    for a, b in itertools.pairwise(key_times):
        assert b - a == pytest.approx(shape.gop_s, abs=0.002)
    reordered = any(b.pts_s < a.pts_s for a, b in itertools.pairwise(video.packets))
    assert reordered == shape.b_frames
    leading = [j for k in video.keys[1:] for j in leading_pictures(video, k)]
    assert bool(leading) == shape.open_gop


@pytest.mark.parametrize("name", SHAPE_NAMES)
def test_audio_fields_match_the_stream(shapes: Shapes, name: str) -> None:
    """Each shape's audio is the codec and duration its Shape says (AAC 44.1 kHz, Opus 48 kHz)."""
    shape = shapes.get(name)
    assert ("audio" in shape.files) == (name != "muxed")
    audio = audio_of(shape)
    assert shape.audio_codec is not None and shape.audio_duration_s is not None
    assert audio.codec_id == codec_id(shape.audio_codec)
    assert audio.rate == (48000 if shape.audio_codec == "opus" else 44100)
    # AAC's priming frame and the last frame's padding: at most ~2 frames over.
    assert audio.end_s - audio.start_s == pytest.approx(shape.audio_duration_s, abs=0.05)


@pytest.mark.parametrize(
    "name", [n for n in SHAPE_NAMES if n not in ("progressive_moov_end", "webm_vp9")]
)
def test_mp4s_are_faststart_or_fragmented(shapes: Shapes, name: str) -> None:
    """Every MP4 but the moov-at-end one has its moov before any media data."""
    for path in shapes.get(name).files.values():
        kinds = [kind for kind, _, _ in mp4_boxes(path)]
        assert kinds[0] == "ftyp"
        assert kinds.index("moov") < kinds.index("mdat"), kinds


def test_progressive_moov_end_has_moov_after_mdat(shapes: Shapes) -> None:
    """progressive_moov_end: both files end with the moov, after the mdat."""
    shape = shapes.get("progressive_moov_end")
    for path in shape.files.values():
        kinds = [kind for kind, _, _ in mp4_boxes(path)]
        assert kinds[-1] == "moov" and kinds.index("mdat") < kinds.index("moov"), kinds


def _fragments(path: Path) -> list[tuple[tuple[str, int, int], tuple[str, int, int]]]:
    """The (moof, mdat) pairs after the header boxes, asserting nothing else is there."""
    boxes = mp4_boxes(path)
    first = next(i for i, box in enumerate(boxes) if box[0] == "moof")
    tail = boxes[first:]
    assert [b[0] for b in tail] == ["moof", "mdat"] * (len(tail) // 2), tail
    return list(zip(tail[0::2], tail[1::2], strict=True))


@pytest.mark.parametrize("name", ["dash_fmp4", "av1_fmp4"])
def test_dash_video_has_a_global_sidx_and_one_fragment_per_gop(shapes: Shapes, name: str) -> None:
    """dash_fmp4, av1_fmp4 video: ftyp, moov(mvex), sidx, then one moof/mdat per GOP, each
    starting with its keyframe and each referenced by the sidx; no mfra."""
    shape = shapes.get(name)
    path = shape.files["video"]
    kinds = [kind for kind, _, _ in mp4_boxes(path)]
    assert kinds[:4] == ["ftyp", "moov", "sidx", "moof"], kinds
    paths = mp4_box_paths(path)
    assert {"moov/mvex", "moov/mvex/trex", "moof/traf/tfhd", "moof/traf/trun"} <= paths
    assert "mfra" not in paths
    fragments = _fragments(path)
    assert len(fragments) == math.ceil(shape.duration_s / shape.gop_s)
    video = video_of(shape)
    key_offsets = [video.packets[i].pos for i in video.keys]
    # default_base_moof, one track: a fragment's first sample opens its mdat.
    assert key_offsets == [mdat[1] + 8 for _, mdat in fragments]
    timescale, refs = mp4_sidx(path)
    assert [(r.offset, r.size) for r in refs] == [
        (moof[1], moof[2] + mdat[2]) for moof, mdat in fragments
    ]
    assert all(r.starts_with_sap for r in refs)
    assert [r.duration / timescale for r in refs] == [shape.gop_s] * len(refs)


@pytest.mark.parametrize("name", ["dash_fmp4", "av1_fmp4"])
def test_dash_audio_is_fragmented_by_two_seconds_with_a_sidx(shapes: Shapes, name: str) -> None:
    """dash_fmp4, av1_fmp4 audio: fragmented m4a with a sidx and fragments of about 2 s."""
    path = shapes.get(name).files["audio"]
    kinds = [kind for kind, _, _ in mp4_boxes(path)]
    assert kinds[:4] == ["ftyp", "moov", "sidx", "moof"], kinds
    assert "moov/mvex" in mp4_box_paths(path) and "mfra" not in kinds
    fragments = _fragments(path)
    timescale, refs = mp4_sidx(path)
    assert len(refs) == len(fragments) == 6
    assert [(r.offset, r.size) for r in refs] == [
        (moof[1], moof[2] + mdat[2]) for moof, mdat in fragments
    ]
    for ref in refs[:-1]:
        assert ref.duration / timescale == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("name", ["dash_fmp4", "fmp4_nosidx", "progressive"])
def test_edit_lists_only_in_progressive_mp4(shapes: Shapes, name: str) -> None:
    """The fMP4 shapes have no edit list (video starts at its B-frame delay, audio with its
    priming at 0); progressive MP4 has them (video at 0, priming before 0)."""
    shape = shapes.get(name)
    fragmented = shape.container == "fmp4"
    for path in shape.files.values():
        assert ("moov/trak/edts/elst" in mp4_box_paths(path)) != fragmented
    video, audio = video_of(shape), audio_of(shape)
    assert video.start_s == pytest.approx(2 / 30 if fragmented else 0.0, abs=1e-6)
    assert audio.start_s == pytest.approx(0.0 if fragmented else -1024 / 44100, abs=1e-6)


def test_fmp4_nosidx_has_neither_sidx_nor_mfra(shapes: Shapes) -> None:
    """fmp4_nosidx: ftyp, moov(mvex), moof/mdat pairs (one per GOP for video), no sidx, no mfra."""
    shape = shapes.get("fmp4_nosidx")
    for key, path in shape.files.items():
        paths = mp4_box_paths(path)
        assert "moov/mvex" in paths
        assert not {"sidx", "mfra"} & paths, paths
        assert [kind for kind, _, _ in mp4_boxes(path)][:3] == ["ftyp", "moov", "moof"]
        fragments = _fragments(path)
        if key == "video":
            assert len(fragments) == math.ceil(shape.duration_s / shape.gop_s)


def test_webm_vp9_has_cues_before_clusters(shapes: Shapes) -> None:
    """webm_vp9: both files have Cues with CuePoints, placed before the first Cluster; the
    video has one Cluster per GOP."""
    shape = shapes.get("webm_vp9")
    for path in shape.files.values():
        names = webm_top_level(path)
        assert names[:2] == ["EBML", "Segment"]
        assert {"SeekHead", "Info", "Tracks"} <= set(names)
        assert names.index("Cues") < names.index("Cluster"), names
        assert webm_has_cues(path)
    clusters = webm_top_level(shape.files["video"]).count("Cluster")
    assert clusters == len(video_of(shape).keys) == math.ceil(shape.duration_s / shape.gop_s)


def test_webm_vp9_has_hidden_alt_ref_frames(shapes: Shapes) -> None:
    """webm_vp9: some packets are superframes holding a hidden (alt-ref) frame, and decoding
    still gives exactly one picture per packet."""
    path = shapes.get("webm_vp9").files["video"]
    video = demux(path, "video")
    frames = [vp9_frames(p.data) for p in video.packets]
    superframes = [f for f in frames if len(f) > 1]
    hidden = [x for f in frames for x in f if not vp9_shown(x)]
    assert superframes and len(hidden) == len(superframes)
    assert all(sum(vp9_shown(x) for x in f) == 1 for f in frames)
    with av.open(str(path)) as container:
        decoded = sum(1 for _ in container.decode(video=0))
    assert decoded == len(video.packets) < sum(len(f) for f in frames)


def test_hevc_mp4_is_hvc1_with_closed_idr_gops(shapes: Shapes) -> None:
    """hevc_mp4: an hvc1 sample entry (hvcC), every keyframe an IDR, no picture after a keyframe
    in decode order that shows before it."""
    shape = shapes.get("hevc_mp4")
    paths = mp4_box_paths(shape.files["video"])
    assert "moov/trak/mdia/minf/stbl/stsd/hvc1/hvcC" in paths
    video = video_of(shape)
    for k in video.keys:
        assert {19, 20} & set(nal_types(video.packets[k].data, "hevc"))
        assert leading_pictures(video, k) == []


def test_hevc_open_gop_has_cra_keyframes_with_rasl_leading_pictures(shapes: Shapes) -> None:
    """hevc_open_gop: keyframes after the first are CRA pictures followed in decode order by
    RASL pictures that show before them."""
    video = video_of(shapes.get("hevc_open_gop"))
    assert {19, 20} & set(nal_types(video.packets[0].data, "hevc"))
    for k in video.keys[1:]:
        assert 21 in nal_types(video.packets[k].data, "hevc")
        leading = leading_pictures(video, k)
        assert leading
        for j in leading:
            assert {8, 9} & set(nal_types(video.packets[j].data, "hevc"))


def test_h264_open_gop_has_non_idr_keyframes_with_leading_b_frames(shapes: Shapes) -> None:
    """h264_open_gop: the first keyframe is an IDR, the later ones non-IDR I pictures with
    B-frames after them in decode order that show before them."""
    video = video_of(shapes.get("h264_open_gop"))
    assert 5 in nal_types(video.packets[0].data, "h264")
    for k in video.keys[1:]:
        kinds = nal_types(video.packets[k].data, "h264")
        assert 5 not in kinds and 1 in kinds
    assert any(leading_pictures(video, k) for k in video.keys[1:])


@pytest.mark.parametrize("name", ["progressive", "muxed", "h264_60fps"])
def test_h264_keyframes_are_idr(shapes: Shapes, name: str) -> None:
    """Closed-GOP H.264 shapes: every keyframe is an IDR picture."""
    video = video_of(shapes.get(name))
    assert all(5 in nal_types(video.packets[k].data, "h264") for k in video.keys)


def test_h264_is_high_profile(shapes: Shapes) -> None:
    """The H.264 shapes are High profile (8x8 transforms), like YouTube's."""
    with av.open(str(shapes.get("progressive").files["video"])) as container:
        assert container.streams.video[0].codec_context.profile == "High"


def test_vfr_really_changes_frame_rate(shapes: Shapes) -> None:
    """h264_vfr: frames last 1/30 s, then 1/15 s in the middle third, then 1/30 s again."""
    video = video_of(shapes.get("h264_vfr"))
    steps = [(a.pts_s, round(b.pts_s - a.pts_s, 4)) for a, b in _by_pts_pairs(video)]
    assert {s for t, s in steps if t < 3.9 or t > 8.1} == {round(1 / 30, 4)}
    assert {s for t, s in steps if 4.1 < t < 7.9} == {round(1 / 15, 4)}


def test_av_mismatch_audio_is_shorter_and_starts_later_when_muxed(shapes: Shapes) -> None:
    """av_mismatch: audio 2 s shorter than the video; in the muxed file it starts 1 s late."""
    shape = shapes.get("av_mismatch")
    video, audio = video_of(shape), audio_of(shape)
    assert (video.end_s - video.start_s) - (audio.end_s - audio.start_s) == pytest.approx(
        2.0, abs=0.05
    )
    muxed_video = demux(shape.files["muxed"], "video")
    muxed_audio = demux(shape.files["muxed"], "audio")
    # The first AAC frame is the encoder's priming (23 ms) before the audible start.
    assert muxed_audio.start_s == pytest.approx(1.0 - 1024 / 44100, abs=0.002)
    assert muxed_video.start_s == 0.0
    assert muxed_audio.end_s == pytest.approx(11.0, abs=0.05)


def test_muxed_interleaves_video_and_audio(shapes: Shapes) -> None:
    """muxed: one faststart MP4 whose video and audio samples alternate in the file."""
    shape = shapes.get("muxed")
    assert shape.files == {"muxed": shape.files["video"], "video": shape.files["muxed"]}
    video = demux(shape.files["muxed"], "video")
    audio = demux(shape.files["muxed"], "audio")
    in_file = sorted([(p.pos, "v") for p in video.packets] + [(p.pos, "a") for p in audio.packets])
    switches = sum(a[1] != b[1] for a, b in itertools.pairwise(in_file))
    assert switches >= 2 * shape.duration_s  # at least one chunk of each per second


def test_unknown_shape_or_length_is_refused(tmp_path: Path) -> None:
    """make_shape and make_long_source refuse unknown shapes (naming the known ones) and
    lengths they cannot make, before running anything."""
    with pytest.raises(ValueError, match="progressive"):
        make_shape("flv", tmp_path)
    with pytest.raises(ValueError, match="webm_vp9"):
        make_long_source(tmp_path, "h264_vfr", 0.1)
    with pytest.raises(ValueError, match="positive"):
        make_shape("progressive", tmp_path, seconds=0)
    # Its audio would last 0 s, which lavfi's sine takes as "forever".
    with pytest.raises(ValueError, match="more than 3 s"):
        make_shape("av_mismatch", tmp_path, seconds=2)
    assert list(tmp_path.iterdir()) == []


def test_failed_encode_raises_with_ffmpeg_message_and_leaves_no_file(tmp_path: Path) -> None:
    """A failing FFmpeg run raises with FFmpeg's error, and neither it nor the audio encode
    running beside it leaves a file (complete-looking or partial) behind."""
    with pytest.raises(RuntimeError, match="Unable to parse"):
        make_shape("progressive", tmp_path, size="abc")
    assert list(tmp_path.iterdir()) == []


def test_long_source_is_made_once_and_reused(tmp_path: Path) -> None:
    """make_long_source writes the shape at the asked length and reuses it on a second call."""
    assert {"progressive", "dash_fmp4", "webm_vp9", "hevc_mp4", "av1_fmp4"} <= set(LONG_SHAPES)
    first = make_long_source(tmp_path, "dash_fmp4", 0.1)
    assert first.duration_s == 6.0 and first.container == "fmp4"
    video = video_of(first)
    assert video.end_s - video.start_s == pytest.approx(6.0, abs=0.002)
    with av.open(str(first.files["video"])) as container:
        assert container.streams.video[0].codec_context.width == 160
    stamps = {k: os.stat(p).st_mtime_ns for k, p in first.files.items()}
    again = make_long_source(tmp_path, "dash_fmp4", 0.1)
    assert again == first
    assert {k: os.stat(p).st_mtime_ns for k, p in again.files.items()} == stamps


def test_shapes_fixture_makes_each_shape_once_on_first_use(tmp_path: Path) -> None:
    """The shapes cache writes nothing until asked, then only the shape asked for, once."""
    cache = Shapes(tmp_path)
    assert list(tmp_path.iterdir()) == []
    shape = cache.get("progressive")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "progressive.audio.m4a",
        "progressive.video.mp4",
    ]
    stamp = shape.files["video"].stat().st_mtime_ns
    assert cache.get("progressive") is shape
    assert shape.files["video"].stat().st_mtime_ns == stamp


async def test_media_server_serves_added_files_with_range_and_counts(
    shapes: Shapes, media_server: MediaServer
) -> None:
    """media_server.add serves any file by name with Range, counts its bytes, and the slow and
    stall prefixes work for it; other names stay 404."""
    path = shapes.get("webm_vp9").files["video"]
    data = path.read_bytes()
    url = media_server.add(path.name, path)
    assert url == media_server.url(path.name)
    with pytest.raises(ValueError):
        media_server.add("video.mp4", path)
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Range": "bytes=100-1099"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Type"] == "video/webm"
            assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
            assert await resp.read() == data[100:1100]
        slow = media_server.url(path.name, slow=True)
        async with http.get(slow, headers={"Range": "bytes=0-4095"}) as resp:
            assert await resp.read() == data[:4096]
        tail = {"Range": f"bytes={len(data) - 10}-"}
        stalled = asyncio.create_task(_read(http, media_server.url(path.name, stall=True), tail))
        while len(media_server.requests) < 3:
            await asyncio.sleep(0.01)
        # The handler records the request and waits for unstall with no await between.
        assert not stalled.done() and media_server.requests[-1]["bytes"] == 0
        media_server.unstall.set()
        assert await stalled == data[-10:]
        async with http.get(f"{media_server.base_url}/expired/{path.name}", headers=tail) as resp:
            assert resp.status == 403
        async with http.get(media_server.url("nothing.webm")) as resp:
            assert resp.status == 404
    assert [(r["name"], r["bytes"]) for r in media_server.requests] == [
        (path.name, 1000),
        (path.name, 4096),
        (path.name, 10),
        (path.name, 0),
    ]


async def _read(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> bytes:
    async with http.get(url, headers=headers) as resp:
        return await resp.read()


# --- The oracle itself, on bytes made by hand -----------------------------


def _box(kind: str, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind.encode()) + payload


def test_mp4_walk_reads_nested_and_64_bit_boxes(tmp_path: Path) -> None:
    """mp4_boxes/mp4_box_paths: nesting, a 64-bit size, and sample entries' child boxes."""
    entry = _box("hvc1", bytes(78) + _box("hvcC", b"\x01"))
    stsd = _box("stsd", bytes(8) + entry)
    moov = _box("moov", _box("trak", _box("mdia", _box("minf", _box("stbl", stsd)))))
    large = struct.pack(">I4sQ", 1, b"mdat", 16 + 5) + b"abcde"
    path = tmp_path / "hand.mp4"
    path.write_bytes(_box("ftyp", b"isom") + moov + large)
    boxes = mp4_boxes(path)
    assert [(k, o) for k, o, _ in boxes] == [("ftyp", 0), ("moov", 12), ("mdat", 12 + len(moov))]
    assert boxes[-1][2] == 21
    assert "moov/trak/mdia/minf/stbl/stsd/hvc1/hvcC" in mp4_box_paths(path)


def test_mp4_sidx_reads_references(tmp_path: Path) -> None:
    """mp4_sidx: version 0 and 1 boxes, references placed after the sidx plus first_offset."""
    refs = struct.pack(">III", 100, 1000, 1 << 31) + struct.pack(">III", 50, 900, 0)
    v0 = _box("sidx", b"\x00\x00\x00\x00" + struct.pack(">IIIIxxH", 1, 1000, 0, 7, 2) + refs)
    path = tmp_path / "sidx0.mp4"
    path.write_bytes(_box("ftyp", b"isom") + v0)
    timescale, got = mp4_sidx(path)
    start = 12 + len(v0) + 7
    assert timescale == 1000
    assert [(r.offset, r.size, r.duration, r.starts_with_sap) for r in got] == [
        (start, 100, 1000, True),
        (start + 100, 50, 900, False),
    ]
    v1 = _box("sidx", b"\x01\x00\x00\x00" + struct.pack(">IIQQxxH", 1, 90000, 0, 0, 2) + refs)
    path.write_bytes(v1)
    assert mp4_sidx(path)[1][1].offset == len(v1) + 100


def _ebml(element_id: bytes, payload: bytes) -> bytes:
    size = len(payload)
    assert size < 0x3FFF
    return element_id + struct.pack(">H", 0x4000 | size) + payload


def test_webm_walk_names_segment_children_and_finds_cue_points(tmp_path: Path) -> None:
    """webm_top_level/webm_has_cues: two-byte sizes, an unknown-size Segment, empty Cues."""
    header = _ebml(bytes.fromhex("1A45DFA3"), b"\x42\x82\x84webm")
    cues = _ebml(bytes.fromhex("1C53BB6B"), _ebml(b"\xbb", b"\xb3\x81\x00"))
    cluster = _ebml(bytes.fromhex("1F43B675"), b"\xe7\x81\x00")
    info = _ebml(bytes.fromhex("1549A966"), b"")
    unknown_size = bytes.fromhex("18538067") + b"\x01\xff\xff\xff\xff\xff\xff\xff"
    path = tmp_path / "hand.webm"
    path.write_bytes(header + unknown_size + info + cues + cluster)
    assert webm_top_level(path) == ["EBML", "Segment", "Info", "Cues", "Cluster"]
    assert webm_has_cues(path)
    empty_cues = _ebml(bytes.fromhex("1C53BB6B"), b"")
    path.write_bytes(header + unknown_size + info + empty_cues + cluster)
    assert not webm_has_cues(path)


def test_vp9_superframe_split_and_show_bits() -> None:
    """vp9_frames splits a superframe by its index; vp9_shown reads show_frame and
    show_existing_frame, for profiles 0 and 3."""
    hidden = bytes([0b10_0_0_0_1_0_0, 0]) + b"\x11" * 3  # inter frame, show_frame 0
    shown = bytes([0b10_0_0_0_1_1_0, 0]) + b"\x22" * 4  # inter frame, show_frame 1
    marker = 0b110_00_001  # superframe, 1-byte sizes, 2 frames
    superframe = hidden + shown + bytes([marker, len(hidden), len(shown), marker])
    assert vp9_frames(superframe) == [hidden, shown]
    assert vp9_frames(shown) == [shown]
    assert [vp9_shown(f) for f in (hidden, shown)] == [False, True]
    assert vp9_shown(bytes([0b10_0_0_1_000, 0]))  # show_existing_frame
    assert not vp9_shown(bytes([0b10_1_1_0_0_1_0, 0]))  # profile 3: reserved bit, then fields
    assert vp9_shown(bytes([0b10_1_1_0_0_1_1, 0]))


def test_nal_types_reads_length_prefixed_units() -> None:
    """nal_types: 4-byte length prefixes, H.264 and HEVC type bits."""
    h264 = struct.pack(">I", 2) + b"\x65\x00" + struct.pack(">I", 1) + b"\x06"
    assert nal_types(h264, "h264") == [5, 6]
    hevc = struct.pack(">I", 2) + bytes([21 << 1, 1]) + struct.pack(">I", 2) + bytes([9 << 1, 1])
    assert nal_types(hevc, "hevc") == [21, 9]
