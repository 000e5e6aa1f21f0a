// clipservice web page: an editor to pick ranges, then the job followed live and its clips.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
//
// The editor asks the service for a preview of the source (GET /api/sources/preview): its
// title, cover and length at once, then a storyboard (one sprite of thumbnails and its WebVTT
// index) laid along the timeline, and a player of the low-resolution stream, which the
// service proxies: the browser only ever talks to this page's own origin.
//
// With an API key the page cannot use what browsers fetch on their own (EventSource,
// <video src>, <img src>, CSS images, <a href>): none of them can send a header, and the key
// never goes in a URL. So with a key it reads the event stream through fetch() and loads the
// clips, the preview stream, the sprite and the cover into Blobs; without one it keeps the
// direct, Range-friendly way.
"use strict";

const VIDEO_ID = /^[A-Za-z0-9_-]{1,64}$/;
const MEDIA_EXT = /\.(mp4|m4v|mov|mkv|webm|m4a|mp3|aac|ogg|opus|wav|flac|ts|flv|avi)$/i;
const TIME = /^(?:(\d{1,3}):([0-5]\d)|(\d{1,4})):([0-5]\d)(?:\.(\d{1,6}))?$/;
const ENDED = new Set(["finished", "failed", "cancelled"]);
const POLL_MS = 1000;
// The key lives in the field and, for reloads in the same tab, in sessionStorage; never in
// localStorage, a URL or a log.
const KEY_STORE = "clipservice.api-key";
// With a key the preview stream is loaded whole into memory: not past this size.
const MAX_BLOB_PREVIEW_BYTES = 300 * 1024 * 1024;
const DEFAULT_FPS = 30;
// A pointer that moves less than this between down and up clicked (seek), not dragged.
const CLICK_PX = 4;

const $ = (id) => document.getElementById(id);

// Seconds from "65.5" or "[HH:]MM:SS[.fff]"; NaN when neither.
function parseTime(text) {
  text = String(text).trim();
  if (/^\d{1,7}(\.\d{1,6})?$/.test(text)) return Number(text);
  const m = TIME.exec(text);
  if (!m) return NaN;
  const hours = Number(m[1] || 0);
  const minutes = Number(m[2] || m[3]);
  return hours * 3600 + minutes * 60 + Number(m[4]) + (m[5] ? Number("0." + m[5]) : 0);
}

function clock(whole, fraction) {
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0") + fraction;
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

// 1:05.5 (tenths when there are some): labels and ranges picked by dragging.
function fmtTime(seconds) {
  const tenths = Math.round(Math.max(0, seconds) * 10);
  return clock(Math.floor(tenths / 10), tenths % 10 ? "." + (tenths % 10) : "");
}

// 1:05.033 (milliseconds, trailing zeros dropped): in and out points, to the frame.
function fmtExact(seconds) {
  const ms = Math.round(Math.max(0, seconds) * 1000);
  const frac = String(ms % 1000).padStart(3, "0").replace(/0+$/, "");
  return clock(Math.floor(ms / 1000), frac ? "." + frac : "");
}

// The same rule as `clipservice clip`: an id, a media URL (by extension or with an
// audio URL) or a page URL for the resolver.
function classify(source, audioUrl) {
  source = source.trim();
  if (!source) return { kind: "", fields: null };
  if (!source.includes("://")) {
    return VIDEO_ID.test(source)
      ? { kind: "video id", fields: { video_id: source } }
      : { kind: "not a video id or an http(s) URL", fields: null };
  }
  let url;
  try {
    url = new URL(source);
  } catch {
    return { kind: "not a valid URL", fields: null };
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    return { kind: "only http(s) URLs", fields: null };
  }
  if (audioUrl || MEDIA_EXT.test(url.pathname)) {
    const fields = { video_url: source };
    if (audioUrl) fields.audio_url = audioUrl;
    return { kind: "media URL, cut directly", fields };
  }
  return { kind: "page URL, resolved by the service", fields: { url: source } };
}

function apiKey() {
  return $("api-key").value.trim();
}

// Only ever used for requests to this page's own origin (relative URLs).
function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  const key = apiKey();
  if (key) h["X-API-Key"] = key;
  return h;
}

function rememberKey() {
  try {
    if (apiKey()) sessionStorage.setItem(KEY_STORE, apiKey());
    else sessionStorage.removeItem(KEY_STORE);
  } catch {
    // Storage may be disabled; the key then lasts as long as the field.
  }
}

function restoreKey() {
  try {
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) {
      $("api-key").value = key;
      // Show that a remembered key is in use rather than sending it unseen.
      $("api-key").closest("details").open = true;
    }
  } catch {
    // As above: no storage, no remembered key.
  }
}

// A same-origin resource as a URL the browser can load by itself: the path itself without
// a key, else a blob: URL of it fetched with the key (kept in `owned` to be revoked later).
async function loadable(path, owned, accept, maxBytes) {
  if (!apiKey()) return path;
  const resp = await fetch(path, { headers: headers({ Accept: accept }) });
  if (!resp.ok) {
    const problem = await resp.json().catch(() => ({}));
    throw new Error(problem.detail || problem.title || `HTTP ${resp.status}`);
  }
  const size = Number(resp.headers.get("Content-Length") || 0);
  if (maxBytes && size > maxBytes) {
    await resp.body?.cancel();
    throw new Error(`too large to load with an API key (${Math.round(size / 1e6)} MB)`);
  }
  const url = URL.createObjectURL(await resp.blob());
  owned.push(url);
  return url;
}

