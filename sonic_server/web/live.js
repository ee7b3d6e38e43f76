// The demo page's Live mode: a WebRTC session with the server (POST /api/sonic/live with the
// portrait, the parameters and the offer), the microphone as the portrait's speech, a file sent
// as speech, Stop; the session's latency and frame rate shown while it runs. Uses demo.js's
// helpers ($, authHeaders, config, showError, clearErrors, errorOf, jsonOf).
"use strict";

const live = { pc: null, mic: null, id: null, timer: null, frames: null, state: null, stoppedAt: -1e9, opening: null, warned: false };
const AFTER_STOP_MS = 1000;  // Start takes Stop's place (and focus): a double press must not reopen the microphone
const GATHER_MS = 3000;  // the server takes the offer with its candidates in it (no trickle)
// a session's end as its 404 names it (ended_reason), in the page's words
const ENDED_BECAUSE = {
  client_closed: "it was ended from elsewhere",
  client_gone: "the connection was lost",
  max_session: "it reached the server's time limit for a session",
  credit_exhausted: "the account's credit ran out",
  server_stopping: "the server is stopping",
  worker_lost: "the server that ran it stopped answering",
  error: "it failed on the server",
};

function liveUrl(tail) { return "/api/sonic/live/" + live.id + (tail || ""); }

function liveShown(running) {
  // the pressed button hides: the keyboard's focus moves to the one shown in its place
  const moveFocus = [$("live-start"), $("live-stop"), document.body].includes(document.activeElement);
  $("live-start").hidden = running;
  $("live-stop").hidden = !running;
  $("live-video").hidden = !running;
  $("live-speak").hidden = !running;
  $("live-figures").hidden = !running;
  if (moveFocus) $(running ? "live-stop" : "live-start").focus({ preventScroll: true });
  if (!running && live.state) $("live-announce").textContent = "Live: ended";  // the last news is the end
}

function liveError(message) { $("error-live").textContent = message; }

async function gathered(pc) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, GATHER_MS);
  });
}

async function rtcConfiguration() {
  // the server's STUN and TURN servers, credentials included: behind a NAT or a firewall the page
  // reaches the server only through a TURN server it knows itself
  const resp = await fetch("/api/sonic/live/rtc-configuration", { headers: authHeaders() });
  if (!resp.ok) throw new Error((await errorOf(resp)).message);
  const body = await jsonOf(resp);
  if (!body || typeof body.rtc_configuration !== "object") throw new Error("the server's RTC configuration was not JSON");
  return body.rtc_configuration;
}

