"""The web page end to end in headless Chromium (Debian's chromium, driven by Playwright).

Screenshots of the finished jobs are saved to ``test-artifacts/web-page.png`` and
``test-artifacts/web-page-key.png`` (the same with API keys configured).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MediaServer, Service, ServiceFactory

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.exists(CHROMIUM)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: scripts/check installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def _new_page(browser: Any) -> Any:
    page = await browser.new_page(viewport={"width": 1100, "height": 1200})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    return page


@pytest.mark.slow  # headless Chromium
async def test_page_cuts_plays_and_downloads(service: Service, browser: Any) -> None:
    """Typed and timeline-picked ranges are cut, followed live over SSE, played and downloadable."""
    page = await _new_page(browser)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    await page.goto(service.base_url + "/")
    assert await page.title() == "clipservice"

    await page.fill("#source", "dQw4w9WgXcQ")
    assert "video id" in await page.text_content("#source-kind")
    await page.click("details summary")
    await page.select_option("#mode", "reencode")
    await page.fill("#ranges tr:nth-child(1) .start", "1")
    await page.fill("#ranges tr:nth-child(1) .end", "0:03.5")

    # Pick 6 s – 9 s on a 30 s timeline by dragging across it.
    await page.fill("#length", "0:30")
    box = await page.locator("#timeline").bounding_box()
    y = box["y"] + box["height"] / 2
    await page.mouse.move(box["x"] + box["width"] * 0.2, y)
    await page.mouse.down()
    await page.mouse.move(box["x"] + box["width"] * 0.25, y, steps=3)
    await page.mouse.move(box["x"] + box["width"] * 0.3, y, steps=3)
    await page.mouse.up()
    assert await page.text_content("#selection-label") == "0:06 – 0:09"
    await page.click("#add-selection")
    assert await page.locator("#ranges tr").count() == 2
    assert await page.locator("#timeline-marks .mark").count() == 2

    await page.click("#submit")
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.text_content("#job-transport") == "live (server-sent events)"
    assert any(u.endswith("/events") for u in requests)
    assert await page.locator(".clip .clip-state.ok").count() == 2

    # Both clips play in the page: the browser decodes their metadata.
    videos = page.locator(".clip video")
    assert await videos.count() == 2
    for i in range(2):
        await page.wait_for_function(
            "v => v.readyState >= 1 && v.videoWidth > 0", arg=await videos.nth(i).element_handle()
        )
    durations = await videos.evaluate_all("vs => vs.map(v => v.duration)")
    assert abs(durations[0] - 2.5) < 0.1 and abs(durations[1] - 3.0) < 0.1

    links = page.locator(".clip a.download")
    first_href = await links.nth(0).get_attribute("href")
    assert first_href.startswith("/api/clips/") and await links.nth(0).get_attribute("download")
    async with page.expect_download() as info:
        await links.nth(0).click()
    download = await info.value
    saved = ARTIFACTS / "web-download.mp4"  # save_as creates the folder
    await download.save_as(saved)
    doc = await service.job((await page.text_content("#job-id")).strip())
    assert saved.stat().st_size == doc["results"][0]["size_bytes"]
    saved.unlink()

    await page.evaluate("document.querySelectorAll('video').forEach(v => v.currentTime = 1)")
    await page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
    # Nothing came from anywhere but the service itself.
    assert all(u.startswith(service.base_url) for u in requests), requests
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_page_falls_back_to_polling(
    service: Service, media_server: MediaServer, browser: Any
) -> None:
    """When the event stream is unavailable the page polls the job to its end."""
    page = await _new_page(browser)
    await page.route("**/events", lambda route: route.fulfill(status=404, body="{}"))
    await page.goto(service.base_url + "/")
    # The "stall" source holds the clip until released, so the page meets a running job.
    await page.fill("#source", "stall")
    await page.fill("#ranges tr:nth-child(1) .start", "20")
    await page.fill("#ranges tr:nth-child(1) .end", "22")
    await page.click("#submit")
    await page.wait_for_selector("#job-status.processing", timeout=60_000)
    assert await page.text_content("#job-transport") == "polling"
    media_server.unstall.set()
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.text_content("#job-transport") == "polling"
    assert await page.locator(".clip video").count() == 1
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_page_shows_problems(service: Service, browser: Any) -> None:
    """Bad input is flagged in the page; the service's 422 problem is shown with its errors."""
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    await page.click("#submit")
    assert "video id" in await page.text_content("#form-error")
    await page.fill("#source", "vid")
    await page.fill("#ranges tr:nth-child(1) .start", "5")
    await page.fill("#ranges tr:nth-child(1) .end", "3")
    await page.click("#submit")
    assert "Range 1" in await page.text_content("#form-error")
    assert await page.locator("#ranges .end.invalid").count() == 1
    # Over max_clip_duration_s: only the service knows; its problem JSON is shown.
    await page.fill("#ranges tr:nth-child(1) .end", "2:00:00")
    await page.click("#submit")
    await page.wait_for_selector("#form-error:not([hidden])")
    await page.wait_for_function(
        "document.querySelector('#form-error').textContent.includes('max_clip_duration_s')"
    )
    assert await page.locator("#job").is_hidden()
    assert page.errors == []