// ---- the source's preview ---------------------------------------------------------

// What the editor shows of the current source; replaced whole when the source changes.
let preview = {
  token: 0, // bumped per load: answers of an older load are dropped
  signature: "", // the source fields it was asked for
  ok: false,
  needsKey: false,
  doc: null, // the service's SourcePreview
  board: null, // { sprite, cues, width, height }
  owned: [], // blob: URLs to revoke
  fps: DEFAULT_FPS,
};

function previewStatus(text, isError) {
  const status = $("preview-status");
  status.textContent = text;
  status.classList.toggle("error-text", Boolean(isError));
}

function problemText(problem, status) {
  let text = problem.title || `HTTP ${status}`;
  if (problem.detail) text += `: ${problem.detail}`;
  for (const err of problem.errors || []) {
    const loc = (err.loc || []).filter((p) => p !== "query" && p !== "body").join(".");
    text += ` (${loc ? loc + ": " : ""}${err.msg})`;
  }
  return text;
}

function resetPreview() {
  preview.owned.forEach((url) => URL.revokeObjectURL(url));
  const token = preview.token + 1;
  preview = {
    token, signature: "", ok: false, needsKey: false, doc: null, board: null, owned: [],
    fps: DEFAULT_FPS,
  };
  $("source-info").hidden = true;
  $("cover").hidden = true;
  $("cover").removeAttribute("src");
  const player = $("player");
  player.pause();
  player.removeAttribute("src");
  player.load();
  $("player-empty").hidden = false;
  $("storyboard").textContent = "";
  $("storyboard-status").textContent = "";
  return token;
}

async function loadPreview(force) {
  const { fields } = classify($("source").value, $("audio-url").value.trim());
  if (!fields) return;
  const signature = JSON.stringify(fields);
  if (!force && signature === preview.signature && (preview.ok || !preview.needsKey)) return;
  const token = resetPreview();
  preview.signature = signature;
  previewStatus("Looking the video up…");
  let resp;
  let data;
  try {
    resp = await fetch(`/api/sources/preview?${new URLSearchParams(fields)}`, {
      headers: headers(),
    });
    data = await resp.json().catch(() => ({ title: `HTTP ${resp.status}` }));
  } catch (err) {
    if (token === preview.token) previewStatus(`Could not reach the service: ${err}`, true);
    return;
  }
  if (token !== preview.token) return;
  if (!resp.ok) {
    preview.needsKey = resp.status === 401;
    let text = `No preview: ${problemText(data, resp.status)}`;
    if (preview.needsKey) text += " Enter an API key under “More options”.";
    previewStatus(text, true);
    return;
  }
  preview.ok = true;
  preview.doc = data;
  showSource(data);
  previewStatus("");
  loadPlayer(data, token);
  loadStoryboard(data, token);
}

function streamText(stream) {
  const parts = [stream.codec || stream.kind];
  if (stream.width && stream.height) parts.push(`${stream.width}×${stream.height}`);
  else if (stream.height) parts.push(`${stream.height}p`);
  if (stream.fps) parts.push(`${stream.fps} fps`);
  return parts.join(" ");
}

function showSource(doc) {
  $("source-title").textContent = doc.title || "Untitled video";
  const meta = [];
  if (doc.duration_s) meta.push(fmtTime(doc.duration_s));
  if (doc.video) meta.push(`video ${streamText(doc.video)}`);
  if (doc.audio) meta.push(`audio ${streamText(doc.audio)}`);
  $("source-meta").textContent = meta.join(" · ");
  $("source-info").hidden = false;
  const fps = (doc.preview && doc.preview.fps) || (doc.video && doc.video.fps);
  preview.fps = fps > 0 ? fps : DEFAULT_FPS;
  if (doc.duration_s > 0) {
    $("length").value = fmtTime(doc.duration_s);
    drawTicks();
  }
  if (doc.cover_url) {
    const token = preview.token;
    const path = `/api/sources/${doc.key}/cover`;
    loadable(path, preview.owned, "image/*")
      .then((url) => {
        if (token !== preview.token) return;
        const cover = $("cover");
        cover.alt = `Cover of ${doc.title || "the video"}`;
        cover.src = url;
        cover.onload = () => (cover.hidden = false);
        cover.onerror = () => (cover.hidden = true);
      })
      .catch(() => {}); // no cover: nothing to show
  }
}

async function loadPlayer(doc, token) {
  const player = $("player");
  try {
    const url = await loadable(
      `/api/sources/${doc.key}/preview`, preview.owned, "video/*", MAX_BLOB_PREVIEW_BYTES,
    );
    if (token !== preview.token) return;
    player.src = url;
    $("player-empty").hidden = true;
  } catch (err) {
    if (token === preview.token) previewStatus(`The preview cannot play: ${err.message}`, true);
  }
}

// The storyboard's WebVTT index: [{ start, end, x, y, w, h, target }].
function parseVtt(text) {
  const seconds = (stamp) => stamp.split(":").reduce((total, part) => total * 60 + Number(part), 0);
  const cues = [];
  const lines = text.split(/\r\n|\n|\r/);
  for (let i = 0; i < lines.length - 1; i++) {
    const times = /^([\d:.]+)\s+-->\s+([\d:.]+)/.exec(lines[i]);
    const where = /^(.*)#xywh=(\d+),(\d+),(\d+),(\d+)\s*$/.exec(lines[i + 1]);
    if (!times || !where) continue;
    cues.push({
      start: seconds(times[1]), end: seconds(times[2]), target: where[1],
      x: Number(where[2]), y: Number(where[3]), w: Number(where[4]), h: Number(where[5]),
    });
  }
  return cues;
}

