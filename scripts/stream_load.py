"""Held connections against a running service: SSE streams and slow uploads; prints one JSON line.

usage: python scripts/stream_load.py --base http://127.0.0.1:5000 --long-audio 60s.wav [--streams 50] [--slow 20]

Every client comes from this one address: start the service with a rate limit that lets them
through (SONIC_RATE_LIMIT_PER_S=1000 SONIC_RATE_LIMIT_BURST=1000), as 70 real clients from 70
addresses would be.

1. One long async job (512 px, the `--long-audio` recording) and `--streams` clients that hold
   its SSE event stream open.
2. `--slow` clients that send a multipart upload's headers and then one byte a second.
3. Meanwhile (while the long job still runs): /health latency (20 probes), /api/sonic/params
   latency (5), and one new async generate request (1 s, 256 px): is it accepted, how fast.
The two jobs are canceled at the end.
"""
import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT, SPEECH = ROOT / "examples" / "portrait.jpg", ROOT / "examples" / "speech.flac"


def generate(base: str, config: dict, timeout: float = 120, audio: Path = SPEECH) -> requests.Response:
    with open(PORTRAIT, "rb") as img, open(audio, "rb") as aud:
        return requests.post(base + "/api/sonic/generate", files={"image": img, "audio": aud},
                             data={"config": json.dumps(config)}, timeout=timeout)


def hold_stream(url: str, stop: threading.Event, opened: list) -> None:
    """Open the job's event stream; record the seconds to its first line (or the failure)."""
    t0 = time.perf_counter()
    try:
        with requests.get(url, stream=True, timeout=(5, 300)) as r:
            if r.status_code != 200:
                opened.append(f"status {r.status_code}")
                return
            for i, _ in enumerate(r.iter_lines()):
                if i == 0:
                    opened.append(time.perf_counter() - t0)
                if stop.is_set():
                    return
    except requests.RequestException as e:
        opened.append(type(e).__name__)


def timed(fn, n: int, pause: float = 0.1) -> dict:
    """Call `fn` n times: median and max milliseconds of the answered calls, and the failures."""
    lat, failed = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            r = fn()
            if r.status_code >= 500:
                failed.append(r.status_code)
            else:
                lat.append(1000 * (time.perf_counter() - t0))
        except requests.RequestException as e:
            failed.append(type(e).__name__)
        time.sleep(pause)
    return {"ms_median": round(statistics.median(lat), 1) if lat else None,
            "ms_max": round(max(lat), 1) if lat else None, "answered": len(lat), "failed": failed}


def slow_upload(host: str, port: int, stop: threading.Event, sent: list) -> None:
    try:
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"POST /api/sonic/generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                  b"boundary=zz\r\nContent-Length: 100000\r\n\r\n--zz\r\n")
        n = 0
        while not stop.is_set():
            s.sendall(b"a")
            n += 1
            stop.wait(1.0)
        sent.append(n)
        s.close()
    except OSError:
        sent.append("error")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:5000")
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--long-audio", type=Path, required=True,
                    help="a recording long enough (e.g. 60 s) that the job outlasts the probes")
    a = ap.parse_args()
    u = urlparse(a.base)
    quiet = {"params": timed(lambda: requests.get(a.base + "/api/sonic/params", timeout=10), 5)}
    r = generate(a.base, {"min_resolution": 512, "async": True}, audio=a.long_audio)
    if r.status_code != 202:
        sys.exit(f"the long job was not accepted: {r.status_code} {r.text[:200]}")
    status_url = r.json()["status_url"]
    stop = threading.Event()
    opened, sent = [], []
    threads = [threading.Thread(target=hold_stream, args=(status_url + "/events", stop, opened), daemon=True)
               for _ in range(a.streams)]
    threads += [threading.Thread(target=slow_upload, args=(u.hostname, u.port, stop, sent), daemon=True)
                for _ in range(a.slow)]
    for t in threads:
        t.start()
    time.sleep(5)                                     # let every connection settle
    try:
        status_before = requests.get(status_url, timeout=30).json()["status"]
    except (requests.RequestException, ValueError, KeyError) as e:
        status_before = type(e).__name__
    opened_in_5s = [x for x in opened if isinstance(x, float)]
    health = timed(lambda: requests.get(a.base + "/health", timeout=10), 20)
    params = timed(lambda: requests.get(a.base + "/api/sonic/params", timeout=10), 5)
    t0 = time.perf_counter()
    try:                                              # a new job is accepted (it waits for the worker)
        new = generate(a.base, {"min_resolution": 256, "duration": 1, "async": True,
                                "seed": int(time.time()) % 10**6}, timeout=30)
        new_result = {"status": new.status_code, "s": round(time.perf_counter() - t0, 2)}
    except requests.RequestException as e:
        new_result = {"status": type(e).__name__, "s": round(time.perf_counter() - t0, 2)}
    try:
        long_status = requests.get(status_url, timeout=10).json()["status"]
    except (requests.RequestException, ValueError, KeyError):
        long_status = "unknown"
    stop.set()
    for url in (status_url, (new.json() or {}).get("status_url") if new_result["status"] == 202 else None):
        if url:
            try:
                requests.post(url + "/cancel", timeout=30)
            except requests.RequestException:
                pass
    print(json.dumps({
        "long_job_status": {"before_probes": status_before, "after_probes": long_status},
        "streams_requested": a.streams, "streams_open_after_5s": len(opened_in_5s),
        "stream_first_line_s_max": round(max(opened_in_5s), 2) if opened_in_5s else None,
        "stream_failures": [x for x in opened if not isinstance(x, float)],
        "slow_uploads": a.slow, "params_idle": quiet["params"],
        "health": health, "params": params, "new_async_request": new_result}))


if __name__ == "__main__":
    main()
