"""The live routes: open a session (portrait + config + SDP offer -> SDP answer), push speech to
it, interrupt it, read its state, end it. Media flows over WebRTC (rtc.py); these routes only
steer the session, through the registry (sessions.py), which owns its life."""

from __future__ import annotations

import io
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flask import Blueprint, Response, g, jsonify, request, url_for
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge

from sonic import GenerateOptions, InvalidParameter, SonicError
from sonic.checks import load_portrait
from sonic.errors import UnsupportedMedia
from sonic.live.session import unused_live
from sonic.media import SAMPLE_RATE, load_audio, upload_decode
from sonic.options import parameters

from .. import metrics
from ..access import caller
from ..accounts.billing import LiveHold
from ..errors import error_response
from ..json_input import (
    MAX_CONFIG_CHARS,
    body_type_refused,
    check_form_fields,
    check_sent_as_file,
    config_switches,
    json_object_field,
)
from ..openapi import component, content, describe, error, path_parameter
from ..service import Service, service, upload_check_refused
from . import ice
from .peers import Client, PeerPolicy, Screened, screen_offer
from .remote import RemoteSession, RemoteSessions, forwarded_portrait
from .sessions import (
    SPEAK_WAIT_S,
    LiveSessions,
    ServedSession,
    SessionNotFound,
    Turn,
    check_offer,
    hold_seconds,
    receives,
)

bp = Blueprint("live", __name__)
MAX_OFFER_CHARS = 100_000
OFFER_SHAPE = 'JSON {"sdp": "...", "type": "offer"}'
PCM_CHUNK_BYTES = 6_400  # a raw PCM body is queued 0.2 s at a time as it arrives
PCM_TYPE = "audio/l16"
SESSION_ID = re.compile(r"[0-9a-f]{32}")  # uuid4 hex, as the registry makes them


@bp.after_request
def _count_refused_open(resp):
    """Each refused open counted once, by the code it was answered with, whatever refused it: the
    route, a check before it (a key, the rate limit, CORS), or the web server (a portrait past
    the upload limit)."""
    if request.endpoint == "live.open_session" and resp.status_code >= 400:
        metrics.LIVE_REFUSED.labels(g.get("error_code") or f"http_{resp.status_code}").inc()
    return resp


