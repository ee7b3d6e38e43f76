"""The ComfyUI node (integrations/comfyui), called exactly as ComfyUI calls a node: INPUT_TYPES for
the inputs and their defaults, FUNCTION on an instance, ComfyUI's tensor layouts (IMAGE float32
[B, H, W, C] in 0..1; AUDIO {"waveform": [B, C, T], "sample_rate"}), against app.py on a free port."""
import importlib.util
import io
import json
import sys
import time

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from conftest import PORTRAIT, ROOT, SPEECH
from test_http_live import free_port, start_server


def load_node_package():
    """Imported the way ComfyUI imports a custom_nodes folder: as a package from its path."""
    spec = importlib.util.spec_from_file_location("sonic_comfyui", ROOT / "integrations" / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "integrations" / "comfyui")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["sonic_comfyui"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def node():
    pkg = load_node_package()
    cls = pkg.NODE_CLASS_MAPPINGS["SonicTalkingHead"]
    assert pkg.NODE_DISPLAY_NAME_MAPPINGS["SonicTalkingHead"]
    return cls


LOGS = {}


def server_log(base):
    return LOGS[base]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy")
    proc, info = start_server(tmp)
    LOGS[info["base"]] = tmp / "server.log"
    yield info["base"]
    proc.terminate()
    proc.wait(20)


def comfy_image(path=PORTRAIT) -> torch.Tensor:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb)[None]                                   # [1, H, W, 3]


def comfy_audio(path=SPEECH) -> dict:
    wav, rate = soundfile.read(path, dtype="float32", always_2d=True)   # [T, C]
    return {"waveform": torch.from_numpy(wav.T.copy())[None], "sample_rate": rate}     # [1, C, T]


def inputs_with_defaults(cls, **given) -> dict:
    """What ComfyUI passes: every required and optional input, defaults unless given."""
    types = cls.INPUT_TYPES()
    kwargs = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            if len(spec) > 1 and "default" in spec[1]:
                kwargs[name] = spec[1]["default"]
    kwargs.update(given)
    return kwargs


def run(cls, **given):
    return getattr(cls(), cls.FUNCTION)(**inputs_with_defaults(cls, **given))


def test_the_nodes_parameters_are_the_services(node, server):
    import requests
    served = requests.get(server + "/api/sonic/params", timeout=10).json()["parameters"]
    types = node.INPUT_TYPES()
    own = {"image", "audio", "server_url", "api_key", "timeout_s"}
    params = {n: s for sec in types.values() for n, s in sec.items() if n not in own}
    assert set(params) == set(served)
    for name, (kind, spec) in params.items():
        assert spec["default"] == served[name]["default"] or (name, spec["default"]) == ("duration", 0.0), name
        if isinstance(kind, list):  # a COMBO: the values the service accepts
            assert kind == served[name]["enum"], name
        if served[name]["minimum"] is not None and kind in ("INT", "FLOAT"):
            assert (spec["min"], spec["max"]) == (served[name]["minimum"], served[name]["maximum"]), name
    assert node.RETURN_TYPES == ("STRING", "IMAGE", "AUDIO") and len(node.RETURN_NAMES) == 3


def test_the_node_returns_the_video_its_frames_and_the_audio(node, server):
    audio = comfy_audio()
    path, frames, out_audio = run(node, image=comfy_image(), audio=audio, server_url=server, min_resolution=256,
                                  seed=3)
    assert path.endswith(".mp4") and open(path, "rb").read(12)[4:8] == b"ftyp"
    assert frames.dtype == torch.float32 and frames.ndim == 4 and frames.shape[0] == 75 and frames.shape[-1] == 3
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0 and float(frames.std()) > 0.05
    assert frames.shape[1] >= 256 and frames.shape[2] >= 256
    rate = audio["sample_rate"]
    assert out_audio["sample_rate"] == rate and out_audio["waveform"].shape == (1, audio["waveform"].shape[1], 3 * rate)
    # a batch of images: the first is the portrait; the result is the same video (cached)
    batch = torch.cat([comfy_image(), comfy_image()])
    again, _, _ = run(node, image=batch, audio=audio, server_url=server, min_resolution=256, seed=3)
    assert again == path
    _, short, short_audio = run(node, image=comfy_image(), audio=audio, server_url=server, min_resolution=256,
                                duration=1.2)
    assert short.shape[0] == 30 and short_audio["waveform"].shape[-1] == round(1.2 * rate)


