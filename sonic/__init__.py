"""sonic: a portrait photo and a speech recording in, a lip-synced talking-head MP4 out.

The names below are imported on first use, so that a process that needs one part (a render
helper needs only the decoder) does not load the rest.
"""

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type checker sees the names' own types (at run time they load on first use)
    __version__: str
    from .checks import CheckedInputs, check_inputs
    from .errors import (
        AudioTooLong,
        Busy,
        DiskFull,
        EmptyAudio,
        InputTooLarge,
        InvalidParameter,
        NoFaceDetected,
        PipelineError,
        SonicError,
        UnsupportedMedia,
    )
    from .media import SAMPLE_RATE
    from .options import GenerateOptions, load_config, schema
    from .pipeline import GenerationResult, SonicPipeline, load_pipeline
    from .settings import Settings, SettingsError, load_settings

_EXPORTS = {
    "errors": [
        "AudioTooLong",
        "Busy",
        "DiskFull",
        "EmptyAudio",
        "InputTooLarge",
        "InvalidParameter",
        "NoFaceDetected",
        "PipelineError",
        "SonicError",
        "UnsupportedMedia",
    ],
    "options": ["GenerateOptions", "load_config", "schema"],
    "pipeline": ["GenerationResult", "SonicPipeline", "load_pipeline"],
    "settings": ["Settings", "SettingsError", "load_settings"],
    "checks": ["CheckedInputs", "check_inputs"],
    "media": ["SAMPLE_RATE"],  # Hz of a waveform handed to the pipeline (resample others first)
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name == "__version__":  # the installed release, as pip knows it
        from .version import package_version

        return package_version()
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
