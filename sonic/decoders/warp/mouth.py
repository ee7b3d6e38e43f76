"""The mouth interior: what shows between the lips when they part further than the photo shows.

Painted in the mouth's own frame (u along the corner-to-corner axis, -1..1; v across it, px), so
a tilted face gets a tilted mouth. Layers, back to front: a soft dark cavity (never black, never
one flat colour), the tongue on wide openings, lower incisors on wide openings, and the upper
teeth as a light band right under the upper lip: individual teeth on a dental arch (narrower and
darker towards the corners), rounded incisal edges with small gaps, the lip's shadow on them.
Colours come from the photo's own light: teeth from the brightest skin, desaturated below the
skin's saturation (grey in a grey photo); cavity and tongue from the lips. Edges are feathered
and the chroma around the opening is softened, so the encoder's 4:2:0 subsampling leaves no
coloured fringe on the lips.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ...landmarks import FACE_OVAL_IDX, INNER_LOWER, INNER_UPPER, OUTER_LOWER, OUTER_UPPER
from ...motion import smoothstep

TEETH_MAX_IOD = 0.07  # visible height of the upper teeth at most
ARCH_RADIUS_IOD = 0.3  # radius of the front of the dental arch
TOOTH_WIDTHS_IOD = (0.092, 0.072, 0.08, 0.072, 0.072)  # central, lateral, canine, two premolars
TEETH_FROM_GAP_IOD = (0.018, 0.045)  # the teeth fade in as the opening grows through this range
TONGUE_FROM_GAP_IOD = (0.07, 0.16)
LOWER_TEETH_FROM_GAP_IOD = (0.1, 0.17)
CAVITY_MIN_LUMA = 26.0  # the cavity is never darker than this (never black) ...
CAVITY_MIN_OF_SKIN = 0.4  # ... unless the skin itself is dark (an underexposed photo): this share of its luma
TEETH_MIN_LUMA = 70.0  # teeth at least this bright (dull highlights) ...
TEETH_MIN_OF_HIGHLIGHTS = 1.1  # ... unless the highlights are darker still: this much above them
SOFTNESS_PER_UPSCALE = 0.3  # px of blur on the painted interior per x the face is enlarged beyond 1x
SEAM_SHADE_IOD = 0.04  # closed lips painted over the photo's teeth take the light of what is around them this far ...
# ... relative to the mean light over them, within this range: never brighter than the lips'
# colour (the skin beyond the corners is often brighter than the lips)
SEAM_SHADE_RANGE = (0.35, 1.0)


@dataclass(frozen=True)
class MouthStyle:
    lip: np.ndarray  # RGB float32, median colour of the lips
    upper_lip: np.ndarray  # ... of the upper lip's body
    lower_lip: np.ndarray
    cavity: np.ndarray  # RGB float, the back of the mouth
    tongue: np.ndarray  # RGB float
    teeth: np.ndarray  # RGB float, lit teeth
    paint_teeth: bool  # false when the photo shows its own teeth
    softness: float = 0.0  # px of blur that the enlarged photo has and a crisp painting would lack


def luma(rgb: np.ndarray) -> np.ndarray:
    """Rec. 601 luma of RGB values (..., 3), float32 for float32 values (float64 otherwise)."""
    return rgb @ np.array([0.299, 0.587, 0.114], np.float32 if rgb.dtype == np.float32 else np.float64)


def tinted(colour: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """An RGB colour (3,) times a plane (H, W) -> (H, W, 3), built one channel at a time.
    Numpy's broadcasting of (H, W, 1) against a colour's three channels runs its inner loop
    over three values at a time: on a mouth's small regions 15-20x slower than this."""
    return cv2.merge([plane * c for c in colour.astype(plane.dtype)])


def three(plane: np.ndarray) -> np.ndarray:
    """A plane (H, W) as three equal channels (H, W, 3), to weigh colours by (see `tinted`)."""
    return cv2.merge([plane, plane, plane])


