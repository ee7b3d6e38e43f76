"""The HTTP service through a real server (python app.py) on a free loopback port."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
import requests
import soundfile as sf
import yaml

from sonic import load_config
from conftest import PORTRAIT, ROOT, SPEECH

FAST = {"min_resolution": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp, **server_settings):
    cfg = load_config()
    cfg["output_dir"] = str(tmp / "outputs")
    cfg["server"].update(upload_dir=str(tmp / "uploads"), jobs_db=str(tmp / "jobs.sqlite3"), rate_limit_per_s=1000,
                         rate_limit_burst=1000)
    cfg["server"].update(server_settings)
    cfg["limits"]["max_upload_mb"] = 2
    (tmp / "settings.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp / "server.log", "a+")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--config", str(tmp / "settings.yaml")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    seen = set()
    for _ in range(240):
        try:
            r = requests.get(base + "/health", timeout=1)
            seen.add((r.status_code, r.json()["readiness"]))
            if r.json()["readiness"] == "ready":
                break
        except requests.RequestException:
            pass
        time.sleep(0.25)
    else:
        proc.kill()
        log.seek(0)
        pytest.fail("server did not start: " + log.read()[-2000:])
    return proc, {"base": base, "tmp": tmp, "log": log, "startup_states": seen}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, info = start_server(tmp_path_factory.mktemp("srv"), queue_size=2, sync_wait_s=60, retry_after_s=7)
    yield info
    proc.terminate()
    proc.wait(10)


def test_slow_sync_request_gets_its_job_id(tmp_path):
    proc, srv = start_server(tmp_path, queue_size=2, sync_wait_s=0.5)
    try:
        r = post(srv, {**FAST, "duration": 20})
        assert r.status_code == 202 and r.json()["job_id"] and r.json()["status_url"]
        assert wait_done(srv, r.json()["job_id"])["status"] == "succeeded"
    finally:
        proc.terminate()
        proc.wait(10)


def test_api_keys_and_rate_limit(tmp_path):
    proc, srv = start_server(tmp_path, api_keys=["s3cret-key"], rate_limit_per_s=2, rate_limit_burst=3)
    try:
        url = srv["base"] + "/api/sonic/params"
        r = requests.get(url)
        assert_clean_error(r, 401, "unauthorized")
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert_clean_error(requests.get(url, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        assert_clean_error(post(srv), 401, "unauthorized")
        auth = {"Authorization": "Bearer s3cret-key"}
        codes = [requests.get(url, headers=auth).status_code for _ in range(6)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        limited = requests.get(url, headers=auth)
        assert_clean_error(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
        assert all(requests.get(srv["base"] + "/health").status_code == 200 for _ in range(10))
        time.sleep(1.1)
        assert requests.get(url, headers=auth).status_code == 200          # the bucket refills
    finally:
        proc.terminate()
        proc.wait(10)


def post(server, config=None, image=PORTRAIT, audio=SPEECH, headers=None):
    files = {"image": ("face.jpg", open(image, "rb")), "audio": ("talk.flac", open(audio, "rb"))}
    data = {"config": json.dumps(config if config is not None else FAST)}
    return requests.post(server["base"] + "/api/sonic/generate", files=files, data=data, headers=headers or {},
                         timeout=120)


def wait_done(server, job_id, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        s = requests.get(f"{server['base']}/api/sonic/jobs/{job_id}", timeout=5).json()
        if s["status"] in ("succeeded", "failed", "canceled"):
            return s
        time.sleep(0.2)
    raise AssertionError("job did not finish")


def assert_clean_error(r, status, code, field=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code and body["request_id"]
    if field:
        assert body["error"]["field"] == field
    assert "Traceback" not in r.text and str(ROOT) not in r.text


def test_health_params_openapi(server):
    # while the models load the server already answers: 503 "starting", then 200 "ready"
    assert server["startup_states"] <= {(503, "starting"), (200, "ready")}
    h = requests.get(server["base"] + "/health").json()
    assert h["readiness"] in ("ready", "busy") and "queue_length" in h
    p = requests.get(server["base"] + "/api/sonic/params").json()["parameters"]
    assert p["fps"]["minimum"] == 10 and p["dynamic_scale"]["default"] == 1.0
    spec = requests.get(server["base"] + "/openapi.json").json()
    assert spec["openapi"].startswith("3.") and "/api/sonic/generate" in spec["paths"]
    assert set(p) <= set(spec["components"]["schemas"]["Parameters"]["properties"])


def test_sync_generate_and_download(server):
    r = post(server, {**FAST, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] and body["seed"] == 3 and body["width"] == 256 and body["fps"] == 25
    assert abs(body["duration"] - 3.0) <= 0.04 and "lipsync_offset_ms" in body and "render" in body["timings"]
    assert r.headers["X-Request-ID"]
    video = requests.get(body["video_url"], timeout=30)
    assert video.status_code == 200 and video.headers["Content-Type"] == "video/mp4"
    path = server["tmp"] / "dl.mp4"
    path.write_bytes(video.content)
    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 75 and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 256
    uploads = server["tmp"] / "uploads"
    assert not any(p.is_file() for p in uploads.rglob("*"))          # inputs deleted when the job ends

    part = requests.get(body["video_url"], headers={"Range": "bytes=100-199"}, timeout=30)
    assert part.status_code == 206 and part.content == video.content[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(video.content)}"

    again = post(server, {**FAST, "seed": 3})                       # identical request: cached
    assert again.status_code == 200 and again.json()["cached"] is True
    assert again.json()["video_url"] == body["video_url"]


def test_async_status_and_events(server):
    r = post(server, {**FAST, "seed": 4}, headers={"Prefer": "respond-async"})
    assert r.status_code == 202 and r.json()["status"] in ("queued", "processing")
    job = r.json()["job_id"]
    assert r.headers["Location"].endswith(job)
    events = []
    with requests.get(f"{server['base']}/api/sonic/jobs/{job}/events", stream=True, timeout=120) as s:
        assert s.headers["Content-Type"].startswith("text/event-stream")
        for line in s.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert events[-1]["status"] == "succeeded" and events[-1]["video_url"].endswith(".mp4")
    assert any(e["status"] == "processing" for e in events) or len(events) == 1
    status = wait_done(server, job)
    assert status["status"] == "succeeded" and status["video_url"] == events[-1]["video_url"]
    r2 = post(server, {**FAST, "seed": 5, "async": True})
    assert r2.status_code == 202
    assert wait_done(server, r2.json()["job_id"])["status"] == "succeeded"


def test_cancel(server):
    r = post(server, {**FAST, "seed": 6, "duration": 30, "async": True})
    assert r.status_code == 202
    job = r.json()["job_id"]
    time.sleep(1.0)
    c = requests.post(f"{server['base']}/api/sonic/jobs/{job}/cancel", timeout=30).json()
    assert c["status"] == "canceled"
    assert not (server["tmp"] / "outputs" / f"{job}.mp4").exists()
    assert not list((server["tmp"] / "outputs").glob(".*.part"))
    assert requests.get(f"{server['base']}/api/sonic/jobs/nope").status_code == 404


def wait_idle(server, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        h = requests.get(server["base"] + "/health").json()
        if h["running_job"] is None and h["queue_length"] == 0:
            return
        time.sleep(0.1)
    raise AssertionError("server did not become idle")


def test_queue_full_then_503(server):
    wait_idle(server)
    long = {**FAST, "duration": 30, "async": True}
    running = post(server, {**long, "seed": 7})
    assert running.status_code == 202
    for _ in range(100):                                  # the worker has taken it: queue empty
        if requests.get(f"{server['base']}/api/sonic/jobs/{running.json()['job_id']}").json()["status"] != "queued":
            break
        time.sleep(0.05)
    queued = [post(server, {**long, "seed": s}) for s in (8, 9)]
    assert all(r.status_code == 202 for r in queued)
    full = post(server, {**long, "seed": 10})
    assert_clean_error(full, 503, "busy")
    assert full.headers["Retry-After"] == "7"
    for r in queued + [running]:
        requests.post(f"{server['base']}/api/sonic/jobs/{r.json()['job_id']}/cancel", timeout=30)
    # canceled queued jobs free their places at once
    assert requests.get(server["base"] + "/health").json()["queue_length"] == 0
    for r in queued + [running]:
        assert wait_done(server, r.json()["job_id"])["status"] == "canceled"


def test_concurrent_sync_requests(server):
    wait_idle(server)                                     # two requests fit: one runs, one waits
    results = {}

    def call(seed):
        results[seed] = post(server, {**FAST, "seed": seed, "duration": 1.0})
    threads = [threading.Thread(target=call, args=(s,)) for s in (21, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    assert len({r.json()["video_url"] for r in results.values()}) == 2


def test_errors(server, tmp_path):
    r = requests.post(server["base"] + "/api/sonic/generate", files={"image": open(PORTRAIT, "rb"),
                      "audio": open(SPEECH, "rb")}, data={"config": "{bad"})
    assert_clean_error(r, 400, "invalid_parameter", "config")
    assert_clean_error(post(server, {"fps": 500}), 400, "invalid_parameter", "fps")
    assert_clean_error(post(server, {"dynamic_scal": 1}), 400, "invalid_parameter", "dynamic_scal")
    r = requests.post(server["base"] + "/api/sonic/generate", files={"image": open(PORTRAIT, "rb")})
    assert_clean_error(r, 400, "invalid_parameter", "audio")
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    assert_clean_error(post(server, audio=big), 413, "input_too_large")
    assert_clean_error(post(server, image=SPEECH), 415, "unsupported_media", "image")
    assert_clean_error(post(server, audio=PORTRAIT), 415, "unsupported_media", "audio")
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 90, np.uint8))
    assert_clean_error(post(server, image=blank), 422, "no_face_detected", "image")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    assert_clean_error(post(server, audio=silent), 422, "empty_audio", "audio")
    for path in ("/output/../app.py", "/output/..%2Fapp.py", "/output/app.py", "/output/" + "0" * 32 + ".mp4"):
        assert requests.get(server["base"] + path).status_code == 404
    assert not any(p.is_file() for p in (server["tmp"] / "uploads").rglob("*"))


def test_hostile_inputs(server, tmp_path):
    from PIL import Image
    from sonic.media import FFMPEG
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)           # 144 Mpx in a few hundred kB
    assert bomb.stat().st_size < 2 * 1024 * 1024
    assert_clean_error(post(server, image=bomb), 413, "input_too_large", "image")
    long = tmp_path / "long.ogg"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=220:duration=320:sample_rate=8000",
                    "-c:a", "libopus", "-b:a", "6k", str(long)], check=True)
    assert_clean_error(post(server, audio=long), 422, "audio_too_long", "audio")
    for raw in ('{"dynamic_scale": NaN}', '{"fps": Infinity}', '{"seed": "1; rm -rf /"}', '[1, 2]', '"x"',
                '{"min_resolution": 1e308}', "{" + '"a":1,' * 3000 + '"b":2}'):
        r = requests.post(server["base"] + "/api/sonic/generate", files={"image": open(PORTRAIT, "rb"),
                          "audio": open(SPEECH, "rb")}, data={"config": raw})
        assert_clean_error(r, 400, "invalid_parameter")
    files = {"image": ("../../../../tmp/evil\u202e.jpg", open(PORTRAIT, "rb")),
             "audio": ("..%2F..%2Fé.flac", open(SPEECH, "rb"))}
    r = requests.post(server["base"] + "/api/sonic/generate", files=files,
                      data={"config": json.dumps({**FAST, "duration": 0.5, "seed": 41})})
    assert r.status_code == 200 and r.json()["video_url"].rsplit("/", 1)[1].count(".") == 1
    assert not os.path.exists("/tmp/evil\u202e.jpg")
    # polyglots: judged by what decodes. A JPEG with a ZIP/HTML tail is a JPEG; a GIF is refused;
    # a WAV header over noise-free garbage is refused as audio
    poly = tmp_path / "poly.jpg"
    poly.write_bytes(PORTRAIT.read_bytes() + b"PK\x03\x04" + b"<html><script>alert(1)</script></html>" * 50)
    assert post(server, {**FAST, "duration": 0.5, "seed": 42}, image=poly).status_code == 200
    gif = tmp_path / "a.gif"
    Image.open(PORTRAIT).save(gif, format="GIF")
    assert_clean_error(post(server, image=gif), 415, "unsupported_media", "image")
    fake_wav = tmp_path / "fake.wav"
    fake_wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + PORTRAIT.read_bytes()[:4000])
    r = post(server, audio=fake_wav)
    assert r.status_code in (415, 422) and r.json()["error"]["field"] == "audio"
    assert not any(p.is_file() for p in (server["tmp"] / "uploads").rglob("*"))


def test_cors_and_request_id(server):
    r = requests.options(server["base"] + "/api/sonic/generate", headers={"Origin": "http://app.example"})
    assert r.status_code in (200, 204) and r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.get(server["base"] + "/health", headers={"X-Request-ID": "abc123"})
    assert r.headers["X-Request-ID"] == "abc123"
    server["log"].flush()
    lines = (server["tmp"] / "server.log").read_text().splitlines()
    assert any('"request_id": "abc123"' in l and '"route": "/health"' in l for l in lines)


def test_killed_mid_job_then_restart(tmp_path):
    proc, srv = start_server(tmp_path, queue_size=2, sync_wait_s=60)
    try:
        done = post(srv, {**FAST, "seed": 31, "duration": 1.0})
        assert done.status_code == 200
        r = post(srv, {**FAST, "seed": 32, "duration": 60, "async": True})
        job = r.json()["job_id"]
        for _ in range(100):
            if requests.get(f"{srv['base']}/api/sonic/jobs/{job}").json()["status"] == "processing":
                break
            time.sleep(0.1)
        time.sleep(1.0)
        proc.kill()                                          # no clean shutdown
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    proc2, srv2 = start_server(tmp_path, queue_size=2, sync_wait_s=60)
    try:
        s = requests.get(f"{srv2['base']}/api/sonic/jobs/{job}").json()
        assert s["status"] == "failed" and s["error"]["code"] == "interrupted"
        assert not list((tmp_path / "outputs").glob(".*.part"))
        assert not (tmp_path / "outputs" / f"{job}.mp4").exists()
        assert not (tmp_path / "uploads" / job).exists()
        old = requests.get(f"{srv2['base']}/api/sonic/jobs/{done.json()['job_id']}").json()
        name = done.json()["video_url"].rsplit("/", 1)[1]
        assert old["status"] == "succeeded" and old["video_url"] == f"{srv2['base']}/output/{name}"
        assert requests.get(old["video_url"]).status_code == 200
        again = post(srv2, {**FAST, "seed": 31, "duration": 1.0})      # cache survives the restart
        assert again.json().get("cached") is True
    finally:
        proc2.terminate()
        proc2.wait(10)


def test_slow_upload_is_dropped(tmp_path):
    proc, srv = start_server(tmp_path, socket_timeout_s=1.5)
    try:
        host, port = srv["base"].rsplit("/", 1)[1].split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(b"POST /api/sonic/generate HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000000\r\n\r\n--b\r\n")
        t0 = time.time()
        assert requests.get(srv["base"] + "/health", timeout=5).status_code == 200   # others still served
        sock.settimeout(10)
        try:
            while sock.recv(4096):            # the server answers and/or closes the stalled request
                pass
        except (ConnectionResetError, socket.timeout):
            pass
        assert time.time() - t0 < 8
        sock.close()
        assert requests.get(srv["base"] + "/health", timeout=5).status_code == 200
        assert not any(p.is_file() for p in (tmp_path / "uploads").rglob("*"))
    finally:
        proc.terminate()
        proc.wait(10)
