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
                  (the worker was killed or lost), the job is failed `worker_lost` (or queued again)
                  by the next process that looks at it: any API request about it, /health, or any
                  worker's heartbeat;
- `worker:<name>` each live worker (its job, decoder, device), renewed by its heartbeat: the
                  worker list of /health and the "is anyone there" check of submit;
- `cache:<key>`   the job id of the succeeded job for a result cache key;
- `unfinished` (set), `finished` (sorted by time): for recovery and expiry;
- `created` (sorted by creation time), `owner:<owner>` (the same, one owner's): listings;
- `active:<owner>` (set) the owner's jobs from their queueing to their end (max_jobs_per_caller);
- `decoder`       the decoder identity the workers serve (part of the result cache key).
Uploads and videos are files in the shared `upload_dir` and `output_dir`, or objects in a bucket
(`storage: s3`, sonic_server/storage.py); Redis carries ids.

Every change of a record's state is a compare-and-set (`RedisStore.swap`, one Lua script): it
happens only if the stored record is still in the state the writer saw (status and run number;
for "lost", also only while the lease is absent). So a worker's late progress cannot overwrite
a cancel or a `worker_lost`, a finished job cannot be declared lost, and a run declared lost
cannot end the job a second time.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Callable, Iterator, cast
from urllib.parse import urlsplit, urlunsplit

import redis as redis_lib

from sonic.errors import SetupError

from .. import lifecycle, metrics
from ..cache import ResultCache
from ..jobs import PROCESSING, QUEUED, TERMINAL, JobQuery, JobRecord, newest_first
from ..lifecycle import JobEnd
from ..recovery import sweep_orphan_uploads
from ..shared_folders import bucket_ids, differing, publish, shared_folders
from ..store import _error_record
from . import CallerBusy, JobQueue, QueueFull, WorkerStopped, follow

log = logging.getLogger("sonic.jobs")
PREFIX = "sonic:"
QUEUE_NAME = "sonic"
LIST_SCAN = 5000  # records one listing page may look at (a filter that matches few jobs)
# a waiting record in no queue this long is a run that vanished (a worker takes a job and starts
# it within milliseconds; one paused longer is then treated as a killed one, as a lapsed lease is).
# Looks (each worker's every lease_s / 4, /health) see a job that waits well within it.
UNQUEUED_GRACE_S = 60.0


HEALTH_PROBE_S = 1.0  # /health's own look at Redis: a stalled one is reported, not waited for


def connect(url: str) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


def without_password(url: str) -> str:
    """A Redis URL as it may be shown: its password (redis://:secret@host, redis://user:secret@host)
    replaced by ***."""
    parts = urlsplit(url)
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)  # redis-py takes ?password= too
    if parts.password is None:
        return urlunsplit(parts._replace(query=query))
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}", query=query))


def rq_queue(conn: redis_lib.Redis):
    from rq import Queue

    return Queue(QUEUE_NAME, connection=conn)


