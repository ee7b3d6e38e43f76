"""Video decoder: one backward warp of the photo per frame, composed of three cheap parts.

Setup (once per portrait): the expression coefficients (jaw, spread, round, close-rest) become
dense displacement fields by thin-plate splines, evaluated only over the lower face (the mouth
box); the lids get their own map (`eyes.py`); the head's rigid motion is an affine map faded out
by a soft head mask just outside the face, so hair, neck and background stay still.

Per frame, every output pixel x asks where it comes from:
  1. head:       q = x + mask(x) * (A^-1 x - x)       (affine; computed on a 4 px grid, upsampled)
  2. expression: p solves p + field(p) = q           (Newton's steps, mouth box only)
  3. brows:      p1 = brow_map(p)                     (brow boxes only)
  4. lids:       p2 = lid_map(p1)                     (eye boxes only)
  5. gaze:       p3 = gaze_map(p2)                    (inside each eye's opening)
and the photo is sampled once at p3 (see sonic/geometry.py).
Where the lips part further than the photo shows, the mouth interior is painted (`mouth.py`).
A closed mouth's dark corner creases, which a wide opening leaves behind beside its own corners,
are drawn there from a copy of the photo with the creases filled in.
Pixels outside the head's reach are the untouched frame.

The `warp` decoder kind that prepares it is in `kind.py`.
"""

from __future__ import annotations

import itertools
import math

import cv2
import numpy as np

from ...geometry import Framing
from ...landmarks import FACE_OVAL_IDX, INNER_LOWER, INNER_UPPER, LIP_MIDDLE, N_MESH, OUTER_CORNERS
from ...motion import (
    COEFFS,
    JAW_GAIN,
    MAX_ROLL_DEG,
    MAX_SCALE,
    MAX_SHIFT_IOD,
    OPENING_MAX,
    SPREAD_GAIN,
    Rig,
    smoothstep,
)
from .eyes import brow_map, build_brows, build_eyes, gaze_map, lid_map, wears_glasses
from .mouth import luma, mouth_axis, mouth_style, paint_mouth, three

ANCHOR_STEP_PX = 24  # spacing of the fixed anchors on the mouth box border
FIELD_STEP = 4  # px between exact evaluations of the spline (and of the head map)
TPS_REG = 1e-2  # thin-plate spline regularisation (px^2)
HEAD_MARGIN_IOD = 0.06  # the head moves rigidly up to this far beyond the face oval...
HEAD_FADE_IOD = 0.3  # ... and its motion fades to nothing over this much further (hair, neck)
STILL_RINGS_IOD = (0.3, 0.6)  # fixed control points this far outside the face oval
REACH_IOD = 0.45  # beyond this distance outside the oval the expression field is zero
# Newton steps inverting the forward displacement, on the coarse blocks (see solve_backward)
BACKWARD_ITERS = 6
BACKWARD_TOL = 0.03  # px: a point this close to landing is solved
REMAP_MAX = 32000  # cv2.remap takes maps under 32767 wide
# below this Jacobian determinant (a fold) a point takes the fixed-point step; skin squeezed
# above closing lips reaches 0.05-0.2, where Newton is what converges (each step stays within
# the field's largest displacement)
NEWTON_MIN_DET = 0.02
EXPRESSION = [COEFFS.index(c) for c in ("jaw", "spread", "round", "close_rest")]
BLINK = COEFFS.index("blink")
CLOSE_REST = COEFFS.index("close_rest")
BROW = COEFFS.index("brow")
GAZE = [COEFFS.index("gaze_x"), COEFFS.index("gaze_y")]
# the largest value each of them takes (see motion.mouth_coefficients): the fields' reach, the
# box they are kept in and their fade at a photo's edge are sized by these
EXPRESSION_MAX = (OPENING_MAX * JAW_GAIN, SPREAD_GAIN, SPREAD_GAIN, 1.0)
SOLVE_BLOCK = 4  # px: the expression's candidates are solved on blocks this size, then interpolated
BAND_IOD = 0.06  # pixels this close to the lips choose their side per pixel, others per block
INTERIOR_GROW_IOD = 0.012  # the photo's mouth interior reaches this far past the inner lip contour
CORNER_REACH_IOD = 0.04  # ... and this far past its corners
CREASE_REACH_IOD = (0.03, 0.06)  # a closed mouth's corner crease: all of it this close to the
# line from an inner to an outer lip corner, fading to none this far
CREASE_KEPT_IOD = (0.01, 0.03)  # ... kept beside the opening, filled in from the first distance to the second
CREASE_DARK_AROUND = 0.15  # ... unless more than this share of the skin around it is as dark
CREASE_DARKER = (0.9, 0.5)  # ... where the photo is darker than the lips: from 0.9 of their luma, fully at 0.5
FIELD_EPS_PX = 0.2  # displacements below this (at the largest coefficients) count as none
EDGE_FADE = 2.0  # motions fade out over this many times their reach from a photo edge the face touches


def _tps_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """U(r) = r^2 log r between point sets (N, 2) and (M, 2) -> (N, M); squared distances by a
    matrix product (BLAS), not an (N, M, 2) difference array."""
    d2 = np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * (a @ b.T), 0.0)
    return d2 * np.log(d2 + 1e-12) * 0.5


