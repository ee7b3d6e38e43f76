"""An expression for the whole clip: the portrait warped once, before it speaks.

`expression` (smile, serious; neutral keeps the photo's own) moves the face's landmarks by a
per-face pattern (in the face's own axes, in inter-ocular distances, IOD), and a thin-plate
spline through them, pinned still outside the face, carries the photo's pixels along. The warp
decoder is then built on the posed portrait as on any photo: the mouth still closes on P/B/M and
opens for speech, the lids blink and the brows rise, from the posed face. Done once per request
on the sampling source, so it costs nothing per frame.

Smile (Duchenne): the lip corners rise and widen, the cheeks lift, the lower lids rise a little
(the eyes narrow). Serious: the brows lower and draw in a little, the corners relax down. On a
face with glasses the brows and cheeks stay (the frames rest on them and would bend).
"""

from __future__ import annotations

import cv2
import numpy as np

from ...geometry import Framing, resample
from ...landmarks import (
    CORNERS,
    EYE_OUTER,
    FACE_OVAL_IDX,
    INNER_LOWER,
    INNER_UPPER,
    LEFT_BROW_ALL,
    LEFT_EYE_LOWER,
    LIP_MIDDLE,
    N_MESH,
    OUTER_CORNERS,
    OUTER_LOWER,
    OUTER_UPPER,
    RIGHT_BROW_ALL,
    RIGHT_EYE_LOWER,
)
from .decoder import tps_fields
from .eyes import wears_glasses

SMILE_CORNER_UP_IOD = 0.06  # the lip corners rise this much at expression_scale 1 ...
SMILE_CORNER_OUT_IOD = 0.03  # ... and move out this much
SMILE_CHEEK_UP_IOD = 0.03  # the cheeks below the eyes lift this much
SMILE_LID_UP = 0.2  # the lower lids rise by this share of the eye's opening
SERIOUS_BROW_DOWN_IOD = 0.018  # the brows lower this much ...
SERIOUS_BROW_IN_IOD = 0.01  # ... their inner ends draw in this much
SERIOUS_CORNER_DOWN_IOD = 0.015  # the lip corners relax down ...
SERIOUS_CORNER_IN_IOD = 0.008  # ... and in
STILL_RINGS_IOD = (0.35, 0.7)  # the warp is pinned to nothing this far outside the face oval


