import numpy as np
import pytest

from sonic.audio_features import UNHEARD_VOWEL_OPEN, AudioFeatures, normalise_loudness, viseme_tracks
from sonic.motion import blinks, measure_lag, predict_motion


def feats(loud, fps=25, closure=None):
    n = len(loud)
    return AudioFeatures(fps=fps, loudness=loud, speech=loud > 0.25, vis_open=np.full(n, 0.5),
                         vis_spread=np.zeros(n), vis_closure=np.zeros(n) if closure is None else closure, phones=())


class FakeRig:
    iod = 100.0
    rest_gap = 0.0
    open_gap = 0.0
    jaw_gap_gain = 1.0


def syllables(n=250, fps=25):
    t = np.arange(n) / fps
    loud = np.clip(np.sin(2 * np.pi * 3.1 * t), 0, 1) * (t < 6)
    return loud


def test_blink_rate_and_shape():
    b = blinks(25 * 60, 25, np.random.default_rng(1))[0]
    onsets = np.flatnonzero((b[1:] > 0.5) & (b[:-1] <= 0.5))
    assert 10 <= len(onsets) <= 22
    widths = [np.sum(b[o - 5:o + 10] > 0.3) / 25 for o in onsets[1:-1]]
    assert 0.08 <= np.median(widths) <= 0.3


def test_motion_is_seeded():
    f = feats(syllables())
    a = predict_motion(f, FakeRig(), dynamic_scale=1, motion_scale=1, smooth=True, align=True, seed=3)
    b = predict_motion(f, FakeRig(), dynamic_scale=1, motion_scale=1, smooth=True, align=True, seed=3)
    c = predict_motion(f, FakeRig(), dynamic_scale=1, motion_scale=1, smooth=True, align=True, seed=4)
    assert np.array_equal(a.coeffs, b.coeffs) and np.array_equal(a.head, b.head)
    assert not np.array_equal(a.head, c.head)


def test_mouth_rests_in_silence_and_scales():
    f = feats(syllables())
    m1 = predict_motion(f, FakeRig(), dynamic_scale=1, motion_scale=1, smooth=True, align=False, seed=0)
    m2 = predict_motion(f, FakeRig(), dynamic_scale=2, motion_scale=0, smooth=True, align=False, seed=0)
    jaw = m1.coeffs[:, 0]
    assert jaw[: 150].max() > 0.05 and jaw[160:].max() < 1e-3       # speech for 6 s, then silence
    assert m2.coeffs[:150, 0].max() > 1.5 * jaw[:150].max()
    assert np.abs(m2.head).max() == 0.0                             # motion_scale 0: still head
    assert m2.coeffs[:, 3].max() > 0.9                               # ... blinks stay


def test_closure_shuts_the_lips():
    loud = np.full(50, 0.9)
    cl = np.zeros(50)
    cl[20:23] = 1.0
    m = predict_motion(feats(loud, closure=cl), FakeRig(), dynamic_scale=1, motion_scale=1, smooth=True,
                       align=False, seed=0)
    assert m.coeffs[21, 0] < 0.35 * m.coeffs[10, 0]


def test_measure_lag_recovers_a_shift():
    loud = syllables(300) + 0.3 * np.random.default_rng(0).random(300)
    t = np.arange(len(loud), dtype=np.float64)
    mouth = np.interp(t - 2.0, t, loud)                      # mouth 2 frames late
    assert measure_lag(mouth, loud) == pytest.approx(2.0, abs=0.25)
    assert measure_lag(loud, loud) == pytest.approx(0.0, abs=0.05)


def test_align_mouth_reports_and_corrects():
    loud = syllables()
    f = feats(loud)
    m = predict_motion(f, FakeRig(), dynamic_scale=1, motion_scale=0, smooth=True, align=True, seed=0)
    assert abs(m.lipsync_offset_ms) <= 40
    assert abs(measure_lag(m.coeffs[:, 0], loud)) < 0.3


