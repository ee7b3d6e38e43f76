"""Live sessions, measured: a real server on a free port, aiortc clients on this machine sending a
recorded speech file as their microphone (or with /speak) and decoding what comes back.

    PYTHONPATH=examples python scripts/bench_live.py [--seconds 60] [--sessions 1] [--resolution 512]
                     [--speak] [--server http://127.0.0.1:PORT]   (else one is started here)
                     [--workers N]   (distributed: redis-server, N `sonic worker`s, an API)
    PYTHONPATH=examples python scripts/bench_live.py --pipecat [--server URL]   (the Pipecat service)

(examples/ on PYTHONPATH: the clients are the example's LiveClient; the package is the installed one.)

Prints, per session: time from the offer to the first decoded frame; frames received and the
sustained rate, and how many of them a second showed a new picture (`pictures_fps`: a server
behind its clock holds the picture); the server's late frames; the mouth latency (the sent speech's loudness against
the received frames' mouth motion, cross-correlated: how long after a syllable leaves the client
the mouth moves on its screen) and the audio/video offset in the received streams (the received
speech's loudness against the received mouth motion); and the server's CPU and memory. With
--speak: the time from the POST to the first frame with an open mouth. Loopback only: the
server gathers 127.0.0.1 candidates (live.host_addresses) and so does the client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from live_client import LiveClient, Microphone  # examples/ (PYTHONPATH)
from live_measure import (  # scripts/, beside this file
    MouthMeter,
    best_lag,
    envelope,
    loudness,
    received_loudness,
    unbuffered_audio_receiver,
)

ROOT = Path(__file__).resolve().parents[1]

PORTRAIT = ROOT / "examples" / "portrait.jpg"
SPEECH = ROOT / "examples" / "speech.flac"
# mean absolute change (levels, every 8th pixel) above which a received frame is a new picture: a
# held picture sent again decodes within a level of itself, a face at rest blinks and breathes
PICTURE_CHANGE = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_sessions: int, workers: int = 0) -> tuple[list[subprocess.Popen], str, int]:
    """`sonic serve` on a free port, gathering loopback candidates only; with `workers`, a
    redis-server and that many `sonic worker`s too (distributed mode). (the processes, the
    server's URL, the pid whose CPU and memory are measured: the server, or the first worker)."""
    port = free_port()
    folder = tempfile.mkdtemp(prefix="sonic-bench-live-")
    env = {**os.environ, "SONIC_LIVE_HOST_ADDRESSES": "127.0.0.1", "SONIC_LIVE_MAX_SESSIONS": str(max_sessions)}
    quiet = {"cwd": folder, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = []
    if workers:
        redis_port = free_port()
        procs.append(
            subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""], **quiet)
        )
        env["SONIC_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        time.sleep(0.5)
        for n in range(workers):
            procs.append(
                subprocess.Popen([sys.executable, "-m", "sonic", "worker", "--name", f"w{n}"], env=env, **quiet)
            )
    measured = procs[1].pid if workers else None
    procs.append(subprocess.Popen([sys.executable, "-m", "sonic", "serve", "--port", str(port)], env=env, **quiet))
    base = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(600):
        try:
            health = requests.get(base + "/health", timeout=1).json()
            if health["readiness"] == "ready" and health["live"].get("slots", max_sessions) >= max_sessions:
                return procs, base, measured or procs[-1].pid
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.1)
    for proc in procs:
        proc.kill()
    raise SystemExit("the server did not start")


def _stat(pid: int) -> list[str]:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()


