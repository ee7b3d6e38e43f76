"""Generate and jobs: validate a request, check its inputs, queue it; then status, Server-Sent
Events, cancel and deletion of the job, and the caller's list of jobs. The routes talk to the
queue interface only (sonic_server/queue)."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import math
import re
import time
from datetime import datetime, timezone

from flask import Blueprint, Response, g, jsonify, request, url_for

from sonic import GenerateOptions, InvalidParameter, SonicError
from sonic.checks import check_inputs, frame_count
from sonic.errors import Busy, DiskFull, InputTooLarge
from sonic.options import parameters
from sonic.version import pipeline_version

from .. import idempotency, outbound, webhooks
from ..access import caller
from ..accounts.billing import InsufficientCredits, Payer
from ..drain import STREAMING, Drain
from ..errors import error_response, public_error
from ..jobs import JOB_ID, SUCCEEDED, TERMINAL, JobQuery, JobRecord, JobStatus, cache_key
from ..json_input import (
    MAX_CONFIG_CHARS,
    body_type_refused,
    check_form_fields,
    check_sent_as_file,
    config_switches,
    json_object_body,
    json_object_field,
    refuse_unknown,
)
from ..metrics import count_cache_hit
from ..openapi import component, content, describe, error, header, path_parameter, query
from ..public import JobUrls, ending_error, job_document
from ..queue import CallerBusy, JobQueue, QueueFull, WorkerStopped
from ..service import Service, service, upload_check_refused

bp = Blueprint("generate", __name__)
log = logging.getLogger("sonic.http")
SSE_HEARTBEAT_S = 5.0  # a comment keeps an event stream open this often (and finds a client gone: its slot back)
SSE_LOOK_S = 2.0  # an event stream looks at its job this often, beside the job's own change notices
CANCEL_WAIT_S = 5.0  # a running job stops at its next progress report
DELETE_WAIT_S = 10.0  # a running job being deleted is canceled first; it stops within this (else 503)
LIST_LIMIT, LIST_MAX = 20, 100  # jobs a listing page holds by default, at most
# request fields beside the generation parameters (also listed by /api/sonic/params)
EXTRA_PARAMS = {
    "async": {"type": "boolean", "default": False, "description": "answer 202 at once with the job id"},
    "decoder": {
        "type": "string",
        "description": "the video decoder; only the one this server has loaded (/health says which) is accepted",
    },
    "webhook": {
        "type": "string",
        "description": "an http(s) URL: the job's status document is POSTed there, signed (docs/webhooks.md)",
    },
    "webhook_events_filter": {
        "type": "array",
        "items": {"type": "string", "enum": list(webhooks.EVENTS)},
        "default": list(webhooks.DEFAULT_EVENTS),
        "description": "which events are sent: start, progress, completed (also a comma-separated form field)",
    },
}

# what a finished generation reports: a synchronous answer's fields, and a succeeded job's
RESULT_FIELDS = {
    "video_url": {"type": "string"},
    "duration": {"type": "number"},
    "frames": {"type": "integer"},
    "fps": {"type": "integer"},
    "width": {"type": "integer"},
    "height": {"type": "integer"},
    "seed": {"type": "integer"},
    "lipsync_offset_ms": {"type": "number"},
    "timings": {"type": "object"},
    "warnings": {"type": "array", "items": {"type": "string"}},
}
JOB = component(
    "Job",
    {
        "type": "object",
        "description": "a job's status document; once it has succeeded, the result's fields too",
        "properties": {
            "success": {"type": "boolean", "description": "false once the job has failed or was canceled"},
            "job_id": {"type": "string"},
            "status": {"type": "string", "enum": [status.value for status in JobStatus]},
            "progress": {"type": "number"},
            "stage": {"type": "string"},
            "created": {"type": "number", "description": "when the job was made (epoch seconds)"},
            "status_url": {"type": "string"},
            "queue_position": {
                "type": "integer",
                "description": "while the job waits: how many jobs start before it (0: it starts next)",
            },
            "error": {
                "type": "object",
                "description": "failed or canceled: why (as an error answer's error, with the HTTP status it maps to)",
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": "string"},
                    "status": {"type": "integer"},
                },
            },
            **RESULT_FIELDS,
        },
    },
)
RESULT = component(
    "Result",
    {
        "type": "object",
        "properties": {
            "success": {"type": "boolean"},
            "job_id": {"type": "string"},
            "cached": {"type": "boolean", "description": "the same request's earlier video, not rendered again"},
            "created": {"type": "number", "description": "when its job was made (epoch seconds)"},
            "status": {"type": "string", "enum": ["succeeded"]},
            "status_url": {"type": "string", "description": "the job's status, as a 202 gives it"},
            **RESULT_FIELDS,
        },
    },
)
UPLOAD = {
    "required": True,
    "content": {
        **content(
            "multipart/form-data",
            {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary", "minLength": 1},
                    "audio": {"type": "string", "format": "binary", "minLength": 1},
                    "image_url": {"type": "string", "description": "instead of image: an http(s) URL to fetch it from"},
                    "audio_url": {"type": "string", "description": "instead of audio: an http(s) URL to fetch it from"},
                    "config": {"type": "string", "description": "JSON object of Parameters"},
                    "webhook": {"type": "string", "description": "an http(s) URL told of the job (or a config key)"},
                    "webhook_events_filter": {
                        "type": "string",
                        "description": "comma-separated: start, progress, completed (default completed)",
                    },
                },
            },
        ),
        **content(
            "application/json",
            {
                "type": "object",
                "required": ["image_url", "audio_url"],
                "properties": {
                    "image_url": {"type": "string"},
                    "audio_url": {"type": "string"},
                    "config": {"type": "object", "description": "Parameters"},
                    "webhook": {"type": "string"},
                    "webhook_events_filter": {"type": "array", "items": {"type": "string"}},
                },
            },
        ),
    },
}
JOB_LIST = component(
    "JobList",
    {
        "type": "object",
        "properties": {
            "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
            "next_cursor": {"type": "string", "nullable": True, "description": "the next page's cursor; null: none"},
        },
    },
)
LIST_PARAMETERS = [
    query("limit", f"jobs on this page (1-{LIST_MAX}, default {LIST_LIMIT})", {"type": "integer"}),
    query("cursor", "the next_cursor of the previous page"),
    query("status", "only these statuses, comma-separated (queued, processing, succeeded, failed, canceled)"),
    query("created_after", "only jobs created at or after this time (epoch seconds or ISO 8601)"),
    query("created_before", "only jobs created before this time (epoch seconds or ISO 8601)"),
]
path_parameter("job_id", JOB_ID, "the id a generate call returned")
PREFER = header(
    "Prefer",
    "respond-async: answer 202 at once and run the job in the background (a config's async, given, wins)",
    {"type": "string", "example": "respond-async"},
)


class JobNotFound(SonicError):
    code = "job_not_found"


def _urls(job_id: str) -> JobUrls:
    """URLs of a job, built while a request context exists (a streamed body outlives it)."""
    return JobUrls(
        status_url=url_for("generate.job_status", job_id=job_id, _external=True),
        video_base=url_for("outputs.output", name="NAME", _external=True),
        outputs=service().outputs,  # a presigned URL where videos are in a bucket (storage.py)
    )


def _result_fields(rec: JobRecord) -> dict:
    """A finished job's result as a 200 answers it: the video and its figures, and the job's
    status and status_url, so that a client written for 202 (async) can follow it the same way."""
    body = job_document(rec, _urls(rec.id))
    return {k: v for k, v in body.items() if k not in ("progress", "stage", "success")}


def _find_job(job_id: str) -> JobRecord:
    """The job, or 404; an id that cannot be one of ours (any length, any characters) is not
    looked up and not echoed; another caller's job answers exactly as a job that does not exist."""
    if not JOB_ID.fullmatch(job_id):
        raise JobNotFound("no such job")
    queue = service().queue
    rec = queue.get(job_id) if queue else None
    if rec is None or not caller().may_see(rec.owner):
        raise JobNotFound(f"no job {job_id}")
    return rec


