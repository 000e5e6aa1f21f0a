"""Generated test media in the shapes YouTube's adaptive formats really have.

The cut engine gets what the Vidfly resolver hands over: YouTube's adaptive
formats (fragmented MP4 with a sidx, VP9 WebM with Cues, AV1 fMP4, Opus,
AAC), not only faststart progressive MP4. :func:`make_shape` writes one of
those shapes in a few seconds (small, fast presets); :func:`make_long_source`
writes an hour-long one for benchmarks.

Every video is ``testsrc2`` (every frame differs) and every audio a beeping
sine, so a cut can be checked frame by frame. The structure helpers at the
bottom (:func:`mp4_boxes`, :func:`mp4_box_paths`, :func:`mp4_sidx`,
:func:`webm_top_level`, :func:`webm_has_cues`, :func:`vp9_frames`,
:func:`vp9_shown`, :func:`nal_types`) are the tests' oracle: pure Python,
written without looking at ``src/``.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg


@dataclass(frozen=True)
class Shape:
    """One generated source: its files and what they are promised to be."""

    name: str
    # "video" always; "audio" when the shape has a separate audio file; "muxed"
    # when it has one file with both (then "video" is that same file).
    files: dict[str, Path]
    video_codec: str  # FFmpeg's name: h264 | hevc | vp9 | av1
    audio_codec: str | None  # aac | opus | None
    fps: float | None  # None for variable frame rate
    gop_s: float  # keyframe interval
    duration_s: float  # of the video
    audio_duration_s: float | None
    b_frames: bool  # frames stored out of presentation order
    open_gop: bool  # keyframes with leading pictures that reference the previous GOP
    container: str  # "mp4" | "fmp4" | "webm"
    notes: str = ""
    # The FFmpeg arguments (after the common ones) that made each file.
    commands: dict[str, list[str]] = field(default_factory=dict, compare=False)


GOP_S = 2.0
AAC_RATE = 44100  # YouTube's 140 is 44.1 kHz AAC-LC
OPUS_RATE = 48000  # Opus always runs at 48 kHz


# fMP4 as YouTube's DASH formats have it: ftyp, moov (with mvex), one global
# sidx, then moof/mdat pairs, no mfra. empty_moov: no samples in the moov;
# default_base_moof: tfhd offsets relative to each moof; global_sidx: one
# sidx for the whole file, written at the end and moved before the first
# moof; skip_trailer: no mfra.
_FMP4_SIDX = "frag_keyframe+empty_moov+default_base_moof+global_sidx+skip_trailer"
_FMP4_NOSIDX = "frag_keyframe+empty_moov+default_base_moof+skip_trailer"
# Audio has no keyframes to cut at (frag_keyframe only looks at video):
# fragments by duration instead, 2 s like YouTube's audio segments.
_FMP4_AUDIO_SIDX = "empty_moov+default_base_moof+global_sidx+skip_trailer"
_FMP4_AUDIO_NOSIDX = "empty_moov+default_base_moof+skip_trailer"
_FRAG_2S = ["-frag_duration", "2000000"]


class _Run:
    """One FFmpeg process writing ``part``, renamed to ``path`` once it exits cleanly."""

    def __init__(self, args: list[str], part: Path | None = None, path: Path | None = None):
        self.cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-y"]
        self.cmd += ["-loglevel", "error", *args]
        if part is not None:
            self.cmd.append(str(part))
        self.part, self.path = part, path
        # A file, not a pipe: two processes at once cannot block on a full pipe.
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in wait or kill)
        # SVT-AV1 prints its banner through its own logger, not FFmpeg's.
        env = {**os.environ, "SVT_LOG": "1"}
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
            env=env,
        )  # fmt: skip

    def wait(self, timeout_s: float = 1800) -> None:
        try:
            code = self.proc.wait(timeout_s)
        except BaseException:
            self.kill()
            raise
        with self.stderr:
            self.stderr.seek(0)
            errors = self.stderr.read().decode(errors="replace")
        if code != 0:
            if self.part is not None:
                self.part.unlink(missing_ok=True)
            raise RuntimeError(f"ffmpeg failed ({code}): {' '.join(self.cmd)}\n{errors}")
        if self.part is not None and self.path is not None:
            self.part.replace(self.path)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()
        if self.part is not None:
            self.part.unlink(missing_ok=True)


def _testsrc(size: str, fps: float, seconds: float) -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={fps:g}:duration={seconds:g}"]


def _tone(rate: int, seconds: float) -> list[str]:
    if seconds <= 0:  # lavfi's sine runs forever at duration=0
        raise ValueError(f"a tone of {seconds} s")
    # A beep every half second over a steady tone: the audio has a time structure too.
    spec = f"sine=frequency=440:beep_factor=2:sample_rate={rate}:duration={seconds:g}"
    return ["-f", "lavfi", "-i", spec]


def _x264(gop_frames: int, *, open_gop: bool = False, crf: int = 30) -> list[str]:
    """H.264 High with B-frames and a fixed GOP (superfast keeps 8x8 transforms: High)."""
    args = [
        "-c:v", "libx264", "-preset", "superfast", "-profile:v", "high", "-crf", str(crf),
        "-pix_fmt", "yuv420p", "-bf", "3",
        "-g", str(gop_frames), "-keyint_min", str(gop_frames), "-sc_threshold", "0",
    ]  # fmt: skip
    if open_gop:
        args += ["-x264-params", "open-gop=1"]
    return args


def _x265(gop_frames: int, *, open_gop: bool) -> list[str]:
    params = f"keyint={gop_frames}:min-keyint={gop_frames}:scenecut=0:bframes=3"
    params += f":open-gop={int(open_gop)}:log-level=error"
    return [
        "-c:v", "libx265", "-preset", "ultrafast", "-crf", "32", "-pix_fmt", "yuv420p",
        "-x265-params", params, "-tag:v", "hvc1",
    ]  # fmt: skip


def _vp9(gop_frames: int) -> list[str]:
    # Hidden alt-ref frames: libvpx only makes them in a two-pass encode (one
    # pass at any deadline gives none), with a lag; it packs each one with the
    # next shown frame into a superframe. cpu-used above 5 is 5 in "good" mode.
    return [
        "-c:v", "libvpx-vp9", "-deadline", "good", "-cpu-used", "5", "-row-mt", "1",
        "-auto-alt-ref", "1", "-lag-in-frames", "16", "-b:v", "0", "-crf", "50",
        "-g", str(gop_frames), "-keyint_min", str(gop_frames), "-pix_fmt", "yuv420p",
    ]  # fmt: skip


def _av1(gop_frames: int) -> list[str]:
    # Preset 11 is SVT-AV1's fastest (12 is mapped to it); key frames are closed GOPs.
    return [
        "-c:v", "libsvtav1", "-preset", "11", "-crf", "45", "-g", str(gop_frames),
        "-pix_fmt", "yuv420p",
    ]  # fmt: skip


# The fast coder: FFmpeg's default (twoloop) costs more than the video at 160x90.
_AAC = ["-c:a", "aac", "-aac_coder", "fast", "-b:a", "64k", "-ac", "2"]
_OPUS = ["-c:a", "libopus", "-b:a", "48k", "-ac", "2"]
_FASTSTART = ["-movflags", "+faststart"]
# WebM as YouTube serves it: Cues before the first Cluster (its DASH index
# range), Clusters starting at keyframes.
_WEBM = ["-f", "webm", "-dash", "1", "-cues_to_front", "1"]


class _Builder:
    """Runs the FFmpeg commands of one shape and collects its files and commands.

    A separate audio file is encoded in the background while the video
    encodes (the machine has two cores; audio costs as much as the video at
    160x90): :meth:`finish` waits for it.
    """

    def __init__(self, out_dir: Path, name: str) -> None:
        self.out_dir = out_dir
        self.name = name
        self.files: dict[str, Path] = {}
        self.commands: dict[str, list[str]] = {}
        self._background: list[_Run] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def run(self, key: str, suffix: str, args: list[str], *, background: bool = False) -> Path:
        path = self.out_dir / f"{self.name}.{key}{suffix}"
        # Written under a temporary name: a failed or killed run never leaves
        # a file that looks complete.
        run = _Run(args, path.with_name(path.name + ".part" + suffix), path)
        self.files[key] = path
        self.commands[key] = args
        if background:
            self._background.append(run)
        else:
            run.wait()
        return path

    def run_two_pass(self, key: str, suffix: str, codec_args: list[str], mux: list[str]) -> Path:
        """A two-pass encode: the first pass writes only its statistics."""
        log = self.out_dir / f"{self.name}.{key}.passlog"
        stats = ["-passlogfile", str(log)]
        first = [*codec_args, "-pass", "1", *stats, "-f", "null", os.devnull]
        try:
            _Run(first).wait()
            path = self.run(key, suffix, [*codec_args, "-pass", "2", *stats, *mux])
        finally:
            for leftover in self.out_dir.glob(f"{log.name}*"):
                leftover.unlink()
        self.commands[f"{key} (pass 1)"] = first
        return path

    def finish(self) -> None:
        """Wait for the background runs (every file is complete after this)."""
        while self._background:
            self._background.pop(0).wait()

    def abort(self) -> None:
        while self._background:
            self._background.pop().kill()


def make_shape(name: str, out_dir: Path, *, seconds: float = 12.0, size: str = "320x180") -> Shape:
    """Write the files of shape ``name`` into ``out_dir`` (named ``<name>.<key>.<ext>``)."""
    maker = _MAKERS.get(name)
    if maker is None:
        raise ValueError(f"unknown shape {name!r}; one of {', '.join(SHAPE_NAMES)}")
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, not {seconds}")
    b = _Builder(out_dir, name)
    try:
        return maker(b, seconds, size)
    finally:
        b.abort()  # after a failure: no encode left running


def _shape(b: _Builder, seconds: float, **fields: Any) -> Shape:
    """The Shape of what ``b`` made: H.264 High with B-frames + AAC, 30 fps, unless told."""
    b.finish()
    promised: dict[str, Any] = {
        "video_codec": "h264", "audio_codec": "aac", "fps": 30.0, "gop_s": GOP_S,
        "duration_s": seconds, "audio_duration_s": seconds, "b_frames": True,
        "open_gop": False, "container": "mp4",
    }  # fmt: skip
    promised.update(fields)
    return Shape(name=b.name, files=dict(b.files), commands=dict(b.commands), **promised)


def _aac_m4a(b: _Builder, s: float, *, faststart: bool = True) -> None:
    """Start the separate AAC audio (in the background: call it before the video)."""
    args = [*_tone(AAC_RATE, s), *_AAC, "-vn", *(_FASTSTART if faststart else [])]
    b.run("audio", ".m4a", args, background=True)


def _progressive(b: _Builder, s: float, size: str) -> Shape:
    _aac_m4a(b, s)
    b.run("video", ".mp4", [*_testsrc(size, 30, s), *_x264(60), "-an", *_FASTSTART])
    return _shape(b, s)


def _progressive_moov_end(b: _Builder, s: float, size: str) -> Shape:
    _aac_m4a(b, s, faststart=False)
    b.run("video", ".mp4", [*_testsrc(size, 30, s), *_x264(60), "-an"])
    return _shape(b, s, notes="moov after mdat in both files")


def _fmp4(b: _Builder, s: float, size: str, video: list[str], *, sidx: bool) -> None:
    vflags = _FMP4_SIDX if sidx else _FMP4_NOSIDX
    aflags = _FMP4_AUDIO_SIDX if sidx else _FMP4_AUDIO_NOSIDX
    # "dash" is the major brand of YouTube's adaptive MP4s.
    brand = ["-brand", "dash"]
    audio = [*_tone(AAC_RATE, s), *_AAC, "-vn", "-movflags", aflags, *_FRAG_2S, *brand]
    b.run("audio", ".m4a", audio, background=True)
    b.run("video", ".mp4", [*_testsrc(size, 30, s), *video, "-an", "-movflags", vflags, *brand])


# What FFmpeg's fragmented output lacks (the moov is written before any sample).
_NO_EDITS = (
    "No edit lists: the H.264 video's first pts is its B-frame delay (2 frames), and the"
    " AAC audio starts with its 1024 priming samples at pts 0."
)


def _dash_fmp4(b: _Builder, s: float, size: str) -> Shape:
    _fmp4(b, s, size, _x264(60), sidx=True)
    notes = "ftyp, moov(mvex), sidx, one moof/mdat per GOP; audio fragments of 2 s. " + _NO_EDITS
    return _shape(b, s, container="fmp4", notes=notes)


def _fmp4_nosidx(b: _Builder, s: float, size: str) -> Shape:
    _fmp4(b, s, size, _x264(60), sidx=False)
    notes = "ftyp, moov(mvex), one moof/mdat per GOP; no sidx, no mfra. " + _NO_EDITS
    return _shape(b, s, container="fmp4", notes=notes)


def _av1_fmp4(b: _Builder, s: float, size: str) -> Shape:
    _fmp4(b, s, size, _av1(60), sidx=True)
    notes = "SVT-AV1: hidden frames live inside temporal units, samples in pts order"
    return _shape(b, s, video_codec="av1", b_frames=False, container="fmp4", notes=notes)


def _webm_vp9(b: _Builder, s: float, size: str) -> Shape:
    b.run("audio", ".webm", [*_tone(OPUS_RATE, s), *_OPUS, "-vn", *_WEBM], background=True)
    b.run_two_pass("video", ".webm", [*_testsrc(size, 30, s), *_vp9(60), "-an"], _WEBM)
    notes = "alt-ref (hidden) frames packed in superframes; Cues before the Clusters"
    return _shape(
        b, s, video_codec="vp9", audio_codec="opus", b_frames=False, container="webm", notes=notes
    )


def _hevc(b: _Builder, s: float, size: str, *, open_gop: bool) -> Shape:
    video = [*_testsrc(size, 30, s), *_x265(60, open_gop=open_gop), "-an", *_FASTSTART]
    _aac_m4a(b, s)
    b.run("video", ".mp4", video)
    notes = "CRA keyframes with leading (RASL) pictures" if open_gop else "hvc1, closed GOP"
    return _shape(b, s, video_codec="hevc", open_gop=open_gop, notes=notes)


def _hevc_mp4(b: _Builder, s: float, size: str) -> Shape:
    return _hevc(b, s, size, open_gop=False)


def _hevc_open_gop(b: _Builder, s: float, size: str) -> Shape:
    return _hevc(b, s, size, open_gop=True)


def _h264_open_gop(b: _Builder, s: float, size: str) -> Shape:
    video = [*_testsrc(size, 30, s), *_x264(60, open_gop=True), "-an", *_FASTSTART]
    _aac_m4a(b, s)
    b.run("video", ".mp4", video)
    notes = "keyframes after the first are non-IDR I frames with leading B frames"
    return _shape(b, s, open_gop=True, notes=notes)


def _h264_60fps(b: _Builder, s: float, size: str) -> Shape:
    _aac_m4a(b, s)
    b.run("video", ".mp4", [*_testsrc(size, 60, s), *_x264(120), "-an", *_FASTSTART])
    return _shape(b, s, fps=60.0)


def _h264_vfr(b: _Builder, s: float, size: str) -> Shape:
    # Every other frame dropped in the middle third: frames of 1/30 s, then
    # 1/15 s, then 1/30 s again. -fps_mode vfr keeps the timestamps as they are
    # (no duplicated frames to fill the gaps); keyframes forced every 2 s of
    # time, not every N frames.
    lo, hi = s / 3, 2 * s / 3
    vf = f"select='not(between(t,{lo:g},{hi:g}))+not(mod(n,2))'"
    args = [
        *_testsrc(size, 30, s), "-vf", vf, "-fps_mode", "vfr",
        *_x264(600), "-force_key_frames", f"expr:gte(t,n_forced*{GOP_S:g})",
        "-an", *_FASTSTART,
    ]  # fmt: skip
    _aac_m4a(b, s)
    b.run("video", ".mp4", args)
    notes = "30 fps, then 15 fps from 1/3 to 2/3 of the duration, then 30 fps again"
    return _shape(b, s, fps=None, notes=notes)


def _av_mismatch(b: _Builder, s: float, size: str) -> Shape:
    if s <= 3:
        raise ValueError("av_mismatch needs more than 3 s: audio 2 s shorter, muxed 1 s late")
    _aac_m4a(b, s - 2)
    video = b.run("video", ".mp4", [*_testsrc(size, 30, s), *_x264(60), "-an", *_FASTSTART])
    b.finish()
    # -itsoffset delays the audio input: the MP4 muxer writes an empty edit
    # at the start of the audio track.
    args = [
        "-i", str(video), "-itsoffset", "1", "-i", str(b.files["audio"]),
        "-map", "0:v", "-map", "1:a", "-c", "copy", *_FASTSTART,
    ]  # fmt: skip
    b.run("muxed", ".mp4", args)
    notes = (
        "audio 2 s shorter than the video; in 'muxed' the audio starts 1 s after the"
        " video (an empty edit) and ends 1 s before it"
    )
    return _shape(b, s, audio_duration_s=s - 2, notes=notes)


def _muxed(b: _Builder, s: float, size: str) -> Shape:
    args = [*_testsrc(size, 30, s), *_tone(AAC_RATE, s), *_x264(60), *_AAC, *_FASTSTART]
    b.files["video"] = b.run("muxed", ".mp4", args)
    return _shape(b, s, notes="one progressive faststart MP4, video and audio interleaved")


_MAKERS: dict[str, Callable[[_Builder, float, str], Shape]] = {
    "progressive": _progressive,
    "progressive_moov_end": _progressive_moov_end,
    "dash_fmp4": _dash_fmp4,
    "fmp4_nosidx": _fmp4_nosidx,
    "webm_vp9": _webm_vp9,
    "av1_fmp4": _av1_fmp4,
    "hevc_mp4": _hevc_mp4,
    "hevc_open_gop": _hevc_open_gop,
    "h264_open_gop": _h264_open_gop,
    "h264_60fps": _h264_60fps,
    "h264_vfr": _h264_vfr,
    "av_mismatch": _av_mismatch,
    "muxed": _muxed,
}
SHAPE_NAMES: tuple[str, ...] = tuple(_MAKERS)


# Shapes make_long_source can write: the ones a benchmark compares.
LONG_SHAPES: tuple[str, ...] = (
    "progressive",
    "dash_fmp4",
    "fmp4_nosidx",
    "webm_vp9",
    "hevc_mp4",
    "av1_fmp4",
)


def make_long_source(out_dir: Path, name: str, minutes: float, *, size: str = "160x90") -> Shape:
    """An hour-scale source of shape ``name`` (one of LONG_SHAPES) for benchmarks.

    The same FFmpeg options as :func:`make_shape`, so the same structure,
    at ``size``. Cached: a second call with the same arguments reuses the
    files (``<stem>.json`` beside them, written last, says they are
    complete; the Shape it returns has no ``commands``).

    Cost of 60 minutes at 160x90 on the 2-core machine (CPU time; the
    audio encodes beside the video, so on an idle machine the wall time is
    a little more than the video's): progressive / dash_fmp4 / fmp4_nosidx
    ~45 s video + ~40 s AAC (about 1-1.5 min wall); hevc_mp4 ~2.5 min;
    av1_fmp4 ~2.5 min (SVT-AV1 uses both cores); webm_vp9 ~6 min (libvpx
    two-pass, single-threaded at this size, ~3 ms a frame: the price of real
    alt-ref frames) + 0.5 min Opus. Files: H.264 ~77 MB, HEVC ~51 MB, AV1
    ~54 MB, VP9 ~30 MB video; AAC ~30 MB, Opus ~38 MB.
    """
    if name not in LONG_SHAPES:
        raise ValueError(f"make_long_source supports {', '.join(LONG_SHAPES)}, not {name!r}")
    seconds = round(minutes * 60, 3)
    stem = f"long-{name}-{minutes:g}min-{size}"
    sidecar = out_dir / f"{stem}.json"
    wanted = {"name": name, "minutes": minutes, "size": size, "version": _LONG_VERSION}
    if sidecar.exists():
        saved = json.loads(sidecar.read_text())
        files = {k: Path(v) for k, v in saved.get("files", {}).items()}
        if saved.get("params") == wanted and all(p.exists() for p in files.values()):
            shape = saved["shape"]
            shape["files"] = files
            return Shape(**shape)
    shape = make_shape(name, out_dir / stem, seconds=seconds, size=size)
    record = {k: v for k, v in asdict(shape).items() if k not in ("files", "commands")}
    sidecar.write_text(
        json.dumps(
            {
                "params": wanted,
                "files": {k: str(v) for k, v in shape.files.items()},
                "shape": record,
            }
        )
    )
    return shape


_LONG_VERSION = 1  # bump when a shape's promised structure changes: cached sources are remade


# --- Structure helpers: the tests' oracle --------------------------------

# Boxes whose payload is only child boxes.
_MP4_CONTAINERS = {
    "moov", "trak", "mdia", "minf", "stbl", "mvex", "moof", "traf", "edts", "dinf",
    "udta", "mfra", "sinf", "schi",
}  # fmt: skip
# Sample entries: (bytes of fixed fields after the 8-byte header) before their child boxes.
_SAMPLE_ENTRIES = {
    "avc1": 78, "avc3": 78, "hvc1": 78, "hev1": 78, "av01": 78, "vp09": 78, "encv": 78,
    "mp4a": 28, "Opus": 28, "enca": 28,
}  # fmt: skip


def _walk_mp4(
    data: bytes, start: int, end: int, prefix: str, visit: Callable[[str, int, int], None]
) -> None:
    pos = start
    while pos + 8 <= end:
        size, raw = struct.unpack_from(">I4s", data, pos)
        kind = raw.decode("latin-1")
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"bad {kind!r} box at {pos}: size {size}")
        path = prefix + kind
        visit(path, pos, size)
        if kind in _MP4_CONTAINERS:
            _walk_mp4(data, pos + header, pos + size, path + "/", visit)
        elif kind == "stsd":  # full box + entry count, then sample entries
            _walk_mp4(data, pos + header + 8, pos + size, path + "/", visit)
        elif kind in _SAMPLE_ENTRIES and "/stsd/" in "/" + prefix:
            _walk_mp4(data, pos + header + _SAMPLE_ENTRIES[kind], pos + size, path + "/", visit)
        pos += size


def mp4_boxes(path: Path) -> list[tuple[str, int, int]]:
    """Top-level boxes of an MP4 file: (type, offset, size) in file order."""
    data = path.read_bytes()
    out: list[tuple[str, int, int]] = []
    _walk_mp4(
        data, 0, len(data), "", lambda p, o, s: out.append((p, o, s)) if "/" not in p else None
    )
    return out


def mp4_box_paths(path: Path) -> set[str]:
    """Every box path in an MP4 file ("moov/mvex", "moof/traf/trun", ...stsd/hvc1/hvcC)."""
    data = path.read_bytes()
    out: set[str] = set()
    _walk_mp4(data, 0, len(data), "", lambda p, o, s: out.add(p))
    return out


@dataclass(frozen=True)
class SidxRef:
    """One reference of a sidx: the bytes it covers and their duration."""

    offset: int  # absolute, in the file
    size: int
    duration: int  # in the sidx timescale
    starts_with_sap: bool


def mp4_sidx(path: Path) -> tuple[int, list[SidxRef]]:
    """(timescale, references) of the file's first top-level sidx."""
    boxes = mp4_boxes(path)
    found = [(o, s) for t, o, s in boxes if t == "sidx"]
    if not found:
        raise ValueError(f"{path} has no sidx")
    offset, size = found[0]
    with path.open("rb") as fh:
        fh.seek(offset)
        box = fh.read(size)
    version = box[8]
    _ref_id, timescale = struct.unpack_from(">II", box, 12)
    pos = 20
    if version == 0:
        _ept, first = struct.unpack_from(">II", box, pos)
        pos += 8
    else:
        _ept, first = struct.unpack_from(">QQ", box, pos)
        pos += 16
    (count,) = struct.unpack_from(">xxH", box, pos)
    pos += 4
    at = offset + size + first  # references start after the sidx, plus first_offset
    refs: list[SidxRef] = []
    for _ in range(count):
        ref, duration, sap = struct.unpack_from(">III", box, pos)
        pos += 12
        refs.append(SidxRef(at, ref & 0x7FFFFFFF, duration, bool(sap >> 31)))
        at += ref & 0x7FFFFFFF
    return timescale, refs


_EBML_NAMES = {
    0x1A45DFA3: "EBML",
    0x18538067: "Segment",
    0x114D9B74: "SeekHead",
    0x1549A966: "Info",
    0x1654AE6B: "Tracks",
    0x1C53BB6B: "Cues",
    0x1F43B675: "Cluster",
    0x1254C367: "Tags",
    0x1043A770: "Chapters",
    0x1941A469: "Attachments",
    0xEC: "Void",
    0xBF: "CRC-32",
}
_CUE_POINT = 0xBB


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int, int, bool]:
    """(value, length, all ones) of the EBML variable-size integer at ``pos``."""
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8:
        raise ValueError(f"bad EBML vint at {pos}")
    value = first if keep_marker else first & (0xFF >> length)
    for byte in data[pos + 1 : pos + length]:
        value = (value << 8) | byte
    all_ones = not keep_marker and value == (1 << (7 * length)) - 1
    return value, length, all_ones


