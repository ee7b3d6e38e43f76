"""Prosody: where a speaker stresses a word and where a phrase begins, from loudness and pitch.

Speakers raise their brows and nod on a few stressed syllables of a phrase (pitch accents: the
voice louder and higher than around it) and often when they start a phrase after a pause. This
finds both in any language, from the audio encoder's per-frame loudness (0-1) and pitch
(semitones, nan unvoiced), one frame at a time: files run it over the clip, live sessions as the
audio arrives, so the same audio gives the same events in both (sonic/motion.py, sonic/live/).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .audio_features import SPEECH_THRESHOLD

PHRASE_PAUSE_S = 0.3  # speech after a pause at least this long starts a phrase
ACCENT_GAP_S = 0.9  # accents are at least this far apart: a few per sentence, never every syllable
LOUD_MEAN_S = 1.5  # an accent is loud relative to the mean loudness over this much before it ...
PITCH_MEDIAN_S = 3.0  # ... and high relative to the median pitch over this much
PITCH_SPAN_ST = 3.0  # semitones above the median that count as much as the loudest syllable
ACCENT_THRESHOLD = 0.38  # prominence above this is an accent
OCTAVE_ST = 8.0  # a pitch this far from the median is an octave error of the tracker: folded back


@dataclass(frozen=True)
class Event:
    """A prosodic event at frame `frame`: an accent (a stressed syllable) or a phrase start,
    `strength` 0-1 (how prominent it is)."""

    frame: int
    kind: str  # "accent" or "phrase"
    strength: float


class ProsodyDetector:
    """Accents and phrase starts, causally: `push` one frame's loudness and pitch, in frame order,
    and get the events that frame starts (at most one)."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self.frame = 0  # the next frame pushed
        self._quiet = int(np.ceil(PHRASE_PAUSE_S * fps))  # frames of pause behind: a clip starts with one
        self._last_accent = -(10**9)
        self._loud: deque[float] = deque(maxlen=max(1, int(LOUD_MEAN_S * fps)))
        self._pitch: deque[float] = deque(maxlen=max(1, int(PITCH_MEDIAN_S * fps)))
        self._prev_score = 0.0

    def push(self, loudness: float, pitch: float) -> Event | None:
        i, fps = self.frame, self.fps
        self.frame += 1
        speech = loudness > SPEECH_THRESHOLD
        mean_loud = float(np.mean(self._loud)) if self._loud else 0.0
        self._loud.append(loudness)
        rise = 0.0
        if np.isfinite(pitch) and speech:
            if self._pitch:
                median = float(np.median(self._pitch))
                if abs(pitch - median) > OCTAVE_ST:
                    pitch -= 12.0 * np.sign(pitch - median)
                rise = (pitch - median) / PITCH_SPAN_ST
            self._pitch.append(pitch)
        score = float(np.clip(loudness - mean_loud, 0, 1) + np.clip(rise, 0, 1)) if speech else 0.0
        crossed = score > ACCENT_THRESHOLD >= self._prev_score
        self._prev_score = score
        event = None
        if speech and self._quiet >= PHRASE_PAUSE_S * fps:
            event = Event(i, "phrase", float(np.clip(loudness, 0.3, 1.0)))
            self._last_accent = i  # the phrase start's raise counts as its first accent
        elif crossed and i - self._last_accent >= ACCENT_GAP_S * fps:
            event = Event(i, "accent", float(np.clip((score - ACCENT_THRESHOLD) / 0.6 + 0.3, 0.3, 1.0)))
            self._last_accent = i
        self._quiet = 0 if speech else self._quiet + 1
        return event


def detect(loudness: np.ndarray, pitch: np.ndarray | None, fps: int) -> list[Event]:
    """The events of a whole clip (T,) and (T,): the detector run frame by frame, as live."""
    detector = ProsodyDetector(fps)
    pitches = np.full(len(loudness), np.nan) if pitch is None else pitch
    events = (detector.push(float(v), float(p)) for v, p in zip(loudness, pitches, strict=True))
    return [e for e in events if e is not None]
