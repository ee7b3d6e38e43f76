import numpy as np
import pytest

from sonic import NoFaceDetected
from sonic.decoders.warp.decoder import WarpDecoder
from sonic.face import crop_box, fit_output
from sonic.media import load_image
from sonic.landmarks import INNER_LOWER, INNER_UPPER
from sonic.motion import COEFFS, build_rig
from sonic.geometry import crop_and_scale
from conftest import EXAMPLES, PORTRAIT


@pytest.fixture(scope="module")
def face_setup(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    face = pipeline.faces.analyze(rgb)
    framing = crop_and_scale(rgb, face.landmarks, crop_box(face.box, rgb.shape[:2], 0.5, True), 256)
    rig = build_rig(framing.landmarks)
    return framing.frame, framing.landmarks, rig, WarpDecoder(framing, rig)


def test_face_found_with_landmarks(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    f = pipeline.faces.analyze(rgb)
    assert f.landmarks.shape == (478, 3)
    x0, y0, x1, y1 = f.box
    assert 40 < x0 < x1 < 220 and 30 < y0 < y1 < 260


def test_no_face(pipeline):
    yy, xx = np.mgrid[0:200, 0:300]
    img = np.stack([xx % 255, yy % 255, (xx + yy) % 255], -1).astype(np.uint8)
    with pytest.raises(NoFaceDetected) as e:
        pipeline.faces.analyze(img)
    assert e.value.code == "no_face_detected"


def test_a_washed_out_face_is_refused_with_its_exposure_named(pipeline):
    """A portrait brightened until the detector loses the face (or finds only a speck of it) says
    that much of the photo is near white; a photo of no face in ordinary light does not."""
    rgb = load_image(EXAMPLES / "astronaut.jpg", 10**7).astype(np.float32)
    with pytest.raises(NoFaceDetected) as e:
        pipeline.faces.analyze(np.clip(rgb * 3.0 + 40, 0, 255).astype(np.uint8))
    assert "of the photo is near white: if a face is there, it may be overexposed" in str(e.value), str(e.value)
    yy, xx = np.mgrid[0:200, 0:300]
    with pytest.raises(NoFaceDetected) as e:
        pipeline.faces.analyze(np.stack([xx % 255, yy % 255, (xx + yy) % 255], -1).astype(np.uint8))
    assert str(e.value) == "no face was found in the image"


def test_small_face_in_large_frame(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    canvas = np.full((1200, 1600, 3), 128, np.uint8)
    canvas[700:1000, 1100:1356] = rgb
    f = pipeline.faces.analyze(canvas)
    assert 1100 < f.box[0] < f.box[2] < 1356 and 700 < f.box[1] < f.box[3] < 1000


def test_fit_output_keeps_one_scale():
    (x0, y0, x1, y1), (w, h) = fit_output((10, 20, 310, 420), (600, 500), 512)
    assert w % 8 == 0 and h % 8 == 0 and min(w, h) in range(504, 521)
    assert (x1 - x0) / w == pytest.approx((y1 - y0) / h, rel=1e-9)
    assert x0 >= 0 and y0 >= 0 and x1 <= 500 and y1 <= 600


def test_crop_box_whole_image():
    assert crop_box((10, 10, 50, 50), (300, 200), 0.5, False) == (0, 0, 200, 300)


def test_zero_motion_is_the_photo(face_setup):
    src, lm, rig, dec = face_setup
    out = dec.render(np.zeros((2, len(COEFFS))), np.zeros((2, 4)))
    assert np.abs(out.astype(int) - src).max() <= 1


def test_jaw_opens_mouth_and_keeps_background(face_setup):
    src, lm, rig, dec = face_setup
    c = np.zeros((1, len(COEFFS)))
    c[0, 0] = 0.15
    out = dec.render(c, np.zeros((1, 4)))[0].astype(int)
    up, lo = lm[INNER_UPPER, :2], lm[INNER_LOWER, :2]
    cx, cy = lm[13, :2].astype(int)
    mouth = np.abs(out[cy - 3:cy + 12, cx - 6:cx + 6] - src[cy - 3:cy + 12, cx - 6:cx + 6]).mean()
    assert mouth > 15
    h, w = src.shape[:2]
    border = np.abs(out - src)
    assert border[:, :8].max() == 0 and border[:, -8:].max() == 0 and border[:8].max() == 0
    # the eyes do not move when the jaw drops
    ey = int(lm[159, 1])
    assert np.abs(out[ey - 4:ey + 4] - src[ey - 4:ey + 4]).mean() < 1.0


def test_blink_closes_eyes(face_setup):
    src, lm, rig, dec = face_setup
    c = np.zeros((1, len(COEFFS)))
    c[0, 3] = 1.0
    out = dec.render(c, np.zeros((1, 4)))[0].astype(int)
    x, y = lm[468, :2].astype(int)                  # iris centre gets covered by the lid
    assert np.abs(out[y - 2:y + 3, x - 2:x + 3] - src[y - 2:y + 3, x - 2:x + 3]).mean() > 8


def test_largest_face_wins(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    small = rgb[::2, ::2]
    canvas = np.full((700, 1000, 3), 200, np.uint8)
    canvas[50:200, 50:178] = small           # small face, left
    canvas[300:600, 600:856] = rgb           # full-size face, right
    f = pipeline.faces.analyze(canvas)
    assert f.box[0] > 600 and f.box[1] > 300


def _turned_photo(rgb: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo turned counter-clockwise on a canvas that holds all of it, and the affine map
    (2, 3) from the photo's pixels to the turned one's."""
    import cv2
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    size = (int(h * sin + w * cos), int(h * cos + w * sin))
    m[:, 2] += np.array(size) / 2 - np.array([w / 2, h / 2])
    return cv2.warpAffine(rgb, m, size, borderMode=cv2.BORDER_REPLICATE), m


@pytest.mark.parametrize("degrees", [90, 135, 180, 225, 270])
def test_a_face_turned_any_way_is_found_where_it_is(pipeline, degrees):
    """A sideways or upside-down photo (its orientation tag lost): the landmarks lie on the face
    as they do upright. Past a quarter turn the mesh alone fitted an upright face onto the hair
    or the chin (its mouth a whole eye-distance away), and the video spoke from there."""
    import cv2
    rgb = load_image(PORTRAIT, 10**7)
    upright = pipeline.faces.analyze(rgb).landmarks[:, :2]
    turned, m = _turned_photo(rgb, degrees)
    found = pipeline.faces.analyze(turned).landmarks[:, :2]
    back = (found - m[:, 2]) @ np.linalg.inv(m[:, :2]).T
    iod = np.linalg.norm(upright[33] - upright[263])
    error = np.linalg.norm(back - upright, axis=1) / iod
    assert np.median(error) < 0.05 and error[[13, 14, 61, 291]].max() < 0.08, (np.median(error), error[[13, 14]])


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_a_turned_photo_speaks_as_the_upright_one_turned(pipeline, turns):
    """The same motion on a photo and on the photo turned gives the same frames, turned: lids
    close over the eyes towards the cheeks and brows rise towards the hair, however the photo
    is turned (the decoder's lids, brows and mouth move along the frame's rows and columns: it
    renders a turned face upright and turns its frames back)."""
    from sonic.geometry import turned
    rgb = load_image(EXAMPLES / "astronaut.jpg", 10**7)  # no glasses: her brows move
    options = pipeline.options({"min_resolution": 256})
    moves = np.zeros((3, len(COEFFS)))
    moves[0, COEFFS.index("jaw")] = 0.2
    moves[1, COEFFS.index("blink")] = 1.0
    moves[2, COEFFS.index("brow")] = 0.05
    upright = pipeline.framing(rgb, options, 3)
    renders = []
    for framing in (upright, turned(upright, turns)):
        decoder = pipeline.decoder.prepare(framing, build_rig(framing.landmarks), options)
        assert decoder.frame.shape == framing.frame.shape
        frames = decoder.render(moves, np.zeros((3, 4)))
        assert frames.shape == (3, *framing.frame.shape)
        renders.append(frames.astype(np.float32))
    back = np.rot90(renders[1], -turns, axes=(1, 2))
    for i, what in enumerate(("mouth", "lids", "brows")):
        moved = np.abs(renders[0][i] - upright.frame).mean()
        assert moved > 0.05 and np.abs(back[i] - renders[0][i]).mean() < 0.05 * moved, what
