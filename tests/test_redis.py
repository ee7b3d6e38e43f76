"""Distributed mode: API processes over Redis (a real redis-server on a free port), jobs run by
real `sonic worker` processes (the warp model, real renders at 256 px). The API side runs in
Flask's test client: it holds no model."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from conftest import PORTRAIT, ROOT, SPEECH
from server_helpers import assert_clean_error, at_once, settings as server_settings
from test_http_live import free_port

REDIS = shutil.which("redis-server")


def start_redis(folder, port: int, appendonly: str = "no", *more: str) -> subprocess.Popen:
    """redis-server on 127.0.0.1:port with its files in `folder`, answering when this returns."""
    import redis
    if REDIS is None:
        pytest.fail("redis-server is not installed (.ci/run installs Debian's redis-server)")
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", appendonly,
                             *more, "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    r = redis.Redis(port=port)
    for _ in range(100):
        try:
            r.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    port = free_port()
    proc = start_redis(tmp_path_factory.mktemp("redis"), port)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


class Cluster:
    """Settings shared by the API and the workers; workers as real processes."""

    def __init__(self, tmp, redis_url, **server):
        self.tmp = tmp
        self.cfg = server_settings(tmp, redis_url=redis_url, **server)
        self.cfg["render_processes"] = 0
        self.path = tmp / "settings.yaml"
        self.path.write_text(yaml.safe_dump(self.cfg))
        self.workers: dict[str, subprocess.Popen] = {}
        import redis
        redis.Redis.from_url(redis_url).flushdb()

    def start_worker(self, name: str, *extra: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "sonic", "worker", "--config", str(self.path), "--name", name,
                                 *extra],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        self.workers[name] = proc
        return proc

    def client(self):
        from sonic_server import create_app
        return create_app(self.cfg).test_client()

    def wait_workers(self, client, n: int, timeout: float = 60, named: tuple[str, ...] = ()) -> dict:
        """Until /health lists n workers, `named` among them: a worker killed with -9 stays listed
        until its entry lapses, and may be the one counted while its successor starts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = client.get("/health").get_json()
            listed = {w.get("name") for w in h.get("workers", [])}
            if len(listed) >= n and listed.issuperset(named):
                return h
            time.sleep(0.2)
        logs = {name: (self.tmp / f"{name}.log").read_text()[-1500:] for name in self.workers}
        pytest.fail(f"workers did not register: {h}, logs: {logs}")

    def stop(self):
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


@pytest.fixture
def cluster(tmp_path, redis_url):
    made = []

    def make(**server):
        c = Cluster(tmp_path, redis_url, **server)
        made.append(c)
        return c
    yield make
    for c in made:
        c.stop()


def post(client, config, audio=SPEECH):
    with open(PORTRAIT, "rb") as img, open(audio, "rb") as aud:
        return client.post("/api/sonic/generate", data={"image": (img, "p.jpg"), "audio": (aud, "a.flac"),
                                                        "config": json.dumps(config)})


def job_uploads(tmp) -> list:
    """What the shared upload folder holds beside its mark (shared_folders.py): jobs' files."""
    from sonic_server.shared_folders import FOLDER_MARK
    return [p for p in (tmp / "uploads").iterdir() if p.name != FOLDER_MARK]


def wait_status(client, job, statuses, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/sonic/jobs/{job}").get_json()
        if body["status"] in statuses:
            return body
        time.sleep(0.1)
    pytest.fail(f"job {job} never reached {statuses}: {body}")


def test_jobs_run_on_worker_processes_with_progress_and_a_shared_cache(cluster):
    c = cluster()
    api = c.client()
    r = post(api, {"min_resolution": 256})
    assert_clean_error(r, 503, "not_ready")                       # no worker yet: refused, not queued forever
    assert r.get_json()["error"]["message"] == "no worker is running jobs at the moment; try again later"
    metrics_port = free_port()
    c.start_worker("w1", "--metrics-port", str(metrics_port))
    health = c.wait_workers(api, 1)
    assert health["readiness"] == "ready" and health["workers"][0]["state"] == "idle"
    assert health["decoder"] == "warp"
    r = post(api, {"min_resolution": 256, "seed": 5})
    assert r.status_code == 200, r.get_data()[:500]
    body = r.get_json()
    assert body["frames"] == 75 and (c.tmp / "outputs" / body["video_url"].rsplit("/", 1)[1]).stat().st_size > 10000
    assert not job_uploads(c.tmp)                  # the worker removed the inputs
    # SSE from another API process, on a job that runs meanwhile: progress comes through Redis
    other = c.client()
    job = post(other, {"min_resolution": 256, "seed": 6, "async": True}).get_json()["job_id"]
    stages = []
    for chunk in other.get(f"/api/sonic/jobs/{job}/events", buffered=False).response:
        for line in chunk.decode().splitlines():
            if line.startswith("data: "):
                d = json.loads(line[6:])
                stages.append((d["status"], d["stage"], d["progress"]))
    assert stages[-1][0] == "succeeded" and ("processing", "render") in [(s, st) for s, st, _ in stages]
    progress = [p for _, _, p in stages]
    assert progress == sorted(progress)
    # the cache is shared: the first request's twin, sent to the other API process, is a hit
    again = post(other, {"min_resolution": 256, "seed": 5})
    assert again.status_code == 200 and again.get_json()["cached"] is True
    assert again.get_json()["video_url"] == body["video_url"]
    # the worker counts its jobs on its own metrics port; the API reads the queue's gauges
    import requests
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(
        requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text) for s in fam.samples}
    assert samples[("sonic_jobs_finished_total", (("kind", "generate"), ("status", "succeeded")))] == 2
    assert samples[("sonic_video_seconds_total", ())] == 6.0
    page = api.get("/metrics").get_data(as_text=True)
    assert "sonic_workers_live 1" in page and "sonic_queue_length 0" in page


