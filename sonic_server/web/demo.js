// The demo page: builds its parameter controls from /api/sonic/params, submits an async job,
// follows it through the job's Server-Sent Events (read with fetch, so an API key can be sent;
// polling when the server has no stream to spare), and plays the video. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "canceled"];
const KEY_KEY = "sonic.apiKey";
const state = { audio: null, audioName: null, params: {}, job: null, following: null };

// localStorage may be blocked or hold anything: every use goes through these
function load(name) {
  try { return localStorage.getItem(name); } catch (e) { return null; }
}
function store(name, value) {
  try {
    if (value === null) localStorage.removeItem(name); else localStorage.setItem(name, value);
  } catch (e) { /* storage blocked: the page works without it */ }
}

function authHeaders() {
  const key = load(KEY_KEY);
  return key ? { Authorization: "Bearer " + key } : {};
}

async function jsonOf(resp) {
  try { return await resp.json(); } catch (e) { return null; }
}

// ---- errors: the server's message, next to the field it names -----------------------------
function clearErrors() {
  document.querySelectorAll(".error, .status").forEach((p) => { p.textContent = ""; });
  document.querySelectorAll(".invalid").forEach((el) => el.classList.remove("invalid"));
  document.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

function showError(err) {
  let message = (err && err.message) || "the request failed";
  let field = err && err.field;
  if (err && err.code === "unauthorized") {  // the key is what the person can change: said at its field
    field = "api-key";
    message = load(KEY_KEY) ? "this API key is not accepted: check it, or ask for a new one"
      : "this server asks for an API key: enter it here";
  }
  let box = field ? $("error-" + field) : null;
  if (!box) box = $("error-form");
  box.textContent = message;
  if (field && $("field-" + field)) {
    $("field-" + field).classList.add("invalid");
    const input = $(field) || $("param-" + field);
    if (input) input.setAttribute("aria-invalid", "true");
    if ($("param-" + field)) $("params-box").open = true;
  }
  box.scrollIntoView({ block: "nearest" });
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return body.error;
  } catch (e) { /* not JSON */ }
  return { message: `the server answered ${resp.status}` };
}

// what a screen reader hears: a status line changed only when there is news (not every figure)
function announce(text) { $("announce").textContent = text; }

// ---- parameters, from the server's own description ----------------------------------------
async function loadParams() {
  let resp;
  try {
    resp = await fetch("/api/sonic/params", { headers: authHeaders() });
  } catch (e) {
    showError({ message: "the server cannot be reached" });
    return;
  }
  if (!resp.ok) { showError(await errorOf(resp)); return; }
  const spec = await jsonOf(resp);
  if (!spec) { showError({ message: "the server's parameter list could not be read" }); return; }
  state.params = spec.parameters || {};
  const box = $("params");
  box.textContent = "";
  for (const [name, p] of Object.entries(state.params)) {
    const field = document.createElement("div");
    field.className = "field param";
    field.id = "field-" + name;
    const label = document.createElement("label");
    label.htmlFor = "param-" + name;
    label.textContent = name.replace(/_/g, " ");
    let input;
    if (p.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = p.default === true;
    } else if (Array.isArray(p.enum)) {
      input = document.createElement("select");
      if (p.default === null || p.default === undefined) input.append(new Option("(default)", ""));
      for (const v of p.enum) input.append(new Option(String(v), String(v), false, v === p.default));
    } else {
      input = document.createElement("input");
      if (p.type === "integer" || p.type === "number") {
        input.type = "number";
        input.step = p.type === "integer" ? "1" : "any";
        if (p.minimum !== null && p.minimum !== undefined) input.min = p.minimum;
        if (p.maximum !== null && p.maximum !== undefined) input.max = p.maximum;
      } else {
        input.type = "text";
      }
      input.placeholder = p.default === null || p.default === undefined ? "(default)" : String(p.default);
      if (p.default !== null && p.default !== undefined) input.value = String(p.default);
    }
    input.id = "param-" + name;
    input.dataset.param = name;
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.id = "hint-" + name;
    const range = p.minimum !== null && p.minimum !== undefined && p.maximum !== null && p.maximum !== undefined
      ? ` (${p.minimum} to ${p.maximum})` : "";
    // the description is what the parameter means for the server's decoder (/api/sonic/params)
    const ignored = p.honoured === false ? " Not used by this server's decoder." : "";
    hint.textContent = (p.description || "") + range + ignored;
    const err = document.createElement("p");
    err.className = "error";
    err.id = "error-" + name;
    err.setAttribute("role", "alert");
    input.setAttribute("aria-describedby", `hint-${name} error-${name}`);
    if (p.type === "boolean") {
      label.prepend(input);
      field.append(label, hint, err);
    } else {
      field.append(label, input, hint, err);
    }
    box.append(field);
  }
}