def _wait_for(queue, job_id: str, timeout: float) -> JobRecord:
    """The record once it has ended (or at `timeout`); a job gone meanwhile (pruned, or no longer
    in the store) is not found."""
    rec = queue.wait(job_id, timeout)
    if rec is None:
        raise JobNotFound(f"no job {job_id}")
    return rec


STOP_CHECK_S = 1.0  # how often a synchronous wait looks whether the server is stopping


def _wait_while_running(queue, job_id: str, timeout: float, drain: Drain | None) -> JobRecord:
    """The record once it has ended, or at `timeout`, or just before a stopping server's drain
    ends (its caller then gets 202 and the job's status_url, not a cut connection)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        stop_left = drain.wait_left() if drain is not None else None
        if stop_left is not None:
            left = min(left, stop_left)
        rec = _wait_for(queue, job_id, max(0.0, min(left, STOP_CHECK_S)))
        if rec.terminal or left <= STOP_CHECK_S:
            return rec


def _payer(svc: Service) -> Payer | None:
    """With credits, the account that pays (NoAccount, 403, for a key without one); else None."""
    return svc.billing.payer(g.principal, "making videos needs") if svc.billing else None


def _release(svc: Service, payer: Payer | None, job_id: str) -> None:
    if payer is not None and svc.billing is not None:
        svc.billing.release(job_id)


def _not_ready(svc: Service) -> Response:
    """503 while there is no queue yet: the model still loading, or its loading failed."""
    starting = svc.status == "starting"
    return error_response(
        "not_ready",
        "the service is starting" if starting else "the service failed to start",
        headers={"Retry-After": "5" if starting else "60"},
    )


def _webhook(params: dict) -> dict | None:
    """The webhook the request asks for: form fields, else config keys; checked (its address too)."""
    fields = _fields()
    for name in ("webhook", "webhook_events_filter"):
        if name in fields and name in params:  # which one was meant cannot be told
            raise InvalidParameter(f"{name!r} is given both as a field and in config: give it once", field=name)
    return webhooks.requested(
        fields.get("webhook", params.get("webhook")),
        fields.get("webhook_events_filter", params.get("webhook_events_filter")),
        request.url_root,
        service().reach,
    )


def _is_json() -> bool:
    return request.mimetype == "application/json"


REQUEST_FIELDS = ("config", "image_url", "audio_url", "webhook", "webhook_events_filter")  # beside the files
MAX_JSON_BYTES = 64 * 1024  # a JSON request holds URLs and parameters: a 20 MB one took 9 s of CPU to refuse
FILE_FIELDS = ("image", "audio")


def _check_field_names() -> None:
    """Every field of the request is one this route reads, each given once: a misnamed field
    (`webhook_url`) or a parameter beside `config` (`min_resolution` as a form field) was
    dropped, and the request rendered with the defaults it did not ask for (and paid for)."""
    if not _is_json() and request.mimetype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        # fetch() sends a string body as text/plain: its JSON would be read as no fields at all
        raise body_type_refused(
            "send multipart/form-data (the files) or application/json (image_url, audio_url, config)"
        )
    known_params = {*parameters(), *EXTRA_PARAMS}
    if _is_json():
        refuse_unknown(list(_fields()), REQUEST_FIELDS, known_params)
    else:
        check_form_fields(FILE_FIELDS, REQUEST_FIELDS, known_params)
    for name in request.args:  # `?async=true` was ignored, and the request answered synchronously
        if name in known_params or name in REQUEST_FIELDS:
            text = str(name)[:40]
            raise InvalidParameter(
                f"{text!r} is given in the URL's query, which this route does not read: put it in the request's "
                "body (a generation parameter in the config object)",
                field=text,
            )


def _fields() -> dict:
    """The request's fields beside the files: the multipart form's, or a JSON body's keys (read
    once a request: the config, the webhook and the inputs all ask)."""
    if "request_fields" not in g:
        if _is_json():
            # parsed number by number: seconds for megabytes. Refused by its stated length, unread;
            # a chunked body states none: its size is read (up to the upload limit) and counted
            stated = request.content_length
            if (stated if stated is not None else len(request.get_data(cache=True))) > MAX_JSON_BYTES:
                raise InputTooLarge(
                    f"a JSON request is at most {MAX_JSON_BYTES // 1024} kB (image_url, audio_url, config): "
                    "send files as multipart/form-data",
                    field="body",
                )
            g.request_fields = json_object_body(
                'send multipart/form-data, or a JSON object {"image_url", "audio_url", "config"}'
            )
        else:
            g.request_fields = request.form.to_dict()
    return g.request_fields


def _config() -> dict:
    """`config`: a JSON text field of the form, or an object in a JSON body."""
    if not _is_json():
        return json_object_field("config", MAX_CONFIG_CHARS) or {}
    params = _fields().get("config")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidParameter("config must be a JSON object", field="config")
    return params


def _parse_config() -> tuple[GenerateOptions, bool, dict]:
    params = _config()
    want_async = config_switches(params, service().loaded_decoder())
    g.log_params = outbound.without_credentials(params)  # a URL's secrets stay out of the log
    return GenerateOptions.from_dict(params, service().settings, ignore=tuple(EXTRA_PARAMS)), want_async, params


def _read_files() -> tuple[dict[str, bytes], set[str]]:
    """The image and the audio, each uploaded or fetched from its `<name>_url`; (the bytes, the
    names that came by URL)."""
    files, urls = {}, {}
    fields = _fields()
    for name in ("image", "audio"):
        f = None if _is_json() else request.files.get(name)
        # a browser's file input left empty sends a part with no file name and no content; a
        # part with content is an upload whatever its name says (a script's stream, `filename=`)
        data = f.read() if f is not None else b""
        uploaded = f is not None and bool(f.filename or data)
        url = fields.get(f"{name}_url")
        if uploaded and url:
            raise InvalidParameter(f"send {name} or {name}_url, not both", field=f"{name}_url")
        if url is None and f"{name}_url" in fields:  # (it was said to be missing)
            raise InvalidParameter(
                f"{name}_url is null: give an http(s) URL, or send {name} as a file", field=f"{name}_url"
            )
        if url:
            if not isinstance(url, str):
                raise InvalidParameter(f"{name}_url must be an http(s) URL", field=f"{name}_url")
            urls[name] = url
            continue
        if f is None or not uploaded:
            if _is_json():
                raise InvalidParameter(f"the JSON key '{name}_url' is missing", field=f"{name}_url")
            check_sent_as_file(name)
            raise InvalidParameter(f"multipart file field '{name}' (or a field '{name}_url') is missing", field=name)
        files[name] = data
        if not files[name]:
            raise InvalidParameter(f"{name} is empty", field=name)
    if urls:
        files.update(_fetched(urls))
    return files, set(urls)


def _fetched(urls: dict[str, str]) -> dict[str, bytes]:
    """The files named by URL ({"image": url, ...}), fetched one after the other within one
    outbound.fetch_timeout_s, by at most outbound.max_fetches requests at once, a quarter of
    them for one key or account: a fetch holds one of the server's threads, and one caller's
    slow host must not hold them all (eight requests to a host that drips its answer kept every
    other caller's URLs refused)."""
    svc = service()
    out, limit = svc.settings.outbound, int(svc.settings.limits.max_upload_mb * 1024 * 1024)
    field = f"{next(iter(urls))}_url"

    def refused(full: bool) -> Busy:
        if full:
            said = f"{svc.fetches.limit} requests are fetching their inputs by URL, the most this server allows"
        else:
            said = f"this caller has its share of URL fetches under way ({svc.fetches.per_holder} at once)"
        return Busy(f"{said} (outbound.max_fetches); retry shortly, or upload the files", field=field)

    with svc.fetches.holding(caller().owner, refused):
        ends, fetched = time.monotonic() + out.fetch_timeout_s, dict[str, bytes]()
        for name, url in urls.items():
            left = limit - sum(len(data) for data in fetched.values())  # the files together, as an upload's
            try:
                fetched[name] = outbound.fetch(
                    url, f"{name}_url", svc.reach, left, total_s=out.fetch_timeout_s, ends=ends
                )
            except InputTooLarge:
                if not fetched:
                    raise
                raise InputTooLarge(
                    f"{' and '.join(f'{n}_url' for n in urls)}: the files together are larger than "
                    f"{limit / 1024 / 1024:g} MB (limits.max_upload_mb)",
                    field=f"{name}_url",
                ) from None
        return fetched


@bp.post("/api/sonic/generate")
@describe(
    "Generate a talking-head video",
    parameters=[PREFER, idempotency.PARAMETER],
    request_body=UPLOAD,
    responses={
        200: ("video ready", content("application/json", RESULT)),
        202: ("accepted; poll status_url", content("application/json", JOB)),
        400: error("bad or missing field / JSON"),
        402: error("credits enabled: not enough credits (needed, balance, held)"),
        403: error("credits enabled: this key belongs to no account"),
        409: error("this Idempotency-Key was used with another request, or its first request still runs"),
        413: error("upload too large"),
        415: error("not a decodable image / audio"),
        422: error("no face, audio too long, empty or silent audio"),
        429: error("rate limited, or this caller's jobs at server.max_jobs_per_caller (Retry-After)"),
        503: error("queue full (Retry-After)"),
        500: error("internal error"),
    },
    response_headers={200: ("Idempotent-Replayed",), 202: ("Location", "Idempotent-Replayed", "Preference-Applied")},
)
@idempotency.once("generate")
def generate():
    svc = service()
    queue = svc.queue
    if queue is None:
        return _not_ready(svc)
    if (free_mb := svc.free_disk_short_mb()) is not None:  # before any upload is read or saved
        raise DiskFull(
            f"the server's disk has {free_mb:.0f} MB free, under server.min_free_mb "
            f"({svc.settings.server.min_free_mb:.10g} MB); try again later"
        )
    _check_field_names()
    opts, want_async, params = _parse_config()
    if "async" not in params:  # a request's own `async` says what it wants; Prefer is a wish (RFC 7240)
        want_async = g.preference_applied = _prefers_async()
    hook = _webhook(params)
    files, by_url = _read_files()
    owner = caller().owner
    key = cache_key(files["image"], files["audio"], opts, pipeline_version(svc.loaded_decoder_identity()), owner)
    payer = _payer(svc)
    hit = queue.cached(key)
    if hit:
        if payer is not None and svc.billing is not None and svc.settings.credits.charge_cache_hits:
            svc.billing.charge_cached(payer, (hit.result or {}).get("duration", 0.0), hit.id, g.get("request_id"))
        if hook is not None and svc.webhooks is not None:  # answered at once, and told as a job would be
            hit.webhook = hook
            svc.webhooks.notify(hit, "completed", on_its_own=True)
        g.job_id, g.cached = hit.id, True  # the request's log line names the job that answered it
        count_cache_hit()
        return jsonify({"success": True, "cached": True, **_result_fields(hit)})

    _check_share(svc, queue, owner)  # a cached answer is free to give; a new job is in the caller's share
    if payer is not None and svc.billing is not None:  # an account that cannot pay: no decoding for it
        svc.billing.check_video(payer, _video_seconds(opts, None), exact=opts.duration is not None)
    try:
        queue.check_room()  # a full queue, or no worker: told before the files are stored and decoded
    except QueueFull:
        return _queue_full(svc)
    except WorkerStopped as e:
        return _worker_stopped(e)
    rec = JobRecord.new("generate", opts.to_dict(), cache_key=key, owner=owner)
    rec.webhook = hook
    try:
        rec.inputs = svc.uploads.save(rec.id, files)  # inside: a half-written folder goes too
        # content checks before queueing, so bad input is answered at once (415 / 413 / 422);
        # the decoded arrays go to the task, which does not decode the files again
        try:
            with svc.upload_checks.holding(owner, upload_check_refused):  # a caller's share of the decodes
                checked = check_inputs(rec.inputs["image"], rec.inputs["audio"], opts, svc.settings.limits)
        except SonicError as e:
            if e.field in by_url:  # the fetched file is what was wrong: name the URL's field
                e.field = f"{e.field}_url"
                e.message = f"{e.field}: {e.message}"
            raise
        if payer is not None and svc.billing is not None:  # the estimate is held before anything is queued
            try:
                svc.billing.hold_video(payer, rec.id, _video_seconds(opts, checked.audio_s), g.get("request_id"))
            except InsufficientCredits:
                svc.uploads.remove(rec.id)
                raise
        rec = queue.submit(rec, checked)
        g.job_id = rec.id  # the request's log line names its job (one refused before this made none)
        svc.uploads.drop_local_copy(rec.id)  # in a bucket: this process's copy goes
    except QueueFull:
        _release(svc, payer, rec.id)
        svc.uploads.remove(rec.id)
        return _queue_full(svc)
    except WorkerStopped as e:
        _release(svc, payer, rec.id)
        svc.uploads.remove(rec.id)
        return _worker_stopped(e)
    except Exception:
        _release(svc, payer, rec.id)
        svc.uploads.remove(rec.id)
        raise

    idempotency.keep_provisional(_accepted(rec))  # from here a retry gets this job, whatever happens next
    if not want_async:
        rec = _wait_while_running(queue, rec.id, svc.sync_wait_s, svc.drain)
        if rec.status == SUCCEEDED:
            return jsonify({"success": True, **_result_fields(rec)})
        if rec.terminal:
            err = ending_error(rec)
            # the job's id too: the server log names a failed job by it
            return error_response(err["code"], err["message"], err.get("field"), extra={"job_id": rec.id})
    return _accepted(rec)


def _worker_stopped(e: WorkerStopped) -> Response:
    if e.short_of_disk:
        raise DiskFull(
            "every worker's disk has less free than server.min_free_mb (/health says disk_full); try again later"
        ) from None
    return error_response(
        "not_ready",
        # the caller is told to come back; what the operator must do is in the log and /health
        "no worker is running jobs at the moment; try again later",
        headers={"Retry-After": "60"},
    )


def _queue_full(svc: Service) -> Response:
    return error_response(
        "busy", "the generation queue is full; retry later", headers={"Retry-After": svc.retry_after_s}
    )


def _video_seconds(opts: GenerateOptions, audio_s: float | None) -> float:
    """The length of the video the request will get, whole frames (what it is charged for): a
    duration under half a frame priced at 0 credits and still rendered one frame. Without the
    audio's length yet (None): its least, one frame."""
    if opts.duration is None and audio_s is None:
        return 1 / opts.fps
    return frame_count(opts, audio_s or 0.0) / opts.fps


def _check_share(svc: Service, queue: JobQueue, owner: str | None) -> None:
    """Refuse a caller whose share of the queue (server.max_jobs_per_caller) is taken before its
    files are stored and checked; the queue's own check at submit is the one that holds under
    racing requests."""
    share = svc.settings.server.max_jobs_per_caller
    if owner is not None and share and (active := queue.active_of(owner)) >= share:
        raise CallerBusy(active)


def _document(rec: JobRecord) -> dict:
    """The job's document, with its place in the queue while it waits."""
    return job_document(rec, _urls(rec.id), _ahead(service().queue, rec))


def _ahead(queue: JobQueue | None, rec: JobRecord) -> int | None:
    """A waiting job's place, where the queue can tell it: a store that fails to (Redis away)
    leaves it out of the document, not the answer (a 202 for a job already queued and held)."""
    if queue is None or rec.status != JobStatus.QUEUED:
        return None
    try:
        return queue.ahead_of(rec)
    except Exception:  # noqa: BLE001 - the place is a hint; the job's own answer must still come
        log.warning("job %s: its place in the queue could not be read", rec.id, exc_info=True)
        return None


def _prefers_async() -> bool:
    """The request's `Prefer: respond-async` (RFC 7240: preferences are separated by commas, in
    one header or several, each a name, case-insensitive, then its value and parameters)."""
    for prefer in request.headers.getlist("Prefer"):
        for preference in re.findall(r'(?:[^,"]|"[^"]*")+', prefer):  # (a comma inside quotes is a value's)
            if re.split(r"[=;]", preference, maxsplit=1)[0].strip().lower() == "respond-async":
                return True
    return False


def _accepted(rec: JobRecord) -> Response:
    """202 with the job's document: where to follow it."""
    body = _document(rec)
    resp = jsonify(body)
    resp.status_code = 202
    resp.headers["Location"] = body["status_url"]
    if g.get("preference_applied"):
        resp.headers["Preference-Applied"] = "respond-async"  # RFC 7240: the client's wish was honoured
    return resp


@bp.get("/api/sonic/jobs/<job_id>")
@describe("Job status", responses={200: ("status", content("application/json", JOB)), 404: error("no such job")})
def job_status(job_id):
    return jsonify(_document(_find_job(job_id)))


@bp.get("/api/sonic/jobs")
@describe(
    "The caller's jobs, newest first, a page at a time",
    parameters=LIST_PARAMETERS,
    responses={200: ("a page of jobs", content("application/json", JOB_LIST)), 400: error("bad query parameter")},
)
def job_list():
    """With keys or accounts, a caller's own jobs (an admin's: everyone's); without, every job."""
    svc = service()
    if svc.queue is None:
        return _not_ready(svc)
    who = caller()
    asked = _list_query(None if who.sees_all else who.owner)
    page = svc.queue.list(dataclasses.replace(asked, limit=asked.limit + 1))  # one more: is there a next page?
    more = len(page) > asked.limit
    page = page[: asked.limit]
    next_cursor = _cursor(page[-1]) if more else None
    return jsonify({"jobs": [job_document(rec, _urls(rec.id)) for rec in page], "next_cursor": next_cursor})


LIST_PARAMS = ("limit", "status", "created_after", "created_before", "cursor")  # what a listing reads


def _list_query(owner: str | None) -> JobQuery:
    args = request.args
    # a misspelt filter (?stauts=failed) listed every job as if none was asked, and of two
    # values one was read unsaid
    refuse_unknown(list(args), LIST_PARAMS, kind="query parameter")
    for name in LIST_PARAMS:
        if len(args.getlist(name)) > 1:
            raise InvalidParameter(f"the query parameter {name!r} is given more than once", field=name)
    try:
        limit = int(args.get("limit", LIST_LIMIT))
    except ValueError:
        raise InvalidParameter(f"limit must be a whole number, 1-{LIST_MAX}", field="limit") from None
    if not 1 <= limit <= LIST_MAX:
        raise InvalidParameter(f"limit must be 1-{LIST_MAX}, got {limit}", field="limit")
    statuses = []
    for word in filter(None, (w.strip() for w in args.get("status", "").split(","))):
        try:
            statuses.append(JobStatus(word))
        except ValueError:
            known = ", ".join(s.value for s in JobStatus)
            raise InvalidParameter(f"status {word[:20]!r} is not one of {known}", field="status") from None
    return JobQuery(
        owner=owner,
        statuses=tuple(statuses),
        created_from=_instant(args.get("created_after"), "created_after"),
        created_to=_instant(args.get("created_before"), "created_before"),
        after=_position(args.get("cursor")),
        limit=limit,
    )


def _instant(text: str | None, name: str) -> float | None:
    """Epoch seconds or an ISO 8601 date-time (UTC unless it names its offset)."""
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise InvalidParameter(f"{name} must be a finite time", field=name)
        return seconds
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidParameter(f"{name} must be epoch seconds or an ISO 8601 date-time", field=name) from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _cursor(rec: JobRecord) -> str:
    return base64.urlsafe_b64encode(json.dumps([rec.created, rec.id]).encode()).decode().rstrip("=")


MAX_CURSOR_CHARS = 200


def _position(cursor: str | None) -> tuple[float, str] | None:
    """A cursor back into (created, id); anything else is a 400."""
    if not cursor:
        return None
    refused = InvalidParameter("cursor is not one this server gave (pass next_cursor as is)", field="cursor")
    if len(cursor) > MAX_CURSOR_CHARS:
        raise refused
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        created = float(created)
    except (ValueError, TypeError, OverflowError, RecursionError, binascii.Error):
        raise refused from None
    if not math.isfinite(created) or not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
        raise refused
    return created, job_id


@bp.delete("/api/sonic/jobs/<job_id>")
@describe(
    "Delete a job: cancel it if it runs, then delete its video, its uploads and its cached result",
    responses={
        204: "deleted: its video_url answers 404 from now on",
        404: error("no such job"),
        503: error("the job is still stopping; retry (Retry-After)"),
    },
)
def job_delete(job_id):
    rec = _find_job(job_id)
    svc = service()
    if not rec.terminal:
        svc.queue.cancel(job_id)
        rec = _wait_for(svc.queue, job_id, DELETE_WAIT_S)
        if not rec.terminal:
            return error_response(
                "busy", "the job is still stopping; retry the delete shortly", headers={"Retry-After": "2"}
            )

    def remove_files() -> None:
        # first: a cache lookup after it finds no video. A job without a result has none, but in
        # a folder its own name is removed all the same (a release before left one behind a
        # cancel); a bucket only ever holds a succeeded job's
        name = (rec.result or {}).get("file") or (None if svc.outputs.remote else f"{job_id}.mp4")
        if name:
            svc.outputs.remove(name)
        svc.uploads.remove(job_id)

    if svc.settler is not None:  # settled here, while the record says how it ended: once deleted,
        svc.settler.settle(rec)  # only the sweep's grace for a missing record released the hold (2 min)
    svc.queue.delete(job_id, remove_files)
    if svc.webhooks is not None:
        svc.webhooks.forget(job_id)
    log.info("job %s deleted", job_id)
    return Response(status=204)


@bp.post("/api/sonic/jobs/<job_id>/cancel")
@describe(
    "Cancel a job",
    responses={200: ("status after the cancel", content("application/json", JOB)), 404: error("no such job")},
)
def job_cancel(job_id):
    _find_job(job_id)
    svc = service()
    svc.queue.cancel(job_id)
    rec = _wait_for(svc.queue, job_id, CANCEL_WAIT_S)
    return jsonify(job_document(rec, _urls(job_id)))


@bp.get("/api/sonic/jobs/<job_id>/events")
@describe(
    "Job status as Server-Sent Events until it ends",
    responses={
        200: ("event stream", content("text/event-stream", {"type": "string"})),
        204: "the job has ended and the client saw its end (Last-Event-ID): a browser stops reconnecting",
        404: error("no such job"),
        503: error("too many event streams open; poll the status instead"),
    },
)
def job_events(job_id):
    """One event per change of the job (named by its status, and its id) until it ends; comments
    keep the connection alive in between. A browser's EventSource reconnects when the stream
    ends: one that has seen the end (Last-Event-ID an ended status) is answered 204, which stops
    it (it reconnected every 3 s, given the last event again each time)."""
    rec = _find_job(job_id)
    if rec.terminal and request.headers.get("Last-Event-ID") in {status.value for status in TERMINAL}:
        return Response(status=204)
    svc = service()
    urls, queue = _urls(job_id), svc.queue
    holder = caller().owner  # a key or account: a quarter of the streams at most (anonymous: the whole)
    if not svc.event_streams.take(holder):  # each open stream holds one of the server's threads
        if svc.event_streams.full():
            said = f"{svc.event_streams.limit} event streams are open, the most this server allows"
        else:
            said = f"this caller has {svc.event_streams.per_holder} event streams open, the most one key may"
        return error_response("busy", f"{said}; poll status_url instead", headers={"Retry-After": svc.retry_after_s})

    def stream():
        last, current, written = None, None, time.monotonic()
        try:
            # looked at every SSE_LOOK_S: a waiting job's place changes without a change of its record
            for rec in queue.events(job_id, SSE_LOOK_S):
                current = rec if rec is not None else current
                if current is None:
                    continue
                body = json.dumps(job_document(current, urls, _ahead(queue, current)))
                if body != last:
                    yield f"event: {current.status}\nid: {current.status}\ndata: {body}\n\n"
                elif time.monotonic() - written >= SSE_HEARTBEAT_S:
                    yield ": keep-alive\n\n"
                else:
                    continue
                last, written = body, time.monotonic()
        except Exception:  # noqa: BLE001 - the job store away (Redis restarting...)
            log.warning("event stream of job %s ended: the job store does not answer", job_id, exc_info=True)
            err = {
                "success": False,
                "error": public_error(
                    {
                        "code": "not_ready",
                        "message": "the job store does not answer; poll status_url: it tells how the job went "
                        "once the store answers",
                    }
                ),
                "status_url": urls.status_url,
            }
            yield f"event: error\ndata: {json.dumps(err)}\n\n"

    request.environ[STREAMING] = True  # it ends when its client leaves: a stopping server does not wait for it
    resp = Response(
        stream(), mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    resp.call_on_close(svc.event_streams.given_back_once(holder))  # when the server closes it, whatever ended it
    return resp
