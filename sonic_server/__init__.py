"""HTTP service: the Flask app factory. It only wires the pieces; each lives in its own module."""
from __future__ import annotations

from pathlib import Path

from flask import Flask

from sonic import load_config

from . import access, hooks, loader
from .errors import install_error_handlers
from .queue.local import LocalQueue
from .routes import BLUEPRINTS
from .service import Service
from .store import open_store
from .uploads import Uploads


def create_app(config: dict | None = None, pipeline=None, background_load: bool = False) -> Flask:
    """Build the app; `pipeline` defaults to `sonic.load_pipeline(config)`, loaded once, here.

    With background_load the models load in a thread while the server already answers:
    /health says "starting" (503) and generate answers 503 + Retry-After until they are ready.
    """
    config = config if config is not None else load_config()
    srv, limits = config["server"], config["limits"]
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = int(limits["max_upload_mb"] * 1024 * 1024)
    svc = app.extensions["sonic"] = Service(
        settings=config, uploads=Uploads(srv["upload_dir"]), output_dir=Path(config.get("output_dir", "outputs")).resolve(),
        sync_wait_s=float(srv["sync_wait_s"]), retry_after_s=str(srv["retry_after_s"]))
    hooks.request_id(app)
    hooks.access_log(app)
    access.install(app, access.api_keys(srv.get("api_keys")), float(srv.get("rate_limit_per_s", 10)),
                   float(srv.get("rate_limit_burst", 20)))
    hooks.cors(app, srv.get("cors_origins") or [])
    install_error_handlers(app, limits["max_upload_mb"])
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)

    def make_queue() -> LocalQueue:
        from sonic import load_pipeline
        pipe = pipeline if pipeline is not None else load_pipeline(config)
        return LocalQueue(pipe, svc.output_dir, svc.uploads, queue_size=int(srv["queue_size"]),
                          output_ttl_s=float(srv["output_ttl_s"]), store=open_store(srv))

    loader.start(svc, make_queue, background_load)
    return app
