"""The Sonic model loaded from its checkpoint folder, and its sampler.

Sampling, per request (docs/gpu.md has the figures and what each parameter does):
1. audio: whisper features -> per generated frame (12.5 a second) audio tokens, and motion
   buckets from ~1 s around the frame and the portrait's image embedding;
2. image: the portrait's CLIP image embedding, its VAE latents, the face mask;
3. latents: the portrait's latents plus noise at the first sigma, for every generated frame;
4. Euler steps (the scheduler's Karras sigmas; v- or epsilon-prediction from its config). Each
   step denoises the frames in windows of the UNet's `num_frames`, wrapping around the clip;
   the windows start 7 frames further on at each step, so no seam stays in place, and frames
   that two windows cover are averaged. Every UNet call runs three branches at once: no image
   and silent audio, image and silent audio, image and the audio; the guided prediction is
   u + 2.0 (a - u) + 7.5 motion_scale (c - a);
5. the VAE decodes the latents a few frames at a time, and the frames are retimed from 12.5 to
   the requested fps (a cross-fade between the two nearest generated frames) as they come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch

from ...errors import SetupError
from .audio import GENERATED_FPS, WhisperFeatures, audio_to_bucket, audio_to_tokens, windows
from .layout import HF_WEIGHTS, Layout, checked_layout
from .unet import AudioContext, build_unet, read_config
from .weights import check_fit, load_state

IMAGE_GUIDANCE = 2.0  # the reference image's guidance
AUDIO_GUIDANCE = 7.5  # the audio's guidance, times motion_scale
SHIFT_PER_STEP = 7  # frames the window grid moves at each step
BUCKET_SCALE, BUCKET_OFFSET = 16.0, 16.0  # audio2bucket's output -> SVD's micro-condition range
FACE_AREA = 1.1  # the face mask: the face box enlarged this much
DECODE_CHUNK = 8  # frames the VAE decodes at once
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's own normalisation, unless the folder says otherwise
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
Progress = Callable[[int, int], None]  # (UNet calls done, UNet calls in all)


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("device cuda is set but torch sees no CUDA device (docs/gpu.md: torch's CUDA build)")
        return torch.device("cuda")
    return torch.device("cpu")


def _pretrained(cls, folder: Path, **kw):
    """`cls.from_pretrained(folder)` from local files only, fp16 variant when that is what is there."""
    variant = None
    if not any((folder / w).is_file() for w in HF_WEIGHTS if ".fp16." not in w):
        variant = "fp16"
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, variant=variant, **kw)
    except Exception as e:  # noqa: BLE001
        raise SetupError(f"{folder}: does not load as {cls.__name__} ({type(e).__name__}: {str(e)[:300]})") from e


@dataclass
class Conditioning:
    tokens: torch.Tensor  # (N, T, D) audio tokens per generated frame
    silent: torch.Tensor  # (1, T, D) the tokens of silence
    buckets: torch.Tensor  # (N, 2) motion micro-conditions
    embeds: torch.Tensor  # (1, E) image embedding
    ref_latents: torch.Tensor  # (1, C, h, w) scaled VAE mean of the portrait
    image_latents: torch.Tensor  # (1, C, h, w) unscaled VAE mode (the UNet's extra input channels)
    mask: torch.Tensor  # (1, 1, H, W) face region


class SonicModel:
    """Everything the folder holds, loaded once (fp16 on CUDA, fp32 on the CPU, unless `dtype`
    says otherwise: scripts/gpu_check.py measures fp32 on CUDA too)."""

    def __init__(
        self,
        folder: str | Path | None,
        device: str = "auto",
        allow_unsafe_pickle: bool = False,
        dtype: torch.dtype | None = None,
    ):
        from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler
        from transformers import CLIPVisionModelWithProjection

        layout = self.layout = checked_layout(folder)
        self.device = pick_device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.whisper = WhisperFeatures(layout.whisper, self.device)
        self.clip = (
            _pretrained(CLIPVisionModelWithProjection, layout.image_encoder, dtype=self.dtype).to(self.device).eval()
        )
        self.clip_size = int(self.clip.config.image_size)
        self.clip_mean, self.clip_std = self._clip_normalisation(layout)
        self.vae = _pretrained(AutoencoderKLTemporalDecoder, layout.vae, torch_dtype=self.dtype).to(self.device).eval()
        if self.device.type == "cpu":  # the decoder only: the encoder runs once, on one frame
            convolutions_channels_last(self.vae.decoder)
        try:
            self.scheduler_config = EulerDiscreteScheduler.load_config(str(layout.scheduler), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise SetupError(f"{layout.scheduler}: no readable scheduler config ({e})") from e
        self.prediction = self.scheduler_config.get("prediction_type", "epsilon")
        if self.prediction not in ("v_prediction", "epsilon"):
            raise SetupError(f"{layout.scheduler}: prediction_type {self.prediction!r} is not supported")
        embed_dim = int(self.clip.config.projection_dim)
        path = layout.weights("audio2token")
        self.audio2token, self.token_window = audio_to_tokens(
            load_state(path, allow_unsafe_pickle), path, self.whisper.blocks, self.whisper.channels
        )
        path = layout.weights("audio2bucket")
        self.audio2bucket, self.bucket_window = audio_to_bucket(
            load_state(path, allow_unsafe_pickle), path, self.whisper.channels, embed_dim
        )
        self.audio2token.to(self.device)
        self.audio2bucket.to(self.device)
        self.unet = self._load_unet(layout, allow_unsafe_pickle)
        self.window = int(self.unet.config.num_frames)
        if self.unet.config.cross_attention_dim != self.audio2token.dim:
            raise SetupError(
                f"{layout.weights('audio2token')}: makes tokens of {self.audio2token.dim}, the UNet's "
                f"cross_attention_dim is {self.unet.config.cross_attention_dim}"
            )
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.rife = None
        if layout.rife is not None:  # optional: a frame between each pair (25 a second)
            from .rife import load_interpolator

            self.rife = load_interpolator(layout.rife, self.device, allow_unsafe_pickle)
        self.unet_calls = 0  # counted, for tests and benchmarks

    def _clip_normalisation(self, layout: Layout):
        pre = layout.root / "stable-video-diffusion-img2vid-xt" / "feature_extractor" / "preprocessor_config.json"
        if pre.is_file():
            cfg = read_config(pre)
            return tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))
        return CLIP_MEAN, CLIP_STD

    def _load_unet(self, layout: Layout, allow_unsafe_pickle: bool):
        self.context = AudioContext()
        unet = build_unet(read_config(layout.unet_config), layout.unet_config, self.context, device="meta")
        path = layout.weights("unet")
        state = load_state(path, allow_unsafe_pickle)
        check_fit({k: tuple(v.shape) for k, v in unet.state_dict().items()}, state, path)
        unet.load_state_dict(state, strict=True, assign=True)
        return unet.to(self.device, self.dtype).eval()

    # -- one request -----------------------------------------------------------------------
    @torch.no_grad()
    def condition(
        self,
        frame: np.ndarray,
        face_box: tuple[float, float, float, float],
        wav: np.ndarray,
        n_generated: int,
        dynamic_scale: float,
        generator: torch.Generator,
    ) -> Conditioning:
        dev, dt = self.device, self.dtype
        clip_in = cv2.resize(frame, (self.clip_size, self.clip_size), interpolation=cv2.INTER_AREA)
        clip_in = (clip_in.astype(np.float32) / 255.0 - np.array(self.clip_mean, np.float32)) / np.array(
            self.clip_std, np.float32
        )
        pixels = torch.from_numpy(clip_in).permute(2, 0, 1)[None].to(dev, dt)
        embeds = self.clip(pixel_values=pixels).image_embeds  # (1, E)

        feats = self.whisper(wav).to(dev)  # (T, blocks, ch), 50 a second
        stride = self.whisper.rate / GENERATED_FPS
        tok_in = windows(feats, n_generated, stride, self.token_window)
        tokens = self.audio2token(tok_in)
        silent = self.audio2token(torch.zeros_like(tok_in[:1]))
        bucket_in = windows(feats[:, -1:], n_generated, stride, self.bucket_window)
        buckets = self.audio2bucket(bucket_in, embeds.float().expand(n_generated, -1))
        buckets = (buckets * BUCKET_SCALE + BUCKET_OFFSET) * dynamic_scale

        ref = torch.from_numpy(frame).permute(2, 0, 1)[None].to(dev, torch.float32) / 127.5 - 1.0
        ref = ref.to(dt)
        torch.randn(ref.shape, generator=generator, device=generator.device)  # the noise-augmentation draw (strength 0)
        posterior = self.vae.encode(ref).latent_dist
        ref_latents = posterior.mean * self.vae.config.scaling_factor
        image_latents = posterior.mode()

        h, w = frame.shape[:2]
        x0, y0, x1, y1 = face_box
        cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) * FACE_AREA / 2, (y1 - y0) * FACE_AREA / 2
        mask = torch.zeros((1, 1, h, w), dtype=dt, device=dev)
        mask[
            ...,
            max(0, int(cy - hh)) : min(h, int(math.ceil(cy + hh))),
            max(0, int(cx - hw)) : min(w, int(math.ceil(cx + hw))),
        ] = 1
        return Conditioning(
            tokens.to(dt), silent.to(dt), buckets.float(), embeds.to(dt), ref_latents.to(dt), image_latents.to(dt), mask
        )

    @torch.no_grad()
    def denoise(
        self,
        cond: Conditioning,
        n: int,
        steps: int,
        motion_scale: float,
        generator: torch.Generator,
        progress: Progress | None = None,
    ) -> torch.Tensor:
        """The latents of n generated frames, (n, C, h, w)."""
        from diffusers import EulerDiscreteScheduler

        dev, dt, F = self.device, self.dtype, self.window
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(steps, device=dev)
        sigmas, timesteps = scheduler.sigmas.to(dev, torch.float32), scheduler.timesteps
        c, h, w = cond.ref_latents.shape[1:]
        noise = torch.randn((n, c, h, w), generator=generator, device=generator.device, dtype=torch.float32).to(dev)
        latents = (cond.ref_latents.float() + sigmas[0] * noise).to(dt)
        image = torch.cat(
            [torch.zeros_like(cond.image_latents), cond.image_latents, cond.image_latents]
        )  # (3, C, h, w)
        embeds = torch.cat([torch.zeros_like(cond.embeds), cond.embeds, cond.embeds])[:, None]  # (3, 1, E)
        starts = list(range(0, n, F))
        total, done = steps * len(starts), 0
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            acc = torch.zeros((n, c, h, w), dtype=torch.float32, device=dev)
            count = torch.zeros((n, 1, 1, 1), dtype=torch.float32, device=dev)
            for s in starts:
                idx = (torch.arange(F, device=dev) + s - SHIFT_PER_STEP * i) % n
                x = latents[idx].float()
                scaled = (x / torch.sqrt(sigma**2 + 1)).to(dt)
                sample = torch.cat([torch.stack([scaled] * 3), image[:, None].expand(3, F, c, h, w)], dim=2)
                mb = cond.buckets[idx].mean(0)  # buckets and idx are both on the device
                time_ids = torch.tensor([[GENERATED_FPS, float(mb[0]), float(mb[1])]], dtype=dt, device=dev).repeat(
                    3, 1
                )
                tokens = torch.cat([cond.silent.expand(F, -1, -1), cond.silent.expand(F, -1, -1), cond.tokens[idx]])
                self.context.use(tokens, F, cond.mask)
                out = self.unet(sample, timesteps[i], encoder_hidden_states=embeds, added_time_ids=time_ids).sample
                self.unet_calls += 1
                u, a, cnd = out.float().chunk(3)
                pred = u[0] + IMAGE_GUIDANCE * (a[0] - u[0]) + AUDIO_GUIDANCE * motion_scale * (cnd[0] - a[0])
                if self.prediction == "v_prediction":
                    x0 = -sigma / torch.sqrt(sigma**2 + 1) * pred + x / (sigma**2 + 1)
                else:
                    x0 = x - sigma * pred
                x_next = x + (x - x0) / sigma * (sigma_next - sigma)
                acc.index_add_(0, idx, x_next)
                count.index_add_(0, idx, torch.ones((F, 1, 1, 1), device=dev))
                done += 1
                if progress:
                    progress(done, total)
            latents = (acc / count).to(dt)
        self.context.use(None, 1, None)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Frames (k, H, W, 3) uint8, DECODE_CHUNK at a time."""
        for s in range(0, len(latents), DECODE_CHUNK):
            chunk = latents[s : s + DECODE_CHUNK] / self.vae.config.scaling_factor
            frames = self.vae.decode(chunk, num_frames=len(chunk)).sample.float()
            frames = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
            yield frames.cpu().numpy()

    @torch.no_grad()
    def doubled(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """RIFE's middle frame between each pair of consecutive frames: I0, M0, I1, ..., I(n-1)
        (2n - 1 frames, twice the rate), streamed chunk by chunk."""
        assert self.rife is not None  # called only with RIFE loaded (kind.py)
        prev = None
        for chunk in chunks:
            frames = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float() / 255
            if prev is not None:
                frames = torch.cat([prev, frames])
            mids = self.rife.middle(frames[:-1], frames[1:]) if len(frames) > 1 else frames[:0]
            out = torch.stack([frames[:-1], mids], 1).flatten(0, 1)  # I, M, I, M, ...
            if len(out):
                yield (out * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            prev = frames[-1:]
        if prev is not None:
            yield (prev * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def convolutions_channels_last(module: torch.nn.Module) -> None:
    """A module's 2-D convolution weights in channels-last order, the layout oneDNN's CPU kernels
    are fastest in (the tiny model's VAE decodes 8 frames of 1024x512 in 16 s instead of 23 s on
    2 cores, frames within 1 level: the sums' order differs); 3-D convolutions have no such
    layout and stay as they are."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it


def generated_count(n_out: int, fps: float) -> int:
    """Generated frames (12.5 a second) that cover n_out frames at fps."""
    return max(1, int(math.ceil((n_out - 1) * GENERATED_FPS / fps)) + 1)


def retime(
    chunks: Iterator[np.ndarray], n_out: int, fps: float, blend: bool = True, source_fps: float = GENERATED_FPS
) -> Iterator[np.ndarray]:
    """Frames at source_fps (the model's 12.5, or 25 after RIFE) -> n_out frames at fps: output
    frame j shows time j / fps, a cross-fade of the two frames around it (blend) or the nearest
    one. Streams: keeps one frame back."""
    j, base, prev = 0, 0, None
    for chunk in chunks:
        frames = chunk if prev is None else np.concatenate([prev[None], chunk])
        start = base - (0 if prev is None else 1)
        out = []
        while j < n_out:
            p = j / fps * source_fps - start
            k = int(math.floor(p))
            if k + 1 >= len(frames):
                break
            t = p - k
            if not blend:
                t = 0.0 if t < 0.5 else 1.0
            out.append(
                frames[k]
                if t < 1e-6
                else frames[k + 1]
                if t > 1 - 1e-6
                else np.clip(frames[k] * (1 - t) + frames[k + 1] * t + 0.5, 0, 255).astype(np.uint8)
            )
            j += 1
        if out:
            yield np.stack(out)
        base += len(chunk)
        prev = frames[-1]
    if j < n_out and prev is not None:  # the last generated frame holds to the end
        yield np.repeat(prev[None], n_out - j, axis=0)


def quiet_libraries() -> None:
    """diffusers and transformers report progress bars and advice on stderr: not in a service."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
