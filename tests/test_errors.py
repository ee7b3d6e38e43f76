"""Errors: the library carries codes only; the server's one table turns codes into HTTP statuses.

A failed job's public body keeps the fields it always had, its `error.status` included, whether
the job failed in this process or was written to the job database by an older release.
"""
import inspect
import io
import json
import sqlite3
import time

import pytest

import sonic.errors
from conftest import PORTRAIT, SPEECH
from sonic import load_config
from sonic.errors import NoFaceDetected, SonicError

# (code, HTTP status) pairs the API has always answered with, per the design's error contract
EXPECTED = {"invalid_parameter": 400, "input_too_large": 413, "unsupported_media": 415, "no_face_detected": 422,
            "audio_too_long": 422, "empty_audio": 422, "pipeline_error": 500, "internal_error": 500,
            "job_not_found": 404, "not_found": 404, "unauthorized": 401, "method_not_allowed": 405,
            "canceled": 409, "rate_limited": 429, "busy": 503, "not_ready": 503, "interrupted": 500,
            "out_of_memory": 500}


def library_errors() -> list[type]:
    return [c for _, c in inspect.getmembers(sonic.errors, inspect.isclass) if issubclass(c, SonicError)]


def test_library_errors_carry_no_http_status():
    classes = library_errors()
    assert len(classes) >= 8
    for cls in classes:
        assert not hasattr(cls, "status"), cls
        assert not hasattr(cls("x"), "status"), cls
        assert "HTTP" not in (cls.__doc__ or ""), cls
    assert "HTTP" not in (sonic.errors.__doc__ or "")


def test_every_code_has_a_status():
    from sonic_server.errors import STATUS_BY_CODE, status_for
    for cls in library_errors():
        assert cls.code in STATUS_BY_CODE, cls.code
    for code, status in EXPECTED.items():
        assert status_for(code) == status, code
    assert status_for("a_code_nobody_defined") == 500


class NoFacePipeline:
    """Stands in for the model: every portrait is face-less."""

    def __call__(self, *a, **k):
        raise NoFaceDetected("no face found in the image", field="image")


def make_app(tmp_path, pipeline=None):
    from sonic_server import create_app
    cfg = load_config()
    cfg["output_dir"] = str(tmp_path / "outputs")
    cfg["server"].update(upload_dir=str(tmp_path / "uploads"), jobs_db=str(tmp_path / "jobs.sqlite3"),
                         rate_limit_per_s=1000, rate_limit_burst=1000, sync_wait_s=10)
    return create_app(cfg, pipeline=pipeline or NoFacePipeline())


def post(client, config):
    with open(PORTRAIT, "rb") as image, open(SPEECH, "rb") as audio:
        return client.post("/api/sonic/generate", content_type="multipart/form-data",
                           data={"config": json.dumps(config), "image": (image, "p.jpg"), "audio": (audio, "s.flac")})


def wait_failed(client, job_id: str) -> dict:
    for _ in range(200):
        body = client.get(f"/api/sonic/jobs/{job_id}").get_json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.05)
    pytest.fail("job did not end")


NO_FACE = {"code": "no_face_detected", "message": "no face found in the image", "field": "image", "status": 422}


def made(body: dict) -> dict:
    """A job document less its creation time (checked to be a time)."""
    assert isinstance(body.pop("created"), (int, float))
    return body


def failed_body(job_id: str, error: dict) -> dict:
    return {"success": False, "job_id": job_id, "status": "failed", "progress": 0.0, "stage": "failed",
            "error": error, "status_url": f"http://localhost/api/sonic/jobs/{job_id}"}


def test_failed_job_public_body(tmp_path):
    client = make_app(tmp_path).test_client()
    r = post(client, {"async": True})
    assert r.status_code == 202
    job_id = r.get_json()["job_id"]
    assert made(wait_failed(client, job_id)) == failed_body(job_id, NO_FACE)
    sync = post(client, {"seed": 2})                      # the same failure, answered synchronously
    assert sync.status_code == 422
    error = sync.get_json()["error"]
    assert error == {**{k: v for k, v in NO_FACE.items() if k != "status"}, "job_id": error["job_id"]}
    assert made(wait_failed(client, error["job_id"])) == failed_body(error["job_id"], NO_FACE)  # the job it names
    missing = client.get("/api/sonic/jobs/" + "0" * 32)
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "job_not_found"
    # the database keeps the code, not the status
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        stored = json.loads(db.execute("SELECT error FROM jobs WHERE id=?", (job_id,)).fetchone()[0])
    assert stored["code"] == "no_face_detected" and "status" not in stored


def test_upload_limit_message_names_the_configured_size(tmp_path):
    from sonic_server import create_app
    cfg = load_config()
    cfg["limits"]["max_upload_mb"] = 2
    cfg["output_dir"], cfg["server"]["data_dir"] = str(tmp_path / "outputs"), str(tmp_path / "data")
    cfg["server"]["upload_dir"] = str(tmp_path / "uploads")  # not the checkout's: a service there owns it
    client = create_app(cfg, pipeline=NoFacePipeline()).test_client()
    r = client.post("/api/sonic/generate", data={"image": (io.BytesIO(b"x" * (3 << 20)), "big.jpg")},
                    content_type="multipart/form-data")
    assert r.status_code == 413 and r.get_json()["error"]["message"].startswith("upload is larger than 2 MB: the request's files together")


