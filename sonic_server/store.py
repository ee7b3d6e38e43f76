"""Job records in SQLite, so status and results survive a restart.

The worker thread and request threads write through one connection guarded by a lock. At start-up
jobs that were queued or running when the process died are marked failed: their inputs are gone
with the process's memory of them, and a half-written video is never served.

A record's error keeps its code, message and field, never an HTTP status (the server derives that
from the code when it answers). Rows written by older releases hold a `status` inside the error
JSON; `load` drops it, so those rows still load and answer with the status of their code. (The
`status` column is the job's state, queued...failed, not an HTTP status.)
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    stage TEXT NOT NULL,
    cache_key TEXT,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_cache ON jobs (cache_key, status);
"""
INTERRUPTED = {"code": "interrupted",
               "message": "the service restarted while this job was queued or running; submit it again"}


class JobStore:
    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def recover(self) -> list[str]:
        """Mark jobs left queued/processing by a previous process as failed; return their ids."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status IN ('queued', 'processing')")]
            self._db.execute("UPDATE jobs SET status='failed', stage='failed', error=?, updated=? "
                             "WHERE status IN ('queued', 'processing')", (json.dumps(INTERRUPTED), time.time()))
        return ids

    def save(self, job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, stage, cache_key, result, error, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET status=excluded.status, "
                "stage=excluded.stage, result=excluded.result, error=excluded.error, updated=excluded.updated",
                (job.id, job.status, job.stage, job.cache_key, json.dumps(job.result) if job.result else None,
                 json.dumps(job.error) if job.error else None, job.created, time.time()))

    def load(self, job_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT id, status, stage, result, error FROM jobs WHERE id=?",
                                   (job_id,)).fetchone()
        if row is None:
            return None
        return {"id": row[0], "status": row[1], "stage": row[2],
                "result": json.loads(row[3]) if row[3] else None, "error": _error_record(row[4])}

    def cached(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM jobs WHERE cache_key=? AND status='succeeded' "
                                   "ORDER BY updated DESC LIMIT 1", (key,)).fetchone()
        return row[0] if row else None

    def prune(self, before: float) -> int:
        """Forget finished jobs last updated before `before` (epoch s); returns how many."""
        with self._lock:
            cur = self._db.execute("DELETE FROM jobs WHERE updated < ? AND status IN ('succeeded', 'failed', 'canceled')",
                                   (before,))
        return cur.rowcount


def _error_record(text: str | None) -> dict | None:
    """A stored error as code, message and field; an older release's stored HTTP status is dropped."""
    if not text:
        return None
    error = json.loads(text)
    error.pop("status", None)
    return error
