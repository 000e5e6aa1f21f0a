"""One clip, from a source's container windows to an MP4 file (runs in a join process).

The cut engine's data path, for ``fast`` and ``accurate`` cuts:

1. fetch: the byte spans of the video and audio windows, on several
   connections at once (:class:`~clipservice.media.fetch.Prefetch`), the
   GOPs to decode first;
2. samples: the window's samples read out of those bytes (the container
   indexes' readers), and the cut plan made from them
   (:mod:`clipservice.media.cutplan`);
3. re-encode: the partial GOPs at the ends (accurate only), each decoded
   from its keyframe and encoded to join the source
   (:mod:`clipservice.media.codecs`), head and tail on threads of their own;
4. mux: re-encoded head, copied samples, re-encoded tail, and the audio
   (AAC copied; anything else decoded and encoded to AAC) into a
   ``+faststart`` MP4, every sample timed from the source's own times, so the
   output holds exactly the frames of the plan.

Every loop checks the clip's deadline and cancel flag; a failed or stopped
join removes its output.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import io
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av

from clipservice.media import cutplan, movtext
from clipservice.media.codecs import CodecJoin, Encoded, JoinUnsupported, PartEncoder, codec_join
from clipservice.media.containers.base import (
    ContainerError,
    KnownSamples,
    Sample,
    Track,
    Window,
)
from clipservice.media.fetch import (
    DEFAULT_CONNECTIONS,
    Cancelled,
    FetchError,
    Prefetch,
    RangeFetcher,
)

AAC_BIT_RATE = 160_000
_AAC_FRAME = 1024  # samples per AAC-LC frame
# Decoded frames waiting for the encoder: a long GOP of large frames must not
# pile up in memory (a 4K frame is 12 MB) while the encoder catches up.
_FRAME_QUEUE = 8
# Audio decoded before a clip's start so the decoder has settled (Opus needs
# 80 ms of pre-roll; one AAC/MP3 frame is well under it).
_AUDIO_PREROLL_S = 0.08


class CutFailed(Exception):
    """The join could not make the clip; ``unsupported`` ones are re-encoded instead."""

    def __init__(self, message: str, *, unsupported: bool = True) -> None:
        super().__init__(message)
        self.unsupported = unsupported


@dataclass(frozen=True)
class StreamInput:
    """One source stream of a clip: where it is, its track, and its window."""

    url: str
    track: Track
    window: Window
    init: bytes  # container header bytes PyAV opens for the stream's parameters
    # Track ticks at user time 0 (the video's first frame): a user time t is
    # at pts ``round(t * timescale) + origin_ticks``.
    origin_ticks: int
    # The address the URL guard approved for the URL's host: connections go
    # there, never to a fresh resolution of the name (DNS rebinding).
    connect_to: str | None = None


@dataclass(frozen=True)
class CutRequest:
    """Everything a join process needs to make one clip (pickled to it)."""

    video: StreamInput
    audio: StreamInput | None
    start_s: float
    end_s: float
    mode: Literal["fast", "accurate"]
    out: str
    deadline: float  # time.monotonic() (system-wide on Linux)
    connections: int = DEFAULT_CONNECTIONS
    threads: int = 1  # encoder threads (1 when clips run side by side)
    # Soft captions (user time): those shown in the clip are muxed as a
    # mov_text track in the same pass, shifted to the clip's first frame.
    captions: tuple[movtext.CueTuple, ...] = ()


@dataclass(frozen=True)
class CutResult:
    """What the join made, in user time."""

    first_s: float
    end_s: float
    frames: int
    reencoded_frames: int
    has_audio: bool
    bytes_fetched: int
    requests: int
    first_frame: tuple[int, int]  # the first video sample decoded alone: its size
    captions: int = 0  # text samples muxed (0: no track)


class Guard:
    """A clip's deadline and cancel flag, checked by every loop of the join,
    and the first error any of its threads met (the one to report)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.cancel = threading.Event()
        self.error: BaseException | None = None

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not isinstance(exc, Cancelled):
            self.error = exc
        self.cancel.set()  # the other parts stop too

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise TimeoutError


