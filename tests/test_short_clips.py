"""Short clips keep the head rigid: the skull's landmarks on every output frame, aligned onto the
portrait's by a similarity transform, stay within 3 % of the eye distance, and the head rolls
no further than the documented bound. (On a frame whose eyes are shut, FaceMesh places the eye
corners up to 3 % IOD off where they are; there the eye corners are left out of the check.)"""
import cv2
import numpy as np
import pytest

from sonic.face import crop_box
from sonic.geometry import crop_and_scale
from sonic.landmarks import RIGID_UPPER
from sonic.media import load_image
from sonic.motion import MAX_ROLL_DEG
from conftest import PORTRAIT, SPEECH


def similarity(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares similarity (Umeyama) mapping src (N, 2) onto dst -> (aligned src, angle deg)."""
    ms, md = src.mean(0), dst.mean(0)
    a, b = src - ms, dst - md
    u, sig, vt = np.linalg.svd(b.T @ a / len(src))
    d = np.sign(np.linalg.det(u @ vt))
    r = u @ np.diag([1, d]) @ vt
    scale = (sig * [1, d]).sum() / (a ** 2).sum(1).mean()
    return (scale * (r @ a.T)).T + md, float(np.degrees(np.arctan2(r[1, 0], r[0, 0])))


def frames_of(path):
    cap = cv2.VideoCapture(str(path))
    while True:
        ok, f = cap.read()
        if not ok:
            return
        yield cv2.cvtColor(f, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def reference(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    face = pipeline.faces.analyze(rgb)
    frame = crop_and_scale(rgb, face.landmarks, crop_box(face.box, rgb.shape[:2], 0.5, True), 256).frame
    lm = pipeline.faces.analyze(frame).landmarks[:, :2]
    return lm, float(np.linalg.norm(lm[33] - lm[263]))


EYE_CORNERS = [33, 133, 362, 263]


def eyes_open(lm: np.ndarray, rest: np.ndarray) -> bool:
    aperture = lambda p: np.linalg.norm(p[159] - p[145]) + np.linalg.norm(p[386] - p[374])
    return aperture(lm) > 0.5 * aperture(rest)


@pytest.mark.parametrize("duration", [0.04, 0.6, 1.2])
def test_short_clips_keep_the_head_rigid(pipeline, reference, tmp_path, duration):
    rest, iod = reference
    for seed in (1, 2, 3, 4):
        out = tmp_path / f"s{seed}.mp4"
        res = pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "duration": duration, "seed": seed}),
                       out_path=out)
        n = 0
        for frame in frames_of(out):
            lm = pipeline.faces.analyze(frame).landmarks[:, :2]
            idx = RIGID_UPPER if eyes_open(lm, rest) else [i for i in RIGID_UPPER if i not in EYE_CORNERS]
            ref = rest[idx]
            aligned, angle = similarity(lm[idx], ref)
            err = np.linalg.norm(aligned - ref, axis=1).max() / iod
            assert err <= 0.03, (seed, n, err)
            assert abs(angle) <= MAX_ROLL_DEG + 0.5, (seed, n, angle)
            n += 1
        assert n == res.frames
