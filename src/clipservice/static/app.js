// clipservice web page: submit a job, follow it live (SSE, polling as fallback), play clips.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
//
// With an API key the page cannot use what browsers fetch on their own (EventSource,
// <video src>, <a href>): none of them can send a header, and the key never goes in a URL.
// So with a key it reads the event stream through fetch() and loads each clip into a Blob;
// without one it keeps the direct, Range-friendly way.
"use strict";

const VIDEO_ID = /^[A-Za-z0-9_-]{1,64}$/;
const MEDIA_EXT = /\.(mp4|m4v|mov|mkv|webm|m4a|mp3|aac|ogg|opus|wav|flac|ts|flv|avi)$/i;
const TIME = /^(?:(\d{1,3}):([0-5]\d)|(\d{1,4})):([0-5]\d)(?:\.(\d{1,6}))?$/;
const ENDED = new Set(["finished", "failed", "cancelled"]);
const POLL_MS = 1000;
// The key lives in the field and, for reloads in the same tab, in sessionStorage; never in
// localStorage, a URL or a log.
const KEY_STORE = "clipservice.api-key";

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

function fmtTime(seconds) {
  const whole = Math.floor(seconds);
  const tenths = Math.round((seconds - whole) * 10);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const s = String(whole % 60).padStart(2, "0") + (tenths ? "." + tenths : "");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
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

// ---- ranges and the timeline ------------------------------------------------

function lengthS() {
  const s = parseTime($("length").value);
  return s > 0 ? s : 300;
}

function rangeRows() {
  return Array.from($("ranges").querySelectorAll("tr"));
}

function addRange(start, end) {
  const row = $("range-row").content.firstElementChild.cloneNode(true);
  row.querySelector(".start").value = start === undefined ? "" : fmtTime(start);
  row.querySelector(".end").value = end === undefined ? "" : fmtTime(end);
  row.querySelector(".remove").addEventListener("click", () => {
    row.remove();
    if (!rangeRows().length) addRange();
    refreshRanges();
  });
  row.querySelectorAll("input").forEach((input) => input.addEventListener("input", refreshRanges));
  $("ranges").appendChild(row);
  refreshRanges();
  return row;
}

function refreshRanges() {
  const marks = $("timeline-marks");
  marks.textContent = "";
  const total = lengthS();
  rangeRows().forEach((row, i) => {
    row.querySelector(".num").textContent = i + 1;
    const start = parseTime(row.querySelector(".start").value);
    const end = parseTime(row.querySelector(".end").value);
    if (start >= 0 && end > start) {
      const mark = document.createElement("div");
      mark.className = "mark";
      mark.style.left = `${Math.min(100, (start / total) * 100)}%`;
      mark.style.width = `${Math.max(0.4, Math.min(100, ((end - start) / total) * 100))}%`;
      const label = document.createElement("span");
      label.textContent = i + 1;
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
}

let selection = null;

function setupTimeline() {
  const timeline = $("timeline");
  const box = $("timeline-selection");
  let anchor = null;
  const timeAt = (event) => {
    const rect = timeline.getBoundingClientRect();
    const fraction = Math.min(1, Math.max(0, (event.clientX - rect.left) / rect.width));
    // Snap to tenths of a second: ranges read better and match what people type.
    return Math.round(fraction * lengthS() * 10) / 10;
  };
  const show = () => {
    const total = lengthS();
    box.hidden = !selection;
    if (!selection) return;
    box.style.left = `${(selection.start / total) * 100}%`;
    box.style.width = `${((selection.end - selection.start) / total) * 100}%`;
    $("selection-label").textContent = `${fmtTime(selection.start)} – ${fmtTime(selection.end)}`;
    $("add-selection").disabled = !(selection.end > selection.start);
  };
  timeline.addEventListener("pointerdown", (event) => {
    anchor = timeAt(event);
    selection = { start: anchor, end: anchor };
    timeline.setPointerCapture(event.pointerId);
    show();
  });
  timeline.addEventListener("pointermove", (event) => {
    if (anchor === null) return;
    const t = timeAt(event);
    selection = { start: Math.min(anchor, t), end: Math.max(anchor, t) };
    show();
  });
  const stop = () => {
    anchor = null;
  };
  timeline.addEventListener("pointerup", stop);
  timeline.addEventListener("pointercancel", stop);
  $("add-selection").addEventListener("click", () => {
    if (!selection || !(selection.end > selection.start)) return;
    // Fill an empty row first, so a fresh page does not keep a blank one.
    const empty = rangeRows().find(
      (row) => !row.querySelector(".start").value && !row.querySelector(".end").value,
    );
    if (empty) empty.remove();
    addRange(selection.start, selection.end);
    selection = null;
    show();
    $("selection-label").textContent = "no selection";
    $("add-selection").disabled = true;
  });
}

// A media URL's own length, read from its metadata, sizes the timeline.
function probeLength(fields) {
  if (!fields || !fields.video_url) return;
  const probe = document.createElement("video");
  probe.preload = "metadata";
  probe.muted = true;
  probe.addEventListener("loadedmetadata", () => {
    if (Number.isFinite(probe.duration) && probe.duration > 0) {
      $("length").value = fmtTime(probe.duration);
      drawTicks();
    }
    probe.removeAttribute("src");
  });
  probe.src = fields.video_url;
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
  const body = Object.assign({}, fields, { clips });
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
      const video = document.createElement("video");
      video.controls = true;
      video.preload = "metadata";
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
    const resp = await fetch(`/api/clips/${encodeURIComponent(result.file)}`, {
      headers: headers({ Accept: "video/mp4" }),
    });
    if (!resp.ok) {
      const problem = await resp.json().catch(() => ({}));
      throw new Error(problem.detail || problem.title || `HTTP ${resp.status}`);
    }
    const blob = await resp.blob();
    // The page moved on to another job meanwhile: this clip is no longer shown.
    if (!current || current.id !== jobId || !card.isConnected) return;
    const url = URL.createObjectURL(new Blob([blob], { type: "video/mp4" }));
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
  $("source").addEventListener("change", () => probeLength(updateKind()));
  $("length").addEventListener("input", drawTicks);
  $("add-range").addEventListener("click", () => addRange().querySelector(".start").focus());
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancelJob);
  restoreKey();
  $("api-key").addEventListener("input", rememberKey);
  setupTimeline();
  addRange();
  drawTicks();
});