class _Worker:
    """A function run on its own thread; ``result()`` waits and re-raises."""

    def __init__(self, fn: Callable[[], Any], guard: Guard, name: str) -> None:
        self._fn = fn
        self._guard = guard
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the joining thread
            self._error = exc
            self._guard.fail(exc)

    def result(self) -> Any:
        while self._thread.is_alive():
            self._thread.join(0.1)
            self._guard.check()
        if self._error is not None:
            raise self._error
        return self._value

    def stop(self) -> None:
        self._guard.cancel.set()
        self._thread.join(5)


def _put(q: queue.Queue[Any], item: Any, guard: Guard, *, stopping: bool = False) -> None:
    """Put on a bounded queue, giving up when the cut is stopped (unless this is
    the end marker of a part that is stopping anyway: then drop it)."""
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if guard.cancel.is_set() or time.monotonic() > guard.deadline:
                if stopping:
                    return
                guard.check()


def _get(q: queue.Queue[Any], guard: Guard) -> Any:
    while True:
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            guard.check()


class Feed:
    """A window's samples and their bytes, fetched on parallel connections
    (or from a fetch shared with the other stream of the same file)."""

    def __init__(self, stream: StreamInput, prefetch: Prefetch) -> None:
        self.stream = stream
        self.prefetch = prefetch

    def samples(self) -> list[Sample]:
        """Every sample of the window, in decode order (reads the spans' bytes
        when the container keeps its sample index in them)."""
        window = self.stream.window
        if isinstance(window.reader, KnownSamples):
            return window.samples({})
        out: list[Sample] = []
        for offset, size in window.spans:
            data = self.prefetch.read(offset, size)
            part = Window(window.track_id, ((offset, size),), window.reader)
            try:
                out.extend(part.samples({offset: data}))
            except ContainerError as exc:
                raise CutFailed(f"the source's samples cannot be read: {exc}") from exc
        return out

    def data(self, sample: Sample) -> bytes:
        return self.prefetch.read(sample.offset, sample.size)


def overlapping(samples: list[Sample], start: int, end: int, guard: Guard) -> Iterator[Sample]:
    """The samples (in decode order, up to the first at or after ``end``) that
    show some of [start, end) (track ticks); the guard checked before each."""
    for sample in samples:
        guard.check()
        if sample.pts >= end:
            return
        if sample.pts + max(sample.duration, 1) <= start:
            continue
        yield sample


def _merged(spans: list[tuple[int, int]], gap: int = 64 * 1024) -> list[tuple[int, int]]:
    """Sorted spans with overlapping ones, and ones closer than ``gap``, joined."""
    out: list[tuple[int, int]] = []
    for offset, size in sorted(spans):
        if out and offset <= out[-1][0] + out[-1][1] + gap:
            first = out[-1][0]
            out[-1] = (first, max(out[-1][0] + out[-1][1], offset + size) - first)
        else:
            out.append((offset, size))
    return out


def _new_decoder(codec: CodecJoin, track: Track, threads: int) -> Any:
    dec = av.CodecContext.create(codec.decoder, "r")
    if track.config:
        dec.extradata = track.config
    dec.thread_count = max(1, threads)
    return dec


def _decode(dec: Any, packet: Any) -> list[Any]:
    try:
        return list(dec.decode(packet))
    except av.error.InvalidDataError as exc:  # FFmpeg's own re-encode may cope
        raise JoinUnsupported(f"the source does not decode cleanly: {exc}") from exc


