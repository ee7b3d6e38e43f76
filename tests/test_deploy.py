"""The container files, checked without Docker (no daemon on this project's machines): the compose
files against the Compose Specification's schema, every SONIC_* variable they and the Dockerfile
set against the settings, and the Dockerfile's promises (non-root, port 8080, health check)."""
import gzip
import json
import re

import pytest
import yaml
from jsonschema import Draft7Validator

from conftest import ROOT
from server_helpers import FAST, assert_clean_error, post
from sonic.settings import SettingsError, read_yaml
from sonic_server.settings import settings_from

COMPOSE = ROOT / "deploy" / "compose.yaml"
COMPOSE_S3 = ROOT / "deploy" / "compose.s3.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def compose_schema() -> dict:
    with gzip.open(ROOT / "tests" / "data" / "compose-spec.json.gz", "rt") as f:
        return json.load(f)


def load(path) -> dict:
    return yaml.safe_load(path.read_text())


def dockerfile_env() -> dict:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_S3], ids=["compose", "compose.s3"])
def test_the_compose_files_follow_the_compose_specification(path):
    errors = sorted(Draft7Validator(compose_schema()).iter_errors(load(path)), key=str)
    assert not errors, [f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors]


def test_a_schema_violation_is_caught():
    broken = load(COMPOSE)
    broken["services"]["worker"]["comand"] = broken["services"]["worker"].pop("command")     # a typo
    assert list(Draft7Validator(compose_schema()).iter_errors(broken))


def test_every_variable_the_containers_set_is_a_setting_with_a_valid_value():
    base, s3 = load(COMPOSE), load(COMPOSE_S3)
    image = dockerfile_env()
    for service in ("api", "worker"):
        for env in (base["x-sonic"]["environment"], s3["services"][service]["environment"]):
            merged = {**image, **env}
            names = [k for k in merged if k.startswith("SONIC_")]
            settings = settings_from(read_yaml(None), env=merged)      # unknown values raise SettingsError
            assert settings.server.redis_url == "redis://redis:6379/0" and names
    s = settings_from(read_yaml(None), env={**image, **s3["services"]["worker"]["environment"]})
    assert (s.storage, s.s3.bucket, s.s3.endpoint_url) == ("s3", "sonic", "http://minio:9000")
    assert s.server.port == 8080 and s.server.host == "0.0.0.0" and s.output_dir == "/srv/sonic/outputs"
    with pytest.raises(SettingsError, match="storage"):                 # the check above can fail
        settings_from(read_yaml(None), env={"SONIC_STORAGE": "s4"})


def test_the_dockerfile_runs_waitress_on_8080_as_a_user_with_a_health_check():
    text = DOCKERFILE.read_text()
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*127\.0\.0\.1:8080/health", text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[0] == "waitress-serve" and "--listen=0.0.0.0:8080" in cmd
    module, _, factory = cmd[-1].partition(":")
    import importlib
    assert callable(getattr(importlib.import_module(module), factory))
    assert "pip install --no-cache-dir -r requirements.txt" in text and "torch==2.13.0" in text
    worker = load(COMPOSE)["services"]["worker"]["command"]
    assert worker[:2] == ["sonic", "worker"]