SESSION = component(
    "LiveSession",
    {
        "type": "object",
        "properties": {
            "session_id": {"type": "string"},
            "answer": {"type": "object", "properties": {"sdp": {"type": "string"}, "type": {"type": "string"}}},
            "state_url": {"type": "string"},
            "worker": {"type": "string", "description": "distributed mode: the worker the session runs on"},
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "the photo's, as a file's (a face enlarged, turned as in a sideways photo, not "
                "alone); config fields a live session does not use (duration, align_mouth, ...); the offer's "
                "ICE candidates left out (docs/live.md, Networks)",
            },
        },
    },
)
STATE = component(
    "LiveState",
    {
        "type": "object",
        "properties": {
            "session_id": {"type": "string"},
            "state": {
                "type": "string",
                "enum": ["idle", "speaking"],
                "description": "speaking: speech is being said, or queued (before the client connects, it waits)",
            },
            "queued_s": {"type": "number"},
            "frames_sent": {"type": "integer"},
            "late_frames": {"type": "integer"},
            "latency_ms": {"type": "number", "nullable": True},
            "lookahead_ms": {"type": "number"},
            "fps": {"type": "integer"},
            "width": {"type": "integer"},
            "height": {"type": "integer"},
            "streamed_s": {"type": "number"},
            "connection": {
                "type": "string",
                "enum": ["new", "connecting", "connected", "failed", "closed"],
                "description": "the WebRTC connection as the server sees it; a client not connected within "
                "live.idle_timeout_s ends the session (client_gone), speech queued or not",
            },
            "network": {
                "type": "object",
                "description": "what the client's own reports (RTCP) last said of the video it receives: "
                "packets lost and a round trip growing mean a poor network, where late_frames growing means "
                "the server falls behind",
                "properties": {
                    "round_trip_ms": {"type": "number", "nullable": True, "description": "null until its first report"},
                    "packets_lost": {"type": "integer", "description": "since the session began"},
                    "fraction_lost": {
                        "type": "number",
                        "description": "0-1, since its previous report (about each second), before any was resent",
                    },
                    "video_kbps": {
                        "type": "integer",
                        "nullable": True,
                        "description": "the rate the face is encoded at (it follows the client's estimate, and "
                        "falls with its reported loss); null before the first frame, and for H.264",
                    },
                    "keyframes_asked": {"type": "integer", "description": "the client's picture-loss reports"},
                    "keyframes_sent": {
                        "type": "integer",
                        "description": "the first, one a round trip at most for those asked, one for each new rate",
                    },
                    "packets_resent": {
                        "type": "integer",
                        "description": "packets the client reported lost, sent again",
                    },
                    "resends_skipped": {
                        "type": "integer",
                        "description": "reported again within the round trip: already on their way",
                    },
                    "packets_past_history": {
                        "type": "integer",
                        "description": "reported after they had left the sender's history: a keyframe sent instead",
                    },
                },
            },
            "worker": {"type": "string", "description": "distributed mode: the worker the session runs on"},
            "warning": {
                "type": "string",
                "description": "present while more than a tenth of the frames sent went out late (the server "
                "renders slower than the session's fps and size ask): lower fps or min_resolution",
            },
        },
    },
)
OPEN = {
    "required": True,
    "content": content(
        "multipart/form-data",
        {
            "type": "object",
            "required": ["image", "offer"],
            "properties": {
                "image": {"type": "string", "format": "binary", "minLength": 1},
                "config": {"type": "string", "description": "JSON object of Parameters (those that apply live)"},
                "offer": {
                    "type": "string",
                    "description": 'JSON {"sdp": "...", "type": "offer"}: a video receiver (recvonly) and an audio '
                    "transceiver (the microphone, and the face's voice back), candidates gathered (no trickle); "
                    "the answer sends VP8 or H264 video and Opus, G722, PCMU or PCMA audio",
                },
            },
        },
    ),
}
SPEAK = {
    "required": True,
    "content": {
        **content(
            "multipart/form-data",
            {
                "type": "object",
                "required": ["audio"],
                "properties": {"audio": {"type": "string", "format": "binary", "minLength": 1}},
            },
        ),
        **content("audio/L16;rate=16000", {"type": "string", "format": "binary"}),
    },
}
path_parameter("session_id", SESSION_ID, "the id POST /api/sonic/live returned")
RTC_CONFIGURATION = component(
    "LiveRtcConfiguration",
    {
        "type": "object",
        "properties": {
            "rtc_configuration": {
                "type": "object",
                "description": "an RTCConfiguration dictionary, as the browser names its fields: give it to "
                "new RTCPeerConnection() before making the offer",
                "properties": {
                    "iceServers": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "urls": {"type": "array", "items": {"type": "string"}},
                                "username": {"type": "string"},
                                "credential": {"type": "string"},
                            },
                        },
                    },
                    "iceTransportPolicy": {"type": "string", "enum": ["all", "relay"]},
                },
            },
            "expires_at": {
                "type": "integer",
                "description": "with live.turn_secret: when the TURN credentials made for this answer stop "
                "working (Unix seconds); ask again for a session opened later",
            },
        },
    },
)


@bp.get("/api/sonic/live/rtc-configuration")
@describe(
    "The ICE servers (STUN, TURN) a client's peer connection uses, asked for before the offer",
    responses={
        200: ("the configuration (no servers: host candidates only)", content("application/json", RTC_CONFIGURATION)),
        503: error("live sessions are turned off (live.enabled)"),
    },
)
def client_rtc_configuration():
    settings = service().settings.live
    if not settings.enabled:
        raise LiveUnavailable("live sessions are turned off on this server (live.enabled)")
    servers, expires_at = ice.configured(settings, ice.client_name(caller().owner), time.time())
    body: dict = {
        "rtc_configuration": {
            "iceServers": [server.as_browser_dict() for server in servers],
            "iceTransportPolicy": settings.ice_transport_policy,
        }
    }
    if settings.turn_secret:
        body["expires_at"] = expires_at
    return jsonify(body)


def registry() -> LiveSessions | RemoteSessions:
    live = service().live
    assert live is not None  # create_app makes it
    return live


def _ready(svc: Service) -> None:
    """Live sessions render in this process, with the pipeline the job queue loaded, or on the
    workers (distributed mode)."""
    if not svc.settings.live.enabled:
        raise LiveUnavailable("live sessions are turned off on this server (live.enabled)")
    if svc.queue is None:
        raise LiveUnavailable("the service is " + ("starting" if svc.status == "starting" else "not set up"))
    if isinstance(svc.live, RemoteSessions):
        return
    pipeline = getattr(svc.queue, "pipeline", None)
    if getattr(pipeline, "decoder", None) is None:
        raise LiveUnavailable("this server's pipeline cannot run live sessions")


