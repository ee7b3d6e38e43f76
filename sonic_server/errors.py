"""The one table from error codes to HTTP statuses, the one error body, and the app's handlers.

The library (`sonic.errors`) and the job records carry codes only; a status is looked up here
when a response is written, so a code answers with the same status everywhere and a stored job
never holds one.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import time

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

from sonic import SonicError

from .live import END_REASONS as LIVE_END_REASONS
from .openapi import component

log = logging.getLogger("sonic.http")

STATUS_BY_CODE: dict[str, int] = {
    # raised by the library (sonic.errors)
    "invalid_parameter": 400,
    "input_too_large": 413,
    "unsupported_media": 415,
    "no_face_detected": 422,
    "audio_too_long": 422,
    "empty_audio": 422,
    "pipeline_error": 500,
    "setup_failed": 503,  # the models could not be set up (a checkpoint file or key): the operator acts
    "storage_unavailable": 503,  # the object store (storage: s3) or the accounts database did not answer: retry shortly
    "disk_full": 500,  # the server's disk, not the request: the design's 500 (as pipeline_error was)
    "internal_error": 500,
    # produced by the server itself
    "unauthorized": 401,
    "insufficient_credits": 402,  # credits.enabled: the estimate is more than the account's balance
    "forbidden": 403,  # credits.enabled: an admin route without the admin role, or no account
    "conflict": 409,  # a key (Idempotency-Key, a recharge's idempotency_key) used for another request; a live
    # speak while another to the session still arrives
    "not_found": 404,
    "job_not_found": 404,
    "session_not_found": 404,  # a live session that ended, or never existed
    "method_not_allowed": 405,
    "precondition_failed": 412,  # /output: If-Match or If-Unmodified-Since names another version of the video
    "upload_incomplete": 408,  # the body stopped before its end (server.socket_timeout_s without data)
    "canceled": 409,
    "rate_limited": 429,
    "busy": 503,
    "not_ready": 503,
    "interrupted": 500,
    "worker_lost": 500,  # distributed mode: the worker running the job was killed or lost
    "out_of_memory": 500,
    "job_timeout": 500,  # a job over server.job_timeout_s
}


def status_for(code: str) -> int:
    """The HTTP status for an error code; 500 for a code the table does not know."""
    return STATUS_BY_CODE.get(code, 500)


# the codes a client should retry, and after how long: a full disk clears when the operator
# (or the output expiry) frees room, so not within seconds
GENERATE_PATH = "/api/sonic/generate"  # the one route that takes its files by URL too
RETRY_AFTER = {"storage_unavailable": "5", "busy": "5", "rate_limited": "5", "disk_full": "60", "setup_failed": "60"}


def is_disk_full(e: BaseException) -> bool:
    """A full disk, or no room left in the service's quota, as the OS or SQLite says it
    ("database or disk is full")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(e, sqlite3.OperationalError) and "disk is full" in str(e)


def redis_not_answering(e: BaseException) -> bool:
    """Redis's client saying the server does not answer. (Redis is installed in distributed mode
    only: its errors are told by their module.)"""
    kinds = {f"{k.__module__}.{k.__name__}" for k in type(e).__mro__}
    return bool(kinds & {"redis.exceptions.ConnectionError", "redis.exceptions.TimeoutError"})


def public_error(error: dict) -> dict:
    """A job's stored error (code, message, field) as the API shows it, with its status.

    A `status` stored by an older release is replaced: the status always follows the code.
    """
    return {**error, "status": status_for(error.get("code", "internal_error"))}


ERROR_SCHEMA = component(
    "Error",
    {
        "type": "object",
        "properties": {
            "success": {"type": "boolean"},
            "request_id": {"type": "string"},
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": [*STATUS_BY_CODE, "http_error"]},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                    "needed": {"type": "integer", "description": "insufficient_credits: the price"},
                    "balance": {"type": "integer", "description": "insufficient_credits: the balance"},
                    "ended_reason": {
                        "type": "string",
                        "enum": [*LIVE_END_REASONS],
                        "description": "session_not_found: why the live session ended (docs/live.md)",
                    },
                    "job_id": {"type": "string", "description": "a generation that failed: its job (the log names it)"},
                },
            },
        },
    },
)


