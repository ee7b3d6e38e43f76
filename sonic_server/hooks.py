"""Per-request pieces every route shares: the request id, CORS headers and the access log line."""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import threading
import time
import uuid
from urllib.parse import urlsplit

from flask import Flask, Request, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from sonic.memory import give_back_memory

from .errors import error_response
from .host_names import MALFORMED_HOST, SENT_HOST, HostNames, name_of, refused_status
from .logs import fields
from .metrics import count_request
from .openapi import headers_everywhere

log = logging.getLogger("sonic.http")
PROBES = ("/health", "/metrics")  # asked every few seconds by orchestrators and Prometheus


# what the API reads and sends: a page on another origin may send and read all of it (DELETE
# ends jobs and live sessions; Idempotency-Key makes a retried generate safe); a preflight is
# good for ten minutes, so that a page does not send one (and spend its rate limit) per request
CORS_HEADERS = {
    "Access-Control-Allow-Headers": "Content-Type, Prefer, Authorization, X-Request-ID, Range, Idempotency-Key",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Expose-Headers": (
        "X-Request-ID, Retry-After, Content-Range, Location, Idempotent-Replayed, ETag, Preference-Applied, "
        "Allow, WWW-Authenticate, Content-Disposition, Accept-Ranges"
    ),
    "Access-Control-Max-Age": "600",
}
REFERRER_POLICY = "same-origin"
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,64}")  # visible ASCII: safe in a header and a log line


def request_id(app: Flask) -> None:
    """The client's X-Request-ID (its first 64 characters, when they are visible ASCII) or a fresh
    one, echoed on every response. Anything else (control characters, line breaks, other
    scripts) could not be echoed in a header safely, so it is replaced."""
    headers_everywhere(
        (
            "X-Request-ID",
            "echoed on the answer and logged; up to 64 visible ASCII characters, "
            "anything else is replaced by a fresh id",
            {"type": "string"},
        )
    )

    @app.before_request
    def _take():
        sent = request.headers.get("X-Request-ID", "")[:64]
        g.request_id = sent if REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.after_request
    def _echo(resp):
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        if resp.status_code == 204:  # no content, so no type (Flask's default said text/html)
            resp.headers.pop("Content-Type", None)
        return resp


def browser_headers(app: Flask) -> None:
    """On every answer, not the pages only: a browser never takes one for another type than the
    one it says (nosniff), and no address of this service's (a video's) goes to another site in
    Referer (same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` on
    the demo page's own POSTs, which the CORS check then refuses); and no cache keeps a JSON
    answer (no-store)."""

    @app.after_request
    def _say(resp):
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", REFERRER_POLICY)
        if resp.mimetype == "application/json":  # a job's state, a list, a balance: read fresh each time
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp


def host(app: Flask, names: HostNames) -> None:
    """A request whose Host is not a host (and port) is refused 400: the answer's URLs
    (video_url, status_url, the webhook's) are built on it, and one with spaces or markup made
    them `http:///...`. One that names this server by a name it does not answer to is refused
    403 (DNS rebinding: sonic_server/host_names.py). Under server.public_url the Host read is the
    one the client sent, not the rewritten one."""

    @app.before_request
    def _refuse_odd_host():
        sent = request.environ.get(SENT_HOST, request.headers.get("Host"))
        if sent is None:  # HTTP/1.0 may leave it out; 1.1 and later must send it (RFC 9112 3.2)
            if request.environ.get("SERVER_PROTOCOL") == "HTTP/1.0":
                return None
            return error_response("invalid_parameter", "an HTTP/1.1 request must name its Host", field="Host")
        # behind a proxy (server.proxy_hops), the Host it sent as well as the forwarded one: a
        # page may set X-Forwarded-Host on its own requests, and a proxy may pass it on
        proxied = request.environ.get("werkzeug.proxy_fix.orig", {}).get("HTTP_HOST")
        return _refusal(sent, names) or (_refusal(proxied, names) if proxied is not None else None)


def _refusal(host: str, names: HostNames):
    """The error answer for a Host that is malformed or names this server by a name it does not
    answer to; None for one it answers."""
    status = refused_status(host, names)
    if status == 400:
        return error_response("invalid_parameter", MALFORMED_HOST, field="Host")
    if status == 403:
        return error_response(
            "forbidden",
            f"this server does not answer to the name {name_of(host)[:100]}: start it with "
            f"SONIC_ALLOWED_HOSTS={name_of(host)[:100]}, or list the name in server.allowed_hosts in its settings "
            "file (a web page whose own name points here could otherwise call it as its own)",
        )
    return None


