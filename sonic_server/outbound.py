"""Requests this service makes to addresses its callers name (webhooks; later, inputs by URL).

A caller's URL must not turn the server into a way into its own network: only http and https,
and by default no loopback, private, link-local (the cloud metadata address 169.254.169.254
among them), shared, reserved or multicast address, judged on the addresses the name resolves
to (`Reach`: `outbound.allow_networks` opens the blocks it names, a receiver on a private
network; `outbound.allow_private` opens them all, for tests; the cloud metadata services stay
closed whatever is set). The connection goes to the address that was checked (the name is not resolved a
second time, which a rebinding DNS could answer differently), redirects are not followed, and
every request has a connect and a total time limit.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, quote, unquote, urljoin, urlsplit

from sonic.errors import Busy, InvalidParameter

if TYPE_CHECKING:
    from .settings import OutboundSettings

MAX_URL_CHARS = 2048
RESOLVE_S = 5.0  # a name slower to resolve is refused (the system's resolver retries for 30 s and more)
RESOLVERS = 32  # lookups running at once (a stuck one holds its thread until the resolver gives up)
_resolving = threading.BoundedSemaphore(RESOLVERS)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`) and what to ask for there."""

    url: str
    scheme: str
    host: str  # the name, for Host and TLS
    port: int
    path: str  # path and query
    address: str  # the resolved address that was checked
    authorization: str | None = None  # HTTP Basic, from the URL's user:password (never sent in clear elsewhere)

    def headers(self, given: dict[str, str]) -> dict[str, str]:
        """`given`, with the URL's credentials as an Authorization header (a receiver behind
        Basic auth is named as https://user:password@host/...)."""
        if self.authorization is None or any(name.lower() == "authorization" for name in given):
            return given
        return {**given, "Authorization": self.authorization}


def without_credentials(params: dict) -> dict:
    """`params` as a log may show them: a URL (a webhook's, an input's) as far as its host, its
    user:password replaced by ***. Its path and query go too: a hooks service's path is the
    receiver's token, a presigned URL's query its signature, and some receivers take an
    `api_token=` there."""
    return {name: _loggable(value) if isinstance(value, str) else value for name, value in params.items()}


def _loggable(value: str) -> str:
    return _PAST_HOST.sub(r"\1/...", _USERINFO.sub("://***@", value))


URL_SAFE = "/%:@!$&'()*+,;=~-._?"  # left as they are by the encoding above: a URL's own delimiters and escapes
# anywhere in the value, tabs and newlines allowed in "://": a URL's parser drops those and leading
# spaces, so " https://u:p@host" and "https:/\t/u:p@host" are fetched with the password too
_USERINFO = re.compile(r":[\t\r\n]*/[\t\r\n]*/[^/?#]*@")
_PAST_HOST = re.compile(r"(:[\t\r\n]*/[\t\r\n]*/[^/?#]*)[/?#].*", re.DOTALL)  # what follows a URL's host


def basic_authorization(parts: SplitResult) -> str | None:
    """The Authorization header for a URL's user:password (percent-decoded, as browsers and curl
    read them); None without them."""
    if parts.username is None:
        return None
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
V4_COMPATIBLE = ipaddress.ip_network("::/96")
V4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT (RFC 2765): ::ffff:0:a.b.c.d

