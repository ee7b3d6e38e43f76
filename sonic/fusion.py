"""Face fusion: a source face blended into a target photo (docs/fusion.md).

1. FaceMesh landmarks on both faces (the largest face of each; sonic/face.py).
2. The source's landmarks are brought into the target's frame by a similarity transform on
   rigid points (eye corners, nose bridge, forehead, temples), and the fused shape is
   `(1 - r) * target + r * source` per landmark, r = blend_ratio.
3. Both faces are warped onto that shape, piecewise-affine over a Delaunay triangulation of the
   landmarks (one dense map per face, one cv2.remap each).
4. The source's colour is matched to the target's skin (mean and spread per LAB channel, over
   the cheeks and forehead of both warped faces), then relit: times the ratio of the two faces'
   blurred colours, so it takes the target's light and shading and keeps its own detail. The
   textures are then mixed by r; with `swap_eye` the eye regions come from the source alone.
5. The face region (the fused face oval from a little above the brows down) goes into the
   target by a multi-band (Laplacian pyramid) blend, so no seam or colour step shows.
   Everything outside it stays the target's, pixel for pixel. r = 0 returns the target unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from .errors import InvalidParameter
from .landmarks import (
    EYE_LEFT_RING,
    EYE_OUTER,
    EYE_RIGHT_RING,
    FACE_OVAL_IDX,
    LEFT_BROW,
    N_MESH,
    RIGHT_BROW,
    RIGID_UPPER,
)

# cheeks and forehead: skin without eyes, brows, lips or beard shadow, for the colour statistics
SKIN_PATCHES = [[117, 118, 101, 36, 205, 187, 123], [346, 347, 330, 266, 425, 411, 352], [109, 10, 338, 337, 151, 108]]
MAP_CHUNK = 1 << 18  # pixels per slice when the warp maps are built
FEATHER = 0.04  # the clone mask's edge softening, as a fraction of the face size
WIDE_BLUR_STEP = 16.0  # px: a Gaussian blur whose sigma is twice this or more is made on a reduced copy


@dataclass
class FusionResult:
    image: np.ndarray  # RGB uint8, the target's size
    faces: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)


def _similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity (rotation, uniform scale, shift) taking src points onto dst (least squares)."""
    m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst.astype(np.float32), method=cv2.LMEDS)
    if m is None:
        raise InvalidParameter("the two faces could not be aligned", "source_image")
    return m


def _triangles(points: np.ndarray) -> np.ndarray:
    from scipy.spatial import Delaunay

    return Delaunay(points).simplices


def _piecewise_map(src_pts: np.ndarray, dst_pts: np.ndarray, tris: np.ndarray, shape, box) -> tuple:
    """(map_x, map_y, covered) over `box` of the destination: for every pixel inside a triangle of
    dst_pts, where it comes from in the source (the triangle's affine map)."""
    x0, y0, x1, y1 = box
    h, w = y1 - y0, x1 - x0
    labels = np.full((h, w), -1, np.int32)
    mats = np.zeros((len(tris), 2, 3), np.float64)
    for i, t in enumerate(tris):
        d = dst_pts[t].astype(np.float32)
        s = src_pts[t].astype(np.float32)
        area = abs(np.cross(d[1] - d[0], d[2] - d[0]))
        if area < 1e-3:
            continue
        mats[i] = cv2.getAffineTransform(d, s)
        cv2.fillConvexPoly(  # type: ignore[call-overload]  # cv2's stubs refuse a scalar colour
            labels, np.round(d - [x0, y0]).astype(np.int32), int(i)
        )
    covered = labels >= 0
    ys, xs = np.nonzero(covered)
    map_x = np.zeros((h, w), np.float32)
    map_y = np.zeros((h, w), np.float32)
    mats = mats.astype(np.float32)
    for i in range(0, len(ys), MAP_CHUNK):  # in slices: a big face in a big photo stays small in memory
        yy, xx = ys[i : i + MAP_CHUNK], xs[i : i + MAP_CHUNK]
        m = mats[labels[yy, xx]]
        gx, gy = (xx + x0).astype(np.float32), (yy + y0).astype(np.float32)
        map_x[yy, xx] = m[:, 0, 0] * gx + m[:, 0, 1] * gy + m[:, 0, 2]
        map_y[yy, xx] = m[:, 1, 0] * gx + m[:, 1, 1] * gy + m[:, 1, 2]
    return map_x, map_y, covered