def _reencode(
    feed: Feed,
    samples: list[Sample],
    part: cutplan.Reencode,
    codec: CodecJoin,
    encoder: PartEncoder,
    guard: Guard,
) -> list[tuple[Encoded, int]]:
    """Decode the GOP at ``part.key`` and encode the frames ``part`` wants.

    Only what those frames need is decoded: where the decoder can, frames
    before the first wanted one that no other frame refers to (most
    B-frames) are skipped. Decoding and encoding run on two threads.
    """
    track = feed.stream.track
    wanted = set(part.frame_pts)
    frames: queue.Queue[Any] = queue.Queue(maxsize=_FRAME_QUEUE)

    def encode_all() -> list[Encoded]:
        out: list[Encoded] = []
        while True:
            frame = _get(frames, guard)
            out.extend(encoder.encode(frame))
            if frame is None:
                return out

    worker = _Worker(encode_all, guard, "clip-encode")
    got = 0
    try:
        dec = _new_decoder(codec, track, 1)
        key_pts = samples[part.key].pts

        def take(decoded: list[Any]) -> None:
            nonlocal got
            for frame in decoded:
                if frame.pts in wanted:
                    got += 1
                    _put(frames, frame, guard)

        for i in range(part.key, len(samples)):
            guard.check()
            sample = samples[i]
            if i > part.key and sample.key:
                break  # the next GOP
            if sample.pts < key_pts:
                continue  # a leading picture of an open GOP (refers to the GOP before)
            packet = av.Packet(feed.data(sample))
            packet.pts, packet.dts = sample.pts, sample.dts
            packet.is_keyframe = sample.key
            if codec.skips_nonref:
                dec.skip_frame = "DEFAULT" if sample.pts in wanted else "NONREF"
            take(_decode(dec, packet))
            if got == len(wanted):
                break
        if got < len(wanted):
            dec.skip_frame = "DEFAULT"
            take(_decode(dec, None))
    finally:
        _put(frames, None, guard, stopping=True)  # the encoder flushes and ends
    encoded: list[Encoded] = worker.result()
    if got != len(wanted) or len(encoded) != len(part.frame_pts):
        raise JoinUnsupported(
            f"re-encoded {len(encoded)} of {len(part.frame_pts)} frames (decoded {got})"
        )
    return list(zip(encoded, part.frame_pts, strict=True))


def _frame_rate(samples: list[Sample], track: Track) -> Fraction | None:
    """The source's frame rate, for the encoders' rate control and level checks:
    the container's nominal rate, else the most common frame duration's."""
    if track.fps:
        return Fraction(track.fps).limit_denominator(1001)
    pts = sorted(s.pts for s in samples[:200])
    steps = [b - a for a, b in itertools.pairwise(pts) if b > a]
    if not steps:
        return None
    step = max(set(steps), key=steps.count)
    return Fraction(track.timescale, step).limit_denominator(1001)


def _part_job(
    feed: Feed,
    samples: list[Sample],
    part: cutplan.Reencode,
    codec: CodecJoin,
    encoder: PartEncoder,
    guard: Guard,
) -> Callable[[], list[tuple[Encoded, int]]]:
    return lambda: _reencode(feed, samples, part, codec, encoder, guard)


def _template(init: bytes, track: Track) -> tuple[Any, Any]:
    """The stream of the source's header bytes, opened by PyAV (for its parameters)."""
    try:
        container = av.open(io.BytesIO(init))
    except av.FFmpegError as exc:
        raise JoinUnsupported(f"the source's header does not open: {exc}") from exc
    streams: list[Any] = [s for s in container.streams if s.type == track.kind]
    chosen: Any = next(
        (s for s in streams if s.id == track.track_id), streams[0] if streams else None
    )
    if chosen is None:
        container.close()
        raise JoinUnsupported(f"the source's header has no {track.kind} stream")
    return container, chosen


class _CutProgress:
    """A cut's progress in output seconds, from two halves: the bytes its spans
    fetched so far, and the output time muxed so far. A source slower than the
    encoder (a throttled CDN) shows its clip moving while it downloads, which
    is what a worker's heartbeat takes for a live clip. Called from the fetch
    threads and the mux: a lock keeps the sum whole; the listener hears rises."""

    def __init__(self, req: CutRequest, listener: Callable[[float], None] | None) -> None:
        self._duration_s = max(req.end_s - req.start_s, 1e-3)
        self._listener = listener
        self._lock = threading.Lock()
        self._total = 0
        self._fetched = 0
        self._muxed_s = 0.0
        self._closed = False

    def close(self) -> None:
        """No report from now on (a fetch thread still finishing its request
        must not write beside the cut's answer)."""
        with self._lock:
            self._closed = True

    def expect(self, size: int) -> None:
        self._total += size

    def fetched(self, size: int) -> None:
        with self._lock:
            self._fetched += size
        self._report()

    def muxed(self, out_s: float) -> None:
        with self._lock:
            self._muxed_s = max(self._muxed_s, min(out_s, self._duration_s))
        self._report()

    def _report(self) -> None:
        if self._listener is None:
            return
        with self._lock:  # (held while the listener writes: one message at a time)
            if self._closed:
                return
            share = min(1.0, self._fetched / self._total) if self._total else 1.0
            self._listener((share * self._duration_s + self._muxed_s) / 2)


