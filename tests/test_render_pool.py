"""Frames rendered by the helper processes: the same pixels as in this process, in order; a helper
that dies fails the request with a clear error and the next request works; helpers go away with
the pool; a script without a `__main__` guard can use the pipeline."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sonic.decoders import get_decoder
from sonic.errors import PipelineError
from sonic.face import crop_box
from sonic.geometry import crop_and_scale
from sonic.media import load_image
from sonic.motion import COEFFS, build_rig
from sonic.options import GenerateOptions
from sonic.phones_pool import PhonesPool
from sonic.render_pool import RenderPool
from conftest import PORTRAIT, SPEECH


@pytest.fixture(scope="module")
def decoder(pipeline):
    rgb = load_image(PORTRAIT, 10**7)
    face = pipeline.faces.analyze(rgb)
    framing = crop_and_scale(rgb, face.landmarks, crop_box(face.box, rgb.shape[:2], 0.5, True), 256)
    # prepared through the registry, as the pipeline does: what the helpers get is what it hands them
    return get_decoder("warp").prepare(framing, build_rig(framing.landmarks), GenerateOptions())


def _motion(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    coeffs = np.zeros((n, len(COEFFS)))
    coeffs[:, COEFFS.index("jaw")] = np.clip(np.sin(np.arange(n) / 3), 0, 1)
    head = np.column_stack([0.03 * np.sin(np.arange(n) / 5), rng.normal(0, 1, n), rng.normal(0, 1, n), np.zeros(n)])
    return coeffs, head


@pytest.fixture
def pools():
    """RenderPool(n) for a test; every pool made is closed afterwards."""
    made = []

    def make(n: int) -> RenderPool:
        made.append(RenderPool(n))
        return made[-1]
    yield make
    for pool in made:
        pool.close()


def _renders_as_here(pool: RenderPool, decoder, coeffs, head, batch: int = 4) -> None:
    frames = np.concatenate(list(pool.frames(decoder, coeffs, head, batch)))
    np.testing.assert_array_equal(frames, decoder.render(coeffs, head))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"


def test_helpers_render_the_same_frames_in_order(decoder, pools):
    coeffs, head = _motion(37)
    pool = pools(2)
    batches = list(pool.frames(decoder, coeffs, head, 4))
    assert [len(b) for b in batches] == [4] * 9 + [1]
    np.testing.assert_array_equal(np.concatenate(batches), decoder.render(coeffs, head))
    # a second request with another decoder state reuses the helpers
    _renders_as_here(pool, decoder, coeffs[::-1].copy(), head[::-1].copy(), 8)


def test_a_dead_helper_fails_the_request_clearly_and_the_next_one_works(decoder, pools):
    coeffs, head = _motion(40)
    pool = pools(2)
    pool.start()
    victim = pool.pids()[1]
    with pytest.raises(PipelineError, match="render process stopped"):
        for i, _ in enumerate(pool.frames(decoder, coeffs, head, 4)):
            if i == 0:
                os.kill(victim, signal.SIGKILL)
    assert not _alive(victim)
    _renders_as_here(pool, decoder, coeffs, head)
    assert victim not in pool.pids()


def test_helpers_and_ffmpeg_are_the_ones_the_kernel_kills_first_when_memory_runs_out(pools, tmp_path, monkeypatch):
    """Under a container's memory cap the service (the largest process, holding every job and
    session) was the one the kernel killed; a helper or an ffmpeg killed fails one job by name."""
    def score(pid) -> int:
        return int(open(f"/proc/{pid}/oom_score_adj").read())
    pool = pools(2)
    pool.start()
    assert [score(pid) for pid in pool.pids()] == [1000, 1000] and score("self") < 1000
    import sonic.writer
    started = []
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]
    monkeypatch.setattr(sonic.writer.subprocess, "Popen", popen)
    from sonic.sound import Sound
    from sonic.writer import VideoWriter
    sound = Sound.of_waveform(np.zeros(16000, np.float32))
    with VideoWriter(tmp_path / "v.mp4", 64, 64, 25, sound, 1.0) as writer:
        assert score(started[0].pid) == 1000
        writer.write(np.zeros((25, 64, 64, 3), np.uint8))
    assert (tmp_path / "v.mp4").stat().st_size > 0


def test_an_abandoned_request_leaves_the_helpers_in_step(decoder, pools):
    coeffs, head = _motion(40)
    pool = pools(2)
    gen = pool.frames(decoder, coeffs, head, 4)
    next(gen)
    gen.close()                     # e.g. the job was cancelled after its first batch
    pids = pool.pids()
    _renders_as_here(pool, decoder, coeffs, head)
    assert pool.pids() == pids      # drained, not restarted


def test_helpers_exit_with_the_pool_and_dead_requests_files_are_swept(decoder):
    from sonic.render_pool import TMP_PREFIX, scratch_root
    import tempfile
    from pathlib import Path
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = Path(scratch_root() or tempfile.gettempdir()) / f"{TMP_PREFIX}{dead}-x"
    stale.mkdir()
    (stale / "frames.buf").write_bytes(b"0" * 1000)
    pool = RenderPool(2)
    pool.start()
    assert not stale.exists()
    pids = pool.pids()
    assert all(_alive(p) for p in pids)
    pool.close()
    assert not any(_alive(p) for p in pids)


def test_a_script_without_a_main_guard_can_generate(tmp_path):
    """The helpers are not started with multiprocessing's spawn, which re-runs the caller's
    script; a plain script (as in the README) works, and leaves no process behind."""
    out = tmp_path / "out.mp4"
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys\n"
        "from sonic import load_pipeline\n"
        "pipe = load_pipeline()\n"
        f"res = pipe({str(PORTRAIT)!r}, {str(SPEECH)!r}, pipe.options({{'duration': 0.8, 'min_resolution': 256}}),"
        f" out_path={str(out)!r})\n"
        "print(res.frames)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "20" and out.stat().st_size > 1000
    time.sleep(0.5)
    orphans = []
    for d in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{d}/cmdline", "rb").read()
            parent = open(f"/proc/{d}/stat").read().split(")")[1].split()[2]
        except (OSError, ValueError):
            continue
        if b"sonic._render_helper" in cmd and parent == "1":
            orphans.append(d)
    assert not orphans, "render helpers outlived their parent"


# ------------------------------------------------------------------ phones in two halves
def _two_sentences():
    import soundfile as sf
    wav, sr = sf.read(SPEECH, dtype="float32")
    assert sr == 16000
    return np.concatenate([wav, np.zeros(int(0.6 * sr), np.float32), wav])


def test_a_long_recording_is_cut_in_its_middle_pause():
    from sonic.audio_features import SPEECH_THRESHOLD, frame_loudness, normalise_loudness, pause_split
    wav = _two_sentences()
    n = int(len(wav) / 16000 * 25)
    speech = normalise_loudness(frame_loudness(wav, n, 25)) > SPEECH_THRESHOLD
    cut = pause_split(speech, 25)
    first = len(wav) // 2 - int(0.3 * 16000)
    assert cut is not None and first < cut < first + int(0.6 * 16000)      # inside the silence
    assert pause_split(speech[:100], 25) is None            # 4 s: too short to be worth it
    assert pause_split(np.ones(400, bool), 25) is None      # no pause: one piece


def test_halves_recognised_beside_each_other_give_the_visemes_of_the_whole(pipeline, decoder, pools):
    from sonic.audio_features import encode_audio
    wav = _two_sentences()
    n = int(len(wav) / 16000 * 25)
    whole = encode_audio(wav, n, 25, pipeline.phones)
    pool = pools(1)
    with PhonesPool(pool).second_half() as second:
        halves = encode_audio(wav, n, 25, pipeline.phones, second)
    for a, b in ((whole.vis_open, halves.vis_open), (whole.vis_spread, halves.vis_spread),
                 (whole.vis_closure, halves.vis_closure)):
        assert np.mean(np.abs(a - b)) < 0.03
    assert len(halves.phones) > 10
    # the helper is in step afterwards: a frames request works
    assert pool.pids()
    _renders_as_here(pool, decoder, *_motion(12))


def test_a_helper_lost_while_recognising_fails_clearly_and_the_next_request_works(decoder, pools):
    wav = _two_sentences()
    pool = pools(1)
    pool.start()
    phones = PhonesPool(pool)
    with pytest.raises(PipelineError, match="render process stopped"):
        with phones.second_half() as start:
            job = start(wav)
            os.kill(pool.pids()[0], signal.SIGKILL)
            job.result()
    coeffs, head = _motion(20)
    _renders_as_here(pool, decoder, coeffs, head)
    # an answer left unread (the caller failed first) is read on leaving
    with pytest.raises(RuntimeError):
        with phones.second_half() as start:
            start(wav)
            raise RuntimeError("first half failed")
    _renders_as_here(pool, decoder, coeffs, head)


def test_phones_are_left_to_the_caller_while_the_helpers_render(decoder, pools):
    """The helpers serve one request at a time: while one renders, a second half is not started
    (start returns None) and the render is not disturbed."""
    pool = pools(1)
    coeffs, head = _motion(12)
    rendering = pool.frames(decoder, coeffs, head, 4)
    first = next(rendering)
    with PhonesPool(pool).second_half() as start:
        assert start(_two_sentences()) is None
    rest = list(rendering)
    np.testing.assert_array_equal(np.concatenate([first, *rest]), decoder.render(coeffs, head))


def test_closing_does_not_wait_for_a_request_using_the_helpers():
    """At the interpreter's exit the pool closes; a job still rendering held that exit until it
    ended (22 s in a review's run, past docker's 10 s). The helpers are stopped under it."""
    import threading
    import time

    pool = RenderPool(1)
    holding, release = threading.Event(), threading.Event()

    def request():
        with pool.lend() as line:
            assert line is not None
            holding.set()
            release.wait(30)

    user = threading.Thread(target=request)
    user.start()
    try:
        assert holding.wait(30)
        pids = pool.pids()
        t0 = time.monotonic()
        pool.close()
        assert time.monotonic() - t0 < 5 and not any(_alive(p) for p in pids)
    finally:
        release.set()
        user.join(10)