class LiveUnavailable(SonicError):
    code = "not_ready"


def _options(svc: Service) -> tuple[dict, GenerateOptions]:
    """The config as sent (what a worker is sent) and checked."""
    params = json_object_field("config", MAX_CONFIG_CHARS) or {}
    config_switches(params, svc.loaded_decoder())  # generate's config is taken as it is: async is moot here
    return params, GenerateOptions.from_dict(params, svc.settings, ignore=("async", "decoder"))


def _offer() -> dict:
    offer = json_object_field("offer", MAX_OFFER_CHARS, what=OFFER_SHAPE)
    if offer is None:
        raise InvalidParameter(f"multipart field 'offer' is missing ({OFFER_SHAPE})", field="offer")
    return offer


def _image() -> tuple[bytes, np.ndarray]:
    """The portrait's bytes (what a worker is sent) and its checked pixels."""
    f = request.files.get("image")
    if f is None:
        check_sent_as_file("image")
        raise InvalidParameter("multipart file field 'image' is missing", field="image")
    data = f.read()
    if not data:
        raise InvalidParameter("image is empty", field="image")
    return data, load_portrait(io.BytesIO(data), service().settings.limits)


@bp.post("/api/sonic/live")
@describe(
    "Open a live session: the portrait speaks over WebRTC",
    request_body=OPEN,
    responses={
        201: ("session open; set the answer as the remote description", content("application/json", SESSION)),
        400: error("bad or missing field (config, offer: bad SDP or no video receiver)"),
        402: error("credits enabled: not enough credits for the least a session holds (3 s)"),
        413: error("image too large"),
        415: error("not a decodable image"),
        422: error("no face"),
        503: error("live.max_sessions reached (on every worker, distributed), Retry-After; or live unavailable"),
    },
)
def open_session():
    svc = service()
    if request.mimetype != "multipart/form-data":  # the portrait is a file: JSON cannot carry it
        raise body_type_refused("a live session opens from multipart/form-data (image, offer, config)")
    check_form_fields(("image",), ("offer", "config"), parameters())  # as generate's: none dropped unsaid
    params, options = _options(svc)  # the request is checked first: a bad one is told so, ready or not
    offer = _offer()
    check_offer(offer)
    live = registry()
    if isinstance(live, LiveSessions) and svc.settings.live.enabled:
        live.check_room(caller().owner)  # before the portrait is decoded
    image, rgb = _image()
    _ready(svc)
    screened = _screened(svc, live, offer)
    offer = {**offer, "sdp": screened.sdp}
    if isinstance(live, RemoteSessions):
        portrait = forwarded_portrait(image, rgb)  # through Redis: no larger than its pixels need
        with live.opening(caller().owner):  # the caller's sessions counted, on every worker
            hold = _hold_credit(svc, live.settings.max_session_s)
            try:
                session_id, worker, answer, photo_warnings = live.start(portrait, params, offer, caller().owner, hold)
            except Exception:
                _release(svc, hold)
                raise
    else:
        session_id, answer, photo_warnings = _open_here(svc, live, rgb, options, offer)
        worker = None
    g.session_id, g.worker = session_id, worker  # the access line names them: the session followed to its worker
    state_url = url_for("live.session_state", session_id=session_id, _external=True)
    body = {"session_id": session_id, "answer": answer, "state_url": state_url}
    if worker is not None:
        body["worker"] = worker
    warnings = [*photo_warnings, *(f"{name} is not used by live sessions" for name in unused_live(params))]
    if "async" in params:
        warnings.append("async does not apply to live sessions")
    if screened.left_out:
        warnings.append(screened.warning())
    if not receives(offer["sdp"], "audio"):
        warnings.append("offer: no audio receiver: the face's voice (its /speak speech) cannot reach this client")
    if warnings:
        body["warnings"] = warnings
    resp = jsonify(body)
    resp.status_code = 201
    resp.headers["Location"] = state_url
    return resp


