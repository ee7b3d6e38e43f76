"""The one table from error codes to HTTP statuses.

The library (`sonic.errors`) and the job records carry codes only; a status is looked up here
when a response is written, so a code answers with the same status everywhere and a stored job
never holds one.
"""
from __future__ import annotations

STATUS_BY_CODE: dict[str, int] = {
    # raised by the library (sonic.errors)
    "invalid_parameter": 400,
    "input_too_large": 413,
    "unsupported_media": 415,
    "no_face_detected": 422,
    "audio_too_long": 422,
    "empty_audio": 422,
    "pipeline_error": 500,
    "internal_error": 500,
    # produced by the server itself
    "unauthorized": 401,
    "not_found": 404,
    "job_not_found": 404,
    "method_not_allowed": 405,
    "canceled": 409,
    "rate_limited": 429,
    "busy": 503,
    "not_ready": 503,
    "interrupted": 500,
    "out_of_memory": 500,
}


def status_for(code: str) -> int:
    """The HTTP status for an error code; 500 for a code the table does not know."""
    return STATUS_BY_CODE.get(code, 500)


def public_error(error: dict) -> dict:
    """A job's stored error (code, message, field) as the API shows it, with its status.

    A `status` stored by an older release is ignored: the status always follows the code.
    """
    body = {k: v for k, v in error.items() if k != "status"}
    body["status"] = status_for(body.get("code", "internal_error"))
    return body
