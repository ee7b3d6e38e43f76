"""Which of a client's ICE candidates the server sends to.

An offer's candidates are addresses the server's ICE agent sends connectivity checks to, from
the moment the session opens, before anyone has proved they own them. Taken as they come, an
offer could make the server probe its own private network (another machine's ports, the cloud
metadata address) or send a stranger's address hundreds of packets (an offer of 100 kB holds
some 800 candidates). So, before the offer is answered, each media section keeps at most
`MAX_CANDIDATES` candidates, and only those at:
- a public address (what a client across the internet offers: its NAT's or a TURN relay's);
- the client's own address (a client on the same network offers its host address);
- any address of this machine when the client is on it (it connects over loopback);
- a configured STUN or TURN server's address (a relay in a private network), or a network named
  in `live.peer_networks` (private deployments);
- an mDNS name (`*.local`, how browsers hide their host address) when the client itself is not
  on a public address: such a name resolves on the server's own link only.

A candidate left out costs nothing when the client is genuine: its checks reach the server's own
candidates, which teaches the server the address they came from (a peer-reflexive candidate,
proved by the session's ICE password).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..outbound import is_public

MAX_CANDIDATES = 20  # per media section: a browser with a few interfaces and a TURN server offers ~10
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerPolicy:
    """Where candidates may point, besides public addresses and the client's own."""

    networks: tuple[Network, ...] = ()  # live.peer_networks
    servers: tuple[str, ...] = ()  # live.ice_servers (URLs): their hosts' addresses are allowed too

    @classmethod
    def from_settings(cls, peer_networks: Sequence[str], ice_servers: Sequence[str]) -> PeerPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in peer_networks), tuple(ice_servers))


@dataclass(frozen=True)
class Screened:
    """The offer's SDP with the candidates kept, and the addresses of those left out."""

    sdp: str
    left_out: tuple[str, ...]

    def warning(self) -> str:
        """What the 201 tells the client about the candidates left out."""
        shown = ", ".join(self.left_out[:5]) + (f" and {len(self.left_out) - 5} more" if len(self.left_out) > 5 else "")
        return (
            f"offer: ICE candidates left out ({shown}): this server sends only to public addresses, the "
            f"client's own and live.peer_networks, at most {MAX_CANDIDATES} per media section"
        )


def screen_offer(sdp: str, client: str | None, policy: PeerPolicy) -> Screened:
    """The SDP with only the candidates the server may send to (see the module's docstring);
    `client` is the HTTP client's address (after `server.proxy_hops`)."""
    allowed = _Allowed(_address(client), policy)
    lines, left_out, kept = [], [], 0
    # lines as aiortc reads them (str.splitlines: any line break, not only CRLF)
    for line in sdp.splitlines():
        if line.startswith("m="):
            kept = 0
        elif line.startswith("a=candidate:"):
            host = _candidate_host(line)
            if host is None or not allowed(host) or kept >= MAX_CANDIDATES:
                left_out.append(host or line[:60])
                continue
            kept += 1
        lines.append(line)
    return Screened("".join(line + "\r\n" for line in lines), tuple(dict.fromkeys(left_out)))


def _candidate_host(line: str) -> str | None:
    """The address (or name) of an `a=candidate:` line: foundation, component, transport,
    priority, address, port, "typ", type, ...; None for a line too short to be one."""
    parts = line.split()
    return parts[4] if len(parts) >= 8 and parts[6] == "typ" else None


def _address(text: str | None) -> IPAddress | None:
    try:
        return ipaddress.ip_address((text or "").split("%")[0])
    except ValueError:
        return None


class _Allowed:
    """The rules of the module's docstring, for one client."""

    def __init__(self, client: IPAddress | None, policy: PeerPolicy) -> None:
        self.client, self.policy = client, policy
        self.local_client = client is not None and client.is_loopback

    def __call__(self, host: str) -> bool:
        if host.lower().endswith(".local"):
            return self.client is not None and not is_public(self.client)
        ip = _address(host)
        if ip is None:  # a DNS name: the server would resolve whatever a caller names
            return False
        if is_public(ip) or ip == self.client or any(ip in n for n in self.policy.networks):
            return True
        if self.local_client and (ip.is_loopback or str(ip) in _own_addresses()):
            return True
        return str(ip) in _server_addresses(self.policy.servers)


@functools.cache
def _own_addresses() -> frozenset[str]:
    """This machine's addresses, every interface (what aioice would gather on)."""
    import aioice.ice

    get = getattr(aioice.ice, "_sonic_original_get_host_addresses", aioice.ice.get_host_addresses)
    return frozenset(get(use_ipv4=True, use_ipv6=True))


@functools.cache
def _server_addresses(urls: tuple[str, ...]) -> frozenset[str]:
    """The addresses of the configured STUN/TURN servers' hosts (resolved once)."""
    found: set[str] = set()
    for url in urls:
        rest = url.split(":", 1)[1].rsplit("@", 1)[-1].split("?")[0]  # [user:password@]host[:port][?transport=]
        host = rest[1 : rest.find("]")] if rest.startswith("[") else rest.split(":")[0]
        try:
            found.update(str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None))
        except (socket.gaierror, UnicodeError):
            continue
    return frozenset(found)
