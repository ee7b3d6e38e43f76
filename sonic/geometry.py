"""Framing: where the output frame sits in the photo, and the pixels the decoder samples from.

The output frame is the crop box scaled by one uniform factor. The photo is resampled once, at
setup, to SUPERSAMPLE source pixels per frame pixel (bicubic when enlarging, area-averaged when
reducing); every frame pixel, at rest or moved, is then one bilinear lookup into that source. A
bilinear lookup into a 3x source keeps 95-99 % of the detail (variance of the Laplacian) of a
bicubic lookup into the photo at a fifth of its cost, and a face is never upscaled and then
warped again. The frame at rest is made by the same lookup, so zero motion is exactly the frame.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from .face import fit_output, roll_degrees
from .media import ENOUGH_OF_WORKING, WORKING_PIXELS

SUPERSAMPLE = 3  # sampling-source px per frame px
MARGIN_PX = 6  # frame px of photo kept around the crop (sampling reaches past the edge)
UPSCALE_WARN = 1.25  # a face enlarged more than this from the photo is reported in warnings
SIDEWAYS_WARN_DEG = 50  # a face turned further than this in the photo is reported (a sideways photo)
CUT_OFF_SHARE = 0.05  # a face with more of its landmarks beyond an edge of the photo is reported cut off
UPRIGHT_ROLL_DEG = 45  # a face turned further is rendered in a quarter turn of its frame where it is upright


@dataclass(frozen=True)
class Framing:
    frame: np.ndarray  # (H, W, 3) uint8, the output frame at rest
    landmarks: np.ndarray  # (478, 3) in frame px (z scaled alike)
    pixels: np.ndarray  # (h, w, 3) uint8, the photo resampled once: what the decoder samples
    to_source: tuple[float, float, float, float]  # ax, bx, ay, by: pixels px = a * frame px + b
    upscale: float  # frame px per photo px: above 1 the face is enlarged
    other_faces: int = 0  # faces in the photo beside the one framed (they stay still)
    photo_pixels: int = 0  # the photo's, as decoded (one over WORKING_PIXELS is reduced to it)

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) frame px: the span the photo's pixels cover (MARGIN_PX past the frame
        where the photo goes on; a frame cut at the photo's edge ends with it). Beyond it a
        lookup repeats the edge."""
        ax, bx, ay, by = self.to_source
        h, w = self.pixels.shape[:2]
        return -bx / ax, -by / ay, (w - 1 - bx) / ax, (h - 1 - by) / ay

    def sample(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The photo at frame positions (x, y) (float32 arrays) -> uint8 (..., 3)."""
        return _sample(self.pixels, self.to_source, x, y)


def _sample(pixels: np.ndarray, to_source, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One bilinear lookup per frame position; `to_source` maps frame px to `pixels` px."""
    ax, bx, ay, by = (np.float32(v) for v in to_source)
    return cv2.remap(
        pixels,
        (ax * x + bx).astype(np.float32, copy=False),
        (ay * y + by).astype(np.float32, copy=False),
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )


def crop_and_scale(
    rgb: np.ndarray, landmarks: np.ndarray, box: tuple[int, int, int, int], min_resolution: int
) -> Framing:
    """Cut the crop box (x0, y0, x1, y1, photo px) out of the photo with one uniform scale, the
    short side of the frame near min_resolution (see `face.fit_output`)."""
    h, w = rgb.shape[:2]
    (x0, y0, x1, y1), (width, height) = fit_output(box, (h, w), min_resolution)
    s = width / (x1 - x0)
    m = MARGIN_PX / s
    cx0, cy0 = int(max(0, np.floor(x0 - m))), int(max(0, np.floor(y0 - m)))
    cx1, cy1 = int(min(w, np.ceil(x1 + m))), int(min(h, np.ceil(y1 + m)))
    crop = rgb[cy0:cy1, cx0:cx1]
    k = SUPERSAMPLE * s
    size = (max(1, int(round(crop.shape[1] * k))), max(1, int(round(crop.shape[0] * k))))
    pixels = cv2.resize(crop, size, interpolation=cv2.INTER_CUBIC if k >= 1 else cv2.INTER_AREA)
    kx, ky = size[0] / crop.shape[1], size[1] / crop.shape[0]
    # frame px x -> photo px x / s + x0 -> resized px (cv2.resize's pixel-centre convention)
    to_source = (kx / s, (x0 - cx0 + 0.5) * kx - 0.5, ky / s, (y0 - cy0 + 0.5) * ky - 0.5)
    lm = landmarks.astype(np.float64).copy()
    lm[:, :2] = lm[:, :2] * s - np.array([x0 * s, y0 * s])
    lm[:, 2] *= s
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return Framing(_sample(pixels, to_source, xs, ys), lm, pixels, to_source, s, photo_pixels=h * w)


def resample(framing: Framing, field: np.ndarray, box: tuple[int, int, int, int], landmarks: np.ndarray) -> Framing:
    """The framing with its photo moved once: `field` (2, h, w) over box (x0, y0, x1, y1, frame
    px) is a backward map (each frame position shows the photo at position + field), applied to
    the sampling source at its own resolution; `landmarks` are the moved face's."""
    ax, bx, ay, by = framing.to_source
    x0, y0, x1, y1 = box
    src_h, src_w = framing.pixels.shape[:2]
    u0, v0 = int(max(0, np.floor(ax * x0 + bx))), int(max(0, np.floor(ay * y0 + by)))
    u1, v1 = int(min(src_w, np.ceil(ax * x1 + bx) + 1)), int(min(src_h, np.ceil(ay * y1 + by) + 1))
    pixels = framing.pixels.copy()
    if u1 > u0 and v1 > v0:
        vs, us = np.mgrid[v0:v1, u0:u1].astype(np.float32)
        xf, yf = (us - np.float32(bx)) / np.float32(ax), (vs - np.float32(by)) / np.float32(ay)
        moved = [
            cv2.remap(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar borderValue
                f.astype(np.float32), xf - x0, yf - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            for f in field
        ]
        pixels[v0:v1, u0:u1] = _sample(framing.pixels, framing.to_source, xf + moved[0], yf + moved[1])
    h, w = framing.frame.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return dataclasses.replace(
        framing, frame=_sample(pixels, framing.to_source, xs, ys), landmarks=landmarks, pixels=pixels
    )


def upright_turns(landmarks: np.ndarray) -> int:
    """How many quarter turns (np.rot90's k, counter-clockwise) bring a face turned in the photo
    to within UPRIGHT_ROLL_DEG of upright: 0 for a face already within it. The decoder's lids,
    brows and mouth move along the frame's rows and columns, as an upright face's do."""
    roll = roll_degrees(landmarks)
    if abs(roll) <= UPRIGHT_ROLL_DEG:
        return 0
    return int(round(roll / 90)) % 4


def turned(framing: Framing, turns: int) -> Framing:
    """The framing turned by `turns` quarter turns (np.rot90's k): its frame, landmarks and the
    photo it samples, so that sampling the turned photo at turned positions gives the turned
    frame. Positions are pixel indices: in one counter-clockwise turn of an image W wide,
    (x, y) goes to (y, W - 1 - x)."""
    for _ in range(turns % 4):
        w = framing.frame.shape[1]
        w_pixels = framing.pixels.shape[1]
        ax, bx, ay, by = framing.to_source
        lm = framing.landmarks.copy()
        lm[:, 0], lm[:, 1] = framing.landmarks[:, 1], w - 1 - framing.landmarks[:, 0]
        framing = dataclasses.replace(
            framing,
            frame=np.ascontiguousarray(np.rot90(framing.frame)),
            landmarks=lm,
            pixels=np.ascontiguousarray(np.rot90(framing.pixels)),
            # turned x is y, sampled at pixels' row ay * y + by, now its column; turned y is
            # W - 1 - x, sampled at pixels' column ax * x + bx, now row w_pixels - 1 - that
            to_source=(ay, by, ax, w_pixels - 1 - ax * (w - 1) - bx),
        )
    return framing


def framing_warnings(framing: Framing) -> list[str]:
    """What a user should know of how the photo was framed, for a file and a live session alike:
    a face enlarged (a soft video), turned far (a sideways photo), or not alone."""
    warnings = []
    if framing.upscale > UPSCALE_WARN:
        # a photo decoded at or near WORKING_PIXELS may have been reduced: its face is small in it
        large = framing.photo_pixels >= ENOUGH_OF_WORKING * WORKING_PIXELS
        warnings.append(
            f"the face is enlarged {framing.upscale:.1f}x from the photo: a larger or closer "
            "portrait gives a sharper video"
            + (" (a photo over 16 MP is reduced to 16 MP: crop it around the face)" if large else "")
        )
    roll = roll_degrees(framing.landmarks)
    if abs(roll) > SIDEWAYS_WARN_DEG:
        # a phone's photo whose orientation tag was stripped (messaging apps do) is sideways
        warnings.append(
            f"the face is turned {abs(roll):.0f} degrees in the photo: if the photo is sideways "
            "or upside down, turn it upright, and the video will be too"
        )
    if framing.other_faces:
        warnings.append(f"the photo shows {framing.other_faces + 1} faces: the largest speaks, the others stay still")
    edges = cut_off_edges(framing)
    if edges:
        warnings.append(
            f"the face is cut off by the photo's {' and '.join(edges)} edge: the missing part is filled in by "
            "stretching the border, so use a photo that shows the whole face"
        )
    return warnings


def cut_off_edges(framing: Framing) -> list[str]:
    """The photo's edges that cut through the face: those beyond which more than
    CUT_OFF_SHARE of its landmarks lie (the frame repeats the border pixels there)."""
    ax, bx, ay, by = framing.to_source
    h, w = framing.pixels.shape[:2]
    x = ax * framing.landmarks[:, 0] + bx
    y = ay * framing.landmarks[:, 1] + by
    margin = 1.0  # px: a landmark on the border row is still in the photo
    beyond = {"top": y < -margin, "bottom": y > h - 1 + margin, "left": x < -margin, "right": x > w - 1 + margin}
    return [edge for edge, out in beyond.items() if out.mean() > CUT_OFF_SHARE]
