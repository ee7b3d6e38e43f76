"""End to end on the bundled public-domain portrait and speech: properties, not bytes."""
import json
import os
import re
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from sonic import EmptyAudio, InvalidParameter, NoFaceDetected, UnsupportedMedia
from sonic.media import FFMPEG
from conftest import PORTRAIT, ROOT, SPEECH, read_frames




def probe(path):
    out = subprocess.run([FFMPEG, "-i", str(path)], capture_output=True, text=True).stderr
    d = re.search(r"Duration: (\d+):(\d+):([\d.]+)", out)
    return out, int(d[1]) * 3600 + int(d[2]) * 60 + float(d[3])


@pytest.fixture(scope="module")
def still_head_run(pipeline, speech_then_silence, tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "talk.mp4"
    opts = pipeline.options({"min_resolution": 256, "motion_scale": 0.0, "seed": 5})
    res = pipeline(PORTRAIT, speech_then_silence, opts, out_path=out)
    return res, out, read_frames(out)


def test_valid_mp4_with_audio_and_duration(still_head_run):
    res, out, frames = still_head_run
    info, dur = probe(out)
    assert "Video: h264" in info and "yuv420p" in info and "Audio: aac" in info
    assert abs(dur - 4.6) <= 1 / 25 + 0.03
    assert len(frames) == res.frames and abs(res.frames / 25 - 4.6) <= 1 / 25
    assert min(frames.shape[1:3]) == 256 and res.width == frames.shape[2]
    assert res.seed == 5 and abs(res.lipsync_offset_ms) <= 40
    assert list(res.timings) == ["decode", "face", "audio", "motion", "decoder_setup", "render", "total"]
    assert res.timings["total"] == round(sum(v for k, v in res.timings.items() if k != "total"), 3)
    assert not list(out.parent.glob(".*.part"))


def test_the_sound_track_keeps_the_recordings_band_and_channels(pipeline, tmp_path):
    """A 48 kHz stereo recording with a tone at 11 kHz (above the 8 kHz the 16 kHz analysis copy
    keeps) and its channels apart: the video's sound has both, and the lip sync is unchanged."""
    import soundfile as sf
    from sonic.media import FFMPEG, load_audio
    speech = load_audio(SPEECH, 60)
    t = np.arange(int(len(speech) * 3)) / 48000
    voice = np.interp(t, np.arange(len(speech)) / 16000, speech)
    left, right = voice + 0.05 * np.sin(2 * np.pi * 11000 * t), 0.5 * voice
    wav = tmp_path / "in.wav"
    sf.write(wav, np.stack([left, right], 1).astype(np.float32), 48000)
    res = pipeline(PORTRAIT, wav, pipeline.options({"min_resolution": 256, "seed": 5}), out_path=tmp_path / "o.mp4")
    info, _ = probe(tmp_path / "o.mp4")
    assert "48000 Hz, stereo" in info
    out = subprocess.run([FFMPEG, "-v", "error", "-i", str(tmp_path / "o.mp4"), "-f", "f32le", "-"],
                         capture_output=True, check=True).stdout
    sound = np.frombuffer(out, np.float32).reshape(-1, 2)
    spectrum = np.abs(np.fft.rfft(sound[:, 0]))
    hz = np.fft.rfftfreq(len(sound), 1 / 48000)
    assert spectrum[(hz > 10950) & (hz < 11050)].mean() > 20 * spectrum[(hz > 9000) & (hz < 10000)].mean()
    level = lambda x: float(np.sqrt(np.mean(x ** 2)))
    assert 1.6 < level(sound[:, 0]) / level(sound[:, 1]) < 3.0           # the channels kept apart
    assert abs(res.lipsync_offset_ms) <= 40


def test_warnings_say_what_a_user_should_know_and_nothing_else(pipeline, tmp_path):
    """Audio that is not a whole number of frames long (2.99 s: 74.75 frames) is not "padded";
    a photo with two faces says which one speaks; a sideways one that it is sideways."""
    import soundfile as sf
    from sonic.media import load_audio, load_image
    wav = tmp_path / "a.wav"
    sf.write(wav, load_audio(SPEECH, 60)[: int(2.99 * 16000)], 16000)
    opts = pipeline.options({"min_resolution": 256, "duration": None})
    one = pipeline(PORTRAIT, wav, opts, out_path=tmp_path / "one.mp4").warnings
    assert not any("padded" in w or "faces" in w or "cut short" in w or "speech" in w for w in one), one
    # the example photo (256x300) is enlarged, and is not told what photos over 16 MP are
    assert [w for w in one if w.startswith("the face is enlarged 1.")] == [
        next(w for w in one if w.endswith("a larger or closer portrait gives a sharper video"))], one
    # a recording with no voice in it (a steady hum: a wrong file, a muted microphone's noise)
    # makes a still face, and says why
    # (also when padded to a longer duration: the padding's silence made the hum read as loud)
    hum = tmp_path / "hum.wav"
    sf.write(hum, 0.1 * np.sin(2 * np.pi * 100 * np.arange(16000) / 16000), 16000)
    still = pipeline(PORTRAIT, hum, pipeline.options({"min_resolution": 256, "duration": 1.5}),
                     out_path=tmp_path / "hum.mp4").warnings
    assert any(w.startswith("no speech found in the audio") for w in still), still
    assert not any("background noise" in w for w in still), still  # one warning says it: no speech
    # speech under loud steady noise (a street, a fan) moves the mouth less: said, with how loud
    speech = load_audio(SPEECH, 60)[: int(2.99 * 16000)]
    noise = np.random.default_rng(0).normal(0, 1, len(speech))
    noisy = tmp_path / "noisy.wav"
    sf.write(noisy, speech + noise * np.sqrt(np.mean(speech**2) / np.mean(noise**2)), 16000)  # 0 dB SNR
    heard = pipeline(PORTRAIT, noisy, opts, out_path=tmp_path / "noisy.mp4").warnings
    assert any(re.fullmatch(r"the recording's loudest moments stand only \d+ dB above its quietest: the speech has "
                            r"background noise or music under it, .*", w)
               for w in heard), heard
    # speech recorded far too loud (cut flat at full scale) is said to be clipped; the clean
    # speech, as loud as a recording gets unclipped (peak at 0.99), and the noisy one are not
    assert not any("clipped" in w for w in one + heard), one + heard
    loud = tmp_path / "clipped.wav"
    sf.write(loud, np.clip(speech * 16, -1, 1), 16000)  # 24 dB of gain: the peak 16.6 dB past full scale
    clipped = pipeline(PORTRAIT, loud, opts, out_path=tmp_path / "clipped.mp4").warnings
    assert any(w.startswith("the recording is clipped") for w in clipped), clipped
    from sonic.pipeline import CLIPPED_WARN_SHARE, clipped_share
    assert clipped_share(0.99 * speech / np.abs(speech).max()) < CLIPPED_WARN_SHARE / 10
    # a second of clean speech without a pause has no quiet frame to tell its background by: not said
    from sonic.audio_features import hear
    assert not hear(load_audio(SPEECH, 60)[int(0.7 * 16000): int(1.7 * 16000)], 25).noisy
    # a file cut short (an upload or a recorder stopped early) says so, not just a shorter video
    cut = tmp_path / "cut.wav"
    cut.write_bytes(wav.read_bytes()[: 44 + 2 * 16000])
    short = pipeline(PORTRAIT, cut, opts, out_path=tmp_path / "cut.mp4").warnings
    assert "the recording says it lasts 3.0 s, but only 1.0 s of it could be decoded: the file may be cut short" \
        in short, short
    photo = load_image(PORTRAIT, 10**7)
    # ... a 12 MP photo whose face is as small is: a crop around the face helps
    wide = cv2.copyMakeBorder(photo, 1350, 1350, 1872, 1872, cv2.BORDER_REPLICATE)
    far = pipeline(wide, wav, pipeline.options({"min_resolution": 256, "duration": 0.4}),
                   out_path=tmp_path / "far.mp4").warnings
    assert any(w.startswith("the face is enlarged") and w.endswith("(a photo over 16 MP is reduced to 16 MP: "
                                                                   "crop it around the face)") for w in far), far
    small = cv2.resize(photo, None, fx=0.8, fy=0.8)
    small = cv2.copyMakeBorder(small, 0, photo.shape[0] - small.shape[0], 0, 0, cv2.BORDER_REPLICATE)
    two = np.concatenate([photo, small], 1)
    res = pipeline(two, wav, opts, out_path=tmp_path / "two.mp4")
    assert "the photo shows 2 faces: the largest speaks, the others stay still" in res.warnings
    assert not any("padded" in w for w in res.warnings)
    # a sideways photo (its orientation tag stripped, as messaging apps do) says so; upright does not
    assert not any("turned" in w for w in one + res.warnings)
    sideways = np.ascontiguousarray(np.rot90(photo))
    res = pipeline(sideways, wav, pipeline.options({"min_resolution": 256, "duration": 0.5}), out_path=tmp_path / "s.mp4")
    assert any(re.match(r"the face is turned (8[5-9]|9[0-5]) degrees in the photo", w) for w in res.warnings), res.warnings


def test_the_stage_timer_and_the_duration_fit():
    from sonic.pipeline import StageTimer, Warnings, fit_to_duration
    timer = StageTimer()
    time.sleep(0.02)
    timer.lap("first")
    timer.lap("second")
    timer.lap("first")                      # a stage timed again keeps its place, with its new time
    assert list(timer.timings) == ["first", "second"] and timer.timings["first"] < 0.01
    assert timer.total == round(sum(timer.timings.values()), 3)
    warnings = Warnings()
    wav = np.ones(16000, np.float32)
    assert fit_to_duration(wav, 1.0, warnings) is wav and warnings.as_tuple() == ()
    assert len(fit_to_duration(wav, 1.5, warnings)) == 24000 and len(fit_to_duration(wav, 0.5, warnings)) == 8000
    assert warnings.as_tuple() == ("duration 1.5 s is longer than the audio (1.00 s): padded with silence",
                                   "audio (1.00 s) trimmed to duration 0.5 s")


def test_mouth_moves_in_speech_and_rests_in_silence(pipeline, still_head_run):
    res, out, frames = still_head_run
    rgb0 = cv2.cvtColor(frames[-1], cv2.COLOR_BGR2RGB)
    lm = pipeline.faces.analyze(rgb0).landmarks
    x0, y0 = lm[[61, 291, 0, 17], :2].min(0).astype(int) - 4
    x1, y1 = lm[[61, 291, 0, 17], :2].max(0).astype(int) + 8
    rest = frames[-1, y0:y1, x0:x1].astype(float)
    diff = np.array([np.abs(f[y0:y1, x0:x1].astype(float) - rest).mean() for f in frames])
    speech, silence = diff[10:70], diff[int(3.5 * 25):]
    assert speech.max() > 12 and np.mean(speech > 4) > 0.4
    assert silence.max() < 2.5


def test_background_unchanged(still_head_run):
    res, out, frames = still_head_run
    f = frames.astype(int)
    for region in (f[:, :20, :20], f[:, :20, -20:], f[:, -15:, :20]):
        d = np.abs(region - region[0])      # only H.264 noise: the decoder copies these pixels
        assert d.mean() < 0.8 and d.max() <= 10


def test_same_seed_same_frames(pipeline, tmp_path):
    opts = pipeline.options({"min_resolution": 256, "seed": 11, "duration": 1.2})
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    pipeline(PORTRAIT, SPEECH, opts, out_path=a)
    pipeline(PORTRAIT, SPEECH, opts, out_path=b)
    fa, fb = read_frames(a), read_frames(b)
    assert fa.shape == fb.shape and np.abs(fa.astype(int) - fb).max() <= 1
    c = tmp_path / "c.mp4"
    pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "seed": 12, "duration": 1.2}), out_path=c)
    assert np.abs(read_frames(c).astype(int) - fa).max() > 3