def _poly_mask(points: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    hull = cv2.convexHull(np.round(points - [x0, y0]).astype(np.int32))
    cv2.fillConvexPoly(mask, hull, 255)  # type: ignore[call-overload]  # cv2's stubs refuse a scalar colour
    return mask


def _match_colour(src: np.ndarray, ref: np.ndarray, src_skin: np.ndarray, ref_skin: np.ndarray) -> np.ndarray:
    """`src` recoloured so that its skin's LAB mean and spread are the reference skin's."""
    s = cv2.cvtColor(src, cv2.COLOR_RGB2LAB).astype(np.float32)
    r = cv2.cvtColor(ref, cv2.COLOR_RGB2LAB).astype(np.float32)
    if src_skin.sum() < 50 or ref_skin.sum() < 50:
        return src
    out = s.copy()
    for c in range(3):
        sm, ss = s[..., c][src_skin].mean(), s[..., c][src_skin].std() + 1e-3
        rm, rs = r[..., c][ref_skin].mean(), r[..., c][ref_skin].std() + 1e-3
        gain = float(np.clip(rs / ss, 0.5, 2.0))
        out[..., c] = (s[..., c] - sm) * gain + rm
    return cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_LAB2RGB)


def _multiband(a: np.ndarray, b: np.ndarray, alpha: np.ndarray, levels: int) -> np.ndarray:
    """Laplacian-pyramid blend of float images a (where alpha is 1) and b (where it is 0)."""
    ga, gb, gm = [a], [b], [alpha]
    for _ in range(levels):
        ga.append(cv2.pyrDown(ga[-1]))
        gb.append(cv2.pyrDown(gb[-1]))
        gm.append(cv2.pyrDown(gm[-1]))
    out = ga[-1] * gm[-1][..., None] + gb[-1] * (1.0 - gm[-1][..., None])
    for i in range(levels - 1, -1, -1):
        size = (ga[i].shape[1], ga[i].shape[0])
        la = ga[i] - cv2.pyrUp(ga[i + 1], dstsize=size)
        lb = gb[i] - cv2.pyrUp(gb[i + 1], dstsize=size)
        m = gm[i][..., None]
        out = cv2.pyrUp(out, dstsize=size) + la * m + lb * (1.0 - m)
    return out


def _below_hairline(G: np.ndarray) -> np.ndarray:
    """The face oval's points, those above the brows (along the face's own up direction) brought
    down to a third of the brow-to-eye distance above the brows, with the brows themselves."""
    brows = np.vstack([G[LEFT_BROW], G[RIGHT_BROW]])
    eyes = G[[EYE_OUTER[0], EYE_OUTER[1], 133, 362]]
    chin = G[152]
    up = eyes.mean(0) - chin
    up /= np.linalg.norm(up) + 1e-9
    level = float((brows @ up).max() + 0.35 * ((brows.mean(0) - eyes.mean(0)) @ up))
    oval = G[FACE_OVAL_IDX].copy()
    over = oval @ up - level
    oval[over > 0] -= over[over > 0, None] * up
    return np.vstack([oval, brows])


