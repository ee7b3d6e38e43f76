"""The job queue as the routes see it; backends live beside this file.

`local.LocalQueue` runs jobs on one worker thread in the web process. A Redis backend (worker
processes, `sonic worker`) implements the same methods, so the routes do not change. Every
method returns copies of records (sonic_server/jobs.py): a caller never sees one change under it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

from sonic import SonicError

from ..jobs import JobQuery, JobRecord


class QueueFull(Exception):
    """No place left in the queue: the route answers 503 + Retry-After."""


class CallerBusy(SonicError):
    """The caller (a key or an account) has server.max_jobs_per_caller jobs waiting or running:
    429 + Retry-After, nothing queued."""

    code = "rate_limited"

    def __init__(self, active: int):
        super().__init__(
            f"this caller has {active} job(s) waiting or running, the most one key or account may "
            "(server.max_jobs_per_caller); wait for one to end, or cancel one"
        )


class WorkerStopped(Exception):
    """No worker would ever run the job (stopped or closed): the route answers 503, nothing
    queued. `short_of_disk`: the workers are alive, each waiting for room on its disk."""

    def __init__(self, short_of_disk: bool = False):
        super().__init__()
        self.short_of_disk = short_of_disk


def follow(get: Callable[[], JobRecord | None], wait_for_change: Callable[[dict], None]) -> Iterator[JobRecord | None]:
    """What `JobQueue.events` yields: the record now, then after each `wait_for_change(last)`
    (which returns on a change or at the heartbeat) the record if it changed, else None; until
    it ends or is gone."""
    last = None
    while True:
        rec = get()
        if rec is None:
            return
        now = rec.to_dict()
        yield None if now == last else rec
        last = now
        if rec.terminal:
            return
        wait_for_change(last)


class JobQueue(ABC):
    output_dir: Path  # where a finished job's `result["file"]` lies

    @abstractmethod
    def submit(self, rec: JobRecord, inputs=None) -> JobRecord:
        """Queue a new record; `inputs` are arrays already decoded by the route
        (`sonic.checks.CheckedInputs`), which a backend in the same process hands to the task.
        Raises QueueFull, or CallerBusy when the record's owner has `max_jobs_per_caller` jobs
        waiting or running (the count and the place taken at one moment: submits racing cannot
        both pass it)."""

    @abstractmethod
    def check_room(self) -> None:
        """What `submit` would refuse a record with now, whoever its owner: WorkerStopped, or
        QueueFull. Asked before a request's files are stored and decoded (a 40 MP photo took
        3.6 s of CPU to be told the queue was full); `submit`'s own check holds under races."""

    @abstractmethod
    def active_of(self, owner: str) -> int:
        """How many jobs of `owner` wait or run now (what `max_jobs_per_caller` bounds)."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """The record, live or finished (also one from before a restart); None if unknown."""

    @abstractmethod
    def cached(self, key: str) -> JobRecord | None:
        """A succeeded job for this cache key whose output still exists, else None."""

    @abstractmethod
    def list(self, query: JobQuery) -> list[JobRecord]:
        """One page of the jobs the query admits, newest first (sonic_server/jobs.py: JobQuery)."""

    @abstractmethod
    def delete(self, job_id: str, remove_files: Callable[[], None] = lambda: None) -> bool:
        """Forget an ended job: `remove_files` (its video, its uploads), then its record and
        whatever finds it (the cache's entry, indexes), all under the result cache's lock (a hit
        being refreshed meanwhile cannot bring the record back); False if there was none."""

    @abstractmethod
    def cancel(self, job_id: str) -> JobRecord | None:
        """Ask a job to stop: a queued job is canceled at once, a running one at its next
        progress report. Returns the record as it is now; None if unknown."""

    @abstractmethod
    def wait(self, job_id: str, timeout: float) -> JobRecord | None:
        """The record once it has ended, or as it is when `timeout` seconds have passed."""

    @abstractmethod
    def events(self, job_id: str, heartbeat_s: float) -> Iterator[JobRecord | None]:
        """The record now, then each time it changes, ending with its final state; None when
        `heartbeat_s` pass without a change (a keep-alive). Nothing if the job is unknown."""

    @abstractmethod
    def queue_length(self) -> int:
        """Jobs waiting, not counting the ones running."""

    @abstractmethod
    def ahead_of(self, rec: JobRecord) -> int | None:
        """How many jobs wait to start before this one, a record the caller has at hand (0: it
        starts next); None unless it is waiting."""

    @abstractmethod
    def health(self) -> dict:
        """{"running_job": id or None, "workers_alive": int, "queue_length": int} (and, where workers
        may stop taking jobs, "workers_taking_jobs": int), one snapshot
        (taken at one moment, never half before and half after a job starts or ends); with
        "unavailable" (why) when the job store does not answer."""

    def decoder_identity(self) -> str | None:
        """The identity of the decoder that runs this queue's jobs (sonic.decoders: its name and
        weights), when the queue knows it."""
        return None

    def pause(self) -> None:  # noqa: B027 - where the jobs run elsewhere (workers), nothing to pause
        """Start no more jobs (this process is stopping): the waiting ones stay queued, for the
        next start to run (a job started now would be cut off at the exit)."""

    def close(self, wait_s: float = 0.0) -> None:  # noqa: B027 - a backend with nothing to stop needs no close
        """Stop taking jobs (tests, shutdown); `wait_s`: how long to wait for a running job to stop."""
