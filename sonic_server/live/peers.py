"""Which of a client's ICE candidates the server sends to.

An offer's candidates are addresses the server's ICE agent sends connectivity checks to, from
the moment the session opens, before anyone has proved they own them. Taken as they come, an
offer could make the server probe its own private network (another machine's ports, the cloud
metadata address) or send a stranger's address hundreds of packets (an offer of 100 kB holds
some 800 candidates). So, before the offer is answered, each media section keeps at most
`MAX_CANDIDATES` UDP candidates (the server's are UDP only), and only those at:
- a public address (what a client across the internet offers: its NAT's or a TURN relay's);
- the client's own address, unless loopback (a client on the same network offers its host
  address);
- loopback or any address of this machine, for a client on it (its connection and the address
  it is seen at are both loopback: one through a proxy that is not declared is not), where
  sessions run in this process and `live.host_addresses` names a loopback address (the only
  set-up that serves such clients: aioice gathers no loopback candidate otherwise);
- a network named in `live.peer_networks` (private deployments), or, for relay candidates, a
  configured TURN server's address (a relay inside a private network).
Never an mDNS name (`*.local`, how browsers hide their host address): aioice would resolve it
on the server's own link and send to whatever answered, unchecked. Nor an IPv6 address with a
zone (`%eth1`): it picks the server's interface.

A candidate left out costs a genuine client nothing: its own checks reach the server's
candidates, which teaches the server the address they came from (a peer-reflexive candidate,
proved by the session's ICE password). For that the section's `a=end-of-candidates` goes too,
where a candidate was left out: with it and no candidate left, aioice gives up at once.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from ..outbound import is_public
from .ice import TURN_SCHEMES, written_credentials

MAX_CANDIDATES = 20  # per media section: a browser with a few interfaces and a TURN server offers ~10
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PeerPolicy:
    """Where candidates may point, besides public addresses and the client's own."""

    networks: tuple[Network, ...] = ()  # live.peer_networks
    turn_servers: tuple[str, ...] = ()  # their hosts' addresses are allowed for relay candidates
    local_clients: bool = False  # clients on this machine may name its addresses (see from_settings)

    @classmethod
    def from_settings(
        cls, peer_networks: Sequence[str], ice_servers: Sequence[str], host_addresses: Sequence[str], here: bool
    ) -> PeerPolicy:
        """`here`: the sessions run in this process (not on workers, whose machine is another).
        Clients on this machine are served only where `live.host_addresses` names a loopback
        address (aioice gathers none otherwise): only there may they name its addresses."""
        turn = tuple(url for url in ice_servers if url.startswith(TURN_SCHEMES))
        loopback = any((ip := _address(a)) is not None and ip.is_loopback for a in host_addresses)
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in peer_networks), turn, here and loopback)


@dataclass(frozen=True)
class Client:
    """Who offers: the address the server sees (None: unknown), and whether it is on this machine."""

    address: IPAddress | None
    local: bool

    @classmethod
    def seen(cls, address: str | None, socket_peer: str | None, undeclared_proxy: bool) -> Client:
        """`address` as the request has it (after `server.proxy_hops`), `socket_peer` the TCP
        connection's own; `undeclared_proxy`: the request came through a proxy the settings do
        not trust (it carries forwarding headers with `proxy_hops` 0), so who is behind it is
        unknown."""
        if undeclared_proxy:
            return cls(None, False)
        seen, peer = _address(address), _address(socket_peer)
        return cls(seen, seen is not None and seen.is_loopback and peer is not None and peer.is_loopback)


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
            f"client's own and live.peer_networks, over UDP, at most {MAX_CANDIDATES} per media section"
        )


def screen_offer(sdp: str, client: Client, policy: PeerPolicy) -> Screened:
    """The SDP with only the candidates the server may send to (see the module's docstring)."""
    allowed = _Allowed(client, policy)
    sections: list[list[str]] = [[]]
    # lines as aiortc reads them (str.splitlines: any line break, not only CRLF)
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line)
    lines: list[str] = []
    left_out: list[str] = []
    for section in sections:
        kept, dropped = _screen_section(section, allowed)
        lines += kept
        left_out += dropped
    return Screened("".join(line + "\r\n" for line in lines), tuple(dict.fromkeys(left_out)))