def tps_fields(
    points: np.ndarray, splines: list[tuple[np.ndarray, np.ndarray]], box: tuple[int, int, int, int]
) -> list[np.ndarray]:
    """Thin-plate splines over shared control points, evaluated over box (x0, y0, x1, y1).

    points (N, 2) px; each spline is (indices into points, values (len(indices), C)) and
    becomes a (C, H, W) float32 field. Coordinates are normalised to the box size and the
    splines are solved in float64: the kernel terms are large and cancel, and float32 leaves
    pixel-sized noise in the field. Fields are smooth, so they are evaluated every FIELD_STEP px
    (one kernel matrix for all splines) and interpolated.
    """
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    scale = float(max(h, w))
    # typed loosely: as float64 array, numpy's stubs make `points - origin` Never (and `c` a float)
    origin: np.ndarray = np.array([x0, y0], np.float64)
    c = (points - origin) / scale
    k_all = _tps_kernel(c, c)
    hc, wc = (h + FIELD_STEP - 1) // FIELD_STEP + 1, (w + FIELD_STEP - 1) // FIELD_STEP + 1
    gy, gx = np.mgrid[0:hc, 0:wc] * FIELD_STEP
    grid = np.stack([gx.ravel(), gy.ravel()], 1) / scale
    weights = []
    for idx, values in splines:
        n = len(idx)
        A = np.zeros((n + 3, n + 3))
        A[:n, :n] = k_all[np.ix_(idx, idx)] + TPS_REG / scale**2 * np.eye(n)
        A[:n, n], A[:n, n + 1 :] = 1.0, c[idx]
        A[n, :n], A[n + 1 :, :n] = 1.0, c[idx].T
        rhs = np.zeros((n + 3, values.shape[1]))
        rhs[:n] = values
        wts = np.linalg.solve(A, rhs)
        full = np.zeros((len(points), values.shape[1]))  # kernel weights on all points
        full[idx] = wts[:n]
        weights.append((full, wts[n], wts[n + 1 :]))
    outs = [np.empty((len(grid), v.shape[1])) for _, v in splines]
    for i in range(0, len(grid), 2048):
        g = grid[i : i + 2048]
        kg = _tps_kernel(g, c)
        for out, (full, const, lin) in zip(outs, weights, strict=True):
            out[i : i + 2048] = kg @ full + const + g @ lin
    # nodes sit on every FIELD_STEP-th pixel: interpolate between them
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) / FIELD_STEP
    fields = []
    for out, (_, values) in zip(outs, splines, strict=True):
        coarse = out.T.reshape(values.shape[1], hc, wc).astype(np.float32)
        fields.append(
            np.stack([cv2.remap(ch, xs, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for ch in coarse])
        )
    return fields


def _field_at(fxy: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """The field (H, W, 2) at points (sx, sy: float32, one dimension), bilinear, zero outside it
    -> (N, 2)."""
    if len(sx) > REMAP_MAX:
        parts = [_field_at(fxy, sx[i : i + REMAP_MAX], sy[i : i + REMAP_MAX]) for i in range(0, len(sx), REMAP_MAX)]
        return np.concatenate(parts)
    return cv2.remap(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar borderValue
        fxy, sx[None], sy[None], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )[0]


def solve_backward(
    fxy: np.ndarray, lx: np.ndarray, ly: np.ndarray, most: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p with p + field(p) = l, for each point l (lx, ly: float32, field px) -> (px, py, residual px).
    `most`: the field's largest displacement (px), or one per point where the points lie in
    parts of fxy that hold different fields.

    Newton's steps on the field's local Jacobian (differences over 1 px). The plain fixed-point
    iteration p = l - field(p) converges only as fast as the field's slope allows: where lips
    closing over a photo's teeth squeeze the skin above them (slope near -1) it swung back and
    forth, and on a large face (the lips moving 25 px) it stopped 5 px short, where the other
    lip's candidate, the photo's teeth, was taken instead (tooth-shaped specks above the lip).
    Where the local map folds or nearly does, a point takes the fixed-point step instead.
    A point leaves the solve once it lands within BACKWARD_TOL: most do within two steps, and
    the steps' lookups and arithmetic are then spent on the few near a fold."""
    shape = lx.shape
    tx, ty = lx.ravel(), ly.ravel()  # where the points must land
    sx, sy = tx.copy(), ty.copy()  # where they are
    err = np.empty(lx.size, np.float32)
    # p - l = -field(p): no solution lies further from l than the field's largest displacement,
    # and a step near a fold that lands further is taken back to that distance. The bound must
    # be tight: at sqrt(2) times the largest component, a corner point stepped over to the photo's
    # teeth
    reach = np.broadcast_to(np.float32(most), shape).ravel()
    todo = np.arange(lx.size)  # the points not yet solved, and their positions, targets and bounds
    px, py, gx, gy = sx, sy, tx, ty
    for step in range(BACKWARD_ITERS + 1):
        d = _field_at(fxy, px, py)
        rx, ry = px + d[:, 0] - gx, py + d[:, 1] - gy
        r = np.hypot(rx, ry)
        err[todo] = r
        going = r >= BACKWARD_TOL
        if step == BACKWARD_ITERS or not going.any():
            break
        if not going.all():
            todo, px, py, gx, gy = todo[going], px[going], py[going], gx[going], gy[going]
            rx, ry, d, reach = rx[going], ry[going], d[going], reach[going]
        dx = _field_at(fxy, px + 1, py) - d
        dy = _field_at(fxy, px, py + 1) - d
        a, b, c, e = 1 + dx[:, 0], dy[:, 0], dx[:, 1], 1 + dy[:, 1]  # Jacobian of p + field(p)
        det = a * e - b * c
        # where the map (nearly) folds, the identity in place of the Jacobian: the fixed-point step
        fold = det <= NEWTON_MIN_DET
        a[fold], b[fold], c[fold], e[fold], det[fold] = 1, 0, 0, 1, 1
        ox, oy = px - (e * rx - b * ry) / det - gx, py - (a * ry - c * rx) / det - gy
        over = np.maximum(np.hypot(ox, oy) / reach, 1.0)
        px, py = gx + ox / over, gy + oy / over
        sx[todo], sy[todo] = px, py
    return sx.reshape(shape), sy.reshape(shape), err.reshape(shape)


def _to_edge(extent: tuple[float, float, float, float], origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 over frame px from `origin` (x, y): the distance (px) to the nearest edge of
    the photo's pixels (`extent`, see Framing.extent)."""
    ex0, ey0, ex1, ey1 = extent
    xs = np.arange(shape[1], dtype=np.float32) + origin[0]
    ys = np.arange(shape[0], dtype=np.float32) + origin[1]
    return np.minimum(np.minimum(ys - ey0, ey1 - ys)[:, None], np.minimum(xs - ex0, ex1 - xs)[None, :])


def _reach_near_edge(fields: list[np.ndarray], extent, origin: tuple[int, int]) -> float:
    """The farthest (px) the expression fields (each (K, 2, H, W) from `origin`) take a pixel that
    lies within EDGE_FADE times that distance of the photo's edge: every coefficient between 0 and
    its largest (EXPRESSION_MAX), so the farthest is at one of the corners of that box."""
    k = fields[0].shape[0]
    to_edge = _to_edge(extent, origin, (fields[0].shape[2], fields[0].shape[3]))
    size = np.array(EXPRESSION_MAX, np.float32)
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=k)), np.float32)[1:] * size
    reach = 0.0
    for f in fields:
        # no corner moves a pixel further than its coefficients' reaches added: only pixels where
        # that sum comes near the edge are looked at (most faces: none)
        near = EDGE_FADE * (np.hypot(f[:, 0], f[:, 1]) * size[:, None, None]).sum(0) > to_edge
        if not near.any():
            continue
        at, room = f[:, :, near], to_edge[near]  # (K, 2, N), (N,)
        for c in corners:
            m = np.hypot(*np.tensordot(c, at, axes=1))
            reach = max(reach, float(np.max(m, where=EDGE_FADE * m > room, initial=0.0)))
    return reach


def _edge_fade(
    extent: tuple[float, float, float, float], origin: tuple[int, int], shape: tuple[int, int], width: float
) -> np.ndarray:
    """(H, W) float32 over frame px from `origin` (x, y): 0 on the edges of the photo's pixels
    (`extent`, see Framing.extent), rising smoothly to 1 `width` px inside them. A motion of at
    most width / EDGE_FADE px, times this, never asks for a pixel beyond the photo, and the fade
    adds at most 0.75 to how fast it changes across the edge."""
    return smoothstep(_to_edge(extent, origin, shape), 0.0, max(width, 1.0)).astype(np.float32)


def _head_reach(rig: Rig, hw: tuple[int, int], mask: np.ndarray, motion_scale: float) -> float:
    """The farthest (px) the head's motion (at its limits, which grow with motion_scale) takes a
    frame pixel that moves with it, at the frame's edges: 0 where the head's reach stops short of them."""
    h, w = hw
    edge = np.zeros((h, w), bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    ys, xs = np.nonzero(edge & (mask > 0))
    if not len(xs):
        return 0.0
    r = np.hypot(xs - rig.centre[0], ys - rig.centre[1]).max()
    return float(r * (np.deg2rad(MAX_ROLL_DEG) + MAX_SCALE) + MAX_SHIFT_IOD * rig.iod) * max(motion_scale, 1.0)


def _poly_mask(pts: np.ndarray, hw, blur_px: float) -> np.ndarray:
    m: np.ndarray = np.zeros(hw, np.float32)  # float32 throughout; cv2.GaussianBlur is typed loosely
    cv2.fillPoly(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar colour
        m, [np.round(pts * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=2
    )
    if blur_px > 0:
        m = cv2.GaussianBlur(m, (0, 0), blur_px)
    return m


def _outside_distance(poly: np.ndarray, hw) -> np.ndarray:
    """Distance (px) of every pixel from a filled polygon, 0 inside."""
    inside = np.zeros(hw, np.uint8)
    cv2.fillPoly(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar colour
        inside, [np.round(poly).astype(np.int32)], 1
    )
    return cv2.distanceTransform(1 - inside, cv2.DIST_L2, 5)


def _box(pts: np.ndarray, margin: float, hw: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 around pts with a margin, clipped to a frame of size hw (None: unclipped)."""
    x0, y0 = np.floor(pts.min(0) - margin).astype(int)
    x1, y1 = np.ceil(pts.max(0) + margin).astype(int) + 1
    if hw is None:
        return int(x0), int(y0), int(x1), int(y1)
    h, w = hw
    return int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))


class WarpDecoder:
    """Renders frames of one portrait; build once per request, call per batch of frames."""

    def __init__(self, framing: Framing, rig: Rig, motion_scale: float = 1.0):
        self.framing, self.rig = framing, rig
        self.frame = framing.frame
        h, w = self.frame.shape[:2]
        lm = framing.landmarks[:N_MESH, :2]
        self.lm = lm
        iod = rig.iod
        oval = lm[FACE_OVAL_IDX]
        centre = oval.mean(0)
        radial = (oval - centre) / (np.linalg.norm(oval - centre, axis=1, keepdims=True) + 1e-6)

        # 1. head: rigid inside the face (and a margin), fading to still over HEAD_FADE_IOD, and
        # towards the photo's edges where the face reaches them
        dist = _outside_distance(oval + HEAD_MARGIN_IOD * iod * radial, (h, w))
        t = np.clip(1 - dist / (HEAD_FADE_IOD * iod), 0, 1)
        mask = smoothstep(t, 0.0, 1.0)
        reach = _head_reach(rig, (h, w), mask, motion_scale)
        if reach > 0:
            mask = mask * _edge_fade(framing.extent, (0, 0), (h, w), EDGE_FADE * reach)
        ys, xs = np.nonzero(mask > 0)
        self.box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, w, h)
        x0, y0, x1, y1 = self.box
        # the head map is evaluated at the centres of FIELD_STEP-px blocks and enlarged by
        # cv2.resize, whose pixel-centre convention lands each node on its block's centre
        hc, wc = -(-(y1 - y0) // FIELD_STEP), -(-(x1 - x0) // FIELD_STEP)
        gy, gx = (np.mgrid[0:hc, 0:wc].astype(np.float32) + 0.5) * FIELD_STEP - 0.5
        self._grid = (gx + x0, gy + y0)
        self._grid_mask = cv2.remap(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar borderValue
            mask.astype(np.float32), gx + x0, gy + y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        self._py, self._px = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        mid = lm[LIP_MIDDLE[0]]
        self.head_at_mouth = float(mask[int(np.clip(mid[1], 0, h - 1)), int(np.clip(mid[0], 0, w - 1))])

        # 2. expression fields over the mouth box (where an expression coefficient moves the face)
        reach = np.abs(rig.basis[EXPRESSION]).max(axis=2) * np.array(EXPRESSION_MAX)[:, None]
        self._moving = np.flatnonzero(reach.max(0) > FIELD_EPS_PX)
        self.mbox = _box(lm[self._moving], REACH_IOD * iod, (h, w))
        self._fit_fields(lm, oval, radial)

        # 3. lids, gaze and brows
        glasses = wears_glasses(self.frame, framing.landmarks, iod)  # (a Sobel over the frame: once)
        self.eyes = build_eyes(self.frame, framing.landmarks, iod, glasses)
        self.brows = build_brows(self.frame, framing.landmarks, self.eyes, iod, glasses)

        # the photo's own mouth interior is kept where the lips part over it; a closed mouth
        # (a thin slit) has none worth keeping
        mx0, my0, mx1, my1 = self.mbox
        # the dark corners of an open smile reach past the mesh's inner corners: the polygon
        # runs out to a point beyond each corner, along the parting line
        up_, lo_ = lm[INNER_UPPER], lm[INNER_LOWER]
        mid = (up_[0] + up_[-1]) / 2
        tips = [
            c + CORNER_REACH_IOD * iod * (c - mid) / max(np.linalg.norm(c - mid), 1e-6)
            for c in ((up_[0] + lo_[0]) / 2, (up_[-1] + lo_[-1]) / 2)
        ]
        inner = np.concatenate([[tips[0]], up_[1:-1], [tips[1]], lo_[-2:0:-1]]) - np.array([mx0, my0])
        shows = float(np.clip((rig.rest_gap / iod - 0.02) / 0.03, 0, 1))
        # (grown a little: the photo's teeth reach past the mesh's inner lip contour)
        interior = _poly_mask(inner, (my1 - my0, mx1 - mx0), 0.0)
        grow = max(1, int(round(INTERIOR_GROW_IOD * iod)))
        interior = cv2.dilate(interior, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1, 2 * grow + 1)))
        self.src_interior = shows * cv2.GaussianBlur(interior, (0, 0), 0.6)
        self.shows_interior = shows > 0
        self.shows = shows
        self.style = mouth_style(self.frame, framing.landmarks, paint_teeth=shows < 0.5, upscale=framing.upscale)
        # a closed mouth's corners are a dark crease that a wide opening leaves behind, above and
        # beside its own corners, as dark notches: there it is drawn from a filled-in copy
        lip_luma = float(luma(self.style.lip))
        self._crease = _corner_crease(self.frame, lm, lip_luma, iod, self.mbox) if shows < 0.5 else None

    def _fit_fields(self, lm: np.ndarray, oval: np.ndarray, radial: np.ndarray) -> None:
        """Two field sets split at the lips' parting line, where the motion is discontinuous:
        one fitted without the lower lip (valid above the line), one without the upper lip."""
        rig, iod = self.rig, self.rig.iod
        # the still anchors go on the border of the box where the expression reaches, unclipped:
        # on a frame that ends at the chin, anchors on the frame's edge would pin the moving chin
        # (three dark dents along the bottom edge)
        ax0, ay0, ax1, ay1 = _box(lm[self._moving], REACH_IOD * iod, None)
        h, w = ay1 - ay0, ax1 - ax0
        per = max(8, int(2 * (w + h) / ANCHOR_STEP_PX))
        t = np.linspace(0, 1, per // 4 + 1)[:-1]
        border = np.concatenate(
            [
                np.stack([t * (w - 1), 0 * t], 1),
                np.stack([(w - 1) + 0 * t, t * (h - 1)], 1),
                np.stack([(1 - t) * (w - 1), (h - 1) + 0 * t], 1),
                np.stack([0 * t, (1 - t) * (h - 1)], 1),
            ]
        ) + np.array([ax0, ay0])
        x0, y0, x1, y1 = self.mbox
        h, w = y1 - y0, x1 - x0
        # still rings just outside the face oval confine the expression to the face: the neck,
        # collar and background stay where they are when the jaw drops
        rings = np.concatenate([oval + r * iod * radial for r in STILL_RINGS_IOD])
        still = np.concatenate([border, rings])
        basis = rig.basis[EXPRESSION]
        k = len(EXPRESSION)
        # control points: the mesh, the parting line, the still anchors
        points = np.concatenate([lm, rig.lip_line[1:-1], still])
        line_idx = np.arange(N_MESH, N_MESH + len(rig.lip_line) - 2)
        still_idx = np.arange(N_MESH + len(line_idx), len(points))
        splines = []
        # the parting line itself moves with the inner lip of each side, so teeth in the photo
        # ride with their lip instead of being stretched across the opening
        for drop, inner in ((rig.lower_lip, INNER_UPPER), (rig.upper_lip, INNER_LOWER)):
            keep_idx = np.setdiff1d(np.arange(N_MESH), drop)
            mv = np.concatenate([basis[:, keep_idx, :], basis[:, inner[1:-1], :]], 1)
            vals = np.zeros((len(keep_idx) + len(line_idx) + len(still_idx), 2 * k))
            vals[: mv.shape[1]] = mv.transpose(1, 0, 2).reshape(mv.shape[1], 2 * k)
            splines.append((np.concatenate([keep_idx, line_idx, still_idx]), vals))
        fields = [f.reshape(k, 2, h, w) for f in tps_fields(points, splines, self.mbox)]
        # beyond REACH_IOD outside the oval the field is exactly zero: those pixels only move with the head
        dist = _outside_distance(oval - np.array([x0, y0]), (h, w))
        reach = np.clip(1 - dist / (REACH_IOD * iod), 0, 1).astype(np.float32)
        fields = [f * reach for f in fields]
        # where the face reaches an edge of the photo, the fields fade to nothing at it: a chin
        # at the frame's bottom edge closing a wide-open smile asked for pixels below the photo
        # (its edge row repeated: a flat block under the chin)
        reach_px = _reach_near_edge(fields, self.framing.extent, (x0, y0))
        if reach_px > 0:
            fade = _edge_fade(self.framing.extent, (x0, y0), (h, w), EDGE_FADE * reach_px)
            fields = [f * fade for f in fields]
        size = np.array(EXPRESSION_MAX, np.float32)[:, None, None]
        # keep only the part of the box where the fields move anything
        moves = np.maximum(*(np.abs(f).max(axis=1) * size for f in fields)).max(0) > FIELD_EPS_PX
        ys, xs = np.nonzero(moves)
        if len(xs):
            bx0, by0, bx1, by1 = max(0, xs.min() - 2), max(0, ys.min() - 2), min(w, xs.max() + 3), min(h, ys.max() + 3)
            fields = [f[:, :, by0:by1, bx0:bx1] for f in fields]
            self.mbox = x0, y0, x1, y1 = x0 + bx0, y0 + by0, x0 + bx1, y0 + by1
        # the two sets side by side in one image (H, W + gap + W, 2), zeros between them: one
        # backward solve serves both (one round of lookups and arithmetic per step, not two). The
        # gap is twice the furthest either set reaches at the coefficients' limits, so that no
        # point of one set reads the other (a step never goes further than its field's reach)
        fh, fw = fields[0].shape[2:]
        limits = np.array(EXPRESSION_MAX, np.float32)
        furthest = max(float(limits @ np.hypot(f[:, 0], f[:, 1]).reshape(len(f), -1).max(1)) for f in fields)
        gap = 2 * math.ceil(furthest) + 4 + fw % 2  # (the lower set starts on an even column)
        both = np.zeros((len(fields[0]), fh, 2 * fw + gap, 2), np.float32)
        both[:, :, :fw], both[:, :, fw + gap :] = (f.transpose(0, 2, 3, 1) for f in fields)
        # (K, H * (W + gap + W) * 2): one frame's fields are a single matrix-vector product
        self.fields = both.reshape(len(both), -1)
        self._fields_shape = both.shape[1:]
        self._lower_at = fw + gap  # x of the lower set's first column
        # every other pixel of both, for each set's largest displacement (see solve_backward's
        # bound): the fields are smooth (bilinear between spline nodes FIELD_STEP px apart, times
        # smooth fades), and every other pixel finds it to well under a pixel, in a quarter of the time
        every_other = np.ascontiguousarray(both[:, ::2, ::2])
        self._fields_sampled = every_other.reshape(len(both), -1)
        self._sampled_shape = every_other.shape[1:]
        # parting line y(x) and its softness: sharp across the mouth, soft beyond the corners
        line = rig.lip_line
        xs_r = np.arange(x0, x1, dtype=np.float64)
        beyond = np.clip(np.maximum(line[0, 0] - xs_r, xs_r - line[-1, 0]), 0, None)
        line_y = np.interp(xs_r, line[:, 0], line[:, 1])
        soft = 0.6 + 0.6 * beyond
        ys_r = np.arange(y0, y1, dtype=np.float64)[:, None]
        self._below = (1 / (1 + np.exp(-np.clip((ys_r - line_y) / soft, -30, 30)))).astype(np.float32)

    # ----------------------------------------------------------------------------------- per frame
    def head_map(self, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each pixel of the head box comes from under the head's motion: (qx, qy) float32."""
        roll, tx, ty, sc = (float(v) for v in head)
        cx, cy = self.rig.centre
        gx, gy = self._grid
        dx, dy = gx - cx - tx, gy - cy - ty
        c, s = np.cos(roll) / (1 + sc), np.sin(roll) / (1 + sc)
        ix, iy = c * dx + s * dy + cx, -s * dx + c * dy + cy
        m = self._grid_mask
        # displacements are enlarged, not positions: at the box's edges (no motion) the clamped
        # interpolation of cv2.resize is then exact. One channel at a time: the sums below then
        # read contiguous rows (half the time of splitting a two-channel result)
        x0, y0, x1, y1 = self.box
        size = (gx.shape[1] * FIELD_STEP, gx.shape[0] * FIELD_STEP)
        fx = cv2.resize(m * (ix - gx), size, interpolation=cv2.INTER_LINEAR)[: y1 - y0, : x1 - x0]
        fy = cv2.resize(m * (iy - gy), size, interpolation=cv2.INTER_LINEAR)[: y1 - y0, : x1 - x0]
        return fx + self._px, fy + self._py

    def _side_below(self, px: np.ndarray, py: np.ndarray) -> np.ndarray:
        """Soft 0..1: frame positions lie below the lips' parting line (a lookup into the mouth
        box; beyond it, the line's ends extend sideways and its sides up and down)."""
        x0, y0 = self.mbox[:2]
        return cv2.remap(self._below, px - x0, py - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

    def expression_map(
        self,
        coeffs: np.ndarray,
        qx: np.ndarray,
        qy: np.ndarray,
        mouth: np.ndarray,
        band: tuple[tuple[int, int], tuple[int, int]],
    ):
        """Solve p + field(p) = q for points q (frame px) -> (px, py, opening, seam).

        Two candidates, one per field set, are smooth functions of q: they are solved on
        SOLVE_BLOCK-px blocks and interpolated. Which one a pixel takes changes sharply only at the lips, so the
        choice is made on the blocks too, and again per pixel inside `band` (rows, cols of q
        around the lips). `mouth` (0..1, q's shape) is the moved inner-lip polygon; `opening`
        (0..1) marks the new mouth opening; `seam` (or None) marks the photo's interior still
        showing while the lips close over it."""
        x0, y0 = self.mbox[:2]
        c = coeffs[EXPRESSION].astype(np.float32)
        h, w = qx.shape
        if np.abs(c).max() < 1e-5:  # the face at rest
            return qx, qy, np.zeros((h, w), np.float32), None
        b = SOLVE_BLOCK
        hh, ww = -(-h // b) * b, -(-w // b) * b

        def down(img):  # block means; cv2's pixel-centre conventions line them up
            img = cv2.copyMakeBorder(img, 0, hh - h, 0, ww - w, cv2.BORDER_REPLICATE)
            return cv2.resize(img, (ww // b, hh // b), interpolation=cv2.INTER_AREA)

        def up(img):
            return cv2.resize(img, (ww, hh), interpolation=cv2.INTER_LINEAR)[:h, :w]

        # (the candidates and positions travel as planes, one contiguous array each, and are
        # resized one at a time: the lookups and sums over interleaved channels read strided
        # memory, and merging and splitting the channels cost more than the resizes themselves)
        qcx, qcy = down(qx), down(qy)
        fxy = (c @ self.fields).reshape(self._fields_shape)  # (H, W + gap + W, 2): both sets
        # each point solved twice, once in each set (the lower set's points shifted to its half)
        lx, ly, at = (qcx - x0).ravel(), (qcy - y0).ravel(), self._lower_at
        n = len(lx)
        bound = np.repeat(np.array(self._largest_lengths(c), np.float32), n)
        sx, sy, err = solve_backward(fxy, np.concatenate([lx, lx + at]), np.concatenate([ly, ly]), bound)
        sx[n:] -= at
        sx, sy, err = (v.reshape(2, *qcx.shape) for v in (sx + x0, sy + y0, err))
        # per set, the candidate's x, y and how well it converged (a candidate counts only where
        # the solve converged: p + field(p) lands on q)
        cands = [sx[0], sy[0], np.clip(2.0 - err[0], 0, 1), sx[1], sy[1], np.clip(2.0 - err[1], 0, 1)]
        close = float(np.clip(coeffs[CLOSE_REST], 0, 1))
        (pcx, pcy), _, _ = self._choose(cands, (qcx, qcy), down(mouth), close, exact=False)
        # positions are interpolated as displacements from q (exact where nothing moves)
        # (enlarged together, as two interleaved channels read in place: one channel at a time
        # rounds a few values differently, and splitting them copies all of them)
        pxy = up(cv2.merge([pcx - qcx, pcy - qcy]))
        px, py = pxy[..., 0], pxy[..., 1]
        px += qx
        py += qy
        opening = np.zeros((h, w), np.float32)
        seam = None
        (by0, by1), (bx0, bx1) = band
        if by1 > by0 and bx1 > bx0:
            qb = qx[by0:by1, bx0:bx1], qy[by0:by1, bx0:bx1]
            # only the coarse nodes around the band are enlarged (one node of margin keeps the
            # interpolation inside identical to enlarging everything)
            cy0, cx0 = max(0, by0 // b - 1), max(0, bx0 // b - 1)
            cy1, cx1 = min(len(qcx), -(-by1 // b) + 1), min(qcx.shape[1], -(-bx1 // b) + 1)
            nx, ny = qcx[cy0:cy1, cx0:cx1], qcy[cy0:cy1, cx0:cx1]
            ux, uy, ok_up, lox, loy, ok_lo = (v[cy0:cy1, cx0:cx1] for v in cands)
            rel = cv2.merge([ux - nx, uy - ny, ok_up, lox - nx, loy - ny, ok_lo])
            big = cv2.resize(rel, ((cx1 - cx0) * b, (cy1 - cy0) * b), interpolation=cv2.INTER_LINEAR)
            ry0, rx0 = by0 - cy0 * b, bx0 - cx0 * b  # the band in the enlarged nodes
            ux, uy, ok_up, lox, loy, ok_lo = cv2.split(big[ry0 : ry0 + by1 - by0, rx0 : rx0 + bx1 - bx0])
            fine = [ux + qb[0], uy + qb[1], ok_up, lox + qb[0], loy + qb[1], ok_lo]
            (pbx, pby), ob, sb = self._choose(fine, qb, mouth[by0:by1, bx0:bx1], close)
            px[by0:by1, bx0:bx1], py[by0:by1, bx0:bx1] = pbx, pby
            opening[by0:by1, bx0:bx1] = ob
            if sb is not None:
                seam = np.zeros((h, w), np.float32)
                seam[by0:by1, bx0:bx1] = sb
        return px, py, opening, seam

    def _largest_lengths(self, c: np.ndarray) -> tuple[float, float]:
        """Each field set's largest displacement (px) under the expression coefficients c."""
        f = (c @ self._fields_sampled).reshape(self._sampled_shape)
        squared = f[..., 0] * f[..., 0] + f[..., 1] * f[..., 1]
        at = self._lower_at // 2
        return max(math.sqrt(float(squared[:, :at].max())), 1e-3), max(math.sqrt(float(squared[:, at:].max())), 1e-3)

    def _choose(
        self, cands: list[np.ndarray], q: tuple[np.ndarray, np.ndarray], mouth: np.ndarray, close: float, exact=True
    ) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray | None]:
        """Per pixel, the candidate that lands on its own side of the lips' parting line ->
        ((px, py), opening, seam); cands: planes (H, W) upper x, y, ok, lower x, y, ok; q: (qx, qy).
        Away from the lips (exact=False) the photo's mouth interior plays no part."""
        x0, y0 = self.mbox[:2]
        ux, uy, ok_up, lx, ly, ok_lo = cands
        a_lo = self._side_below(lx, ly) * ok_lo
        a_up = (1 - self._side_below(ux, uy)) * ok_up
        total = a_lo + a_up
        interior = self.src_interior
        if self.shows_interior and exact:
            i_lo = cv2.remap(interior, lx - x0, ly - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            i_up = cv2.remap(interior, ux - x0, uy - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            # where both sides reach (lips closing over the photo's teeth), lips cover the interior
            w_lo, w_up = a_lo * (1 - 0.95 * i_lo), a_up * (1 - 0.95 * i_up)
        else:
            w_lo, w_up = a_lo, a_up
        w_total = w_lo + w_up
        # outside the opening, a pixel neither side claims keeps to its own side of the lips
        fallback = np.where(mouth > 0.5, 0.5, self._side_below(*q))
        a = np.where(
            w_total > 0.05, w_lo / (w_total + 1e-6), np.where(total > 0.05, a_lo / (total + 1e-6), fallback)
        ).astype(np.float32)
        px, py = a * lx + (1 - a) * ux, a * ly + (1 - a) * uy
        covered = np.clip(total, 0, 1)
        seam = None
        if close > 0.01 and self.shows_interior and exact:
            # lips closing over the photo's open mouth: interior that still shows is the seam
            # between them, to be covered in lip colour
            # (inside the lips' current inner contour the photo's teeth belong: they show,
            # until the lips all but meet)
            inside = mouth * (1 - float(np.clip((close - 0.8) / 0.2, 0, 1)))
            seam = (
                close
                * (1 - inside)
                * cv2.remap(interior, px - x0, py - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
            )
        return (px, py), (1 - covered) * mouth, seam

    def _moved(self, pts: np.ndarray, head: np.ndarray) -> np.ndarray:
        """Frame points (N, 2) carried by the rigid head motion (the inverse of `head_map`'s)."""
        roll, tx, ty, sc = head
        p = self.rig.centre
        c, s = np.cos(roll), np.sin(roll)
        return (pts - p) @ np.array([[c, s], [-s, c]]) * (1 + sc) + p + np.array([tx, ty])

    def _landing(self, head: np.ndarray, box) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Rows and columns of the head box whose source positions (under `head`) can fall inside
        box (x0, y0, x1, y1): the head map takes a pixel part of the way from where it is to where
        the rigid motion takes it, so the box and its rigidly moved copy bound them."""
        x0, y0, x1, y1 = box
        # four points, in plain floats: numpy's per-call overhead was most of this, five times a frame
        roll, tx, ty, sc = (float(v) for v in head)
        cx, cy = (float(v) for v in self.rig.centre)
        c, s = math.cos(roll) * (1 + sc), math.sin(roll) * (1 + sc)
        corners = [(float(x), float(y)) for x in (x0, x1) for y in (y0, y1)]
        moved = [((x - cx) * c - (y - cy) * s + cx + tx, (x - cx) * s + (y - cy) * c + cy + ty) for x, y in corners]
        xs, ys = zip(*corners, *moved, strict=True)
        return _bounds((min(xs), min(ys), max(xs), max(ys)), self.box)

    def mouth_polygon(self, offsets: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner upper / lower lip of one frame in frame px after expression and head motion."""
        idx = INNER_UPPER + INNER_LOWER
        pts = self.lm[idx] + offsets[idx]
        pts = pts + self.head_at_mouth * (self._moved(pts, head) - pts)
        return pts[: len(INNER_UPPER)], pts[len(INNER_UPPER) :]

    def _render_one(self, coeffs: np.ndarray, head: np.ndarray, out: np.ndarray) -> None:
        x0, y0, x1, y1 = self.box
        qx, qy = self.head_map(head)
        # expression: only where the head map lands in the mouth box
        sel = self._landing(head, self.mbox)
        opening = seam = mouth = None
        corner_fill = 0.0
        up, lo = self.mouth_polygon(self.rig.offsets(coeffs[None])[0], head)
        up, lo = up - np.array([x0, y0]), lo - np.array([x0, y0])
        if sel is not None:
            (sy0, sy1), (sx0, sx1) = sel
            poly = np.concatenate([up, lo[::-1]]) - np.array([sx0, sy0])
            mouth = _poly_mask(poly, (sy1 - sy0, sx1 - sx0), 0.0)
            mouth = cv2.dilate(mouth, np.ones((3, 3), np.uint8))
            # the lips now and at rest, with a margin: where a pixel's side can change sharply
            rest_up, rest_lo = self.mouth_polygon(np.zeros_like(self.lm), head)
            lips = np.concatenate([up, lo, rest_up - [x0, y0], rest_lo - [x0, y0]]) - np.array([sx0, sy0])
            pad = BAND_IOD * self.rig.iod
            band = (
                (int(max(0, lips[:, 1].min() - pad)), int(min(sy1 - sy0, lips[:, 1].max() + pad + 1))),
                (int(max(0, lips[:, 0].min() - pad)), int(min(sx1 - sx0, lips[:, 0].max() + pad + 1))),
            )
            px, py, op, sm = self.expression_map(coeffs, qx[sy0:sy1, sx0:sx1], qy[sy0:sy1, sx0:sx1], mouth, band)
            qx[sy0:sy1, sx0:sx1], qy[sy0:sy1, sx0:sx1] = px, py
            wide = smoothstep(float(np.linalg.norm(lo - up, axis=1).max()) / self.rig.iod, 0.03, 0.06)
            corner_fill = (1 - 2 * self.shows) * wide if self.shows < 0.5 else 0.0
            if corner_fill > 0:
                # a closed photo's corners are a deep-red crease; stretched across a wide opening
                # they read as red specks beside the teeth: towards the corners the opening is
                # painted wherever the lips part, whatever the warp found there (a photo that
                # shows its teeth keeps its own corners, as it keeps its own teeth)
                mh, mw = mouth.shape
                op = np.maximum(op, mouth * _corners(up - [sx0, sy0], lo - [sx0, sy0], (mh, mw)) * corner_fill)
            opening = np.zeros(qx.shape, np.float32)
            opening[sy0:sy1, sx0:sx1] = op
            if sm is not None:
                seam = np.zeros(qx.shape, np.float32)
                seam[sy0:sy1, sx0:sx1] = sm
        self._upper_face(coeffs, head, qx, qy)
        region = self.framing.sample(qx, qy)
        if sel is not None and mouth is not None and corner_fill > 0 and self._crease is not None:
            self._fill_crease(region, qx, qy, sel, mouth, self._crease, corner_fill)
        if opening is not None:
            _paint(region, up, lo, opening, seam, self.style, self.rig.iod)
        out[y0:y1, x0:x1] = region

    def _fill_crease(
        self,
        region: np.ndarray,
        qx: np.ndarray,
        qy: np.ndarray,
        sel: tuple[tuple[int, int], tuple[int, int]],
        mouth: np.ndarray,
        crease: tuple[np.ndarray, np.ndarray],
        amount: float,
    ) -> None:
        """In place on the head box's region: where the rows and columns `sel` show the photo's
        corner crease (source positions qx, qy) away from the opening (`mouth`, sel's shape),
        its filled-in copy, by `amount` 0..1. Beside the opening the crease stays: it is the
        opening's own corner."""
        (sy0, sy1), (sx0, sx1) = sel
        weight, filled = crease
        mx0, my0 = self.mbox[:2]
        px, py = qx[sy0:sy1, sx0:sx1] - mx0, qy[sy0:sy1, sx0:sx1] - my0
        w = cv2.remap(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar borderValue
            weight, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
        if w.max() * amount < 0.01:
            return
        # the rest only where the crease shows (near the corners: a small part of the mouth's
        # rows and columns); elsewhere the weight is 0 and the region stays as it is
        rows, cols = np.flatnonzero(w.max(1) > 0), np.flatnonzero(w.max(0) > 0)
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        # the distance to the opening counts only up to CREASE_KEPT_IOD: an opening further from
        # the crease's box than that leaves its weight whole, so the distance is taken over the
        # box grown by as much (in the distance transform's steps: a straight one weighs 0.955)
        grow = math.ceil(CREASE_KEPT_IOD[1] * self.rig.iod / 0.955) + 2
        g0, g1 = max(0, r0 - grow), min(len(mouth), r1 + grow)
        h0, h1 = max(0, c0 - grow), min(mouth.shape[1], c1 + grow)
        away = cv2.distanceTransform((mouth[g0:g1, h0:h1] < 0.5).astype(np.uint8), cv2.DIST_L2, 3)
        w = w[r0:r1, c0:c1] * smoothstep(away[r0 - g0 : r1 - g0, c0 - h0 : c1 - h0] / self.rig.iod, *CREASE_KEPT_IOD)
        fill = cv2.remap(
            filled, px[r0:r1, c0:c1], py[r0:r1, c0:c1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        ).astype(np.float32)
        sub = region[sy0 + r0 : sy0 + r1, sx0 + c0 : sx0 + c1]
        sub[:] = np.clip(sub + (fill - sub) * three(amount * w) + 0.5, 0, 255).astype(np.uint8)

    def _upper_face(self, coeffs: np.ndarray, head: np.ndarray, qx: np.ndarray, qy: np.ndarray) -> None:
        """Brows, lids and gaze, in place on the head box's source positions (qx, qy): each in
        the rows and columns of the head box that can land in its own box."""
        iod = self.rig.iod
        lift = float(coeffs[BROW]) * iod
        if abs(lift) > 1e-3:
            for brow in self.brows:
                sel = self._landing(head, (brow.x0, brow.y0, brow.x1, brow.y1))
                if sel is not None:
                    (sy0, sy1), (sx0, sx1) = sel
                    qy[sy0:sy1, sx0:sx1] = brow_map(brow, qx[sy0:sy1, sx0:sx1], qy[sy0:sy1, sx0:sx1], lift)
        closure = float(coeffs[BLINK])
        shift = (float(coeffs[GAZE[0]]) * iod, float(coeffs[GAZE[1]]) * iod)
        moves_iris = abs(shift[0]) > 1e-3 or abs(shift[1]) > 1e-3
        if closure <= 1e-3 and not moves_iris:
            return
        for eye in self.eyes:
            sel = self._landing(head, (eye.x0, eye.y0, eye.x1, eye.y1))
            if sel is None:
                continue
            (sy0, sy1), (sx0, sx1) = sel
            px, py = qx[sy0:sy1, sx0:sx1], qy[sy0:sy1, sx0:sx1]
            if closure > 1e-3:
                py = lid_map(eye, px, py, closure, iod).astype(np.float32)
            if moves_iris:
                px, py = gaze_map(eye, px, py, shift)
            qx[sy0:sy1, sx0:sx1], qy[sy0:sy1, sx0:sx1] = px, py

    def render(self, coeffs: np.ndarray, head: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """coeffs (B, K), head (B, 4) -> frames (B, H, W, 3) uint8 at the frame's size, into `out`
        when given (frames are rendered side by side in processes, not threads: see sonic/render_pool.py)."""
        if out is None:
            out = np.empty((len(coeffs), *self.frame.shape), np.uint8)
        out[:] = self.frame
        for i in range(len(coeffs)):
            self._render_one(np.asarray(coeffs[i], np.float64), np.asarray(head[i], np.float64), out[i])
        return out


def _bounds(
    extent: tuple[float, float, float, float], hbox, margin: int = 3
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Rows and columns (of the head box hbox, x0, y0, x1, y1) covering the frame px extent
    (x0, y0, x1, y1)."""
    hx0, hy0, hx1, hy1 = hbox
    x0, y0 = math.floor(extent[0]) - margin, math.floor(extent[1]) - margin
    x1, y1 = math.ceil(extent[2]) + margin + 1, math.ceil(extent[3]) + margin + 1
    r0, r1 = max(0, y0 - hy0), min(hy1 - hy0, y1 - hy0)
    c0, c1 = max(0, x0 - hx0), min(hx1 - hx0, x1 - hx0)
    if r1 <= r0 or c1 <= c0:
        return None
    return (int(r0), int(r1)), (int(c0), int(c1))


def _corner_crease(
    frame: np.ndarray, lm: np.ndarray, lip_luma: float, iod: float, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """A closed mouth's dark corner creases over box (x0, y0, x1, y1) of the frame: (weight
    (H, W) 0..1, the box with the creases filled in from the lips and skin around them (H, W, 3)
    uint8), or None where the corners are no darker than the lips."""
    x0, y0, x1, y1 = box
    sub = np.ascontiguousarray(frame[y0:y1, x0:x1])
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    hi, lo = CREASE_DARKER[0] * lip_luma, CREASE_DARKER[1] * lip_luma
    dark = np.clip((hi - luma(sub.astype(np.float32))) / max(hi - lo, 1.0), 0, 1)
    near = np.zeros(sub.shape[:2], np.float32)
    full, none = (r * iod for r in CREASE_REACH_IOD)
    for inner, outer in ((INNER_UPPER[0], OUTER_CORNERS[0]), (INNER_UPPER[-1], OUTER_CORNERS[1])):
        a, b = lm[inner], lm[outer]
        ab = b - a  # distance to the segment from the inner to the outer corner
        t = np.clip(((xs - a[0]) * ab[0] + (ys - a[1]) * ab[1]) / max(float(ab @ ab), 1e-6), 0, 1)
        d = np.hypot(xs - (a[0] + t * ab[0]), ys - (a[1] + t * ab[1]))
        # a crease is a dark spot on lighter lips and skin; where it is dark around too (a
        # moustache, a beard's shadow, skin darker than the lips) the corner is left as it is
        around = (d > none) & (d < 2 * none)
        if np.mean(dark[around] > 0.5) < CREASE_DARK_AROUND:
            near = np.maximum(near, 1 - smoothstep(d, full, none))
    weight: np.ndarray = (near * dark).astype(np.float32)  # cv2 is typed loosely
    if weight.max() < 0.05:
        return None
    # grown a little: a half-weighted rim would leave the crease's outline behind
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * max(1, round(0.012 * iod)) + 1,) * 2)
    weight = cv2.GaussianBlur(cv2.dilate(weight, grow), (0, 0), 0.7)
    filled = cv2.inpaint(sub, (weight > 0.02).astype(np.uint8), max(2.0, 0.02 * iod), cv2.INPAINT_TELEA)
    return weight, filled


def _corners(upper: np.ndarray, lower: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """0..1 over an (H, W) region: how far towards the mouth's corners a pixel lies (0 up to 70 %
    of the way from the middle to a corner, 1 from 90 %), from the inner lip contours."""
    c, ex, half = mouth_axis(upper, lower)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    u = np.abs((xs - c[0]) * ex[0] + (ys - c[1]) * ex[1]) / max(half, 1.0)
    return smoothstep(u, 0.7, 0.9).astype(np.float32)


def _paint(
    region: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    opening: np.ndarray,
    seam: np.ndarray | None,
    style,
    iod: float,
):
    """Paint the mouth interior on a uint8 region, touching only the mouth's own box."""
    pts = np.concatenate([upper, lower])
    h, w = region.shape[:2]
    pad = 8 + int(0.03 * iod)
    x0, y0 = np.maximum(np.floor(pts.min(0)).astype(int) - pad, 0)
    x1, y1 = np.minimum(np.ceil(pts.max(0)).astype(int) + pad, [w, h])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return
    sub = region[y0:y1, x0:x1].astype(np.float32)
    off = np.array([x0, y0])
    paint_mouth(
        sub, upper - off, lower - off, opening[y0:y1, x0:x1], style, iod, None if seam is None else seam[y0:y1, x0:x1]
    )
    region[y0:y1, x0:x1] = np.clip(sub + 0.5, 0, 255).astype(np.uint8)
