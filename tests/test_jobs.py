"""Job manager pieces that need no model: output expiry and queue bookkeeping."""
import os
import time

import pytest

from sonic_server.jobs import Job, JobManager, QueueFull
from sonic import GenerateOptions


class NeverCalled:
    def __call__(self, *a, **k):
        raise AssertionError("the pipeline should not run in this test")


def make_job(tmp_path, manager):
    work = tmp_path / manager.new_id()
    work.mkdir()
    return Job(id=work.name, options=GenerateOptions(), image=work / "i", audio=work / "a", workdir=work, cache_key="k")


def test_old_outputs_are_swept(tmp_path):
    from sonic_server.store import JobStore
    store = JobStore(tmp_path / "jobs.sqlite3")
    m = JobManager(NeverCalled(), tmp_path / "out", queue_size=1, output_ttl_s=60, store=store)
    old_job, new_job = make_job(tmp_path, m), make_job(tmp_path, m)
    for j, age in ((old_job, 120), (new_job, 0)):
        j.status, j.created = "succeeded", time.time() - age
        m.jobs[j.id] = j
        store.save(j)
    with store._lock:
        store._db.execute("UPDATE jobs SET updated=? WHERE id=?", (time.time() - 120, old_job.id))
    old, new = tmp_path / "out" / ("a" * 32 + ".mp4"), tmp_path / "out" / ("b" * 32 + ".mp4")
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 120, time.time() - 120))
    m._last_sweep = 0
    m._sweep()
    assert not old.exists() and new.exists()
    assert m.get(old_job.id) is None and m.get(new_job.id) is new_job     # records expire with videos
    assert store.load(old_job.id) is None and store.load(new_job.id)["status"] == "succeeded"


def test_queue_bound_and_cancel_frees_place(tmp_path):
    m = JobManager(NeverCalled(), tmp_path / "out", queue_size=1, output_ttl_s=60)
    with m._wake:                       # hold the worker back so the jobs stay queued
        a = make_job(tmp_path, m)
        m.submit(a)
        with pytest.raises(QueueFull):
            m.submit(make_job(tmp_path, m))
        m.cancel(a)
        assert a.status == "canceled" and not a.workdir.exists() and m.queue_length() == 0
        b = make_job(tmp_path, m)
        m.submit(b)
        m.cancel(b)
    assert b.status == "canceled"


def test_token_bucket():
    from sonic_server.access import TokenBucket
    b = TokenBucket(rate=10, burst=2)
    assert b.take("a", now=0.0) == 0 and b.take("a", now=0.0) == 0
    wait = b.take("a", now=0.0)
    assert 0.09 < wait <= 0.1
    assert b.take("b", now=0.0) == 0                     # clients have their own buckets
    assert b.take("a", now=0.1) == 0                     # refilled at 10 per second


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
def test_worker_survives_failing_jobs(tmp_path, exc, code):
    m = JobManager(Exploding(exc), tmp_path / "out", queue_size=2, output_ttl_s=60)
    a = make_job(tmp_path, m)
    m.submit(a)
    assert a.done.wait(10)
    assert a.status == "failed" and a.error["code"] == code and "/secret" not in a.error["message"]
    assert not a.workdir.exists()
    b = make_job(tmp_path, m)                       # the worker is still alive for the next job
    m.submit(b)
    assert b.done.wait(10) and b.status == "failed" and b.error["code"] == "internal_error"  # (a bad result)
