"""Run the service with its built-in threaded server: `sonic serve` (or `python app.py`).

Host and port come from --host/--port, then SONIC_HOST / SONIC_PORT, then the settings
(`server.host`, `server.port`; default 127.0.0.1:5000): sonic_server/settings.py reads the layers. The
model loads once, in the background, while /health already answers. For production:
waitress-serve --call sonic_server.wsgi:make_app (SONIC_CONFIG names the settings file).
"""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import re
import resource
import signal
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from email.errors import MissingHeaderBodySeparatorDefect
from http import HTTPStatus

from werkzeug.exceptions import BadRequest, ClientDisconnected
from werkzeug.serving import DechunkedInput, ThreadedWSGIServer, WSGIRequestHandler

from sonic.errors import SetupError, SonicError, shown
from sonic.settings import SettingsError

from . import create_app
from .drain import AFTER_THE_DRAIN, EXIT_WAIT_S, InFlight
from .hooks import REFERRER_POLICY
from .host_limits import check_host
from .logs import configure_logging
from .settings import load_settings

SERVER_NAME = "sonic"
ACCEPT_PAUSE_S = 0.1  # out of file handles: the wait before the next accept
# once an answer is out, how long werkzeug's read of what the client left unsent may wait for more
ANSWERED_READ_S = 0.5
log = logging.getLogger("sonic.http")


