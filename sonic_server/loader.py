"""Start-up: the queue (and with it the model) is built once, now or in a background thread
while the server already answers (/health says "starting", generate answers 503 until ready)."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from .queue import JobQueue
from .service import Service

log = logging.getLogger("sonic.http")


def start(service: Service, make_queue: Callable[[], JobQueue], background: bool) -> None:
    def set_up() -> None:
        try:
            service.queue = make_queue()
            service.status = "ready"
        except Exception:                                      # noqa: BLE001 - /health reports it
            log.exception("pipeline set-up failed")
            service.status = "setup_failed"

    if background:
        threading.Thread(target=set_up, name="sonic-setup", daemon=True).start()
    else:
        set_up()