def _screened(svc: Service, live: LiveSessions | RemoteSessions, offer: dict) -> Screened:
    """The offer with only the ICE candidates the server may send to (sonic_server/live/peers.py)."""
    here = not isinstance(live, RemoteSessions)  # on a worker, "this machine" is another one
    settings = live.settings
    policy = PeerPolicy.from_settings(settings.peer_networks, settings.ice_servers, settings.host_addresses, here)
    return screen_offer(offer["sdp"], _client(svc), policy)


def _client(svc: Service) -> Client:
    """Who offers, for the candidate screen: the address as `server.proxy_hops` makes it, and the
    TCP connection's own (ProxyFix keeps it)."""
    environ = request.environ
    socket_peer = environ.get("werkzeug.proxy_fix.orig", {}).get("REMOTE_ADDR", environ.get("REMOTE_ADDR"))
    forwarded = "X-Forwarded-For" in request.headers or "Forwarded" in request.headers
    return Client.seen(request.remote_addr, socket_peer, forwarded and svc.settings.server.proxy_hops == 0)


def _open_here(
    svc: Service, live: LiveSessions, rgb: np.ndarray, options: GenerateOptions, offer: dict
) -> tuple[str, dict, list[str]]:
    """A session in this process: a slot, the face prepared, the credit held, the offer answered;
    (its id, the answer, the photo's warnings)."""
    live.take_slot(caller().owner)
    handed = False
    try:
        face = live.prepare_face(svc.queue.pipeline, rgb, options)  # type: ignore[union-attr]  # _ready checked it
        hold = _hold_credit(svc, live.settings.max_session_s)
        handed = True  # open() gives the slot back, whatever happens
        try:
            session, answer = live.open(
                face,
                options,
                offer,
                caller().owner,
                hold.seconds if hold else None,
                _settler(svc, hold),
                hold_id=hold.id if hold else None,
            )
        except Exception:
            _release(svc, hold)
            raise
    finally:
        if not handed:
            live.give_slot(caller().owner)
    return session.id, answer, face.warnings


def _release(svc: Service, hold: LiveHold | None) -> None:
    if hold is not None and svc.billing is not None:
        svc.billing.settle_live(hold, 0.0, "the live session did not start: nothing charged")


def _hold_credit(svc: Service, max_session_s: float) -> LiveHold | None:
    """With credits: hold what the session may stream (its cap, or what the balance affords)."""
    if svc.billing is None:
        return None
    payer = svc.billing.payer(g.principal, "live sessions need")
    return svc.billing.hold_live(payer, hold_seconds(max_session_s), g.get("request_id"))


def _settler(svc: Service, hold: LiveHold | None) -> Callable[[ServedSession], None] | None:
    """What ends a session's hold: the seconds it streamed are charged."""
    billing = svc.billing
    if hold is None or billing is None:
        return None

    def settle(session: ServedSession) -> None:
        reason = f"live session {session.id}: {session.streamed_s:.1f} s ({session.ended_reason})"
        billing.settle_live(hold, session.streamed_s, reason)

    return settle


@bp.post("/api/sonic/live/<session_id>/speak")
@describe(
    "Queue speech for a live session to say",
    request_body=SPEAK,
    responses={
        202: (
            "queued (dropped_s and warning: the end of a chunked stream was dropped, past live.max_speak_s or "
            "after an interrupt)",
            content(
                "application/json",
                {
                    "type": "object",
                    "properties": {
                        "queued_s": {"type": "number"},
                        "dropped_s": {"type": "number"},
                        "warning": {"type": "string"},
                    },
                },
            ),
        ),
        400: error(
            "no audio, an audio/L16 body of an odd number of bytes, or more speech than the session may still "
            "queue (live.max_speak_s)"
        ),
        404: error("no such session (ended or unknown; ended_reason says why it ended)"),
        408: error("the body stopped before its end (an audio/L16 stream: the message says how much of it was queued)"),
        409: error(
            f"another speak request to the session was still arriving after {SPEAK_WAIT_S:g} s (a stream): "
            "requests are queued one after another"
        ),
        503: error("distributed mode: the session's worker does not answer (retry)"),
        413: error("upload too large"),
        415: error("not decodable audio, or PCM at another rate than 16000 Hz"),
        422: error("a file longer than live.max_speak_s, or silent"),
    },
)
def speak(session_id: str):
    try:
        answer = _speak(session_id)
    except SessionNotFound:
        # it ended under the request (its helper stopped as it was deleted): the reason comes
        # from its record where the registry has one
        registry().get(session_id, caller().may_see)
        raise
    # ended while the body arrived (a text-to-speech stream that paused, then finished): none of
    # it will be heard; the answer says so, and why, as the next request's would
    registry().get(session_id, caller().may_see)
    return answer


