"""The editor page in headless Chromium (Debian's chromium, driven by Playwright, as in
tests/test_web_page.py): the source's preview, the storyboard on the timeline (its
screenshot pixels against the sprite's), seeking, in and out points, frame steps, the job
and its clip played to the end; every control named and the whole flow from the keyboard.

A screenshot of the editor is saved to ``test-artifacts/web-editor.png``.
"""

from __future__ import annotations

import asyncio
import io
import math
import re
from typing import Any

import av
import pytest

from tests import test_web_page
from tests.conftest import MEDIA_SECONDS, MediaServer, Service, ServiceFactory
from tests.test_web_page import ARTIFACTS, _new_page

# The page tests' Chromium fixture, shared.
browser = test_web_page.browser
TITLE = "Test pattern, ten minutes"
GRID = 4  # a tile compared as GRID x GRID cells of mean colour
# Interactive roles in Chromium's accessibility tree (summary is a DisclosureTriangle).
INTERACTIVE_ROLES = {
    "button", "textbox", "combobox", "slider", "checkbox", "link", "spinbutton",
    "listbox", "radio", "switch", "menuitem", "tab", "DisclosureTriangle", "Video",
}  # fmt: skip


class Rgb:
    """A decoded image's RGB pixels (PNG screenshots, the JPEG sprite), with area means."""

    def __init__(self, data: bytes, fmt: str) -> None:
        with av.open(io.BytesIO(data), format=fmt) as container:
            frame = next(container.decode(video=0)).reformat(format="rgb24")
        self.width, self.height = frame.width, frame.height
        self.stride = frame.planes[0].line_size
        self.pixels = bytes(frame.planes[0])

    def mean(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float]:
        """The mean colour of the pixels whose centres lie in [x0, x1) x [y0, y1)."""
        xs = range(max(0, math.ceil(x0 - 0.5)), min(self.width, math.ceil(x1 - 0.5)))
        ys = range(max(0, math.ceil(y0 - 0.5)), min(self.height, math.ceil(y1 - 0.5)))
        sums = [0, 0, 0]
        for y in ys:
            row = y * self.stride
            for x in xs:
                for c in range(3):
                    sums[c] += self.pixels[row + 3 * x + c]
        n = max(1, len(xs) * len(ys))
        return (sums[0] / n, sums[1] / n, sums[2] / n)

    def grid(self, x0: float, y0: float, w: float, h: float) -> list[tuple[float, float, float]]:
        """Mean colours of GRID x GRID cells of the box (inset a little from its edges)."""
        inset = 0.1
        x0, y0, w, h = x0 + w * inset, y0 + h * inset, w * (1 - 2 * inset), h * (1 - 2 * inset)
        return [
            self.mean(x0 + w * i / GRID, y0 + h * j / GRID, x0 + w * (i + 1) / GRID,
                      y0 + h * (j + 1) / GRID)
            for j in range(GRID) for i in range(GRID)
        ]  # fmt: skip


async def _until(page: Any, expression: str, timeout_s: float = 30.0) -> None:
    """Wait until ``expression`` is true in the page (polled from here: the page's CSP
    forbids the eval Playwright's wait_for_function polls with)."""
    async with asyncio.timeout(timeout_s):
        while not await page.evaluate(expression):
            await asyncio.sleep(0.05)


def _distance(a: list[tuple[float, ...]], b: list[tuple[float, ...]]) -> float:
    """The largest per-channel difference between two grids."""
    return max(abs(p - q) for ca, cb in zip(a, b, strict=True) for p, q in zip(ca, cb, strict=True))


async def _load_source(page: Any, source: str) -> None:
    """Type a source, press Enter, and wait for its title and storyboard."""
    await page.fill("#source", source)
    await page.press("#source", "Enter")
    await _until(page, f"document.querySelector('#source-title').textContent === {TITLE!r}")
    await _wait_storyboard(page)


