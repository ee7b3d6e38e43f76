"""The library's inputs, as a developer hands them over from Python: whatever is wrong is a
SonicError naming its field, raised before anything is rendered, and leaves the pipeline usable."""
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import PORTRAIT, SPEECH, read_frames
from sonic import SonicError
from sonic.errors import InvalidParameter, PipelineError, UnsupportedMedia
from sonic.media import SAMPLE_RATE, load_audio, load_image

SHORT = {"min_resolution": 256, "duration": 0.4}  # 10 frames


@pytest.fixture(scope="module")
def rgb():
    return load_image(PORTRAIT, 10**7)


@pytest.fixture(scope="module")
def wav():
    return load_audio(SPEECH, 60)[: SAMPLE_RATE]


def test_an_empty_or_tiny_image_is_refused_and_the_pipeline_still_renders(pipeline, rgb, wav, tmp_path):
    """An empty image reached MediaPipe, whose graph then failed every later call of the pipeline."""
    for image in (np.zeros((0, 0, 3), np.uint8), np.zeros((0, 50, 3), np.uint8), np.zeros((20, 400, 3), np.uint8),
                  Image.new("RGB", (0, 0))):
        with pytest.raises(UnsupportedMedia,
                           match=r"image is only \d+x\d+ pixels; a portrait needs 32 or more each way") as e:
            pipeline(image, wav, SHORT, out_path=tmp_path / "x.mp4")
        assert e.value.field == "image"
    # a graph that fails all the same is started afresh: that image's analysis fails, the next succeeds
    with pytest.raises(PipelineError, match="the face analysis failed"):
        pipeline.faces.analyze(np.zeros((0, 0, 3), np.uint8))
    assert pipeline(rgb, wav, SHORT, out_path=tmp_path / "after.mp4").frames == 10


def test_a_portrait_given_as_a_view_of_an_array_renders(pipeline, rgb, wav, tmp_path):
    """A crop or a flip of an array (a view, not contiguous) is a valid portrait: MediaPipe
    refused it, and the pipeline said "the face analysis failed"."""
    pixels = np.asarray(Image.open(PORTRAIT).convert("RGB"))  # (read-only, as Pillow hands them over)
    for name, view in (("crop", pixels[:, 10:-10]), ("mirror", pixels[:, ::-1]), ("bgr", pixels[:, :, ::-1])):
        assert pipeline(view, wav, SHORT, out_path=tmp_path / f"{name}.mp4").frames == 10, name


def test_a_portrait_opened_as_text_is_told_to_be_opened_as_bytes(pipeline, wav, tmp_path):
    """open(path) without "rb": its reads failed deep inside as UnicodeDecodeError."""
    with open(PORTRAIT) as text, pytest.raises(InvalidParameter, match="open the file in binary mode") as e:
        pipeline(text, wav, SHORT, out_path=tmp_path / "x.mp4")
    assert e.value.field == "image"


def test_a_progress_that_is_no_function_a_folder_as_sound_and_no_pipeline_are_refused_by_name(pipeline, rgb, wav,
                                                                                                tmp_path):
    """They were TypeError, IsADirectoryError and AttributeError from inside."""
    from sonic.live import open_session
    for kwargs, field in ((dict(progress=5), "progress"), (dict(sound_file=tmp_path), "sound_file")):
        with pytest.raises(InvalidParameter) as e:
            pipeline(rgb, wav, SHORT, out_path=tmp_path / "x.mp4", **kwargs)
        assert e.value.field == field
    with pytest.raises(InvalidParameter, match="pipeline must be a SonicPipeline"):
        open_session(None, rgb)
    assert not (tmp_path / "x.mp4").exists()


