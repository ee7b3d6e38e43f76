"""Frame interpolation with RIFE (Huang et al., "Real-Time Intermediate Flow Estimation for Video
Frame Interpolation", ECCV 2022), the HDv3 flow network that Sonic ships as `RIFE/flownet.pkl`:
the model makes 12.5 frames a second, and RIFE puts a frame between each pair (25 a second).

The network: three flow blocks, coarse to fine (the frames at 1/4, 1/2 and full size). Each block
sees both frames warped by the flow so far and the blend mask, and adds a correction to the two
flows (middle -> each frame) and to the mask; each block runs both ways (frame 0 first, then
frame 1 first) and the two answers are averaged. The middle frame is the two frames warped to
the middle, blended by the mask. The checkpoint also holds a fourth, "teacher" block used in
training only: it is loaded (the key check is exact) and never run.

Sizes come from the checkpoint's tensors: a block's input channels and width are read from its
first convolutions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_into, load_state, shape_of

SCALES = (4, 2, 1)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=True), nn.PReLU(cout))


def _up(cin: int, mid: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.ConvTranspose2d(cin, mid, 4, 2, 1), nn.PReLU(mid), nn.ConvTranspose2d(mid, cout, 4, 2, 1))


def _resize(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return x
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False, recompute_scale_factor=False)


class FlowBlock(nn.Module):
    """Frames, mask and flow at 1/scale -> corrections to the flow (4 channels) and mask (1)."""

    def __init__(self, cin: int, width: int):
        super().__init__()
        self.conv0 = nn.Sequential(_conv(cin, width // 2, 2), _conv(width // 2, width, 2))
        for i in range(4):
            setattr(self, f"convblock{i}", nn.Sequential(_conv(width, width), _conv(width, width)))
        self.conv1 = _up(width, width // 2, 4)
        self.conv2 = _up(width, width // 2, 1)

    def forward(self, x: torch.Tensor, flow: torch.Tensor, scale: float):
        x, flow = _resize(x, 1 / scale), _resize(flow, 1 / scale) / scale
        feat = self.conv0(torch.cat([x, flow], 1))
        for i in range(4):
            feat = feat + getattr(self, f"convblock{i}")(feat)
        return _resize(self.conv1(feat), scale) * scale, _resize(self.conv2(feat), scale)


def backward_warp(img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """`img` sampled at each pixel + flow (pixels), bilinear, edges held."""
    n, _, h, w = img.shape
    ys, xs = torch.meshgrid(
        torch.linspace(-1, 1, h, device=img.device), torch.linspace(-1, 1, w, device=img.device), indexing="ij"
    )
    gx = xs[None] + flow[:, 0] / ((w - 1) / 2)
    gy = ys[None] + flow[:, 1] / ((h - 1) / 2)
    return F.grid_sample(img, torch.stack([gx, gy], -1), mode="bilinear", padding_mode="border", align_corners=True)


class Interpolator(nn.Module):
    def __init__(self, cin: int, width: int, teacher_cin: int, teacher_width: int):
        super().__init__()
        self.block0, self.block1, self.block2 = (FlowBlock(cin, width) for _ in range(3))
        self.block_tea = FlowBlock(teacher_cin, teacher_width)

    @torch.no_grad()
    def middle(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        """The frame halfway between img0 and img1, (N, 3, H, W) in [0, 1]."""
        n, _, h, w = img0.shape
        flow = img0.new_zeros((n, 4, h, w))
        mask = img0.new_zeros((n, 1, h, w))
        warped0, warped1 = img0, img1
        for block, scale in zip((self.block0, self.block1, self.block2), SCALES, strict=True):
            f0, m0 = block(torch.cat([warped0, warped1, mask], 1), flow, scale)
            f1, m1 = block(torch.cat([warped1, warped0, -mask], 1), torch.cat([flow[:, 2:], flow[:, :2]], 1), scale)
            flow = flow + (f0 + torch.cat([f1[:, 2:], f1[:, :2]], 1)) / 2
            mask = mask + (m0 - m1) / 2
            warped0, warped1 = backward_warp(img0, flow[:, :2]), backward_warp(img1, flow[:, 2:])
        weight = torch.sigmoid(mask)
        return (warped0 * weight + warped1 * (1 - weight)).clamp(0, 1)


def load_interpolator(path: Path, device: torch.device, allow_unsafe_pickle: bool = False) -> Interpolator:
    """RIFE from `path` (flownet.pkl or .safetensors); the published file's keys carry a
    "module." prefix (saved from a data-parallel wrapper): it is taken off."""
    state = load_state(path, allow_unsafe_pickle)
    if any(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items() if k.startswith("module.")}
    cin = shape_of(state, "block0.conv0.0.0.weight", path)[1]
    width = shape_of(state, "block0.conv0.1.0.weight", path)[0]
    t_cin = shape_of(state, "block_tea.conv0.0.0.weight", path)[1]
    t_width = shape_of(state, "block_tea.conv0.1.0.weight", path)[0]
    net = Interpolator(cin, width, t_cin, t_width)
    return load_into(net, state, path).to(device).eval()
