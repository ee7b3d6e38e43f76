"""Job webhooks: the job's public document POSTed to the caller's URL when it starts, as it
progresses and when it ends (`webhook_events_filter`: start, progress, completed; default
completed), signed, retried, in order per job, at least once.

- A delivery is written to the outbox (`Outbox`: SQLite or memory beside the job records in one
  process, Redis in distributed mode) by whichever process sees the event (the worker, or the API
  process that ended the job), and sent by a sender thread of the API processes: the job never
  waits for a receiver. Kept until acknowledged (a 2xx), so a `completed` delivery survives a
  restart; a delivery of a job is sent only once the earlier ones of that job are done.
- Signed as Standard Webhooks do: `Webhook-Id` (the same for every attempt of a delivery),
  `Webhook-Timestamp` (Unix seconds) and `Webhook-Signature: v1,<base64 HMAC-SHA256>` over
  `<id>.<timestamp>.<body>` with the installation's secret (`webhooks.secret`; a `whsec_` secret
  is base64, as Standard Webhooks' libraries take it; unset: one is made once and kept).
- Retried on any failure (no answer, a non-2xx, a redirect: none is followed) after 5 s, 30 s,
  then twice as long each time (at most 15 min apart) for `webhooks.retry_s`, then dropped.
- The URL is checked when the job is made and again at each attempt (sonic_server/outbound.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

from sonic.errors import InvalidParameter

from . import metrics, outbound
from .jobs import JobRecord
from .public import JobUrls, job_document
from .store import forget_on_disk, open_database

log = logging.getLogger("sonic.webhooks")
EVENTS = ("start", "progress", "completed")
DEFAULT_EVENTS = ("completed",)
FIRST_RETRIES_S = (5.0, 30.0)  # then doubling
MAX_RETRY_GAP_S = 900.0
SEND_EVERY_S = 0.5
SENDERS = 4  # deliveries in flight at once, each to another job: a receiver that is slow to answer holds one
# ... of them to one receiver at most: a customer's receiver that is down (each attempt waits out
# the deadline, 15 s) held all four, and every other customer's deliveries waited behind it
PER_RECEIVER = SENDERS // 2
# ... and to a receiver whose last attempt failed, one at a time
PER_FAILING_RECEIVER = 1
# ... and for one key's or account's jobs at most: one caller's receivers, however many hosts or
# paths they name, do not hold every sender (a key's cached answers to 16 paths of a slow host
# held another key's webhook 58 s, longer the more it sent). Without keys everyone is one caller.
PER_OWNER = SENDERS // 2
# a receiver is its URL less the query (a shared host such as a hooks service gives each of its
# customers a path of their own), read alike here and in the Redis claim's script
RECEIVER = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^?#]*")
# deliveries that may wait for one job: its own start, progress and end take ~15 a run (cached
# answers' wait on their own); a bound all the same, behind a receiver that fails
MAX_PENDING_PER_JOB = 64
# ... and for one key's or account's jobs together: each cached answer's delivery waits on its
# own, so a caller that sent a cached request again and again to receivers that fail (each
# delivery tried for webhooks.retry_s) piled them up without bound. Without keys: no such bound.
MAX_PENDING_PER_OWNER = 256


class Lane(NamedTuple):
    """Where an attempt under way counts against the senders' shares."""

    receiver: str
    owner: str


def receiver_of(url: str) -> str:
    match = RECEIVER.match(url)
    return match.group(0) if match else url


def backoff_s(failures: int) -> float:
    """The wait after the n-th failed attempt: 5 s, 30 s, 60 s, 120 s ... at most 15 min."""
    if failures <= len(FIRST_RETRIES_S):
        return FIRST_RETRIES_S[failures - 1]
    return min(MAX_RETRY_GAP_S, FIRST_RETRIES_S[-1] * 2 ** (failures - len(FIRST_RETRIES_S)))


