"""The in-process backend: one worker thread runs the jobs (one model, one device); others wait
in a bounded queue.

It composes the small pieces: a store for the records (sonic_server/store.py), the result cache
(cache.py), crash recovery at start-up (recovery.py), output expiry between jobs (expiry.py) and
the upload folder (uploads.py), whose files go when a job ends. Records of queued and running
jobs are held here and changed in place under one condition; a finished record lives in the
store only (or, while the store refuses it, here until it takes it).

Decoded inputs, handed over by `submit` (up to ~120 MB a job), are kept only for the job that
runs next, whose task then decodes nothing again; a job further back lets them go and its task
reads the stored files, as for a recovered record, so memory does not grow with the queue.

Nothing the store, the expiry sweep or a task raises stops the worker: the job ends failed,
its waiters are told, and the next job runs. A job running longer than `job_timeout_s` is
stopped the way a cancel stops it (a thread cannot be killed): the progress callback the task
gets raises at its next report once the limit has passed (the pipeline reports after each batch
of frames), and the job ends failed with the code `job_timeout`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from .. import lifecycle
from ..cache import ResultCache
from ..expiry import SWEEP_EVERY_S, OutputExpiry
from ..jobs import CANCELED, FAILED, JobQuery, JobRecord, newest_first
from ..lifecycle import JobEnd
from ..recovery import INTERRUPTED, recover
from ..store import MemoryStore
from ..tasks import TASKS
from . import CallerBusy, JobQueue, QueueFull, WorkerStopped, follow
from .execute import INTERNAL, run_task

log = logging.getLogger("sonic.jobs")
CUT_OFF_CODES = ("internal_error", "pipeline_error")  # how a job cut off by its process's exit fails
NOT_STARTED = {
    "code": "internal_error",
    "message": "the job could not be started (its record was not saved); see the server log with this job id",
}


class LocalQueue(JobQueue):
    def __init__(
        self,
        pipeline,
        output_dir: Path,
        uploads,
        *,
        queue_size: int,
        output_ttl_s: float,
        max_jobs_per_caller: int = 0,
        store=None,
        tasks: dict | None = None,
        job_timeout_s: float = 0.0,
        end_hooks: tuple[Callable[[JobRecord], None], ...] = (),
        notify: Callable[[JobRecord, str], None] | None = None,
    ):
        """`max_jobs_per_caller`: jobs one owner may have waiting or running (0: no bound).
        `job_timeout_s`: a running job is stopped (failed, `job_timeout`) at its first progress
        report after this many seconds; 0 sets no limit. `end_hooks`: what runs once when a job
        has ended (lifecycle.JobEnd), before anyone sees the end (settling its credits). `notify`:
        a job's start and progress, for its webhook (webhooks.py)."""
        self.pipeline = pipeline
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads
        self.ending = JobEnd(uploads, end_hooks)
        self.store = store if store is not None else MemoryStore()
        outputs_lock = threading.Lock()  # a cache hit's refresh and the expiry sweep, one at a time
        self.cache = ResultCache(self.store, self.output_dir, outputs_lock)
        self.expiry = OutputExpiry(self.store, self.output_dir, output_ttl_s, outputs_lock)
        self.tasks = tasks if tasks is not None else TASKS
        self.queue_size = int(queue_size)
        self.max_jobs_per_caller = int(max_jobs_per_caller)
        self.job_timeout_s = float(job_timeout_s)
        found = recover(self.store, uploads, self.output_dir)
        for job_id in found.failed:
            rec = self.store.load(job_id)  # ended by the restart: its end-of-job step runs now (its webhook)
            if rec is not None:
                self.ending.after_publish(rec)
        # queued and running records; those the previous process left waiting first
        self._live: dict[str, JobRecord] = {rec.id: rec for rec in found.resumed}
        self._inputs: dict[str, object] = {}  # decoded inputs of the next job, until it starts
        self._unsaved: dict[str, JobRecord] = {}  # finished records the store refused, until it takes them
        # waiting job ids, oldest first
        self._pending: collections.deque[str] = collections.deque(rec.id for rec in found.resumed)
        self._canceling: set[str] = set()
        # submits between their place taken and their record written, by owner ("": none)
        self._placing: collections.Counter[str] = collections.Counter()
        self._changed = threading.Condition()
        self._running: str | None = None
        self._closed = False
        self._paused = False  # stopping: no job starts; the waiting ones run at the next start
        self.notify = notify
        self._worker = threading.Thread(target=self._run, name="sonic-worker", daemon=True)
        self._worker.start()

    # -- the interface ------------------------------------------------------------------
    def check_room(self) -> None:
        with self._changed:
            self._refuse_if_full()

    def _refuse_if_full(self) -> None:
        """WorkerStopped or QueueFull, as a submit now would be told (under the lock)."""
        if self._closed or not self._worker.is_alive():
            raise WorkerStopped()
        if len(self._pending) + self._placing.total() >= self.queue_size:
            raise QueueFull()

    def submit(self, rec: JobRecord, inputs=None) -> JobRecord:
        with self._changed:
            self._refuse_if_full()
            if rec.owner is not None and self.max_jobs_per_caller:
                active = self._active_of(rec.owner)
                if active >= self.max_jobs_per_caller:
                    raise CallerBusy(active)
            self._placing[rec.owner or ""] += 1  # its place is held while its record is written, outside the lock
        rec = lifecycle.queue(rec.copy())
        try:
            # first: a record the store refuses is never queued. Outside the lock: a store slow
            # to write (a busy database) holds up this request, not every status read
            self.store.save(rec)
        except BaseException:
            with self._changed:
                self._placed(rec)
            raise
        with self._changed:
            self._placed(rec)  # in the same hold of the lock as it joins the live set: counted throughout
            self._live[rec.id] = rec
            if inputs is not None and not self._pending:  # this job runs next: keep its arrays
                self._inputs[rec.id] = inputs
            self._pending.append(rec.id)
            self._changed.notify_all()
            return rec.copy()

    def _placed(self, rec: JobRecord) -> None:
        """Under the lock: a submit's place is no longer held (its record joins the live set, or not)."""
        owner = rec.owner or ""
        self._placing[owner] -= 1
        if not self._placing[owner]:
            del self._placing[owner]  # not one entry for every caller ever seen

    def active_of(self, owner: str) -> int:
        with self._changed:
            return self._active_of(owner)

    def _active_of(self, owner: str) -> int:
        """Under the lock: the owner's queued and running jobs, and its submits being placed."""
        return self._placing[owner] + sum(rec.owner == owner for rec in self._live.values())

    def get(self, job_id: str) -> JobRecord | None:
        with self._changed:
            rec = self._live.get(job_id) or self._unsaved.get(job_id)
            if rec is not None:
                return rec.copy()
        return self.store.load(job_id)

    def cached(self, key: str) -> JobRecord | None:
        return self.cache.lookup(key)

    def list(self, query: JobQuery) -> list[JobRecord]:
        """The store's page, with the records held here (queued, running, or finished but not yet
        taken by the store) as they are now."""
        stored = self.store.list(query)
        with self._changed:
            held = {job_id: rec.copy() for job_id, rec in {**self._unsaved, **self._live}.items()}
        page = {rec.id: held.get(rec.id, rec) for rec in stored}
        for rec in held.values():
            page.setdefault(rec.id, rec)
        return newest_first([rec for rec in page.values() if query.admits(rec)])[: query.limit]

    def delete(self, job_id: str, remove_files: Callable[[], None] = lambda: None) -> bool:
        with self._changed:
            if job_id in self._live:
                return False  # not ended: cancel it first
        with self.cache.lock:
            remove_files()
            with self._changed:
                held = self._unsaved.pop(job_id, None) is not None
            return self.store.delete(job_id) or held

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._changed:
            rec = self._live.get(job_id)
            queued = rec is not None and job_id in self._pending
            if queued:  # a canceled job frees its place in the queue at once
                self._pending.remove(job_id)
            elif rec is not None:
                self._canceling.add(job_id)
        if queued:
            assert rec is not None  # queued implies a live record
            self._finish(rec, lifecycle.cancel_waiting)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while job_id in self._live and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
        return self.get(job_id)

    def events(self, job_id: str, heartbeat_s: float) -> Iterator[JobRecord | None]:
        def wait_for_change(last: dict) -> None:
            deadline = time.monotonic() + heartbeat_s
            with self._changed:
                while job_id in self._live and self._live[job_id].to_dict() == last and time.monotonic() < deadline:
                    self._changed.wait(deadline - time.monotonic())

        return follow(lambda: self.get(job_id), wait_for_change)

    def queue_length(self) -> int:
        with self._changed:
            return len(self._pending)

    def ahead_of(self, rec: JobRecord) -> int | None:
        with self._changed:
            try:
                return self._pending.index(rec.id)
            except ValueError:
                return None

    def held_inputs(self) -> frozenset[str]:
        """The jobs whose decoded arrays this queue holds (the next job's at most): the others
        read their stored files when they run."""
        with self._changed:
            return frozenset(self._inputs)

    def health(self) -> dict:
        """One snapshot, taken under the lock the worker changes them under."""
        with self._changed:
            return {
                "running_job": self._running,
                "workers_alive": int(self._worker.is_alive()),
                "queue_length": len(self._pending),
            }

    def pause(self) -> None:
        with self._changed:
            self._paused = True

    def close(self, wait_s: float = 0.0) -> None:
        """Stop taking jobs; the running one stops at its next progress report (`interrupted`).
        `wait_s`: wait that long for it to end: a process that exits with a render running in a
        thread ends in abort() (a C++ thread pool destroyed while it works: SIGABRT, not 143)."""
        deadline = time.monotonic() + wait_s
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while self._running is not None and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())

    # -- the worker ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            rec = self._next_job()
            self._housekeeping()
            if rec is not None:
                self._process(rec)

    def _next_job(self) -> JobRecord | None:
        """The oldest waiting record, marked processing (in memory), or None after SWEEP_EVERY_S."""
        with self._changed:
            if (not self._pending or self._paused) and not self._closed:
                self._changed.wait(SWEEP_EVERY_S)
            if not self._pending or self._closed or self._paused:
                return None
            rec = lifecycle.start(self._live[self._pending.popleft()])
            self._running = rec.id
            self._changed.notify_all()
            return rec

    def _housekeeping(self) -> None:
        """Between jobs: save the finished records the store refused, sweep old outputs. Never raises."""
        with self._changed:
            waiting = list(self._unsaved.items())
        for job_id, rec in waiting:  # written outside the lock, as submit's are
            with self.cache.lock:  # not beside a delete of the same job
                with self._changed:
                    if self._unsaved.get(job_id) is not rec:
                        continue  # deleted meanwhile
                try:
                    self.store.save(rec)
                except Exception:  # noqa: BLE001 - still refused: try again later
                    break
                with self._changed:
                    self._unsaved.pop(job_id, None)
            log.info("job %s: its final record is saved now", job_id)
        try:
            self.expiry.maybe_sweep()
        except Exception:  # noqa: BLE001 - the worker must outlive a failed sweep
            log.exception("output expiry sweep failed")

    def _process(self, rec: JobRecord) -> None:
        """Run one job to its end; whatever fails, the job ends and the worker goes on."""
        try:
            self.store.save(rec)
        except Exception:  # noqa: BLE001 - e.g. disk full, database locked
            log.exception("job %s: the store refused its start", rec.id)
            self._finish(rec, lambda r: lifecycle.end(r, FAILED, error=dict(NOT_STARTED)))
        else:
            events = lifecycle.RunEvents(self.notify)
            events.started(rec)
            try:
                self._execute(rec, events)
            except Exception:  # noqa: BLE001 - the worker must outlive any job
                log.exception("job %s failed outside its task", rec.id)
                self._finish(rec, lambda r: lifecycle.end(r, FAILED, error=dict(INTERNAL)))
        finally:
            with self._changed:
                self._running = None
                self._changed.notify_all()  # a closing process waits for this

    def _execute(self, rec: JobRecord, events: lifecycle.RunEvents) -> None:
        def report(stage: str, fraction: float) -> None:
            with self._changed:
                lifecycle.advance(rec, stage, fraction)
                self._changed.notify_all()
            events.advanced(rec)

        def asked_to_stop() -> bool:  # a cancel, or the process closing the queue at its exit
            with self._changed:
                return rec.id in self._canceling or self._closed

        progress = lifecycle.progress_reporter(asked_to_stop, self.job_timeout_s, report)
        status, fields = run_task(
            rec,
            self.tasks,
            self.pipeline,
            self.output_dir,
            self._inputs.pop(rec.id, None),
            progress,
            self.job_timeout_s,
        )
        with self._changed:
            stopping, canceled = self._paused or self._closed, rec.id in self._canceling
        cut_off = status == FAILED and fields.get("error", {}).get("code") in CUT_OFF_CODES
        if stopping and (cut_off or (status == CANCELED and not canceled)):
            # the process is exiting under the job (stopped by `close`, or its render helpers
            # stopped first): not the job's fault, nor a cancel, as `internal_error` said
            status, fields = FAILED, {"error": dict(INTERRUPTED)}
        self._finish(rec, lambda r: lifecycle.end(r, status, **fields))

    def _finish(self, rec: JobRecord, transition: Callable[[JobRecord], JobRecord]) -> None:
        """End a job by `transition` (a lifecycle end): its uploads go, its final record is saved
        and the end-of-job step runs (metrics, settling its credits), all outside the queue's lock
        (a slow database stalls no other request) while the live record still says it runs; only
        then does it leave the live set and are waiters told, so whoever sees the end sees it
        settled. Never raises: a final record the store refuses is logged and kept in `_unsaved`
        (answered by `get`) until the store takes it between jobs."""
        self.ending.before_publish(rec)
        final = transition(rec.copy())
        try:
            self.store.save(final)
            refused = False
        except Exception:  # noqa: BLE001 - e.g. disk full, database locked
            log.exception("job %s ended %s but the store refused its record; kept in memory", rec.id, final.status)
            refused = True
        self.ending.after_publish(final)
        with self._changed:
            if refused:
                self._unsaved[rec.id] = final
            self._live.pop(rec.id, None)
            self._inputs.pop(rec.id, None)
            self._canceling.discard(rec.id)
            self._changed.notify_all()
