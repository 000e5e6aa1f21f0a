"""Output file names: derived from the clip's key (source, range, mode and
output options), never from unchecked input, so a name is safe on disk and a
repeat request finds the same file.

``{source}-{start}-{end}-{mode}[-{options key}].{ext}`` for clips (the plain
MP4 has no options key, so its names are as they always were), and
``reel-{job id}.mp4`` for a job's merged reel.
"""

from __future__ import annotations

import hashlib
import re

from clipservice.domain import ClipSpec, JobSource
from clipservice.media.ffmpeg_args import ts
from clipservice.media.render import extension

CLIP_FILE_PATTERN = (
    r"^(?:[A-Za-z0-9_-]{1,64}-[0-9.]+-[0-9.]+-(fast|accurate|reencode)(-[0-9a-f]{12})?"
    r"\.(mp4|m4a|mp3|gif|webp|jpg|png)|reel-[0-9a-f]{32}\.mp4)$"
)
_CLIP_FILE_RE = re.compile(CLIP_FILE_PATTERN)
_VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def source_key(source: JobSource) -> str:
    """A short, file-name-safe key naming the source."""
    if source.video_id and _VIDEO_ID_RE.fullmatch(source.video_id):
        return source.video_id
    ident = "\n".join(part or "" for part in (source.url, source.video_url, source.audio_url))
    return "src" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def clip_file_name(source: JobSource, clip: ClipSpec) -> str:
    key = clip.output.key()
    options = f"-{key}" if key else ""
    base = f"{source_key(source)}-{ts(clip.start)}-{ts(clip.end)}-{clip.mode}{options}"
    return base + extension(clip.output)


def reel_file_name(job_id: str) -> str:
    return f"reel-{job_id}.mp4"


def is_clip_file_name(name: str) -> bool:
    # fullmatch: with match, "$" would also accept a trailing newline.
    return bool(_CLIP_FILE_RE.fullmatch(name))