async def _wait_storyboard(page: Any) -> None:
    """Tiles are laid out and their sprite is decoded (a screenshot then shows it)."""
    await page.wait_for_selector("#storyboard .tile")
    await page.evaluate(
        """async () => {
          const tile = document.querySelector('#storyboard .tile');
          const url = /url\\("(.*)"\\)/.exec(tile.style.backgroundImage)[1];
          const img = new Image();
          img.src = url;
          await img.decode();
          await new Promise((ok) => requestAnimationFrame(() => requestAnimationFrame(ok)));
        }"""
    )


async def _wait_player(page: Any) -> None:
    await _until(page, "document.querySelector('#player').readyState >= 1")


async def _time(page: Any) -> float:
    return float(await page.evaluate("document.querySelector('#player').currentTime"))


async def _range_values(page: Any) -> list[tuple[str, str]]:
    values: list[list[str]] = await page.evaluate(
        "[...document.querySelectorAll('#ranges tr')].map(r => "
        "[r.querySelector('.start').value, r.querySelector('.end').value])"
    )
    return [(v[0], v[1]) for v in values]


async def _click_timeline(page: Any, fraction: float) -> None:
    box = await page.locator("#timeline").bounding_box()
    await page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] / 2)


async def _play_to_end(page: Any, selector: str) -> dict[str, float]:
    """Play a video element at 4x from its start to its 'ended' event."""
    return dict(
        await page.evaluate(
            """async (selector) => {
              const v = document.querySelector(selector);
              v.muted = true;
              const ended = new Promise((ok, bad) => {
                v.addEventListener('ended', ok, { once: true });
                v.addEventListener('error', () => bad(new Error('media error')), { once: true });
              });
              v.currentTime = 0;
              v.playbackRate = 4;
              await v.play();
              await ended;
              return { duration: v.duration, at: v.currentTime };
            }""",
            selector,
        )
    )


