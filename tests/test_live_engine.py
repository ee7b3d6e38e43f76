"""The live engine (sonic/live/), without a server: streamed motion against the offline motion of
the same audio, independence from how the audio is chunked, idling, speaking, interrupting,
seeds, and the frame clock."""

import threading

import numpy as np
import pytest

from conftest import PORTRAIT, SPEECH
from sonic.audio_features import encode_audio
from sonic.live import open_session
from sonic.live.motion import NoiseStream
from sonic.media import SAMPLE_RATE, load_audio
from sonic.motion import HEAD_NOISE_S, blinks, mouth_track, seeded_streams, smooth_noise

FPS = 25
HOP = SAMPLE_RATE // FPS
PARAMS = {"min_resolution": 256, "seed": 7}


@pytest.fixture(scope="module")
def speech():
    return load_audio(SPEECH, 60)


def run(session, n, render=False):
    """n frames from a session (the frames before the look-ahead is filled are skipped)."""
    out = []
    while len(out) < n:
        frame = session.step(render=render)
        if frame.index >= 0:
            out.append(frame)
    return out


def test_streamed_mouth_follows_the_offline_mouth_of_the_same_audio(pipeline, speech):
    """Differences come from the loudness range (tracked over what was heard, offline: the
    clip's), the recogniser's partial results and the 80 ms look-ahead of the smoothing; they
    stay bounded and the timing is the same (no lag)."""
    session = open_session(pipeline, PORTRAIT, PARAMS)
    session.speak(speech)
    n = len(speech) // HOP
    live = np.array([f.opening for f in run(session, n)])
    feats = encode_audio(speech, n, FPS, pipeline.phones)
    opening, _, closure = mouth_track(feats, 1.0, True)
    offline = opening * (1 - np.clip(np.maximum(closure, feats.vis_closure), 0, 1))
    assert np.corrcoef(live, offline)[0, 1] > 0.8
    assert np.abs(live - offline).mean() < 0.1
    lags = range(-3, 4)
    scores = [np.corrcoef(live[3 + k : n - 3 + k], offline[3 : n - 3])[0, 1] for k in lags]
    assert lags[int(np.argmax(scores))] == 0


@pytest.mark.parametrize("chunk_s", [0.01, 0.02, 0.1, "random"])
def test_the_output_does_not_depend_on_how_the_audio_is_chunked(pipeline, speech, chunk_s):
    """Microphone audio arriving in any chunk sizes, just in time, gives the same frames."""
    rng = np.random.default_rng(1)
    reference = open_session(pipeline, PORTRAIT, PARAMS)
    reference.hear(speech)  # all at once is the reference ...
    sizes = []
    for _ in range(len(speech)):
        sizes.append(int(rng.integers(1, 3200)) if chunk_s == "random" else int(chunk_s * SAMPLE_RATE))
        if sum(sizes) >= len(speech):
            break
    session = open_session(pipeline, PORTRAIT, PARAMS)
    fed, want, got = 0, [], []
    chunks = iter(np.split(speech, np.cumsum(sizes)[:-1]))
    frames = 60
    reference_frames = [reference.step() for _ in range(frames)]
    for tick in range(frames):
        while fed < (tick + 1) * HOP:  # ... here each tick's audio is there just in time
            chunk = next(chunks)
            session.hear(chunk)
            fed += len(chunk)
        got.append(session.step())
    for a, b in zip(reference_frames, got):
        want.append(a.opening)
        assert a.index == b.index and a.opening == pytest.approx(b.opening, abs=1e-9)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.audio, b.audio)
    assert max(want) > 0.3  # the clip's first 2 s hold speech: the comparison is not of silence


def test_silence_idles_with_blinks_and_drift_and_no_mouth(pipeline):
    session = open_session(pipeline, PORTRAIT, PARAMS)
    frames = run(session, 10 * FPS, render=True)
    opening = np.array([f.opening for f in frames])
    assert opening.max() < 0.02 and not any(f.speaking for f in frames)
    images = np.array([f.image for f in frames[::5]]).astype(np.int16)
    assert np.abs(np.diff(images, axis=0)).mean() > 0.05  # breathing and drift: the picture is not frozen
    blink = np.array([f.blink for f in frames])
    starts = np.flatnonzero((blink[1:] > 0.5) & (blink[:-1] <= 0.5))
    assert 1 <= len(starts) <= 7 and blink.max() == 1.0  # a natural rate, each blink fully shut