def test_duration_trims_and_pads(pipeline, tmp_path):
    out = tmp_path / "long.mp4"
    res = pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "duration": 4.0, "fps": 20}), out_path=out)
    assert res.frames == 80 and any("padded" in w for w in res.warnings)
    assert abs(probe(out)[1] - 4.0) <= 0.05 + 1 / 20
    res = pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "duration": 1.0}), out_path=out)
    assert res.frames == 25 and any("trimmed" in w for w in res.warnings)


def test_inference_steps_reported_unused(pipeline, tmp_path):
    res = pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "duration": 0.5, "inference_steps": 10}),
                   out_path=tmp_path / "s.mp4")
    assert "inference_steps is not used by the warp decoder" in res.warnings


def test_failures_leave_no_file(pipeline, tmp_path):
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 90, np.uint8))
    out = tmp_path / "o.mp4"
    with pytest.raises(NoFaceDetected):
        pipeline(blank, SPEECH, out_path=out)
    silent = tmp_path / "silent.wav"
    import soundfile as sf
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    with pytest.raises(EmptyAudio):
        pipeline(PORTRAIT, silent, out_path=out)
    with pytest.raises(UnsupportedMedia):
        pipeline(PORTRAIT, PORTRAIT, out_path=out)
    with pytest.raises(InvalidParameter):
        pipeline.options({"fps": 1000})
    assert list(tmp_path.glob("o.mp4*")) == [] and list(tmp_path.glob(".o.mp4*")) == []


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sonic", "generate", "--quiet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_generates(tmp_path):
    out = tmp_path / "cli.mp4"
    p = run_cli("--image", str(PORTRAIT), "--audio", str(SPEECH), "--out", str(out),
                "--config", '{"min_resolution": 256, "duration": 0.4}')
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["frames"] == 10 and out.stat().st_size > 1000


