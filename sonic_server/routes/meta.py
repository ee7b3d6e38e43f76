"""About the service: health and readiness, the parameter schema, the OpenAPI document."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from sonic import schema
from sonic.decoders import get_decoder, parameter_schema

from ..access import caller
from ..metrics import exposition
from ..openapi import component, content, describe, openapi_spec
from ..service import Service, service
from .generate import EXTRA_PARAMS

bp = Blueprint("meta", __name__)
HEALTH = component(
    "Health",
    {
        "type": "object",
        "required": ["status", "readiness"],
        "properties": {
            "status": {"type": "string", "description": "ok when ready or busy, else the readiness"},
            "readiness": {
                "type": "string",
                "enum": ["ready", "busy", "starting", "setup_failed", "worker_stopped", "not_ready", "disk_full"],
            },
            "queue_length": {"type": "integer"},
            "running_job": {
                "type": "string",
                "nullable": True,
                "description": "the running job's id; absent where the service has keys (it names the video)",
            },
            "decoder": {"type": "string"},
            "device": {"type": "string"},
            "accounts": {"type": "string", "enum": ["ok", "unavailable"], "description": "with credits"},
            "storage": {
                "type": "string",
                "enum": ["ok", "unavailable"],
                "description": "with storage s3: unavailable for 10 s after the bucket did not answer",
            },
            "workers": {"type": "array", "items": {"type": "object"}, "description": "distributed mode"},
            "live": {"type": "object", "description": "live sessions: enabled, sessions, slots, max_sessions"},
            "error": {"type": "string", "description": "why it is not ready"},
        },
    },
)
PARAMS = component(
    "ParameterSchema",
    {
        "type": "object",
        "required": ["parameters"],
        "properties": {
            "parameters": {
                "type": "object",
                "description": "each parameter by name: type, default, minimum, maximum, enum, description, "
                "honoured (by the loaded decoder)",
                "additionalProperties": {"type": "object"},
            },
            "extra": {"type": "object", "description": "the request's own fields beside the parameters"},
            "decoder": {"type": "string", "nullable": True},
            "device": {"type": "string", "nullable": True},
        },
    },
)


@bp.get("/health")
@describe(
    "Liveness and readiness",
    responses={
        200: ("ready or busy", content("application/json", HEALTH)),
        503: (
            "starting, setup_failed, worker_stopped, not_ready (the job store away) or disk_full (less free disk "
            "than server.min_free_mb)",
            content("application/json", HEALTH),
        ),
    },
)
def health():
    svc = service()
    state, queue = svc.status, svc.queue
    # one snapshot of the queue (the worker changes it meanwhile): each figure read once
    workers = queue.health() if queue is not None else {"running_job": None, "workers_alive": 1, "queue_length": 0}
    running = workers["running_job"]
    taking = workers.get("workers_taking_jobs", workers["workers_alive"])
    if state == "ready" and workers.get("unavailable"):
        state = "not_ready"  # the job store does not answer: nothing can be queued or followed
    elif state == "ready" and not workers["workers_alive"]:
        state = "worker_stopped"  # jobs would be queued and never run
    elif state == "ready" and not taking and not _short_of_disk(workers):
        state = "worker_stopped"  # every worker is draining (SIGTERM): jobs wait for a new one
    elif state == "ready" and (not taking or svc.free_disk_short_mb() is not None):
        state = "disk_full"  # every worker short of disk, or this service's (routes/generate.py refuses)
    elif state == "ready" and running is not None and not _idle_worker(workers):
        state = "busy"  # (distributed: every worker taking jobs has one; a free one leaves it ready)
    body = {
        "status": "ok" if state in ("ready", "busy") else state,
        "readiness": state,
        "queue_length": workers["queue_length"],
    }
    if running is None or _visible(queue, running):
        body["running_job"] = running
    if svc.decoder:
        body.update(decoder=svc.decoder, device=svc.device)
    elif queue is not None and state != "not_ready" and queue.decoder_identity():  # distributed: the workers' word
        body["decoder"] = queue.decoder_identity().split("-")[0]
    if svc.ledger is not None:
        # said, not made a 503: downloads and flat keys work without it, and a balancer that drained
        # every instance at once (or a liveness probe restarting them) would stop those too
        body["accounts"] = "ok" if svc.ledger.answers() else "unavailable"
    if svc.outputs.remote:  # said, as the accounts are: what needs no bucket still works
        body["storage"] = "unavailable" if svc.outputs.s3.away else "ok"
    if "workers" in workers:  # distributed mode: each worker, busy, idle or disk_full
        body["workers"] = [
            w if w.get("job") is None or _visible(queue, w["job"]) else {k: v for k, v in w.items() if k != "job"}
            for w in workers["workers"]
        ]
    if svc.live is not None and state == "not_ready":  # its store is the job store: not waited for
        body["live"] = {"enabled": svc.settings.live.enabled, "error": "the live sessions' store does not answer"}
    elif svc.live is not None:
        try:
            body["live"] = svc.live.health()
        except Exception:  # noqa: BLE001 - distributed: Redis away; the rest of the answer says more
            body["live"] = {"enabled": svc.settings.live.enabled, "error": "the live sessions' store does not answer"}
    if state in ("setup_failed", "starting") and svc.setup_error:
        body["error"] = svc.setup_error
    elif state == "not_ready":
        body["error"] = workers["unavailable"]
    if state in ("ready", "busy"):
        return jsonify(body), 200
    return jsonify(body), 503, {"Retry-After": "5"}


def _short_of_disk(workers: dict) -> bool:
    """Distributed mode: a worker takes no job for want of disk."""
    return any(w.get("state") == "disk_full" for w in workers.get("workers", ()))


def _idle_worker(workers: dict) -> bool:
    """Distributed mode: a worker that takes the next job at once (idle, not stopping)."""
    return any(w.get("state") == "idle" and not w.get("draining") for w in workers.get("workers", ()))


def _visible(queue, job_id: str) -> bool:
    """Whether /health (no key needed) may name a running job: only where its caller may see it,
    i.e. a service without keys. A job's id names its video (/output/<id>.mp4): with keys, an
    anonymous poller of /health collected every caller's ids and downloaded their videos."""
    try:
        rec = queue.get(job_id)
    except Exception:  # noqa: BLE001 - the store away: named nowhere
        return False
    return rec is not None and caller().may_see(rec.owner)