function config() {
  const cfg = {};
  document.querySelectorAll("[data-param]").forEach((input) => {
    const name = input.dataset.param;
    const p = state.params[name];
    let value;
    if (input.type === "checkbox") value = input.checked;
    else if (input.value === "") return;
    else if (p.type === "integer") value = Number(input.value);
    else if (p.type === "number") value = Number(input.value);
    else value = input.value;
    if (p.type === "integer" && !Number.isInteger(value)) value = input.value;   // the server names it
    if (value !== p.default) cfg[name] = value;
  });
  cfg.async = true;
  return cfg;
}

// ---- inputs: pick, drop, record -------------------------------------------------------------
function wireDrop(zone, input) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });
}

function showImagePreview() {
  const file = $("image").files[0];
  const img = $("preview");
  $("error-image").textContent = "";
  if (!file) { img.hidden = true; return; }
  img.onerror = () => {  // no broken picture: say why there is none (the server will say more)
    img.hidden = true;
    $("error-image").textContent = "this file does not open as a picture: choose a JPEG, PNG or WebP photo";
  };
  img.src = URL.createObjectURL(file);
  img.hidden = false;
}

function useAudioFile() {
  const file = $("audio").files[0];
  if (!file) return;
  state.audio = file;
  state.audioName = file.name;
  $("audio-preview").src = URL.createObjectURL(file);
  $("audio-preview").hidden = false;
  $("record-state").textContent = "";
}

let recorder = null;
async function toggleRecording() {
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    $("record-state").textContent = "recording needs a secure page (https or localhost) and a microphone";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    $("record-state").textContent = "no microphone, or it was not allowed";
    return;
  }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
  recorder.onstop = () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    state.audio = new Blob(chunks, { type });
    state.audioName = "recording." + (type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm");
    $("audio").value = "";
    $("audio-preview").src = URL.createObjectURL(state.audio);
    $("audio-preview").hidden = false;
    $("record").textContent = "Record again";
    $("record-state").textContent = "recorded";
  };
  recorder.start();
  $("record").textContent = "Stop recording";
  $("record-state").textContent = "recording...";
}

// ---- a job: submit, follow, cancel, show ----------------------------------------------------
const STAGE_WORDS = {  // the job's stages as a person says them
  uploading: "uploading", queued: "waiting for its turn", processing: "starting", decode: "reading the files",
  face: "finding the face", audio: "listening to the speech", motion: "planning the motion",
  render: "drawing the frames", done: "done",
};

function setProgress(body) {
  const pct = Math.round((body.progress || 0) * 100);
  if (body.stage !== $("stage").textContent) announce(`Making the video: ${STAGE_WORDS[body.stage] || body.stage}`);
  $("bar").style.width = pct + "%";
  $("progress").setAttribute("aria-valuenow", String(pct));
  $("progress").setAttribute("aria-valuetext", `${body.stage}: ${pct}%`);
  $("stage").textContent = body.stage;
  $("percent").textContent = pct + "%";
}

