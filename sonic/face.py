"""Face analysis: find the largest face, its 478 FaceMesh landmarks and the output crop.

Models ship inside the mediapipe 0.10.21 wheel (full-range BlazeFace detector + FaceMesh with
refined lips/eyes/irises); they load once in `FaceAnalyzer.__init__`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import NoFaceDetected, PipelineError

DETECT_MARGIN = 0.6  # crop around a detection before meshing, as a fraction of its size
MESH_INPUT_PX = 640  # detections are meshed from a crop resized to about this size
MIN_FACE_PX = 24  # the narrowest face (its landmarks' width in the photo) taken
MESH_CROP_MIN_PX = 8  # a crop around a detection smaller than this either way holds no face to mesh
SIZE_MULTIPLE = 8  # output sides are multiples of this (H.264 macroblocks, yuv420p)
# the second look, tile by tile, for a face too small for the detector in the whole photo
TILED_SOURCE_PX = 2048  # the photo's long side is reduced to at most this first
TILE_FRACTIONS = (0.5, 0.25, 0.125)  # tile sides, of the long side
TILE_MIN_PX = 160  # no tile smaller than this (the detector's own input is 192 px)
# no smaller tiles once a tile spans this few of the photo's own pixels: the detector sees a face
# of 24 px (the smallest animated) at 7 px or more there, about as small as it finds
TILE_ENOUGH_PX = 640
EIGHTHS_AFTER = 0.25  # that check is made from the quarters on: every photo of 640 px or more gets its quarters
TILED_FACES_MAX = 6  # the largest faces the tiles found that are meshed (each ~20 ms)
TILED_BOXES_MAX = 100  # detections kept from one tile size (merging them is quadratic)
# which way up: the detector and the mesh are made for faces within ~90 degrees of upright; past
# that the mesh fits an upright face onto the hair or the chin. The detector looks at the photo
# turned each quarter turn, reduced to ORIENTATION_PX, and the turn whose most confident face has
# its mouth below its eyes (within UPRIGHT_DEG: a face at 45 degrees reads 47-56 in either of the
# two turns nearest it) is the one analysed. A turn other than the photo's own needs
# TURNED_MIN_SCORE: a small face that the detector half sees sideways (0.66) is found better
# upright, tile by tile, than meshed from the side (faces past 90 degrees score 0.79-0.94)
ORIENTATION_PX = 640
UPRIGHT_DEG = 60
TURNED_MIN_SCORE = 0.7
# a photo whose face the detector finds upright with this confidence is not turned to look again
# (most upright portraits: 0.8-0.95; an upside-down face taken for upright scored 0.71)
SURE_UPRIGHT_SCORE = 0.8
TURNED_MAX_ROLL_DEG = 60  # the mesh's roll in the turn taken: past this, the turn was wrong

Box = tuple[float, float, float, float]  # x, y, w, h in px


@dataclass(frozen=True)
class FaceResult:
    """Landmarks in pixels of the image they were found in, (478, 3); z in pixel-like units."""

    landmarks: np.ndarray
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 of the landmark hull, px
    others: int = 0  # more faces the detector found in the image (smaller ones: they do not speak)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence mediapipe's C++ logging (glog, TFLite), which writes to fd 2 whatever Python says.

    Used once, while the models load and run their first inference (all they log is set-up):
    redirecting fd 2 swaps it for the whole process, so a line another thread writes meanwhile
    is lost. Never while serving: `analyze` leaves the process's stderr alone.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class FaceAnalyzer:
    def __init__(self) -> None:
        self._start()

    def _start(self) -> None:
        """MediaPipe's detector and mesh graphs, warmed up."""
        with _quiet_stderr():
            import mediapipe as mp  # ~1.7 s import: done once, when the pipeline loads

            self._detector = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.4)
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True, max_num_faces=1, refine_landmarks=True, min_detection_confidence=0.3
            )
            # the first inferences log their set-up, and the first face meshed from a non-square
            # image a one-time projection warning: both now, while stderr is quiet
            blank = np.zeros((64, 64, 3), np.uint8)
            self._detector.process(blank)
            self._mesh.process(blank)
            try:
                self._analyze(_sketched_face())
            except NoFaceDetected:  # only the warning is lost: it is logged once, later
                pass

    def _mesh_on(self, rgb: np.ndarray) -> np.ndarray | None:
        res = self._mesh.process(np.ascontiguousarray(rgb))
        if not res.multi_face_landmarks:
            return None
        h, w = rgb.shape[:2]
        pts = res.multi_face_landmarks[0].landmark
        return np.array([[p.x * w, p.y * h, p.z * w] for p in pts], dtype=np.float64)

    def analyze(self, rgb: np.ndarray) -> FaceResult:
        """Largest face in an RGB uint8 image -> FaceResult; raises NoFaceDetected. A MediaPipe
        graph that fails stays failed for every later image: it is started afresh, and this
        image's analysis is a PipelineError."""
        try:
            found = self._analyze(rgb)
        except (RuntimeError, ValueError) as e:  # MediaPipe's CalculatorGraph errors; a closed graph
            self._restart()
            raise PipelineError("the face analysis failed on this image (MediaPipe's graph; it was restarted)") from e
        width, height = found.box[2] - found.box[0], found.box[3] - found.box[1]
        if width < MIN_FACE_PX:
            # the tiled look finds faces this small, and also faces in a suit's folds: either way
            # there is nothing to animate (it would be enlarged 7x and more into a blur)
            raise NoFaceDetected(
                f"the only face found is {width:.0f}x{height:.0f} pixels, too small to animate: use a photo "
                f"where the face is at least {MIN_FACE_PX} pixels wide (150 or more gives a sharp video)"
                + exposure_hint(rgb),
                field="image",
            )
        return found

    def _restart(self) -> None:
        """Fresh graphs in place of failed ones, which are closed first (each holds ~40 MB and
        its threads); a graph that fails to start is started again at the next image."""
        for graph in (self._detector, self._mesh):
            with contextlib.suppress(Exception):  # noqa: BLE001 - a failed graph may fail to close too
                graph.close()
        with contextlib.suppress(RuntimeError, ValueError):
            self._start()

    def _analyze(self, rgb: np.ndarray) -> FaceResult:
        """The largest face, analysed in the quarter turn of the photo where it is upright, its
        landmarks in the photo as given."""
        turns = self._upright_turns(rgb)
        if turns:
            with contextlib.suppress(NoFaceDetected):
                found = self._analyze_upright(np.ascontiguousarray(np.rot90(rgb, turns)))
                # the mesh confirms the turn: a face that the detector took for upright in it but
                # that lies on its side there (a small one: its keypoints were wrong) is analysed
                # in the photo as given
                if abs(roll_degrees(found.landmarks)) <= TURNED_MAX_ROLL_DEG:
                    height, width = rgb.shape[:2]
                    return _result(_turned_back(found.landmarks, turns, (height, width)), others=found.others)
        return self._analyze_upright(rgb)

    def _upright_turns(self, rgb: np.ndarray) -> int:
        """How many quarter turns (np.rot90's k) bring the photo's face upright: the turn where the
        detector's most confident face has its mouth within UPRIGHT_DEG of straight below its eyes.
        0 where no other turn has such a face with more confidence than the photo as given and
        at least TURNED_MIN_SCORE (a face too small for the detector is sought upright, tile by tile)."""
        if not min(rgb.shape[:2]):  # nothing to turn (the analysis says what is wrong with it)
            return 0
        scale = min(1.0, ORIENTATION_PX / max(rgb.shape[:2]))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        scores = [self._upright_score(small)]
        if scores[0] >= SURE_UPRIGHT_SCORE:
            return 0
        scores += [self._upright_score(np.ascontiguousarray(np.rot90(small, turns))) for turns in (1, 2, 3)]
        best = int(np.argmax(scores))
        return best if scores[best] > max(scores[0], TURNED_MIN_SCORE) else 0

    def _upright_score(self, rgb: np.ndarray) -> float:
        """The detector's highest confidence in a face that stands upright in `rgb` (0 if none):
        its keypoints' mouth lies within UPRIGHT_DEG of straight below the middle of its eyes."""
        h, w = rgb.shape[:2]
        best = 0.0
        for d in self._detector.process(rgb).detections or []:
            right_eye, left_eye, _nose, mouth = (
                np.array([k.x * w, k.y * h]) for k in d.location_data.relative_keypoints[:4]
            )
            down = mouth - (right_eye + left_eye) / 2
            if abs(np.degrees(np.arctan2(down[0], down[1]))) <= UPRIGHT_DEG:
                best = max(best, float(d.score[0]))
        return best

    def _analyze_upright(self, rgb: np.ndarray) -> FaceResult:
        boxes = self._detect(rgb)
        for box in boxes[:3]:  # the largest detection the mesh takes for a face
            lm = self._mesh_box(rgb, box)
            if lm is not None:
                return _result(lm, others=len(boxes) - 1)
        lm = self._mesh_on(rgb)  # the mesh's own short-range detector, for close-ups
        if lm is not None:
            return _result(lm)
        found = self._find_in_tiles(rgb)
        if found is None:
            raise NoFaceDetected("no face was found in the image" + exposure_hint(rgb), field="image")
        return found

    def _find_in_tiles(self, rgb: np.ndarray) -> FaceResult | None:
        """A small face in a large photo: the detector sees the whole at 192 px, where a face
        80 px wide in 1600 is a few pixels; it looks again, tile by tile. A tile that cuts a
        face may see a face beside it: only the faces the mesh confirms count."""
        for boxes in self._detect_in_tiles(rgb):
            meshed = [lm for box in boxes[:TILED_FACES_MAX] if (lm := self._mesh_box(rgb, box)) is not None]
            if meshed:
                hulls = [_result(lm).box for lm in meshed]
                distinct = _merged([(x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in hulls])
                return _result(meshed[0], others=len(distinct) - 1)
        return None

    def _detect(self, rgb: np.ndarray, origin: tuple[float, float] = (0, 0), scale: float = 1.0) -> list[Box]:
        """The detector's faces in `rgb` as (x, y, w, h), in px of an image of which `rgb` is the
        part at `origin` reduced by `scale`, largest first."""
        h, w = rgb.shape[:2]
        det = self._detector.process(np.ascontiguousarray(rgb))
        boxes = []
        for d in det.detections or []:
            b = d.location_data.relative_bounding_box
            x, y = origin[0] + b.xmin * w / scale, origin[1] + b.ymin * h / scale
            boxes.append((x, y, b.width * w / scale, b.height * h / scale))
        return sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)

    def _detect_in_tiles(self, rgb: np.ndarray) -> Iterator[list[Box]]:
        """Faces found in overlapping tiles, of half, a quarter, then an eighth of the photo's long
        side (the photo first reduced to TILED_SOURCE_PX), as far as a tile is TILE_MIN_PX and
        until one spans TILE_ENOUGH_PX of the photo: for each tile size, the largest
        TILED_BOXES_MAX, overlaps merged, largest first."""
        h, w = rgb.shape[:2]
        scale = min(1.0, TILED_SOURCE_PX / max(h, w))
        small = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        sh, sw = small.shape[:2]
        for fraction in TILE_FRACTIONS:
            size = int(fraction * max(sh, sw))
            if size < TILE_MIN_PX:
                return
            boxes = [
                box
                for y in _tile_starts(sh, size)
                for x in _tile_starts(sw, size)
                for box in self._detect(small[y : y + size, x : x + size], (x / scale, y / scale), scale)
            ]
            yield _merged(sorted(boxes, key=lambda b: b[2] * b[3], reverse=True)[:TILED_BOXES_MAX])
            if fraction <= EIGHTHS_AFTER and size / scale <= TILE_ENOUGH_PX:  # (halves and quarters always run)
                return

    def _mesh_box(self, rgb: np.ndarray, box: Box) -> np.ndarray | None:
        """The mesh of the face a detection (x, y, w, h) found, from a crop around it, or None."""
        h, w = rgb.shape[:2]
        bx, by, bw, bh = box
        size = max(bw, bh)
        x0 = int(max(0, bx - DETECT_MARGIN * size))
        y0 = int(max(0, by - DETECT_MARGIN * size))
        x1 = int(min(w, bx + bw + DETECT_MARGIN * size))
        y1 = int(min(h, by + bh + DETECT_MARGIN * size))
        crop = rgb[y0:y1, x0:x1]
        if min(crop.shape[:2]) < MESH_CROP_MIN_PX:  # a detection at the image's edge, or beyond it
            return None
        scale = MESH_INPUT_PX / max(crop.shape[:2])
        crop = cv2.resize(
            crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
        )
        lm = self._mesh_on(crop)
        if lm is None:
            return None
        lm = lm / scale
        lm[:, 0] += x0
        lm[:, 1] += y0
        return lm