def run_cut(req: CutRequest, on_progress: Callable[[float], None] | None = None) -> CutResult:
    """Make the clip ``req`` asks for at ``req.out``; remove it on any failure.

    ``on_progress`` hears the output's time muxed so far (seconds), after each packet.
    """
    guard = Guard(req.deadline)
    out = Path(req.out)
    spill = str(out.with_name(out.name + "-spill"))
    workers: list[_Worker] = []
    fetchers: list[RangeFetcher] = []
    prefetches: list[Prefetch] = []
    progress = _CutProgress(req, on_progress)

    def fetch(
        stream: StreamInput, spans: list[tuple[int, int]], priority: tuple[int, ...], n: int
    ) -> Prefetch:
        fetcher = RangeFetcher(stream.url, connect_to=stream.connect_to)
        fetchers.append(fetcher)
        progress.expect(sum(size for _, size in spans))
        fetcher.on_bytes = progress.fetched if on_progress is not None else None
        prefetch = Prefetch(
            fetcher,
            spans,
            priority=priority,
            connections=n,
            check=guard.check,
            spill_path=f"{spill}-{len(prefetches)}",
        )
        prefetches.append(prefetch)
        return prefetch

    try:
        vspans = list(req.video.window.spans)
        first_spans = (0, len(vspans) - 1)  # the GOPs decoded: the clip's ends
        audio = None
        if req.audio is not None and req.audio.url == req.video.url:
            # One file holds both (a muxed source): one fetch of both windows'
            # bytes, so the audio interleaved with the video is read once.
            both = _merged(vspans + list(req.audio.window.spans))
            shared = fetch(req.video, both, (0, len(both) - 1), req.connections)
            video, audio = Feed(req.video, shared), Feed(req.audio, shared)
        else:
            video = Feed(req.video, fetch(req.video, vspans, first_spans, req.connections))
            if req.audio is not None:
                aspans = list(req.audio.window.spans)
                audio = Feed(req.audio, fetch(req.audio, aspans, (), 2))
        return _join(req, video, audio, guard, workers, progress.muxed if on_progress else None)
    except BaseException as exc:
        guard.fail(exc)
        with contextlib.suppress(OSError):
            out.unlink()
        cause = guard.error if guard.error is not None else exc
        if isinstance(cause, cutplan.PlanUnsupported | JoinUnsupported | ContainerError):
            raise CutFailed(str(cause)) from cause
        if isinstance(cause, av.FFmpegError):
            raise CutFailed(f"decoding or muxing failed: {cause}") from cause
        if cause is not exc:
            raise cause from None
        raise
    finally:
        progress.close()
        for worker in workers:
            worker.stop()
        for prefetch in prefetches:
            prefetch.close()
        for fetcher in fetchers:
            fetcher.close()