def test_a_job_database_in_the_old_place_is_moved_to_the_data_folder(tmp_path):
    """Releases before 0.5 kept job records in <output_dir>/jobs.sqlite3: their jobs still answer."""
    from sonic_server import create_app
    cfg = load_config()
    cfg["output_dir"], cfg["server"]["data_dir"] = str(tmp_path / "outputs"), str(tmp_path / "data")
    cfg["server"].update(upload_dir=str(tmp_path / "uploads"), jobs_db=None)
    (tmp_path / "outputs").mkdir()
    with sqlite3.connect(tmp_path / "outputs" / "jobs.sqlite3") as db:    # an old release's table
        db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, status TEXT NOT NULL, stage TEXT NOT NULL, "
                   "cache_key TEXT, result TEXT, error TEXT, created REAL, updated REAL)")
        db.execute("INSERT INTO jobs VALUES (?, 'failed', 'failed', '', NULL, ?, ?, ?)",
                   ("e" * 32, json.dumps({"code": "no_face_detected", "message": "no face found in the image",
                                          "field": "image"}), time.time(), time.time()))
    client = create_app(cfg, pipeline=NoFacePipeline()).test_client()
    assert client.get("/api/sonic/jobs/" + "e" * 32).get_json()["error"]["code"] == "no_face_detected"
    assert (tmp_path / "data" / "jobs.sqlite3").is_file() and not (tmp_path / "outputs" / "jobs.sqlite3").exists()


def test_records_from_an_older_release_still_load(tmp_path):
    make_app(tmp_path)                                    # creates the database with today's schema
    old = {"a" * 32: {"code": "no_face_detected", "status": 422, "message": "no face found in the image",
                      "field": "image"},
           "b" * 32: {"code": "interrupted", "status": 500, "message": "the service restarted"},
           "c" * 32: {"code": "empty_audio", "status": 599, "message": "silent", "field": "audio"}}  # stale status
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as db:
        for job_id, err in old.items():
            db.execute("INSERT INTO jobs (id, status, stage, cache_key, result, error, created, updated) "
                       "VALUES (?, 'failed', 'failed', '', NULL, ?, ?, ?)", (job_id, json.dumps(err), time.time(),
                                                                            time.time()))
        db.execute("INSERT INTO jobs (id, status, stage, cache_key, result, error, created, updated) "
                   "VALUES (?, 'processing', 'rendering', '', NULL, NULL, ?, ?)", ("d" * 32, time.time(), time.time()))
    client = make_app(tmp_path).test_client()             # a restart: reads the old records back
    assert made(client.get("/api/sonic/jobs/" + "a" * 32).get_json()) == failed_body("a" * 32, NO_FACE)
    assert client.get("/api/sonic/jobs/" + "b" * 32).get_json()["error"] == old["b" * 32]
    assert client.get("/api/sonic/jobs/" + "c" * 32).get_json()["error"] == {**old["c" * 32], "status": 422}
    interrupted = client.get("/api/sonic/jobs/" + "d" * 32).get_json()        # recovered at start-up
    assert interrupted["status"] == "failed"
    assert interrupted["error"]["code"] == "interrupted" and interrupted["error"]["status"] == 500


def test_form_limits_are_named_not_taken_for_the_upload_size(make_client):
    client, _ = make_client()
    boundary = "XyZ"
    parts = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n" for i in range(1001))
    r = client.post("/api/sonic/generate", data=parts + f"--{boundary}--\r\n",
                    content_type=f"multipart/form-data; boundary={boundary}")
    assert r.status_code == 413
    message = r.get_json()["error"]["message"]
    assert "more than 1000 parts" in message and "MB" not in message
    header = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
              f"X-Padding: {'p' * 600_000}\r\n\r\ndata\r\n--{boundary}--\r\n")
    r = client.post("/api/sonic/generate", data=header, content_type=f"multipart/form-data; boundary={boundary}")
    assert r.status_code == 413 and "headers over 500 kB" in r.get_json()["error"]["message"]


def test_decoding_beyond_the_memory_budget_waits_then_is_busy_with_retry_after(tmp_path):
    """limits.decode_memory_mb bounds what a process's decodes hold at once: a request that
    cannot get its share within limits.decode_wait_s is a 503 busy with Retry-After, its
    uploads gone; once the memory is free the same request goes through."""
    from server_helpers import FakePipeline, post, settings, uploads_empty
    from sonic.media import decode_budget
    from sonic_server import create_app
    cfg = settings(tmp_path)
    cfg["limits"].update(decode_memory_mb=1.5, decode_wait_s=0.3)
    app = create_app(cfg, pipeline=FakePipeline())
    client = app.test_client()
    budget = decode_budget(1.5, 0.3)                 # the process's budget for these settings
    with budget.reserve(budget.total):               # another request is decoding
        t0 = time.monotonic()
        r = post(client)
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "busy"
        assert r.headers["Retry-After"] and 0.3 <= time.monotonic() - t0 < 5
        assert uploads_empty(cfg)
    assert post(client).status_code == 200
    app.extensions["sonic"].queue.close()


def test_every_error_code_is_documented_with_its_status():
    """docs/errors.md is where a page's author looks a code up: every code the server answers is
    there, with the status it answers with."""
    import re

    from conftest import ROOT
    from sonic_server.errors import STATUS_BY_CODE

    rows = dict(re.findall(r"^\| `([a-z_]+)` \| (\d{3}|4xx) \|", (ROOT / "docs" / "errors.md").read_text(), re.M))
    assert {code: str(status) for code, status in STATUS_BY_CODE.items()} == {
        code: status for code, status in rows.items() if code != "http_error"}
    assert rows["http_error"] == "4xx"