def _wide_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur(img, sigma); a wide one on a copy reduced by sigma / WIDE_BLUR_STEP and
    brought back to size: such a blur leaves no detail that the smaller copy lacks, and its cost
    no longer grows with sigma (a 5000 px face's relighting took over two minutes, the width of
    its blur times the pixels of its face)."""
    k = int(sigma // WIDE_BLUR_STEP)
    if k < 2:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, round(w / k)), max(1, round(h / k))), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), sigma / k), (w, h), interpolation=cv2.INTER_LINEAR)


def _relight(src: np.ndarray, ref: np.ndarray, region: np.ndarray, sigma: float) -> np.ndarray:
    """`src` with the reference's local colour and light: each pixel times the ratio of the two
    images' blurred colours (blurred within `region` only, so the background does not bleed
    in). The source keeps its own detail (its features, its skin's texture); the tone, the
    shading and the colour cast become the reference's."""
    m = _wide_blur(region.astype(np.float32), sigma)[..., None] + 1e-3

    def blur(img):
        return _wide_blur(img.astype(np.float32) * region[..., None], sigma) / m

    ratio = (blur(ref) + 4.0) / (blur(src) + 4.0)
    return np.clip(src.astype(np.float32) * np.clip(ratio, 0.25, 4.0) + 0.5, 0, 255).astype(np.uint8)


def fuse(
    source: np.ndarray, target: np.ndarray, analyzer, blend_ratio: float = 0.6, swap_eye: bool = False
) -> FusionResult:
    """Blend the largest face of `source` (RGB uint8) into the largest face of `target`.

    Raises NoFaceDetected (field source_image / target_image) when either has no face."""
    from .errors import NoFaceDetected

    if not 0.0 <= float(blend_ratio) <= 1.0:
        raise InvalidParameter("blend_ratio must be between 0 and 1", "blend_ratio")
    r = float(blend_ratio)
    t0 = time.perf_counter()
    faces: dict[str, dict | list[int]] = {}  # each face's {"box": ...}, then "fused_box"
    found = {}
    for name, img in (("source", source), ("target", target)):
        try:
            res = analyzer.analyze(img)
        except NoFaceDetected as e:
            raise NoFaceDetected(f"no face was found in the {name} image", field=f"{name}_image") from e
        found[name] = res.landmarks[:N_MESH, :2]
        x0, y0, x1, y1 = res.box
        faces[name] = {"box": [round(x0), round(y0), round(x1), round(y1)]}
    t_face = time.perf_counter()
    S, T = found["source"], found["target"]
    H, W = target.shape[:2]
    if r == 0.0 and not swap_eye:
        return FusionResult(
            target.copy(), faces, {"face": round(t_face - t0, 3), "blend": 0.0, "total": round(t_face - t0, 3)}
        )
    # the source in the target's frame, and the fused shape
    m = _similarity(S[RIGID_UPPER], T[RIGID_UPPER])
    S_in_T = S @ m[:, :2].T + m[:, 2]
    G = (1.0 - r) * T + r * S_in_T
    size = float(np.ptp(T[:, 1]))
    pad = int(0.08 * size) + 4
    gx0, gy0 = np.floor(np.minimum(G.min(0), T.min(0))).astype(int) - pad
    gx1, gy1 = np.ceil(np.maximum(G.max(0), T.max(0))).astype(int) + pad
    box = (max(0, gx0), max(0, gy0), min(W, gx1), min(H, gy1))
    x0, y0, x1, y1 = box
    tris = _triangles(G)
    sx, sy, covered = _piecewise_map(S, G, tris, target.shape, box)
    tx, ty, _ = _piecewise_map(T, G, tris, target.shape, box)
    src_w = cv2.remap(source, sx, sy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    tgt_w = cv2.remap(target, tx, ty, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    skin = np.zeros(covered.shape, np.uint8)
    for patch in SKIN_PATCHES:
        skin |= _poly_mask(G[patch], box)
    skin = (skin > 0) & covered
    src_w = _match_colour(src_w, tgt_w, skin, skin)  # the skin's tone first, then the local light
    face_area = (_poly_mask(G[FACE_OVAL_IDX], box) > 0) & covered
    iod = float(np.linalg.norm(G[EYE_OUTER[0]] - G[EYE_OUTER[1]]))
    src_w = _relight(src_w, tgt_w, face_area.astype(np.float32), max(2.0, 0.25 * iod))
    face = (1.0 - r) * tgt_w.astype(np.float32) + r * src_w.astype(np.float32)
    if swap_eye:
        eyes: np.ndarray = np.zeros(covered.shape, np.uint8)  # uint8 throughout; cv2.dilate is typed loosely
        for ring in (EYE_LEFT_RING, EYE_RIGHT_RING):
            eyes |= _poly_mask(G[ring], box)
        grow = max(1, int(0.015 * size))  # px, in one pass as in the erosion below
        eyes = cv2.dilate(eyes, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
        soft = _wide_blur(eyes.astype(np.float32) / 255.0, max(1.0, 0.008 * size))[..., None]
        face = face * (1.0 - soft) + src_w.astype(np.float32) * soft
    face = np.clip(face + 0.5, 0, 255).astype(np.uint8)
    # the region blended: the fused face oval from a little above the brows down (the forehead's
    # top is often hair, the source's or the target's), a little inside the warped area
    mask = _poly_mask(_below_hairline(G), box)
    mask &= (covered * 255).astype(np.uint8)
    inset = max(1, int(FEATHER * size / 2))  # px; one pass of a square as wide as that many 3x3 passes
    mask = cv2.erode(mask, np.ones((2 * inset + 1, 2 * inset + 1), np.uint8))
    if mask.sum() == 0:
        raise InvalidParameter("the face is too small to blend", "target_image")
    t_warp = time.perf_counter()
    # the fused face into the target by a multi-band (Laplacian pyramid) blend: each band of
    # detail crosses over at its own width, so fine texture meets fine texture at a sharp edge and
    # tone meets tone over a wide one, and no seam or colour step shows. Relit, the face already
    # has the target's light where it meets the rest of the photo.
    soft = _wide_blur(mask.astype(np.float32) / 255.0, max(1.0, FEATHER * size / 2))
    soft[mask == 0] = 0.0  # outside the mask: the target, pixel for pixel
    base = target[y0:y1, x0:x1].astype(np.float32)
    inner = np.where((mask > 0)[..., None], face.astype(np.float32), base)  # no warp leftovers beyond the face
    mixed = _multiband(inner, base, soft, levels=int(np.clip(np.log2(max(8.0, size / 16.0)), 2, 5)))
    out = target.copy()
    region = out[y0:y1, x0:x1]
    inside = mask > 0
    region[inside] = np.clip(mixed[inside] + 0.5, 0, 255).astype(np.uint8)
    bx, by, bw, bh = cv2.boundingRect(mask)
    t_end = time.perf_counter()
    faces["fused_box"] = [int(x0 + bx), int(y0 + by), int(x0 + bx + bw), int(y0 + by + bh)]
    return FusionResult(
        out,
        faces,
        {
            "face": round(t_face - t0, 3),
            "warp": round(t_warp - t_face, 3),
            "blend": round(t_end - t_warp, 3),
            "total": round(t_end - t0, 3),
        },
    )
