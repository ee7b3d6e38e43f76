"""Recovery at start-up: the jobs a previous process left waiting in its queue run again, in the
order they came (a restart, a deploy, loses no job that had not started); those it left running
are reported failed (`interrupted`: a job that was running when its process died may be what
killed it), as is a waiting job whose inputs are gone. The inputs of the failed and any
half-written video are removed, and a video is never served from a `.part` file.

The files are swept whether or not the records survived the restart: with `server.jobs_db: ""`
(records in memory) the store knows no job of the killed process, yet its upload folders and
`.part` files are still on disk. Nothing runs yet when this is called, so every job folder in the
upload folder is a leftover, but those of the jobs that run again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import lifecycle
from .jobs import FAILED, JOB_ID, QUEUED, JobRecord

log = logging.getLogger("sonic.jobs")
INTERRUPTED = {
    "code": "interrupted",
    "message": "the service restarted while this job was running; submit it again",
}
INPUTS_LOST = {
    "code": "interrupted",
    "message": "the service restarted while this job was waiting, and its input files were gone; submit it again",
}


@dataclass
class Recovered:
    """What a start found of the previous process's jobs."""

    resumed: list[JobRecord] = field(default_factory=list)  # waiting, inputs intact: queued again, oldest first
    failed: list[str] = field(default_factory=list)  # ids marked failed (`interrupted`)


def job_folders(uploads) -> Iterator[Path]:
    """The upload folder's job folders (named by a job id; nothing else there is touched)."""
    root = Path(uploads.root)
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.is_dir() and JOB_ID.fullmatch(folder.name):
            yield folder


def recover(store, uploads, output_dir: Path) -> Recovered:
    """Queue again the store's waiting jobs whose inputs are intact; mark the other unfinished
    ones failed; remove every other job's upload folder and the writer's `.part` files."""
    found = Recovered()
    for job_id in store.unfinished():
        rec = store.load(job_id)
        if rec.status == QUEUED and rec.inputs and not rec.missing_inputs():
            found.resumed.append(rec)
            log.info("job %s was waiting when the service stopped: queued again", job_id)
            continue
        error = INPUTS_LOST if rec.status == QUEUED else INTERRUPTED
        store.save(lifecycle.end(rec, FAILED, error=dict(error)))  # its progress: how far it got, as any failure's
        found.failed.append(job_id)
        log.warning("job %s was interrupted by a restart: marked failed", job_id)
    found.resumed.sort(key=lambda rec: rec.created)
    resumed = {rec.id for rec in found.resumed}
    # the failed jobs' inputs go with every other leftover job folder below
    for folder in job_folders(uploads):
        if folder.name not in resumed:
            uploads.remove(folder.name)
            log.info("removed the upload folder %s left by an earlier process", folder.name)
    for part in Path(output_dir).glob(".*.part*"):  # (.part, .wav.part, .part.remux)
        part.unlink(missing_ok=True)
    return found


ORPHAN_GRACE_S = 900.0  # an upload folder's age before a missing record makes it a leftover


def sweep_orphan_uploads(store, uploads, now: float | None = None) -> list[str]:
    """Distributed mode, where no start sweeps the shared folder: upload folders older than
    ORPHAN_GRACE_S whose job has ended or has no record (an API process killed mid-request, a job
    store that lost its data) are removed. The grace covers a request between its files written
    and its record saved; a job still waiting or running keeps its folder. The ids removed."""
    now = time.time() if now is None else now
    removed = []
    for folder in job_folders(uploads):
        try:
            if now - folder.stat().st_mtime < ORPHAN_GRACE_S:
                continue
        except OSError:
            continue  # removed meanwhile
        rec = store.load(folder.name)
        if rec is None or rec.terminal:
            uploads.remove(folder.name)
            removed.append(folder.name)
            log.info("removed the upload folder %s: its job %s", folder.name, "ended" if rec else "is unknown")
    return removed
