"""Where job records are kept: SQLite (they survive a restart) or memory (`server.jobs_db: ""`).

Both stores hold whole records (sonic_server/jobs.py) and answer the same questions: save, load,
the newest succeeded job for a cache key, the unfinished jobs (for recovery at start-up), a
listing (an owner's jobs, newest first, a page at a time), deleting one, and pruning of old
finished jobs. Writes from the worker thread and request threads go through
one connection guarded by a lock.

A record's error keeps its code, message and field, never an HTTP status (the server derives that
from the code when it answers). Rows written by older releases have no `record` column value and
may hold a `status` inside the error JSON; `load` rebuilds them from their columns and drops that
status, so they still load and answer with the status of their code. (The `status` column is the
job's state, queued...failed, not an HTTP status.)
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from sonic.errors import SetupError

from .jobs import SUCCEEDED, TERMINAL, JobQuery, JobRecord, newest_first

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    cache_key TEXT,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    record TEXT
);
CREATE INDEX IF NOT EXISTS jobs_cache ON jobs (cache_key, status);
"""
# added later (ALTER TABLE on an older database): the owner, for listings
OWNER_INDEX = "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, created)"
_FINISHED = "(" + ", ".join(f"'{s}'" for s in TERMINAL) + ")"


# what this process owns (a lock file's resolved path -> its locked descriptor, held until exit)
_CLAIMED: dict[str, int] = {}


def claim(lock: str | Path, what: str, setting: str) -> None:
    """Own `what` (a single-process service's job database, its upload folder) for this process's
    life, by a lock on `lock` (a file, made if need be, or a folder). A second service started
    on the same data folder took the first one's running jobs for a restart's leftovers (marked
    them failed and removed their uploads) and ran its waiting jobs a second time: it is now
    refused at start. Apps made again in one process (tests, embedding) share the claim;
    processes forked after it (a WSGI server's preloaded app) share it too, unseen."""
    key = str(Path(lock).resolve())
    if key in _CLAIMED:
        return
    try:
        if Path(key).is_dir():  # a folder is locked itself: nothing is added to it
            fd = os.open(key, os.O_RDONLY)
        else:
            Path(key).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise SetupError(f"{what} cannot be locked: {e.strerror or type(e).__name__} ({setting})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SetupError(
            f"another sonic service uses {what} ({setting}): run one service process per data folder, "
            "or several API processes with Redis (docs/scaling.md)"
        ) from None
    _CLAIMED[key] = fd


def open_store(path: str | Path) -> "JobStore | MemoryStore":
    """The store at `path` (the settings' `server.jobs_db_path`: `server.jobs_db` if it is set,
    else `<data_dir>/jobs.sqlite3`); "" keeps records in memory."""
    return JobStore(path) if str(path) else MemoryStore()


