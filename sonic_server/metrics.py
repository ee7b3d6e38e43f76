"""Prometheus metrics: `GET /metrics` (text format), and `sonic worker --metrics-port P`.

What is counted, and where:
- requests by route (the URL rule, e.g. /api/sonic/jobs/<job_id>, never the raw path), method
  and status, and their seconds to the answer's headers; answers from the cache: in every API
  process;
- jobs: finished by kind and status, failures by error code, seconds waited (submitted to
  started), duration (start to end) and the seconds of each pipeline stage as histograms, seconds
  of video produced: in the process that
  runs the job (the API process itself without Redis; each `sonic worker` with it, which serves
  its own /metrics on --metrics-port);
- queue length, live and busy workers, webhook deliveries waiting: read when scraped.

Several API processes on one machine (a process manager starting N copies) share one view when
PROMETHEUS_MULTIPROC_DIR names an empty folder they can all write (prometheus-client's
multiprocess mode); without it each process reports its own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from http import HTTPStatus

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from .host_names import MALFORMED_HOST, HostNames, name_of, refused_status
from .jobs import FAILED, SUCCEEDED

# a `_created` series beside every counter and histogram (its creation time) doubled the series
# a dashboard sees and means nothing for rates; Prometheus itself does not need it
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
# the process's memory, CPU seconds and open files (process_*; not in multiprocess mode, whose
# page is gathered from the processes' files)
ProcessCollector(registry=REGISTRY)
# a job: a short clip at 256 px takes under a second here, a long one at 1024 px many minutes
SECONDS = (0.25, 0.5, 0.75, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
# an answer's headers: most routes answer in milliseconds; a synchronous generate in seconds
HTTP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# a stage: most take 0.01-0.3 s of a few seconds' clip (all fell in the first bucket, 0.5 s)
STAGE_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800)

REQUESTS = Counter("sonic_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=REGISTRY)
REQUEST_SECONDS = Histogram(
    "sonic_http_request_duration_seconds",
    "seconds from a request's arrival to its answer's headers (a stream's body, an event stream's or a "
    "video's, is not counted)",
    ["route", "method"],
    buckets=HTTP_SECONDS,
    registry=REGISTRY,
)
CACHE_HITS = Counter(
    "sonic_cache_hits", "generate requests answered with the same request's earlier video", registry=REGISTRY
)
JOBS = Counter("sonic_jobs_finished", "jobs that ended", ["kind", "status"], registry=REGISTRY)
FAILURES = Counter("sonic_job_failures", "failed jobs by error code", ["code"], registry=REGISTRY)
RUNS_LOST = Counter(
    "sonic_job_runs_lost",
    "runs of jobs whose worker vanished, queued again (retry_lost_jobs) or failed worker_lost",
    registry=REGISTRY,
)
WAIT = Histogram(
    "sonic_job_wait_seconds",
    "seconds from a job's submission to the start of its (last) run: the queue's wait",
    ["kind"],
    buckets=SECONDS,
    registry=REGISTRY,
)
DURATION = Histogram(
    "sonic_job_duration_seconds", "seconds from a job's start to its end", ["kind"], buckets=SECONDS, registry=REGISTRY
)
STAGE = Histogram(
    "sonic_stage_seconds",
    "seconds of each pipeline stage of succeeded jobs",
    ["stage"],
    buckets=STAGE_SECONDS,
    registry=REGISTRY,
)
VIDEO = Counter("sonic_video_seconds", "seconds of video produced", registry=REGISTRY)
WEBHOOK_DELIVERIES = Counter(
    "sonic_webhook_deliveries",
    "webhook attempts, by result: delivered, failed (retried), dropped",
    ["result"],
    registry=REGISTRY,
)
LIVE_OPENED = Counter("sonic_live_sessions_opened", "live sessions opened", registry=REGISTRY)
LIVE_REFUSED = Counter(
    "sonic_live_sessions_refused", "live sessions refused, by error code", ["code"], registry=REGISTRY
)
LIVE_ENDED = Counter("sonic_live_sessions_ended", "live sessions ended, by reason", ["reason"], registry=REGISTRY)
LIVE_FRAMES = Counter("sonic_live_frames_sent", "frames live sessions sent", registry=REGISTRY)
LIVE_LATE = Counter("sonic_live_late_frames", "live frames that were late (rendering fell behind)", registry=REGISTRY)
LIVE_LATENCY = Histogram(
    "sonic_live_latency_seconds",
    "each live frame's latency at the server: look-ahead, render and hand-off to the encoder",
    buckets=(0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0),
    registry=REGISTRY,
)


# HTTP's own methods. Any other token is a valid request line too: as a label each new one made
# series that lived as long as the process (a client sending 60 kB methods grew a scrape by 1.2 MB
# a request), so they are all counted as "other".
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def count_request(rule: str | None, method: str, status: int, seconds: float) -> None:
    method_label = method if method in HTTP_METHODS else "other"
    REQUESTS.labels(rule or "unmatched", method_label, str(status)).inc()
    REQUEST_SECONDS.labels(rule or "unmatched", method_label).observe(max(0.0, seconds))


def count_cache_hit() -> None:
    CACHE_HITS.inc()


def count_job(rec) -> None:
    """A job has ended (its record holds the status, timings and error). Never raises."""
    try:
        JOBS.labels(rec.kind, rec.status).inc()
        if rec.started:
            WAIT.labels(rec.kind).observe(max(0.0, rec.started - rec.created))
        if rec.started and rec.finished:
            DURATION.labels(rec.kind).observe(max(0.0, rec.finished - rec.started))
        if rec.status == FAILED and rec.error:
            FAILURES.labels(rec.error.get("code", "internal_error")).inc()
        if rec.status == SUCCEEDED and rec.result:
            for stage, seconds in (rec.result.get("timings") or {}).items():
                if stage != "total":
                    STAGE.labels(stage).observe(float(seconds))
            VIDEO.inc(float(rec.result.get("duration") or 0.0))
    except Exception:  # noqa: BLE001 - metrics never break a job
        pass


def _gauge(name: str, meaning: str, value: float) -> str:
    return f"# HELP {name} {meaning}\n# TYPE {name} gauge\n{name} {value}\n"


def exposition(
    queue_health: dict | None, live_open: int | None = None, webhook_jobs_waiting: int | None = None
) -> tuple[bytes, str]:
    """The metrics page: this process's (or, in multiprocess mode, every process's) counters, and
    the gauges read now: the queue's, the live sessions', the webhooks' (None: not read)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    gauges = []
    if queue_health is not None:
        workers = queue_health.get("workers")
        busy = (
            sum(w["state"] == "busy" for w in workers)
            if workers is not None
            else int(queue_health.get("running_job") is not None)
        )
        gauges += [
            _gauge("sonic_queue_length", "jobs waiting", queue_health.get("queue_length", 0)),
            _gauge("sonic_workers_live", "workers that run jobs", queue_health.get("workers_alive", 0)),
            _gauge("sonic_workers_busy", "workers running a job now", busy),
        ]
    if live_open is not None:
        gauges.append(_gauge("sonic_live_sessions_open", "live sessions running now", live_open))
    if webhook_jobs_waiting is not None:
        gauges.append(
            _gauge(
                "sonic_webhook_jobs_waiting",
                "jobs with a webhook delivery waiting to be sent (a retry's included)",
                webhook_jobs_waiting,
            )
        )
    return body + "".join(gauges).encode(), CONTENT_TYPE_LATEST


def worker_page(names: HostNames) -> Callable:
    """`sonic worker --metrics-port`'s WSGI app: this worker's own counters (not, in multiprocess
    mode, the other processes': they serve their own) at any path, as Prometheus's own server
    gave them, to a request that names this machine as the API's must (server.allowed_hosts): a
    page whose own name points at a worker reads nothing."""

    def answer(environ: dict, start_response: Callable) -> list[bytes]:
        host = environ.get("HTTP_HOST")
        status = None if host is None else refused_status(host, names)
        if host is not None and status is not None:
            told = MALFORMED_HOST
            if status == 403:
                told = f"this worker does not answer to the name {name_of(host)[:100]}: list it in server.allowed_hosts"
            start_response(f"{status} {HTTPStatus(status).phrase}", [("Content-Type", "text/plain; charset=utf-8")])
            return [told.encode() + b"\n"]
        body = generate_latest(REGISTRY)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    return answer
