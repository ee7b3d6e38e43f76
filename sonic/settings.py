"""Settings: how an installation runs (limits, folders, the decoder), as opposed to a request's
`options` (sonic/options.py), which say what one video looks like. The HTTP service's own
sections (server, s3, credits, storage) are defined by it (sonic_server/settings.py), in the
same file and with the same loader.

Loaded in three layers, each overriding the one before:

1. the YAML file: `configs/default.yaml` (shipped inside the package), or the file named by
   `--config` (`sonic serve`, `python app.py`) / `--settings` (`sonic generate`); a file may
   name only some settings, the rest keep their defaults;
2. environment variables `SONIC_<NAME>`, NAME being the setting's own name in capitals
   (`SONIC_QUEUE_SIZE=8`, `SONIC_OUTPUT_DIR=/srv/videos`, `SONIC_MAX_DURATION_S=60`;
   `sonic_checkpoints` is SONIC_CHECKPOINTS, not doubled); lists are comma-separated;
   `SONIC_API_KEYS` adds keys to those of the file;
3. command-line flags (`--host`, `--port`, `--decoder`, `--checkpoints DIR`, `--device`).

Relative paths (output_dir, sonic_checkpoints; the server's upload_dir, data_dir, jobs_db) are
resolved against the working directory when the settings are loaded. Unknown names and values of the
wrong type are refused with the setting named (`SettingsError`).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Self

import yaml

from .errors import SetupError, shown


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
log = logging.getLogger("sonic.settings")
DEVICES = ("auto", "cpu", "cuda")  # for a decoder that runs on torch; the warp decoder uses the CPU


MAX_RENDER_PROCESSES = 64  # each helper holds a decoder (about 90 MB); past the cores they only wait


class SettingsError(SetupError, ValueError):
    """A settings file, variable or flag that cannot be used; the message names it. A SonicError
    (setup_failed: the operator acts), so that a library caller catches one base class."""


@dataclass(frozen=True)
class Limits:
    max_duration_s: float = 300.0  # longest audio / requested duration accepted
    max_image_pixels: int = 40_000_000  # larger images are refused before decoding; a JPEG may have 4x
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
class Settings:
    defaults: Mapping[str, Any] = field(default_factory=dict)  # parameter defaults (sonic/options.py)
    limits: Limits = field(default_factory=Limits)
    output_dir: str = "outputs"
    device: str = "auto"
    render_processes: int = 2
    decoder: str = "auto"  # auto | warp | sonic (sonic/decoders/__init__.py: choose_decoder)
    sonic_checkpoints: str | None = None  # the Sonic model's folder, in the official layout (docs/gpu.md)
    allow_unsafe_pickle: bool = False  # load .pth files that need full pickle (runs their code: trusted files only)

    # The settings file is shared with the HTTP service (sonic_server/settings.py: `ServerConfig`
    # adds these sections); the library reads past them. Its sections' variables: SONIC_<NAME>,
    # but where ENV_PREFIXES names another prefix.
    SKIPPED: ClassVar[frozenset[str]] = frozenset(
        {"server", "s3", "credits", "storage", "live", "webhooks", "outbound"}
    )
    ENV_PREFIXES: ClassVar[Mapping[str, str]] = {}

    # numbers that must be more than 0 (every number must be finite and 0 or more): a limit of 0
    # would refuse every request while the service says it is ready
    POSITIVE: ClassVar[frozenset[str]] = frozenset(
        {
            "limits." + name
            for name in (
                "max_duration_s",
                "max_image_pixels",
                "max_upload_mb",
                "max_output_pixels",
                "max_output_pixel_frames",
                "decode_memory_mb",
            )
        }
    )

    AT_LEAST_ONE: ClassVar[frozenset[str]] = frozenset()  # ... and those that must be at least 1

    def checked(self) -> Self:
        """These settings, or SettingsError naming a value that cannot be used together."""
        if self.device not in DEVICES:  # from the file, a variable or a flag
            raise SettingsError(f"setting device must be one of {', '.join(DEVICES)}, got {as_written(self.device)}")
        check_numbers(self, "", self.POSITIVE, self.AT_LEAST_ONE)
        if self.render_processes > MAX_RENDER_PROCESSES:  # 200 started 200 helpers, 8.5 GB for a 3 s clip
            raise SettingsError(
                f"setting render_processes must be {MAX_RENDER_PROCESSES} or fewer (about one per core), "
                f"got {self.render_processes}"
            )
        _check_decoder(self.decoder)
        _check_defaults(self)
        return self

    def resolved(self, base: Path) -> Self:
        """Relative paths resolved against `base`."""
        return dataclasses.replace(
            self,
            output_dir=resolve_path(self.output_dir, base),
            sonic_checkpoints=resolve_path(self.sonic_checkpoints, base),
        )


def sections(cls: type) -> dict[str, type]:
    """The fields of a settings class that are sections of their own (dataclasses): name -> class."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def as_written(value: Any) -> str:
    """A setting's value as the file (YAML) or a variable wrote it, for a message: whole up to
    200 characters (the operator must find what is wrong in it, a trailing slash included)."""
    return shown(value, 200)


