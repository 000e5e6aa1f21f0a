"""``clipservice clip``: cut clips from the command line, with live progress.

It submits one job through :class:`~clipservice.client.ClipClient`, shows a
progress bar for the job and one per clip (on stderr), downloads the clips
into ``--out`` and prints their paths (on stdout, one a line). With
``--preview`` it cuts nothing: it prints what the source is (title, duration,
streams) and writes its storyboard (``storyboard.jpg`` and ``storyboard.vtt``)
into ``--out``, to pick ranges from. Without ``--server`` it starts the
service in this process on an ephemeral loopback port, so nothing else needs
to run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from clipservice.api.protocol import make_runner
from clipservice.api.schemas import VIDEO_ID_PATTERN, parse_time
from clipservice.config import ConfigError, Settings, StorageSettings, load_settings

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
EXIT_JOB_FAILED = 3

MEDIA_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".m4a", ".mp3", ".aac", ".ogg", ".opus",
    ".wav", ".flac", ".ts", ".flv", ".avi",
)  # fmt: skip

SOURCE_HELP = (
    "a video id, a page URL or a media URL. A bare id (letters, digits, _ and -) is "
    "resolved as a YouTube video id; an http(s) URL whose path ends in a media "
    f"extension ({', '.join(MEDIA_EXTENSIONS)}), or any URL given with --audio-url, is "
    "cut directly as a stream URL; any other http(s) URL is a page URL for the resolver"
)


class UsageError(Exception):
    """Bad command-line input: exit 2 with the message."""


def add_parser(sub: Any) -> None:
    """Register ``clip`` on the ``clipservice`` subcommand parser."""
    clip = sub.add_parser(
        "clip",
        help="cut clips from a video and download them (runs the service in-process "
        "unless --server is given)",
        description="Cut clips out of a video and download them (or, with --preview, show "
        "what the video is and write its storyboard). SOURCE is " + SOURCE_HELP + ".",
        epilog="Exit status: 0 every clip succeeded (or the preview was written), 1 some "
        "clips failed, 2 usage error, 3 the job failed as a whole (or the source could not "
        "be previewed).",
    )
    clip.add_argument("source", metavar="SOURCE", help="video id, page URL or media URL")
    clip.add_argument(
        "--clip",
        dest="clips",
        action="append",
        metavar="START-END",
        help="a time range, seconds or [HH:]MM:SS[.fff] (e.g. 10-20, 1:05-1:12.5); repeatable; "
        "at least one unless --preview",
    )
    clip.add_argument(
        "--preview",
        action="store_true",
        help="cut nothing: print the source's title, duration and streams, and write its "
        "storyboard (storyboard.jpg, thumbnails at regular intervals, and storyboard.vtt, "
        "their times) into --out",
    )
    clip.add_argument("--audio-url", help="a separate audio stream for a media-URL SOURCE")
    clip.add_argument("--mode", choices=["fast", "accurate", "reencode"], help="cut mode")
    clip.add_argument(
        "--out", default=".", help="folder for the clips or the storyboard (default: .)"
    )
    shape = clip.add_argument_group("output options (what each clip is made into)")
    shape.add_argument("--aspect", choices=["source", "9:16", "1:1", "4:5", "16:9"])
    shape.add_argument(
        "--fit", choices=["crop", "pad", "blur"], help="how the frame fills the aspect"
    )
    shape.add_argument("--crop-x", type=float, help="horizontal crop position, 0 (left) to 1")
    shape.add_argument("--max-height", type=int, help="output height (even), e.g. 1920")
    shape.add_argument("--format", choices=["mp4", "m4a", "mp3", "gif", "webp", "jpg", "png"])
    shape.add_argument("--fps", type=float, help="frame rate of a gif/webp")
    shape.add_argument("--width", type=int, help="width of a gif/webp")
    shape.add_argument(
        "--thumbnail-at", metavar="TIME", help="time of a jpg/png frame (default: the clip's start)"
    )
    shape.add_argument(
        "--captions", metavar="FILE_OR_URL", help="WebVTT/SRT subtitles: a local file or a URL"
    )
    shape.add_argument(
        "--burn-captions", action="store_true", help="burn the captions in (default: a soft track)"
    )
    shape.add_argument(
        "--merge", action="store_true", help="also join the clips, in order, into one reel"
    )
    shape.add_argument("--crossfade", type=float, help="crossfade between the reel's clips (s)")
    clip.add_argument("--server", help="a running clipservice, e.g. http://127.0.0.1:8080")
    clip.add_argument("--api-key", help="API key for --server, when it asks for one")
    clip.add_argument(
        "--config",
        help="TOML config for the in-process service (default: ./config.toml if present)",
    )


def source_fields(source: str, audio_url: str | None) -> dict[str, str]:
    """The create-clips source fields for SOURCE (see ``SOURCE_HELP`` for the rule)."""
    if "://" not in source:
        if audio_url:
            raise UsageError("--audio-url goes with a media URL SOURCE")
        if not re.match(VIDEO_ID_PATTERN, source):
            raise UsageError(f"SOURCE {source!r} is neither a video id nor an http(s) URL")
        return {"video_id": source}
    parts = urlsplit(source)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"SOURCE {source!r} is not an http(s) URL")
    if audio_url or parts.path.lower().endswith(MEDIA_EXTENSIONS):
        fields = {"video_url": source}
        if audio_url:
            fields["audio_url"] = audio_url
        return fields
    return {"url": source}


def output_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The job's output options from the flags given (None: the plain MP4)."""
    fields = {
        "aspect": args.aspect,
        "fit": args.fit,
        "crop_x": args.crop_x,
        "max_height": args.max_height,
        "format": args.format,
        "fps": args.fps,
        "width": args.width,
    }
    out: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
    if args.thumbnail_at is not None:
        try:
            out["thumbnail_at"] = parse_time(args.thumbnail_at)
        except ValueError as exc:
            raise UsageError(f"--thumbnail-at: {exc}") from None
    if args.captions is not None:
        mode = "burn" if args.burn_captions else "soft"
        if "://" in args.captions:
            out["captions"] = {"url": args.captions, "mode": mode}
        else:
            try:
                text = Path(args.captions).read_text(encoding="utf-8-sig")
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--captions: cannot read {args.captions}: {exc}") from None
            out["captions"] = {"text": text, "mode": mode}
    elif args.burn_captions:
        raise UsageError("--burn-captions needs --captions")
    if args.crossfade is not None and not args.merge:
        raise UsageError("--crossfade needs --merge")
    return out or None