def test_speech_arrays_that_are_not_audio_are_refused_by_name(pipeline, rgb, wav, tmp_path):
    cases = [
        (wav * 100, "speech samples must lie in -1..1; these reach"),  # 16-bit values as floats
        ((wav * 100).astype(np.uint8), "got uint8"),
        (wav > 0, "got bool"),
        (wav.astype(np.complex64), "got complex64"),
        (np.where(np.arange(len(wav)) == 5, np.nan, wav), "NaN or infinite"),
        (np.stack([wav, wav], axis=1), "one channel"),
    ]
    for audio, words in cases:
        with pytest.raises(InvalidParameter, match=words) as e:
            pipeline(rgb, audio, SHORT, out_path=tmp_path / "x.mp4")
        assert e.value.field == "audio"
    with open(SPEECH, "rb") as f, pytest.raises(InvalidParameter, match="an open file is not read"):
        pipeline(rgb, f, SHORT, out_path=tmp_path / "x.mp4")
    assert not list(tmp_path.iterdir())
    # one channel as a column, a little over full scale, 64-bit floats: taken
    assert pipeline(rgb, (1.2 * wav[:, None]).astype(np.float64), SHORT, out_path=tmp_path / "ok.mp4").frames == 10


def test_an_array_at_another_rate_is_resampled_when_its_rate_is_given(pipeline, rgb, wav, tmp_path):
    """A 44.1 kHz array made a video 2.76 times as long, slowed down, without a word."""
    from scipy.signal import resample_poly

    at_44k = resample_poly(wav, 441, 160).astype(np.float32)
    res = pipeline(rgb, at_44k, {"min_resolution": 256}, out_path=tmp_path / "44k.mp4", sample_rate=44_100)
    assert res.duration == pytest.approx(1.0, abs=0.05) and len(read_frames(tmp_path / "44k.mp4")) == res.frames
    sound, rate = sf.read(_sound_of(tmp_path / "44k.mp4", tmp_path), dtype="float32")
    assert rate == 48_000 and abs(len(sound) / rate - 1.0) < 0.1  # the array's sound, at its own length
    for rate, words in ((7, "sample_rate must be a whole number of Hz"), (44_100.0, "whole number"),
                        (True, "whole number")):
        with pytest.raises(InvalidParameter, match=words) as e:
            pipeline(rgb, at_44k, SHORT, out_path=tmp_path / "x.mp4", sample_rate=rate)
        assert e.value.field == "sample_rate"
    with pytest.raises(InvalidParameter, match="sample_rate is for an array"):
        pipeline(rgb, SPEECH, SHORT, out_path=tmp_path / "x.mp4", sample_rate=16_000)


def _sound_of(video, folder):
    """The video's sound track as a WAV (ffmpeg), at the track's own rate."""
    import subprocess

    from sonic.media import FFMPEG

    out = folder / "sound.wav"
    subprocess.run([FFMPEG, "-v", "error", "-y", "-i", str(video), str(out)], check=True)
    return out


def test_where_the_video_cannot_go_is_said_before_anything_is_rendered(pipeline, rgb, wav, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"x")
    speech_copy = tmp_path / "speech.wav"
    sf.write(speech_copy, wav, SAMPLE_RATE)
    cases = [(tmp_path, "is a folder"), (a_file / "video.mp4", "lies under"),
             (speech_copy, "is one of the inputs")]
    for out_path, words in cases:
        stages = []
        with pytest.raises(InvalidParameter, match=words) as e:
            pipeline(rgb, speech_copy, SHORT, out_path=out_path, progress=lambda stage, f: stages.append(stage))
        assert e.value.field == "out_path" and stages == []
    assert a_file.read_bytes() == b"x" and sf.info(speech_copy).frames == len(wav)
    assert pipeline(rgb, wav, SHORT, out_path=tmp_path / "new" / "folder" / "v.mp4").frames == 10
    # the speech handed over as an array, its own file named as out_path: it was written over
    with pytest.raises(InvalidParameter, match="is a file that is not an MP4 video") as e:
        pipeline(rgb, sf.read(speech_copy, dtype="float32")[0], SHORT, out_path=speech_copy)
    assert e.value.field == "out_path" and sf.info(speech_copy).frames == len(wav)
    import subprocess

    from sonic.media import FFMPEG

    memo = tmp_path / "memo.m4a"  # a phone's voice memo: an MP4 file too (its ftyp box), of audio
    subprocess.run([FFMPEG, "-v", "error", "-i", str(speech_copy), str(memo)], check=True)
    before = memo.read_bytes()
    with pytest.raises(InvalidParameter, match="is a file that is not an MP4 video"):
        pipeline(rgb, wav, SHORT, out_path=memo)
    assert memo.read_bytes() == before
    again = tmp_path / "new" / "folder" / "v.mp4"  # a video already there is replaced, as before
    assert pipeline(rgb, wav, SHORT, out_path=again).frames == 10


