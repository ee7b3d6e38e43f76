"""HTTP service: the Flask app factory. It only wires the pieces; each lives in its own module."""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Mapping

from flask import Flask, request

from sonic.errors import Busy, SetupError

from . import access, hooks, loader
from .drain import EXIT_WAIT_S, REFUSED_WHILE_STOPPING, STOPPING_MESSAGE, Drain, drain_on_sigterm
from .errors import install_database_errors, install_error_handlers, is_disk_full
from .host_names import HostNames
from .idempotency import open_keys
from .json_input import BoundedJSONProvider
from .legacy import jobs_db_path
from .outbound import Reach
from .public import PublicAddress
from .queue.local import LocalQueue
from .routes import BLUEPRINTS
from .service import Service, Slots
from .settings import ServerConfig, load_settings, settings_from
from .storage import open_storage
from .store import claim, open_store
from .webhooks import events_of, make_webhooks

log = logging.getLogger(__name__)


def create_app(settings: ServerConfig | Mapping | None = None, pipeline=None, background_load: bool = False) -> Flask:
    """Build the app; `pipeline` defaults to `sonic.load_pipeline(settings)`, loaded once, here.
    Settings: typed (sonic_server/settings.py), or a mapping with the settings file's structure (SONIC_*
    variables apply to it), or None for the shipped file and the variables.

    With background_load the models load in a thread while the server already answers:
    /health says "starting" (503) and generate answers 503 + Retry-After until they are ready.
    """
    if not isinstance(settings, ServerConfig):
        settings = load_settings() if settings is None else settings_from(settings, env=os.environ)
    srv, limits = settings.server, settings.limits
    app = Flask(__name__)
    app.request_class = hooks.WholeBodyRequest  # a chunked body past the upload limit is 413, not cut
    # a path with an empty part (/api/sonic/jobs//events: a job id left out) is a 404 in JSON, not
    # a redirect to another route as an HTML page
    app.url_map.merge_slashes = False
    app.json = BoundedJSONProvider(app)  # request JSON: depth and numbers bounded
    if srv.public_url:  # the address clients reach: inside the proxy's forwarding, so that it wins
        app.wsgi_app = PublicAddress(app.wsgi_app, srv.public_url)  # type: ignore[method-assign]
    if srv.proxy_hops > 0:  # behind TLS or a load balancer: the client's scheme, host and address
        from werkzeug.middleware.proxy_fix import ProxyFix

        hops = srv.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)  # type: ignore[method-assign]
    if not srv.redis_url and settings.live.enabled and settings.live.max_sessions == 0:
        # (a worker takes 0 for "hosts none"): here every session would be refused as busy, with
        # a Retry-After its clients would follow for ever; said before anything is opened
        raise SetupError(
            "setting live.max_sessions is 0: this service would refuse every live session as busy; "
            "set live.enabled: false to turn live mode off, or live.max_sessions to 1 or more"
        )
    # outermost: a stop waits for every answer, and refuses requests before anything else runs
    drain = app.wsgi_app = Drain(app.wsgi_app, srv.drain_s)  # type: ignore[method-assign]
    app.config["MAX_CONTENT_LENGTH"] = int(limits.max_upload_mb * 1024 * 1024)
    uploads, outputs = open_storage(settings)
    svc = app.extensions["sonic"] = Service(
        settings=settings,
        uploads=uploads,
        output_dir=Path(settings.output_dir),
        outputs=outputs,
        sync_wait_s=srv.sync_wait_s,
        retry_after_s=str(srv.retry_after_s),
        event_streams=Slots(srv.max_event_streams),
        fetches=Slots(settings.outbound.max_fetches),
        reach=Reach.of(settings.outbound),
        drain=drain,
    )
    drain.on_stopping.append(lambda: svc.queue.pause() if svc.queue is not None else None)
    # once the answers are made: a render still running stops (an exit under it aborts the process)
    drain.before_exit.append(lambda: svc.queue.close(wait_s=EXIT_WAIT_S) if svc.queue is not None else None)
    db = jobs_db_path(settings)
    if not srv.redis_url:  # one process owns its jobs and uploads (before it recovers or sends any)
        if db:
            claim(db + ".lock", f"the job database {Path(db).resolve()}", "server.data_dir")
        claim(uploads.root, f"the upload folder {uploads.root}", "server.upload_dir")  # made by open_storage
        # and its videos: a second service's start-up sweep took the first one's video being
        # written (its job failed), and each expired the other's videos by its own output_ttl_s
        output_root = Path(settings.output_dir).resolve()
        claim(output_root, f"the output folder {output_root}", "output_dir")
    try:  # the tables beside the jobs (SQLite, in data_dir, unless on Redis)
        svc.idempotency = open_keys(srv.redis_url, db)
        svc.webhooks = make_webhooks(settings, outputs)
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise SetupError(f"the job database cannot be written: the disk of server.data_dir is full ({e})") from e
    svc.webhooks.start(only_if_pending=True)  # deliveries a previous run left are sent
    hooks.request_id(app)
    hooks.browser_headers(app)
    hooks.access_log(app)
    hooks.host(app, HostNames.of(srv.allowed_hosts, srv.public_url))
    hooks.memory(app)
    if settings.credits.enabled:  # accounts, keys and credits (docs/credits.md)
        from .accounts import Billing, Ledger, Settler, database_url, video_price
        from .live.sessions import live_orphan_s
        from .routes import credits as credit_routes

        svc.ledger = Ledger.open(database_url(settings))
        svc.billing = Billing(svc.ledger, settings.credits)
        svc.settler = Settler(
            svc.ledger,
            lambda: svc.queue,
            lambda result: video_price(settings.credits, result.get("duration", 0.0)),
            live_session=lambda hold_id: svc.live.session_of_hold(hold_id) if svc.live is not None else None,
            live_orphan_s=live_orphan_s(settings.live),
        )
        svc.settler.start()
        app.register_blueprint(credit_routes.bp)
        install_database_errors(app)
    access.install(
        app,
        [k for k in srv.api_keys if k],
        srv.rate_limit_per_s,
        srv.rate_limit_burst,
        ledger=svc.ledger,
        credits=settings.credits,
        table=_rate_tables(srv.redis_url),
    )
    hooks.cors(app, list(srv.cors_origins), srv.public_url)
    install_error_handlers(app, limits.max_upload_mb)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    from .live.routes import bp as live_routes

    warm_live = None  # live sessions start faster with their face analyser and a helper ready (live.warm_start)
    if srv.redis_url:  # distributed: sessions run on the workers, steered from here through Redis
        from .live.relay import settler
        from .live.remote import RemoteSessions

        svc.live = RemoteSessions(settings.live, srv.redis_url, settler(svc.billing))
    else:
        from .live.sessions import LiveSessions

        here = svc.live = LiveSessions(settings.live)
        if settings.live.enabled and settings.live.warm_start:
            warm_live = here.warm
        _end_sessions_on_exit(here)
        drain.before_exit.append(here.close)  # charged before a slow stop can be killed
    app.register_blueprint(live_routes)
    _warn_of_an_open_turn_password(settings, keyless=not srv.api_keys and not settings.credits.enabled)
    if srv.redis_url:  # the job store away: the service is not ready, the request may be retried
        from .queue.redis import install_store_outage_handler

        install_store_outage_handler(app)

    # whatever ends a job settles its credits at once, in the process that ends it (lifecycle.JobEnd)
    end_hooks = ((svc.settler.settle_ended,) if svc.settler is not None else ()) + (svc.webhooks.job_ended,)

    def make_queue():
        if srv.redis_url:  # distributed: the workers load the model, not this process
            from redis import exceptions as redis_errors

            from .queue.redis import RedisQueue, without_password

            if outputs.remote:
                outputs.s3.check()  # a missing bucket or refused credentials: /health says which
            try:
                return RedisQueue(
                    srv.redis_url,
                    svc.output_dir,
                    svc.uploads,
                    outputs=outputs,
                    queue_size=srv.queue_size,
                    max_jobs_per_caller=srv.max_jobs_per_caller,
                    job_timeout_s=srv.job_timeout_s,
                    retry_lost_jobs=srv.retry_lost_jobs,
                    end_hooks=end_hooks,
                )
            except (redis_errors.AuthenticationError, redis_errors.AuthorizationError) as e:
                raise SetupError(f"the job store (Redis at {without_password(srv.redis_url)}) refused: {e}") from None
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as e:
                raise loader.NotReachable(
                    f"the job store (Redis at {without_password(srv.redis_url)}) does not answer "
                    f"({type(e).__name__}: {e}); trying again every {loader.RETRY_S:.0f} s"
                ) from None
        from sonic import load_pipeline

        pipe = pipeline if pipeline is not None else load_pipeline(settings)
        return LocalQueue(
            pipe,
            svc.output_dir,
            svc.uploads,
            queue_size=srv.queue_size,
            max_jobs_per_caller=srv.max_jobs_per_caller,
            output_ttl_s=srv.output_ttl_s,
            store=open_store(db),
            job_timeout_s=srv.job_timeout_s,
            end_hooks=end_hooks,
            notify=events_of(svc.webhooks.notify),
        )

    loader.start(svc, make_queue, background_load, then=warm_live)
    _refuse_new_work_while_stopping(app, drain)
    drain_on_sigterm(drain)  # under a WSGI server; `sonic serve` claims SIGTERM itself
    return app


