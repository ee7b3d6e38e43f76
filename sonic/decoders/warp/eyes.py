"""The upper face: blinks, gaze and brow raises, each a backward map of source positions (what
each output pixel shows) evaluated only inside its own small box.

Blinks: the upper eyelid slides down over the eye and back up. A blink is not a squash of the
eye. The skin between the upper lid and a line above it (the lid's fold) is stretched down, so
the lash line travels with the lid margin, and the eye below the moving margin is covered rather
than compressed: the iris disappears behind the lid while the eye's corners and outline stay
where they are.

Gaze: inside the eye's opening the iris slides sideways (and a little up or down); the white
between the iris and each corner stretches or narrows, the corners and the lids stay, and every
source position stays inside the opening, so no iris is drawn outside the eye and no lid inside.

Brows: each brow and the skin above it lift together, fading to nothing at the lid margin below
and over the forehead above, and beyond the brow's ends. Where hair (a fringe, a hairline) comes
closer than that, the raise fades out below it: the hair stays where it is; where the skin left
below the hair is too short for the raise, the brow slides up over it as over a fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import cv2
import numpy as np
from scipy.ndimage import median_filter

from ...landmarks import (
    FACE_OVAL_IDX,
    LEFT_BROW,
    LEFT_BROW_ALL,
    LEFT_EYE_LOWER,
    LEFT_EYE_UPPER,
    LEFT_IRIS,
    RIGHT_BROW,
    RIGHT_BROW_ALL,
    RIGHT_EYE_LOWER,
    RIGHT_EYE_UPPER,
    RIGHT_IRIS,
)

FOLD_IOD = 0.05  # skin above the lid margin that unfolds in a blink, beyond the eye's own height
MEET = 1.0  # at full closure the upper margin reaches the lower one
LASH_IOD = (0.008, 0.05)  # the lash line above the margin (measured per eye within these
# bounds) travels down with it, unstretched
EDGE_PX = 0.6  # the occluding lid margin is anti-aliased over this many px
BROW_ABOVE_IOD = 0.3  # the skin this far above a brow still moves with it, less and less
BROW_SIDE_IOD = 0.1  # ... and this far beyond the brow's ends
BROW_MIN_ABOVE_IOD = 0.06  # ... but over at least this much (a fringe on the brows: a short fade)
REACH_EVEN_IOD = 0.1  # how far up the raise reaches is made even over columns this wide
HAIR_DISTANCE = 16.0  # Lab distance from the cheeks' skin at which the forehead turns to hair
CORNER_STILL = 0.7  # the white moves with the iris over this share of the way to each corner
RIM_DARK, RIM_MIN_STEP = 0.45, 40.0  # a glasses frame: this share, and this many grey levels, darker than the skin
RIM_SHARE = 0.3  # ... found in at least this share of an eye's columns
# the fold's top moves this share of the way down to the frame: the rest of the way is the frame's
# soft lower edge, stretched as a crease's shadow over the lid (the whole way, the fold was so
# short that FaceMesh read the closed eye 8 % narrower, against 6-7 % before and 4-6 % now)
RIM_KEPT = 0.75
GLASSES_BRIDGE = 0.7  # vertical edges between the eyes this strong (relative to the face's mean): glasses


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
    iris: tuple[float, float, float] | None  # centre x, y and radius (px) of the iris, if the mesh has it
    # (x1 - x0,) y of the first row under a glasses frame that crosses the lid's fold (nan where
    # none does): a blink stretches the fold from there down, and the frame stays where it is
    rim: np.ndarray | None = None

    @cached_property
    def corners(self) -> tuple[float, float] | None:
        """(left, right) frame x of the opening's corners, None for an opening under 3 columns
        wide. Read by the gaze on every frame: found once."""
        ends = np.flatnonzero(np.isfinite(self.upper) & np.isfinite(self.lower))
        if len(ends) < 3:
            return None
        return float(self.x0 + ends[0]), float(self.x0 + ends[-1])


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


def rim_above(gray: np.ndarray, upper: np.ndarray, lash: float, x0: int, reach: np.ndarray) -> np.ndarray | None:
    """Where a glasses frame crosses the skin a blink stretches down (the fold, `reach` px above
    the lash line): per column, the first row under the frame, found going up from the lashes
    as the first pixel much darker than the skin below it; None where too few columns have one
    (a frame above the fold: nothing to keep). Without it the frame's lower edge was stretched
    down with the lid in a blink, a thick dark band over the eye."""
    rows = np.full(len(upper), np.nan)
    for c in np.flatnonzero(np.isfinite(upper)):
        x = x0 + c
        bottom = int(np.floor(upper[c] - lash))
        top = int(np.floor(upper[c] - lash - reach[c])) - 1
        if top < 0 or bottom <= top or bottom >= gray.shape[0] or x >= gray.shape[1]:
            continue
        skin = 0.0
        for y in range(bottom, top - 1, -1):  # up from the lashes
            v = float(gray[y, x])
            if skin - v > RIM_DARK * skin and skin - v > RIM_MIN_STEP:
                rows[c] = min(y + 1.0, bottom - 1.0)  # the row under it (above the lashes)
                break
            skin = max(skin, v)
    found = np.flatnonzero(np.isfinite(rows))
    if len(found) == 0 or len(found) < RIM_SHARE * np.isfinite(upper).sum():
        return None
    # even across the columns (one stray hair or glint must not make a jagged fold): the found
    # rows' running median, and the columns between found ones interpolated
    filled = np.interp(np.arange(len(rows)), found, rows[found])
    smooth = median_filter(filled, size=5, mode="nearest")
    return np.where(np.isfinite(upper), smooth, np.nan)


def fold_height(height, iod: float):
    """How far above the lash line the skin a blink stretches down reaches, for an eye opening
    `height` px high (a number, or one per column)."""
    return FOLD_IOD * iod + 0.3 * height


def build_eyes(frame: np.ndarray, lm: np.ndarray, iod: float, glasses: bool) -> list[Eye]:
    """Both eyes of a frame (H, W, 3) and its landmarks (478, >=2) px; boxes clipped to the frame.
    On a face with `glasses` (wears_glasses) a blink's fold stops at the frame."""
    h, w = frame.shape[:2]
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    eyes = []
    for up_idx, lo_idx, iris_idx in (
        (LEFT_EYE_UPPER, LEFT_EYE_LOWER, LEFT_IRIS),
        (RIGHT_EYE_UPPER, RIGHT_EYE_LOWER, RIGHT_IRIS),
    ):
        up, lo = lm[up_idx, :2], lm[lo_idx, :2]
        pts = np.concatenate([up, lo])
        opening = float(np.max(lo[:, 1]) - np.min(up[:, 1]))
        x0 = int(max(0, np.floor(pts[:, 0].min()) - 2))
        x1 = int(min(w, np.ceil(pts[:, 0].max()) + 3))
        y0 = int(max(0, np.floor(up[:, 1].min() - fold_height(opening, iod)) - 2))
        y1 = int(min(h, np.ceil(lo[:, 1].max()) + 3))
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        xs = np.arange(x0, x1, dtype=np.float64)
        upper = _curve(up, xs)
        lash = lash_thickness(gray, upper, x0, iod)
        y0 = int(max(0, min(y0, np.floor(up[:, 1].min() - lash - fold_height(opening, iod)) - 2)))
        iris = None
        if len(lm) > max(iris_idx):
            ring = lm[iris_idx, :2]
            iris = (float(ring[0, 0]), float(ring[0, 1]), float(np.linalg.norm(ring[1:] - ring[0], axis=1).mean()))
        lower = _curve(lo, xs)
        rim = None
        if glasses:
            reach = fold_height(np.clip(lower - upper, 0, None), iod)
            rim = rim_above(gray, upper, lash, x0, np.nan_to_num(reach))
        eyes.append(Eye(x0, x1, y0, y1, upper, lower, lash, iris, rim))
    return eyes


