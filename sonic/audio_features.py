"""Audio encoder: waveform -> per-video-frame features.

Signal features (any language): band-limited loudness in [0, 1] and a speech mask.
Phonetic features (English; elsewhere they only refine shapes): pocketsphinx's phone recogniser
gives timed ARPAbet phones, turned into viseme targets (openness, spread, rounding, closure).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from .media import SAMPLE_RATE

SPHINX_FRAME_S = 0.01  # pocketsphinx reports times in 10 ms frames
BAND_HZ = (80.0, 4000.0)  # speech band for loudness
DYNAMIC_RANGE_DB = 45.0  # loudness below peak - this counts as silence
MIN_RANGE_DB = 24.0  # the peak sits at least this far above the floor: room noise alone never reads as speech
# ... unless the loudest frames are voiced: speech under steady noise, its syllables 8-13 dB over it
VOICED_RANGE_DB = 12.0
VOICED_SHARE = 0.5  # of the loudest LOUDEST_SHARE of frames (speech 0.7-0.95; noise 0, chords 0.2-0.3)
LOUDEST_SHARE = 0.3
SPEECH_THRESHOLD = 0.25  # normalised loudness above this is speech
# a voice's loudness is read against a scale at least this deep below its peak: clean speech
# spans 35-45 dB from its syllables' peaks to its pauses, and a syllable 10 dB under the peak is
# as open a mouth whether noise fills the pauses or not (read over the 16 dB that pink noise at
# 5 dB SNR leaves, the same syllable opened the mouth 45 % less)
SPEECH_SPAN_DB = 30.0
# ... and the frames this close above the background fade to 0 on it, so that the noise's own
# flutter moves the mouth no more than it did on the range alone
BACKGROUND_FADE_DB = 9.0
# a frame of voiced speech that the recogniser names no phone in (noise hides the phone: it
# says silence, "spoken noise", or nothing) opens the mouth as a mid vowel does
UNHEARD_VOWEL_OPEN = 0.5
# speech standing less than this over the recording's background (pink noise at 5 dB SNR: 16.6;
# clean recordings: 35-83; music or hum under speech: 18-20) is said to be noisy: the mouth opens
# about a fifth less than on the same speech clean (a third less before SPEECH_SPAN_DB)
NOISY_RANGE_DB = 17.0
# ... judged on this much recording at least: a second of speech without a pause has no quiet
# frame, and its 5th percentile is speech (a clean one measured 15 dB)
NOISY_MIN_S = 2.5
SPLIT_MIN_S = 6.0  # recordings at least this long may be recognised in two halves
SPLIT_PAUSE_FRAMES = 4  # ... cut in the middle of a pause of at least this many video frames
SPLIT_WINDOW = (0.3, 0.7)  # ... lying in this part of the recording
PITCH_HZ = (70.0, 400.0)  # the voice's fundamental is sought in this range
FEATURE_BLOCK_FRAMES = 500  # frames whose windows are measured at once (memory)
PITCH_WINDOW_S = 0.05  # at least this much audio per pitch estimate (two periods of 70 Hz and more)
VOICING = 0.55  # normalised autocorrelation at the period above this: the frame is voiced

# ARPAbet phone -> (open 0-1, spread -1..1 (negative = rounded), closure 0-1)
VISEMES: dict[str, tuple[float, float, float]] = {
    "P": (0.0, 0.0, 1.0),
    "B": (0.0, 0.0, 1.0),
    "M": (0.0, 0.0, 1.0),
    "F": (0.1, 0.1, 0.6),
    "V": (0.1, 0.1, 0.6),
    "TH": (0.2, 0.1, 0.0),
    "DH": (0.2, 0.1, 0.0),
    "T": (0.25, 0.3, 0.0),
    "D": (0.25, 0.3, 0.0),
    "N": (0.2, 0.3, 0.0),
    "L": (0.3, 0.2, 0.0),
    "S": (0.15, 0.5, 0.0),
    "Z": (0.15, 0.5, 0.0),
    "SH": (0.25, -0.5, 0.0),
    "ZH": (0.25, -0.5, 0.0),
    "CH": (0.25, -0.5, 0.0),
    "JH": (0.25, -0.5, 0.0),
    "K": (0.35, 0.1, 0.0),
    "G": (0.35, 0.1, 0.0),
    "NG": (0.3, 0.1, 0.0),
    "HH": (0.4, 0.0, 0.0),
    "R": (0.25, -0.4, 0.0),
    "W": (0.15, -1.0, 0.0),
    "Y": (0.2, 0.5, 0.0),
    "IY": (0.3, 0.8, 0.0),
    "IH": (0.35, 0.6, 0.0),
    "EY": (0.45, 0.6, 0.0),
    "EH": (0.6, 0.4, 0.0),
    "AE": (0.75, 0.4, 0.0),
    "AA": (0.9, 0.0, 0.0),
    "AH": (0.6, 0.0, 0.0),
    "AO": (0.75, -0.4, 0.0),
    "AW": (0.8, -0.3, 0.0),
    "AY": (0.8, 0.2, 0.0),
    "ER": (0.35, -0.3, 0.0),
    "UW": (0.25, -1.0, 0.0),
    "UH": (0.35, -0.5, 0.0),
    "OW": (0.5, -0.8, 0.0),
    "OY": (0.5, -0.6, 0.0),
}


class PhonesFuture(Protocol):
    def result(self) -> list[tuple[str, float, float]]: ...


@dataclass(frozen=True)
class AudioFeatures:
    """Per-video-frame features, each shape (T,), at `fps` frames per second."""

    fps: int
    loudness: np.ndarray  # 0-1, band-limited log energy normalised to the clip's range
    speech: np.ndarray  # bool, frame holds speech
    vis_open: np.ndarray  # 0-1 viseme openness target
    vis_spread: np.ndarray  # -1 (rounded) .. 1 (spread)
    vis_closure: np.ndarray  # 0-1, lips pressed (P/B/M)
    phones: tuple  # ((phone, start_s, end_s), ...)
    pitch: np.ndarray | None = None  # the voice's pitch, semitones above 100 Hz; nan where unvoiced


def phone_decoder(cmn: str):
    """A pocketsphinx all-phone decoder with this project's settings; `cmn` is how it normalises
    the cepstral mean: "batch" over a whole utterance (files), "live" as it goes (live sessions)."""
    from pocketsphinx import Decoder, get_model_path

    return Decoder(
        allphone=get_model_path("en-us/en-us-phone.lm.bin"),
        lw=2.0,
        pip=0.3,
        beam=1e-200,
        pbeam=1e-20,
        cmn=cmn,
        loglevel="FATAL",
    )


def timed_phones(decoder, offset_s: float = 0.0) -> list[tuple[str, float, float]]:
    """A decoder's segmentation so far as [(ARPAbet phone, start_s, end_s), ...], its utterance
    starting at `offset_s` (none yet: [])."""
    segments = decoder.seg()
    if segments is None:
        return []
    return [
        (s.word, offset_s + s.start_frame * SPHINX_FRAME_S, offset_s + (s.end_frame + 1) * SPHINX_FRAME_S)
        for s in segments
    ]


class PhoneRecognizer:
    """pocketsphinx all-phone decoder; the model ships inside the pocketsphinx wheel."""

    def __init__(self) -> None:
        phone_decoder(cmn="batch")  # fail at start-up, not on the first request, if the model is missing

    def __call__(self, wav: np.ndarray) -> list[tuple[str, float, float]]:
        """Timed phones of a waveform at SAMPLE_RATE: [(ARPAbet phone, start_s, end_s), ...]."""
        pcm = (np.clip(wav, -1, 1) * 32767).astype("<i2").tobytes()
        # a decoder carries its feature normalisation from one utterance to the next; a fresh one
        # (~0.08 s, model files are in the page cache) makes the same audio give the same phones
        d = phone_decoder(cmn="batch")
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        return timed_phones(d)


@functools.cache
def band_filter() -> np.ndarray:
    """The speech band's filter (second-order sections), designed once: a live session measures
    loudness every frame."""
    from scipy.signal import butter

    return butter(4, BAND_HZ, btype="band", fs=SAMPLE_RATE, output="sos")


@functools.cache
def band_filter_start() -> tuple[np.ndarray, int]:
    """How band_filtered starts each pass: the band filter's steady-state response to a step,
    per section, and how many samples it extends a signal by at each end (3 x the filter's taps,
    2 a section and 1, less its zeros at the end; scipy's default). Computed once: a live
    session filters every frame, and the state alone took a fifth of an unrendered frame's time."""
    from scipy.signal import sosfilt_zi

    sos = band_filter()
    taps = 2 * len(sos) + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    return sosfilt_zi(sos), 3 * taps


def band_filtered(wav: np.ndarray) -> np.ndarray:
    """`wav` (float64, longer than 100 samples) through the band filter forwards, then backwards
    (zero phase), each pass started in the steady state of its first sample, the signal extended
    at both ends by its point reflection: what scipy.signal.sosfiltfilt does by default."""
    from scipy.signal import sosfilt  # here: a render helper recognising phones skips its 60 MB

    sos, (state, edge) = band_filter(), band_filter_start()
    if len(wav) <= edge:
        raise ValueError(f"the band filter needs more than {edge} samples, got {len(wav)}")
    ext = np.concatenate([2 * wav[0] - wav[edge:0:-1], wav, 2 * wav[-1] - wav[-2 : -edge - 2 : -1]])
    forward = sosfilt(sos, ext, zi=state * ext[0])[0]
    backward = sosfilt(sos, forward[::-1], zi=state * forward[-1])[0]
    return backward[::-1][edge:-edge]


def frame_loudness(wav: np.ndarray, n_frames: int, fps: int) -> np.ndarray:
    """Band-limited RMS in dB over a 2-frame Hann window centred on each frame, (T,)."""
    x = band_filtered(wav.astype(np.float64)) if wav.size > 100 else wav.astype(np.float64)
    hop = SAMPLE_RATE / fps
    win = int(round(2 * hop))
    hann = np.hanning(win)
    pad = np.concatenate([np.zeros(win), x, np.zeros(win + int(n_frames * hop))])
    centres = np.round((np.arange(n_frames) + 0.5) * hop).astype(int) + win - win // 2
    rms, energy = np.empty(n_frames), (hann**2).sum()
    for block in _blocks(n_frames):
        seg = pad[centres[block, None] + np.arange(win)[None, :]] * hann
        rms[block] = np.sqrt((seg**2).sum(1) / energy)
    return 20 * np.log10(rms + 1e-7)


def _blocks(n_frames: int) -> list[slice]:
    """The frames in blocks of FEATURE_BLOCK_FRAMES: a measure's windows are made a block at a
    time (a 5-minute clip's, all at once, took 1.4 GB)."""
    return [slice(a, min(a + FEATURE_BLOCK_FRAMES, n_frames)) for a in range(0, n_frames, FEATURE_BLOCK_FRAMES)]


def pitch_window(fps: int) -> int:
    """The samples each pitch estimate looks at (centred on its frame)."""
    return int(round(max(2 * SAMPLE_RATE / fps, PITCH_WINDOW_S * SAMPLE_RATE)))


def frame_pitch(wav: np.ndarray, n_frames: int, fps: int, first_frame: int = 0, wav_start: int = 0) -> np.ndarray:
    """The voice's pitch per frame, (T,) in semitones above 100 Hz, nan where the frame is not
    voiced: the peak of the normalised autocorrelation over PITCH_HZ, in a window centred on the
    frame (its width the larger of two frames and PITCH_WINDOW_S). Any language; what matters
    downstream is how the pitch rises and falls, not its exact value. A stream measures frames
    from `first_frame` on, `wav` starting at sample `wav_start` of its audio: the windows are
    placed as on the whole clip, to the sample, at any frame rate."""
    hop = SAMPLE_RATE / fps
    win = pitch_window(fps)
    x = wav.astype(np.float64)
    frames = first_frame + np.arange(n_frames)
    centres = np.round((frames + 0.5) * hop).astype(int) - wav_start + win - win // 2
    tail = max(win, int(centres[-1]) + win - len(x)) if n_frames else win  # zeros after the audio
    pad = np.concatenate([np.zeros(win), x, np.zeros(tail)])
    pitch = np.empty(n_frames)
    for block in _blocks(n_frames):
        pitch[block] = _window_pitch(pad[centres[block, None] + np.arange(win)[None, :]])
    return pitch


def _window_pitch(seg: np.ndarray) -> np.ndarray:
    """frame_pitch of each window (rows of `seg`)."""
    n, win = seg.shape
    seg = seg - seg.mean(1, keepdims=True)
    size = 1 << int(np.ceil(np.log2(2 * win)))
    spec = np.fft.rfft(seg, size)
    ac = np.fft.irfft(spec * np.conj(spec), size)[:, :win]
    lo, hi = int(SAMPLE_RATE / PITCH_HZ[1]), int(SAMPLE_RATE / PITCH_HZ[0])
    # unbiased (each lag averages over the samples it overlaps), relative to the energy at lag 0
    lags = np.arange(lo, hi + 1)
    r = ac[:, lo : hi + 1] * (win / (win - lags))[None, :] / np.maximum(ac[:, :1], 1e-12)
    # the shortest lag that nearly reaches the best correlation (its multiples reach it too: the
    # longest of them would read an octave low), refined to its own peak
    near_best = r >= 0.9 * r.max(axis=1, keepdims=True)
    first = np.argmax(near_best, axis=1)
    around = np.clip(first[:, None] + np.arange(8)[None, :], 0, r.shape[1] - 1)
    best = around[np.arange(n), np.argmax(np.take_along_axis(r, around, axis=1), axis=1)]
    strength = r[np.arange(n), best]
    period = (lags[best]).astype(np.float64)
    voiced = (strength > VOICING) & (ac[:, 0] > win * 1e-7)
    return np.where(voiced, 12 * np.log2(SAMPLE_RATE / period / 100.0), np.nan)


def normalise_loudness(db: np.ndarray, voiced: np.ndarray | None = None) -> np.ndarray:
    """Per-frame dB -> 0-1 over the clip's range, as a live session's is over what it has heard
    (sonic/live/features.py): a recording of room tone alone (1.7 dB from its 5th to its 97th
    percentile; speech: 35-83 dB) keeps the mouth at rest instead of fluttering with the noise.
    `voiced`: which frames have a voice's pitch (see min_range_db)."""
    floor = float(np.percentile(db, 5))
    spoken = loudest_voiced(db, voiced)
    peak = max(float(np.percentile(db, 97)), floor + min_range_db(spoken))
    return scale_loudness(db, floor, peak, spoken)


def loudest_voiced(db: np.ndarray, voiced: np.ndarray | None) -> bool:
    """Whether the loudest frames are mostly voiced: a voice, not noise that swells."""
    if voiced is None or not len(db):
        return False
    loudest = db >= np.percentile(db, 100 * (1 - LOUDEST_SHARE))
    return float(np.mean(voiced[loudest])) >= VOICED_SHARE


def min_range_db(spoken: bool) -> float:
    """How far above the floor the loudest frames must sit to read as full speech: MIN_RANGE_DB,
    so that noise alone does not open the mouth, or VOICED_RANGE_DB where they are a voice
    (`spoken`): speech under loud steady noise (at 0 dB SNR its syllables rose 9 dB over the
    noise, and the mouth barely moved: 0.007 IOD against 0.047 clean)."""
    return VOICED_RANGE_DB if spoken else MIN_RANGE_DB


def scale_loudness(db: np.ndarray, floor: float, peak: float, spoken: bool) -> np.ndarray:
    """dB -> 0-1 between the background (`floor`) and the loudest speech (`peak`); offline and
    live alike. Over its own range, unless it is a voice (`spoken`) whose range noise has cut
    short of SPEECH_SPAN_DB: that is read on a scale SPEECH_SPAN_DB deep under its peak, where the
    background itself would sit above 0, so the frames near it fade to 0 (over BACKGROUND_FADE_DB,
    or what the range falls short by if less). A clean recording with pauses (35-45 dB) is read on
    its range as ever; a short one without a pause, whose quietest frames are speech, is not."""
    floor = max(floor, peak - DYNAMIC_RANGE_DB)
    short_by = SPEECH_SPAN_DB - (peak - floor) if spoken else 0.0
    if short_by <= 0:
        return np.clip((db - floor) / max(peak - floor, 1e-3), 0.0, 1.0)
    level = np.clip(1 - (peak - db) / SPEECH_SPAN_DB, 0.0, 1.0)
    return level * np.clip((db - floor) / min(BACKGROUND_FADE_DB, short_by), 0.0, 1.0)


@dataclass(frozen=True)
class Hearing:
    """What a recording as sent holds: any speech at all, and how far its loudest moments stand
    above its background (the 97th over the 5th percentile of its frames' loudness, dB)."""

    speech: bool
    over_background_db: float
    seconds: float

    @property
    def noisy(self) -> bool:
        return self.speech and self.seconds >= NOISY_MIN_S and self.over_background_db < NOISY_RANGE_DB


def hear(wav: np.ndarray, fps: int) -> Hearing:
    """Judged on the recording as it was sent: silence added to reach a longer `duration` would
    make a steady hum read as loud against it."""
    n_frames = max(1, int(round(len(wav) / SAMPLE_RATE * fps)))
    db = frame_loudness(wav, n_frames, fps)
    return Hearing(
        speech=bool((normalise_loudness(db) > SPEECH_THRESHOLD).any()),
        over_background_db=float(np.percentile(db, 97) - np.percentile(db, 5)),
        seconds=len(wav) / SAMPLE_RATE,
    )


def viseme_tracks(
    phones, n_frames: int, fps: int, voiced_speech: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Piecewise viseme targets sampled at frame centres (coarticulation comes from smoothing).

    `voiced_speech` (n_frames,): frames that are speech by their loudness and have a voice's
    pitch; those that no phone covers open as UNHEARD_VOWEL_OPEN."""
    t = (np.arange(n_frames) + 0.5) / fps
    op, sp, cl = np.zeros(n_frames), np.zeros(n_frames), np.zeros(n_frames)
    heard = np.zeros(n_frames, bool)
    for ph, s, e in phones:
        v = VISEMES.get(ph.strip("+").upper())
        if v is None:
            continue
        m = (t >= s) & (t < e)
        middle = int(np.floor((s + e) / 2 * fps))
        if not m.any() and v[2] > 0 and middle >= 0:  # short closures still close the lips for one frame
            m[min(n_frames - 1, middle)] = True
        op[m], sp[m], cl[m] = v
        heard |= m
    if voiced_speech is not None:
        op[voiced_speech & ~heard] = UNHEARD_VOWEL_OPEN
    return op, sp, cl


def pause_split(speech: np.ndarray, fps: int) -> int | None:
    """A sample index in the middle of the pause (no speech for SPLIT_PAUSE_FRAMES frames or more)
    nearest the recording's middle, among those whose middle lies within SPLIT_WINDOW, or None
    (the nearer the middle, the better the two halves share the work)."""
    n = len(speech)
    if n / fps < SPLIT_MIN_S:
        return None
    best, run_start = None, None
    for i, sp in enumerate(np.append(speech, True)):
        if not sp and run_start is None:
            run_start = i
        elif sp and run_start is not None:
            length, mid = i - run_start, (run_start + i) / 2
            if length >= SPLIT_PAUSE_FRAMES and SPLIT_WINDOW[0] * n <= mid <= SPLIT_WINDOW[1] * n:
                if best is None or abs(mid - n / 2) < abs(best[1] - n / 2):
                    best = (length, mid)
            run_start = None
    return None if best is None else int(round(best[1] / fps * SAMPLE_RATE))


def encode_audio(
    wav: np.ndarray,
    n_frames: int,
    fps: int,
    recognizer: PhoneRecognizer,
    second_half: Callable[[np.ndarray], "PhonesFuture | None"] | None = None,
) -> AudioFeatures:
    """Waveform (N,) float32 at SAMPLE_RATE -> AudioFeatures for n_frames video frames.

    With `second_half` (a function that starts recognising a waveform elsewhere, e.g. in a render
    helper process, and returns an object whose `result()` gives its phones), a recording of
    SPLIT_MIN_S or more with a pause near its middle is recognised in two halves side by side:
    pocketsphinx holds the interpreter lock, so two halves in one process would take as long as
    the whole. Cut in a pause, the halves give the same visemes as the whole within what any
    other setting of the recogniser changes (see docs/pipeline.md)."""
    pitch = frame_pitch(wav, n_frames, fps)
    loud = normalise_loudness(frame_loudness(wav, n_frames, fps), ~np.isnan(pitch))
    cut = pause_split(loud > SPEECH_THRESHOLD, fps) if second_half is not None else None
    pending = second_half(wav[cut:]) if second_half is not None and cut is not None else None
    if pending is None:
        phones = recognizer(wav)
    else:
        assert cut is not None  # a second half is started only at a cut
        first = recognizer(wav[:cut])
        t0 = cut / SAMPLE_RATE
        phones = first + [(ph, s + t0, e + t0) for ph, s, e in pending.result()]
    op, sp, cl = viseme_tracks(phones, n_frames, fps, (loud > SPEECH_THRESHOLD) & ~np.isnan(pitch))
    return AudioFeatures(
        fps=fps,
        loudness=loud,
        speech=loud > SPEECH_THRESHOLD,
        vis_open=op,
        vis_spread=sp,
        vis_closure=cl,
        phones=tuple(phones),
        pitch=pitch,
    )
