"""Idempotent creation: a request sent with an `Idempotency-Key` header is carried out once.

A retry with the same key and the same request (its fields and files, whatever multipart
boundary carries them, from the same caller) gets the first answer again: the same job id, no
second charge, no second render. The same key with a different request is 409 `conflict`. Two
identical requests racing: the one that reserves the key runs, the other waits for its answer.
An answer that says "try again" (429, 503, any 5xx) frees the key, so that the retry runs anew.
Keys are per caller and expire after `server.idempotency_ttl_s`.

The answers are kept beside the job records: in SQLite (or memory) in one process, in Redis in
distributed mode, so that a retry reaching another API process gets the same answer.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

from flask import Response, g, request

from sonic.errors import InvalidParameter, SonicError

from .openapi import header
from .store import forget_on_disk, open_database

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
WAIT_S = 60.0  # a racing twin waits this long for the first request's answer
# a key whose request is still running is held this long at most: a request cut off (its process
# killed) frees its key then, instead of holding it "still running" for the key's whole life
PENDING_S = 600.0
POLL_S = 0.1
PURGE_EVERY_S = 60.0  # expired answers are removed this often
KEPT_HEADERS = ("Content-Type", "Location", "X-Fusion-Timings")
PARAMETER = header(
    HEADER,
    "a unique string of printable ASCII without commas (a UUID), bare or in double quotes (the same key): "
    "a retry with the same key and request returns the first answer, with no second job or charge; the "
    "same key with another request is 409",
    # printable ASCII but the comma, no space at either end (HTTP strips it)
    {"type": "string", "maxLength": MAX_KEY_CHARS, "pattern": "^[!-+\\--~]([ -+\\--~]*[!-+\\--~])?$"},
)


class KeyConflict(SonicError):
    code = "conflict"


class IdempotencyStore(Protocol):
    def reserve(self, key: str, fingerprint: str, ttl_s: float) -> dict | None:
        """Take the key for this request (None), or the entry another request holds:
        {"fingerprint", "answer": None while that request runs, else its kept answer}."""

    def complete(self, key: str, answer: dict, ttl_s: float) -> None: ...

    def release(self, key: str) -> None: ...


class MemoryKeys:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[dict, float]] = {}
        self._lock = threading.Lock()

    def reserve(self, key: str, fingerprint: str, ttl_s: float) -> dict | None:
        now = time.time()
        with self._lock:
            held = self._entries.get(key)
            if held is not None and held[1] > now:
                return dict(held[0])
            self._entries[key] = ({"fingerprint": fingerprint, "answer": None}, now + ttl_s)
            return None

    def complete(self, key: str, answer: dict, ttl_s: float) -> None:
        with self._lock:
            now = time.time()
            for old in [k for k, (_, expires) in self._entries.items() if expires <= now]:
                del self._entries[old]  # the expired go as new answers come
            if key in self._entries:
                self._entries[key] = ({**self._entries[key][0], "answer": answer}, now + ttl_s)

    def release(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class SqliteKeys:
    """A table of its own in the job database (its own connection: WAL lets both write). An
    answer is kept `ttl_s` (a fusion's holds the fused image): expired ones went only when the
    next request with a key came, which may be never; a thread of its own removes them now."""

    def __init__(self, path: str | Path) -> None:
        self._db = open_database(path, timeout_s=10)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, "
            "answer TEXT, expires REAL NOT NULL)"
        )
        self._lock = threading.Lock()
        threading.Thread(target=self._purge_every, name="sonic-idempotency-purge", daemon=True).start()

    def purge(self, now: float | None = None) -> int:
        """Remove the expired answers, their pages overwritten on disk (checkpoint); how many."""
        with self._lock:
            gone = self._db.execute("DELETE FROM idempotency WHERE expires < ?", (now or time.time(),)).rowcount
        if gone:
            forget_on_disk(self._db)
        return gone

    def _purge_every(self) -> None:
        while True:
            time.sleep(PURGE_EVERY_S)
            try:
                self.purge()
            except sqlite3.Error:  # busy, or its folder gone: the next round tries again
                pass

    def reserve(self, key: str, fingerprint: str, ttl_s: float) -> dict | None:
        now = time.time()
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE expires < ?", (now,))
            taken = self._db.execute(
                "INSERT OR IGNORE INTO idempotency (key, fingerprint, answer, expires) VALUES (?, ?, NULL, ?)",
                (key, fingerprint, now + ttl_s),
            ).rowcount
            if taken:
                return None
            row = self._db.execute("SELECT fingerprint, answer FROM idempotency WHERE key = ?", (key,)).fetchone()
        if row is None:  # released meanwhile: the caller tries again
            return {"fingerprint": fingerprint, "answer": None, "gone": True}
        return {"fingerprint": row[0], "answer": json.loads(row[1]) if row[1] else None}

    def complete(self, key: str, answer: dict, ttl_s: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE idempotency SET answer = ?, expires = ? WHERE key = ?",
                (json.dumps(answer), time.time() + ttl_s, key),
            )

    def release(self, key: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM idempotency WHERE key = ?", (key,))


class RedisKeys:
    """`sonic:idem:<key>`: SET NX with the key's time to live, so racing API processes agree."""

    def __init__(self, conn: Any) -> None:
        self.r = conn

    def _name(self, key: str) -> str:
        return f"sonic:idem:{key}"

    def reserve(self, key: str, fingerprint: str, ttl_s: float) -> dict | None:
        entry = json.dumps({"fingerprint": fingerprint, "answer": None})
        if self.r.set(self._name(key), entry, nx=True, ex=max(1, int(ttl_s))):
            return None
        raw = cast("bytes | None", self.r.get(self._name(key)))
        if raw is None:
            return {"fingerprint": fingerprint, "answer": None, "gone": True}
        return json.loads(raw)

    def complete(self, key: str, answer: dict, ttl_s: float) -> None:
        name = self._name(key)
        raw = cast("bytes | None", self.r.get(name))
        if raw is not None:
            self.r.set(name, json.dumps({**json.loads(raw), "answer": answer}), ex=max(1, int(ttl_s)), xx=True)

    def release(self, key: str) -> None:
        self.r.delete(self._name(key))


def open_keys(redis_url: str | None, jobs_db_path: str) -> IdempotencyStore:
    """Where the answers are kept: Redis in distributed mode, else beside the job records."""
    if redis_url:
        from .queue.redis import connect

        return RedisKeys(connect(redis_url))
    return SqliteKeys(jobs_db_path) if jobs_db_path else MemoryKeys()


# --- the routes' side --------------------------------------------------------------------------
def request_key(owner: str | None) -> str | None:
    """The request's key, scoped to its caller (one caller's key never meets another's); None
    without the header."""
    raw = request.headers.get(HEADER)
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_KEY_CHARS or not raw.isascii() or not raw.isprintable():
        raise InvalidParameter(f"{HEADER} must be 1-{MAX_KEY_CHARS} printable ASCII characters", field=HEADER)
    if len(raw) > 2 and raw[0] == raw[-1] == '"' and '"' not in raw[1:-1]:
        raw = raw[1:-1]  # the IETF draft's quoted string: the same key as the bare one (Stripe's)
    elif "," in raw:
        # two headers reach the app as one value joined by a comma: the request would have been
        # kept under a key that neither of them is
        raise InvalidParameter(f"give one {HEADER}, without commas (two headers arrive joined by one)", field=HEADER)
    return hashlib.sha256(f"{owner or ''}\n{raw}".encode()).hexdigest()


def fingerprint(route: str) -> str:
    """What makes two requests the same: the route, the fields and each file's bytes (not the
    multipart boundary or the files' order), or a JSON body's value. The files are read and
    rewound: the view reads them again."""
    digest = hashlib.sha256(route.encode())
    if request.mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        for name in sorted(request.form, key=str):  # a malformed part may have no name (None)
            digest.update(json.dumps([name, request.form.getlist(name)]).encode())
        for name in sorted(request.files, key=str):
            for f in request.files.getlist(name):
                data = f.stream.read()
                f.stream.seek(0)
                digest.update(json.dumps([name, hashlib.sha256(data).hexdigest()]).encode())
    else:
        digest.update(_canonical_json(request.get_data(cache=True)))
    return digest.hexdigest()


def _canonical_json(body: bytes) -> bytes:
    """A JSON body as its value (key order and spacing aside: two clients, or one client's retry
    with another serializer, send the same request); any other body as its bytes."""
    if len(body) > CANONICAL_JSON_MAX_BYTES:  # the view refuses it: not parsed twice
        return body
    from sonic.errors import InvalidParameter

    from .json_input import parse_json

    try:  # read as the view reads it: a key given twice or a number too long is not "the same"
        return json.dumps(parse_json(body, "body"), sort_keys=True, separators=(",", ":")).encode()
    except (InvalidParameter, ValueError, RecursionError):  # the view refuses it: its bytes
        return body


CANONICAL_JSON_MAX_BYTES = 1 << 20  # a larger JSON body is compared by its bytes


def _keep(resp: Response) -> dict:
    return {
        "status": resp.status_code,
        "headers": {k: resp.headers[k] for k in KEPT_HEADERS if k in resp.headers},
        "body": base64.b64encode(resp.get_data()).decode("ascii"),
    }


def _replay(answer: dict) -> Response:
    resp = Response(base64.b64decode(answer["body"]), status=answer["status"])
    for k, v in answer["headers"].items():
        resp.headers[k] = v
    resp.headers["Idempotent-Replayed"] = "true"
    return resp


def _retryable(status: int) -> bool:
    """An answer that asks for a retry is not kept: the retry runs anew."""
    return status in (409, 429) or status >= 500


def idempotent(
    route: str,
    store: Callable[[], IdempotencyStore | None],
    owner: Callable[[], str | None],
    ttl_s: Callable[[], float],
) -> Callable:
    """A view decorator: with an Idempotency-Key, the view runs once per key (see the module)."""

    def wrap(view: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(view)
        def run(*args: Any, **kwargs: Any) -> Response:
            keys = store()
            key = request_key(owner()) if keys is not None else None
            if keys is None or key is None:
                return view(*args, **kwargs)
            mine = fingerprint(route)
            deadline = time.monotonic() + WAIT_S
            while True:
                held = keys.reserve(key, mine, min(PENDING_S, ttl_s()))
                if held is None:
                    break  # ours: run the view
                if held["fingerprint"] != mine:
                    raise KeyConflict(
                        f"this {HEADER} was used with a different request; use a new key for a new request"
                    )
                if held.get("answer"):
                    return _replay(held["answer"])
                if time.monotonic() > deadline:
                    raise KeyConflict(f"the first request with this {HEADER} is still running; retry shortly")
                time.sleep(POLL_S)  # its twin runs: wait for its answer (or for the key to be freed)
            g.idempotency = (keys, key, ttl_s())
            try:
                resp = view(*args, **kwargs)
            except BaseException:
                if not g.get("idempotency_kept"):
                    keys.release(key)
                raise
            if _retryable(resp.status_code) and g.get("idempotency_kept"):
                return resp  # the job exists: a retry gets its provisional answer, not a second job
            if _retryable(resp.status_code) or resp.is_streamed:
                keys.release(key)
            else:
                keys.complete(key, _keep(resp), ttl_s())
            return resp

        return run

    return wrap


def keep_provisional(resp: Response) -> None:
    """What a retry gets if this request goes wrong after its job was made (a 202 naming the
    job): called by the view once the job is queued. Without a key, nothing."""
    held = g.get("idempotency")
    if held is not None:
        keys, key, ttl = held
        keys.complete(key, _keep(resp), ttl)
        g.idempotency_kept = True


def once(route: str) -> Callable:
    """`idempotent` with the service's store, the caller and the setting (what the routes use)."""
    from .access import caller
    from .service import service

    return idempotent(
        route,
        lambda: service().idempotency,
        lambda: caller().owner,
        lambda: service().settings.server.idempotency_ttl_s,
    )