async def test_static_assets_and_unknown_files(service: Service) -> None:
    """GET / and the fixed assets are served with their types; any other name is a 404 problem."""
    async with service.http.get(service.base_url + "/") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        html = await resp.text()
    assert "/static/app.js" in html and "http" not in html.split("<body>")[0].replace(
        'name="viewport"', ""
    )
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        async with service.http.get(f"{service.base_url}/static/{name}") as resp:
            assert resp.status == 200 and resp.content_type == ctype
    for bad in ("index.html", "..%2Fapp.py", "nope.js"):
        async with service.http.get(f"{service.base_url}/static/{bad}") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/problem+json"


@pytest.mark.slow  # headless Chromium
async def test_page_with_api_key(make_service: ServiceFactory, browser: Any) -> None:
    """With API keys: no key shows the 401; with one, SSE via fetch, clips play and download."""
    svc = await make_service(security={"api_keys": ("k-test",)})
    page = await _new_page(browser)
    requests: list[Any] = []
    page.on("request", lambda req: requests.append(req))
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    await page.goto(svc.base_url + "/")
    await page.fill("#source", "keyedpage")
    await page.click("details summary")
    await page.select_option("#mode", "reencode")
    await page.fill("#ranges tr:nth-child(1) .start", "1")
    await page.fill("#ranges tr:nth-child(1) .end", "3.5")
    await page.click("#add-range")
    await page.fill("#ranges tr:nth-child(2) .start", "0:06")
    await page.fill("#ranges tr:nth-child(2) .end", "0:09")
    await page.click("details summary")  # closed again: the 401 must reopen it

    # No key: the service's 401 problem is shown and the page points at the key field.
    await page.click("#submit")
    await page.wait_for_selector("#form-error:not([hidden])")
    error = await page.text_content("#form-error")
    assert "Unauthorized" in error and "API key" in error and "More options" in error
    assert await page.locator("details").get_attribute("open") is not None
    assert await page.evaluate("document.activeElement.id") == "api-key"
    assert await page.locator("#job").is_hidden()

    # Record every status the page shows, to see it follow the job live.
    await page.evaluate(
        """() => {
          window.seen = [];
          const status = document.getElementById('job-status');
          new MutationObserver(() => window.seen.push(status.textContent))
            .observe(status, { childList: true, characterData: true, subtree: true });
        }"""
    )
    await page.fill("#api-key", "k-test")
    # Leaving the field asks again for the preview the 401 refused; it then fills the
    # page above the button, so wait for it to settle before clicking (a click whose
    # target moves between mouse-down and mouse-up is no click, for Chromium as for a user).
    await page.press("#api-key", "Tab")
    await page.wait_for_function(
        """() => !document.getElementById('source-info').hidden
              && document.getElementById('player').readyState >= 1
              && document.getElementById('storyboard-status').textContent === ''"""
    )
    await page.click("#submit")
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.locator("#form-error").is_hidden()
    assert await page.text_content("#job-transport") == "live (server-sent events)"
    job_id = (await page.text_content("#job-id")).strip()
    seen = await page.evaluate("window.seen")
    assert "processing" in seen and seen[-1] == "finished", seen
    assert await page.locator(".clip .clip-state.ok").count() == 2

    # The stream came through fetch() with the key header; the job was read once, not polled.
    api = [r for r in requests if "/api/" in r.url]
    streams = [r for r in api if r.url.endswith(f"/api/jobs/{job_id}/events")]
    assert [r.resource_type for r in streams] == ["fetch"]
    assert (await streams[0].all_headers()).get("x-api-key") == "k-test"
    assert not any(r.resource_type == "eventsource" for r in requests)
    job_reads = [r for r in api if r.url.endswith(f"/api/jobs/{job_id}")]
    assert len(job_reads) == 1 and not any("/api/check-job/" in r.url for r in api)

    # Both clips play from blob: URLs filled by fetching with the key.
    videos = page.locator(".clip video")
    assert await videos.count() == 2
    for i in range(2):
        await page.wait_for_function(
            "v => v.readyState >= 1 && v.videoWidth > 0", arg=await videos.nth(i).element_handle()
        )
    srcs = await videos.evaluate_all("vs => vs.map(v => v.src)")
    assert all(s.startswith("blob:") for s in srcs), srcs
    durations = await videos.evaluate_all("vs => vs.map(v => v.duration)")
    assert abs(durations[0] - 2.5) < 0.1 and abs(durations[1] - 3.0) < 0.1
    clip_gets = [r for r in api if "/api/clips/" in r.url]
    assert len(clip_gets) == 2 and all(r.resource_type == "fetch" for r in clip_gets)

    # The download link hands over the clip's exact bytes.
    link = page.locator(".clip a.download").nth(0)
    assert (await link.get_attribute("href")).startswith("blob:")
    async with page.expect_download() as info:
        await link.click()
    download = await info.value
    assert download.suggested_filename == await link.get_attribute("download")
    saved = ARTIFACTS / "web-download-key.mp4"
    await download.save_as(saved)
    name = await link.get_attribute("download")
    async with svc.http.get(
        f"{svc.base_url}/api/clips/{name}", headers={"X-API-Key": "k-test"}
    ) as resp:
        assert resp.status == 200
        assert saved.read_bytes() == await resp.read()
    saved.unlink()
    await page.evaluate("document.querySelectorAll('video').forEach(v => v.currentTime = 1)")
    await page.screenshot(path=str(ARTIFACTS / "web-page-key.png"), full_page=True)

    # The key stays out of URLs, logs and localStorage (sessionStorage keeps it for a reload).
    assert not any("k-test" in r.url for r in requests)
    assert not any("k-test" in text for text in console)
    assert await page.evaluate("localStorage.length") == 0
    await page.reload()
    assert await page.input_value("#api-key") == "k-test"
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_page_with_key_falls_back_to_polling(
    make_service: ServiceFactory, media_server: MediaServer, browser: Any
) -> None:
    """With a key and no event stream, the page polls with the key to the job's end."""
    svc = await make_service(security={"api_keys": ("k-test",)})
    page = await _new_page(browser)
    await page.route("**/events", lambda route: route.fulfill(status=404, body="{}"))
    await page.goto(svc.base_url + "/")
    # The "stall" source holds the clip until released, so the page meets a running job.
    await page.fill("#source", "stall")
    await page.click("details summary")
    await page.fill("#api-key", "k-test")
    await page.fill("#ranges tr:nth-child(1) .start", "20")
    await page.fill("#ranges tr:nth-child(1) .end", "22")
    await page.click("#submit")
    await page.wait_for_selector("#job-status.processing", timeout=60_000)
    assert await page.text_content("#job-transport") == "polling"
    media_server.unstall.set()
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.text_content("#job-transport") == "polling"
    await page.wait_for_function("document.querySelector('.clip video')?.src.startsWith('blob:')")
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_page_event_stream_parser(service: Service, browser: Any) -> None:
    """The page's text/event-stream parser handles split chunks, CRLF, comments and data lines."""
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    events = await page.evaluate(
        """() => {
          const out = [];
          const feed = eventStreamParser((e) => out.push(e));
          const chunks = ['retry: 2000\\r', '\\n\\r\\n: keep-alive\\n\\nid: 1-pro', 'cessing\\n',
            'event: job\\ndata: {"a":', '1}\\r', '\\n\\r', '\\ndata:x\\ndata: y\\n', '\\n'];
          chunks.forEach(feed);
          return out;
        }"""
    )
    assert events == [
        {"type": "job", "data": '{"a":1}', "id": "1-processing"},
        {"type": "message", "data": "x\ny", "id": "1-processing"},
    ]