async function startLive() {
  if (performance.now() - live.stoppedAt < AFTER_STOP_MS) return;
  clearErrors();
  liveError("");
  const image = $("image").files[0];
  if (!image) { showError({ field: "image", message: "choose a portrait first" }); return; }
  $("live-start").disabled = true;
  $("live-start").textContent = "Starting…";  // the photo's upload and the face's preparation take seconds
  $("live-announce").textContent = "Live: starting";
  try {
    const rtcConfig = await rtcConfiguration();  // before the microphone is asked for: a refusal needs none
    try {
      // a page not served over https (or from localhost) has no navigator.mediaDevices at all
      if (!navigator.mediaDevices) throw new DOMException("this page is not secure", "SecurityError");
      live.mic = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true, noiseSuppression: true } });
    } catch (e) {
      live.mic = null;
      const why = window.isSecureContext ? e.name : "the microphone needs a secure page: https, or http://localhost";
      liveError("the microphone is not available (" + why + "): the portrait will speak only the files you send");
    }
    const pc = live.pc = new RTCPeerConnection(rtcConfig);
    pc.addTransceiver("video", { direction: "recvonly" });
    if (live.mic) pc.addTrack(live.mic.getAudioTracks()[0], live.mic);
    else pc.addTransceiver("audio", { direction: "recvonly" });
    const remote = new MediaStream();
    // the face's sound is what it says, the microphone included: heard back ~0.25 s late it
    // makes speaking hard, so it starts muted while the microphone is on (controls unmute it)
    $("live-video").muted = Boolean(live.mic);
    pc.addEventListener("track", (e) => {
      remote.addTrack(e.track);
      $("live-video").srcObject = remote;
    });
    pc.addEventListener("connectionstatechange", () => {
      // (an old connection, kept open a moment after Stop, is not the session now running)
      if (pc.connectionState === "failed" && live.pc === pc) { liveError("the connection to the server failed"); stopLive(); }
    });
    let turnError = "";  // what a TURN server answered, if it refused (401) or did not answer (701)
    pc.addEventListener("icecandidateerror", (e) => { turnError = ` (${e.url}: ${e.errorCode} ${e.errorText})`; });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    if (rtcConfig.iceTransportPolicy === "relay" && !/ typ relay/.test(pc.localDescription.sdp)) {
      // relayed media only, and no relay address: no connection can be made
      throw new Error("this server relays its media through a TURN server, which gave this browser no relay address"
        + turnError + ": it cannot be reached from here, or refused the credentials");
    }
    const form = new FormData();
    form.append("image", image);
    const cfg = config();
    delete cfg.async;
    form.append("config", JSON.stringify(cfg));
    form.append("offer", JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type }));
    // a page left while the photo is still being sent aborts it (pagehide), and no session opens; once the
    // server has it all, the session opens and waits out its idle timeout (the page never learns its id)
    live.opening = new AbortController();
    const resp = await fetch("/api/sonic/live", { method: "POST", body: form, headers: authHeaders(), signal: live.opening.signal });
    live.opening = null;
    if (!resp.ok) {
      const err = await errorOf(resp);
      if (err.field === "image" || (err.field && $("param-" + err.field))) showError(err);
      else liveError(err.message);
      closeLive();
      return;
    }
    const body = await jsonOf(resp);
    live.id = body.session_id;
    await pc.setRemoteDescription(body.answer);
    // the server ends a session by closing its transport: the page asks why at once, where the
    // connection's own state would say "disconnected" seconds later and the video would freeze
    const transport = pc.getReceivers()[0].transport;
    if (transport) {
      transport.addEventListener("statechange", () => {
        if (transport.state === "closed" && live.pc === pc) refreshLive();
      });
    }
    liveShown(true);
    $("live-video").scrollIntoView({ block: "nearest" });  // on a phone it is below the screen, where it stays paused
    playLive();
    live.frames = live.state = null;
    live.warned = false;
    live.timer = setInterval(refreshLive, 1000);
  } catch (e) {
    live.opening = null;
    liveError("the live session could not start: " + e.message);
    const id = live.id;  // a session the server opened, whose answer the browser could not take
    closeLive();
    if (id) endOnServer(id);
  } finally {
    $("live-start").disabled = false;
    $("live-start").textContent = "Start live";
  }
}

// The video plays with sound only within a moment of the tap that started it (a phone's rule,
// and a desktop's for a page not yet played with): after a slow start the browser refuses, and
// the face would sit paused. It then plays muted, and the page says how to hear it.
async function playLive() {
  const video = $("live-video");
  $("live-muted").hidden = true;
  try {
    await video.play();
  } catch (e) {
    if (e.name !== "NotAllowedError" || video.muted) return;
    video.muted = true;
    let words = "The browser played the face muted (it plays sound only right after a tap).";
    try { await video.play(); } catch (again) { words = "The browser did not start the face: press Play."; }
    $("live-muted-words").textContent = words;
    $("live-muted").hidden = false;
    $("live-announce").textContent = "Live: " + words;
  }
}

function unmuteLive() {  // a tap: the browser now plays it, with sound
  const video = $("live-video");
  video.muted = false;
  video.play().catch(() => { /* its controls remain */ });
  $("live-muted").hidden = true;
  $("live-stop").focus({ preventScroll: true });  // the pressed button is gone: focus stays in the session's controls
}

