"""Stopping without cutting answers off: on SIGTERM (docker stop, systemd, a rolling deploy) the
requests in flight finish, for server.drain_s at most, before the process ends.

`sonic serve` refuses new connections and waits for the open ones (serve.py). Under any other
WSGI server (`waitress-serve`, the Dockerfile's), `create_app` puts a `Drain` around the app: it
counts the answers being made and, once stopping, the app refuses what would start new work
(`REFUSED_WHILE_STOPPING`: a generate, a live session, an event stream, and /health, so that a
load balancer takes the instance out) with 503 `busy`, while status reads, cancels and the
answers in flight go on. Then the signal is sent again, to the main thread, where it ends the
server's loop (SystemExit) and the process ends through its at-exit steps (live sessions end
and are charged, helpers stop).

Not waited for: an event stream (it ends only when its client leaves; the client polls
status_url after) and a download (waitress sends a file from its loop, which ends). Live
sessions are ended and charged as soon as the answers are made (`before_exit`): a request still
running at drain_s keeps a server thread, and waitress waits up to 5 s more for it before the
at-exit steps, past docker's 10 s.
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterable

from werkzeug.wsgi import ClosingIterator

log = logging.getLogger("sonic.http")

STOPPING_MESSAGE = "the server is stopping (SIGTERM): send the request again, another instance will answer"
# what a stopping server refuses: new work, new streams, and the health check
REFUSED_WHILE_STOPPING = frozenset(
    {
        "generate.generate",
        "generate.job_events",
        "fusion.fusion",
        "fusion.fusion_batch",
        "live.open_session",
        "live.speak",
        "meta.health",
    }
)
STREAMING = "sonic.streaming"  # set in a request's environ by a route whose answer is a stream
# what a stop does once its wait is over, as both servers' stop lines say it
AFTER_THE_DRAIN = (
    "live sessions then end (server_stopping); one process: a job still running is reported failed "
    "(interrupted) at the next start and the queued ones run then (where server.jobs_db keeps records); "
    "distributed: the workers run the jobs on"
)
EXIT_WAIT_S = 5.0  # at the exit, a running job is waited for this long to stop at its next progress report
ANSWER_BEFORE_END_S = 1.5  # a synchronous generate still waiting answers 202 this long before the drain ends


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
    """WSGI middleware: the answers in flight (from the call to the close of the answer's body),
    and the stop that waits for them."""

    def __init__(self, wsgi_app: Callable, drain_s: float) -> None:
        self.wsgi_app = wsgi_app
        self.drain_s = drain_s
        self.in_flight = InFlight()
        self.stopping = threading.Event()
        self.stop_deadline: float | None = None  # time.monotonic() at which the drain ends
        self.on_stopping: list[Callable[[], None]] = []  # run once the stop begins (the queue pauses)
        self.exiting = threading.Event()  # ^C, or the server's loop has ended: the at-exit steps run
        # run once the answers are made, before the loop is ended: what must not wait for the
        # at-exit steps (the server's own wait for its threads can take them past docker's 10 s)
        self.before_exit: list[Callable[[], None]] = []

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        self.in_flight.__enter__()
        try:
            body = self.wsgi_app(environ, start_response)
        except BaseException:
            self.in_flight.__exit__()
            raise
        file_wrapper = environ.get("wsgi.file_wrapper")
        if environ.get(STREAMING) or (isinstance(file_wrapper, type) and isinstance(body, file_wrapper)):
            self.in_flight.__exit__()  # nothing to wait for (see the module's text); the body as it is
            return body
        return ClosingIterator(body, self.in_flight.__exit__)

    def mark_stopping(self) -> None:
        """From now on new work is refused, and the answers in flight have drain_s to be made."""
        if self.stopping.is_set():
            return
        self.stop_deadline = time.monotonic() + self.drain_s
        self.stopping.set()
        for step in self.on_stopping:
            try:
                step()
            except Exception:  # noqa: BLE001 - one step's fault must not keep the process up
                log.exception("SIGTERM: a stopping step failed")

    def wait_left(self) -> float | None:
        """How long an answer that waits (a synchronous generate) may still wait before it must
        answer with what it has; None while not stopping."""
        if self.stop_deadline is None:
            return None
        return max(0.0, self.stop_deadline - ANSWER_BEFORE_END_S - time.monotonic())

    def stop(self, then: Callable[[], None]) -> None:
        """Refuse new work from now on; once the answers in flight are made (drain_s at most),
        call `then` from another thread, unless the process is already exiting."""
        self.mark_stopping()

        def wait_then() -> None:
            if not self.in_flight.wait(self.drain_s):
                log.warning(
                    "SIGTERM: %d request(s) still unanswered after %g s: stopping anyway",
                    self.in_flight.count,
                    self.drain_s,
                )
            for step in self.before_exit:
                try:
                    step()
                except Exception:  # noqa: BLE001 - one step's fault must not keep the process up
                    log.exception("SIGTERM: a stopping step failed")
            if not self.exiting.is_set():
                then()

        threading.Thread(target=wait_then, name="sonic-drain", daemon=True).start()


def drain_on_sigterm(drain: Drain) -> None:
    """Where nothing else has claimed SIGTERM (a WSGI server that leaves it to the default, which
    kills the process before anything is answered), let it stop through `drain`. A second signal
    ends the wait at once. Only from the main thread, where signals are handled; once the
    process is exiting (^C, or the server's loop ended), the signal changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return
    main = threading.main_thread()
    # registered after the app's own at-exit steps, so it runs before them
    atexit.register(drain.exiting.set)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:

        def interrupted(signum: int, frame: Any) -> None:
            drain.exiting.set()  # ^C ends the loop: the drain must not send its signal into the shutdown
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, interrupted)

    def stop(signum: int, frame: Any) -> None:
        if drain.exiting.is_set():
            return
        if drain.stopping.is_set():
            drain.exiting.set()
            raise SystemExit(128 + signum)
        log.warning(
            "SIGTERM: stopping; new work is refused (503), %d answer(s) in flight get up to %g s (server.drain_s); "
            + AFTER_THE_DRAIN,
            drain.in_flight.count,
            drain.drain_s,
        )

        def send_again() -> None:
            # the server's loop runs in the main thread: a signal wakes it there, and this
            # handler's second call ends it as a WSGI server expects (waitress closes on SystemExit)
            if main.ident is not None and main.is_alive():
                signal.pthread_kill(main.ident, signal.SIGTERM)

        drain.stop(then=send_again)

    signal.signal(signal.SIGTERM, stop)
