"""Decoders by name: the registry, the parameters a decoder honours, and the inputs it is given
(checked cheaply without the face detector, handed to the pipeline as arrays)."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sonic import decoders
from sonic.decoders import (DecoderKind, all_parameters, available, choose_decoder, describe_parameters,
                            get_decoder, register)
from sonic.errors import InvalidParameter
from sonic.media import load_audio, load_image
from sonic.options import GenerateOptions, load_config, parameters
from sonic.settings import SettingsError
from sonic.settings import as_settings, load_settings
from conftest import PORTRAIT, ROOT, SPEECH, read_frames

SHORT = {"min_resolution": 256, "duration": 0.4}     # 10 frames: rendered in this process


class StillKind(DecoderKind):
    """A decoder that shows the frame at rest and honours no head motion."""
    name = "still"
    honours = all_parameters() - {"motion_scale", "inference_steps"}

    def prepare(self, framing, rig, options):
        return _Still(framing.frame)


class _Still:
    def __init__(self, frame):
        self.frame = frame

    def render(self, coeffs, head, out=None):
        if out is None:
            out = np.empty((len(coeffs), *self.frame.shape), np.uint8)
        out[:] = self.frame
        return out


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test."""
    monkeypatch.setattr(decoders, "_REGISTRY", dict(decoders._REGISTRY))
    return decoders._REGISTRY




def test_warp_is_registered_by_name():
    kind = get_decoder("warp")
    assert kind.name == "warp" and "warp" in available()
    assert kind.honours == all_parameters() - {"inference_steps"}
    assert load_config()["decoder"] == "auto"
    assert get_decoder(choose_decoder(as_settings(load_config()))) is kind     # no checkpoints here: warp


def test_unknown_decoder_names_the_known_ones(registry):
    register(StillKind())
    with pytest.raises(InvalidParameter) as e:
        get_decoder("diffusion")
    assert e.value.field == "decoder" and e.value.code == "invalid_parameter"
    assert "'diffusion'" in e.value.message and "sonic, still, warp" in e.value.message


def test_unknown_decoder_setting_fails_at_load():
    from sonic import load_pipeline
    cfg = load_config()
    cfg["decoder"] = "nope"
    with pytest.raises(SettingsError, match='setting decoder must be one of auto, warp, sonic, got "nope"'):
        load_pipeline(cfg)


def test_each_decoder_says_what_each_parameter_means_for_it():
    """Both kinds explain every parameter they honour, and only those; the table names every
    parameter, in the declared order, with the kind's sentence or the generic description."""
    generic = {name: p.description for name, p in parameters().items()}
    for name in ("warp", "sonic"):
        kind = get_decoder(name)
        assert set(kind.meanings) == kind.honours
        table = describe_parameters(kind)
        assert list(table) == list(generic)
        assert all(row == {"honoured": p in kind.honours, "meaning": kind.meanings.get(p, generic[p])}
                   for p, row in table.items())
    warp, sonic = describe_parameters(get_decoder("warp")), describe_parameters(get_decoder("sonic"))
    assert warp["inference_steps"] == {"honoured": False, "meaning": generic["inference_steps"]}
    assert sonic["inference_steps"]["honoured"] and "Euler steps" in sonic["inference_steps"]["meaning"]
    # one name, two different things: the head's amplitude for the warp, the audio's guidance for sonic
    assert "head" in warp["motion_scale"]["meaning"] and "guidance" in sonic["motion_scale"]["meaning"]


def test_a_kind_without_meanings_keeps_the_generic_ones_and_none_for_what_it_ignores(registry):
    still = register(StillKind())
    table = describe_parameters(still)
    assert table["motion_scale"] == {"honoured": False, "meaning": parameters()["motion_scale"].description}
    assert table["fps"] == {"honoured": True, "meaning": parameters()["fps"].description}

    class Confused(StillKind):
        name = "confused"
        meanings = {"fps": "frames a second", "motion_scale": "how far the head would move"}

    with pytest.raises(ValueError, match="motion_scale"):
        register(Confused())
    assert "confused" not in available()


