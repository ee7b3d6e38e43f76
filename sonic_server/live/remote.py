"""Live sessions in distributed mode, as an API process sees them: each one runs on a `sonic
worker` (host.py), placed on the least loaded worker with a free slot and steered through Redis
(relay.py), from any API process. The routes use this registry as they use the in-process one.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis as redis_lib

from sonic.errors import Busy, InputTooLarge, SonicError
from sonic.live.session import Spoken

from ..queue.redis import PREFIX, RELEASE_HELD, connect, live_workers
from ..settings import LiveSettings
from . import relay
from .relay import Records, WorkerUnreachable
from .sessions import SPEAK_WAIT_S, CallerLimit, SessionEnded, SessionNotFound, Turn, check_caller, speaker_busy

log = logging.getLogger("sonic.live")
OPEN_TIMEOUT_S = 45.0  # the face prepared and the offer answered on the worker (a first session imports)
COMMAND_TIMEOUT_S = 5.0  # speak, interrupt, state, end
OPENING_LOCK_S = OPEN_TIMEOUT_S + 20.0  # a caller's open in progress (the slowest); lapses if its API process dies
OPENING_WAIT_S = 10.0  # a caller's next open waits this long for the one in progress, then 429 + Retry-After
# the lock is let go only by the open that took it (one that outlived its lock must not free another's)
# a portrait goes to its worker through Redis, in the open command: one sent larger than its
# own pixels (bytes appended to a small JPEG: 47 MB that decode to 256x300) is sent as those
# pixels instead, and one that is still larger than this is refused
FORWARDED_PORTRAIT_MAX_BYTES = 16 * 1024 * 1024


TICKET_LEASE_S = 3.0  # a speak request's place in line lapses this long after its process stops renewing it
TURN_POLL_S = 0.05  # how often a waiting request looks at the head of the line
# KEYS: the line, the holder's key; ARGV: the leases' prefix, this ticket. The head of the line
# once the one there is dropped if its lease has lapsed (its API process died); when it is this
# ticket, its turn is taken: it is written down as the holder, the one an interrupt lets go
TAKE_TURN = """
local head = redis.call('LINDEX', KEYS[1], 0)
if head and redis.call('EXISTS', ARGV[1] .. head) == 0 then
  redis.call('LREM', KEYS[1], 1, head)
  head = redis.call('LINDEX', KEYS[1], 0)
end
if head == ARGV[2] then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', 86400)
  return 1
