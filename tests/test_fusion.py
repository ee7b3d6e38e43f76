"""Face fusion: POST /fusion and /fusion/batch (contract, errors, access, credits) and the method
itself (sonic/fusion.py): the target untouched at 0 and outside the face, the identity trend
measured with dlib's face embeddings (face_recognition_models, a test-only dependency)."""
import base64
import importlib.util
import io
import os

import numpy as np
import pytest
from werkzeug.datastructures import MultiDict
from PIL import Image

from conftest import EXAMPLES
from server_helpers import FakePipeline, assert_clean_error, settings

SOURCE = EXAMPLES / "astronaut.jpg"
TARGET = EXAMPLES / "portrait.jpg"


def b64(path_or_bytes) -> str:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else path_or_bytes.read_bytes()
    return base64.b64encode(data).decode()


def image_bytes(rgb: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def rgb_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from sonic_server import create_app
    app = create_app(settings(tmp_path_factory.mktemp("fusion")), pipeline=FakePipeline())
    return app.test_client()


def fuse(client, path="/fusion", **fields):
    body = {"source_image": b64(SOURCE), "target_image": b64(TARGET), **fields}
    return client.post(path, json=body)


def test_json_in_base64_out(client):
    r = fuse(client)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["success"] is True and body["request_id"]
    res = body["result"]
    target = rgb_of(TARGET.read_bytes())
    out = rgb_of(base64.b64decode(res["image_base64"]))
    assert out.shape == target.shape and (res["width"], res["height"]) == (target.shape[1], target.shape[0])
    assert set(res["faces"]) >= {"source", "target"} and len(res["faces"]["target"]["box"]) == 4
    assert res["blend_ratio"] == 0.6 and body["timings"]["total"] > 0
    assert Image.open(io.BytesIO(base64.b64decode(res["image_base64"]))).format == "JPEG"
    assert fuse(client, "/api/fusion").status_code == 200                      # the same under /api/


def test_binary_png_and_multipart_and_data_urls(client):
    r = fuse(client, output_format="binary", image_format="png")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.data[:8] == b"\x89PNG\r\n\x1a\n"
    with open(SOURCE, "rb") as s, open(TARGET, "rb") as t:
        r = client.post("/fusion", data={"source_image": (s, "s.jpg"), "target_image": (t, "t.jpg"),
                                         "blend_ratio": "0.3", "swap_eye": "true", "output_format": "binary"})
    assert r.status_code == 200 and r.mimetype == "image/jpeg"
    # each field once (a second source_image was dropped unsaid), and none the route does not read
    for extra, field in ((("source_image", SOURCE), "source_image"), (("blend_ratio", "0.4"), "blend_ratio")):
        with open(SOURCE, "rb") as s, open(TARGET, "rb") as t, open(SOURCE, "rb") as again:
            name, value = extra
            data = [("source_image", (s, "s.jpg")), ("target_image", (t, "t.jpg")), ("blend_ratio", "0.3"),
                    (name, (again, "again.jpg") if value == SOURCE else value)]
            r = client.post("/fusion", data=MultiDict(data), content_type="multipart/form-data")
        assert_clean_error(r, 400, "invalid_parameter", field)
    r = client.post("/fusion", json={"source_image": "data:image/jpeg;base64," + b64(SOURCE),
                                     "target_image": b64(TARGET)})
    assert r.status_code == 200


@pytest.mark.parametrize("fields, status, code, field", [
    ({"source_image": "not base64!"}, 400, "invalid_parameter", "source_image"),
    ({"target_image": ""}, 400, "invalid_parameter", "target_image"),
    ({"blend_ratio": 1.5}, 400, "invalid_parameter", "blend_ratio"),
    ({"blend_ratio": "half"}, 400, "invalid_parameter", "blend_ratio"),
    ({"swap_eye": "maybe"}, 400, "invalid_parameter", "swap_eye"),
    ({"output_format": "pdf"}, 400, "invalid_parameter", "output_format"),
    ({"image_format": "gif"}, 400, "invalid_parameter", "image_format"),
    ({"colour": "red"}, 400, "invalid_parameter", "colour"),
    ({"source_image": 123}, 400, "invalid_parameter", "source_image"),
    ({"target_image": ["x"]}, 400, "invalid_parameter", "target_image"),
    ({"blend_ratio": 10 ** 400}, 400, "invalid_parameter", "blend_ratio"),
    # JSON's own types, as generate's config asks (a form's text fields are read from their words)
    ({"blend_ratio": "0.5"}, 400, "invalid_parameter", "blend_ratio"),
    ({"swap_eye": "false"}, 400, "invalid_parameter", "swap_eye"),
])
def test_bad_fields_are_400_with_the_field_named(client, fields, status, code, field):
    r = fuse(client, **fields)
    assert_clean_error(r, status, code)
    assert r.get_json()["error"]["field"] == field


def test_unsupported_format_too_large_and_no_face(client):
    gif = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 150, 120)).save(gif, format="GIF")
    r = fuse(client, source_image=b64(gif.getvalue()))
    assert_clean_error(r, 400, "invalid_parameter")
    assert "PNG, JPEG or WebP" in r.get_json()["error"]["message"] and r.get_json()["error"]["field"] == "source_image"
    assert_clean_error(client.post("/fusion", data=b"{}", content_type="text/plain"), 400, "invalid_parameter")
    huge = b64(os.urandom(3 * 1024 * 1024))                                 # over the 2 MB test limit
    assert_clean_error(fuse(client, target_image=huge), 413, "input_too_large")
    gray = image_bytes(np.full((240, 200, 3), 128, np.uint8))
    for name in ("source_image", "target_image"):
        r = fuse(client, **{name: b64(gray)})
        assert_clean_error(r, 422, "no_face_detected")
        assert r.get_json()["error"]["field"] == name and name.split("_")[0] in r.get_json()["error"]["message"]


