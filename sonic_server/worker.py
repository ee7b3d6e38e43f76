"""`sonic worker` (`python -m sonic worker`): a process that loads the model once and runs jobs
from Redis (server.redis_url / SONIC_REDIS_URL), one at a time; start one per GPU or machine.

It shares with the API processes: Redis, and the `upload_dir` and `output_dir` folders (a
shared volume), or with `storage: s3` a bucket: then it fetches a job's uploads into its own
`upload_dir` and moves the finished video into the bucket (sonic_server/storage.py). While a job
runs, a thread renews the job's lease in Redis every few seconds: a worker killed mid-job lets
it lapse, and the API marks the job failed (`worker_lost`) instead of leaving it `processing`.
Between jobs the worker sweeps expired videos and records.

It also hosts live sessions (live.enabled, up to live.max_sessions at once: sonic_server/live/
host.py): its heartbeat advertises its free slots, API processes place sessions on it through
Redis, and the clients' media flow to it directly. SIGTERM drains it: no new jobs or sessions,
the running job finishes, the running sessions go on up to server.worker_drain_s.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from werkzeug.serving import ThreadedWSGIServer

from sonic import SonicError
from sonic.errors import SetupError
from sonic.settings import SettingsError

from . import lifecycle
from .expiry import SWEEP_EVERY_S, OutputExpiry
from .host_limits import check_host, short_of_disk
from .host_names import HostNames
from .jobs import FAILED, PROCESSING, QUEUED, SUCCEEDED, JobRecord, JobStatus
from .lifecycle import JobEnd, RunSuperseded
from .live.host import LiveHost
from .live.relay import Records, reap_lost
from .logs import Quietly, configure_logging
from .metrics import worker_page
from .queue.execute import INTERNAL, run_task
from .queue.redis import (
    PREFIX,
    RELEASE_HELD,
    RENEW_LEASE,
    RedisStore,
    connect,
    lease_key,
    reap,
    rq_queue,
    without_password,
)
from .recovery import sweep_orphan_uploads
from .settings import ServerConfig, load_settings
from .shared_folders import FOLDER_MARK, STORAGE, bucket_ids, differing, folder_settings, published, shared_folders
from .storage import open_storage
from .tasks import TASKS
from .webhooks import events_of, make_webhooks

log = logging.getLogger("sonic.worker")
DISK_CHECK_S = 1.0  # how often a worker short of disk looks again


@dataclass
class WorkerState:
    """What a worker process holds: set up once by `main`, then read by each run (`run_job`,
    called by RQ) and by the heartbeat thread. `current` and `lease` change as runs start and end."""

    store: RedisStore
    pipeline: Any
    output_dir: Path
    uploads: Any
    outputs: Any
    ending: JobEnd
    expiry: OutputExpiry
    name: str
    job_timeout_s: float
    lease_s: float
    retry_lost_jobs: int
    decoder: str
    device: str
    min_free_mb: float = 0.0  # free disk under output_dir below which no job is taken (0: no check)
    host: LiveHost | None = None  # its live sessions (live.enabled; not with --burst)
    notify: Callable[[JobRecord, str], None] | None = None  # a run's start and progress, for webhooks
    current: str | None = None  # the job this worker runs now
    lease: tuple[str, str] | None = None  # (its lease key, this run's owner token)
    uploads_swept_at: float = 0.0  # time.time() of its last sweep of leftover upload folders
    short_of_disk: bool = False  # waiting for free disk before it takes the next job
    folders: dict[str, str] = field(default_factory=dict)  # the shared folders' ids here, as last read
    bucket: dict[str, str] = field(default_factory=dict)  # storage: s3: its ids (the bucket), else {}
    shares_folders: bool = True  # False: the API processes' ids differ from these; no job is taken
    stopping: bool = False  # SIGTERM: the running job finishes, no other is taken
    stop_asked: threading.Event = field(default_factory=threading.Event)  # ... and `say_stopping` says so


_STATE: WorkerState | None = None  # set once by `main` before the first job


def run_job(job_id: str, run: int | None = None) -> None:
    """One run of a job, in the worker process (called by RQ): the record is read from Redis, run,
    and its final state written back, each change only if the record is still as this run left
    it (RedisStore.swap). `run`: the record's run count when it was queued (None from releases
    before 2026-12-06). Never raises."""
    state = _STATE
    assert state is not None, "run_job runs in a worker that main() has set up"
    try:
        _run(state, job_id, run)
    except Exception:  # noqa: BLE001 - Redis away, ...: the lease lapses
        log.exception("job %s: the run stopped", job_id)
    finally:
        state.current = state.lease = None
        try:
            announce(state, state.store.r)  # idle again
        except Exception:  # noqa: BLE001
            pass


def _run(state: WorkerState, job_id: str, run: int | None) -> None:
    store, r = state.store, state.store.r
    rec = store.load(job_id)
    if rec is None or rec.status != QUEUED:
        return  # gone, canceled or taken before it started
    if run is not None and rec.attempts != run:
        return  # a run declared lost before it started, taken late: the record waits for another
    queued_run = rec.attempts
    if r.exists(PREFIX + f"cancel:{job_id}"):  # canceled as it was being taken
        canceled = lifecycle.cancel_waiting(rec.copy())
        if store.swap(canceled, QUEUED, queued_run):
            state.ending.ended(canceled)
        return
    lifecycle.start(rec, worker=state.name)
    lease = lease_key(job_id)
    owner = f"{state.name}:{rec.attempts}"  # this run of the job, on this worker
    if not r.set(lease, owner, px=int(state.lease_s * 1000), nx=True):
        return  # another worker is starting or running it
    if not store.swap(rec, QUEUED, queued_run):
        r.eval(RELEASE_HELD, 1, lease, owner)
        return
    state.current, state.lease = job_id, (lease, owner)
    announce(state, r)  # busy, at once (not at the next beat)
    events = lifecycle.RunEvents(state.notify)
    events.started(rec)
    status, fields = _execute(state, rec, events)
    state.lease = None
    final = lifecycle.end(rec.copy(), status, **fields)
    now = store.load(job_id)
    if now is not None and now.status == PROCESSING and now.attempts == rec.attempts:
        state.ending.before_publish(final)  # inputs go before the job is seen ended
    # the final state and the end of the lease in one step: never "ended" and "lost" both
    if not store.swap(final, PROCESSING, rec.attempts, drop_lease=True):
        log.warning("job %s: run %d ended after it was declared lost; its result is dropped", job_id, rec.attempts)
        return
    state.ending.after_publish(final)
    r.delete(PREFIX + f"cancel:{job_id}")
    sweep(state)


def sweep(state: WorkerState) -> None:
    """Between jobs, and while waiting for room on the disk: expired videos and records, and
    upload folders no job owns any more. A failure is logged and tried again the next time."""
    try:
        state.expiry.maybe_sweep()
        if time.time() - state.uploads_swept_at >= SWEEP_EVERY_S:
            state.uploads_swept_at = time.time()
            sweep_orphan_uploads(state.store, state.uploads)
    except Exception:  # noqa: BLE001
        log.exception("output expiry sweep failed")


def _execute(state: WorkerState, rec: JobRecord, events: lifecycle.RunEvents) -> tuple[JobStatus, dict]:
    """Run the job's task on this machine's copy of its files; (its final status, its fields).
    A succeeded video is published (into the bucket with storage: s3)."""
    store, r, job_id = state.store, state.store.r, rec.id

    def report(stage: str, fraction: float) -> None:
        lifecycle.advance(rec, stage, fraction)
        if not store.swap(rec, PROCESSING, rec.attempts):  # declared lost meanwhile: stop here
            raise RunSuperseded()
        events.advanced(rec)

    progress = lifecycle.progress_reporter(
        lambda: bool(r.exists(PREFIX + f"cancel:{job_id}")), state.job_timeout_s, report
    )
    # (state.folders: read by may_take just before RQ handed this job over)
    if state.folders and (wrong := differing(rec.folders, state.folders)):
        return FAILED, {"error": not_shared(state, rec, wrong, rec.folders or {})}
    try:
        job = rec.copy()  # the files where this machine reads them;
        job.inputs = state.uploads.fetch(job_id, rec.inputs)  # the record keeps what every machine can use
        status, fields = run_task(job, TASKS, state.pipeline, state.output_dir, None, progress, state.job_timeout_s)
        if status == SUCCEEDED:
            state.outputs.publish(fields["result"]["file"])  # into the bucket (storage: s3)
    except SonicError as e:  # the object store away
        (Path(state.output_dir) / f"{job_id}.mp4").unlink(missing_ok=True)
        status, fields = FAILED, {"error": e.to_dict()}
    except Exception:  # noqa: BLE001
        log.exception("job %s failed outside its task", job_id)
        (Path(state.output_dir) / f"{job_id}.mp4").unlink(missing_ok=True)
        status, fields = FAILED, {"error": dict(INTERNAL)}
    finally:
        state.uploads.drop_local_copy(job_id)
    return status, fields


def folders_here(state: WorkerState) -> dict[str, str]:
    """This worker's shared folders' ids, read now (a mark deleted is made again), and its
    storage; with a bucket, the bucket's."""
    state.folders = dict(state.bucket) if state.bucket else shared_folders(state.uploads.root, state.output_dir)
    return state.folders


