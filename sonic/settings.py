"""Settings: how an installation runs (limits, folders, the server), as opposed to a request's
`options` (sonic/options.py), which say what one video looks like.

Loaded in three layers, each overriding the one before:

1. the YAML file: `configs/default.yaml` (shipped inside the package), or the file named by
   `--config` (`sonic serve`, `python app.py`) / `--settings` (`sonic generate`); a file may
   name only some settings, the rest keep their defaults;
2. environment variables `SONIC_<NAME>`, NAME being the setting's own name in capitals
   (`SONIC_QUEUE_SIZE=8`, `SONIC_OUTPUT_DIR=/srv/videos`, `SONIC_MAX_DURATION_S=60`); lists are
   comma-separated; `SONIC_API_KEYS` adds keys to those of the file;
3. command-line flags (`--host`, `--port`, `--decoder`, `--checkpoints DIR`, `--device`).

Relative paths (output_dir, server.upload_dir, server.data_dir, server.jobs_db) are resolved
against the working directory when the settings are loaded. Unknown names and values of the
wrong type are refused with the setting named (`SettingsError`).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml


def _default_settings() -> Path:
    """configs/default.yaml: shipped inside an installed package as `sonic.configs`; in a
    checkout that is not installed, the repository's own folder."""
    try:
        from importlib.resources import files

        path = Path(str(files("sonic.configs") / "default.yaml"))
        if path.is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


DEFAULT_CONFIG = _default_settings()
ENV_PREFIX = "SONIC_"
DEVICES = ("auto", "cpu", "cuda")  # for a decoder that runs on torch; the warp decoder uses the CPU


class SettingsError(ValueError):
    """A settings file, variable or flag that cannot be used; the message names it."""


@dataclass(frozen=True)
class Limits:
    max_duration_s: float = 300.0  # longest audio / requested duration accepted
    max_image_pixels: int = 40_000_000  # larger images are refused before decoding
    max_upload_mb: float = 50.0
    # the output, checked before a frame is rendered (crop_to_face: false scales the whole photo,
    # so an extreme aspect ratio alone would make huge frames)
    max_output_pixels: int = 4_194_304  # per frame: 2048 x 2048
    max_output_pixel_frames: int = 12_000_000_000  # pixels x frames: 300 s at 25 fps of a 1024x1536 frame
    # memory that a process's image decodes may hold at once; a decode waits up to decode_wait_s
    # for its share, then is refused busy (503, Retry-After); see docs/reliability.md
    decode_memory_mb: float = 768.0
    decode_wait_s: float = 30.0


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 5000
    upload_dir: str = "uploads"  # a request's files while its job lives
    data_dir: str = "data"  # the job database and other state
    jobs_db: str | None = None  # None: <data_dir>/jobs.sqlite3; "": records in memory only
    queue_size: int = 4
    sync_wait_s: float = 120.0
    job_timeout_s: float = 900.0  # a running job is stopped (failed, job_timeout) after this; 0: no limit
    output_ttl_s: float = 86400.0
    retry_after_s: int = 10
    socket_timeout_s: float = 30.0
    max_event_streams: int = 32  # open SSE streams at once; more -> 503 (each holds a server thread)
    cors_origins: tuple[str, ...] = ("*",)
    api_keys: tuple[str, ...] = ()
    rate_limit_per_s: float = 10.0
    rate_limit_burst: float = 20.0
    redis_url: str | None = None  # set: distributed mode (docs/scaling.md), jobs run in `sonic worker`s
    worker_lease_s: float = 30.0  # a running job whose worker is silent this long is failed (worker_lost)
    retry_lost_jobs: int = 0  # ... or queued again, this many times, before it is failed
    fusion_max_batch: int = 8  # pairs in one POST /fusion/batch
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
    ledger_page: int = 50  # rows per page of /api/credits and /api/admin/audit


STORAGE_KINDS = ("local", "s3")
VIDEO_URLS = ("proxy", "presigned")


