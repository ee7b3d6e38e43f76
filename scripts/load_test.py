"""Bounded load test of a running service on loopback; prints one JSON line.

usage: python scripts/load_test.py --base http://127.0.0.1:5000 --pid PID [--jobs 100] [--burst 8]

1. `--jobs` consecutive small generate requests (256 px, 1 s) while a second thread hammers
   /health and job status; records the server's RSS and open file descriptors every 10 jobs.
2. A burst of `--burst` async requests at once: counts 202 / 503 (queue full) answers.
3. Leaks: RSS growth over the jobs, fd count before/after, sonic-* temp dirs and upload folders left.
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
PORTRAIT, SPEECH = ROOT / "examples" / "portrait.jpg", ROOT / "examples" / "speech.flac"


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def generate(base: str, config: dict, headers=None) -> requests.Response:
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        return requests.post(base + "/api/sonic/generate", files={"image": img, "audio": aud},
                             data={"config": json.dumps(config)}, headers=headers or {}, timeout=300)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="http://127.0.0.1:5000")
    ap.add_argument("--pid", type=int, required=True, help="server process id (for RSS and fds)")
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--burst", type=int, default=8)
    ap.add_argument("--uploads", default=str(ROOT / "uploads"))
    a = ap.parse_args()
    if not a.base.startswith(("http://127.", "http://localhost", "http://[::1]")):
        sys.exit("loopback only")

    stop = threading.Event()
    side = {"requests": 0, "errors": 0, "max_ms": 0.0}

    def hammer():
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                ok = requests.get(a.base + "/health", timeout=10).status_code == 200
            except requests.RequestException:
                ok = False
            side["requests"] += 1
            side["errors"] += not ok
            side["max_ms"] = max(side["max_ms"], 1000 * (time.perf_counter() - t0))
            time.sleep(0.02)

    t = threading.Thread(target=hammer, daemon=True)
    fd0, rss0 = fds(a.pid), rss_mb(a.pid)
    samples, failures, t_start = [], 0, time.time()
    t.start()
    for i in range(a.jobs):
        r = generate(a.base, {"min_resolution": 256, "duration": 1.0, "seed": 1000 + i})
        failures += r.status_code != 200
        if i % 10 == 9:
            samples.append({"job": i + 1, "rss_mb": round(rss_mb(a.pid), 1), "fds": fds(a.pid)})
    stop.set()
    t.join()
    jobs_s = time.time() - t_start

    codes = []
    lock = threading.Lock()

    def one(k):
        r = generate(a.base, {"min_resolution": 256, "duration": 1.0, "seed": 5000 + k, "async": True})
        with lock:
            codes.append(r.status_code)
            if r.status_code == 202:
                ids.append(r.json()["job_id"])
    ids: list[str] = []
    threads = [threading.Thread(target=one, args=(k,)) for k in range(a.burst)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for job in ids:
        while requests.get(f"{a.base}/api/sonic/jobs/{job}", timeout=10).json()["status"] not in (
                "succeeded", "failed", "canceled"):
            time.sleep(0.2)
    time.sleep(0.5)
    print(json.dumps({
        "jobs": a.jobs, "job_failures": failures, "jobs_wall_s": round(jobs_s, 1),
        "side_requests": side["requests"], "side_errors": side["errors"], "side_max_ms": round(side["max_ms"], 1),
        "rss_mb_start": round(rss0, 1), "rss_samples": samples, "rss_mb_end": round(rss_mb(a.pid), 1),
        "fds_start": fd0, "fds_end": fds(a.pid),
        "burst": a.burst, "burst_202": codes.count(202), "burst_503": codes.count(503),
        "burst_other": len(codes) - codes.count(202) - codes.count(503),
        "temp_dirs_left": len(glob.glob(os.path.join(tempfile.gettempdir(), "sonic-*"))),
        "upload_files_left": sum(1 for p in Path(a.uploads).rglob("*") if p.is_file()),
    }))


if __name__ == "__main__":
    main()