def folders_shared(state: WorkerState, conn: Any, burst: bool) -> bool:
    """Whether this worker's folders are those the API processes published (or none did yet),
    asked before each job is taken, as the disk's room is: a worker with other folders wrote
    its videos where no API process serves them. It takes no job while they differ, says so
    once, and its entry says `shares_folders: false`."""
    from rq.exceptions import StopRequested

    if not state.folders:  # (not set up yet)
        return True
    expected = published(conn)
    wrong = differing(expected, folders_here(state))
    if not wrong:
        if not state.shares_folders:
            log.warning("worker %s: its folders are the API processes' again; taking jobs", state.name)
            state.shares_folders = True
            announce_now(state, conn)
        return True
    if state.shares_folders:
        log.error(
            "worker %s: %s; no job is taken until they are the same", state.name, folders_differ(state, wrong, expected)
        )
        state.shares_folders = False
        announce_now(state, conn)
    if burst:
        raise StopRequested()
    return False


def folders_differ(state: WorkerState, settings: list[str], expected: dict[str, str] | None) -> str:
    """What differs, for the operator: the settings and this worker's folders, or its storage."""
    if STORAGE in settings:
        theirs = (expected or {}).get(STORAGE)
        return (
            f"its storage ({state.folders.get(STORAGE)}) is not the API processes' ({theirs}): give every API "
            "process and worker the same `storage` and `s3` settings; their jobs' files are where this worker "
            "does not look"
        )
    here = folder_settings(state.uploads.root, state.output_dir)
    return (
        f"its {' and '.join(f'{name} ({here[name]})' for name in settings)} is not the folder the API processes use "
        f"(each holds a {FOLDER_MARK} file with another id): give every API process and worker the same shared "
        "folder there; videos written here would be where no API process serves them"
    )


