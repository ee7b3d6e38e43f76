"""`sonic worker` (`python -m sonic worker`): a process that loads the model once and runs jobs
from Redis (server.redis_url / SONIC_REDIS_URL), one at a time; start one per GPU or machine.

It shares with the API processes: Redis, and the `upload_dir` and `output_dir` folders (a
shared volume). While a job runs, a thread renews the job's lease in Redis every few seconds:
a worker killed mid-job lets it lapse, and the API marks the job failed (`worker_lost`) instead
of leaving it `processing`. Between jobs the worker sweeps expired videos and records.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time

from sonic.settings import SettingsError, load_settings

from .expiry import OutputExpiry
from .jobs import PROCESSING
from .metrics import REGISTRY, count_job
from .queue.execute import INTERNAL, JobCanceled, JobTimedOut, run_task
from .queue.redis import PREFIX, RedisStore, connect, rq_queue
from .tasks import TASKS
from .uploads import Uploads

log = logging.getLogger("sonic.worker")
_CONTEXT: dict = {}          # what run_job needs, set once by `main` before the first job


def run_job(job_id: str) -> None:
    """One job, in the worker process (called by RQ): the record is read from Redis, run, and its
    final state written back. Never raises."""
    ctx = _CONTEXT
    store: RedisStore = ctx["store"]
    r = store.r
    rec = store.load(job_id)
    if rec is None or rec.terminal or r.exists(PREFIX + f"cancel:{job_id}"):
        return                                            # canceled (or gone) before it started
    rec.status, rec.stage, rec.started = PROCESSING, "starting", time.time()
    rec.attempts += 1
    lease, lease_s = PREFIX + f"lease:{job_id}", ctx["lease_s"]
    owner = f"{ctx['name']}:{rec.attempts}"               # this run of the job, on this worker
    r.set(lease, owner, px=int(lease_s * 1000))
    store.save(rec)
    done = threading.Event()

    def renew() -> None:
        while not done.wait(lease_s / 3):
            try:
                if r.get(lease) in (None, owner.encode()):   # never take over a run given to another worker
                    r.set(lease, owner, px=int(lease_s * 1000))
            except Exception:                             # noqa: BLE001 - Redis away: try again
                log.warning("job %s: the lease could not be renewed", job_id)
    threading.Thread(target=renew, name="sonic-lease", daemon=True).start()
    limit = ctx["job_timeout_s"]
    deadline = time.monotonic() + limit if limit > 0 else None

    def progress(stage: str, frac: float) -> None:
        if r.exists(PREFIX + f"cancel:{job_id}"):
            raise JobCanceled()
        if r.get(lease) != owner.encode():           # declared lost meanwhile: stop, the result is not wanted
            raise JobCanceled()
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimedOut()
        rec.stage, rec.progress = stage, frac
        store.save(rec)

    try:
        status, fields = run_task(rec, TASKS, ctx["pipeline"], ctx["output_dir"], None, progress, limit)
    except Exception:                                     # noqa: BLE001
        log.exception("job %s failed outside its task", job_id)
        status, fields = "failed", {"error": dict(INTERNAL)}
    finally:
        done.set()
    now = store.load(job_id)
    if now is not None and (now.attempts != rec.attempts or now.terminal):
        # this run was declared lost (and failed, or given to another worker) meanwhile: its
        # result is not the job's; one request never ends twice
        log.warning("job %s: run %d ended after it was declared lost; its result is dropped", job_id, rec.attempts)
        return
    try:
        ctx["uploads"].remove(job_id)
    except Exception:                                     # noqa: BLE001
        log.exception("job %s: its upload folder could not be removed", job_id)
    rec.status = rec.stage = status
    for name, value in fields.items():
        setattr(rec, name, value)
    rec.finished = time.time()
    store.save(rec)
    count_job(rec)
    r.delete(lease, PREFIX + f"cancel:{job_id}")
    try:
        ctx["expiry"].maybe_sweep()
    except Exception:                                     # noqa: BLE001
        log.exception("output expiry sweep failed")


def main(argv: list[str] | None = None, prog: str = "sonic worker") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="settings YAML over the shipped configs/default.yaml")
    ap.add_argument("--redis-url", help="Redis URL (setting server.redis_url, SONIC_REDIS_URL)")
    ap.add_argument("--name", help="this worker's name (default: host-pid)")
    ap.add_argument("--burst", action="store_true", help="stop when the queue is empty (tests)")
    ap.add_argument("--metrics-port", type=int, help="serve this worker's Prometheus metrics on this port")
    ap.add_argument("--decoder", choices=("auto", "warp", "sonic"))
    ap.add_argument("--checkpoints", metavar="DIR")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"))
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        settings = load_settings(a.config, flags={"server.redis_url": a.redis_url, "decoder": a.decoder,
                                                  "device": a.device, "sonic_checkpoints": a.checkpoints})
    except SettingsError as e:
        sys.exit(f"error: {e}")
    srv = settings.server
    if not srv.redis_url:
        sys.exit("error: a worker needs Redis: set server.redis_url (SONIC_REDIS_URL) or --redis-url")
    from rq import SimpleWorker
    from sonic import SonicError, load_pipeline
    conn = connect(srv.redis_url)
    try:
        conn.ping()
    except Exception as e:                                # noqa: BLE001
        sys.exit(f"error: Redis at {srv.redis_url} does not answer ({type(e).__name__})")
    try:
        pipeline = load_pipeline(settings)
    except SonicError as e:
        sys.exit(f"error: {e.message}")
    store = RedisStore(conn)
    name = a.name or f"{socket.gethostname()}-{os.getpid()}"
    from pathlib import Path
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _CONTEXT.update(store=store, pipeline=pipeline, output_dir=output_dir, uploads=Uploads(srv.upload_dir),
                    job_timeout_s=srv.job_timeout_s, name=name, lease_s=srv.worker_lease_s,
                    expiry=OutputExpiry(store, output_dir, srv.output_ttl_s))
    conn.set(PREFIX + "decoder", getattr(pipeline.decoder, "identity", pipeline.decoder.name))
    if a.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(a.metrics_port, registry=REGISTRY)
    log.info("worker %s ready: decoder %s on %s", name, pipeline.decoder.name, pipeline.device)
    SimpleWorker([rq_queue(conn)], connection=conn, name=name).work(burst=a.burst, logging_level="WARNING")