def lid_map(eye: Eye, qx: np.ndarray, qy: np.ndarray, closure: float, iod: float) -> np.ndarray:
    """Source y for points (qx, qy) in eye-box px (unmoved face) at lid closure 0..1.

    Piecewise linear and continuous along each column: the fold skin above the lashes is stretched
    down, the lash line moves down unstretched to the new margin, a thin edge band
    [margin, margin + EDGE_PX] sweeps over the covered strip of eye; below it nothing moves.
    """
    if closure <= 1e-3:
        return qy
    col = _column(eye, qx)
    up, lo = eye.upper[col], eye.lower[col]
    valid = np.isfinite(up) & np.isfinite(lo)
    up = np.where(valid, up, 0.0)
    lo = np.where(valid, lo, 0.0)
    height = np.clip(lo - up, 0, None)
    lash = eye.lash
    top = up - lash - fold_height(height, iod)
    if eye.rim is not None:  # the fold ends at a glasses frame's soft lower edge: the frame stays
        top = np.fmax(top, top + RIM_KEPT * (eye.rim[col] - top))
    margin = up + min(closure, 1.0) * MEET * height  # where the lid's edge is now
    edge_end = margin + EDGE_PX
    # fold skin [top, up - lash] stretches over [top, margin - lash]; the lash line rides along
    skin = top + (qy - top) * (up - lash - top) / np.maximum(margin - lash - top, 1e-6)
    lashes = qy - (margin - up)
    swept = up + (qy - margin) * (edge_end - up) / EDGE_PX
    out = np.where(qy <= margin - lash, skin, np.where(qy <= margin, lashes, np.where(qy <= edge_end, swept, qy)))
    out = np.where(qy < top, qy, out)
    return np.where(valid & (height > 0.5), out, qy)


