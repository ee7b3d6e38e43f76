"""Access control: optional API keys (Authorization: Bearer) and per-client token buckets.

Only `/api/` and `/fusion` routes are guarded: health, OpenAPI, downloads (unguessable names) and CORS
preflights stay open.

Who is limited: a request with a *verified* key by that key (its own table, one bucket per
configured key, so nothing a stranger sends can evict it); every other request by its client
address, whatever token it carries. So invented tokens buy nothing, and a failed authentication
spends the address's tokens: after the burst, wrong keys get 429 instead of 401 and keys cannot
be guessed at full speed. The address table is bounded (least recently seen dropped first).

In distributed mode (server.redis_url) the buckets live in Redis, so that a client spends from
one bucket whichever API process its requests reach: with them in each process, N processes
behind a load balancer gave every client N times the limit.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from flask import Flask, g, request

from .errors import error_response
from .openapi import error, responses_under

GUARDED_PREFIX = ("/api/", "/fusion")  # /fusion: the face-fusion API's own paths
MAX_CLIENTS = 10_000  # address buckets kept; the least recently seen are dropped beyond this
BEARER = "bearer "  # the scheme is case-insensitive (RFC 7235)

for _prefix in GUARDED_PREFIX:
    responses_under(
        _prefix,
        {
            401: error("a valid API key is required (when server.api_keys is set): Authorization: Bearer <key>"),
            429: error("over the client's rate limit (Retry-After)"),
        },
        security_scheme={
            "type": "http",
            "scheme": "bearer",
            "description": "needed only when the service has API keys (server.api_keys)",
        },
    )


@dataclass(frozen=True)
class Caller:
    """Who a request is, for what it may see: the owner its jobs get (None where the service has
    no keys: then every job is anyone's) and whether it sees every job (an admin)."""

    owner: str | None = None
    sees_all: bool = False

    def may_see(self, job_owner: str | None) -> bool:
        return job_owner is None or self.sees_all or job_owner == self.owner


ANYONE = Caller()


def caller() -> Caller:
    """This request's caller, as the guard identified it (ANYONE without keys or accounts)."""
    return g.get("caller", ANYONE)


def _key_owner(key: str) -> str:
    """A flat key's owner name: a digest, so the key itself is never stored with a job."""
    return "key:" + _digest(key)


def _digest(text: str) -> str:
    """A key's or a client's name as it is stored (with a job, in Redis): never the text itself."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class TokenBucket:
    """`rate` requests per second per client, bursts up to `burst`; at most `max_clients`
    clients are remembered (an LRU: the least recently seen is forgotten first)."""

    def __init__(self, rate: float, burst: float, max_clients: int | None = None):
        self.rate, self.burst = float(rate), float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """0 if the request may go ahead (a token is spent), else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            while self.max_clients is not None and len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, client: str) -> bool:
        return client in self._buckets


class Bucket(Protocol):
    def take(self, client: str) -> float: ...


# (the table's name, rate, burst, the most clients it remembers) -> a table of buckets
BucketTable = Callable[[str, float, float, int | None], Bucket]


def local_table(name: str, rate: float, burst: float, max_clients: int | None) -> Bucket:
    """A table in this process (one API process, or tests)."""
    return TokenBucket(rate, burst, max_clients=max_clients)


# KEYS: the client's bucket. ARGV: rate (tokens a second), burst. Returns the seconds to wait as
# a string (a Lua number would be truncated to an integer): "0" when a token was spent. Redis's
# own clock, so that the API processes' clocks need not agree; the bucket expires once it would
# be full again, which bounds the table without an LRU.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(held[1]) or burst, tonumber(held[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.6f', tokens), 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