function busy(on) {
  const focused = document.activeElement;
  $("submit").disabled = on;
  $("cancel").hidden = !on;
  $("progress-box").hidden = false;
  // a disabled or hidden button drops the keyboard's focus to the page's start: it moves on to
  // the button that now does something (Cancel while the job runs, then Make the video again)
  // (preventScroll: a pointer user whose click left no focus is not scrolled to the button)
  if (on && focused === $("submit")) $("cancel").focus({ preventScroll: true });
  else if (!on && (focused === $("cancel") || focused === document.body)) $("submit").focus({ preventScroll: true });
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const image = $("image").files[0];
  if (!image) { showError({ field: "image", message: "choose a portrait photo" }); return; }
  if (!state.audio) { showError({ field: "audio", message: "choose or record a speech recording" }); return; }
  const form = new FormData();
  form.append("image", image, image.name);
  form.append("audio", state.audio, state.audioName || "audio");
  form.append("config", JSON.stringify(config()));
  $("result").hidden = true;
  setProgress({ progress: 0, stage: "uploading" });
  busy(true);
  let resp;
  try {
    resp = await fetch("/api/sonic/generate", { method: "POST", body: form, headers: authHeaders() });
  } catch (e) {
    busy(false);
    showError({ message: "the server cannot be reached" });
    return;
  }
  const body = (resp.headers.get("Content-Type") || "").includes("json") ? await jsonOf(resp) : null;
  if (resp.status === 200 && body && body.success) {            // a cached result
    refreshJobs();
    finish({ ...body, status: "succeeded", progress: 1, stage: "succeeded" });
    return;
  }
  if (resp.status !== 202 || !body) {
    busy(false);
    $("progress-box").hidden = true;
    showError(body && body.error ? body.error : { message: `the server answered ${resp.status}` });
    return;
  }
  state.job = body.job_id;
  refreshJobs();
  setProgress(body);
  follow(body.job_id);
}

const STALL_MS = 45000;      // the server sends a keep-alive every 15 s: this much silence is a dead stream

// server-sent events, read with fetch (EventSource cannot send an API key); CR, LF or CRLF lines
async function follow(jobId) {
  const ctrl = new AbortController();
  state.following = ctrl;
  let stall = setTimeout(() => ctrl.abort(), STALL_MS);
  try {
    const resp = await fetch(`/api/sonic/jobs/${jobId}/events`, { headers: authHeaders(), signal: ctrl.signal });
    if (resp.ok && resp.body) {
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        clearTimeout(stall);
        stall = setTimeout(() => ctrl.abort(), STALL_MS);
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(l.startsWith("data: ") ? 6 : 5)).join("\n");
          if (!data) continue;
          let body;
          try { body = JSON.parse(data); } catch (e) { continue; }
          if (!body.status) { ctrl.abort(); break; }          // an error event: poll below
          setProgress(body);
          if (TERMINAL.includes(body.status)) { finish(body); return; }
        }
        if (ctrl.signal.aborted) break;
      }
    }
  } catch (e) {
    /* refused, dropped or stalled: poll below */
  } finally {
    clearTimeout(stall);
  }
  poll(jobId);
}

// the job's status every second (or after the server's Retry-After, on 429 and 503); a refusal
// that will not pass (401, 404...) ends the wait
async function poll(jobId) {
  for (;;) {
    let wait = 1000;
    try {
      const resp = await fetch(`/api/sonic/jobs/${jobId}`, { headers: authHeaders() });
      const body = await jsonOf(resp);
      if (resp.ok && body && body.status) {
        setProgress(body);
        if (TERMINAL.includes(body.status)) { finish(body); return; }
      } else if (resp.status >= 400 && resp.status < 500 && resp.status !== 429) {
        busy(false);
        showError((body && body.error) || { message: `the job's status could not be read (${resp.status})` });
        return;
      }
      const after = Number(resp.headers.get("Retry-After"));
      if (after > 0) wait = Math.min(after, 30) * 1000;
    } catch (e) { /* the network: try again */ }
    await new Promise((r) => setTimeout(r, wait));
  }
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    const resp = await fetch(`/api/sonic/jobs/${state.job}/cancel`, { method: "POST", headers: authHeaders() });
    if (!resp.ok) showError(await errorOf(resp));  // an ended job is answered 200, as it is
  } catch (e) {
    showError({ message: "the cancel did not reach the server; try again" });
  } finally {
    $("cancel").disabled = false;
  }
}

