"""The job pieces without HTTP and without the model: records, stores, the local queue, the task
registry, recovery, expiry, the result cache and the token bucket."""
import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from server_helpers import FAKE_VIDEO, FakePipeline, new_record
from sonic import GenerateOptions
from sonic.checks import check_inputs
from sonic.errors import PipelineError
from sonic.settings import load_settings
from sonic_server.jobs import JobRecord
from sonic_server.queue import JobQueue, QueueFull
from sonic_server.queue.local import LocalQueue
from sonic_server.recovery import recover
from sonic_server.store import JobStore, MemoryStore, open_store
from sonic_server.tasks import TASKS, run_generate
from sonic_server.uploads import Uploads

LIMITS = load_settings().limits


def test_record_is_plain_json_data():
    rec = JobRecord.new("generate", GenerateOptions(seed=3).to_dict(), cache_key="abc")
    rec.error = {"code": "no_face_detected", "message": "no face", "field": "image"}
    data = json.loads(json.dumps(rec.to_dict()))
    assert JobRecord.from_dict(data) == rec
    assert data["kind"] == "generate" and data["params"]["seed"] == 3 and data["status"] == "queued"
    assert not any(isinstance(v, (threading.Event, type(threading.Condition()))) for v in vars(rec).values())
    assert rec.public() == {"job_id": rec.id, "status": "queued", "progress": 0.0, "stage": "queued",
                            "created": round(rec.created, 3),
                            "error": rec.error}
    assert set(TASKS) == {"generate"} and TASKS["generate"] is run_generate
    assert issubclass(LocalQueue, JobQueue)


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_stores_answer_alike(tmp_path, kind):
    store = JobStore(tmp_path / "jobs.sqlite3") if kind == "sqlite" else MemoryStore()
    a, b = JobRecord.new("generate", {}, cache_key="k1"), JobRecord.new("generate", {}, cache_key="k1")
    for rec in (a, b):
        store.save(rec)
    assert store.load(a.id) == a and store.load("nope") is None
    assert sorted(store.unfinished()) == sorted([a.id, b.id]) and store.cached("k1") is None
    a.status, a.result, a.progress = "succeeded", {"file": "x.mp4"}, 1.0
    store.save(a)
    assert store.cached("k1") == a.id and store.load(a.id).result == {"file": "x.mp4"}
    assert store.unfinished() == [b.id]
    assert store.prune(time.time() + 1) == 1 and store.load(a.id) is None      # finished jobs only
    assert store.load(b.id) == b


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_loaded_records_are_copies(tmp_path, kind):
    store = JobStore(tmp_path / "jobs.sqlite3") if kind == "sqlite" else MemoryStore()
    rec = JobRecord.new("generate", {"seed": 1}, cache_key="k")
    rec.result, rec.error = {"file": "a.mp4"}, {"code": "internal_error", "message": "m"}
    store.save(rec)
    loaded = store.load(rec.id)
    loaded.params["seed"], loaded.result["file"], loaded.error["message"] = 2, "b.mp4", "changed"
    assert store.load(rec.id) == rec                     # changing a loaded record changes nothing stored


def test_open_store_follows_the_settings(tmp_path):
    from sonic_server.settings import settings_from
    path = lambda **server: settings_from({"server": server}).server.jobs_db_path
    assert isinstance(open_store(path(jobs_db="")), MemoryStore)               # "" keeps records in memory
    open_store(path(jobs_db=None, data_dir=str(tmp_path / "state")))
    assert (tmp_path / "state" / "jobs.sqlite3").is_file()                   # default: <data_dir>/jobs.sqlite3
    open_store(path(jobs_db=str(tmp_path / "elsewhere" / "j.db"), data_dir=str(tmp_path / "unused")))
    assert (tmp_path / "elsewhere" / "j.db").is_file() and not (tmp_path / "unused").exists()