def mouth_style(frame: np.ndarray, lm: np.ndarray, paint_teeth: bool, upscale: float = 1.0) -> MouthStyle:
    """Colours of a face's mouth interior from its photo (H, W, 3) uint8 and landmarks in px, and
    its softness from how far the photo is enlarged (`upscale`, frame px per photo px)."""
    h, w = frame.shape[:2]

    def colours(idx):
        p = np.round(lm[idx, :2]).astype(int)
        return frame[np.clip(p[:, 1], 0, h - 1), np.clip(p[:, 0], 0, w - 1)].astype(np.float64)

    lip = np.median(colours(OUTER_UPPER[2:-2] + OUTER_LOWER[2:-2]), axis=0)

    def lip_body(outer, inner):  # halfway between the outer and the inner contour
        p = np.round((lm[outer[2:-2], :2] + lm[inner[2:-2], :2]) / 2).astype(int)
        return np.median(frame[np.clip(p[:, 1], 0, h - 1), np.clip(p[:, 0], 0, w - 1)].astype(np.float64), axis=0)

    upper_lip, lower_lip = lip_body(OUTER_UPPER, INNER_UPPER), lip_body(OUTER_LOWER, INNER_LOWER)
    # skin: the face inside its oval, away from eyes and mouth (cheeks, forehead, nose)
    oval = np.zeros((h, w), np.uint8)
    cv2.fillPoly(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar colour
        oval, [np.round(lm[FACE_OVAL_IDX, :2]).astype(np.int32)], 1
    )
    skin_px = frame[oval > 0].astype(np.float64)
    if len(skin_px) < 10:
        skin_px = colours([10, 151, 50, 280, 205, 425])
    skin_luma = luma(skin_px)
    skin = np.median(skin_px, axis=0)
    bright = float(np.percentile(skin_luma, 92))
    # teeth: about as bright as the skin's highlights, far less saturated than the skin
    tint = skin / max(skin.mean(), 1.0)
    # the floors follow the photo's exposure: fixed, they made the teeth glow and the cavity
    # lighter than the lips in a dark photo
    teeth_floor = min(TEETH_MIN_LUMA, TEETH_MIN_OF_HIGHLIGHTS * bright)
    teeth = np.clip(0.95 * bright + 12 * min(1.0, bright / 128), teeth_floor, 232) * (0.7 + 0.3 * tint)
    cavity = lip * 0.3
    cavity_floor = min(CAVITY_MIN_LUMA, CAVITY_MIN_OF_SKIN * float(np.median(skin_luma)))
    cavity *= max(1.0, cavity_floor / max(float(luma(cavity)), 1.0))
    tongue = lip * 0.62 + np.array([12.0, 4.0, 4.0]) * (tint.std() > 0.02)
    # float32, as the frames' arrays: a float64 colour made each painted (H, W, 3) array float64
    return MouthStyle(
        lip=lip.astype(np.float32),
        upper_lip=upper_lip.astype(np.float32),
        lower_lip=lower_lip.astype(np.float32),
        cavity=cavity.astype(np.float32),
        tongue=tongue.astype(np.float32),
        teeth=np.clip(teeth, 0, 255).astype(np.float32),
        paint_teeth=paint_teeth,
        softness=SOFTNESS_PER_UPSCALE * max(0.0, upscale - 1.0),
    )


def _tooth_boundaries(iod: float) -> np.ndarray:
    """Projected distances (px) of the gaps between teeth from the midline, on a circular arch."""
    r = ARCH_RADIUS_IOD * iod
    s = np.cumsum(TOOTH_WIDTHS_IOD) * iod
    return r * np.sin(np.clip(s / r, 0, np.pi / 2))