def _join(
    req: CutRequest,
    video: Feed,
    audio: Feed | None,
    guard: Guard,
    workers: list[_Worker],
    on_progress: Callable[[float], None] | None = None,
) -> CutResult:
    track = req.video.track
    origin = req.video.origin_ticks
    samples = video.samples()
    timeline = cutplan.Track(
        samples, track.timescale, following_key_pts=req.video.window.following_key_pts
    )
    start = timeline.ticks(req.start_s) + origin
    end = timeline.ticks(req.end_s) + origin
    plan = cutplan.plan_cut(timeline, start, end, req.mode)
    codec: CodecJoin | None = None
    parts: list[PartEncoder] = []
    head = tail = None
    if plan.head is not None or plan.tail is not None:
        codec = codec_join(track.codec, track.config)
        time_base = Fraction(1, track.timescale)
        # Each part may use every thread the clip has, head and tail alike:
        # they seldom hold as many frames (a clip starting 0.5 s after a
        # keyframe has a 1.5 s head to re-encode and a 0.5 s tail), and the
        # part done first leaves its cores to the other (HEVC: 1.27 -> 0.75 s
        # for such a clip; one thread each left a core idle most of the time).
        threads = req.threads
        rate = _frame_rate(samples, track)
        for index, part in enumerate((plan.head, plan.tail)):
            if part is None:
                continue
            encoder = PartEncoder(codec, index, time_base, threads, rate)
            parts.append(encoder)
            worker = _Worker(
                _part_job(video, samples, part, codec, encoder, guard), guard, "clip-part"
            )
            workers.append(worker)
            if index == 0:
                head = worker
            else:
                tail = worker
    first_s = plan.first_pts / track.timescale
    end_s = plan.end_pts / track.timescale
    audio_packets: list[tuple[bytes, int, int]] = []
    if audio is not None and req.audio is not None and req.audio.track.codec == "aac":
        a_origin = req.audio.origin_ticks - round(
            origin * req.audio.track.timescale / track.timescale
        )
        audio_packets = _audio(audio, req.audio, first_s, end_s, a_origin, guard, on_progress)
    return _mux(
        req, video, samples, plan, codec, parts, head, tail, req.audio, audio_packets,
        audio, guard, on_progress,
    )  # fmt: skip


def _audio(
    feed: Feed,
    stream: StreamInput,
    first_s: float,
    end_s: float,
    origin: int,
    guard: Guard,
    on_progress: Callable[[float], None] | None = None,
) -> list[tuple[bytes, int, int]]:
    """The audio of [first_s, end_s) (source-timeline seconds of the video, mapped
    to this track by ``origin`` ticks) as (data, pts, duration) in track ticks
    from the clip's start: AAC samples copied (the first one may start a little
    before: its negative time makes the MP4 muxer trim it with an edit list).

    Reading a muxed source's audio fetches the clip's bytes: ``on_progress``
    hears the clip time read so far."""
    track = stream.track
    ts = track.timescale
    start = round(first_s * ts) + origin
    end = round(end_s * ts) + origin
    out = []
    for sample in overlapping(feed.samples(), start, end, guard):
        out.append((feed.data(sample), sample.pts - start, sample.duration))
        if on_progress is not None:
            on_progress((sample.pts - start) / ts)
    return out


