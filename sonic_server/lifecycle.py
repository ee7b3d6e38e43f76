"""A job's life in one place: the transitions of its record, the progress reports of a run, and
the one step that runs when a job ends.

    queued --start--> processing --end--> succeeded | failed | canceled
      |                   |
      |                   +--lost (its worker vanished)--> queued again (a retry) or failed (worker_lost)
      +--cancel--> canceled
      +--lost (taken from the queue, never started)--> queued again or failed (worker_lost)

What each transition does to a record is written here only. Whether it happens is the backends'
to decide: the in-process queue (queue/local.py) under its lock, the Redis backend
(queue/redis.py, worker.py) by a compare-and-set on the stored record; each persists the result.

Whatever ends a job (its run, a cancel while it waits, a lost worker), the backend that ended it
hands the final record to its `JobEnd` exactly once: the job's uploads are removed before the
end is published (a client who sees the end finds them gone), then the end is counted in the
metrics and the end hooks run (credits are settled; webhooks will be sent from here).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable

from .errors import status_for
from .jobs import CANCELED, FAILED, PROCESSING, QUEUED, TERMINAL, JobRecord, JobStatus
from .logs import fields
from .metrics import count_job

log = logging.getLogger("sonic.jobs")
WORKER_LOST = {
    "code": "worker_lost",
    "message": "the worker running this job stopped answering (killed or lost); try again",
}
STARTING = "starting"  # the stage of a run that has not reported yet


class JobCanceled(Exception):
    """Raised from a running job's progress report once it is asked to stop."""


class RunSuperseded(JobCanceled):
    """Raised from a run's progress report once the run was declared lost (its worker cut off):
    the job is another run's now, or failed, and the files under its name are not this run's
    to remove (a retried run's finished video has the same name)."""


class JobTimedOut(Exception):
    """Raised from a running job's progress report once its time limit has passed."""


class IllegalTransition(RuntimeError):
    """A transition asked of a record in a state it does not start from: a bug, not an input."""


def _require(rec: JobRecord, *states: JobStatus) -> None:
    if rec.status not in states:
        raise IllegalTransition(f"job {rec.id} is {rec.status}, not {' or '.join(map(str, states))}")


# -- transitions: each changes `rec` in place and returns it -------------------------------------
def queue(rec: JobRecord) -> JobRecord:
    """A new record, or a lost run's record put back, waits for a worker."""
    rec.status, rec.stage, rec.progress, rec.started = QUEUED, QUEUED.value, 0.0, None
    return rec


def start(rec: JobRecord, worker: str | None = None) -> JobRecord:
    """A run begins; a named `worker` (distributed mode) counts it as one more attempt."""
    _require(rec, QUEUED)
    rec.status, rec.stage, rec.started = PROCESSING, STARTING, time.time()
    if worker is not None:
        rec.attempts += 1
        rec.worker = worker
    return rec


def advance(rec: JobRecord, stage: str, fraction: float) -> JobRecord:
    """A running job reports its stage and progress (0-1)."""
    _require(rec, PROCESSING)
    rec.stage, rec.progress = stage, fraction
    return rec


def end(rec: JobRecord, status: JobStatus, **fields) -> JobRecord:
    """The job ends `status`; `fields`: its result and progress, or its error."""
    if status not in TERMINAL:
        raise IllegalTransition(f"{status} is not an end")
    _require(rec, QUEUED, PROCESSING)
    rec.status, rec.stage = status, status.value
    for name, value in fields.items():
        setattr(rec, name, value)
    rec.finished = time.time()
    return rec


def cancel_waiting(rec: JobRecord) -> JobRecord:
    """A job canceled before it started."""
    _require(rec, QUEUED)
    return end(rec, CANCELED)


def lose(rec: JobRecord, retries: int) -> JobRecord:
    """A run that vanished: a running job's whose worker stopped answering, or a waiting job's
    that left the queue and never started (its worker killed between taking and starting it;
    counted as a run, as a started one is). Queued again while its runs so far are at most
    `retries`, else failed `worker_lost`."""
    _require(rec, PROCESSING, QUEUED)
    if rec.status is QUEUED:
        rec.attempts += 1
    if rec.attempts <= retries:
        return queue(rec)
    return end(rec, FAILED, error=dict(WORKER_LOST))


