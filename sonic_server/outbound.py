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
from dataclasses import dataclass
from urllib.parse import urlsplit

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


def post(target: Target, body: bytes, headers: dict[str, str], connect_s: float = 5.0, total_s: float = 15.0) -> int:
    """POST to the checked address (no redirect followed); the response's status. Raises
    OSError-like errors (urllib3's) when nothing answers."""
    import urllib3

    timeout = urllib3.Timeout(connect=connect_s, total=total_s)
    pool: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        import certifi

        pool = urllib3.HTTPSConnectionPool(
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
    else:
        pool = urllib3.HTTPConnectionPool(target.address, port=target.port, timeout=timeout, retries=False, maxsize=1)
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    default_port = 443 if target.scheme == "https" else 80
    if target.port != default_port:
        host_header += f":{target.port}"
    try:
        resp = pool.request(
            "POST",
            target.path,
            body=body,
            headers={**headers, "Host": host_header},
            redirect=False,
            preload_content=True,
        )
        return int(resp.status)
    finally:
        pool.close()
