"""align_mouth for a decoder that makes the frames from the audio itself (the `sonic` kind): the
pipeline measures the mouth on the frames it writes and moves the audio by the lag it finds.

A stand-in speaking decoder replays a real lip-synced render (the warp decoder's) with its
frames 3 behind the audio; the measurement must find the 120 ms, and the written file's audio
must have moved by it."""
import subprocess

import numpy as np
import pytest

from conftest import PORTRAIT, SPEECH, read_frames
from sonic.decoders import DecoderKind, all_parameters
from sonic.media import FFMPEG, SAMPLE_RATE, load_audio
from sonic.options import GenerateOptions

LATE = 3      # frames


class Replay(DecoderKind):
    """Speaks by replaying frames, `late` frames after the audio (the first frame held)."""
    name, honours, speaks = "replay", all_parameters(), True

    def __init__(self, frames: np.ndarray, late: int):
        self.frames, self.late = frames, late

    def speak(self, framing, wav, n_frames, options, progress):
        frames = np.concatenate([np.repeat(self.frames[:1], self.late, 0), self.frames])[:n_frames]

        class Video:
            frame = frames[0]
            batches = (frames[i:i + 8] for i in range(0, n_frames, 8))
            lipsync_offset_ms = 0.0
        return Video()


@pytest.fixture(scope="module")
def synced(pipeline, tmp_path_factory):
    """A lip-synced render of the example speech (RGB frames)."""
    out = tmp_path_factory.mktemp("sync") / "warp.mp4"
    pipeline(PORTRAIT, SPEECH, GenerateOptions.from_dict({"min_resolution": 256, "seed": 1}), out_path=out)
    return read_frames(out)[..., ::-1].copy()


def audio_of(path) -> np.ndarray:
    raw = subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "s16le", "-ac", "1",
                          "-ar", str(SAMPLE_RATE), "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.int16).astype(np.float32) / 32768


def delay_ms(moved: np.ndarray, original: np.ndarray) -> float:
    """How much later `moved` is than `original` (ms), by cross-correlation over +-300 ms."""
    n = min(len(moved), len(original))
    lags = range(-int(0.3 * SAMPLE_RATE), int(0.3 * SAMPLE_RATE) + 1, 16)
    score = [np.dot(moved[max(0, k):n + min(0, k)], original[max(0, -k):n - max(0, k)]) for k in lags]
    return 1000 * list(lags)[int(np.argmax(score))] / SAMPLE_RATE


@pytest.mark.parametrize("align", [True, False])
def test_a_late_mouth_moves_the_audio_after_it(pipeline, synced, tmp_path, align):
    from sonic.pipeline import SonicPipeline
    speaker = SonicPipeline(pipeline.settings, faces=pipeline.faces, decoder=Replay(synced, LATE))
    out = tmp_path / "replayed.mp4"
    opts = GenerateOptions.from_dict({"min_resolution": 256, "seed": 1, "align_mouth": align})
    result = speaker(PORTRAIT, SPEECH, opts, out_path=out)
    assert speaker.phones is None                       # a speaking decoder needs no phone recogniser
    assert list(result.timings) == ["decode", "face", "decoder_setup", "align", "total"]
    assert len(read_frames(out)) == result.frames
    moved = delay_ms(audio_of(out), load_audio(SPEECH, 300))
    if align:
        assert abs(result.lipsync_offset_ms - LATE * 40) <= 25, result.lipsync_offset_ms
        assert abs(moved - result.lipsync_offset_ms) <= 5, (moved, result.lipsync_offset_ms)
    else:
        assert result.lipsync_offset_ms == 0.0 and abs(moved) <= 5


def test_frames_without_a_face_leave_the_audio_alone(pipeline, tmp_path):
    from sonic.pipeline import SonicPipeline
    noise = np.random.default_rng(0).integers(0, 255, (75, 320, 256, 3), dtype=np.uint8)
    speaker = SonicPipeline(pipeline.settings, faces=pipeline.faces, decoder=Replay(noise, 0))
    result = speaker(PORTRAIT, SPEECH, GenerateOptions.from_dict({"min_resolution": 256}), out_path=tmp_path / "n.mp4")
    assert result.lipsync_offset_ms == 0.0
    assert any("align_mouth" in w and "not moved" in w for w in result.warnings)