def live_processes(pid: int) -> list[int]:
    """The server and its live sessions' helpers (not its render helpers, idle here)."""
    found = [pid]
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(_stat(int(entry))[1]) == pid:
                if b"sonic.live._helper" in open(f"/proc/{entry}/cmdline", "rb").read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of the server and its live helpers."""
    total = 0.0
    for p in live_processes(pid):
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of the server and its live helpers, MB."""
    total = 0.0
    for entry in live_processes(pid):
        try:
            for line in open(f"/proc/{entry}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


async def one_session(base: str, seconds: float, resolution: int, speak: bool, server_pid: int | None = None) -> dict:
    client = LiveClient(base)
    meter = MouthMeter()
    mic = None
    if not speak:
        from sonic.media import load_audio

        wav = load_audio(SPEECH, 600)
        looped = np.concatenate([wav, np.zeros(8000, np.float32)])
        mic = Microphone(np.tile(looped, int(seconds * 16000 / len(looped)) + 2))

    pictures = [0]  # frames received that show a new picture (a held picture repeats the one before)
    last = [np.zeros(0)]

    def on_frame(image: np.ndarray, at: float) -> None:
        meter.add(image, at)
        small = image[::8, ::8].astype(np.int16)
        if last[0].shape != small.shape or np.abs(small - last[0]).mean() > PICTURE_CHANGE:
            pictures[0] += 1
        last[0] = small

    t_offer = time.monotonic()
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    own0 = time.process_time()
    await client.open(
        PORTRAIT,
        {"min_resolution": resolution, "seed": 7},
        microphone=mic,
        keep_frames=False,
        on_frame=on_frame,
    )
    open_s = time.monotonic() - t_offer
    got = client.received
    state_ms = []
    for _ in range(10):
        t = time.monotonic()
        await client.state()
        state_ms.append(1000 * (time.monotonic() - t))
    speak_posted = None
    if speak:
        await asyncio.sleep(1.0)  # the face at rest first, so that the mouth's first opening is the speech's
        speak_posted = time.monotonic()
        await client.speak_file(SPEECH)
    await asyncio.sleep(seconds)
    state = await client.state()
    server_rss = rss_mb(server_pid) if server_pid else 0.0
    server_cores = (cpu_seconds(server_pid) - cpu0) / (time.monotonic() - t_offer) if server_pid else 0.0
    client_cores = (time.process_time() - own0) / (time.monotonic() - t_offer)
    await client.close()
    times = np.array(got.video_times)
    out: dict = {
        "first_frame_s": round(times[0] - t_offer, 3) if len(times) else None,
        "open_s": round(open_s, 3),
        "state_ms": round(float(np.median(state_ms)), 1),
        "frames": len(times),
        "fps": round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else 0.0,
        "pictures_fps": round((pictures[0] - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else 0.0,
        "server": {
            k: state[k] for k in ("frames_sent", "late_frames", "latency_ms", "lookahead_ms", "width", "height")
        },
    }
    out["late_pct"] = round(100 * state["late_frames"] / max(1, state["frames_sent"]), 2)
    out["server_rss_mb"] = round(server_rss, 1)
    out["server_cpu_cores"] = round(server_cores, 2)
    out["client_cpu_cores"] = round(client_cores, 2)
    m_t, m_v = meter.openings()
    # the received speech: 48 kHz chunks stamped with their arrival
    rx_env_t, rx_db = received_loudness(got.audio, got.audio_times, 48_000)
    t0, t1 = m_t[0] + 1.0, m_t[-1] - 0.5
    mouth_env = envelope(m_t, m_v, t0, t1)
    out["av_offset_ms"] = round(1000 * best_lag(envelope(rx_env_t, rx_db, t0, t1), mouth_env), 1)
    if mic is not None and mic.started is not None:
        c, tx_db = loudness(mic.wav, 16_000)
        out["mouth_latency_ms"] = round(
            1000 * best_lag(envelope(mic.started + c / 16_000, tx_db, t0, t1), mouth_env), 1
        )
    if speak_posted is not None:
        rest = m_v[m_t < speak_posted]
        level = (float(np.percentile(rest, 95)) if len(rest) else 0.0) + 0.03  # 0.03 IOD: a visible opening
        opened = m_t[(m_t > speak_posted) & (m_v > level)]
        out["speak_to_open_mouth_s"] = round(float(opened[0] - speak_posted), 3) if len(opened) else None
    return out


def pipecat_latency(server: str | None) -> dict:
    """The Pipecat service's added latency: its engine in the pipeline's process, or (server)
    a running service's sessions with url=."""
    python = ROOT / "integrations" / "pipecat" / ".venv" / "bin" / "python"
    if not python.exists():
        raise SystemExit("build the integration's environment first: integrations/pipecat/setup_env.sh")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run.npz"
        runner = ROOT / "tests" / "pipecat_run.py"
        target = server or sys.executable
        subprocess.run([str(python), str(runner), str(PORTRAIT), str(SPEECH), str(out), target], cwd=ROOT, check=True)
        data = np.load(out)
        gaps = np.diff(data["image_times"])
        return {
            "mode": "url" if server else "in-process",
            "ttfb_s": [round(float(t), 3) for t in data["ttfb"]],
            "frame_gap_ms_median": round(1000 * float(np.median(gaps)), 1),
            "frame_gap_ms_p95": round(1000 * float(np.percentile(gaps, 95)), 1),
        }


def run_clients(base: str, server_pid: int | None, args: argparse.Namespace) -> list[dict]:
    """Each session's client in a process of its own (as separate viewers are), all at once."""
    cmd = [sys.executable, __file__, "--client", "--server", base, "--seconds", str(args.seconds)]
    cmd += ["--resolution", str(args.resolution)] + (["--speak"] if args.speak else [])
    cmd += ["--server-pid", str(server_pid)] if server_pid else []
    cmd += ["--aiortc-audio-buffer"] if args.aiortc_audio_buffer else []
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(args.sessions)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


async def client_main(args: argparse.Namespace) -> None:
    if not args.aiortc_audio_buffer:
        unbuffered_audio_receiver()
    print(json.dumps(await one_session(args.server, args.seconds, args.resolution, args.speak, args.server_pid)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--speak", action="store_true")
    ap.add_argument("--server")
    ap.add_argument("--workers", type=int, default=0, help="distributed mode: start redis and this many workers")
    ap.add_argument("--pipecat", action="store_true", help="measure the Pipecat service instead")
    ap.add_argument("--aiortc-audio-buffer", action="store_true", help="keep aiortc's own 80 ms audio prefetch")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        asyncio.run(client_main(args))
        return
    print("load average:", open("/proc/loadavg").read().split()[:3])
    if args.pipecat:
        print(json.dumps(pipecat_latency(args.server)))
        return
    procs: list[subprocess.Popen] = []
    base, pid = args.server, None
    if base is None:
        procs, base, pid = start_server(max(2, args.sessions), args.workers)
    try:
        rss0 = rss_mb(pid) if pid else 0.0
        results = run_clients(base, pid, args)
        for r in results:
            print(json.dumps(r))
        if pid is not None:
            cores = float(np.mean([r["server_cpu_cores"] for r in results]))
            summary = {
                "sessions": args.sessions,
                "resolution": args.resolution,
                "workers": args.workers,
                "open_s_median": round(float(np.median([r["open_s"] for r in results])), 3),
                "state_ms_median": round(float(np.median([r["state_ms"] for r in results])), 1),
                "server_cpu_cores": round(cores, 2),
                "server_cpu_cores_per_session": round(cores / args.sessions, 2),
                "server_rss_mb_before": round(rss0, 1),
                "server_rss_mb_per_session": round(
                    (max(r["server_rss_mb"] for r in results) - rss0) / args.sessions, 1
                ),
                "late_pct_max": max(r["late_pct"] for r in results),
                "fps_min": min(r["fps"] for r in results),
            }
            print(json.dumps(summary))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(40)


if __name__ == "__main__":
    main()