# KEYS: record, lease. ARGV: expected status, expected run number, new record, "1": only while the
# lease is absent, "1": delete the lease with the write. Returns 1 when it wrote.
_SWAP = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
local attempts = tonumber(rec['attempts']) or 0
if rec['status'] ~= ARGV[1] or attempts ~= tonumber(ARGV[2]) then return 0 end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[3])
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
return 1
"""
# KEYS: lease. ARGV: owner, milliseconds. Renews the lease only while it is still this run's.
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: a key held with a token (a run's lease, a delivery's claim, a caller's opening lock).
# ARGV: the token. Deletes the key only while it still holds that token: a holder whose hold
# lapsed and was taken by another cannot free the other's.
RELEASE_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def install_store_outage_handler(app) -> None:
    """Redis not answering (down, restarting, unreachable): 503 `not_ready` + Retry-After, not 500."""
    from ..errors import error_response

    @app.errorhandler(redis_lib.RedisError)
    def _outage(e):
        log.warning("Redis does not answer: %s", type(e).__name__)
        return error_response(
            "not_ready", "the job store (Redis) does not answer; retry shortly", headers={"Retry-After": "5"}
        )


def lease_key(job_id: str) -> str:
    return PREFIX + f"lease:{job_id}"


class RedisStore:
    """The job store's questions (sonic_server/store.py) answered from Redis."""

    def __init__(self, conn: redis_lib.Redis):
        self.r = conn
        self._swap = conn.register_script(_SWAP)

    def swap(
        self,
        rec: JobRecord,
        expect_status: str,
        expect_attempts: int,
        *,
        lease_lapsed: bool = False,
        drop_lease: bool = False,
    ) -> bool:
        """Save `rec` only if the stored record is still `expect_status` at run `expect_attempts`
        (and, with lease_lapsed, only while its lease is absent); True when saved."""
        done = self._swap(
            keys=[PREFIX + f"job:{rec.id}", lease_key(rec.id)],
            args=[
                expect_status,
                expect_attempts,
                json.dumps(rec.to_dict()),
                "1" if lease_lapsed else "0",
                "1" if drop_lease else "0",
            ],
        )
        if done:
            p = self.r.pipeline()
            self._index(p, rec)
            p.execute()
        return bool(done)

    def _index(self, p, rec: JobRecord) -> None:
        """Queue on pipeline `p` the indexes and the change notice that follow a record's write."""
        if rec.status in TERMINAL:
            p.srem(PREFIX + "unfinished", rec.id)
            if rec.owner is not None:
                p.srem(active_key(rec.owner), rec.id)
            p.zadd(PREFIX + "finished", {rec.id: time.time()})
            if rec.status == "succeeded" and rec.cache_key:
                p.set(PREFIX + f"cache:{rec.cache_key}", rec.id)
        else:
            p.sadd(PREFIX + "unfinished", rec.id)
        p.zadd(PREFIX + "created", {rec.id: rec.created})
        if rec.owner is not None:
            p.zadd(PREFIX + f"owner:{rec.owner}", {rec.id: rec.created})
        p.publish(PREFIX + f"events:{rec.id}", rec.status)

    def save(self, rec: JobRecord) -> None:
        p = self.r.pipeline()
        p.set(PREFIX + f"job:{rec.id}", json.dumps(rec.to_dict()))
        self._index(p, rec)
        p.execute()

    def load(self, job_id: str) -> JobRecord | None:
        raw = self.r.get(PREFIX + f"job:{job_id}")
        if raw is None:
            return None
        rec = JobRecord.from_dict(json.loads(raw))
        rec.error = _error_record(rec.error)
        return rec

    # the connection does not decode responses (connect): replies are bytes, which redis-py's
    # types cannot tell from str

    def cached(self, key: str) -> str | None:
        raw = cast("bytes | None", self.r.get(PREFIX + f"cache:{key}"))
        return raw.decode() if raw else None

    def unfinished(self) -> list[str]:
        return [m.decode() for m in cast("set[bytes]", self.r.smembers(PREFIX + "unfinished"))]

    def prune(self, before: float) -> int:
        old = [m.decode() for m in cast("list[bytes]", self.r.zrangebyscore(PREFIX + "finished", "-inf", before))]
        for job_id in old:
            self.delete(job_id)
        return len(old)

    def delete(self, job_id: str) -> bool:
        """The record and every key that finds it."""
        rec = self.load(job_id)
        p = self.r.pipeline()
        p.delete(PREFIX + f"job:{job_id}", PREFIX + f"cancel:{job_id}")
        p.zrem(PREFIX + "finished", job_id)
        p.zrem(PREFIX + "created", job_id)
        p.srem(PREFIX + "unfinished", job_id)
        if rec is not None and rec.owner is not None:
            p.zrem(PREFIX + f"owner:{rec.owner}", job_id)
            p.srem(active_key(rec.owner), job_id)
        if rec is not None and rec.cache_key and self.cached(rec.cache_key) == job_id:
            p.delete(PREFIX + f"cache:{rec.cache_key}")
        p.execute()
        return rec is not None

    def list(self, query: JobQuery) -> list[JobRecord]:
        """A page from the creation-time index (the owner's, or everyone's), newest first. Read in
        batches by score, not by offset (jobs made or pruned meanwhile shift no batch), each job
        once, at most LIST_SCAN records looked at for one page."""
        key = PREFIX + ("created" if query.owner is None else f"owner:{query.owner}")
        top: float | str = "+inf" if query.after is None else query.after[0]
        if query.created_to is not None:
            top = min(float(top), query.created_to)
        bottom = "-inf" if query.created_from is None else query.created_from
        page: list[JobRecord] = []
        seen: set[str] = set()
        batch = max(50, 4 * query.limit)
        while len(page) < query.limit and len(seen) < LIST_SCAN:
            found = cast(
                "list[tuple[bytes, float]]", self.r.zrevrangebyscore(key, top, bottom, 0, batch, withscores=True)
            )
            fresh = [(i.decode(), score) for i, score in found if i.decode() not in seen]
            if not fresh:
                break
            seen.update(i for i, _ in fresh)
            top = min(score for _, score in fresh)  # the next batch starts at the lowest score seen (inclusive)
            for raw in self.r.mget([PREFIX + f"job:{i}" for i, _ in fresh]):
                if raw is None:
                    continue  # pruned meanwhile
                rec = JobRecord.from_dict(json.loads(raw))
                rec.error = _error_record(rec.error)
                if query.admits(rec):
                    page.append(rec)
        return newest_first(page)[: query.limit]

    def index_for_listing(self) -> None:
        """Records written before the listing's indexes existed are indexed once (at start-up)."""
        if self.r.exists(PREFIX + "created"):
            return
        for name in self.r.scan_iter(match=PREFIX + "job:*", count=500):
            raw = self.r.get(name)
            if raw is None:
                continue
            rec = JobRecord.from_dict(json.loads(raw))
            p = self.r.pipeline()
            p.zadd(PREFIX + "created", {rec.id: rec.created})
            if rec.owner is not None:
                p.zadd(PREFIX + f"owner:{rec.owner}", {rec.id: rec.created})
            p.execute()