# --- what a job asks for -------------------------------------------------------------------
def requested(url: Any, events: Any, root: str, reach: outbound.Reach) -> dict | None:
    """The webhook a generate request asks for (form fields or config keys), checked; None
    without one. Stored on the job record: {"url", "events", "root" (the service's URL)}."""
    if url in (None, ""):
        if events not in (None, "", []):
            raise InvalidParameter("webhook_events_filter needs a webhook URL", field="webhook_events_filter")
        return None
    if not isinstance(url, str):
        raise InvalidParameter("webhook must be an http(s) URL", field="webhook")
    outbound.check_url(url, "webhook", reach)
    if events in (None, "", []):
        chosen = list(DEFAULT_EVENTS)
    else:
        words = events.split(",") if isinstance(events, str) else events
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise InvalidParameter("webhook_events_filter must be a list of events", field="webhook_events_filter")
        chosen = [w.strip() for w in words if w.strip()]
        unknown = [w for w in chosen if w not in EVENTS]
        if unknown or not chosen:
            raise InvalidParameter(
                f"webhook_events_filter: {', '.join(unknown)[:60] or 'nothing'} is not among {', '.join(EVENTS)}",
                field="webhook_events_filter",
            )
    return {"url": url, "events": sorted(set(chosen), key=EVENTS.index), "root": root}


# --- the outbox ----------------------------------------------------------------------------
@dataclass
class Delivery:
    id: str  # Webhook-Id: the same for every attempt
    job_id: str  # its job: a job's deliveries go in order (a cached answer's: the job's id, suffixed)
    seq: int  # its place among the job's deliveries
    url: str
    event: str
    body: str
    attempts: int = 0
    next_at: float = 0.0
    first_at: float = 0.0
    owner: str = ""  # the job's caller (a key's digest, an account); "": made without keys


class Outbox(Protocol):
    def add(self, delivery: Delivery) -> bool:
        """Queue it, or False (nothing queued) when MAX_PENDING_PER_JOB of its job's wait, or
        MAX_PENDING_PER_OWNER of its caller's jobs' (a named caller's)."""

    def due(
        self, now: float, limit: int, skip: Collection[str] = (), skip_owners: Collection[str] = ()
    ) -> list[Delivery]:
        """Deliveries whose time has come, each the first left of its job's, passing over those
        to the receivers in `skip` and those of the callers in `skip_owners` (they wait where
        they are: nothing is rewritten)."""

    def done(self, delivery: Delivery) -> None: ...

    def retry(self, delivery: Delivery) -> None:
        """A failed attempt's delivery, to be tried again at its next_at; unless it is gone."""

    def let_go(self, delivery: Delivery) -> None:
        """A delivery `due` gave that is not sent now: it stays due, as it was."""

    def jobs_waiting(self) -> int:
        """How many jobs (a cached answer counts as its own) have a delivery waiting (no side
        effect: nothing is claimed): /metrics, and whether a sender must start."""

    def forget_job(self, job_id: str) -> None:
        """Every delivery of a deleted job (its own events', and its cached answers')."""


def _of_job(delivery_job: str, job_id: str) -> bool:
    return delivery_job == job_id or delivery_job.startswith(job_id + ".")  # a cached answer's: suffixed


