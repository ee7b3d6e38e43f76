"""Reading checkpoint tensors safely, and fitting them to a module with errors that name the file
and the first offending key (never a traceback from deep inside torch)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from ...errors import SetupError

M = TypeVar("M", bound=nn.Module)


def load_state(path: Path, allow_unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from `.safetensors`, or from a `.pth`/`.pkl` read with weights_only=True.

    Some published `.pth` files hold more than tensors and need full pickle, which can run code
    from the file: that fallback happens only with `allow_unsafe_pickle` (a setting)."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            try:
                # memory-mapped: a 6 GB UNet file is not read into memory twice on its way to the GPU
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except pickle.UnpicklingError as e:
                if "unsupported global" not in str(e).lower():  # not a class it refused: no checkpoint
                    raise
                if not allow_unsafe_pickle:
                    raise SetupError(
                        f"{path}: holds more than tensors and would need full pickle, which can run code from "
                        "the file; convert it (scripts/convert_checkpoints.py) or, for a file you trust, set "
                        "allow_unsafe_pickle"
                    ) from e
                state = torch.load(path, map_location="cpu", weights_only=False)
    except SetupError:
        raise
    except Exception as e:  # noqa: BLE001 - a bad file, said plainly
        raise SetupError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {str(e)[:200]})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if allow_unsafe_pickle and isinstance(state, dict):  # what full pickle brought beside the tensors
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if isinstance(state, dict):
        state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SetupError(f"{path}: is not a mapping of tensor names to tensors")
    return state


def check_fit(expected: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor], path: Path) -> None:
    """SetupError naming `path` and the first key that is missing, unexpected or of another shape
    than `expected` (name -> shape, in the model's order)."""
    for key, shape in expected.items():
        if key not in state:
            raise SetupError(f"{path}: missing key {key!r} ({len(set(expected) - set(state))} missing in all)")
        if tuple(state[key].shape) != tuple(shape):
            raise SetupError(f"{path}: key {key!r} has shape {tuple(state[key].shape)}, the model needs {tuple(shape)}")
    extra = [k for k in state if k not in expected]
    if extra:
        raise SetupError(f"{path}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all)")


def load_into(module: M, state: dict[str, torch.Tensor], path: Path) -> M:
    """Fit `state` to `module` exactly (see check_fit), then copy it in."""
    check_fit({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, path)
    module.load_state_dict(state, strict=True)
    return module


def shape_of(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    """The shape of `state[key]`, or SetupError naming the file and the key."""
    if key not in state:
        raise SetupError(f"{path}: missing key {key!r}")
    return tuple(state[key].shape)
