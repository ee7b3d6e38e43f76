import os
from pathlib import Path

# Each pytest-xdist worker (pytest.ini: two, one per core) does its math on one thread: two
# workers of two threads each fight over the two cores, and the diffusion tests took 88 s that
# way against 69 s single-threaded (measured together, on this machine). Set before numpy and
# torch load; the servers and workers the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")


import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PORTRAIT = EXAMPLES / "portrait.jpg"
SPEECH = EXAMPLES / "speech.flac"


# The test files that take longest, longest first (wall seconds each on this 2-core machine, three
# workers: pipecat 120, redis 80, live_http 66, diffusion 52, schemathesis 49, diffusion_parity 42,
# webhooks 30, live_workers 27). The workers take files in the order collected (pytest.ini:
# --no-loadscope-reorder), so that a long file started last does not run on alone at the end.
# A file missing here only runs later; the list orders, it selects nothing.
LONGEST_FILES_FIRST = (
    "test_pipecat.py", "test_redis.py", "test_live_http.py", "test_diffusion.py", "test_schemathesis.py",
    "test_diffusion_parity.py", "test_webhooks.py", "test_live_workers.py", "test_browser.py",
    "test_end_to_end.py", "test_http_live.py", "test_comfyui.py", "test_alive.py", "test_credits.py",
    "test_live_engine.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


def read_frames(path) -> np.ndarray:
    """Every frame of a video (BGR, as OpenCV decodes it)."""
    import cv2
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            return np.array(frames)
        frames.append(f)


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


@pytest.fixture
def make_queue(tmp_path):
    """make_queue(pipeline, queue_size=2, **LocalQueue options) -> an in-process job queue with its
    folders under tmp_path (outputs live for a minute unless output_ttl_s says otherwise); closed
    afterwards."""
    from sonic_server.queue.local import LocalQueue
    from sonic_server.uploads import Uploads
    queues = []

    def make(pipeline, queue_size=2, output_ttl_s=60.0, **kw):
        q = LocalQueue(pipeline, tmp_path / "out", Uploads(tmp_path / "up"), queue_size=queue_size,
                       output_ttl_s=output_ttl_s, **kw)
        queues.append(q)
        return q

    yield make
    for q in queues:
        q.close()


@pytest.fixture
def make_client(tmp_path):
    """make_client(pipeline=None, **server_settings) -> (Flask test client, settings): a fresh app
    with its folders under tmp_path and a fake pipeline unless one is given; its queue is
    closed afterwards."""
    from server_helpers import FakePipeline, settings
    from sonic_server import create_app
    apps = []

    def make(pipeline=None, **server):
        cfg = settings(tmp_path, **server)
        app = create_app(cfg, pipeline=pipeline if pipeline is not None else FakePipeline())
        apps.append(app)
        return app.test_client(), cfg

    yield make
    for app in apps:
        if app.extensions["sonic"].queue is not None:
            app.extensions["sonic"].queue.close()


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """A tiny random Sonic model (seed 0) in the official checkpoint layout (sonic/decoders/sonic/tiny.py)."""
    from sonic.decoders.sonic.model import quiet_libraries
    from sonic.decoders.sonic.tiny import write_tiny_checkpoints
    quiet_libraries()
    return write_tiny_checkpoints(tmp_path_factory.mktemp("ckpt") / "checkpoints", seed=0)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints):
    """The tiny model loaded on the CPU."""
    from sonic.decoders.sonic.model import SonicModel
    return SonicModel(tiny_checkpoints, "cpu")

