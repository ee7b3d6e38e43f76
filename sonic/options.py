"""Generation parameters: one frozen options object, validated once at the boundary.

Each parameter is declared once, as a field of `GenerateOptions`: its type is the annotation,
its range, meaning and unit are the field's metadata (see `param`). Validation (`from_dict`),
the parameter schema (`schema`, which the server publishes) and the check that
configs/default.yaml agrees (tests/test_options.py) are all derived from those fields.

`GenerateOptions.from_dict` is the only way user input becomes options: unknown names, wrong
types, NaN/inf and out-of-range values are rejected with the field named, never clamped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import InvalidParameter, shown
from .settings import Limits, Settings, as_settings, read_yaml

JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}


class DuplicateKey(ValueError):
    """A JSON object that gives one key twice (`unique_keys`)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json's object_pairs_hook for parameters: `{"seed": 1, "seed": 2}` means one thing to one
    parser and another to the next (Python's keeps the last), so it is refused."""
    obj: dict = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKey(key)
        obj[key] = value
    return obj


def load_config(path: str | Path | None = None) -> dict:
    """The settings file's contents as a plain mapping (default: the shipped one), for callers
    that edit and write a settings file; everything else takes typed settings
    (`sonic.settings.load_settings`)."""
    return read_yaml(path)


def param(
    default: Any,
    description: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_limit: str | None = None,
    unit: str | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A `GenerateOptions` field with its declaration as metadata.

    low/high: the accepted range (None: unbounded; the upper bound is always inclusive);
    high_limit: the name of a setting under `limits` that is the upper bound instead of `high`.
    choices: the accepted values of a string field (a str field must have them).
    A field whose default is None may be left unset (None); no other field accepts None.
    """
    return dataclasses.field(
        default=default,
        metadata={
            "low": low,
            "high": high,
            "low_inclusive": low_inclusive,
            "high_limit": high_limit,
            "description": description,
            "unit": unit,
            "choices": choices,
        },
    )


@dataclass(frozen=True)
class Param:
    """One parameter as declared on `GenerateOptions` (see `parameters()`)."""

    name: str
    type: type  # bool, int, float or str: the field's annotation without None
    default: Any  # the field's default (the served default comes from the settings)
    low: float | None
    high: float | None
    low_inclusive: bool
    high_limit: str | None  # upper bound read from the settings' `limits` (sonic/settings.py)
    description: str
    unit: str | None
    choices: tuple[str, ...] | None  # the values a str field accepts

    def maximum(self, limits: Limits) -> float | None:
        return float(getattr(limits, self.high_limit)) if self.high_limit else self.high

    def check(self, value: Any, limits: Limits) -> Any:
        """The value converted to the declared type, or InvalidParameter naming the field (and
        quoting the value as the caller gave it: 5, not the 5.0 it became)."""
        name, given = self.name, value
        if self.type is bool:
            if not isinstance(value, bool):
                raise InvalidParameter(f"{name} must be true or false, got {shown(given)}", field=name)
            return value
        if self.type is str:
            assert self.choices is not None  # declared with its choices (see `param`)
            if value not in self.choices:
                raise InvalidParameter(
                    f"{name} must be one of {', '.join(self.choices)}, got {shown(given)}", field=name
                )
            return value
        if isinstance(value, (np.integer, np.floating)):  # numpy's scalars, as a caller's arrays give them
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidParameter(f"{name} must be a number, got {shown(given)}", field=name)
        if self.type is int:
            if isinstance(value, float) and not value.is_integer():
                raise InvalidParameter(f"{name} must be an integer, got {shown(given)}", field=name)
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidParameter(f"{name} must be finite", field=name)
            value = int(value)
        else:
            try:
                value = float(value)
            except OverflowError:  # an integer past any float: as far out as infinity
                value = math.inf if value > 0 else -math.inf
            if not math.isfinite(value):
                raise InvalidParameter(f"{name} must be a finite number, got {shown(given)}", field=name)
        lo, hi = self.low, self.maximum(limits)
        low_ok = lo is None or (value >= lo if self.low_inclusive else value > lo)
        high_ok = hi is None or value <= hi
        if not (low_ok and high_ok):
            left = "[" if self.low_inclusive else "("
            lo_s, hi_s = (_bound(b) for b in (lo, hi))
            raise InvalidParameter(f"{name} must be in {left}{lo_s}, {hi_s}], got {shown(given)}", field=name)
        return value


def _bound(bound: float | None) -> str:
    """A range's end as written in a message: whole numbers whole (4294967295, not 4.29497e+09)."""
    if bound is None:
        return "inf"
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


@dataclass(frozen=True)
class GenerateOptions:
    duration: float | None = param(
        None,
        "seconds of output; shorter than the audio trims it, longer pads silence",
        low=0.0,
        low_inclusive=False,
        high_limit="max_duration_s",
        unit="s",
    )
    min_resolution: int = param(
        512,
        "short side of the output frame in px; both sides are rounded to the nearest multiple of 8",
        low=256,
        high=1024,
        unit="px",
    )
    expand_ratio: float = param(
        0.5, "margin around the detected face for the crop, as a fraction of the face box", low=0.0, high=1.0
    )
    inference_steps: int = param(
        25,
        "denoising steps; used by diffusion decoders only (the warp decoder reports it unused)",
        low=1,
        high=100,
        unit="steps",
    )
    dynamic_scale: float = param(1.0, "mouth/expression amplitude", low=0.5, high=2.0)
    motion_scale: float = param(1.0, "head motion amplitude (0 = still head; blinks stay)", low=0.0, high=2.0)
    align_mouth: bool = param(True, "measure and correct the audio/mouth offset and report it")
    smooth_motion: bool = param(True, "temporal smoothing of all motion")
    fps: int = param(25, "output frame rate", low=10, high=60, unit="frames/s")
    seed: int = param(42, "random seed for head motion and blinks", low=0, high=2**32 - 1)
    crop_to_face: bool = param(True, "crop the output to the face region (false: keep the whole image)")
    gaze: str = param(
        "natural",
        "where the eyes look: camera (fixed on the viewer) or natural (fixations and small saccades, "
        "mostly at the camera, glances away at phrase starts)",
        choices=("natural", "camera"),
    )
    expression: str = param(
        "neutral",
        "the face's expression while it speaks: neutral (the portrait's own), smile or serious",
        choices=("neutral", "smile", "serious"),
    )
    expression_scale: float = param(1.0, "how far the expression goes (0: the portrait's own)", low=0.0, high=1.0)

    @classmethod
    def from_dict(
        cls,
        params: Mapping[str, Any] | None = None,
        settings: Settings | Mapping | None = None,
        ignore: tuple[str, ...] = (),
    ) -> "GenerateOptions":
        """Validate user parameters over the defaults of the settings (sonic/settings.py; a
        mapping is read as a settings file's contents, None loads them).

        `ignore` names keys that a caller (the HTTP layer) handles itself, e.g. "async".
        """
        settings = as_settings(settings)
        if params is not None and not isinstance(params, Mapping):
            raise InvalidParameter("config must be a JSON object", field="config")
        limits = settings.limits
        declared = parameters()
        merged: dict[str, Any] = dict(settings.defaults)
        for name, value in (params or {}).items():
            if name in ignore:
                continue
            if name not in declared:  # (named short: a 5,000-character key made a 10 kB answer)
                raise InvalidParameter(f"unknown parameter {shown(name)}", field=str(name)[:40])
            merged[name] = value
        values = {}
        for name, value in merged.items():
            p = declared[name]
            if value is None and p.default is None:
                continue
            values[name] = p.check(value, limits)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def parameters() -> dict[str, Param]:
    """The declarations of `GenerateOptions`' fields, in field order."""
    hints = typing.get_type_hints(GenerateOptions)
    out = {}
    for f in dataclasses.fields(GenerateOptions):
        typ = next(t for t in (typing.get_args(hints[f.name]) or (hints[f.name],)) if t is not type(None))
        out[f.name] = Param(name=f.name, type=typ, default=f.default, **f.metadata)
    return out


def schema(settings: Settings | Mapping | None = None) -> dict:
    """The parameter contract as data: type, range, default and meaning of each field."""
    settings = as_settings(settings)
    defaults = settings.defaults
    return {name: _entry(p, settings, defaults.get(name)) for name, p in parameters().items()}


def _entry(p: Param, settings: Settings, default: Any) -> dict:
    entry = {
        "type": JSON_TYPES[p.type],
        "minimum": p.low,
        "maximum": p.maximum(settings.limits),
        "exclusive_minimum": not p.low_inclusive,
        "default": default,
        "description": p.description,
    }
    if p.choices is not None:
        entry["enum"] = list(p.choices)
    return entry