def _encode_audio(
    feed: Feed, stream: StreamInput, first_s: float, end_s: float, origin: int, guard: Guard,
    aout: Any,
) -> list[Any]:  # fmt: skip
    """Audio of [first_s, end_s) decoded and encoded to AAC, trimmed to the sample.

    ``first_s``/``end_s`` are seconds of the video's timeline; ``origin`` maps
    them to this track (see :func:`_audio`). Decoding starts a little before
    the clip (pre-roll) and every decoded sample is placed by its packet's
    time, so the output starts with the clip's first video frame: where the
    source has no audio yet, the clip starts with silence.
    """
    track = stream.track
    ts = track.timescale
    start = round(first_s * ts) + origin
    end = round(end_s * ts) + origin
    preroll = round(_AUDIO_PREROLL_S * ts)
    dec: Any = av.CodecContext.create(track.codec, "r")
    if track.config:
        dec.extradata = _audio_extradata(track)
    rate = aout.codec_context.sample_rate
    layout = aout.codec_context.layout.name
    resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
    fifo = av.AudioFifo()
    want_from, want_to = start / ts, end / ts  # seconds on this track's timeline
    written = 0
    packets: list[Any] = []

    def write(frame: Any) -> None:
        nonlocal written
        frame.pts = None
        fifo.write(frame)
        while fifo.samples >= _AAC_FRAME:
            chunk: Any = fifo.read(_AAC_FRAME)
            chunk.pts = written
            written += chunk.samples
            packets.extend(aout.encode(chunk))

    def push(frames: list[Any], t0: float) -> None:
        for frame in frames:
            for out in resampler.resample(frame):
                n = out.samples
                if written + fifo.samples == 0 and t0 > want_from + 1 / rate:
                    # The source's audio starts after the clip does: silence first.
                    write(_silence(min(t0, want_to) - want_from, rate, layout))
                skip = max(0, round((want_from - t0) * rate))
                keep = min(n, max(0, round((want_to - t0) * rate))) - skip
                t0 += n / rate
                if keep <= 0:
                    continue
                write(_trimmed(out, skip, keep, rate) if skip or keep < n else out)

    first = True
    for sample in overlapping(feed.samples(), start - preroll, end, guard):
        packet = av.Packet(feed.data(sample))
        packet.pts = packet.dts = sample.pts
        try:
            frames = [f for f in dec.decode(packet) if f is not None]
        except av.error.InvalidDataError:
            continue  # a damaged audio frame: skip it, as players do
        if not frames:
            continue
        t0 = sample.pts / ts
        if first:
            # A decoder drops its codec delay (Opus pre-skip) from the first
            # packet it decodes: those samples are the packet's last ones.
            nominal = round(sample.duration / ts * frames[0].sample_rate)
            got = sum(f.samples for f in frames)
            if 0 < got < nominal:
                t0 += (nominal - got) / frames[0].sample_rate
            first = False
        push(frames, t0)
    if fifo.samples:
        chunk: Any = fifo.read()
        chunk.pts = written
        packets.extend(aout.encode(chunk))
    packets.extend(aout.encode(None))
    return packets


def _audio_extradata(track: Track) -> bytes:
    """The decoder's extradata: MP4 stores Opus's setup as a dOps box (big
    endian, version 0), FFmpeg's decoder wants the OpusHead it came from."""
    config = track.config
    if track.codec == "opus" and not config.startswith(b"OpusHead") and len(config) >= 11:
        channels, pre_skip = config[1], int.from_bytes(config[2:4], "big")
        rate, gain = int.from_bytes(config[4:8], "big"), config[8:10]
        return (
            b"OpusHead"
            + bytes([1, channels])
            + pre_skip.to_bytes(2, "little")
            + rate.to_bytes(4, "little")
            + gain[::-1]
            + config[10:]
        )
    return config


def _silence(seconds: float, rate: int, layout: str) -> Any:
    frame = av.AudioFrame(format="fltp", layout=layout, samples=max(1, round(seconds * rate)))
    frame.sample_rate = rate
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    return frame


def _describe_from_keyframe(vout: Any, feed: Feed, samples: list[Sample], track: Track) -> None:
    """Set the output stream's pixel format and colour from the window's first
    keyframe, decoded."""
    key = next((s for s in samples if s.key), None)
    if key is None:
        return
    name = "libdav1d" if track.codec == "av1" else track.codec
    dec: Any = av.CodecContext.create(name, "r")
    if track.config:
        dec.extradata = track.config
    packet = av.Packet(feed.data(key))
    packet.pts = packet.dts = key.pts
    frames = _decode(dec, packet) or _decode(dec, None)
    if not frames:
        raise JoinUnsupported("the source's first keyframe does not decode")
    frame = frames[0]
    cc = vout.codec_context
    cc.pix_fmt = frame.format.name
    for attr in ("color_primaries", "color_trc", "colorspace", "color_range"):
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            setattr(cc, attr, getattr(frame, attr))


def _first_frame_size(codec: str, extradata: bytes, data: bytes) -> tuple[int, int]:
    """The output's first video sample decoded alone with the output's codec
    configuration, as a player starts: its frame size (the check that the clip
    starts on a picture that decodes, made while the rest is muxed)."""
    dec: Any = av.CodecContext.create("libdav1d" if codec == "av1" else codec, "r")
    dec.thread_type = "NONE"
    dec.thread_count = 1
    if extradata:
        dec.extradata = extradata
    frames = _decode(dec, av.Packet(data)) or _decode(dec, None)
    if not frames:
        raise JoinUnsupported("the clip's first frame does not decode")
    return frames[0].width, frames[0].height


