"""Render every portrait x recording, score each clip and draw contact sheets of mouth and eyes.

usage: python scripts/quality_sweep.py OUT_DIR --images A.jpg B.png ... --audio X.wav Y.wav ...
       [--scorer PYTHON] [--seed 42] [--config JSON] [--frames 10]

For each pair: OUT_DIR/<image>__<audio>.mp4, a contact sheet OUT_DIR/<image>__<audio>.png
(whole frames, then the mouth and the eyes at 2x, with the frame at the peak of the first blink
and the widest mouth opening among the picks) and, with --scorer (a Python that can run
../shared/tools/score_video.py), the scorer's JSON. One summary line per clip goes to stdout
and all of them to OUT_DIR/summary.json.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np


from sonic import load_pipeline
from sonic.face import FaceAnalyzer
from sonic.landmarks import EYE_LEFT_RING, EYE_OUTER, EYE_RIGHT_RING, OUTER_LOWER, OUTER_UPPER

SCORER = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "score_video.py"
TILE_W = 200


def read_frames(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            return out
        out.append(f)


def zoom(frame: np.ndarray, pts: np.ndarray, margin: float, factor: float = 2.0) -> np.ndarray:
    x0, y0 = pts.min(0) - margin
    x1, y1 = pts.max(0) + margin
    x0, y0 = int(max(0, x0)), int(max(0, y0))
    x1, y1 = int(min(frame.shape[1], x1)), int(min(frame.shape[0], y1))
    crop = frame[y0:y1, x0:x1]
    return cv2.resize(crop, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)


def fit(img: np.ndarray, w: int) -> np.ndarray:
    return cv2.resize(img, (w, max(1, int(img.shape[0] * w / img.shape[1]))), interpolation=cv2.INTER_AREA
                      if img.shape[1] > w else cv2.INTER_NEAREST)


def sheet(frames: list[np.ndarray], faces: FaceAnalyzer, picks: list[int]) -> np.ndarray:
    lm = faces.analyze(cv2.cvtColor(frames[0], cv2.COLOR_BGR2RGB)).landmarks[:, :2]
    iod = float(np.linalg.norm(lm[EYE_OUTER[0]] - lm[EYE_OUTER[1]]))
    mouth_pts = lm[OUTER_UPPER + OUTER_LOWER]
    eye_pts = lm[EYE_LEFT_RING + EYE_RIGHT_RING]
    rows = [[], [], []]
    for i in picks:
        f = frames[i].copy()
        rows[1].append(zoom(f, mouth_pts, 0.25 * iod))
        rows[2].append(zoom(f, eye_pts, 0.12 * iod))
        cv2.putText(f, str(i), (4, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 255, 255), 2)
        rows[0].append(f)
    out = []
    for r in rows:
        w = TILE_W if r is rows[0] else 2 * TILE_W
        per = max(1, (TILE_W * len(picks)) // w)
        for k in range(0, len(r), per):
            tiles = [fit(t, w) for t in r[k:k + per]]
            h = max(t.shape[0] for t in tiles)
            tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0))) for t in tiles]
            line = np.hstack(tiles)
            out.append(np.pad(line, ((0, 4), (0, TILE_W * len(picks) - line.shape[1]), (0, 0))))
    return np.vstack(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--images", nargs="+", required=True)
    ap.add_argument("--audio", nargs="+", required=True)
    ap.add_argument("--scorer", help="python executable able to run score_video.py")
    ap.add_argument("--score-script", default=str(SCORER), help="path of score_video.py")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--config", default="{}")
    ap.add_argument("--frames", type=int, default=8)
    a = ap.parse_args()
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline()
    faces = FaceAnalyzer()
    summary = []
    for img in a.images:
        for aud in a.audio:
            name = f"{Path(img).stem}__{Path(aud).stem}"
            mp4 = out_dir / f"{name}.mp4"
            params = {"seed": a.seed, **json.loads(a.config)}
            res = pipe(img, aud, pipe.options(params), out_path=mp4)
            frames = read_frames(mp4)
            picks = list(np.linspace(0, len(frames) - 1, a.frames).astype(int))
            cv2.imwrite(str(out_dir / f"{name}.png"), sheet(frames, faces, picks))
            row = {"clip": name, "frames": res.frames, "offset_ms": res.lipsync_offset_ms,
                   "render_s": res.timings.get("render"), "warnings": list(res.warnings)}
            if a.scorer:
                ref = out_dir / f"{name}.ref.png"
                subprocess.run([sys.executable, str(Path(__file__).parent / "fidelity.py"), str(mp4), "--image", img,
                                "--config", json.dumps(params), "--save-reference", str(ref)],
                               check=True, capture_output=True)
                p = subprocess.run([a.scorer, a.score_script, str(mp4), "--source", str(ref)],
                                   capture_output=True, text=True, check=True)
                s = json.loads(p.stdout)
                ls, fid = s.get("lipsync", {}), s.get("fidelity", {})
                row.update(mouth_motion_std=ls.get("mouth_motion_std"), sync_corr_at_0=ls.get("sync_corr_at_0"),
                           audio_delay_ms=ls.get("audio_delay_ms"), speech_silence_d=ls.get("speech_silence_d"),
                           ssim_face=fid.get("ssim_face_excl_mouth"), ssim_bg=fid.get("ssim_background"),
                           identity=fid.get("identity_dist_mean"), flags=s.get("flags"))
            print(json.dumps(row), flush=True)
            summary.append(row)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
