"""Live sessions: the registry that owns each session's life, from the offer to its end.

A session is opened (the face prepared, the offer answered), runs (its clock thread renders a
frame every 1/fps s and hands it to the connection's tracks) and ends exactly once, for one
reason: the client's DELETE, its connection gone or silent for `idle_timeout_s`, the session's
`max_session_s`, its credit spent, or the server stopping. Ending stops the clock, closes the
connection, settles the credit hold for the seconds actually streamed and counts the metrics;
the session is then forgotten (its id answers 404).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import re
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from sonic.errors import Busy, InvalidParameter, SonicError, shown
from sonic.live import LiveFace, LiveSession
from sonic.live.process import HelperPool, SessionProcess
from sonic.live.session import Spoken
from sonic.media import SAMPLE_RATE
from sonic.options import GenerateOptions

from .. import metrics
from ..settings import LiveSettings
from . import EndReason, ice
from .feedback import FeedbackCounts
from .rtc import (
    RtcLoop,
    announce_host,
    consume_microphone,
    face_feedback,
    face_tracks,
    quicken_audio_receiver,
    rtc_configuration,
    set_directions,
)

CLOSE_TIMEOUT_S = 3.0  # a connection's close; one that hangs has its transports stopped directly
TRANSPORT_STOP_S = 1.0
log = logging.getLogger("sonic.live")
NEGOTIATE_TIMEOUT_S = 15.0  # the answer, candidates gathered, is ready within this
WATCH_INTERVAL_S = 1.0  # how often a session looks at its connection
ENDED_KEPT = 1000  # sessions whose end (owner, reason) is remembered, for their 404s
M_ARENA_MAX = -8  # glibc's mallopt option
MALLOC_ARENAS = 2  # 100 short sessions: 302 -> 384 MB, flat from the 20th (16 arenas: 307 -> 523, rising)


class SessionNotFound(SonicError):
    code = "session_not_found"


class SpeakerBusy(SonicError):
    """Another speak request to the session held its turn past SPEAK_WAIT_S (a stream still
    arriving): 409."""

    code = "conflict"


SPEAK_WAIT_S = 5.0  # how long a speak request waits for the one before it to be answered


def speaker_busy(wait_s: float) -> SpeakerBusy:
    return SpeakerBusy(
        f"another speak request to this session is still arriving after {wait_s:g} s (a stream): "
        "speech is queued one request after another; send this once that one is answered, or interrupt it",
        field="audio",
    )


class Turn:
    """A speak request's turn: `release()` lets the next request go before this one is answered
    (an interrupt came: what still arrives of this one is read and dropped)."""

    def __init__(self, leave: Callable[[Turn], None]) -> None:
        self._leave = leave

    def release(self) -> None:
        self._leave(self)


class SpeakTurns:
    """One speak request at a time for each session, first come first served: two sent at once
    were each queued as they arrived, spliced into one another in slices of a few hundred
    milliseconds (and each had checked the session's room as if the other were not there). A
    request waits up to SPEAK_WAIT_S for those before it (a file, a known-length body: its upload
    and decoding); past that (a stream still arriving) it is refused. An interrupt ends a
    stream's turn. In one process (distributed mode: remote.SharedSpeakTurns, in Redis)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._lines: dict[str, deque[Turn]] = {}  # session id -> its requests in order; the first has the turn
        # session id -> the request that took its turn: the one an interrupt lets go (the line's
        # first may be the next one, its turn not yet taken: the holder left a moment before)
        self._holders: dict[str, Turn] = {}

    @contextlib.contextmanager
    def turn(self, session_id: str, wait_s: float = SPEAK_WAIT_S) -> Iterator[Turn]:
        turn = Turn(lambda t: self._leave(session_id, t))
        with self._changed:
            line = self._lines.setdefault(session_id, deque())
            line.append(turn)
            if not self._changed.wait_for(lambda: line[0] is turn, timeout=wait_s):
                self._leave(session_id, turn)
                raise speaker_busy(wait_s)
            self._holders[session_id] = turn
        try:
            yield turn
        finally:
            turn.release()

    def waiting(self, session_id: str) -> int:
        """How many requests are in the session's line, the one holding its turn among them."""
        with self._changed:
            return len(self._lines.get(session_id, ()))

    def interrupted(self, session_id: str) -> None:
        """The session was interrupted: the request holding its turn (a stream whose rest is now
        read and dropped) lets the next one go at once."""
        with self._changed:
            holder = self._holders.get(session_id)
            if holder is not None:
                self._leave(session_id, holder)

    def _leave(self, session_id: str, turn: Turn) -> None:
        """`turn` out of its session's line (once: again, nothing), the next one woken."""
        with self._changed:
            if self._holders.get(session_id) is turn:
                del self._holders[session_id]
            line = self._lines.get(session_id)
            if line is None or turn not in line:
                return
            line.remove(turn)
            if not line:
                del self._lines[session_id]
            self._changed.notify_all()


def _count_late(session: ServedSession) -> None:
    """The session's late frames since the last count, into /metrics (by its clock thread only)."""
    late = session.engine.late_frames
    metrics.LIVE_LATE.inc(max(0, late - session.stats.late_counted))
    session.stats.late_counted = max(late, session.stats.late_counted)


class SessionEnded(SessionNotFound):
    """A session that has ended (its record says why): it answers 404, naming the reason."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(f"live session {session_id} has ended ({reason})")
        self.extra = {"ended_reason": reason}


@dataclass
class SessionStats:
    frames_sent: int = 0
    latency_sum_s: float = 0.0
    late_counted: int = 0  # the engine's late frames already in /metrics

    def latency_ms(self, lookahead_s: float) -> float | None:
        if not self.frames_sent:
            return None
        return round(1000 * (lookahead_s + self.latency_sum_s / self.frames_sent), 1)


@dataclass(frozen=True)
class NetworkReport:
    """What the client's own receiver reports (RTCP) last said of the video it gets: how to tell
    a choppy picture on a poor network from a server that falls behind (`late_frames`)."""

    round_trip_ms: float | None = None  # None until the client's first report
    packets_lost: int = 0  # since the session began
    fraction_lost: float = 0.0  # of the packets since its previous report (before any was resent)
    sender: FeedbackCounts = field(default_factory=FeedbackCounts)  # what the face's sender did with them

    def as_json(self) -> dict:
        """One object: the report's figures and the sender's counts beside them."""
        report = asdict(self)
        report.update(report.pop("sender"))
        return report


@dataclass(frozen=True)
class UnsettledEnd:
    """A session that ended here, its hold not settled (the accounts database failed then): what
    the settler's sweep charges from, as it does from a distributed session's record."""

    id: str
    streamed_s: float
    ended: str


@dataclass
class ServedSession:
    """One running session: the engine, its connection and tracks, its clock thread."""

    id: str
    owner: str | None
    engine: LiveSession | SessionProcess
    pc: Any = None
    video: Any = None
    audio: Any = None
    created: float = field(default_factory=time.monotonic)
    connected: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    last_heard: float = field(default_factory=time.monotonic)  # the client's last bytes to us
    bytes_seen: int = -1  # the connection's bytes received, when last looked at
    network: NetworkReport = field(default_factory=NetworkReport)  # as of the last look
    stats: SessionStats = field(default_factory=SessionStats)
    paid_s: float | None = None  # credits: the seconds its hold covers (None: no credits)
    hold_id: str | None = None  # credits: the hold it streams against
    ended_reason: str | None = None
    on_end: Callable[[ServedSession], None] | None = None  # settles its credit hold
    # its tasks on the RTC loop, held here: the loop keeps only weak references, and a task left
    # waiting on a track that never sent anything was destroyed pending (a warning in the log)
    tasks: list[Any] = field(default_factory=list)

    @property
    def streamed_s(self) -> float:
        """Seconds of video sent."""
        return self.stats.frames_sent / self.engine.fps

    def speak(self, pcm: Any, turn: int | None = None, limit_s: float | None = None, whole: bool = False) -> Spoken:
        """Queue 16 kHz mono float32 speech (of `turn`: dropped if an interrupt ended it; what
        would pass `limit_s` of queue dropped, or, `whole`, all of it)."""
        try:
            return self.engine.queue_speech(pcm, turn, limit_s, whole)
        except OSError as e:
            raise self._helper_gone() from e

    @property
    def turn(self) -> int:
        """The engine's turn (its interrupts so far), as of the last speak."""
        return self.engine.turn

    def interrupt(self) -> None:
        try:
            self.engine.interrupt()
        except OSError as e:
            raise self._helper_gone() from e

    def _helper_gone(self) -> SessionNotFound:
        """Its helper is gone under a request: the session is ending, as its clock will see."""
        return SessionNotFound(f"live session {self.id} has ended (its helper process stopped)")

    def state(self) -> dict:
        engine = self.engine
        width, height = engine.frame_size
        state = {
            "session_id": self.id,
            "state": "speaking" if engine.speaking else "idle",
            "queued_s": round(engine.queued_s, 3),
            "frames_sent": self.stats.frames_sent,
            "late_frames": engine.late_frames,
            "latency_ms": self.stats.latency_ms(engine.delay / engine.fps),
            "lookahead_ms": round(1000 * engine.delay / engine.fps, 1),
            "fps": engine.fps,
            "width": width,
            "height": height,
            "streamed_s": round(self.streamed_s, 2),
            "connection": getattr(self.pc, "connectionState", "new"),
            "network": self.network.as_json(),
        }
        behind = falling_behind(self.stats.frames_sent, engine.late_frames, engine.fps, (width, height))
        if behind:
            state["warning"] = behind
        return state


LATE_SHARE = 0.1  # late frames past this share of those sent (after LATE_AFTER_S): the server falls behind
LATE_AFTER_S = 2.0  # (the first frames of a session may be late while its helper warms up)


def falling_behind(sent: int, late: int, fps: int, size: tuple[int, int]) -> str | None:
    """What a session's state says where this server renders slower than the session asks (a
    1024 px face at 60 fps on two cores: every other frame late, the picture held), or None.
    The session goes on: late frames go out as the picture before them, the stream in time."""
    if sent < LATE_AFTER_S * fps or late <= LATE_SHARE * sent:
        return None
    return (
        f"{late / sent:.0%} of the frames went out late: this server renders slower than {fps} fps at "
        f"{size[0]}x{size[1]}; a lower fps or min_resolution keeps up"
    )


MAX_MEDIA_SECTIONS = 8  # m= lines: a session needs a video and an audio one (a data channel at most)
FINGERPRINT_BYTES = {
    "sha-256": 32,
    "sha-384": 48,
    "sha-512": 64,
}  # hashes the DTLS handshake can verify: digest lengths
FINGERPRINT_ALGORITHMS = tuple(FINGERPRINT_BYTES)


class CallerLimit(SonicError):
    """The caller runs live.max_sessions_per_caller sessions already."""

    code = "rate_limited"


def check_caller(settings: LiveSettings, owner: str | None, running: int) -> None:
    """Refuse one more session to a caller (a key or an account) running `running` already, at
    live.max_sessions_per_caller: one customer cannot take every slot. Anonymous callers (a
    service without keys) cannot be told apart, and are not counted."""
    cap = settings.max_sessions_per_caller
    if owner and cap and running >= cap:
        raise CallerLimit(
            f"this caller runs {running} live session(s), the most one key or account may "
            "(live.max_sessions_per_caller); end one first"
        )


def media_sections(sdp: str) -> list[list[str]]:
    """An offer's media sections, each its lines from its m= line on, the lines split as the
    WebRTC stack splits them (str.splitlines: CR alone, and other separators, end a line too)."""
    sections: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):  # as the stack reads it: " m=video" starts no section there
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    return sections