def _speak(session_id: str):
    session = registry().get(session_id, caller().may_see)
    with registry().speakers.turn(session.id) as turn:
        return _speak_in_turn(session, turn)


def _speak_in_turn(session: ServedSession | RemoteSession, turn: Turn):
    max_s = service().settings.live.max_speak_s
    # what the session holds already counts: a refused request queues nothing. Requests through
    # other API processes (distributed mode) may see the room as it was; the session itself
    # drops what would pass max_s (memory), whatever they saw
    room = SpeechRoom(max_s, session.speak(np.zeros(0, np.float32)).queued_s)
    kind = (request.mimetype or "").lower()
    if kind == PCM_TYPE:
        streamed = _speak_pcm(session, room, session.turn, turn.release)
    else:
        wav = _decoded_speech(max_s)
        room.check(len(wav) / SAMPLE_RATE)
        spoken = session.speak(wav, limit_s=max_s, whole=True)
        if spoken.dropped_s:  # another request filled the room since it was looked at: none queued
            raise SpeechRoom(max_s, spoken.queued_s).refusal(len(wav) / SAMPLE_RATE)
        streamed = Streamed(spoken.queued_s)
    body: dict = {"queued_s": round(streamed.queued_s, 3)}
    if streamed.dropped_s:
        body["dropped_s"] = round(streamed.dropped_s, 3)
        body["warning"] = (
            "an interrupt came while the stream was arriving: the rest of it was dropped"
            if streamed.interrupted
            else f"the stream passed live.max_speak_s ({max_s:g} s of speech held): its last "
            f"{streamed.dropped_s:.1f} s were dropped; send more as the session speaks"
        )
    return jsonify(body), 202


@dataclass(frozen=True)
class Streamed:
    """What a speak request did: the seconds the session now holds, the seconds of the request
    dropped (past the room, or after an interrupt: `interrupted`)."""

    queued_s: float
    dropped_s: float = 0.0
    interrupted: bool = False


@dataclass(frozen=True)
class SpeechRoom:
    """How much speech a session may still queue: live.max_speak_s less what it holds."""

    max_s: float
    queued_s: float

    def check(self, seconds: float) -> None:
        if seconds > self.max_s - self.queued_s:
            raise self.refusal(seconds)

    def refusal(self, seconds: float) -> InvalidParameter:
        """The 400 of `seconds` more speech that does not fit."""
        held = f"the session holds {self.queued_s:.1f} s of speech, and " if self.queued_s else ""
        return InvalidParameter(
            f"{held}{seconds:.1f} s more would pass live.max_speak_s ({self.max_s:g} s); "
            "wait for it to be spoken, or interrupt",
            field="audio",
        )


