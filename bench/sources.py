"""The benchmark's sources, generated once and cached under ``bench/.cache/``.

The shapes come from ``tests/media_shapes.py`` (the same generator the tests
use, so the benchmark cuts what the tests prove correct): a 3-minute 720p30
source per shape for the per-shape table, and an hour-long small one for the
clip-position case (:func:`tests.media_shapes.make_long_source` caches both:
a sidecar JSON written last says the files are complete). The legacy H.264
table keeps its own 10-minute CRF 23 source.

Generation runs in a child process at low priority (the machine is shared)
and its wall time is recorded next to the files, so the table can say what
the sources cost.

    .venv/bin/python -m bench.sources [SHAPE ...]   # generate ahead of a run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from clipservice.media.ffmpeg import bundled_ffmpeg
from tests.media_shapes import Shape, make_long_source

HERE = Path(__file__).parent
CACHE = HERE / ".cache"
SHAPES_DIR = CACHE / "shapes"
COSTS = CACHE / "generation-costs.json"

# The per-shape table: the shapes YouTube's 720p formats come in.
TABLE_SHAPES = ("progressive", "dash_fmp4", "webm_vp9", "hevc_mp4", "av1_fmp4")
TABLE_SIZE = "1280x720"
# Generation cost (wall, nice 10, 2 shared cores; bench/.cache/generation-costs.json):
# progressive and dash_fmp4 ~100 s each, HEVC ~240 s, AV1 ~60 s, VP9 ~270 s (two passes).
TABLE_MINUTES = {name: 3.0 for name in TABLE_SHAPES}
# The clip-position case: an hour-long source, small frames (its index is what matters).
LONG_SHAPES = ("progressive", "dash_fmp4")
LONG_SIZE = "160x90"
LONG_MINUTES = 60.0

# How the pair is described to yt-dlp (which takes one URL): a DASH manifest
# whose representations are the two files, as YouTube's own DASH formats are.
_MIME = {"mp4": "mp4", "fmp4": "mp4", "webm": "webm"}
_CODECS = {
    "h264": "avc1.64001f",
    "hevc": "hvc1.1.6.L93.90",
    "vp9": "vp09.00.31.08",
    "av1": "av01.0.05M.08",
    "aac": "mp4a.40.2",
    "opus": "opus",
}


@dataclass(frozen=True)
class Source:
    """A source as the benchmark uses it: its shape, files and what it cost."""

    label: str  # e.g. "dash_fmp4 720p 3min"
    shape: Shape
    generate_s: float | None  # wall time of the generation (None: not recorded)
    manifest: Path | None  # the DASH manifest for yt-dlp (pairs only)

    @property
    def video(self) -> Path:
        return self.shape.files["video"]

    @property
    def audio(self) -> Path | None:
        return self.shape.files.get("audio")

    @property
    def video_mbit_s(self) -> float:
        return self.video.stat().st_size * 8 / 1e6 / self.shape.duration_s


def _costs() -> dict[str, float]:
    return json.loads(COSTS.read_text()) if COSTS.exists() else {}


def _ensure(name: str, minutes: float, size: str) -> None:
    """Make sure one source is generated, in a child process at nice 10 (a no-op
    when make_long_source finds it cached); a generation's wall time is recorded."""
    key = f"{name}-{minutes:g}min-{size}"
    sidecar = SHAPES_DIR / f"long-{key}.json"
    before = sidecar.stat().st_mtime_ns if sidecar.exists() else None
    code = (
        "import os; from pathlib import Path; os.nice(10);"
        "from tests.media_shapes import make_long_source as m;"
        f"m(Path({str(SHAPES_DIR)!r}), {name!r}, {minutes!r}, size={size!r})"
    )
    t0 = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", code], cwd=HERE.parent)
    try:
        child.wait()
    finally:
        if child.poll() is None:  # interrupted: no half-made source left generating
            child.kill()
            child.wait()
    if child.returncode:
        raise RuntimeError(f"generating {key} failed ({child.returncode})")
    took = time.monotonic() - t0
    if sidecar.stat().st_mtime_ns != before:
        costs = _costs()
        costs[key] = round(took, 1)
        COSTS.write_text(json.dumps(costs, indent=1, sort_keys=True))
        print(f"generated {key} in {took:.0f}s (cached in {SHAPES_DIR})", file=sys.stderr)


def _load(name: str, minutes: float, size: str) -> Source:
    _ensure(name, minutes, size)
    shape = make_long_source(SHAPES_DIR, name, minutes, size=size)  # cached by now
    label = _label(name, minutes, size)
    cost = _costs().get(f"{name}-{minutes:g}min-{size}")
    return Source(label, shape, cost, _manifest(shape))


def _label(name: str, minutes: float, size: str) -> str:
    return f"{name} {size.split('x')[1]}p {minutes:g}min"


