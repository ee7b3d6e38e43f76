"""Distributed mode on this machine: queue overhead per job, throughput with 1 and 2 workers,
memory per worker (docs/scaling.md). Starts its own redis-server on a free port and real
`sonic worker` processes; the API is this process (Flask's test client: it loads no model).

    .venv/bin/python scripts/bench_scaling.py [--jobs 6] [--resolution 256] [--render-processes 2]

Queue overhead is what the queue adds to one job on an idle worker: from the request's submit
to the worker's start (dispatch) plus from the worker's end to the API seeing it (notify),
from the records' own clocks (same machine). Check `uptime` first: time only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "examples" / "speech.flac"
PORTRAIT = ROOT / "examples" / "portrait.jpg"


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (render helpers, ffmpeg), MB."""
    total = 0
    pids = [pid]
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids += [int(p) for p in out]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--render-processes", type=int, default=2)
    a = ap.parse_args()
    import redis
    import yaml
    from sonic.settings import read_yaml
    from sonic_server import create_app

    tmp = Path(tempfile.mkdtemp(prefix="sonic-scaling-"))
    port = free_port()
    rproc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
                             stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            r.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    cfg = read_yaml(None)
    cfg["output_dir"] = str(tmp / "outputs")
    cfg["render_processes"] = a.render_processes
    cfg["server"].update(redis_url=url, upload_dir=str(tmp / "uploads"), data_dir=str(tmp / "data"),
                         queue_size=100, rate_limit_per_s=1000, rate_limit_burst=1000)
    (tmp / "settings.yaml").write_text(yaml.safe_dump(cfg))
    api = create_app(cfg).test_client()
    workers: list[subprocess.Popen] = []

    def start_worker(name: str) -> None:
        workers.append(subprocess.Popen([sys.executable, "-m", "sonic", "worker", "--config",
                                         str(tmp / "settings.yaml"), "--name", name], cwd=ROOT,
                                        stdout=open(tmp / f"{name}.log", "w"), stderr=subprocess.STDOUT))
        while len(api.get("/health").get_json().get("workers", [])) < len(workers):
            time.sleep(0.2)

    seed = iter(range(10_000))

    def submit() -> str:
        with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
            resp = api.post("/api/sonic/generate", data={
                "image": (img, "p.jpg"), "audio": (aud, "a.flac"),
                "config": json.dumps({"min_resolution": a.resolution, "seed": next(seed), "async": True})})
        assert resp.status_code == 202, resp.get_data()[:300]
        return resp.get_json()["job_id"]

    def wait(job: str) -> tuple[dict, float]:
        while True:
            body = api.get(f"/api/sonic/jobs/{job}").get_json()
            if body["status"] in ("succeeded", "failed", "canceled"):
                return body, time.time()
            time.sleep(0.01)

    try:
        start_worker("bench1")
        # queue overhead: one job at a time on an idle worker
        wait(submit())                                             # warm-up (first render starts the helpers)
        dispatch, notify, run = [], [], []
        for _ in range(5):
            job = submit()
            body, seen = wait(job)
            rec = json.loads(r.get(f"sonic:job:{job}"))
            dispatch.append((rec["started"] - rec["created"]) * 1000)
            notify.append((seen - rec["finished"]) * 1000)
            run.append(rec["finished"] - rec["started"])
        print(f"queue overhead per job: dispatch {statistics.median(dispatch):.0f} ms (median of 5, max "
              f"{max(dispatch):.0f}), notify {statistics.median(notify):.0f} ms (the 10 ms status poll included); "
              f"the job itself ran {statistics.median(run):.2f} s")
        mem = rss_mb(workers[0].pid)
        print(f"memory: worker 1 with its helpers {mem:.0f} MB RSS after 6 jobs")
        for n in (1, 2):
            if n == 2:
                start_worker("bench2")
                wait(submit())                                     # warm the second worker's helpers
            t0 = time.time()
            jobs = [submit() for _ in range(a.jobs)]
            ends = [wait(j) for j in jobs]
            took = max(t for _, t in ends) - t0
            video_s = sum(b["duration"] for b, _ in ends if b["status"] == "succeeded")
            print(f"{n} worker(s): {a.jobs} jobs of {ends[0][0].get('duration')} s at {a.resolution} px in "
                  f"{took:.1f} s = {a.jobs / took * 60:.1f} jobs/min, {video_s / took:.2f} s of video per s")
        print("memory per worker (RSS with helpers): " + ", ".join(f"{rss_mb(w.pid):.0f} MB" for w in workers))
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(20)
        rproc.terminate()
        rproc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
