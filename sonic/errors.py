"""One exception family for the whole pipeline.

Every error a caller can cause is a `SonicError` with a stable machine `code`, the HTTP `status`
the service should answer with, a human `message` and, where one field is to blame, its name.
The HTTP layer translates these once; the CLI prints `message` on one line.
"""
from __future__ import annotations


class SonicError(Exception):
    code = "internal_error"
    status = 500

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
    """A parameter is unknown, of the wrong type or out of range (400)."""
    code, status = "invalid_parameter", 400


class InputTooLarge(SonicError):
    """An upload or an image's pixel count is over the configured limit (413)."""
    code, status = "input_too_large", 413


class UnsupportedMedia(SonicError):
    """The content does not decode as an image / audio (415)."""
    code, status = "unsupported_media", 415


class NoFaceDetected(SonicError):
    code, status = "no_face_detected", 422


class AudioTooLong(SonicError):
    code, status = "audio_too_long", 422


class EmptyAudio(SonicError):
    """Audio decodes to nothing, or to silence only (422)."""
    code, status = "empty_audio", 422


class PipelineError(SonicError):
    """A stage failed for a reason the caller did not cause (ffmpeg failed, disk full...)."""
    code, status = "pipeline_error", 500
