"""Distributed mode with `storage: s3`: uploads and videos in an S3-compatible bucket (moto's S3
server, a real HTTP endpoint, on a free port), a real redis-server and a real `sonic worker`.
The API process and the worker have separate folders, so only the bucket and Redis connect them."""
import copy
import subprocess
import sys
import time

import pytest
import requests
import yaml

from server_helpers import assert_clean_error
from test_http_live import free_port
from test_redis import Cluster, post, redis_url, wait_status  # noqa: F401 - redis_url is a fixture

BUCKET = "videos"


@pytest.fixture(scope="module")
def s3_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("moto's S3 server did not start")
    yield url
    proc.terminate()
    proc.wait(10)


def bucket_client(url):
    import boto3
    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                        aws_secret_access_key="test")


def keys(s3, prefix=""):
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []))


def s3_cluster(tmp, redis_url, s3_url, **s3):
    """API settings (folders under tmp/api) and the workers' (tmp/worker): nothing shared on disk."""
    c = Cluster(tmp, redis_url)
    c.cfg["storage"] = "s3"
    c.cfg["s3"] = {"endpoint_url": s3_url, "bucket": BUCKET, "access_key_id": "test", "secret_access_key": "test",
                   "prefix": "t/", **s3}
    c.cfg["output_dir"] = str(tmp / "api" / "outputs")
    c.cfg["server"]["upload_dir"] = str(tmp / "api" / "uploads")
    worker = copy.deepcopy(c.cfg)
    worker["output_dir"] = str(tmp / "worker" / "outputs")
    worker["server"]["upload_dir"] = str(tmp / "worker" / "uploads")
    c.path.write_text(yaml.safe_dump(worker))
    return c


@pytest.fixture
def bucket(s3_url):
    s3 = bucket_client(s3_url)
    s3.create_bucket(Bucket=BUCKET)
    yield s3
    for key in keys(s3):
        s3.delete_object(Bucket=BUCKET, Key=key)
    s3.delete_bucket(Bucket=BUCKET)