def _axes(lm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The face's right and down unit vectors and its inter-ocular distance."""
    le, re = lm[EYE_OUTER[0]], lm[EYE_OUTER[1]]
    iod = float(np.linalg.norm(re - le))
    ex = (re - le) / max(iod, 1e-6)
    return ex, np.array([-ex[1], ex[0]]), iod


def expression_offsets(landmarks: np.ndarray, expression: str, scale: float, glasses: bool = False) -> np.ndarray:
    """Landmark offsets (N, 2) px that pose the face (N >= 468 landmarks, px); with `glasses`
    the brows and cheeks keep still."""
    lm = landmarks[:, :2].astype(np.float64)
    off = np.zeros_like(lm)
    if expression == "neutral" or scale <= 0:
        return off
    ex, ey, iod = _axes(lm)
    mouth = (lm[LIP_MIDDLE[0]] + lm[LIP_MIDDLE[1]]) / 2
    rel = (lm - mouth) / iod
    u = rel @ ex  # across the face, from the mouth's middle
    half = max(float(np.abs(u[CORNERS]).max()), 1e-3)
    side = np.sign(u)
    lips = np.unique(INNER_UPPER + INNER_LOWER + OUTER_UPPER + OUTER_LOWER)
    # lips: each point moves as far as its share of the way to the corner (the middle stays)
    share = np.zeros(len(lm))
    share[lips] = np.clip(np.abs(u[lips]) / half, 0, 1) ** 2
    # skin near the corners follows them part of the way, less with distance
    corner_d = np.min(np.linalg.norm(lm[:, None, :] - lm[None, OUTER_CORNERS, :], axis=2), axis=1) / iod
    skin = np.setdiff1d(np.arange(min(len(lm), N_MESH)), lips)
    share[skin] = 0.8 * np.exp(-((corner_d[skin] / 0.18) ** 2))
    if expression == "smile":
        off += share[:, None] * (side[:, None] * SMILE_CORNER_OUT_IOD * ex - SMILE_CORNER_UP_IOD * ey) * iod
        # cheeks: the skin between the mouth's corners and the eyes lifts, most under the eyes
        eye_y = (lm[EYE_OUTER[0]] @ ey + lm[EYE_OUTER[1]] @ ey) / 2
        depth = (lm @ ey - eye_y) / iod  # below the eyes, in IOD
        cheek = np.exp(-(((depth - 0.35) / 0.25) ** 2)) * np.clip((np.abs(u) - 0.15) / 0.15, 0, 1)
        cheek[lips] = 0.0
        cheek[N_MESH:] = 0.0
        if glasses:
            cheek[:] = 0.0
        off -= (SMILE_CHEEK_UP_IOD * iod * cheek)[:, None] * ey
        # lower lids rise: the eyes narrow a little (the corners stay)
        for lower, upper_mid in ((LEFT_EYE_LOWER, 159), (RIGHT_EYE_LOWER, 386)):
            inner = lower[1:-1]
            opening = float(np.max(lm[inner] @ ey) - lm[upper_mid] @ ey)
            off[inner] -= SMILE_LID_UP * max(opening, 0.0) * ey
    elif expression == "serious":
        off += share[:, None] * (-side[:, None] * SERIOUS_CORNER_IN_IOD * ex + SERIOUS_CORNER_DOWN_IOD * ey) * iod
        for brow in () if glasses else (LEFT_BROW_ALL, RIGHT_BROW_ALL):
            pts = lm[brow] @ ex
            centre = float((lm[EYE_OUTER[0]] @ ex + lm[EYE_OUTER[1]] @ ex) / 2)
            inward = np.sign(centre - pts)
            nearness = 1 - np.clip(np.abs(pts - centre) / (0.6 * iod), 0, 1)  # inner ends most
            draw_in = (SERIOUS_BROW_IN_IOD * iod * nearness * inward)[:, None] * ex
            off[brow] += SERIOUS_BROW_DOWN_IOD * iod * ey + draw_in
    return off * scale


def pose_framing(framing: Framing, expression: str, scale: float) -> Framing:
    """The framing with its face posed (its sampling source warped, its landmarks moved);
    the framing itself for neutral or scale 0."""
    lm = framing.landmarks
    if expression == "neutral" or scale <= 0:
        return framing
    _, _, iod = _axes(lm[:, :2])
    off = expression_offsets(lm, expression, scale, wears_glasses(framing.frame, lm, iod))
    if not np.any(off):
        return framing
    h, w = framing.frame.shape[:2]
    oval = lm[FACE_OVAL_IDX, :2]
    centre = oval.mean(0)
    radial = (oval - centre) / (np.linalg.norm(oval - centre, axis=1, keepdims=True) + 1e-6)
    rings = np.concatenate([oval + r * iod * radial for r in STILL_RINGS_IOD])
    # a backward map: the spline passes through the posed points and gives where each came from
    moved = lm[:N_MESH, :2] + off[:N_MESH]
    points = np.concatenate([moved, rings])
    values = np.concatenate([-off[:N_MESH], np.zeros((len(rings), 2))])
    x0, y0 = np.maximum(np.floor(rings.min(0)).astype(int), 0)
    x1, y1 = np.minimum(np.ceil(rings.max(0)).astype(int) + 1, [w, h])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return framing
    box = (int(x0), int(y0), int(x1), int(y1))
    (field,) = tps_fields(points, [(np.arange(len(points)), values)], box)
    # pinned outside the face: beyond the outer ring the field is exactly zero
    ring_mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(ring_mask, [np.round(rings[len(oval) :]).astype(np.int32)], (1,))
    fade = cv2.GaussianBlur(ring_mask.astype(np.float32), (0, 0), 0.1 * iod)[y0:y1, x0:x1]
    field = field * fade
    posed = lm.copy()
    posed[:, :2] = lm[:, :2] + off
    return resample(framing, field, box, posed)