async function loadStoryboard(doc, token) {
  const status = $("storyboard-status");
  status.textContent = "Making the storyboard…";
  const vttPath = `/api/sources/${doc.key}/storyboard.vtt`;
  try {
    const resp = await fetch(vttPath, { headers: headers({ Accept: "text/vtt" }) });
    if (!resp.ok) {
      const problem = await resp.json().catch(() => ({}));
      throw new Error(problemText(problem, resp.status));
    }
    const cues = parseVtt(await resp.text());
    if (!cues.length) throw new Error("the storyboard is empty");
    // The cues name the sprite relative to the VTT's own URL.
    const spritePath = new URL(cues[0].target, new URL(vttPath, location.href)).pathname;
    const sprite = await loadable(spritePath, preview.owned, "image/jpeg");
    if (token !== preview.token) return;
    preview.board = {
      sprite,
      cues,
      width: Math.max(...cues.map((c) => c.x + c.w)),
      height: Math.max(...cues.map((c) => c.y + c.h)),
    };
    status.textContent = "";
    renderStoryboard();
  } catch (err) {
    if (token === preview.token) status.textContent = `No storyboard: ${err.message}`;
  }
}

function cueAt(seconds) {
  const cues = preview.board.cues;
  return cues.find((c) => seconds < c.end) || cues[cues.length - 1];
}

// Paint `cue`'s thumbnail into `el` (w × h pixels), scaled to cover it and centred.
function paintThumb(el, cue, w, h) {
  const board = preview.board;
  const scale = Math.max(w / cue.w, h / cue.h);
  el.style.backgroundImage = `url("${board.sprite}")`;
  el.style.backgroundSize = `${board.width * scale}px ${board.height * scale}px`;
  const x = -cue.x * scale - (cue.w * scale - w) / 2;
  const y = -cue.y * scale - (cue.h * scale - h) / 2;
  el.style.backgroundPosition = `${x}px ${y}px`;
}

// As many tiles as fit the timeline at the thumbnails' aspect, each the storyboard's
// thumbnail for the middle of the time it spans.
function renderStoryboard() {
  const strip = $("storyboard");
  strip.textContent = "";
  if (!preview.board) return;
  const width = strip.clientWidth;
  const height = strip.clientHeight;
  if (!width || !height) return;
  const first = preview.board.cues[0];
  const count = Math.max(1, Math.round(width / (height * (first.w / first.h))));
  const total = lengthS();
  for (let i = 0; i < count; i++) {
    const tile = document.createElement("div");
    tile.className = "tile";
    tile.style.left = `${(i / count) * 100}%`;
    tile.style.width = `${100 / count}%`;
    const cue = cueAt(((i + 0.5) * total) / count);
    tile.dataset.cue = String(preview.board.cues.indexOf(cue));
    paintThumb(tile, cue, width / count, height);
    strip.appendChild(tile);
  }
}

// ---- the player and the playhead ------------------------------------------------------

// Where the editor is: the player's time once it has loaded, else a cursor of its own (the
// timeline and the in/out points work without a playable preview too).
let cursorS = 0;

function playerReady() {
  const player = $("player");
  return Boolean(player.currentSrc) && player.readyState >= 1;
}

function nowS() {
  return playerReady() ? $("player").currentTime : cursorS;
}

function seek(seconds) {
  const t = Math.min(lengthS(), Math.max(0, seconds));
  cursorS = t;
  if (playerReady()) $("player").currentTime = t;
  showPlayhead();
}

function showPlayhead() {
  const t = nowS();
  const total = lengthS();
  $("playhead").style.left = `${Math.min(100, (t / total) * 100)}%`;
  $("time-label").textContent = `${fmtExact(t)} / ${fmtTime(total)}`;
  const timeline = $("timeline");
  timeline.setAttribute("aria-valuenow", String(Math.round(t * 1000) / 1000));
  timeline.setAttribute("aria-valuetext", `${fmtExact(t)} of ${fmtTime(total)}`);
}

// One frame from the current one (the preview's frame rate): the time is put in the middle
// of the target frame, so rounding never shows its neighbour.
function stepFrame(direction) {
  const player = $("player");
  if (!player.paused) player.pause();
  const frame = 1 / preview.fps;
  const index = Math.floor(nowS() / frame + 1e-6) + direction;
  seek(Math.max(0, index) * frame + frame / 2);
}

function togglePlay() {
  const player = $("player");
  if (!playerReady()) return;
  if (player.paused) player.play().catch(() => {});
  else player.pause();
}

function setupPlayer() {
  const player = $("player");
  let frame = 0;
  const follow = () => {
    showPlayhead();
    frame = player.paused ? 0 : requestAnimationFrame(follow);
  };
  player.addEventListener("play", () => {
    $("play").textContent = "Pause";
    frame = requestAnimationFrame(follow);
  });
  player.addEventListener("pause", () => {
    $("play").textContent = "Play";
    cancelAnimationFrame(frame);
    showPlayhead();
  });
  ["timeupdate", "seeked", "seeking"].forEach((type) => player.addEventListener(type, showPlayhead));
  player.addEventListener("loadedmetadata", () => {
    // A source whose preview did not say its length: the stream does.
    if (!(preview.doc && preview.doc.duration_s > 0) && Number.isFinite(player.duration)) {
      $("length").value = fmtTime(player.duration);
      drawTicks();
    }
    if (cursorS > 0) player.currentTime = cursorS;
    showPlayhead();
  });
  $("play").addEventListener("click", togglePlay);
  $("frame-back").addEventListener("click", () => stepFrame(-1));
  $("frame-forward").addEventListener("click", () => stepFrame(1));
}

