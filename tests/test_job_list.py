"""Listing and deleting jobs (in-process queue, SQLite store): GET /api/sonic/jobs lists the
caller's jobs newest first, a page at a time, filtered by status and creation time; DELETE
/api/sonic/jobs/<id> cancels a running job and removes its video, uploads and cached result."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from server_helpers import FAST, FakePipeline, assert_clean_error, post

KEY_A, KEY_B = "key-of-ann", "key-of-bob"


def auth(key: str | None) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def listing(client, key, **params):
    r = client.get("/api/sonic/jobs", query_string=params, headers=auth(key))
    assert r.status_code == 200, r.get_data()[:300]
    return r.get_json()


def all_pages(client, key, limit, **params):
    ids, cursor, pages = [], None, 0
    while True:
        body = listing(client, key, limit=limit, **({"cursor": cursor} if cursor else {}), **params)
        ids += [j["job_id"] for j in body["jobs"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            return ids, pages


def test_each_key_lists_its_own_jobs_newest_first_a_page_at_a_time(make_client):
    client, _ = make_client(api_keys=[KEY_A, KEY_B])
    made = []
    for seed in range(5):
        r = post(client, {**FAST, "seed": seed}, headers=auth(KEY_A))
        assert r.status_code == 200
        made.append(r.get_json()["job_id"])
        time.sleep(0.01)
    theirs = [post(client, {**FAST, "seed": 9 + s}, headers=auth(KEY_B)).get_json()["job_id"] for s in range(2)]
    body = listing(client, KEY_A)
    assert [j["job_id"] for j in body["jobs"]] == made[::-1] and body["next_cursor"] is None
    first = body["jobs"][0]
    assert first["status"] == "succeeded" and first["video_url"] and first["status_url"].endswith(made[-1])
    ids, pages = all_pages(client, KEY_A, limit=2)
    assert ids == made[::-1] and pages == 3  # 2 + 2 + 1, no job twice, none left out
    assert [j["job_id"] for j in listing(client, KEY_B)["jobs"]] == theirs[::-1]  # bob sees only his
    assert listing(client, KEY_A, status="canceled,failed")["jobs"] == []
    assert len(listing(client, KEY_A, status="succeeded")["jobs"]) == 5
    # creation time: epoch seconds or ISO 8601
    created = [client.get(f"/api/sonic/jobs/{j}", headers=auth(KEY_A)).get_json() for j in made]
    store_times = _created_times(client, made)
    cut = (store_times[1] + store_times[2]) / 2  # between the second and the third job
    after = [j["job_id"] for j in listing(client, KEY_A, created_after=cut)["jobs"]]
    assert after == made[2:][::-1]
    iso = datetime.fromtimestamp(cut, timezone.utc).isoformat()  # e.g. 2026-12-04T20:31:02.123456+00:00
    assert [j["job_id"] for j in listing(client, KEY_A, created_before=iso)["jobs"]] == made[:2][::-1]
    assert all(c["status"] == "succeeded" for c in created)
    # bad queries are named
    import base64
    hostile = [base64.urlsafe_b64encode(text.encode()).decode() for text in
               ("[1" + "0" * 400 + ', "' + made[0] + '"]', '[NaN, "' + made[0] + '"]', "[" * 3000)]
    for params, field in (({"limit": 0}, "limit"), ({"limit": "many"}, "limit"), ({"status": "done"}, "status"),
                          ({"cursor": "not-a-cursor"}, "cursor"), ({"created_after": "yesterday"}, "created_after"),
                          *(({"cursor": c}, "cursor") for c in hostile), ({"created_before": "nan"}, "created_before"),
                          ({"stauts": "failed"}, "stauts"), ({"status": ["failed", "succeeded"]}, "status")):
        r = client.get("/api/sonic/jobs", query_string=params, headers=auth(KEY_A))
        assert_clean_error(r, 400, "invalid_parameter")
        assert r.get_json()["error"]["field"] == field
    r = client.get("/api/sonic/jobs", query_string={"stauts": "failed"}, headers=auth(KEY_A))
    assert r.get_json()["error"]["message"] == "unknown query parameter 'stauts'; did you mean 'status'?"


def _created_times(client, job_ids):
    queue = client.application.extensions["sonic"].queue
    return [queue.get(j).created for j in job_ids]


def test_a_deleted_job_is_gone_with_its_video_its_uploads_and_its_cache_entry(make_client):
    client, cfg = make_client(api_keys=[KEY_A, KEY_B])
    r = post(client, {**FAST, "seed": 3}, headers=auth(KEY_A))
    job = r.get_json()["job_id"]
    video = "/output/" + r.get_json()["video_url"].split("/output/")[1]
    assert client.get(video).status_code == 200
    assert_clean_error(client.delete(f"/api/sonic/jobs/{job}", headers=auth(KEY_B)), 404, "job_not_found")
    assert client.get(video).status_code == 200  # bob could not touch it
    r = client.delete(f"/api/sonic/jobs/{job}", headers=auth(KEY_A))
    assert r.status_code == 204 and r.get_data() == b"" and "Content-Type" not in r.headers  # no body, no type
    assert_clean_error(client.get(f"/api/sonic/jobs/{job}", headers=auth(KEY_A)), 404, "job_not_found")
    assert client.get(video).status_code == 404
    assert job not in [j["job_id"] for j in listing(client, KEY_A)["jobs"]]
    again = post(client, {**FAST, "seed": 3}, headers=auth(KEY_A)).get_json()
    assert not again.get("cached") and again["job_id"] != job  # rendered again, not served from the cache
    assert_clean_error(client.delete(f"/api/sonic/jobs/{job}", headers=auth(KEY_A)), 404, "job_not_found")
    from pathlib import Path

    assert not (Path(cfg["server"]["upload_dir"]) / job).exists()
    assert not list(Path(cfg["output_dir"]).glob(f"{job}*"))


def test_deleting_a_running_job_cancels_it_first(make_client):
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    client, cfg = make_client(pipeline)
    job = post(client, {**FAST, "async": True}).get_json()["job_id"]
    assert pipeline.started.wait(10)
    r = client.delete(f"/api/sonic/jobs/{job}")
    assert r.status_code == 204
    assert_clean_error(client.get(f"/api/sonic/jobs/{job}"), 404, "job_not_found")
    assert listing(client, None)["jobs"] == []


def test_an_idempotency_key_makes_one_job_whatever_the_retries(make_client):
    """A retry with the same key and request gets the first answer (same job, marked replayed);
    the same key with another request is 409; twins racing make one job; keys are per caller;
    a bad key is named."""
    client, _ = make_client(api_keys=[KEY_A, KEY_B])
    key = {"Idempotency-Key": "order-7f3a", **auth(KEY_A)}
    first = post(client, {**FAST, "seed": 21}, headers=key)
    again = post(client, {**FAST, "seed": 21}, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.get_json()["job_id"] == first.get_json()["job_id"] and again.headers["Idempotent-Replayed"] == "true"
    assert len(listing(client, KEY_A)["jobs"]) == 1  # one job, one render
    other = post(client, {**FAST, "seed": 22}, headers=key)
    assert_clean_error(other, 409, "conflict")
    # the IETF draft's quoted string is the same key (a comma may stand inside the quotes)
    quoted = post(client, {**FAST, "seed": 21}, headers={"Idempotency-Key": '"order-7f3a"', **auth(KEY_A)})
    assert quoted.get_json()["job_id"] == first.get_json()["job_id"] and quoted.headers["Idempotent-Replayed"] == "true"
    # the same key from another caller is another key
    theirs = post(client, {**FAST, "seed": 21}, headers={"Idempotency-Key": "order-7f3a", **auth(KEY_B)})
    assert theirs.status_code == 200 and theirs.get_json()["job_id"] != first.get_json()["job_id"]
    # two identical requests at once: one job, both answers name it
    answers, start = [], threading.Barrier(2)

    def send():
        start.wait()
        answers.append(post(client, {**FAST, "seed": 23, "async": True},
                            headers={"Idempotency-Key": "twin", **auth(KEY_A)}).get_json()["job_id"])

    twins = [threading.Thread(target=send) for _ in range(2)]
    for t in twins:
        t.start()
    for t in twins:
        t.join()
    assert len(answers) == 2 and answers[0] == answers[1]
    assert len(listing(client, KEY_A)["jobs"]) == 2
    for bad in ("x" * 300, "a,b", ["a", "b"]):  # (two headers reach the app joined by a comma, or as two)
        r = post(client, FAST, headers=[("Idempotency-Key", k) for k in ([bad] if isinstance(bad, str) else bad)]
                 + list(auth(KEY_A).items()))
        assert_clean_error(r, 400, "invalid_parameter")
        assert r.get_json()["error"]["field"] == "Idempotency-Key"
    assert post(client, {**FAST, "seed": 24}, headers={"Idempotency-Key": '"a,b"', **auth(KEY_A)}).status_code == 200


def test_a_request_that_fails_after_its_job_was_made_is_not_made_twice(make_client):
    """A sync request whose job fails (a 500): the retry with its key names that job (202), no second one."""
    from sonic import PipelineError
    client, _ = make_client(FakePipeline(error=PipelineError("the render broke")))
    key = {"Idempotency-Key": "after-the-job"}
    first = post(client, {**FAST, "seed": 61}, headers=key)
    assert first.status_code == 500
    again = post(client, {**FAST, "seed": 61}, headers=key)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    jobs = listing(client, None)["jobs"]
    assert [j["job_id"] for j in jobs] == [again.get_json()["job_id"]] and jobs[0]["status"] == "failed"


def test_a_json_request_is_the_same_request_whatever_its_key_order_and_spacing():
    """A retry serialized otherwise (keys reordered, indented) was 409 "used with a different request"."""
    import json

    from flask import Flask

    from sonic_server.idempotency import fingerprint

    app = Flask(__name__)
    body = {"image_url": "https://example.org/p.jpg", "audio_url": "https://example.org/s.flac",
            "config": {"seed": 3, "min_resolution": 256}}

    def of(data: str) -> str:
        with app.test_request_context("/api/sonic/generate", method="POST", data=data, content_type="application/json"):
            return fingerprint("generate")

    same = of(json.dumps(body))
    assert of(json.dumps(dict(reversed(body.items())), indent=2)) == same
    assert of(json.dumps({**body, "config": {"seed": 4, "min_resolution": 256}})) != same
    assert of("{not json") != of("{not  json")  # not JSON: its bytes
    # read as the view reads it: a key given twice (the view refuses it) is not the request whose last value it has
    twice = json.dumps(body).replace('"seed": 3', '"seed": 1, "seed": 3')
    assert of(twice) != same
