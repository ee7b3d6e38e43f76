"""Result cache: identical inputs and parameters (the same cache key) answer with the video
already made, as long as its record and its file both still exist.

A hit starts the video's time to live again (sonic_server/expiry.py deletes by the file's
modification time and the record's last save): the URL a hit returns is good for the full
`output_ttl_s`, not for whatever was left of it. The check and the refresh hold the lock the
expiry sweep holds, so a sweep never deletes a video between the two.
"""

from __future__ import annotations

import logging
import threading

from .jobs import SUCCEEDED, JobRecord
from .storage import as_outputs

log = logging.getLogger("sonic.jobs")


class ResultCache:
    def __init__(self, store, outputs, lock: threading.Lock | None = None):
        self.store = store
        self.outputs = as_outputs(outputs)  # a folder, or the bucket (sonic_server/storage.py)
        self.lock = lock if lock is not None else threading.Lock()  # shared with the expiry sweep

    def lookup(self, key: str) -> JobRecord | None:
        job_id = self.store.cached(key) if key else None
        rec = self.store.load(job_id) if job_id else None
        if not rec or rec.status != SUCCEEDED:
            return None
        with self.lock:
            if not self.outputs.touch(rec.result["file"]):  # the video's clock starts again; gone: no hit
                return None
            try:
                self.store.save(rec)  # and the record's
            except Exception:  # noqa: BLE001 - the video is there: still a hit
                log.exception("cache hit %s: its record could not be refreshed", rec.id)
        return rec
