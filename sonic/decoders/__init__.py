"""Video decoders behind one interface, in a registry by name (this module); one sub-package each.

A decoder kind (`DecoderKind`) turns the request's framing (the output frame at rest and its
landmarks, `geometry.Framing`), the face's motion rig (`motion.Rig`) and the options into a
prepared decoder, once per request; the prepared decoder (`PreparedDecoder`) renders frames in
batches from motion coefficients and head poses. A kind also declares the generation parameters
it honours (the pipeline reports each other parameter a request sets away from its default as
"<name> is not used by the <kind> decoder") and what each of them means for it (`meanings`;
`describe_parameters` gives the whole table).

The pipeline picks its kind by the `decoder` setting (configs/default.yaml), when it is built.
Kinds register themselves with `register` when their module is imported; `KNOWN` names the
module of each built-in kind, imported on first lookup, so naming a decoder costs nothing until
it is used:
- `warp` (sonic/decoders/warp/): a dense backward warp of the photo, on the CPU. Its prepared
  decoder is handed to the render helpers as a pickle (sonic/render_pool.py), so a prepared decoder
  that is to run there must pickle.
- `sonic` (sonic/decoders/sonic/): the Sonic diffusion model from a local checkpoint folder. It
  "speaks": it makes the frames from the portrait and the waveform itself (`speak`), so the
  pipeline skips the phone recogniser and the motion stage for it.

`choose_decoder` resolves the `decoder` setting, `auto` included.
"""

from __future__ import annotations

import importlib
from abc import ABC
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import numpy as np

from ..errors import InvalidParameter
from ..options import GenerateOptions, parameters

if TYPE_CHECKING:  # annotations only: naming a decoder loads none of the stages
    from ..geometry import Framing
    from ..motion import Rig
    from ..settings import Settings

# name -> module that registers the kind when imported
KNOWN = {"warp": "sonic.decoders.warp.kind", "sonic": "sonic.decoders.sonic.kind"}
CHOICES = ("auto", "warp", "sonic")
_REGISTRY: dict[str, "DecoderKind"] = {}


class PreparedDecoder(Protocol):
    """One request's decoder, ready to render."""

    frame: np.ndarray  # (H, W, 3) uint8, the output frame at rest: every frame has its size

    def render(self, coeffs: np.ndarray, head: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """coeffs (B, K) in motion.COEFFS order, head (B, 4) (see motion.Motion) -> frames
        (B, H, W, 3) uint8, written into `out` when given."""
        ...


class SpokenVideo(Protocol):
    """What a speaking kind makes for one request."""

    frame: np.ndarray  # (H, W, 3) uint8: the frames' size
    batches: Iterator[np.ndarray]  # (B, H, W, 3) uint8 frames in order, n_frames in all
    lipsync_offset_ms: float


class DecoderKind(ABC):
    """A kind of decoder: its name, the parameters it honours and what they mean for it, and its
    once-per-request setup.

    A kind that renders motion implements `prepare`; a kind that `speaks` implements `speak`.
    `load(settings)` returns the kind ready to serve (its models loaded), once per pipeline."""

    name: str
    honours: frozenset[str]
    # honoured parameter -> one sentence of what it does with this kind; a parameter left out
    # keeps its generic description (sonic/options.py). Never mutated: kinds assign their own.
    meanings: dict[str, str] = {}
    speaks: bool = False
    device: str = "cpu"

    def load(self, settings: Settings) -> DecoderKind:
        return self

    @property
    def identity(self) -> str:
        """What the decoder's output depends on besides the code: its name, and for a kind with
        weights, which weights (the result cache keys on it)."""
        return self.name

    def prepare(self, framing: Framing, rig: Rig, options: GenerateOptions) -> PreparedDecoder:
        """Set up the decoder for one portrait and one request's options."""
        raise NotImplementedError(f"the {self.name} decoder renders from audio (speak), not from motion")

    def speak(
        self,
        framing: Framing,
        wav: np.ndarray,
        n_frames: int,
        options: GenerateOptions,
        progress: Callable[[str, float], None],
    ) -> SpokenVideo:
        """The frames of the portrait speaking `wav` (mono, media.SAMPLE_RATE); progress(stage, 0-1)."""
        raise NotImplementedError(f"the {self.name} decoder renders from motion (prepare), not from audio")

    def unused(self, options: GenerateOptions) -> tuple[str, ...]:
        """The parameters `options` sets away from their declared defaults that this kind ignores."""
        return tuple(
            name for name, p in parameters().items() if name not in self.honours and getattr(options, name) != p.default
        )


def register(kind: DecoderKind) -> DecoderKind:
    """Make `kind` available under `kind.name` (a later registration of the name replaces it).
    ValueError when `kind.meanings` explains a parameter the kind does not honour: a meaning
    there would describe what the decoder never does."""
    stray = sorted(set(kind.meanings) - kind.honours)
    if stray:
        raise ValueError(f"the {kind.name} decoder gives meanings to parameters it does not honour: {stray}")
    _REGISTRY[kind.name] = kind
    return kind


def get_decoder(name: str) -> DecoderKind:
    """The kind registered as `name`; InvalidParameter (field "decoder") naming the available
    kinds when there is none."""
    if name not in _REGISTRY and name in KNOWN:
        importlib.import_module(KNOWN[name])
    if name not in _REGISTRY:
        raise InvalidParameter(f"unknown decoder {name!r}; available: {', '.join(available())}", field="decoder")
    return _REGISTRY[name]


def available() -> list[str]:
    """Names of the kinds that can be chosen, sorted."""
    return sorted(set(_REGISTRY) | set(KNOWN))


def all_parameters() -> frozenset[str]:
    """Every generation parameter: what a kind that ignores none of them honours."""
    return frozenset(parameters())


def describe_parameters(kind: DecoderKind) -> dict[str, dict]:
    """Every generation parameter, in declaration order, as `kind` sees it: {name: {"honoured":
    bool, "meaning": str}}, the meaning being the kind's own sentence where it gives one, else
    the parameter's generic description (sonic/options.py)."""
    return {
        name: {"honoured": name in kind.honours, "meaning": kind.meanings.get(name, p.description)}
        for name, p in parameters().items()
    }


def parameter_schema(settings: Settings, kind: DecoderKind) -> dict[str, dict]:
    """options.schema as `kind` sees it: each parameter's description is what it means for this
    kind, and `honoured` says whether the kind uses it at all (what /api/sonic/params, the
    OpenAPI document and the demo page show)."""
    from ..options import schema

    described = describe_parameters(kind)
    return {
        name: {**entry, "description": described[name]["meaning"], "honoured": described[name]["honoured"]}
        for name, entry in schema(settings).items()
    }


def choose_decoder(settings: Settings) -> str:
    """The decoder the `decoder` setting means: `auto` is `sonic` when torch sees CUDA and
    `sonic_checkpoints` is a complete folder, else `warp` (torch is imported only to ask then)."""
    if settings.decoder != "auto":
        return settings.decoder
    from .sonic.layout import is_complete

    if not is_complete(settings.sonic_checkpoints) or settings.device == "cpu":
        return "warp"
    import torch

    return "sonic" if torch.cuda.is_available() else "warp"