// ---- ranges, in and out points, and the timeline ----------------------------------------

function lengthS() {
  const s = parseTime($("length").value);
  return s > 0 ? s : 300;
}

function rangeRows() {
  return Array.from($("ranges").querySelectorAll("tr"));
}

function emptyRow() {
  return rangeRows().find(
    (row) => !row.querySelector(".start").value && !row.querySelector(".end").value,
  );
}

function addRange(start, end, format) {
  const fmt = format || fmtTime;
  const row = $("range-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".start").value = start === undefined ? "" : fmt(start);
  row.querySelector(".end").value = end === undefined ? "" : fmt(end);
  row.querySelector(".remove").addEventListener("click", () => {
    const next = row.nextElementSibling || row.previousElementSibling;
    row.remove();
    if (!rangeRows().length) addRange();
    refreshRanges();
    // Keep the keyboard where it was: on the neighbouring row.
    (next && next.isConnected ? next : rangeRows()[0]).querySelector(".start").focus();
  });
  row.querySelector(".play-range").addEventListener("click", () => playRange(row));
  row.querySelectorAll("input").forEach((input) => input.addEventListener("input", refreshRanges));
  $("ranges").appendChild(row);
  refreshRanges();
  return row;
}

// Play one range of the preview from its start, pausing at its end.
function playRange(row) {
  const start = parseTime(row.querySelector(".start").value);
  const end = parseTime(row.querySelector(".end").value);
  if (!(start >= 0 && end > start)) return;
  seek(start);
  const player = $("player");
  if (!playerReady()) return;
  const stop = () => {
    if (player.currentTime >= end) {
      player.pause();
      player.removeEventListener("timeupdate", stop);
    }
  };
  player.addEventListener("timeupdate", stop);
  player.addEventListener("pause", () => player.removeEventListener("timeupdate", stop), {
    once: true,
  });
  player.play().catch(() => {});
}

function refreshRanges() {
  const marks = $("timeline-marks");
  marks.textContent = "";
  const total = lengthS();
  rangeRows().forEach((row, i) => {
    const n = i + 1;
    row.querySelector(".num").textContent = n;
    row.querySelector(".start").setAttribute("aria-label", `Range ${n} start`);
    row.querySelector(".end").setAttribute("aria-label", `Range ${n} end`);
    row.querySelector(".play-range").setAttribute("aria-label", `Play range ${n}`);
    row.querySelector(".remove").setAttribute("aria-label", `Remove range ${n}`);
    const start = parseTime(row.querySelector(".start").value);
    const end = parseTime(row.querySelector(".end").value);
    if (start >= 0 && end > start) {
      const mark = document.createElement("div");
      mark.className = "mark";
      mark.style.left = `${Math.min(100, (start / total) * 100)}%`;
      mark.style.width = `${Math.max(0.4, Math.min(100, ((end - start) / total) * 100))}%`;
      const label = document.createElement("span");
      label.textContent = n;
      mark.appendChild(label);
      marks.appendChild(mark);
    }
  });
}

function drawTicks() {
  const ticks = $("timeline-ticks");
  ticks.textContent = "";
  const total = lengthS();
  for (let i = 0; i <= 10; i += 2) {
    const tick = document.createElement("span");
    tick.style.left = `${i * 10}%`;
    if (i === 10) tick.style.transform = "translateX(-100%)";
    tick.textContent = fmtTime((total * i) / 10);
    ticks.appendChild(tick);
  }
  $("timeline").setAttribute("aria-valuemax", String(total));
  refreshRanges();
  renderStoryboard();
  showPlayhead();
}

// In and out points: `i` marks where a range starts; `o` where it ends, which adds the range
// (into an empty row if there is one). Another `o` before the next `i` moves that range's end.
const marking = { in: null, row: null };

function showInOut(message) {
  const label = $("inout-label");
  if (message) {
    label.textContent = message;
    return;
  }
  const row = marking.row && marking.row.isConnected ? marking.row : null;
  const out = row ? row.querySelector(".end").value : "—";
  label.textContent = `in ${marking.in === null ? "—" : fmtExact(marking.in)}, out ${out}`;
  const mark = $("in-mark");
  mark.hidden = marking.in === null;
  if (marking.in !== null) mark.style.left = `${(marking.in / lengthS()) * 100}%`;
}

function setIn() {
  marking.in = nowS();
  marking.row = null;
  showInOut();
}

function setOut() {
  const t = nowS();
  const start = marking.in === null ? 0 : marking.in;
  if (!(t > start)) {
    showInOut(`The out point (${fmtExact(t)}) must come after the in point (${fmtExact(start)}).`);
    return;
  }
  marking.in = start;
  let row = marking.row && marking.row.isConnected ? marking.row : null;
  if (row) {
    row.querySelector(".end").value = fmtExact(t);
    refreshRanges();
  } else {
    const empty = emptyRow();
    if (empty) empty.remove();
    row = addRange(start, t, fmtExact);
    marking.row = row;
  }
  showInOut();
}

let selection = null;

function setupTimeline() {
  const timeline = $("timeline");
  const box = $("timeline-selection");
  const hover = $("hover-thumb");
  let anchor = null;
  let downX = 0;
  let dragged = false;
  const timeAt = (event) => {
    const rect = timeline.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
    // Snap to tenths of a second: ranges read better and match what people type.
    return Math.round(fraction * lengthS() * 10) / 10;
  };
  const show = () => {
    const total = lengthS();
    box.hidden = !selection;
    if (!selection) {
      $("selection-label").textContent = "no selection";
      $("add-selection").disabled = true;
      return;
    }
    box.style.left = `${(selection.start / total) * 100}%`;
    box.style.width = `${((selection.end - selection.start) / total) * 100}%`;
    $("selection-label").textContent = `${fmtTime(selection.start)} – ${fmtTime(selection.end)}`;
    $("add-selection").disabled = !(selection.end > selection.start);
  };
  timeline.addEventListener("pointerdown", (event) => {
    anchor = timeAt(event);
    downX = event.clientX;
    dragged = false;
    timeline.setPointerCapture(event.pointerId);
  });
  timeline.addEventListener("pointermove", (event) => {
    showHover(event);
    if (anchor === null) return;
    if (!dragged && Math.abs(event.clientX - downX) < CLICK_PX) return;
    dragged = true;
    const t = timeAt(event);
    selection = { start: Math.min(anchor, t), end: Math.max(anchor, t) };
    show();
  });
  timeline.addEventListener("pointerup", (event) => {
    if (anchor !== null && !dragged) seek(timeAt(event)); // a click: seek there
    anchor = null;
  });
  timeline.addEventListener("pointercancel", () => {
    anchor = null;
  });
  timeline.addEventListener("pointerleave", () => {
    hover.hidden = true;
  });
  // The thumbnail under the pointer, above the timeline.
  const showHover = (event) => {
    if (!preview.board) return;
    const rect = timeline.getBoundingClientRect();
    const x = Math.min(rect.width, Math.max(0, event.clientX - rect.left));
    const t = (x / rect.width) * lengthS();
    const cue = cueAt(t);
    paintThumb(hover, cue, cue.w, cue.h);
    hover.style.width = `${cue.w}px`;
    hover.style.height = `${cue.h}px`;
    hover.style.left = `${Math.min(rect.width - cue.w, Math.max(0, x - cue.w / 2))}px`;
    hover.firstElementChild.textContent = fmtTime(t);
    hover.hidden = false;
  };
  timeline.addEventListener("keydown", (event) => {
    const big = event.shiftKey ? 10 : 1;
    const moves = {
      ArrowRight: nowS() + big,
      ArrowUp: nowS() + big,
      ArrowLeft: nowS() - big,
      ArrowDown: nowS() - big,
      PageUp: nowS() + lengthS() / 10,
      PageDown: nowS() - lengthS() / 10,
      Home: 0,
      End: lengthS(),
    };
    if (!(event.key in moves) || event.altKey || event.ctrlKey || event.metaKey) return;
    event.preventDefault();
    seek(moves[event.key]);
  });
  $("add-selection").addEventListener("click", () => {
    if (!selection || !(selection.end > selection.start)) return;
    // Fill an empty row first, so a fresh page does not keep a blank one.
    const empty = emptyRow();
    if (empty) empty.remove();
    addRange(selection.start, selection.end);
    selection = null;
    show();
  });
  if (window.ResizeObserver) new ResizeObserver(() => renderStoryboard()).observe(timeline);
}

// Editing keys anywhere on the page except while typing in a field.
function setupShortcuts() {
  const actions = {
    i: setIn,
    o: setOut,
    ",": () => stepFrame(-1),
    ".": () => stepFrame(1),
    j: () => seek(nowS() - 5),
    l: () => seek(nowS() + 5),
    k: togglePlay,
  };
  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.ctrlKey || event.metaKey || event.defaultPrevented) return;
    const target = event.target;
    if (target.closest && target.closest("input, select, textarea, [contenteditable]")) return;
    const action = actions[event.key.length === 1 ? event.key.toLowerCase() : ""];
    if (!action) return;
    event.preventDefault();
    action();
  });
  $("set-in").addEventListener("click", setIn);
  $("set-out").addEventListener("click", setOut);
}