def error_response(
    code: str,
    message: str,
    field: str | None = None,
    headers: dict | None = None,
    status: int | None = None,
    extra: dict | None = None,
):
    """The one error body; its status comes from the code unless given; `extra`: more fields of
    the error (a 402's `needed`, `balance` and `held`)."""
    err = {"code": code, "message": message}
    if field:
        err["field"] = field
    err.update(extra or {})
    g.error_code = code  # for the request's log line
    resp = jsonify({"success": False, "error": err, "request_id": g.get("request_id")})
    resp.status_code = status if status is not None else status_for(code)
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def install_error_handlers(app: Flask, max_upload_mb: float) -> None:
    """Library errors, 404/405/413 and anything unexpected all answer with the one error body;
    an unexpected error is logged with its request id and shows no trace or path."""

    @app.errorhandler(SonicError)
    def _sonic_error(e: SonicError):
        retry = {"Retry-After": RETRY_AFTER[e.code]} if e.code in RETRY_AFTER else None
        return error_response(e.code, e.message, e.field, headers=retry, extra=getattr(e, "extra", None))

    @app.errorhandler(413)
    def _too_large(e):
        length = request.content_length
        if length is not None and length <= max_upload_mb * 1024 * 1024:  # a form limit, not the size
            return error_response(
                "input_too_large",
                f"the form breaks a multipart limit: more than "
                f"{app.config['MAX_FORM_PARTS']} parts, or a text field or a part's headers "
                f"over {app.config['MAX_FORM_MEMORY_SIZE'] // 1000} kB",
            )
        # a file given by its URL is an answer only where a route takes URLs (generate: not a
        # live session's portrait or speech, nor fusion)
        by_url = (
            " (a file given by its URL, image_url or audio_url, may be as large on its own, no larger)"
            if request.path == GENERATE_PATH
            else ""
        )
        return error_response(
            "input_too_large",
            f"upload is larger than {max_upload_mb:g} MB: the request's files together "
            f"(limits.max_upload_mb); send smaller files{by_url}",
        )

    @app.errorhandler(ClientDisconnected)
    def _stalled(e):
        return error_response(
            "upload_incomplete",
            "the request body ended before its Content-Length (or a chunked body before its last, "
            "zero-size chunk), or stopped arriving (server.socket_timeout_s without data)",
        )

    @app.errorhandler(404)
    def _not_found(e):
        return error_response("not_found", "no such resource")

    @app.errorhandler(405)
    def _method(e):
        allow = ", ".join(sorted(e.valid_methods or []))
        return error_response(
            "method_not_allowed", "method not allowed on this resource", headers={"Allow": allow} if allow else None
        )

    @app.errorhandler(Exception)
    def _internal(e):
        if isinstance(e, HTTPException):
            return error_response("http_error", e.description or "request failed", status=e.code or 500)
        if is_disk_full(e):  # the job database's (SQLite says it in words), or a folder's
            log.error("no space left on the disk (%s), request %s", e, g.get("request_id"))
            return error_response(
                "disk_full",
                "no space left on the server's disk; try again later",
                headers={"Retry-After": RETRY_AFTER["disk_full"]},
            )
        log.exception("unhandled error, request %s", g.get("request_id"))
        return error_response("internal_error", "internal error; quote the request id when reporting it")


TRACE_EVERY_S = 60.0  # the accounts database's errors: a full trace at most this often


def install_database_errors(app: Flask) -> None:
    """The accounts database away (stopped, unreachable, its connections dropped): every request
    that needs it, a key's check included, is 503 `storage_unavailable` + Retry-After, as an
    object store that does not answer is, not a 500."""
    from .accounts.ledger import DATABASE_AWAY

    last_trace = [-TRACE_EVERY_S]

    def _away(e: Exception):
        # an OperationalError is also a full disk or a missing table: the cause in full, now and then
        traced = time.monotonic() - last_trace[0] > TRACE_EVERY_S
        if traced:
            last_trace[0] = time.monotonic()
        log.warning(
            "the accounts database does not answer (%s), request %s",
            type(e).__name__,
            g.get("request_id"),
            exc_info=e if traced else None,
        )
        return error_response(
            "storage_unavailable", "the accounts database does not answer; retry shortly", headers={"Retry-After": "5"}
        )

    for error in DATABASE_AWAY:
        app.register_error_handler(error, _away)