# Every block of IANA's IPv4 and IPv6 special-purpose address registries, whether or not the
# registry calls it globally reachable: Python's `is_global` follows the registry's flag and so
# passes anycast and protocol blocks (192.0.0.0/24 outside /29, 192.88.99.0/24, AS112, AMT,
# 3fff::/20, 5f00::/16) that a request from this server has no business reaching.
NOT_PUBLIC = tuple(
    ipaddress.ip_network(block)
    for block in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.31.196.0/24", "192.52.193.0/24", "192.88.99.0/24",
        "192.168.0.0/16", "192.175.48.0/24", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
        "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "2001::/23", "2001:db8::/32",
        "2620:4f:8000::/48", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, translated, 6to4, Teredo, NAT64,
    IPv4-compatible): the rules apply to it, since that is where a translating network sends
    the request."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in NAT64) or ip in V4_TRANSLATED or (ip in V4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is one on the public internet: in no special-purpose block (loopback,
    private, link-local, shared, documentation, protocol, anycast, reserved, multicast), nor an
    IPv6 address that carries an IPv4 one that is."""
    if any(ip.version == net.version and ip in net for net in NOT_PUBLIC):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            return is_public(inner)
    return ip.is_global


# never sent to, whatever is opened: link-local (where every cloud's metadata service and its
# credential agents live: 169.254.169.254, ECS's .170.2, EKS's .170.23, Tencent's .0.23) and the
# metadata services elsewhere (Alibaba, Azure's WireServer, AWS's, GCP's and Oracle's over IPv6),
# and RFC 6052's local-use NAT64 prefix, which may carry any of them where the IPv4 address does
# not sit in the last 32 bits
NEVER = tuple(
    ipaddress.ip_network(block)
    for block in (
        "169.254.0.0/16", "100.100.100.200/32", "168.63.129.16/32",
        "fe80::/10", "fd00:ec2::/64", "fd20:ce::254/128", "fd00:c1::a9fe:a9fe/128", "64:ff9b:1::/48",
    )
)  # fmt: skip


@dataclass(frozen=True)
class Reach:
    """Where this server may send the requests its callers name: public addresses; those in
    `networks` too (outbound.allow_networks); with `private` (outbound.allow_private) every
    address but NEVER's. An operator who opened private addresses for one receiver had opened
    the cloud metadata service to every caller's webhook and image_url."""

    private: bool = False
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def of(cls, outbound: OutboundSettings) -> Reach:
        """From the `outbound` settings."""
        networks = tuple(ipaddress.ip_network(n, strict=False) for n in outbound.allow_networks)
        return cls(outbound.allow_private, networks)

    def allows(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if never(ip):
            return False
        if self.private or is_public(ip):
            return True
        return _in_any(ip, self.networks)  # an IPv6 form of an opened IPv4 address is opened with it


def never(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address no setting opens (NEVER), or an IPv6 one carrying such an IPv4 address."""
    return _in_any(ip, NEVER)


def _in_any(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, networks) -> bool:
    """Whether the address, or the IPv4 address an IPv6 one carries (it goes where that one
    does), lies in one of `networks`."""
    inner = _embedded_v4(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    return any(a.version == net.version and a in net for a in (ip, inner) if a is not None for net in networks)


def check_url(url: str, field: str, reach: Reach, resolve_s: float | None = None) -> Target:
    """The URL checked and resolved (within resolve_s, default RESOLVE_S); InvalidParameter
    naming `field` and the cause otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidParameter(f"{field} must be an http(s) URL of at most {MAX_URL_CHARS} characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidParameter(f"{field} is not a URL", field=field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameter(f"{field} must be an http or https URL with a host", field=field)
    try:
        host = parts.hostname.encode("idna").decode("ascii")  # a name in any script, as DNS and TLS take it
    except UnicodeError:
        raise InvalidParameter(f"{field}: the host is not a valid name", field=field) from None
    if port == 0:
        raise InvalidParameter(f"{field}: port 0 is not a port", field=field)
    port = port or (443 if parts.scheme == "https" else 80)
    infos = _resolved(host, port, field, RESOLVE_S if resolve_s is None else resolve_s)
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if never(ip):
            raise InvalidParameter(
                f"{field}: {host[:100]} is a link-local or cloud metadata address ({address}); this server "
                "does not send requests there, whatever its settings",
                field=field,
            )
        if not reach.allows(ip):
            raise InvalidParameter(
                f"{field}: {host[:100]} is a loopback, private or otherwise non-public address "
                f"({address}); this server does not send requests there (outbound.allow_networks)",
                field=field,
            )
    # a path or query in any script is sent percent-encoded, as a browser sends it (http.client
    # takes ASCII only: a webhook to /hoök failed at every attempt, an image_url answered 500)
    path = quote(parts.path or "/", safe=URL_SAFE) + (f"?{quote(parts.query, safe=URL_SAFE)}" if parts.query else "")
    return Target(
        url=url,
        scheme=parts.scheme,
        host=host,
        port=port,
        path=path,
        address=addresses[0],
        authorization=basic_authorization(parts),
    )


def _resolved(host: str, port: int, field: str, within_s: float) -> list:
    """getaddrinfo's answer for host:port, within within_s. The system's resolver cannot be
    told a deadline (with its retries it may take 30 s and more), so each lookup runs in a
    thread of its own that nobody waits for beyond within_s (a daemon: a stuck lookup delays
    no exit). At most RESOLVERS run at once, stuck ones included: one more is `busy` at once."""
    if within_s <= 0:
        raise InvalidParameter(f"{field}: the host {host[:100]!r} did not resolve in time", field=field)
    slots = _resolving  # released by the lookup's thread, whenever it ends
    if not slots.acquire(blocking=False):
        raise Busy(f"{RESOLVERS} host names are being resolved at once, the most this server allows; retry shortly")
    answer: list = []
    done = threading.Event()

    def look_up() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            answer.append(e)
        finally:
            slots.release()
            done.set()

    try:
        threading.Thread(target=look_up, name="sonic-resolve", daemon=True).start()
    except RuntimeError:  # no thread to be had
        slots.release()
        raise Busy("no thread is free to resolve a host name; retry shortly") from None
    if not done.wait(within_s):
        raise InvalidParameter(f"{field}: the host {host[:100]!r} did not resolve within {within_s:.3g} s", field=field)
    if isinstance(answer[0], BaseException):
        raise InvalidParameter(f"{field}: the host {host[:100]!r} does not resolve", field=field)
    return answer[0]


def _connected(address: str, port: int, connect_s: float, read_s: float) -> socket.socket:
    """A socket connected within connect_s, whose reads then wait up to read_s each (a receiver
    that takes 8 s to answer is within a 15 s whole; its Deadline bounds the whole)."""
    sock = socket.create_connection((address, port), connect_s)
    sock.settimeout(read_s)
    return sock


class _Pinned(http.client.HTTPConnection):
    """A connection to the checked address, speaking to the named host (Host header)."""

    def __init__(self, target: Target, connect_s: float, read_s: float) -> None:
        super().__init__(target.host, target.port, timeout=read_s)
        self.address, self.connect_s, self.read_s = target.address, connect_s, read_s

    def connect(self) -> None:
        self.sock = self.held = _connected(self.address, self.port, self.connect_s, self.read_s)


class _PinnedTLS(http.client.HTTPSConnection):
    """The same over TLS: the certificate is checked against the name, not the address."""

    def __init__(self, target: Target, connect_s: float, read_s: float) -> None:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
        super().__init__(target.host, target.port, timeout=read_s, context=context)
        self.address, self.connect_s, self.read_s = target.address, connect_s, read_s
        self._tls = context

    def connect(self) -> None:
        raw = _connected(self.address, self.port, self.connect_s, self.read_s)
        # held before the handshake: a server that drips its handshake is cut off at the deadline too
        self.sock = self.held = self._tls.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        self.sock.do_handshake()


class Deadline:
    """Shuts the connection's socket when `seconds` have passed, whatever it is waiting for (a
    server sending its headers or body a byte at a time never outlasts it)."""

    def __init__(self, conn: http.client.HTTPConnection, seconds: float) -> None:
        self.conn, self.passed = conn, False
        self._timer = threading.Timer(max(0.0, seconds), self._shut)
        self._timer.daemon = True
        self._timer.start()

    def _shut(self) -> None:
        self.passed = True
        sock = getattr(self.conn, "held", None)  # kept: http.client lets go of `sock` once a response reads to the end
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cancel(self) -> None:
        self._timer.cancel()


def _connection(target: Target, connect_s: float, total_s: float) -> http.client.HTTPConnection:
    """A connection made within connect_s, each of its reads within total_s (a Deadline bounds
    them all together)."""
    kind = _PinnedTLS if target.scheme == "https" else _Pinned
    return kind(target, min(connect_s, total_s), total_s)


def post(target: Target, body: bytes, headers: dict[str, str], connect_s: float = 5.0, total_s: float = 15.0) -> int:
    """POST to the checked address (no redirect followed), all within total_s; the response's
    status (its body is not read beyond 4 kB). Raises OSError (http.client's errors among them)
    when nothing answers in time."""
    conn = _connection(target, connect_s, total_s)
    deadline = Deadline(conn, total_s)
    try:
        conn.request("POST", target.path, body=body, headers=target.headers(headers))
        resp = conn.getresponse()
        resp.read(4096)
        if deadline.passed:  # headers dripped past total_s: cut off, which reads as their end
            raise OSError("timed out")
        return int(resp.status)
    except (OSError, http.client.HTTPException) as e:
        raise OSError("timed out" if deadline.passed else f"{type(e).__name__}: {e}") from None
    finally:
        deadline.cancel()
        conn.close()


MAX_REDIRECTS = 3


def same_origin_credentials(target: Target, previous: Target | None) -> Target:
    """A redirect's target, with the credentials the URL before it carried where it names the
    same scheme, host and port and none of its own (as browsers and curl do); never another
    host's."""
    if target.authorization is not None or previous is None or previous.authorization is None:
        return target
    if (target.scheme, target.host, target.port) != (previous.scheme, previous.host, previous.port):
        return target
    return dataclasses.replace(target, authorization=previous.authorization)


class FetchFailed(InvalidParameter):
    """A caller-named URL could not be read: unreachable, timed out, an error status."""


def fetch(
    url: str,
    field: str,
    reach: Reach,
    max_bytes: int,
    connect_s: float = 5.0,
    total_s: float = 30.0,
    check: Callable[..., Target] = check_url,
    ends: float | None = None,
) -> bytes:
    """GET a caller-named URL's body: each hop checked (redirects followed at most MAX_REDIRECTS
    times, each to a checked address), the size capped while it streams, the whole fetch within
    total_s, or by `ends` (time.monotonic()) where several fetches share those seconds, each
    hop's name resolved within them too. Errors name `field` and the cause. (`check`: the
    address rules, each hop's, as check_url's.)"""
    from sonic.errors import InputTooLarge

    ends = time.monotonic() + total_s if ends is None else ends
    previous: Target | None = None
    for _ in range(MAX_REDIRECTS + 1):
        target = same_origin_credentials(
            check(url, field, reach, resolve_s=min(RESOLVE_S, ends - time.monotonic())), previous
        )
        previous = target
        left = ends - time.monotonic()
        if left <= 0:
            raise FetchFailed(f"{field}: {target.host[:100]} took longer than {total_s:g} s", field=field)
        conn = _connection(target, connect_s, left)
        deadline = Deadline(conn, left)
        try:
            asked = target.headers({"User-Agent": "sonic", "Accept-Encoding": "identity"})
            conn.request("GET", target.path, headers=asked)
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status in (301, 302, 303, 307, 308) and location:
                url = urljoin(url, location)
                continue
            if not 200 <= resp.status < 300:
                raise FetchFailed(f"{field}: {target.host[:100]} answered HTTP {resp.status}", field=field)
            encoding = (resp.getheader("Content-Encoding") or "identity").strip().lower()
            if encoding not in ("", "identity"):  # asked for as it is; never unpacked here (a small
                # gzip may hold gigabytes), and read as it came ffmpeg named it a game-music format
                why = f"{field}: {target.host[:100]} sent the file compressed ({encoding[:20]}); serve it as it is"
                raise FetchFailed(why, field=field)
            length = resp.getheader("Content-Length")
            too_large = InputTooLarge(f"{field}: the file is larger than {max_bytes / 1024 / 1024:g} MB", field=field)
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise too_large
            chunks, size = [], 0
            while chunk := resp.read1(64 * 1024):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large
                chunks.append(chunk)
            if deadline.passed:
                raise OSError("timed out")
            if not size:
                raise FetchFailed(f"{field}: {target.host[:100]} sent an empty file", field=field)
            return b"".join(chunks)
        except (OSError, http.client.HTTPException) as e:
            if deadline.passed or isinstance(e, TimeoutError):
                raise FetchFailed(f"{field}: {target.host[:100]} took longer than {total_s:g} s", field=field) from None
            why = f"{field}: {target.host[:100]} is unreachable ({type(e).__name__})"
            raise FetchFailed(why, field=field) from None
        finally:
            deadline.cancel()
            conn.close()
    raise FetchFailed(f"{field}: more than {MAX_REDIRECTS} redirects", field=field)