class JsonErrorsHandler(WSGIRequestHandler):
    """werkzeug's request handler, but the errors it answers itself, before the app sees a
    request (a request line or header over http.server's limits: 414, 431; a malformed request
    line: 400), carry the API's JSON error body instead of http.server's HTML page."""

    def version_string(self) -> str:
        return SERVER_NAME  # no server or Python versions for a scanner to match

    def send_response_only(self, code: int, message: str | None = None) -> None:
        self._dated = False
        super().send_response_only(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        # http.server dates every answer and a file's answer (send_file) brings its own: one is sent
        if keyword.lower() == "date":
            if getattr(self, "_dated", False):
                return
            self._dated = True
        super().send_header(keyword, value)

    def parse_request(self) -> bool:
        """http.server's parse, then the body's framing: a request whose length is ambiguous is
        refused before the app sees it (behind a proxy that reads the length another way, the
        rest of its body would be read as a second request: request smuggling)."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":  # "GET /path": its answer would be a body alone
            self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED)
            return False
        if not self.command.isupper():  # werkzeug upper-cases the method: "get" was served as GET
            self.send_error(
                HTTPStatus.NOT_IMPLEMENTED,
                f"the method {shown(self.command)} is not one this server has: methods are upper case "
                "(GET, POST, DELETE, OPTIONS, HEAD)",
            )
            return False
        headers = self.headers
        # the parser takes the first line that is not NAME: VALUE, and every line after it, for a body
        if any(isinstance(defect, MissingHeaderBodySeparatorDefect) for defect in headers.defects):
            rest = headers.get_payload()  # (a list of messages under a Content-Type of message/*)
            line = rest.split("\r\n", 1)[0].split("\n", 1)[0] if isinstance(rest, str) else ""
            self.send_error(
                HTTPStatus.BAD_REQUEST,
                f"a header line is not NAME: VALUE (a name of letters, digits and -, then the colon): {shown(line)}; "
                "the headers after it would have been lost",
            )
            return False
        problem = framing_problem(headers.get_all("Content-Length", []), headers.get_all("Transfer-Encoding", []))
        if problem:
            self.send_error(HTTPStatus.BAD_REQUEST, problem)
            return False
        return True

    def make_environ(self):  # -> WSGIEnvironment
        environ = super().make_environ()
        if isinstance(environ["wsgi.input"], DechunkedInput):  # its decoder, replaced (ChunkedBody)
            environ["wsgi.input"] = ChunkedBody(self.rfile)
        return environ

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        short = self.responses.get(code, ("error", ""))[0]
        if self.request_version == "HTTP/0.9":  # a request line that was not read: answered with a status
            self.request_version = "HTTP/1.1"  # line and headers (HTTP/0.9's answer is the body alone)
            message = REQUEST_LINE_PROBLEMS.get(code) or message
        # an id as the app gives each request, to find the refusal in the log by; a client's
        # mistake, logged as a warning (http.server's own line was an error)
        request_id = uuid.uuid4().hex
        log.warning(
            "refused before the app: %d %s, request %s, from %s",
            code,
            message or short,
            request_id,
            self.client_address[0],
        )
        self.send_response(code, short)
        self.send_header("Connection", "close")
        self.send_header("X-Request-ID", request_id)
        body = b""
        if code >= 200 and code not in (HTTPStatus.NO_CONTENT, HTTPStatus.RESET_CONTENT, HTTPStatus.NOT_MODIFIED):
            error = {"code": "http_error", "message": (message or short)[:200]}
            body = json.dumps({"success": False, "error": error, "request_id": request_id}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", REFERRER_POLICY)
            self.send_header("Cache-Control", "no-store")  # as every JSON answer of the app's
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)


MAX_CHUNK_LINE = 4096  # bytes of a chunk's size line (its extensions included) or of a trailer line
MAX_TRAILER_LINES = 100


class ChunkedBody(io.RawIOBase):
    """A `Transfer-Encoding: chunked` request body, decoded strictly. werkzeug's own decoder (its
    dev server's, which `sonic serve` runs on) counted a chunk whose bytes stopped short as read
    whole, and handed the app the rest of its buffer unwritten: bytes of this process's memory,
    heard as loud noise through a live session's speak. Here a body that ends before its last
    chunk (or stalls past the socket's timeout) is ClientDisconnected (408 upload_incomplete),
    and malformed framing a 400 naming what is wrong."""

    def __init__(self, rfile: io.BufferedIOBase) -> None:
        self._rfile = rfile
        self._left = 0  # bytes of the current chunk not read yet
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # any writable buffer, as io's own
        view = memoryview(buf).cast("B")
        try:
            while not self._done and self._left == 0:
                self._left = self._size()
                if self._left == 0:
                    self._trailers()
                    self._done = True
            if self._done or not len(view):
                return 0
            n = self._rfile.readinto(view[: min(len(view), self._left)])
            if not n:
                raise ClientDisconnected("the chunked request body ended inside a chunk")
            self._left -= n
            if self._left == 0:
                self._chunk_end()
        except OSError as e:  # the socket's timeout, a reset
            raise ClientDisconnected("the chunked request body stopped arriving") from e
        return n

    def _line(self) -> bytes:
        line = self._rfile.readline(MAX_CHUNK_LINE + 1)
        if not line:
            raise ClientDisconnected("the chunked request body ended before its last (zero-size) chunk")
        if len(line) > MAX_CHUNK_LINE:
            raise BadRequest(f"the chunked request body has a line over {MAX_CHUNK_LINE} bytes in its framing")
        return line

    def _size(self) -> int:
        digits = self._line().split(b";", 1)[0].strip(b" \t\r\n")
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            raise BadRequest(
                f"the chunked request body is malformed: a chunk's size is {shown(digits[:20].decode('latin-1'))}, "
                "not a hexadecimal number"
            )
        if len(digits.lstrip(b"0")) > 15:  # past any body this server takes (2**60 bytes)
            raise BadRequest("the chunked request body is malformed: a chunk's size is past any body's")
        return int(digits, 16)

    def _chunk_end(self) -> None:
        end = self._rfile.readline(2)
        if end == b"\r":  # the body ended there, or an LF follows
            end += self._rfile.read(1)
        if end in (b"\r\n", b"\n"):
            return
        if end in (b"", b"\r"):
            raise ClientDisconnected("the chunked request body ended before its last (zero-size) chunk")
        raise BadRequest("the chunked request body is malformed: a chunk is longer than its size says")

    def _trailers(self) -> None:
        for _ in range(MAX_TRAILER_LINES):
            line = self._rfile.readline(MAX_CHUNK_LINE + 1)
            if line in (b"", b"\r\n", b"\n"):  # the end (a client that closes after the last chunk: as well)
                return
            if len(line) > MAX_CHUNK_LINE:
                raise BadRequest(f"the chunked request body has a trailer line over {MAX_CHUNK_LINE} bytes")
        raise BadRequest(f"the chunked request body has more than {MAX_TRAILER_LINES} trailer lines")


# what http.server says of a request line it cannot read, in the API's words (its own echo the
# line in Python's quotes)
REQUEST_LINE_PROBLEMS: dict[int, str] = {
    HTTPStatus.BAD_REQUEST: "the request line is not METHOD TARGET HTTP/1.1",
    HTTPStatus.HTTP_VERSION_NOT_SUPPORTED: "this server speaks HTTP/1.0 and HTTP/1.1",
}


def framing_problem(lengths: list[str], encodings: list[str]) -> str | None:
    """What makes a request's body length ambiguous (RFC 9112 6), from its Content-Length and
    Transfer-Encoding headers, or None."""
    codings = [c.strip().lower() for header in encodings for c in header.split(",") if c.strip()]
    if codings and lengths:
        return "the request has both Transfer-Encoding and Content-Length: send one"
    if codings and codings != ["chunked"]:
        named = ", ".join(codings)[:60]
        return f"Transfer-Encoding {named} is not supported: send the body chunked, or with a Content-Length"
    if len({v.strip() for v in lengths}) > 1:
        return "the request has more than one Content-Length, with different values"
    if lengths and not re.fullmatch(r"[0-9]+", lengths[0].strip()):
        return "Content-Length must be a whole number of bytes"
    if lengths and len(lengths[0].strip()) > 18:  # (a whole number, past any body this server reads)
        return "Content-Length is past any body this server takes"
    return None


BIND_PROBLEMS = {  # {port} and {host}: the options that choose them
    errno.EADDRINUSE: "another program uses that port: stop it, or choose another port with {port}",
    errno.EADDRNOTAVAIL: "this machine has no such address: choose another with {host}",
    errno.EACCES: "ports below 1024 need privileges: choose another with {port}",
}


class ThrottledAcceptServer(ThreadedWSGIServer):
    """werkzeug's threaded server, except out of file handles: its accept failed at once and its
    loop asked again at once, at 100 % CPU, answering nothing and logging nothing until some
    connections closed. It now waits ACCEPT_PAUSE_S before the next try, and says why (once a
    minute)."""

    told_at = -float("inf")
    port_option = "--port (SONIC_PORT)"  # what a failed bind tells to change
    host_option = "--host (SONIC_HOST)"

    def server_bind(self) -> None:
        """werkzeug printed the OS's words and exited; this says which setting to change. And
        the address is not looked up: http.server asks DNS for its name (socket.getfqdn), which
        nothing here uses, and on a machine no DNS server answers (an isolated network) the
        start waited out the resolver's timeouts, 10 s with Debian's defaults."""
        try:
            socketserver.TCPServer.server_bind(self)
        except OSError as e:
            problem = BIND_PROBLEMS.get(e.errno or 0)
            why = problem.format(port=self.port_option, host=self.host_option) if problem else e.strerror or str(e)
            raise SetupError(f"cannot listen on {self.host}:{self.port}: {why}") from e
        address = self.server_address  # (host, port, ...), or a unix:// socket's path
        if isinstance(address, tuple):
            self.server_name, self.server_port = str(address[0]), int(address[1])
        else:
            self.server_name, self.server_port = str(address), 0

    def get_request(self):
        try:
            return super().get_request()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE):
                now = time.monotonic()
                if now - self.told_at >= 60:
                    self.told_at = now
                    log.error(
                        "out of file handles (%s): new connections wait; raise the open-files limit (ulimit -n; "
                        "it is %d)",
                        os.strerror(e.errno),
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    )
                time.sleep(ACCEPT_PAUSE_S)
            raise


def short_reads_once_answered(app: Callable) -> Callable:
    """`app` for werkzeug's server, whose socket waits at most ANSWERED_READ_S for data once the
    answer's last byte is out. After answering, werkzeug reads what the client left unsent (so
    that a client still sending sees a 413, not a reset), in reads of up to 10 MB that wait for
    all of it: a client that had sent its whole over-limit form and waited for the answer held
    the connection and its thread for server.socket_timeout_s (18 such requests, 18 threads for
    30 s). Only after the last byte: a slow download's writes keep the full timeout."""

    def answered(environ: dict, start_response: Callable) -> Iterable[bytes]:
        body = app(environ, start_response)
        sock = environ.get("werkzeug.socket")
        return body if sock is None else _then(body, lambda: sock.settimeout(ANSWERED_READ_S))

    return answered


def _then(body: Iterable[bytes], after: Callable[[], None]) -> Iterator[bytes]:
    """The body's chunks, then `after()`; the body is closed when this is (WSGI's close), once.
    A loop, not `yield from`: closing a generator closes the iterable it delegates to as well,
    and the `finally` then closed it again (an event stream whose client left gave its slot
    back twice, and the server's cap on them stopped holding)."""
    try:
        for chunk in body:
            yield chunk
        after()
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()


class _AnsweredStall(logging.Filter):
    """After answering, werkzeug reads whatever the client left unsent; on a socket whose read
    already timed out (a stalled upload, answered 408 `upload_incomplete`) that read fails, and
    werkzeug would log a traceback for a request that was answered."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "cannot read from timed out object" not in record.getMessage()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--host",
        help="the address to listen on (setting server.host, SONIC_HOST; default 127.0.0.1; 0.0.0.0: every "
        "address; names it answers to beside IP addresses and localhost: SONIC_ALLOWED_HOSTS)",
    )
    ap.add_argument("--port", type=int, help="the port (setting server.port, SONIC_PORT; default 5000)")
    ap.add_argument(
        "--config", help="settings YAML over the shipped configs/default.yaml; SONIC_* variables override both"
    )
    ap.add_argument("--decoder", choices=("auto", "warp", "sonic"), help="the video decoder (default auto)")
    ap.add_argument("--checkpoints", metavar="DIR", help="the Sonic model's folder (docs/gpu.md)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the sonic decoder runs")


def serve(args: argparse.Namespace) -> None:
    configure_logging()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").addFilter(_AnsweredStall())
    try:
        settings = load_settings(
            args.config,
            flags={
                "server.host": args.host,
                "server.port": args.port,
                "decoder": args.decoder,
                "device": args.device,
                "sonic_checkpoints": args.checkpoints,
            },
        )
    except SettingsError as e:
        sys.exit(f"error: {e}")
    configure_logging(settings.server.log_format)
    check_host(settings, runs_here=not settings.server.redis_url)
    try:
        app = create_app(settings, background_load=True)  # answers /health while the models load
    except SonicError as e:  # the accounts database cannot be opened, ...
        sys.exit(f"error: {e.message}")

    in_flight = InFlight()

    class Handler(JsonErrorsHandler):
        # a client that stops sending (slow upload, idle keep-alive) is dropped after this long
        timeout = settings.server.socket_timeout_s

        def handle(self) -> None:
            # counted around the whole connection: an answer whose connection then fails (a stalled
            # upload answered 408, a reset) is never "closed" as a response, and would stay counted
            with in_flight:
                super().handle()

    try:
        server = ThrottledAcceptServer(
            settings.server.host, settings.server.port, short_reads_once_answered(app), Handler
        )
    except SonicError as e:  # the port is taken, the address is not this machine's
        sys.exit(f"error: {e.message}")
    stopped: list[int] = []
    drain_s = settings.server.drain_s

    def stop(signum: int, frame: object) -> None:
        """SIGTERM (docker stop, systemd): no new requests; those in flight may finish, for
        drain_s at most (a synchronous generate waiting for its video), then the process ends.
        A second signal ends the wait at once."""
        if stopped:
            raise SystemExit(128 + signum)
        log.warning(
            "SIGTERM: stopping; no new requests, %d in flight get up to %g s (server.drain_s); " + AFTER_THE_DRAIN,
            in_flight.count,
            drain_s,
        )
        stopped.append(signum)
        drain = app.extensions["sonic"].drain
        if drain is not None:  # a synchronous generate still waiting answers 202 before the drain ends
            drain.mark_stopping()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    # werkzeug's own line is quiet here (its logger logs warnings only): say where to connect
    log.info("listening on http://%s:%d", settings.server.host, settings.server.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:  # ^C, SIGTERM: live sessions end (server_stopping), their credit settled and their helpers stopped
        server.server_close()  # new connections are refused from here
        try:
            if stopped and not in_flight.wait(drain_s):
                log.warning(
                    "SIGTERM: %d connection(s) still open after %g s: stopping anyway", in_flight.count, drain_s
                )
        except KeyboardInterrupt:
            pass
        finally:
            svc = app.extensions["sonic"]
            if svc.queue is not None:  # a render still running stops first: an exit under it aborts
                svc.queue.close(wait_s=EXIT_WAIT_S)
            if svc.live is not None:
                svc.live.close()
    if stopped:
        sys.exit(128 + stopped[0])


def main(argv: list[str] | None = None, prog: str = "python app.py") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__)
    add_arguments(ap)
    serve(ap.parse_args(argv))