@pytest.mark.slow  # headless Chromium
async def test_editor_storyboard_seek_in_out_and_cut(
    service: Service, media_server: MediaServer, browser: Any
) -> None:
    """The preview shows title and length at once, the storyboard's pixels fill the timeline,
    a click seeks the player, i/o (and a frame step) make a range, which is cut and plays."""
    page = await _new_page(browser)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    await page.goto(service.base_url + "/")
    await _load_source(page, "editorflow")
    assert "0:30" in await page.text_content("#source-meta")
    assert await page.input_value("#length") == "0:30"

    # The timeline's tiles are the sprite's thumbnails, scaled: compare them cell by cell.
    key = await page.evaluate("preview.doc.key")
    async with service.http.get(f"{service.base_url}/api/sources/{key}/storyboard.jpg") as resp:
        sprite = Rgb(await resp.read(), "jpeg_pipe")
    async with service.http.get(f"{service.base_url}/api/sources/{key}/storyboard.vtt") as resp:
        cues = [
            tuple(int(n) for n in m.groups())
            for m in re.finditer(r"#xywh=(\d+),(\d+),(\d+),(\d+)", await resp.text())
        ]
    strip = page.locator("#storyboard")
    shot = Rgb(await strip.screenshot(), "png_pipe")
    strip_box = await strip.bounding_box()
    tiles = await page.evaluate(
        """[...document.querySelectorAll('#storyboard .tile')].map(t => {
          const r = t.getBoundingClientRect();
          return { x: r.x, w: r.width, h: r.height, cue: Number(t.dataset.cue) };
        })"""
    )
    assert len(tiles) >= 4
    for tile in tiles:
        x, y, w, h = cues[tile["cue"]]
        scale = max(tile["w"] / w, tile["h"] / h)
        seen_w, seen_h = tile["w"] / scale, tile["h"] / scale  # the part of the thumb shown
        expected = sprite.grid(x + (w - seen_w) / 2, y + (h - seen_h) / 2, seen_w, seen_h)
        shown = shot.grid(tile["x"] - strip_box["x"], 0, tile["w"], tile["h"])
        # Half the video away: another keyframe, which must not match as well.
        wx, wy, ww, wh = cues[(tile["cue"] + len(cues) // 2) % len(cues)]
        wrong = sprite.grid(wx + (ww - seen_w) / 2, wy + (wh - seen_h) / 2, seen_w, seen_h)
        assert _distance(shown, expected) < 40 < _distance(shown, wrong), tile

    # A click on the timeline seeks the player there.
    await _wait_player(page)
    await _click_timeline(page, 0.5)
    await _until(page, "Math.abs(document.querySelector('#player').currentTime - 15) < 0.05")
    left = await page.evaluate("document.querySelector('#playhead').style.left")
    assert left == "50%"

    # In at 6 s, out at 9 s: a range; a frame step and another o move its end by a frame.
    await _click_timeline(page, 0.2)
    await page.keyboard.press("i")
    assert "in 0:06" in await page.text_content("#inout-label")
    await _click_timeline(page, 0.3)
    await page.keyboard.press("o")
    assert await _range_values(page) == [("0:06", "0:09")]
    await page.keyboard.press(".")
    assert abs(await _time(page) - (9 + 1.5 / 30)) < 0.002
    await page.keyboard.press("o")
    assert await _range_values(page) == [("0:06", "0:09.05")]
    await page.keyboard.press(",")
    await page.keyboard.press(",")
    assert abs(await _time(page) - (9 - 0.5 / 30)) < 0.002
    assert await page.locator("#timeline-marks .mark").count() == 1

    await page.screenshot(path=str(ARTIFACTS / "web-editor.png"), full_page=True)
    await page.click("#submit")
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.locator(".clip .clip-state.ok").count() == 1
    await _until(page, "document.querySelector('.clip video').readyState >= 1")
    played = await _play_to_end(page, ".clip video")
    assert abs(played["duration"] - 3.05) < 0.1 and played["at"] == played["duration"]

    # The browser only ever talked to the service: the preview came through its proxy.
    assert any(f"/api/sources/{key}/preview" in u for u in requests)
    assert all(u.startswith(service.base_url) for u in requests), requests
    assert not any(media_server.base_url in u for u in requests)
    assert page.errors == []


async def _ax_nodes(page: Any) -> list[dict[str, Any]]:
    cdp = await page.context.new_cdp_session(page)
    tree = await cdp.send("Accessibility.getFullAXTree")
    nodes: list[dict[str, Any]] = tree["nodes"]
    return nodes


@pytest.mark.slow  # headless Chromium
async def test_editor_controls_have_accessible_names(service: Service, browser: Any) -> None:
    """Every interactive element of the editor (and of the finished job) has an accessible
    name, and the main controls are found by role and name."""
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    await page.click("details summary")
    await _load_source(page, "a11ynames")
    await page.fill("#ranges tr:nth-child(1) .start", "1")
    await page.fill("#ranges tr:nth-child(1) .end", "2")
    await page.click("#submit")
    await page.wait_for_selector("#job-status.finished", timeout=60_000)

    unnamed = []
    seen_roles = set()
    for node in await _ax_nodes(page):
        role = (node.get("role") or {}).get("value")
        if node.get("ignored") or role not in INTERACTIVE_ROLES:
            continue
        seen_roles.add(role)
        name = ((node.get("name") or {}).get("value") or "").strip()
        if not name:
            unnamed.append(node)
    assert unnamed == [], unnamed
    assert {"button", "textbox", "combobox", "slider", "link", "Video"} <= seen_roles

    for role, name in (
        ("textbox", "Video id, page URL or media URL"),
        ("button", "Load"),
        ("button", "Set in"),
        ("button", "Set out"),
        ("button", "Play"),
        ("button", "Frame ›"),
        ("button", "‹ Frame"),
        ("slider", "Timeline: click to seek, drag to select a range, arrow keys to seek"),
        ("textbox", "Range 1 start"),
        ("textbox", "Range 1 end"),
        ("button", "Play range 1"),
        ("button", "Remove range 1"),
        ("button", "Cut clips"),
        ("textbox", "API key (if the service asks)"),
        ("combobox", "Cut mode"),
    ):
        assert await page.get_by_role(role, name=name, exact=True).count() == 1, (role, name)
    assert await page.get_by_role("img", name=f"Cover of {TITLE}").count() == 0  # no cover here
    assert await page.get_by_label("Preview player").count() == 1
    assert await page.get_by_label("Clip 1").count() == 1
    assert page.errors == []


async def _tab_to(page: Any, element_id: str, limit: int = 80) -> None:
    """Press Tab until the element with ``element_id`` has the focus."""
    for _ in range(limit):
        if await page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached #{element_id}")


@pytest.mark.slow  # headless Chromium
async def test_editor_keyboard_only(service: Service, browser: Any) -> None:
    """The whole flow with the keyboard alone: source, preview, seek on the timeline, play,
    in and out, submit, and the clip's download."""
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    await _tab_to(page, "source")
    await page.keyboard.type("keyboardonly")
    await page.keyboard.press("Enter")
    await _until(page, f"document.querySelector('#source-title').textContent === {TITLE!r}")
    await _wait_player(page)

    await _tab_to(page, "timeline")
    await page.keyboard.press("k")  # play, then pause
    await _until(page, "!document.querySelector('#player').paused")
    await page.keyboard.press("k")
    await _until(page, "document.querySelector('#player').paused")
    await page.keyboard.press("Home")
    for _ in range(2):
        await page.keyboard.press("ArrowRight")
    assert await _time(page) == 2
    assert await page.get_attribute("#timeline", "aria-valuenow") == "2"
    await page.keyboard.press("i")
    await page.keyboard.press("Shift+ArrowRight")
    await page.keyboard.press("ArrowLeft")
    assert await _time(page) == 11
    await page.keyboard.press("o")
    assert await _range_values(page) == [("0:02", "0:11")]
    await page.keyboard.press("End")
    assert await _time(page) == MEDIA_SECONDS

    # The set-in/out buttons work from the keyboard too: a second range from 20 s to 25 s.
    await page.keyboard.press("Home")
    for _ in range(2):
        await page.keyboard.press("Shift+ArrowRight")
    await _tab_to(page, "set-in")
    await page.keyboard.press("Enter")
    await page.keyboard.press("l")  # 5 s forward
    await _tab_to(page, "set-out")
    await page.keyboard.press("Space")
    assert await _range_values(page) == [("0:02", "0:11"), ("0:20", "0:25")]

    await _tab_to(page, "submit")
    await page.keyboard.press("Enter")
    await page.wait_for_selector("#job-status.finished", timeout=60_000)
    assert await page.locator(".clip .clip-state.ok").count() == 2
    await page.wait_for_selector(".clip a.download")
    await page.evaluate("document.querySelector('.clip a.download').id = 'first-download'")
    await _tab_to(page, "first-download", limit=120)
    async with page.expect_download() as info:
        await page.keyboard.press("Enter")
    download = await info.value
    assert download.suggested_filename.endswith(".mp4")
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_editor_with_api_key(make_service: ServiceFactory, browser: Any) -> None:
    """With API keys the preview asks for one, then loads with it: storyboard, cover-less
    source and player from blob: URLs, the key never in a URL."""
    svc = await make_service(security={"api_keys": ("k-edit",)})
    page = await _new_page(browser)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    await page.goto(svc.base_url + "/")
    await page.fill("#source", "keyededitor")
    await page.press("#source", "Enter")
    await _until(page, "document.querySelector('#preview-status').textContent.includes('API key')")
    await page.click("details summary")
    await page.fill("#api-key", "k-edit")
    await page.press("#api-key", "Tab")  # leaving the field asks again, with the key
    await _until(page, f"document.querySelector('#source-title').textContent === {TITLE!r}")
    await _wait_storyboard(page)
    background = await page.evaluate(
        "document.querySelector('#storyboard .tile').style.backgroundImage"
    )
    assert background.startswith('url("blob:')
    await _until(page, "document.querySelector('#player').src.startsWith('blob:')")
    await _wait_player(page)
    assert await page.evaluate("document.querySelector('#player').duration") == pytest.approx(
        MEDIA_SECONDS, abs=0.1
    )
    assert not any("k-edit" in u for u in requests)
    assert page.errors == []


@pytest.mark.slow  # headless Chromium
async def test_output_options_follow_the_service(service: Service, browser: Any) -> None:
    """The output controls are shown exactly when the service's create-clips request accepts
    output options (its OpenAPI says so), with its choices; changed ones go in the request."""
    async with service.http.get(f"{service.base_url}/api/openapi.json") as resp:
        schemas = (await resp.json())["components"]["schemas"]
    accepted = "output" in schemas["CreateClipsRequest"]["properties"]
    page = await _new_page(browser)
    posted: list[Any] = []
    page.on(
        "request",
        lambda req: (
            posted.append(req.post_data_json) if req.url.endswith("/create-clips") else None
        ),
    )
    await page.goto(service.base_url + "/")
    await page.wait_for_selector("#output-options[data-checked]", state="attached")
    assert await page.locator("#output-options").is_visible() == accepted
    await page.fill("#source", "outputopts")
    await page.fill("#ranges tr:nth-child(1) .start", "1")
    await page.fill("#ranges tr:nth-child(1) .end", "2")
    if accepted:
        formats = schemas["OutputRequest"]["properties"]["format"]["enum"]
        options = await page.eval_on_selector_all(
            "#out-format option", "os => os.map(o => o.value)"
        )
        assert options == formats and await page.input_value("#out-format") == "mp4"
        await page.select_option("#out-format", "jpg")
    await page.click("#submit")
    await page.wait_for_selector("#job:not([hidden])", timeout=60_000)
    assert len(posted) == 1
    if accepted:
        assert posted[0]["output"] == {"format": "jpg"}
    else:
        assert "output" not in posted[0]
    assert page.errors == []


async def _cut_in_page(page: Any, source: str, **choices: str) -> str:
    """One range (1 s to 3 s) of ``source`` with the output choices given, cut; the job id."""
    await page.fill("#source", source)
    await page.fill("#ranges tr:nth-child(1) .start", "1")
    await page.fill("#ranges tr:nth-child(1) .end", "3")
    for field, value in choices.items():
        await page.select_option(f"#out-{field}", value)
    async with page.expect_response("**/api/create-clips") as created:
        await page.click("#submit")
    job_id: str = (await (await created.value).json())["job_id"]
    await page.wait_for_selector("#job-status.finished", timeout=90_000)
    assert await page.locator(".clip .clip-state.ok").count() == 1
    return job_id


@pytest.mark.slow  # headless Chromium
async def test_the_page_plays_a_vertical_clip_and_shows_a_gif(
    service: Service, browser: Any
) -> None:
    """Output options end to end in the browser: a 9:16 clip plays to its end at the
    size the job says, and a GIF clip is shown as an image Chromium decodes, at the size
    the job says."""
    page = await _new_page(browser)
    await page.goto(service.base_url + "/")
    await page.wait_for_selector("#output-options[data-checked]", state="attached")
    job_id = await _cut_in_page(page, "vertical", aspect="9:16")
    (result,) = (await service.job(job_id))["results"]
    # (9:16 of a 180-pixel-high source, both sides even: 102x180.)
    assert result["format"] == "mp4" and abs(result["width"] / result["height"] - 9 / 16) < 0.02
    await _until(page, "document.querySelector('.clip video').readyState >= 1")
    size = await page.evaluate(
        "(() => { const v = document.querySelector('.clip video');"
        " return [v.videoWidth, v.videoHeight]; })()"
    )
    assert size == [result["width"], result["height"]], (size, result)
    played = await _play_to_end(page, ".clip video")
    assert abs(played["duration"] - 2) < 0.1 and played["at"] == played["duration"]

    await page.goto(service.base_url + "/")
    await page.wait_for_selector("#output-options[data-checked]", state="attached")
    job_id = await _cut_in_page(page, "agif", format="gif")
    (result,) = (await service.job(job_id))["results"]
    assert result["format"] == "gif" and result["file"].endswith(".gif"), result
    shown = await page.evaluate(
        """async () => {
          const img = document.querySelector('.clip img');
          await img.decode();
          return { w: img.naturalWidth, h: img.naturalHeight, src: img.src };
        }"""
    )
    assert shown["src"].endswith("/api/clips/" + result["file"]), shown
    assert (shown["w"], shown["h"]) == (result["width"], result["height"]), (shown, result)
    assert page.errors == []