def _rate_tables(redis_url: str | None) -> access.BucketTable:
    """The rate limit's buckets: in Redis where several API processes share one (connected on
    the first request: an API process may start before its Redis)."""
    if not redis_url:
        return access.local_table
    from .queue.redis import connect

    return access.shared_table(connect(redis_url))


def _refuse_new_work_while_stopping(app: Flask, drain: Drain) -> None:
    """While a SIGTERM drains the answers in flight, what would start new work is refused 503
    `busy` (through the app's own error path: its request id, CORS headers and access line);
    status reads, cancels and ends of sessions are still answered."""

    @app.before_request
    def refuse():
        if drain.stopping.is_set() and request.endpoint in REFUSED_WHILE_STOPPING:
            raise Busy(STOPPING_MESSAGE)


def _warn_of_an_open_turn_password(settings: ServerConfig, keyless: bool) -> None:
    from .live.ice import password_handed_to_anyone

    if settings.live.enabled and (warning := password_handed_to_anyone(settings.live, keyless)):
        log.warning("%s", warning)


def _end_sessions_on_exit(live) -> None:
    """A stopped server ends its live sessions (server_stopping): the seconds they streamed are
    charged and their helpers stopped, at the interpreter's exit (after a SIGTERM's drain too)."""
    atexit.register(live.close)
