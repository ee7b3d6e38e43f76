"""Job queue: one worker thread runs the pipeline (one model, one device); others wait.

Jobs live in memory, keyed by id; the HTTP layer only reads their public dict. A failed job's
`error` holds a code, a message and maybe a field, never an HTTP status: the routes derive that
from the code (sonic_server/errors.py). A job's inputs are deleted when it ends; outputs are swept
after `output_ttl_s`.
"""
from __future__ import annotations

import hashlib
import collections
import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sonic import GenerateOptions, SonicError

log = logging.getLogger("sonic.jobs")
TERMINAL = ("succeeded", "failed", "canceled")
SWEEP_EVERY_S = 60
INTERNAL = {"code": "internal_error", "message": "generation failed; see the server log with this job id"}


class QueueFull(Exception):
    pass


class JobCanceled(Exception):
    pass


@dataclass
class Job:
    id: str
    options: GenerateOptions
    image: Path
    audio: Path
    workdir: Path
    cache_key: str
    status: str = "queued"
    stage: str = "queued"
    progress: float = 0.0
    result: dict | None = None
    error: dict | None = None
    created: float = field(default_factory=time.time)
    cancel_requested: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def public(self) -> dict:
        d = {"job_id": self.id, "status": self.status, "progress": round(self.progress, 3), "stage": self.stage}
        if self.result is not None:
            d["result"] = self.result
        if self.error is not None:
            d["error"] = self.error
        return d

    def update(self, **kw) -> None:
        with self.changed:
            for k, v in kw.items():
                setattr(self, k, v)
            self.changed.notify_all()


def cache_key(image: bytes, audio: bytes, options: GenerateOptions) -> str:
    h = hashlib.sha256()
    for part in (image, audio, repr(sorted(options.to_dict().items())).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


class JobManager:
    def __init__(self, pipeline, output_dir: Path, queue_size: int, output_ttl_s: float,
                 store=None, upload_dir: Path | None = None):
        self.pipeline = pipeline
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.output_ttl_s = output_ttl_s
        self.store = store
        if store is not None:
            # a previous process died mid-job: report those jobs failed, drop their inputs and
            # any half-written video
            for job_id in store.recover():
                log.warning("job %s was interrupted by a restart: marked failed", job_id)
                if upload_dir is not None:
                    shutil.rmtree(Path(upload_dir) / job_id, ignore_errors=True)
            for part in self.output_dir.glob(".*.part"):
                part.unlink(missing_ok=True)
        self._queue_size = queue_size
        self._pending: collections.deque[Job] = collections.deque()   # waiting jobs, oldest first
        self._wake = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self.running: Job | None = None
        self._last_sweep = 0.0
        self._worker = threading.Thread(target=self._run, name="sonic-worker", daemon=True)
        self._worker.start()

    # -- lookup -------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        """A live job, or one from an earlier process read back from the store."""
        with self._lock:
            job = self.jobs.get(job_id)
        if job is not None or self.store is None:
            return job
        rec = self.store.load(job_id)
        if rec is None:
            return None
        job = Job(id=rec["id"], options=GenerateOptions(), image=Path(), audio=Path(), workdir=Path(),
                  cache_key="", status=rec["status"], stage=rec["stage"], result=rec["result"], error=rec["error"],
                  progress=1.0 if rec["status"] == "succeeded" else 0.0)
        job.done.set()
        return job

    def cached(self, key: str) -> Job | None:
        with self._lock:
            job_id = self._cache.get(key)
        if job_id is None and self.store is not None:
            job_id = self.store.cached(key)
        job = self.get(job_id) if job_id else None
        if job and job.status == "succeeded" and (self.output_dir / job.result["file"]).exists():
            return job
        return None

    def _persist(self, job: Job) -> None:
        if self.store is not None:
            self.store.save(job)

    # -- submission ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._wake:
            if len(self._pending) >= self._queue_size:
                raise QueueFull()
            with self._lock:
                self.jobs[job.id] = job
            self._persist(job)
            self._pending.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        if job.status in TERMINAL:
            return
        job.update(cancel_requested=True)
        with self._wake:
            queued = job in self._pending
            if queued:                       # a canceled job frees its place in the queue at once
                self._pending.remove(job)
        if queued:
            self._finish(job, "canceled")

    def queue_length(self) -> int:
        return len(self._pending)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    # -- worker -------------------------------------------------------------------------
    def _finish(self, job: Job, status: str, **kw) -> None:
        job.update(status=status, stage=status, **kw)
        self._persist(job)
        shutil.rmtree(job.workdir, ignore_errors=True)      # inputs go when the job ends
        job.done.set()

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._pending:
                    self._wake.wait(SWEEP_EVERY_S)
                job = self._pending.popleft() if self._pending else None
                self.running = job
            try:
                if job is not None:
                    self._execute(job)
            except Exception:                         # noqa: BLE001 - the worker must outlive any job
                log.exception("job %s failed outside the pipeline", job.id)
                self._finish(job, "failed", error=dict(INTERNAL))
            finally:
                self.running = None
                self._sweep()

    def _execute(self, job: Job) -> None:
        job.update(status="processing", stage="starting")
        self._persist(job)

        def progress(stage: str, frac: float) -> None:
            if job.cancel_requested:
                raise JobCanceled()
            job.update(stage=stage, progress=frac)

        out = self.output_dir / f"{job.id}.mp4"
        try:
            res = self.pipeline(job.image, job.audio, job.options, out_path=out, progress=progress)
        except JobCanceled:
            self._finish(job, "canceled")
            return
        except SonicError as e:
            self._finish(job, "failed", error=e.to_dict())
            return
        except MemoryError:
            log.error("job %s ran out of memory", job.id)     # the writer has removed its files
            self._finish(job, "failed", error={"code": "out_of_memory",
                                               "message": "ran out of memory; try a shorter clip or a lower min_resolution"})
            return
        except Exception:                                 # noqa: BLE001 - reported, never raised to HTTP
            log.exception("job %s failed", job.id)
            self._finish(job, "failed", error=dict(INTERNAL))
            return
        result = res.to_dict()
        result.pop("output_path", None)
        result["file"] = out.name
        with self._lock:
            self._cache[job.cache_key] = job.id
        self._finish(job, "succeeded", result=result, progress=1.0)

    def _sweep(self) -> None:
        now = time.time()
        if now - self._last_sweep < SWEEP_EVERY_S:
            return
        self._last_sweep = now
        # finished jobs are forgotten with their videos: memory and the job table stay bounded
        with self._lock:
            for job_id in [j.id for j in self.jobs.values()
                           if j.status in TERMINAL and now - j.created > self.output_ttl_s]:
                del self.jobs[job_id]
            self._cache = {k: v for k, v in self._cache.items() if v in self.jobs}
        if self.store is not None:
            self.store.prune(now - self.output_ttl_s)
        for p in self.output_dir.glob("*.mp4"):
            try:
                if now - p.stat().st_mtime > self.output_ttl_s:
                    p.unlink()
            except OSError:
                pass
