"""Crash recovery at start-up: jobs a previous process left queued or processing are reported
failed (`interrupted`); their inputs and any half-written video are removed, and a video is
never served from a `.part` file.

The files are swept whether or not the records survived the restart: with `server.jobs_db: ""`
(records in memory) the store knows no job of the killed process, yet its upload folders and
`.part` files are still on disk. Nothing runs yet when this is called, so every job folder in the
upload folder is a leftover.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .jobs import FAILED, JOB_ID

log = logging.getLogger("sonic.jobs")
INTERRUPTED = {
    "code": "interrupted",
    "message": "the service restarted while this job was queued or running; submit it again",
}


def recover(store, uploads, output_dir: Path) -> list[str]:
    """Mark the store's unfinished jobs failed, remove every job's upload folder and the writer's
    `.part` files; returns the ids of the jobs marked failed."""
    ids = store.unfinished()
    for job_id in ids:
        rec = store.load(job_id)
        rec.status = rec.stage = FAILED
        rec.progress, rec.error, rec.finished = 0.0, dict(INTERRUPTED), time.time()
        store.save(rec)
        log.warning("job %s was interrupted by a restart: marked failed", job_id)
    # its inputs go with every other job folder below
    root = Path(uploads.root)
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and JOB_ID.fullmatch(folder.name):
            uploads.remove(folder.name)
            log.info("removed the upload folder %s left by an earlier process", folder.name)
    for part in Path(output_dir).glob(".*.part"):
        part.unlink(missing_ok=True)
    return ids
