"""A worker's live sessions (distributed mode): the commands API processes send through Redis
(relay.py) are carried out on this worker's own registry (sessions.py), and each session's
record is kept: created when it opens, its lease and seconds renewed by the worker's heartbeat,
ended with its reason when it ends here (settling its credit hold) unless a reaper ended it first.

The media never pass through Redis or the API: the client's connection is to this worker, at the
candidates its answer names (`live.host_addresses`, `live.public_host`, a TURN server).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from sonic.checks import load_portrait
from sonic.errors import Busy, InvalidParameter, SonicError
from sonic.options import GenerateOptions

from ..logs import Quietly
from ..settings import ServerConfig
from . import END_REASONS, EndReason, relay
from .relay import LiveRecord, Records
from .sessions import LiveSessions, ServedSession, check_offer

log = logging.getLogger("sonic.live")
WAIT_S = 1  # the command loop looks at its stop flag this often (s)
# a session's first lease covers its opening (a helper started, the offer answered), which its
# worker's beat does not renew yet
OPEN_GRACE_S = 45.0


class LiveHost:
    """The live side of one `sonic worker`: its registry, its records, its command loop."""

    def __init__(
        self, settings: ServerConfig, pipeline: Any, name: str, records: Records, settle: relay.Settle | None
    ) -> None:
        self.settings, self.pipeline, self.name = settings, pipeline, name
        self.lease_s = settings.server.worker_lease_s
        self.records, self.settle = records, settle
        self.live = LiveSessions(settings.live)
        self.draining = threading.Event()  # SIGTERM: no new sessions; the running ones may finish
        self.on_change: Callable[[], None] = lambda: None  # the worker announces its new figures
        self._lanes = Lanes(lambda item: self._carry_out_in_time(*item))
        # each running session's record as this worker made it: its hold is settled from it
        # where the shared record is gone (Redis restarted without its data)
        self._made: dict[str, LiveRecord] = {}

    # --- what the worker announces -----------------------------------------------------------
    def capacity(self) -> dict:
        """This worker's live figures for its entry in the worker list (and /health)."""
        live = self.settings.live
        return {
            "live_sessions": self.live.count(),
            "live_slots": 0 if self.draining.is_set() else self.live.free_slots(),
            "live_max_sessions": live.max_sessions,
            "live_host": live.public_host or ",".join(live.host_addresses) or None,
            "draining": self.draining.is_set(),
        }

    def beat(self, records: Records) -> None:
        """Renew each running session's lease and note its streamed seconds (on the heartbeat's
        own connection: `records`); a session whose record was ended elsewhere meanwhile (this
        worker was cut off past its lease; it was settled then), or is gone, stops here too, in a
        thread of its own: closing it must not hold the heartbeat back."""
        for session in self.live.running():
            if not records.beat(session.id, session.streamed_s, self.lease_s):
                threading.Thread(target=self._end_lost, args=(session.id,), daemon=True).start()

    def _end_lost(self, session_id: str) -> None:
        """A session whose record ended elsewhere (this worker was declared lost), or whose record
        is gone: it ends here too."""
        self.live.end(session_id, "worker_lost")

    # --- the commands ------------------------------------------------------------------------
    def serve(self, conn: Any, stop: threading.Event) -> None:
        """The command loop (its own thread and Redis connection) until `stop`."""
        reads = Quietly(log, f"worker {self.name}: reading live commands", "trying again")
        while not stop.is_set():
            try:
                command = relay.take_command(conn, self.name, WAIT_S)
            except Exception as e:  # noqa: BLE001 - Redis away: the heartbeat says so; try again
                reads.failed(e)
                stop.wait(WAIT_S)
                continue
            reads.worked()
            if command is None:
                continue
            if command.get("op") in ("open", "end"):  # slow ones (a face, a connection) in their own thread
                threading.Thread(target=self._carry_out, args=(conn, command), daemon=True).start()
            else:  # in order per session; one session's slow command holds up no other's
                self._lanes.put(str(command.get("session_id")), (conn, command))

    def _carry_out_in_time(self, conn: Any, command: dict) -> None:
        """A command that waited in its session's lane: carried out while its sender still waits
        (a speak its sender gave up on and will send again must not be spoken twice)."""
        try:
            late = float(command.get("deadline", 0)) < relay.redis_time(conn)
        except Exception:  # noqa: BLE001 - Redis away: its sender cannot be answered either
            return
        if late:
            log.info("live: dropped a %s command that waited past its deadline", command.get("op"))
            return
        self._carry_out(conn, command)

    def _carry_out(self, conn: Any, command: dict) -> None:
        try:
            reply = self.execute(command)
        except SonicError as e:
            reply = {"error": e.to_dict()}
        except Exception:  # noqa: BLE001 - one command's fault is answered, the loop goes on
            log.exception("live command %s failed", command.get("op"))
            reply = {"error": {"code": "internal_error", "message": "the live session's worker failed"}}
        try:
            relay.answer(conn, command, reply)
        except Exception:  # noqa: BLE001 - the sender times out
            log.warning("worker %s: a live answer could not be sent", self.name)

    def execute(self, command: dict) -> dict:
        op = command.get("op")
        if op == "open":
            return self.open(command)
        session = self.live.get(str(command.get("session_id")), lambda owner: True)  # the API checked the caller
        if op == "speak":
            pcm = np.frombuffer(relay.unpack(command["pcm"]), "<i2").astype(np.float32) / 32768.0
            turn, limit = command.get("turn"), command.get("limit_s")
            turn, limit = None if turn is None else int(turn), None if limit is None else float(limit)
            spoken = session.speak(pcm, turn, limit, bool(command.get("whole")))
            return {"queued_s": spoken.queued_s, "dropped_s": spoken.dropped_s, "turn": session.turn}
        if op == "interrupt":
            session.interrupt()
            return {"interrupted": True}
        if op == "state":
            return {**session.state(), "worker": self.name}
        if op == "end":
            reason = command.get("reason", "client_closed")
            if reason not in END_REASONS:  # the API process sends one of them
                raise InvalidParameter(f"unknown end reason {reason!r}")
            return {"ended": self.live.end(session.id, cast("EndReason", reason))}
        raise InvalidParameter(f"unknown live command {op!r}")

    def open(self, command: dict) -> dict:
        """Prepare the face and answer the offer; the session's record exists before the answer."""
        if self.draining.is_set():
            raise Busy(f"worker {self.name} is stopping and takes no new live sessions")
        rgb = load_portrait(io.BytesIO(relay.unpack(command["image"])), self.settings.limits)
        options = GenerateOptions.from_dict(command.get("params") or {}, self.settings, ignore=("async", "decoder"))
        offer = command.get("offer") or {}
        check_offer(offer)
        hold = command.get("hold")
        self.live.take_slot(command.get("owner"))
        handed = False
        try:
            face = self.live.prepare_face(self.pipeline, rgb, options)
            record = LiveRecord(
                id=uuid.uuid4().hex,
                worker=self.name,
                owner=command.get("owner"),
                created=time.time(),
                hold_id=hold["id"] if hold else None,
                hold_s=float(hold["seconds"]) if hold else None,
            )
            self.records.create(record, self.lease_s + OPEN_GRACE_S)
            self._made[record.id] = record
            handed = True  # open() gives the slot back, whatever happens
            try:
                _, answer = self.live.open(
                    face, options, offer, record.owner, record.hold_s, self._ended, session_id=record.id
                )
            except Exception:
                self._made.pop(record.id, None)
                self.records.end(record.id, "error", 0.0)  # the API process releases the hold
                raise
        finally:
            if not handed:
                self.live.give_slot(command.get("owner"))
            self.on_change()
        if not relay.claim(self.records.r, command):
            # the opener gave up waiting and answered its client an error: nobody will connect.
            # Its record ends first, unsettled (the opener releases the hold), then the session
            log.warning("live session %s: its opener stopped waiting; ended", record.id)
            self.records.end(record.id, "client_gone", 0.0)
            self.live.end(record.id, "client_gone")
        return {"session_id": record.id, "answer": answer, "worker": self.name, "warnings": face.warnings}

    def _ended(self, session: ServedSession) -> None:
        """A session ended here: its record says why and what it streamed, and its hold is settled
        (unless a reaper ended the record first and settled it)."""
        made = self._made.pop(session.id, None)
        reason = session.ended_reason or "error"
        rec = self.records.end(session.id, reason, session.streamed_s)
        if rec is None and made is not None and self.records.load(session.id) is None:
            # the shared record is gone: nobody else knows what it streamed, this worker settles
            rec = dataclasses.replace(made, streamed_s=session.streamed_s, ended=reason, ended_at=time.time())
            log.warning("live session %s: its record was gone (Redis lost its data); settled here", session.id)
        if rec is not None and self.settle is not None:
            self.settle(rec)
        threading.Thread(target=self.on_change, daemon=True).start()  # once the registry let it go

    # --- the end -----------------------------------------------------------------------------
    def drain(self, drain_s: float) -> None:
        """Stop taking sessions; let the running ones go on up to drain_s, then end them."""
        self.draining.set()
        deadline = time.monotonic() + drain_s
        if self.live.count():
            log.info("worker %s: draining %d live session(s), up to %.0f s", self.name, self.live.count(), drain_s)
        # sessions still opening count: one that passed the draining check registers after it
        while (self.live.count() or self.live.opening()) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.live.close()  # what is left ends: server_stopping


class Lanes:
    """Work in lanes: each key's items run in order on a thread of that key's while it has
    items waiting, so that one key's slow item (a long speech's transfer, a helper slow to
    answer) holds up no other key's."""

    def __init__(self, run: Callable[[Any], None]) -> None:
        self._run = run
        self._waiting: dict[str, deque] = {}
        self._lock = threading.Lock()

    def put(self, key: str, item: Any) -> None:
        with self._lock:
            lane = self._waiting.get(key)
            if lane is not None:  # its thread is running: it takes this one in turn
                lane.append(item)
                return
            self._waiting[key] = deque([item])
        threading.Thread(target=self._drain, args=(key,), name="sonic-live-lane", daemon=True).start()

    def _drain(self, key: str) -> None:
        while True:
            with self._lock:
                lane = self._waiting[key]
                if not lane:
                    del self._waiting[key]
                    return
                item = lane.popleft()
            try:
                self._run(item)
            except Exception:  # noqa: BLE001 - one item's fault must not stop its lane
                log.exception("live: a command failed in its lane")
