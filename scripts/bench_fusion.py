"""Face fusion figures (docs/fusion.md): time per fusion at 512 px (warm), into large photos
(the target upscaled so that its face is 700 to 2800 px tall, up to 40 MP: the most a target
may have), the batch endpoint's throughput against single calls, the identity distances
(dlib's face embeddings) to the source and to the target across blend ratios, and optionally
the picture grid.

    PYTHONPATH=tests .venv/bin/python scripts/bench_fusion.py [--media ../shared/media/images]
        [--grid docs/fusion_grid.jpg] [--large-only]
(tests/ on PYTHONPATH: its helpers start the services measured; the package is the installed
one.) Check `uptime` first: time only on a quiet machine.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)


def load(path: Path, side: int = 512) -> np.ndarray:
    im = Image.open(path).convert("RGB")
    s = side / max(im.size)
    return np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS))


def crop(rgb: np.ndarray, box, side: int = 200) -> np.ndarray:
    """The face's neighbourhood (1.7 x its box), side x side."""
    x0, y0, x1, y1 = box
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, 0.85 * max(x1 - x0, y1 - y0)
    h, w = rgb.shape[:2]
    a, b = int(max(0, cx - half)), int(max(0, cy - half))
    c, d = int(min(w, cx + half)), int(min(h, cy + half))
    return np.asarray(Image.fromarray(rgb[b:d, a:c]).resize((side, side), Image.LANCZOS))


def png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def large_targets(source: np.ndarray, target: np.ndarray, analyzer) -> None:
    """`target` upscaled until its face is 700, 1400 and 2800 px tall (the photo at most 40 MP):
    the time of one fusion into each (the work grows with the face's pixels)."""
    from sonic.fusion import fuse
    box = analyzer.analyze(target).box
    for face_px in (700, 1400, 2800):
        scale = min(face_px / (box[3] - box[1]), (40e6 / (target.shape[0] * target.shape[1])) ** 0.5)
        h, w = round(target.shape[0] * scale), round(target.shape[1] * scale)
        big = np.asarray(Image.fromarray(target).resize((w, h), Image.BICUBIC))
        t0 = time.perf_counter()
        res = fuse(source, big, analyzer, 0.6)
        took = time.perf_counter() - t0
        fh = res.faces["target"]["box"][3] - res.faces["target"]["box"][1]
        print(f"large target {w}x{h} ({w * h / 1e6:.0f} MP), face {fh} px tall: {took:.2f} s {res.timings}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--media", default=str(ROOT.parent / "shared" / "media" / "images"))
    ap.add_argument("--grid", help="write the ratio grid (JPEG) here")
    ap.add_argument("--large-only", action="store_true", help="only the times into large photos")
    a = ap.parse_args()
    from sonic.face import FaceAnalyzer
    from sonic.fusion import fuse
    from test_fusion import _dlib_embedder
    paths = sorted(p for p in Path(a.media).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    faces = {p.stem: load(p) for p in paths}
    names = list(faces)
    pairs = [(s, t) for s in names for t in names if s != t]
    analyzer = FaceAnalyzer()
    fuse(faces[names[0]], faces[names[1]], analyzer)                 # warm
    if a.large_only:
        large_targets(faces[names[0]], faces[names[1]], analyzer)
        return
    times = []
    for s, t in pairs:
        for _ in range(5):
            t0 = time.perf_counter()
            fuse(faces[s], faces[t], analyzer, 0.6)
            times.append(time.perf_counter() - t0)
    print(f"time per fusion at 512 px (warm, {len(times)} runs over {len(pairs)} pairs): median "
          f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
    large_targets(faces[names[0]], faces[names[1]], analyzer)
    # the endpoints: single calls against one batch call, the same pairs
    from server_helpers import FakePipeline, settings
    import tempfile
    from sonic_server import create_app
    with tempfile.TemporaryDirectory() as tmp:
        cfg = settings(Path(tmp))
        cfg["limits"]["max_upload_mb"] = 50
        client = create_app(cfg, pipeline=FakePipeline()).test_client()
        body = [{"source_image": base64.b64encode(png(faces[s])).decode(),
                 "target_image": base64.b64encode(png(faces[t])).decode()} for s, t in pairs]
        client.post("/fusion", json=body[0])
        t0 = time.perf_counter()
        for b in body:
            assert client.post("/fusion", json=b).status_code == 200
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = client.post("/fusion/batch", json={"pairs": body})
        batch = time.perf_counter() - t0
        assert r.status_code == 200 and r.get_json()["succeeded"] == len(body)
    print(f"HTTP, {len(body)} pairs (PNG in, JPEG base64 out): one call each {single:.2f} s "
          f"({len(body) / single:.1f} fusions/s); one batch call {batch:.2f} s ({len(body) / batch:.1f} fusions/s)")
    embed = _dlib_embedder()
    print("identity distance (dlib, same person < 0.6): ratio -> to source / to target")
    rows = []
    for s, t in pairs:
        es, et = embed(faces[s]), embed(faces[t])
        line, row = [], [crop(faces[s], analyzer.analyze(faces[s]).box)]
        for r_ in RATIOS:
            res = fuse(faces[s], faces[t], analyzer, r_)
            e = embed(res.image)
            line.append(f"{r_:.2f}: {np.linalg.norm(e - es):.2f} / {np.linalg.norm(e - et):.2f}")
            row.append(crop(res.image, res.faces["target"]["box"]))
        print(f"  {s} into {t}:  " + ",  ".join(line))
        rows.append(row)
    if a.grid:
        sheet = np.vstack([np.hstack(row) for row in rows])
        Image.fromarray(sheet).save(a.grid, quality=85)
        print(f"grid: {a.grid} (rows: source | ratios {', '.join(str(r) for r in RATIOS)})")


if __name__ == "__main__":
    main()
