"""Jobs belong to who made them: with keys or accounts, another caller's job answers status,
events and cancel exactly as a job that does not exist; its video URL stays shareable."""
from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from server_helpers import FAST, FakePipeline, assert_clean_error, at_once, post, settings, wait_done

KEY_A, KEY_B = "key-of-ann", "key-of-bob"


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _not_found_alike(client, key: str, job_id: str) -> None:
    """Each job route answers `key` for `job_id` as it answers for an id nobody made."""
    nobody = uuid.uuid4().hex
    for method, path in (("get", "/api/sonic/jobs/{}"), ("get", "/api/sonic/jobs/{}/events"),
                         ("post", "/api/sonic/jobs/{}/cancel")):
        theirs = getattr(client, method)(path.format(job_id), headers=auth(key))
        unknown = getattr(client, method)(path.format(nobody), headers=auth(key))
        assert_clean_error(theirs, 404, "job_not_found")
        assert theirs.status_code == unknown.status_code
        strip = lambda r, i: {**r.get_json()["error"], "message": r.get_json()["error"]["message"].replace(i, "ID")}
        assert strip(theirs, job_id) == strip(unknown, nobody)


def test_with_keys_each_key_sees_only_its_own_jobs(make_client):
    gate = threading.Event()
    client, _ = make_client(FakePipeline(gate=gate), api_keys=[KEY_A, KEY_B])
    r = post(client, {**FAST, "async": True}, headers=auth(KEY_A))
    assert r.status_code == 202
    job = r.get_json()["job_id"]
    _not_found_alike(client, KEY_B, job)
    assert client.get(f"/api/sonic/jobs/{job}", headers=auth(KEY_A)).get_json()["status"] in ("queued", "processing")
    gate.set()
    done = wait_done_with(client, job, KEY_A)
    assert done["status"] == "succeeded"              # bob's cancel did not reach it
    # the video itself is shareable by its URL, whoever asks
    video = done["video_url"].split("/output/")[1]
    assert client.get(f"/output/{video}").status_code == 200
    # the same inputs from bob render for bob: a cache hit is never another caller's job
    r = post(client, FAST, headers=auth(KEY_B))
    assert r.status_code == 200 and not r.get_json().get("cached") and r.get_json()["job_id"] != job
    r = post(client, FAST, headers=auth(KEY_A))
    assert r.get_json().get("cached") is True and r.get_json()["job_id"] == job


def wait_done_with(client, job_id: str, key: str, timeout: float = 30) -> dict:
    import time
    end = time.time() + timeout
    while time.time() < end:
        body = client.get(f"/api/sonic/jobs/{job_id}", headers=auth(key)).get_json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.02)
    raise AssertionError("job did not finish")


def test_without_keys_jobs_stay_open_to_anyone_with_the_id(make_client):
    client, _ = make_client()
    job = post(client, {**FAST, "async": True}).get_json()["job_id"]
    assert wait_done(client, job)["status"] == "succeeded"


@pytest.fixture
def accounts(tmp_path):
    from sonic_server import create_app
    cfg = settings(tmp_path, database_url=f"sqlite:///{tmp_path / 'credits.sqlite3'}")
    cfg["credits"] = {"enabled": True}
    app = create_app(cfg, pipeline=FakePipeline())
    svc = app.extensions["sonic"]
    yield app.test_client(), svc.ledger
    svc.settler.stop()
    svc.queue.close()
    svc.ledger.close()


def test_with_accounts_jobs_belong_to_the_account_and_admins_see_all(accounts):
    client, ledger = accounts
    _, ann = ledger.create_account("ann", credits=100)
    ann_second_key = ledger.create_key("ann")
    _, bob = ledger.create_account("bob", credits=100)
    _, admin = ledger.create_account("root", credits=0, role="admin")
    job = post(client, {**FAST, "async": True}, headers=auth(ann)).get_json()["job_id"]
    _not_found_alike(client, bob, job)
    assert wait_done_with(client, job, ann)["status"] == "succeeded"
    assert wait_done_with(client, job, ann_second_key)["status"] == "succeeded"   # the account's, any key
    assert client.get(f"/api/sonic/jobs/{job}", headers=auth(admin)).get_json()["status"] == "succeeded"


