"""Routes: generate, jobs (status, SSE events, cancel), outputs, health, params, OpenAPI."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory, url_for

from sonic import GenerateOptions, InvalidParameter, SonicError, schema
from sonic.media import load_audio, load_image

from .errors import public_error
from .jobs import TERMINAL, Job, QueueFull, cache_key
from .openapi import openapi_spec

bp = Blueprint("sonic_api", __name__)
OUTPUT_NAME = re.compile(r"^[0-9a-f]{32}\.mp4$")
SSE_POLL_S = 15.0


def _jobs():
    return current_app.extensions.get("sonic_jobs")


def _error(code, message, field=None, headers=None):
    """An error response; its HTTP status comes from the code (sonic_server/errors.py)."""
    return current_app.extensions["sonic_error"](code, message, field, headers)


def _urls(job: Job) -> dict:
    """URLs of a job, built while a request context exists (a streamed body outlives it)."""
    return {"status_url": url_for("sonic_api.job_status", job_id=job.id, _external=True),
            "video_base": url_for("sonic_api.output", name="NAME", _external=True)}


def _job_body(job: Job, urls: dict) -> dict:
    """The public view of a job: status, progress, and the result with its video_url or the error."""
    body = {"success": job.status != "failed", **job.public(), "status_url": urls["status_url"]}
    if body.get("error"):
        body["error"] = public_error(body["error"])       # the record keeps the code; the status is derived
    result = body.pop("result", None)
    if result:
        body.update({k: v for k, v in result.items() if k != "file"})
        body["video_url"] = urls["video_base"].replace("NAME", result["file"])
    return body


def _result_fields(job: Job) -> dict:
    body = _job_body(job, _urls(job))
    return {k: v for k, v in body.items() if k not in ("status", "progress", "stage", "status_url", "success")}


class JobNotFound(SonicError):
    code = "job_not_found"


def _find_job(job_id: str) -> Job:
    jobs = _jobs()
    job = jobs.get(job_id) if jobs else None
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def _parse_config() -> tuple[GenerateOptions, bool]:
    raw = request.form.get("config", "")
    if len(raw) > 10_000:
        raise InvalidParameter("config is longer than 10000 characters", field="config")
    try:
        params = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise InvalidParameter(f"config is not valid JSON: {e.msg}", field="config") from e
    if not isinstance(params, dict):
        raise InvalidParameter("config must be a JSON object", field="config")
    want_async = params.get("async", False)
    if not isinstance(want_async, bool):
        raise InvalidParameter("async must be true or false", field="async")
    g.log_params = params
    return GenerateOptions.from_dict(params, current_app.config["SONIC"], ignore=("async",)), want_async


@bp.post("/api/sonic/generate")
def generate():
    jobs = _jobs()
    if jobs is None:
        state = current_app.extensions["sonic_state"]["status"]
        message = "the service is starting" if state == "starting" else "the service failed to start"
        return _error("not_ready", message, headers={"Retry-After": "5" if state == "starting" else "60"})
    opts, want_async = _parse_config()
    want_async = want_async or "respond-async" in request.headers.get("Prefer", "")
    files = {}
    for name in ("image", "audio"):
        f = request.files.get(name)
        if f is None or not f.filename and not f.content_length:
            raise InvalidParameter(f"multipart file field '{name}' is missing", field=name)
        files[name] = f.read()
        if not files[name]:
            raise InvalidParameter(f"{name} is empty", field=name)

    key = cache_key(files["image"], files["audio"], opts)
    hit = jobs.cached(key)
    if hit:
        return jsonify({"success": True, "cached": True, **_result_fields(hit)})

    cfg = current_app.config["SONIC"]
    job_id = jobs.new_id()
    workdir = Path(cfg["server"]["upload_dir"]).resolve() / job_id
    workdir.mkdir(parents=True, exist_ok=True)
    image_path, audio_path = workdir / "image", workdir / "audio"
    image_path.write_bytes(files["image"])
    audio_path.write_bytes(files["audio"])
    job = Job(id=job_id, options=opts, image=image_path, audio=audio_path, workdir=workdir, cache_key=key)
    try:
        # content checks before queueing, so bad input is answered at once (415 / 413 / 422)
        load_image(image_path, int(cfg["limits"]["max_image_pixels"]))
        load_audio(audio_path, float(cfg["limits"]["max_duration_s"]))
        jobs.submit(job)
    except QueueFull:
        _remove(workdir)
        retry = str(cfg["server"]["retry_after_s"])
        return _error("busy", "the generation queue is full; retry later", headers={"Retry-After": retry})
    except Exception:
        _remove(workdir)
        raise

    if not want_async and job.done.wait(float(cfg["server"]["sync_wait_s"])):
        if job.status == "succeeded":
            return jsonify({"success": True, **_result_fields(job)})
        err = job.error or {"code": "canceled", "message": "the job was canceled"}
        return _error(err["code"], err["message"], err.get("field"))
    body = _job_body(job, _urls(job))
    resp = jsonify(body)
    resp.status_code = 202
    resp.headers["Location"] = body["status_url"]
    return resp


def _remove(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)


@bp.get("/api/sonic/jobs/<job_id>")
def job_status(job_id):
    job = _find_job(job_id)
    return jsonify(_job_body(job, _urls(job)))


@bp.post("/api/sonic/jobs/<job_id>/cancel")
def job_cancel(job_id):
    job = _find_job(job_id)
    _jobs().cancel(job)
    job.done.wait(5.0)
    return jsonify(_job_body(job, _urls(job)))


@bp.get("/api/sonic/jobs/<job_id>/events")
def job_events(job_id):
    """Server-Sent Events: one event per change of the job (named by its status) until it ends."""
    job = _find_job(job_id)
    urls = _urls(job)

    def events():
        last = None
        while True:
            now = _job_body(job, urls)
            snapshot = json.dumps(now)
            yield f"event: {now['status']}\ndata: {snapshot}\n\n" if snapshot != last else ": keep-alive\n\n"
            last = snapshot
            if now["status"] in TERMINAL:
                return
            with job.changed:
                if job.status not in TERMINAL:
                    job.changed.wait(SSE_POLL_S)

    return Response(events(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@bp.get("/output/<name>")
def output(name):
    if not OUTPUT_NAME.match(name):
        return _error("not_found", "no such video")
    jobs = _jobs()
    if jobs is None or not (jobs.output_dir / name).is_file():
        return _error("not_found", "no such video")
    return send_from_directory(jobs.output_dir, name, mimetype="video/mp4", conditional=True, max_age=3600)


@bp.get("/health")
def health():
    state = current_app.extensions["sonic_state"]["status"]
    jobs = _jobs()
    if jobs is not None and state == "ready" and jobs.running is not None:
        state = "busy"
    body = {"status": "ok" if state in ("ready", "busy") else state, "readiness": state,
            "queue_length": jobs.queue_length() if jobs else 0,
            "running_job": jobs.running.id if jobs and jobs.running else None}
    return jsonify(body), (200 if state in ("ready", "busy") else 503)


@bp.get("/api/sonic/params")
def params():
    return jsonify({"parameters": schema(current_app.config["SONIC"]),
                    "extra": {"async": {"type": "boolean", "default": False,
                                        "description": "answer 202 at once with the job id"}}})


@bp.get("/openapi.json")
def openapi():
    return jsonify(openapi_spec(schema(current_app.config["SONIC"])))

