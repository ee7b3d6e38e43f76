"""Gaze: where the irises point, frame by frame, as a speaker's eyes move.

Real eyes fixate for half a second to a few seconds, mostly on the listener, and jump between
fixations in quick saccades of a few degrees; a saccade often rides on a blink, and a speaker
often glances away as a phrase begins, then back. `GazePlanner` draws such a path from a seeded
generator, stepped one frame at a time with the blinks and phrase starts of that frame, so that
files (sonic/motion.py) and live sessions (sonic/live/motion.py) make it with the same code.
Gaze is in inter-ocular distances (IOD) of iris travel: (x right, y down) in the image.
"""

from __future__ import annotations

import numpy as np

from .motion import smoothstep

SACCADE_S = 0.05  # a saccade takes this long
FIXATION_S = (0.5, 3.0)  # fixations last this long (drawn from a gamma distribution, mean ~1.2 s)
AT_CAMERA = 0.65  # share of fixations on the camera (with a microsaccade's jitter)
MICRO_IOD = 0.005  # a fixation on the camera lands within about this of its centre
AWAY_IOD = (0.015, 0.04)  # a fixation away from the camera: this far from it
VERTICAL = 0.4  # vertical travel relative to horizontal: the lids follow the eye up and down
GLANCE_P = 0.5  # chance of a glance away at a phrase start ...
GLANCE_S = (0.4, 0.9)  # ... held this long, then back to the camera
BLINK_SACCADE_P = 0.5  # chance that a blink carries a saccade to a new fixation
BLINK_SACCADE_AFTER_S = 0.4  # ... if the eyes have held still at least this long


class GazePlanner:
    """The gaze (x, y) in IOD for each frame, in order: `step(t, blink_starts, phrase_starts)`."""

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._from = np.zeros(2)
        self._target = np.zeros(2)
        self._moved_at = -1.0  # when the last saccade began (s)
        self._until = self._fixation()  # when the current fixation ends
        self._glancing = False

    def _fixation(self) -> float:
        return float(np.clip(self._rng.gamma(2.0, 0.6), *FIXATION_S))

    def _away(self) -> np.ndarray:
        angle = self._rng.uniform(0, 2 * np.pi)
        radius = self._rng.uniform(*AWAY_IOD)
        return radius * np.array([np.cos(angle), VERTICAL * np.sin(angle)])

    def _saccade(self, t: float, target: np.ndarray, hold_s: float) -> None:
        self._from = self._position(t)
        self._target, self._moved_at, self._until = target, t, t + hold_s

    def _position(self, t: float) -> np.ndarray:
        return self._from + (self._target - self._from) * smoothstep(t - self._moved_at, 0.0, SACCADE_S)

    def step(self, t: float, blink_starts: bool, phrase_starts: bool) -> np.ndarray:
        """The gaze at time t (s); `blink_starts`: a blink begins in this frame; `phrase_starts`:
        a phrase begins in it (sonic/prosody.py)."""
        rng = self._rng
        if phrase_starts and not self._glancing and rng.random() < GLANCE_P:
            self._glancing = True
            self._saccade(t, self._away(), rng.uniform(*GLANCE_S))
        elif t >= self._until or (
            blink_starts and t - self._moved_at >= BLINK_SACCADE_AFTER_S and rng.random() < BLINK_SACCADE_P
        ):
            back = self._glancing or rng.random() < AT_CAMERA
            self._glancing = False
            target = rng.normal(0.0, MICRO_IOD, 2) * np.array([1.0, VERTICAL]) if back else self._away()
            self._saccade(t, target, self._fixation())
        return self._position(t)