def test_two_workers_share_the_jobs_and_a_running_job_is_canceled_from_another_api_process(cluster):
    c = cluster(queue_size=10)
    api, other = c.client(), c.client()
    c.start_worker("w1")
    c.start_worker("w2")
    c.wait_workers(api, 2)
    jobs = [post(api, {"min_resolution": 256, "seed": 20 + i, "async": True}).get_json()["job_id"] for i in range(6)]
    ended = [wait_status(other, job, ("succeeded", "failed", "canceled"), timeout=120) for job in jobs]
    assert [b["status"] for b in ended] == ["succeeded"] * 6, ended
    import redis
    r = redis.Redis.from_url(c.cfg["server"]["redis_url"])
    ran_on = [json.loads(r.get(f"sonic:job:{job}"))["worker"] for job in jobs]
    assert set(ran_on) == {"w1", "w2"}, ran_on                     # both took some
    # a long job submitted to one API process, canceled through the other while it renders
    long = post(api, {"min_resolution": 512, "duration": 40, "seed": 30, "async": True}).get_json()["job_id"]
    wait_status(other, long, ("processing",))
    assert other.post(f"/api/sonic/jobs/{long}/cancel").status_code in (200, 409)
    body = wait_status(api, long, ("canceled", "failed", "succeeded"), timeout=30)
    assert body["status"] == "canceled" and body["error"]["code"] == "canceled", body
    assert not list((c.tmp / "outputs").glob(f"{long}*")) + list((c.tmp / "outputs").glob(".*part*"))
    assert not job_uploads(c.tmp)
    assert "worker" not in api.get(f"/api/sonic/jobs/{long}").get_json()     # an operator's detail, not public
    # a worker stopped by SIGTERM mid-job says so, in its log and its entry, and finishes the job
    job = post(api, {"min_resolution": 512, "duration": 20, "seed": 31, "async": True}).get_json()["job_id"]
    wait_status(api, job, ("processing",))
    h = api.get("/health").get_json()  # the other worker takes the next job at once: ready, not busy
    assert h["readiness"] == "ready" and sorted(w["state"] for w in h["workers"]) == ["busy", "idle"], h
    name = json.loads(r.get(f"sonic:job:{job}"))["worker"]
    c.workers[name].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entry = {w["name"]: w for w in api.get("/health").get_json()["workers"]}.get(name, {})
        if entry.get("draining"):
            break
        time.sleep(0.1)
    assert entry.get("draining") and entry.get("job"), entry          # listed as stopping, not plain busy
    # the other worker stopped too: the one left only finishes its job, so nothing takes the next
    other_name = next(n for n in c.workers if n != name)
    c.workers[other_name].send_signal(signal.SIGTERM)
    assert c.workers[other_name].wait(30) == 0
    reply = api.get("/health")
    h = reply.get_json()
    assert api.get(f"/api/sonic/jobs/{job}").get_json()["status"] == "processing"  # (still, as it was read)
    assert reply.status_code == 503 and h["readiness"] == "worker_stopped", h
    assert [w["name"] for w in h["workers"]] == [name] and h["workers"][0]["draining"], h
    assert wait_status(api, job, ("succeeded", "failed", "canceled"), timeout=120)["status"] == "succeeded"
    assert c.workers[name].wait(30) == 0
    log = (c.tmp / f"{name}.log").read_text()
    assert f"worker {name}: stopping: its job {job} finishes, no new jobs" in log and f"worker {name} stopped" in log


def test_cancel_queued_and_running_and_a_bounded_queue(cluster):
    c = cluster(queue_size=2)
    api = c.client()
    c.start_worker("w1")
    c.wait_workers(api, 1)
    long = {"min_resolution": 512, "duration": 40, "async": True}
    running = post(api, {**long, "seed": 1}).get_json()["job_id"]
    wait_status(api, running, ("processing",))
    accepted = post(api, {**long, "seed": 2}).get_json()
    queued, second = accepted["job_id"], post(api, {**long, "seed": 5}).get_json()["job_id"]
    assert accepted["queue_position"] == 0  # told at once: it starts next
    full = post(api, {**long, "seed": 3})
    assert full.status_code == 503, (full.status_code, full.get_data()[:300], api.get("/health").get_json())
    assert_clean_error(full, 503, "busy")
    assert full.headers["Retry-After"]
    h = api.get("/health").get_json()
    assert h["queue_length"] == 2 and h["workers"][0]["state"] == "busy" and h["workers"][0]["job"] == running, h
    assert api.get(f"/api/sonic/jobs/{second}").get_json()["queue_position"] == 1
    assert "queue_position" not in api.get(f"/api/sonic/jobs/{running}").get_json()
    canceled = api.post(f"/api/sonic/jobs/{queued}/cancel").get_json()
    assert canceled["status"] == "canceled" and "queue_position" not in canceled, canceled
    assert api.get(f"/api/sonic/jobs/{second}").get_json()["queue_position"] == 0  # one fewer ahead
    assert api.post(f"/api/sonic/jobs/{second}/cancel").get_json()["status"] == "canceled"
    api.post(f"/api/sonic/jobs/{running}/cancel")
    ended = wait_status(api, running, ("canceled", "failed", "succeeded"))
    assert ended["status"] == "canceled", ended
    left = list((c.tmp / "outputs").glob("*.mp4")) + list((c.tmp / "outputs").glob(".*part*"))
    assert not left, left
    # the worker goes on: the next job runs
    r = post(api, {"min_resolution": 256, "seed": 4})
    assert r.status_code == 200, (r.status_code, r.get_data()[:300])


def test_a_killed_worker_fails_its_job_worker_lost_and_another_worker_goes_on(cluster):
    # a 5 s lease, as below: with 2 s, the next worker's job was once declared lost on a loaded
    # machine (its heartbeat thread waited on a recognition call holding the interpreter lock)
    c = cluster(worker_lease_s=5)
    api = c.client()
    w1 = c.start_worker("w1")
    c.wait_workers(api, 1)
    job = post(api, {"min_resolution": 512, "duration": 60, "async": True}).get_json()["job_id"]
    wait_status(api, job, ("processing",))
    time.sleep(0.5)
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(5)
    body = wait_status(api, job, ("failed", "succeeded", "canceled"), timeout=20)
    assert body["status"] == "failed" and body["error"]["code"] == "worker_lost", body
    assert body["error"]["status"] == 500
    assert not job_uploads(c.tmp) and not list((c.tmp / "outputs").glob(".*part*"))
    c.start_worker("w2")
    c.wait_workers(api, 1, named=("w2",))
    r = post(api, {"min_resolution": 256, "seed": 8})
    assert r.status_code == 200, r.get_data()[:300]