def may_take(state: WorkerState, conn: Any, burst: bool) -> bool:
    """Whether this worker takes a job now (RQ's loop asks before each): its folders are the
    API processes', and its disk has room."""
    return folders_shared(state, conn, burst) and room_to_take(state, conn, burst)


def not_shared(state: WorkerState, rec: JobRecord, settings: list[str], expected: dict[str, str]) -> dict:
    """A job from an API process whose folders or storage are not this worker's (taken before the
    API processes' ids were published): said in the log, for the operator; the caller's error
    says only that the service is set up wrong."""
    log.error("worker %s: job %s failed: %s", state.name, rec.id, folders_differ(state, settings, expected))
    return {
        "code": SetupError.code,
        "message": "the service is set up wrong: the worker that took this job does not share the API's "
        "folders or storage (its operator is told in the worker's log); nothing was charged",
    }


def end_hooks(settings: ServerConfig, ledger: Any) -> tuple[Callable[[JobRecord], None], ...]:
    """What runs when a job ends on this worker: with credits, its hold is settled here, where
    it ended (the API processes' settler sweeps up what a killed worker left)."""
    if ledger is None:
        return ()
    from .accounts import Settler, video_price

    price = settings.credits
    settler = Settler(ledger, lambda: None, lambda result: video_price(price, result.get("duration", 0.0)))
    return (settler.settle_ended,)


def open_ledger(settings: ServerConfig) -> Any:
    """The accounts' ledger with credits enabled (None without): jobs and live sessions that end
    here are settled here."""
    if not settings.credits.enabled:
        return None
    from .accounts import Ledger, database_url

    return Ledger.open(database_url(settings))


