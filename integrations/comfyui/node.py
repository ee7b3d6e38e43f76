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
MAX_CHANNELS = 8
CHUNK = 1 << 16
MAX_ANSWER_BYTES = 4 << 20                     # a JSON answer, an error page
MAX_VIDEO_BYTES = 2 << 30                      # the video (a 5-minute 1024 px clip is a few hundred MB)
MAX_DURATION_S = 86400.0


class SonicServiceError(RuntimeError):
    """The service refused or failed the job; the message is the server's own."""


class Unreachable(SonicServiceError):
    """No answer at all (the network, a refused connection): a submit is tried again."""


def _image_png(image) -> bytes:
    from PIL import Image
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 4 or shape[0] == 0 or shape[-1] not in (1, 3, 4):
        raise SonicServiceError(f"image: expected an IMAGE tensor [B, H, W, C] with one image or more, got {shape}")
    arr = image[0].detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image[0], np.float32)
    arr = np.clip(arr[..., :3] if arr.shape[-1] >= 3 else np.repeat(arr, 3, axis=-1), 0.0, 1.0)
    buf = io.BytesIO()
    Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _audio_wav(audio) -> tuple[bytes, int, np.ndarray]:
    """16-bit mono WAV of the first item; (bytes, sample rate, the float waveform [C, T])."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise SonicServiceError("audio: expected an AUDIO input ({'waveform': [B, C, T], 'sample_rate': int})")
    wav = audio["waveform"]
    wav = wav.detach().cpu().numpy() if hasattr(wav, "detach") else np.asarray(wav)
    if wav.ndim != 3 or 0 in wav.shape or wav.shape[1] > MAX_CHANNELS:
        raise SonicServiceError(f"audio: expected a waveform [B, C, T] of 1 to {MAX_CHANNELS} channels, "
                                f"got shape {wav.shape}")
    if np.issubdtype(wav.dtype, np.integer):                # PCM samples: full scale is the type's
        wav = wav.astype(np.float32) / float(np.iinfo(wav.dtype).max)
    try:
        rate = int(audio["sample_rate"])
    except (TypeError, ValueError, OverflowError):
        rate = 0
    if not 1000 <= rate <= 768000:
        raise SonicServiceError(f"audio: the sample_rate must be a whole number of Hz, got {audio['sample_rate']!r}")
    channels = wav[0].astype(np.float32)
    # every channel as recorded: the service mixes them down its own way (a mean of two opposite
    # phases here was silence, which it then refused)
    pcm = (np.clip(channels, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels.shape[0])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(pcm.T).tobytes())
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
          timeout: float = 120.0, extra: dict | None = None, sink=None) -> tuple[int, dict | bytes]:
    """One request: (status, its JSON, or its bytes; or b"" when `sink`, an open file, took them).
    `timeout` bounds the whole call, not each read (a server that drips its answer is cut), and
    an answer past its size limit is refused (an endless one grew the process by a GB a second)."""
    if not re.match(r"https?://", url, re.IGNORECASE):  # (urllib also opens file:// and ftp://)
        raise SonicServiceError(f"sonic service: {url[:100]!r} is not an http:// or https:// address")
    headers = {"Accept": "application/json", **(extra or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if content_type:
        headers["Content-Type"] = content_type
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, data=data, headers=headers, method="POST" if data is not None else "GET")
    try:
        try:
            resp = urllib.request.urlopen(req, timeout=min(timeout, 30.0))
        except urllib.error.HTTPError as e:
            resp = e
        with resp:
            status, ctype = resp.code, resp.headers.get("Content-Type", "")
            limit = MAX_VIDEO_BYTES if sink is not None and status == 200 else MAX_ANSWER_BYTES
            body = _read_within(resp, limit, deadline, url, sink if status == 200 else None)
    except (urllib.error.URLError, OSError, ValueError) as e:   # (ValueError: a URL urllib cannot use)
        raise Unreachable(f"the sonic service at {url.split('/api/')[0][:100]} cannot be reached: "
                          f"{getattr(e, 'reason', e)}") from e
    if "json" in ctype and body:
        try:
            return status, json.loads(body)
        except ValueError:
            raise SonicServiceError(f"sonic service: HTTP {status} with an answer that is not JSON") from None
    return status, body


def _read_within(resp, limit: int, deadline: float, url: str, sink=None) -> bytes:
    """The answer's body, read in chunks until its end, its size limit or the deadline."""
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise SonicServiceError(f"sonic service: {url.split('?')[0][:100]} took too long to answer")
        chunk = resp.read1(CHUNK)                    # what has arrived (read() waits for all of CHUNK)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise SonicServiceError(f"sonic service: the answer of {url.split('?')[0][:100]} is over {limit} bytes")
        if sink is not None:
            sink.write(chunk)
        else:
            chunks.append(chunk)


