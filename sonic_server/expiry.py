"""Output expiry: videos older than the time to live are deleted, and finished job records with
them, so the disk and the job table stay bounded. A video's age is its file's modification time (an
object's Last-Modified in a bucket),
a record's its last save; a result cache hit refreshes both (sonic_server/cache.py), under the
lock a sweep holds."""

from __future__ import annotations

import logging
import threading
import time

from .storage import as_outputs

SWEEP_EVERY_S = 60
log = logging.getLogger("sonic.jobs")


class OutputExpiry:
    def __init__(self, store, outputs, ttl_s: float, lock: threading.Lock | None = None):
        self.store = store
        self.outputs = as_outputs(outputs)  # a folder, or the bucket (sonic_server/storage.py)
        self.ttl_s = float(ttl_s)
        self.lock = lock if lock is not None else threading.Lock()  # shared with the result cache
        self._last = 0.0

    def maybe_sweep(self, now: float | None = None) -> None:
        """Sweep if the last sweep is SWEEP_EVERY_S old (the worker calls this between jobs)."""
        now = time.time() if now is None else now
        if now - self._last >= SWEEP_EVERY_S:
            self.sweep(now)

    def sweep(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._last = now
        if self.ttl_s <= 0:  # 0: kept until deleted (DELETE /api/sonic/jobs/<id>)
            return
        with self.lock:
            records = self.store.prune(now - self.ttl_s)
            videos = self.outputs.expire(now - self.ttl_s)
        if records or videos:  # said: a status URL that now answers 404 has its reason in the log
            log.info(
                "expired %d finished job records and %d videos older than server.output_ttl_s (%g s)",
                records,
                videos,
                self.ttl_s,
            )
