"""Measuring a received live stream (scripts/bench_live.py and the live tests): the mouth's
opening in received frames, loudness envelopes, and the lag between two envelopes."""

from __future__ import annotations

import numpy as np

STEP_S = 0.01  # envelopes are compared on a 10 ms grid


def unbuffered_audio_receiver() -> None:
    """This process's aiortc audio receivers release each packet as soon as the next one starts
    (aiortc holds four more first, 80 ms, which a browser's adaptive buffer does not on loopback):
    an offset measured is then the streams', not this client's fixed buffering."""
    import aiortc.rtcrtpreceiver as receiver
    from aiortc.jitterbuffer import JitterBuffer

    class Unbuffered(JitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(capacity, 0, is_video)

    receiver.JitterBuffer = Unbuffered  # type: ignore[misc]


def envelope(times: np.ndarray, values: np.ndarray, t0: float, t1: float) -> np.ndarray:
    return np.interp(np.arange(t0, t1, STEP_S), times, values)


def best_lag(a: np.ndarray, b: np.ndarray, max_lag_s: float = 1.0) -> float:
    """Seconds by which b follows a (both on the STEP_S grid), by normalised cross-correlation."""
    a = (a - a.mean()) / (a.std() + 1e-9)
    b = (b - b.mean()) / (b.std() + 1e-9)
    lags = np.arange(-int(max_lag_s / STEP_S), int(max_lag_s / STEP_S) + 1)
    n = len(a)
    scores = [np.dot(a[max(0, -k) : n - max(0, k)], b[max(0, k) : n - max(0, -k)]) / n for k in lags]
    return float(lags[int(np.argmax(scores))] * STEP_S)


def loudness(wav: np.ndarray, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """RMS in 20 ms windows, dB floored at -60: (window centres in samples, dB)."""
    win = int(0.02 * rate)
    n = len(wav) // win
    rms = np.sqrt((wav[: n * win].reshape(n, win) ** 2).mean(1) + 1e-10)
    return (np.arange(n) + 0.5) * win, np.maximum(20 * np.log10(rms), -60)


def received_loudness(chunks: list[np.ndarray], arrivals: list[float], rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Loudness of received audio chunks, each window stamped with its chunk's arrival."""
    wav = np.concatenate(chunks)
    stamp = np.repeat(np.array(arrivals), [len(c) for c in chunks])
    centres, db = loudness(wav, rate)
    return stamp[centres.astype(int)], db


class MouthMeter:
    """The mouth's opening in received frames (inner-lip gap / inter-ocular distance, FaceMesh):
    frames are cut to the face's box (found on the first) as they arrive and measured later, so
    that measuring takes no CPU from the session."""

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
        """(arrival times, openings) of the frames whose face was found."""
        from sonic.lipsync import mouth_opening

        t = np.array([at for at, _ in self.crops])
        v = np.array([mouth_opening(self.faces, crop) for _, crop in self.crops])
        ok = np.isfinite(v)
        return t[ok], v[ok]