end
return 0
"""
# KEYS: the line, the holder's key; ARGV: a ticket, or '' for whichever holds the turn (an
# interrupt). That ticket leaves the line, and is no longer the holder if it was
LEAVE = """
local ticket = ARGV[1]
if ticket == '' then ticket = redis.call('GET', KEYS[2]) end
if not ticket then return 0 end
if redis.call('GET', KEYS[2]) == ticket then redis.call('DEL', KEYS[2]) end
return redis.call('LREM', KEYS[1], 1, ticket)
"""


class SharedSpeakTurns:
    """sessions.SpeakTurns for every API process at once: each session's speak requests in one
    line in Redis, first come first served, whichever API process each reaches (two requests
    through two processes were spliced into one another). A request's place is a ticket in
    `sonic:live:speak:<session>`, kept by a lease its process renews; one whose process died
    lapses, and the line moves on. While Redis is away for longer than a lease, a turn may be
    given to the next request before the one holding it has ended."""

    def __init__(self, r: Any) -> None:
        self.r = r
        self._take = r.register_script(TAKE_TURN)
        self._leave = r.register_script(LEAVE)

    @staticmethod
    def _keys(session_id: str) -> list[str]:
        return [PREFIX + "live:speak:" + session_id, PREFIX + "live:speak-holder:" + session_id]

    @contextmanager
    def turn(self, session_id: str, wait_s: float = SPEAK_WAIT_S) -> Iterator[Turn]:
        keys, ticket = self._keys(session_id), uuid.uuid4().hex
        lease = PREFIX + "live:speak-ticket:"
        done = threading.Event()  # the request left the line: the renewals stop

        def leave(_: Turn) -> None:
            done.set()
            try:
                self._leave(keys=keys, args=[ticket])
                self.r.delete(lease + ticket)
            except redis_lib.RedisError:
                pass  # its lease lapses, and the line moves on: the request's own answer stands

        def renew() -> None:
            while not done.wait(TICKET_LEASE_S / 3):
                try:
                    self.r.set(lease + ticket, 1, px=int(TICKET_LEASE_S * 1000))
                except redis_lib.RedisError:
                    pass  # the next renewal, or the lapse: the line moves on without this request

        self.r.set(lease + ticket, 1, px=int(TICKET_LEASE_S * 1000))
        self.r.rpush(keys[0], ticket)
        self.r.expire(keys[0], 24 * 3600)  # a line outlives no session by long
        threading.Thread(target=renew, name="sonic-speak-turn", daemon=True).start()
        turn = Turn(leave)
        try:
            deadline = time.monotonic() + wait_s
            while not self._take(keys=keys, args=[lease, ticket]):
                if time.monotonic() >= deadline:
                    raise speaker_busy(wait_s)
                time.sleep(TURN_POLL_S)
            yield turn
        finally:
            turn.release()

    def waiting(self, session_id: str) -> int:
        """As SpeakTurns.waiting, over every API process."""
        return int(self.r.llen(self._keys(session_id)[0]))

    def interrupted(self, session_id: str) -> None:
        """As SpeakTurns.interrupted: the request holding the turn lets the next one go. (The
        session itself is interrupted already: a Redis error here only leaves the holder to
        let go by itself, when its stream ends.)"""
        try:
            self._leave(keys=self._keys(session_id), args=[""])
        except redis_lib.RedisError:
            pass


@dataclass
class RemoteSession:
    """A handle on a session that runs on a worker: each call is a command to it."""

    id: str
    worker: str
    conn: Any
    turn: int = 0  # the session's turn, as the worker's last answer to `speak` gave it

    def speak(
        self, pcm: np.ndarray, turn: int | None = None, limit_s: float | None = None, whole: bool = False
    ) -> Spoken:
        s16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
        reply = self._call("speak", pcm=relay.pack(s16), turn=turn, limit_s=limit_s, whole=whole)
        self.turn = int(reply.get("turn", 0))
        return Spoken(float(reply["queued_s"]), float(reply.get("dropped_s", 0.0)))

    def interrupt(self) -> None:
        self._call("interrupt")

    def state(self) -> dict:
        return self._call("state")

    def end(self, reason: str) -> bool:
        return bool(self._call("end", reason=reason).get("ended"))

    def _call(self, op: str, **fields: Any) -> dict:
        return relay.call(self.conn, self.worker, op, COMMAND_TIMEOUT_S, session_id=self.id, **fields)


class RemoteSessions:
    """The API process's view of every worker's live sessions."""

    def __init__(self, settings: LiveSettings, redis_url: str, settle: relay.Settle | None) -> None:
        self.settings = settings
        self.r = connect(redis_url)
        self.records = Records(self.r)
        self.settle = settle
        self.speakers = SharedSpeakTurns(self.r)

    # --- the figures /health and /metrics show ----------------------------------------------
    def workers(self) -> list[dict]:
        """The workers that host live sessions (their heartbeat carries live_slots)."""
        return [w for w in live_workers(self.r) if "live_slots" in w]

    def count(self) -> int:
        return sum(int(w.get("live_sessions", 0)) for w in self.workers())

    def count_of(self, owner: str) -> int:
        """Sessions of a caller running on any worker."""
        records = (self.records.load(session_id) for session_id in self.records.running())
        return sum(rec is not None and rec.owner == owner for rec in records)

    @contextmanager
    def opening(self, owner: str | None) -> Iterator[None]:
        """Open a session of `owner` within live.max_sessions_per_caller: its opens go one at a
        time, whichever API process takes them, and each counts the caller's sessions once the
        one before it has registered its own (opens sent at the same moment passed the count
        together). Anonymous callers cannot be told apart, and are not counted."""
        if not owner or not self.settings.max_sessions_per_caller:
            yield
            return
        lock = PREFIX + "live:opening:" + hashlib.sha256(owner.encode()).hexdigest()[:32]
        token = uuid.uuid4().hex
        deadline = time.monotonic() + OPENING_WAIT_S  # a request thread waits: not for long
        while not self.r.set(lock, token, nx=True, px=int(OPENING_LOCK_S * 1000)):
            if time.monotonic() > deadline:
                raise CallerLimit("another live session of this caller is still being opened; retry when it is")
            time.sleep(0.05)
        try:
            check_caller(self.settings, owner, self.count_of(owner))
            yield
        finally:
            try:
                self.r.eval(RELEASE_HELD, 1, lock, token)
            except redis_lib.RedisError:  # the open's own answer stands; the lock lapses by itself
                log.warning("live: a caller's opening lock could not be let go (Redis away); it lapses")

    def free_slots(self) -> int:
        return sum(int(w.get("live_slots", 0)) for w in self.workers())

    def health(self) -> dict:
        """What /health shows: the workers' sessions, free slots and most sessions, summed (each
        worker's max_sessions is its own setting); sessions whose worker was lost are ended first."""
        self.reap()
        workers = self.workers()
        return {
            "enabled": self.settings.enabled,
            "sessions": sum(int(w.get("live_sessions", 0)) for w in workers),
            "slots": sum(int(w.get("live_slots", 0)) for w in workers),
            "max_sessions": sum(int(w.get("live_max_sessions", self.settings.max_sessions)) for w in workers),
        }

    def session_of_hold(self, hold_id: str) -> relay.LiveRecord | None:
        """The record of the session that streams against a credit hold (the settler's sweep)."""
        return self.records.by_hold(hold_id)

    def reap(self) -> None:
        """End the sessions whose worker stopped answering (worker_lost), settling their holds."""
        relay.reap_lost(self.records, self.settle)

    # --- a session's life ----------------------------------------------------------------------
    def start(
        self, image: bytes, params: dict, offer: dict, owner: str | None, hold: Any
    ) -> tuple[str, str, dict, list[str]]:
        """Place a session on the least loaded worker with a free slot (the next one if that one
        filled meanwhile); (session id, worker, SDP answer, the photo's warnings). Busy when none
        has room."""
        workers = self.workers()
        if not workers:
            raise WorkerUnreachable("no worker hosts live sessions: start `sonic worker` (live.enabled)")
        # the least loaded first, of those that announced a free slot (a worker announces at once
        # when a slot frees): each one tried is sent the portrait, and a full one used to be too
        candidates = [w for w in workers if not w.get("draining") and int(w.get("live_slots", 0)) > 0]
        candidates.sort(key=lambda w: int(w.get("live_sessions", 0)))
        command = {
            "image": relay.pack(image),
            "params": params,
            "offer": offer,
            "owner": owner,
            "hold": {"id": hold.id, "seconds": hold.seconds} if hold is not None else None,
        }
        for worker in candidates:
            name = str(worker["name"])
            try:
                reply = relay.call(self.r, name, "open", OPEN_TIMEOUT_S, **command)
            except WorkerUnreachable:
                raise  # not another worker: the hold is released first (a late session there is abandoned)
            except SonicError as e:
                if e.code != "busy":
                    raise
                log.info("live: worker %s had no free slot after all; trying the next", name)
                continue
            # counted opened by its worker
            return str(reply["session_id"]), name, reply["answer"], list(reply.get("warnings", []))
        raise Busy(
            f"every worker's live sessions are taken ({len(workers)} worker(s), live.max_sessions "
            f"{self.settings.max_sessions} each); try again shortly"
        )

    def get(self, session_id: str, may_see: Callable[[str | None], bool]) -> RemoteSession:
        rec = self.records.load(session_id)
        if rec is not None and rec.ended is None and self.records.lapsed(session_id):
            relay.reap_lost(self.records, self.settle, only=[session_id])
            rec = self.records.load(session_id)
        if rec is None or not may_see(rec.owner):
            raise SessionNotFound(f"no live session {session_id[:64]!r}: it ended, or never existed")
        if rec.ended is not None:
            raise SessionEnded(session_id, rec.ended)
        return RemoteSession(rec.id, rec.worker, self.r)

    def end(self, session_id: str, reason: str) -> bool:
        return self.get(session_id, lambda owner: True).end(reason)

    def close(self) -> None:
        """Nothing runs here: the workers' sessions go on when an API process stops."""


def forwarded_portrait(data: bytes, rgb: np.ndarray) -> bytes:
    """What a worker is sent of a checked portrait (`data` as uploaded, `rgb` its pixels as this
    process decoded them): the bytes themselves, which the worker reads as this process did;
    unless they outweigh those pixels (junk appended; a photo over 16 MP, decoded reduced): then
    the pixels as a PNG, the same pixels on the worker; and where that is still over
    FORWARDED_PORTRAIT_MAX_BYTES (a large photo), as a JPEG of quality 95. InputTooLarge if
    even that is over."""
    import cv2

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    if len(data) > rgb.nbytes:
        ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if ok and len(png) < len(data):
            data = png.tobytes()
    if len(data) > FORWARDED_PORTRAIT_MAX_BYTES:
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        if ok and len(jpeg) < len(data):
            data = jpeg.tobytes()
    if len(data) > FORWARDED_PORTRAIT_MAX_BYTES:
        raise InputTooLarge(
            f"image: a live session's portrait goes to its worker, at most {FORWARDED_PORTRAIT_MAX_BYTES / 2**20:g} MB "
            f"even as a JPEG ({len(data) / 2**20:.1f} MB); send a smaller photo",
            field="image",
        )
    return data
