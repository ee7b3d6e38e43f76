"""Live sessions on workers (distributed mode): what the API processes and the `sonic worker`s
share through Redis. An API process places a session on a worker and steers it with commands;
the worker runs it (sonic_server/live/host.py) and keeps its record.

Redis keys (prefix `sonic:`):
- `live:cmd:<worker>`  a list: commands for that worker (open, speak, interrupt, state, end), JSON,
                       each with the list its answer goes to and a deadline (a late one is dropped);
- `live:reply:<id>`    a list: the answer to one command, taken by the API process that waits for it;
- `live:session:<id>`  the session's record (LiveRecord, JSON): its worker, owner, credit hold, the
                       seconds streamed so far and, once it ended, why (kept RECORD_TTL_S after);
- `live:lease:<id>`    renewed by the worker's heartbeat; a running session whose lease lapsed has
                       lost its worker, and the first process to see it ends it `worker_lost`;
- `live:running`       the set of running sessions (what the reapers look at);
- `live:hold:<id>`     a credit hold's session (the credit settler's sweep settles a hold whose
                       session ended but was not settled: its settling process died meanwhile);
- `live:claim:<id>`    an open command's answer is still awaited: the worker takes it (DEL) before
                       answering, and a session whose opener gave up is ended, never handed over.

A record ends exactly once (`end_record`, one Lua script): by its worker (the client's DELETE,
client gone, limits, drain) or by a reaper (the lease lapsed), whichever comes first; only that
one settles the credit hold, for the seconds the record says were streamed.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import redis as redis_lib

from sonic.errors import SonicError

from .. import metrics
from ..queue.redis import PREFIX

log = logging.getLogger("sonic.live")
RUNNING = PREFIX + "live:running"
RECORD_TTL_S = 3600  # an ended session's record answers "ended (why)" this long, then 404s
COMMAND_TTL_S = 120  # a worker's command list disappears when nobody reads it (the worker is gone)
REPLY_TTL_S = 60
POLL_S = 1  # how often (s) a waiting API process looks whether the worker is still alive


def command_key(worker: str) -> str:
    return PREFIX + f"live:cmd:{worker}"


def record_key(session_id: str) -> str:
    return PREFIX + f"live:session:{session_id}"


def lease_key(session_id: str) -> str:
    return PREFIX + f"live:lease:{session_id}"


def hold_key(hold_id: str) -> str:
    return PREFIX + f"live:hold:{hold_id}"


def claim_key(reply_to: str) -> str:
    return PREFIX + f"live:claim:{reply_to}"


def reply_key(reply_to: str) -> str:
    return PREFIX + f"live:reply:{reply_to}"


def pack(data: bytes) -> str:
    """Bytes (an image, PCM) inside a JSON command."""
    return base64.b64encode(data).decode()


def unpack(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass
class LiveRecord:
    """A session as every process sees it."""

    id: str
    worker: str
    owner: str | None
    created: float
    hold_id: str | None = None  # credits: the hold the session streams against
    hold_s: float | None = None
    streamed_s: float = 0.0  # as the worker's last heartbeat (or its end) reported it
    ended: str | None = None  # why it ended; None while it runs
    ended_at: float | None = None

    @classmethod
    def from_json(cls, raw: bytes | str) -> LiveRecord:
        data = json.loads(raw)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})  # a newer writer's extras ignored


# KEYS: record, lease, running set. ARGV: reason, seconds streamed ("": keep the record's), now,
# "1": only while the lease is absent, the ended record's TTL. Returns the ended record, or nil.
_END = """
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local rec = cjson.decode(raw)
if rec['ended'] ~= nil and rec['ended'] ~= cjson.null then return nil end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return nil end
rec['ended'] = ARGV[1]
if ARGV[2] ~= '' then rec['streamed_s'] = tonumber(ARGV[2]) end
rec['ended_at'] = tonumber(ARGV[3])
local out = cjson.encode(rec)
redis.call('SET', KEYS[1], out, 'EX', tonumber(ARGV[5]))
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], rec['id'])
return out
"""
# KEYS: record, lease. ARGV: seconds streamed, the lease in ms. The worker's beat: renews a running
# session's lease and notes what it streamed; 0 when the session has been ended elsewhere.
_BEAT = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['ended'] ~= nil and rec['ended'] ~= cjson.null then return 0 end
rec['streamed_s'] = tonumber(ARGV[1])
redis.call('SET', KEYS[1], cjson.encode(rec))
redis.call('SET', KEYS[2], '1', 'PX', tonumber(ARGV[2]))
return 1
"""


