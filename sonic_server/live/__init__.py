"""Live sessions over WebRTC: the transport (rtc.py: aiortc, one event loop, the tracks), the
registry that owns each session's life, limits and metering (sessions.py) and the routes
(routes.py). The frames come from the library's streaming engine (sonic/live/)."""

from typing import Literal, get_args

# why a session ended, as its 404 (`ended_reason`), its record and its metric name it (docs/live.md)
EndReason = Literal[
    "client_closed",  # the client's DELETE
    "client_gone",  # its connection failed, closed, never came, or fell silent for live.idle_timeout_s
    "max_session",  # live.max_session_s reached
    "credit_exhausted",  # the account's hold is spent
    "server_stopping",  # ^C, SIGTERM, the interpreter's exit
    "worker_lost",  # distributed mode: its worker stopped answering
    "error",  # the session failed (its helper process ended)
]
END_REASONS: tuple[str, ...] = get_args(EndReason)