def test_visemes_and_loudness():
    op, sp, cl = viseme_tracks([("SIL", 0, 0.2), ("M", 0.2, 0.3), ("AA", 0.3, 0.5), ("UW", 0.5, 0.7)], 20, 25)
    assert cl[6] == 1.0 and op[6] == 0.0 and op[10] > 0.8 and sp[15] < -0.5
    db = np.array([-80.0] * 10 + [-20.0] * 10)
    n = normalise_loudness(db)
    assert n[:10].max() == 0.0 and n[10:].min() == 1.0
    # room tone alone (a few dB of spread, no speech): the mouth stays at rest, as live's does,
    # instead of the noise's own range stretched over 0-1
    room = -54 + 2 * np.random.default_rng(0).standard_normal(200)
    assert normalise_loudness(room).max() < 0.35 and np.median(normalise_loudness(room)) < 0.15
    # speech under loud steady noise: syllables 9 dB over it. Voiced (a voice's pitch), they
    # open the mouth; the same levels unvoiced (noise that swells) do not
    noisy = np.where(np.arange(200) % 10 < 4, -36.0, -45.0) + 0.3 * np.random.default_rng(1).standard_normal(200)
    syllables = noisy > -40
    assert normalise_loudness(noisy, syllables)[syllables].mean() > 0.6
    assert normalise_loudness(noisy, np.zeros(200, bool))[syllables].mean() < 0.4
    # ... read on a scale 30 dB deep, the noise between them at rest; a clean voice's scale (its
    # range over 30 dB) is its range, as ever
    assert normalise_loudness(noisy, syllables)[~syllables].max() < 0.1
    clean = np.where(syllables, -20.0, -60.0) + np.linspace(0, 3, 200)
    assert np.allclose(normalise_loudness(clean, syllables), normalise_loudness(clean, None))


def test_voiced_speech_the_recogniser_names_no_phone_in_opens_as_a_vowel():
    phones = [("SIL", 0, 0.2), ("+SPN+", 0.2, 0.4), ("M", 0.4, 0.5)]
    voiced_speech = np.zeros(15, bool)
    voiced_speech[3:12] = True
    op, _, cl = viseme_tracks(phones, 15, 25, voiced_speech)
    assert (op[3:10] == UNHEARD_VOWEL_OPEN).all() and op[:3].max() == 0  # the pause stays at rest
    assert op[10:12].max() == 0 and cl[10:12].min() == 1 and op[12:].max() == 0  # a phone named is kept
    assert np.array_equal(viseme_tracks(phones, 15, 25)[0], np.zeros(15))


# --- head motion: bounded and independent of the clip's length ---------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from sonic.motion import MAX_ROLL_DEG, MAX_SCALE, MAX_SHIFT_IOD  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300 * 25), seed=st.integers(0, 2**32 - 1), scale=st.floats(0, 2),
       fps=st.sampled_from([10, 25, 60]), smooth=st.booleans(), loud=st.floats(0, 1))
