"""Video decoder: dense backward warp of the portrait driven by the motion, plus the mouth interior.

Setup (once per portrait): each rig coefficient's landmark offsets are spread into a dense
displacement field with a thin-plate spline anchored on the border of the head region, so a
frame's field is a weighted sum of K fields. Per batch of frames: the head moves rigidly inside a
soft head mask, the face deforms by the field (backward map solved by fixed-point iteration), one
`grid_sample` renders the region, and where the lips part further than the photo shows, a mouth
interior (cavity, upper teeth band under the lip, soft edges) is painted in.
Everything outside the head region is the untouched source frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .landmarks import FACE_OVAL_IDX, INNER_LOWER, INNER_UPPER, N_MESH, OUTER_LOWER, OUTER_UPPER
from .motion import Rig

ANCHOR_STEP_PX = 24       # spacing of the fixed anchors on the region border
FIELD_STEP = 4            # px between exact evaluations of the spline
TPS_REG = 1e-2            # thin-plate spline regularisation (px^2)
HEAD_MARGIN_IOD = 0.12    # the head mask reaches this far beyond the face oval: hair and background stay
REGION_MARGIN_IOD = 0.9   # warped region = head mask's reach plus this
STILL_RINGS_IOD = (0.3, 0.6)  # fixed control points this far outside the face oval
BACKWARD_ITERS = 2        # fixed-point iterations inverting the forward displacement
TEETH_MAX_IOD = 0.075     # height of the visible upper teeth at most
TEETH_RGB = np.array([246.0, 240.0, 226.0])


@dataclass(frozen=True)
class MouthStyle:
    cavity: np.ndarray       # RGB float of the mouth interior
    teeth: np.ndarray        # RGB float of the teeth
    paint_teeth: bool        # false when the photo shows its own teeth


def _tps_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d2 = torch.cdist(a, b).pow(2)
    return d2 * torch.log(d2 + 1e-9) * 0.5


def tps_fields(ctrl: np.ndarray, values: np.ndarray, hw: tuple[int, int], device) -> torch.Tensor:
    """Thin-plate spline through ctrl (N, 2) with values (N, C); evaluated on an hw grid -> (C, H, W).

    Coordinates are normalised to the region's size and the spline is evaluated in float64: the
    kernel terms are large and cancel, and float32 leaves pixel-sized noise in the field.
    """
    h, wd = hw
    scale = float(max(h, wd))
    c = torch.as_tensor(ctrl, dtype=torch.float64) / scale
    n = len(c)
    K = _tps_kernel(c, c) + TPS_REG / scale ** 2 * torch.eye(n, dtype=torch.float64)
    P = torch.cat([torch.ones(n, 1, dtype=torch.float64), c], 1)
    A = torch.zeros(n + 3, n + 3, dtype=torch.float64)
    A[:n, :n], A[:n, n:], A[n:, :n] = K, P, P.T
    rhs = torch.zeros(n + 3, values.shape[1], dtype=torch.float64)
    rhs[:n] = torch.as_tensor(values, dtype=torch.float64)
    w = torch.linalg.solve(A, rhs)
    # the fields are smooth: evaluate on a grid FIELD_STEP px apart, then interpolate
    hc, wc = (h - 1) // FIELD_STEP + 2, (wd - 1) // FIELD_STEP + 2
    ys, xs = torch.meshgrid(torch.linspace(0, h - 1, hc, dtype=torch.float64),
                            torch.linspace(0, wd - 1, wc, dtype=torch.float64), indexing="ij")
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1) / scale
    out = torch.empty(hc * wc, values.shape[1], dtype=torch.float64)
    step = 8192
    for i in range(0, hc * wc, step):
        g = grid[i:i + step]
        out[i:i + step] = _tps_kernel(g, c) @ w[:n] + w[n] + g @ w[n + 1:]
    coarse = out.T.reshape(1, values.shape[1], hc, wc).float()
    return F.interpolate(coarse, size=(h, wd), mode="bilinear", align_corners=True)[0].to(device)


def _poly_mask(pts: np.ndarray, hw, blur_px: float) -> np.ndarray:
    m = np.zeros(hw, np.float32)
    cv2.fillPoly(m, [np.round(pts * 4).astype(np.int32)], 1.0, lineType=cv2.LINE_AA, shift=2)
    if blur_px > 0:
        m = cv2.GaussianBlur(m, (0, 0), blur_px)
    return m


class WarpDecoder:
    """Renders frames of one portrait; build once per request, call per batch of frames."""

    def __init__(self, source: np.ndarray, landmarks: np.ndarray, rig: Rig, device: torch.device):
        self.source, self.rig, self.device = source, rig, device
        lm = landmarks[:N_MESH, :2]
        self.lm = lm
        h, w = source.shape[:2]
        iod = rig.iod
        oval = lm[FACE_OVAL_IDX]
        # head mask: the face oval pushed outwards a little; the warped region reaches further
        centre = oval.mean(0)
        radial = (oval - centre) / (np.linalg.norm(oval - centre, axis=1, keepdims=True) + 1e-6)
        grown = oval + HEAD_MARGIN_IOD * iod * radial
        reach = REGION_MARGIN_IOD * iod
        x0 = int(max(0, np.floor(grown[:, 0].min() - reach))); x1 = int(min(w, np.ceil(grown[:, 0].max() + reach)))
        y0 = int(max(0, np.floor(grown[:, 1].min() - reach))); y1 = int(min(h, np.ceil(grown[:, 1].max() + reach)))
        self.box = (x0, y0, x1, y1)
        rh, rw = y1 - y0, x1 - x0
        off = np.array([x0, y0], np.float64)
        self.off = off
        head = _poly_mask(grown - off, (rh, rw), 0.12 * iod)
        self.head_mask = torch.from_numpy(head)[None, None].to(device)
        self.head_at_mouth = float(head[int(np.clip(lm[13, 1] - y0, 0, rh - 1)), int(np.clip(lm[13, 0] - x0, 0, rw - 1))])

        # dense fields of each coefficient; anchors on the region border stay still
        # (where the region touches the frame edge, the border is the frame edge: also still).
        # The lips part along a line, where the motion is discontinuous: one field set is fitted
        # without the upper lip (valid below the line), one without the lower lip (valid above).
        per = max(8, int(2 * (rw + rh) / ANCHOR_STEP_PX))
        t = np.linspace(0, 1, per // 4 + 1)[:-1]
        border = np.concatenate([np.stack([t * (rw - 1), 0 * t], 1), np.stack([(rw - 1) + 0 * t, t * (rh - 1)], 1),
                                 np.stack([(1 - t) * (rw - 1), (rh - 1) + 0 * t], 1), np.stack([0 * t, (1 - t) * (rh - 1)], 1)])
        # still rings just outside the face oval confine the expression to the face: the neck,
        # collar and background stay where they are when the jaw drops
        rings = np.concatenate([oval + r * iod * radial for r in STILL_RINGS_IOD])
        border = np.concatenate([border, rings - off])
        k = rig.basis.shape[0]
        fields = []
        # the parting line itself moves with the inner lip of each side, so teeth in the photo
        # ride with their lip instead of being stretched across the opening
        for drop, inner in ((rig.lower_lip, INNER_UPPER), (rig.upper_lip, INNER_LOWER)):
            keep_idx = np.setdiff1d(np.arange(N_MESH), drop)
            ctrl = np.concatenate([lm[keep_idx], rig.lip_line[1:-1]]) - off
            moving = np.concatenate([rig.basis[:, keep_idx, :], rig.basis[:, inner[1:-1], :]], 1)
            ctrl = np.concatenate([ctrl, border])
            vals = np.zeros((len(ctrl), 2 * k))
            vals[:moving.shape[1]] = moving.transpose(1, 0, 2).reshape(moving.shape[1], 2 * k)
            fields.append(tps_fields(ctrl, vals, (rh, rw), device).reshape(k, 2, rh, rw))
        # and beyond the outer ring the field is exactly zero, so those pixels are copied untouched
        reach_mask = _poly_mask(oval + STILL_RINGS_IOD[0] * 1.5 * iod * radial - off, (rh, rw), 0.1 * iod)
        reach_mask = torch.from_numpy(reach_mask)[None, None].to(device)
        self.fields_upper, self.fields_lower = (f * reach_mask for f in fields)
        # parting line y(x) and its softness: sharp across the mouth, soft beyond the corners
        line = rig.lip_line - off
        xs_r = np.arange(rw, dtype=np.float64)
        self.line_y = torch.as_tensor(np.interp(xs_r, line[:, 0], line[:, 1]), dtype=torch.float32, device=device)
        beyond = np.clip(np.maximum(line[0, 0] - xs_r, xs_r - line[-1, 0]), 0, None)
        self.line_soft = torch.as_tensor(0.6 + 0.6 * beyond, dtype=torch.float32, device=device)
        ys, xs = torch.meshgrid(torch.arange(rh, dtype=torch.float32), torch.arange(rw, dtype=torch.float32),
                                indexing="ij")
        self.coords = torch.stack([xs, ys])[None].to(device)              # (1, 2, H, W) region px
        src = source[y0:y1, x0:x1].astype(np.float32)
        self.src = torch.from_numpy(src).permute(2, 0, 1)[None].to(device)
        inner = np.concatenate([lm[INNER_UPPER], lm[INNER_LOWER][::-1]]) - off
        # the photo's own mouth interior is kept where the lips part over it; a closed mouth
        # (a thin slit) has none worth keeping
        shows = float(np.clip((rig.rest_gap / iod - 0.02) / 0.03, 0, 1))
        self.src_interior = torch.from_numpy(shows * _poly_mask(inner, (rh, rw), 0.6))[None, None].to(device)
        self.style = self._mouth_style(source, lm, paint_teeth=shows < 0.5)

    @staticmethod
    def _mouth_style(source: np.ndarray, lm: np.ndarray, paint_teeth: bool) -> MouthStyle:
        def colour(idx):
            p = np.round(lm[idx]).astype(int)
            p[:, 0] = np.clip(p[:, 0], 0, source.shape[1] - 1)
            p[:, 1] = np.clip(p[:, 1], 0, source.shape[0] - 1)
            return np.median(source[p[:, 1], p[:, 0]].astype(np.float64), axis=0)
        lip = colour(OUTER_UPPER[2:-2] + OUTER_LOWER[2:-2])
        skin = colour([10, 151, 50, 280, 205, 425])
        light = np.clip(skin.mean() / 150.0, 0.6, 1.0)
        cavity = lip * 0.3 + np.array([14.0, 5.0, 5.0])
        return MouthStyle(cavity=cavity, teeth=np.clip(TEETH_RGB * light, 0, 255), paint_teeth=paint_teeth)

    def _sample(self, img: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
        """grid_sample with region-pixel coordinates pts (B, 2, H, W)."""
        rh, rw = img.shape[-2:]
        g = torch.stack([pts[:, 0] / (rw - 1) * 2 - 1, pts[:, 1] / (rh - 1) * 2 - 1], -1)
        return F.grid_sample(img, g, mode="bilinear", padding_mode="border", align_corners=True)

    def head_inverse(self, head: torch.Tensor) -> torch.Tensor:
        """Source positions of each region pixel under the rigid head motion, (B, 2, H, W)."""
        roll, tx, ty, sc = head[:, 0], head[:, 1], head[:, 2], 1 + head[:, 3]
        p = torch.as_tensor(self.rig.centre - self.off, dtype=torch.float32, device=self.device)
        d = self.coords - p[None, :, None, None] - torch.stack([tx, ty], 1)[:, :, None, None]
        c, s = torch.cos(roll)[:, None, None], torch.sin(roll)[:, None, None]
        x = (c * d[:, 0] + s * d[:, 1]) / sc[:, None, None]
        y = (-s * d[:, 0] + c * d[:, 1]) / sc[:, None, None]
        inv = torch.stack([x, y], 1) + p[None, :, None, None]
        return self.coords + self.head_mask * (inv - self.coords)

    def _invert(self, field: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Solve s + field(s) = x by fixed-point iteration (the field is smooth: it converges)."""
        s = x - self._sample(field, x)
        for _ in range(BACKWARD_ITERS - 1):
            s = x - self._sample(field, s)
        return s

    def _below(self, p: torch.Tensor) -> torch.Tensor:
        """Soft 0..1: source positions p (B, 2, H, W) lie below the lips' parting line."""
        x = p[:, 0].clamp(0, len(self.line_y) - 1)
        i0 = x.floor().long().clamp(max=len(self.line_y) - 2)
        f = x - i0
        y = self.line_y[i0] * (1 - f) + self.line_y[i0 + 1] * f
        soft = self.line_soft[i0] * (1 - f) + self.line_soft[i0 + 1] * f
        return torch.sigmoid((p[:, 1] - y) / soft)[:, None]

    def mouth_polygon(self, offsets: np.ndarray, head: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner upper / lower lip of one frame in region px after expression and head motion."""
        pts = self.lm + offsets[:N_MESH]
        roll, tx, ty, sc = head
        p = self.rig.centre
        c, s = np.cos(roll), np.sin(roll)
        moved = (pts - p) @ np.array([[c, s], [-s, c]]) * (1 + sc) + p + np.array([tx, ty])
        pts = pts + self.head_at_mouth * (moved - pts) - self.off
        return pts[INNER_UPPER], pts[INNER_LOWER]

    @torch.no_grad()
    def render(self, coeffs: np.ndarray, head: np.ndarray) -> np.ndarray:
        """coeffs (B, K), head (B, 4) -> frames (B, H, W, 3) uint8 at the source's size."""
        b = len(coeffs)
        c = torch.as_tensor(coeffs, dtype=torch.float32, device=self.device)
        hd = torch.as_tensor(head, dtype=torch.float32, device=self.device)
        xh = self.head_inverse(hd)
        s_up = self._invert(torch.einsum("bk,kchw->bchw", c, self.fields_upper), xh)
        s_lo = self._invert(torch.einsum("bk,kchw->bchw", c, self.fields_lower), xh)
        # each candidate is valid only if it lands on its own side of the parting line
        a_lo, a_up = self._below(s_lo), 1 - self._below(s_up)
        total = a_lo + a_up
        # where both sides reach (lips closing over the photo's teeth), lips cover the interior
        interior = self.src_interior.expand(b, -1, -1, -1)
        w_lo = a_lo * (1 - 0.95 * self._sample(interior, s_lo))
        w_up = a_up * (1 - 0.95 * self._sample(interior, s_up))
        w_total = w_lo + w_up
        a = torch.where(w_total > 0.05, w_lo / (w_total + 1e-6),
                        torch.where(total > 0.05, a_lo / (total + 1e-6), torch.full_like(total, 0.5)))
        s = a * s_lo + (1 - a) * s_up
        img = self._sample(self.src.expand(b, -1, -1, -1), s)
        # the photo's own interior is kept where it was sampled, never in the new opening
        keep = self._sample(interior, s) * total.clamp(0, 1)
        region = img.permute(0, 2, 3, 1).cpu().numpy()
        keep = keep[:, 0].cpu().numpy()
        offsets = self.rig.offsets(coeffs)
        out = np.repeat(self.source[None], b, axis=0)
        x0, y0, x1, y1 = self.box
        for i in range(b):
            up, lo = self.mouth_polygon(offsets[i], head[i])
            paint_mouth(region[i], up, lo, keep[i], self.style, self.rig.iod)
            out[i, y0:y1, x0:x1] = np.clip(region[i] + 0.5, 0, 255).astype(np.uint8)
        return out


def paint_mouth(region: np.ndarray, upper: np.ndarray, lower: np.ndarray, keep: np.ndarray,
                style: MouthStyle, iod: float) -> None:
    """Paint the mouth interior between the inner lips into region (H, W, 3) float, in place.

    Where the warped photo already shows its own mouth interior (`keep` near 1), the photo wins.
    """
    h, w = region.shape[:2]
    xs_all = np.concatenate([upper[:, 0], lower[:, 0]])
    ys_all = np.concatenate([upper[:, 1], lower[:, 1]])
    pad = 3
    bx0, bx1 = int(max(0, xs_all.min() - pad)), int(min(w, xs_all.max() + pad + 1))
    by0, by1 = int(max(0, ys_all.min() - pad)), int(min(h, ys_all.max() + pad + 1))
    if bx1 - bx0 < 3 or by1 - by0 < 2:
        return
    xs = np.arange(bx0, bx1, dtype=np.float64)
    ys = np.arange(by0, by1, dtype=np.float64)[:, None]
    ou, ol = np.argsort(upper[:, 0]), np.argsort(lower[:, 0])
    yu = np.interp(xs, upper[ou, 0], upper[ou, 1])[None, :]
    yl = np.interp(xs, lower[ol, 0], lower[ol, 1])[None, :]
    left, right = xs_all.min(), xs_all.max()
    inside_x = ((xs > left) & (xs < right))[None, :]
    gap = np.clip(yl - yu, 0, None)
    feather = max(0.6, 0.012 * iod)
    alpha = np.clip(np.minimum(ys - yu, yl - ys) / feather + 0.5, 0, 1) * inside_x
    alpha *= np.clip((gap - 1.0) / (2 * feather), 0, 1)  # slits stay lip-coloured, not dark lines
    if alpha.max() <= 0:
        return
    cx, half = (left + right) / 2, max((right - left) / 2, 1.0)
    hx = np.clip(np.abs(xs - cx) / half, 0, 1)[None, :]
    alpha *= 1 - 0.6 * hx ** 4                            # corners: shadowed lip, not black holes
    shade = (1 - 0.45 * hx ** 2)[..., None]
    # cavity: darkest in the middle of the opening, warmer towards the lower lip (tongue)
    mid = np.clip((ys - yu) / np.maximum(gap, 1.0), 0, 1)
    tongue = np.clip((mid - 0.55) / 0.45, 0, 1)[..., None] * np.clip(gap / (0.1 * iod), 0, 1)[..., None]
    cav = style.cavity * (0.85 + 0.25 * (1 - hx ** 2))[..., None]
    paint = cav * (1 - 0.5 * tongue) + 0.5 * tongue * (style.cavity * 2.2)
    # upper teeth: a light band right under the upper lip, shaded towards its lower edge and
    # towards the corners; lower teeth only show, dimmer, when the mouth is wide open
    th = np.minimum(0.6 * gap, TEETH_MAX_IOD * iod) * (hx < 0.88) * style.paint_teeth
    teeth = np.clip((yu + th - ys) / feather + 0.5, 0, 1) * (th > 0.5)
    depth = np.clip((ys - yu) / np.maximum(th, 1.0), 0, 1)[..., None]
    tl = np.where(gap > 0.12 * iod, np.minimum(0.12 * gap, 0.025 * iod), 0.0) * (hx < 0.65) * style.paint_teeth
    lower_teeth = np.clip((ys - (yl - tl)) / feather + 0.5, 0, 1) * (tl > 0.5) * 0.55
    # incisors: faint gaps between teeth, the central pair widest; a soft shadow under the lip
    tooth_w = 0.085 * iod
    phase = np.abs(xs - cx)[None, :] / tooth_w
    gaps = np.clip(1 - np.abs(phase - np.round(phase)) * tooth_w / max(0.6, 0.01 * iod), 0, 1) * (phase > 0.5)
    lip_shadow = np.clip(1 - (ys - yu) / max(1.0, 0.018 * iod), 0, 1)
    tone = (1 - 0.15 * depth) * (1 - 0.22 * gaps[..., None]) * (1 - 0.35 * lip_shadow[..., None])
    paint = paint * (1 - teeth[..., None]) + (style.teeth * shade * tone) * teeth[..., None]
    paint = paint * (1 - lower_teeth[..., None]) + (style.teeth * shade * 0.8) * lower_teeth[..., None]
    paint = cv2.GaussianBlur(paint.astype(np.float32), (0, 0), max(0.4, 0.003 * iod))
    a = (alpha * (1 - keep[by0:by1, bx0:bx1]))[..., None]
    sub = region[by0:by1, bx0:bx1]
    sub *= 1 - a
    sub += a * paint
