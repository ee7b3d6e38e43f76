"""The node: ComfyUI tensors -> a sonic job over HTTP -> the video, its frames and the audio.

ComfyUI's types, as this node reads and writes them:
- IMAGE: a float32 tensor [B, H, W, C] in 0..1 (C = 3); the first image of the batch is the portrait;
- AUDIO: {"waveform": float tensor [B, C, T] in -1..1, "sample_rate": int}; the first item is sent.
The HTTP calls use only the standard library (urllib), so the node adds no dependency.
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import wave

import numpy as np

TERMINAL = ("succeeded", "failed", "canceled")
POLL_S = 0.5


class SonicServiceError(RuntimeError):
    """The service refused or failed the job; the message is the server's own."""


def _image_png(image) -> bytes:
    from PIL import Image
    arr = image[0].detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image[0])
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise SonicServiceError(f"image: expected an IMAGE tensor [B, H, W, C], got shape {tuple(image.shape)}")
    arr = np.clip(arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _audio_wav(audio) -> tuple[bytes, int, np.ndarray]:
    """16-bit mono WAV of the first item; (bytes, sample rate, the float waveform [C, T])."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise SonicServiceError("audio: expected an AUDIO input ({'waveform': [B, C, T], 'sample_rate': int})")
    wav = audio["waveform"]
    wav = wav.detach().cpu().float().numpy() if hasattr(wav, "detach") else np.asarray(wav, dtype=np.float32)
    if wav.ndim != 3 or wav.shape[-1] == 0:
        raise SonicServiceError(f"audio: expected a waveform [B, C, T], got shape {wav.shape}")
    rate = int(audio["sample_rate"])
    channels = wav[0]
    mono = np.clip(channels.mean(axis=0), -1.0, 1.0)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((mono * 32767.0).astype("<i2").tobytes())
    return buf.getvalue(), rate, channels


def _multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data, ctype) in files.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                  f"Content-Type: {ctype}\r\n\r\n".encode())
        out.write(data)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _call(url: str, api_key: str, data: bytes | None = None, content_type: str | None = None,
          timeout: float = 120.0, extra: dict | None = None) -> tuple[int, dict | bytes]:
    headers = {"Accept": "application/json", **(extra or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if content_type:
        headers["Content-Type"] = content_type
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        body, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    except (urllib.error.URLError, OSError) as e:
        raise SonicServiceError(f"the sonic service at {url.split('/api/')[0]} cannot be reached: "
                                f"{getattr(e, 'reason', e)}") from e
    if "json" in ctype:
        return status, json.loads(body)
    return status, body


SUBMIT_TRIES = 4
RETRY_WAITS_S = (1.0, 3.0, 9.0)


def _submit(url: str, api_key: str, body: bytes, ctype: str) -> tuple[int, dict | bytes]:
    """POST a job with an Idempotency-Key and send it again, with the same key, after a network
    error or a 502/503/504: the service makes the job once however many tries reach it, and a
    try whose answer was lost gets that job's answer again (no second render, no second charge)."""
    key = {"Idempotency-Key": f"comfyui-{uuid.uuid4().hex}"}
    for attempt in range(SUBMIT_TRIES):
        try:
            status, answer = _call(url, api_key, body, ctype, extra=key)
        except SonicServiceError:
            if attempt == SUBMIT_TRIES - 1:
                raise
        else:
            if status not in (502, 503, 504) or attempt == SUBMIT_TRIES - 1:
                return status, answer
        time.sleep(RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S) - 1)])
    raise SonicServiceError("sonic service: no answer")  # not reached: the last try returns or raises


def _refusal(status: int, body) -> SonicServiceError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    field = f" (field {err['field']})" if err.get("field") else ""
    code = f" [{err['code']}]" if err.get("code") else ""
    return SonicServiceError(f"sonic service: {err.get('message', f'HTTP {status}')}{field}{code}")


def _read_frames(path: str):
    """The MP4's frames as float32 [N, H, W, 3] in 0..1 (PyAV, else OpenCV), filled in place."""
    frames = None
    try:
        import av
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception:                                    # noqa: BLE001 - no PyAV, or it cannot read this file
        frames = None
    if not frames:
        import cv2
        cap = cv2.VideoCapture(path)
        frames = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
        cap.release()
    if not frames:
        raise SonicServiceError(f"the video {path} has no frames that could be read")
    out = np.empty((len(frames), *frames[0].shape), np.float32)
    for i, f in enumerate(frames):
        np.multiply(f, 1.0 / 255.0, out=out[i], casting="unsafe")
    return out


def _output_dir() -> str:
    try:
        import folder_paths                     # ComfyUI's own module: its output folder
        return os.path.join(folder_paths.get_output_directory(), "sonic")
    except ImportError:
        return os.path.join(tempfile.gettempdir(), "sonic-comfyui")