def test_one_caller_cannot_fill_the_queue_past_its_share(make_client):
    """server.max_jobs_per_caller: a key with that many jobs waiting or running is refused 429
    (before its upload is kept), while another key's jobs are still taken; once one of its jobs
    ends, it may queue again."""
    gate = threading.Event()
    client, cfg = make_client(FakePipeline(gate=gate), api_keys=[KEY_A, KEY_B], max_jobs_per_caller=2, queue_size=8)
    ann = [post(client, {**FAST, "seed": i, "async": True}, headers=auth(KEY_A)) for i in range(2)]
    assert [r.status_code for r in ann] == [202, 202]
    refused = post(client, {**FAST, "seed": 7, "async": True}, headers=auth(KEY_A))
    assert_clean_error(refused, 429, "rate_limited")
    assert refused.headers["Retry-After"] and "max_jobs_per_caller" in refused.get_json()["error"]["message"]
    kept = {p.parent.name for p in Path(cfg["server"]["upload_dir"]).rglob("*") if p.is_file()}
    assert kept == {r.get_json()["job_id"] for r in ann}  # nothing of the refused request stays
    assert post(client, {**FAST, "async": True}, headers=auth(KEY_B)).status_code == 202  # bob's share is his
    # a cancel ends one of ann's jobs: its place in her share is free again
    waiting = ann[1].get_json()["job_id"]
    assert client.post(f"/api/sonic/jobs/{waiting}/cancel", headers=auth(KEY_A)).get_json()["status"] == "canceled"
    again = post(client, {**FAST, "seed": 8, "async": True}, headers=auth(KEY_A))
    assert again.status_code == 202, again.get_json()
    gate.set()
    assert wait_done_with(client, again.get_json()["job_id"], KEY_A)["status"] == "succeeded"
    assert wait_done_with(client, ann[0].get_json()["job_id"], KEY_A)["status"] == "succeeded"
    # every one of ann's jobs has ended: her whole share is free
    gate.clear()
    assert [post(client, {**FAST, "seed": s, "async": True}, headers=auth(KEY_A)).status_code for s in (9, 10)] == [202, 202]
    # at her share again, what her result cache holds is still answered: it starts no job
    cached = post(client, {**FAST, "seed": 8}, headers=auth(KEY_A))
    assert cached.status_code == 200 and cached.get_json()["cached"] is True
    assert_clean_error(post(client, {**FAST, "seed": 11}, headers=auth(KEY_A)), 429, "rate_limited")
    gate.set()


def test_a_callers_share_holds_when_its_requests_race(make_queue):
    """The queue's own count and the place taken at one moment: 12 submits of one owner at once
    (a thread each), a share of 3, jobs that run until the gate opens: exactly 3 are queued."""
    from sonic_server.jobs import JobRecord
    from sonic_server.queue import CallerBusy
    gate = threading.Event()

    def held(rec, pipeline, output_dir, inputs, progress) -> dict:
        gate.wait(30)
        return {}
    q = make_queue(None, queue_size=50, max_jobs_per_caller=3, tasks={"generate": held})
    outcomes: list[str] = []

    def submit(i):
        try:
            q.submit(JobRecord.new("generate", {"seed": i}, owner="ann"))
            outcomes.append("queued")
        except CallerBusy:
            outcomes.append("busy")
    at_once(submit, 12)
    try:
        assert outcomes.count("queued") == 3 and outcomes.count("busy") == 9
        assert q.active_of("ann") == 3 and q.active_of("bob") == 0
        q.submit(JobRecord.new("generate", {}, owner="bob"))
        q.submit(JobRecord.new("generate", {}))  # made without keys: nobody's share
    finally:
        gate.set()


def test_one_caller_cannot_take_every_upload_check(make_client, monkeypatch):
    """Uploads being checked (decoded) are bounded per process: one key's flood of long
    recordings refused every other key's uploads at once. A key holds half of the places at
    most; another key's upload is still taken."""
    import sonic_server.routes.generate as generate
    from sonic.media import AUDIO_DECODES
    release, inside = threading.Event(), threading.Semaphore(0)
    real = generate.check_inputs

    def slow_check(*args, **kwargs):
        inside.release()
        release.wait(10)
        return real(*args, **kwargs)
    monkeypatch.setattr(generate, "check_inputs", slow_check)
    client, _ = make_client(api_keys=[KEY_A, KEY_B], max_jobs_per_caller=0, queue_size=8)
    answers: list[int] = []

    def ann_posts(i):
        answers.append(post(client, {**FAST, "seed": i, "async": True}, headers=auth(KEY_A)).status_code)
    threads = [threading.Thread(target=ann_posts, args=(i,)) for i in range(AUDIO_DECODES)]
    for t in threads:
        t.start()
    for _ in threads:
        assert inside.acquire(timeout=10)  # each of ann's uploads is being checked
    refused = post(client, {**FAST, "seed": 99, "async": True}, headers=auth(KEY_A))
    assert_clean_error(refused, 503, "busy")
    assert "this caller has" in refused.get_json()["error"]["message"]
    bob = []
    t = threading.Thread(target=lambda: bob.append(post(client, {**FAST, "async": True}, headers=auth(KEY_B))))
    t.start()
    assert inside.acquire(timeout=10)  # bob's upload is checked beside ann's
    release.set()
    for thread in (*threads, t):
        thread.join(20)
    assert answers == [202] * AUDIO_DECODES and bob[0].status_code == 202