def test_head_motion_bounded_for_every_length(n, seed, scale, fps, smooth, loud):
    n = max(1, n * fps // 25)
    loudness = syllables(n, fps) * loud
    m = predict_motion(feats(loudness, fps), FakeRig(), dynamic_scale=1, motion_scale=scale, smooth=smooth,
                       align=False, seed=seed)
    roll, shift, sc = np.rad2deg(np.abs(m.head[:, 0])), np.linalg.norm(m.head[:, 1:3], axis=1), m.head[:, 3]
    assert m.head.shape == (n, 4) and np.isfinite(m.head).all()
    assert roll.max() <= MAX_ROLL_DEG * scale + 1e-9
    assert shift.max() / FakeRig.iod <= MAX_SHIFT_IOD * scale + 1e-9
    assert np.abs(sc).max() <= min(0.03, MAX_SCALE * scale) + 1e-9


def test_short_clip_is_the_start_of_a_long_one():
    """The same seed gives a short clip the first frames of a long clip: no stretch to full strength."""
    long = predict_motion(feats(np.zeros(2000)), FakeRig(), dynamic_scale=1, motion_scale=1, smooth=False,
                          align=False, seed=9)
    for n in (1, 2, 15, 30, 37, 300):
        short = predict_motion(feats(np.zeros(n)), FakeRig(), dynamic_scale=1, motion_scale=1, smooth=False,
                               align=False, seed=9)
        assert np.allclose(short.head, long.head[:n])


def test_head_motion_statistics_do_not_depend_on_length():
    """Over many seeds, the roll of 1 s clips spreads as much as that of 60 s clips (no large constant tilt)."""
    def rolls(n):
        return np.concatenate([np.rad2deg(predict_motion(feats(np.zeros(n)), FakeRig(), dynamic_scale=1,
                                                         motion_scale=1, smooth=True, align=False,
                                                         seed=s).head[:, 0]) for s in range(40)])
    short, long = rolls(25), rolls(1500)
    assert np.std(short) < 1.3 * np.std(long) and np.abs(short).max() <= MAX_ROLL_DEG
    assert 0.8 < np.std(long) < 2.5


def test_bilabials_close_the_lips_fully():
    """P/B/M between loud vowels: the commanded inner-lip gap at the closure is below 0.01 IOD."""
    phones = [("AA", 0.0, 0.4), ("M", 0.4, 0.48), ("AA", 0.48, 0.9), ("B", 0.9, 0.96), ("IY", 0.96, 1.4)]
    op, sp, cl = viseme_tracks(phones, 35, 25)
    f = AudioFeatures(fps=25, loudness=np.full(35, 0.9), speech=np.ones(35, bool), vis_open=op, vis_spread=sp,
                      vis_closure=cl, phones=tuple(phones))
    for align in (False, True):
        m = predict_motion(f, FakeRig(), dynamic_scale=2.0, motion_scale=1, smooth=True, align=align, seed=0)
        gap = m.coeffs[:, 0]                                   # IOD (the jaw coefficient is the lip gap)
        assert gap[int(0.44 * 25)] <= 0.01 and gap[int(0.93 * 25)] <= 0.01
        assert gap[5] > 0.1



def test_the_expression_coefficients_stay_within_the_warp_decoders_box():
    """The warp decoder sizes the expression fields' reach, their box and their fade at a photo's
    edge by EXPRESSION_MAX: no speech, dynamic_scale or photo may take a coefficient past it (the
    jaw reached 0.28 where the box said 0.25)."""
    import itertools
    from sonic.decoders.warp.decoder import EXPRESSION, EXPRESSION_MAX
    from sonic.options import parameters

    n, top = 40, np.zeros(len(EXPRESSION))
    lo, hi = parameters()["dynamic_scale"].low, parameters()["dynamic_scale"].high
    for loud, vis_open, spread, scale, open_photo in itertools.product(
            (0.0, 0.5, 1.0), (0.0, 1.0), (-1.0, 1.0), (lo, 1.0, hi), (0.0, 0.05, 0.2)):
        f = AudioFeatures(fps=25, loudness=np.full(n, loud), speech=np.full(n, True), vis_open=np.full(n, vis_open),
                          vis_spread=np.full(n, spread), vis_closure=np.zeros(n), phones=())
        rig = FakeRig()
        rig.open_gap = open_photo * rig.iod
        m = predict_motion(f, rig, dynamic_scale=scale, motion_scale=1, smooth=True, align=False, seed=0)
        c = m.coeffs[:, EXPRESSION]
        assert (c >= -1e-9).all() and (c <= np.array(EXPRESSION_MAX) + 1e-9).all(), (c.max(0), EXPRESSION_MAX)
        top = np.maximum(top, c.max(0))
    assert np.allclose(top, EXPRESSION_MAX)  # and the box is no larger than they go