def open_database(path: str | Path, timeout_s: float = 5.0) -> sqlite3.Connection:
    """A connection to the job database (its folder made), in autocommit and WAL mode, usable from
    any thread (its owner guards it with a lock). The job store and the tables kept beside the
    jobs (idempotency.py, webhooks.py) each open their own: WAL lets them write side by side."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=timeout_s)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA secure_delete=ON")  # a deleted record's pages are zeroed, not left to be read
    try:  # its records (webhook URLs with their passwords, answers) are the service's alone;
        os.chmod(path, 0o600)  # the write-ahead log and its index take the file's mode
    except OSError:  # a file another user made: left as it is
        pass
    return db


def forget_on_disk(db: sqlite3.Connection) -> None:
    """After a delete: the write-ahead log copied into the database and emptied. Until then it
    held every version of a deleted record (a job deleted on request, its webhook's password),
    for as long as the service ran: it was never checkpointed. Best effort: a reader busy at
    that moment leaves it to the next delete."""
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass


class JobStore:
    def __init__(self, path: str | Path):
        self._db = open_database(path)
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "record" not in columns:  # a database from an older release
            self._db.execute("ALTER TABLE jobs ADD COLUMN record TEXT")
        if "owner" not in columns:  # older still: the owner column is filled from the records
            self._db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        # at every start (an interrupted upgrade, rows an older release wrote after a rollback)
        self._db.execute(
            "UPDATE jobs SET owner = json_extract(record, '$.owner') WHERE owner IS NULL AND record IS NOT NULL"
        )
        self._db.execute(OWNER_INDEX)
        self._lock = threading.Lock()

    def save(self, rec: JobRecord, updated: float | None = None) -> None:
        """Insert or replace the record; `updated` (epoch s, default now) is what the expiry goes by."""
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, stage, cache_key, result, error, created, updated, record, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status=excluded.status, "
                "stage=excluded.stage, result=excluded.result, error=excluded.error, updated=excluded.updated, "
                "record=excluded.record",
                (
                    rec.id,
                    rec.status,
                    rec.stage,
                    rec.cache_key,
                    json.dumps(rec.result) if rec.result else None,
                    json.dumps(rec.error) if rec.error else None,
                    rec.created,
                    time.time() if updated is None else updated,
                    json.dumps(rec.to_dict()),
                    rec.owner,
                ),
            )

    def load(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, status, stage, cache_key, result, error, created, record FROM jobs WHERE id=?", (job_id,)
            ).fetchone()
        if row is None:
            return None
        if row[7]:
            rec = JobRecord.from_dict(json.loads(row[7]))
        else:  # written by an older release: columns only
            rec = JobRecord(
                id=row[0],
                kind="generate",
                params={},
                cache_key=row[3] or "",
                status=row[1],
                stage=row[2],
                progress=1.0 if row[1] == SUCCEEDED else 0.0,
                result=json.loads(row[4]) if row[4] else None,
                error=json.loads(row[5]) if row[5] else None,
                created=row[6],
            )
        rec.error = _error_record(rec.error)
        return rec

    def cached(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE cache_key=? AND status='succeeded' ORDER BY updated DESC LIMIT 1", (key,)
            ).fetchone()
        return row[0] if row else None

    def unfinished(self) -> list[str]:
        """Ids of jobs still queued or processing (at start-up: cut off by a crash)."""
        with self._lock:
            return [r[0] for r in self._db.execute(f"SELECT id FROM jobs WHERE status NOT IN {_FINISHED}")]

    def list(self, query: JobQuery) -> list[JobRecord]:
        """One page of the listing (rows an older release wrote, without a record, are left out)."""
        where: list[str] = ["record IS NOT NULL"]
        args: list[object] = []
        if query.owner is not None:
            where.append("owner = ?")
            args.append(query.owner)
        if query.statuses:
            where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            args += [str(s) for s in query.statuses]
        if query.created_from is not None:
            where.append("created >= ?")
            args.append(query.created_from)
        if query.created_to is not None:
            where.append("created < ?")
            args.append(query.created_to)
        if query.after is not None:
            where.append("(created < ? OR (created = ? AND id < ?))")
            args += [query.after[0], query.after[0], query.after[1]]
        sql = f"SELECT record FROM jobs WHERE {' AND '.join(where)} ORDER BY created DESC, id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(sql, (*args, query.limit)).fetchall()
        return [JobRecord.from_dict(json.loads(row[0])) for row in rows]

    def delete(self, job_id: str) -> bool:
        with self._lock:
            gone = self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
        if gone:
            forget_on_disk(self._db)
        return gone

    def prune(self, before: float) -> int:
        """Forget finished jobs last updated before `before` (epoch s); returns how many."""
        with self._lock:
            cur = self._db.execute(f"DELETE FROM jobs WHERE updated < ? AND status IN {_FINISHED}", (before,))
        if cur.rowcount:
            forget_on_disk(self._db)
        return cur.rowcount


class MemoryStore:
    """The same questions answered from a dict: records last as long as the process."""

    def __init__(self):
        self._records: dict[str, tuple[dict, float]] = {}  # id -> (record, updated)
        self._lock = threading.Lock()

    def save(self, rec: JobRecord, updated: float | None = None) -> None:
        with self._lock:
            self._records[rec.id] = (rec.to_dict(), time.time() if updated is None else updated)

    def load(self, job_id: str) -> JobRecord | None:
        with self._lock:
            entry = self._records.get(job_id)
        # a deep copy: the caller's params, result and error are its own, as with SQLite
        return JobRecord.from_dict(copy.deepcopy(entry[0])) if entry else None

    def cached(self, key: str) -> str | None:
        with self._lock:
            hits = [
                (updated, d["id"])
                for d, updated in self._records.values()
                if d["cache_key"] == key and d["status"] == SUCCEEDED
            ]
        return max(hits)[1] if hits else None

    def unfinished(self) -> list[str]:
        with self._lock:
            return [job_id for job_id, (d, _) in self._records.items() if d["status"] not in TERMINAL]

    def list(self, query: JobQuery) -> list[JobRecord]:
        with self._lock:
            records = [JobRecord.from_dict(copy.deepcopy(d)) for d, _ in self._records.values()]
        return newest_first([r for r in records if query.admits(r)])[: query.limit]

    def delete(self, job_id: str) -> bool:
        with self._lock:
            return self._records.pop(job_id, None) is not None

    def prune(self, before: float) -> int:
        with self._lock:
            old = [
                job_id for job_id, (d, updated) in self._records.items() if updated < before and d["status"] in TERMINAL
            ]
            for job_id in old:
                del self._records[job_id]
        return len(old)


def _error_record(error: dict | None) -> dict | None:
    """A stored error as code, message and field; an older release's stored HTTP status is dropped."""
    if not error:
        return None
    return {k: v for k, v in error.items() if k != "status"}