SUBMIT_TRIES = 4
RETRY_WAITS_S = (1.0, 3.0, 9.0)


def _submit(url: str, api_key: str, body: bytes, ctype: str, timeout_s: float) -> tuple[int, dict | bytes]:
    """POST a job with an Idempotency-Key and send it again, with the same key, after a network
    error or a 502/503/504: the service makes the job once however many tries reach it, and a
    try whose answer was lost gets that job's answer again (no second render, no second charge)."""
    key = {"Idempotency-Key": f"comfyui-{uuid.uuid4().hex}"}
    for attempt in range(SUBMIT_TRIES):
        try:
            status, answer = _call(url, api_key, body, ctype, timeout=min(120.0, timeout_s), extra=key)
        except Unreachable:
            if attempt == SUBMIT_TRIES - 1:
                raise
        else:
            if status not in (502, 503, 504) or attempt == SUBMIT_TRIES - 1:
                return status, answer
        time.sleep(RETRY_WAITS_S[min(attempt, len(RETRY_WAITS_S) - 1)])
    raise SonicServiceError("sonic service: no answer")  # not reached: the last try returns or raises


def _refusal(status: int, body) -> SonicServiceError:
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {"message": str(err)[:300]} if err else {}
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
        base = str(server_url).strip().rstrip("/")
        if not re.fullmatch(r"https?://[^/?#\s]+(/[^?#\s]*)?", base, re.IGNORECASE):
            raise SonicServiceError(f"server_url: {base[:100]!r} is not an http:// or https:// address "
                                    "(http://127.0.0.1:5000)")
        if not params.get("duration"):
            params.pop("duration", None)                      # 0: the recording's length
        wav, rate, channels = _audio_wav(audio)
        body, ctype = _multipart({"config": json.dumps({**params, "async": True})},
                                 {"image": ("portrait.png", _image_png(image), "image/png"),
                                  "audio": ("speech.wav", wav, "audio/wav")})
        status, answer = _submit(f"{base}/api/sonic/generate", api_key, body, ctype, timeout_s)
        if status == 200 and isinstance(answer, dict) and answer.get("success"):
            job = answer                                      # a cached result
        elif status == 202 and isinstance(answer, dict) and isinstance(answer.get("job_id"), str):
            job = self._follow(base, api_key, answer, timeout_s)
        else:
            raise _refusal(status, answer)
        if job.get("status", "succeeded") != "succeeded":
            raise _refusal(500, job)
        job_id, duration, video_url = _finished(job)
        folder = _output_dir()
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{job_id}.mp4")
        # no key with the download: /output needs none, and a presigned URL must carry no other credentials
        with open(path + ".part", "wb") as f:
            try:
                status, video = _call(video_url, "", timeout=300, sink=f)
            except BaseException:
                os.unlink(path + ".part")
                raise
        if status != 200:
            os.unlink(path + ".part")
            raise _refusal(status, video)
        os.replace(path + ".part", path)
        frames = torch.from_numpy(_read_frames(path))
        keep = int(round(duration * rate))                    # the audio of the video: cut or padded
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
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):   # (it goes into the URL below)
            raise SonicServiceError(f"sonic service: an unexpected job id {job_id[:40]!r}")
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
                    progress = job.get("progress")
                    if bar is not None and isinstance(progress, (int, float)) and 0 <= progress <= 1:
                        bar.update_absolute(int(100 * progress), 100)
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


def _finished(job: dict) -> tuple[str, float, str]:
    """A succeeded job's id, duration and video URL, each checked: an answer without them (not a
    sonic service, a proxy's page) is an error that says so, not a KeyError."""
    job_id, video_url = str(job.get("job_id", "")), job.get("video_url")
    if not re.fullmatch(r"[0-9a-f]{32}", job_id):          # the file's name is ours, never the server's path
        raise SonicServiceError(f"sonic service: an unexpected job id {job_id[:40]!r}")
    try:
        duration = float(job.get("duration"))
    except (TypeError, ValueError):
        duration = -1.0
    if not 0.0 < duration <= MAX_DURATION_S:
        raise SonicServiceError(f"sonic service: an unexpected duration {str(job.get('duration'))[:40]!r}")
    if not isinstance(video_url, str) or not video_url:
        raise SonicServiceError("sonic service: the finished job names no video_url")
    return job_id, duration, video_url


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
