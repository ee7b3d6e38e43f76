"""The names this service answers to (server.allowed_hosts): a defence against DNS rebinding.

A page of another site can point its own name at 127.0.0.1 (or a LAN address) once its browser
has loaded it, and then call this server as its own origin: the browser sends
`Host: evil.example:5000`, CORS does not apply (same origin), and a keyless server's job list,
videos and DELETEs were the page's. The one thing such a request cannot hide is the name it was
sent to. So a request must name this server by an IP address, by `localhost` (or a name under
`.localhost`, which browsers keep on this machine), by server.public_url's host, or by a name
listed in server.allowed_hosts. Listening on a loopback address with nothing listed (the
default), that is all; listening on another address (0.0.0.0 in the Dockerfile) with nothing
listed, any name is answered, as clients on other machines reach it by names this process cannot
know. Ports are not compared: a name is allowed on any port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

ANY = "*"
# the WSGI environ key under which server.public_url's rewrite keeps the Host the client named
SENT_HOST = "sonic.sent_host"


@dataclass(frozen=True)
class HostNames:
    """Which Host values are answered: `any_name`, or these names and the domains' names."""

    any_name: bool
    names: frozenset[str]  # exact names, lower case, no trailing dot
    domains: tuple[str, ...]  # ".example.com": that name and every name under it

    @classmethod
    def of(cls, listed: tuple[str, ...], listen_host: str, public_url: str | None) -> HostNames:
        """From the settings: `listed` (server.allowed_hosts), the address the server listens on
        (server.host) and server.public_url."""
        entries = [normal_name(e) for e in listed if e != ANY]
        names = {e for e in entries if not e.startswith(".")}
        if public_url and urlsplit(public_url).hostname:
            names.add(normal_name(urlsplit(public_url).hostname or ""))
        any_name = ANY in listed or (not listed and not _is_loopback(listen_host))
        return cls(any_name, frozenset(names), tuple(e for e in entries if e.startswith(".")))

    def answers(self, host: str) -> bool:
        """Whether a request whose Host (a well-formed one: settings.HOST) is `host` is answered."""
        if self.any_name or host.startswith("["):  # an IPv6 address
            return True
        name = name_of(host)
        if name == "localhost" or name.endswith(".localhost") or _is_address(name):
            return True
        return name in self.names or any(name == d[1:] or name.endswith(d) for d in self.domains)


def name_of(host: str) -> str:
    """The name of a well-formed Host that is not an IPv6 address, without its port, as compared."""
    return normal_name(host.rpartition(":")[0] if ":" in host else host)


def normal_name(name: str) -> str:
    """A host name as compared: lower case, without the trailing dot of a fully qualified name."""
    return name.lower().rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(listen_host: str) -> bool:
    """server.host: 127.0.0.0/8, ::1 or localhost. Any other name or address may be reached from
    other machines."""
    if normal_name(listen_host) == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen_host.strip("[]")).is_loopback
    except ValueError:
        return False