def receives(sdp: str, kind: str) -> bool:
    """Whether an offer has a `kind` ("video", "audio") section that receives."""
    return any(_open_to(section, kind, "a=sendonly") for section in media_sections(sdp))


@dataclass(frozen=True)
class Sections:
    """Which of an offer's audio and video sections (its transceivers, in order) carry what: the
    face (the first video section the client receives on), the voice (the first such audio
    section) and the microphone (the first audio section the client sends on); None: none."""

    face: int | None
    voice: int | None
    microphone: int | None

    @classmethod
    def of(cls, sdp: str) -> Sections:
        tracks = [section for section in media_sections(sdp) if section[0].startswith(("m=audio", "m=video"))]

        def first(kind: str, not_if: str) -> int | None:
            return next((i for i, section in enumerate(tracks) if _open_to(section, kind, not_if)), None)

        return cls(first("video", "a=sendonly"), first("audio", "a=sendonly"), first("audio", "a=recvonly"))


def _open_to(section: list[str], kind: str, not_if: str) -> bool:
    """A `kind` section neither `not_if` (a=sendonly: the client receives; a=recvonly: it
    sends) nor inactive, nor rejected (port 0) unless bundle-only (JSEP's max-bundle: such a
    section shares the first one's transport)."""
    attributes = {line.strip() for line in section[1:]}
    return (
        section[0].startswith(f"m={kind}")
        and (not section[0].startswith(f"m={kind} 0 ") or "a=bundle-only" in attributes)
        and not_if not in attributes
        and "a=inactive" not in attributes
    )