def _speak_pcm(
    session: ServedSession | RemoteSession, room: SpeechRoom, turn: int, let_go: Callable[[], None]
) -> Streamed:
    """A raw body of 16-bit little-endian mono PCM at 16 kHz, queued as it arrives (a text-to-
    speech engine's output can be streamed straight in, chunked), as speech of `turn`. A body
    whose length is known is refused whole when it does not fit; a chunked one that runs past
    the room is cut there: what came before it is spoken. An interrupt while it arrives drops
    the rest (barge-in while a text-to-speech stream is still coming). What is dropped is still
    read, so that the client gets its answer."""
    named = [part.split("=", 1)[0].strip().lower() for part in request.content_type.split(";")[1:] if "=" in part]
    twice = sorted({name for name in named if named.count(name) > 1})
    if twice:  # two rates: the last was taken, whichever the samples are at
        raise UnsupportedMedia(
            f"the audio/L16 Content-Type names {twice[0][:20]} more than once: give it once", field="audio"
        )
    rate, channels = request.mimetype_params.get("rate"), request.mimetype_params.get("channels", "1")
    if rate != str(SAMPLE_RATE):
        raise UnsupportedMedia(
            f"audio/L16 must be at rate={SAMPLE_RATE} (16-bit little-endian mono); "
            f"{'its Content-Type names no rate' if rate is None else f'got rate={rate[:20]}'}: resample "
            "it, or send a file (multipart field audio: WAV, MP3, ... at any rate, telephone's 8 kHz too)",
            field="audio",
        )
    if channels != "1":  # interleaved samples would be heard as one voice at half speed
        raise UnsupportedMedia(f"audio/L16 must be mono (channels=1); got channels={channels[:20]}", field="audio")
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":  # gzip'd samples were queued as they came: noise
        raise UnsupportedMedia(
            f"the audio/L16 body must be sent unencoded; got Content-Encoding: {encoding[:40]}", field="audio"
        )
    stream, total, kept, carry = request.stream, 0, 0, b""
    head = _read_stream(lambda: _head(stream, 12), 0.0)
    container = _container(head)
    if container in MEDIA_FILES.values():  # its header would be heard as a click, its samples at the wrong speed
        raise UnsupportedMedia(
            f"the audio/L16 body is {container} file: send it as the multipart file field 'audio', "
            "or send its samples alone (16-bit little-endian mono at 16 kHz, no header)",
            field="audio",
        )
    if container:
        raise UnsupportedMedia(
            f"the audio/L16 body is {container}, not speech: send 16-bit little-endian mono samples at 16 kHz",
            field="audio",
        )
    length = request.content_length
    if length is not None and length > 1 and length % 2:  # its last byte was dropped unsaid
        raise InvalidParameter(
            f"the audio/L16 body is {length} bytes, an odd count: 16-bit samples are two bytes each (a byte "
            "is missing or extra)",
            field="audio",
        )
    if length is not None:
        room.check(length / 2 / SAMPLE_RATE)
    room_bytes = 2 * int((room.max_s - room.queued_s) * SAMPLE_RATE)
    queued, interrupted, full = room.queued_s, False, False
    while True:
        chunk, head = head or _read_stream(lambda: stream.read(PCM_CHUNK_BYTES), kept / 2 / SAMPLE_RATE), b""
        if not chunk:
            break
        fits = 0 if interrupted or full else max(0, min(len(chunk), room_bytes - total))
        total += len(chunk)
        if not fits:
            continue
        data = carry + chunk[:fits]
        cut = len(data) - len(data) % 2
        carry = data[cut:]
        spoken = session.speak(np.frombuffer(data[:cut], "<i2").astype(np.float32) / 32768.0, turn, room.max_s)
        queued = spoken.queued_s
        interrupted = session.turn != turn
        if interrupted:  # what still arrives is dropped: the next request may speak
            let_go()
        # the session's queue held to max_s (another request may have filled it): the stream is
        # cut where it did, not spliced on once the queue has played down
        full = spoken.dropped_s > 0
        kept += 0 if interrupted else fits - 2 * int(round(spoken.dropped_s * SAMPLE_RATE))
    if total < 2:
        raise InvalidParameter(
            f"the audio/L16 body is {'empty' if total == 0 else 'one byte: no whole 16-bit sample'}", field="audio"
        )
    return Streamed(queued, (total - kept) / 2 / SAMPLE_RATE, interrupted)


def _read_stream(read: Callable[[], bytes], queued_s: float) -> bytes:
    """read() of a speak stream's body; the body cut short, malformed or past the upload limit
    is refused in a stream's words, saying the `queued_s` of it queued before (StreamFailed)."""
    try:
        return read()
    except HTTPException as e:
        failed = StreamFailed.of(e, queued_s)
        if failed is None:
            raise
        raise failed from e