@pytest.mark.parametrize("args,needle", [
    (["--image", "missing.jpg"], "no such file"),
    (["--image", str(SPEECH)], "image"),
    (["--config", '{"fps": 5}'], "fps"),
    (["--config", '{"colour": 1}'], "colour"),
    (["--config", "{not json"], "JSON"),
    (["--config", "/no/such/params.json"], "no such file"),
    (["--image", "/tmp"], "is a folder"),
    (["--out", "/proc/version/x.mp4"], "--out '/proc/version/x.mp4' lies under '/proc/version', a file"),
    (["--out", "/tmp/" + "x" * 241 + ".mp4"], "the file name is too long: at most 231 bytes"),  # a traceback after the render
    (["--config", "[]"], "--config must be a JSON object"),  # was "no such file"
    (["--out", "-"], "the video cannot go to stdout"),  # a file named "-" was written
    (["--audio", "/dev/stdin"], "is not a regular file (a pipe or a device)"),  # was "no such file"
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    base = {"--image": str(PORTRAIT), "--audio": str(SPEECH), "--out": str(tmp_path / "x.mp4")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    p = run_cli(*[x for kv in base.items() for x in kv])
    assert p.returncode == 2
    last = [l for l in p.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(last) == 1 and needle in last[0] and "Traceback" not in p.stderr
    assert not p.stderr.startswith("\n")  # no blank line where no progress bar was drawn
    assert not (tmp_path / "x.mp4").exists()


def test_what_cannot_be_read_as_parameters_or_settings_is_one_error_not_a_traceback(tmp_path):
    """The CLI's --config and --settings, read as the CLI reads them (its error line is the
    SonicError's message, test_cli_errors_are_one_line): nesting thousands deep, a number of
    4400 digits and bytes that are not UTF-8 were tracebacks, and a FIFO as --settings waited
    forever."""
    import os

    from sonic.__main__ import _params
    from sonic.settings import SettingsError, read_yaml
    deep, not_utf8 = tmp_path / "deep.json", tmp_path / "latin.json"
    deep.write_text("[" * 3000 + "]" * 3000)
    not_utf8.write_bytes(b'{"seed": 7, "x": "\xff"}')
    for text, needle in ((str(deep), "nests arrays or objects too deep"),
                         ('{"seed": ' + "9" * 4400 + "}", "a number too long to read"),
                         (str(not_utf8), "is not UTF-8 text"),
                         ("null", "must be a JSON object .*, got null"),  # was "no such file"
                         ("7", "must be a JSON object .*, got a number"),
                         # Python's parser kept the last of a key given twice; the server's refused it
                         ('{"seed": 1, "fps": 30, "seed": 2}', "gives the key 'seed' twice")):
        with pytest.raises(InvalidParameter, match=needle) as e:
            _params(text)
        assert e.value.field == "config"
    fifo, deep_yaml, latin_yaml = tmp_path / "fifo", tmp_path / "deep.yaml", tmp_path / "latin.yaml"
    os.mkfifo(fifo)
    deep_yaml.write_text("a: " + "[" * 5000 + "]" * 5000)
    latin_yaml.write_bytes(b"\xff\xfe\x00bad")
    # a second `server:` block silently replaced the first (its port, its keys); a merge may override
    twice_yaml, merged_yaml = tmp_path / "twice.yaml", tmp_path / "merged.yaml"
    twice_yaml.write_text("server:\n  port: 5001\noutput_dir: out\nserver:\n  host: 127.0.0.1\n")
    merged_yaml.write_text("base: &b\n  fps: 25\n  seed: 1\ndefaults:\n  <<: *b\n  seed: 2\n")
    for path, needle in ((fifo, "is not a regular file"), (deep_yaml, "nests lists or mappings too deep"),
                         (latin_yaml, "is not UTF-8 text"),
                         (twice_yaml, 'the key "server" is given twice \\(lines 1 and 4\\)')):
        with pytest.raises(SettingsError, match=needle):
            read_yaml(path)
    assert read_yaml(merged_yaml)["defaults"] == {"fps": 25, "seed": 2}
    # a mapping that overrides a merge, itself merged where it is a value: PyYAML writes the merged
    # keys into it, which a check after the merging took for a key given twice
    merged_yaml.write_text("a: &a {x: 1}\nb: &b\n  <<: *a\n  x: 2\n<<: *b\n")
    assert read_yaml(merged_yaml) == {"a": {"x": 1}, "b": {"x": 2}, "x": 2}


def test_default_output_location(pipeline, tmp_path):
    from sonic import load_pipeline
    from sonic.options import load_config
    cfg = load_config()
    cfg["output_dir"] = str(tmp_path / "videos")
    pipe = load_pipeline(cfg)
    res = pipe(PORTRAIT, SPEECH, pipe.options({"min_resolution": 256, "duration": 0.4}))
    assert res.output_path.startswith(str(tmp_path / "videos")) and res.output_path.endswith(".mp4")
    assert (tmp_path / "videos").is_dir() and len(list((tmp_path / "videos").iterdir())) == 1


def test_a_duration_shorter_than_a_frame_makes_one_frame_with_its_sound(pipeline, tmp_path):
    """1e-5 s rounds to no audio sample at all (phone recognition failed on it with a 500): the
    clip is one frame long, and so is its audio."""
    res = pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 256, "duration": 1e-5}), out_path=tmp_path / "s.mp4")
    assert res.frames == 1 and res.duration == pytest.approx(0.04) and (tmp_path / "s.mp4").stat().st_size > 0


def test_writer_failure_leaves_no_file(tmp_path):
    from sonic.sound import Sound
    from sonic.writer import VideoWriter
    out = tmp_path / "w.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, 64, 64, 25, Sound.of_waveform(np.zeros(16000, np.float32)), 1.0) as w:
            w.write(np.zeros((5, 64, 64, 3), np.uint8))
            raise RuntimeError("stage failed mid-video")
    assert list(tmp_path.iterdir()) == []


def test_two_writes_of_one_output_each_leave_a_whole_video(tmp_path):
    """Two CLIs given the same --out shared the writer's temporary names: each removed or cut the
    other's file, and the one that finished reported a video with no streams. Each run now
    writes its own files; the output is whichever finished last, whole."""
    from sonic.sound import Sound
    from sonic.writer import VideoWriter
    out = tmp_path / "same.mp4"
    sound = Sound.of_waveform(np.zeros(16000, np.float32))
    with VideoWriter(out, 64, 64, 25, sound, 1.0) as first, VideoWriter(out, 64, 64, 25, sound, 1.0) as second:
        for shade in range(5):
            first.write(np.full((5, 64, 64, 3), 40 * shade, np.uint8))
            second.write(np.full((5, 64, 64, 3), 200, np.uint8))
        assert len(list(tmp_path.glob(".same.mp4.*.part"))) == 2
    text, duration = probe(out)
    assert duration == pytest.approx(1.0, abs=0.05) and "Video: h264" in text and "Audio: aac" in text, text
    assert list(tmp_path.iterdir()) == [out]
    frames = read_frames(out)  # the first's (it finished last: the second closed inside it)
    assert frames[0].mean() < 10 and abs(frames[-1].mean() - 160) < 10


def test_encoder_faults_are_clear_errors(pipeline, tmp_path, monkeypatch):
    from sonic import PipelineError
    import sonic.writer
    opts = pipeline.options({"min_resolution": 256, "duration": 0.5})
    monkeypatch.setattr(sonic.writer, "FFMPEG", str(tmp_path / "no-ffmpeg-here"))
    with pytest.raises(PipelineError) as e:
        pipeline(PORTRAIT, SPEECH, opts, out_path=tmp_path / "a.mp4")
    assert "ffmpeg" in e.value.message and e.value.code == "pipeline_error"
    monkeypatch.undo()
    with pytest.raises(PipelineError):                       # an unwritable destination
        pipeline(PORTRAIT, SPEECH, opts, out_path="/proc/sonic-test/a.mp4")
    assert list(tmp_path.iterdir()) == []
    res = pipeline(PORTRAIT, SPEECH, opts, out_path=tmp_path / "ok.mp4")     # and it still works after
    assert res.frames == 12 or res.frames == 13


def test_the_cli_exits_2_for_what_the_caller_can_fix_and_1_for_the_rest():
    """Failures that are not the input's (ffmpeg, a full disk, memory taken) exited 2, as bad
    input does: a script could not tell which to retry."""
    from sonic import Busy, InvalidParameter, NoFaceDetected, PipelineError, SonicError
    from sonic.__main__ import exit_code
    from sonic.errors import DiskFull, SetupError
    from sonic.settings import SettingsError
    assert [exit_code(e("x")) for e in (PipelineError, DiskFull, Busy, SonicError)] == [1, 1, 1, 1]
    assert [exit_code(e("x")) for e in (InvalidParameter, NoFaceDetected, SettingsError, SetupError)] == [2, 2, 2, 2]


def test_disk_full_is_a_clear_error(pipeline, tmp_path):
    """A real full filesystem (a 120 kB tmpfs; needs root, as on this project's machines)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        from sonic import PipelineError
        with pytest.raises(PipelineError) as e:
            pipeline(PORTRAIT, SPEECH, pipeline.options({"min_resolution": 512}), out_path=mnt / "v.mp4")
        assert "No space left" in e.value.message and str(mnt) not in e.value.message
        assert e.value.code == "disk_full"
        assert list(mnt.iterdir()) == []
        # the CLI: not the caller's fault, so exit 1 (a script may try again), not bad input's 2
        import signal

        from sonic.__main__ import main
        handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # main() sets its own
        try:
            assert main(["generate", "--image", str(PORTRAIT), "--audio", str(SPEECH), "--out", str(mnt / "v.mp4"),
                         "--quiet"]) == 1
        finally:
            for number, handler in handlers.items():
                signal.signal(number, handler)
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_face_analysis_keeps_other_threads_log_lines(pipeline, capfd):
    """FaceMesh is silenced once, when it loads: lines another thread writes to the process's
    stderr while faces are analysed all arrive."""
    from sonic.media import load_image
    rgb = load_image(PORTRAIT, 10**7)
    pipeline.faces.analyze(rgb)
    capfd.readouterr()
    done = threading.Event()

    def analyse():
        while not done.is_set():
            pipeline.faces.analyze(rgb)

    worker = threading.Thread(target=analyse)
    worker.start()
    try:
        for i in range(400):
            os.write(2, f"log line {i}\n".encode())
            time.sleep(0.0005)
    finally:
        done.set()
        worker.join()
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("log line")]
    assert len(lines) == 400


def test_an_output_too_large_is_refused_before_rendering(pipeline, tmp_path, monkeypatch):
    """With crop_to_face false an extreme aspect ratio would give huge frames: refused, with the
    limit named, before a frame is rendered or a file written."""
    from PIL import Image
    from sonic import InputTooLarge
    import sonic.pipeline
    face = Image.open(PORTRAIT).convert("RGB")
    wide = Image.new("RGB", (12_000, face.height), (90, 120, 150))
    wide.paste(face, (6_000, 0))
    wide.save(tmp_path / "wide.png")
    monkeypatch.setattr(sonic.pipeline, "crop_and_scale", lambda *a, **k: pytest.fail("the frame was built"))
    with pytest.raises(InputTooLarge) as e:
        pipeline(tmp_path / "wide.png", SPEECH, pipeline.options({"crop_to_face": False, "min_resolution": 1024}),
                 out_path=tmp_path / "v.mp4")
    assert "limits.max_output_pixels" in e.value.message and e.value.code == "input_too_large"
    assert list(tmp_path.iterdir()) == [tmp_path / "wide.png"]


def test_a_small_face_in_a_large_photo_is_found(pipeline):
    """A face 60-70 px wide in a 1600x1200 photo (a group or a distant shot) is too small for
    the detector's look at the whole photo: it is found tile by tile, its landmarks where the
    same face's are found on its own; the same face twice is two faces, not one per tile that
    sees it; a photo with no face is still refused."""
    from sonic.media import load_image
    face = load_image(PORTRAIT, 10**7)
    alone = pipeline.faces.analyze(face)
    k = 65 / (alone.box[2] - alone.box[0])                          # the face 65 px wide
    small = cv2.resize(face, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    canvas = np.full((1200, 1600, 3), 235, np.uint8)
    h, w = small.shape[:2]
    canvas[700 : 700 + h, 1000 : 1000 + w] = small
    found = pipeline.faces.analyze(canvas)
    expected = pipeline.faces.analyze(small).landmarks[:, :2] + [1000, 700]
    iod = np.linalg.norm(expected[33] - expected[263])
    assert np.median(np.linalg.norm(found.landmarks[:, :2] - expected, axis=1)) < 0.1 * iod
    canvas[150 : 150 + h, 200 : 200 + w] = small
    assert pipeline.faces.analyze(canvas).others == 1
    with pytest.raises(NoFaceDetected):
        pipeline.faces.analyze(np.full((1200, 1600, 3), 235, np.uint8))
    # in the largest photo the service passes (16 MP), a face 30 px wide (24 can be animated): the
    # tiles of an eighth of the long side find it (in those of a quarter it was 4.7 px: no face)
    k = 30 / (alone.box[2] - alone.box[0])
    small = cv2.resize(face, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    large = np.full((3266, 4899, 3), 235, np.uint8)
    h, w = small.shape[:2]
    large[2000 : 2000 + h, 3000 : 3000 + w] = small
    box = pipeline.faces.analyze(large).box
    assert 2990 < box[0] < 3000 + w and 26 < box[2] - box[0] < 36
    # and a 1280 px photo still gets its quarters: a face of 28 px at the edge of where they stop
    k = 28 / (alone.box[2] - alone.box[0])
    small = cv2.resize(face, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    resized = np.full((960, 1280, 3), 235, np.uint8)
    h, w = small.shape[:2]
    resized[300 : 300 + h, 700 : 700 + w] = small
    assert 690 < pipeline.faces.analyze(resized).box[0] < 700 + w


def test_a_face_too_small_to_animate_is_refused_and_one_cut_off_is_warned_of(pipeline, tmp_path):
    """The tiled look finds faces 20 px wide, and faces in a suit's folds: neither can be
    animated (a photo cropped at the mouth rendered a blurred patch of suit, 7x enlarged, with
    no error). A face cut by the photo's edge renders, with a warning naming that edge."""
    from sonic.media import load_image
    face = load_image(PORTRAIT, 10**7)
    alone = pipeline.faces.analyze(face)
    k = 18 / (alone.box[2] - alone.box[0])
    small = cv2.resize(face, None, fx=k, fy=k, interpolation=cv2.INTER_AREA)
    canvas = np.full((1200, 1600, 3), 235, np.uint8)
    canvas[700 : 700 + small.shape[0], 1000 : 1000 + small.shape[1]] = small
    with pytest.raises(NoFaceDetected, match=r"the only face found is \d+x\d+ pixels, too small to animate"):
        pipeline.faces.analyze(canvas)
    top = int(0.5 * (alone.landmarks[6, 1] + alone.landmarks[1, 1]))  # between the eyes and the nose tip
    result = pipeline(face[top:], SPEECH, pipeline.options({"min_resolution": 256, "duration": 0.4}),
                      out_path=tmp_path / "cut.mp4")
    assert any(w.startswith("the face is cut off by the photo's top edge") for w in result.warnings), result.warnings
    whole = pipeline(face, SPEECH, pipeline.options({"min_resolution": 256, "duration": 0.4}),
                     out_path=tmp_path / "whole.mp4")
    assert not any("cut off" in w for w in whole.warnings)


def test_the_library_checks_what_it_is_handed_as_a_file_is_checked(pipeline, tmp_path):
    """Arrays, PIL images, paths and parameter dicts from a caller's code: each fault a typed error
    naming the field (an RGBA or a float array, a folder, a missing file were IndexError,
    TypeError or FileNotFoundError), what is fine taken as it is."""
    from PIL import Image

    from sonic import SAMPLE_RATE
    from sonic.media import load_audio, load_image

    rgb, wav = load_image(PORTRAIT, 10**8), load_audio(SPEECH, 60)
    out = tmp_path / "lib.mp4"
    bad = [(np.dstack([rgb, rgb[..., :1]]), UnsupportedMedia), (rgb[..., 0], UnsupportedMedia),
           (rgb.astype(np.float32), UnsupportedMedia), (tmp_path, InvalidParameter),
           (tmp_path / "missing.jpg", InvalidParameter), (b"bytes", InvalidParameter)]
    for image, error in bad:
        with pytest.raises(error) as refused:
            pipeline(image, wav, out_path=out)
        assert refused.value.field == "image", image
    with pytest.raises(InvalidParameter, match="no such file") as refused:
        pipeline(rgb, tmp_path / "missing.wav", out_path=out)
    assert refused.value.field == "audio"
    fast = {"min_resolution": 256, "duration": 0.4, "fps": np.int64(25)}  # a dict, numpy's scalars in it
    result = pipeline(Image.open(PORTRAIT), wav, fast, out_path=out)
    assert result.frames == 10 and SAMPLE_RATE == 16_000
    assert list(tmp_path.glob(".lib.mp4*")) == []


def test_threads_sharing_one_pipeline_take_turns(pipeline, tmp_path):
    """One render at a time: from two threads at once the face analyser's graphs were shared and
    gave wrong crops (no error); now the second call waits for the first."""
    import threading

    inside, most, sizes = [0], [0], []
    lock = threading.Lock()

    def progress(stage, fraction):
        with lock:
            if stage == "decode":
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            elif stage == "done":
                inside[0] -= 1

    def render(i):
        result = pipeline(PORTRAIT, SPEECH, {"min_resolution": 256, "duration": 1.0, "seed": i},
                          out_path=tmp_path / f"t{i}.mp4", progress=progress)
        sizes.append((result.width, result.height))

    threads = [threading.Thread(target=render, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert most[0] == 1 and len(set(sizes)) == 1 and len(sizes) == 3, (most, sizes)


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_sigterm_stops_the_cli_as_ctrl_c_does(tmp_path, signal_name):
    """timeout(1), a batch scheduler: SIGTERM mid-render leaves no .part files (it left the
    video's and its sound's), and exits 130 with "interrupted". So does SIGHUP (its terminal
    closed), which left both files."""
    import signal

    out = tmp_path / "long.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "sonic", "generate", "--image", str(PORTRAIT), "--audio",
                             str(SPEECH), "--out", str(out), "--config", '{"min_resolution": 512, "duration": 120}'],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a suite run under nohup hands its ignored SIGHUP on, which the CLI keeps
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".long.mp4*")) and time.monotonic() < deadline:  # rendering
        time.sleep(0.1)
    proc.send_signal(getattr(signal, signal_name))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err, err[-500:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["write_wav", "encoder_command"])
