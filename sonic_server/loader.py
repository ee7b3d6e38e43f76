"""Start-up: the queue (and with it the model) is built once, now or in a background thread
while the server already answers (/health says "starting", generate answers 503 until ready)."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from sonic.errors import SonicError

from .queue import JobQueue
from .service import Service

log = logging.getLogger("sonic.http")


def start(
    service: Service, make_queue: Callable[[], JobQueue], background: bool, then: Callable[[], None] | None = None
) -> None:
    """Build the queue now or in a thread; `then` runs (in a thread of its own) once it is ready."""

    def set_up() -> None:
        try:
            queue = make_queue()
            pipeline = getattr(queue, "pipeline", None)
            decoder = getattr(pipeline, "decoder", None)
            service.decoder = getattr(decoder, "name", None)
            service.decoder_identity = getattr(decoder, "identity", None)
            service.device = str(getattr(pipeline, "device", "cpu"))
            service.queue = queue
            service.status = "ready"
            if then is not None:
                threading.Thread(target=then, name="sonic-warm", daemon=True).start()
        except SonicError as e:  # a named setup error: /health says it
            log.error("pipeline set-up failed: %s", e.message)
            service.setup_error = e.message
            service.status = "setup_failed"
        except Exception:  # noqa: BLE001 - /health reports it
            log.exception("pipeline set-up failed")
            service.setup_error = "the pipeline failed to load (the server log has the details)"
            service.status = "setup_failed"

    if background:
        threading.Thread(target=set_up, name="sonic-setup", daemon=True).start()
    else:
        set_up()