def test_seeded_parts_equal_a_files(pipeline):
    """The head's noise and the blinks are drawn from the same generators in the same order as
    offline: the same seed gives the same values."""
    rng_head = seeded_streams(11)[0]
    offline = smooth_noise(300, FPS, HEAD_NOISE_S, 3, rng_head)
    stream = NoiseStream(FPS, HEAD_NOISE_S, 3, seeded_streams(11)[0])
    assert np.allclose(np.array([stream.next() for _ in range(300)]), offline)
    session = open_session(pipeline, PORTRAIT, {**PARAMS, "seed": 11})
    streamed = np.array([f.blink for f in run(session, 400)])
    assert np.allclose(streamed, blinks(400, FPS, seeded_streams(11)[1])[0])
    assert streamed.max() == 1.0


def test_speech_opens_the_mouth_and_it_rests_after(pipeline, speech):
    session = open_session(pipeline, PORTRAIT, PARAMS)
    session.speak(speech[: 2 * SAMPLE_RATE])
    frames = run(session, 3 * FPS)
    opening = np.array([f.opening for f in frames])
    assert opening[: 2 * FPS].max() > 0.4
    assert opening[int(2.4 * FPS) :].max() < 0.03  # 0.4 s after the speech ended, at rest
    assert frames[FPS].speaking and not frames[-1].speaking
    heard = np.concatenate([f.audio for f in frames])
    assert np.array_equal(heard[: 2 * SAMPLE_RATE], speech[: 2 * SAMPLE_RATE])  # the speech itself, in order


def test_interrupt_closes_the_mouth_within_a_few_frames(pipeline, speech):
    session = open_session(pipeline, PORTRAIT, PARAMS)
    queued = session.speak(speech)
    assert queued == pytest.approx(len(speech) / SAMPLE_RATE)
    frames = run(session, FPS)  # 1 s in: speaking
    assert max(f.opening for f in frames) > 0.3
    assert frames[-1].speaking
    session.interrupt()
    assert session.queued_s == 0 and not session.speaking  # at once: no hold after the last word
    after = run(session, FPS)
    assert not any(f.speaking for f in after), [f.speaking for f in after]
    assert max(f.opening for f in after[3:]) < 0.03
    assert not np.any(np.concatenate([f.audio for f in after[1:]]))  # what was queued is not heard
    # a stream sent in parts carries the turn it began in: the interrupt ended that turn
    assert session.turn == 1
    assert session.speak(speech[:SAMPLE_RATE], turn=0) == 0
    assert session.speak(speech[:SAMPLE_RATE], turn=1) == pytest.approx(1.0)


