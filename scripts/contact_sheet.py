"""Contact sheet of an MP4: N evenly spaced frames (and a zoom on the lower face) in one PNG.

usage: python scripts/contact_sheet.py VIDEO.mp4 OUT.png [--frames 8] [--zoom] [--eyes] [--start S --end S]

--eyes adds a row of the eyes and brows at 2x (the band across the upper middle of the frame).
"""
import argparse

import cv2
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("video")
    ap.add_argument("out")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--zoom", action="store_true", help="second row: the lower middle of each frame, 2x")
    ap.add_argument("--eyes", action="store_true", help="a row of the eyes and brows, 2x")
    ap.add_argument("--width", type=int, default=240, help="width of each tile")
    ap.add_argument("--start", type=float, default=0.0, help="first second to show")
    ap.add_argument("--end", type=float, default=None, help="last second to show (default: the end)")
    a = ap.parse_args()
    cap = cv2.VideoCapture(a.video)
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    first = min(n - 1, int(a.start * fps))
    last = n - 1 if a.end is None else min(n - 1, int(a.end * fps))
    picks = np.linspace(first, last, a.frames).astype(int)
    tiles, zooms, eyes = [], [], []
    for i in picks:
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(i))
        ok, f = cap.read()
        if not ok:
            continue
        h, w = f.shape[:2]
        s = a.width / w
        t = cv2.resize(f, (a.width, int(h * s)), interpolation=cv2.INTER_AREA)
        cv2.putText(t, str(i), (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 255), 1)
        tiles.append(t)
        if a.zoom:
            z = f[int(h * 0.5):int(h * 0.85), int(w * 0.3):int(w * 0.7)]
            zooms.append(cv2.resize(z, (a.width, int(z.shape[0] * a.width / z.shape[1])), interpolation=cv2.INTER_CUBIC))
        if a.eyes:
            e = f[int(h * 0.22):int(h * 0.5), int(w * 0.22):int(w * 0.78)]
            eyes.append(cv2.resize(e, (a.width, int(e.shape[0] * a.width / e.shape[1])), interpolation=cv2.INTER_CUBIC))
    rows = [np.hstack(tiles)] + ([np.hstack(eyes)] if eyes else []) + ([np.hstack(zooms)] if zooms else [])
    cv2.imwrite(a.out, np.vstack(rows) if len({r.shape[1] for r in rows}) == 1 else rows[0])


if __name__ == "__main__":
    main()
