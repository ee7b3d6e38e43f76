"""The video's sound track: the recording as a listener should hear it, stereo at SOUND_RATE.

The motion is made from a 16 kHz mono copy (`media.load_audio`), which would cut everything
above 8 kHz; the sound track is decoded again from the same file (`load_sound`) and made
listenable: a voice in the middle at its own level, no clicks, no offset, no clipping.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Busy, PipelineError, UnsupportedMedia
from .media import MIX_LOSS, SAMPLE_RATE, SOUND_RATE, probe_audio, rms, run_ffmpeg_on

log = logging.getLogger("sonic.sound")
OPPOSITE_PHASE = -0.5  # correlation of the two sides below this: a miswired pair, the voice cancels in mono
ONE_SIDED = 0.1  # one side's RMS below this share of the other's (20 dB): the voice is on one side only


@dataclass(frozen=True)
class Sound:
    """What the video's sound track plays: the recording at a listener's quality (the motion is
    made from a 16 kHz mono copy, which would cut everything above 8 kHz)."""

    samples: np.ndarray  # (N, C) int16
    rate: int  # Hz

    @staticmethod
    def of_waveform(wav: np.ndarray) -> "Sound":
        """A waveform (N,) float32 at SAMPLE_RATE (a caller's array: no better copy exists), on
        both channels at its own level (a mono track is played 3 dB down on each side)."""
        return Sound(np.repeat((np.clip(wav, -1, 1) * 32767).astype(np.int16)[:, None], 2, axis=1), SAMPLE_RATE)

    def fitted(self, duration: float) -> "Sound":
        """Trimmed, or padded with silence, to `duration` s."""
        return Sound(fitted_samples(self.samples, int(round(duration * self.rate))), self.rate)


def fitted_samples(samples: np.ndarray, n: int) -> np.ndarray:
    """Samples (N, ...) trimmed, or padded with silence, to n (the same array when N is n)."""
    if n <= len(samples):
        return samples if n == len(samples) else samples[:n]
    return np.concatenate([samples, np.zeros((n - len(samples), *samples.shape[1:]), samples.dtype)])


def load_sound(path: str | Path, max_duration_s: float, wav: np.ndarray) -> Sound:
    """The recording for the sound track, stereo at SOUND_RATE, as a listener should hear it
    (`listenable`); where ffmpeg cannot make that of it (a layout it cannot downmix) or the file
    is gone (its job's upload moved to a bucket), `wav`, the checked analysis copy of the same
    recording."""
    seconds = min(max_duration_s, len(wav) / SAMPLE_RATE) + 1  # no further than `wav` was decoded
    try:
        stream = probe_audio(path)
        # a mono recording on both channels at its own level (ffmpeg's upmix lowers it 3 dB)
        to_stereo = ["-af", "pan=stereo|c0=c0|c1=c0"] if stream is not None and stream.channels == 1 else ["-ac", "2"]
        out = ["-map", "0:a:0", "-vn", "-t", f"{seconds:.3f}", *to_stereo, "-ar", str(SOUND_RATE)]
        proc = run_ffmpeg_on(path, ["-v", "error"], [*out, "-f", "f32le", "-"])
    except (PipelineError, UnsupportedMedia, Busy):  # a job under way is not failed for its sound's quality
        log.warning("the sound track could not be decoded again: it plays the 16 kHz analysis copy")
        return Sound.of_waveform(wav)
    if proc.returncode != 0 or len(proc.stdout) < 8:
        return Sound.of_waveform(wav)
    stereo = listenable(np.frombuffer(proc.stdout, dtype=np.float32)[: len(proc.stdout) // 8 * 2].reshape(-1, 2))
    if rms(stereo) < MIX_LOSS * rms(wav):  # the downmix left out the voice the analysis copy has (the LFE's)
        return Sound.of_waveform(wav)
    return Sound(np.round(stereo * 32767).astype(np.int16), SOUND_RATE)


def listenable(stereo: np.ndarray) -> np.ndarray:
    """A decoded stereo recording (N, 2) float32 as the video should play it: non-finite samples
    silent (they were full-scale clicks), no DC offset (a pop at each end, lost headroom),
    speech that one side carries alone, or the two in opposite phase (a miswired pair: silent
    when mixed to mono, on a phone), in the middle, and a float recording over full scale
    brought down rather than clipped. Float32, in place where it can: a 5-minute track at
    48 kHz is 115 MB a copy."""
    x = np.nan_to_num(stereo.astype(np.float32), copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    x -= x.mean(axis=0, dtype=np.float64).astype(np.float32)
    peak = max(float(x.max()), -float(x.min())) if len(x) else 0.0
    if peak > 1.0:  # brought down first: the sums below stay finite, whatever the float file held
        x /= peak
    left, right = x[:, 0], x[:, 1]
    power = np.array([np.dot(left, left), np.dot(right, right)], np.float64) / max(len(x), 1) + 1e-24
    if np.dot(left, right) / max(len(x), 1) / np.sqrt(power[0] * power[1]) < OPPOSITE_PHASE:
        left -= right  # the difference is the voice
        left *= 0.5
        x[:, 1] = left
    elif np.sqrt(power.min() / power.max()) < ONE_SIDED:
        x[:, :] = x[:, [int(np.argmax(power))]]
    return x
