"""Live mode, the library: a portrait that speaks PCM as it arrives, frame by frame.

It owns a prepared face and a clock; it takes PCM chunks and yields timed frames; it knows
nothing of WebRTC or HTTP (the server's transport is sonic_server/live/). From Python:

    from sonic import load_pipeline
    from sonic.live import open_session

    session = open_session(load_pipeline(), "portrait.jpg", {"min_resolution": 256})
    session.speak(waveform)              # float32 mono at 16 kHz, queued behind what is queued
    for frame in session.frames():       # one every 1/fps s of wall time, idling when silent
        show(frame.image, frame.audio)   # (H, W, 3) uint8 and the speech heard with it

`session.step()` makes the next frame at once, without the clock (for files, tests, or a
caller with its own clock).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .session import LOOKAHEAD_S, LiveFace, LiveFrame, LiveSession, check_live_decoder

if TYPE_CHECKING:
    from ..options import GenerateOptions
    from ..pipeline import SonicPipeline

__all__ = [
    "LOOKAHEAD_S",
    "LiveFace",
    "LiveFrame",
    "LiveSession",
    "open_session",
    "prepare_live_face",
]


def prepare_live_face(
    pipeline: SonicPipeline, image: str | Path | np.ndarray, options: GenerateOptions, faces=None
) -> LiveFace:
    """The portrait (a path, a PIL image or RGB uint8 (H, W, 3)) decoded, checked, framed and its decoder
    prepared, with the pipeline's models and limits: the one-off work before the first frame.
    `faces`: a face analyser of the caller's own (see SonicPipeline.framing)."""
    from ..motion import build_rig
    from ..pipeline import decode_portrait

    check_live_decoder(pipeline.decoder.speaks, pipeline.decoder.name)
    rgb = decode_portrait(image, pipeline.settings.limits)
    framing = pipeline.framing(rgb, options, 1, faces)
    rig = build_rig(framing.landmarks)
    return LiveFace(framing=framing, rig=rig, decoder=pipeline.decoder.prepare(framing, rig, options))


def open_session(
    pipeline: SonicPipeline,
    image: str | Path | np.ndarray,
    params: Mapping | GenerateOptions | None = None,
) -> LiveSession:
    """A live session of the portrait, with the generate parameters that apply (min_resolution,
    expand_ratio, crop_to_face, dynamic_scale, motion_scale, smooth_motion, fps, seed, gaze, expression,
    expression_scale)."""
    from ..errors import InvalidParameter
    from ..options import GenerateOptions
    from ..pipeline import SonicPipeline

    if not isinstance(pipeline, SonicPipeline):  # (None was an AttributeError from inside)
        raise InvalidParameter(
            f"pipeline must be a SonicPipeline (sonic.load_pipeline()), got {type(pipeline).__name__}",
            field="pipeline",
        )
    options = params if isinstance(params, GenerateOptions) else pipeline.options(dict(params or {}))
    return LiveSession(prepare_live_face(pipeline, image, options), options)