def gaze_map(eye: Eye, px: np.ndarray, py: np.ndarray, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Source positions for eye-box points (px, py) (frame px, after the lids' map) with the iris
    moved by `shift` (dx, dy px). Inside the opening the iris and the white around it move as
    one, the white narrowing or widening towards each corner; sources are kept inside the
    opening; outside it nothing moves."""
    dx, dy = shift
    corners = eye.corners
    if eye.iris is None or corners is None or (abs(dx) < 1e-3 and abs(dy) < 1e-3):
        return px, py
    cx, _, radius = eye.iris
    left, right = corners
    sx, sy = px.astype(np.float32), py.astype(np.float32)
    # only the points inside the opening move (a margin is nan beyond the corners, and a
    # comparison with nan is false): most of the eye's box is lid and fold, so the arithmetic
    # runs on those points alone
    col = _column(eye, sx)
    at = np.flatnonzero((sy > eye.upper[col]) & (sy < eye.lower[col]))
    if len(at) == 0:
        return sx, sy
    x, y = sx.ravel()[at], sy.ravel()[at]
    # 1 over the iris, falling to 0 short of each corner (a corner that moved would read as a
    # deformed eye, and a landmark detector places the corner from the white beside it)
    per_px = np.where(
        x < cx,
        np.float32(1 / max(CORNER_STILL * (cx - radius - left), 1.0)),
        np.float32(1 / max(CORNER_STILL * (right - cx - radius), 1.0)),
    )
    weight = np.clip(1 - (np.abs(x - cx) - radius) * per_px, 0, 1)
    mx, my = x - dx * weight, y - dy * weight
    # the source stays inside the opening, in the column it comes from; where that column has
    # no opening (beyond a corner), the point does not move
    scol = _column(eye, mx)
    s_up, s_lo = eye.upper[scol], eye.lower[scol]
    ok = ~np.isnan(s_up + s_lo)
    np.put(sy, at, np.where(ok, np.clip(my, s_up + 0.5, np.maximum(s_lo - 0.5, s_up + 0.5)), my))
    np.put(sx, at, np.where(ok, mx, x))
    return sx, sy


def _column(box: Eye | Brow, x: np.ndarray) -> np.ndarray:
    """The eye's or brow's box column nearest to each frame x (clamped to the box)."""
    return np.clip(np.rint(x).astype(np.int32) - box.x0, 0, box.x1 - box.x0 - 1)


@dataclass(frozen=True)
class Brow:
    """One brow in frame px: its middle line and half thickness at every column of its box, how
    much of the raise each column takes, and how far below the brow the raise reaches."""

    x0: int
    x1: int
    y0: int
    y1: int
    middle: np.ndarray  # (x1 - x0,) y of the brow's middle line (extended flat beyond its ends)
    half: float  # px, half the brow's thickness (the part that moves fully)
    share: np.ndarray  # (x1 - x0,) 0..1: the raise's share at each column (fades beyond the ends)
    below: np.ndarray  # (x1 - x0,) px below the middle line where the raise has faded to nothing
    above: np.ndarray  # (x1 - x0,) px above the brow's top where it has faded to nothing

    @cached_property
    def per_px_below(self) -> np.ndarray:
        """(x1 - x0,) float32: how much of the raise fades with each px below the brow."""
        return (1 / np.maximum(self.below - self.half, 1.0)).astype(np.float32)

    @cached_property
    def per_px_above(self) -> np.ndarray:
        """(x1 - x0,) float32: ... and with each px above it."""
        return (1 / self.above).astype(np.float32)


def wears_glasses(frame: np.ndarray, lm: np.ndarray, iod: float) -> bool:
    """Whether a frame's face wears glasses: the bridge of a pair of glasses between the eyes makes
    strong horizontal edges where a nose bridge is smooth skin (measured: 1.0 of the face's mean
    edge strength with glasses, 0.4-0.5 without)."""
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY).astype(np.float32)
    edges = np.abs(cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3))
    face = np.zeros(gray.shape, np.uint8)
    cv2.fillPoly(face, [np.round(lm[FACE_OVAL_IDX, :2]).astype(np.int32)], (1,))
    cx, cy = (lm[133, :2] + lm[362, :2]) / 2  # between the inner eye corners
    x0, x1 = int(max(0, cx - 0.06 * iod)), int(cx + 0.06 * iod) + 1
    y0, y1 = int(max(0, cy - 0.1 * iod)), int(cy + 0.1 * iod) + 1
    bridge = edges[y0:y1, x0:x1]
    if bridge.size == 0 or not face.any():
        return False
    return float(bridge.mean()) > GLASSES_BRIDGE * float(edges[face > 0].mean())


def build_brows(frame: np.ndarray, lm: np.ndarray, eyes: list[Eye], iod: float, glasses: bool) -> list[Brow]:
    """Both brows of a frame (H, W, 3) from its landmarks (478, >=2) px; the raise fades out
    above each eye's lash line (the lid's fold stretches, the lashes stay). A face with `glasses`
    has none: the frames would bend with the skin behind them, and they often hide the brows."""
    h, w = frame.shape[:2]
    brows: list[Brow] = []
    if glasses:
        return brows
    lab = cv2.cvtColor(frame, cv2.COLOR_RGB2LAB).astype(np.float32)
    skin = _skin_colour(lab, lm, iod)
    for contour, upper in ((LEFT_BROW_ALL, LEFT_BROW), (RIGHT_BROW_ALL, RIGHT_BROW)):
        pts = lm[contour, :2]
        top, bottom = lm[upper, :2], lm[[i for i in contour if i not in upper], :2]
        half = float(np.clip(np.median(_thickness(top, bottom)) / 2, 0.01 * iod, 0.06 * iod))
        side, above = BROW_SIDE_IOD * iod, BROW_ABOVE_IOD * iod
        x0 = int(max(0, np.floor(pts[:, 0].min() - side)))
        x1 = int(min(w, np.ceil(pts[:, 0].max() + side) + 1))
        if x1 - x0 < 3:
            continue
        xs = np.arange(x0, x1, dtype=np.float64)
        mid = (top + bottom) / 2
        order = np.argsort(mid[:, 0])
        middle = np.interp(xs, mid[order, 0], mid[order, 1])
        lo_x, hi_x = pts[:, 0].min(), pts[:, 0].max()
        beyond = np.maximum(lo_x - xs, xs - hi_x)
        share = 1 - np.clip(beyond / side, 0, 1) ** 2 * (3 - 2 * np.clip(beyond / side, 0, 1))
        # below the brow the raise reaches down to the lash line of the eye under it (or, beside
        # the eye, as far as the eye's fold would be)
        below = np.full(len(xs), 0.12 * iod)
        for eye in eyes:
            cols = np.arange(eye.x0, eye.x1)
            inside = (cols >= x0) & (cols < x1) & np.isfinite(eye.upper)
            at = cols[inside] - x0
            below[at] = np.maximum(eye.upper[cols[inside] - eye.x0] - eye.lash - middle[at], half + 1.0)
        reach = _even(_below_hair(lab, skin, xs.astype(int), middle - half, above), REACH_EVEN_IOD * iod)
        # above the raise's reach every point shows itself (the profile is 0 there, and no
        # point from below lands above it): the box ends where the reach does
        y0 = int(max(0, np.floor(middle.min() - half - above)))
        y1 = int(min(h, np.ceil((middle + below).max()) + 1))
        if y1 - y0 < 3:
            continue
        brows.append(Brow(x0, x1, y0, y1, middle, half, share, below, np.maximum(reach, BROW_MIN_ABOVE_IOD * iod)))
    return brows


def _skin_colour(lab: np.ndarray, lm: np.ndarray, iod: float) -> np.ndarray:
    """The median Lab colour of the upper cheeks (below the eyes: never hair)."""
    r = max(1, int(0.05 * iod))
    patches = []
    for i in (117, 346):
        x, y = np.round(lm[i, :2]).astype(int)
        patch = lab[max(0, y - r) : y + r + 1, max(0, x - r) : x + r + 1].reshape(-1, 3)
        if len(patch):
            patches.append(patch)
    return np.median(np.concatenate(patches), axis=0) if patches else lab.reshape(-1, 3).mean(0)


def _below_hair(lab: np.ndarray, skin: np.ndarray, cols: np.ndarray, tops: np.ndarray, above: float) -> np.ndarray:
    """Per column, the px from the brow's top up to the first hair (three rows in a row unlike
    the skin), at most `above`: how far up the raise may reach."""
    h, w = lab.shape[:2]
    out = np.full(len(cols), above)
    weight = np.array([0.5, 1.0, 1.0], np.float32)  # lightness varies over skin more than hue does
    for k, (x, top) in enumerate(zip(cols, tops, strict=True)):
        y_top = int(np.floor(top))
        ys = np.arange(y_top, int(np.floor(top - above)) - 1, -1)
        ys = ys[(ys >= 0) & (ys < h)]
        if not 0 <= x < w or len(ys) < 3:
            continue
        far = np.linalg.norm((lab[ys, x] - skin) * weight, axis=1) > HAIR_DISTANCE
        run = far[:-2] & far[1:-1] & far[2:]
        hit = np.flatnonzero(run[2:]) + 2  # from a few px above the brow (its own edge is dark)
        if len(hit):
            out[k] = float(y_top - ys[hit[0]])
    return out


def _even(reach: np.ndarray, width: float) -> np.ndarray:
    """The reach per column made even across columns: the least within `width` px, then
    averaged over as many. A stray hair above a brow stops one column's reach and not its
    neighbour's: the skin between them stretched by different amounts, vertical streaks above a
    raised brow."""
    k = max(1, int(round(width)) // 2)
    padded = np.pad(reach, k, mode="edge")
    least = np.lib.stride_tricks.sliding_window_view(padded, 2 * k + 1).min(axis=1)
    return np.convolve(np.pad(least, k, mode="edge"), np.full(2 * k + 1, 1 / (2 * k + 1)), mode="valid")


def _thickness(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Vertical distance between a brow's upper and lower contours at the upper one's points."""
    order = np.argsort(bottom[:, 0])
    return np.abs(np.interp(top[:, 0], bottom[order, 0], bottom[order, 1]) - top[:, 1])