class SharedTokenBucket:
    """TokenBucket's rule kept in Redis (`sonic:rate:<table>:<digest of the client>`): a
    client's key or account is stored only as a digest. A Redis that does not answer raises,
    and the API answers 503 `not_ready` as for its other requests."""

    def __init__(self, conn: Any, table: str, rate: float, burst: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._prefix = f"sonic:rate:{table}:"
        self._take = conn.register_script(_TAKE)

    def take(self, client: str) -> float:
        return float(self._take(keys=[self._prefix + _digest(client)], args=[repr(self.rate), repr(self.burst)]))


def shared_table(conn: Any) -> BucketTable:
    """Tables in Redis, shared by every API process of a distributed service."""

    def table(name: str, rate: float, burst: float, max_clients: int | None) -> Bucket:
        return SharedTokenBucket(conn, name, rate, burst)

    return table


class RateLimiter:
    """The two tables: `keys` (verified keys only, bounded by their number) and `addresses`; and
    the same two again for DELETEs, which end what a client holds (a live session, a job): a
    client that has spent its requests can still let go of what it holds, and DELETEs are
    bounded all the same."""

    def __init__(self, rate: float, burst: float, max_keys: int | None = None, table: BucketTable = local_table):
        self.keys = table("keys", rate, burst, max_keys)
        self.addresses = table("addresses", rate, burst, MAX_CLIENTS)
        self._ending = (
            table("ending-keys", rate, burst, max_keys),
            table("ending-addresses", rate, burst, MAX_CLIENTS),
        )

    def take(self, verified_key: str | None, address: str, ending: bool = False) -> float:
        keys, addresses = self._ending if ending else (self.keys, self.addresses)
        if verified_key is not None:
            return keys.take(verified_key)
        return addresses.take(address_bucket(address))


def address_bucket(address: str) -> str:
    """The bucket of a client without a key: its IPv4 address, or its IPv6 /64. One host is
    given a /64 (or more) to pick addresses from: per address, it had a bucket per request."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # an IPv4 client of a dual-stack socket
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def bearer_key(header: str | None) -> str | None:
    if not header or header[: len(BEARER)].lower() != BEARER:
        return None
    return header[len(BEARER) :].strip() or None


def _raw(text: str) -> bytes:
    """A header's bytes as the client sent them (a WSGI server hands them over latin-1 decoded);
    text that is not latin-1 (a caller's own str) as UTF-8."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def verified(key: str | None, keys: list[str]) -> str | None:
    """The configured key that `key` matches, compared in constant time on bytes (any characters
    may arrive in a header; configured keys are matched on their UTF-8 bytes), else None."""
    if key is None:
        return None
    sent = _raw(key)
    match = None
    for k in keys:
        if hmac.compare_digest(sent, k.encode("utf-8", "surrogatepass")):
            match = k
    return match


def install(
    app: Flask,
    keys: list[str],
    rate_per_s: float,
    burst: float,
    ledger=None,
    credits=None,
    table: BucketTable = local_table,
) -> None:
    """Refuse /api/ requests without a valid key (401, when keys are set) or over their bucket
    (429 + Retry-After): a verified key's, else the client address's. With accounts (`ledger`,
    credits enabled) every /api/ request needs an account's key, a bearer token or a flat key,
    /api/admin/ the admin role (403), and recharges have their own, lower limit. `table`: where
    the buckets are kept (shared_table: in Redis, for every API process)."""
    # with accounts, one bucket per account: bounded too
    max_keys = MAX_CLIENTS * 10 if ledger is not None else None
    limiter = app.extensions["sonic_access"] = RateLimiter(rate_per_s, burst, max_keys, table)
    # which limit, and that every /api/ request spends it: a page polling a session's state
    # 30 times a second had its next speak refused "slow down", with no word of why
    too_many = (
        f"too many requests: each client may send {rate_per_s:g} a second to /api/ (bursts of {burst:g}), "
        "reads of a job's or a live session's state included; wait Retry-After seconds"
    )
    if ledger is not None:
        recharges = table("recharges", credits.recharge_rate_per_s, credits.recharge_burst, MAX_CLIENTS)

    @app.before_request
    def _guard():
        if not request.path.startswith(GUARDED_PREFIX) or request.method == "OPTIONS":
            return None
        if ledger is not None:
            return _guard_accounts()
        key = verified(bearer_key(request.headers.get("Authorization")), keys) if keys else None
        # a DELETE's own bucket is for callers who may end things: a wrong key spends the
        # requests' bucket (else DELETEs would double the pace at which keys can be guessed)
        ending = request.method == "DELETE" and (not keys or key is not None)
        wait = limiter.take(key, request.remote_addr or "unknown", ending=ending)
        if wait > 0:
            return error_response("rate_limited", too_many, headers={"Retry-After": retry_after(wait)})
        if keys and key is None:
            return error_response(
                "unauthorized",
                "a valid API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if key is not None:
            g.caller = Caller(owner=_key_owner(key))
        return None

    def _guard_accounts():
        from flask import g

        token = bearer_key(request.headers.get("Authorization"))
        principal, why = identify(token, keys, ledger, credits)
        wait = limiter.take(
            f"{principal.via}:{principal.name}" if principal else None,
            request.remote_addr or "unknown",
            ending=request.method == "DELETE" and principal is not None,
        )
        if wait > 0:
            return error_response("rate_limited", too_many, headers={"Retry-After": retry_after(wait)})
        if principal is None:
            return error_response("unauthorized", why, headers={"WWW-Authenticate": "Bearer"})
        g.principal = principal
        owner = ledger.owner(principal.account_id) if principal.account_id is not None else principal.operator
        g.caller = Caller(owner=owner, sees_all=principal.role == "admin")
        if request.path.startswith(ADMIN_PREFIX) and principal.role != "admin":
            return error_response("forbidden", "this needs an admin account")
        if request.path == RECHARGE_PATH and request.method == "POST":
            wait = recharges.take(principal.operator)
            if wait > 0:
                return error_response(
                    "rate_limited", "too many recharge calls; slow down", headers={"Retry-After": retry_after(wait)}
                )
        return None


ADMIN_PREFIX = "/api/admin/"
RECHARGE_PATH = "/api/admin/credits/recharge"
NO_KEY = "an account's API key or a bearer token is required: Authorization: Bearer <key or token>"


def identify(token: str | None, flat_keys: list[str], ledger, credits):
    """(the Principal, None) or (None, why not): a flat key, a JWT (three dot-separated parts),
    else an account's key."""
    from .accounts import Principal

    if token is None:
        return None, NO_KEY
    flat = verified(token, flat_keys) if flat_keys else None
    if flat is not None:
        return Principal("service", "admin", None, "flat"), None
    if token.count(".") == 2 and (credits.jwt_secret or credits.jwt_public_key):
        return _jwt(token, ledger, credits)
    principal = ledger.authenticate(token)
    return (principal, None) if principal else (None, "this API key is not valid (unknown or revoked)")


def _jwt(token: str, ledger, credits):
    import jwt

    try:
        alg = jwt.get_unverified_header(token).get("alg")
    except jwt.InvalidTokenError:
        return None, "the bearer token is not a valid JWT"
    if alg == "HS256" and credits.jwt_secret:
        key = credits.jwt_secret
    elif alg == "RS256" and credits.jwt_public_key:
        key = _public_key(credits.jwt_public_key)
    else:
        return None, f"bearer tokens signed with {alg!r} are not accepted here"
    try:
        claims = jwt.decode(token, key, algorithms=[alg], options={"require": ["sub", "exp"]})
    except jwt.ExpiredSignatureError:
        return None, "the bearer token has expired"
    except jwt.MissingRequiredClaimError as e:  # said, as a forged signature is not: the issuer's fix
        return None, f"the bearer token has no {e.claim!r} claim (sub and exp are required)"
    except jwt.InvalidTokenError:
        return None, "the bearer token's signature or claims are not valid"
    refused = _lifetime_refusal(claims["exp"], credits.jwt_max_lifetime_s)
    if refused:
        return None, refused
    role = "admin" if claims.get("role") == "admin" else "user"
    principal = ledger.principal(str(claims["sub"]), role, "jwt")
    return (principal, None) if principal else (None, f"the token's account ({claims['sub']}) does not exist")


JWT_CLOCK_LEEWAY_S = 60  # an issuer whose clock runs this much ahead minting tokens at the limit


def _lifetime_refusal(exp: object, most_s: float) -> str | None:
    """Why a token's `exp` is not a usable end, or None. PyJWT reads a string of digits as a
    time, and takes any time: an exp of 10**30 made a token that never expires, which is why an
    exp is required at all (it could never be taken back)."""
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return "the bearer token's exp must be a number (seconds since the epoch), not " + type(exp).__name__
    if exp > time.time() + most_s + JWT_CLOCK_LEEWAY_S:  # (compared, not subtracted: 10**400 overflows a float)
        return f"the bearer token expires more than {most_s / 86400:g} days ahead (credits.jwt_max_lifetime_s)"
    return None


@functools.lru_cache(maxsize=4)
def _public_key(value: str) -> str:
    """The PEM text, or the file's (read once; settings check that it exists)."""
    if "BEGIN" in value:
        return value
    from pathlib import Path

    return Path(value).read_text()