def test_an_interrupt_while_the_writer_starts_leaves_no_part_file(tmp_path, monkeypatch, where):
    """A SIGTERM that lands while the writer writes the sound track (the first file of a render,
    23 MB for 2 minutes) left its .wav.part: the writer was not entered yet, so nothing cleaned
    up. So did one landing just after (`encoder_command`): the encoder's command was made
    outside either step's clean-up (seen in CI, once)."""
    from pathlib import Path

    from sonic import writer
    from sonic.sound import Sound

    def interrupted(*args, **kwargs):
        if where == "write_wav":
            Path(args[0]).write_bytes(b"RIFF")  # begun
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, where, interrupted)
    with pytest.raises(KeyboardInterrupt):
        with writer.VideoWriter(tmp_path / "v.mp4", 64, 64, 25, Sound(np.zeros((100, 2), np.int16), 48000), 1.0):
            pass
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_killed_by_a_signal_says_so(tmp_path, monkeypatch):
    """The kernel's out-of-memory killer (or an operator) ends ffmpeg with SIGKILL, which leaves
    no message: the job's error read "video encoder stopped: no message"."""
    import os
    import signal as signals
    import subprocess

    from sonic import PipelineError, writer
    from sonic.sound import Sound

    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(writer.subprocess, "Popen", popen)
    with pytest.raises(PipelineError, match="killed by signal 9") as e:
        with writer.VideoWriter(tmp_path / "v.mp4", 64, 64, 25, Sound(np.zeros((48000, 2), np.int16), 48000), 1.0) as w:
            os.kill(started[0].pid, signals.SIGKILL)
            started[0].wait()
            for _ in range(25):
                w.write(np.zeros((1, 64, 64, 3), np.uint8))
    assert str(tmp_path) not in e.value.message and not list(tmp_path.glob("*.mp4"))


def test_a_remux_that_cannot_start_says_why(tmp_path, monkeypatch):
    """The second ffmpeg (moving the sound track to the lips) out of file handles: its OSError
    escaped as an internal error."""
    import errno
    import subprocess

    from sonic import PipelineError, writer
    from sonic.sound import Sound

    real_run = subprocess.run

    def no_handles(cmd, *args, **kwargs):
        if "copy" in cmd:  # the remux copies the video stream
            raise OSError(errno.EMFILE, "Too many open files")
        return real_run(cmd, *args, **kwargs)
    monkeypatch.setattr(writer.subprocess, "run", no_handles)
    with pytest.raises(PipelineError, match="ffmpeg could not be started: Too many open files"):
        with writer.VideoWriter(tmp_path / "v.mp4", 64, 64, 25, Sound(np.zeros((48000, 2), np.int16), 48000), 1.0) as w:
            w.audio_delay_s = 0.04
            for _ in range(25):
                w.write(np.zeros((1, 64, 64, 3), np.uint8))
    assert not list(tmp_path.glob("*.mp4"))