class MemoryOutbox:
    def __init__(self) -> None:
        self._items: dict[str, Delivery] = {}
        self._lock = threading.Lock()

    def add(self, delivery: Delivery) -> bool:
        with self._lock:
            waiting = sum(d.job_id == delivery.job_id for d in self._items.values())
            callers = sum(d.owner == delivery.owner for d in self._items.values()) if delivery.owner else 0
            if delivery.id not in self._items and (waiting >= MAX_PENDING_PER_JOB or callers >= MAX_PENDING_PER_OWNER):
                return False
            self._items[delivery.id] = delivery
            return True

    def due(
        self, now: float, limit: int, skip: Collection[str] = (), skip_owners: Collection[str] = ()
    ) -> list[Delivery]:
        with self._lock:
            heads: dict[str, Delivery] = {}
            for d in self._items.values():
                if d.job_id not in heads or d.seq < heads[d.job_id].seq:
                    heads[d.job_id] = d
            ready = (
                d
                for d in heads.values()
                if d.next_at <= now and receiver_of(d.url) not in skip and d.owner not in skip_owners
            )
            return sorted(ready, key=lambda d: d.next_at)[:limit]

    def jobs_waiting(self) -> int:
        with self._lock:
            return len({d.job_id for d in self._items.values()})

    def done(self, delivery: Delivery) -> None:
        with self._lock:
            self._items.pop(delivery.id, None)

    def retry(self, delivery: Delivery) -> None:
        with self._lock:
            if delivery.id in self._items:  # not if its job was deleted while it was being sent
                self._items[delivery.id] = delivery

    def let_go(self, delivery: Delivery) -> None:
        pass  # nothing was claimed

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            for gone in [d.id for d in self._items.values() if _of_job(d.job_id, job_id)]:
                del self._items[gone]


