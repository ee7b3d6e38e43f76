"""The in-process backend: one worker thread runs the jobs (one model, one device); others wait
in a bounded queue.

It composes the small pieces: a store for the records (sonic_server/store.py), the result cache
(cache.py), crash recovery at start-up (recovery.py), output expiry between jobs (expiry.py) and
the upload folder (uploads.py), whose files go when a job ends. Records of queued and running
jobs are held here and changed in place under one condition; a finished record lives in the
store only. A job's decoded inputs, handed over by `submit`, go to its task, so the web process
never decodes a file twice.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Iterator

from sonic import SonicError

from ..cache import ResultCache
from ..expiry import SWEEP_EVERY_S, OutputExpiry
from ..jobs import CANCELED, FAILED, PROCESSING, QUEUED, SUCCEEDED, JobRecord
from ..recovery import recover
from ..store import MemoryStore
from ..tasks import TASKS
from . import JobQueue, QueueFull

log = logging.getLogger("sonic.jobs")
INTERNAL = {"code": "internal_error", "message": "generation failed; see the server log with this job id"}
OUT_OF_MEMORY = {"code": "out_of_memory",
                 "message": "ran out of memory; try a shorter clip or a lower min_resolution"}


class JobCanceled(Exception):
    """Raised from a running job's progress report once it is asked to stop."""


class LocalQueue(JobQueue):
    def __init__(self, pipeline, output_dir: Path, uploads, *, queue_size: int, output_ttl_s: float,
                 store=None, tasks: dict | None = None):
        self.pipeline = pipeline
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads
        self.store = store if store is not None else MemoryStore()
        self.cache = ResultCache(self.store, self.output_dir)
        self.expiry = OutputExpiry(self.store, self.output_dir, output_ttl_s)
        self.tasks = tasks if tasks is not None else TASKS
        self.queue_size = int(queue_size)
        recover(self.store, uploads, self.output_dir)
        self._live: dict[str, JobRecord] = {}           # queued and running records
        self._inputs: dict[str, object] = {}            # decoded inputs by job id, until the job starts
        self._pending: collections.deque[str] = collections.deque()    # waiting job ids, oldest first
        self._canceling: set[str] = set()
        self._changed = threading.Condition()
        self._running: str | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="sonic-worker", daemon=True)
        self._worker.start()

    # -- the interface ------------------------------------------------------------------
    def submit(self, rec: JobRecord, inputs=None) -> JobRecord:
        with self._changed:
            if len(self._pending) >= self.queue_size:
                raise QueueFull()
            rec = rec.copy()
            rec.status = rec.stage = QUEUED
            self._live[rec.id] = rec
            self._inputs[rec.id] = inputs
            self.store.save(rec)
            self._pending.append(rec.id)
            self._changed.notify_all()
            return rec.copy()

    def get(self, job_id: str) -> JobRecord | None:
        with self._changed:
            rec = self._live.get(job_id)
            if rec is not None:
                return rec.copy()
        return self.store.load(job_id)

    def cached(self, key: str) -> JobRecord | None:
        return self.cache.lookup(key)

    def cancel(self, job_id: str) -> JobRecord | None:
        with self._changed:
            rec = self._live.get(job_id)
            queued = rec is not None and job_id in self._pending
            if queued:                       # a canceled job frees its place in the queue at once
                self._pending.remove(job_id)
            elif rec is not None:
                self._canceling.add(job_id)
        if queued:
            self._finish(rec, CANCELED)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while job_id in self._live and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
        return self.get(job_id)

    def events(self, job_id: str, heartbeat_s: float) -> Iterator[JobRecord | None]:
        last = None
        while True:
            deadline = time.monotonic() + heartbeat_s
            with self._changed:
                while (job_id in self._live and self._live[job_id].to_dict() == last
                       and time.monotonic() < deadline):
                    self._changed.wait(deadline - time.monotonic())
            rec = self.get(job_id)
            if rec is None:
                return
            now = rec.to_dict()
            yield None if now == last else rec
            last = now
            if rec.terminal:
                return

    def queue_length(self) -> int:
        return len(self._pending)

    def health(self) -> dict:
        return {"running_job": self._running, "workers_alive": int(self._worker.is_alive())}

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- the worker ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            with self._changed:
                if not self._pending:
                    self._changed.wait(SWEEP_EVERY_S)
                rec = self._live[self._pending.popleft()] if self._pending and not self._closed else None
                if rec is not None:
                    self._running = rec.id
                    rec.status, rec.stage, rec.started = PROCESSING, "starting", time.time()
                    self.store.save(rec)
                    self._changed.notify_all()
            try:
                if rec is not None:
                    self._execute(rec)
            except Exception:                         # noqa: BLE001 - the worker must outlive any job
                log.exception("job %s failed outside its task", rec.id)
                self._finish(rec, FAILED, error=dict(INTERNAL))
            finally:
                self._running = None
                self.expiry.maybe_sweep()

    def _execute(self, rec: JobRecord) -> None:
        def progress(stage: str, frac: float) -> None:
            with self._changed:
                if rec.id in self._canceling:
                    raise JobCanceled()
                rec.stage, rec.progress = stage, frac
                self._changed.notify_all()

        try:
            progress("starting", 0.0)
            task = self.tasks[rec.kind]
            result = task(rec.copy(), self.pipeline, self.output_dir, self._inputs.pop(rec.id, None), progress)
        except JobCanceled:
            self._finish(rec, CANCELED)
        except SonicError as e:
            self._finish(rec, FAILED, error=e.to_dict())
        except MemoryError:
            log.error("job %s ran out of memory", rec.id)     # the writer has removed its files
            self._finish(rec, FAILED, error=dict(OUT_OF_MEMORY))
        except Exception:                                 # noqa: BLE001 - reported, never raised to HTTP
            log.exception("job %s failed", rec.id)
            self._finish(rec, FAILED, error=dict(INTERNAL))
        else:
            self._finish(rec, SUCCEEDED, result=result, progress=1.0)

    def _finish(self, rec: JobRecord, status: str, **fields) -> None:
        self.uploads.remove(rec.id)                       # inputs go when the job ends, before it is seen ended
        with self._changed:
            rec.status = rec.stage = status
            for name, value in fields.items():
                setattr(rec, name, value)
            rec.finished = time.time()
            self.store.save(rec)
            self._live.pop(rec.id, None)
            self._inputs.pop(rec.id, None)
            self._canceling.discard(rec.id)
            self._changed.notify_all()