def test_batch_one_bad_pair_does_not_fail_the_others(client):
    good = {"source_image": b64(SOURCE), "target_image": b64(TARGET)}
    gray = b64(image_bytes(np.full((240, 200, 3), 128, np.uint8)))
    r = client.post("/fusion/batch", json={"pairs": [good, {**good, "target_image": gray}, {**good, "blend_ratio": 0.2}],
                                           "image_format": "png"})
    assert r.status_code == 200
    body = r.get_json()
    assert (body["succeeded"], body["failed"], body["success"]) == (2, 1, False)
    assert [x["success"] for x in body["results"]] == [True, False, True]
    assert body["results"][1]["error"]["code"] == "no_face_detected" and body["results"][1]["error"]["status"] == 422
    assert body["results"][2]["result"]["blend_ratio"] == 0.2
    assert rgb_of(base64.b64decode(body["results"][0]["result"]["image_base64"])).shape[:2] == (300, 256)
    assert_clean_error(client.post("/fusion/batch", json={"pairs": [good] * 9}), 400, "invalid_parameter")
    assert_clean_error(client.post("/fusion/batch", json={"pairs": []}), 400, "invalid_parameter")


def test_ratio_zero_keeps_the_target_and_nothing_outside_the_face_changes(client):
    target = rgb_of(TARGET.read_bytes())
    r = fuse(client, blend_ratio=0, output_format="binary", image_format="png")
    assert np.array_equal(rgb_of(r.data), target)                  # SSIM 1 in the face: untouched
    diffs = []
    for ratio in (0.25, 0.5, 0.75, 1.0):
        body = fuse(client, blend_ratio=ratio, image_format="png").get_json()["result"]
        out = rgb_of(base64.b64decode(body["image_base64"]))
        x0, y0, x1, y1 = body["faces"]["fused_box"]
        outside = np.ones(target.shape[:2], bool)
        outside[y0:y1, x0:x1] = False
        assert np.array_equal(out[outside], target[outside])          # background, hair, clothes: the target's
        diffs.append(float(np.abs(out[y0:y1, x0:x1].astype(int) - target[y0:y1, x0:x1]).mean()))
    assert diffs == sorted(diffs) and diffs[0] > 1.0, diffs           # more of the source as the ratio grows