def check_offer(offer: dict) -> None:
    """The offer must be an SDP offer that receives video (the face is what a session sends) and
    can connect: a fingerprint the handshake can verify. Each fault is named here, before the
    session takes a slot: otherwise it would fail inside the WebRTC stack with its own words, or
    take a slot until its idle timeout without ever connecting. (An offer without candidates can
    connect: the client's checks to the answer's candidates teach the server its address.)"""
    if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
        raise InvalidParameter('offer must be JSON {"sdp": "...", "type": "offer"}', field="offer")
    sdp = offer["sdp"]
    if not sdp.startswith("v=0"):
        raise InvalidParameter("offer: the sdp is not a session description (it must start with v=0)", field="offer")
    # CR and LF end lines; any other control character (C0, C1, Unicode's line separators) is refused
    control = re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029]", sdp)
    if control:
        raise InvalidParameter(
            f"offer: the sdp has a control character on line {_line_at(sdp, control.start())}", field="offer"
        )
    # the form's text is read as UTF-8, bytes that are not made U+FFFD: no offer holds one
    garbled = sdp.find("\ufffd")
    if garbled >= 0:
        raise InvalidParameter(f"offer: the sdp is not UTF-8 text (line {_line_at(sdp, garbled)})", field="offer")
    fingerprints = re.findall(r"^a=fingerprint:(\S+) ([0-9A-Fa-f:]+)\s*$", sdp, re.MULTILINE)
    if not fingerprints:
        # without it the DTLS handshake can only fail, after the session has taken a slot
        raise InvalidParameter("offer: the sdp has no DTLS fingerprint (a=fingerprint:...)", field="offer")
    if not any(algorithm.lower() in FINGERPRINT_ALGORITHMS for algorithm, _ in fingerprints):
        raise InvalidParameter(
            f"offer: the DTLS fingerprint's hash ({fingerprints[0][0][:20]}) is not one of "
            + ", ".join(FINGERPRINT_ALGORITHMS),
            field="offer",
        )
    check_fingerprints(fingerprints)
    sections = media_sections(sdp)
    if len(sections) > MAX_MEDIA_SECTIONS:
        raise InvalidParameter(
            f"offer: {len(sections)} media sections (m= lines); a session takes at most {MAX_MEDIA_SECTIONS}",
            field="offer",
        )
    if not receives(sdp, "video"):
        raise InvalidParameter(
            "offer: no video receiver; add a video transceiver with direction recvonly or sendrecv", field="offer"
        )
    check_transport(sdp)
    check_codecs(sdp)