class StreamFailed(SonicError):
    """An audio/L16 stream that failed as it arrived (it stopped, its framing broke, it passed
    limits.max_upload_mb): the refusal the server would give, saying how much of it was queued
    before (a stream is spoken as it arrives: that part was, or is being, heard)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, field="audio")
        self.code = code

    @classmethod
    def of(cls, e: HTTPException, queued_s: float) -> StreamFailed | None:
        """The refusal in these words, or None for one this does not word (`e` stands)."""
        said = (
            f"; {queued_s:.3g} s of it before that were queued and are spoken (interrupt to stop them)"
            if queued_s > 0
            else "; none of it was queued"
        )
        if isinstance(e, ClientDisconnected):
            # werkzeug's own (a body short of its Content-Length) says nothing of the body
            why = e.description if e.description != ClientDisconnected.description else "before its Content-Length"
            return cls("upload_incomplete", f"the audio/L16 body stopped before its end ({why}){said}")
        if isinstance(e, RequestEntityTooLarge):
            limit = service().settings.limits.max_upload_mb
            return cls("input_too_large", f"the audio/L16 body passed {limit:g} MB (limits.max_upload_mb){said}")
        if e.code == 400:
            return cls("invalid_parameter", f"{e.description}{said}")
        return None


# how files begin: sent as raw PCM, their headers and coded frames were queued as sound (an MP3
# without an ID3 tag begins with a frame's sync bits, which speech's samples may too: not told
# apart). Each signature is 3 bytes or more: a body of speech begins with one by chance about
# once in 16 million (its first sample is near silence besides)
MEDIA_FILES = {
    re.compile(rb"RIFF....WAVE", re.S): "a WAV",
    re.compile(rb"fLaC"): "a FLAC",
    re.compile(rb"OggS"): "an Ogg",
    re.compile(rb"ID3[\x02-\x04]"): "an MP3",
    re.compile(rb"\x1a\x45\xdf\xa3"): "a WebM or Matroska",
    re.compile(rb"....ftyp", re.S): "an MP4 (M4A, MOV)",
    re.compile(rb"FORM....AIF[FC]", re.S): "an AIFF",
    re.compile(rb"caff"): "a CAF",
    re.compile(rb"#!AMR"): "an AMR",
}
OTHER_FILES = {
    re.compile(rb"\x89PNG\r\n\x1a\n"): "a PNG image",
    re.compile(rb"\xff\xd8\xff"): "a JPEG image",
    re.compile(rb"\x1f\x8b\x08"): "gzip data",
}


def _container(head: bytes) -> str | None:
    """The kind of file `head` (a body's first bytes) begins, if it is one this knows."""
    return next((kind for magic, kind in (MEDIA_FILES | OTHER_FILES).items() if magic.match(head)), None)


def _head(stream, n: int) -> bytes:
    """The first `n` bytes of a body (fewer if it is shorter): a chunked body's first read may
    be shorter than a file's header."""
    head = b""
    while len(head) < n:
        chunk = stream.read(n - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _decoded_speech(max_s: float) -> np.ndarray:
    """A multipart `audio` file in any format the file API takes, decoded to 16 kHz mono."""
    check_form_fields(("audio",), ())  # a second file was dropped unsaid, as a stray field was
    f = request.files.get("audio")
    if f is None:
        check_sent_as_file("audio")
        raise InvalidParameter(
            "multipart file field 'audio' is missing (or send Content-Type: audio/L16;rate=16000)", field="audio"
        )
    data = f.read()
    if not data:
        raise InvalidParameter("audio is empty", field="audio")
    with tempfile.NamedTemporaryFile(prefix="sonic-speak-") as tmp:
        tmp.write(data)
        tmp.flush()
        with service().upload_checks.holding(caller().owner, upload_check_refused), upload_decode():
            return load_audio(tmp.name, max_s)  # checked: not empty, not silent, not longer than max_s


@bp.post("/api/sonic/live/<session_id>/interrupt")
@describe(
    "Stop speaking at once",
    responses={
        200: (
            "interrupted: what was queued is dropped, the mouth closes",
            content("application/json", {"type": "object", "properties": {"interrupted": {"type": "boolean"}}}),
        ),
        404: error("no such session (ended or unknown; ended_reason says why it ended)"),
        503: error("its worker does not answer"),
    },
)
def interrupt(session_id: str):
    session = registry().get(session_id, caller().may_see)
    session.interrupt()
    registry().speakers.interrupted(session.id)  # a stream still arriving keeps the next reply waiting no longer
    return jsonify({"interrupted": True})


@bp.get("/api/sonic/live/<session_id>")
@describe(
    "A live session's state",
    responses={
        200: ("state", content("application/json", STATE)),
        404: error("no such session (ended_reason says why it ended)"),
        503: error("distributed mode: the session's worker does not answer (retry)"),
    },
)
def session_state(session_id: str):
    return jsonify(registry().get(session_id, caller().may_see).state())


@bp.delete("/api/sonic/live/<session_id>")
@describe(
    "End a live session",
    responses={
        204: "ended",
        404: error("no such session (ended or unknown; ended_reason says why it ended)"),
        503: error("its worker does not answer"),
    },
)
def end_session(session_id: str):
    live = registry()
    session = live.get(session_id, caller().may_see)
    if not live.end(session.id, "client_closed"):
        return error_response("session_not_found", f"no live session {session_id[:64]!r}: it ended, or never existed")
    return Response(status=204)