@pytest.mark.slow  # headless Chromium
async def test_smart_cut_and_fast_clips_play_through_in_chromium(
    service: Service, browser: Any, media_server: MediaServer
) -> None:
    """Accurate (smart-cut, parameter sets of each part side by side in avcC) and fast clips
    decode frame by frame in Chromium from first to last frame, with no media error;
    on a B-frame source too, where the frames before the end are re-encoded as well."""
    results = []
    for body in (
        {
            "video_id": "browserplay",
            "clips": [
                {"start": 1.5, "end": 5.3, "mode": "accurate"},
                {"start": 3.1, "end": 7.0, "mode": "fast"},
            ],
        },
        {
            "video_url": media_server.url("bf-video.mp4"),
            "audio_url": media_server.url("audio.m4a"),
            "clips": [{"start": 2.5, "end": 9.2, "mode": "accurate"}],
        },
    ):
        resp = await service.create(body)
        doc = await service.wait((await resp.json())["job_id"])
        assert doc["status"] == "finished" and doc["errors"] == [], doc
        results += doc["results"]
    assert all(r["note"] is None for r in results)  # smart-cut, not re-encoded
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    for result in results:
        played = await page.evaluate(
            """async (url) => {
              const v = document.createElement('video');
              v.muted = true;
              document.body.appendChild(v);
              const ended = new Promise((ok, bad) => {
                v.addEventListener('ended', ok);
                v.addEventListener('error', () => bad(new Error('media error ' + v.error.code)));
              });
              v.src = url;
              v.playbackRate = 4;
              await v.play();
              await ended;
              const q = v.getVideoPlaybackQuality();
              const out = {duration: v.duration, frames: q.totalVideoFrames, width: v.videoWidth};
              v.remove();
              return out;
            }""",
            result["url"],
        )
        expected_frames = round(result["duration_s"] * 30)
        assert played["width"] == 320
        assert abs(played["duration"] - result["duration_s"]) < 0.1, (result, played)
        # Every frame reached the decoder (a broken join stops decoding early).
        assert played["frames"] >= expected_frames - 2, (result, played)
    assert page.errors == []