def _turned_back(landmarks: np.ndarray, turns: int, image_hw: tuple[int, int]) -> np.ndarray:
    """Landmarks found in np.rot90(image, turns), in pixels of `image` (H, W); z unchanged.
    Each of np.rot90's quarter turns is counter-clockwise: a point (x, y) of the image lands at
    (y, W - x) of the turned one (positions measured from the pixels' edges, as the mesh gives
    them; geometry.turned turns pixel indices)."""
    h, w = image_hw
    x, y = landmarks[:, 0], landmarks[:, 1]
    back = landmarks.copy()
    if turns % 4 == 1:
        back[:, 0], back[:, 1] = w - y, x
    elif turns % 4 == 2:
        back[:, 0], back[:, 1] = w - x, h - y
    elif turns % 4 == 3:
        back[:, 0], back[:, 1] = y, h - x
    return back


def roll_degrees(landmarks: np.ndarray) -> float:
    """How far the face is turned in the image plane: the angle of the line from its right eye's
    outer corner to its left's (FaceMesh 33, 263), 0 upright, +-90 sideways, 180 upside down."""
    dx, dy = landmarks[263, :2] - landmarks[33, :2]
    return float(np.degrees(np.arctan2(dy, dx)))


def _tile_starts(length: int, size: int) -> list[int]:
    """Where tiles of `size` start along `length`, half a tile apart, the last flush with the end."""
    last = max(0, length - size)
    return sorted({*range(0, last, max(1, size // 2)), last})


def _merged(boxes: list[Box]) -> list[Box]:
    """Boxes (x, y, w, h) with those overlapping a larger one by more than a third dropped
    (neighbouring tiles find the same face), largest first."""
    kept: list[Box] = []
    for b in sorted(boxes, key=lambda b: b[2] * b[3], reverse=True):
        if all(_overlap(b, k) <= 1 / 3 for k in kept):
            kept.append(b)
    return kept


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / max(1e-9, min(a[2] * a[3], b[2] * b[3]))


def _sketched_face() -> np.ndarray:
    """A drawn face (skin oval, eyes, brows, nose, mouth) on a 192x240 RGB image, which both
    models take for a face: the warm-up's input, as no photo ships with the package."""
    img = np.full((240, 192, 3), 200, np.uint8)
    cv2.ellipse(img, (96, 120), (60, 80), 0, 0, 360, (205, 160, 130), -1)
    for x in (72, 120):
        cv2.ellipse(img, (x, 105), (12, 6), 0, 0, 360, (255, 255, 255), -1)
        cv2.circle(img, (x, 105), 5, (40, 30, 20), -1)
        cv2.line(img, (x - 14, 88), (x + 14, 86), (60, 40, 30), 3)
    cv2.line(img, (96, 110), (92, 140), (170, 120, 100), 2)
    cv2.ellipse(img, (96, 160), (22, 7), 0, 0, 360, (150, 60, 60), -1)
    return img


def _result(lm: np.ndarray, others: int = 0) -> FaceResult:
    x0, y0 = lm[:, :2].min(0)
    x1, y1 = lm[:, :2].max(0)
    return FaceResult(landmarks=lm, box=(float(x0), float(y0), float(x1), float(y1)), others=others)


# a photo in which no face (or only a tiny one) is found, with this share of it near white
# (luma 250 and above), is told that the face may be washed out: a portrait brightened x2.2
# (47 % near white) was refused with no word of why; the shared portraits and 35 stand-ins made
# from them have at most 5 % near white (a face on a cut-out white background is found). A dark
# photo needs no such words: the detector found the example's face at a tenth of its brightness.
WASHED_OUT_SHARE = 0.3


def exposure_hint(rgb: np.ndarray) -> str:
    """Words added to a refusal for want of a face, for a photo much of which is near white."""
    luma = rgb[::4, ::4].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    white = float((luma >= 250).mean())
    if white < WASHED_OUT_SHARE:
        return ""
    return (
        f"; {white:.0%} of the photo is near white: if a face is there, it may be overexposed (a photo in "
        "which the face keeps its shading works)"
    )


def crop_box(face_box, image_hw, expand_ratio: float, crop_to_face: bool) -> tuple[int, int, int, int]:
    """Face box grown by expand_ratio of its size on each side, clamped to the image: x0,y0,x1,y1."""
    h, w = image_hw
    if not crop_to_face:
        return 0, 0, w, h
    x0, y0, x1, y1 = face_box
    bw, bh = x1 - x0, y1 - y0
    # the landmark hull stops at the hairline; leave room above it for the forehead and hair
    y0 -= 0.25 * bh
    bh = y1 - y0
    mx, my = expand_ratio * bw, expand_ratio * bh
    return (
        int(max(0, np.floor(x0 - mx))),
        int(max(0, np.floor(y0 - my))),
        int(min(w, np.ceil(x1 + mx))),
        int(min(h, np.ceil(y1 + my))),
    )


def fit_output(
    box: tuple[int, int, int, int], image_hw: tuple[int, int], min_resolution: int
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """Output size (W, H), multiples of SIZE_MULTIPLE with the short side near min_resolution, and
    the crop (x0, y0, x1, y1, float px) that maps onto it with one uniform scale: the crop is
    nudged by a few pixels rather than the face stretched.
    """
    h, w = image_hw
    x0, y0, x1, y1 = box
    cw, ch = x1 - x0, y1 - y0
    s = min_resolution / min(cw, ch)

    def rnd(v: float) -> int:
        return max(SIZE_MULTIPLE, int(round(v / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    ow, oh = rnd(cw * s), rnd(ch * s)
    while ow / s > w + 1e-6:
        ow -= SIZE_MULTIPLE
    while oh / s > h + 1e-6:
        oh -= SIZE_MULTIPLE
    nw, nh = ow / s, oh / s

    def place(c0, c1, size, limit):
        mid = (c0 + c1) / 2
        lo = min(max(0.0, mid - size / 2), limit - size)
        return lo, lo + size

    nx0, nx1 = place(x0, x1, nw, w)
    ny0, ny1 = place(y0, y1, nh, h)
    return (nx0, ny0, nx1, ny1), (ow, oh)