class SonicTalkingHead:
    """Portrait + speech -> a talking-head video, made by a sonic service."""

    CATEGORY = "sonic"
    FUNCTION = "generate"
    RETURN_TYPES = ("STRING", "IMAGE", "AUDIO")
    RETURN_NAMES = ("video_path", "frames", "audio")
    OUTPUT_NODE = True
    DESCRIPTION = "Sends the portrait and the speech to a sonic server and returns its lip-synced video."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "the portrait (the first image of the batch)"}),
                "audio": ("AUDIO", {"tooltip": "the speech"}),
                "server_url": ("STRING", {"default": "http://127.0.0.1:5000"}),
                "min_resolution": ("INT", {"default": 512, "min": 256, "max": 1024, "step": 64}),
                "fps": ("INT", {"default": 25, "min": 10, "max": 60}),
                "seed": ("INT", {"default": 42, "min": 0, "max": 4294967295}),
                "dynamic_scale": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 2.0, "step": 0.05}),
                "motion_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.05}),
                "expand_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05}),
                "inference_steps": ("INT", {"default": 25, "min": 1, "max": 100}),
                "crop_to_face": ("BOOLEAN", {"default": True}),
                "align_mouth": ("BOOLEAN", {"default": True}),
                "smooth_motion": ("BOOLEAN", {"default": True}),
                "gaze": (["natural", "camera"], {"default": "natural"}),
                "expression": (["neutral", "smile", "serious"], {"default": "neutral"}),
                "expression_scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
            "optional": {
                "api_key": ("STRING", {"default": "", "tooltip": "only if the server asks for one"}),
                "timeout_s": ("INT", {"default": 1800, "min": 10, "max": 86400}),
                "duration": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 300.0, "step": 0.1,
                                       "tooltip": "seconds of video; 0: as long as the speech"}),
            },
        }

    def generate(self, image, audio, server_url, api_key="", timeout_s=1800, **params):
        import torch
        base = server_url.rstrip("/")
        if not params.get("duration"):
            params.pop("duration", None)                      # 0: the recording's length
        wav, rate, channels = _audio_wav(audio)
        body, ctype = _multipart({"config": json.dumps({**params, "async": True})},
                                 {"image": ("portrait.png", _image_png(image), "image/png"),
                                  "audio": ("speech.wav", wav, "audio/wav")})
        status, answer = _submit(f"{base}/api/sonic/generate", api_key, body, ctype)
        if status == 200 and isinstance(answer, dict) and answer.get("success"):
            job = answer                                      # a cached result
        elif status == 202 and isinstance(answer, dict):
            job = self._follow(base, api_key, answer, timeout_s)
        else:
            raise _refusal(status, answer)
        if job.get("status", "succeeded") != "succeeded":
            raise _refusal(500, job)
        # no key with the download: /output needs none, and a presigned URL must carry no other credentials
        status, video = _call(job["video_url"], "", timeout=300)
        if status != 200 or not isinstance(video, bytes):
            raise _refusal(status, video)
        folder = _output_dir()
        os.makedirs(folder, exist_ok=True)
        job_id = str(job.get("job_id", ""))
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):      # the name is ours, never the server's path
            raise SonicServiceError(f"sonic service: an unexpected job id {job_id[:40]!r}")
        path = os.path.join(folder, f"{job_id}.mp4")
        with open(path, "wb") as f:
            f.write(video)
        frames = torch.from_numpy(_read_frames(path))
        keep = int(round(float(job["duration"]) * rate))      # the audio of the video: cut or padded
        out = np.zeros((channels.shape[0], keep), dtype=np.float32)
        out[:, :min(keep, channels.shape[1])] = channels[:, :keep]
        return (path, frames, {"waveform": torch.from_numpy(out)[None], "sample_rate": rate})

    def _follow(self, base: str, api_key: str, job: dict, timeout_s: float) -> dict:
        """Poll the job until it ends. Passing trouble (the network, 429, 503 while the service
        restarts) is retried until the deadline; a ComfyUI interrupt or the deadline cancels the job."""
        bar = None
        try:
            from comfy.utils import ProgressBar       # ComfyUI's progress on the node
            bar = ProgressBar(100)
        except ImportError:
            pass
        job_id = job["job_id"]
        url = f"{base}/api/sonic/jobs/{job_id}"        # built from the node's URL, not the server's absolute one
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                _interrupted()
                try:
                    status, answer = _call(url, api_key, timeout=30)
                except SonicServiceError:                  # unreachable for a moment
                    status, answer = None, None
                if isinstance(answer, dict) and answer.get("status"):
                    job = answer
                    if bar is not None:
                        bar.update_absolute(int(100 * float(job.get("progress", 0.0))), 100)
                    if job["status"] in TERMINAL:
                        return job
                elif status is not None and status not in (429, 502, 503, 504):
                    raise _refusal(status, answer)
                time.sleep(POLL_S)
        except BaseException:
            _cancel(base, api_key, job_id)
            raise
        _cancel(base, api_key, job_id)
        raise SonicServiceError(f"sonic service: the job {job_id} did not end within {timeout_s} s; it was canceled")


def _interrupted() -> None:
    """ComfyUI's Cancel (raises its own exception), when running inside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def _cancel(base: str, api_key: str, job_id: str) -> None:
    try:
        _call(f"{base}/api/sonic/jobs/{job_id}/cancel", api_key, data=b"", timeout=10)
    except Exception:                                  # noqa: BLE001 - best effort: the job may be over
        pass
