"""Helpers for the server tests: settings under a temporary folder, a fake pipeline, requests
through Flask's test client, and the checks every error body must pass."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

from conftest import PORTRAIT, ROOT, SPEECH
from sonic import load_config
from sonic.pipeline import GenerationResult

FAST = {"min_resolution": 256}
FAKE_VIDEO = bytes(range(256)) * 8          # what the fake pipeline writes: 2 kB, enough for a Range request
SAMPLE_RATE = 16_000


def settings(tmp: Path, **server) -> dict:
    """Default settings with every runtime folder under `tmp`, a generous rate limit and 2 MB uploads."""
    cfg = load_config()
    cfg["output_dir"] = str(tmp / "outputs")
    cfg["server"].update(upload_dir=str(tmp / "uploads"), data_dir=str(tmp / "data"), rate_limit_per_s=1000,
                         rate_limit_burst=1000)
    cfg["server"].update(server)
    cfg["limits"]["max_upload_mb"] = 2
    cfg["live"]["warm_start"] = False  # a live test's first session warms up itself; the others pay nothing
    return cfg


class FakePipeline:
    """Stands in for the model where the model is not the point.

    Reports progress, then (with `gate`) keeps reporting until the gate opens, so a cancel
    arrives as it does in the real pipeline; raises `error` if given; else writes FAKE_VIDEO at
    out_path and returns a result that echoes the options. `calls` records what it was given.
    """

    def __init__(self, error: Exception | None = None, gate: threading.Event | None = None, delay_s: float = 0.0):
        self.error, self.gate, self.delay_s = error, gate, delay_s
        self.calls: list[tuple] = []
        self.started = threading.Event()

    def __call__(self, image, audio, options, *, out_path, progress=None, sound_file=None):
        progress = progress or (lambda stage, frac: None)
        self.calls.append((image, audio, options))
        progress("decode", 0.0)
        self.started.set()
        while self.gate is not None and not self.gate.wait(0.05):
            progress("render", 0.2)
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        audio_s = len(audio) / SAMPLE_RATE if isinstance(audio, np.ndarray) else 3.0
        duration = options.duration or audio_s
        Path(out_path).write_bytes(FAKE_VIDEO)
        progress("render", 1.0)
        return GenerationResult(output_path=str(out_path), duration=duration, frames=round(duration * options.fps),
                                fps=options.fps, width=options.min_resolution, height=options.min_resolution,
                                seed=options.seed, lipsync_offset_ms=0.0, timings={"render": 0.01, "total": 0.01})


def post(client, config: dict | None = None, image: Path = PORTRAIT, audio: Path = SPEECH, headers=None,
         names=("face.jpg", "talk.flac")):
    """POST /api/sonic/generate through a Flask test client."""
    with open(image, "rb") as img, open(audio, "rb") as aud:
        return client.post("/api/sonic/generate", headers=headers or {}, content_type="multipart/form-data",
                           data={"config": json.dumps(config if config is not None else FAST),
                                 "image": (img, names[0]), "audio": (aud, names[1])})


def new_record(uploads, **params):
    """A generate job record whose inputs (the example portrait and speech) are stored in `uploads`."""
    from sonic import GenerateOptions
    from sonic_server.jobs import JobRecord
    rec = JobRecord.new("generate", GenerateOptions(**params).to_dict(), cache_key="k")
    rec.inputs = uploads.save(rec.id, {"image": PORTRAIT.read_bytes(), "audio": SPEECH.read_bytes()})
    return rec


def wait_done(client, job_id: str, timeout: float = 30) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        body = client.get(f"/api/sonic/jobs/{job_id}").get_json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            return body
        time.sleep(0.02)
    raise AssertionError("job did not finish")


def wait_status(client, job_id: str, status: str, timeout: float = 10) -> None:
    end = time.time() + timeout
    while client.get(f"/api/sonic/jobs/{job_id}").get_json()["status"] != status:
        assert time.time() < end, f"job never reached {status}"
        time.sleep(0.02)


def assert_clean_error(r, status: int, code: str, field: str | None = None) -> None:
    """An error answer: the status, the one error body, and no trace or server path in it.
    Takes a test-client response or a `requests` response."""
    assert r.status_code == status, r.text
    body = r.json() if callable(r.json) else r.json
    assert body["success"] is False and body["error"]["code"] == code and body["request_id"]
    if field:
        assert body["error"]["field"] == field
    assert "Traceback" not in r.text and str(ROOT) not in r.text


def uploads_empty(cfg: dict) -> bool:
    return not any(p.is_file() for p in Path(cfg["server"]["upload_dir"]).rglob("*"))


def at_once(attempt, n: int) -> None:
    """Call attempt(0) ... attempt(n - 1), each in a thread of its own, all started before any
    is waited for (submits racing for the last places of a queue or a share)."""
    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