def check_fingerprints(fingerprints: list[tuple[str, str]]) -> None:
    """Each DTLS fingerprint (its hash, its digest) of a hash the handshake verifies is a whole
    digest (32 bytes for sha-256, as hex pairs between colons): one of a byte matches no
    certificate, and the session held its slot until its idle timeout."""
    for algorithm, digest in fingerprints:
        size = FINGERPRINT_BYTES.get(algorithm.lower())
        if size is not None and not re.fullmatch(rf"[0-9A-Fa-f]{{2}}(:[0-9A-Fa-f]{{2}}){{{size - 1}}}", digest):
            raise InvalidParameter(
                f"offer: the {algorithm.lower()} DTLS fingerprint is not {size} bytes written as hex pairs between "
                f"colons (it is {digest[:24]!r}{'...' if len(digest) > 24 else ''})",
                field="offer",
            )


def _line_at(sdp: str, index: int) -> int:
    """The line (1-based) holding sdp[index], as the WebRTC stack counts lines."""
    return len((sdp[:index] + ".").splitlines())


DTLS_SETUPS = ("actpass", "active", "passive")


def check_transport(sdp: str) -> None:
    """What the WebRTC stack requires of each media section's transport before it answers: ICE
    credentials (in the section, or for the whole description), RTCP multiplexed on the media's
    port, and a mid of its own. Refused by the stack, such an offer was told so only after a
    worker had taken a slot and prepared the face (2.4 s)."""
    head = sdp.split("\nm=", 1)[0].splitlines()
    mids: set[str] = set()
    for n, lines in enumerate(media_sections(sdp), 1):
        kind = lines[0][2:].split(" ", 1)[0]
        where = f"offer: media section {n} ({kind})"
        port, proto = (lines[0].split(" ") + ["", ""])[1:3]
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise InvalidParameter(f"{where}: its port {port[:12]!r} is not one of 0-65535 (m= line)", field="offer")
        if kind in ("audio", "video") and "TLS/RTP/SAVP" not in proto.upper():
            raise InvalidParameter(
                f"{where} is {proto[:32]!r}: WebRTC's media go encrypted, UDP/TLS/RTP/SAVPF (DTLS-SRTP)", field="offer"
            )
        for attribute in ("ice-ufrag", "ice-pwd"):
            values = [
                line.strip()[len(attribute) + 3 :] for line in (*lines, *head) if line.startswith(f"a={attribute}:")
            ]
            if not values:
                raise InvalidParameter(f"{where} has no ICE credentials (a={attribute}:...)", field="offer")
            # (RFC 8839 asks 4 and 22 characters at least; the ICE stack takes shorter ones, and
            # some clients may send them: what it cannot use is refused, an empty one, or a
            # fragment with a colon, at which its usernames are split)
            if not values[0] or (attribute == "ice-ufrag" and ":" in values[0]):
                raise InvalidParameter(
                    f"{where}: its a={attribute} is {'empty' if not values[0] else 'split by a colon'}; ICE "
                    "credentials are letters, digits, + and / (RFC 8839)",
                    field="offer",
                )
        if kind in ("audio", "video") and "a=rtcp-mux" not in (line.strip() for line in lines):
            raise InvalidParameter(f"{where} does not multiplex RTCP (a=rtcp-mux), as WebRTC requires", field="offer")
        setups = [line.strip()[len("a=setup:") :] for line in (*head, *lines) if line.startswith("a=setup:")]
        if kind in ("audio", "video") and not any(role in DTLS_SETUPS for role in setups):
            # without it the stack failed on its own (an AttributeError in the log), 2.6 s later
            raise InvalidParameter(
                f"{where} has no DTLS role (a=setup:actpass, active or passive): is the description cut short?",
                field="offer",
            )
        mid = next((line[len("a=mid:") :].strip() for line in lines if line.startswith("a=mid:")), None)
        if mid is not None and mid in mids:
            raise InvalidParameter(f"{where} has the mid {mid[:32]!r} of an earlier section (a=mid)", field="offer")
        if mid is not None:
            mids.add(mid)


# what a session can send, as a client's developer reads it (aiortc's codecs: rtc.py)
CODECS_SENT = {
    "video": "VP8 or H264 (constrained baseline, packetization-mode=1)",
    "audio": "Opus, G722, PCMU or PCMA",
}


def unreadable_line(sdp: str, parse: Callable[[str], Any]) -> tuple[int, str] | None:
    """The first line (1-based, and its text) at which a description the parser refuses stops
    being readable: the parser's own errors name no line, and are Python's words
    (AssertionError, "invalid literal for int()"). Found by halving: a description that cannot
    be read cannot once more lines follow (a dozen parses of an offer, not one per line); None
    where the whole description reads."""
    lines = sdp.splitlines()

    def reads(n: int) -> bool:
        try:
            parse("\r\n".join(lines[:n]) + "\r\n")
        except Exception:  # noqa: BLE001 - any of its errors
            return False
        return True

    if reads(len(lines)):
        return None
    good, bad = 0, len(lines)  # the first `good` lines read; the first `bad` do not
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if reads(middle) else (good, middle)
    return bad, lines[bad - 1]