def test_recovery_requeues_waiting_jobs_and_fails_cut_off_ones(tmp_path):
    store, uploads, out = JobStore(tmp_path / "jobs.sqlite3"), Uploads(tmp_path / "up"), tmp_path / "out"
    out.mkdir()
    running, done = new_record(uploads), new_record(uploads)
    waiting, later, bare = new_record(uploads), new_record(uploads), new_record(uploads)
    running.status, running.stage, running.progress = "processing", "render", 0.4
    done.status, done.result = "succeeded", {"file": "d.mp4"}
    waiting.created, later.created = 100.0, 200.0
    for rec in (running, done, later, waiting, bare):
        store.save(rec)
    uploads.remove(bare.id)  # a waiting job whose inputs are gone cannot run again
    (out / f".{running.id}.mp4.part").write_bytes(b"half")
    found = recover(store, uploads, out)
    assert [rec.id for rec in found.resumed] == [waiting.id, later.id]  # queued again, oldest first
    assert sorted(found.failed) == sorted([running.id, bare.id])
    rec = store.load(running.id)
    assert rec.status == rec.stage == "failed" and rec.progress == 0.4  # how far it got
    assert rec.error["code"] == "interrupted" and "status" not in rec.error and "running" in rec.error["message"]
    assert "input files were gone" in store.load(bare.id).error["message"]
    assert store.load(waiting.id).status == "queued" and all(Path(p).is_file() for p in waiting.inputs.values())
    assert not (tmp_path / "up" / running.id).exists() and not list(out.glob(".*.part"))
    assert store.load(done.id).status == "succeeded"


def test_run_generate_takes_decoded_inputs_or_reads_the_files(tmp_path):
    uploads = Uploads(tmp_path / "up")
    rec = new_record(uploads, seed=9, min_resolution=256)
    pipe = FakePipeline()
    checked = check_inputs(rec.inputs["image"], rec.inputs["audio"], GenerateOptions(), LIMITS)
    result = run_generate(rec, pipe, tmp_path, checked, lambda stage, frac: None)
    image, audio, opts = pipe.calls[-1]
    assert image is checked.rgb and opts == GenerateOptions(seed=9, min_resolution=256)
    assert result["file"] == f"{rec.id}.mp4" and "output_path" not in result and result["seed"] == 9
    assert (tmp_path / result["file"]).read_bytes() == FAKE_VIDEO
    run_generate(rec, pipe, tmp_path, None, lambda stage, frac: None)        # a record without arrays
    assert pipe.calls[-1][:2] == (rec.inputs["image"], rec.inputs["audio"])
    uploads.remove(rec.id)  # its files gone (a cleanup, a job store restored from an old snapshot)
    with pytest.raises(PipelineError, match="image file is no longer on the server") as gone:
        run_generate(rec, pipe, tmp_path, None, lambda stage, frac: None)
    assert str(tmp_path) not in gone.value.message  # the service's paths are not the caller's business


def test_a_job_with_a_parameter_its_worker_does_not_know_says_the_worker_is_older(tmp_path):
    """A rolling upgrade that reached the API processes first: the old worker's TypeError was
    answered internal_error. Now the failure says what to upgrade."""
    uploads = Uploads(tmp_path / "up")
    rec = new_record(uploads, seed=9)
    rec.params["lip_curl"] = 0.5  # a parameter of a release to come
    with pytest.raises(PipelineError, match=r"newer release .* does not know lip_curl\): upgrade the workers"):
        run_generate(rec, FakePipeline(), tmp_path, None, lambda stage, frac: None)


@pytest.mark.parametrize("stop", ["canceled", "timed out"])
def test_a_job_stopped_at_its_last_report_leaves_no_video(tmp_path, stop):
    """The pipeline reports "done" after the video is in place: a cancel (or the time limit)
    seen there ended the job without a result, its hold released, and the video stayed
    downloadable at /output/<id>.mp4, even after DELETE."""
    from sonic_server.lifecycle import JobCanceled, JobTimedOut
    from sonic_server.queue.execute import run_task

    def pipeline(image, audio, options, *, out_path, progress, sound_file):
        Path(out_path).write_bytes(FAKE_VIDEO)
        progress("done", 1.0)

    def progress(stage, fraction):
        if stage == "done":
            raise JobCanceled() if stop == "canceled" else JobTimedOut()

    rec = new_record(Uploads(tmp_path / "up"), seed=9)
    status, fields = run_task(rec, TASKS, pipeline, tmp_path, None, progress, job_timeout_s=60)
    assert status == ("canceled" if stop == "canceled" else "failed") and "result" not in fields
    assert not (tmp_path / f"{rec.id}.mp4").exists()


