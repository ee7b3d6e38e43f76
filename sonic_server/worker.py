"""`sonic worker` (`python -m sonic worker`): a process that loads the model once and runs jobs
from Redis (server.redis_url / SONIC_REDIS_URL), one at a time; start one per GPU or machine.

It shares with the API processes: Redis, and the `upload_dir` and `output_dir` folders (a
shared volume), or with `storage: s3` a bucket: then it fetches a job's uploads into its own
`upload_dir` and moves the finished video into the bucket (sonic_server/storage.py). While a job
runs, a thread renews the job's lease in Redis every few seconds: a worker killed mid-job lets
it lapse, and the API marks the job failed (`worker_lost`) instead of leaving it `processing`.
Between jobs the worker sweeps expired videos and records.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from sonic import SonicError
from sonic.settings import SettingsError, load_settings

from .expiry import OutputExpiry
from .jobs import CANCELED, FAILED, PROCESSING, QUEUED, SUCCEEDED
from .metrics import REGISTRY, count_job
from .queue.execute import INTERNAL, JobCanceled, JobTimedOut, run_task
from .queue.redis import PREFIX, RENEW_LEASE, RedisStore, connect, lease_key, reap, rq_queue
from .storage import open_storage
from .tasks import TASKS

log = logging.getLogger("sonic.worker")
_CONTEXT: dict = {}  # what run_job needs, set once by `main` before the first job


def run_job(job_id: str) -> None:
    """One run of a job, in the worker process (called by RQ): the record is read from Redis, run,
    and its final state written back, each change only if the record is still as this run left
    it (RedisStore.swap). Never raises."""
    ctx = _CONTEXT
    store: RedisStore = ctx["store"]
    try:
        _run(ctx, store, job_id)
    except Exception:  # noqa: BLE001 - Redis away, ...: the lease lapses
        log.exception("job %s: the run stopped", job_id)
    finally:
        ctx["current"] = ctx["lease"] = None
        try:
            announce(ctx, store.r)  # idle again
        except Exception:  # noqa: BLE001
            pass


def _run(ctx: dict, store: RedisStore, job_id: str) -> None:
    r = store.r
    rec = store.load(job_id)
    if rec is None or rec.status != QUEUED:
        return  # gone, canceled or taken before it started
    queued_run = rec.attempts
    if r.exists(PREFIX + f"cancel:{job_id}"):  # canceled as it was being taken
        rec.status = rec.stage = CANCELED
        rec.finished = time.time()
        if store.swap(rec, QUEUED, queued_run):
            ctx["uploads"].remove(job_id)
        return
    rec.status, rec.stage, rec.started = PROCESSING, "starting", time.time()
    rec.attempts += 1
    rec.worker = ctx["name"]
    lease, lease_s = lease_key(job_id), ctx["lease_s"]
    owner = f"{ctx['name']}:{rec.attempts}"  # this run of the job, on this worker
    r.set(lease, owner, px=int(lease_s * 1000))
    if not store.swap(rec, QUEUED, queued_run):
        r.delete(lease)
        return
    ctx["current"] = job_id
    ctx["lease"] = (lease, owner)
    announce(ctx, r)  # busy, at once (not at the next beat)
    limit = ctx["job_timeout_s"]
    deadline = time.monotonic() + limit if limit > 0 else None

    def progress(stage: str, frac: float) -> None:
        if r.exists(PREFIX + f"cancel:{job_id}"):
            raise JobCanceled()
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimedOut()
        rec.stage, rec.progress = stage, frac
        if not store.swap(rec, PROCESSING, rec.attempts):  # declared lost meanwhile: stop here
            raise JobCanceled()

    uploads, outputs = ctx["uploads"], ctx["outputs"]
    try:
        job = rec.copy()  # the files where this machine reads them;
        job.inputs = uploads.fetch(job_id, rec.inputs)  # the record keeps what every machine can use
        status, fields = run_task(job, TASKS, ctx["pipeline"], ctx["output_dir"], None, progress, limit)
        if status == SUCCEEDED:
            outputs.publish(fields["result"]["file"])  # into the bucket (storage: s3)
    except SonicError as e:  # the object store away
        (Path(ctx["output_dir"]) / f"{job_id}.mp4").unlink(missing_ok=True)
        status, fields = FAILED, {"error": e.to_dict()}
    except Exception:  # noqa: BLE001
        log.exception("job %s failed outside its task", job_id)
        (Path(ctx["output_dir"]) / f"{job_id}.mp4").unlink(missing_ok=True)
        status, fields = FAILED, {"error": dict(INTERNAL)}
    finally:
        uploads.drop_local_copy(job_id)
    ctx["lease"] = None
    final = rec.copy()
    final.status = final.stage = status
    for name, value in fields.items():
        setattr(final, name, value)
    final.finished = time.time()
    now = store.load(job_id)
    if now is not None and now.status == PROCESSING and now.attempts == rec.attempts:
        try:  # inputs go before the job is seen ended
            ctx["uploads"].remove(job_id)
        except Exception:  # noqa: BLE001
            log.exception("job %s: its upload folder could not be removed", job_id)
    # the final state and the end of the lease in one step: never "ended" and "lost" both
    if not store.swap(final, PROCESSING, rec.attempts, drop_lease=True):
        log.warning("job %s: run %d ended after it was declared lost; its result is dropped", job_id, rec.attempts)
        return
    count_job(final)
    r.delete(PREFIX + f"cancel:{job_id}")
    try:
        ctx["expiry"].maybe_sweep()
    except Exception:  # noqa: BLE001
        log.exception("output expiry sweep failed")


def announce(ctx: dict, conn) -> None:
    """This worker's entry in the worker list: its job (a record id) or none, decoder, device."""
    conn.set(
        PREFIX + f"worker:{ctx['name']}",
        json.dumps(
            {
                "name": ctx["name"],
                "job": ctx.get("current"),
                "decoder": ctx["decoder"],
                "device": ctx["device"],
                "heartbeat": time.time(),
            }
        ),
        px=int(ctx["lease_s"] * 1000),
    )


