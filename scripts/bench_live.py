"""Live sessions, measured: a real server on a free port, aiortc clients on this machine sending a
recorded speech file as their microphone (or with /speak) and decoding what comes back.

    python scripts/bench_live.py [--seconds 60] [--sessions 1] [--resolution 512] [--speak]
                                 [--server http://127.0.0.1:PORT]   (else one is started here)

Prints, per session: time from the offer to the first decoded frame; frames received and the
sustained rate; the server's late frames; the mouth latency (the sent speech's loudness against
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from live_client import LiveClient  # noqa: E402

PORTRAIT = ROOT / "examples" / "portrait.jpg"
SPEECH = ROOT / "examples" / "speech.flac"
STEP_S = 0.01  # envelopes are compared on a 10 ms grid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(max_sessions: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "SONIC_LIVE_HOST_ADDRESSES": "127.0.0.1",
        "SONIC_LIVE_MAX_SESSIONS": str(max_sessions),
    }
    work = tempfile.mkdtemp(prefix="sonic-bench-live-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sonic", "serve", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    import requests

    for _ in range(300):
        try:
            if requests.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def measure_without_audio_prefetch() -> None:
    """This client's audio receiver releases each packet as soon as the next one starts (aiortc
    holds four more first, 80 ms, which a browser's adaptive buffer does not on loopback): the
    offset measured is the streams', not this client's fixed buffering."""
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.jitterbuffer import JitterBuffer

    class Unbuffered(JitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(capacity, 0, is_video)

    receiver.JitterBuffer = Unbuffered  # type: ignore[misc]


class TimedFile:
    """A speech file as a microphone track that notes when its first sample was handed to the
    connection (the sent audio's clock)."""

    def __init__(self, path: Path, loop_s: float) -> None:
        from aiortc import MediaStreamTrack

        from sonic.media import load_audio

        wav = load_audio(path, 600)
        self.wav = np.tile(np.concatenate([wav, np.zeros(8000, np.float32)]), int(loop_s // (len(wav) / 16000)) + 1)
        self.started: float | None = None
        outer = self

        class Track(MediaStreamTrack):
            kind = "audio"

            def __init__(self) -> None:
                super().__init__()
                self.sent = 0

            async def recv(self):
                import fractions

                import av

                if outer.started is None:
                    outer.started = time.monotonic()
                due = outer.started + self.sent / 16000
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                piece = outer.wav[self.sent : self.sent + 320]
                if len(piece) < 320:
                    piece = np.zeros(320, np.float32)
                frame = av.AudioFrame(format="s16", layout="mono", samples=320)
                frame.planes[0].update((piece * 32767).astype("<i2").tobytes())
                frame.sample_rate, frame.pts, frame.time_base = 16000, self.sent, fractions.Fraction(1, 16000)
                self.sent += 320
                return frame

        self.track = Track()


def envelope(times: np.ndarray, values: np.ndarray, t0: float, t1: float) -> np.ndarray:
    grid = np.arange(t0, t1, STEP_S)
    return np.interp(grid, times, values)


def best_lag(a: np.ndarray, b: np.ndarray, max_lag_s: float = 1.0) -> float:
    """Seconds by which b follows a (both on the STEP_S grid), by normalised cross-correlation."""
    a = (a - a.mean()) / (a.std() + 1e-9)
    b = (b - b.mean()) / (b.std() + 1e-9)
    lags = np.arange(-int(max_lag_s / STEP_S), int(max_lag_s / STEP_S) + 1)
    n = len(a)
    scores = [np.dot(a[max(0, -k) : n - max(0, k)], b[max(0, k) : n - max(0, -k)]) / n for k in lags]
    return float(lags[int(np.argmax(scores))] * STEP_S)


def loudness(wav: np.ndarray, rate: int, times: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """RMS in 20 ms windows (dB, floored); (window centres in samples, dB)."""
    win = int(0.02 * rate)
    n = len(wav) // win
    rms = np.sqrt((wav[: n * win].reshape(n, win) ** 2).mean(1) + 1e-10)
    return (np.arange(n) + 0.5) * win, np.maximum(20 * np.log10(rms), -60)


class MouthMeter:
    """The mouth's opening in received frames (inner-lip gap / inter-ocular distance, FaceMesh):
    frames are cut to the face's box (found on the first) as they arrive and measured after the
    session, so that measuring takes no CPU from the session."""

    def __init__(self) -> None:
        from sonic.face import FaceAnalyzer

        self.faces = FaceAnalyzer()
        self.box: tuple[int, int, int, int] | None = None
        self.crops: list[tuple[float, np.ndarray]] = []

    def add(self, image: np.ndarray, at: float) -> None:
        if self.box is None:
            x0, y0, x1, y1 = self.faces.analyze(image).box
            mx, my = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
            h, w = image.shape[:2]
            self.box = (max(0, int(x0 - mx)), max(0, int(y0 - my)), min(w, int(x1 + mx)), min(h, int(y1 + my)))
        x0, y0, x1, y1 = self.box
        self.crops.append((at, image[y0:y1, x0:x1].copy()))

    def openings(self) -> tuple[np.ndarray, np.ndarray]:
        from sonic.lipsync import mouth_opening

        t = np.array([at for at, _ in self.crops])
        v = np.array([mouth_opening(self.faces, crop) for _, crop in self.crops])
        ok = np.isfinite(v)
        return t[ok], v[ok]


async def one_session(base: str, seconds: float, resolution: int, speak: bool) -> dict:
    client = LiveClient(base)
    meter = MouthMeter()
    mic = None if speak else TimedFile(SPEECH, seconds)

    def on_frame(image: np.ndarray, at: float) -> None:
        meter.add(image, at)

    t_offer = time.monotonic()
    await client.open(
        PORTRAIT,
        {"min_resolution": resolution, "seed": 7},
        microphone=mic.track if mic else None,
        keep_frames=False,
        on_frame=on_frame,
    )
    got = client.received
    speak_posted = None
    if speak:
        await asyncio.sleep(1.0)  # the face at rest first, so that the mouth's first opening is the speech's
        speak_posted = time.monotonic()
        await client.speak_file(SPEECH)
    await asyncio.sleep(seconds)
    state = await client.state()
    await client.close()
    times = np.array(got.video_times)
    out: dict = {
        "first_frame_s": round(times[0] - t_offer, 3) if len(times) else None,
        "frames": len(times),
        "fps": round((len(times) - 1) / (times[-1] - times[0]), 2) if len(times) > 1 else 0.0,
        "server": {k: state[k] for k in ("frames_sent", "late_frames", "latency_ms", "lookahead_ms", "width", "height")},
    }
    out["late_pct"] = round(100 * state["late_frames"] / max(1, state["frames_sent"]), 2)
    m_t, m_v = meter.openings()
    # the received speech: 48 kHz chunks stamped with their arrival
    rx = np.concatenate(got.audio)
    rx_t = np.repeat(np.array(got.audio_times), [len(a) for a in got.audio])
    centres, rx_db = loudness(rx, 48_000)
    rx_env_t = rx_t[centres.astype(int)]
    t0, t1 = m_t[0] + 1.0, m_t[-1] - 0.5
    mouth_env = envelope(m_t, m_v, t0, t1)
    out["av_offset_ms"] = round(1000 * best_lag(envelope(rx_env_t, rx_db, t0, t1), mouth_env), 1)
    if mic is not None and mic.started is not None:
        c, tx_db = loudness(mic.wav, 16_000)
        out["mouth_latency_ms"] = round(1000 * best_lag(envelope(mic.started + c / 16_000, tx_db, t0, t1), mouth_env), 1)
    if speak_posted is not None:
        rest = m_v[m_t < speak_posted]
        level = (float(np.percentile(rest, 95)) if len(rest) else 0.0) + 0.03  # 0.03 IOD: a visible opening
        opened = m_t[(m_t > speak_posted) & (m_v > level)]
        out["speak_to_open_mouth_s"] = round(float(opened[0] - speak_posted), 3) if len(opened) else None
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--speak", action="store_true")
    ap.add_argument("--server")
    ap.add_argument("--aiortc-audio-buffer", action="store_true", help="keep aiortc's own 80 ms audio prefetch")
    args = ap.parse_args()
    if not args.aiortc_audio_buffer:
        measure_without_audio_prefetch()
    print("load average:", open("/proc/loadavg").read().split()[:3])
    proc = None
    base = args.server
    if base is None:
        proc, base = start_server(max(2, args.sessions))
    try:
        results = await asyncio.gather(
            *(one_session(base, args.seconds, args.resolution, args.speak) for _ in range(args.sessions))
        )
        for r in results:
            print(json.dumps(r))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
