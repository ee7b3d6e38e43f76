"""The `warp` decoder kind: the warp of the photo (decoder.py) behind the decoder interface.

It renders from motion: the pipeline recognises phones, predicts the motion (sonic/motion.py)
and hands this kind's prepared decoder batches of coefficients and head poses. Its prepared
decoder is pickled to the render helpers (sonic/render_pool.py).
"""

from __future__ import annotations

import numpy as np

from ...geometry import Framing, turned, upright_turns
from ...motion import Rig, build_rig
from ...options import GenerateOptions
from .. import DecoderKind, all_parameters, register
from .decoder import WarpDecoder
from .expression import pose_framing


class WarpKind(DecoderKind):
    name = "warp"
    honours = all_parameters() - {"inference_steps"}  # no denoising: one warp per frame
    meanings = {
        "duration": "seconds of video: motion is predicted and frames rendered for that long; shorter than the "
        "audio trims it, longer pads silence with the mouth at rest",
        "min_resolution": "short side of the output frame in px (both sides rounded to multiples of 8); the photo "
        "is resampled once to 3 source px per frame px and every frame is one lookup into it",
        "expand_ratio": "margin around the detected face for the crop, as a fraction of the face box; what lies "
        "outside the head's reach stays the untouched photo",
        "dynamic_scale": "scales the mouth the audio drives (the jaw's opening and the lips' spread and rounding) "
        "and the brows' raises on accents (at most 0.06 IOD)",
        "motion_scale": "scales the head's rigid motion (roll, shift, scale: seeded drift plus nods on loud "
        "syllables); 0 keeps the head still, blinks stay",
        "align_mouth": "measures the lag between the predicted mouth opening and the audio's loudness (+-4 frames) "
        "and shifts the mouth by it; the lag is lipsync_offset_ms",
        "smooth_motion": "smooths the mouth's opening and spread (a 30 ms Gaussian) and the head pose (80 ms) "
        "over time",
        "fps": "frames rendered per second: motion is predicted at this rate",
        "seed": "seeds the head's drift and the blinks' timing: the same inputs and seed give the same frames",
        "crop_to_face": "crops the frame to the face and its margin; false keeps the whole photo as the frame",
        "gaze": "natural: the irises move between seeded fixations (0.5-3 s, mostly at the camera, saccades of "
        "up to 0.04 IOD, often with a blink), glancing away at some phrase starts; camera: they stay as in the photo",
        "expression": "warps the portrait once before it speaks: smile lifts the lip corners and cheeks and "
        "narrows the eyes a little; serious lowers the brows and relaxes the corners; neutral keeps the photo's own",
        "expression_scale": "how far the expression's warp goes, 0 (the photo's own) to 1",
    }

    def prepare(self, framing: Framing, rig: Rig, options: GenerateOptions) -> WarpDecoder | TurnedBack:
        """The decoder of the portrait, posed first when an expression is asked for (its rig
        rebuilt from the posed landmarks: the motion's coefficients apply to the posed face).
        A face turned far in the photo (a sideways or upside-down photo) is rendered upright, in
        a quarter turn of its frame, and its frames turned back."""
        turns = upright_turns(framing.landmarks)
        upright = turned(framing, turns)
        posed = pose_framing(upright, options.expression, options.expression_scale)
        decoder = WarpDecoder(
            posed, rig if posed is framing else build_rig(posed.landmarks), motion_scale=options.motion_scale
        )
        return TurnedBack(decoder, turns) if turns else decoder


class TurnedBack:
    """A decoder that renders a face upright in a quarter turn of the frame, its frames turned
    back to the photo's own orientation (one copy of each frame)."""

    def __init__(self, upright: WarpDecoder, turns: int):
        self.upright, self.turns = upright, turns
        self.frame = np.ascontiguousarray(np.rot90(upright.frame, -turns))

    def render(self, coeffs: np.ndarray, head: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """As WarpDecoder.render, in the photo's orientation."""
        frames = np.rot90(self.upright.render(coeffs, head), -self.turns, axes=(1, 2))
        if out is None:
            return np.ascontiguousarray(frames)
        out[:] = frames
        return out


register(WarpKind())