def cors(app: Flask, origins: list[str], public_url: str | None = None) -> None:
    """Browsers at `origins` ("*": any; "loopback": pages served from this machine, http(s) on
    localhost, 127.0.0.0/8 or [::1], any port; empty: none) may call the API and read its headers.

    The CORS headers depend on the request's Origin (sent or not, allowed or not), so every
    answer says `Vary: Origin`: a shared cache must not hand one origin's answer to another.
    (Origin is not in the OpenAPI document: a browser sets it, and a generated client would take
    it as an argument that a browser forbids it to set.)

    CORS alone only hides answers: a page elsewhere may still send a form-like POST (a multipart
    upload, no Authorization) without asking first, and the job would run. So with a list of
    origins, a request that changes something and comes from a page of another origin (its
    browser says so in Origin) is refused 403 before it does; requests without Origin (curl,
    servers) and pages served by this server itself are not concerned."""
    listed = {normal_origin(o) for o in origins if o not in ("*", "loopback")}
    everyone, loopback = "*" in origins, "loopback" in origins
    own = normal_origin(public_url.rstrip("/")) if public_url else None  # (see _same_origin)

    def allowed(origin: str) -> bool:
        return normal_origin(origin) in listed or (loopback and _loopback_origin(origin))

    told = UnlistedOrigins()

    @app.before_request
    def _refuse_other_pages():
        origin = request.headers.get("Origin")
        if everyone or origin is None or allowed(origin) or _same_origin(origin, own):
            return None
        # its browser shows the page a bare CORS failure, and only the operator can list it
        told.log(origin)
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return None
        return error_response(
            "forbidden",
            f"a page at {origin[:100]} may not call this API (server.cors_origins does not list it)",
        )

    @app.before_request
    def _answer_preflights():
        """A browser asks first (OPTIONS with Access-Control-Request-Method) before a request
        that sends a key or JSON. For a path no route has, Flask answered that question 404,
        which the browser reports as a CORS failure: the page never read the 404 (or 405) its
        request would get. Every path's preflight is answered; the request then gets its own."""
        if origins and request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            return Response(status=204)
        return None

    @app.after_request
    def _allow(resp):
        if not origins:
            return resp
        resp.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin and (everyone or allowed(origin)):
            resp.headers["Access-Control-Allow-Origin"] = "*" if everyone else origin
            resp.headers.update(CORS_HEADERS)
        return resp


DEFAULT_PORTS = {"http": 80, "https": 443}
UNLISTED_LOG_S = 60  # an origin server.cors_origins does not list is logged at most once in this long
UNLISTED_PER_WINDOW = 5  # ... and at most this many origins in it