def check_codecs(sdp: str) -> None:
    """Each media section must offer a codec the WebRTC stack has, or the negotiation fails in its
    own words ("Failed to set remote video description send parameters"), after the face was
    prepared: refused here, naming what the offer has (a client limited to VP9, AV1 or H264 High).
    A description the stack cannot read, and payload types it would answer under another codec's
    number (outside 0-127, or one number for two codecs), are refused here too."""
    from aiortc.codecs import CODECS, is_rtx
    from aiortc.rtcpeerconnection import find_common_codecs
    from aiortc.sdp import SessionDescription

    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:  # noqa: BLE001 - its parse errors are of many kinds, often without words
        at = unreadable_line(sdp, SessionDescription.parse)
        where = f": line {at[0]} ({shown(at[1][:60])})" if at else ""
        raise InvalidParameter(
            f"offer: the WebRTC stack cannot read this session description{where}; "
            "send the one RTCPeerConnection.createOffer() made, unchanged",
            field="offer",
        ) from e
    raw = media_sections(sdp)
    for i, media in enumerate(parsed.media):
        bundled = i < len(raw) and "a=bundle-only" in {line.strip() for line in raw[i]}
        if media.kind not in CODECS_SENT or (media.port == 0 and not bundled):  # a section rejected
            continue
        numbers = [c.payloadType for c in media.rtp.codecs]
        listed = [n for n in media.fmt if isinstance(n, int)]  # the m= line's
        if (
            any(n is None or not 0 <= n <= 127 for n in numbers + listed)
            or len(set(numbers)) < len(numbers)
            or len(set(listed)) < len(listed)
        ):
            raise InvalidParameter(
                f"offer: the {media.kind} section's payload types must be distinct numbers from 0 to 127; "
                f"it has {', '.join(map(str, listed or numbers))[:120]}",
                field="offer",
            )
        if not [c for c in find_common_codecs(CODECS[media.kind], media.rtp.codecs) if not is_rtx(c)]:
            rates = {c.mimeType.lower(): c.clockRate for c in CODECS[media.kind]}
            offered = ", ".join(dict.fromkeys(_codec_words(c, rates) for c in media.rtp.codecs if not is_rtx(c)))
            raise InvalidParameter(
                f"offer: no {media.kind} codec in common: this server sends {CODECS_SENT[media.kind]}; "
                f"the offer has {offered[:200] or 'none'}",
                field="offer",
            )


def _codec_words(codec: Any, rates: dict[str, int]) -> str:
    """A codec as a client's developer names it; the clock rate where it is not the one the
    server's codec of that name has."""
    name = codec.mimeType.split("/")[-1]
    if rates.get(codec.mimeType.lower(), codec.clockRate) != codec.clockRate:
        return f"{name} at {codec.clockRate} Hz"
    if name.lower() != "h264":
        return name
    profile = codec.parameters.get("profile-level-id", "42e01f")
    return f"H264 {profile} packetization-mode={codec.parameters.get('packetization-mode', 0)}"