def live_host(settings: ServerConfig, pipeline: Any, name: str, conn: Any, ledger: Any) -> LiveHost | None:
    """The worker's live sessions, when it hosts them (live.enabled, max_sessions > 0)."""
    if not settings.live.enabled or settings.live.max_sessions == 0:
        return None
    from .live.relay import Records, settler

    billing = None
    if ledger is not None:
        from .accounts import Billing

        billing = Billing(ledger, settings.credits)
    return LiveHost(settings, pipeline, name, Records(conn), settler(billing))


def announce(state: WorkerState, conn) -> None:
    """This worker's entry in the worker list: its job (a record id) or none, decoder, device."""
    conn.set(
        PREFIX + f"worker:{state.name}",
        json.dumps(
            {
                "name": state.name,
                "job": state.current,
                "decoder": state.decoder,
                "device": state.device,
                "heartbeat": time.time(),
                **({"disk_full": True} if state.short_of_disk else {}),
                **({"folders": state.folders} if state.folders else {}),
                **({"shares_folders": False} if not state.shares_folders else {}),
                **({"draining": True} if state.stopping else {}),
                **(state.host.capacity() if state.host is not None else {}),
            }
        ),
        px=int(state.lease_s * 1000),
    )


def heartbeat(state: WorkerState, url: str, stop: threading.Event) -> None:
    """Every lease_s / 4: this worker's entry (`sonic:worker:<name>`, what /health lists), the
    running job's lease (renewed only while it is this run's), and a look for lapsed leases of
    others. Its own connection, with timeouts shorter than a beat and no retries, so that a stuck
    call never outlasts the lease."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    beat = max(0.2, state.lease_s / 4)
    conn = redis.Redis.from_url(url, socket_timeout=beat, socket_connect_timeout=beat, retry=Retry(NoBackoff(), 0))
    renew = conn.register_script(RENEW_LEASE)
    store = RedisStore(conn)
    records = Records(conn)
    beats = Quietly(log, f"worker {state.name}: heartbeat", "trying at each beat")
    while not stop.is_set():
        try:
            held = state.lease
            if held:
                renew(keys=[held[0]], args=[held[1], int(state.lease_s * 1000)])
            announce(state, conn)
            reap(store, state.retry_lost_jobs, state.output_dir, state.ending)
            if state.host is not None:
                state.host.beat(records)
                reap_lost(records, state.host.settle)
        except Exception as e:  # noqa: BLE001 - Redis away: try at the next beat
            beats.failed(e)
        else:
            beats.worked()
        stop.wait(beat)


def scratch_space(output_dir: Path, name: str, conn) -> Path:
    """With storage: s3 a worker works in `<output_dir>/.worker-<name>/` (fetched uploads, the
    video until it is in the bucket). Such folders of workers that are not alive (a run killed
    before this start) are removed first."""
    for folder in output_dir.glob(".worker-*"):
        if folder.name == f".worker-{name}" or not conn.exists(PREFIX + f"worker:{folder.name[8:]}"):
            shutil.rmtree(folder, ignore_errors=True)
    scratch = output_dir / f".worker-{name}"
    (scratch / "outputs").mkdir(parents=True, exist_ok=True)
    return scratch


def announce_now(state: WorkerState, conn: Any) -> None:
    """A change the API processes should see at once (a session opened or ended, a drain), not
    at the next beat."""
    try:
        announce(state, conn)
    except Exception:  # noqa: BLE001 - the next beat says it
        pass


def draining(state: WorkerState) -> None:
    """SIGTERM, in the signal handler: no new job or live session from now on. Flags only: saying
    so (the log, the worker's entry) is `say_stopping`'s, on a thread started beforehand; starting
    one here, or logging, could wait on a lock the interrupted main thread holds."""
    state.stopping = True
    if state.host is not None:
        state.host.draining.set()
    state.stop_asked.set()


def say_stopping(state: WorkerState, conn: Any) -> None:
    """Once SIGTERM has come: said in the log and in the worker's entry (/health: draining; a
    stopping worker logged nothing and was listed as plain busy)."""
    state.stop_asked.wait()
    running = f"its job {state.current} finishes" if state.current else "no job running"
    refused = "no new jobs" + (" or live sessions" if state.host is not None else "")
    log.info("worker %s: stopping: %s, %s", state.name, running, refused)
    announce_now(state, conn)


def room_to_take(state: WorkerState, conn: Any, burst: bool) -> bool:
    """Whether the disk under output_dir has min_free_mb free, asked before each job is taken
    (RQ's loop waits while it has not). A worker with a full disk failed every job it took
    (`disk_full`), and took them faster than its healthy peers: the jobs now wait for a worker
    with room. Its entry says `disk_full`, and /health counts it out of the workers that take
    jobs. A burst run stops there, leaving the queue as it is."""
    from rq.exceptions import StopRequested

    free_mb = short_of_disk([state.output_dir], state.min_free_mb)
    if free_mb is None:
        if state.short_of_disk:
            log.warning("worker %s: room on the disk again; taking jobs", state.name)
            state.short_of_disk = False
            announce_now(state, conn)
        return True
    if not state.short_of_disk:
        log.error(
            "worker %s: %d MB free under %s, under server.min_free_mb (%.10g MB): no job is taken until there is room",
            state.name,
            free_mb,
            state.output_dir,
            state.min_free_mb,
        )
        state.short_of_disk = True
        announce_now(state, conn)
    if burst:
        raise StopRequested()
    sweep(state)  # expired videos may be what fills it: no job ends to sweep them while every worker waits
    return False


def claim_name(conn: Any, name: str, lease_s: float, stop: threading.Event) -> bool:
    """Take `name` for this run; False if stopped while waiting for it. A run of it killed
    without a goodbye (kill -9, a crash, a container stopped) left RQ's registration behind for
    minutes, and RQ refused the name until it expired: the same command, or a restarted
    container, could not start. Whether that run is alive is told by its entry in the worker
    list, which a live run renews every lease_s / 4: once it has missed three beats (judged on
    Redis' own clock, not on a pid another container may reuse), its registration is dropped; a
    live worker of the same name keeps it, and this one waits."""
    key, waited = PREFIX + f"worker:{name}", 0
    while conn.pttl(key) > lease_s * 1000 / 4:
        if waited % max(1, int(lease_s)) == 0:
            log.warning("worker %s: a worker of this name answers; waiting until it stops or misses its beats", name)
        if stop.wait(1.0):
            return False
        waited += 1
    drop_registration(conn, name)
    return True


def drop_registration(conn: Any, name: str, whose: str = "an earlier run of this name") -> None:
    """RQ's registration of `name`, left by a run that is gone (`whose`, as the log says it), removed."""
    stale = rq_worker(conn, name, lambda: None)
    if conn.exists(stale.key) and not conn.hexists(stale.key, "death"):
        stale.register_death()
        log.info("worker %s: the registration %s left was removed", name, whose)


def work(state: WorkerState, conn: Any, burst: bool) -> None:
    """RQ's work loop until a stop (SIGTERM, or an empty queue with `burst`). RQ gives up when
    Redis fails under its own bookkeeping (a job ending while Redis is away): the loop is
    started again once Redis answers (a second apart at least), and the job that was running is
    the lease's to judge."""
    import redis

    stopping = state.stop_asked  # set by RQ's handler (`draining`) or, between loops, by ours

    while True:
        try:
            rq_worker(
                conn, state.name, functools.partial(draining, state), functools.partial(may_take, state, conn)
            ).work(burst=burst, logging_level="WARNING")
        except redis.RedisError:
            pass
        if stopping.is_set() or burst:
            return
        log.warning("worker %s: the job loop stopped (Redis away?); it starts again once Redis answers", state.name)
        stop_on_signals(stopping)  # RQ's handlers belong to the loop that stopped
        while not stopping.wait(1.0):
            try:
                conn.ping()
                drop_registration(conn, state.name, "its job loop that stopped")
                break
            except redis.RedisError:
                continue
        if stopping.is_set():
            return


def stop_on_signals(stopping: threading.Event) -> threading.Event:
    """`stopping`, set from now on by SIGTERM or SIGINT; a second signal stops the process at once."""

    def handle(signum: int, frame: Any) -> None:
        if stopping.is_set():
            raise SystemExit(128 + signum)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    return stopping


REDIS_RETRY_MAX_S = 2.0  # the longest a worker waits between tries to reach Redis


def rq_worker(conn: Any, name: str, on_stop: Callable[[], None], may_take: Callable[[bool], bool] | None = None) -> Any:
    """RQ's in-process worker, told about a stop request before RQ handles it (warm shutdown:
    the running job finishes, then work() returns). Before each job it waits, alive to RQ,
    until `may_take(burst)`."""
    from rq import SimpleWorker

    class Worker(SimpleWorker):
        # RQ waits 1, 2, 4... up to 60 s between tries while Redis is away: a worker sat idle
        # for 32 s after a blip while /health said ready, the queue waiting
        max_connection_wait_time = REDIS_RETRY_MAX_S

        def request_stop(self, signum: Any, frame: Any) -> None:
            on_stop()
            super().request_stop(signum, frame)

        def check_for_suspension(self, burst: bool) -> None:
            super().check_for_suspension(burst)
            while may_take is not None and not self._stop_requested and not may_take(burst):
                self.heartbeat()
                time.sleep(DISK_CHECK_S)

        def execute_job(self, job: Any, queue: Any) -> None:
            # asked again once it is taken: a worker idle in RQ's blocking wait (minutes) took the
            # next job whatever happened to its disk meanwhile. The job goes back to the front of
            # the queue, untouched, for a worker with room; this one then waits in the loop above
            if may_take is not None and not may_take(False):
                with self.connection.pipeline() as p:
                    p.lrem(queue.intermediate_queue_key, 1, job.id)  # where RQ moved it when taken
                    p.lpush(queue.key, job.id)
                    p.execute()
                return
            super().execute_job(job, queue)

        def teardown(self) -> None:
            try:
                super().teardown()
            finally:  # with Redis away RQ's teardown fails before it stops listening: stopped here
                if self.pubsub_thread is not None:
                    self.pubsub_thread.stop()
                    self.pubsub_thread.join(timeout=1)
                if self.pubsub is not None:
                    try:
                        self.pubsub.close()
                    except Exception:  # noqa: BLE001 - its connection is gone already
                        pass

    return Worker([rq_queue(conn)], connection=conn, name=name)


def serve_metrics(host: str, port: int, names: HostNames, socket_timeout_s: float) -> ThreadedWSGIServer:
    """This worker's /metrics, from a thread of its own. Not prometheus_client's server: that
    one asked DNS for its address's name at start (10 s late where no DNS server answers),
    answered a Host of any name, named its Python version, and let a client that stops sending
    hold a thread and a file handle for good (server.socket_timeout_s, as the API's)."""
    from .serve import JsonErrorsHandler, ThrottledAcceptServer

    class MetricsServer(ThrottledAcceptServer):
        port_option, host_option = "--metrics-port", "--metrics-host"

    class Unlogged(JsonErrorsHandler):
        timeout = socket_timeout_s

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            pass  # a scrape every few seconds would bury the worker's own lines

    server = MetricsServer(host, port, worker_page(names), Unlogged)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


def main(argv: list[str] | None = None, prog: str = "sonic worker") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="settings YAML over the shipped configs/default.yaml")
    ap.add_argument("--redis-url", help="Redis URL (setting server.redis_url, SONIC_REDIS_URL)")
    ap.add_argument("--name", help="this worker's name (default: host-pid)")
    ap.add_argument("--burst", action="store_true", help="stop when the queue is empty (tests)")
    ap.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port")
    ap.add_argument(
        "--metrics-host", default="0.0.0.0", help="... on this address (default 0.0.0.0: where Prometheus reaches it)"
    )
    ap.add_argument("--decoder", choices=("auto", "warp", "sonic"))
    ap.add_argument("--checkpoints", metavar="DIR")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"))
    a = ap.parse_args(argv)
    configure_logging()
    try:
        settings = load_settings(
            a.config,
            flags={
                "server.redis_url": a.redis_url,
                "decoder": a.decoder,
                "device": a.device,
                "sonic_checkpoints": a.checkpoints,
            },
        )
    except SettingsError as e:
        sys.exit(f"error: {e}")
    configure_logging(settings.server.log_format)
    srv = settings.server
    check_host(settings)
    if not srv.redis_url:
        sys.exit("error: a worker needs Redis: set server.redis_url (SONIC_REDIS_URL) or --redis-url")
    name = a.name or f"{socket.gethostname()}-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        sys.exit(f"error: worker name {name!r}: use up to 64 letters, digits, '.', '_' or '-'")
    if a.metrics_port:  # before anything registers: a port in use stops the start, not a worker half up
        try:
            names = HostNames.of(srv.allowed_hosts, srv.public_url)
            serve_metrics(a.metrics_host, a.metrics_port, names, srv.socket_timeout_s)
        except SonicError as e:
            sys.exit(f"error: {e.message}")
    import redis

    from sonic import load_pipeline

    conn = connect(srv.redis_url)
    try:
        conn.ping()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as e:  # it answered: no
        sys.exit(f"error: Redis at {without_password(srv.redis_url)} refused: {e} (server.redis_url)")
    except Exception as e:  # noqa: BLE001
        sys.exit(f"error: Redis at {without_password(srv.redis_url)} does not answer ({type(e).__name__})")
    if not claim_name(conn, name, srv.worker_lease_s, stop_on_signals(threading.Event())):
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # while the model loads a signal stops it at once, as before
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        uploads, outputs = open_storage(settings)
        if outputs.remote:
            outputs.s3.check()
        pipeline = load_pipeline(settings)
        ledger = open_ledger(settings)
        webhooks = make_webhooks(settings, outputs)
        hooks = (*end_hooks(settings, ledger), webhooks.job_ended)
    except SonicError as e:
        sys.exit(f"error: {e.message}")
    store = RedisStore(conn)
    output_dir = Path(settings.output_dir)  # made by open_storage
    global _STATE
    state = _STATE = WorkerState(
        store=store,
        pipeline=pipeline,
        output_dir=output_dir,
        uploads=uploads,
        outputs=outputs,
        ending=JobEnd(uploads, hooks),
        expiry=OutputExpiry(store, outputs, srv.output_ttl_s),
        name=name,
        job_timeout_s=srv.job_timeout_s,
        lease_s=srv.worker_lease_s,
        retry_lost_jobs=srv.retry_lost_jobs,
        min_free_mb=srv.min_free_mb,
        decoder=getattr(pipeline.decoder, "identity", pipeline.decoder.name),
        device=str(pipeline.device),
        host=None if a.burst else live_host(settings, pipeline, name, conn, ledger),
        notify=events_of(webhooks.notify),
    )
    webhooks.start(only_if_pending=True)  # workers send deliveries too: API processes may all be busy
    if not outputs.remote:  # folders shared with the API processes: told apart by their marks
        state.folders = shared_folders(uploads.root, output_dir)
    else:  # this worker's own folder: the bucket is what is shared
        state.bucket = bucket_ids(outputs.s3.bucket, outputs.s3.prefix)
        state.folders = dict(state.bucket)
        announce(state, conn)  # alive in the list first: a worker starting meanwhile
        scratch = scratch_space(output_dir, name, conn)  # leaves this one's folder alone
        uploads.root, outputs.folder = scratch / "uploads", scratch / "outputs"
        output_dir = state.output_dir = outputs.folder
    stop = threading.Event()
    threading.Thread(target=heartbeat, args=(state, srv.redis_url, stop), name="sonic-heartbeat", daemon=True).start()
    threading.Thread(target=say_stopping, args=(state, conn), name="sonic-stopping", daemon=True).start()
    if state.host is not None:
        state.host.on_change = lambda: announce_now(state, conn)
        if settings.live.warm_start:
            state.host.live.warm_faces()  # here: the "ready" line below is not written while stderr is silenced
            threading.Thread(target=state.host.live.warm, name="sonic-live-warm", daemon=True).start()
        commands = connect(srv.redis_url)  # its own: it blocks waiting for commands
        threading.Thread(
            target=state.host.serve, args=(commands, stop), name="sonic-live-commands", daemon=True
        ).start()
    log.info("worker %s ready: decoder %s on %s", name, pipeline.decoder.name, pipeline.device)
    try:
        work(state, conn, a.burst)
        if state.host is not None:  # stopped (SIGTERM): its sessions may finish (a second signal: at once)
            state.host.drain(srv.worker_drain_s)
    finally:
        if state.host is not None:
            state.host.live.close()  # what is left ends server_stopping, settled, before the heartbeat stops
        stop.set()
        try:
            conn.delete(PREFIX + f"worker:{name}")  # a clean stop leaves the list at once
        except redis.RedisError:  # Redis away as it stops: the entry lapses by itself (it is leased)
            log.warning("worker %s: Redis does not answer; its entry lapses by itself", name)
        log.info("worker %s stopped", name)
        if outputs.remote:
            shutil.rmtree(output_dir.parent, ignore_errors=True)
