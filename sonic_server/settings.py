"""The HTTP service's settings: its sections of the settings file (`server`, `s3`, `credits`) and
`storage`, over the library's (sonic/settings.py), read by the same loader in the same layers
(the file, SONIC_* variables, flags).

`ServerConfig` is what the service, `sonic worker` and `sonic accounts` run with; the library
takes it wherever it takes its own `Settings`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Self, cast
from urllib.parse import urlsplit

from sonic.settings import ENV_PREFIX, Settings, SettingsError, as_written, resolve_path
from sonic.settings import load_settings as _load_settings
from sonic.settings import settings_from as _settings_from

from .live.ice import TURN_SCHEMES, needs_secret, problem, shown_url
from .logs import LOG_FORMATS


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    upload_dir: str = "uploads"  # a request's files while its job lives
    data_dir: str = "data"  # the job database and other state
    jobs_db: str | None = None  # None: <data_dir>/jobs.sqlite3; "": records in memory only
    queue_size: int = 4
    max_jobs_per_caller: int = 0  # jobs one key or account may have waiting or running; more -> 429 (0: no limit)
    sync_wait_s: float = 120.0
    job_timeout_s: float = 900.0  # a running job is stopped (failed, job_timeout) after this; 0: no limit
    output_ttl_s: float = 86400.0  # videos and finished job records are deleted this long after; 0: kept
    retry_after_s: int = 10
    socket_timeout_s: float = 30.0
    drain_s: float = 8.0  # on SIGTERM: requests in flight may finish this long (docker stop waits 10 s)
    max_event_streams: int = 32  # open SSE streams at once; more -> 503 (each holds a server thread)
    # pages on this machine only (a local web app on any port): "*" let any site its operator
    # browsed read and delete a keyless server's jobs
    cors_origins: tuple[str, ...] = ("loopback",)
    # names (beside IP addresses, localhost and public_url's host) a request may be sent to: a
    # page whose own name was pointed here (DNS rebinding) is refused. "*": any
    # (sonic_server/host_names.py)
    allowed_hosts: tuple[str, ...] = ()
    proxy_hops: int = 0  # reverse proxies in front (each adds X-Forwarded-For/-Proto/-Host): trusted this many
    public_url: str | None = None  # the service's address as clients reach it: every URL in an answer starts with it
    api_keys: tuple[str, ...] = ()
    rate_limit_per_s: float = 10.0
    rate_limit_burst: float = 20.0
    redis_url: str | None = None  # set: distributed mode (docs/scaling.md), jobs run in `sonic worker`s
    worker_lease_s: float = 30.0  # a running job whose worker is silent this long is failed (worker_lost)
    retry_lost_jobs: int = 0  # ... or queued again, this many times, before it is failed
    min_free_mb: float = 256.0  # less free disk under the output folder: no job taken, no request (0: no check)
    worker_drain_s: float = 30.0  # a worker stopped gracefully (SIGTERM) lets its live sessions run this long
    fusion_max_batch: int = 8  # pairs in one POST /fusion/batch
    idempotency_ttl_s: float = 86400.0  # an Idempotency-Key's answer is kept this long
    log_format: str = "text"  # text: time, level, logger, message; json: one JSON object per line
    database_url: str | None = (
        None  # accounts and credits: None = sqlite in data_dir; postgresql://... (SONIC_DATABASE_URL)
    )

    @property
    def jobs_db_path(self) -> str:
        """Where job records are kept ("" = in memory)."""
        if self.jobs_db is None:
            return str(Path(self.data_dir) / "jobs.sqlite3")
        return self.jobs_db


@dataclass(frozen=True)
class S3Settings:
    """Object storage for uploads and videos in distributed mode (`storage: s3`, docs/scaling.md).
    Variables: SONIC_S3_<NAME> (SONIC_S3_BUCKET, SONIC_S3_ENDPOINT_URL, ...). Credentials left
    unset come from the usual AWS chain (AWS_ACCESS_KEY_ID, a role, ~/.aws)."""

    endpoint_url: str | None = None  # None: AWS S3; http://minio:9000 for MinIO and the like
    public_endpoint_url: str | None = None  # presigned URLs name this host instead (clients reach it)
    bucket: str | None = None
    region: str = "us-east-1"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    prefix: str = "sonic/"  # keys: <prefix>uploads/<job id>/<name>, <prefix>outputs/<job id>.mp4
    video_url: str = "proxy"  # proxy: video_url is /output/<name>, streamed from the bucket;
    # presigned: video_url is a presigned GET URL to the bucket
    url_ttl_s: int = 3600  # a presigned URL's lifetime
    timeout_s: float = 10.0  # a store that sends nothing for this long does not answer (tried twice)


@dataclass(frozen=True)
class CreditsSettings:
    """Accounts and credits (docs/credits.md). Variables: SONIC_CREDITS_<NAME>; the database is
    server.database_url (SONIC_DATABASE_URL)."""

    enabled: bool = False  # off: the service behaves as without accounts (flat server.api_keys)
    per_video_second: int = 10  # credits per second of video (rounded up to whole credits)
    per_request: int = 0  # credits per generate request, on top
    charge_cache_hits: bool = False  # a cached result costs as much as a new one (default: free)
    per_fusion: int = 1  # credits per face fusion (POST /fusion, each pair of a batch)
    max_recharge_users: int = 1000  # accounts per recharge call
    max_recharge_amount: int = 1_000_000_000  # credits per account per recharge call
    recharge_rate_per_s: float = 1.0  # recharge calls per operator per second (their own bucket)
    recharge_burst: float = 5.0
    jwt_secret: str | None = None  # HS256 bearer tokens signed with this secret
    jwt_public_key: str | None = None  # RS256 bearer tokens: a PEM public key, or the path of one
    jwt_max_lifetime_s: float = 31_622_400.0  # a token whose exp lies further ahead (366 days) is refused
    ledger_page: int = 50  # rows per page of /api/credits and /api/admin/audit


ICE_TRANSPORT_POLICIES = ("all", "relay")


@dataclass(frozen=True)
class LiveSettings:
    """Live sessions over WebRTC (docs/live.md). Variables: SONIC_LIVE_<NAME>."""

    enabled: bool = True
    # running at once, here or on each worker (distributed); more -> 503 busy (512 px: ~40 % of a core here)
    max_sessions: int = 2
    max_sessions_per_caller: int = 0  # sessions one key or account may run at once; more -> 429 (0: no limit)
    processes: bool = True  # each session renders in a helper process of its own (false: a thread here)
    warm_start: bool = True  # at start-up, make the face analyser and a helper ready (~0.1 GB, ~2 s of CPU)
    max_session_s: float = 3600.0  # a session ends after this (0: no limit)
    idle_timeout_s: float = 20.0  # the client silent this long (no media, no reports), speech queued or not: ended
    max_speak_s: float = 600.0  # seconds of speech a session may hold queued
    # STUN/TURN URLs, for the server's candidates and its clients' (GET /api/sonic/live/rtc-configuration)
    ice_servers: tuple[str, ...] = ()
    # shared with the TURN server (coturn's static-auth-secret): each client gets credentials of its own
    # that expire, for the turn: URLs above written without them (sonic_server/live/ice.py)
    turn_secret: str = ""
    ice_transport_policy: str = "all"  # what clients are told: "relay" sends all media through TURN
    host_addresses: tuple[str, ...] = ()  # gather host candidates on these only (empty: every interface)
    public_host: str = ""  # behind a 1:1 NAT: the address clients reach this machine at, put in the answer
    # private networks whose addresses a client's ICE candidates may name (besides the client's
    # own address and public ones): a private deployment's, e.g. ["10.0.0.0/8"] (docs/live.md)
    peer_networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebhookSettings:
    """Job webhooks (docs/webhooks.md). Variables: SONIC_WEBHOOK_<NAME>."""

    secret: str = ""  # signs each delivery ("whsec_<base64>" or any string); "": one made and kept (data_dir)
    retry_s: float = 3600.0  # a failing delivery is retried, backing off, this long, then dropped


@dataclass(frozen=True)
class OutboundSettings:
    """Requests to addresses callers name (webhooks). Variables: SONIC_OUTBOUND_<NAME>."""

    allow_private: bool = False  # true: every address but the cloud metadata services (tests)
    # addresses or CIDR blocks allowed beside the public ones (a webhook receiver on a private
    # network: 10.0.3.7, 10.0.0.0/8); the cloud metadata services stay closed
    allow_networks: tuple[str, ...] = ()
    fetch_timeout_s: float = 30.0  # image_url and audio_url of one request: both fetches, redirects included
    max_fetches: int = 8  # requests fetching their inputs by URL at once; more -> 503 (each holds a server thread)


STORAGE_KINDS = ("local", "s3")
VIDEO_URLS = ("proxy", "presigned")


@dataclass(frozen=True)
class ServerConfig(Settings):
    storage: str = "local"  # local: output_dir and upload_dir (shared folders); s3: S3Settings
    server: ServerSettings = field(default_factory=ServerSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    credits: CreditsSettings = field(default_factory=CreditsSettings)
    live: LiveSettings = field(default_factory=LiveSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)

    SKIPPED: ClassVar[frozenset[str]] = frozenset()
    POSITIVE: ClassVar[frozenset[str]] = (
        Settings.POSITIVE
        | {
            "server." + name
            for name in (
                "port",
                "queue_size",
                "socket_timeout_s",
                "max_event_streams",
                "rate_limit_per_s",
                "rate_limit_burst",
                "worker_lease_s",
                "fusion_max_batch",
            )
        }
        | {"live.idle_timeout_s", "live.max_speak_s", "credits.recharge_rate_per_s"}
        | {"outbound.fetch_timeout_s", "outbound.max_fetches"}
    )
    # a bucket that never holds a whole token refuses everything; the credits' pages and batches
    AT_LEAST_ONE: ClassVar[frozenset[str]] = frozenset(
        {"server.rate_limit_burst", "credits.recharge_burst"}
        | {"credits." + name for name in ("max_recharge_users", "max_recharge_amount", "ledger_page")}
    )
    # SONIC_S3_BUCKET, SONIC_CREDITS_ENABLED; the other sections: SONIC_<NAME>
    ENV_PREFIXES: ClassVar[Mapping[str, str]] = {
        "s3": ENV_PREFIX + "S3_",
        "credits": ENV_PREFIX + "CREDITS_",
        "live": ENV_PREFIX + "LIVE_",
        "webhooks": ENV_PREFIX + "WEBHOOK_",
        "outbound": ENV_PREFIX + "OUTBOUND_",
    }

    def checked(self) -> Self:
        super().checked()
        if self.server.port > 65535:
            raise SettingsError(f"setting server.port must be 1 to 65535, got {self.server.port}")
        if self.server.log_format not in LOG_FORMATS:
            raise SettingsError(
                f"setting server.log_format must be text or json, got {as_written(self.server.log_format)}"
            )
        _check_redis_url(self.server.redis_url)
        _check_storage(self)
        _check_credits(self)
        _check_live(self.live)
        _check_origins(self.server.cors_origins)
        _check_allowed_hosts(self.server.allowed_hosts)
        _check_public_url(self.server.public_url)
        _check_webhooks(self.webhooks)
        _check_networks(self.outbound.allow_networks)
        return self

    def resolved(self, base: Path) -> Self:
        srv = self.server
        server = dataclasses.replace(
            srv,
            upload_dir=resolve_path(srv.upload_dir, base),
            data_dir=resolve_path(srv.data_dir, base),
            jobs_db=resolve_path(srv.jobs_db, base),
        )
        return dataclasses.replace(super().resolved(base), server=server)


def settings_from(
    raw: Mapping | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> ServerConfig:
    """sonic.settings.settings_from, for the service's settings."""
    return cast(ServerConfig, _settings_from(raw, env, flags, base, cls=ServerConfig))


