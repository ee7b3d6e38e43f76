"""HTTP service: Flask app factory. The pipeline loads once, in create_app."""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from flask import Flask, g, jsonify, request

from sonic import SonicError, load_config

from .access import TokenBucket, bearer_key, key_allowed, retry_after
from .errors import status_for
from .jobs import JobManager
from .store import JobStore

log = logging.getLogger("sonic.http")


def create_app(config: dict | None = None, pipeline=None, background_load: bool = False) -> Flask:
    """Build the app; `pipeline` defaults to `sonic.load_pipeline(config)`, loaded once, here.

    With background_load the models load in a thread while the server already answers:
    /health says "starting" (503) and generate answers 503 + Retry-After until they are ready.
    """
    config = config if config is not None else load_config()
    srv = config["server"]
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(config["limits"]["max_upload_mb"] * 1024 * 1024)
    app.config["SONIC"] = config
    app.extensions["sonic_state"] = {"status": "starting"}

    def set_up(pipe) -> None:
        try:
            if pipe is None:
                from sonic import load_pipeline
                pipe = load_pipeline(config)
            output_dir = Path(config.get("output_dir", "outputs")).resolve()
            store = JobStore(srv["jobs_db"]) if srv.get("jobs_db") else None
            app.extensions["sonic_jobs"] = JobManager(pipe, output_dir, int(srv["queue_size"]),
                                                      float(srv["output_ttl_s"]), store=store,
                                                      upload_dir=Path(srv["upload_dir"]).resolve())
            app.extensions["sonic_state"]["status"] = "ready"
        except Exception:                                      # noqa: BLE001 - /health reports it
            log.exception("pipeline set-up failed")
            app.extensions["sonic_state"]["status"] = "setup_failed"

    if background_load:
        threading.Thread(target=set_up, args=(pipeline,), name="sonic-setup", daemon=True).start()
    else:
        set_up(pipeline)

    from .api import bp
    app.register_blueprint(bp)
    origins = srv.get("cors_origins") or []

    api_keys = [k for k in (srv.get("api_keys") or []) if k]
    api_keys += [k.strip() for k in os.environ.get("SONIC_API_KEYS", "").split(",") if k.strip()]
    bucket = TokenBucket(float(srv.get("rate_limit_per_s", 10)), float(srv.get("rate_limit_burst", 20)))

    @app.before_request
    def _start():
        g.request_id = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex
        g.t0 = time.perf_counter()
        if not request.path.startswith("/api/") or request.method == "OPTIONS":
            return None                      # health, OpenAPI, downloads and preflights stay open
        key = bearer_key(request.headers.get("Authorization"))
        if api_keys and not key_allowed(key, api_keys):
            return error_response("unauthorized", "a valid API key is required: Authorization: Bearer <key>",
                                  headers={"WWW-Authenticate": "Bearer"})
        wait = bucket.take(key or request.remote_addr or "unknown")
        if wait > 0:
            return error_response("rate_limited", "too many requests; slow down",
                                  headers={"Retry-After": retry_after(wait)})
        return None

    @app.after_request
    def _finish(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        origin = request.headers.get("Origin")
        if origin and ("*" in origins or origin in origins):
            resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            resp.headers["Access-Control-Allow-Headers"] = "Content-Type, Prefer, Authorization, X-Request-ID, Range"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Expose-Headers"] = "X-Request-ID, Retry-After, Content-Range, Location"
        log.info(json.dumps({"request_id": g.get("request_id"), "method": request.method, "route": request.path,
                             "status": resp.status_code, "ms": round(1000 * (time.perf_counter() - g.get("t0", 0)), 1),
                             "params": g.get("log_params")}))
        return resp

    def error_response(code: str, message: str, field: str | None = None, headers=None, status: int | None = None):
        """The one error body; its status comes from the code (sonic_server/errors.py) unless given."""
        err = {"code": code, "message": message}
        if field:
            err["field"] = field
        resp = jsonify({"success": False, "error": err, "request_id": g.get("request_id")})
        resp.status_code = status if status is not None else status_for(code)
        for k, v in (headers or {}).items():
            resp.headers[k] = v
        return resp

    app.extensions["sonic_error"] = error_response

    @app.errorhandler(SonicError)
    def _sonic_error(e: SonicError):
        return error_response(e.code, e.message, e.field)

    @app.errorhandler(413)
    def _too_large(e):
        return error_response("input_too_large",
                              f"upload is larger than {config['limits']['max_upload_mb']} MB")

    @app.errorhandler(404)
    def _not_found(e):
        return error_response("not_found", "no such resource")

    @app.errorhandler(405)
    def _method(e):
        allow = ", ".join(sorted(e.valid_methods or []))
        return error_response("method_not_allowed", "method not allowed on this resource",
                              headers={"Allow": allow} if allow else None)

    @app.errorhandler(Exception)
    def _internal(e):
        from werkzeug.exceptions import HTTPException
        if isinstance(e, HTTPException):
            return error_response("http_error", e.description or "request failed", status=e.code or 500)
        log.exception("unhandled error, request %s", g.get("request_id"))
        return error_response("internal_error", "internal error; quote the request id when reporting it")

    return app