def progress_reporter(
    should_stop: Callable[[], bool], time_limit_s: float, report: Callable[[str, float], None]
) -> Callable[[str, float], None]:
    """The progress callback a task gets: raises JobCanceled once `should_stop()`, JobTimedOut
    once the run has taken longer than `time_limit_s` (0: no limit), else hands the report on.
    A thread cannot be killed: a cancel or a time limit takes effect at the next report."""
    deadline = time.monotonic() + time_limit_s if time_limit_s > 0 else None

    def progress(stage: str, fraction: float) -> None:
        if should_stop():
            raise JobCanceled()
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimedOut()
        report(stage, fraction)

    return progress


class RunEvents:
    """What one run tells its job's webhook as it goes (webhooks.py): its start, then its progress
    when the stage changes or another tenth is done (not every report)."""

    def __init__(self, notify: Callable[[JobRecord, str], None] | None):
        self.notify = notify
        self._last: tuple[str, int] | None = None

    def started(self, rec: JobRecord) -> None:
        if self.notify is not None and rec.webhook:
            if "start" in rec.webhook.get("events", ()):  # sent: a first progress report saying the same is no news
                self._last = (rec.stage, int(rec.progress * 10))
            self.notify(rec.copy(), "start")

    def advanced(self, rec: JobRecord) -> None:
        if self.notify is None or not rec.webhook:
            return
        mark = (rec.stage, int(rec.progress * 10))
        if mark != self._last:
            self._last = mark
            self.notify(rec.copy(), "progress")


# -- the end of a job -------------------------------------------------------------------------
def log_end(rec: JobRecord) -> None:
    """One line per job's end: its id, status, error code, seconds waited in the queue and run,
    and video seconds."""
    line: dict[str, object] = {"job_id": rec.id, "status": rec.status.value}
    if rec.error:
        line["code"] = rec.error.get("code")
    if rec.started:
        line["wait_s"] = round(max(0.0, rec.started - rec.created), 2)
    if rec.started and rec.finished:
        line["run_s"] = round(rec.finished - rec.started, 2)
    if rec.result and "duration" in rec.result:
        line["duration"] = rec.result["duration"]
    if rec.worker:
        line["worker"] = rec.worker
    # the service's own faults warn; a caller's bad input (a photo without a face: 4xx) is routine
    faulted = rec.error is not None and status_for(str(rec.error.get("code"))) >= 500
    (log.warning if faulted else log.info)("job ended %s", json.dumps(line), extra=fields("job ended", line))


class JobEnd:
    """The one end-of-job step of a backend: `before_publish` (the uploads go), then, once the
    final record is saved where others read it, `after_publish` (metrics, then each hook:
    settling the job's credits, later its webhook). Neither raises: a failed part is logged and
    the job's end stands."""

    def __init__(self, uploads, hooks: Iterable[Callable[[JobRecord], None]] = ()):
        self.uploads = uploads
        self.hooks = list(hooks)

    def before_publish(self, rec: JobRecord) -> None:
        try:
            self.uploads.remove(rec.id)
        except Exception:  # noqa: BLE001 - the end stands; the folder is swept at the next start
            log.exception("job %s: its upload folder could not be removed", rec.id)

    def after_publish(self, rec: JobRecord) -> None:
        count_job(rec)
        log_end(rec)
        for hook in self.hooks:
            try:
                hook(rec)
            except Exception:  # noqa: BLE001 - e.g. the accounts database away: its sweep retries
                log.exception("job %s: an end-of-job step failed", rec.id)

    def ended(self, rec: JobRecord) -> None:
        """Both steps, for an end that was published before its uploads went (a cancel or a lost
        worker decided by a compare-and-set)."""
        self.before_publish(rec)
        self.after_publish(rec)
