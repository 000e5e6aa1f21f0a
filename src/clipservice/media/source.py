"""A job's source, indexed once: its containers, tracks, timeline and windows.

The service reads the video's (and a separate audio's) container index with
a few small Range reads when a job starts (:mod:`.containers`), and keeps it
for the job: every clip's window (the byte spans it needs) comes from it
without another read. Sources in containers it cannot index (MPEG-TS, FLV…)
are still cut, by FFmpeg (``supported`` is False, ``reason`` says why).

Timeline: user time 0 is the video's first frame. Both streams are placed on
the container timeline they share (separate DASH files share the
presentation timeline from 0), so audio and video stay in sync exactly as a
player shows them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from clipservice.media.containers.base import ContainerError, ContainerIndex, Track
from clipservice.media.fetch import FetchError, RangeFetcher
from clipservice.media.join import CutRequest, StreamInput
from clipservice.sources.guard import approved_address

_HEAD_BYTES = 64 * 1024
# Without the video window's start time, fast mode's audio starts this early
# (GOPs are rarely longer; the join checks that the audio covers the clip).
_FAST_AUDIO_LEAD_S = 12.0
_MP4_BOXES = {b"ftyp", b"moov", b"styp", b"free", b"skip", b"mdat", b"wide", b"sidx", b"pdin"}


class SourceUnsupported(Exception):
    """The source's container cannot be indexed here (FFmpeg cuts it instead)."""


def open_index(fetcher: RangeFetcher) -> ContainerIndex:
    """The container index of the resource behind ``fetcher`` (blocking)."""
    head = fetcher.read(0, _HEAD_BYTES)
    size = fetcher.size_bytes if fetcher.size_bytes is not None else len(head)
    cached = {0: head}

    def read(offset: int, length: int) -> bytes:
        # The first read is reused: every index starts by reading the head.
        if offset + length <= len(head) and 0 in cached:
            return head[offset : offset + length]
        return fetcher.read(offset, length)

    if head[:4] == b"\x1a\x45\xdf\xa3":
        from clipservice.media.containers.webm import open_webm

        return open_webm(read, size)
    if head[4:8] in _MP4_BOXES:
        from clipservice.media.containers.mp4 import open_mp4

        return open_mp4(read, size)
    raise SourceUnsupported("the source is neither MP4 nor WebM/Matroska")


@dataclass(frozen=True)
class Stream:
    """One stream of the source: its URL, index and track."""

    url: str
    index: ContainerIndex
    track: Track