def test_the_services_refusal_is_the_nodes_error(node, server, monkeypatch):
    pkg = sys.modules["sonic_comfyui"]
    # an unreachable service is tried SUBMIT_TRIES times; the waits between are not what is tested here
    monkeypatch.setattr(sys.modules[node.__module__], "RETRY_WAITS_S", (0.1,))
    gray = torch.full((1, 300, 300, 3), 0.5)
    with pytest.raises(pkg.node.SonicServiceError, match=r"no face.*\[no_face_detected\]"):
        run(node, image=gray, audio=comfy_audio(), server_url=server, min_resolution=256)
    with pytest.raises(pkg.node.SonicServiceError, match=r"field dynamic_scale"):
        run(node, image=comfy_image(), audio=comfy_audio(), server_url=server, dynamic_scale=7.0)
    silent = {"waveform": torch.zeros((1, 1, 16000)), "sample_rate": 16000}
    with pytest.raises(pkg.node.SonicServiceError, match=r"silent.*field audio"):
        run(node, image=comfy_image(), audio=silent, server_url=server)
    with pytest.raises(pkg.node.SonicServiceError, match="cannot be reached"):
        run(node, image=comfy_image(), audio=comfy_audio(), server_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(pkg.node.SonicServiceError, match="AUDIO input"):
        run(node, image=comfy_image(), audio=torch.zeros(3), server_url=server)


def test_a_job_past_the_nodes_timeout_is_canceled_on_the_server(node, server):
    import requests
    pkg = sys.modules["sonic_comfyui"]
    with pytest.raises(pkg.node.SonicServiceError, match="did not end within 10 s; it was canceled"):
        run(node, image=comfy_image(), audio=comfy_audio(), server_url=server, min_resolution=512, duration=240,
            seed=77, timeout_s=10)
    jobs = [line for line in open(server_log(server)).read().splitlines() if "/cancel" in line]
    assert jobs, "no cancel reached the server"
    job_id = jobs[-1].split("/api/sonic/jobs/")[1].split("/")[0]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status = requests.get(f"{server}/api/sonic/jobs/{job_id}", timeout=10).json()["status"]
        if status == "canceled":
            break
        time.sleep(0.2)
    assert status == "canceled"


def test_a_lost_answer_is_retried_with_the_same_idempotency_key_and_makes_one_job(node, server, monkeypatch):
    """The first try reaches the service but its answer is lost (as a dropped connection would
    lose it): the node sends the job again with the same key, and gets the same job back."""
    import requests

    module = sys.modules[node.__module__]
    real, keys = module._call, []

    def lossy(url, api_key, data=None, content_type=None, timeout=120.0, extra=None, sink=None):
        answer = real(url, api_key, data, content_type, timeout, extra, sink)
        if url.endswith("/api/sonic/generate"):
            keys.append((extra or {}).get("Idempotency-Key"))
            if len(keys) == 1:
                raise module.Unreachable("the connection was reset")
        return answer

    monkeypatch.setattr(module, "_call", lossy)
    monkeypatch.setattr(module, "RETRY_WAITS_S", (0.1,))
    before = len(requests.get(f"{server}/api/sonic/jobs?limit=100", timeout=5).json()["jobs"])
    path, frames, _ = run(node, image=comfy_image(), audio=comfy_audio(), server_url=server, min_resolution=256,
                          seed=41)
    assert frames.shape[0] == 75 and len(keys) == 2 and keys[0] == keys[1] and keys[0].startswith("comfyui-")
    assert len(requests.get(f"{server}/api/sonic/jobs?limit=100", timeout=5).json()["jobs"]) == before + 1


class Misbehaving:
    """A server on a free loopback port that answers every request with `answer(path)`: (status,
    content type, body, seconds between chunks). Not a sonic service: a proxy's page, garbage."""

    def __init__(self, answer):
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.do_GET()

            def do_GET(self):
                status, ctype, body, drip_s = outer.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.end_headers()
                try:
                    for chunk in body:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                        time.sleep(drip_s)
                except OSError:  # the node hung up
                    pass

            def log_message(self, *args):
                pass

        self.answer = answer
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


JOB = "0123456789abcdef0123456789abcdef"


def endless():
    while True:
        yield b"\0" * (1 << 16)


@pytest.mark.parametrize("case", ["not-json", "no-job-id", "no-video-url", "bad-duration", "error-text",
                                  "drip", "endless-video", "file-url"])
def test_a_server_that_answers_garbage_is_a_node_error_not_a_crash_or_a_hang(node, case, monkeypatch, tmp_path):
    """Answers no sonic service sends were bare JSONDecodeError, KeyError, AttributeError or
    MemoryError (a duration of 1e9 s), a dripped answer outlived timeout_s, an endless video grew
    the process by a GB a second, and a file:// video_url was opened."""
    module = sys.modules[node.__module__]
    monkeypatch.setattr(module, "MAX_VIDEO_BYTES", 1 << 20)
    monkeypatch.setattr(module, "_output_dir", lambda: str(tmp_path))
    done = {"job_id": JOB, "status": "succeeded", "success": True, "duration": 1.0, "video_url": None}

    def answer(path):
        json_type = "application/json"
        if case == "not-json":
            return 200, json_type, [b"<html>a proxy's page</html>"], 0
        if case == "drip":
            return 200, json_type, [b"{"] + [b" "] * 100, 0.2
        if path.startswith("/output/"):
            return 200, "video/mp4", endless(), 0
        if case == "no-job-id":
            return 202, json_type, [b'{"status": "queued"}'], 0
        if case == "error-text":
            return 400, json_type, [b'{"success": false, "error": "no"}'], 0
        body = dict(done, video_url=f"{server.base}/output/{JOB}.mp4")
        if case == "no-video-url":
            body.pop("video_url")
        if case == "bad-duration":
            body["duration"] = 1e9
        if case == "file-url":
            body["video_url"] = "file:///etc/passwd"
        return 200, json_type, [json.dumps(body).encode()], 0

    server = Misbehaving(answer)
    started = time.monotonic()
    try:
        with pytest.raises(module.SonicServiceError) as e:
            run(node, image=comfy_image(), audio=comfy_audio(), server_url=server.base, timeout_s=2,
                min_resolution=256)
    finally:
        server.close()
    assert time.monotonic() - started < 8, case
    assert str(e.value).startswith("sonic service:") and len(str(e.value)) < 400, str(e.value)
    assert not list(tmp_path.iterdir()), case  # nothing half-downloaded left


def test_inputs_comfyui_could_hand_over_are_checked_by_the_node(node):
    """An empty batch, a sample rate that is no rate and a URL that is no http URL were
    IndexError, wave.Error and ValueError."""
    module = sys.modules[node.__module__]
    audio, image = comfy_audio(), comfy_image()
    for given, needle in ((dict(image=image[:0]), "image: expected an IMAGE tensor"),
                          (dict(audio={**audio, "waveform": audio["waveform"][:0]}), "audio: expected a waveform"),
                          (dict(audio={**audio, "sample_rate": 0}), "sample_rate"),
                          (dict(audio={**audio, "sample_rate": "abc"}), "sample_rate"),
                          (dict(server_url="ftp://127.0.0.1/"), "server_url"),
                          (dict(server_url=""), "server_url")):
        with pytest.raises(module.SonicServiceError, match=needle):
            run(node, **{"image": image, "audio": audio, "server_url": "http://127.0.0.1:9", **given})
    # PCM samples are read at their full scale, and opposite phases are not mixed into silence
    pcm = (audio["waveform"] * 32767).to(torch.int16)
    wav, rate, channels = module._audio_wav({"waveform": torch.cat([pcm, -pcm], dim=1), "sample_rate": 16000})
    assert channels.shape[0] == 2 and abs(float(channels[0].max()) - float(audio["waveform"].max())) < 1e-3
    samples, _ = soundfile.read(io.BytesIO(wav), dtype="int16", always_2d=True)
    assert samples.shape[1] == 2 and np.abs(samples).max() > 1000