def test_uploads_and_videos_go_through_the_bucket_proxied_and_presigned(tmp_path, redis_url, s3_url, bucket):
    c = s3_cluster(tmp_path, redis_url, s3_url)
    try:
        api = c.client()
        c.start_worker("s3w")
        c.wait_workers(api, 1)
        r = post(api, {"min_resolution": 256, "seed": 3})
        assert r.status_code == 200, r.get_data()[:500]
        body = r.get_json()
        name = body["video_url"].rsplit("/", 1)[1]
        assert body["video_url"].startswith("http://localhost/output/")           # proxied by this server
        assert keys(bucket) == [f"t/outputs/{name}"]                               # uploads gone, video there
        stored = bucket.get_object(Bucket=BUCKET, Key=f"t/outputs/{name}")["Body"].read()
        assert len(stored) > 10000 and stored[4:8] == b"ftyp"
        # nothing on either side's disk: the API dropped its checked copy, the worker its scratch
        assert not any((tmp_path / "api" / "uploads").iterdir())
        assert not [p for p in (tmp_path / "worker").rglob("*") if p.is_file()]
        # /output streams it from the bucket, with Range and conditional requests
        full = api.get(f"/output/{name}")
        assert full.status_code == 200 and full.mimetype == "video/mp4" and full.get_data() == stored
        assert full.headers["Accept-Ranges"] == "bytes"
        part = api.get(f"/output/{name}", headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and part.get_data() == stored[100:200]
        assert part.headers["Content-Range"] == f"bytes 100-199/{len(stored)}"
        assert api.get(f"/output/{name}", headers={"Range": "bytes=-10"}).get_data() == stored[-10:]
        assert api.get(f"/output/{name}", headers={"Range": f"bytes={len(stored) + 5}-"}).status_code == 416
        for ignored in ("bytes=0-1,5-6", "items=0-5"):  # not served: the whole video (items=0-5 was a 206)
            whole = api.get(f"/output/{name}", headers={"Range": ignored})
            assert whole.status_code == 200 and whole.get_data() == stored, ignored
        assert api.get(f"/output/{name}", headers={"If-None-Match": full.headers["ETag"]}).status_code == 304
        # the bucket decides the conditions before the range (RFC 9110 13.2.2); it has no If-Range
        later = "Fri, 01 Jan 2100 00:00:00 GMT"
        assert api.get(f"/output/{name}", headers={"If-Modified-Since": later, "Range": "bytes=0-9"}).status_code == 304
        assert api.get(f"/output/{name}", headers={"If-Modified-Since": f"{later}, {later}"}).status_code == 200  # a list
        assert api.head(f"/output/{name}", headers={"If-None-Match": full.headers["ETag"]}).status_code == 304
        assert_clean_error(api.get(f"/output/{name}", headers={"If-Match": '"other"'}), 412, "precondition_failed")
        assert api.head(f"/output/{name}", headers={"If-Match": '"other"'}).status_code == 412
        matched = api.get(f"/output/{name}", headers={"If-Match": full.headers["ETag"], "Range": "bytes=0-9"})
        assert matched.status_code == 206 and matched.get_data() == stored[:10]
        ranged = api.get(f"/output/{name}", headers={"If-Range": full.headers["ETag"], "Range": "bytes=0-9"})
        assert ranged.status_code == 200 and ranged.get_data() == stored
        head = api.head(f"/output/{name}")
        assert head.status_code == 200 and head.headers["Content-Length"] == str(len(stored)) and not head.get_data()
        assert_clean_error(api.get("/output/" + "b" * 32 + ".mp4"), 404, "not_found")
        # a cache hit, from the bucket
        again = post(api, {"min_resolution": 256, "seed": 3})
        assert again.get_json()["cached"] is True and again.get_json()["video_url"] == body["video_url"]
        # presigned: video_url is the bucket's own URL, good without this server; /output redirects there
        c.cfg["s3"]["video_url"] = "presigned"
        signed_api = c.client()
        status = signed_api.get(f"/api/sonic/jobs/{body['job_id']}").get_json()
        assert status["video_url"].startswith(f"{s3_url}/{BUCKET}/t/outputs/{name}?")
        assert "X-Amz-Signature" in status["video_url"]
        assert requests.get(status["video_url"], timeout=10).content == stored
        redirect = signed_api.get(f"/output/{name}")
        assert redirect.status_code == 302 and redirect.headers["Location"].startswith(s3_url)
        # an async job followed to its end: the same path
        job = post(api, {"min_resolution": 256, "seed": 4, "async": True}).get_json()["job_id"]
        assert wait_status(api, job, ("succeeded",), timeout=90)["status"] == "succeeded"
        assert f"t/outputs/{job}.mp4" in keys(bucket) and not keys(bucket, "t/uploads/")
        # deleted: the object leaves the bucket, and the URL, the listing and the cache forget it
        assert api.delete(f"/api/sonic/jobs/{body['job_id']}").status_code == 204
        assert f"t/outputs/{name}" not in keys(bucket) and f"t/outputs/{job}.mp4" in keys(bucket)
        assert_clean_error(api.get(f"/output/{name}"), 404, "not_found")
        assert [j["job_id"] for j in api.get("/api/sonic/jobs").get_json()["jobs"]] == [job]
        fresh = post(api, {"min_resolution": 256, "seed": 3}).get_json()
        assert not fresh.get("cached") and fresh["job_id"] != body["job_id"]
    finally:
        c.stop()


def own_store() -> tuple[subprocess.Popen, str]:
    """A store of the test's own (moto's S3 server on a free port, the bucket made): to stop or
    pause without touching the module's. (process, URL)"""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            bucket_client(url).create_bucket(Bucket=BUCKET)
            break
        except Exception:                                   # noqa: BLE001 - not up yet
            time.sleep(0.05)
    return proc, url


def test_a_missing_bucket_is_a_named_setup_error_and_an_unreachable_store_a_503(tmp_path, redis_url, s3_url):
    c = s3_cluster(tmp_path, redis_url, s3_url, bucket="no-such-bucket")
    api = c.client()
    health = api.get("/health")
    assert health.status_code == 503 and health.get_json()["status"] == "setup_failed"
    assert "no-such-bucket" in health.get_json()["error"]
    out = subprocess.run([sys.executable, "-m", "sonic", "worker", "--config", str(c.path)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "no-such-bucket" in out.stderr and "Traceback" not in out.stderr
    # the store goes away after start-up: the upload is refused with 503 + Retry-After, nothing queued
    (tmp_path / "gone").mkdir()
    proc, url = own_store()
    gone = s3_cluster(tmp_path / "gone", redis_url, url)
    try:
        import redis
        r = redis.Redis.from_url(redis_url)
        r.set("sonic:worker:stand-in", '{"name": "stand-in"}', ex=60)        # a live worker, as far as submit knows
        api = gone.client()
        assert api.get("/health").status_code == 200
    finally:
        proc.kill()
        proc.wait(10)
    resp = post(api, {"min_resolution": 256, "async": True})
    assert_clean_error(resp, 503, "storage_unavailable")
    assert resp.headers["Retry-After"] == "5" and BUCKET in resp.get_json()["error"]["message"]
    assert r.llen("rq:queue:sonic") == 0 and not any((tmp_path / "gone" / "api" / "uploads").iterdir())
    r.delete("sonic:worker:stand-in")


def test_a_store_that_hangs_is_a_quick_503_and_is_used_again_once_it_answers(tmp_path, redis_url, monkeypatch, caplog):
    """A store that stops answering without refusing (a hung process, a dead network path): the
    request that meets it is refused within its timeouts (s3.timeout_s, tried twice), and for
    AWAY_S every request that needs the bucket is 503 at once while /health says so; then the
    bucket is used again. With boto3's 30 s and three tries a generate took 4 minutes."""
    import os
    import signal
    import redis
    from sonic_server import storage
    monkeypatch.setattr(storage, "AWAY_S", 2.0)
    proc, url = own_store()
    r = redis.Redis.from_url(redis_url)
    try:
        c = s3_cluster(tmp_path, redis_url, url, timeout_s=1)
        r.set("sonic:worker:stand-in", '{"name": "stand-in"}', ex=120)       # a live worker, as far as submit knows
        api = c.client()
        assert api.get("/health").get_json()["storage"] == "ok"
        # this machine's own failure (a worker's disk full under a download) is not the store's
        store = api.application.extensions["sonic"].outputs.s3
        failed = store.failure("read an upload", OSError(28, "No space left on device"))
        assert isinstance(failed, storage.StorageUnavailable)
        assert not store.away and api.get("/health").get_json()["storage"] == "ok"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            first = post(api, {"min_resolution": 256, "async": True})
            assert_clean_error(first, 503, "storage_unavailable")
            assert time.monotonic() - started < 15 and first.headers["Retry-After"] == "5"
            started = time.monotonic()
            assert_clean_error(post(api, {"min_resolution": 256, "async": True}), 503, "storage_unavailable")
            assert_clean_error(api.get("/output/" + "c" * 32 + ".mp4"), 503, "storage_unavailable")
            assert time.monotonic() - started < 1
            health = api.get("/health")
            assert health.status_code == 200 and health.get_json()["storage"] == "unavailable"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(2.2)
        assert api.get("/health").get_json()["storage"] == "ok"
        again = post(api, {"min_resolution": 256, "async": True})
        assert again.status_code == 202, again.get_data()[:300]
        assert r.llen("rq:queue:sonic") == 1 and not any((tmp_path / "api" / "uploads").iterdir())
        # an outage is told in one line a failure, not with a trace (the uploads left for the bucket's
        # lifecycle rule logged two chained traces a request)
        assert not [rec.getMessage() for rec in caplog.records if rec.name == "sonic.storage" and rec.exc_info]
    finally:
        r.delete("sonic:worker:stand-in")
        proc.kill()
        proc.wait(10)


def test_a_worker_not_on_the_apis_bucket_takes_no_job_and_says_which_setting(tmp_path, redis_url, s3_url, bucket):
    """API processes on a bucket, a worker whose settings lack `storage: s3`: it was listed
    ready, took each job and failed it at once ("the job's image file is no longer on the
    server"; submitting again failed alike), naming nothing. Now it takes none, its log names the
    setting, /health lists it `shares_folders: false`, and a request is 503 setup_failed."""
    c = s3_cluster(tmp_path, redis_url, s3_url)
    local = yaml.safe_load(c.path.read_text())
    local.pop("s3")
    local["storage"] = "local"
    c.path.write_text(yaml.safe_dump(local))
    try:
        api = c.client()
        c.start_worker("local")
        health = c.wait_workers(api, 1, named=("local",))
        assert [w.get("shares_folders") for w in health["workers"]] == [False], health
        assert health["readiness"] == "worker_stopped"
        r = post(api, {"min_resolution": 256})
        body = r.get_json()
        assert r.status_code == 503 and body["error"]["code"] == "setup_failed", body
        assert "storage" in body["error"]["message"] and not keys(bucket, "t/uploads/")
        said = f"its storage (local) is not the API processes' (s3 bucket {BUCKET}/t/)"
        deadline = time.monotonic() + 30
        while said not in (tmp_path / "local.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert said in (tmp_path / "local.log").read_text()
    finally:
        c.stop()