def load_settings(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> ServerConfig:
    """sonic.settings.load_settings, for the service's settings; without a path, the file that
    SONIC_CONFIG names, if any (how a WSGI server's `create_app()` is given one)."""
    variables = os.environ if env is None else env
    return cast(ServerConfig, _load_settings(path or variables.get("SONIC_CONFIG"), env, flags, cls=ServerConfig))


MIN_JWT_SECRET_BYTES = 32
MIN_TURN_SECRET_BYTES = 16
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_redis_url(url: str | None) -> None:
    """A URL the Redis client takes (any other stopped the start with the client's traceback)."""
    if url and not url.startswith(REDIS_SCHEMES):
        scheme = url.split("://", 1)[0] + "://" if "://" in url else "no scheme"  # (not the URL: its password)
        raise SettingsError(
            f"setting server.redis_url must start with {', '.join(REDIS_SCHEMES)} "
            f"(e.g. redis://127.0.0.1:6379/0), got {scheme}"
        )


def _check_networks(networks: tuple[str, ...]) -> None:
    for block in networks:
        try:
            ipaddress.ip_network(block, strict=False)
        except ValueError:
            raise SettingsError(
                f"setting outbound.allow_networks: {as_written(block)} is not an address or a CIDR block (10.0.0.0/8)"
            ) from None


def _check_credits(s: ServerConfig) -> None:
    c = s.credits
    if c.jwt_public_key and "BEGIN" not in c.jwt_public_key and not Path(c.jwt_public_key).is_file():
        raise SettingsError(f"setting credits.jwt_public_key: no PEM key and no file at {c.jwt_public_key!r}")
    if not 0 < c.jwt_max_lifetime_s < 1e10:
        raise SettingsError(
            f"setting credits.jwt_max_lifetime_s must be a positive number of seconds, got {c.jwt_max_lifetime_s}"
        )
    # HS256's key must be as long as its hash (RFC 7518 3.2): a short one can be guessed offline
    # from any token, and PyJWT only warned at the first token, on stderr
    if c.enabled and c.jwt_secret and len(c.jwt_secret.encode()) < MIN_JWT_SECRET_BYTES:
        raise SettingsError(
            f"setting credits.jwt_secret must be at least {MIN_JWT_SECRET_BYTES} bytes, got "
            f"{len(c.jwt_secret.encode())} (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )


def _check_storage(s: ServerConfig) -> None:
    if s.storage not in STORAGE_KINDS:
        raise SettingsError(f"setting storage must be one of {', '.join(STORAGE_KINDS)}, got {as_written(s.storage)}")
    if s.s3.video_url not in VIDEO_URLS:
        raise SettingsError(
            f"setting s3.video_url must be one of {', '.join(VIDEO_URLS)}, got {as_written(s.s3.video_url)}"
        )
    if s.storage == "s3":
        if not s.server.redis_url:
            raise SettingsError(
                "setting storage: s3 is for distributed mode: set server.redis_url (SONIC_REDIS_URL) "
                "too; one process keeps its videos in output_dir"
            )
        if not s.s3.bucket:
            raise SettingsError("setting storage: s3 needs s3.bucket (SONIC_S3_BUCKET)")
        if not 0 < s.s3.timeout_s <= 300:
            raise SettingsError(f"setting s3.timeout_s must be above 0 and at most 300, got {s.s3.timeout_s}")
        if not 0 < s.s3.url_ttl_s <= 604800:  # SigV4 presigned URLs live at most 7 days
            raise SettingsError(f"setting s3.url_ttl_s must be 1 to 604800 (7 days), got {s.s3.url_ttl_s}")


def _check_webhooks(hooks: WebhookSettings) -> None:
    if hooks.secret.startswith("whsec_"):
        import base64
        import binascii

        try:
            if not base64.b64decode(hooks.secret[len("whsec_") :], validate=True):
                raise ValueError
        except (binascii.Error, ValueError):
            raise SettingsError("setting webhooks.secret: a whsec_ secret must be base64 after its prefix") from None


# a host as RFC 9110 7.2 has it (a Host header, a URL's host part): a name or an address (IPv6 in
# brackets), then a port or not
HOST = re.compile(r"(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253})(:[0-9]{1,5})?")
# what a browser sends as Origin: scheme://host[:port], nothing after it
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.IGNORECASE)


def _check_origins(origins: tuple[str, ...]) -> None:
    """An origin written as a URL (a trailing slash, a path), with a pattern, credentials or a
    port no browser sends never equals what a browser sends: the page would be refused with
    nothing said here."""
    for origin in origins:
        if origin in ("*", "loopback"):
            continue
        if not _browser_origin(origin):
            raise SettingsError(
                f"setting server.cors_origins: {as_written(origin)} is not an origin; write scheme://host[:port] "
                "as a browser sends it, with no path, trailing slash, pattern or credentials (https://app.example), "
                "loopback for pages on this machine, or * for any"
            )


def _browser_origin(origin: str) -> bool:
    """scheme://host[:port] as a browser sends it in Origin: no path, pattern or credentials, a
    port that is a port, a host in ASCII (a name in another script goes as punycode)."""
    if not ORIGIN.fullmatch(origin) or "@" in origin or "*" in origin or not origin.isascii():
        return False
    try:
        port = urlsplit(origin).port
    except ValueError:  # not a number, or past 65535
        return False
    return port is None or port > 0


# an entry of server.allowed_hosts: "*", a name, or a domain (".example.com"), without a port
ALLOWED_HOST = re.compile(r"\*|\.?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _check_allowed_hosts(hosts: tuple[str, ...]) -> None:
    """A name written with a scheme or a port never equals a request's name: every request to it
    would be refused with nothing said here."""
    for host in hosts:
        if len(host) > 253 or not ALLOWED_HOST.fullmatch(host):
            raise SettingsError(
                f"setting server.allowed_hosts: {as_written(host)} is not a host name; write a name "
                "(talk.example.com), a domain and the names under it (.example.com) or *, without "
                "a scheme or a port (IP addresses and localhost are always answered)"
            )


def _check_public_url(url: str | None) -> None:
    """http(s)://host[:port], an optional / after it: what the URLs in answers start with
    (sonic_server/public.py). No path: the demo page and /docs load their files from the root."""
    if url is None:
        return
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
        host_ok = bool(parts.hostname) and HOST.fullmatch(parts.netloc) is not None
    except ValueError:  # a port that is no number or past 65535, a bracket left open, [zz]
        parts, port_ok, host_ok = urlsplit(""), False, False
    nothing_after = parts.path in ("", "/") and not parts.query and not parts.fragment
    if parts.scheme not in ("http", "https") or not host_ok or not port_ok or not nothing_after:
        raise SettingsError(
            f"setting server.public_url: {as_written(url)} is not an http:// or https:// address of a host, with a "
            "port or not, and nothing after it (https://talk.example.com or http://10.0.0.5:5000)"
        )


def _check_live(live: LiveSettings) -> None:
    # numbers: ServerConfig.POSITIVE and sonic.settings.check_numbers
    for url in live.ice_servers:  # (shown without a password written in it)
        if (why := problem(url)) is not None:
            listed = " (SONIC_LIVE_ICE_SERVERS takes URLs separated by commas)" if url.startswith(("[", '"')) else ""
            raise SettingsError(f"setting live.ice_servers: {as_written(shown_url(url))} {why}{listed}")
    _check_turn(live)
    for network in live.peer_networks:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise SettingsError(
                f"setting live.peer_networks: {as_written(network)} is not a network (e.g. 10.0.0.0/8 or fd00::/8)"
            ) from None
    if live.public_host:
        try:
            ipaddress.ip_address(live.public_host)
        except ValueError:
            raise SettingsError(
                "setting live.public_host must be an IP address (what clients connect to), "
                f"got {as_written(live.public_host)}"
            ) from None


def _check_turn(live: LiveSettings) -> None:
    """A TURN secret needs a TURN URL to make credentials for; relay only needs a TURN server."""
    if live.ice_transport_policy not in ICE_TRANSPORT_POLICIES:
        raise SettingsError(
            f"setting live.ice_transport_policy must be one of {', '.join(ICE_TRANSPORT_POLICIES)}, "
            f"got {as_written(live.ice_transport_policy)}"
        )
    if live.turn_secret and len(live.turn_secret.encode()) < MIN_TURN_SECRET_BYTES:
        # one credential a page was handed (its user name and HMAC) is enough to guess a short one offline
        raise SettingsError(
            f"setting live.turn_secret must be at least {MIN_TURN_SECRET_BYTES} bytes, got "
            f"{len(live.turn_secret.encode())} (python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    unkeyed = [url for url in live.ice_servers if needs_secret(url)]
    if unkeyed and not live.turn_secret:
        raise SettingsError(
            f"setting live.ice_servers: {as_written(unkeyed[0])} has no credentials: set live.turn_secret "
            "(SONIC_LIVE_TURN_SECRET) to the TURN server's shared secret (coturn's static-auth-secret), or "
            "write them in the URL (turn:user:password@host:port)"
        )
    if live.turn_secret and not unkeyed:
        raise SettingsError(
            "setting live.turn_secret is set, but live.ice_servers names no turn: URL without credentials "
            "for it to make them for (e.g. turn:turn.example.org:3478)"
        )
    if live.ice_transport_policy == "relay" and not any(url.startswith(TURN_SCHEMES) for url in live.ice_servers):
        raise SettingsError(
            "setting live.ice_transport_policy is relay, but live.ice_servers names no turn: URL to relay through"
        )