# what a setting of each type must be, in the words of the file that sets it
KINDS: dict[Any, str] = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


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
            raise SettingsError(f"setting {where} must be a list, got {as_written(value)}")
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
    raise SettingsError(
        f"setting {where} must be {KINDS.get(typ, getattr(typ, '__name__', typ))}, got {as_written(value)}"
    )


def _hints(cls) -> dict:
    """The types of a settings class's fields (its ClassVar tables are no settings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(name: str, known: Iterable[str]) -> SettingsError:
    """A setting that is none: its name, the one it is likely a misspelling of, and the known ones."""
    known = sorted(known)
    close = difflib.get_close_matches(name.rpartition(".")[2], known, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    return SettingsError(f"unknown setting {name} ({hint}known: {', '.join(known)})")


def _values(
    cls, raw: Any, prefix: str, env: Mapping[str, str], skip: tuple[str, ...] = (), env_prefix: str = ENV_PREFIX
) -> dict:
    """The fields of dataclass `cls` given in `raw` (the file) or `env` (SONIC_* variables, which
    win), cast to their types; `skip` names fields the caller fills itself."""
    if raw is not None and not isinstance(raw, Mapping):
        raise SettingsError(f"setting {prefix.rstrip('.') or 'file'} must be a mapping, got {as_written(raw)}")
    raw = dict(raw or {})
    hints = _hints(cls)
    unknown = sorted(str(key) for key in set(raw) - set(hints))  # a YAML key may be a number
    if unknown:
        raise _unknown(prefix + unknown[0], hints)
    values = {}
    for f in dataclasses.fields(cls):
        name = f.name
        if name in skip:
            continue
        if name in raw:
            values[name] = _cast(prefix + name, hints[name], raw[name], from_text=False)
        var = env_var(env_prefix, name)
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
    cls: type[Settings] = Settings,
) -> Settings:
    """Settings of class `cls` from a mapping with the YAML file's structure, then `env` (SONIC_*
    variables; none when not given), then `flags` ({"server.port": 5001, ...}; None values are
    skipped). Relative paths are resolved against `base` (default: the working directory)."""
    raw = {k: v for k, v in dict(raw or {}).items() if k not in cls.SKIPPED}
    env = env or {}
    parts = sections(cls)
    # the library's settings (cls.SKIPPED: the server's sections) know only their own names; no
    # server variable is close to one of them (tests/test_settings.py), so none is called misspelt
    for var, meant in _misspelt(env, cls):
        log.warning("%s is not a setting (ignored); did you mean %s?", var, meant)
    top = _values(cls, raw, "", env, skip=("defaults", *parts))
    for name, part in parts.items():
        prefix = cls.ENV_PREFIXES.get(name, ENV_PREFIX)
        top[name] = part(**_values(part, raw.get(name), name + ".", env, env_prefix=prefix))
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise SettingsError("setting defaults must be a mapping of parameter defaults")
    top["defaults"] = dict(defaults)
    # flags win over variables
    settings: Any = cls(**top)
    for name, value in (flags or {}).items():
        if value is None:
            continue
        section, _, key = name.rpartition(".")
        # a section (Limits, ServerSettings, ...) or the Settings themselves
        owner: Any = getattr(settings, section) if section in parts else settings if not section else None
        if owner is None or key not in _hints(type(owner)) or key in ("defaults", *parts):
            raise SettingsError(f"unknown setting {name}")
        owner = dataclasses.replace(owner, **{key: _cast(name, _hints(type(owner))[key], value, False)})
        settings = dataclasses.replace(settings, **{section: owner}) if section else owner
    return settings.checked().resolved(base or Path.cwd())


def env_var(prefix: str, name: str) -> str:
    """A setting's variable: its name in capitals after the prefix, the prefix not doubled
    (`sonic_checkpoints`: SONIC_CHECKPOINTS)."""
    return prefix + name.upper().removeprefix(prefix)


def env_vars(cls: type[Settings]) -> set[str]:
    """The variables of every setting of `cls` and its sections."""
    parts = sections(cls)
    known = {env_var(ENV_PREFIX, f.name) for f in dataclasses.fields(cls) if f.name not in parts}
    for name, part in parts.items():
        known |= {env_var(cls.ENV_PREFIXES.get(name, ENV_PREFIX), f.name) for f in dataclasses.fields(part)}
    return known


def _misspelt(env: Mapping[str, str], cls: type[Settings]) -> list[tuple[str, str]]:
    """SONIC_* variables that are no setting but close to one's name: (variable, the setting's).
    Only close ones: other tools' SONIC_* variables (SONIC_PYTHON, ...) are none of ours."""
    known = env_vars(cls)
    parts = {name.upper() for name in sections(cls)}
    found = []
    for var in env:
        if var.startswith(ENV_PREFIX) and var not in known:
            close = difflib.get_close_matches(var, known, n=1, cutoff=0.85)
            section, _, rest = var.removeprefix(ENV_PREFIX).partition("_")
            if not close and section in parts and rest:
                # a section's name written in: the server's settings have none in their variables
                # (SONIC_SERVER_REDIS_URL left the service in single-process mode, unsaid)
                close = difflib.get_close_matches(ENV_PREFIX + rest, known, n=1, cutoff=0.85)
            if close:
                found.append((var, close[0]))
    return found


