"""The streaming twin of the motion predictor (sonic/motion.py): one frame's motion at a time,
from the audio features known so far, with a bounded look-ahead.

It runs the offline functions themselves (mouth_track, mouth_coefficients, head_pose, blinks'
curve, the prosody detector, the brows' raises, the accents' nods, the gaze planner) over a short
window around the frame: the history a Gaussian needs behind it and the
look-ahead the session grants in front (the edge is held, as offline at a clip's end). The
seeded parts (the head's noise, the blinks' times, the gaze's fixations) are drawn from the same generators in the
same order as offline, so they are the same as a file's with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..audio_features import SPEECH_THRESHOLD, AudioFeatures, viseme_tracks
from ..gaze import GazePlanner
from ..motion import (
    BLINK_CLOSE_S,
    BLINK_HOLD_S,
    BLINK_OPEN_S,
    COEFFS,
    HEAD_NOISE_S,
    Rig,
    accent_nods,
    blink_curve,
    blink_start_frame,
    blink_times,
    brow_track,
    head_pose,
    mouth_coefficients,
    mouth_track,
    nod_track,
    noise_kernel,
    seeded_streams,
    smooth_head,
)
from ..prosody import Event, ProsodyDetector

HISTORY_S = 4.0  # features kept behind the frame: the nod's 1.5 s mean needs most of it
MOUTH_HISTORY_S = 0.6  # the mouth's Gaussians (coarticulation, smoothing) reach well within this
BREATH_PERIOD_S = 4.2  # a slow rise and fall of the head at rest, as breathing gives
BREATH_IOD = 0.004  # its amplitude (inter-ocular distances) at motion_scale 1


@dataclass(frozen=True)
class FrameMotion:
    """One frame's motion: coeffs (K,) in COEFFS order, head (4,) (see motion.Motion), and the
    mouth's opening (0..~1.4) and loudness (0..1) behind it."""

    coeffs: np.ndarray
    head: np.ndarray
    opening: float
    loudness: float


class NoiseStream:
    """motion.smooth_noise drawn frame by frame: the same values, without knowing the length."""

    def __init__(self, fps: int, time_scale_s: float, channels: int, rng: np.random.Generator) -> None:
        self._kernel = noise_kernel(fps, time_scale_s)
        self._rng, self._channels = rng, channels
        self._white = rng.standard_normal((len(self._kernel) - 1, channels))

    def next(self) -> np.ndarray:
        """The next frame's value, (channels,)."""
        self._white = np.concatenate(
            [self._white[-(len(self._kernel) - 1) :], self._rng.standard_normal((1, self._channels))]
        )
        return self._kernel @ self._white