class LiveSessions:
    """The registry: at most `settings.max_sessions` running at once, each ended exactly once."""

    def __init__(self, settings: LiveSettings) -> None:
        self.settings = settings
        self._rtc: RtcLoop | None = None
        self._rtc_lock = threading.Lock()  # two first opens at once would each start a loop
        self._sessions: dict[str, ServedSession] = {}
        # the last sessions to end, with their owner and why: a client asking after its session
        # learns whether it timed out, ran out of credit or failed
        self._ended: OrderedDict[str, tuple[str | None, str]] = OrderedDict()
        self._unsettled: OrderedDict[str, UnsettledEnd] = OrderedDict()  # by hold id
        self._lock = threading.Lock()
        self._opening = 0  # sessions between their slot being taken and their registration
        self._opening_by: Counter[str] = Counter()  # ... of each caller (live.max_sessions_per_caller)
        self._faces: Any = None
        self._face_lock = threading.Lock()
        self._helpers = HelperPool() if settings.processes else None
        self.speakers = SpeakTurns()
        self._relay_watch = ice.RelayWatch()  # the server's own sessions' TURN server resting after a failure
        cap_malloc_arenas()  # before the sessions' threads take arenas of their own

    def warm(self) -> None:
        """Make what a first session would wait for: the face analyser, a helper process."""
        self.warm_faces()
        try:
            if self._helpers is not None:
                self._helpers.warm()
        except Exception:  # noqa: BLE001 - the first session makes them itself
            log.exception("live sessions: warming up failed")

    def warm_faces(self) -> None:
        """The face analyser made (its set-up silences the process's stderr a moment: see
        sonic/face.py, so a caller may make it before other threads log)."""
        try:
            with self._face_lock:
                self._face_analyser()
        except Exception:  # noqa: BLE001 - the first session makes it itself
            log.exception("live sessions: warming up the face analyser failed")

    def _face_analyser(self) -> Any:
        """The registry's own face analyser (FaceMesh graphs are not shared with the job thread's),
        made at first use; the caller holds the face lock."""
        if self._faces is None:
            from sonic.face import FaceAnalyzer

            self._faces = FaceAnalyzer()
        return self._faces

    def prepare_face(self, pipeline: Any, rgb: Any, options: GenerateOptions) -> LiveFace:
        """The portrait framed and its decoder prepared, one preparation at a time."""
        from sonic.live import prepare_live_face

        with self._face_lock:
            return prepare_live_face(pipeline, rgb, options, self._face_analyser())

    @property
    def rtc(self) -> RtcLoop:
        with self._rtc_lock:
            if self._rtc is None:
                from .rtc import restrict_host_addresses

                restrict_host_addresses(self.settings.host_addresses)
                self._rtc = RtcLoop()
            return self._rtc

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def health(self) -> dict:
        """What /health shows of live sessions."""
        return {"enabled": self.settings.enabled, "sessions": self.count(), "max_sessions": self.settings.max_sessions}

    def session_of_hold(self, hold_id: str) -> UnsettledEnd | None:
        """The settler's sweep: a hold is settled as its session ends (on_end); one whose
        settling failed then is settled by the sweep from what the session streamed (released
        as nothing charged, it gave the session away)."""
        with self._lock:
            return self._unsettled.get(hold_id)

    def running(self) -> list[ServedSession]:
        with self._lock:
            return list(self._sessions.values())

    def opening(self) -> int:
        """Sessions between their slot being taken and their registration."""
        with self._lock:
            return self._opening

    def free_slots(self) -> int:
        with self._lock:
            return max(0, self.settings.max_sessions - len(self._sessions) - self._opening)

    def check_room(self, owner: str | None = None) -> None:
        """take_slot's refusals without taking one: told before a portrait is decoded (a 40 MP
        photo took 2 s of CPU to be told the server was full); take_slot's own check is the one
        that holds when requests race."""
        with self._lock:
            self._refuse_if_full(owner)

    def _refuse_if_full(self, owner: str | None) -> None:
        """Busy when every session is taken, CallerLimit when `owner` holds its most (under the lock)."""
        if len(self._sessions) + self._opening >= self.settings.max_sessions:
            raise Busy(
                f"{self.settings.max_sessions} live session(s) are running, the most this server holds "
                "(live.max_sessions); try again shortly"
            )
        held = sum(s.owner == owner for s in self._sessions.values()) + self._opening_by[owner or ""]
        check_caller(self.settings, owner, held)

    def take_slot(self, owner: str | None = None) -> None:
        """Reserve room for a session of `owner` (a key's or account's; None: anonymous) before its
        (costly) preparation; Busy when full, CallerLimit when the caller holds its most."""
        with self._lock:
            self._refuse_if_full(owner)
            self._opening += 1
            if owner:
                self._opening_by[owner] += 1
        if self._helpers is not None:  # its imports run while the face is prepared
            threading.Thread(target=self._helpers.warm, name="sonic-live-warm", daemon=True).start()

    def give_slot(self, owner: str | None = None) -> None:
        with self._lock:
            self._opening -= 1
            if owner:
                self._opening_by[owner] -= 1
                if self._opening_by[owner] <= 0:  # callers seen once do not pile up
                    del self._opening_by[owner]

    def open(
        self,
        face: LiveFace,
        options: GenerateOptions,
        offer: dict,
        owner: str | None,
        paid_s: float | None = None,
        on_end: Callable[[ServedSession], None] | None = None,
        session_id: str | None = None,
        hold_id: str | None = None,
    ) -> tuple[ServedSession, dict]:
        """Start a session of the prepared face for the offer (checked: check_offer); (the session,
        its SDP answer). The caller holds a slot (take_slot), given back here whatever happens.
        `session_id`: the id, when the caller made it (a worker records the session first)."""
        try:
            engine = SessionProcess(face, options, self._helpers) if self._helpers else LiveSession(face, options)
            session = ServedSession(
                id=session_id or uuid.uuid4().hex,
                owner=owner,
                engine=engine,
                paid_s=paid_s,
                hold_id=hold_id,
                on_end=on_end,
            )
            try:
                answer = self.rtc.run(self._negotiate(session, offer), NEGOTIATE_TIMEOUT_S)
            except Exception as e:
                self._close_connection(session)
                engine.close()
                if isinstance(e, SonicError):
                    raise
                if isinstance(e, TimeoutError):  # the server's loop is overloaded, not the offer bad
                    raise Busy(f"the connection could not be set up within {NEGOTIATE_TIMEOUT_S:g} s; retry") from e
                # aiortc's parse errors are many kinds of exception, in its own words: logged, not shown
                log.warning("live offer refused by the WebRTC stack: %s: %s", type(e).__name__, e)
                raise InvalidParameter(
                    "offer: the session description could not be parsed or negotiated; send the one "
                    "RTCPeerConnection.createOffer() made, unchanged",
                    field="offer",
                ) from e
            with self._lock:
                self._sessions[session.id] = session
        finally:
            self.give_slot(owner)
        metrics.LIVE_OPENED.inc()
        threading.Thread(target=self._run, args=(session,), name=f"sonic-live-{session.id[:8]}", daemon=True).start()
        return session, answer

    async def _negotiate(self, session: ServedSession, offer: dict) -> dict:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        servers, _ = ice.configured(self.settings, ice.SERVER_NAME, time.time())
        servers = self._relay_watch.servers(servers)
        pc = session.pc = RTCPeerConnection(rtc_configuration(servers))
        session.video, session.audio = face_tracks(self.rtc.loop, session.engine.fps)

        def heard() -> None:
            session.last_heard = time.monotonic()

        sections = Sections.of(offer["sdp"])

        @pc.on("track")
        def on_track(track: Any) -> None:
            if sections.microphone is None:
                return
            microphone = pc.getTransceivers()[sections.microphone]
            if microphone.receiver.track is track:
                quicken_audio_receiver(microphone.receiver)
                session.tasks.append(self.rtc.loop.create_task(consume_microphone(track, session.engine.hear, heard)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("live session %s: connection %s", session.id, pc.connectionState)
            if pc.connectionState == "connected":
                session.last_heard = time.monotonic()
                session.connected.set()
            elif pc.connectionState in ("failed", "closed"):
                if pc.connectionState == "failed":  # the state's own line says only "failed"
                    log.warning("live session %s: its connection failed: %s", session.id, connection_failure(pc))
                threading.Thread(target=self.end, args=(session.id, "client_gone"), daemon=True).start()

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        # each track on its own section (aiortc's addTrack takes the first of its kind, which may
        # be one the client only sends on: a camera, a microphone; then nothing was sent)
        set_directions(pc, sections, session.video, session.audio)
        await pc.setLocalDescription(await pc.createAnswer())
        turn = [server.url for server in servers if ice.is_turn(server)]
        relayed = " typ relay" in pc.localDescription.sdp
        news = bool(turn) and self._relay_watch.asked(relayed)
        if news and relayed:
            log.warning("live session %s: the TURN server %s gave a relay address again", session.id, turn[0])
        elif turn and not relayed:
            # (aioice says nothing of it: a refused credential or a TURN server that does not answer
            # left the operator only its clients' failures to go by)
            log.warning(
                "live session %s: the TURN server %s gave it no relay address: is it reachable from this "
                "machine, and do its credentials match (live.turn_secret, or the URL's)? A client that cannot "
                "reach this server directly cannot connect. The next %g s of sessions gather without it",
                session.id,
                turn[0],
                self._relay_watch.retry_s,
            )
        sdp = announce_host(pc.localDescription.sdp, self.settings.public_host)
        return {"sdp": sdp, "type": pc.localDescription.type}

    def get(self, session_id: str, may_see: Callable[[str | None], bool]) -> ServedSession:
        with self._lock:
            session = self._sessions.get(session_id)
            ended = self._ended.get(session_id)
        if session is not None and may_see(session.owner):
            return session
        if session is None and ended is not None and may_see(ended[0]):
            raise SessionEnded(session_id, ended[1])
        raise SessionNotFound(f"no live session {session_id[:64]!r}: it ended, or never existed")

    # --- the clock -------------------------------------------------------------------------
    def _run(self, session: ServedSession) -> None:
        """The session's clock thread: frames to the tracks until the session ends."""
        engine, fps = session.engine, session.engine.fps
        try:
            if not session.connected.wait(self.settings.idle_timeout_s):
                self.end(session.id, "client_gone")
                return
            next_watch = time.monotonic() + WATCH_INTERVAL_S
            # (a client that finishes its DTLS handshake after the first keyframe went out cannot
            # decode what follows, and says so: browsers and aiortc send a picture-loss report,
            # and a keyframe follows (feedback.py paces them). Keyframes sent again blindly at 0.12,
            # 0.3 and 0.6 s each came coarse at a constant rate: every session started soft)
            for frame in engine.frames(session.stop):
                session.video.send(frame.yuv420(), frame.index, fps)
                if len(frame.audio):
                    session.audio.send(frame.audio, int(round(frame.index * SAMPLE_RATE / fps)))
                late_s = max(0.0, time.monotonic() - frame.due_at)
                session.stats.latency_sum_s += late_s
                session.stats.frames_sent += 1
                # counted as they go: a session of an hour is seen falling behind while it does
                metrics.LIVE_FRAMES.inc()
                metrics.LIVE_LATENCY.observe(engine.delay / fps + late_s)
                if session.stats.frames_sent == 1:
                    log.debug("live session %s: first frame handed to the connection", session.id)
                if session.paid_s is not None and session.streamed_s >= session.paid_s:
                    self.end(session.id, "credit_exhausted")  # each frame: not one is streamed unpaid
                    break
                if time.monotonic() >= next_watch:
                    next_watch += WATCH_INTERVAL_S
                    _count_late(session)
                    reason = self._should_end(session)
                    if reason:
                        self.end(session.id, reason)
            if not session.stop.is_set():  # the frames ended by themselves: the helper is gone
                how = session.engine.helper_ended() if isinstance(session.engine, SessionProcess) else "ended"
                log.error("live session %s: its frames stopped (the helper process: %s)", session.id, how)
                self.end(session.id, "error")
        except Exception:  # noqa: BLE001 - a session's fault ends that session only
            log.exception("live session %s failed", session.id)
            self.end(session.id, "error")
        finally:
            _count_late(session)  # the last of them (the clock thread counts them, alone)

    def _should_end(self, session: ServedSession) -> EndReason | None:
        """Why a running session should end now, if it should."""
        now = time.monotonic()
        if self.settings.max_session_s and now - session.created >= self.settings.max_session_s:
            return "max_session"
        self.rtc.call(lambda: self.rtc.loop.create_task(_look_at_connection(session)))
        # speech still queued does not keep it: a client killed mid-speech held its slot, "connected",
        # until the speech had played to no one (a live client's RTCP reports come every few seconds)
        if now - session.last_heard > self.settings.idle_timeout_s:
            return "client_gone"
        return None

    # --- the end ---------------------------------------------------------------------------
    def end(self, session_id: str, reason: EndReason) -> bool:
        """End a session (once: False if it had ended already)."""
        with self._lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._ended[session_id] = (session.owner, reason)
                while len(self._ended) > ENDED_KEPT:
                    self._ended.popitem(last=False)
        if session is None:
            return False
        session.ended_reason = reason
        session.stop.set()  # the clock stops: what was streamed is final
        metrics.LIVE_ENDED.labels(reason).inc()
        if session.on_end is not None:
            try:
                session.on_end(session)
            except Exception:  # noqa: BLE001 - the hold stays held, for the settler's sweep
                log.exception("live session %s: settling its credit failed; the settler will", session.id)
                if session.hold_id is not None:
                    with self._lock:
                        self._unsettled[session.hold_id] = UnsettledEnd(session.id, session.streamed_s, reason)
                        while len(self._unsettled) > ENDED_KEPT:
                            self._unsettled.popitem(last=False)
        log.info(
            "live session %s ended (%s) after %.1f s, %d frames, %d late",
            session.id,
            reason,
            session.streamed_s,
            session.stats.frames_sent,
            session.engine.late_frames,
        )
        self._close_connection(session)
        session.engine.close()
        return True

    def _close_connection(self, session: ServedSession) -> None:
        if session.pc is None or self._rtc is None:
            return
        for track in (session.video, session.audio):
            if track is not None:
                track.put(None)
        try:
            self._rtc.run(session.pc.close(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a connection that will not close cleanly is dropped
            log.warning("live session %s: the connection did not close cleanly; its transports are stopped", session.id)
            try:
                self._rtc.run(stop_transports(session.pc), CLOSE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - nothing more can be done; the log says so
                log.exception("live session %s: its transports did not stop", session.id)
        for task in session.tasks:  # a microphone that never sent anything is still awaited
            self._rtc.call(task.cancel)
        # ... and, cancelled, it refers back to the session (through `hear`): held here, the two
        # waited for the interpreter's full collection, an idle server's never, with the ring's
        # two shared-memory files open (a session that never connected: 2 descriptors each)
        session.tasks.clear()

    def close(self) -> None:
        """End every session (the server is stopping)."""
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.end(session_id, "server_stopping")
        if self._helpers is not None:
            self._helpers.close()


def cap_malloc_arenas() -> None:
    """At most MALLOC_ARENAS of glibc's per-thread arenas in this process. Each session's threads
    (its clock, its connection's) freed their frames and packets into arenas of their own (up to
    8 per core), each of which kept ~16 MB free: nothing leaked (no object of an ended session
    survived), yet a server of short sessions grew by ~1 MB each, up to 16 arenas' worth. No
    effect where the C library is not glibc (musl, macOS)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def connection_failure(pc: Any) -> str:
    """Which part of a failed connection gave up, in words for the operator's log: the network
    checks (ICE) or the encryption handshake after them (DTLS)."""
    transports = {t.sender.transport for t in pc.getTransceivers() if t.sender.transport is not None}
    if any(dtls.transport.state == "failed" for dtls in transports):
        return "ICE: no pair of addresses answered its checks (the client cannot reach this server's, or it left)"
    if any(dtls.state == "failed" for dtls in transports):
        return (
            "DTLS: the handshake failed (the client's certificate does not match its offer's fingerprint, "
            "or it left during the handshake)"
        )
    return "the WebRTC stack gave no cause"


async def _look_at_connection(session: ServedSession) -> None:
    """The client is alive while its bytes (media, or RTCP reports on what it receives) keep
    coming; what its reports say of the video is kept for the session's state."""
    if session.pc is None:
        return
    stats = (await session.pc.getStats()).values()
    received = max([getattr(stat, "bytesReceived", 0) or 0 for stat in stats], default=0)
    if received > session.bytes_seen:
        session.bytes_seen = received
        session.last_heard = time.monotonic()
    video = [stat for stat in stats if stat.type == "remote-inbound-rtp" and stat.kind == "video"]
    session.network = network_report(video[-1] if video else None, face_feedback(session.pc))


def network_report(stat: Any, sender: FeedbackCounts | None = None) -> NetworkReport:
    """A remote-inbound-rtp stat (the client's receiver report; None before its first) and
    what the face's sender did with the reports, as the state shows them. aiortc gives the
    report's fraction lost as sent, in 256ths."""
    rtt = getattr(stat, "roundTripTime", None)
    return NetworkReport(
        round_trip_ms=None if rtt is None else round(1000 * rtt, 1),
        packets_lost=max(0, int(getattr(stat, "packetsLost", 0) or 0)),
        fraction_lost=round((getattr(stat, "fractionLost", 0) or 0) / 256, 3),
        sender=sender if sender is not None else FeedbackCounts(),
    )


def hold_seconds(max_session_s: float) -> float:
    """The seconds a credit hold covers at most: the session's cap, or an hour without one."""
    return max_session_s if max_session_s > 0 else 3600.0


def live_orphan_s(settings: LiveSettings) -> float:
    """The age past which no session can still be using a live hold (its cap, the wait for its
    client, its opening, and ten minutes): the settler's sweep releases one left by a dead process."""
    return hold_seconds(settings.max_session_s) + settings.idle_timeout_s + NEGOTIATE_TIMEOUT_S + 600.0


async def stop_transports(pc: Any) -> None:
    """Stop a connection's DTLS and ICE transports directly, closing its sockets: for one whose
    close hung. (aiortc's receiver waits at its close for its RTCP task, which ends unmarked when
    a report is too long for SRTP, as one naming 60 or more of a client's SSRCs is: the session
    ended, and its connection stayed open on the server, uncounted, for as long as the client
    kept it.)"""
    dtls = {t.receiver.transport for t in pc.getTransceivers() if t.receiver.transport is not None}
    if pc.sctp is not None:
        dtls.add(pc.sctp.transport)
    for transport in dtls:
        for stop in (transport.stop, transport.transport.stop):  # DTLS, then its ICE transport (the socket)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop(), TRANSPORT_STOP_S)