def active_key(owner: str) -> str:
    """The set of an owner's jobs that wait or run: a submit joins it in the transaction that
    queues it, its end (or delete) leaves it."""
    return PREFIX + f"active:{owner}"


def enqueue(conn: redis_lib.Redis, rec: JobRecord, at_front: bool = False, pipeline=None) -> None:
    """One RQ job per run of the record: <id>, then <id>-r1... for a run after a lost worker."""
    rq_queue(conn).enqueue_call(
        "sonic_server.worker.run_job",
        args=(rec.id, rec.attempts),
        job_id=rq_job_id(rec),
        timeout=-1,
        result_ttl=0,
        failure_ttl=3600,
        at_front=at_front,
        pipeline=pipeline,
    )


def rq_job_id(rec: JobRecord) -> str:
    return rec.id if rec.attempts == 0 else f"{rec.id}-r{rec.attempts}"


def declare_lost(
    store: RedisStore, rec: JobRecord, retry_lost_jobs: int, output_dir: Path, ending: JobEnd
) -> JobRecord:
    """A job whose run vanished (a running one whose lease has lapsed, or a waiting one in no
    queue: see unless_unqueued): queued again (retry) or failed `worker_lost`, by whichever
    process gets there first (the others see the new state); that process runs its end-of-job
    step."""
    new = lifecycle.lose(rec.copy(), retry_lost_jobs)
    retry = new.status == QUEUED
    if not store.swap(new, rec.status, rec.attempts, lease_lapsed=True):
        return store.load(rec.id) or rec  # ended, renewed, started or declared meanwhile
    for part in Path(output_dir).glob(f".{rec.id}*.part*"):
        part.unlink(missing_ok=True)
    metrics.RUNS_LOST.inc()  # a retried run fails nothing: counted here, or a dying fleet looks healthy
    if retry:
        log.warning("job %s: its worker stopped answering; queued again (run %d)", rec.id, new.attempts + 1)
        enqueue(store.r, new, at_front=True)
        return new
    log.warning("job %s: its worker stopped answering; marked failed (worker_lost)", rec.id)
    ending.ended(new)
    return new


def unless_lost(store: RedisStore, rec: JobRecord, retry_lost_jobs: int, output_dir: Path, ending: JobEnd) -> JobRecord:
    """`rec`, or, where it runs and its lease has lapsed (its worker killed or lost), as
    declare_lost leaves it."""
    if rec.status == PROCESSING and not store.r.exists(lease_key(rec.id)):
        return declare_lost(store, rec, retry_lost_jobs, output_dir, ending)
    return rec