def test_the_same_access_control_rate_limit_and_credits(tmp_path):
    from sonic_server import create_app
    keyed = create_app(settings(tmp_path / "a", api_keys=["fusion-key"], rate_limit_per_s=0.01, rate_limit_burst=3),
                       pipeline=FakePipeline()).test_client()
    assert_clean_error(fuse(keyed), 401, "unauthorized")
    assert fuse(keyed, blend_ratio=0).status_code == 401
    assert keyed.post("/fusion", json={}, headers={"Authorization": "Bearer fusion-key"}).status_code == 400
    assert fuse(keyed).status_code == 401
    r = fuse(keyed)                                                    # the address's 3 tokens are spent
    assert_clean_error(r, 429, "rate_limited")
    assert r.headers["Retry-After"]
    cfg = settings(tmp_path / "c")
    cfg["credits"] = {"enabled": True, "per_fusion": 2}
    app = create_app(cfg, pipeline=FakePipeline())
    ledger = app.extensions["sonic"].ledger
    try:
        _, key = ledger.create_account("pix", credits=5)
        c = app.test_client()
        auth = {"Authorization": f"Bearer {key}"}
        body = {"source_image": b64(SOURCE), "target_image": b64(TARGET)}
        same_id = {**auth, "X-Request-ID": "1"}                            # a client's id names no hold
        assert c.post("/fusion", json=body, headers=same_id).status_code == 200
        assert c.post("/fusion", json=body, headers=same_id).status_code == 200
        assert ledger.account("pix")["balance"] == 1
        ledger.recharge(["pix"], 4, "more", "atomic", "test")
        gray = b64(image_bytes(np.full((240, 200, 3), 128, np.uint8)))
        assert c.post("/fusion", json={**body, "target_image": gray}, headers=auth).status_code == 422
        assert ledger.account("pix")["balance"] == 5                    # the failed one cost nothing
        r = c.post("/fusion/batch", json={"pairs": [body, body, body]}, headers=auth)
        assert_clean_error(r, 402, "insufficient_credits")
        assert (r.get_json()["error"]["needed"], r.get_json()["error"]["balance"]) == (6, 5)
        assert ledger.check() == []
    finally:
        app.extensions["sonic"].settler.stop()
        ledger.close()


# -- the identity trend -------------------------------------------------------------------------
def _dlib_embedder():
    """dlib's face embedding (128-d; same person below about 0.6), from face_recognition_models'
    files (found without importing that package, which needs pkg_resources)."""
    import dlib
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None:
        pytest.fail("face_recognition_models is not installed (requirements.txt)")
    models = os.path.join(spec.submodule_search_locations[0], "models")
    detector = dlib.get_frontal_face_detector()
    shapes = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
    net = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))

    def embed(rgb):
        faces = detector(rgb, 1)
        assert faces, "dlib found no face"
        face = max(faces, key=lambda f: f.width() * f.height())
        return np.array(net.compute_face_descriptor(rgb, shapes(rgb, face)))
    return embed


def identity_distances(source, target, ratios, analyzer, embed):
    from sonic.fusion import fuse as fuse_faces
    es, et = embed(source), embed(target)
    out = []
    for r in ratios:
        e = embed(fuse_faces(source, target, analyzer, r).image)
        out.append((r, float(np.linalg.norm(e - es)), float(np.linalg.norm(e - et))))
    return out


def test_the_identity_moves_from_the_target_to_the_source_as_the_ratio_grows():
    from sonic.face import FaceAnalyzer
    embed = _dlib_embedder()
    analyzer = FaceAnalyzer()

    def up(path, side=512):
        im = Image.open(path).convert("RGB")
        s = side / max(im.size)
        return np.asarray(im.resize((round(im.size[0] * s), round(im.size[1] * s)), Image.LANCZOS))
    for src, tgt in ((SOURCE, TARGET), (TARGET, SOURCE)):
        d = identity_distances(up(src), up(tgt), (0.0, 0.5, 1.0), analyzer, embed)
        to_source = [x[1] for x in d]
        to_target = [x[2] for x in d]
        assert to_source == sorted(to_source, reverse=True), d        # nearer the source ...
        assert to_target == sorted(to_target), d                       # ... and further from the target
        assert to_target[0] < 0.05 and to_target[-1] > 0.3, d
