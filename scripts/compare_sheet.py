"""Before/after contact sheet of two renders of the same portrait: mouth and eyes at 2x.

usage: python scripts/compare_sheet.py BEFORE.mp4 AFTER.mp4 OUT.jpg [--frames 6] [--width 1200]

Rows: before mouths, after mouths (frames with the widest openings and evenly spaced ones),
before eyes, after eyes (the most closed eyes of each clip first, then evenly spaced frames).
Crops are taken around the landmarks of each clip's first frame and enlarged 2x (nearest
neighbour, so that every pixel of the video shows), then the sheet is fitted to --width.
"""
import argparse

import cv2
import numpy as np


from sonic.face import FaceAnalyzer
from sonic.landmarks import EYE_LEFT_RING, EYE_OUTER, EYE_PAIRS, EYE_RIGHT_RING, LIP_MIDDLE, OUTER_LOWER, OUTER_UPPER
from quality_sweep import read_frames  # noqa: E402  (this folder)


def crop(frame, pts, mx, my):
    x0, y0 = np.floor(pts.min(0) - [mx, my]).astype(int)
    x1, y1 = np.ceil(pts.max(0) + [mx, my]).astype(int)
    h, w = frame.shape[:2]
    c = frame[max(0, y0):min(h, y1), max(0, x0):min(w, x1)]
    return cv2.resize(c, None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)


def rows(frames, faces, n):
    rgb = lambda f: cv2.cvtColor(f, cv2.COLOR_BGR2RGB)
    lm0 = faces.analyze(rgb(frames[0])).landmarks[:, :2]
    iod = float(np.linalg.norm(lm0[EYE_OUTER[0]] - lm0[EYE_OUTER[1]]))
    step = max(1, len(frames) // 40)
    probe = list(range(0, len(frames), step))
    gaps, eyes = [], []
    for i in probe:
        try:
            lm = faces.analyze(rgb(frames[i])).landmarks[:, :2]
        except Exception:
            gaps.append(0.0)
            eyes.append(1.0)
            continue
        gaps.append(np.linalg.norm(lm[LIP_MIDDLE[0]] - lm[LIP_MIDDLE[1]]))
        # the middle lid pair of each eye
        eyes.append(sum(np.linalg.norm(lm[up] - lm[lo]) for up, lo in (EYE_PAIRS[0], EYE_PAIRS[5])))
    even = list(np.linspace(0, len(frames) - 1, n).astype(int))
    wide = [probe[i] for i in np.argsort(gaps)[::-1][:n // 2]]
    shut = [probe[i] for i in np.argsort(eyes)[:2]]
    mouth_idx = sorted(set(wide + even))[:n]
    eye_idx = (shut + [i for i in even if i not in shut])[:n]
    mouths = [crop(frames[i], lm0[OUTER_UPPER + OUTER_LOWER], 0.3 * iod, 0.22 * iod) for i in mouth_idx]
    eyes_ = [crop(frames[i], lm0[EYE_LEFT_RING + EYE_RIGHT_RING], 0.12 * iod, 0.1 * iod) for i in eye_idx]
    return mouths, eyes_


def strip(tiles, width):
    h = min(t.shape[0] for t in tiles)
    tiles = [cv2.resize(t, (int(t.shape[1] * h / t.shape[0]), h), interpolation=cv2.INTER_NEAREST) for t in tiles]
    line = np.hstack([np.pad(t, ((0, 0), (0, 3), (0, 0))) for t in tiles])
    return cv2.resize(line, (width, int(line.shape[0] * width / line.shape[1])), interpolation=cv2.INTER_AREA)


def label(img, text):
    out = np.pad(img, ((22, 0), (0, 0), (0, 0)), constant_values=255)
    cv2.putText(out, text, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("out")
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--width", type=int, default=1200)
    a = ap.parse_args()
    faces = FaceAnalyzer()
    (mb, eb), (ma, ea) = (rows(read_frames(p), faces, a.frames) for p in (a.before, a.after))
    parts = [label(strip(mb, a.width), "before: mouth, 2x"), label(strip(ma, a.width), "after: mouth, 2x"),
             label(strip(eb, a.width), "before: eyes, 2x (most closed first)"),
             label(strip(ea, a.width), "after: eyes, 2x (most closed first)")]
    cv2.imwrite(a.out, np.vstack(parts), [cv2.IMWRITE_JPEG_QUALITY, 88])


if __name__ == "__main__":
    main()