class MotionStream:
    """Frames' motion from per-frame loudness and phones, in frame order."""

    def __init__(
        self,
        rig: Rig,
        fps: int,
        *,
        dynamic_scale: float,
        motion_scale: float,
        smooth: bool,
        seed: int,
        gaze: bool = True,
    ) -> None:
        self.rig, self.fps = rig, fps
        self.dynamic_scale, self.motion_scale, self.smooth = dynamic_scale, motion_scale, smooth
        rng_head, rng_blink, rng_gaze = seeded_streams(seed)
        self._prosody = ProsodyDetector(fps)
        self._events: list[Event] = []  # accents and phrase starts within the history
        self._gaze = GazePlanner(rng_gaze) if gaze else None
        self._noise = NoiseStream(fps, HEAD_NOISE_S, 3, rng_head)
        self._blinks: Iterator[float] = blink_times(rng_blink)
        self._shut_at: list[float] = [next(self._blinks)]
        self._history = int(np.ceil(HISTORY_S * fps))
        self._mouth_history = int(np.ceil(MOUTH_HISTORY_S * fps))
        self._start = 0  # frame index of the first kept feature
        self._loud = np.zeros(0)
        self._voiced = np.zeros(0, bool)  # beside _loud: the frame has a voice's pitch
        self._noise_values = np.zeros((0, 3))

    @property
    def known(self) -> int:
        """Frames whose loudness is known (0 .. known - 1)."""
        return self._start + len(self._loud)

    def add(self, loudness: np.ndarray, pitch: np.ndarray) -> None:
        """The normalised loudness (n,) and the pitch (n,) of the next frames, in order."""
        for v, p in zip(loudness, pitch, strict=True):
            event = self._prosody.push(float(v), float(p))
            if event is not None:
                self._events.append(event)
        self._loud = np.concatenate([self._loud, loudness])
        self._voiced = np.concatenate([self._voiced, ~np.isnan(pitch)])
        new = np.array([self._noise.next() for _ in loudness]).reshape(-1, 3)
        self._noise_values = np.concatenate([self._noise_values, new])

    def silence_after(self, index: int) -> None:
        """Frames from `index` on are heard as silence (an interrupt drops what was queued)."""
        self._loud[max(0, index - self._start) :] = 0.0

    def frame(self, index: int, phones: list[tuple[str, float, float]]) -> FrameMotion:
        """Motion of frame `index` (< known), from the features up to `known` (its look-ahead)."""
        a = self._start
        at = index - a
        loud = self._loud
        # the mouth: over the short window its Gaussians reach (the head's is longer)
        m0 = max(0, at - self._mouth_history)
        near = loud[m0:]
        t0 = (a + m0) / self.fps
        voiced_speech = (near > SPEECH_THRESHOLD) & self._voiced[m0:]
        op, sp, cl = viseme_tracks([(p, s - t0, e - t0) for p, s, e in phones], len(near), self.fps, voiced_speech)
        feats = AudioFeatures(self.fps, near, near > SPEECH_THRESHOLD, op, sp, cl, tuple(phones))
        opening, spread, closure = mouth_track(feats, self.dynamic_scale, self.smooth)
        opening = opening * (1 - np.clip(np.maximum(closure, cl), 0, 1))
        mouth_at = at - m0
        coeffs = mouth_coefficients(opening[mouth_at : mouth_at + 1], spread[mouth_at : mouth_at + 1], self.rig)[0]
        t = index / self.fps
        coeffs[COEFFS.index("blink")] = self._blink(t)
        coeffs[COEFFS.index("brow")] = brow_track(np.array([t]), self._events, self.fps, self.dynamic_scale)[0]
        if self._gaze is not None:
            blink_starts = any(blink_start_frame(s, self.fps) == index for s in self._shut_at)
            phrase_starts = any(e.frame == index and e.kind == "phrase" for e in self._events)
            gaze = self._gaze.step(t, blink_starts, phrase_starts)
            coeffs[COEFFS.index("gaze_x")], coeffs[COEFFS.index("gaze_y")] = gaze
        nods = accent_nods((a + np.arange(len(loud))) / self.fps, self._events, self.fps)
        head = head_pose(self._noise_values, nod_track(loud, self.fps) + nods, self.rig.iod, self.motion_scale)
        if self.smooth:
            head = smooth_head(head, self.fps)
        pose = head[at].copy()
        pose[2] += (
            BREATH_IOD * self.rig.iod * self.motion_scale * np.sin(2 * np.pi * index / self.fps / BREATH_PERIOD_S)
        )
        self._forget(index)
        return FrameMotion(coeffs=coeffs, head=pose, opening=float(opening[mouth_at]), loudness=float(loud[at]))

    def _blink(self, t: float) -> float:
        while self._shut_at[-1] < t + BLINK_CLOSE_S:
            self._shut_at.append(next(self._blinks))
        reach = BLINK_HOLD_S + BLINK_OPEN_S
        near = [s for s in self._shut_at if s - BLINK_CLOSE_S < t < s + reach]
        self._shut_at = [s for s in self._shut_at if s + reach >= t] or self._shut_at[-1:]
        return float(blink_curve(np.array([t]), near)[0])

    def _forget(self, index: int) -> None:
        """Drop features more than the history behind `index`."""
        drop = index - self._history - self._start
        self._events = [e for e in self._events if e.frame >= index - self._history]
        if drop > 0:
            self._loud, self._noise_values = self._loud[drop:], self._noise_values[drop:]
            self._voiced = self._voiced[drop:]
            self._start += drop