@dataclass(frozen=True)
class Settings:
    defaults: Mapping[str, Any] = field(default_factory=dict)  # parameter defaults (sonic/options.py)
    limits: Limits = field(default_factory=Limits)
    output_dir: str = "outputs"
    device: str = "auto"
    render_processes: int = 2
    decoder: str = "auto"  # auto | warp | sonic (sonic/decoders.py: choose_decoder)
    sonic_checkpoints: str | None = None  # the Sonic model's folder, in the official layout (docs/gpu.md)
    allow_unsafe_pickle: bool = False  # load .pth files that need full pickle (runs their code: trusted files only)
    storage: str = "local"  # local: output_dir and upload_dir (shared folders); s3: S3Settings
    server: ServerSettings = field(default_factory=ServerSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    credits: CreditsSettings = field(default_factory=CreditsSettings)


_SECTIONS = {"limits": Limits, "server": ServerSettings, "s3": S3Settings, "credits": CreditsSettings}
# SONIC_S3_BUCKET, SONIC_CREDITS_ENABLED; the other sections: SONIC_<NAME>
_ENV_PREFIXES = {"s3": ENV_PREFIX + "S3_", "credits": ENV_PREFIX + "CREDITS_"}


def _cast(where: str, typ: Any, value: Any, from_text: bool) -> Any:
    """value -> typ, or SettingsError naming `where`; from_text: value is a variable's string."""
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X]
        if value is None or (from_text and value == ""):
            return None if value is None else ""
        typ = next(a for a in args if a is not type(None))
        args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple:
        # a variable, or a bare string in the file (cors_origins: "*"), is a comma-separated list
        items = [s.strip() for s in value.split(",") if s.strip()] if from_text or isinstance(value, str) else value
        if items is None:
            return ()
        if not isinstance(items, (list, tuple)):
            raise SettingsError(f"setting {where} must be a list, got {value!r}")
        return tuple(_cast(where, args[0], v, from_text) for v in items)
    if typ is bool:
        if from_text and str(value).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(value).lower() in ("1", "true", "yes", "on")
        if isinstance(value, bool):
            return value
    elif typ is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            pass
    elif typ is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise SettingsError(f"setting {where} must be {getattr(typ, '__name__', typ)}, got {value!r}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _values(
    cls, raw: Any, prefix: str, env: Mapping[str, str], skip: tuple[str, ...] = (), env_prefix: str = ENV_PREFIX
) -> dict:
    """The fields of dataclass `cls` given in `raw` (the file) or `env` (SONIC_* variables, which
    win), cast to their types; `skip` names fields the caller fills itself."""
    if raw is not None and not isinstance(raw, Mapping):
        raise SettingsError(f"setting {prefix.rstrip('.') or 'file'} must be a mapping, got {raw!r}")
    raw = dict(raw or {})
    hints = _hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise SettingsError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(hints))})")
    values = {}
    for f in dataclasses.fields(cls):
        name = f.name
        if name in skip:
            continue
        if name in raw:
            values[name] = _cast(prefix + name, hints[name], raw[name], from_text=False)
        var = env_prefix + name.upper()
        if var in env:
            value = _cast(var, hints[name], env[var], from_text=True)
            if name == "api_keys":  # the variable adds keys to the file's
                value = tuple(values.get("api_keys", ())) + value
            values[name] = value
    return values


def settings_from(
    raw: Mapping | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    base: Path | None = None,
) -> Settings:
    """Settings from a mapping with the YAML file's structure, then `env` (SONIC_* variables;
    none when not given), then `flags` ({"server.port": 5001, ...}; None values are skipped).
    Relative paths are resolved against `base` (default: the working directory)."""
    raw = dict(raw or {})
    env = env or {}
    top = _values(Settings, raw, "", env, skip=("defaults", *_SECTIONS))
    for name, cls in _SECTIONS.items():
        top[name] = cls(**_values(cls, raw.get(name), name + ".", env, env_prefix=_ENV_PREFIXES.get(name, ENV_PREFIX)))
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise SettingsError("setting defaults must be a mapping of parameter defaults")
    top["defaults"] = dict(defaults)
    # flags win over variables
    settings = Settings(**top)
    for name, value in (flags or {}).items():
        if value is None:
            continue
        section, _, key = name.rpartition(".")
        # a section (Limits, ServerSettings, ...) or the Settings themselves
        owner: Any = getattr(settings, section) if section in _SECTIONS else settings if not section else None
        if owner is None or key not in _hints(type(owner)) or key in ("defaults", *_SECTIONS):
            raise SettingsError(f"unknown setting {name}")
        owner = dataclasses.replace(owner, **{key: _cast(name, _hints(type(owner))[key], value, False)})
        settings = dataclasses.replace(settings, **{section: owner}) if section else owner
    if settings.device not in DEVICES:  # from the file, a variable or a flag
        raise SettingsError(f"setting device must be one of {', '.join(DEVICES)}, got {settings.device!r}")
    _check_storage(settings)
    _check_credits(settings)
    _check_limits(settings.limits)
    return _resolve_paths(settings, base or Path.cwd())