def test_a_run_declared_lost_leaves_the_video_under_the_jobs_name(tmp_path):
    """A run cut off from Redis and declared lost stops at its next report; with
    retry_lost_jobs another run of the job may have finished the same name meanwhile."""
    from sonic_server.lifecycle import RunSuperseded
    from sonic_server.queue.execute import run_task

    def pipeline(image, audio, options, *, out_path, progress, sound_file):
        Path(out_path).write_bytes(FAKE_VIDEO)
        progress("done", 1.0)

    def progress(stage, fraction):
        if stage == "done":
            raise RunSuperseded()

    rec = new_record(Uploads(tmp_path / "up"), seed=9)
    status, fields = run_task(rec, TASKS, pipeline, tmp_path, None, progress)
    assert status == "canceled" and (tmp_path / f"{rec.id}.mp4").read_bytes() == FAKE_VIDEO


def test_queue_runs_a_job_and_caches_it(make_queue, tmp_path):
    pipe = FakePipeline()
    q = make_queue(pipe)
    rec = new_record(q.uploads, seed=5)
    checked = check_inputs(rec.inputs["image"], rec.inputs["audio"], GenerateOptions(), LIMITS)
    assert q.submit(rec, checked).status == "queued"
    done = q.wait(rec.id, 10)
    assert done.status == "succeeded" and done.progress == 1.0 and done.result["file"] == f"{rec.id}.mp4"
    assert done.started and done.finished and done.created <= done.started <= done.finished
    assert pipe.calls[0][0] is checked.rgb                   # the route's decoded arrays reach the task
    assert not (tmp_path / "up" / rec.id).exists()           # inputs go when the job ends
    assert q.cached("k").id == rec.id and q.get(rec.id) == done
    (tmp_path / "out" / done.result["file"]).unlink()
    assert q.cached("k") is None                             # no video, no cache hit
    assert q.get("nope") is None and q.cancel("nope") is None and q.wait("nope", 0) is None
    assert list(q.events("nope", 1)) == []


def test_queue_bound_and_cancel_frees_place(make_queue):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe, queue_size=1)
    try:
        running = q.submit(new_record(q.uploads))
        assert pipe.started.wait(5) and q.health() == {"running_job": running.id, "workers_alive": 1, "queue_length": 0}
        a = q.submit(new_record(q.uploads))
        assert q.queue_length() == 1
        with pytest.raises(QueueFull):
            q.submit(new_record(q.uploads))
        assert q.cancel(a.id).status == "canceled"
        assert not (q.uploads.root / a.id).exists() and q.queue_length() == 0
        b = q.submit(new_record(q.uploads))
        assert q.get(b.id).status == "queued"
        assert q.cancel(running.id).status == "processing"   # a running job stops at its next report
        assert q.wait(running.id, 5).status == "canceled"
    finally:
        gate.set()
    assert q.wait(b.id, 5).status == "succeeded"
    assert len(pipe.calls) == 2 and q.health()["running_job"] is None


def test_a_store_slow_to_write_holds_up_no_status_read(make_queue, tmp_path):
    """A database that takes its time (another writer holds it: up to its 5 s busy timeout)
    delays the submit that writes, not every status read, health check and progress report
    (they waited on the queue's lock while the submit held it across the write)."""
    class SlowStore(MemoryStore):
        slow = threading.Event()

        def save(self, rec):
            if self.slow.is_set():
                time.sleep(1.5)
            super().save(rec)

    store = SlowStore()
    gate = threading.Event()
    q = make_queue(FakePipeline(gate=gate), queue_size=3, store=store)
    try:
        first = q.submit(new_record(q.uploads))
        store.slow.set()
        writer = threading.Thread(target=q.submit, args=(new_record(q.uploads),))
        writer.start()
        time.sleep(0.2)  # the second submit is writing
        t0 = time.monotonic()
        assert q.get(first.id) is not None and q.health()["workers_alive"] == 1 and q.queue_length() == 0
        assert time.monotonic() - t0 < 0.5
        writer.join(5)
        assert q.queue_length() == 1  # it took its place once written
        store.slow.clear()
        with pytest.raises(QueueFull):  # the bound counts places being written too
            store.slow.set()
            writers = [threading.Thread(target=q.submit, args=(new_record(q.uploads),)) for _ in range(2)]
            for w in writers:
                w.start()
            time.sleep(0.2)
            store.slow.clear()
            q.submit(new_record(q.uploads))
        for w in writers:
            w.join(5)
        assert q.queue_length() == 3
    finally:
        gate.set()


