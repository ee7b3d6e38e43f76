"""Keypoint motion predictor: audio features -> per-frame motion coefficients and landmark offsets.

Motion is a few interpretable coefficients per frame (jaw drop, spread, rounding, blink, brow
raise, gaze) applied to a per-face rig: `Rig.basis` (K, 478, 2) holds the landmark offsets in px
of one unit of each coefficient, so landmark offsets = coeffs (T, K) @ basis. Head pose is a
separate rigid motion. Brows and nods follow the speech's prosody (sonic/prosody.py), the
irises a seeded path of fixations (sonic/gaze.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

if TYPE_CHECKING:  # annotations only: the render helpers import this module without the audio stack
    from .audio_features import AudioFeatures
    from .prosody import Event
from .landmarks import (
    CORNERS,
    EYE_OUTER,
    EYE_PAIRS,
    HEAD_PIVOT,
    INNER_LOWER,
    INNER_UPPER,
    LEFT_BROW_ALL,
    LEFT_IRIS,
    LIP_MIDDLE,
    LIP_PAIRS,
    OUTER_CORNERS,
    OUTER_LOWER,
    OUTER_UPPER,
    RIGHT_BROW_ALL,
    RIGHT_IRIS,
)

JAW_GAIN = 0.2  # inner-lip gap at full openness, in inter-ocular distances (IOD)
OPENING_MAX = 1.4  # the mouth's openness never goes past this (loud speech, dynamic_scale > 1)
OPEN_PHOTO_IOD = 0.03  # a photo whose inner lips are further apart than this has an open mouth
SPREAD_GAIN = 0.07  # corner travel at full spread/rounding, IOD
COARTIC_S = 0.045  # Gaussian blending of neighbouring visemes, s
SMOOTH_S = 0.03  # extra smoothing of the mouth with smooth_motion, s
CLOSURE_S = 0.02  # P/B/M closures: narrow in time so they stay full
HEAD_ROLL_DEG = 1.6  # head motion amplitudes at motion_scale 1 (std of the noise)
HEAD_SHIFT_IOD = 0.035
HEAD_SCALE = 0.006
HEAD_NOISE_S = 1.2  # time scale of the head's drift
HEAD_SMOOTH_S = 0.08  # smooth_motion's Gaussian over the head pose, s
# hard bounds at motion_scale 1 (they scale with it); the noise is soft-limited into them
MAX_ROLL_DEG = 4.0
MAX_SHIFT_IOD = 0.08
MAX_SCALE = 0.015  # x motion_scale <= 2: the scale stays within 1 +- 0.03
BLINK_MEAN_S = 4.0  # mean interval between blinks (15 / min)
BLINK_MIN_S = 1.8
BLINK_CLOSE_S, BLINK_HOLD_S, BLINK_OPEN_S = 0.08, 0.05, 0.13  # the lid closes, stays shut, opens
MAX_LAG_FRAMES = 4  # align_mouth searches +-4 frames
BROW_RAISE_IOD = (0.02, 0.05)  # a brow raise at the weakest .. strongest accent (x dynamic_scale)
# ... and never more, whatever dynamic_scale: the skin between a brow and the lid (or a fringe) is
# a few hundredths of an IOD high, and 0.1 IOD (the strongest accent at dynamic_scale 2) smeared
# the brows into vertical streaks. A soft limit past BROW_KNEE_IOD: stronger accents still rise
# higher, and a raise never stops flat against the bound
BROW_RAISE_MAX_IOD = 0.06
BROW_KNEE_IOD = 0.045
PHRASE_BROW = 0.7  # a phrase start raises the brows this much less than an accent as strong
BROW_RISE_S, BROW_FALL_S = 0.12, 0.2  # a raise lifts the brows this fast, and lets them down
BROW_HOLD_S = (0.05, 0.25)  # ... held this long between (weakest .. strongest): 0.37-0.57 s in all
BROW_LEAD_S = 0.04  # the raise begins this much before the stressed syllable (within live's look-ahead)
ACCENT_NOD = 0.6  # the nod on an accent, in nod_track's units (x 0.8 HEAD_SHIFT_IOD of head travel)

COEFFS = ("jaw", "spread", "round", "blink", "close_rest", "brow", "gaze_x", "gaze_y")


@dataclass(frozen=True)
class Motion:
    """coeffs (T, K) in COEFFS order; head (T, 4): roll (rad), tx, ty (px), scale (ratio - 1)."""

    coeffs: np.ndarray
    head: np.ndarray
    lipsync_offset_ms: float


@dataclass(frozen=True)
class Rig:
    basis: np.ndarray  # (K, 478, 2) px per unit coefficient
    iod: float  # inter-ocular distance, px
    centre: np.ndarray  # (2,) pivot of head motion, px
    rest_gap: float  # inner-lip gap of the photo at the middle, px
    open_gap: float  # mean inner-lip gap of the photo over the middle and both sides, px
    upper_lip: np.ndarray  # landmark indices of the upper lip (inside the outer lip contour)
    lower_lip: np.ndarray  # ... and of the lower lip
    lip_line: np.ndarray  # (11, 2) px, the parting line between the lips, left to right
    jaw_gap_gain: float = 1.0  # the viewer's opening (IOD) per unit of the jaw coefficient

    def offsets(self, coeffs: np.ndarray) -> np.ndarray:
        """(T, K) -> landmark offsets (T, 478, 2), px."""
        return np.einsum("tk,kpc->tpc", coeffs, self.basis)


def smoothstep(x, a, b):
    """0 below a, 1 above b, a smooth cubic between."""
    t = np.clip((x - a) / (b - a), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def build_rig(landmarks: np.ndarray) -> Rig:
    """Per-face motion basis from FaceMesh landmarks (478, >=2) in output-frame px."""
    lm = landmarks[:, :2]
    le, re = lm[EYE_OUTER[0]], lm[EYE_OUTER[1]]
    iod = float(np.linalg.norm(re - le))
    ex = (re - le) / iod
    ey = np.array([-ex[1], ex[0]])  # image "down" for an upright face
    upper_mid, lower_mid = LIP_MIDDLE
    mouth = (lm[upper_mid] + lm[lower_mid]) / 2
    rel = (lm - mouth) / iod
    u, v = rel @ ex, rel @ ey
    n = len(lm)
    basis = np.zeros((len(COEFFS), n, 2))

    # lip groups: every mesh point inside the outer lip contour, split by the parting line
    line = (lm[INNER_UPPER] + lm[INNER_LOWER]) / 2
    contour = np.concatenate([lm[OUTER_UPPER], lm[OUTER_LOWER][::-1]]).astype(np.float32)
    inside = np.array(
        [cv2.pointPolygonTest(contour, (float(x), float(y)), True) > -0.02 * iod for x, y in lm[:468]]
        + [False] * (n - 468)
    )
    below_line = lm[:, 1] > np.interp(lm[:, 0], line[:, 0], line[:, 1])
    lower = np.flatnonzero(inside & below_line)
    upper = np.flatnonzero(inside & ~below_line)
    # the inner contours touch the line when the mouth is closed: their side is known, not measured
    lower = np.setdiff1d(np.union1d(lower, INNER_LOWER + OUTER_LOWER), INNER_UPPER + OUTER_UPPER + CORNERS)
    upper = np.setdiff1d(np.union1d(upper, INNER_UPPER + OUTER_UPPER), np.union1d(CORNERS, lower))

    # jaw: lower lip and chin drop, the skin beside and below the corners less, the jaw's sides
    # less again towards the ears, the upper lip lifts slightly. Weights vary smoothly (relative to
    # the mouth's half width) so that a wide opening never folds the skin over itself.
    half = max(np.abs(u[CORNERS]).max(), 1e-3)
    hu = np.abs(u) / half
    w_jaw = smoothstep(v, -0.02, 0.14) * (1 - 0.72 * smoothstep(hu, 0.5, 2.6))
    # the lips part widest in the middle and stay joined at the corners: a U, not a V
    taper = 1 - 0.65 * np.clip(hu, 0, 1) ** 2.5
    w_jaw[lower] = taper[lower]
    w_jaw[upper] = -0.15 * taper[upper]
    w_jaw[CORNERS] = 0.35
    basis[0] = w_jaw[:, None] * ey[None, :]

    lips = np.concatenate([upper, lower, CORNERS])
    lip_w = np.zeros(n)
    lip_w[lips] = np.clip(np.abs(u[lips]) / half, 0, 1) ** 1.5
    # the cheek skin next to each corner follows it part of the way, so moving corners do not
    # stretch the photo's corner creases into lines
    corner_d = np.min(np.linalg.norm(lm[:, None, :] - lm[None, OUTER_CORNERS, :], axis=2), axis=1) / iod
    cheek = np.setdiff1d(np.arange(min(n, 468)), lips)
    lip_w[cheek] = 0.8 * np.exp(-((corner_d[cheek] / 0.16) ** 2))
    side = np.sign(u)
    # spread: corners out and slightly up; round: corners in, lips pushed apart vertically
    basis[1] = lip_w[:, None] * (side[:, None] * ex[None, :] - 0.2 * ey[None, :])
    basis[1, cheek] = lip_w[cheek, None] * side[cheek, None] * ex[None, :]
    pout = np.zeros(n)
    pout[upper] = -0.3
    pout[lower] = 0.3
    basis[2] = -lip_w[:, None] * side[:, None] * ex[None, :] + pout[:, None] * ey[None, :]
    basis[2, cheek] = -lip_w[cheek, None] * side[cheek, None] * ex[None, :]

    for up, lo in EYE_PAIRS:
        d = lm[lo] - lm[up]
        basis[3, up] = 0.92 * d
        basis[3, lo] = -0.08 * d
    # brow raise (IOD): the brows go up; gaze (IOD): the irises travel across the eyes
    basis[5, LEFT_BROW_ALL + RIGHT_BROW_ALL] = -ey * iod
    if n > max(RIGHT_IRIS):
        basis[6, LEFT_IRIS + RIGHT_IRIS] = ex * iod
        basis[7, LEFT_IRIS + RIGHT_IRIS] = ey * iod

    # close_rest: meet the lips of a photo whose mouth is open (lower lip up, upper lip down)
    gap = float(np.linalg.norm(lm[lower_mid] - lm[upper_mid]))
    # closing raises the whole jaw, not only the lip, so the chin is not stretched
    basis[4] = -0.65 * np.clip(w_jaw, 0, None)[:, None] * ey[None, :]
    # a little past meeting, so that the lips press together over the photo's teeth; each part
    # of a lip travels by the gap in front of it (the opening narrows to nothing at the corners,
    # and corners that stay put must not drag the lip's edge into a streak)
    pair_x = (lm[INNER_UPPER, 0] + lm[INNER_LOWER, 0]) / 2
    pair_gap = np.linalg.norm(lm[INNER_UPPER] - lm[INNER_LOWER], axis=1)
    o = np.argsort(pair_x)
    local = np.clip(np.interp(lm[:, 0], pair_x[o], pair_gap[o]) / max(gap, 1e-6), 0, 1)
    basis[4, upper] += 0.38 * local[upper, None] * ey
    basis[4, lower] = -0.68 * local[lower, None] * ey
    for k in (0, 1, 2):
        basis[k] *= iod
    # close_rest is in units of the photo's own gap
    basis[4] *= gap
    centre = lm[HEAD_PIVOT].mean(0)
    # the opening as a viewer measures it: the mean gap of five inner-lip pairs
    open_gap = float(np.mean([np.linalg.norm(lm[a] - lm[b]) for a, b in LIP_PAIRS]))
    # ... and how much of it a unit of jaw opens (the lower lip drops by the jaw, the upper lip
    # lifts a little): an open photo's own gap counts in the jaw's units
    jaw_gap_gain = float(np.mean([(basis[0, b] - basis[0, a]) @ ey for a, b in LIP_PAIRS])) / iod
    return Rig(
        basis=basis,
        iod=iod,
        centre=centre,
        rest_gap=gap,
        open_gap=open_gap,
        upper_lip=upper,
        lower_lip=lower,
        lip_line=line,
        jaw_gap_gain=max(jaw_gap_gain, 0.5),  # (a degenerate mesh must not make a photo's gap huge)
    )


def _gauss(x: np.ndarray, sigma_s: float, fps: int) -> np.ndarray:
    s = sigma_s * fps
    return gaussian_filter1d(x, s, mode="nearest") if s > 0.3 else x


def _fractional_shift(x: np.ndarray, frames: float) -> np.ndarray:
    """x delayed by `frames` (may be fractional, negative = earlier), edges held."""
    t = np.arange(len(x), dtype=np.float64)
    return np.interp(t - frames, t, x)


def measure_lag(mouth: np.ndarray, loud: np.ndarray, max_lag: int = MAX_LAG_FRAMES) -> float:
    """Lag (frames, sub-frame) at which mouth best matches loudness; > 0: mouth later than audio."""
    m = mouth - gaussian_filter1d(mouth, 12)
    a = loud - gaussian_filter1d(loud, 12)
    if m.std() < 1e-6 or a.std() < 1e-6 or len(m) < 2 * max_lag + 5:
        return 0.0
    lags = np.arange(-max_lag, max_lag + 1)
    n = len(m)
    corr = []
    for k in lags:  # r(k) = corr(mouth[t + k], audio[t])
        u, w = (m[k:], a[: n - k]) if k >= 0 else (m[: n + k], a[-k:])
        corr.append(np.corrcoef(u, w)[0, 1])
    r = np.nan_to_num(np.array(corr))
    i = int(np.argmax(r))
    frac = 0.0
    if 0 < i < len(r) - 1:
        den = r[i - 1] - 2 * r[i] + r[i + 1]
        frac = float(np.clip(0.5 * (r[i - 1] - r[i + 1]) / den, -0.5, 0.5)) if den != 0 else 0.0
    return float(lags[i] + frac)


def mouth_track(feat: AudioFeatures, dynamic_scale: float, smooth: bool) -> tuple[np.ndarray, ...]:
    """Openness (0..OPENING_MAX), spread (-1..1), closure of the lips per frame."""
    fps = feat.fps
    vis_open = _gauss(feat.vis_open, COARTIC_S, fps)
    spread = _gauss(feat.vis_spread, COARTIC_S * 1.5, fps)
    closure = _gauss(feat.vis_closure, CLOSURE_S, fps)
    # loudness sets how far the mouth opens (works for any language); visemes shape it
    opening = feat.loudness**0.8 * (0.4 + 0.6 * vis_open) * (1 - 0.9 * closure)
    if smooth:
        opening = _gauss(opening, SMOOTH_S, fps)
        spread = _gauss(spread, SMOOTH_S, fps)
    opening = np.clip(opening * dynamic_scale, 0, OPENING_MAX)
    spread = np.clip(spread * np.clip(feat.loudness * 2, 0, 1) * min(dynamic_scale, 1.5), -1, 1)
    return opening, spread, closure


def _soft_limit(x: np.ndarray, bound: float) -> np.ndarray:
    """Nearly linear well inside +-bound, never beyond it."""
    return bound * np.tanh(x / bound)


def noise_kernel(fps: int, time_scale_s: float) -> np.ndarray:
    """The Gaussian (odd length) that smooth_noise filters white noise with, unit L2 norm."""
    sigma = max(time_scale_s * fps / 2, 0.5)
    half = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return kernel / np.linalg.norm(kernel)


def smooth_noise(n: int, fps: int, time_scale_s: float, channels: int, rng: np.random.Generator) -> np.ndarray:
    """(n, channels) stationary smooth noise with unit standard deviation, whatever n is.

    White noise filtered by a fixed Gaussian kernel and divided by the kernel's own L2 norm (the
    exact std of the filtered process), never by the statistics of the clip: the first frames
    of a short clip are the first frames of a long one with the same seed.
    """
    kernel = noise_kernel(fps, time_scale_s)
    half = len(kernel) // 2
    white = rng.standard_normal((n + 2 * half, channels))
    return np.stack([np.convolve(white[:, c], kernel, mode="valid") for c in range(channels)], 1)


def head_motion(
    feat: AudioFeatures, rig: Rig, motion_scale: float, rng: np.random.Generator, events: list[Event]
) -> np.ndarray:
    """(T, 4) roll (rad), tx, ty (px), scale-1: seeded slow drift plus nods on loud syllables
    and accents.

    Bounded for any clip length: |roll| <= MAX_ROLL_DEG, |(tx, ty)| <= MAX_SHIFT_IOD IOD and
    |scale-1| <= MAX_SCALE, each times motion_scale.
    """
    noise = smooth_noise(len(feat.loudness), feat.fps, HEAD_NOISE_S, 3, rng)
    times = np.arange(len(feat.loudness)) / feat.fps
    nod = nod_track(feat.loudness, feat.fps) + accent_nods(times, events, feat.fps)
    return head_pose(noise, nod, rig.iod, motion_scale)


def _raise_shape(dt: np.ndarray, hold_s: float) -> np.ndarray:
    """0..1 over time since an event (s): up over BROW_RISE_S from BROW_LEAD_S before it, held,
    down over BROW_FALL_S."""
    up = smoothstep(dt, -BROW_LEAD_S, BROW_RISE_S - BROW_LEAD_S)
    end = BROW_RISE_S - BROW_LEAD_S + hold_s
    return up * (1 - smoothstep(dt, end, end + BROW_FALL_S))


def brow_track(times: np.ndarray, events: list[Event], fps: int, dynamic_scale: float) -> np.ndarray:
    """(T,) brow raise in IOD at `times` (s) for prosodic events (frames at fps): a raise on
    each accent and phrase start, as high and as long as the event is strong."""
    out = np.zeros(len(times))
    lo, hi = BROW_RAISE_IOD
    for e in events:
        height = (lo + (hi - lo) * e.strength) * (PHRASE_BROW if e.kind == "phrase" else 1.0)
        hold = BROW_HOLD_S[0] + (BROW_HOLD_S[1] - BROW_HOLD_S[0]) * e.strength
        out = np.maximum(out, height * _raise_shape(times - e.frame / fps, hold))
    raised = out * dynamic_scale
    room = BROW_RAISE_MAX_IOD - BROW_KNEE_IOD
    return np.where(raised <= BROW_KNEE_IOD, raised, BROW_KNEE_IOD + room * np.tanh((raised - BROW_KNEE_IOD) / room))


def accent_nods(times: np.ndarray, events: list[Event], fps: int) -> np.ndarray:
    """(T,) the nod on accents (nod_track's units): a dip with the brows' raise."""
    out = np.zeros(len(times))
    for e in events:
        if e.kind == "accent":
            out = np.maximum(out, ACCENT_NOD * e.strength * _raise_shape(times - e.frame / fps, BROW_HOLD_S[0]))
    return out


def gaze_path(n: int, fps: int, shut_at: list[float], events: list[Event], rng: np.random.Generator) -> np.ndarray:
    """(T, 2) gaze in IOD: the planner stepped over the clip's frames, as a live session steps it."""
    from .gaze import GazePlanner  # here: gaze.py uses this module's smoothstep

    planner = GazePlanner(rng)
    phrase_frames = {e.frame for e in events if e.kind == "phrase"}
    blink_frames = {blink_start_frame(s, fps) for s in shut_at}
    return np.array([planner.step(i / fps, i in blink_frames, i in phrase_frames) for i in range(n)]).reshape(n, 2)


def nod_track(loudness: np.ndarray, fps: int) -> np.ndarray:
    """(T,) the nod on loud syllables: loudness over 0.25 s above its 1.5 s mean."""
    return _gauss(loudness, 0.25, fps) - _gauss(loudness, 1.5, fps)


def head_pose(noise: np.ndarray, nod: np.ndarray, iod: float, motion_scale: float) -> np.ndarray:
    """Smooth noise (T, 3) with unit std and the nod (T,) -> head (T, 4), bounded as head_motion says."""
    shift = HEAD_SHIFT_IOD * np.stack([noise[:, 1], 0.6 * noise[:, 2] + 0.8 * nod], 1)
    length = np.linalg.norm(shift, axis=1, keepdims=True)
    shift *= _soft_limit(length, MAX_SHIFT_IOD) / np.maximum(length, 1e-12)
    head = np.zeros((len(noise), 4))
    head[:, 0] = np.deg2rad(_soft_limit(HEAD_ROLL_DEG * noise[:, 0], MAX_ROLL_DEG))
    head[:, 1:3] = shift * iod
    head[:, 3] = _soft_limit(HEAD_SCALE * noise[:, 2], MAX_SCALE)
    return head * motion_scale


def blinks(n: int, fps: int, rng: np.random.Generator) -> tuple[np.ndarray, list[float]]:
    """(T,) eyelid closure 0..1 at a natural, seeded rate, and the times the lids are shut; each
    blink holds fully shut for BLINK_HOLD_S, so that at least one frame shows the closed eye at
    any fps >= 20."""
    times = np.arange(n) / fps
    shut_at = list(itertools.takewhile(lambda t: t < n / fps + BLINK_CLOSE_S, blink_times(rng)))
    return blink_curve(times, shut_at), shut_at


def blink_times(rng: np.random.Generator) -> Iterator[float]:
    """The seconds at which the lids are fully shut, without end (a live session draws them as
    it runs; the same seed gives the same times as a file's)."""
    t = rng.uniform(0.8, 2.5)
    while True:
        yield t
        t += max(BLINK_MIN_S, rng.gamma(4.0, BLINK_MEAN_S / 4.0))


def blink_start_frame(shut_at: float, fps: int) -> int:
    """The frame in which a blink shut at `shut_at` (s) begins to close."""
    return int(np.floor((shut_at - BLINK_CLOSE_S) * fps))


def blink_curve(times: np.ndarray, shut_at: list[float]) -> np.ndarray:
    """Eyelid closure 0..1 at `times` (s) for blinks fully shut at `shut_at` (s)."""
    out = np.zeros(len(times))
    for t in shut_at:
        close = np.clip((times - (t - BLINK_CLOSE_S)) / BLINK_CLOSE_S, 0, 1)
        opening = np.clip(1 - (times - t - BLINK_HOLD_S) / BLINK_OPEN_S, 0, 1)
        out = np.maximum(out, np.where(times < t, close, opening) * (times > t - BLINK_CLOSE_S))
    return out


def mouth_coefficients(opening: np.ndarray, spread: np.ndarray, rig: Rig) -> np.ndarray:
    """Openness (T,) and spread (T,) (mouth_track's, closures applied) -> coefficients (T, K) in
    COEFFS order for this face, the blink column left at 0 (files and live sessions share it)."""
    coeffs = np.zeros((len(opening), len(COEFFS)))
    gap = opening * JAW_GAIN  # the inner-lip gap wanted, IOD
    photo_open = rig.open_gap / rig.iod
    if photo_open > OPEN_PHOTO_IOD:
        photo_gap = photo_open / rig.jaw_gap_gain  # in the jaw's units
        # an open-mouthed photo: its own opening counts towards the gap. Smaller gaps close
        # the lips part of the way (all of it at rest and on P/B/M), larger ones drop the jaw
        coeffs[:, 4] = np.clip(1 - gap / photo_gap, 0, 1)
        gap = np.clip(gap - photo_gap, 0, None)
    coeffs[:, 0] = gap
    coeffs[:, 1] = np.clip(spread, 0, None) * SPREAD_GAIN
    coeffs[:, 2] = np.clip(-spread, 0, None) * SPREAD_GAIN
    return coeffs


def smooth_head(head: np.ndarray, fps: int) -> np.ndarray:
    """smooth_motion's 80 ms Gaussian over the head pose (T, 4)."""
    return gaussian_filter1d(head, HEAD_SMOOTH_S * fps, axis=0, mode="nearest")


def seeded_streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """The head's, the blinks' and the gaze's generators: independent streams, so that the head's
    noise does not shift with the number of blinks drawn (the first two are those of a seed
    before the gaze had one: SeedSequence's children do not depend on how many are spawned)."""
    rng_head, rng_blink, rng_gaze = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    return rng_head, rng_blink, rng_gaze


def predict_motion(
    feat: AudioFeatures,
    rig: Rig,
    *,
    dynamic_scale: float,
    motion_scale: float,
    smooth: bool,
    align: bool,
    seed: int,
    gaze: bool = True,
) -> Motion:
    """Audio features + face rig -> Motion for len(feat.loudness) frames (deterministic per seed);
    gaze=False keeps the irises where the photo has them."""
    from .prosody import detect  # here: the render helpers import this module without the audio stack

    rng_head, rng_blink, rng_gaze = seeded_streams(seed)
    n, fps = len(feat.loudness), feat.fps
    events = detect(feat.loudness, feat.pitch, fps)
    opening, spread, closure = mouth_track(feat, dynamic_scale, smooth)
    lag = measure_lag(opening, feat.loudness) if align else 0.0
    if align and lag != 0.0:
        opening = np.clip(_fractional_shift(opening, -lag), 0, None)
        spread = _fractional_shift(spread, -lag)
    # P/B/M: the lips meet, whatever smoothing and alignment did around them (phone timings
    # are the audio's own, so the closure is applied last)
    opening = opening * (1 - np.clip(np.maximum(closure, feat.vis_closure), 0, 1))
    coeffs = mouth_coefficients(opening, spread, rig)
    coeffs[:, 3], shut_at = blinks(n, fps, rng_blink)
    coeffs[:, 5] = brow_track(np.arange(n) / fps, events, fps, dynamic_scale)
    if gaze:
        coeffs[:, 6:8] = gaze_path(n, fps, shut_at, events, rng_gaze)
    head = head_motion(feat, rig, motion_scale, rng_head, events)
    if smooth:
        head = smooth_head(head, feat.fps)
    return Motion(coeffs=coeffs, head=head, lipsync_offset_ms=round(lag * 1000 / feat.fps, 1))