def unless_unqueued(
    store: RedisStore,
    rec: JobRecord,
    retry_lost_jobs: int,
    output_dir: Path,
    ending: JobEnd,
    waiting: set[str],
    grace_s: float = UNQUEUED_GRACE_S,
) -> JobRecord:
    """`rec`, or, where its run waits (queued) in no queue and without a lease, and has been seen
    so by every look for `grace_s` (a mark of the run in Redis, on Redis's clock, taken away by a
    look that sees the run waiting or starting), as declare_lost leaves it. A worker killed
    between taking a job from the queue and starting it, or an API process between saving a
    record and queueing it (or between declaring a run lost and queueing it again), left it
    queued for ever, holding its caller's place in max_jobs_per_caller. `waiting`: the RQ job
    ids in the queue (queued_runs)."""
    if rec.status != QUEUED:
        return rec
    run = rq_job_id(rec)
    mark = PREFIX + f"unqueued:{run}"  # this run's: a later run is judged afresh
    if store.r.exists(lease_key(rec.id)) or run in waiting:
        store.r.delete(mark)
        return rec
    seconds, micros = cast("tuple[int, int]", store.r.time())  # Redis's clock: one for every process
    now = seconds + micros / 1e6
    if store.r.set(mark, now, nx=True, ex=int(grace_s * 2) + 1):
        return rec  # first seen now
    if now - float(cast(bytes, store.r.get(mark) or now)) < grace_s:
        return rec
    log.warning("job %s: taken from the queue and never started (its worker stopped?)", rec.id)
    return declare_lost(store, rec, retry_lost_jobs, output_dir, ending)


def queued_runs(conn: redis_lib.Redis) -> set[str]:
    """The RQ job ids waiting in the queue (at most server.queue_size)."""
    return {m.decode() for m in cast("list[bytes]", conn.lrange(rq_queue(conn).key, 0, -1))}


def reap(
    store: RedisStore, retry_lost_jobs: int, output_dir: Path, ending: JobEnd, grace_s: float = UNQUEUED_GRACE_S
) -> None:
    """Declare lost every running job whose lease has lapsed, and every waiting one in no queue
    for grace_s (nobody may be looking at them)."""
    waiting = queued_runs(store.r)  # read before the records: a run taken since is not in it, and has its lease
    for job_id in store.unfinished():
        rec = store.load(job_id)
        if rec is not None and rec.status == PROCESSING:
            unless_lost(store, rec, retry_lost_jobs, output_dir, ending)
        elif rec is not None:  # (a run this look queued again is not in `waiting`: judged at the next)
            unless_unqueued(store, rec, retry_lost_jobs, output_dir, ending, waiting, grace_s)


def live_workers(conn: redis_lib.Redis) -> list[dict]:
    """The workers whose heartbeat is current: name, state, job (a record id), decoder, device."""
    keys = list(conn.scan_iter(match=PREFIX + "worker:*", count=100))
    out = []
    for raw in conn.mget(keys) if keys else []:
        if raw:
            try:
                out.append(json.loads(raw))
            except ValueError:
                pass
    return sorted(out, key=lambda w: w.get("name", ""))


