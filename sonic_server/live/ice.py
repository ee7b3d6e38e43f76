"""The ICE servers both ends of a live session use: the server's own peer connection (rtc.py)
and its clients', which ask for them (GET /api/sonic/live/rtc-configuration) before they make
their offer. A client behind a NAT or a firewall reaches the server through a TURN server only
if the client itself knows that TURN server: the server's relay candidate alone is not enough
(the TURN server forwards only from addresses the server has allowed, and a browser hides its
own behind mDNS names).

TURN credentials are either written in the URL (`turn:user:password@host:port`, the same for
every client) or made per request from `live.turn_secret`, the secret a TURN server shares
with this service (coturn's `use-auth-secret` / `static-auth-secret`, the "TURN REST API"
scheme): the user name is the credential's expiry time, the password its HMAC-SHA1 under the
secret, so the TURN server checks them without asking anyone, and a credential handed to a
page stops working once it expires."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    from ..settings import LiveSettings

TURN_SCHEMES = ("turn:", "turns:")
ICE_SCHEMES = ("stun:", *TURN_SCHEMES)
LIFETIME_WITHOUT_LIMIT_S = 86_400.0  # sessions without a time limit: a day's credentials
LIFETIME_MARGIN_S = 600.0  # past a session's limit: a client may open its session minutes after it asked
# after the TURN server gave a session of the server's no relay address, its next sessions gather
# without it this long (each would wait aioice's whole 5 s for it again), then one asks again
RELAY_RETRY_S = 60.0


@dataclass(frozen=True)
class IceServer:
    """One RTCIceServer: its URL without credentials, and the credentials if it needs them."""

    url: str
    username: str | None = None
    credential: str | None = None

    def as_browser_dict(self) -> dict[str, Any]:
        """As the browser's RTCIceServer dictionary names the fields."""
        entry: dict[str, Any] = {"urls": [self.url]}
        if self.username is not None:
            entry["username"], entry["credential"] = self.username, self.credential
        return entry


def _userinfo(url: str) -> tuple[str, str, str | None, str] | None:
    """`scheme:user[:password]@host...` -> (scheme, user, password or None, host...), as written;
    None without a user part."""
    scheme, colon, rest = url.partition(":")
    if not colon or "@" not in rest:
        return None
    credentials, host = rest.rsplit("@", 1)
    user, has_password, password = credentials.partition(":")
    return scheme, user, password if has_password else None, host


def written_credentials(url: str) -> tuple[str, str | None, str | None]:
    """`turn:user:password@host:port` -> (`turn:host:port`, user, password), each part
    percent-decoded (a ':' or '@' in them is written %3A, %40); other URLs unchanged."""
    parts = _userinfo(url) if url.startswith(TURN_SCHEMES) else None
    if parts is None:
        return url, None, None
    scheme, user, password, host = parts
    return f"{scheme}:{host}", unquote(user), unquote(password or "")


def shown_url(url: str) -> str:
    """The URL as a message may show it: a password written in it (whatever the scheme) replaced
    by ***."""
    parts = _userinfo(url)
    if parts is None or parts[2] is None:
        return url
    scheme, user, _, host = parts
    return f"{scheme}:{user}:***@{host}"


# host[:port][?transport=udp|tcp], as aiortc (on the server, the Python client and the Pipecat
# service) parses STUN and TURN URLs: an IPv6 literal is beyond it
ICE_URL = re.compile(r"(stun|turns?):([^?:@\[\]/]+)(:\d{1,5})?(\?transport=(udp|tcp))?")


def problem(url: str) -> str | None:
    """Why an ICE server URL cannot be used, or None."""
    if not url.startswith(ICE_SCHEMES):
        return "is not a stun:, turn: or turns: URL"
    bare, user, password = written_credentials(url)
    if ICE_URL.fullmatch(bare) is None:
        if "[" in bare:
            return "an IPv6 address cannot name the server here (aiortc cannot parse it): use a name or an IPv4 address"
        return "is not stun:host[:port] or turn:host[:port][?transport=udp|tcp] (turns: for TLS)"
    if user is not None and not (user and password):
        return "names a user without a password (turn:user:password@host:port)"
    return None