def mouth_axis(upper: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """The mouth's corner-to-corner axis from inner lip contours (N, 2), corner to corner: its
    centre, the unit vector from the first corner to the last, and half its length (px)."""
    left, right = (upper[0] + lower[0]) / 2, (upper[-1] + lower[-1]) / 2
    span = float(np.linalg.norm(right - left))
    return (left + right) / 2, (right - left) / max(span, 1e-6), span / 2


def paint_mouth(
    region: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    opening: np.ndarray,
    style: MouthStyle,
    iod: float,
    seam: np.ndarray | None = None,
) -> None:
    """Paint the interior between the inner lips into region (H, W, 3) float32, in place.

    upper, lower: inner lip contours (N, 2) in region px, corner to corner, place the teeth and
    the cavity; `opening` (H, W), 0..1, is where the warp left a new opening (no lip, no interior
    of the photo there): the paint goes exactly there. `seam` (H, W), where closing lips still
    show the photo's teeth, is covered in the lips' colour.
    """
    if seam is not None and seam.max() > 0.01:
        _cover_seam(region, upper, lower, seam, style, iod)
    h, w = region.shape[:2]
    centre, ex, half = mouth_axis(upper, lower)
    if 2 * half < 4:
        return
    ey = np.array([-ex[1], ex[0]])
    pts = np.concatenate([upper, lower])
    pad = 4
    bx0, by0 = np.maximum(np.floor(pts.min(0)).astype(int) - pad, 0)
    bx1, by1 = np.minimum(np.ceil(pts.max(0)).astype(int) + pad + 1, [w, h])
    if bx1 - bx0 < 4 or by1 - by0 < 3:
        return
    ys, xs = np.mgrid[by0:by1, bx0:bx1].astype(np.float32)
    dx, dy = xs - centre[0], ys - centre[1]
    u = (dx * ex[0] + dy * ex[1]) / half  # -1 .. 1 corner to corner
    v = dx * ey[0] + dy * ey[1]  # px across the mouth, down for an upright face

    def along(c):
        q = c - centre
        cu, cv_ = q @ ex / half, q @ ey
        o = np.argsort(cu)
        return np.interp(u, cu[o], cv_[o]).astype(np.float32)  # the painting's sums run in float32

    vu, vl = along(upper), along(lower)
    gap = np.clip(vl - vu, 0, None)
    feather = max(0.7, 0.01 * iod)
    au = np.abs(u)
    # an enlarged photo is soft: the painting is as soft, or it sits on the face like a sticker
    alpha = cv2.GaussianBlur(opening[by0:by1, bx0:bx1].astype(np.float32), (0, 0), float(np.hypot(0.6, style.softness)))
    if alpha.max() <= 0.01:
        return
    gap_iod = gap / iod
    depth = v - vu  # px below the upper lip
    r = np.clip(depth / np.maximum(gap, 1.0), 0, 1)  # 0 at the upper lip, 1 at the lower lip
    x_iod = np.abs(u) * half / iod

    # cavity: dark, warmer and lighter where the tongue shows, darker into the cheeks (no darker
    # than at the corners where the opening's feathered edge reaches past them, |u| > 1)
    tongue = smoothstep(r, 0.5, 1.0) * smoothstep(gap_iod, *TONGUE_FROM_GAP_IOD)
    cav_light = (0.78 + 0.3 * (1 - np.minimum(au, 1.0) ** 2)) * (0.9 + 0.2 * r)
    paint = tinted(style.cavity, cav_light)
    paint += (tinted(style.tongue, 1 - 0.35 * au**2) - paint) * three(0.85 * tongue)

    if style.paint_teeth:
        # upper teeth on a dental arch: each tooth a convex, slightly rounded block
        bounds = _tooth_boundaries(iod)
        xpx = np.abs(u) * half
        k = np.searchsorted(bounds, xpx)  # tooth index from the midline
        lo_b = np.where(k > 0, bounds[np.clip(k - 1, 0, None)], -bounds[0])
        hi_b = bounds[np.clip(k, 0, len(bounds) - 1)]
        to_gap = np.minimum(np.abs(xpx - lo_b), np.abs(hi_b - xpx))  # px to the nearest gap
        across = np.clip((xpx - lo_b) / np.maximum(hi_b - lo_b, 1e-3), 0, 1)
        phi = np.arcsin(np.clip(x_iod / ARCH_RADIUS_IOD, 0, 1))
        show = smoothstep(gap_iod, *TEETH_FROM_GAP_IOD) * (k < len(bounds))
        t_h = np.minimum(TEETH_MAX_IOD * iod, 0.52 * gap) * np.sqrt(np.clip(np.cos(phi), 0, 1)) * show
        corner_round = np.clip(1 - to_gap / max(1.0, 0.014 * iod), 0, 1) ** 2
        edge = t_h * (1 - 0.22 * corner_round)
        # between the upper lip's line and the incisal edge: above the line (where the opening's
        # feathered edge reaches at the corners) the cavity's shadow shows, not teeth
        teeth_a = np.clip((vu + edge - v) / feather + 0.5, 0, 1) * np.clip(depth / feather + 0.5, 0, 1) * (t_h > 0.6)
        gaps = np.exp(-((to_gap / max(0.55, 0.0045 * iod)) ** 2)) * (k > 0) + np.exp(
            -((xpx / max(0.45, 0.0035 * iod)) ** 2)
        )  # the central gap is finer
        lit = (1 - 0.1 * (2 * across - 1) ** 2) * (1 - 0.5 * (phi / (np.pi / 2)) ** 1.5)
        lit *= np.where(k == 0, 1.0, np.where(k == 1, 0.95, 0.88))
        # the upper lip's shadow; above the lip line (the opening's feathered edge at the corners,
        # where depth < 0) it is no darker than at the line: unclamped, it went below black there
        lit *= 1 - 0.38 * np.exp(-np.maximum(depth, 0) / max(1.0, 0.012 * iod))
        lit *= 1 - 0.12 * smoothstep(depth / np.maximum(edge, 1.0), 0.7, 1.0)  # translucent edge
        lit *= 1 - 0.3 * np.clip(gaps, 0, 1)
        teeth = tinted(style.teeth, lit)
        # lower incisors: only on wide openings, dimmer, just above the lower lip
        tl = np.minimum(0.025 * iod, 0.12 * gap) * smoothstep(gap_iod, *LOWER_TEETH_FROM_GAP_IOD) * (x_iod < 0.14)
        lower_a = np.clip((v - (vl - tl)) / feather + 0.5, 0, 1) * (tl > 0.6)
        paint += (tinted(style.teeth, 0.72 * (1 - 0.25 * np.clip(gaps, 0, 1))) - paint) * three(lower_a)
        paint += (teeth - paint) * three(teeth_a)
    paint = cv2.GaussianBlur(paint.astype(np.float32), (0, 0), float(np.hypot(max(0.35, 0.0025 * iod), style.softness)))
    sub = region[by0:by1, bx0:bx1]
    sub += (paint - sub) * three(alpha)
    _soften_chroma(sub, alpha, iod)


def _cover_seam(
    region: np.ndarray, upper: np.ndarray, lower: np.ndarray, seam: np.ndarray, style: MouthStyle, iod: float
) -> None:
    """Closed lips over what the photo showed between them: upper-lip colour, the darker line
    where the lips meet, lower-lip colour."""
    rows, cols = np.flatnonzero(seam.max(1) > 0.01), np.flatnonzero(seam.max(0) > 0.01)
    if not len(rows):
        return
    pad = 2 + int(0.02 * iod)
    y0, y1 = max(0, rows[0] - pad), min(seam.shape[0], rows[-1] + pad + 1)
    x0, x1 = max(0, cols[0] - pad), min(seam.shape[1], cols[-1] + pad + 1)
    region, seam = region[y0:y1, x0:x1], seam[y0:y1, x0:x1]
    upper, lower = upper - [x0, y0], lower - [x0, y0]
    line = (upper + lower) / 2
    o = np.argsort(line[:, 0])
    # where the lips meet is a height per column; everything below is float32, as region is
    meet = np.interp(np.arange(x1 - x0), line[o, 0], line[o, 1]).astype(np.float32)
    d = np.arange(y1 - y0, dtype=np.float32)[:, None] - meet
    below = smoothstep(d, -0.01 * iod, 0.01 * iod)
    a = cv2.GaussianBlur(np.clip(seam * 1.5, 0, 1).astype(np.float32), (0, 0), max(0.8, 0.008 * iod))
    # the light on it: darker where the lips meet, and the light around them (one channel, then
    # the colour's three)
    light = (1 - 0.2 * np.exp(-((d / max(0.8, 0.006 * iod)) ** 2))) * _shading(region, a, iod)
    lips = zip(style.upper_lip, style.lower_lip, strict=True)  # (float32, as the region)
    colour = cv2.merge([(top + (bottom - top) * below) * light for top, bottom in lips])
    region += (colour - region) * three(a)


def _shading(region: np.ndarray, seam: np.ndarray, iod: float) -> np.ndarray:
    """(H, W) the light falling on the seam (0..1), relative to its mean there: the brightness
    of the lips and skin around each point, the seam itself left out. On a side-lit face the lips'
    one colour, painted into the shadowed corner, was a bright streak running into the cheek;
    evenly lit lips give 1 everywhere."""
    keep = (1 - np.clip(seam, 0, 1)).astype(np.float32)
    sigma = max(1.5, SEAM_SHADE_IOD * iod)
    around = cv2.GaussianBlur((luma(region) * keep).astype(np.float32), (0, 0), sigma)
    lit = around / np.maximum(cv2.GaussianBlur(keep, (0, 0), sigma), 1e-3)
    mean = float((lit * seam).sum() / max(float(seam.sum()), 1e-6))
    return np.clip(lit / max(mean, 1.0), *SEAM_SHADE_RANGE)


def _soften_chroma(sub: np.ndarray, alpha: np.ndarray, iod: float) -> None:
    """Blur colour (not brightness) in a band around the opening, in place: sharp colour steps
    there turn into green or purple fringes after the encoder's 4:2:0 chroma subsampling."""
    band = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), max(1.5, 0.015 * iod))
    band = np.clip(band * 3, 0, 1)
    ycc: np.ndarray = cv2.cvtColor(np.clip(sub, 0, 255).astype(np.float32), cv2.COLOR_RGB2YCrCb)  # cv2 is typed loosely
    soft = cv2.GaussianBlur(ycc, (0, 0), max(1.0, 0.008 * iod))
    # (channel by channel: see `tinted`)
    y, cr, cb = cv2.split(ycc)
    _, soft_cr, soft_cb = cv2.split(soft)
    cr += (soft_cr - cr) * band
    cb += (soft_cb - cb) * band
    # a dark pixel given a saturated neighbour's colour (the cavity beside a deep-red lip) can
    # leave the RGB cube; clipping its channels turned it into a near-black stroke. Its colour is
    # shortened instead, towards its own grey: brightness and hue stay.
    grey = three(y)
    c = cv2.cvtColor(cv2.merge([y, cr, cb]), cv2.COLOR_YCrCb2RGB) - grey
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(c < 0, grey / -c, np.where(c > 0, (255 - grey) / c, np.inf))
    least = np.minimum(np.minimum(room[..., 0], room[..., 1]), room[..., 2])  # (not a reduction over 3 values)
    sub[:] = grey + c * three(np.clip(least, 0, 1))