def test_wait_times_out_and_events_follow_a_job(make_queue):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe)
    try:
        rec = q.submit(new_record(q.uploads))
        assert pipe.started.wait(5)
        t0 = time.monotonic()
        assert q.wait(rec.id, 0.2).status == "processing" and time.monotonic() - t0 >= 0.2
        stream = q.events(rec.id, heartbeat_s=0.1)
        first = next(stream)
        assert first.status == "processing"
        assert next(stream) is None                          # nothing changed: a keep-alive
        gate.set()
        rest = [e for e in stream if e is not None]
    finally:
        gate.set()
    assert rest[-1].status == "succeeded" and rest[-1].result
    assert all(e.status in ("processing", "succeeded") for e in rest)


class Exploding:
    def __init__(self, exc):
        self.exc = exc
        self.calls = 0

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return None


@pytest.mark.parametrize("exc,code", [(MemoryError(), "out_of_memory"), (RuntimeError("boom /secret/path"), "internal_error")])
def test_worker_survives_failing_jobs(make_queue, exc, code):
    q = make_queue(Exploding(exc))
    a = q.submit(new_record(q.uploads))
    a = q.wait(a.id, 10)
    assert a.status == "failed" and a.error["code"] == code and "/secret" not in a.error["message"]
    assert not (q.uploads.root / a.id).exists()
    b = q.submit(new_record(q.uploads))              # the worker is still alive for the next job
    b = q.wait(b.id, 10)
    assert b.status == "failed" and b.error["code"] == "internal_error"      # (a bad result)
    assert q.health()["workers_alive"] == 1


class FlakyStore(MemoryStore):
    """A store that fails as a full disk or a locked database does: `save` raises for the statuses
    in `fail_saves`, `prune` raises while `fail_prune` is set."""

    def __init__(self):
        super().__init__()
        self.fail_saves: set[str] = set()
        self.fail_prune = False

    def save(self, rec):
        if rec.status in self.fail_saves:
            raise sqlite3.OperationalError("database is locked")
        super().save(rec)

    def prune(self, before):
        if self.fail_prune:
            raise OSError(28, "No space left on device")
        return super().prune(before)


def test_store_failure_at_start_fails_the_job_not_the_worker(make_queue):
    store, pipe = FlakyStore(), FakePipeline()
    store.fail_saves = {"processing"}
    q = make_queue(pipe, store=store)
    a = q.wait(q.submit(new_record(q.uploads)).id, 5)
    assert a.status == "failed" and a.error["code"] == "internal_error" and "server log" in a.error["message"]
    assert store.load(a.id).status == "failed" and not (q.uploads.root / a.id).exists() and not pipe.calls
    store.fail_saves.clear()
    b = q.wait(q.submit(new_record(q.uploads)).id, 5)       # the next job still runs
    assert b.status == "succeeded" and q.health() == {"running_job": None, "workers_alive": 1, "queue_length": 0}


def test_store_failure_at_the_end_still_ends_the_job(make_queue):
    store, gate = FlakyStore(), threading.Event()
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe, store=store)
    try:
        a = q.submit(new_record(q.uploads))
        assert pipe.started.wait(5)
        store.fail_saves = {"succeeded", "failed", "canceled"}        # the disk fills while it renders
        queued = q.submit(new_record(q.uploads))
        assert q.cancel(queued.id).status == "canceled"              # a cancel answers all the same
    finally:
        gate.set()
    t0 = time.monotonic()
    a = q.wait(a.id, 5)
    assert a.status == "succeeded" and a.result and time.monotonic() - t0 < 4     # waiters hear of the end
    assert not (q.uploads.root / a.id).exists() and store.load(a.id).status == "processing"
    store.fail_saves.clear()
    b = q.wait(q.submit(new_record(q.uploads)).id, 5)
    assert b.status == "succeeded" and q.health()["workers_alive"] == 1
    assert store.load(a.id).status == "succeeded" and store.load(queued.id).status == "canceled"   # written later