def needs_secret(url: str) -> bool:
    """A TURN URL with no credentials written in it: its credentials come from live.turn_secret."""
    return url.startswith(TURN_SCHEMES) and written_credentials(url)[1] is None


def turn_credentials(secret: str, expires_at: int, who: str) -> tuple[str, str]:
    """The TURN REST API's credentials: user `<expiry, Unix seconds>:<who>`, password the
    base64 of its HMAC-SHA1 under the shared secret (what coturn computes to check them)."""
    username = f"{expires_at}:{who}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


SERVER_NAME = "sonic-server"  # whom the server's own sessions' credentials name


def client_name(owner: str | None) -> str:
    """Who a client's credentials name: its caller, told apart in the TURN server's logs by a
    digest of its owner id (the id its jobs carry), or "client" on a server without keys."""
    if owner is None:
        return "client"
    return "client-" + hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def credential_lifetime_s(max_session_s: float) -> float:
    """How long a made credential lasts: the longest session and a margin (TURN servers check
    it again at every refresh of an allocation, so it must outlast the session)."""
    return max_session_s + LIFETIME_MARGIN_S if max_session_s > 0 else LIFETIME_WITHOUT_LIMIT_S


def ice_servers(urls: Sequence[str], turn_secret: str, expires_at: int, who: str) -> list[IceServer]:
    """The configured servers with their credentials: written in the URL, or made from
    `turn_secret` (to expire at `expires_at`) for a TURN URL without them."""
    servers = []
    for url in urls:
        bare, user, password = written_credentials(url)
        if needs_secret(url) and turn_secret:
            user, password = turn_credentials(turn_secret, expires_at, who)
        servers.append(IceServer(bare, user, password))
    return servers


def configured(live: LiveSettings, who: str, now: float) -> tuple[list[IceServer], int]:
    """`live.ice_servers` with their credentials, made now for `who`, and when made ones expire."""
    expires_at = int(now + credential_lifetime_s(live.max_session_s))
    return ice_servers(live.ice_servers, live.turn_secret, expires_at, who), expires_at


def password_handed_to_anyone(live: LiveSettings, keyless: bool) -> str | None:
    """At start-up, on a service without keys or accounts (`keyless`): the warning that a TURN
    password written in live.ice_servers goes to whoever asks for the rtc-configuration (anyone
    who reaches the port may then relay through that TURN server, for as long as the password
    stands); None otherwise. Made credentials expire, so live.turn_secret is named as the cure."""
    written = [url for url in live.ice_servers if written_credentials(url)[2]]
    if not keyless or not written:
        return None
    return (
        f"live.ice_servers: the password written in {shown_url(written[0])} is handed to anyone who asks "
        "GET /api/sonic/live/rtc-configuration, and this service has no keys or accounts (server.api_keys, "
        "credits.enabled): anyone who reaches it may relay through that TURN server. Set live.turn_secret "
        "instead (each caller gets credentials that expire), or keys"
    )


def is_turn(server: IceServer) -> bool:
    return server.url.startswith(TURN_SCHEMES)


class RelayWatch:
    """Whether the server's own sessions ask the TURN server now. One that does not answer
    (down, unreachable) holds each session's answer for aioice's whole gathering wait (5 s) and
    gives no relay address after all: after a session got none, the next RELAY_RETRY_S of
    sessions gather without the TURN server (a client's own relay still reaches this server's
    addresses, as one reaches them when the server has no TURN server), then one asks again.
    Used from the sessions' event loop only (one thread)."""

    def __init__(self, retry_s: float = RELAY_RETRY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.retry_s = retry_s
        self._clock = clock
        self._failed_at: float | None = None  # when a session last asked and got no relay address

    def servers(self, servers: Sequence[IceServer]) -> list[IceServer]:
        """What a session's connection should use now: without the TURN servers while they rest."""
        if self._failed_at is not None and self._clock() - self._failed_at < self.retry_s:
            return [s for s in servers if not is_turn(s)]
        return list(servers)

    def asked(self, relayed: bool) -> bool:
        """A session that asked the TURN server got a relay address or not; True when this is
        news (the first failure after an answer, or the first answer after failures)."""
        was_failing = self._failed_at is not None
        self._failed_at = None if relayed else self._clock()
        return was_failing == relayed