def parameters(svc: Service) -> dict:
    """The parameter schema as the loaded decoder sees it (each parameter's meaning for it, and
    whether it honours it); the generic schema until the decoder is known."""
    name = svc.loaded_decoder()
    return parameter_schema(svc.settings, get_decoder(name)) if name else schema(svc.settings)


@bp.get("/api/sonic/params")
@describe(
    "Parameter schema: each parameter's meaning for the loaded decoder",
    responses={200: ("the parameters", content("application/json", PARAMS))},
)
def params():
    svc = service()
    return jsonify(
        {"parameters": parameters(svc), "extra": EXTRA_PARAMS, "decoder": svc.loaded_decoder(), "device": svc.device}
    )


@bp.get("/metrics")
@describe("Prometheus metrics", responses={200: ("text exposition format", content("text/plain", {"type": "string"}))})
def metrics():
    svc = service()
    try:
        live_open = svc.live.count() if svc.live is not None else None
    except Exception:  # noqa: BLE001 - distributed: Redis away; the page still answers, without this gauge
        live_open = None
    # while the queue is not set up (starting, set-up failed) or its store is away, nothing runs
    # jobs: the gauges say 0, so that an alert on sonic_workers_live == 0 fires then too
    idle = {"queue_length": 0, "workers_alive": 0, "running_job": None}
    try:
        queue_health = svc.queue.health() if svc.queue is not None else idle
    except Exception:  # noqa: BLE001 - distributed: Redis away; nothing runs jobs that it can see
        queue_health = idle
    try:
        webhooks_waiting = svc.webhooks.outbox.jobs_waiting() if svc.webhooks is not None else None
    except Exception:  # noqa: BLE001 - the outbox's store away: the page still answers, without this gauge
        webhooks_waiting = None
    body, content_type = exposition(queue_health, live_open, webhooks_waiting)
    return Response(body, mimetype=content_type.split(";")[0], headers={"Content-Type": content_type})


@bp.get("/openapi.json")
@describe("This document", responses={200: ("OpenAPI 3", content("application/json", {"type": "object"}))})
def openapi():
    return jsonify(openapi_spec(current_app, parameters(service()), EXTRA_PARAMS))
