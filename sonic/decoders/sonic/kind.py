"""The `sonic` decoder kind: the Sonic diffusion model behind the decoder interface.

It speaks (sonic/decoders/__init__.py): from the framed portrait and the waveform it makes the
frames itself, so the pipeline runs no phone recogniser and no motion stage for it. What each
generation parameter does with it is `SonicKind.meanings` (docs/gpu.md has the figures).
"""

from __future__ import annotations

import importlib.util
import threading

import cv2
import numpy as np

from ...errors import SetupError
from ...geometry import Framing
from ...options import GenerateOptions
from ...settings import Settings
from .. import DecoderKind, all_parameters, register

EXTRA_MODULES = ("diffusers", "transformers", "safetensors")  # the [gpu] extra's (pyproject.toml)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


MULTIPLE = 64


class SpokenFrames:
    def __init__(self, frame: np.ndarray, batches, lipsync_offset_ms: float = 0.0):
        self.frame, self.batches, self.lipsync_offset_ms = frame, batches, lipsync_offset_ms


def fit_to_multiple(framing: Framing) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The frame resized so both sides are multiples of 64, and the face box (x0, y0, x1, y1) in it."""
    h, w = framing.frame.shape[:2]
    H, W = max(MULTIPLE, int(round(h / MULTIPLE)) * MULTIPLE), max(MULTIPLE, int(round(w / MULTIPLE)) * MULTIPLE)
    frame = (
        framing.frame
        if (H, W) == (h, w)
        else cv2.resize(framing.frame, (W, H), interpolation=cv2.INTER_AREA if H < h else cv2.INTER_CUBIC)
    )
    xs, ys = framing.landmarks[:, 0] * W / w, framing.landmarks[:, 1] * H / h
    return frame, (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))


class SonicKind(DecoderKind):
    name = "sonic"
    # the model makes its own eyes, brows and expression from the audio: no controls for them
    honours = all_parameters() - {"gaze", "expression", "expression_scale"}
    speaks = True
    meanings = {
        "duration": "seconds of video: the model generates 12.5 frames a second for that long; shorter than the "
        "audio trims it, longer pads silence",
        "min_resolution": "the frame's short side in px; both sides are then rounded to multiples of 64 (the VAE "
        "and the UNet need them)",
        "expand_ratio": "margin around the detected face for the portrait's crop, as a fraction of the face box, "
        "as for the warp decoder",
        "inference_steps": "Euler steps of the sampler; each step runs the UNet once per window of 25 generated "
        "frames (three guidance branches at once), so time grows with it",
        "dynamic_scale": "scales the two motion micro-conditions (buckets) the audio predicts: how much the head "
        "and face move",
        "motion_scale": "scales the audio's guidance (7.5 x motion_scale beside the image's 2.0): how strongly the "
        "mouth follows the audio, not how far the head moves",
        "align_mouth": "measures the mouth of every generated frame against the audio's loudness and moves the "
        "audio track by the lag found; the lag is lipsync_offset_ms",
        "smooth_motion": "the generated frames (12.5 a second, 25 after RIFE) are retimed to fps by a cross-fade "
        "of the two nearest (true) or by the nearest one (false)",
        "fps": "output frame rate: the generated frames are retimed to it",
        "seed": "seeds the diffusion noise (a torch generator on the model's device): the same inputs, seed and "
        "device give the same frames",
        "crop_to_face": "crops the portrait to the face and its margin before generation; false keeps the whole "
        "photo (resized to multiples of 64)",
    }

    def __init__(self, model=None):
        self.model = model
        self.device = "cpu" if model is None else model.device.type
        self._lock = threading.Lock()  # one request at a time on the model (the UNet's audio context)

    def load(self, settings: Settings) -> "SonicKind":
        missing = [name for name in EXTRA_MODULES if not _installed(name)]
        if missing:  # named here, not as the ModuleNotFoundError of whichever is imported first
            raise SetupError(
                f"the sonic decoder needs {', '.join(missing)}, not installed: "
                'pip install "sonic-talking-head[gpu]" (or the requirements file)'
            )
        from .model import SonicModel, quiet_libraries

        quiet_libraries()
        return SonicKind(SonicModel(settings.sonic_checkpoints, settings.device, settings.allow_unsafe_pickle))

    @property
    def identity(self) -> str:
        """sonic + a fingerprint of the loaded weights' files (path, size, modification time)."""
        if self.model is None:
            return self.name
        import hashlib

        layout = self.model.layout
        files = [layout.weights(s) for s in ("unet", "audio2token", "audio2bucket")] + [layout.unet_config]
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
        return f"{self.name}-{h.hexdigest()[:12]}"

    def speak(self, framing: Framing, wav: np.ndarray, n_frames: int, options: GenerateOptions, progress):
        import torch

        from .audio import GENERATED_FPS
        from .model import generated_count, retime

        if self.model is None:
            raise RuntimeError("the sonic decoder is not loaded (SonicKind.load)")
        model = self.model
        frame, box = fit_to_multiple(framing)
        n = generated_count(n_frames, options.fps)
        gen = torch.Generator(model.device).manual_seed(options.seed)

        def frames():
            with self._lock:
                progress("audio", 0.1)
                cond = model.condition(frame, box, wav, n, options.dynamic_scale, gen)
                latents = model.denoise(
                    cond,
                    n,
                    options.inference_steps,
                    options.motion_scale,
                    gen,
                    lambda done, total: progress("denoise", 0.15 + 0.75 * done / total),
                )
                progress("render", 0.9)
                frames, rate = model.decode(latents), GENERATED_FPS
                if model.rife is not None:  # RIFE: a frame between each pair, 25 a second
                    frames, rate = model.doubled(frames), 2 * GENERATED_FPS
                yield from retime(frames, n_frames, options.fps, blend=options.smooth_motion, source_fps=rate)

        return SpokenFrames(frame, frames())


register(SonicKind())
