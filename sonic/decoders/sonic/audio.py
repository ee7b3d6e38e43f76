"""The audio side of the Sonic model: whisper encoder features (every hidden state, 50 per
second), the audio-to-token projection (audio cross-attention tokens per frame) and the
audio-to-bucket projection (the two motion micro-conditions per frame).

Every size is read from the whisper folder's config.json and from the checkpoint tensors'
shapes, so a model of the same architecture at any size loads the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...errors import SetupError
from .weights import load_into, shape_of

GENERATED_FPS = 12.5  # the model makes a frame per 80 ms (4 whisper frames); docs/gpu.md


class AudioToTokens(nn.Module):
    """(N, seq_len, blocks, channels) whisper features around a frame -> (N, tokens, dim)."""

    def __init__(self, in_dim: int, hidden: int, dim: int, tokens: int):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.proj1 = nn.Linear(in_dim, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.proj1(x.flatten(1)))
        x = F.relu(self.proj2(x))
        return self.norm(self.proj3(x).reshape(-1, self.tokens, self.dim))


class AudioToBucket(nn.Module):
    """(N, seq_len, 1, channels) last-layer features around a frame + (N, E) image embedding ->
    (N, 2): the frame's two motion micro-conditions, before scaling."""

    def __init__(self, in_dim: int, hidden: int, outputs: int):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, hidden)
        self.proj2 = nn.Linear(hidden, hidden)
        self.proj3 = nn.Linear(hidden, outputs)

    def forward(self, audio: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        x = torch.cat([audio.flatten(1), image_embeds.to(audio.dtype)], dim=1)
        return self.proj3(F.silu(self.proj2(F.silu(self.proj1(x)))))


def audio_to_tokens(state: dict, path: Path, blocks: int, channels: int) -> tuple[AudioToTokens, int]:
    """The module for `state` (audio2token) and its window length in whisper frames."""
    hidden, in_dim = shape_of(state, "proj1.weight", path)
    (dim,) = shape_of(state, "norm.weight", path)
    out3 = shape_of(state, "proj3.weight", path)[0]
    if in_dim % (blocks * channels) or out3 % dim:
        raise SetupError(
            f"{path}: key 'proj1.weight' has {in_dim} inputs, not a multiple of the whisper "
            f"features' {blocks} x {channels} per frame"
        )
    module = AudioToTokens(in_dim, hidden, dim, out3 // dim)
    return load_into(module, state, path).eval(), in_dim // (blocks * channels)


def audio_to_bucket(state: dict, path: Path, channels: int, embed_dim: int) -> tuple[AudioToBucket, int]:
    """The module for `state` (audio2bucket) and its window length in whisper frames."""
    hidden, in_dim = shape_of(state, "proj1.weight", path)
    outputs = shape_of(state, "proj3.weight", path)[0]
    if (in_dim - embed_dim) <= 0 or (in_dim - embed_dim) % channels:
        raise SetupError(
            f"{path}: key 'proj1.weight' has {in_dim} inputs, which is not whisper's {channels} "
            f"channels per frame times a window plus the image embedding's {embed_dim}"
        )
    module = AudioToBucket(in_dim, hidden, outputs)
    return load_into(module, state, path).eval(), (in_dim - embed_dim) // channels


class WhisperFeatures:
    """Every hidden state of whisper's encoder for a 16 kHz waveform: (T, layers + 1, channels)
    at 50 frames a second, in 30 s chunks as whisper was trained."""

    def __init__(self, folder: Path, device: torch.device):
        from transformers import WhisperFeatureExtractor, WhisperModel

        try:
            self.extractor = WhisperFeatureExtractor.from_pretrained(str(folder), local_files_only=True)
            model = WhisperModel.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise SetupError(f"{folder}: the whisper model does not load ({type(e).__name__}: {str(e)[:200]})") from e
        self.encoder = model.encoder.to(device).eval()  # type: ignore[arg-type]  # transformers types `to` as unbound
        del model
        self.device = device
        cfg = self.encoder.config
        self.blocks, self.channels = cfg.encoder_layers + 1, cfg.d_model
        self.chunk = self.extractor.n_samples  # samples per 30 s window
        self.frames_per_chunk = cfg.max_source_positions  # encoder frames per window
        self.rate = self.frames_per_chunk * self.extractor.sampling_rate / self.chunk  # 50 per second

    @torch.no_grad()
    def __call__(self, wav: np.ndarray) -> torch.Tensor:
        out = []
        for start in range(0, max(1, len(wav)), self.chunk):
            piece = wav[start : start + self.chunk]
            inputs = self.extractor(piece, sampling_rate=self.extractor.sampling_rate, return_tensors="pt")
            states = self.encoder(inputs.input_features.to(self.device), output_hidden_states=True).hidden_states
            out.append(torch.stack(states, dim=2)[0])  # (frames, blocks, channels)
        feats = torch.cat(out, dim=0)
        # whole 25 fps frames of audio only, as the model was trained (at 16 kHz: 2 * (samples // 640))
        keep = len(wav) * 25 // self.extractor.sampling_rate * int(round(self.rate / 25))
        return feats[:keep].float()


def windows(feats: torch.Tensor, n: int, stride: float, length: int) -> torch.Tensor:
    """(n, length, ...) windows of `feats` (T, ...): window i starts at frame
    round(i * stride) - (length // 2 - 1); frames outside the recording are zeros."""
    left = length // 2 - 1
    starts = torch.round(torch.arange(n, dtype=torch.float64) * stride).long() - left
    pad = torch.zeros((left + length + 1, *feats.shape[1:]), dtype=feats.dtype, device=feats.device)
    padded = torch.cat(
        [
            pad,
            feats,
            pad,
            torch.zeros((int(np.ceil(n * stride)),) + tuple(feats.shape[1:]), dtype=feats.dtype, device=feats.device),
        ]
    )
    idx = (starts + len(pad))[:, None] + torch.arange(length)[None, :]
    return padded[idx]
