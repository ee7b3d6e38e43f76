"""The spatio-temporal UNet of Stable Video Diffusion with audio cross-attention.

The UNet is diffusers' `UNetSpatioTemporalConditionModel`, built from the folder's
`unet/config.json`. Every cross-attention (`attn2`, spatial and temporal) gets an
`AudioAttention` processor holding two bias-free projections of the audio tokens
(`to_k_ip.0`, `to_v_ip.0`, IP-adapter style; their names are the checkpoint's keys). It adds a
second attention of the same queries over the audio tokens to the image attention:

- spatial blocks (queries: one frame's positions): the frame's own audio tokens, weighted by
  the face mask resized to the block's grid, so sound moves the face and not the background;
- temporal blocks (queries: one position across the window's frames): the window's audio
  tokens averaged over its frames, unmasked.

The audio tokens and the mask of the current call are set on one shared `AudioContext` before
the UNet runs (`context.use(...)`), so diffusers' own forward pass is used unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SetupError


@dataclass
class AudioContext:
    tokens: torch.Tensor | None = None  # (batch * frames, T, dim)
    frames: int = 1
    mask: torch.Tensor | None = None  # (1, 1, H, W) in [0, 1], the face region in pixels
    scale: float = 1.0

    def use(self, tokens: torch.Tensor | None, frames: int, mask: torch.Tensor | None) -> "AudioContext":
        self.tokens, self.frames, self.mask = tokens, frames, mask
        return self


def _mask_for(mask: torch.Tensor, queries: int, dtype: torch.dtype) -> torch.Tensor:
    """The pixel mask resized (bicubic) to the grid of `queries` tokens: (1, queries, 1)."""
    h, w = mask.shape[-2:]
    gh, gw = h, w
    while gh * gw > queries and gh > 1:  # each level halves the grid (rounding up)
        gh, gw = (gh + 1) // 2, (gw + 1) // 2
    if gh * gw != queries:  # not a grid of this mask: no masking
        return torch.ones((1, queries, 1), dtype=dtype, device=mask.device)
    small = F.interpolate(mask.float(), size=(gh, gw), mode="bicubic", align_corners=False)
    return small.reshape(1, queries, 1).to(dtype)


class AudioAttention(nn.Module):
    """Cross-attention over the image embedding plus a face-masked attention over audio tokens."""

    def __init__(self, hidden: int, context_dim: int, context: AudioContext, temporal: bool):
        super().__init__()
        self.to_k_ip = nn.ModuleList([nn.Linear(context_dim, hidden, bias=False)])
        self.to_v_ip = nn.ModuleList([nn.Linear(context_dim, hidden, bias=False)])
        self._context = [context]  # a list: not a submodule, not in the state dict
        self.temporal = temporal

    @staticmethod
    def _attend(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, heads = q.shape[0], attn.heads
        split = lambda x: x.reshape(n, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).reshape(n, -1, heads * out.shape[-1])

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        ctx = self._context[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states)
        out = self._attend(attn, q, attn.to_k(context), attn.to_v(context))
        if ctx.tokens is not None:
            tokens = ctx.tokens.to(q.dtype)
            if self.temporal:  # queries are (batch * positions, frames): the window's mean tokens
                batch = tokens.shape[0] // ctx.frames
                mean = tokens.reshape(batch, ctx.frames, *tokens.shape[1:]).mean(1)
                tokens = mean.repeat_interleave(q.shape[0] // batch, dim=0)
            audio = self._attend(attn, q, self.to_k_ip[0](tokens), self.to_v_ip[0](tokens))
            if not self.temporal and ctx.mask is not None:
                audio = audio * _mask_for(ctx.mask, q.shape[1], audio.dtype)
            out = out + ctx.scale * audio
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def read_config(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SetupError(f"{path}: not a readable JSON config ({e})") from e


def build_unet(config: dict, config_path: Path, context: AudioContext, device="cpu") -> nn.Module:
    """The UNet of `config` (random weights, on `device`; "meta" builds it without memory) with
    an AudioAttention on every attn2; the audio tokens' width is the config's cross_attention_dim."""
    from diffusers import UNetSpatioTemporalConditionModel

    try:
        with torch.device(device):
            unet = UNetSpatioTemporalConditionModel.from_config(config)
    except Exception as e:  # noqa: BLE001
        raise SetupError(f"{config_path}: not a spatio-temporal UNet config ({type(e).__name__}: {e})") from e
    context_dim = unet.config.cross_attention_dim
    if not isinstance(context_dim, int):
        raise SetupError(f"{config_path}: cross_attention_dim must be one number, got {context_dim!r}")
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            temporal = ".temporal_transformer_blocks." in name
            with torch.device(device):
                module.set_processor(AudioAttention(module.to_q.out_features, context_dim, context, temporal))
    return unet
