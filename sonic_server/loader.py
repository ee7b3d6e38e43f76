"""Start-up: the queue (and with it the model) is built once, now or in a background thread
while the server already answers (/health says "starting", generate answers 503 until ready)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from sonic.errors import SonicError

from .queue import JobQueue
from .service import Service

log = logging.getLogger("sonic.http")
RETRY_S = 5.0  # a store that does not answer yet is asked again this often


class NotReachable(Exception):
    """The queue's store (Redis) does not answer yet: the start goes on trying, "starting" the
    while, with this message in /health (a service started before its Redis must come up once
    Redis does)."""


def start(
    service: Service, make_queue: Callable[[], JobQueue], background: bool, then: Callable[[], None] | None = None
) -> None:
    """Build the queue now or in a thread; `then` runs (in a thread of its own) once it is ready.
    A store not reachable yet is tried again every RETRY_S, in a thread."""

    def attempt() -> bool:
        """One try; False when it is to be tried again."""
        try:
            queue = make_queue()
        except NotReachable as e:
            if service.setup_error != str(e):
                log.warning("%s", e)
            service.setup_error = str(e)
            return False
        except SonicError as e:  # a named setup error: /health says it
            log.error("pipeline set-up failed: %s", e.message)
            service.setup_error = e.message
            service.status = "setup_failed"
            return True
        except Exception:  # noqa: BLE001 - /health reports it
            log.exception("pipeline set-up failed")
            service.setup_error = "the pipeline failed to load (the server log has the details)"
            service.status = "setup_failed"
            return True
        pipeline = getattr(queue, "pipeline", None)
        decoder = getattr(pipeline, "decoder", None)
        service.decoder = getattr(decoder, "name", None)
        service.decoder_identity = getattr(decoder, "identity", None)
        service.device = str(getattr(pipeline, "device", "cpu"))
        if service.setup_error is not None:  # a store that did not answer at first: said it does
            log.warning("the store answers now: ready")
        service.setup_error = None
        service.queue = queue
        service.status = "ready"
        if then is not None:
            threading.Thread(target=then, name="sonic-warm", daemon=True).start()
        return True

    def retry() -> None:
        while True:
            time.sleep(RETRY_S)
            if attempt():
                return

    def now_then_retry() -> None:
        if not attempt():
            retry()

    if background:
        threading.Thread(target=now_then_retry, name="sonic-setup", daemon=True).start()
    elif not attempt():
        threading.Thread(target=retry, name="sonic-setup", daemon=True).start()