class SqliteOutbox:
    """A table of its own in the job database: pending deliveries survive a restart."""

    def __init__(self, path: str | Path) -> None:
        self._db = open_database(path, timeout_s=10)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS webhook_outbox (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, seq INTEGER NOT "
            "NULL, url TEXT NOT NULL, event TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL, "
            "next_at REAL NOT NULL, first_at REAL NOT NULL)"
        )
        # without it the look for each job's first delivery was quadratic: 4 s at 4,000 waiting,
        # under the lock every job's event waits for
        self._db.execute("CREATE INDEX IF NOT EXISTS webhook_outbox_job ON webhook_outbox (job_id, seq)")
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(webhook_outbox)")}
        if "owner" not in columns:  # a table from before deliveries named their caller
            self._db.execute("ALTER TABLE webhook_outbox ADD COLUMN owner TEXT NOT NULL DEFAULT ''")
        self._db.execute("CREATE INDEX IF NOT EXISTS webhook_outbox_owner ON webhook_outbox (owner)")
        self._db.create_function("receiver", 1, receiver_of, deterministic=True)
        self._lock = threading.Lock()

    def add(self, delivery: Delivery) -> bool:
        with self._lock:
            (waiting,) = self._db.execute(
                "SELECT COUNT(*) FROM webhook_outbox WHERE job_id = ?", (delivery.job_id,)
            ).fetchone()
            (callers,) = self._db.execute(
                "SELECT COUNT(*) FROM webhook_outbox WHERE owner = ? AND owner != ''", (delivery.owner,)
            ).fetchone()
            if waiting >= MAX_PENDING_PER_JOB or callers >= MAX_PENDING_PER_OWNER:
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO webhook_outbox (id, job_id, seq, url, event, body, attempts, next_at, "
                "first_at, owner) VALUES (:id, :job_id, :seq, :url, :event, :body, :attempts, :next_at, :first_at, "
                ":owner)",
                asdict(delivery),
            )
            return True

    def due(
        self, now: float, limit: int, skip: Collection[str] = (), skip_owners: Collection[str] = ()
    ) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, job_id, seq, url, event, body, attempts, next_at, first_at, owner FROM webhook_outbox o "
                "WHERE next_at <= ? AND seq = (SELECT MIN(seq) FROM webhook_outbox i WHERE i.job_id = o.job_id) "
                "AND receiver(url) NOT IN (SELECT value FROM json_each(?)) "
                "AND owner NOT IN (SELECT value FROM json_each(?)) ORDER BY next_at LIMIT ?",
                (now, json.dumps(sorted(skip)), json.dumps(sorted(skip_owners)), limit),
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def jobs_waiting(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(DISTINCT job_id) FROM webhook_outbox").fetchone()[0])

    def done(self, delivery: Delivery) -> None:
        with self._lock:
            self._db.execute("DELETE FROM webhook_outbox WHERE id = ?", (delivery.id,))

    def retry(self, delivery: Delivery) -> None:
        with self._lock:  # not put back if its job was deleted while it was being sent
            self._db.execute(
                "UPDATE webhook_outbox SET attempts = :attempts, next_at = :next_at WHERE id = :id", asdict(delivery)
            )

    def let_go(self, delivery: Delivery) -> None:
        pass  # nothing was claimed

    def forget_job(self, job_id: str) -> None:
        with self._lock:
            gone = self._db.execute(
                "DELETE FROM webhook_outbox WHERE job_id = ? OR job_id LIKE ?", (job_id, job_id + ".%")
            ).rowcount
        if gone:
            forget_on_disk(self._db)  # the job's document and the receiver's password with it


# Only the first waiting delivery of each job is in `sonic:wh:due` (the others wait their turn
# in the job's queue): the sender's look at the due set never meets one it may not send yet.
# KEYS: delivery, due, the job's queue, and a named caller's waiting deliveries (by id). ARGV:
# the delivery (JSON), its id, its seq, its time, the most that may wait for one job, and for
# one caller, the prefix of a delivery's key. None is queued at either most. A caller's set is
# pruned of deliveries gone (sent, given up, their job deleted) only when it looks full.
_ADD = """
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return 0 end
if KEYS[4] and redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    if redis.call('EXISTS', ARGV[7] .. id) == 0 then redis.call('ZREM', KEYS[4], id) end
  end
  if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then return 0 end
end
if KEYS[4] then redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2]) end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
local head = redis.call('ZRANGE', KEYS[3], 0, 0)
if head[1] == ARGV[2] then redis.call('ZADD', KEYS[2], ARGV[4], ARGV[2]) end
return 1
"""
# KEYS: delivery, due, the job's queue, the claim. ARGV: id, the claim's token, the prefix of a
# delivery's key. Done: only while the claim is this sender's; the job's next delivery is due.
_DONE = """
if redis.call('GET', KEYS[4]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local head = redis.call('ZRANGE', KEYS[3], 0, 0)
if head[1] then
  local raw = redis.call('GET', ARGV[3] .. head[1])
  if raw then redis.call('ZADD', KEYS[2], cjson.decode(raw)['next_at'], head[1]) end
end
return 1
"""
# KEYS: delivery, due, the claim. ARGV: the delivery (JSON), id, its next time, the claim's token.
_RETRY = """
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'XX')
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""
# KEYS: due. ARGV: now, the claim's token, its lifetime (s), the prefix of a delivery's key, how
# many due deliveries to look at, how much later to look at one passed over, the receivers to
# pass over (as receiver_of reads them, a JSON list), the callers to pass over (a JSON list).
# The first due delivery that nobody has claimed, claimed, in one step: looked at and claimed
# apart, a delivery whose failed attempt was rescheduled in between (its claim let go) was
# claimed though no longer due, and then left unsent, held for CLAIM_S.
_CLAIM = """
local skip, skip_owners = {}, {}
for _, receiver in ipairs(cjson.decode(ARGV[7])) do skip[receiver] = true end
for _, owner in ipairs(cjson.decode(ARGV[8])) do skip_owners[owner] = true end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[5]))) do
  local raw = redis.call('GET', ARGV[4] .. id)
  if not raw then
    redis.call('ZREM', KEYS[1], id)
  else
    local delivery = cjson.decode(raw)
    local url = delivery['url']
    if skip[string.match(url, '^[A-Za-z][A-Za-z0-9+.-]*://[^?#]*') or url] or skip_owners[delivery['owner'] or ''] then
      redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[6], id)
    elseif redis.call('SET', ARGV[4] .. 'claim:' .. id, ARGV[2], 'NX', 'EX', ARGV[3]) then
      return raw
    end
  end
