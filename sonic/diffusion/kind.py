"""The `sonic` decoder kind: the Sonic diffusion model behind the decoder interface.

It speaks (sonic/decoders.py): from the framed portrait and the waveform it makes the frames
itself. What each generation parameter does with it:
- inference_steps: Euler steps of the sampler (UNet calls = steps x windows of 25 frames);
- dynamic_scale: scales the motion buckets (how much the head and face move);
- motion_scale: scales the audio guidance (7.5 x motion_scale): how strongly the mouth follows
  the audio;
- smooth_motion: the 12.5 generated frames a second (25 after RIFE, when the folder has it) are
  retimed to `fps` by a cross-fade of the two nearest (true) or by holding the nearest (false);
- min_resolution: the frame's short side, both sides rounded to multiples of 64 (the VAE and
  UNet need them); expand_ratio and crop_to_face frame the portrait as for every decoder;
- seed: the noise (a torch generator on the model's device): same inputs, seed and device, same
  frames.
- align_mouth: the pipeline measures the mouth of every generated frame against the audio's
  loudness and moves the audio track by the lag it finds (sonic/lipsync.py); the lag is
  `lipsync_offset_ms`.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from ..decoders import DecoderKind, all_parameters, register
from ..geometry import Framing
from ..options import GenerateOptions
from ..settings import Settings

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
    honours = all_parameters()
    speaks = True

    def __init__(self, model=None):
        self.model = model
        self.device = "cpu" if model is None else model.device.type
        self._lock = threading.Lock()  # one request at a time on the model (the UNet's audio context)

    def load(self, settings: Settings) -> "SonicKind":
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