def test_a_failing_expiry_sweep_does_not_stop_the_worker(make_queue):
    store = FlakyStore()
    store.fail_prune = True
    q = make_queue(FakePipeline(), store=store)
    for _ in range(2):
        assert q.wait(q.submit(new_record(q.uploads)).id, 5).status == "succeeded"
    assert q.health()["workers_alive"] == 1


def test_a_submit_the_store_refuses_leaves_no_job(make_queue):
    store = FlakyStore()
    store.fail_saves = {"queued"}
    q = make_queue(FakePipeline(), store=store)
    rec = new_record(q.uploads)
    with pytest.raises(sqlite3.OperationalError):
        q.submit(rec, object())
    assert q.get(rec.id) is None and q.queue_length() == 0 and not q.held_inputs()


def test_decoded_inputs_are_kept_for_the_next_job_only(make_queue):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    q = make_queue(pipe, queue_size=2)
    try:
        recs = [new_record(q.uploads, seed=s) for s in (1, 2, 3)]
        checked = [check_inputs(r.inputs["image"], r.inputs["audio"], GenerateOptions(), LIMITS) for r in recs]
        q.submit(recs[0], checked[0])
        assert pipe.started.wait(5)
        q.submit(recs[1], checked[1])                     # runs next: its arrays are kept
        q.submit(recs[2], checked[2])                     # further back: it reads its stored files
        assert q.held_inputs() == {recs[1].id}
    finally:
        gate.set()
    assert all(q.wait(r.id, 10).status == "succeeded" for r in recs)
    assert pipe.calls[0][0] is checked[0].rgb and pipe.calls[1][0] is checked[1].rgb
    assert pipe.calls[2][:2] == (recs[2].inputs["image"], recs[2].inputs["audio"])