def test_seeds_reproduce_and_differ(pipeline, speech):
    def frames(seed):
        session = open_session(pipeline, PORTRAIT, {**PARAMS, "seed": seed})
        session.speak(speech[:SAMPLE_RATE])
        return np.array([f.image for f in run(session, 40, render=True)])

    a, b, c = frames(3), frames(3), frames(4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_the_frame_clock_numbers_frames_in_order_on_time(pipeline):
    session = open_session(pipeline, PORTRAIT, PARAMS)
    stop = threading.Event()
    got = []
    for frame in session.frames(stop):
        got.append(frame)
        if len(got) == 30:
            stop.set()
    indices = [f.index for f in got]
    assert indices == list(range(30))  # from the first frame with motion: no still picture before it
    assert all(f.time_s == pytest.approx(f.index / FPS) for f in got)
    assert np.diff([f.due_at for f in got]) == pytest.approx(np.full(29, 1 / FPS))


def test_a_decoder_that_speaks_cannot_run_live(pipeline):
    from sonic.errors import InvalidParameter
    from sonic.live import check_live_decoder

    with pytest.raises(InvalidParameter, match="cannot run live") as e:
        check_live_decoder(True, "sonic")
    assert e.value.field == "decoder"


def test_speech_in_other_shapes_and_types_is_taken_or_refused_by_name():
    """A library caller's speech: int16 PCM as a TTS engine gives it is scaled, a (n, 1) column
    taken; a stereo array (which would play as one voice at half speed), NaN or bytes refused."""
    from sonic.errors import InvalidParameter
    from sonic.live.session import mono_samples
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    assert np.allclose(mono_samples(pcm), [0, 0.5, -1, 32767 / 32768])
    assert mono_samples(pcm[:, None] / 32768.0).shape == (4,)
    for bad, needle in ((np.zeros((100, 2), np.float32), "one channel, shape (n,); got shape (100, 2)"),
                        (np.array([0.1, np.nan], np.float32), "NaN or infinite"),
                        (np.array([0.1, np.inf]), "NaN or infinite"),
                        (np.zeros(4, np.uint8), "float (-1..1), int16 or int32 samples; got uint8")):
        with pytest.raises(InvalidParameter) as e:
            mono_samples(bad)
        assert needle in str(e.value) and e.value.field == "audio"


def test_the_queue_keeps_to_its_limit_whoever_speaks_at_once(pipeline):
    """`limit_s` is checked under the queue's lock: eight threads speaking 3 s each into a
    10 s limit queue 10 s between them, not 24."""
    import threading

    session = open_session(pipeline, PORTRAIT, PARAMS)
    pcm = np.full(3 * SAMPLE_RATE, 0.1, np.float32)
    start = threading.Barrier(8)

    def speak():
        start.wait()
        session.queue_speech(pcm, limit_s=10.0)

    threads = [threading.Thread(target=speak) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert session.queued_s == pytest.approx(10.0)
    cut = session.queue_speech(pcm, limit_s=12.0)  # cut at the limit, to the sample
    assert cut.queued_s == pytest.approx(12.0) and cut.dropped_s == pytest.approx(1.0)
    refused = session.queue_speech(pcm[:SAMPLE_RATE], limit_s=12.5, whole=True)  # all of it, or none
    assert refused.queued_s == pytest.approx(12.0) and refused.dropped_s == pytest.approx(1.0)


def test_a_helper_that_cannot_start_says_so_without_its_exceptions_words(pipeline, caplog):
    """Its exception named the helper's files (a 500's body showed them): they go to the log."""
    import dataclasses
    import logging
    import types

    from sonic.errors import PipelineError
    from sonic.live import prepare_live_face
    from sonic.live.process import SessionProcess

    options = pipeline.options(PARAMS)
    face = prepare_live_face(pipeline, PORTRAIT, options)
    unusable = dataclasses.replace(face, decoder=types.SimpleNamespace(frame=face.decoder.frame))  # cannot render
    caplog.set_level(logging.ERROR, logger="sonic.live")
    with pytest.raises(PipelineError) as e:
        SessionProcess(unusable, options)
    assert str(e.value) == "the live session's helper did not start (the log says why)"
    assert "AttributeError" in caplog.text


def test_a_helper_stopped_while_a_thread_reads_its_socket_exits_on_its_own(tmp_path):
    """A helper exits at the end of file of its socket; a thread of the parent blocked reading
    the socket (a live session's reader) kept it open past close(), so each session's end waited
    2 s, then killed the helper. (A render helper, asked once so that it is up and reading: one
    stopped while still importing may be killed under load, rightly.)"""
    import threading

    from sonic.render_messages import Failed, RenderBatch
    from sonic.render_pool import HelperProcess

    unreadable = tmp_path / "decoder.pkl"
    unreadable.write_bytes(b"not a pickle")
    helper = HelperProcess()
    helper.conn.send(RenderBatch("r", str(unreadable), str(tmp_path / "frames.npy"), 0, np.zeros((1, 1)),
                                 np.zeros((1, 4))))
    assert isinstance(helper.conn.recv(), Failed)  # up, and reading its socket

    def read():
        try:
            helper.conn.recv()
        except (OSError, EOFError):
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    helper.stop()
    reader.join(5)
    assert helper.proc.returncode == 0 and not reader.is_alive()  # it exited: not killed (-9)


def test_a_ring_slot_is_read_only_while_it_holds_the_frame_asked_for():
    """The helper writes frames up to a ring ahead of the reader: a slot since rewritten (or
    being rewritten: stamp -1) is not taken for the frame that was there."""
    from sonic.live.process import SLOTS, read_slot

    ring = np.zeros((SLOTS, 6, 4), np.uint8)
    stamps = np.full(SLOTS, -1, np.int64)
    ring[3], stamps[3] = 7, 3
    assert (read_slot(ring, stamps, 3, 3) == 7).all()
    ring[3], stamps[3] = 9, 3 + SLOTS  # a ring later
    assert read_slot(ring, stamps, 3, 3) is None
    stamps[3] = -1  # being written
    assert read_slot(ring, stamps, 3, 3 + SLOTS) is None


def test_a_spare_helper_that_cannot_start_is_said_in_one_line_and_the_next_session_tries_again(monkeypatch, caplog):
    """Out of file handles the spare's thread died with a traceback."""
    import errno

    import sonic.live.process as process

    def no_handles():
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(process, "_Helper", no_handles)
    monkeypatch.setattr(process, "sweep_orphans", lambda prefix: None)
    pool = process.HelperPool()
    pool.warm()
    assert "the spare live helper could not be started (Too many open files)" in caplog.text
    with pytest.raises(OSError):  # a session's own start fails as it did, where its route says so
        pool.take()


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Noise whose power falls as 1/f (a street, a fan, a room's hum all lean that way)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    return np.fft.irfft(spectrum / np.sqrt(np.maximum(np.arange(len(spectrum)), 1)), n)


def test_speech_under_noise_opens_the_mouth_nearly_as_wide_as_clean_offline_and_live(pipeline, speech):
    """Pink noise at 5 dB SNR fills the pauses and hides phones from the recogniser: read on the
    range the noise leaves, and with no phone where it said silence or noise, the same syllables
    opened the mouth a third less (offline 0.66 of clean, live 0.69; now 0.78 and 0.76)."""
    noise = pink_noise(len(speech), np.random.default_rng(0))
    noisy = (speech + noise * np.sqrt(np.mean(speech**2) / np.mean(noise**2)) / 10 ** (5 / 20)).astype(np.float32)
    n = len(speech) // HOP
    clean_feats = encode_audio(speech, n, FPS, pipeline.phones)
    spoken = clean_feats.speech  # the frames the clean recording says are speech

    def offline(wav):
        feats = encode_audio(wav, n, FPS, pipeline.phones)
        return mouth_track(feats, 1.0, True)[0][spoken].mean()

    def live(wav):
        session = open_session(pipeline, PORTRAIT, PARAMS)
        session.speak(wav)
        return np.array([f.opening for f in run(session, n)])[spoken].mean()

    ratios = offline(noisy) / offline(speech), live(noisy) / live(speech)
    assert min(ratios) > 0.72, ratios


def test_streamed_pitch_equals_the_files_and_the_band_filter_equals_scipys(speech):
    """The live pitch is measured on the new frames' windows only, and the band filter keeps its
    start-up state (both ~30 % of an unrendered frame's time before): the same numbers as the
    file's pitch (at 30 and 60 fps, where a frame starts between samples, too: a window started
    a sample away from the file's in 1-3 % of the frames before) and as scipy's zero-phase
    filter, to the bit, in any chunks."""
    from scipy.signal import sosfiltfilt

    from sonic.audio_features import band_filter, band_filtered, frame_pitch
    from sonic.live.features import LoudnessStream

    rng = np.random.default_rng(3)
    for fps in (25, 30, 60):
        stream, got = LoudnessStream(fps), []
        at = 0
        while at < len(speech):
            n = int(rng.integers(100, 2000))
            got.append(stream.push(speech[at : at + n])[1])
            at += n
        live = np.concatenate(got)
        offline = frame_pitch(speech, int(len(speech) / SAMPLE_RATE * fps), fps)
        same = (live == offline[: len(live)]) | (np.isnan(live) & np.isnan(offline[: len(live)]))
        assert len(live) >= len(offline) - 2 and same.all(), (fps, np.flatnonzero(~same))
    for x in (speech, speech[:101], rng.standard_normal(5000), speech[1000:9000] + 0.3):
        x = x.astype(np.float64)
        assert np.array_equal(band_filtered(x), sosfiltfilt(band_filter(), x))
