"""How the service's processes log: one line per record on stderr, as text (time, level, logger,
message) or as JSON lines (`server.log_format: json`) for a log pipeline that parses them.

A record whose line is data (a request's, a job's end) is logged with `fields(...)` as its
`extra`: its text line is its message followed by the fields as JSON (as it always was); its
JSON line holds the fields themselves beside the time, level and logger, not a string to parse.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timezone
from typing import Any

LOG_FORMATS = ("text", "json")
HANDLER_NAME = "sonic"  # the handler this module installed, the only one whose format it sets
_EVENT, _FIELDS = "sonic_event", "sonic_fields"


def fields(event: str, values: dict[str, Any]) -> dict[str, Any]:
    """The `extra` of a record whose line is data: `event` names what happened ("request", "job
    ended"), `values` what a JSON line holds as fields."""
    return {_EVENT: event, _FIELDS: values}


def _timestamp(created: float) -> str:
    """ISO 8601 in UTC to the millisecond: a line read on another machine says when it was."""
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <logger> <message>`, the time as `_timestamp` writes it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        return _timestamp(record.created)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then a data record's event and fields, or
    another record's message; a logged exception's traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": _timestamp(record.created), "level": record.levelname, "logger": record.name}
        values = getattr(record, _FIELDS, None)
        if isinstance(values, dict):
            line["message"] = getattr(record, _EVENT, "")
            line.update({k: v for k, v in values.items() if k not in line})
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["exception"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class Repeats(logging.Filter):
    """At most `per_minute` records of one message (a logger's template) a minute, from the
    libraries beneath the service (its own loggers, `sonic.*`, are let through: a job's end is
    one template): a live client that sent malformed microphone packets made aiortc log one
    warning per packet, 13,800 a second, 600 kB a second of log. The first record left out says
    that more are."""

    def __init__(self, per_minute: int = 10) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # (logger, template) -> minute's start, count
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "sonic" or record.name.startswith("sonic."):
            return True
        key = (record.name, str(record.msg))
        with self._lock:
            start, count = self._seen.get(key, (record.created, 0))
            if record.created - start >= 60:
                start, count = record.created, 0
            if len(self._seen) >= 10_000:  # templates are few; a bound all the same
                self._seen.clear()
            self._seen[key] = (start, count + 1)
        if count == self.per_minute:
            record.msg = f"{record.msg} (repeated {self.per_minute} times this minute: more are left out)"
        return count <= self.per_minute


def store_outage(error: BaseException | None) -> BaseException | None:
    """The Redis outage (a connection refused, reset or timed out) that `error` is, or was raised
    from, if any: one the service rides out. (An error raised while handling an outage is not
    one: a fault of its own, whose traceback is kept.)"""
    from .errors import redis_not_answering

    seen = 0
    while error is not None and seen < 10:
        # a refused password is a ConnectionError to redis-py too: said as it is, not as an outage
        if redis_not_answering(error) and type(error).__name__ != "AuthenticationError":
            return error
        error, seen = error.__cause__, seen + 1
    return None


class Outages(logging.Filter):
    """A record that carries the traceback of a Redis outage (its own code's, or a library's
    beneath: RQ's "found an unhandled exception") becomes a one-line warning naming the cause:
    the service rides out the outage (docs/scaling.md), and a restart of Redis filled the
    workers' logs with a dozen tracebacks each. (The record is changed in place: a handler
    added beside this one sees the line as this one writes it.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        outage = store_outage(record.exc_info[1]) if record.exc_info else None
        if outage is not None:
            cause = f"{type(outage).__name__}: {outage}"[:200]
            record.msg, record.args = f"{record.getMessage()} (Redis does not answer: {cause})", None
            record.exc_info = record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


class Quietly:
    """A loop's failures (Redis away) said once, when they begin, and their end once: a loop that
    retries each second otherwise logged a line each second. `what` names what fails, as the
    lines say it ("worker w1: heartbeat")."""

    def __init__(self, logger: logging.Logger, what: str, retrying: str) -> None:
        self.log, self.what, self.retrying = logger, what, retrying
        self.failing = False

    def failed(self, error: BaseException) -> None:
        if not self.failing:
            self.log.warning("%s failed (%s); %s, quietly", self.what, type(error).__name__, self.retrying)
        self.failing = True

    def worked(self) -> None:
        if self.failing:
            self.log.warning("%s works again", self.what)
        self.failing = False


def configure_logging(log_format: str = "text") -> None:
    """INFO lines to stderr in `log_format`, unless the process has set up logging itself (an
    application that embeds the service keeps its own handlers and format): the service logs
    the same under `sonic serve`, `sonic worker` and a WSGI server (waitress sets up none, so its
    access and job lines went nowhere), a library's repeated lines at most ten a minute each
    (`Repeats`). Called once at start, and again with the settings'
    format once they are read (a settings error is logged before that)."""
    root = logging.getLogger()
    if not root.handlers:
        ours = logging.StreamHandler()
        ours.set_name(HANDLER_NAME)
        ours.addFilter(Repeats())
        ours.addFilter(Outages())
        root.addHandler(ours)
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        if handler.get_name() == HANDLER_NAME:
            handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    # a line per ICE check of each live session otherwise, with the client's address and port
    logging.getLogger("aioice").setLevel(logging.WARNING)
