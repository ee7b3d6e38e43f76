"""One exception family for the whole pipeline.

Every error a caller can cause is a `SonicError` with a stable machine `code`, a human `message`
and, where one field is to blame, its name. The library knows codes only: whoever serves it
(the web service, the CLI) decides what a code means to its own callers; the CLI prints
`message` on one line.
"""

from __future__ import annotations

import json
import math
from typing import Any


class SonicError(Exception):
    """Base of the family; its own code means a failure nobody outside can act on."""

    code = "internal_error"

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        d = {"code": self.code, "message": self.message}
        if self.field:
            d["field"] = self.field
        return d


class InvalidParameter(SonicError):
    """A parameter is unknown, of the wrong type or out of range."""

    code = "invalid_parameter"


class InputTooLarge(SonicError):
    """An upload or an image's pixel count is over the configured limit."""

    code = "input_too_large"


class UnsupportedMedia(SonicError):
    """The content does not decode as an image / audio."""

    code = "unsupported_media"


class NoFaceDetected(SonicError):
    """The portrait shows no face the face analysis can find."""

    code = "no_face_detected"


class AudioTooLong(SonicError):
    """The audio (or the requested duration) is longer than the configured limit."""

    code = "audio_too_long"


class EmptyAudio(SonicError):
    """Audio decodes to nothing, or to silence only."""

    code = "empty_audio"


class Busy(SonicError):
    """A shared resource (the memory set aside for decoding) stays taken: retry shortly."""

    code = "busy"


class PipelineError(SonicError):
    """A stage failed for a reason the caller did not cause (ffmpeg failed, disk full...)."""

    code = "pipeline_error"


class DiskFull(PipelineError):
    """No space left where the video is written: nothing the caller did; retry once space is freed."""

    code = "disk_full"


class SetupError(SonicError):
    """The models cannot be set up as configured: a missing or unreadable checkpoint file, a key
    or a tensor shape that does not fit the model. The message names the file and the first
    offending key; the operator, not the caller, must act."""

    code = "setup_failed"


def shown(value: Any, limit: int = 40) -> str:
    """A caller's value as its JSON (or a settings file's YAML) said it, short: true, null, "abc",
    1e+300 (a message that said "got True" or printed a 300-digit number spoke Python, not the
    API)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**15:
        try:
            return f"{value:.6g}"
        except OverflowError:  # past any float
            return f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, OverflowError):  # not a JSON value (a library caller's object)
        try:
            text = repr(value)
        except ValueError:  # holding an integer too long to print
            text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