end
return false
"""
# due deliveries a claim looks at; those of receivers passed over are looked at again
# PASSED_OVER_S later (their own times, in the delivery, stay as they are), so that however many
# wait for a receiver that is down, the others' come up
CLAIM_LOOK = 200
PASSED_OVER_S = 1.0
CLAIM_S = 120  # longer than one attempt can take (outbound.post's deadline): a claim never lapses mid-send


class RedisOutbox:
    """`sonic:wh:<id>` each delivery, `sonic:wh:q:<job>` a job's in order, `sonic:wh:due` the
    first of each job's by time. A sender claims one delivery at a time (`sonic:wh:claim:<id>`,
    with a token) just before sending it, and only the claim's holder can mark it done or retry
    it: two API processes never both send it."""

    def __init__(self, conn: Any) -> None:
        from .queue.redis import RELEASE_HELD  # (imported here: Redis's module, distributed mode only)

        self.r = conn
        self._add = conn.register_script(_ADD)
        self._done = conn.register_script(_DONE)
        self._retry = conn.register_script(_RETRY)
        self._claim = conn.register_script(_CLAIM)
        self._let_go = conn.register_script(RELEASE_HELD)  # a claim let go by its holder, the delivery unsent
        self._tokens: dict[str, str] = {}

    def _keys(self, d: Delivery) -> tuple[str, str, str, str]:
        return f"sonic:wh:{d.id}", "sonic:wh:due", f"sonic:wh:q:{d.job_id}", f"sonic:wh:claim:{d.id}"

    def add(self, delivery: Delivery) -> bool:
        key, due, queue, _ = self._keys(delivery)
        callers = [f"sonic:wh:owner:{delivery.owner}"] if delivery.owner else []
        args = [json.dumps(asdict(delivery)), delivery.id, delivery.seq, delivery.next_at, MAX_PENDING_PER_JOB]
        args += [MAX_PENDING_PER_OWNER, "sonic:wh:"]
        return bool(self._add(keys=[key, due, queue, *callers], args=args))

    def jobs_waiting(self) -> int:
        return int(self.r.zcard("sonic:wh:due"))  # the first waiting delivery of each job

    def due(
        self, now: float, limit: int, skip: Collection[str] = (), skip_owners: Collection[str] = ()
    ) -> list[Delivery]:
        """At most one delivery, claimed: it is sent before the next is looked at."""
        token = uuid.uuid4().hex
        lanes = [json.dumps(sorted(skip)), json.dumps(sorted(skip_owners))]
        raw = self._claim(
            keys=["sonic:wh:due"], args=[now, token, CLAIM_S, "sonic:wh:", CLAIM_LOOK, PASSED_OVER_S, *lanes]
        )
        if not raw:
            return []
        d = Delivery(**json.loads(raw))
        self._tokens[d.id] = token
        return [d]

    def done(self, delivery: Delivery) -> None:
        key, due, queue, claim = self._keys(delivery)
        token = self._tokens.pop(delivery.id, "")
        self._done(keys=[key, due, queue, claim], args=[delivery.id, token, "sonic:wh:"])

    def retry(self, delivery: Delivery) -> None:
        key, due, _, claim = self._keys(delivery)
        token = self._tokens.pop(delivery.id, "")
        self._retry(keys=[key, due, claim], args=[json.dumps(asdict(delivery)), delivery.id, delivery.next_at, token])

    def let_go(self, delivery: Delivery) -> None:
        self._let_go(keys=[f"sonic:wh:claim:{delivery.id}"], args=[self._tokens.pop(delivery.id, "")])

    def next_seq(self) -> int:
        return int(self.r.incr("sonic:wh:seq"))

    def forget_job(self, job_id: str) -> None:
        queues = [f"sonic:wh:q:{job_id}", *self.r.scan_iter(match=f"sonic:wh:q:{job_id}.*", count=100)]
        for queue in queues:
            ids = [m.decode() if isinstance(m, bytes) else m for m in self.r.zrange(queue, 0, -1)]
            p = self.r.pipeline()
            for delivery_id in ids:
                p.delete(f"sonic:wh:{delivery_id}")
                p.zrem("sonic:wh:due", delivery_id)
            p.delete(queue)
            p.execute()


def open_outbox(redis_url: str | None, jobs_db_path: str) -> Outbox:
    if redis_url:
        from .queue.redis import connect

        return RedisOutbox(connect(redis_url))
    return SqliteOutbox(jobs_db_path) if jobs_db_path else MemoryOutbox()


# --- the secret and the signature ----------------------------------------------------------
def signing_key(secret: str) -> bytes:
    """A `whsec_<base64>` secret's bytes (Standard Webhooks), else the string's UTF-8 bytes."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[len("whsec_") :])
    return secret.encode()