class SourceIndex:
    """The container indexes of one job's source (video, and separate audio).

    ``await open()`` reads them (once; safe to call from several clips);
    after that every method is cheap and never reads the source.
    """

    def __init__(
        self, video_url: str, audio_url: str | None, *, allow_private: bool = True
    ) -> None:
        self.video_url = video_url
        self.audio_url = audio_url
        # Each host is resolved and checked once (the URL guard's rules), and
        # every connection of the job goes to that address: see _open.
        self.allow_private = allow_private
        self.addresses: dict[str, str] = {}
        self.video: Stream | None = None
        self.audio: Stream | None = None
        self.reason: str | None = None  # why the source is not indexed, if it is not
        self._opened: asyncio.Task[None] | None = None
        self._fetchers: list[RangeFetcher] = []

    @property
    def supported(self) -> bool:
        return self.video is not None

    @property
    def bytes_read(self) -> int:
        """Bytes the index has read from the source (opening, and searches)."""
        return sum(f.stats.bytes for f in self._fetchers)

    async def aclose(self) -> None:
        """Nothing stays open between reads; kept for the runners' life cycle."""
        if self._opened is not None and not self._opened.done():
            self._opened.cancel()

    async def open(self) -> None:
        """Read the indexes (at most once). Raises FetchError when the source
        cannot be read at all; a container it cannot index only sets ``reason``."""
        if self._opened is None:
            self._opened = asyncio.ensure_future(self._open())
        await asyncio.shield(self._opened)

    async def _open(self) -> None:
        async def one(url: str) -> tuple[ContainerIndex | None, str | None]:
            parts = urlsplit(url)
            host = parts.hostname or ""
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await asyncio.to_thread(
                approved_address, host, port, allow_private=self.allow_private
            )
            self.addresses[url] = str(address)
            # The fetcher stays with the index: a window may search a file
            # without an index of its own (its reads count as the index's).
            fetcher = RangeFetcher(url, connect_to=str(address))
            self._fetchers.append(fetcher)
            try:
                return await asyncio.to_thread(open_index, fetcher), None
            except (SourceUnsupported, ContainerError) as exc:
                return None, str(exc)
            finally:
                fetcher.close()  # idle connections: a later read opens its own

        jobs = [one(self.video_url)]
        if self.audio_url is not None:
            jobs.append(one(self.audio_url))
        results = await asyncio.gather(*jobs)
        video_index, reason = results[0]
        if video_index is None:
            self.reason = reason
            return
        vtrack = video_index.track("video")
        if vtrack is None:
            self.reason = "the video URL holds no video stream"
            return
        self.video = Stream(self.video_url, video_index, vtrack)
        if self.audio_url is None:
            atrack = video_index.track("audio")
            if atrack is not None:
                self.audio = Stream(self.video_url, video_index, atrack)
            return
        audio_index, reason = results[1]
        if audio_index is None:
            self.video = None
            self.reason = f"audio: {reason}"
            return
        atrack = audio_index.track("audio")
        if atrack is None:
            self.video = None
            self.reason = "the audio URL holds no audio stream"
            return
        self.audio = Stream(self.audio_url, audio_index, atrack)

    # -- after open() --------------------------------------------------------

    @property
    def video_origin_ticks(self) -> int:
        assert self.video is not None
        return self.video.track.first_pts or 0

    def audio_origin_ticks(self) -> int:
        """Audio ticks at user time 0 (the video's first frame, on the shared timeline)."""
        assert self.video is not None and self.audio is not None
        vts, ats = self.video.track.timescale, self.audio.track.timescale
        return round(self.video_origin_ticks * ats / vts)

    def request(
        self,
        start_s: float,
        end_s: float,
        mode: Literal["fast", "accurate"],
        out: str,
        deadline: float,
        *,
        threads: int = 1,
    ) -> CutRequest:
        """What a join process needs to cut [start_s, end_s) (user time)."""
        if self.video is None:
            raise SourceUnsupported(self.reason or "the source is not indexed")
        v = self.video
        v_offset = self.video_origin_ticks / v.track.timescale
        vwindow = v.index.window(v.track.track_id, start_s + v_offset, end_s + v_offset)
        video = StreamInput(
            v.url,
            v.track,
            vwindow,
            v.index.init,
            self.video_origin_ticks,
            connect_to=self.addresses.get(v.url),
        )
        audio = None
        if self.audio is not None:
            a = self.audio
            a_origin = self.audio_origin_ticks()
            a_offset = a_origin / a.track.timescale
            # A little before the clip's first frame (the keyframe before the
            # start, in fast mode): the audio frame holding it, and pre-roll.
            first_s = start_s
            if mode == "fast":
                if vwindow.start_pts is not None:
                    first_s = min(first_s, vwindow.start_pts / v.track.timescale - v_offset)
                else:
                    first_s -= _FAST_AUDIO_LEAD_S
            a_from = max(0.0, first_s + a_offset - 0.5)
            a_to = end_s + a_offset
            track_end = a.track.duration_s
            if track_end is None or a_from < track_end:
                awindow = a.index.window(a.track.track_id, a_from, a_to)
                audio = StreamInput(
                    a.url,
                    a.track,
                    awindow,
                    a.index.init,
                    a_origin,
                    connect_to=self.addresses.get(a.url),
                )
        return CutRequest(video, audio, start_s, end_s, mode, out, deadline, threads=threads)


__all__ = ["FetchError", "SourceIndex", "SourceUnsupported", "open_index"]