// ---- output options (issue 14) ------------------------------------------------------

const OUTPUT_LABELS = {
  mp4: "mp4 (video)", m4a: "m4a (audio only)", mp3: "mp3 (audio only)",
  gif: "gif (animated)", webp: "webp (animated)", jpg: "jpg (one frame)", png: "png (one frame)",
  source: "as the source", crop: "crop", pad: "pad (bars)", blur: "blur (blurred fill)",
};
const OUTPUT_CHOICES = ["format", "aspect", "fit"];
// What the service's create-clips request accepts: { defaults: {field: value}, merge: bool }.
let outputSchema = null;

// The output controls are shown only when the service's create-clips request accepts them
// (its OpenAPI document says so), with the choices its schema lists.
async function setupOutputOptions() {
  try {
    await detectOutputOptions();
  } finally {
    $("output-options").dataset.checked = "true"; // (the tests wait for it)
  }
}

async function detectOutputOptions() {
  let doc;
  try {
    const resp = await fetch("/api/openapi.json", { headers: headers() });
    if (!resp.ok) return;
    doc = await resp.json();
  } catch {
    return;
  }
  const schemas = (doc.components || {}).schemas || {};
  const request = (schemas.CreateClipsRequest || {}).properties || {};
  const refOf = (prop) =>
    [prop, ...((prop && prop.anyOf) || [])].map((p) => p && p.$ref).find(Boolean);
  const ref = refOf(request.output);
  const output = ref ? (schemas[ref.split("/").pop()] || {}).properties || {} : {};
  const found = { defaults: {}, merge: Boolean(request.merge && request.merge.type === "boolean") };
  for (const field of OUTPUT_CHOICES) {
    const values = output[field] && output[field].enum;
    if (!Array.isArray(values) || !values.length) continue;
    const select = $(`out-${field}`);
    select.replaceChildren(
      ...values.map((value) => new Option(OUTPUT_LABELS[value] || value, value)),
    );
    found.defaults[field] = output[field].default ?? values[0];
    select.value = found.defaults[field];
    $(`out-${field}-box`).hidden = false;
  }
  $("out-merge-box").hidden = !found.merge;
  const any = Object.keys(found.defaults).length > 0 || found.merge;
  $("output-options").hidden = !any;
  outputSchema = any ? found : null;
}