class RedisQueue(JobQueue):
    """What an API process uses: validated jobs go to Redis; workers elsewhere run them."""

    def __init__(
        self,
        url: str,
        output_dir: Path,
        uploads,
        *,
        queue_size: int,
        max_jobs_per_caller: int = 0,
        job_timeout_s: float = 0.0,
        retry_lost_jobs: int = 0,
        outputs=None,
        end_hooks: tuple[Callable[[JobRecord], None], ...] = (),
    ):
        """`end_hooks`: what runs once when this process ends a job (a cancel while it waits, a
        lost worker); a job's run ends in its worker, which runs its own (worker.py)."""
        self.r = connect(url)
        self.r.ping()
        probe_s = HEALTH_PROBE_S
        self._probe = redis_lib.Redis.from_url(url, socket_timeout=probe_s, socket_connect_timeout=probe_s)
        self.store = RedisStore(self.r)
        self.output_dir = Path(output_dir).resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.uploads = uploads
        self.ending = JobEnd(uploads, end_hooks)
        self.queue_size = int(queue_size)
        self.max_jobs_per_caller = int(max_jobs_per_caller)  # jobs one owner may have waiting or running
        self.job_timeout_s = float(job_timeout_s)
        self.retry_lost_jobs = int(retry_lost_jobs)
        self.cache = ResultCache(self.store, outputs if outputs is not None else self.output_dir)
        # the folders a worker must share with this process (a bucket instead: the bucket),
        # published now for workers starting or waiting, and again with each job
        self.shares_folders = not (outputs is not None and outputs.remote)
        self._bucket = {} if self.shares_folders else bucket_ids(outputs.s3.bucket, outputs.s3.prefix)
        self._publish_folders(self.folders())
        self.rq = rq_queue(self.r)
        self.store.index_for_listing()
        self._store_away = False  # /health's last look found Redis away (said once an outage)
        sweep_orphan_uploads(self.store, uploads)  # left by a killed API process, or a store's lost data

    # -- the interface ------------------------------------------------------------------
    def folders(self) -> dict[str, str]:
        """The ids of the folders workers must share with this process, read now (a mark
        deleted is made again), with its storage; with a bucket, the bucket alone."""
        return shared_folders(self.uploads.root, self.output_dir) if self.shares_folders else dict(self._bucket)

    def _publish_folders(self, folders: dict[str, str]) -> None:
        """For the workers to compare theirs with (shared_folders.py)."""
        if folders:
            publish(self.r, folders)

    def check_room(self) -> None:
        self._working()
        if int(self.rq.count) >= self.queue_size:
            raise QueueFull()

    def _working(self) -> list[dict]:
        """The live workers; WorkerStopped when none is alive, or none has room on its disk."""
        workers = live_workers(self.r)
        if not any(not w.get("disk_full") for w in workers):
            raise WorkerStopped(short_of_disk=bool(workers))
        return workers

    def submit(self, rec: JobRecord, inputs=None) -> JobRecord:
        workers = self._working()
        folders = self.folders()
        self._publish_folders(folders)  # (again: Redis may have lost it, a mark may be new)
        if not any(not w.get("disk_full") and not differing(folders, w.get("folders") or {}) for w in workers):
            raise SetupError(
                "no worker shares this API process's folders (server.upload_dir, output_dir) and storage "
                "(storage, s3): the service's operator must give every process the same storage settings and "
                "shared folders (/health lists the workers)"
            )
        rec = lifecycle.queue(rec.copy())
        rec.folders = folders or None
        self.store.save(rec)
        try:
            if self._enqueue(rec):
                return rec
        except (redis_lib.RedisError, CallerBusy):
            self._forget(rec.id)
            raise
        self._forget(rec.id)
        raise QueueFull()

    def _enqueue(self, rec: JobRecord) -> bool:
        """The bounds and the push in one optimistic transaction: API processes racing for the
        last place (in the queue, or in the caller's share) cannot both take it (WATCH both; a
        change meanwhile means try again). False when the queue is full; CallerBusy when the
        caller's share is taken."""
        key = self.rq.key
        owned = active_key(rec.owner) if rec.owner is not None else None  # joined whatever the share
        bounded = owned if self.max_jobs_per_caller else None
        if bounded is not None:
            self._drop_ended(cast(str, rec.owner))
        for _ in range(50):
            with self.r.pipeline() as p:
                try:
                    p.watch(key, *([bounded] if bounded else []))
                    if p.llen(key) >= self.queue_size:
                        p.unwatch()
                        return False
                    if bounded and (active := int(p.scard(bounded))) >= self.max_jobs_per_caller:
                        p.unwatch()
                        raise CallerBusy(active)
                    p.multi()
                    enqueue(self.r, rec, pipeline=p)
                    if owned:
                        p.sadd(owned, rec.id)
                    p.execute()
                    return True
                except redis_lib.WatchError:
                    continue
        return False

    def _drop_ended(self, owner: str) -> None:
        """Take out of an owner's active set the jobs whose records ended or are gone (a record
        lost with Redis's data, a release before the set), after declaring lost those of its
        running jobs whose worker stopped answering (no worker may be alive to do it): a
        caller's share is never held by a job that no longer runs."""
        members = [m.decode() for m in cast("set[bytes]", self.r.smembers(active_key(owner)))]
        if not members:
            return
        raws = cast("list[bytes | None]", self.r.mget([PREFIX + f"job:{i}" for i in members]))
        ended = []
        for job_id, raw in zip(members, raws, strict=True):
            rec = None if raw is None else self._unless_lost(JobRecord.from_dict(json.loads(raw)))
            if rec is None or rec.terminal:
                ended.append(job_id)
        if ended:
            self.r.srem(active_key(owner), *ended)

    def active_of(self, owner: str) -> int:
        self._drop_ended(owner)
        return int(cast(int, self.r.scard(active_key(owner))))

    def _forget(self, job_id: str) -> None:
        """A job that was never queued: its record and every index that finds it go (they were
        left in the listing's indexes, growing with every refusal, and a record left queued
        showed as queued for ever)."""
        try:
            self.store.delete(job_id)
        except redis_lib.RedisError:
            log.warning("job %s: its record could not be removed after it failed to queue", job_id)

    def get(self, job_id: str) -> JobRecord | None:
        rec = self.store.load(job_id)
        return None if rec is None else self._unless_lost(rec)

    def _unless_lost(self, rec: JobRecord) -> JobRecord:
        return unless_lost(self.store, rec, self.retry_lost_jobs, self.output_dir, self.ending)

    def cached(self, key: str) -> JobRecord | None:
        return self.cache.lookup(key)

    def list(self, query: JobQuery) -> list[JobRecord]:
        return self.store.list(query)

    def delete(self, job_id: str, remove_files: Callable[[], None] = lambda: None) -> bool:
        rec = self.store.load(job_id)
        if rec is not None and not rec.terminal:
            return False  # not ended: cancel it first
        with self.cache.lock:
            remove_files()
            return self.store.delete(job_id)

    def cancel(self, job_id: str) -> JobRecord | None:
        rec = self.get(job_id)
        if rec is None or rec.terminal:
            return rec
        self.r.set(PREFIX + f"cancel:{job_id}", 1, ex=24 * 3600)  # a running job sees it at its next report
        if rec.status == QUEUED:
            new = lifecycle.cancel_waiting(rec.copy())
            if self.store.swap(new, QUEUED, rec.attempts):  # not taken by a worker meanwhile
                from rq.job import Job

                try:
                    Job.fetch(rq_job_id(rec), connection=self.r).cancel()
                except Exception:  # noqa: BLE001 - gone: the worker skips it
                    pass
                self.ending.ended(new)
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

        def wait_for_change(last: dict) -> None:
            # a change notice, or the heartbeat (also the moment a lapsed lease is noticed)
            deadline = time.monotonic() + heartbeat_s
            while time.monotonic() < deadline:
                if pubsub.get_message(timeout=min(1.0, max(0.0, deadline - time.monotonic()))):
                    return

        try:
            yield from follow(lambda: self.get(job_id), wait_for_change)
        finally:
            pubsub.close()

    def queue_length(self) -> int:
        return int(self.rq.count)

    def ahead_of(self, rec: JobRecord) -> int | None:
        # RQ's list, head first (LPOS from Redis 6.0.6); a run taken by a worker is no longer in it
        place = self.rq.get_job_position(rq_job_id(rec))
        return None if place is None else int(place)

    def health(self) -> dict:
        try:
            self._probe.ping()  # a stalled Redis is said within a second, not after each call's 10 s
            figures = self._health()
        except redis_lib.RedisError as e:  # /health still answers in full: monitoring reads `readiness`
            if not self._store_away:  # once an outage, not at every probe
                log.warning("/health: Redis does not answer (%s)", type(e).__name__)
            self._store_away = True
            return {
                "running_job": None,
                "workers_alive": 0,
                "queue_length": 0,
                "unavailable": "the job store (Redis) does not answer",
            }
        if self._store_away:
            log.warning("/health: Redis answers again")
        self._store_away = False
        return figures

    def _health(self) -> dict:
        reap(self.store, self.retry_lost_jobs, self.output_dir, self.ending)
        folders = self.folders()
        workers = [
            {
                "name": w.get("name"),
                "state": "busy" if w.get("job") else "disk_full" if w.get("disk_full") else "idle",
                "job": w.get("job"),
                "decoder": w.get("decoder"),
                "device": w.get("device"),
                "last_heartbeat": w.get("heartbeat"),
                **{k: w[k] for k in ("live_sessions", "live_slots", "live_host", "draining") if k in w},
                **({"shares_folders": False} if differing(folders, w.get("folders") or {}) else {}),
            }
            for w in live_workers(self.r)
        ]
        running = next((w["job"] for w in workers if w["job"]), None)
        return {
            "running_job": running,
            "workers_alive": len(workers),
            # a worker draining after SIGTERM finishes its job and takes no other
            "workers_taking_jobs": sum(
                w["state"] != "disk_full" and not w.get("draining") and "shares_folders" not in w for w in workers
            ),
            "queue_length": self.queue_length(),
            "workers": workers,
        }

    def decoder_identity(self) -> str | None:
        workers = live_workers(self.r)
        return workers[0].get("decoder") if workers else None
