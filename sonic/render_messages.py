"""The messages between this process and a render helper (render_pool.py, _render_helper.py).

Each is a small frozen dataclass, pickled over the helper's socket. A helper answers every
request but `Release`, in the order it got them: `RenderBatch` with `Rendered` or `Failed`,
`RecognisePhones` with `Phones` or `Failed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RenderBatch:
    """Render one batch of frames into one slot of the request's frames file."""

    request: str  # the request's key: a key the helper has not seen loads the two files below
    decoder_path: str  # the request's prepared decoder, pickled
    frames_path: str  # a .npy of (slots, B, H, W, 3) uint8 that both sides map into memory
    slot: int  # which (B, H, W, 3) slot of it receives the frames
    coeffs: np.ndarray  # (b, K) in motion.COEFFS order, b <= B
    head: np.ndarray  # (b, 4) head poses (see motion.Motion)


@dataclass(frozen=True)
class RecognisePhones:
    """Recognise the timed phones of a waveform (audio_features.PhoneRecognizer)."""

    wav: np.ndarray  # (N,) float32 mono at media.SAMPLE_RATE


@dataclass(frozen=True)
class Release:
    """The request is over: drop its decoder and frames file (in /dev/shm, a mapped file holds
    its memory even once deleted). Not answered."""


@dataclass(frozen=True)
class Rendered:
    """A `RenderBatch` done: its frames are in the slot."""

    frames: int  # how many frames were written, b


@dataclass(frozen=True)
class Phones:
    """A `RecognisePhones` done."""

    phones: list[tuple[str, float, float]]  # (ARPAbet phone, start_s, end_s), in order


@dataclass(frozen=True)
class Failed:
    """A request that raised in the helper; the caller fails its own request with it."""

    error: str  # "ExceptionType: message"


Request = RenderBatch | RecognisePhones | Release
Answer = Rendered | Phones | Failed