// The job-wide output fields of the request: the options changed from their defaults.
function outputFields() {
  if (!outputSchema) return {};
  const fields = {};
  const output = {};
  for (const [field, fallback] of Object.entries(outputSchema.defaults)) {
    const value = $(`out-${field}`).value;
    if (value && value !== fallback) output[field] = value;
  }
  if (Object.keys(output).length) fields.output = output;
  if (outputSchema.merge && $("out-merge").checked) fields.merge = true;
  return fields;
}

const MEDIA_TYPES = {
  mp4: "video/mp4", webm: "video/webm", m4a: "audio/mp4", mp3: "audio/mpeg",
  gif: "image/gif", webp: "image/webp", jpg: "image/jpeg", png: "image/png",
};

// A result's format (its output options), from the document or the file's extension.
function formatOf(result) {
  return (result.format || (result.file || "").split(".").pop() || "mp4").toLowerCase();
}

// The element that shows a clip of `format`: a video, an audio player or an image.
function mediaFor(format, name) {
  const kind = MEDIA_TYPES[format] ? MEDIA_TYPES[format].split("/")[0] : "video";
  const el = document.createElement(kind === "image" ? "img" : kind);
  if (kind === "image") el.alt = name;
  else {
    el.controls = true;
    el.preload = "metadata";
    el.setAttribute("aria-label", name);
  }
  return el;
}

// ---- submitting -----------------------------------------------------------------

function showProblem(target, problem) {
  const lines = [problem.title || "Error"];
  if (problem.detail) lines[0] += `: ${problem.detail}`;
  for (const err of problem.errors || []) {
    const loc = (err.loc || []).filter((p) => p !== "body").join(".");
    lines.push(`• ${loc ? loc + ": " : ""}${err.msg}`);
  }
  target.textContent = lines.join("\n");
  target.hidden = false;
}

// The service wants a key: say where to give it and open that field.
function askForKey(target) {
  target.textContent +=
    "\n" +
    (apiKey()
      ? "Check the API key under “More options”."
      : "This service needs an API key: enter it under “More options”.");
  $("api-key").closest("details").open = true;
  $("api-key").focus();
}