def test_a_worker_that_does_not_share_the_apis_output_folder_takes_no_job(cluster, monkeypatch):
    """A worker started with another output_dir (a volume mounted elsewhere) rendered, was paid
    for, and wrote where no API process serves: every video link was 404. Now it takes no job
    and says why in its log; /health names it; with no other worker a request is refused as the
    service's set-up fault, and a worker that shares the folders takes the jobs."""
    c = cluster()
    api = c.client()
    other = c.tmp / "elsewhere"
    monkeypatch.setenv("SONIC_OUTPUT_DIR", str(other))  # the worker's environment only (Popen copies it)
    c.start_worker("wrong")
    monkeypatch.delenv("SONIC_OUTPUT_DIR")
    health = c.wait_workers(api, 1, named=("wrong",))
    assert [w.get("shares_folders") for w in health["workers"]] == [False], health
    assert health["readiness"] == "worker_stopped"  # none takes jobs
    r = post(api, {"min_resolution": 256})
    body = r.get_json()
    assert r.status_code == 503 and body["error"]["code"] == "setup_failed", body
    assert r.headers["Retry-After"] == "60"  # as every 503 (docs/errors.md); the operator acts meanwhile
    assert "no worker shares this API process's folders" in body["error"]["message"]
    assert str(other) not in json.dumps(body) and not job_uploads(c.tmp)  # paths stay in the log
    deadline = time.monotonic() + 20
    said = f"its output_dir ({other}) is not the folder the API processes use"
    while said not in (c.tmp / "wrong.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (c.tmp / "wrong.log").read_text()
    assert said in log and "server.upload_dir" not in log, log[-2000:]
    c.start_worker("right")
    c.wait_workers(api, 2, named=("right",))
    for seed in (1, 2):
        r = post(api, {"min_resolution": 256, "seed": seed})
        assert r.status_code == 200, r.get_json()
    assert not list(other.glob("*.mp4")) and len(list((c.tmp / "outputs").glob("*.mp4"))) == 2


def test_a_worker_short_of_disk_takes_no_job_until_there_is_room(cluster):
    """A real small filesystem (a 16 MB tmpfs under output_dir; needs root, as on this project's
    machines). Filled while a job runs, the worker takes no further job: the queued one waits,
    /health says so, and it runs once there is room again. Before, each job failed disk_full."""
    c = cluster(min_free_mb=8, queue_size=10)
    outputs = c.tmp / "outputs"
    outputs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(outputs)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        api = c.client()
        c.start_worker("w1")
        c.wait_workers(api, 1)
        first = post(api, {"min_resolution": 256, "duration": 20, "async": True, "seed": 1}).get_json()["job_id"]
        wait_status(api, first, ("processing",))
        (outputs / "filler").write_bytes(b"\0" * (10 * 2**20))         # 6 MB left, under the 8 asked
        second = post(api, {"min_resolution": 256, "async": True, "seed": 2}).get_json()["job_id"]
        assert wait_status(api, first, ("succeeded", "failed"), timeout=120)["status"] == "succeeded"
        deadline = time.monotonic() + 20
        while (h := api.get("/health")).get_json()["workers"][0]["state"] != "disk_full":
            assert time.monotonic() < deadline, h.get_json()
            time.sleep(0.2)
        assert h.status_code == 503 and h.get_json()["readiness"] == "disk_full"
        time.sleep(2)
        assert api.get(f"/api/sonic/jobs/{second}").get_json()["status"] == "queued"      # waits, not failed
        refused = post(api, {"min_resolution": 256, "seed": 3})
        assert_clean_error(refused, 500, "disk_full")
        assert refused.headers["Retry-After"] == "60" and "every worker's disk" in refused.get_json()["error"]["message"]
        assert "no job is taken until there is room" in (c.tmp / "w1.log").read_text()
        (outputs / "filler").unlink()
        body = wait_status(api, second, ("succeeded", "failed"), timeout=120)
        assert body["status"] == "succeeded", body
        assert api.get("/health").get_json()["readiness"] in ("ready", "busy")
        # filled while the worker idles in RQ's blocking wait: the job it is handed goes back to
        # the queue untouched (it was taken and failed disk_full), and runs once there is room
        time.sleep(1)
        (outputs / "filler").write_bytes(b"\0" * (10 * 2**20))
        third = post(api, {"min_resolution": 256, "async": True, "seed": 4}).get_json()["job_id"]
        deadline = time.monotonic() + 20
        while api.get("/health").get_json()["workers"][0]["state"] != "disk_full":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert api.get(f"/api/sonic/jobs/{third}").get_json()["status"] == "queued"
        (outputs / "filler").unlink()
        assert wait_status(api, third, ("succeeded", "failed"), timeout=120)["status"] == "succeeded"
    finally:
        c.stop()
        subprocess.run(["umount", "-l", str(outputs)], check=False)


def test_finished_records_survive_a_redis_restart_with_append_only_persistence(tmp_path):
    """docs/scaling.md runs Redis with --appendonly yes: a restart keeps the job records (and the
    result cache's keys), so a status URL given out before it still answers."""
    import redis
    from sonic_server.jobs import JobRecord
    from sonic_server.queue.redis import RedisStore
    port = free_port()

    def start():
        return start_redis(tmp_path, port, "yes", "--appendfsync", "always"), redis.Redis(port=port)
    proc, r = start()
    rec = JobRecord.new("generate", {"seed": 1}, cache_key="k" * 64)
    rec.status = rec.stage = "succeeded"
    rec.result = {"file": f"{rec.id}.mp4", "frames": 75}
    RedisStore(r).save(rec)
    proc.kill()                                                   # not even a clean shutdown
    proc.wait(10)
    proc, r = start()
    try:
        back = RedisStore(r).load(rec.id)
        assert back is not None and back.status == "succeeded" and back.result["frames"] == 75
        assert RedisStore(r).cached("k" * 64) == rec.id
    finally:
        proc.terminate()
        proc.wait(10)


def runs_lost(api) -> float:
    """sonic_job_runs_lost_total as an API process's /metrics reads (counted per process)."""
    import re
    return float(re.search(rb"\nsonic_job_runs_lost_total (\S+)\n", api.get("/metrics").data).group(1))


def test_with_retry_a_job_lost_with_its_worker_runs_again_on_another(cluster):
    # a 5 s lease: the retried run's worker must renew it while it recognises 30 s of audio in one
    # pocketsphinx call, which holds the interpreter lock (under a loaded test machine, over 2 s)
    c = cluster(worker_lease_s=5, retry_lost_jobs=1)
    api = c.client()
    w1 = c.start_worker("w1")
    c.wait_workers(api, 1)
    job = post(api, {"min_resolution": 256, "duration": 30, "async": True, "seed": 9}).get_json()["job_id"]
    wait_status(api, job, ("processing",))
    lost_before = runs_lost(api)
    os.kill(w1.pid, signal.SIGKILL)
    w1.wait(5)
    assert wait_status(api, job, ("queued",), timeout=20)["status"] == "queued"     # back in the queue
    c.start_worker("w2")
    body = wait_status(api, job, ("succeeded", "failed", "canceled"), timeout=120)
    assert body["status"] == "succeeded", body
    from sonic_server.queue.redis import RedisStore, connect
    assert RedisStore(connect(c.cfg["server"]["redis_url"])).load(job).attempts == 2
    # the lost run fails nothing, and is counted where it was noticed (this API process)
    assert runs_lost(api) == lost_before + 1


def test_a_killed_worker_restarts_under_its_name_and_a_redis_outage_stops_no_worker(tmp_path):
    """A worker killed (-9) is started again under the same --name, which it takes back once the
    dead run's entry has missed three beats: its RQ registration outlived it by minutes, and RQ
    refused the name (the process exited after "ready"). Then
    Redis goes away while a job runs and ends: RQ's bookkeeping failed and the worker quit,
    leaving nobody to take the queue; now its loop starts again once Redis is back."""
    port = free_port()
    folder = tmp_path / "redis"
    folder.mkdir()
    redis_proc = start_redis(folder, port)
    c = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0", worker_lease_s=4)
    try:
        api = c.client()
        first = c.start_worker("w1")
        c.wait_workers(api, 1)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(5)
        again = c.start_worker("w1")
        r = post(api, {"min_resolution": 256, "seed": 21})
        assert r.status_code == 200, (r.get_data()[:300], (tmp_path / "w1.log").read_text()[-1500:])
        job = post(api, {"min_resolution": 256, "duration": 20, "async": True, "seed": 22}).get_json()["job_id"]
        wait_status(api, job, ("processing",))
        redis_proc.terminate()
        redis_proc.wait(10)
        time.sleep(8)  # the job ends while Redis is away
        redis_proc = start_redis(folder, port)  # empty: nothing was saved
        assert again.poll() is None, (tmp_path / "w1.log").read_text()[-2000:]
        api = c.client()
        c.wait_workers(api, 1, timeout=30)
        r = post(api, {"min_resolution": 256, "seed": 23})
        assert r.status_code == 200, (r.get_data()[:300], (tmp_path / "w1.log").read_text()[-2000:])
        assert again.poll() is None and "starts again once Redis answers" in (tmp_path / "w1.log").read_text()
        import redis
        listening = dict(redis.Redis(port=port).pubsub_numsub("rq:pubsub:w1"))
        assert listening[b"rq:pubsub:w1"] == 1, listening  # the loop that stopped stopped listening too
        # the outage is said in lines, each once, with its cause: no traceback (there were a dozen)
        log = (tmp_path / "w1.log").read_text()
        assert "Traceback" not in log and "ERROR sonic" not in log, log[-3000:]
        assert 1 <= log.count("heartbeat failed") <= 2 and "(Redis does not answer: ConnectionError" in log, log[-3000:]
    finally:
        c.stop()
        redis_proc.terminate()
        redis_proc.wait(10)


def test_a_name_is_taken_back_only_from_a_run_that_missed_its_beats(redis_url):
    """claim_name waits while the name's entry is renewed (a live worker of that name: here, or
    in another container with the same hostname and pid), and takes it once it has missed three
    beats, judged on Redis' clock."""
    import redis

    from sonic_server.queue.redis import PREFIX
    from sonic_server.worker import claim_name

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.set(PREFIX + "worker:w9", "{}", px=4000)  # renewed a moment ago, on a 4 s lease
    stop = threading.Event()
    threading.Timer(1.5, stop.set).start()
    began = time.monotonic()
    assert claim_name(r, "w9", 4.0, stop) is False and time.monotonic() - began >= 1.4  # it waited
    r.set(PREFIX + "worker:w9", "{}", px=900)  # three beats missed
    assert claim_name(r, "w9", 4.0, threading.Event()) is True


def test_the_queue_bound_holds_when_api_processes_race(redis_url, tmp_path):
    """16 submits at once (a thread each) through 2 API-side queues, queue_size 3, no worker taking
    jobs (a worker entry is faked so that submit accepts): exactly 3 are queued, the rest get
    QueueFull, and nothing of the refused ones stays in Redis, indexes included."""
    import redis
    from sonic_server.jobs import JobRecord
    from sonic_server.queue import QueueFull
    from sonic_server.queue.redis import PREFIX, RedisQueue
    from sonic_server.uploads import Uploads
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.set(PREFIX + "worker:fake", json.dumps({"name": "fake", "job": None}), ex=60)
    queues = [RedisQueue(redis_url, tmp_path / "out", Uploads(tmp_path / "up"), queue_size=3) for _ in range(2)]
    outcomes = []

    def submit(i):
        try:
            queues[i % 2].submit(JobRecord.new("generate", {"seed": i}))
            outcomes.append("queued")
        except QueueFull:
            outcomes.append("full")
    at_once(submit, 16)
    assert outcomes.count("queued") == 3 and outcomes.count("full") == 13
    assert queues[0].queue_length() == 3 and r.scard(PREFIX + "unfinished") == 3
    assert len(list(r.scan_iter(match=PREFIX + "job:*"))) == 3
    # ... nor in the listing's indexes (they grew by one with every refusal, and a listing
    # counted the refused among its scan)
    assert r.zcard(PREFIX + "created") == 3


def test_a_callers_share_holds_when_api_processes_race_and_frees_as_its_jobs_end(redis_url, tmp_path):
    """server.max_jobs_per_caller over Redis: 12 submits of one owner at once (a thread each) through
    2 API-side queues, a share of 2: exactly 2 are queued, the refused leave nothing behind; a
    cancel frees a place, and so does a job whose record is gone (a share is never held by a
    job that no longer runs)."""
    import redis
    from sonic_server.jobs import JobRecord
    from sonic_server.queue import CallerBusy
    from sonic_server.queue.redis import PREFIX, RedisQueue
    from sonic_server.uploads import Uploads
    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.set(PREFIX + "worker:fake", json.dumps({"name": "fake", "job": None}), ex=60)
    queues = [RedisQueue(redis_url, tmp_path / "out", Uploads(tmp_path / "up"), queue_size=20, max_jobs_per_caller=2)
              for _ in range(2)]
    queued: list[str] = []
    refused: list[int] = []

    def submit(i):
        try:
            queued.append(queues[i % 2].submit(JobRecord.new("generate", {"seed": i}, owner="ann")).id)
        except CallerBusy:
            refused.append(i)
    at_once(submit, 12)
    assert len(queued) == 2 and len(refused) == 10
    assert len(list(r.scan_iter(match=PREFIX + "job:*"))) == 2 and r.zcard(PREFIX + "owner:ann") == 2
    assert queues[1].active_of("ann") == 2
    queues[0].submit(JobRecord.new("generate", {}, owner="bob"))  # another caller's share is its own
    queues[0].submit(JobRecord.new("generate", {}))  # made without keys: nobody's share
    with pytest.raises(CallerBusy):
        queues[1].submit(JobRecord.new("generate", {}, owner="ann"))
    assert queues[1].cancel(queued[0]).status == "canceled"
    third = queues[1].submit(JobRecord.new("generate", {}, owner="ann"))
    r.delete(PREFIX + f"job:{queued[1]}")  # its record lost with Redis's data
    assert queues[0].active_of("ann") == 1
    fourth = queues[0].submit(JobRecord.new("generate", {}, owner="ann"))
    assert queues[0].active_of("ann") == 2 and {m.decode() for m in r.smembers(PREFIX + "active:ann")} == {
        third.id, fourth.id}
    # a job taken by a worker that was killed (its lease gone) is declared lost by the count
    # itself, with no worker alive to do it: ann's place comes back, her job says why it ended
    from sonic_server import lifecycle
    running = lifecycle.start(queues[0].get(fourth.id), worker="killed")
    assert queues[0].store.swap(running, "queued", fourth.attempts)
    assert queues[1].active_of("ann") == 1
    assert queues[1].get(fourth.id).error["code"] == "worker_lost"


def test_a_redis_outage_is_503_not_ready_and_the_api_recovers(tmp_path):
    port = free_port()
    proc = start_redis(tmp_path, port)
    try:
        c = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0")
        api = c.client()
        assert api.get("/health").status_code == 503              # no worker yet, but answered
        import redis
        from sonic_server.queue.redis import PREFIX
        redis.Redis(port=port).set(PREFIX + "worker:stand-in", '{"name": "stand-in"}', ex=60)
        job = post(api, {"min_resolution": 256, "async": True}).get_json()["job_id"]
        stream = api.get(f"/api/sonic/jobs/{job}/events", buffered=False).response
        assert next(stream).decode().startswith("event: queued")
        # a stalled Redis (not gone: its socket open, no answer) is said at once, not after 10 s timeouts
        proc.send_signal(signal.SIGSTOP)
        try:
            asked = time.monotonic()
            stalled = api.get("/health")
            assert time.monotonic() - asked < 4 and stalled.get_json()["readiness"] == "not_ready"
        finally:
            proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)
        # an open event stream ends with an error event that says what to do, not a broken connection
        rest = b"".join(stream).decode()
        assert rest.startswith("event: error\ndata: ") and rest.endswith("\n\n")
        err = json.loads(rest.split("data: ", 1)[1])
        assert err["error"]["code"] == "not_ready" and err["status_url"].endswith(job)
        resp = api.get("/api/sonic/jobs/" + "a" * 32)
        assert_clean_error(resp, 503, "not_ready")
        assert resp.headers["Retry-After"] == "5" and "Redis" in resp.get_json()["error"]["message"]
        # /health answers in full, as monitoring reads it (it was an error answer without `readiness`)
        health = api.get("/health")
        assert health.status_code == 503 and health.headers["Retry-After"] == "5"
        body = health.get_json()
        assert body["readiness"] == body["status"] == "not_ready" and "Redis" in body["error"], body
        assert_clean_error(post(api, {"min_resolution": 256}), 503, "not_ready")
        proc = start_redis(tmp_path, port)
        assert api.get("/api/sonic/jobs/" + "a" * 32).status_code == 404       # back: answered again
    finally:
        proc.kill()
        proc.wait(10)


