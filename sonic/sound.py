"""The video's sound track: the recording as a listener should hear it, stereo at SOUND_RATE.

The motion is made from a 16 kHz mono copy (`media.load_audio`), which would cut everything
above 8 kHz; the sound track is decoded again from the same file (`load_sound`) and made
listenable: a voice in the middle at its own level, no clicks, no offset, no clipping.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Busy, PipelineError, UnsupportedMedia
from .media import (
    MAX_CHANNELS,
    MIX_LOSS,
    SAMPLE_RATE,
    SOUND_RATE,
    average_of,
    probe_audio,
    resampled,
    rms,
    run_ffmpeg_on,
    unmixable_channels,
)

log = logging.getLogger("sonic.sound")
OPPOSITE_PHASE = -0.5  # correlation of the two sides below this: a miswired pair, the voice cancels in mono
ONE_SIDED = 0.1  # one side's RMS below this share of the other's (20 dB): the voice is on one side only
CUT_SHORT_S, CUT_SHORT_SHARE = 0.5, 0.05  # a file this much shorter than it says it is was cut short


@dataclass(frozen=True)
class Sound:
    """What the video's sound track plays: the recording at a listener's quality (the motion is
    made from a 16 kHz mono copy, which would cut everything above 8 kHz)."""

    samples: np.ndarray  # (N, C) int16
    rate: int  # Hz
    stated_s: float | None = None  # how long the file says it is, where it says so (not a guess)
    stand_in: bool = False  # the 16 kHz analysis copy, the file not decoded again (`load_sound`)

    @staticmethod
    def of_waveform(wav: np.ndarray, rate: int = SAMPLE_RATE) -> "Sound":
        """A waveform (N,) float32 at `rate` Hz (a caller's array: no better copy exists), on
        both channels at its own level (a mono track is played 3 dB down on each side)."""
        return Sound(np.repeat((np.clip(wav, -1, 1) * 32767).astype(np.int16)[:, None], 2, axis=1), rate)

    def fitted(self, duration: float) -> "Sound":
        """Trimmed, or padded with silence, to `duration` s."""
        return dataclasses.replace(self, samples=fitted_samples(self.samples, int(round(duration * self.rate))))

    def stand_in_warning(self) -> str | None:
        """A warning where the file could not be decoded again for the sound track: the video
        plays the 16 kHz copy, everything above 8 kHz cut (it was said only in the log)."""
        if not self.stand_in:
            return None
        return (
            "the sound track plays a 16 kHz copy of the recording: it could not be decoded again (see the server log)"
        )

    def cut_short(self, decoded_s: float) -> str | None:
        """A warning where the file says it lasts longer than the decoder found in it: a
        recording cut short (an upload or a recorder stopped early) would otherwise just make a
        shorter video."""
        if self.stated_s is None or self.stated_s - decoded_s <= max(CUT_SHORT_S, CUT_SHORT_SHARE * self.stated_s):
            return None
        return (
            f"the recording says it lasts {self.stated_s:.1f} s, but only {decoded_s:.1f} s of it could be "
            "decoded: the file may be cut short"
        )


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

    def decoded(to_stereo: list[str], rate: int = SOUND_RATE):  # the recording at `rate`, stereo by `to_stereo`
        out = ["-map", "0:a:0", "-vn", "-t", f"{seconds:.3f}", *to_stereo, "-ar", str(rate)]
        # the bytes bound it too: -t goes by timestamps, which a file may not advance
        cap = int((seconds + 1) * rate) * 2 * 4
        return run_ffmpeg_on(path, ["-v", "error"], [*out, "-f", "f32le", "-"], max_output_bytes=cap)

    try:
        stream = probe_audio(path)
        # a mono recording on both channels at its own level (ffmpeg's upmix lowers it 3 dB)
        mix = ["-af", "pan=stereo|c0=c0|c1=c0"] if stream is not None and stream.channels == 1 else ["-ac", "2"]
        proc = decoded(mix)
        # channels ffmpeg has no layout to downmix (9 of them...): their average, as `wav` has
        n = unmixable_channels(proc.stderr) if proc.returncode != 0 else None
        if n is not None and n <= MAX_CHANNELS:
            mix = ["-af", average_of(n, "stereo")]
            proc = decoded(mix)
    except (PipelineError, UnsupportedMedia, Busy) as e:  # a job under way is not failed for its sound's quality
        log.warning("the sound track could not be decoded again (%s): it plays the 16 kHz analysis copy", e.message)
        return dataclasses.replace(Sound.of_waveform(wav), stand_in=True)
    if proc.returncode != 0 or len(proc.stdout) < 8:
        log.warning(
            "the sound track could not be decoded again (ffmpeg ended %d): it plays the 16 kHz copy", proc.returncode
        )
        return dataclasses.replace(Sound.of_waveform(wav), stand_in=True)
    raw, proc.stdout = proc.stdout, b""  # one copy of a 5-minute track at a time (115 MB each)
    samples = _stereo(raw)
    del raw
    if stream is not None and stream.rate != SOUND_RATE and not np.isfinite(samples).all():
        # samples that are not numbers: made silence at the file's own rate, then resampled
        # (resampled first, each one spread over the resampler's filter, a gap of silence)
        try:
            again = decoded(mix, stream.rate)
        except (PipelineError, UnsupportedMedia, Busy):
            again = None
        if again is not None and again.returncode == 0 and len(again.stdout) >= 8:
            native = _stereo(again.stdout).copy()
            native[~np.isfinite(native)] = 0.0
            samples = resampled(native, stream.rate, SOUND_RATE)
    stereo = listenable(samples)
    stated = None if stream is None or stream.estimated else stream.duration_s
    if rms(stereo) < MIX_LOSS * rms(wav):  # the downmix left out the voice the analysis copy has (the LFE's)
        return dataclasses.replace(Sound.of_waveform(wav), stated_s=stated)
    stereo *= 32767
    return Sound(np.round(stereo, out=stereo).astype(np.int16), SOUND_RATE, stated)


def _stereo(raw: bytes) -> np.ndarray:
    """ffmpeg's interleaved float32 stereo -> (N, 2), a view of `raw` (read-only)."""
    return np.frombuffer(raw, dtype=np.float32)[: len(raw) // 8 * 2].reshape(-1, 2)


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
        louder = int(np.argmax(power))
        x[:, 1 - louder] = x[:, louder]
    return x