async function submit(event) {
  event.preventDefault();
  const formError = $("form-error");
  formError.hidden = true;
  const { fields } = classify($("source").value, $("audio-url").value.trim());
  const problems = [];
  $("source").classList.toggle("invalid", !fields);
  if (!fields) problems.push("Give a video id, a page URL or a media URL.");
  const clips = [];
  rangeRows().forEach((row, i) => {
    const startInput = row.querySelector(".start");
    const endInput = row.querySelector(".end");
    if (!startInput.value && !endInput.value && rangeRows().length > 1) return;
    const start = parseTime(startInput.value);
    const end = parseTime(endInput.value);
    const bad = !(start >= 0) || !(end > start);
    startInput.classList.toggle("invalid", !(start >= 0));
    endInput.classList.toggle("invalid", bad);
    if (bad) problems.push(`Range ${i + 1}: give a start before its end.`);
    else clips.push({ start, end });
  });
  if (!clips.length && !problems.length) problems.push("Add at least one range.");
  if (problems.length) {
    formError.textContent = problems.join("\n");
    formError.hidden = false;
    return;
  }
  const body = Object.assign({}, fields, { clips }, outputFields());
  if ($("mode").value) body.mode = $("mode").value;
  $("submit").disabled = true;
  try {
    const resp = await fetch("/api/create-clips", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    const data = await resp.json().catch(() => ({ title: `HTTP ${resp.status}` }));
    if (!resp.ok) {
      showProblem(formError, data);
      if (resp.status === 401) askForKey(formError);
      return;
    }
    await follow(data.job_id);
  } catch (err) {
    formError.textContent = `Could not reach the service: ${err}`;
    formError.hidden = false;
  } finally {
    $("submit").disabled = false;
  }
}

// ---- following a job ----------------------------------------------------------------

let current = null; // { id, source, abort, timer }
let objectUrls = []; // Blob URLs of the clips shown; revoked when they are replaced

async function fetchJob(id) {
  const resp = await fetch(`/api/jobs/${id}`, { headers: headers() });
  const data = await resp.json();
  if (!resp.ok) throw Object.assign(new Error(data.title || "error"), { problem: data });
  return data;
}

async function follow(id) {
  stopFollowing();
  current = { id, source: null, abort: null, timer: null };
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("clips").textContent = "";
  $("reel").replaceChildren();
  $("reel").hidden = true;
  delete $("reel").dataset.state;
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  $("job-error").hidden = true;
  const doc = await fetchJob(id);
  render(doc);
  if (ENDED.has(doc.status)) return;
  // EventSource cannot send an API key header: with a key, read the stream with fetch().
  if (apiKey() && window.ReadableStream && window.AbortController) stream(id);
  else if (window.EventSource && !apiKey()) listen(id);
  else poll(id);
}

function stopFollowing() {
  if (!current) return;
  if (current.source) current.source.close();
  if (current.abort) current.abort.abort();
  if (current.timer) clearTimeout(current.timer);
  current = null;
}

function listen(id) {
  const source = new EventSource(`/api/jobs/${id}/events`);
  current.source = source;
  $("job-transport").textContent = "live (server-sent events)";
  source.addEventListener("job", (event) => {
    const doc = JSON.parse(event.data);
    render(doc);
    if (ENDED.has(doc.status)) source.close();
  });
  source.addEventListener("error", () => {
    // No stream here (404/405) or it broke: fall back to polling until the end.
    if (!current || current.id !== id || current.source !== source) return;
    source.close();
    current.source = null;
    poll(id);
  });
}

// A text/event-stream parser (the WHATWG rules): feed it decoded text, it calls
// onEvent({ type, data, id }) for every complete event. Comments, retry and unknown
// fields are skipped.
function eventStreamParser(onEvent) {
  let buffer = "";
  let data = [];
  let type = "";
  let lastId = "";
  const line = (text) => {
    if (text === "") {
      if (data.length) onEvent({ type: type || "message", data: data.join("\n"), id: lastId });
      data = [];
      type = "";
      return;
    }
    if (text.startsWith(":")) return;
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") type = value;
    else if (field === "id" && !value.includes("\0")) lastId = value;
  };
  return (text) => {
    buffer += text;
    // A trailing CR may be the first half of CRLF: keep it until the next chunk.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\n|\r/);
    buffer = lines.pop() + buffer.slice(cut);
    lines.forEach(line);
  };
}

// The job's events through fetch(), so the API key goes in a header. Any failure, or a
// stream that ends before the job does, falls back to polling, as with EventSource.
async function stream(id) {
  const abort = new AbortController();
  current.abort = abort;
  $("job-transport").textContent = "live (server-sent events)";
  const mine = () => current && current.id === id && current.abort === abort;
  let ended = false;
  try {
    const resp = await fetch(`/api/jobs/${id}/events`, {
      headers: headers({ Accept: "text/event-stream" }),
      cache: "no-store",
      signal: abort.signal,
    });
    const type = resp.headers.get("Content-Type") || "";
    if (!resp.ok || !resp.body || !type.startsWith("text/event-stream")) {
      throw new Error(`no event stream (HTTP ${resp.status})`);
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const feed = eventStreamParser((event) => {
      if (event.type !== "job" || !mine()) return;
      const doc = JSON.parse(event.data);
      render(doc);
      if (ENDED.has(doc.status)) ended = true;
    });
    while (!ended && mine()) {
      const { done, value } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
    }
    // The service closes the stream after the terminal event; stop reading either way.
    await reader.cancel().catch(() => {});
  } catch {
    // Aborted by stopFollowing, refused (4xx/5xx) or broken: handled below.
  }
  if (!mine()) return;
  current.abort = null;
  if (!ended) poll(id);
}

function poll(id) {
  $("job-transport").textContent = "polling";
  const tick = async () => {
    if (!current || current.id !== id) return;
    try {
      const doc = await fetchJob(id);
      render(doc);
      if (ENDED.has(doc.status)) return;
    } catch (err) {
      if (err.problem && err.problem.status === 404) {
        showProblem($("job-error"), err.problem);
        return;
      }
    }
    current.timer = setTimeout(tick, POLL_MS);
  };
  tick();
}

function clipCard(index, spec) {
  let card = document.querySelector(`#clips li[data-index="${index}"]`);
  if (card) return card;
  card = $("clip-card").content.firstElementChild.cloneNode(true);
  card.dataset.index = index;
  card.querySelector(".clip-title").textContent =
    `Clip ${index + 1} · ${fmtTime(spec.start)}–${fmtTime(spec.end)}`;
  $("clips").appendChild(card);
  return card;
}

function setState(card, state, cls) {
  const badge = card.querySelector(".clip-state");
  badge.textContent = state;
  badge.className = `badge clip-state ${cls || state}`;
}

function render(doc) {
  const status = $("job-status");
  status.textContent = doc.status;
  status.className = `badge ${doc.status}`;
  $("job-bar").style.width = `${Math.round(doc.progress * 100)}%`;
  const done = doc.results.length;
  $("job-summary").textContent =
    `${doc.processed} of ${doc.total} clips processed · ${done} ready · ` +
    `${doc.errors.length} failed · ${Math.round(doc.progress * 100)}%`;
  $("cancel").hidden = ENDED.has(doc.status);
  if (doc.error) showProblem($("job-error"), { title: doc.error.code, detail: doc.error.message });
  const byIndex = new Map();
  doc.results.forEach((r) => byIndex.set(r.index, { result: r }));
  doc.errors.forEach((e) => byIndex.set(e.index, { error: e }));
  (doc.clips || []).forEach((spec) => {
    const card = clipCard(spec.index, spec);
    const bar = card.querySelector(".clip-bar");
    const info = card.querySelector(".clip-info");
    const outcome = byIndex.get(spec.index);
    if (outcome && outcome.result) {
      if (card.dataset.state === "ok") return;
      card.dataset.state = "ok";
      const r = outcome.result;
      setState(card, "ready", "ok");
      bar.className = "clip-bar";
      bar.style.width = "100%";
      info.textContent =
        `${(r.size_bytes / 1e6).toFixed(1)} MB · ${r.duration_s.toFixed(2)} s · ` +
        `from ${fmtTime(r.actual_start)} to ${fmtTime(r.actual_end)} · ${r.mode}` +
        (r.note ? ` · ${r.note}` : "");
      const media = card.querySelector(".clip-media");
      const video = mediaFor(formatOf(r), `Clip ${r.index + 1}`);
      const link = document.createElement("a");
      link.className = "download";
      link.download = r.file;
      link.textContent = `Download ${r.file}`;
      media.replaceChildren(video, link);
      if (apiKey()) loadClip(card, r, video, link);
      else {
        // Direct: the browser streams the clip itself, with Range requests.
        video.src = r.url;
        link.href = r.url;
      }
    } else if (outcome && outcome.error) {
      card.dataset.state = "error";
      setState(card, outcome.error.code, "bad");
      bar.className = "clip-bar";
      bar.style.width = "0%";
      info.textContent = outcome.error.message;
    } else if (doc.status === "processing") {
      setState(card, "cutting");
      bar.className = "clip-bar indeterminate";
    } else {
      setState(card, doc.status === "pending" ? "queued" : doc.status);
    }
  });
  renderReel(doc);
}

// The job's clips joined into one file (a request with merge), once it is made.
function renderReel(doc) {
  const box = $("reel");
  const reel = doc.reel;
  if (!reel) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  if (box.dataset.state === "ok") return;
  if (reel.error) {
    box.dataset.state = "error";
    box.replaceChildren(`Reel: ${reel.error.code}: ${reel.error.message}`);
    return;
  }
  if (!reel.url) {
    box.replaceChildren(ENDED.has(doc.status) ? "Reel: not made" : "Reel: joining the clips…");
    return;
  }
  box.dataset.state = "ok";
  const title = document.createElement("strong");
  title.textContent = "Reel";
  const info = document.createElement("p");
  info.className = "clip-info hint";
  info.textContent =
    `${reel.clips.length} clips joined · ${(reel.size_bytes / 1e6).toFixed(1)} MB · ` +
    `${reel.duration_s.toFixed(2)} s`;
  const video = mediaFor(formatOf(reel), "Reel");
  const link = document.createElement("a");
  link.className = "download";
  link.download = reel.file;
  link.textContent = `Download ${reel.file}`;
  box.replaceChildren(title, info, video, link);
  if (apiKey()) loadClip(box, reel, video, link);
  else {
    video.src = reel.url;
    link.href = reel.url;
  }
}

// With a key the browser cannot fetch the clip on its own: fetch it with the header
// (from this page's own origin, whatever public_url says) and show it as a Blob URL.
async function loadClip(card, result, video, link) {
  const info = card.querySelector(".clip-info");
  const text = info.textContent;
  const jobId = current && current.id;
  link.hidden = true;
  info.textContent = `${text} · loading…`;
  try {
    const type = MEDIA_TYPES[formatOf(result)] || "application/octet-stream";
    const resp = await fetch(`/api/clips/${encodeURIComponent(result.file)}`, {
      headers: headers({ Accept: type }),
    });
    if (!resp.ok) {
      const problem = await resp.json().catch(() => ({}));
      throw new Error(problem.detail || problem.title || `HTTP ${resp.status}`);
    }
    const blob = await resp.blob();
    // The page moved on to another job meanwhile: this clip is no longer shown.
    if (!current || current.id !== jobId || !card.isConnected) return;
    const url = URL.createObjectURL(new Blob([blob], { type }));
    objectUrls.push(url);
    video.src = url;
    link.href = url;
    link.hidden = false;
    info.textContent = text;
  } catch (err) {
    if (!card.isConnected) return;
    info.textContent = `${text} · could not load the clip: ${err.message}`;
  }
}

async function cancelJob() {
  if (!current) return;
  const resp = await fetch(`/api/jobs/${current.id}`, { method: "DELETE", headers: headers() });
  if (resp.status === 200) render(await resp.json());
}


// ---- start ---------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  const updateKind = () => {
    const { kind, fields } = classify($("source").value, $("audio-url").value.trim());
    $("source-kind").textContent = kind ? `Read as: ${kind}` : "\u00a0";
    $("source").classList.remove("invalid");
    return fields;
  };
  $("source").addEventListener("input", updateKind);
  $("audio-url").addEventListener("input", updateKind);
  // A new source is looked up when the field is left or Enter is pressed in it (Enter
  // there loads the preview rather than submitting the job).
  $("source").addEventListener("change", () => loadPreview(false));
  $("audio-url").addEventListener("change", () => loadPreview(false));
  $("source").addEventListener("keydown", (event) => {
    if (event.key !== "Enter") return;
    event.preventDefault();
    updateKind();
    loadPreview(true);
  });
  $("load-source").addEventListener("click", () => loadPreview(true));
  $("length").addEventListener("input", drawTicks);
  $("add-range").addEventListener("click", () => addRange().querySelector(".start").focus());
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelJob);
  restoreKey();
  $("api-key").addEventListener("input", rememberKey);
  // A preview refused for want of a key is asked again once one is given.
  $("api-key").addEventListener("change", () => {
    if (preview.needsKey) loadPreview(true);
    if (!outputSchema) setupOutputOptions();
  });
  setupOutputOptions();
  setupPlayer();
  setupTimeline();
  setupShortcuts();
  addRange();
  drawTicks();
  showInOut();
});
