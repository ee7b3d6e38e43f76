"""Lip sync of finished frames: how far the mouth lags the audio, measured on the video itself.

For a decoder that makes the frames from the audio (`sonic`), `align_mouth` measures the mouth
opening of every generated frame with the face analysis (inner-lip gap over the inter-ocular
distance), finds the lag that best matches it to the audio's loudness (motion.measure_lag:
+-4 frames, sub-frame), and the writer moves the audio track by that lag.
"""

from __future__ import annotations

import numpy as np

from .audio_features import frame_loudness, normalise_loudness
from .errors import NoFaceDetected
from .landmarks import EYE_OUTER, LIP_PAIRS
from .motion import MAX_LAG_FRAMES, measure_lag

MIN_FACE_SHARE = 0.8  # below this share of frames with a face, nothing is measured


def mouth_opening(faces, rgb: np.ndarray) -> float:
    """Inner-lip gap / inter-ocular distance of the largest face; NaN without a face."""
    try:
        lm = faces.analyze(rgb).landmarks
    except NoFaceDetected:
        return float("nan")
    iod = np.linalg.norm(lm[EYE_OUTER[0], :2] - lm[EYE_OUTER[1], :2])
    gap = np.mean([np.linalg.norm(lm[a, :2] - lm[b, :2]) for a, b in LIP_PAIRS])
    return float(gap / max(iod, 1e-6))


def mouth_lag(opening: list[float] | np.ndarray, wav: np.ndarray, fps: int) -> float | None:
    """Frames the mouth is later than the audio (< 0: earlier); None when too few frames show a
    face or the clip is too short to measure."""
    m = np.asarray(opening, np.float64)
    ok = np.isfinite(m)
    if len(m) < 2 * MAX_LAG_FRAMES + 5 or ok.mean() < MIN_FACE_SHARE:
        return None
    t = np.arange(len(m))
    m = np.interp(t, t[ok], m[ok])
    loud = normalise_loudness(frame_loudness(wav, len(m), fps))
    return measure_lag(m, loud)