def heartbeat(ctx: dict, url: str, stop: threading.Event) -> None:
    """Every lease_s / 4: this worker's entry (`sonic:worker:<name>`, what /health lists), the
    running job's lease (renewed only while it is this run's), and a look for lapsed leases of
    others. Its own connection, with timeouts shorter than a beat and no retries, so that a stuck
    call never outlasts the lease."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    beat = max(0.2, ctx["lease_s"] / 4)
    conn = redis.Redis.from_url(url, socket_timeout=beat, socket_connect_timeout=beat, retry=Retry(NoBackoff(), 0))
    renew = conn.register_script(RENEW_LEASE)
    store = RedisStore(conn)
    while not stop.is_set():
        try:
            held = ctx.get("lease")
            if held:
                renew(keys=[held[0]], args=[held[1], int(ctx["lease_s"] * 1000)])
            announce(ctx, conn)
            reap(store, ctx["retry_lost_jobs"], ctx["output_dir"], ctx["uploads"])
        except Exception:  # noqa: BLE001 - Redis away: try at the next beat
            log.warning("worker %s: heartbeat failed", ctx["name"])
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


def main(argv: list[str] | None = None, prog: str = "sonic worker") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    srv = settings.server
    if not srv.redis_url:
        sys.exit("error: a worker needs Redis: set server.redis_url (SONIC_REDIS_URL) or --redis-url")
    from rq import SimpleWorker

    from sonic import load_pipeline

    conn = connect(srv.redis_url)
    try:
        conn.ping()
    except Exception as e:  # noqa: BLE001
        sys.exit(f"error: Redis at {srv.redis_url} does not answer ({type(e).__name__})")
    uploads, outputs = open_storage(settings)
    try:
        if outputs.remote:
            outputs.s3.check()
        pipeline = load_pipeline(settings)
    except SonicError as e:
        sys.exit(f"error: {e.message}")
    store = RedisStore(conn)
    name = a.name or f"{socket.gethostname()}-{os.getpid()}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        sys.exit(f"error: worker name {name!r}: use up to 64 letters, digits, '.', '_' or '-'")
    output_dir = Path(settings.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    _CONTEXT.update(
        store=store,
        pipeline=pipeline,
        output_dir=output_dir,
        uploads=uploads,
        outputs=outputs,
        job_timeout_s=srv.job_timeout_s,
        name=name,
        lease_s=srv.worker_lease_s,
        retry_lost_jobs=srv.retry_lost_jobs,
        expiry=OutputExpiry(store, outputs, srv.output_ttl_s),
        decoder=getattr(pipeline.decoder, "identity", pipeline.decoder.name),
        device=str(pipeline.device),
        current=None,
        lease=None,
    )
    if outputs.remote:  # this worker's own folder: nothing is shared
        announce(_CONTEXT, conn)  # alive in the list first: a worker starting meanwhile
        scratch = scratch_space(output_dir, name, conn)  # leaves this one's folder alone
        uploads.root, outputs.folder = scratch / "uploads", scratch / "outputs"
        output_dir = _CONTEXT["output_dir"] = outputs.folder
    stop = threading.Event()
    threading.Thread(
        target=heartbeat, args=(_CONTEXT, srv.redis_url, stop), name="sonic-heartbeat", daemon=True
    ).start()
    if a.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(a.metrics_port, registry=REGISTRY)
    log.info("worker %s ready: decoder %s on %s", name, pipeline.decoder.name, pipeline.device)
    try:
        SimpleWorker([rq_queue(conn)], connection=conn, name=name).work(burst=a.burst, logging_level="WARNING")
    finally:
        stop.set()
        conn.delete(PREFIX + f"worker:{name}")  # a clean stop leaves the list at once
        if outputs.remote:
            shutil.rmtree(output_dir.parent, ignore_errors=True)