def _trimmed(frame: Any, skip: int, keep: int, rate: int) -> Any:
    """``keep`` samples of a planar float frame from sample ``skip`` on."""
    out = av.AudioFrame(format="fltp", layout=frame.layout.name, samples=keep)
    out.sample_rate = rate
    width = 4  # bytes per float32 sample
    for src, dst in zip(frame.planes, out.planes, strict=True):
        dst.update(bytes(src)[skip * width : (skip + keep) * width])
    return out


def _mux(
    req: CutRequest,
    video: Feed,
    samples: list[Sample],
    plan: cutplan.CutPlan,
    codec: CodecJoin | None,
    parts: list[PartEncoder],
    head: _Worker | None,
    tail: _Worker | None,
    audio_stream: StreamInput | None,
    audio_copied: list[tuple[bytes, int, int]],
    audio: Feed | None,
    guard: Guard,
    on_progress: Callable[[float], None] | None = None,
) -> CutResult:
    track = req.video.track
    tb = Fraction(1, track.timescale)
    origin = plan.first_pts
    counter = 0
    vtemplate, vin = _template(req.video.init, track)
    atemplate: Any = None
    first_frame: _Worker | None = None
    first_user = (plan.first_pts - req.video.origin_ticks) / track.timescale
    end_user = (plan.end_pts - req.video.origin_ticks) / track.timescale
    text_samples = movtext.text_samples(movtext.clip_cues(req.captions, first_user, end_user))
    try:
        with av.open(req.out, "w", format="mp4", options={"movflags": "+faststart"}) as oc:
            # (opaque: keep the template's codec object, as the default looks up
            # an encoder by the decoder's name, which libdav1d is not.)
            vout = oc.add_stream_from_template(vin, opaque=True)
            vout.time_base = tb
            if track.codec == "hevc":
                # Every parameter set is in the hvcC: hvc1 (Safari and
                # QuickTime refuse hev1, whose default the muxer picks).
                vout.codec_context.codec_tag = "hvc1"
            if vin.codec_context.format is None and track.codec in ("vp9", "av1"):
                # The muxer writes vpcC/colr from the pixel format and colour,
                # which header bytes alone do not tell: one keyframe does.
                _describe_from_keyframe(vout, video, samples, track)
            aout: Any = None
            audio_job: _Worker | None = None
            a_tb = Fraction(1, 1)
            if audio_stream is not None and audio is not None:
                atrack = audio_stream.track
                if atrack.codec == "aac":
                    atemplate, ain = _template(audio_stream.init, atrack)
                    aout = oc.add_stream_from_template(ain)
                    aout.time_base = a_tb = Fraction(1, atrack.timescale)
                else:
                    rate = atrack.sample_rate or 48000
                    aout = oc.add_stream("aac", rate=rate)
                    aout.codec_context.layout = "stereo" if atrack.channels != 1 else "mono"
                    aout.bit_rate = AAC_BIT_RATE
                    aout.time_base = a_tb = Fraction(1, rate)
                    a_origin = audio_stream.origin_ticks - round(
                        req.video.origin_ticks * atrack.timescale / track.timescale
                    )
                    # Encoded beside the video's re-encoded parts, on a thread.
                    audio_job = _Worker(
                        functools.partial(
                            _encode_audio, audio, audio_stream, plan.first_pts / track.timescale,
                            plan.end_pts / track.timescale, a_origin, guard, aout,
                        ),
                        guard,
                        "clip-audio",
                    )  # fmt: skip

            def emit(packet: Any, pts: int, dts: int, duration: int) -> tuple[float, int, Any]:
                nonlocal counter
                counter += 1
                packet.stream = vout
                packet.time_base = tb
                packet.pts = pts
                packet.dts = dts
                if duration > 0:
                    packet.duration = duration
                return (float(dts * tb), 0, packet)

            def encoded(worker: _Worker, shown_until: int) -> Iterator[tuple[float, int, Any]]:
                frames = worker.result()
                times = [pts for _, pts in frames] + [shown_until]
                for (frame, pts), nxt in zip(frames, times[1:], strict=True):
                    packet = av.Packet(frame.data)
                    packet.is_keyframe = frame.key
                    out_pts = pts - origin
                    yield emit(packet, out_pts, out_pts - plan.reorder_ticks, nxt - pts)

            def video_packets() -> Iterator[tuple[float, int, Any]]:
                if head is not None:
                    after_head = samples[plan.copy[0]].pts if plan.copy else plan.end_pts
                    yield from encoded(head, after_head)
                first = True
                for i in plan.copy:
                    guard.check()
                    sample = samples[i]
                    data = video.data(sample)
                    if codec is not None:
                        data = codec.copied(data, first)
                    first = False
                    packet = av.Packet(data)
                    packet.is_keyframe = sample.key
                    yield emit(packet, sample.pts - origin, sample.dts - origin, sample.duration)
                if tail is not None:
                    yield from encoded(tail, plan.end_pts)

            def audio_packets() -> Iterator[tuple[float, int, Any]]:
                for data, pts, duration in audio_copied:
                    packet = av.Packet(data)
                    packet.stream = aout
                    packet.time_base = a_tb
                    packet.pts = packet.dts = pts
                    if duration > 0:
                        packet.duration = duration
                    yield (float(pts * a_tb), 1, packet)
                for packet in audio_job.result() if audio_job is not None else ():
                    packet.stream = aout
                    dts = packet.dts if packet.dts is not None else packet.pts
                    yield (float(dts * packet.time_base), 1, packet)

            # The output's codec configuration lists the re-encoded parts'
            # parameter sets: known once their encoders opened, which the
            # head's first frame does. Muxing starts after that.
            streams: list[Iterator[tuple[float, int, Any]]] = [video_packets()]
            if aout is not None:
                streams.append(audio_packets())
            if text_samples:
                text = movtext.add_stream(oc)
                streams.append((p.pts / 1000, 2, p) for p in movtext.packets(text, text_samples))
            merged = heapq.merge(*streams, key=lambda x: (x[0], x[1]))
            pending = _wait_for_config(head, tail, guard)
            if codec is not None and pending:
                config = codec.output_config(parts)
                if config is not None:
                    vout.codec_context.extradata = config
            last_dts: int | None = None
            extradata = bytes(vout.codec_context.extradata or b"")
            for out_s, _, packet in merged:
                guard.check()
                if packet.stream is vout:
                    if last_dts is not None and packet.dts <= last_dts:
                        raise JoinUnsupported("joined decode times do not increase")
                    if last_dts is None:
                        first_frame = _Worker(
                            functools.partial(
                                _first_frame_size, track.codec, extradata, bytes(packet)
                            ),
                            guard,
                            "clip-first-frame",
                        )
                    last_dts = packet.dts
                oc.mux(packet)
                if on_progress is not None:
                    on_progress(out_s)
    finally:
        vtemplate.close()
        if atemplate is not None:
            atemplate.close()
    if first_frame is None:
        raise JoinUnsupported("the clip has no video sample")
    size = first_frame.result()
    audio_track = req.audio.track if req.audio is not None else None
    has_audio = bool(audio_copied) or (audio_track is not None and audio_track.codec != "aac")
    stats = list(
        {id(f.prefetch.fetcher): f.prefetch.fetcher.stats for f in (video, audio) if f}.values()
    )
    return CutResult(
        first_s=first_user,
        end_s=end_user,
        frames=counter,
        reencoded_frames=plan.reencoded_frames,
        has_audio=has_audio,
        bytes_fetched=sum(s.bytes for s in stats),
        requests=sum(s.requests for s in stats),
        captions=len(text_samples),
        first_frame=size,
    )


def _wait_for_config(head: _Worker | None, tail: _Worker | None, guard: Guard) -> bool:
    """Wait for the re-encoded parts (their encoders' parameter sets are part of
    the output's header); True if there are any."""
    for worker in (head, tail):
        if worker is not None:
            worker.result()
    return head is not None or tail is not None


__all__ = ["CutFailed", "CutRequest", "CutResult", "FetchError", "StreamInput", "run_cut"]
