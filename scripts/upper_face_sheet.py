"""A sheet of the eyes and brows at 2x, several frames a second, one row per video (e.g. before /
after a change, or neutral / smile / serious), plus a row of whole faces at the first of them.

usage: python scripts/upper_face_sheet.py OUT.jpg LABEL=VIDEO.mp4 [LABEL=VIDEO.mp4 ...]
       [--start 1.0] [--seconds 2.0] [--per-second 5] [--mouth]

The part shown is found on each video's first frame by the face landmarker: one eye (the
image's left) and its brow, from above the brow to below the eye, out to the nose's bridge;
--mouth shows the mouth instead.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np

from sonic import load_pipeline


def read_frames(path: str, picks: list[int]) -> list[np.ndarray]:
    cap = cv2.VideoCapture(path)
    out = []
    for i in picks:
        cap.set(cv2.CAP_PROP_POS_FRAMES, i)
        ok, f = cap.read()
        if ok:
            out.append(f)
    return out


def band(lm: np.ndarray, shape: tuple[int, ...], mouth: bool) -> tuple[int, int, int, int]:
    """x0, y0, x1, y1 of the eyes-and-brows band (or the mouth's) in a frame."""
    iod = float(np.linalg.norm(lm[263] - lm[33]))
    if mouth:
        cx, cy = (lm[61] + lm[291]) / 2
        x0, x1, y0, y1 = cx - 0.6 * iod, cx + 0.6 * iod, cy - 0.35 * iod, cy + 0.35 * iod
    else:
        x0, x1 = lm[33, 0] - 0.15 * iod, (lm[133, 0] + lm[362, 0]) / 2 + 0.05 * iod
        y0, y1 = lm[[70, 300, 105, 334], 1].min() - 0.3 * iod, lm[[145, 374], 1].max() + 0.15 * iod
    h, w = shape[:2]
    return int(max(0, x0)), int(max(0, y0)), int(min(w, x1)), int(min(h, y1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("videos", nargs="+", help="LABEL=VIDEO.mp4")
    ap.add_argument("--start", type=float, default=1.0)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--per-second", type=float, default=4.0)
    ap.add_argument("--mouth", action="store_true")
    a = ap.parse_args()
    faces = load_pipeline().faces
    rows, whole = [], []
    for spec in a.videos:
        label, path = spec.split("=", 1)
        cap = cv2.VideoCapture(path)
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        picks = [min(n - 1, int(round((a.start + k / a.per_second) * fps))) for k in range(int(a.seconds * a.per_second))]
        frames = read_frames(path, picks)
        lm = faces.analyze(cv2.cvtColor(frames[0], cv2.COLOR_BGR2RGB)).landmarks[:, :2]
        x0, y0, x1, y1 = band(lm, frames[0].shape, a.mouth)
        tiles = []
        for i, f in zip(picks, frames):
            t = cv2.resize(f[y0:y1, x0:x1], None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
            cv2.putText(t, f"{label} {i / fps:.1f}s", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1)
            tiles.append(t)
        rows.append(np.hstack(tiles))
        small = cv2.resize(frames[0], (160, int(frames[0].shape[0] * 160 / frames[0].shape[1])))
        cv2.putText(small, label, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1)
        whole.append(small)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    top = np.hstack([w[: min(x.shape[0] for x in whole)] for w in whole])
    top = np.pad(top, ((0, 0), (0, max(0, width - top.shape[1])), (0, 0)))[:, :width]
    cv2.imwrite(a.out, np.vstack([top, *rows]), [cv2.IMWRITE_JPEG_QUALITY, 75])


if __name__ == "__main__":
    main()
