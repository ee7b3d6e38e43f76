from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PORTRAIT = EXAMPLES / "portrait.jpg"
SPEECH = EXAMPLES / "speech.flac"


@pytest.fixture(scope="session")
def pipeline():
    from sonic import load_pipeline
    return load_pipeline()


@pytest.fixture(scope="session")
def speech_then_silence(tmp_path_factory) -> Path:
    """The example speech followed by 1.6 s of silence (WAV, 16 kHz)."""
    wav, sr = sf.read(SPEECH, dtype="float32")
    out = tmp_path_factory.mktemp("audio") / "speech_silence.wav"
    sf.write(out, np.concatenate([wav, np.zeros(int(1.6 * sr), np.float32)]), sr)
    return out