def parse_clip(text: str) -> tuple[float, float]:
    """``START-END`` → seconds; times are seconds or ``[HH:]MM:SS[.fff]``."""
    start_text, sep, end_text = text.partition("-")
    if not sep:
        raise UsageError(f"--clip {text!r}: expected START-END, e.g. 10-20 or 1:05-1:12")
    try:
        start, end = parse_time(start_text), parse_time(end_text)
    except ValueError as exc:
        raise UsageError(f"--clip {text!r}: {exc}") from exc
    if start >= end:
        raise UsageError(f"--clip {text!r}: start must be before end")
    return start, end


def _fmt(seconds: float) -> str:
    """1:05.5 for 65.5 s, 10s for 10 s: how ranges show in progress rows."""
    minutes, secs = divmod(seconds, 60)
    text = f"{secs:06.3f}".rstrip("0").rstrip(".") if minutes else f"{secs:.3f}".rstrip("0")
    text = text.rstrip(".")
    return f"{int(minutes)}:{text.zfill(2)}" if minutes else f"{text}s"


@contextlib.asynccontextmanager
async def embedded_service(settings: Settings) -> AsyncIterator[str]:
    """The service in this process on a free loopback port; yields its base URL."""
    from aiohttp import web

    from clipservice.app import create_app

    with contextlib.ExitStack() as stack:
        if settings.storage.data_dir == StorageSettings().data_dir:
            # No data_dir configured: keep jobs and clips only while this command runs.
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipservice-"))
            settings = settings.replace(storage={"data_dir": Path(tmp)})
        runner = make_runner(create_app(settings), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            server = site._server
            assert server is not None
            port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            yield f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


async def _base_url(stack: contextlib.AsyncExitStack, args: argparse.Namespace) -> str:
    """--server, or the embedded service (stopped when ``stack`` closes)."""
    if args.server:
        return str(args.server)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    return await stack.enter_async_context(embedded_service(settings))


async def _run(args: argparse.Namespace, fields: dict[str, str], clips: list[Any]) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    from clipservice.client import ClipClient, ClipServiceError
    from clipservice.jobs.models import JobDocument as Job
    from clipservice.jobs.models import JobStatus

    console = Console(stderr=True)
    async with contextlib.AsyncExitStack() as stack:
        base_url = await _base_url(stack, args)
        client = await stack.enter_async_context(ClipClient(base_url, api_key=args.api_key))
        try:
            job = await client.create_clips(
                clips=clips,
                mode=args.mode,
                output=output_options(args),
                merge=args.merge,
                crossfade_s=args.crossfade or 0.0,
                **fields,
            )
        except ClipServiceError as exc:
            console.print(f"[red]clipservice: job refused:[/] {exc}")
            return EXIT_USAGE if 400 <= exc.status < 500 and exc.status != 429 else EXIT_JOB_FAILED

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[state]}"),
            console=console,
        )
        overall = progress.add_task("job", total=1.0, state="pending")
        rows = [
            progress.add_task(
                f"clip {c.index + 1} {_fmt(c.start)}-{_fmt(c.end)}", total=None, state=""
            )
            for c in job.clips
        ]

        def show(doc: Job) -> None:
            progress.update(overall, completed=doc.progress, state=doc.status.value)
            for result in doc.results:
                size_mb = result.size_bytes / 1e6
                progress.update(
                    rows[result.index], total=1, completed=1, state=f"ok {size_mb:.1f} MB"
                )
            for error in doc.errors:
                progress.update(rows[error.index], total=1, completed=0, state=f"{error.code}")

        try:
            with progress:
                job = await client.wait(job.job_id, on_progress=show)
                show(job)
        except ClipServiceError as exc:
            console.print(f"[red]clipservice: lost the job:[/] {exc}")
            return EXIT_JOB_FAILED

        for error in job.errors:
            console.print(
                f"[red]clip {error.index + 1}[/] {_fmt(error.start)}-{_fmt(error.end)}: "
                f"{error.code}: {error.message}"
            )
        if job.status is not JobStatus.FINISHED:
            reason = f"{job.error.code}: {job.error.message}" if job.error else job.status.value
            console.print(f"[red]clipservice: the job {job.status.value}:[/] {reason}")
            return EXIT_JOB_FAILED
        try:
            paths = await client.download(job, args.out)
        except ClipServiceError as exc:
            console.print(f"[red]clipservice: download failed:[/] {exc}")
            return EXIT_JOB_FAILED
        for path in paths:
            print(path)
        return EXIT_SOME_FAILED if job.errors else EXIT_OK