function figure(list, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function finish(body) {
  busy(false);
  state.job = null;
  refreshJobs();
  if (body.status === "canceled") {  // what the person asked for: a status, not an error
    $("progress-box").hidden = true;
    $("status-form").textContent = "the video was canceled";
    announce("");
    return;
  }
  if (body.status !== "succeeded") {
    $("progress-box").hidden = true;
    announce("");
    showError(body.error || { message: `the job ended: ${body.status}` });
    return;
  }
  setProgress({ progress: 1, stage: "done" });
  $("video").src = body.video_url;
  $("download").href = body.video_url;
  const figs = $("figures");
  figs.textContent = "";
  figure(figs, "duration", `${body.duration} s, ${body.frames} frames at ${body.fps} fps`);
  figure(figs, "size", `${body.width} x ${body.height}`);
  if (body.lipsync_offset_ms !== undefined && body.lipsync_offset_ms !== null) {
    figure(figs, "lip-sync offset", `${body.lipsync_offset_ms} ms`);
  }
  if (body.timings) {
    const t = body.timings;
    const parts = Object.entries(t).filter(([k]) => k !== "total").map(([k, v]) => `${k} ${v} s`).join(", ");
    figure(figs, "time", `${t.total} s (${parts})`);
  }
  figure(figs, "seed", String(body.seed));
  if (body.cached) figure(figs, "cached", "yes: the same inputs were made before");
  (body.warnings || []).forEach((w) => figure(figs, "note", w));
  $("result").hidden = false;
  announce("Your video is ready");
  $("result-title").focus();  // the keyboard's next Tab reaches the player
}

// ---- your recent videos, as the server lists them (GET /api/sonic/jobs: this key's own) ----------
let jobsAsked = 0;  // only the latest answer is shown (the key may change while one is on its way)
async function refreshJobs() {
  const asked = ++jobsAsked;
  let body = null;
  try {
    const resp = await fetch("/api/sonic/jobs?limit=10", { headers: authHeaders() });
    if (resp.ok) body = await jsonOf(resp);  // else (a key is needed): no list, not the last key's
  } catch (e) { return; /* offline: the list stays as it is */ }
  if (asked === jobsAsked) renderJobs(body && Array.isArray(body.jobs) ? body.jobs : []);
}

function renderJobs(jobs) {
  const list = $("history");
  list.textContent = "";
  const shown = jobs.filter((j) => j && typeof j === "object" && typeof j.job_id === "string");
  $("history-box").hidden = shown.length === 0;
  for (const job of shown) {
    const li = document.createElement("li");
    const when = typeof job.created === "number" ? new Date(job.created * 1000).toLocaleString() : "";
    if (job.status === "succeeded" && typeof job.video_url === "string" && /^(https?:)?\//.test(job.video_url)) {
      const a = document.createElement("a");
      a.href = job.video_url;
      a.textContent = `${when}: video`;
      li.append(a);
    } else {
      li.append(`${when}: ${String(job.status)}`);
    }
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete-job";
    del.textContent = "Delete";
    del.setAttribute("aria-label", `Delete the video of ${when}`);
    del.addEventListener("click", () => deleteJob(job.job_id, job.status));
    li.append(" ", del);
    list.append(li);
  }
}

async function deleteJob(jobId, status) {
  const running = !TERMINAL.includes(status);
  if (!window.confirm(running ? "Stop this video and delete it?" : "Delete this video? It cannot be undone.")) return;
  const list = $("history");
  const at = [...list.querySelectorAll(".delete-job")].indexOf(document.activeElement);
  try {
    const resp = await fetch(`/api/sonic/jobs/${encodeURIComponent(jobId)}`, { method: "DELETE", headers: authHeaders() });
    if (!resp.ok && resp.status !== 404) showError(await errorOf(resp));
  } catch (e) {
    showError({ message: "the server could not be reached" });
  }
  await refreshJobs();
  // the list is drawn again: the keyboard's focus goes to the item now in that place, or the list
  if (at >= 0) {
    const buttons = list.querySelectorAll(".delete-job");
    const next = buttons[Math.min(at, buttons.length - 1)];
    if (next) next.focus();
    else if (!$("history-box").hidden) $("history-title").focus();
    else $("submit").focus();
  }
}

// ---- start ------------------------------------------------------------------------------------
$("api-key").value = load(KEY_KEY) || "";
$("api-key").addEventListener("keydown", (e) => {  // Enter keeps the key (its change, once); it does not send the form
  if (e.key === "Enter") { e.preventDefault(); $("api-key").blur(); }
});
$("api-key").addEventListener("change", () => {
  const key = $("api-key").value.trim();
  store(KEY_KEY, key || null);
  clearErrors();
  loadParams();
  refreshJobs();
});
$("image").addEventListener("change", showImagePreview);
$("audio").addEventListener("change", useAudioFile);
wireDrop($("drop-image"), $("image"));
wireDrop($("drop-audio"), $("audio"));
$("record").addEventListener("click", toggleRecording);
$("form").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
refreshJobs();
loadParams();