def _screen_section(section: list[str], allowed: _Allowed) -> tuple[list[str], list[str]]:
    """One media section's lines kept, and the addresses (at most 60 characters each) of the
    candidates left out that no kept candidate shares; where one was left out, its
    end-of-candidates goes too. TCP candidates go silently: ICE here is over UDP only, so they
    were never usable (browsers add one per address: each offer was warned of them)."""
    kept, dropped, count, kept_hosts = [], [], 0, set()
    for line in section:
        if line.startswith("a=candidate:"):
            candidate = _Candidate.of(line)
            if candidate is not None and candidate.transport != "udp":
                continue
            if candidate is None or count >= MAX_CANDIDATES or not allowed(candidate):
                dropped.append((candidate.host if candidate else line)[:60])
                continue
            count += 1
            kept_hosts.add(candidate.host)
        kept.append(line)
    if dropped:
        kept = [line for line in kept if not _ends_candidates(line)]
    return kept, [host for host in dropped if host not in kept_hosts]


def _ends_candidates(line: str) -> bool:
    """`a=end-of-candidates` as aiortc reads it (the attribute's name before any colon)."""
    return line.startswith("a=") and line[2:].split(":", 1)[0] == "end-of-candidates"


@dataclass(frozen=True)
class _Candidate:
    """What the screen reads of an `a=candidate:` line (fields as aiortc splits them:
    foundation, component, transport, priority, address, port, "typ", type, ...)."""

    transport: str
    host: str
    kind: str

    @classmethod
    def of(cls, line: str) -> _Candidate | None:
        parts = line.split()
        if len(parts) < 8 or parts[6] != "typ":
            return None
        return cls(parts[2].lower(), parts[4], parts[7])


def _address(text: str | None) -> IPAddress | None:
    """An address without a zone; an IPv4-mapped IPv6 one as IPv4 (a dual-stack listener sees
    IPv4 clients so)."""
    try:
        ip = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class _Allowed:
    """The rules of the module's docstring, for one client."""

    def __init__(self, client: Client, policy: PeerPolicy) -> None:
        self.client, self.policy = client, policy

    @functools.cached_property
    def own(self) -> set[str]:  # looked up once per offer, at its first private candidate
        return _own_addresses()

    @functools.cached_property
    def relays(self) -> set[str]:
        return _server_addresses(self.policy.turn_servers)

    def __call__(self, candidate: _Candidate) -> bool:
        ip = _address(candidate.host)  # None for a name (mDNS or DNS) and for a zone
        if candidate.transport != "udp" or ip is None:
            return False
        if is_public(ip) or any(ip in n for n in self.policy.networks):
            return True
        if self.policy.local_clients and self.client.local and (ip.is_loopback or str(ip) in self.own):
            return True
        if ip == self.client.address and not ip.is_loopback:
            return True
        return candidate.kind == "relay" and str(ip) in self.relays


def _own_addresses() -> set[str]:
    """This machine's addresses, every interface (what aioice would gather on), as they are now."""
    import aioice.ice

    get = getattr(aioice.ice, "_sonic_original_get_host_addresses", aioice.ice.get_host_addresses)
    return set(get(use_ipv4=True, use_ipv6=True))


def _server_addresses(urls: tuple[str, ...]) -> set[str]:
    """The addresses of the configured TURN servers' hosts, resolved at each use (a lookup that
    failed once is not kept)."""
    found: set[str] = set()
    for url in urls:
        rest = written_credentials(url)[0].split(":", 1)[1].split("?")[0]  # host[:port][?transport=]
        host = rest[1 : rest.find("]")] if rest.startswith("[") else rest.split(":")[0]
        try:
            found.update(str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None))
        except (socket.gaierror, UnicodeError):
            continue
    return found