def brow_map(brow: Brow, qx: np.ndarray, qy: np.ndarray, lift: float) -> np.ndarray:
    """Source y for brow-box points (qx, qy) (frame px) with the brow raised by `lift` px: the
    lowest point that the raise carries to q. Where the skin above a brow is too short for the
    raise (a fringe or a low hairline stops its reach a few px up), the brow slides over it as
    over a fold, rather than the skin being squeezed past itself: the inverse of a map that
    folds, approximated by fixed-point steps, smeared the brows into vertical streaks."""
    if abs(lift) < 1e-3:
        return qy
    shift = _brow_shift_table(brow, lift)
    rows = (qy - np.float32(brow.y0)).astype(np.float32)
    cols = _column(brow, qx).astype(np.float32)
    # outside the table the raise has faded to nothing: a shift of 0 beyond its edges
    return qy + cv2.remap(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar borderValue
        shift, cols, rows, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )


BROW_STEPS_PER_PX = 2  # the raise is followed at this many source points a px, per column (the
# lookup between them is linear: off by up to ~0.2 px where the skin is squeezed most)


def _brow_shift_table(brow: Brow, lift: float) -> np.ndarray:
    """(y1 - y0, x1 - x0) float32: at each frame row of the box and column, how far below it
    (px) is the point that the raise carries there. Per column: where each source point lands
    (y minus the raise there), then for each row the lowest source point landing at or above it
    (the one in front: a raised brow hides the skin it rises over)."""
    n_rows, n_cols = brow.y1 - brow.y0, brow.x1 - brow.x0
    src = (brow.y0 + np.arange(n_rows * BROW_STEPS_PER_PX + 1, dtype=np.float32) / BROW_STEPS_PER_PX)[:, None]
    d = src - brow.middle.astype(np.float32)[None, :]  # > 0 below the middle line
    per_px = np.where(d >= 0, brow.per_px_below[None, :], brow.per_px_above[None, :])
    t = np.clip(1 - (np.abs(d) - np.float32(brow.half)) * per_px, 0, 1)
    lands = src - t * t * (3 - 2 * t) * (np.float32(lift) * brow.share.astype(np.float32))[None, :]
    # the lowest source point landing at or above each row: on the suffix minimum (where each
    # point and every point below it land at the highest), a search per column
    front = np.minimum.accumulate(lands[::-1], axis=0)[::-1]
    rows = brow.y0 + np.arange(n_rows, dtype=np.float32)
    span = float(rows[-1] - front.min()) + 2.0 * n_rows + 2.0  # keeps the columns apart in one search
    offsets = np.arange(n_cols) * span
    flat = (front + offsets[None, :]).ravel(order="F")
    wanted = (rows[:, None] + offsets[None, :]).ravel(order="F")
    at = np.searchsorted(flat, wanted, side="right").reshape(n_cols, n_rows).T - 1
    at -= np.arange(n_cols)[None, :] * len(src)
    at = np.clip(at, 0, len(src) - 2)
    cols = np.arange(n_cols)[None, :]
    lo, hi = front[at, cols], front[at + 1, cols]
    frac = np.clip((rows[:, None] - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
    source = src[at, 0] + frac / BROW_STEPS_PER_PX
    return (source - rows[:, None]).astype(np.float32)