class UnlistedOrigins:
    """The warning that a page of an origin server.cors_origins does not list called the API
    (its answers hidden from it, its changes refused): each origin at most once a minute, and at
    most a few origins a minute, so that a page calling in a loop, or one making up origins,
    cannot fill the log, nor keep a page of the operator's own out of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._told_at: dict[str, float] = {}  # origin -> when its warning was logged, this window

    def log(self, origin: str) -> None:
        shown = json.dumps(origin[:100])
        with self._lock:
            now = time.monotonic()
            self._told_at = {o: t for o, t in self._told_at.items() if now - t < UNLISTED_LOG_S}
            if shown in self._told_at or len(self._told_at) >= UNLISTED_PER_WINDOW:
                return
            self._told_at[shown] = now
        log.warning(
            "a page at %s called the API; server.cors_origins does not list it, so its browser hides the answers "
            "(and changes are refused 403): list it (SONIC_CORS_ORIGINS) if it is yours",
            shown,
        )


def _same_origin(origin: str, own: str | None) -> bool:
    """A page of this server's own (the demo page). Its browser says so in Sec-Fetch-Site, which
    no page can set: behind a proxy that sends its own Host (nginx's default), the origin names
    a host this process never sees. Browsers without that header (they send it on https and
    localhost only): its origin is `own` (server.public_url's, normalised), or names the host
    the request was sent to, by host and port, not scheme (a TLS proxy in front keeps the Host
    but speaks http to this process; its scheme is only known with server.proxy_hops)."""
    if request.headers.get("Sec-Fetch-Site") == "same-origin":
        return True
    page = normal_origin(origin)
    scheme = page.partition("://")[0]
    return page == own or page == normal_origin(f"{scheme}://{request.host}")


def _loopback_origin(origin: str) -> bool:
    """A page served from this machine: http(s) on localhost, 127.0.0.0/8 or [::1], any port."""
    try:
        parts = urlsplit(origin.strip())
        parts.port  # noqa: B018 - read to be checked: "http://localhost:abc" is no origin
    except ValueError:  # "http://[::1", a port that is no number: no origin a browser sends
        return False
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or parts.username is not None:
        return False
    if parts.hostname.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class WholeBodyRequest(Request):
    """Flask's request, with a body read whole (a JSON body: /fusion, the recharge route) that
    runs past MAX_CONTENT_LENGTH without a Content-Length (chunked) refused 413: werkzeug's read
    stops at the limit and hands over what it has read, and a 52 MB body sent chunked was parsed
    cut at 50 MB ("not valid JSON") where the same body with its length was 413."""

    def get_data(self, cache: bool = True, as_text: bool = False, parse_form_data: bool = False):
        data = super().get_data(cache=cache, as_text=False, parse_form_data=parse_form_data)
        limit = self.max_content_length
        if self.content_length is None and limit is not None and len(data) >= limit and self._more_after_limit():
            raise RequestEntityTooLarge()
        return data.decode(errors="replace") if as_text else data

    def _more_after_limit(self) -> bool:
        """A byte of the body beyond what werkzeug read (a body of exactly the limit is whole)."""
        try:
            return bool(self.environ["wsgi.input"].read(1))
        except (OSError, ValueError):  # the socket timed out or closed: nothing more
            return False


def normal_origin(origin: str) -> str:
    """An origin as a browser writes it: lower case, no default port, no trailing slash (as
    `request.host_url` ends); what cannot be read as one is kept as it is (and matches nothing)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:  # "http://[::1", a port that is no number: matches nothing
        return origin
    if not parts.scheme or not parts.hostname:
        return origin
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    scheme = parts.scheme.lower()
    return f"{scheme}://{host}" if port in (None, DEFAULT_PORTS.get(scheme)) else f"{scheme}://{host}:{port}"


def memory(app: Flask) -> None:
    """After a request that sent a body (an upload, a fusion), the memory its decoding freed goes
    back to the system (sonic/memory.py): otherwise a near-limit photo leaves the process larger."""

    @app.teardown_request
    def _give_back(_exc):
        if request.method == "POST":
            give_back_memory()


def _clipped(text: str, most: int) -> str:
    """A client's own text in a log line, at most `most` characters (a request line may be 64 kB,
    and every one written whole would let anyone fill the log at the network's speed)."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text)} characters)"


def access_log(app: Flask) -> None:
    """One line per request (DEBUG for a 200 to a health probe or a metrics scrape), its message
    JSON: id, method, route, status, milliseconds, the client's address,
    parameters, and where they apply: who called (a key's digest or an account, never the key),
    the job or live session it made (and the worker that took the session), the error code it
    answered."""

    @app.before_request
    def _start():
        g.t0 = time.perf_counter()

    @app.after_request
    def _log(resp):
        seconds = time.perf_counter() - g.get("t0", 0)
        count_request(request.url_rule.rule if request.url_rule else None, request.method, resp.status_code, seconds)
        line = {
            "request_id": g.get("request_id"),
            "method": _clipped(request.method, 16),
            "route": _clipped(request.path, 512),
            "status": resp.status_code,
            "ms": round(1000 * seconds, 1),
            "client": request.remote_addr,
            "params": g.get("log_params"),
            **{k: g.get(k) for k in ("job_id", "cached", "session_id", "worker", "error_code") if g.get(k)},
            **({"caller": g.caller.owner} if g.get("caller") is not None and g.caller.owner else {}),
        }
        # a probe's or a scrape's answer every few seconds would bury the lines that matter
        routine = request.path in PROBES and request.method == "GET" and resp.status_code == 200
        log.log(logging.DEBUG if routine else logging.INFO, json.dumps(line), extra=fields("request", line))
        return resp