def test_a_video_named_other_than_mp4_is_written_with_a_warning(pipeline, rgb, wav, tmp_path):
    for name, words in (("clip.avi", "ends in '.avi'"), ("clip", "has no extension")):
        result = pipeline(rgb, wav, SHORT, out_path=tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000
        assert [w for w in result.warnings if w.startswith("the video is an MP4")] == [
            f"the video is an MP4, though its name {words}: name it .mp4"]
    assert not [w for w in pipeline(rgb, wav, SHORT, out_path=tmp_path / "clip.MP4").warnings if "MP4" in w]


def test_every_fault_is_one_catchable_class(pipeline, rgb, wav, tmp_path):
    from sonic import load_pipeline
    from sonic.live import open_session
    from sonic.settings import SettingsError

    with pytest.raises(InvalidParameter, match="options must be a dict of parameters or GenerateOptions, got str"):
        pipeline(rgb, wav, "seed=3", out_path=tmp_path / "x.mp4")
    with pytest.raises(SettingsError) as e:
        load_pipeline({"render_processs": 0})
    assert isinstance(e.value, SonicError) and "did you mean render_processes" in e.value.message
    with pytest.raises(InvalidParameter, match="no such file") as e:
        open_session(pipeline, tmp_path / "nope.jpg")
    assert e.value.field == "image"


def test_a_path_that_cannot_be_searched_or_named_is_refused_by_name(tmp_path):
    """pathlib raises PermissionError where a folder on the way cannot be searched, ValueError for
    a NUL: both InvalidParameter, as every other fault in out_path."""
    import os

    from sonic.checks import writable_video_path

    for bad, words in ((123, "must be a path, got int"), (b"x.mp4", "must be a path, got bytes"),
                       ("a\0b.mp4", "cannot be written")):
        with pytest.raises(InvalidParameter, match=words) as e:
            writable_video_path(bad, ())
        assert e.value.field == "out_path"
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)  # (not /dev/null: a failing check would replace the machine's own)
    for bad, words in ((fifo, "is not a regular file"), (f"{tmp_path}/video.mp4/", "ends with a slash")):
        with pytest.raises(InvalidParameter, match=words):
            writable_video_path(bad, ())
    assert fifo.is_fifo()
    if os.geteuid() == 0:
        return  # root searches every folder
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        with pytest.raises(InvalidParameter, match="cannot be written|not writable"):
            writable_video_path(locked / "inner" / "x.mp4", ())
    finally:
        locked.chmod(0o700)


_FORKED: dict = {}  # what a forked worker finds in its copy of this module (a pipeline cannot be pickled)


def _render_in_a_fork(out) -> str:
    try:
        _FORKED["pipeline"](_FORKED["rgb"], _FORKED["wav"], SHORT, out_path=out)
        return "rendered"
    except SonicError as e:
        return str(e)


def test_a_pipeline_copied_by_fork_says_so_instead_of_hanging(pipeline, rgb, wav, tmp_path):
    """multiprocessing's default on Linux copies the parent's pipeline into each worker, where its
    face analyser's graph waited for good on threads that fork had not copied."""
    import multiprocessing

    _FORKED.update(pipeline=pipeline, rgb=rgb, wav=wav)
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            said = pool.apply_async(_render_in_a_fork, (tmp_path / "forked.mp4",)).get(timeout=60)
    finally:
        _FORKED.clear()
    assert said.startswith("this pipeline was loaded in another process and copied here by fork"), said
    assert not (tmp_path / "forked.mp4").exists()
    pipeline(rgb, wav, SHORT, out_path=tmp_path / "here.mp4")  # the parent's own still renders
