"""Blinks: the upper eyelid slides down over the eye and back up.

A blink is not a squash of the eye. The skin between the upper lid and a line above it (the lid's
fold) is stretched down, so the lash line travels with the lid margin, and the eye below the
moving margin is covered rather than compressed: the iris disappears behind the lid while the
eye's corners and outline stay where they are. Expressed as a backward map of source positions
(what each output pixel shows), evaluated only inside each eye's box.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...landmarks import LEFT_EYE_LOWER, LEFT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_EYE_UPPER

FOLD_IOD = 0.05  # skin above the lid margin that unfolds in a blink, beyond the eye's own height
MEET = 1.0  # at full closure the upper margin reaches the lower one
LASH_IOD = (0.008, 0.05)  # the lash line above the margin (measured per eye within these
# bounds) travels down with it, unstretched
EDGE_PX = 0.6  # the occluding lid margin is anti-aliased over this many px


@dataclass(frozen=True)
class Eye:
    """One eye in frame px: lid margins sampled at every column of its box."""

    x0: int
    x1: int
    y0: int
    y1: int
    upper: np.ndarray  # (x1 - x0,) y of the upper lid margin per column (nan outside the corners)
    lower: np.ndarray  # (x1 - x0,) y of the lower lid margin
    lash: float  # px, thickness of the dark lash line above the upper margin


def _curve(pts: np.ndarray, xs: np.ndarray) -> np.ndarray:
    order = np.argsort(pts[:, 0])
    p = pts[order]
    y = np.interp(xs, p[:, 0], p[:, 1])
    return np.where((xs >= p[0, 0]) & (xs <= p[-1, 0]), y, np.nan)


def lash_thickness(gray: np.ndarray, upper: np.ndarray, x0: int, iod: float) -> float:
    """Thickness (px) of the dark band (lashes, lid shadow) right above the upper lid margin,
    measured on the central columns of the eye: from the darkest row near the margin up to where
    the brightness is most of the way back to the skin above."""
    lo_px, hi_px = LASH_IOD[0] * iod, LASH_IOD[1] * iod
    cols = np.flatnonzero(np.isfinite(upper))
    if len(cols) < 3:
        return lo_px
    cols = cols[len(cols) // 5 : len(cols) - len(cols) // 5 or None]
    found = []
    for c in cols:
        x = x0 + c
        ys = np.arange(int(upper[c] - 2.2 * hi_px), int(upper[c] + 2))
        if ys[0] < 0 or ys[-1] >= gray.shape[0] or x >= gray.shape[1]:
            continue
        prof = gray[ys, x].astype(np.float64)
        skin = np.median(prof[: max(2, len(prof) // 4)])
        near = ys >= upper[c] - hi_px
        i_dark = np.flatnonzero(near)[np.argmin(prof[near])]
        dark = prof[i_dark]
        if skin - dark < 12:  # no visible lash line in this column
            continue
        i = i_dark
        while i > 0 and prof[i] < dark + 0.6 * (skin - dark):
            i -= 1
        found.append(upper[c] - ys[i])
    return float(np.clip(np.median(found), lo_px, hi_px)) if found else lo_px


def build_eyes(frame: np.ndarray, lm: np.ndarray, iod: float) -> list[Eye]:
    """Both eyes of a frame (H, W, 3) and its landmarks (478, >=2) px; boxes clipped to the frame."""
    h, w = frame.shape[:2]
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    eyes = []
    for up_idx, lo_idx in ((LEFT_EYE_UPPER, LEFT_EYE_LOWER), (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER)):
        up, lo = lm[up_idx, :2], lm[lo_idx, :2]
        pts = np.concatenate([up, lo])
        opening = float(np.max(lo[:, 1]) - np.min(up[:, 1]))
        x0 = int(max(0, np.floor(pts[:, 0].min()) - 2))
        x1 = int(min(w, np.ceil(pts[:, 0].max()) + 3))
        y0 = int(max(0, np.floor(up[:, 1].min() - FOLD_IOD * iod - 0.3 * opening) - 2))
        y1 = int(min(h, np.ceil(lo[:, 1].max()) + 3))
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        xs = np.arange(x0, x1, dtype=np.float64)
        upper = _curve(up, xs)
        lash = lash_thickness(gray, upper, x0, iod)
        y0 = int(max(0, min(y0, np.floor(up[:, 1].min() - lash - FOLD_IOD * iod - 0.3 * opening) - 2)))
        eyes.append(Eye(x0, x1, y0, y1, upper, _curve(lo, xs), lash))
    return eyes


def lid_map(eye: Eye, qx: np.ndarray, qy: np.ndarray, closure: float, iod: float) -> np.ndarray:
    """Source y for points (qx, qy) in eye-box px (unmoved face) at lid closure 0..1.

    Piecewise linear and continuous along each column: the fold skin above the lashes is stretched
    down, the lash line moves down unstretched to the new margin, a thin edge band
    [margin, margin + EDGE_PX] sweeps over the covered strip of eye; below it nothing moves.
    """
    if closure <= 1e-3:
        return qy
    col = np.clip(np.round(qx).astype(int) - eye.x0, 0, eye.x1 - eye.x0 - 1)
    up, lo = eye.upper[col], eye.lower[col]
    valid = np.isfinite(up) & np.isfinite(lo)
    up = np.where(valid, up, 0.0)
    lo = np.where(valid, lo, 0.0)
    height = np.clip(lo - up, 0, None)
    lash = eye.lash
    top = up - lash - FOLD_IOD * iod - 0.3 * height
    margin = up + min(closure, 1.0) * MEET * height  # where the lid's edge is now
    edge_end = margin + EDGE_PX
    # fold skin [top, up - lash] stretches over [top, margin - lash]; the lash line rides along
    skin = top + (qy - top) * (up - lash - top) / np.maximum(margin - lash - top, 1e-6)
    lashes = qy - (margin - up)
    swept = up + (qy - margin) * (edge_end - up) / EDGE_PX
    out = np.where(qy <= margin - lash, skin, np.where(qy <= margin, lashes, np.where(qy <= edge_end, swept, qy)))
    out = np.where(qy < top, qy, out)
    return np.where(valid & (height > 0.5), out, qy)
