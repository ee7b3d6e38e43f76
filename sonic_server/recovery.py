"""Crash recovery at start-up: jobs a previous process left queued or processing are reported
failed (`interrupted`); their inputs and any half-written video are removed, and a video is
never served from a `.part` file."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .jobs import FAILED

log = logging.getLogger("sonic.jobs")
INTERRUPTED = {"code": "interrupted",
               "message": "the service restarted while this job was queued or running; submit it again"}


def recover(store, uploads, output_dir: Path) -> list[str]:
    """Mark the store's unfinished jobs failed; returns their ids."""
    ids = store.unfinished()
    for job_id in ids:
        rec = store.load(job_id)
        rec.status = rec.stage = FAILED
        rec.progress, rec.error, rec.finished = 0.0, dict(INTERRUPTED), time.time()
        store.save(rec)
        uploads.remove(job_id)
        log.warning("job %s was interrupted by a restart: marked failed", job_id)
    for part in Path(output_dir).glob(".*.part"):
        part.unlink(missing_ok=True)
    return ids