def _ebml_children(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(element id, payload start, payload end) of the elements in [start, end)."""
    out = []
    pos = start
    while pos < end:
        element, id_len, _ = _vint(data, pos, keep_marker=True)
        size, size_len, unknown = _vint(data, pos + id_len, keep_marker=False)
        body = pos + id_len + size_len
        stop = end if unknown else body + size
        out.append((element, body, stop))
        pos = stop
    return out


def _webm_elements(path: Path) -> tuple[bytes, list[tuple[str, int, int]]]:
    data = path.read_bytes()
    named: list[tuple[str, int, int]] = []
    for element, body, stop in _ebml_children(data, 0, len(data)):
        named.append((_EBML_NAMES.get(element, hex(element)), body, stop))
        if element == 0x18538067:  # the Segment: its children are what matters
            for child, cbody, cstop in _ebml_children(data, body, stop):
                named.append((_EBML_NAMES.get(child, hex(child)), cbody, cstop))
    return data, named


def webm_top_level(path: Path) -> list[str]:
    """Top-level element names of a WebM file, the Segment's children right after it.

    E.g. ["EBML", "Segment", "SeekHead", "Void", "Info", "Tracks", "Cues", "Cluster", ...].
    """
    return [name for name, _, _ in _webm_elements(path)[1]]


def webm_has_cues(path: Path) -> bool:
    """Whether the Segment holds a Cues element with at least one CuePoint."""
    data, elements = _webm_elements(path)
    for name, body, stop in elements:
        if name == "Cues" and any(e == _CUE_POINT for e, _, _ in _ebml_children(data, body, stop)):
            return True
    return False


def vp9_frames(packet: bytes) -> list[bytes]:
    """The VP9 frames of one packet: the parts of a superframe, or the packet itself."""
    if not packet:
        return []
    marker = packet[-1]
    if marker & 0xE0 == 0xC0:
        count = (marker & 0x7) + 1
        size_bytes = ((marker >> 3) & 0x3) + 1
        index_size = 2 + size_bytes * count
        if len(packet) >= index_size and packet[-index_size] == marker:
            frames, pos = [], 0
            index = packet[-index_size + 1 : -1]
            for i in range(count):
                raw = index[i * size_bytes : (i + 1) * size_bytes]
                size = int.from_bytes(raw, "little")
                frames.append(packet[pos : pos + size])
                pos += size
            return frames
    return [packet]


def vp9_shown(frame: bytes) -> bool:
    """The show_frame (or show_existing_frame) bit of a VP9 uncompressed frame header."""
    bits = "".join(f"{byte:08b}" for byte in frame[:2])
    # frame_marker(2) profile_low(1) profile_high(1) [reserved_zero(1) if profile 3]
    profile = int(bits[2]) | int(bits[3]) << 1
    at = 5 if profile == 3 else 4
    if bits[at] == "1":  # show_existing_frame: shows an earlier decoded frame
        return True
    return bits[at + 2] == "1"  # frame_type(1), then show_frame(1)


def nal_types(sample: bytes, codec: str) -> list[int]:
    """NAL unit types of one H.264 or HEVC sample as MP4 stores it (4-byte lengths).

    H.264: 5 is an IDR slice, 1 a non-IDR slice. HEVC: 19/20 IDR, 21 CRA,
    8/9 RASL (leading pictures that reference the previous GOP), 6/7 RADL.
    """
    types = []
    pos = 0
    while pos + 4 < len(sample):
        (length,) = struct.unpack_from(">I", sample, pos)
        header = sample[pos + 4]
        types.append(header & 0x1F if codec == "h264" else (header >> 1) & 0x3F)
        pos += 4 + length
    return types
