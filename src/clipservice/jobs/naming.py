"""Output file names: derived from the clip's key (source, range, mode), never
from unchecked input, so a name is safe on disk and a repeat request finds
the same file."""

from __future__ import annotations

import hashlib
import re

from clipservice.domain import ClipSpec, JobSource
from clipservice.media.ffmpeg_args import ts

CLIP_FILE_PATTERN = r"^[A-Za-z0-9_-]{1,64}-[0-9.]+-[0-9.]+-(fast|accurate|reencode)\.mp4$"
_CLIP_FILE_RE = re.compile(CLIP_FILE_PATTERN)
_VIDEO_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def source_key(source: JobSource) -> str:
    """A short, file-name-safe key naming the source."""
    if source.video_id and _VIDEO_ID_RE.fullmatch(source.video_id):
        return source.video_id
    ident = "\n".join(part or "" for part in (source.url, source.video_url, source.audio_url))
    return "src" + hashlib.sha256(ident.encode()).hexdigest()[:16]


def clip_file_name(source: JobSource, clip: ClipSpec) -> str:
    return f"{source_key(source)}-{ts(clip.start)}-{ts(clip.end)}-{clip.mode}.mp4"


def is_clip_file_name(name: str) -> bool:
    # fullmatch: with match, "$" would also accept a trailing newline.
    return bool(_CLIP_FILE_RE.fullmatch(name))
