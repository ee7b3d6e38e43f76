"""Fidelity of a generated MP4 against the exact frame the pipeline warped (no re-alignment).

usage: python scripts/fidelity.py VIDEO.mp4 --image PORTRAIT [--config JSON] [--save-reference PNG]
       python scripts/fidelity.py - --image PORTRAIT --save-reference PNG   (the reference only)

Rebuilds the output frame from the portrait with the same crop options, then reports the mean
SSIM (7x7 Gaussian, on luma) per frame of: the background (outside the face oval dilated by
0.36 IOD, as ../shared/tools/score_video.py defines it) and the upper face (oval minus lips/jaw).
Useful where an aligning scorer struggles: score_video.py's ECC alignment needs the reference to
have the frame's size (OpenCV's findTransformECC), so a crop scaled from the photo is scored
against the photo only through landmarks; --save-reference writes the right-sized reference.
"""
import argparse
import json
import sys

import cv2
import numpy as np


from sonic.face import FaceAnalyzer, crop_box
from sonic.media import load_image
from sonic.landmarks import EYE_OUTER, FACE_OVAL_IDX, OUTER_LOWER, OUTER_UPPER
from sonic.options import GenerateOptions
from sonic.settings import load_settings
from sonic.geometry import crop_and_scale


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (7, 7), 1.5)
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("--image", required=True)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--save-reference", metavar="PNG",
                    help="also write the rebuilt frame: a --source of the frame's own size for score_video.py")
    a = ap.parse_args()
    settings = load_settings()
    opts = GenerateOptions.from_dict(json.loads(a.config), settings)
    rgb = load_image(a.image, settings.limits.max_image_pixels)
    face = FaceAnalyzer().analyze(rgb)
    framing = crop_and_scale(rgb, face.landmarks, crop_box(face.box, rgb.shape[:2], opts.expand_ratio,
                                                           opts.crop_to_face), opts.min_resolution)
    src, lm = framing.frame, framing.landmarks
    ref = cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)
    if a.save_reference:
        cv2.imwrite(a.save_reference, cv2.cvtColor(src, cv2.COLOR_RGB2BGR))
        if a.video in ("-", "/dev/null"):  # no video to measure: the reference was the point
            return
    iod = float(np.linalg.norm(lm[EYE_OUTER[0], :2] - lm[EYE_OUTER[1], :2]))
    k = max(3, int(0.12 * iod)) | 1
    oval = np.zeros(ref.shape, np.uint8)
    cv2.fillConvexPoly(oval, cv2.convexHull(lm[FACE_OVAL_IDX, :2].astype(np.int32)), 255)
    low = np.zeros(ref.shape, np.uint8)
    cv2.fillConvexPoly(low, cv2.convexHull(lm[OUTER_UPPER + OUTER_LOWER + [152, 148, 377], :2].astype(np.int32)), 255)
    low = cv2.dilate(low, np.ones((3 * k, 3 * k), np.uint8))
    background = cv2.dilate(oval, np.ones((3 * k, 3 * k), np.uint8)) == 0
    upper = (oval > 0) & (low == 0)
    cap = cv2.VideoCapture(a.video)
    bg, up = [], []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if frame.shape[:2] != ref.shape:
            sys.exit(f"video frames {frame.shape[1]}x{frame.shape[0]} do not match the rebuilt frame; same --config?")
        m = ssim_map(cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), ref)
        bg.append(m[background].mean() if background.any() else np.nan)
        up.append(m[upper].mean())
    print(json.dumps({"frames": len(up), "ssim_background_mean": round(float(np.nanmean(bg)), 4),
                      "ssim_background_min": round(float(np.nanmin(bg)), 4),
                      "ssim_upper_face_mean": round(float(np.mean(up)), 4),
                      "ssim_upper_face_min": round(float(np.min(up)), 4)}))


if __name__ == "__main__":
    main()