class Records:
    """The session records in Redis: written by the worker that runs each, read by every process."""

    def __init__(self, conn: redis_lib.Redis) -> None:
        self.r = conn
        self._end = conn.register_script(_END)
        self._beat = conn.register_script(_BEAT)

    def create(self, rec: LiveRecord, lease_s: float) -> None:
        """`lease_s`: the first lease, long enough for the session to open (its worker's beat
        renews it once the session runs)."""
        p = self.r.pipeline()  # MULTI: record, lease and indexes appear together
        p.set(record_key(rec.id), json.dumps(asdict(rec)))
        p.set(lease_key(rec.id), "1", px=int(lease_s * 1000))
        p.sadd(RUNNING, rec.id)
        if rec.hold_id:  # the credit settler finds the session of a hold (Settler.sweep)
            p.set(hold_key(rec.hold_id), rec.id, ex=RECORD_TTL_S + int(rec.hold_s or 0) + int(lease_s))
        p.execute()

    def by_hold(self, hold_id: str) -> LiveRecord | None:
        """The session that streams against a credit hold, if any is known."""
        session_id = cast("bytes | None", self.r.get(hold_key(hold_id)))
        return self.load(session_id.decode()) if session_id else None

    def load(self, session_id: str) -> LiveRecord | None:
        raw = cast("bytes | None", self.r.get(record_key(session_id)))
        return LiveRecord.from_json(raw) if raw else None

    def beat(self, session_id: str, streamed_s: float, lease_s: float) -> bool:
        return bool(
            self._beat(keys=[record_key(session_id), lease_key(session_id)], args=[streamed_s, int(lease_s * 1000)])
        )

    def end(
        self, session_id: str, reason: str, streamed_s: float | None = None, lease_lapsed: bool = False
    ) -> LiveRecord | None:
        """End the record (once: None if it had ended, or is unknown); the ended record."""
        out = self._end(
            keys=[record_key(session_id), lease_key(session_id), RUNNING],
            args=[
                reason,
                "" if streamed_s is None else repr(float(streamed_s)),
                time.time(),
                "1" if lease_lapsed else "0",
                RECORD_TTL_S,
            ],
        )
        return LiveRecord.from_json(out) if out else None

    def running(self) -> list[str]:
        return [m.decode() for m in cast("set[bytes]", self.r.smembers(RUNNING))]

    def lapsed(self, session_id: str) -> bool:
        return not self.r.exists(lease_key(session_id))


Settle = Callable[[LiveRecord], None]


def reap_lost(records: Records, settle: Settle | None, only: Iterable[str] | None = None) -> list[LiveRecord]:
    """End `worker_lost` every running session whose lease lapsed (its worker was killed or cut
    off), settling each one's hold for the seconds it streamed; the records this call ended."""
    ended = []
    for session_id in records.running() if only is None else only:
        if not records.lapsed(session_id):
            continue
        rec = records.end(session_id, "worker_lost", lease_lapsed=True)
        if rec is None:
            continue  # ended meanwhile, by its worker or another reaper
        log.warning("live session %s: its worker %s stopped answering; ended (worker_lost)", rec.id, rec.worker)
        metrics.LIVE_ENDED.labels("worker_lost").inc()
        ended.append(rec)
        if settle is not None:
            try:
                settle(rec)
            except Exception:  # noqa: BLE001 - the hold stays held; the ledger's check shows it
                log.exception("live session %s: settling its credit failed", rec.id)
    return ended


# --- commands ------------------------------------------------------------------------------
class WorkerUnreachable(SonicError):
    """The worker a session runs on, or was being placed on, did not answer in time."""

    code = "not_ready"


