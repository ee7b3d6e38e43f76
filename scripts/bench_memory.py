"""Memory of the service under near-limit images (docs/reliability.md): peak and settled resident
memory of a real `python app.py` (and its children) for one, then twenty concurrent requests
that each carry a ~40 MP PNG of ~130 kB (just under limits.max_image_pixels), on generate and on
/fusion.

    .venv/bin/python scripts/bench_memory.py [--root CHECKOUT] [--concurrent 20]

`--root` runs another checkout's app.py with this interpreter (an older commit in a git
worktree, for before/after figures). Memory is sampled every 20 ms from /proc; the figures do
not depend on the machine's load, but run it alone all the same (`uptime`).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
SPEECH = ROOT / "examples" / "speech.flac"
NEAR_LIMIT = (7740, 5160)         # 39.9 MP, under the default limit of 40 MP


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants, MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo += [int(c) for c in children]
        except OSError:
            pass
    return total / 1024


class Sampler:
    """The tree's RSS every 20 ms in a thread; `peak()` since the last `reset()`."""

    def __init__(self, pid: int):
        self.pid, self._peak, self._stop = pid, 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, tree_rss_mb(self.pid))
            time.sleep(0.02)

    def reset(self) -> None:
        self._peak = tree_rss_mb(self.pid)

    def peak(self) -> float:
        return self._peak

    def stop(self) -> None:
        self._stop.set()


def near_limit_png() -> bytes:
    """A flat 39.9 MP picture with a skin-coloured oval (no face a detector finds): ~130 kB."""
    im = Image.new("RGB", NEAR_LIMIT, (120, 130, 140))
    ImageDraw.Draw(im).ellipse((3000, 1500, 4500, 3500), fill=(200, 160, 130))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def start(root: Path, tmp: Path) -> tuple[subprocess.Popen, str]:
    cfg = {"output_dir": str(tmp / "outputs"),
           "server": {"upload_dir": str(tmp / "uploads"), "data_dir": str(tmp / "data"),
                      "rate_limit_per_s": 1000, "rate_limit_burst": 1000, "sync_wait_s": 120}}
    (tmp / "settings.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--config", str(tmp / "settings.yaml")],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"))
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not become ready; see " + str(tmp / "server.log"))


def generate(base: str, png: bytes) -> int:
    r = requests.post(base + "/api/sonic/generate", timeout=300,
                      files={"image": ("big.png", png), "audio": ("s.flac", SPEECH.read_bytes())},
                      data={"config": json.dumps({"min_resolution": 256})})
    return r.status_code


def fusion(base: str, png: bytes) -> int:
    b64 = base64.b64encode(png).decode()
    r = requests.post(base + "/fusion", json={"source_image": b64, "target_image": b64}, timeout=300)
    return r.status_code


def settle(pid: int, seconds: float = 3.0) -> float:
    time.sleep(seconds)
    return tree_rss_mb(pid)


def measure(name: str, call, pid: int, sampler: Sampler, concurrent: int) -> list[str]:
    rows = []
    for n in (1, concurrent):
        before = settle(pid, 1.0)
        sampler.reset()
        statuses: Counter = Counter()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=lambda: statuses.update([call()])) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.perf_counter() - t0
        rows.append(f"| {name} | {n} | {before:.0f} | {sampler.peak():.0f} | {settle(pid):.0f} | "
                    f"{dict(sorted(statuses.items()))} | {took:.1f} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose app.py to run")
    ap.add_argument("--concurrent", type=int, default=20)
    a = ap.parse_args()
    png = near_limit_png()
    print(f"near-limit PNG: {NEAR_LIMIT[0]}x{NEAR_LIMIT[1]}, {len(png) / 1000:.0f} kB; root {a.root}")
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start(a.root.resolve(), Path(tmp))
        sampler = Sampler(proc.pid)
        try:
            print(f"loaded: {settle(proc.pid, 2.0):.0f} MB (the service and its render helpers)")
            print("| route | requests at once | RSS before, MB | peak, MB | after 3 s, MB | statuses | seconds |")
            print("|---|---|---|---|---|---|---|")
            for row in measure("generate", lambda: generate(base, png), proc.pid, sampler, a.concurrent):
                print(row)
            for row in measure("fusion", lambda: fusion(base, png), proc.pid, sampler, a.concurrent):
                print(row)
        finally:
            sampler.stop()
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