def test_warp_reports_inference_steps_only_away_from_its_default():
    warp = get_decoder("warp")
    assert warp.unused(GenerateOptions.from_dict({})) == ()
    assert warp.unused(GenerateOptions.from_dict({"inference_steps": 25, "motion_scale": 0.5})) == ()
    assert warp.unused(GenerateOptions.from_dict({"inference_steps": 10})) == ("inference_steps",)


def test_unused_warnings_come_from_the_decoders_declaration(pipeline, registry, monkeypatch, tmp_path):
    monkeypatch.setattr(pipeline, "decoder", register(StillKind()))
    res = pipeline(PORTRAIT, SPEECH, pipeline.options({**SHORT, "motion_scale": 0.5, "inference_steps": 10}),
                   out_path=tmp_path / "still.mp4")
    assert [w for w in res.warnings if "not used" in w] == [     # in the parameters' order
        "inference_steps is not used by the still decoder", "motion_scale is not used by the still decoder"]
    frames = read_frames(tmp_path / "still.mp4")
    assert len(frames) == res.frames == 10 and np.abs(frames[0].astype(int) - frames[-1]).mean() < 1


def test_arrays_give_the_same_video_as_paths(pipeline, tmp_path):
    """Decoded inputs are not decoded again; the warp decoder ignores inference_steps (the same
    frames) and says so (one warning more)."""
    limits = load_settings().limits
    a = pipeline(PORTRAIT, SPEECH, pipeline.options(SHORT), out_path=tmp_path / "paths.mp4")
    rgb = load_image(PORTRAIT, limits.max_image_pixels)
    wav = load_audio(SPEECH, limits.max_duration_s)
    b = pipeline(rgb, wav, pipeline.options({**SHORT, "inference_steps": 10}), out_path=tmp_path / "arrays.mp4")
    assert list(b.warnings) == [*a.warnings, "inference_steps is not used by the warp decoder"]
    assert "inference_steps is not used by the warp decoder" not in a.warnings
    keys = ("duration", "frames", "fps", "width", "height", "seed", "lipsync_offset_ms")
    assert [getattr(a, k) for k in keys] == [getattr(b, k) for k in keys]
    fa, fb = read_frames(tmp_path / "paths.mp4"), read_frames(tmp_path / "arrays.mp4")
    assert fa.shape == fb.shape and len(fa) == 10
    assert np.abs(fa.astype(int) - fb).max() <= 2


def test_audio_array_checked_against_the_limits(pipeline, tmp_path):
    from sonic.errors import AudioTooLong, EmptyAudio
    rgb = load_image(PORTRAIT, 10**7)
    with pytest.raises(EmptyAudio):
        pipeline(rgb, np.zeros(16000, np.float32), out_path=tmp_path / "x.mp4")
    too_long = 0.1 * np.ones(int(16000 * (load_settings().limits.max_duration_s + 1)), np.float32)
    with pytest.raises(AudioTooLong):
        pipeline(rgb, too_long, out_path=tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())