def relayed_error(err: dict) -> SonicError:
    """A worker's error, raised again in the API process with its code, message and field."""
    e = SonicError(str(err.get("message", "the worker failed")), err.get("field"))
    e.code = str(err.get("code", "internal_error"))
    return e


def redis_time(conn: redis_lib.Redis) -> float:
    """Redis' own clock: every machine's deadlines are read on it (their clocks may differ)."""
    seconds, micros = cast("tuple[int, int]", conn.time())
    return seconds + micros / 1e6


def call(conn: redis_lib.Redis, worker: str, op: str, timeout_s: float, **fields: Any) -> dict:
    """Send a command to a worker and wait for its answer; the worker's error raised here, and
    WorkerUnreachable when it does not answer within timeout_s or leaves the worker list.
    An `open` is handed over once: if this side gives up first, the worker ends the session it
    made instead of answering (claim_key)."""
    reply_to = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    command = json.dumps({"op": op, "reply_to": reply_to, "deadline": redis_time(conn) + timeout_s, **fields})
    p = conn.pipeline()
    if op == "open":
        p.set(claim_key(reply_to), 1, ex=int(timeout_s) + REPLY_TTL_S)
    p.rpush(command_key(worker), command)
    p.expire(command_key(worker), COMMAND_TTL_S)
    p.execute()
    while True:
        reply = _wait_reply(conn, reply_to, deadline - time.monotonic())
        if reply is not None:
            return _unwrap(reply)
        if time.monotonic() >= deadline or not conn.exists(PREFIX + f"worker:{worker}"):
            break  # too late, or gone from the worker list: it will not answer
    if op == "open" and not conn.delete(claim_key(reply_to)):
        reply = _wait_reply(conn, reply_to, 5.0)  # the worker took it just now: its answer is coming
        if reply is not None:
            return _unwrap(reply)
    raise WorkerUnreachable(f"live sessions: worker {worker} did not answer; retry shortly")


def _wait_reply(conn: redis_lib.Redis, reply_to: str, left_s: float) -> dict | None:
    if left_s <= 0:
        return None
    # whole seconds: Redis before 6 takes no fractions (and a second is the worker-list look's rhythm)
    got = conn.blpop([reply_key(reply_to)], timeout=max(1, min(POLL_S, math.ceil(left_s))))
    return json.loads(cast("tuple[bytes, bytes]", got)[1]) if got else None


def _unwrap(reply: dict) -> dict:
    if "error" in reply:
        raise relayed_error(reply["error"])
    return reply


def take_command(conn: redis_lib.Redis, worker: str, wait_s: int) -> dict | None:
    """The worker's next command that is still wanted (its sender still waits), or None."""
    got = conn.blpop([command_key(worker)], timeout=wait_s)
    if not got:
        return None
    command = json.loads(cast("tuple[bytes, bytes]", got)[1])
    if float(command.get("deadline", 0)) < redis_time(conn):
        log.info("live: dropped a %s command that waited past its deadline", command.get("op"))
        return None
    return command


def claim(conn: redis_lib.Redis, command: dict) -> bool:
    """The worker takes an open command's answer over (False: the sender gave up waiting)."""
    return bool(conn.delete(claim_key(command["reply_to"])))


def answer(conn: redis_lib.Redis, command: dict, reply: dict) -> None:
    p = conn.pipeline()
    p.rpush(reply_key(command["reply_to"]), json.dumps(reply))
    p.expire(reply_key(command["reply_to"]), REPLY_TTL_S)
    p.execute()


def settler(billing: Any) -> Settle | None:
    """With credits (a Billing): what charges an ended record's streamed seconds to its hold."""
    if billing is None:
        return None
    from ..accounts.billing import LiveHold

    def settle(rec: LiveRecord) -> None:
        if rec.hold_id is None:
            return
        reason = f"live session {rec.id}: {rec.streamed_s:.1f} s ({rec.ended})"
        billing.settle_live(LiveHold(rec.hold_id, rec.hold_s or 0.0), rec.streamed_s, reason)

    return settle