def table_label(name: str) -> str:
    """The label of ``table_source(name)``, known without making it."""
    return _label(name, TABLE_MINUTES[name], TABLE_SIZE)


def long_label(name: str) -> str:
    return _label(name, LONG_MINUTES, LONG_SIZE)


def table_source(name: str) -> Source:
    """The 720p30 source of shape ``name`` for the per-shape table (generated on first use)."""
    return _load(name, TABLE_MINUTES[name], TABLE_SIZE)


def long_source(name: str) -> Source:
    """The 60-minute source of shape ``name`` for the clip-position case."""
    return _load(name, LONG_MINUTES, LONG_SIZE)


def _manifest(shape: Shape) -> Path | None:
    """A static DASH manifest naming the shape's two files (BaseURL only: yt-dlp
    then hands both URLs to FFmpeg with ``-ss``, as for YouTube's formats)."""
    audio = shape.files.get("audio")
    if audio is None:
        return None
    video = shape.files["video"]
    path = video.with_name(f"{shape.name}.mpd")
    if path.exists():
        return path
    mime = _MIME[shape.container]
    width, height = _frame_size(video)
    xml = f"""<?xml version="1.0" encoding="UTF-8"?>
<MPD xmlns="urn:mpeg:dash:schema:mpd:2011" type="static" minBufferTime="PT2S"
     mediaPresentationDuration="PT{shape.duration_s:g}S"
     profiles="urn:mpeg:dash:profile:isoff-on-demand:2011">
 <Period>
  <AdaptationSet mimeType="video/{mime}" contentType="video">
   <Representation id="video" codecs="{_CODECS[shape.video_codec]}" bandwidth="{_bps(video, shape)}"
                   width="{width}" height="{height}" frameRate="30">
    <BaseURL>{video.name}</BaseURL>
   </Representation>
  </AdaptationSet>
  <AdaptationSet mimeType="audio/{mime}" contentType="audio">
   <Representation id="audio" codecs="{_CODECS[shape.audio_codec or "aac"]}"
                   bandwidth="{_bps(audio, shape)}" audioSamplingRate="48000">
    <BaseURL>{audio.name}</BaseURL>
   </Representation>
  </AdaptationSet>
 </Period>
</MPD>
"""
    path.write_text(xml)
    return path


def _bps(path: Path, shape: Shape) -> int:
    return int(path.stat().st_size * 8 / shape.duration_s)


def _frame_size(video: Path) -> tuple[int, int]:
    import av

    with av.open(str(video)) as c:
        s = c.streams.video[0]
        return s.codec_context.width, s.codec_context.height


# -- the legacy H.264 table's source ---------------------------------------

LEGACY_SOURCE_S = 600


def legacy_source() -> dict[str, Path]:
    """10-minute 720p30 H.264 (High, B-frames, 2 s GOP, CRF 23) + AAC, cached."""
    CACHE.mkdir(exist_ok=True)
    files = {
        "video": CACHE / "video-720p.mp4",
        "audio": CACHE / "audio.m4a",
        "muxed": CACHE / "muxed-720p.mp4",
    }
    ff = [bundled_ffmpeg(), "-hide_banner", "-loglevel", "error", "-y"]

    def run(args: list[str]) -> None:
        # Low priority: the machine is shared, and the source is made only once.
        subprocess.run(args, check=True, preexec_fn=lambda: os.nice(10))

    if not files["video"].exists():
        print("generating the 10-minute 720p source (once)…", file=sys.stderr)
        tmp = files["video"].with_suffix(".tmp.mp4")
        run(
            [*ff, "-f", "lavfi", "-i",
             f"testsrc2=size=1280x720:rate=30:duration={LEGACY_SOURCE_S}",
             "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
             "-g", "60", "-keyint_min", "60", "-sc_threshold", "0",
             "-movflags", "+faststart", str(tmp)],
        )  # fmt: skip
        tmp.rename(files["video"])
    if not files["audio"].exists():
        run(
            [*ff, "-f", "lavfi", "-i",
             f"sine=frequency=440:sample_rate=48000:duration={LEGACY_SOURCE_S}",
             "-ac", "2", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
             str(files["audio"])],
        )  # fmt: skip
    if not files["muxed"].exists():
        run(
            [*ff, "-i", str(files["video"]), "-i", str(files["audio"]), "-map", "0:v",
             "-map", "1:a", "-c", "copy", "-movflags", "+faststart", str(files["muxed"])],
        )  # fmt: skip
    return files


def main() -> None:
    names = sys.argv[1:] or [*TABLE_SHAPES, *(f"long:{n}" for n in LONG_SHAPES)]
    for name in names:
        src = long_source(name[5:]) if name.startswith("long:") else table_source(name)
        print(
            f"{src.label}: generated in {src.generate_s}s, video {src.video_mbit_s:.2f} Mbit/s",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