def _check_limits(limits: Limits) -> None:
    if limits.decode_memory_mb <= 0 or limits.decode_wait_s < 0:
        raise SettingsError("settings limits.decode_memory_mb must be positive and limits.decode_wait_s 0 or more")


def _check_credits(s: Settings) -> None:
    c = s.credits
    for name in ("per_video_second", "per_request"):
        if getattr(c, name) < 0:
            raise SettingsError(f"setting credits.{name} must be 0 or more, got {getattr(c, name)}")
    for name in ("max_recharge_users", "max_recharge_amount", "ledger_page"):
        if getattr(c, name) < 1:
            raise SettingsError(f"setting credits.{name} must be at least 1, got {getattr(c, name)}")
    if c.jwt_public_key and "BEGIN" not in c.jwt_public_key and not Path(c.jwt_public_key).is_file():
        raise SettingsError(f"setting credits.jwt_public_key: no PEM key and no file at {c.jwt_public_key!r}")
    if c.recharge_rate_per_s <= 0 or c.recharge_burst < 1:
        raise SettingsError(
            "settings credits.recharge_rate_per_s must be positive and credits.recharge_burst at least 1"
        )


def _check_storage(s: Settings) -> None:
    if s.storage not in STORAGE_KINDS:
        raise SettingsError(f"setting storage must be one of {', '.join(STORAGE_KINDS)}, got {s.storage!r}")
    if s.s3.video_url not in VIDEO_URLS:
        raise SettingsError(f"setting s3.video_url must be one of {', '.join(VIDEO_URLS)}, got {s.s3.video_url!r}")
    if s.storage == "s3":
        if not s.server.redis_url:
            raise SettingsError(
                "setting storage: s3 is for distributed mode: set server.redis_url (SONIC_REDIS_URL) "
                "too; one process keeps its videos in output_dir"
            )
        if not s.s3.bucket:
            raise SettingsError("setting storage: s3 needs s3.bucket (SONIC_S3_BUCKET)")
        if not 0 < s.s3.url_ttl_s <= 604800:  # SigV4 presigned URLs live at most 7 days
            raise SettingsError(f"setting s3.url_ttl_s must be 1 to 604800 (7 days), got {s.s3.url_ttl_s}")


def _resolve_paths(s: Settings, base: Path) -> Settings:
    @typing.overload
    def res(p: str) -> str: ...
    @typing.overload
    def res(p: None) -> None: ...
    def res(p: str | None) -> str | None:
        if not p:  # None / "" keep their meaning
            return p
        return str((base / Path(p).expanduser()).resolve())

    server = dataclasses.replace(
        s.server, upload_dir=res(s.server.upload_dir), data_dir=res(s.server.data_dir), jobs_db=res(s.server.jobs_db)
    )
    return dataclasses.replace(
        s, output_dir=res(s.output_dir), sonic_checkpoints=res(s.sonic_checkpoints), server=server
    )


def read_yaml(path: str | Path | None = None) -> dict:
    """The settings file's contents as a mapping (default: the shipped configs/default.yaml)."""
    p = Path(path) if path else DEFAULT_CONFIG
    try:
        with open(p, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise SettingsError(f"settings file {str(p)!r} not found") from e
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {str(p)!r} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SettingsError(f"settings file {str(p)!r} must hold a mapping of settings")
    return dict(raw)


def load_settings(
    path: str | Path | None = None, env: Mapping[str, str] | None = None, flags: Mapping[str, Any] | None = None
) -> Settings:
    """The shipped defaults, overlaid by the YAML file at `path` (when given), then SONIC_*
    variables (`env`, default os.environ), then `flags`."""
    raw = read_yaml(None)
    if path:
        raw = _merge(raw, read_yaml(path))
    return settings_from(raw, os.environ if env is None else env, flags)


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def as_settings(value: Settings | Mapping | str | Path | None) -> Settings:
    """Settings from what a caller passes: Settings as they are; a mapping with the YAML file's
    structure (no environment applied); a path to a YAML file or None (load_settings)."""
    if isinstance(value, Settings):
        return value
    if isinstance(value, Mapping):
        return settings_from(value)
    return load_settings(value)