def test_old_outputs_are_swept(make_queue, tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    q = make_queue(FakePipeline(), store=store, output_ttl_s=60)
    old_job, new_job = JobRecord.new("generate", {}), JobRecord.new("generate", {})
    for rec in (old_job, new_job):
        rec.status = "succeeded"
        store.save(rec, updated=time.time() - 120 if rec is old_job else None)
    old, new = tmp_path / "out" / ("a" * 32 + ".mp4"), tmp_path / "out" / ("b" * 32 + ".mp4")
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    q.expiry.sweep()
    assert not old.exists() and new.exists()
    assert q.get(old_job.id) is None and q.get(new_job.id) == new_job     # records expire with videos
    q.expiry.maybe_sweep()                                                # too soon: nothing to do
    assert new.exists()


def test_token_bucket():
    from sonic_server.access import TokenBucket
    b = TokenBucket(rate=10, burst=2)
    assert b.take("a", now=0.0) == 0 and b.take("a", now=0.0) == 0
    wait = b.take("a", now=0.0)
    assert 0.09 < wait <= 0.1
    assert b.take("b", now=0.0) == 0                     # clients have their own buckets
    assert b.take("a", now=0.1) == 0                     # refilled at 10 per second


def test_uploads_are_written_under_fixed_names(tmp_path):
    uploads = Uploads(tmp_path / "up")
    paths = uploads.save("j1", {"image": b"i", "audio": b"a"})
    assert paths == {"image": str(tmp_path / "up" / "j1" / "image"), "audio": str(tmp_path / "up" / "j1" / "audio")}
    uploads.remove("j1")
    assert not (tmp_path / "up" / "j1").exists()
    uploads.remove("j1")                                 # twice is harmless


def test_a_database_from_an_older_release_opens(tmp_path):
    import sqlite3
    path = tmp_path / "jobs.sqlite3"
    with sqlite3.connect(path) as db:                    # the table as releases before job records wrote it
        db.executescript("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, stage TEXT NOT NULL, "
                         "cache_key TEXT, result TEXT, error TEXT, created REAL NOT NULL, updated REAL NOT NULL);")
        db.execute("INSERT INTO jobs VALUES ('a', 'succeeded', 'succeeded', 'k', ?, NULL, 1.0, ?)",
                   (json.dumps({"file": "a.mp4", "seed": 4}), time.time()))
    store = JobStore(path)
    rec = store.load("a")
    assert rec.status == "succeeded" and rec.progress == 1.0 and rec.result["seed"] == 4 and rec.kind == "generate"
    assert store.cached("k") == "a"
    rec.stage = "done"
    store.save(rec)
    assert store.load("a").stage == "done"


def test_leftover_upload_folders_are_swept_after_a_grace(tmp_path):
    """Distributed mode: an API process killed mid-request, or a job store that lost its data,
    left upload folders nothing removed. Old ones whose job ended or is unknown go; a waiting
    job's stay, and so do young ones (a request between its files and its record)."""
    from sonic_server.recovery import ORPHAN_GRACE_S, sweep_orphan_uploads

    store, uploads = MemoryStore(), Uploads(tmp_path / "up")
    waiting, ended, unknown, young = (new_record(uploads) for _ in range(4))
    ended.status = "succeeded"
    store.save(waiting)
    store.save(ended)
    old = time.time() - ORPHAN_GRACE_S - 60
    for rec in (waiting, ended, unknown):
        os.utime(uploads.root / rec.id, (old, old))
    assert sorted(sweep_orphan_uploads(store, uploads)) == sorted([ended.id, unknown.id])
    assert sorted(p.name for p in uploads.root.iterdir()) == sorted([waiting.id, young.id])


def test_expired_idempotency_answers_are_removed_without_another_keyed_request(tmp_path):
    """An answer (a fusion's holds the fused image) is kept server.idempotency_ttl_s: expired
    ones went only when the next request with a key came, which may be never. The purge the
    store's own thread runs removes them, and empties the write-ahead log that held them."""
    from sonic_server.idempotency import SqliteKeys
    keys = SqliteKeys(tmp_path / "jobs.sqlite3")
    assert keys.reserve("k1", "f", ttl_s=60) is None
    keys.complete("k1", {"status": 200, "body": "a fused image"}, ttl_s=60)
    assert keys.purge(now=time.time()) == 0 and keys.reserve("k1", "f", 60)["answer"]["body"] == "a fused image"
    assert keys.purge(now=time.time() + 61) == 1
    wal = tmp_path / "jobs.sqlite3-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    assert b"a fused image" not in (tmp_path / "jobs.sqlite3").read_bytes()   # zeroed, not only unlinked
    assert keys.reserve("k1", "f", 60) is None                              # a new request, not a replay


def test_a_deleted_job_leaves_no_copy_in_the_databases_files(tmp_path):
    """The write-ahead log was never checkpointed while the service ran: 73 copies of a deleted
    job's record (its webhook URL and password in it) stayed in it, after deletes, expiry and
    shutdowns."""
    store = JobStore(tmp_path / "jobs.sqlite3")
    rec = JobRecord.new("generate", {})
    rec.webhook = {"url": "http://user:hookpass-7f2@127.0.0.1:9/h", "events": ["completed"], "root": "http://h/"}
    for _ in range(3):
        store.save(rec)
    assert store.delete(rec.id)
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("jobs.sqlite3*"))
    assert b"hookpass-7f2" not in on_disk and rec.id.encode() not in on_disk


def test_a_job_failed_by_its_callers_input_ends_at_info_and_one_failed_by_the_service_warns(caplog):
    """A photo without a face is a caller's mistake (422): logged at WARNING, a service that gets
    many bad uploads flooded its warnings. A job timeout or a lost worker still warns."""
    import logging

    from sonic_server import lifecycle
    from sonic_server.jobs import FAILED, JobRecord
    levels = {}
    for code in ("no_face_detected", "job_timeout", "worker_lost"):
        rec = lifecycle.queue(JobRecord.new("generate", {}))
        lifecycle.end(rec, FAILED, error={"code": code, "message": "..."})
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sonic.jobs"):
            lifecycle.log_end(rec)
        levels[code] = caplog.records[-1].levelname
    assert levels == {"no_face_detected": "INFO", "job_timeout": "WARNING", "worker_lost": "WARNING"}
