"""Source previews from the Python client and from `clipservice clip --preview`,
against the real service and the fakes of conftest."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipservice.client import ClipClient, ClipServiceError, SourcePreview
from tests.conftest import MEDIA_SECONDS, FakeVidfly, MediaServer, Service
from tests.test_cli_clip import _clip, _config


async def _sprite(service: Service, preview: SourcePreview) -> bytes:
    async with service.http.get(service.base_url + preview.storyboard.sprite_url) as resp:
        assert resp.status == 200
        return await resp.read()


async def test_client_preview_and_storyboard(service: Service, tmp_path: Path) -> None:
    """preview() gives the typed document; storyboard(), storyboard_vtt() and
    download_storyboard() give the service's sprite and index, whole."""
    async with ClipClient(service.base_url) as client:
        preview = await client.preview(video_id="clientpreview")
        assert isinstance(preview, SourcePreview)
        assert preview.title == "Test pattern, ten minutes"
        assert preview.duration_s == MEDIA_SECONDS
        assert preview.video is not None and preview.video.codec == "h264"
        sprite = await client.storyboard(preview)
        vtt = await client.storyboard_vtt(preview)
        paths = await client.download_storyboard(preview, tmp_path / "board")
    assert sprite == await _sprite(service, preview) and sprite[:2] == b"\xff\xd8"
    assert vtt.startswith("WEBVTT") and vtt.count("#xywh=") == preview.storyboard.count
    assert [p.name for p in paths] == ["storyboard.jpg", "storyboard.vtt"]
    assert paths[0].read_bytes() == sprite and paths[1].read_text() == vtt
    assert sorted(p.name for p in (tmp_path / "board").iterdir()) == sorted(p.name for p in paths)


async def test_client_preview_errors(service: Service, media_server: MediaServer) -> None:
    """A bad query raises ClipServiceError with the 422's errors; a failing source its code."""
    async with ClipClient(service.base_url) as client:
        with pytest.raises(ClipServiceError) as bad:
            await client.preview(video_id="x", url="https://example.com/watch?v=x")
        assert bad.value.status == 422 and bad.value.errors
        with pytest.raises(ClipServiceError) as failed:
            await client.preview(video_id="error500")
        assert failed.value.status == 422 and failed.value.code == "source_unavailable"
        # A media URL works without the resolver; its duration comes from the container.
        preview = await client.preview(video_url=media_server.url("muxed.mp4"))
    assert preview.title is None and preview.duration_s == pytest.approx(MEDIA_SECONDS, abs=0.1)


async def test_cli_preview_with_server(service: Service, tmp_path: Path) -> None:
    """`clip SOURCE --preview --server` prints title, duration and streams and writes the
    storyboard and its index into --out (exit 0), the service's own bytes."""
    out = tmp_path / "out"
    code, stdout, err = await _clip(
        "clipreview", "--preview", "--out", str(out), "--server", service.base_url, cwd=tmp_path
    )
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0] == "title: Test pattern, ten minutes"
    assert lines[1] == "duration: 0:30 (30 s)"
    assert "video: h264, 320x180, 30 fps, mp4" in lines
    assert lines[-2].startswith(f"storyboard: {out / 'storyboard.jpg'} (100 thumbnails")
    assert lines[-1] == f"storyboard index: {out / 'storyboard.vtt'}"
    async with ClipClient(service.base_url) as client:
        preview = await client.preview(video_id="clipreview")
        assert (out / "storyboard.jpg").read_bytes() == await client.storyboard(preview)
        assert (out / "storyboard.vtt").read_text() == await client.storyboard_vtt(preview)


async def test_cli_preview_in_process(
    tmp_path: Path, vidfly: FakeVidfly, media_server: MediaServer
) -> None:
    """Without --server the preview runs the service in-process, like a cut."""
    config = _config(tmp_path, vidfly)
    code, stdout, err = await _clip(
        media_server.url("muxed.mp4"), "--preview", "--config", str(config), cwd=tmp_path
    )
    assert code == 0, err
    assert "title: (none)" in stdout and "duration: 0:30 (30 s)" in stdout
    assert (tmp_path / "storyboard.jpg").read_bytes()[:2] == b"\xff\xd8"
    assert (tmp_path / "storyboard.vtt").read_text().startswith("WEBVTT")


async def test_cli_preview_failures(service: Service, tmp_path: Path) -> None:
    """--preview with --clip is a usage error (2); a source that cannot be resolved exits 3."""
    code, out, err = await _clip(
        "vid", "--preview", "--clip", "1-2", "--server", service.base_url, cwd=tmp_path
    )
    assert code == 2 and out == "" and "--preview" in err
    code, out, err = await _clip(
        "error500", "--preview", "--server", service.base_url, cwd=tmp_path
    )
    assert code == 3 and out == "" and "source_unavailable" in err
    assert not (tmp_path / "storyboard.jpg").exists()