def installation_secret(configured: str, data_dir: str, redis_conn: Any = None) -> str:
    """The configured secret; else one made once: in Redis (every process of a distributed
    service agrees) or in `<data_dir>/webhook_secret` (mode 0600)."""
    if configured:
        return configured
    made = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    if redis_conn is not None:
        redis_conn.set("sonic:webhook_secret", made, nx=True)
        return cast("bytes", redis_conn.get("sonic:webhook_secret")).decode()
    path = Path(data_dir) / "webhook_secret"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x", encoding="ascii") as f:  # made once, whoever starts first
            path.chmod(0o600)
            f.write(made)
        log.info("webhooks: a signing secret was made and kept in %s", path)
    except FileExistsError:
        pass
    return path.read_text(encoding="ascii").strip()


def signature(key: bytes, msg_id: str, timestamp: int, body: str) -> str:
    mac = hmac.new(key, f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


# --- events in, deliveries out -------------------------------------------------------------
class Webhooks:
    """Turns job events into deliveries (any process) and sends what is due (API processes)."""

    def __init__(
        self, outbox: Outbox, secret: Callable[[], str], retry_s: float, reach: outbound.Reach, outputs: Any
    ) -> None:
        """`secret`: asked for at the first signature (made once if unset: a store away at start-up
        does not stop the service from starting)."""
        self.outbox, self.retry_s, self.reach, self.outputs = outbox, retry_s, reach, outputs
        self._secret = secret
        self._key: bytes | None = None
        self._seq = 0
        self._seq_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a delivery ended: its place may go to the next at once
        self._send_failure: str | None = None  # why the last look at what is due failed (said once)
        self._sending = False
        self._in_flight: dict[str, Lane] = {}  # the deliveries being sent now: id -> their receiver and caller
        # receivers whose last attempt failed (this process's view) -> when, the oldest first
        self._failing: dict[str, float] = {}
        self._flight_lock = threading.Lock()

    def notify(self, rec: JobRecord, event: str, on_its_own: bool = False) -> None:
        """An event of a job: a delivery when the job asked for that event. Deliveries of one
        job wait in order; `on_its_own` (a cached answer's, to whoever asked for it) waits for
        none of them, nor they for it: one caller's failing receiver held up the others'."""
        hook = rec.webhook
        if not hook or event not in hook.get("events", ()):
            return
        body = json.dumps(job_document(rec, JobUrls.under(hook["root"], rec.id, self.outputs)), sort_keys=True)
        now = time.time()
        order = f"{rec.id}.{uuid.uuid4().hex[:12]}" if on_its_own else rec.id  # the deliveries it waits behind
        delivery = Delivery(
            f"msg_{uuid.uuid4().hex}", order, self._next_seq(), hook["url"], event, body, 0, now, now, rec.owner or ""
        )
        if not self.outbox.add(delivery):
            metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
            log.warning(
                "webhook (job %s, %s): not queued; %d of the job's deliveries, or %d of its caller's, wait already",
                rec.id,
                event,
                MAX_PENDING_PER_JOB,
                MAX_PENDING_PER_OWNER,
            )
            return
        self.start()

    def forget(self, job_id: str) -> None:
        """A deleted job's deliveries, sent or not: they carry its document (and the receiver's
        URL, a password in it) and were still tried for webhooks.retry_s after the delete."""
        self.outbox.forget_job(job_id)

    def job_ended(self, rec: JobRecord) -> None:
        """The end-of-job hook (lifecycle.JobEnd): the `completed` delivery."""
        self.notify(rec, "completed")

    def _next_seq(self) -> int:
        next_seq = getattr(self.outbox, "next_seq", None)
        if next_seq is not None:
            return int(next_seq())
        with self._seq_lock:  # one process: its clock in microseconds, made strictly increasing
            self._seq = max(self._seq + 1, int(time.time() * 1e6))
            return self._seq

    # --- the sender --------------------------------------------------------------------------
    def start(self, only_if_pending: bool = False) -> None:
        """The sender thread (once): at the first delivery this process makes, or at start-up
        when deliveries are left from before (`only_if_pending`)."""
        with self._seq_lock:
            if self._sending:
                return
            try:
                if only_if_pending and not self.outbox.jobs_waiting():
                    return
            except Exception:  # noqa: BLE001 - the store away at start-up: the first delivery starts it
                log.warning("webhooks: the outbox cannot be read now")
                return
            self._sending = True
        threading.Thread(target=self._run, name="sonic-webhooks", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(SEND_EVERY_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.send_due()
            except Exception as e:  # noqa: BLE001 - next time
                # each failure said once, and its end once: a store away (Redis down) or any other
                # failure that lasts logged a traceback twice a second
                failure = re.sub(r"\d+", "#", f"{type(e).__name__}: {e}")  # (counts and ids in it change)
                if failure != self._send_failure:
                    log.exception("webhooks: sending failed; trying again every %.1f s, quietly", SEND_EVERY_S)
                self._send_failure = failure
            else:
                if self._send_failure:
                    log.info("webhooks: sending again")
                self._send_failure = None

    def send_due(self, now: float | None = None) -> None:
        """Start sending what is due, each delivery on a thread of its own, SENDERS at most at
        once, PER_RECEIVER at most to one receiver (PER_FAILING_RECEIVER to one whose last
        attempt failed) and PER_OWNER for one caller's jobs: a receiver that is down, or slow to
        answer, or one caller's many, holds up no other's deliveries. A job's next delivery
        waits for the one before (the outbox gives only each job's first), and the Redis outbox
        claims each as it gives it."""
        at = time.time() if now is None else now
        while True:
            with self._flight_lock:
                free, busy = SENDERS - len(self._in_flight), set(self._in_flight)
                full, full_owners = self._full_receivers(), self._full_owners()
            if free <= 0:
                return
            fresh = [d for d in self.outbox.due(at, free + len(busy), full, full_owners) if d.id not in busy]
            started = 0
            for delivery in fresh:
                lane = Lane(receiver_of(delivery.url), delivery.owner)
                with self._flight_lock:
                    # the outbox passed over the receivers and callers that were full; one may have filled since
                    room = (
                        len(self._in_flight) < SENDERS
                        and lane.receiver not in self._full_receivers()
                        and lane.owner not in self._full_owners()
                    )
                    if room:
                        self._in_flight[delivery.id] = lane
                if not room:
                    self.outbox.let_go(delivery)
                    continue
                started += 1
                threading.Thread(target=self._send, args=(delivery,), name="sonic-webhook", daemon=True).start()
            if not started:
                return

    def _full_receivers(self) -> set[str]:
        """Receivers that may take no more attempts now (under _flight_lock)."""
        trying = Counter(lane.receiver for lane in self._in_flight.values())
        return {
            receiver
            for receiver, count in trying.items()
            if count >= (PER_FAILING_RECEIVER if receiver in self._failing else PER_RECEIVER)
        }

    def _full_owners(self) -> set[str]:
        """Callers whose jobs' deliveries may have no more attempts under way now (under
        _flight_lock); without keys ("") there is no other caller to make room for."""
        trying = Counter(lane.owner for lane in self._in_flight.values() if lane.owner)
        return {owner for owner, count in trying.items() if count >= PER_OWNER}

    def _note(self, receiver: str, answered: bool) -> None:
        """A receiver's attempt ended: answered with a 2xx, or failed."""
        now = time.time()
        with self._flight_lock:
            self._failing.pop(receiver, None)
            if not answered:
                self._failing[receiver] = now
            # a receiver not tried for longer than any wait between attempts has nothing waiting
            while self._failing and now - next(iter(self._failing.values())) > 2 * MAX_RETRY_GAP_S:
                del self._failing[next(iter(self._failing))]

    def _send(self, delivery: Delivery) -> None:
        try:
            self._attempt(delivery)
        except Exception:  # noqa: BLE001 - the store away: the delivery stays due, for next time
            log.exception("webhook %s: sending failed", delivery.id)
        finally:
            with self._flight_lock:
                self._in_flight.pop(delivery.id, None)
            self._wake.set()

    @property
    def key(self) -> bytes:
        if self._key is None:
            self._key = signing_key(self._secret())
        return self._key

    def _attempt(self, d: Delivery) -> None:
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "sonic-webhooks",
            "Webhook-Id": d.id,
            "Webhook-Event": d.event,  # start, progress or completed (the body is the job's document)
            "Webhook-Timestamp": str(timestamp),
            "Webhook-Signature": signature(self.key, d.id, timestamp, d.body),
        }
        status: int | None = None
        why = ""
        try:
            status = outbound.post(outbound.check_url(d.url, "webhook", self.reach), d.body.encode(), headers)
        except InvalidParameter as e:  # the name now resolves somewhere it may not go
            why = e.message
        except Exception as e:  # noqa: BLE001 - refused, reset, timed out: retried
            # outbound.post's own words ("timed out", "ConnectionRefusedError: ..."), or the kind and words
            why = (str(e) if isinstance(e, OSError) and str(e) else f"{type(e).__name__}: {e}")[:200]
        self._note(receiver_of(d.url), status is not None and 200 <= status < 300)
        if status is not None and 200 <= status < 300:
            self.outbox.done(d)
            metrics.WEBHOOK_DELIVERIES.labels("delivered").inc()
            return
        d.attempts += 1
        now = time.time()
        if now - d.first_at >= self.retry_s:
            self.outbox.done(d)
            metrics.WEBHOOK_DELIVERIES.labels("dropped").inc()
            log.warning("webhook %s (job %s, %s): dropped after %d attempts", d.id, d.job_id, d.event, d.attempts)
            return
        # the last try at the window's end, not a backoff past it (retry_s 12 tried at 35 s)
        d.next_at = min(now + backoff_s(d.attempts), d.first_at + self.retry_s)
        self.outbox.retry(d)
        metrics.WEBHOOK_DELIVERIES.labels("failed").inc()
        log.info(
            "webhook %s (job %s): attempt %d failed (%s); again in %.0f s",
            d.id,
            d.job_id,
            d.attempts,
            status or why,
            d.next_at - now,
        )


def events_of(notify: Callable[[JobRecord, str], None] | None) -> Callable[[JobRecord, str], None] | None:
    """`notify` made safe for a job's run: a failing outbox is logged, the job goes on."""
    if notify is None:
        return None

    def safe(rec: JobRecord, event: str) -> None:
        try:
            notify(rec, event)
        except Exception:  # noqa: BLE001
            log.exception("job %s: its %s webhook could not be queued", rec.id, event)

    return safe


def make_webhooks(settings: Any, outputs: Any) -> Webhooks:
    """The service's webhooks: the outbox beside the job records, the installation's secret."""
    srv = settings.server
    from .legacy import jobs_db_path

    outbox = open_outbox(srv.redis_url, jobs_db_path(settings))
    conn = outbox.r if isinstance(outbox, RedisOutbox) else None

    def secret() -> str:
        return installation_secret(settings.webhooks.secret, srv.data_dir, conn)

    return Webhooks(outbox, secret, settings.webhooks.retry_s, outbound.Reach.of(settings.outbound), outputs)
