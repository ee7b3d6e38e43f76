"""Requests this service makes to addresses its callers name (webhooks; later, inputs by URL).

A caller's URL must not turn the server into a way into its own network: only http and https,
and by default no loopback, private, link-local (the cloud metadata address 169.254.169.254
among them), shared, reserved or multicast address, judged on the addresses the name resolves
to (`outbound.allow_private`, SONIC_OUTBOUND_ALLOW_PRIVATE=1, opens them: tests, private
deployments). The connection goes to the address that was checked (the name is not resolved a
second time, which a rebinding DNS could answer differently), redirects are not followed, and
every request has a connect and a total time limit.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3

from sonic.errors import InvalidParameter

MAX_URL_CHARS = 2048


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`) and what to ask for there."""

    url: str
    scheme: str
    host: str  # the name, for Host and TLS
    port: int
    path: str  # path and query
    address: str  # the resolved address that was checked


def _refused(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_url(url: str, field: str, allow_private: bool) -> Target:
    """The URL checked and resolved; InvalidParameter naming `field` and the cause otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidParameter(f"{field} must be an http(s) URL of at most {MAX_URL_CHARS} characters", field=field)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidParameter(f"{field} is not a URL", field=field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidParameter(f"{field} must be an http or https URL with a host", field=field)
    host = parts.hostname
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidParameter(f"{field}: the host {host[:100]!r} does not resolve", field=field) from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not allow_private:
        for address in addresses:
            if _refused(ipaddress.ip_address(address)):
                raise InvalidParameter(
                    f"{field}: {host[:100]} is a loopback, private, link-local or otherwise non-public address "
                    f"({address}); this server does not send requests there (outbound.allow_private)",
                    field=field,
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url=url, scheme=parts.scheme, host=host, port=port, path=path, address=addresses[0])


def _pool(target: Target, timeout: urllib3.Timeout) -> urllib3.HTTPConnectionPool:
    """A one-connection pool to the checked address; TLS checks the name, not the address."""
    if target.scheme == "https":
        import certifi

        return urllib3.HTTPSConnectionPool(
            target.address,
            port=target.port,
            timeout=timeout,
            retries=False,
            maxsize=1,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            ca_certs=certifi.where(),
        )
    return urllib3.HTTPConnectionPool(target.address, port=target.port, timeout=timeout, retries=False, maxsize=1)


def _host_header(target: Target) -> dict[str, str]:
    host = target.host if ":" not in target.host else f"[{target.host}]"
    if target.port != (443 if target.scheme == "https" else 80):
        host += f":{target.port}"
    return {"Host": host}


def post(target: Target, body: bytes, headers: dict[str, str], connect_s: float = 5.0, total_s: float = 15.0) -> int:
    """POST to the checked address (no redirect followed); the response's status. Raises
    urllib3's errors when nothing answers."""
    pool = _pool(target, urllib3.Timeout(connect=connect_s, total=total_s))
    try:
        sent = {**headers, **_host_header(target)}
        resp = pool.request("POST", target.path, body=body, headers=sent, redirect=False, preload_content=True)
        return int(resp.status)
    finally:
        pool.close()


MAX_REDIRECTS = 3


class FetchFailed(InvalidParameter):
    """A caller-named URL could not be read: unreachable, timed out, an error status."""


def fetch(
    url: str,
    field: str,
    allow_private: bool,
    max_bytes: int,
    connect_s: float = 5.0,
    total_s: float = 30.0,
    check: Callable[[str, str, bool], Target] = check_url,
) -> bytes:
    """GET a caller-named URL's body: each hop checked (redirects followed at most MAX_REDIRECTS
    times, each to a checked address), the size capped while it streams, the whole fetch within
    total_s. Errors name `field` and the cause. (`check`: the address rules, each hop's.)"""
    from sonic.errors import InputTooLarge

    deadline = time.monotonic() + total_s
    for _ in range(MAX_REDIRECTS + 1):
        target = check(url, field, allow_private)
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed(f"{field}: {target.host[:100]} took longer than {total_s:g} s", field=field)
        pool = _pool(target, urllib3.Timeout(connect=min(connect_s, left), read=left))
        try:
            resp = pool.request("GET", target.path, headers=_host_header(target), redirect=False, preload_content=False)
            if resp.status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                resp.release_conn()
                continue
            if not 200 <= resp.status < 300:
                raise FetchFailed(f"{field}: {target.host[:100]} answered HTTP {resp.status}", field=field)
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise InputTooLarge(f"{field}: the file is larger than {max_bytes // 1_000_000} MB", field=field)
            chunks, size = [], 0
            while chunk := resp.read1(64 * 1024):  # one receive at a time: a slow drip meets the deadline
                size += len(chunk)
                if size > max_bytes:
                    raise InputTooLarge(f"{field}: the file is larger than {max_bytes // 1_000_000} MB", field=field)
                if time.monotonic() > deadline:
                    raise FetchFailed(f"{field}: {target.host[:100]} took longer than {total_s:g} s", field=field)
                chunks.append(chunk)
            if not size:
                raise FetchFailed(f"{field}: {target.host[:100]} sent an empty file", field=field)
            return b"".join(chunks)
        except (urllib3.exceptions.TimeoutError, urllib3.exceptions.ReadTimeoutError):
            raise FetchFailed(f"{field}: {target.host[:100]} did not answer in time", field=field) from None
        except urllib3.exceptions.HTTPError as e:
            raise FetchFailed(
                f"{field}: {target.host[:100]} is unreachable ({type(e).__name__})", field=field
            ) from None
        finally:
            pool.close()
    raise FetchFailed(f"{field}: more than {MAX_REDIRECTS} redirects", field=field)
