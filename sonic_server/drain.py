"""Stopping without cutting answers off: on SIGTERM (docker stop, systemd, a rolling deploy) the
requests in flight finish, for server.drain_s at most, before the process ends.

`sonic serve` refuses new connections and waits for the open ones (serve.py). Under any other
WSGI server (`waitress-serve`, the Dockerfile's), `create_app` puts a `Drain` around the app: it
counts the requests being answered and, once stopping, answers new ones 503 `busy` with
`Retry-After: 1` (a load balancer sends them elsewhere, a client retries) while those in flight
finish; then the signal is sent again, to the main thread, where it ends the server's loop
(SystemExit) and the process ends through its at-exit steps (live sessions end and are charged,
helpers stop).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any, Callable, Iterable

from werkzeug.wsgi import ClosingIterator

log = logging.getLogger("sonic.http")

STOPPING_MESSAGE = "the server is stopping (SIGTERM): send the request again, another instance will answer"


class InFlight:
    """What is being served (`with in_flight:` around each), so that a stop can wait for it."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def __enter__(self) -> None:
        with self._changed:
            self.count += 1

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self.count -= 1
            self._changed.notify_all()

    def wait(self, timeout_s: float) -> bool:
        """Whether everything was answered within timeout_s."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count == 0, timeout_s)


class Drain:
    """WSGI middleware: the requests in flight (from the call to the close of the answer's body,
    so that a video being downloaded counts), and the stop that waits for them."""

    def __init__(self, wsgi_app: Callable, drain_s: float) -> None:
        self.wsgi_app = wsgi_app
        self.drain_s = drain_s
        self.in_flight = InFlight()
        self.stopping = threading.Event()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if self.stopping.is_set():
            return _refuse(start_response)
        self.in_flight.__enter__()
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            self.in_flight.__exit__()
            raise
        return ClosingIterator(body, self.in_flight.__exit__)

    def stop(self, then: Callable[[], None]) -> None:
        """Refuse new requests from now on; once those in flight are answered (drain_s at most),
        call `then` from another thread."""
        self.stopping.set()

        def wait_then() -> None:
            if not self.in_flight.wait(self.drain_s):
                log.warning(
                    "SIGTERM: %d request(s) still unanswered after %g s: stopping anyway",
                    self.in_flight.count,
                    self.drain_s,
                )
            then()

        threading.Thread(target=wait_then, name="sonic-drain", daemon=True).start()


def _refuse(start_response: Callable) -> list[bytes]:
    body = json.dumps(
        {"success": False, "error": {"code": "busy", "message": STOPPING_MESSAGE}, "request_id": None}
    ).encode()
    start_response(
        "503 Service Unavailable",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Retry-After", "1"),
            ("X-Content-Type-Options", "nosniff"),
        ],
    )
    return [body]


def drain_on_sigterm(drain: Drain) -> None:
    """Where nothing else has claimed SIGTERM (a WSGI server that leaves it to the default, which
    kills the process before anything is answered), let it stop through `drain`. A second signal
    ends the wait at once. Only from the main thread, where signals are handled."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return
    main = threading.main_thread()

    def stop(signum: int, frame: Any) -> None:
        if drain.stopping.is_set():
            raise SystemExit(128 + signum)
        log.warning(
            "SIGTERM: stopping; new requests are answered 503, %d in flight get up to %g s (server.drain_s); "
            "live sessions then end (server_stopping), and a job still running or queued is reported failed "
            "(interrupted) at the next start (where server.jobs_db keeps records)",
            drain.in_flight.count,
            drain.drain_s,
        )
        # the server's loop runs in the main thread: a signal wakes it there, and this handler's
        # second call ends it as a WSGI server expects to be ended (waitress closes on SystemExit)
        drain.stop(then=lambda: signal.pthread_kill(main.ident or 0, signal.SIGTERM))

    signal.signal(signal.SIGTERM, stop)