def test_a_client_has_one_rate_limit_whichever_api_process_it_reaches(cluster):
    """Two API processes over one Redis: a burst spent through one is spent for the other (each
    process had its buckets to itself: N processes behind a load balancer gave a client N times
    the limit); a key's bucket and a DELETE's are their own; keys are kept only as digests."""
    import redis
    c = cluster(api_keys=["key-a"], rate_limit_per_s=0.2, rate_limit_burst=3)  # a token every 5 s: slack for a slow machine
    one, two = c.client(), c.client()
    key = {"Authorization": "Bearer key-a"}
    # without a key: the address's bucket, spent through both (401: the key is missing)
    assert [api.get("/api/sonic/jobs").status_code for api in (one, two, one)] == [401] * 3
    refused = two.get("/api/sonic/jobs")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) in (4, 5), refused.get_data()
    # the key's own bucket, the same through both
    assert [api.get("/api/sonic/jobs", headers=key).status_code for api in (two, one, two)] == [200] * 3
    assert one.get("/api/sonic/jobs", headers=key).status_code == 429
    # a DELETE may still let go of a job (404: there is none), once per token too
    assert [api.delete("/api/sonic/jobs/nothing", headers=key).status_code for api in (one, two, one)] == [404] * 3
    assert two.delete("/api/sonic/jobs/nothing", headers=key).status_code == 429
    time.sleep(5.1)  # a token every 5 s, whichever process spends it
    assert two.get("/api/sonic/jobs", headers=key).status_code == 200
    assert one.get("/api/sonic/jobs", headers=key).status_code == 429
    stored = [k.decode() for k in redis.Redis.from_url(c.cfg["server"]["redis_url"]).scan_iter("sonic:rate:*")]
    assert len(stored) == 3 and not any("key-a" in k or "127.0.0.1" in k for k in stored), stored


