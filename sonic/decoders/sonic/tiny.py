"""A tiny, randomly initialised Sonic model of the real architecture, written as a checkpoint
folder in the official layout: for tests and for trying the `sonic` decoder's plumbing on a
machine without the real weights (its videos are noise, not faces).

    python scripts/make_tiny_checkpoints.py DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .layout import SVD
from .unet import AudioContext, build_unet

UNET: dict[str, Any] = {
    "block_out_channels": [32, 32, 32, 32],
    "num_attention_heads": [2, 2, 2, 2],
    "cross_attention_dim": 32,
    "in_channels": 8,
    "out_channels": 4,
    "layers_per_block": 1,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 24,
    "num_frames": 25,
    "transformer_layers_per_block": 1,
    "_class_name": "UNetSpatioTemporalConditionModel",
}
SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "use_karras_sigmas": True,
    "sigma_min": 0.002,
    "sigma_max": 700.0,
    "timestep_spacing": "leading",
    "timestep_type": "continuous",
    "steps_offset": 1,
    "interpolation_type": "linear",
}


def write_tiny_checkpoints(root: str | Path, seed: int = 0, pth: bool = True, rife: bool = False) -> Path:
    """Write the tiny model under `root` (created); `.pth` files as the official ones are, or
    `.safetensors` with pth=False. With `rife`, also RIFE/flownet.pkl: the published network's
    own sizes (it is small), random weights, keys with the published file's "module." prefix."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    root = Path(root)
    torch.manual_seed(seed)
    svd = root / SVD
    (svd / "unet").mkdir(parents=True, exist_ok=True)
    (svd / "unet" / "config.json").write_text(json.dumps(UNET, indent=1))
    (svd / "scheduler").mkdir(parents=True, exist_ok=True)
    (svd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    # six levels: 32x smaller latents than frames (SVD's VAE: 8x), so a 256 px frame is 8x8 latents
    AutoencoderKLTemporalDecoder(
        block_out_channels=(32,) * 6,
        down_block_types=("DownEncoderBlock2D",) * 6,
        layers_per_block=1,
        latent_channels=4,
    ).save_pretrained(str(svd / "vae"))  # type: ignore[attr-defined]  # diffusers' types name its no-torch dummy class
    clip = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=32,
    )
    CLIPVisionModelWithProjection(clip).save_pretrained(str(svd / "image_encoder"))
    whisper = WhisperConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=8,
        vocab_size=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
    )
    WhisperModel(whisper).save_pretrained(str(root / "whisper-tiny"))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(root / "whisper-tiny"))
    blocks, channels, dim, tokens, hidden, embed = 2, 16, UNET["cross_attention_dim"], 4, 32, 32
    linear = lambda i, o: {"weight": torch.randn(o, i) / i**0.5, "bias": torch.zeros(o)}  # noqa: E731
    a2t = {
        f"proj{n}.{k}": v
        for n, (i, o) in enumerate([(10 * blocks * channels, hidden), (hidden, hidden), (hidden, tokens * dim)], 1)
        for k, v in linear(i, o).items()
    }
    a2t.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)})
    a2b = {
        f"proj{n}.{k}": v
        for n, (i, o) in enumerate([(50 * channels + embed, hidden), (hidden, hidden), (hidden, 2)], 1)
        for k, v in linear(i, o).items()
    }
    unet = build_unet(UNET, svd / "unet" / "config.json", AudioContext()).state_dict()
    (root / "Sonic").mkdir(parents=True, exist_ok=True)
    for name, state in (("unet", unet), ("audio2token", a2t), ("audio2bucket", a2b)):
        state = {k: v.contiguous() for k, v in state.items()}
        if pth:
            torch.save(state, root / "Sonic" / f"{name}.pth")
        else:
            from safetensors.torch import save_file

            save_file(state, str(root / "Sonic" / f"{name}.safetensors"))
    if rife:
        write_tiny_rife(root / "RIFE" / "flownet.pkl", seed)
    return root


def write_tiny_rife(path: Path, seed: int = 0) -> Path:
    """RIFE/flownet.pkl at the published network's sizes (it is small), random weights, keys with
    the published file's "module." prefix."""
    from .rife import Interpolator

    torch.manual_seed(seed + 1)
    net = Interpolator(11, 90, 14, 90)
    for m in net.modules():  # small weights: the random flow stays near zero
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            torch.nn.init.normal_(m.weight, std=0.01)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    return path