def test_under_waitress_a_settings_file_a_log_line_per_request_and_job_and_a_drain_on_sigterm(tmp_path):
    """The production command (waitress-serve --call sonic_server.wsgi:make_app, the Dockerfile's)
    takes its settings file from SONIC_CONFIG and logs as `sonic serve` does: each request's line
    with its client, its job or its error code, and each job's end, here as JSON lines
    (`server.log_format: json`: every line an object with its UTC time, level and logger; a
    request's and a job's fields as fields; a 200 to a health probe not at INFO); a bad setting
    is one line, and so is a second service started on the same data folder (it took the first
    one's running jobs for a restart's leftovers and ran its waiting jobs again).
    Stopped by SIGTERM (docker stop) while a synchronous generate waits for its video, it still
    answers that request (waitress alone would die at once), answers new ones 503 `busy`, and
    ends within server.drain_s."""
    import os
    import subprocess
    import sys
    import time

    import requests

    from conftest import PORTRAIT, SPEECH
    from server_helpers import settings
    from test_http_live import free_port, sigterm_while_generating

    cfg = settings(tmp_path, drain_s=20, sync_wait_s=60)
    cfg["defaults"]["min_resolution"] = 256
    cfg["server"]["log_format"] = "json"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    port, log = free_port(), tmp_path / "server.log"
    waitress = [sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--threads=4", "--asyncore-use-poll",
                "--call", "sonic_server.wsgi:make_app"]
    bad = subprocess.run(waitress, cwd=ROOT, env={**os.environ, "SONIC_QUEUE_SIZE": "-1"}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: setting server.queue_size must be a number more than 0, got -1"]
    env = {**os.environ, "SONIC_CONFIG": str(tmp_path / "s.yaml")}
    with open(log, "w") as out:
        proc = subprocess.Popen(waitress, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(base + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.25)
        with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
            done = requests.post(base + "/api/sonic/generate", files={"image": img, "audio": aud}, timeout=120).json()
        second = subprocess.run([sys.executable, "-m", "sonic", "serve", "--port", str(free_port()), "--config",
                                 str(tmp_path / "s.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        third = subprocess.run([sys.executable, "-m", "sonic", "serve", "--port", str(free_port()), "--config",
                                str(tmp_path / "s.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "SONIC_JOBS_DB": ""})
        fourth = subprocess.run([sys.executable, "-m", "sonic", "serve", "--port", str(free_port()), "--config",
                                 str(tmp_path / "s.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "SONIC_JOBS_DB": "", "SONIC_UPLOAD_DIR": str(tmp_path / "up4")})
        (tmp_path / "other.yaml").write_text(yaml.safe_dump(settings(tmp_path / "other")))
        taken = subprocess.run([sys.executable, "-m", "sonic", "serve", "--port", str(port), "--config",
                                str(tmp_path / "other.yaml")], cwd=ROOT, capture_output=True, text=True, timeout=120)
        refused = requests.post(base + "/api/sonic/generate", files={"image": b"x"}, timeout=30)
        in_flight, answer = sigterm_while_generating(proc, {"base": base})
        stopping = requests.get(base + "/health", timeout=5)
        in_flight.join(60)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    text = log.read_text()
    assert done["success"] and refused.status_code == 400
    assert second.returncode == 1 and second.stderr.strip().splitlines() == [
        f"error: another sonic service uses the job database {(tmp_path / 'data' / 'jobs.sqlite3').resolve()} "
        "(server.data_dir): run one service process per data folder, or several API processes with Redis "
        "(docs/scaling.md)"], second.stderr
    # nor may one with its own job database share the upload folder (its start removed the first's uploads)
    assert third.returncode == 1 and "another sonic service uses the upload folder" in third.stderr, third.stderr
    # nor the output folder (its start removed the video the first was writing: that job failed)
    assert fourth.returncode == 1 and "another sonic service uses the output folder" in fourth.stderr, fourth.stderr
    # a port another program holds: which setting to change, not the OS's words alone
    assert taken.returncode == 1 and taken.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port}: another program uses that port: stop it, or choose another "
        "port with --port (SONIC_PORT)"), taken.stderr
    long = answer["r"]
    assert getattr(long, "status_code", None) == 200 and long.json()["frames"] == 1000, long
    assert stopping.status_code == 503 and stopping.json()["error"]["code"] == "busy"  # a balancer takes it out
    assert stopping.headers["Retry-After"] and stopping.headers["X-Request-ID"]
    assert "SIGTERM: stopping; new work is refused (503), 1 answer(s) in flight get up to 20 s" in text
    assert done["width"] == 256  # the file's defaults were read
    records = [json.loads(line) for line in text.splitlines() if line.strip()]  # each line: one object
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]) for r in records)
    lines = [r for r in records if r["logger"] == "sonic.http" and r["message"] == "request"]
    assert all(r["level"] == "INFO" for r in lines)
    made = [line for line in lines if line["route"] == "/api/sonic/generate" and line["status"] == 200]
    assert made and made[0]["job_id"] == done["job_id"] and made[0]["client"] == "127.0.0.1"
    assert any(line["status"] == 400 and line.get("error_code") == "invalid_parameter" for line in lines)
    probes = [line["status"] for line in lines if line["route"] == "/health"]
    assert probes == [503]  # the answers while starting (connection refused) and 200 are not at INFO
    ended = [r for r in records if r["logger"] == "sonic.jobs" and r["message"] == "job ended"]
    assert any(r["job_id"] == done["job_id"] and r["status"] == "succeeded" and r["wait_s"] >= 0 for r in ended)


def test_a_stopping_app_refuses_new_work_answers_the_rest_and_waits_for_no_stream_or_file(make_client):
    """While a SIGTERM drains (under a WSGI server), new work and /health are refused 503 `busy`
    through the app's own error path (request id, CORS); a status read is still answered. An
    event stream (it ends when its client leaves) and a file the server sends by itself (a
    thread each, under waitress) are not waited for; other answers are, until their close."""
    from sonic_server.drain import STREAMING, Drain

    client, _ = make_client()
    drain = client.application.wsgi_app
    assert isinstance(drain, Drain)
    job = post(client, {**FAST, "async": True}).get_json()["job_id"]
    drain.stopping.set()
    refused = post(client, FAST)
    assert_clean_error(refused, 503, "busy")
    assert "stopping" in refused.get_json()["error"]["message"] and refused.headers["X-Request-ID"]
    assert client.get("/health").status_code == 503
    assert client.get(f"/api/sonic/jobs/{job}").status_code == 200

    class FileWrapper:
        def __init__(self, f, size=8192):
            self.f = f

        def __iter__(self):
            return iter([b"video"])

    def app(environ, start_response):
        start_response("200 OK", [])
        if environ["PATH_INFO"] == "/stream":
            environ[STREAMING] = True
        return FileWrapper(None) if environ["PATH_INFO"] == "/file" else iter([b"answer"])

    counted = Drain(app, 1.0)
    for path, waited in (("/answer", True), ("/stream", False), ("/file", False)):
        body = counted({"PATH_INFO": path, "wsgi.file_wrapper": FileWrapper}, lambda *a: None)
        assert counted.in_flight.count == (1 if waited else 0), path
        if path == "/file":
            assert isinstance(body, FileWrapper)  # as it is: the server sends it by itself
        body.close() if hasattr(body, "close") else None
        assert counted.in_flight.count == 0
