"""Cheap checks of a request's inputs, before anything is queued.

`check_inputs` decodes the portrait and the recording and checks format, pixel count and
duration (the options are already validated by `GenerateOptions.from_dict`). It needs no face
detector: a web process that only validates and queues never loads FaceMesh, and a face-less
portrait is found by the task that runs the job (`no_face_detected`).

The decoded arrays are returned so that a job run in the same process is not decoded twice
(`SonicPipeline` takes them in place of the paths);
a job run elsewhere decodes its stored files again.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from .media import load_audio, load_image
from .options import GenerateOptions
from .settings import Limits


@dataclass(frozen=True)
class CheckedInputs:
    rgb: np.ndarray          # (H, W, 3) uint8
    wav: np.ndarray          # mono float32 at media.SAMPLE_RATE
    decode_s: float = 0.0    # seconds spent decoding both (reported in the result's timings)

    @property
    def audio_s(self) -> float:
        from .media import SAMPLE_RATE
        return len(self.wav) / SAMPLE_RATE


def check_inputs(image: str | Path, audio: str | Path, options: GenerateOptions,
                 limits: Limits) -> CheckedInputs:
    """Decode and check both inputs against the limits (max_image_pixels, max_duration_s);
    raises the library's errors (unsupported_media, input_too_large, audio_too_long,
    empty_audio) with the field named."""
    del options       # no parameter depends on the content yet; kept so the seam can grow
    t0 = time.perf_counter()
    rgb = load_image(image, limits.max_image_pixels)
    wav = load_audio(audio, limits.max_duration_s)
    return CheckedInputs(rgb=rgb, wav=wav, decode_s=time.perf_counter() - t0)