def test_jobs_are_listed_and_deleted_through_any_api_process(cluster):
    """Each key lists its own jobs, newest first, a page at a time, through either API process;
    a delete through one removes the record, the video and the cache entry for both; deleting a
    running job cancels it on its worker first."""
    c = cluster(api_keys=["key-a", "key-b"])
    one, two = c.client(), c.client()
    c.start_worker("lw")
    c.wait_workers(one, 1)
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}

    def make(api, seed, headers, **extra):
        with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
            r = api.post("/api/sonic/generate", headers=headers, data={
                "image": (img, "p.jpg"), "audio": (aud, "a.flac"),
                "config": json.dumps({"min_resolution": 256, "seed": seed, **extra})})
        assert r.status_code in (200, 202), r.get_data()[:300]
        return r.get_json()

    mine = [make(one, seed, a)["job_id"] for seed in (1, 2, 3)]
    theirs = make(two, 4, b)["job_id"]
    page = two.get("/api/sonic/jobs?limit=2", headers=a).get_json()
    assert [j["job_id"] for j in page["jobs"]] == mine[:0:-1] and page["next_cursor"]
    rest = one.get(f"/api/sonic/jobs?limit=2&cursor={page['next_cursor']}", headers=a).get_json()
    assert [j["job_id"] for j in rest["jobs"]] == [mine[0]] and rest["next_cursor"] is None
    assert [j["job_id"] for j in one.get("/api/sonic/jobs", headers=b).get_json()["jobs"]] == [theirs]
    # records from before the listing's indexes: indexed when an API process starts
    import redis
    conn = redis.Redis.from_url(c.cfg["server"]["redis_url"])
    conn.delete("sonic:created", "sonic:owner:" + json.loads(conn.get(f"sonic:job:{theirs}"))["owner"])
    assert one.get("/api/sonic/jobs", headers=b).get_json()["jobs"] == []
    assert [j["job_id"] for j in c.client().get("/api/sonic/jobs", headers=b).get_json()["jobs"]] == [theirs]
    assert one.get("/api/sonic/jobs?status=failed", headers=a).get_json()["jobs"] == []
    assert_clean_error(one.delete(f"/api/sonic/jobs/{theirs}", headers=a), 404, "job_not_found")
    video = c.tmp / "outputs" / f"{mine[1]}.mp4"
    assert video.exists()
    assert two.delete(f"/api/sonic/jobs/{mine[1]}", headers=a).status_code == 204
    assert not video.exists()
    assert_clean_error(one.get(f"/api/sonic/jobs/{mine[1]}", headers=a), 404, "job_not_found")
    assert [j["job_id"] for j in one.get("/api/sonic/jobs", headers=a).get_json()["jobs"]] == [mine[2], mine[0]]
    again = make(one, 2, a)
    assert not again.get("cached") and again["job_id"] != mine[1]
    # an Idempotency-Key holds across API processes: the retry through the other gets the same job
    keyed = {"Idempotency-Key": "k-1", **a}
    assert make(one, 7, keyed)["job_id"] == make(two, 7, keyed)["job_id"]
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        clash = two.post("/api/sonic/generate", headers=keyed, data={
            "image": (img, "p.jpg"), "audio": (aud, "a.flac"), "config": json.dumps({"min_resolution": 256, "seed": 8})})
    assert_clean_error(clash, 409, "conflict")
    # twins racing through the two API processes: one job, both answers name it
    ids, gate = [], threading.Barrier(2)

    def twin(api):
        gate.wait()
        ids.append(make(api, 9, {"Idempotency-Key": "race", **a}, **{"async": True})["job_id"])

    racers = [threading.Thread(target=twin, args=(api,)) for api in (one, two)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert len(ids) == 2 and ids[0] == ids[1]
    # a running job: canceled on its worker, then deleted
    long = make(one, 5, a, **{"async": True, "duration": 20})["job_id"]
    deadline = time.monotonic() + 60
    while one.get(f"/api/sonic/jobs/{long}", headers=a).get_json()["status"] != "processing":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert two.delete(f"/api/sonic/jobs/{long}", headers=a).status_code == 204
    assert_clean_error(one.get(f"/api/sonic/jobs/{long}", headers=a), 404, "job_not_found")
    assert not (c.tmp / "outputs" / f"{long}.mp4").exists()



def test_a_worker_sends_the_webhooks_of_the_job_it_runs(cluster):
    """Distributed: inputs fetched by URL reach the worker as uploads do; the start and the end of
    the job it runs are delivered, signed, in order, from Redis' outbox, by the worker itself."""
    from test_url_inputs import Files
    from test_webhooks import SECRET, Receiver, verified
    c = cluster()
    c.cfg["outbound"] = {"allow_private": True}
    c.cfg["webhooks"] = {"secret": SECRET}
    c.path.write_text(yaml.safe_dump(c.cfg))
    api = c.client()
    c.start_worker("hw")
    c.wait_workers(api, 1)
    rx, files = Receiver(free_port()), Files()
    try:
        r = api.post("/api/sonic/generate", json={
            "image_url": files.url("/portrait.jpg"), "audio_url": files.url("/speech.flac"),
            "config": {"min_resolution": 256, "seed": 11, "webhook": rx.url,
                       "webhook_events_filter": ["start", "completed"]}})
        assert r.status_code == 200, r.get_data()[:300]
        assert r.get_json()["frames"] == 75 and not job_uploads(c.tmp)
        bodies = [verified(d) for d in rx.wait(2, timeout=20)]
        assert [b["status"] for b in bodies] == ["processing", "succeeded"]
        assert bodies[1]["video_url"] == r.get_json()["video_url"] and bodies[1]["job_id"] == r.get_json()["job_id"]
    finally:
        rx.close()
        files.close()


def test_failed_webhooks_are_each_tried_again_on_time(redis_url):
    """More failing deliveries than are sent side by side: each is tried again 5 s after its first
    attempt. A sender that looked at the due list just before another delivery's failed attempt
    rescheduled it claimed that delivery anyway, and held it unsent for two minutes."""
    import redis
    from sonic_server.outbound import Reach
    from sonic_server.webhooks import SENDERS, Delivery, RedisOutbox, Webhooks
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    outbox = RedisOutbox(conn)
    hooks = Webhooks(outbox, lambda: "s3cret", retry_s=600, reach=Reach(private=True), outputs=None)
    closed = f"http://127.0.0.1:{free_port()}/hook"  # refused at once, every time
    now = time.time()
    ids = [f"msg_{i}" for i in range(SENDERS + 2)]
    for i, msg in enumerate(ids):
        # each its own receiver (a path of its own): one receiver that fails is sent one attempt
        # at a time, and six of them one after another, a tick apart, took 10-12 s
        url = f"{closed}/{i}"
        outbox.add(Delivery(msg, f"job_{i}", outbox.next_seq(), url, "completed", "{}", 0, now, now))
    hooks.start()
    try:
        def attempts() -> dict:
            return {msg: json.loads(conn.get(f"sonic:wh:{msg}"))["attempts"] for msg in ids}
        deadline = time.monotonic() + 12  # the second attempts are due 5-6 s from now
        while min(attempts().values()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert min(attempts().values()) >= 2, (attempts(), {k.decode(): conn.ttl(k) for k in conn.keys("sonic:wh:claim:*")})
    finally:
        hooks.stop()
        conn.flushdb()


def test_deliveries_waiting_for_one_job_are_bounded_in_redis_too(redis_url):
    """As with SQLite (tests/test_webhooks.py): a job's waiting deliveries are capped, in the
    same script that queues them; another job's still queue."""
    import redis
    from sonic_server.webhooks import MAX_PENDING_PER_JOB, Delivery, RedisOutbox
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    outbox = RedisOutbox(conn)
    now = time.time()
    queued = [outbox.add(Delivery(f"msg_{i}", "job_a", outbox.next_seq(), "http://h/", "completed", "{}", 0, now, now))
              for i in range(MAX_PENDING_PER_JOB + 3)]
    assert queued == [True] * MAX_PENDING_PER_JOB + [False] * 3
    assert conn.zcard("sonic:wh:q:job_a") == MAX_PENDING_PER_JOB and not conn.exists(f"sonic:wh:msg_{MAX_PENDING_PER_JOB}")
    assert outbox.add(Delivery("msg_b", "job_b", outbox.next_seq(), "http://h/", "completed", "{}", 0, now, now))
    # a deleted job's go with it, a cached answer's (suffixed) too; another job's stay
    assert outbox.add(Delivery("msg_c", "job_a.0f3c", outbox.next_seq(), "http://h/", "completed", "{}", 0, now, now))
    assert outbox.jobs_waiting() == 3  # /metrics' sonic_webhook_jobs_waiting
    outbox.forget_job("job_a")
    assert not conn.keys("sonic:wh:q:job_a*") and not conn.exists("sonic:wh:msg_0", "sonic:wh:msg_c")
    assert [m.decode() for m in conn.zrange("sonic:wh:due", 0, -1)] == ["msg_b"]
    assert outbox.jobs_waiting() == 1


def test_a_worker_whose_redis_does_not_answer_says_so_without_its_password():
    port = free_port()  # nothing listens there
    p = subprocess.run([sys.executable, "-m", "sonic", "worker", "--redis-url", f"redis://:S3cretPw@127.0.0.1:{port}/0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"redis://:***@127.0.0.1:{port}/0 does not answer" in p.stderr
    assert "S3cretPw" not in p.stdout + p.stderr


def test_an_api_process_started_before_its_redis_comes_up_with_it(tmp_path, monkeypatch, caplog):
    """Not set-up failed for good: "starting", saying why, until Redis answers; then ready for
    workers (none here: worker_stopped), and the log says so (it said only the wait)."""
    from sonic_server import create_app, loader
    monkeypatch.setattr(loader, "RETRY_S", 0.3)
    port = free_port()
    cfg = server_settings(tmp_path, redis_url=f"redis://:pw@127.0.0.1:{port}/0")  # a password it does not need
    client = create_app(cfg).test_client()
    h = client.get("/health")
    assert h.status_code == 503 and h.get_json()["readiness"] == "starting"
    assert "(Redis at redis://:***@127.0.0.1:" in h.get_json()["error"] and "trying again" in h.get_json()["error"]
    assert b"\nsonic_workers_live 0\n" in client.get("/metrics").data  # an alert on it fires meanwhile
    proc = start_redis(tmp_path, port)
    try:
        deadline = time.monotonic() + 15
        while client.get("/health").get_json()["readiness"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.2)
        h = client.get("/health").get_json()
        assert h["readiness"] == "worker_stopped" and "error" not in h
        assert "the store answers now: ready" in [rec.getMessage() for rec in caplog.records]
    finally:
        proc.terminate()
        proc.wait(10)
    metrics = client.get("/metrics")  # Redis gone again: the page still answers, the gauges at 0
    assert metrics.status_code == 200 and b"\nsonic_workers_live 0\n" in metrics.data


def test_a_wrong_redis_password_is_a_set_up_failure_not_a_wait(tmp_path):
    import redis
    from sonic_server import create_app
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--requirepass", "right",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                redis.Redis(port=port, password="right").ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        client = create_app(server_settings(tmp_path, redis_url=f"redis://:wrong@127.0.0.1:{port}/0")).test_client()
        h = client.get("/health").get_json()
        assert h["readiness"] == "setup_failed" and "refused" in h["error"] and "wrong" not in h["error"]
        # a worker too says it was refused (it said "does not answer (AuthenticationError)")
        worker = subprocess.run([sys.executable, "-m", "sonic", "worker", "--redis-url",
                                 f"redis://:wrong@127.0.0.1:{port}/0"], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert worker.returncode == 1 and worker.stderr.strip().splitlines()[-1] == (
            f"error: Redis at redis://:***@127.0.0.1:{port}/0 refused: invalid username-password pair or user is "
            "disabled. (server.redis_url)"), worker.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_worker_whose_metrics_port_is_taken_stops_before_it_registers():
    import socket
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "sonic", "worker", "--redis-url", f"redis://127.0.0.1:{free_port()}/0",
                        "--metrics-port", str(port), "--metrics-host", "127.0.0.1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    taken.close()
    assert p.returncode == 1, p.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}: another program uses that port: stop it, or choose another " \
           "port with --metrics-port" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.fixture
def redis_outbox(redis_url):
    """A webhook outbox in an empty Redis, emptied again after."""
    import redis
    from sonic_server.webhooks import RedisOutbox
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    yield RedisOutbox(conn)
    conn.flushdb()


def test_one_callers_waiting_deliveries_are_bounded_in_redis_too(redis_outbox):
    from test_webhooks import one_callers_waiting_deliveries_are_bounded
    one_callers_waiting_deliveries_are_bounded(redis_outbox)


def test_one_callers_receivers_hold_up_no_other_callers_deliveries_in_redis_too(redis_outbox):
    """As in memory and SQLite (tests/test_webhooks.py): the claim passes over a caller's
    deliveries while that caller has its share of attempts under way."""
    from test_webhooks import one_callers_receivers_hold_up_no_other
    one_callers_receivers_hold_up_no_other(redis_outbox, redis_outbox.next_seq)


def test_a_receiver_that_is_down_holds_up_no_other_receivers_deliveries_in_redis_too(redis_outbox):
    """As with SQLite (tests/test_webhooks.py): the claim passes over a receiver that may take no
    more attempts now, in the script that claims."""
    from test_webhooks import a_receiver_down_holds_up_no_other
    a_receiver_down_holds_up_no_other(redis_outbox, redis_outbox.next_seq)


def test_a_job_taken_from_the_queue_and_never_started_ends_or_runs_again(redis_url, tmp_path):
    """A worker killed between taking a job from RQ's queue and starting it (or an API process
    between saving a record and queueing it) left the record queued for ever, holding its
    caller's place: once every look has seen it in no queue and without a lease for the grace,
    it is lost as a killed run is (failed worker_lost, or queued again under retry_lost_jobs).
    One that waits in the queue, or that a worker is starting (its lease taken), is left alone."""
    import redis
    from sonic_server import lifecycle
    from sonic_server.jobs import JobRecord
    from sonic_server.queue.redis import RedisStore, enqueue, lease_key, queued_runs, reap, rq_job_id, rq_queue
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    store = RedisStore(conn)

    class Uploads:
        def remove(self, job_id):
            removed.append(job_id)
    removed: list[str] = []
    ending = lifecycle.JobEnd(Uploads())

    def queued(in_queue: bool) -> JobRecord:
        rec = lifecycle.queue(JobRecord.new("generate", {"seed": 1}))
        store.save(rec)
        enqueue(conn, rec)
        if not in_queue:
            conn.lrem(rq_queue(conn).key, 0, rq_job_id(rec))  # a worker took it, and was killed
        return rec

    try:
        taken, waiting, starting = queued(False), queued(True), queued(False)
        conn.set(lease_key(starting.id), "a worker", px=60_000)
        reap(store, 0, tmp_path, ending, grace_s=0.5)         # seen once: a worker may be starting it
        assert {store.load(r.id).status for r in (taken, waiting, starting)} == {"queued"}
        time.sleep(0.6)
        reap(store, 0, tmp_path, ending, grace_s=0.5)
        lost = store.load(taken.id)
        assert lost.status == "failed" and lost.error["code"] == "worker_lost" and removed == [taken.id]
        assert store.load(waiting.id).status == "queued" and store.load(starting.id).status == "queued"
        # with a retry: queued again, as a new run, in the queue
        again = queued(False)
        reap(store, 1, tmp_path, ending, grace_s=0.5)
        time.sleep(0.6)
        reap(store, 1, tmp_path, ending, grace_s=0.5)
        back = store.load(again.id)
        assert back.status == "queued" and back.attempts == 1 and rq_job_id(back) in queued_runs(conn)
        # seen in the queue between two looks: the first look's sighting is forgotten
        moving = queued(False)
        reap(store, 0, tmp_path, ending, grace_s=0.5)
        enqueue(conn, moving)
        reap(store, 0, tmp_path, ending, grace_s=0.5)
        conn.lrem(rq_queue(conn).key, 0, rq_job_id(moving))
        time.sleep(0.6)
        reap(store, 0, tmp_path, ending, grace_s=0.5)
        assert store.load(moving.id).status == "queued"
        # a run lost, queued again and started at once, twice: each loss queues it again (the
        # queued-again run, not yet in the queue the look had read, was marked, and the mark,
        # left by the started run, declared the next queued-again run lost in the same look)
        twice = queued(True)
        for run in (1, 2):
            rec = store.load(twice.id)
            conn.lrem(rq_queue(conn).key, 0, rq_job_id(rec))       # a worker takes it, starts it ...
            assert store.swap(lifecycle.start(rec.copy(), worker="w"), "queued", rec.attempts)
            reap(store, 2, tmp_path, ending, grace_s=0.5)        # ... and is killed: no lease
            time.sleep(0.6)
        back = store.load(twice.id)
        assert back.status == "queued" and back.attempts == 2 and rq_job_id(back) in queued_runs(conn)
    finally:
        conn.flushdb()


def test_a_claim_reaches_past_any_number_of_deliveries_to_receivers_passed_over(redis_url):
    """1,200 due deliveries to a receiver that is down (passed over) sort before one to another
    receiver: the claim looked at the first 1,000 and gave nothing, every time. Those passed over
    are looked at again a second later; their own times are left as they were."""
    import redis
    from sonic_server.webhooks import Delivery, RedisOutbox, receiver_of
    conn = redis.Redis.from_url(redis_url)
    conn.flushdb()
    outbox = RedisOutbox(conn)
    down, up = "http://127.0.0.1:9/hooks/customer-1", "http://127.0.0.1:9/hooks/customer-2"  # one host, two receivers
    now = time.time()
    try:
        for i in range(1200):
            outbox.add(Delivery(f"msg_{i}", f"job_{i}", outbox.next_seq(), down, "completed", "{}", 0, now, now))
        outbox.add(Delivery("msg_up", "job_up", outbox.next_seq(), up, "completed", "{}", 0, now + 1e-3, now))
        got = []
        for _ in range(10):
            got = outbox.due(now + 0.1, 1, skip={receiver_of(down)})
            if got:
                break
        assert [d.id for d in got] == ["msg_up"]
        assert json.loads(conn.get("sonic:wh:msg_0"))["next_at"] == now
        assert [d.url for d in outbox.due(now + 1.2, 1)] == [down]  # looked at again a second later
    finally:
        conn.flushdb()