def check_numbers(
    section: Any, prefix: str, positive: frozenset[str], at_least_one: frozenset[str] = frozenset()
) -> None:
    """Every number of a settings dataclass and its sections finite and 0 or more, those named in
    `positive` (dotted names) more than 0 and those in `at_least_one` at least 1; SettingsError
    naming the setting otherwise."""
    for f in dataclasses.fields(section):
        value, name = getattr(section, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_numbers(value, name + ".", positive, at_least_one)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            # each says the bound its own setting has (-1 was "0 or more", then 0 "more than 0")
            if value < 1 and name in at_least_one:
                raise SettingsError(f"setting {name} must be at least 1, got {value}")
            if not math.isfinite(value) or value < 0 or (value == 0 and name in positive):
                least = "more than 0" if name in positive else "0 or more"
                raise SettingsError(f"setting {name} must be a number {least}, got {value}")


def _check_defaults(settings: Settings) -> None:
    """The parameter defaults as a request with no parameters sees them: a bad one would fail
    every request, the client blamed for the operator's setting."""
    from .errors import InvalidParameter
    from .options import GenerateOptions, parameters

    declared = parameters()
    for name in settings.defaults:
        if name not in declared:
            raise SettingsError(f"setting defaults.{name}: no such parameter ({', '.join(declared)})")
    try:
        GenerateOptions.from_dict(None, settings)
    except InvalidParameter as e:
        raise SettingsError(f"setting defaults.{e.field}: {e.message}") from None


def _check_decoder(name: str) -> None:
    from .decoders import CHOICES

    if name not in CHOICES:
        raise SettingsError(f"setting decoder must be one of {', '.join(CHOICES)}, got {as_written(name)}")


@typing.overload
def resolve_path(p: str, base: Path) -> str: ...
@typing.overload
def resolve_path(p: None, base: Path) -> None: ...
def resolve_path(p: str | None, base: Path) -> str | None:
    """A setting's path resolved against `base`; None and "" keep their meaning."""
    if not p:
        return p
    return str((base / Path(p).expanduser()).resolve())


class _KeyTwice(yaml.YAMLError):
    def __init__(self, key: Any, lines: tuple[int, int]):
        super().__init__(f"the key {shown(key)} is given twice (lines {lines[0]} and {lines[1]})")


class _UniqueKeysLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a mapping naming one key twice is refused: PyYAML keeps the
    last, so an operator's second `server:` block silently dropped the first's settings (its
    port, its keys). A merge (`<<: *base`) may still be overridden: that is what it is for. Each
    mapping's own keys are checked once, before PyYAML's merging writes the merged keys into it."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._checked: set[int] = set()  # the mapping nodes whose own keys were checked

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if id(node) not in self._checked:
            self._checked.add(id(node))
            line_of: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in line_of:
                        raise _KeyTwice(key, (line_of[key], line))
                    line_of[key] = line
                except TypeError:  # an unhashable key: the safe loader's own error names it
                    continue
        super().flatten_mapping(node)


def read_yaml(path: str | Path | None = None) -> dict:
    """The settings file's contents as a mapping (default: the shipped configs/default.yaml)."""
    p = Path(path) if path else DEFAULT_CONFIG
    if p.exists() and not p.is_dir() and not p.is_file():  # a FIFO or a device: reading it waited forever
        raise SettingsError(f"settings file {str(p)!r} is not a regular file")
    try:
        with open(p, encoding="utf-8") as f:
            raw = yaml.load(f, Loader=_UniqueKeysLoader)  # a SafeLoader
    except FileNotFoundError as e:
        raise SettingsError(f"settings file {str(p)!r} not found") from e
    except OSError as e:  # a folder, no permission
        raise SettingsError(f"settings file {str(p)!r} cannot be read: {e.strerror or type(e).__name__}") from e
    except UnicodeDecodeError as e:
        raise SettingsError(f"settings file {str(p)!r} is not UTF-8 text (byte {e.start})") from None
    except _KeyTwice as e:
        raise SettingsError(f"settings file {str(p)!r}: {e}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {str(p)!r} is not valid YAML: {e}") from e
    except RecursionError:  # lists or mappings nested thousands deep
        raise SettingsError(f"settings file {str(p)!r} nests lists or mappings too deep") from None
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SettingsError(f"settings file {str(p)!r} must hold a mapping of settings")
    return dict(raw)


def load_settings(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    cls: type[Settings] = Settings,
) -> Settings:
    """The shipped defaults, overlaid by the YAML file at `path` (when given), then SONIC_*
    variables (`env`, default os.environ), then `flags`; settings of class `cls`."""
    raw = read_yaml(None)
    if path:
        raw = _merge(raw, read_yaml(path))
    return settings_from(raw, os.environ if env is None else env, flags, cls=cls)


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
