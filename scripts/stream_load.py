"""Held connections against a running service: SSE streams and slow uploads; prints one JSON line.

usage: python scripts/stream_load.py --base http://127.0.0.1:5000 [--streams 50] [--slow 20]

1. One long async job (256 px, `--job-s` seconds of padded audio) and `--streams` clients that
   hold its SSE event stream open.
2. `--slow` clients that send a multipart upload's headers and then one byte a second.
3. Meanwhile: /health latency (20 probes), and one new small generate request (1 s, 256 px):
   is it answered, how fast, and with which status.
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


def generate(base: str, config: dict, timeout: float = 120) -> requests.Response:
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        return requests.post(base + "/api/sonic/generate", files={"image": img, "audio": aud},
                             data={"config": json.dumps(config)}, timeout=timeout)


def hold_stream(url: str, stop: threading.Event, opened: list) -> None:
    try:
        with requests.get(url, stream=True, timeout=(5, 300)) as r:
            opened.append(r.status_code)
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    except requests.RequestException:
        opened.append("error")


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
    ap.add_argument("--job-s", type=float, default=60.0)
    a = ap.parse_args()
    u = urlparse(a.base)
    r = generate(a.base, {"min_resolution": 256, "duration": a.job_s, "async": True})
    if r.status_code != 202:
        sys.exit(f"the long job was not accepted: {r.status_code} {r.text[:200]}")
    events = r.json()["status_url"] + "/events"
    stop = threading.Event()
    opened, sent = [], []
    threads = [threading.Thread(target=hold_stream, args=(events, stop, opened), daemon=True)
               for _ in range(a.streams)]
    threads += [threading.Thread(target=slow_upload, args=(u.hostname, u.port, stop, sent), daemon=True)
                for _ in range(a.slow)]
    for t in threads:
        t.start()
    time.sleep(3)                                     # let every connection settle
    lat, errors = [], 0
    for _ in range(20):
        t0 = time.perf_counter()
        try:
            requests.get(a.base + "/health", timeout=10)
            lat.append(1000 * (time.perf_counter() - t0))
        except requests.RequestException:
            errors += 1
        time.sleep(0.1)
    t0 = time.perf_counter()
    try:
        new = generate(a.base, {"min_resolution": 256, "duration": 1, "seed": int(time.time()) % 10**6},
                       timeout=a.job_s * 3)
        new_result = {"status": new.status_code, "s": round(time.perf_counter() - t0, 2)}
    except requests.RequestException as e:
        new_result = {"status": type(e).__name__, "s": round(time.perf_counter() - t0, 2)}
    try:
        long_status = requests.get(r.json()["status_url"], timeout=10).json()["status"]
    except (requests.RequestException, ValueError, KeyError):
        long_status = "unknown"
    stop.set()
    print(json.dumps({
        "long_job_status_at_end": long_status,
        "streams_opened": sum(1 for x in opened if x == 200), "streams_requested": a.streams,
        "slow_uploads": a.slow,
        "health_ms_median": round(statistics.median(lat), 1) if lat else None,
        "health_ms_max": round(max(lat), 1) if lat else None, "health_timeouts": errors,
        "new_request": new_result}))


if __name__ == "__main__":
    main()
