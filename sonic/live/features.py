"""Streaming twins of the audio encoder (sonic/audio_features.py): loudness normalised online and
phones recognised as the audio arrives, each with a bounded look-ahead.

Offline, loudness is normalised to the clip's own range (its 97th and 5th percentiles) and phones
come from one pass of the recogniser over the whole recording. A live session has neither the
whole clip nor time to wait for it: the range is tracked over the last seconds heard, and the
recogniser runs incrementally, its partial result read after every frame.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import scipy.signal  # noqa: F401 - imported here, not at a session's first frame (~0.6 s)

from ..audio_features import (
    band_filter_start,
    frame_loudness,
    frame_pitch,
    loudest_voiced,
    min_range_db,
    phone_decoder,
    pitch_window,
    scale_loudness,
    timed_phones,
)
from ..media import SAMPLE_RATE

LEVEL_WINDOW_S = 8.0  # the loudness range is taken over the last seconds heard
SILENCE_DB = -70.0  # frames quieter than this (digital silence, a muted microphone) do not move the range
PEAK_FALL_DB_S = 3.0  # a single loud syllable sets the peak at once; it relaxes this fast after
HISTORY_S = 0.5  # audio kept before the frames being measured: the band filter's run-in
UTTERANCE_MAX_S = 8.0  # the recogniser's utterance is restarted this often at most ...
UTTERANCE_PAUSE_S = 0.4  # ... and after a pause this long: its partial result stays short and cheap


class LoudnessStream:
    """Band-limited loudness per video frame, normalised to 0-1 by a range tracked online, and
    the voice's pitch (as offline: audio_features.frame_pitch).

    `push(samples)` with the session's audio (any number of samples) returns the frames whose
    measuring window (two frames wide, centred on the frame, as offline) is complete."""

    def __init__(self, fps: int) -> None:
        self.fps = fps
        self._audio = np.zeros(0, np.float32)
        self._audio_start = 0  # sample index of self._audio[0]
        self._heard = 0  # samples pushed in all
        self.frames_done = 0  # frames measured so far
        self._levels: deque[float] = deque(maxlen=int(LEVEL_WINDOW_S * fps))
        self._voiced: deque[bool] = deque(maxlen=int(LEVEL_WINDOW_S * fps))  # beside _levels
        self._peak_env = -np.inf
        # frames before a frame that its pitch window reaches (half a window, and one for rounding)
        self._pitch_back = int(np.ceil(pitch_window(fps) / 2 / (SAMPLE_RATE / fps))) + 1
        band_filter_start()  # designed and started now (once a process), not while the first frame is due

    def _frame_start(self, i: int) -> int:
        return int(round(i * SAMPLE_RATE / self.fps))

    def push(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New audio -> the normalised loudness (n,) and the pitch (n,) of the frames it completed."""
        self._audio = np.concatenate([self._audio, samples.astype(np.float32, copy=False)])
        self._heard += len(samples)
        hop = SAMPLE_RATE / self.fps
        # frame i's window ends 1.5 hops after its start, plus the band filter's run-out
        ready = int(np.floor((self._heard - 0.5 * hop - 0.01 * SAMPLE_RATE) / hop)) - 1
        first, n = self.frames_done, max(0, ready + 1 - self.frames_done)
        if n == 0:
            return np.zeros(0), np.zeros(0)
        # loudness from HISTORY_S before the first new frame, so that the filter has settled; the
        # pitch from the frames whose window reaches into the first new frame's (only the new
        # frames' estimates are kept: the others would be made again at every frame)
        back = min(int(np.ceil(HISTORY_S * self.fps)), first)
        seg = self._audio[self._frame_start(first - back) - self._audio_start :]
        db = frame_loudness(seg, back + n, self.fps)[back:]
        pitch_from = max(self._audio_start, self._frame_start(max(0, first - self._pitch_back)))
        pitch = frame_pitch(self._audio[pitch_from - self._audio_start :], n, self.fps, first, pitch_from)
        self.frames_done += n
        keep_from = self._frame_start(max(0, self.frames_done - int(np.ceil(HISTORY_S * self.fps))))
        self._audio = self._audio[keep_from - self._audio_start :]
        self._audio_start = keep_from
        voiced = ~np.isnan(pitch)
        return np.array([self._normalise(float(d), bool(v)) for d, v in zip(db, voiced, strict=True)]), pitch

    def silence_from(self, frame: int) -> None:
        """The audio kept from frame `frame` on is heard as silence (an interrupt drops it)."""
        start = max(0, self._frame_start(frame) - self._audio_start)
        self._audio[start:] = 0.0

    def _normalise(self, db: float, voiced: bool) -> float:
        """One frame's dB -> 0-1 against the range heard so far (offline: the clip's range)."""
        if db > SILENCE_DB:
            self._levels.append(db)
            self._voiced.append(voiced)
        self._peak_env = max(db, self._peak_env - PEAK_FALL_DB_S / self.fps)
        if not self._levels:
            return 0.0
        levels = np.fromiter(self._levels, float)
        floor = float(np.percentile(levels, 5))
        spoken = loudest_voiced(levels, np.fromiter(self._voiced, bool))
        peak = max(float(np.percentile(levels, 97)), self._peak_env - 3.0, floor + min_range_db(spoken))
        return float(scale_loudness(np.array(db), floor, peak, spoken))


class PhoneStream:
    """pocketsphinx's phone recogniser fed as the audio arrives; `phones()` is its best guess so
    far, [(ARPAbet phone, start_s, end_s), ...] in session seconds (recent phones may still change)."""

    def __init__(self) -> None:
        self._decoder = phone_decoder(cmn="live")  # the files' settings; the mean tracked as it goes
        self._done: deque[tuple[str, float, float]] = deque(maxlen=200)  # phones of ended utterances
        self._current: list[tuple[str, float, float]] = []
        self._utt_start = 0  # sample index where the current utterance began
        self._fed = 0  # samples fed in all
        self._quiet = 0  # samples of pause at the end of what was fed
        self._decoder.start_utt()

    def push(self, samples: np.ndarray, speech: bool) -> None:
        """Feed audio (float32 at SAMPLE_RATE); `speech` says whether it holds speech (the loudness
        stream's verdict), which decides where utterances end."""
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        self._decoder.process_raw(pcm, full_utt=False)
        self._fed += len(samples)
        self._quiet = 0 if speech else self._quiet + len(samples)
        length = self._fed - self._utt_start
        if (
            self._quiet >= UTTERANCE_PAUSE_S * SAMPLE_RATE
            and length > self._quiet
            or length >= (UTTERANCE_MAX_S * SAMPLE_RATE)
        ):
            self._decoder.end_utt()
            self._done.extend(self._read())
            self._current = []
            self._decoder.start_utt()
            self._utt_start = self._fed
        else:
            self._current = self._read()

    def _read(self) -> list[tuple[str, float, float]]:
        return timed_phones(self._decoder, self._utt_start / SAMPLE_RATE)

    def phones(self, since_s: float) -> list[tuple[str, float, float]]:
        """The phones that end after `since_s`."""
        return [p for p in (*self._done, *self._current) if p[2] > since_s]
