"""The distributed backend: records, progress and the queue in Redis; jobs run in `sonic worker`
processes (any number, on any machine that sees Redis and the shared folders), on RQ.

Why RQ (docs/scaling.md): a job here is one call of one Python function in a process that has
loaded the model once; RQ's `SimpleWorker` runs exactly that (no fork per job, so the model stays
loaded), keeps worker registrations with heartbeats, and its queue is a Redis list we can count
for the bounded queue. Celery would bring a second broker protocol, prefork pools that reload
the model, and much more configuration for the same single-function jobs.

Redis keys (prefix `sonic:`):
- `job:<id>`      the record (JSON), as every API process and worker reads it;
- `events:<id>`   a pub/sub channel: a message whenever the record changes (SSE, waits);
- `cancel:<id>`   set by a cancel; the running job's next progress report stops it;
- `lease:<id>`    kept alive by the worker running the job (server.worker_lease_s); when it lapses
                  (the worker was killed or lost), the job is failed `worker_lost` on the next look;
- `cache:<key>`   the job id of the succeeded job for a result cache key;
- `unfinished` (set), `finished` (sorted by time): for recovery and expiry;
- `decoder`       the decoder identity the workers serve (part of the result cache key).
Uploads and videos are files in the shared `upload_dir` and `output_dir`; Redis carries ids.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Iterator

import redis as redis_lib

from ..cache import ResultCache
from ..jobs import CANCELED, FAILED, PROCESSING, QUEUED, TERMINAL, JobRecord
from ..store import _error_record
from . import JobQueue, QueueFull, WorkerStopped

log = logging.getLogger("sonic.jobs")
PREFIX = "sonic:"
QUEUE_NAME = "sonic"
WORKER_LOST = {"code": "worker_lost",
               "message": "the worker running this job stopped answering (killed or lost); try again"}


def connect(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


def rq_queue(conn: redis_lib.Redis):
    from rq import Queue
    return Queue(QUEUE_NAME, connection=conn)


class RedisStore:
    """The job store's questions (sonic_server/store.py) answered from Redis."""

    def __init__(self, conn: redis_lib.Redis):
        self.r = conn

    def save(self, rec: JobRecord) -> None:
        p = self.r.pipeline()
        p.set(PREFIX + f"job:{rec.id}", json.dumps(rec.to_dict()))
        if rec.status in TERMINAL:
            p.srem(PREFIX + "unfinished", rec.id)
            p.zadd(PREFIX + "finished", {rec.id: time.time()})
            if rec.status == "succeeded" and rec.cache_key:
                p.set(PREFIX + f"cache:{rec.cache_key}", rec.id)
        else:
            p.sadd(PREFIX + "unfinished", rec.id)
        p.publish(PREFIX + f"events:{rec.id}", rec.status)
        p.execute()

    def load(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(PREFIX + f"job:{job_id}")
        if raw is None:
            return None
        rec = JobRecord.from_dict(json.loads(raw))
        rec.error = _error_record(rec.error)
        return rec

    def cached(self, key: str) -> str | None:
        raw = self.r.get(PREFIX + f"cache:{key}")
        return raw.decode() if raw else None

    def unfinished(self) -> list[str]:
        return [m.decode() for m in self.r.smembers(PREFIX + "unfinished")]

    def prune(self, before: float) -> int:
        old = [m.decode() for m in self.r.zrangebyscore(PREFIX + "finished", "-inf", before)]
        for job_id in old:
            rec = self.load(job_id)
            p = self.r.pipeline()
            p.delete(PREFIX + f"job:{job_id}")
            p.zrem(PREFIX + "finished", job_id)
            if rec is not None and rec.cache_key and self.cached(rec.cache_key) == job_id:
                p.delete(PREFIX + f"cache:{rec.cache_key}")
            p.execute()
        return len(old)


class RedisQueue(JobQueue):
    """What an API process uses: validated jobs go to Redis; workers elsewhere run them."""

    def __init__(self, url: str, output_dir: Path, uploads, *, queue_size: int, job_timeout_s: float = 0.0,
                 retry_lost_jobs: int = 0):
        self.r = connect(url)
        self.r.ping()
        self.store = RedisStore(self.r)
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads
        self.queue_size = int(queue_size)
        self.job_timeout_s = float(job_timeout_s)
        self.retry_lost_jobs = int(retry_lost_jobs)
        self.cache = ResultCache(self.store, self.output_dir)
        self.rq = rq_queue(self.r)

    # -- the interface ------------------------------------------------------------------
    def submit(self, rec: JobRecord, inputs=None) -> JobRecord:
        from rq import Worker
        if Worker.count(queue=self.rq) == 0:
            raise WorkerStopped()
        if self.rq.count >= self.queue_size:
            raise QueueFull()
        rec = rec.copy()
        rec.status = rec.stage = QUEUED
        self.store.save(rec)
        self._enqueue(rec)
        return rec

    def _enqueue(self, rec: JobRecord, at_front: bool = False) -> None:
        # one RQ job per run of the record: <id>, then <id>-r1... for a run after a lost worker
        rq_id = rec.id if rec.attempts == 0 else f"{rec.id}-r{rec.attempts}"
        self.rq.enqueue_call("sonic_server.worker.run_job", args=(rec.id,), job_id=rq_id, timeout=-1,
                             result_ttl=0, failure_ttl=3600, at_front=at_front)

    def get(self, job_id: str) -> JobRecord | None:
        rec = self.store.load(job_id)
        if rec is not None and rec.status == PROCESSING and not self.r.exists(PREFIX + f"lease:{job_id}"):
            rec = self._lost(rec)
        return rec

    def _lost(self, rec: JobRecord) -> JobRecord:
        """A running job whose worker stopped renewing its lease: failed, its leftovers removed."""
        if not self.r.set(PREFIX + f"lost:{rec.id}", 1, nx=True, ex=3600):   # one process declares it
            return self.store.load(rec.id) or rec
        for part in self.output_dir.glob(f".{rec.id}*.part*"):
            part.unlink(missing_ok=True)
        if rec.attempts <= self.retry_lost_jobs:          # runs so far include the lost one
            log.warning("job %s: its worker stopped answering; queued again (run %d)", rec.id, rec.attempts + 1)
            rec.status = rec.stage = QUEUED
            rec.progress, rec.started = 0.0, None
            self.store.save(rec)
            self.r.delete(PREFIX + f"lost:{rec.id}")
            self._enqueue(rec, at_front=True)
            return rec
        log.warning("job %s: its worker stopped answering; marked failed (worker_lost)", rec.id)
        rec.status = rec.stage = FAILED
        rec.error, rec.finished = dict(WORKER_LOST), time.time()
        self.store.save(rec)
        try:
            self.uploads.remove(rec.id)
        except Exception:                                  # noqa: BLE001
            log.exception("job %s: its upload folder could not be removed", rec.id)
        for part in self.output_dir.glob(f".{rec.id}*.part*"):
            part.unlink(missing_ok=True)
        return rec

    def cached(self, key: str) -> JobRecord | None:
        return self.cache.lookup(key)

    def cancel(self, job_id: str) -> JobRecord | None:
        rec = self.get(job_id)
        if rec is None or rec.terminal:
            return rec
        self.r.set(PREFIX + f"cancel:{job_id}", 1, ex=24 * 3600)     # a running job sees it at its next report
        if rec.status == QUEUED:
            from rq.job import Job
            try:
                job = Job.fetch(job_id, connection=self.r)
                job.cancel()
            except Exception:                                        # noqa: BLE001 - already taken: the flag stops it
                pass
            rec = self.store.load(job_id)
            if rec is not None and rec.status == QUEUED:
                rec.status = rec.stage = CANCELED
                rec.finished = time.time()
                self.store.save(rec)
                self.uploads.remove(job_id)
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float) -> JobRecord | None:
        deadline = time.monotonic() + timeout
        for rec in self.events(job_id, heartbeat_s=min(1.0, max(0.05, timeout))):
            if rec is not None and rec.terminal:
                return rec
            if time.monotonic() >= deadline:
                break
        return self.get(job_id)

    def events(self, job_id: str, heartbeat_s: float) -> Iterator[JobRecord | None]:
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(PREFIX + f"events:{job_id}")
        try:
            last = None
            while True:
                rec = self.get(job_id)
                if rec is None:
                    return
                now = rec.to_dict()
                yield None if now == last else rec
                last = now
                if rec.terminal:
                    return
                # a change, or the heartbeat (also the moment a lapsed lease is noticed)
                deadline = time.monotonic() + heartbeat_s
                while time.monotonic() < deadline:
                    if pubsub.get_message(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                        break
        finally:
            pubsub.close()

    def queue_length(self) -> int:
        return int(self.rq.count)

    def health(self) -> dict:
        from rq import Worker
        workers = []
        for w in Worker.all(queue=self.rq):
            job = w.get_current_job_id()
            workers.append({"name": w.name, "state": "busy" if job else "idle", "job": job,
                            "last_heartbeat": w.last_heartbeat.timestamp() if w.last_heartbeat else None})
        running = next((w["job"] for w in workers if w["job"]), None)
        return {"running_job": running, "workers_alive": len(workers), "queue_length": self.queue_length(),
                "workers": sorted(workers, key=lambda w: w["name"])}

    def decoder_identity(self) -> str | None:
        raw = self.r.get(PREFIX + "decoder")
        return raw.decode() if raw else None
