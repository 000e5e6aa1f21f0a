"""`clipservice clip` as a subprocess: in-process service and --server, against the fakes."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from clipservice.api.appkeys import STORE
from clipservice.cli_clip import UsageError, parse_clip, source_fields
from tests.conftest import FakeVidfly, MediaServer, Service


async def _clip(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clipservice",
        "clip",
        *args,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 110)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _config(tmp_path: Path, vidfly: FakeVidfly, *, data_dir: bool = True) -> Path:
    path = tmp_path / "config.toml"
    lines = [
        "[resolver]",
        f'base_url = "{vidfly.base_url}"',
        "[security]",
        "allow_private_sources = true",
    ]
    if data_dir:
        lines += ["[storage]", f'data_dir = "{tmp_path / "data"}"']
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_in_process_video_id(tmp_path: Path, vidfly: FakeVidfly) -> None:
    """Without --server the command runs the service itself, cuts both clips and prints paths."""
    config = _config(tmp_path, vidfly)
    code, out, err = await _clip(
        "dQw4w9WgXcQ", "--clip", "1-3", "--clip", "0:04-0:06.5", "--mode", "fast",
        "--out", str(tmp_path / "out"), "--config", str(config), cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert len(paths) == 2 and all(p.parent == tmp_path / "out" for p in paths)
    assert all(p.stat().st_size > 1000 for p in paths)
    assert "clip 2" in err and "finished" in err  # the progress rows, on stderr
    assert (tmp_path / "data" / "jobs").is_dir()  # the config's data_dir was used


async def test_in_process_temp_data_dir(
    tmp_path: Path, vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """With no data_dir configured the embedded service leaves nothing behind but the clips."""
    config = _config(tmp_path, vidfly, data_dir=False)
    code, out, err = await _clip(
        media_server.url("muxed.mp4"), "--clip", "2-4", "--config", str(config), cwd=tmp_path
    )
    assert code == 0, err
    (path,) = [Path(line) for line in out.splitlines()]
    assert path.parent == Path(".") and (tmp_path / path).is_file()
    assert sorted(os.listdir(tmp_path)) == sorted(["config.toml", path.name])


async def test_server_mode_media_urls(
    service: Service, media_server: MediaServer, tmp_path: Path
) -> None:
    """--server submits to a running service; a media URL with --audio-url is cut directly."""
    code, out, err = await _clip(
        media_server.url("video.mp4"), "--audio-url", media_server.url("audio.m4a"),
        "--clip", "5-7", "--out", str(tmp_path),
        "--server", service.base_url, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert len(out.splitlines()) == 1
    (job,) = await service.app[STORE].all()
    assert job.source.video_url == media_server.url("video.mp4")
    assert job.source.audio_url == media_server.url("audio.m4a")


async def test_some_clips_failed_exit_1(service: Service, tmp_path: Path) -> None:
    """A range past the video's end fails alone: exit 1, the good clip still downloaded."""
    code, out, err = await _clip(
        "partial1", "--clip", "1-2", "--clip", "25-40", "--mode", "fast",
        "--out", str(tmp_path), "--server", service.base_url, cwd=tmp_path,
    )  # fmt: skip
    assert code == 1, err
    assert len(out.splitlines()) == 1
    assert "invalid_range" in err


async def test_job_failed_exit_3(service: Service, tmp_path: Path) -> None:
    """A source the resolver cannot resolve fails the whole job: exit 3 with the reason."""
    code, out, err = await _clip(
        "error500", "--clip", "1-2", "--server", service.base_url, cwd=tmp_path
    )
    assert code == 3 and out == ""
    assert "source_unavailable" in err


@pytest.mark.parametrize(
    "args",
    [
        ("vid", "--clip", "abc"),
        ("vid", "--clip", "5-3"),
        ("vid",),
        ("not an id!", "--clip", "1-2"),
        ("ftp://x/y.mp4", "--clip", "1-2"),
        ("vid", "--clip", "1-2", "--mode", "slow"),
        ("vid", "--audio-url", "http://x/a.m4a", "--clip", "1-2"),
    ],
)
async def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Bad sources, ranges and flags exit 2 with a message, before anything runs."""
    code, out, err = await _clip(*args, "--server", "http://127.0.0.1:9", cwd=tmp_path)
    assert code == 2 and out == "" and err.strip()


async def test_refused_by_server_exit_2(service: Service, tmp_path: Path) -> None:
    """A request the service refuses (422: too many clips) is a usage error with its problem."""
    clips = [a for i in range(60) for a in ("--clip", f"{i % 20}-{i % 20 + 1}")]
    code, _, err = await _clip("vid", *clips, "--server", service.base_url, cwd=tmp_path)
    assert code == 2 and "422" in err and "max_clips_per_job" in err


def test_help_says_the_source_rule() -> None:
    """`clip --help` explains how SOURCE is read and what the exit codes mean."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "clipservice", "clip", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    assert "media extension" in text and "page URL" in text and "video id" in text
    assert "3 the job failed as a whole" in text


def test_source_rule() -> None:
    """Ids, media URLs (by extension or --audio-url) and page URLs map to their fields."""
    assert source_fields("dQw4w9WgXcQ", None) == {"video_id": "dQw4w9WgXcQ"}
    assert source_fields("https://cdn.example/v/a.MP4?sig=1", None) == {
        "video_url": "https://cdn.example/v/a.MP4?sig=1"
    }
    assert source_fields("https://cdn.example/stream", "https://cdn.example/a") == {
        "video_url": "https://cdn.example/stream",
        "audio_url": "https://cdn.example/a",
    }
    assert source_fields("https://www.youtube.com/watch?v=x", None) == {
        "url": "https://www.youtube.com/watch?v=x"
    }
    assert parse_clip("1:05-1:12.5") == (65.0, 72.5)
    with pytest.raises(UsageError):
        parse_clip("10")


async def test_output_flags_and_merge(
    service: Service, media_server: MediaServer, tmp_path: Path
) -> None:
    """--aspect/--max-height/--captions/--merge reach the job: vertical clips with a
    soft caption track and their reel are downloaded, the reel last."""
    captions = tmp_path / "subs.srt"
    captions.write_text("1\n00:00:05,200 --> 00:00:06,000\nHi\n")
    code, out, err = await _clip(
        media_server.url("muxed.mp4"), "--clip", "5-7", "--clip", "9-10",
        "--aspect", "9:16", "--max-height", "320", "--captions", str(captions),
        "--merge", "--out", str(tmp_path / "out"), "--server", service.base_url, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    paths = [Path(line) for line in out.splitlines()]
    assert len(paths) == 3 and paths[-1].name.startswith("reel-")
    (job,) = await service.app[STORE].all()
    assert {(c.output.aspect, c.output.max_height) for c in job.clips} == {("9:16", 320)}
    assert job.clips[0].output.captions is not None and job.merge
    assert [(r.width, r.height) for r in job.results] == [(180, 320), (180, 320)]


@pytest.mark.parametrize(
    "args",
    [
        ("--burn-captions",),
        ("--crossfade", "0.5"),
        ("--captions", "/nonexistent/subs.srt"),
        ("--thumbnail-at", "soon"),
        ("--format", "avi"),
        ("--aspect", "2:1"),
    ],
)
async def test_output_flag_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Output flags that cannot go together, or do not parse, exit 2 before anything runs."""
    code, out, err = await _clip(
        "vid", "--clip", "1-2", *args, "--server", "http://127.0.0.1:9", cwd=tmp_path
    )
    assert code == 2 and out == "" and err.strip()