async function refreshLive() {
  if (!live.id) return;
  let resp;
  try { resp = await fetch(liveUrl(), { headers: authHeaders() }); } catch (e) { return; }
  if (resp.status === 404) {
    const reason = ENDED_BECAUSE[(await errorOf(resp)).ended_reason];
    liveError("the session has ended" + (reason ? ": " + reason : ""));
    closeLive();
    return;
  }
  if (!resp.ok) return;
  const s = await jsonOf(resp);
  if (!s) return;
  const now = performance.now();
  if (s.state !== live.state) {  // news, not each second's figures; the muted face's note stays said while shown
    const note = $("live-muted").hidden ? "" : " " + $("live-muted-words").textContent;
    $("live-announce").textContent = `Live: ${s.state}.${note}`;
  }
  live.state = s.state;
  $("live-state").textContent = s.state + (s.queued_s > 0 ? ` (${s.queued_s.toFixed(1)} s queued)` : "");
  $("live-latency").textContent = s.latency_ms === null ? "–" : Math.round(s.latency_ms) + " ms at the server";
  if (live.frames) {
    const rate = (s.frames_sent - live.frames.count) / ((now - live.frames.at) / 1000);
    $("live-fps").textContent = rate.toFixed(1) + " fps";
  }
  live.frames = { count: s.frames_sent, at: now };
  $("live-late").textContent = String(s.late_frames);
  // the server falling behind (its state's warning) is said once, where errors are shown
  if (s.warning && !live.warned) { live.warned = true; liveError(s.warning); }
  $("live-network").textContent = networkWords(s.network);
}

// what this browser's own reports said of the video: a choppy picture with packets lost is the
// network, with late frames growing it is the server
function networkWords(net) {
  if (!net || net.round_trip_ms === null) return "–";
  const lost = net.packets_lost === 1 ? "1 packet lost" : `${net.packets_lost} packets lost`;
  const resent = net.packets_resent ? ` (${net.packets_resent} sent again)` : "";
  const rate = net.video_kbps ? `, video ${net.video_kbps} kbit/s` : "";
  return `${Math.round(net.round_trip_ms)} ms round trip, ${lost}${resent}${rate}`;
}

function closeLive() {
  $("live-muted").hidden = true;
  if (live.timer) clearInterval(live.timer);
  if (live.pc) live.pc.close();
  if (live.mic) live.mic.getTracks().forEach((t) => t.stop());
  live.pc = live.mic = live.timer = null;
  live.id = null;
  liveShown(false);
}

async function stopLive() {
  live.stoppedAt = performance.now();
  const { id, pc } = live;
  live.pc = null;  // closed below, after the DELETE; its close is then no news to the page
  closeLive();
  if (id) {
    // the DELETE first, then the connection's close: the server ends the session as its
    // client's (client_closed), not as a connection lost (client_gone)
    await Promise.race([endOnServer(id), new Promise((resolve) => setTimeout(resolve, 2000))]);
  }
  if (pc) pc.close();
}

// the session's DELETE (kept alive past the page's end); refused or lost, the server ends it on
// its own once the connection is gone
function endOnServer(id) {
  return fetch("/api/sonic/live/" + id, { method: "DELETE", headers: authHeaders(), keepalive: true }).catch(() => {});
}

async function sendSpeech() {
  const file = $("live-file").files[0];
  if (!file || !live.id) { liveError("choose a recording to send"); return; }
  liveError("");
  const form = new FormData();
  form.append("audio", file);
  const resp = await fetch(liveUrl("/speak"), { method: "POST", body: form, headers: authHeaders() });
  if (!resp.ok) liveError((await errorOf(resp)).message);
}

async function interruptLive() {
  if (live.id) await fetch(liveUrl("/interrupt"), { method: "POST", headers: authHeaders() });
}

$("live-start").addEventListener("click", startLive);
$("live-stop").addEventListener("click", stopLive);
$("live-unmute").addEventListener("click", unmuteLive);
// unmuted with the video's own controls: the note has done its work
$("live-video").addEventListener("volumechange", () => { if (!$("live-video").muted) $("live-muted").hidden = true; });
$("live-send").addEventListener("click", sendSpeech);
$("live-interrupt").addEventListener("click", interruptLive);
window.addEventListener("pagehide", () => {
  if (live.opening) live.opening.abort();
  if (live.id) stopLive();
});
