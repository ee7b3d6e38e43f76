"""The names this service answers to (server.allowed_hosts): a defence against DNS rebinding.

A page of another site can point its own name at 127.0.0.1 (or a LAN address) once its browser
has loaded it, and then call this server as its own origin: the browser sends
`Host: evil.example:5000`, CORS does not apply (same origin), and a keyless server's job list,
videos and DELETEs were the page's. The one thing such a request cannot hide is the name it was
sent to. So a request must name this server by an IP address, by `localhost` (or a name under
`.localhost`, which browsers keep on this machine), by server.public_url's host, or by a name
listed in server.allowed_hosts (`*`: any). That holds wherever the server listens: a container
listens on 0.0.0.0 and is still browsed at localhost on a laptop, where the page's name can be
pointed. Ports are not compared: a name is allowed on any port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from .settings import HOST

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
    def of(cls, listed: tuple[str, ...], public_url: str | None) -> HostNames:
        """From the settings: `listed` (server.allowed_hosts) and server.public_url."""
        entries = [normal_name(e) for e in listed if e != ANY]
        names = {e for e in entries if not e.startswith(".")}
        if public_url and urlsplit(public_url).hostname:
            names.add(normal_name(urlsplit(public_url).hostname or ""))
        return cls(ANY in listed, frozenset(names), tuple(e for e in entries if e.startswith(".")))

    def answers(self, host: str) -> bool:
        """Whether a request whose Host (a well-formed one: `well_formed`) is `host` is answered."""
        if self.any_name or host.startswith("["):  # an IPv6 address
            return True
        name = name_of(host)
        if name == "localhost" or name.endswith(".localhost") or _is_address(name):
            return True
        return name in self.names or any(name == d[1:] or name.endswith(d) for d in self.domains)


MALFORMED_HOST = "the Host header must be a host name or address, with a port or not"


def refused_status(host: str, names: HostNames) -> int | None:
    """Why a request naming `host` is not answered, as its status: 400 for a Host that is no
    host (and port), 403 for a name this server does not answer to; None for one it answers."""
    if not well_formed(host):
        return 400
    return None if names.answers(host) else 403


def well_formed(host: str) -> bool:
    """A Host as RFC 9110 7.2 has it: a name or an address (IPv6 in brackets, and an IPv6
    address there), then a port or not, 1-65535. The answer's URLs are built on it (a port past
    them made its URLs http:///...)."""
    parts = HOST.fullmatch(host)
    if not parts or (parts.group(2) and not 1 <= int(parts.group(2)[1:]) <= 65535):
        return False
    if not host.startswith("["):
        return True
    try:
        ipaddress.IPv6Address(host[1 : host.index("]")])
    except ValueError:  # [bad], [dead:beef]: URLs on them were http:///...
        return False
    return True


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