def test_check_inputs_needs_no_face_detector(tmp_path):
    """check_inputs in a fresh process: the right codes, and mediapipe never imported."""
    import soundfile as sf
    bad_image = tmp_path / "bad.jpg"
    bad_image.write_bytes(b"not a picture" * 50)
    long_audio = tmp_path / "long.wav"
    sf.write(long_audio, 0.1 * np.ones(16000 * 4, np.float32), 16000)
    script = textwrap.dedent(f"""
        import sys
        from sonic.checks import check_inputs
        from sonic.errors import SonicError
        import dataclasses
        from sonic.options import GenerateOptions
        from sonic.settings import load_settings
        limits = dataclasses.replace(load_settings().limits, max_duration_s=3)
        opts = GenerateOptions.from_dict({{}})
        ok = check_inputs({str(PORTRAIT)!r}, {str(SPEECH)!r}, opts, limits)
        print(ok.rgb.shape, ok.rgb.dtype, ok.wav.dtype, round(ok.audio_s, 1))
        for image, audio in (({str(bad_image)!r}, {str(SPEECH)!r}), ({str(PORTRAIT)!r}, {str(long_audio)!r})):
            try:
                check_inputs(image, audio, opts, limits)
            except SonicError as e:
                print(e.code, e.field)
        print("mediapipe" in sys.modules)
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[1:4] == ["unsupported_media image", "audio_too_long audio", "False"]
    assert p.stdout.startswith("(300, 256, 3) uint8 float32 ")


def test_the_pipeline_runs_on_the_components_it_is_given(pipeline, tmp_path):
    """Face analyzer, phone recognizer and decoder can be handed in: the orchestration (decode,
    duration, motion, batches, writer) runs on stand-ins, and each is used as the contract says."""
    from sonic.pipeline import SonicPipeline
    from sonic.settings import settings_from
    analysed = pipeline.faces.analyze(load_image(PORTRAIT, 10**7))
    calls = {"faces": 0, "phones": 0, "prepare": 0}

    class Faces:
        def analyze(self, rgb):
            calls["faces"] += 1
            return analysed

    def phones(wav):
        calls["phones"] += 1
        return []

    class Counting(StillKind):
        def prepare(self, framing, rig, options):
            calls["prepare"] += 1
            return super().prepare(framing, rig, options)

    small = SonicPipeline(settings_from({"render_processes": 0}), faces=Faces(), phones=phones, decoder=Counting())
    res = small(PORTRAIT, SPEECH, small.options({**SHORT, "motion_scale": 0.5}), out_path=tmp_path / "s.mp4")
    assert calls == {"faces": 1, "phones": 1, "prepare": 1}
    assert "motion_scale is not used by the still decoder" in res.warnings
    frames = read_frames(tmp_path / "s.mp4")
    assert len(frames) == res.frames == 10 and np.abs(frames[0].astype(int) - frames[-1]).mean() < 1


def test_decoding_done_before_the_pipeline_counts_in_its_timings():
    from sonic.checks import CheckedInputs
    timings = {"decode": 0.001, "face": 0.5, "total": 2.0}
    CheckedInputs(rgb=np.zeros((2, 2, 3), np.uint8), wav=np.zeros(16), decode_s=0.25).count_decode_in(timings)
    assert timings == {"decode": 0.251, "face": 0.5, "total": 2.25}


def test_the_service_shows_the_loaded_decoders_meanings(make_client):
    """/api/sonic/params and the OpenAPI document describe each parameter as the loaded decoder
    (here warp) sees it; a parameter it ignores says so."""
    from sonic.decoders import describe_parameters

    client, _ = make_client()
    described = describe_parameters(get_decoder("warp"))
    params = client.get("/api/sonic/params").get_json()["parameters"]
    spec = client.get("/openapi.json").get_json()["components"]["schemas"]["Parameters"]["properties"]
    for name, seen in described.items():
        assert params[name]["description"] == seen["meaning"] and params[name]["honoured"] == seen["honoured"]
        assert spec[name]["description"].startswith(seen["meaning"])
        assert ("not used by the loaded decoder" in spec[name]["description"]) == (not seen["honoured"])
    assert params["inference_steps"]["honoured"] is False


def test_colours_built_channel_by_channel_equal_numpys_broadcast():
    """mouth.tinted and mouth.three (cv2's merge of planes, for speed) give exactly what
    numpy's (H, W, 1) broadcast gives, in the plane's own dtype."""
    from sonic.decoders.warp.mouth import three, tinted
    rng = np.random.default_rng(0)
    colour = np.array([201.5, 98.25, 77.0], np.float32)
    for dtype in (np.float32, np.float64):
        plane = rng.random((37, 53)).astype(dtype)
        assert tinted(colour, plane).dtype == dtype
        assert np.array_equal(tinted(colour, plane), colour.astype(dtype) * plane[..., None])
        assert np.array_equal(three(plane), np.repeat(plane[..., None], 3, axis=2))