def _clock(seconds: float) -> str:
    """1:05 for 65 s, 1:00:05 for 3605 s (tenths when there are some)."""
    tenths = round(seconds * 10)
    whole, frac = divmod(tenths, 10)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{minutes}:{secs:02d}" if not hours else f"{hours}:{minutes:02d}:{secs:02d}"
    return text + (f".{frac}" if frac else "")


def _describe_stream(stream: Any) -> str:
    """``h264, 320x180, 30 fps, mp4``: what is known of a stream, in that order."""
    parts = [stream.codec or stream.kind]
    if stream.width and stream.height:
        parts.append(f"{stream.width}x{stream.height}")
    elif stream.height:
        parts.append(f"{stream.height}p")
    if stream.fps:
        parts.append(f"{stream.fps:g} fps")
    if stream.container:
        parts.append(stream.container)
    return ", ".join(parts)


async def _preview(args: argparse.Namespace, fields: dict[str, str]) -> int:
    """``clip --preview``: the source's description on stdout, its storyboard in --out."""
    from rich.console import Console

    from clipservice.client import ClipClient, ClipServiceError

    console = Console(stderr=True)
    async with contextlib.AsyncExitStack() as stack:
        base_url = await _base_url(stack, args)
        client = await stack.enter_async_context(ClipClient(base_url, api_key=args.api_key))
        try:
            preview = await client.preview(**fields)
        except ClipServiceError as exc:
            code = f" ({exc.code})" if exc.code else ""
            console.print(f"[red]clipservice: no preview{code}:[/] {exc}")
            if exc.code in ("source_unavailable", "source_forbidden") or not (
                400 <= exc.status < 500 and exc.status != 429
            ):
                return EXIT_JOB_FAILED
            return EXIT_USAGE
        print(f"title: {preview.title if preview.title is not None else '(none)'}")
        duration = preview.duration_s
        print(f"duration: {_clock(duration)} ({duration:g} s)" if duration else "duration: unknown")
        for name in ("video", "audio", "preview"):
            stream = getattr(preview, name)
            if stream is not None:
                print(f"{name}: {_describe_stream(stream)}")
        board = preview.storyboard
        with console.status("building the storyboard…"):
            try:
                sprite, vtt = await client.download_storyboard(preview, args.out)
            except ClipServiceError as exc:
                code = f" ({exc.code})" if exc.code else ""
                console.print(f"[red]clipservice: no storyboard{code}:[/] {exc}")
                return EXIT_JOB_FAILED
        print(
            f"storyboard: {sprite} ({board.count} thumbnails {board.thumb_width} px wide, "
            f"{board.columns} a row)"
        )
        print(f"storyboard index: {vtt}")
        return EXIT_OK


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at write time: rich swaps it while the bars are live."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _quiet_logging() -> None:
    import logging

    from clipservice.logging import configure_logging

    # Clip failures are reported by the command itself; the embedded service only logs
    # errors, and those go through rich's live display instead of tearing it.
    configure_logging("ERROR", json=False)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_CurrentStderr())


def run(args: argparse.Namespace) -> int:
    """Run ``clipservice clip``; the exit status."""
    try:
        fields = source_fields(args.source, args.audio_url)
        if args.preview:
            if args.clips or args.mode:
                raise UsageError("--preview cuts nothing: give it without --clip and --mode")
            if not args.server:
                _quiet_logging()
            return asyncio.run(_preview(args, fields))
        if not args.clips:
            raise UsageError("give at least one --clip START-END (or --preview)")
        clips = [parse_clip(text) for text in args.clips]
        output_options(args)  # usage errors before anything starts
        if not args.server:
            _quiet_logging()
        return asyncio.run(_run(args, fields, clips))
    except UsageError as exc:
        print(f"clipservice clip: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
