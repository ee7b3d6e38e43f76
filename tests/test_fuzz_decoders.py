"""Property-based fuzzing of the decoders: any bytes give an image/audio or a SonicError, never a crash."""
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonic.errors import SonicError
from sonic.media import load_audio, load_image
from conftest import PORTRAIT, SPEECH

PNG_BYTES = None


def _png_bytes():
    global PNG_BYTES
    if PNG_BYTES is None:
        import io
        from PIL import Image
        buf = io.BytesIO()
        Image.open(PORTRAIT).resize((64, 75)).save(buf, format="PNG")
        PNG_BYTES = buf.getvalue()
    return PNG_BYTES


def mutate(data: bytes, edits, cut):
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[: max(1, int(len(b) * cut))])


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=12)
common = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_image(path):
    try:
        rgb = load_image(path, 10**7)
    except SonicError as e:
        assert e.code in ("input_too_large", "unsupported_media") and e.field == "image"
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


@common
@given(data=st.binary(max_size=2048))
def test_image_random_bytes(tmp_path, data):
    p = tmp_path / "x"
    p.write_bytes(data)
    check_image(p)


@common
@given(e=edits, cut=st.floats(0.05, 1.0), which=st.sampled_from(["jpg", "png"]))
def test_image_mutated_real_files(tmp_path, e, cut, which):
    p = tmp_path / "m"
    p.write_bytes(mutate(PORTRAIT.read_bytes() if which == "jpg" else _png_bytes(), e, cut))
    check_image(p)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(e=edits, cut=st.floats(0.0, 1.0))
def test_audio_mutated_real_file(tmp_path, e, cut):
    p = tmp_path / "a"
    p.write_bytes(mutate(SPEECH.read_bytes(), e, cut))
    try:
        wav = load_audio(p, 60)
    except SonicError as err:
        assert err.code in ("unsupported_media", "audio_too_long", "empty_audio", "no_face_detected") and err.field == "audio"
        return
    assert wav.dtype == np.float32 and np.all(np.isfinite(wav)) and np.abs(wav).max() <= 1.0
