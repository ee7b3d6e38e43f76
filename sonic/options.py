"""Generation parameters: one frozen options object, validated once at the boundary.

`GenerateOptions.from_dict` is the only way user input becomes options: unknown names, wrong
types, NaN/inf and out-of-range values are rejected with the field named, never clamped.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import InvalidParameter


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

# name -> (type, low, high, low_inclusive); None bounds are open.
RANGES: dict[str, tuple[type, float | None, float | None, bool]] = {
    "duration": (float, 0.0, None, False),          # upper bound: limits.max_duration_s
    "min_resolution": (int, 256, 1024, True),
    "expand_ratio": (float, 0.0, 1.0, True),
    "inference_steps": (int, 1, 100, True),
    "dynamic_scale": (float, 0.5, 2.0, True),
    "motion_scale": (float, 0.0, 2.0, True),
    "align_mouth": (bool, None, None, True),
    "smooth_motion": (bool, None, None, True),
    "fps": (int, 10, 60, True),
    "seed": (int, 0, 2**32 - 1, True),
    "crop_to_face": (bool, None, None, True),
}

DESCRIPTIONS = {
    "duration": "seconds of output; shorter than the audio trims it, longer pads silence",
    "min_resolution": "short side of the output frame in px (rounded to a multiple of 16)",
    "expand_ratio": "margin around the detected face for the crop, as a fraction of the face box",
    "inference_steps": "denoising steps of a diffusion decoder (unused by the warp decoder)",
    "dynamic_scale": "mouth/expression amplitude",
    "motion_scale": "head motion amplitude (0 = still head; blinks stay)",
    "align_mouth": "measure and correct the audio/mouth offset and report it",
    "smooth_motion": "temporal smoothing of all motion",
    "fps": "output frame rate",
    "seed": "random seed for head motion and blinks",
    "crop_to_face": "crop the output to the face region (false: keep the whole image)",
}


def load_config(path: str | Path | None = None) -> dict:
    """Read the YAML config (defaults + limits); `path` overrides the bundled default."""
    with open(path or DEFAULT_CONFIG, encoding="utf-8") as f:
        return yaml.safe_load(f)


def _check(name: str, value: Any, max_duration: float) -> Any:
    typ, lo, hi, inclusive = RANGES[name]
    if typ is bool:
        if not isinstance(value, bool):
            raise InvalidParameter(f"{name} must be true or false, got {value!r}", field=name)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(f"{name} must be a number, got {value!r}", field=name)
    if typ is int:
        if isinstance(value, float) and not value.is_integer():
            raise InvalidParameter(f"{name} must be an integer, got {value!r}", field=name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidParameter(f"{name} must be finite", field=name)
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise InvalidParameter(f"{name} must be a finite number, got {value!r}", field=name)
    if name == "duration":
        hi = max_duration
    low_ok = lo is None or (value >= lo if inclusive else value > lo)
    high_ok = hi is None or value <= hi
    if not (low_ok and high_ok):
        left = "[" if inclusive else "("
        raise InvalidParameter(f"{name} must be in {left}{lo:g}, {hi:g}], got {value:g}", field=name)
    return value


@dataclass(frozen=True)
class GenerateOptions:
    duration: float | None = None
    min_resolution: int = 512
    expand_ratio: float = 0.5
    inference_steps: int = 25
    dynamic_scale: float = 1.0
    motion_scale: float = 1.0
    align_mouth: bool = True
    smooth_motion: bool = True
    fps: int = 25
    seed: int = 42
    crop_to_face: bool = True

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None = None, config: Mapping | None = None,
                  ignore: tuple[str, ...] = ()) -> "GenerateOptions":
        """Validate user parameters over the configured defaults.

        `ignore` names keys that a caller (the HTTP layer) handles itself, e.g. "async".
        """
        config = config if config is not None else load_config()
        if params is not None and not isinstance(params, Mapping):
            raise InvalidParameter("config must be a JSON object", field="config")
        max_duration = float(config["limits"]["max_duration_s"])
        merged: dict[str, Any] = dict(config.get("defaults", {}))
        for name, value in (params or {}).items():
            if name in ignore:
                continue
            if name not in RANGES:
                raise InvalidParameter(f"unknown parameter {name!r}", field=str(name))
            merged[name] = value
        values = {}
        for name, value in merged.items():
            if name == "duration" and value is None:
                continue
            values[name] = _check(name, value, max_duration)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def schema(config: Mapping | None = None) -> dict:
    """The parameter contract as data: type, range, default and meaning of each field."""
    config = config if config is not None else load_config()
    defaults = config.get("defaults", {})
    out = {}
    for name, (typ, lo, hi, inclusive) in RANGES.items():
        if name == "duration":
            hi = float(config["limits"]["max_duration_s"])
        out[name] = {"type": {bool: "boolean", int: "integer", float: "number"}[typ],
                     "minimum": lo, "maximum": hi, "exclusive_minimum": not inclusive,
                     "default": defaults.get(name), "description": DESCRIPTIONS[name]}
    return out
