"""The Sonic decoder on a GPU, measured at full size with random weights (docs/gpu.md).

Speed and memory do not depend on the weights' values: this builds a random model at the
official sizes in the official layout (the UNet and the Sonic/ files from the published files'
recorded tensor shapes, SVD img2vid-xt's VAE and CLIP ViT-H/14 image encoder, whisper-tiny,
RIFE), then renders speech of each length at 512 px with the given sampler steps, fp16 and fp32,
with and without RIFE, and prints one JSON line per run: seconds of work per second of video,
seconds per denoising step, the stages' times, the time to load, and peak memory
(torch.cuda.max_memory_allocated / max_memory_reserved, and the device's own figure from
nvidia-smi, sampled every 0.2 s).

    # on the GPU machine (torch's CUDA build; ~6 GB of disk for the model)
    python scripts/gpu_check.py --dir /tmp/sonic-full --seconds 5 30 --steps 25
    # the CPU dry run: the same code path on the tiny model (a minute)
    python scripts/gpu_check.py --tiny --device cpu --seconds 1 --steps 2 --size 256
    # the full-size model built and loaded on a CPU (its layout checked; ~6 GB disk, ~10 GB memory)
    python scripts/gpu_check.py --device cpu --load-only
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from sonic.decoders.sonic.layout import SVD
from sonic.decoders.sonic.model import GENERATED_FPS, SonicModel, generated_count
from sonic.decoders.sonic.tiny import SCHEDULER, write_tiny_checkpoints, write_tiny_rife
from sonic.media import load_audio

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_KEYS = ROOT / "tests" / "data" / "sonic_official_keys.json.gz"
FPS = 25
UNET: dict[str, Any] = {  # stable-video-diffusion-img2vid-xt/unet/config.json
    "_class_name": "UNetSpatioTemporalConditionModel",
    "addition_time_embed_dim": 256,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
    "in_channels": 8,
    "layers_per_block": 2,
    "num_attention_heads": [5, 10, 20, 20],
    "num_frames": 25,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 768,
    "sample_size": 96,
    "transformer_layers_per_block": 1,
    "up_block_types": ["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3,
}
VAE: dict[str, Any] = {  # its vae/config.json
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}
CLIP: dict[str, Any] = {  # its image encoder: CLIP ViT-H/14
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "projection_dim": 1024,
    "hidden_act": "gelu",
}
WHISPER: dict[str, Any] = {  # openai/whisper-tiny
    "d_model": 384,
    "encoder_layers": 4,
    "decoder_layers": 4,
    "encoder_attention_heads": 6,
    "decoder_attention_heads": 6,
    "encoder_ffn_dim": 1536,
    "decoder_ffn_dim": 1536,
    "num_mel_bins": 80,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "vocab_size": 51865,
}


def official_shapes() -> dict[str, dict[str, list[int]]]:
    """The published Sonic/ files' tensor names and shapes (recorded once, tests/data)."""
    with gzip.open(OFFICIAL_KEYS, "rt") as f:
        data = json.load(f)
    return {name: data[name] for name in ("unet", "audio2token", "audio2bucket")}


def _random(name: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    """N(0, 0.02) matrices, ones for norm scales, zeros for biases: finite activations in fp16."""
    if len(shape) == 1:
        return torch.full(shape, 1.0 if "norm" in name and name.endswith(".weight") else 0.0, dtype=torch.float16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)


def write_full_size_checkpoints(root: Path, seed: int = 0) -> Path:
    """The random model at the official sizes, in the official layout (~6 GB)."""
    from diffusers import AutoencoderKLTemporalDecoder
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    svd = root / SVD
    for part in ("unet", "scheduler"):
        (svd / part).mkdir(parents=True, exist_ok=True)
    (svd / "unet" / "config.json").write_text(json.dumps(UNET, indent=1))
    (svd / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=1))
    AutoencoderKLTemporalDecoder(**VAE).save_pretrained(str(svd / "vae"))
    CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP)).save_pretrained(str(svd / "image_encoder"))
    WhisperModel(WhisperConfig(**WHISPER)).save_pretrained(str(root / "whisper-tiny"))
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(root / "whisper-tiny"))
    (root / "Sonic").mkdir(parents=True, exist_ok=True)
    for name, shapes in official_shapes().items():
        torch.save({key: _random(key, shape, gen) for key, shape in shapes.items()}, root / "Sonic" / f"{name}.pth")
    write_tiny_rife(root / "RIFE" / "flownet.pkl", seed)  # RIFE's published network is small: its own sizes
    return root


def check_layout() -> None:
    """The full UNet config makes exactly the published unet.pth's tensors (built on 'meta': no memory)."""
    from sonic.decoders.sonic.unet import AudioContext, build_unet

    unet = build_unet(UNET, Path("unet/config.json"), AudioContext(), device="meta")
    ours = {k: list(v.shape) for k, v in unet.state_dict().items()}
    theirs = official_shapes()["unet"]
    if ours != theirs:
        raise SystemExit(f"the full-size UNet config does not make the published tensors: {len(ours)} vs {len(theirs)}")


class DevicePeak:
    """The device's own used-memory figure (nvidia-smi), its peak over a run, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak_mb = None if shutil.which("nvidia-smi") is None else 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout
                self.peak_mb = max(self.peak_mb or 0.0, float(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __enter__(self) -> DevicePeak:
        if self.peak_mb is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def portrait(size: int) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The example portrait as a square frame of `size` px, and a face box in it."""
    bgr = cv2.imread(str(ROOT / "examples" / "portrait.jpg"))
    h, w = bgr.shape[:2]
    side = min(h, w)
    crop = bgr[(h - side) // 4 : (h - side) // 4 + side, (w - side) // 2 : (w - side) // 2 + side]
    frame = cv2.cvtColor(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    return frame, (0.25 * size, 0.2 * size, 0.75 * size, 0.8 * size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_run(model: SonicModel, frame, box, wav, seconds: float, steps: int, rife: bool) -> dict:
    """One clip: conditioning, denoising, decoding (and RIFE), timed; peak memory."""
    device = model.device
    n_out = int(round(seconds * FPS))
    n = generated_count(n_out, FPS)
    gen = torch.Generator(device).manual_seed(7)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, float] = {}
    with DevicePeak() as peak:
        t = time.perf_counter()
        cond = model.condition(frame, box, wav[: int(seconds * 16000)], n, 1.0, gen)
        sync(device)
        times["condition_s"] = time.perf_counter() - t
        t = time.perf_counter()
        latents = model.denoise(cond, n, steps, 1.0, gen)
        sync(device)
        times["denoise_s"] = time.perf_counter() - t
        t = time.perf_counter()
        chunks = model.decode(latents)
        if rife:
            chunks = model.doubled(chunks)
        frames = sum(len(c) for c in chunks)
        sync(device)
        times["decode_s"] = time.perf_counter() - t
    total = sum(times.values())
    out = {
        "seconds_of_video": seconds,
        "generated_frames": n,
        "frames_out": frames,
        **{k: round(v, 3) for k, v in times.items()},
        "total_s": round(total, 3),
        "s_per_s_of_video": round(total / seconds, 3),
        "s_per_denoising_step": round(times["denoise_s"] / steps, 4),
    }
    if device.type == "cuda":
        out["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        out["device_peak_gb"] = None if peak.peak_mb is None else round(peak.peak_mb / 1024, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/sonic-full-random"))
    ap.add_argument("--tiny", action="store_true", help="the tiny model (the CPU dry run)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, nargs="+", default=[5.0, 30.0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dtypes", nargs="+", default=None, help="float16 float32 (default: both on CUDA, fp32 on CPU)")
    ap.add_argument("--load-only", action="store_true", help="build and load the model, render nothing")
    a = ap.parse_args()
    device = torch.device(a.device)
    print(
        json.dumps(
            {
                "torch": torch.__version__,
                "device": str(device),
                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            }
        )
    )
    check_layout()
    folder = a.dir / ("tiny" if a.tiny else "full")
    t = time.perf_counter()
    if not (folder / "Sonic" / "unet.pth").is_file():
        write_tiny_checkpoints(folder, rife=True) if a.tiny else write_full_size_checkpoints(folder)
        print(json.dumps({"checkpoints_built_s": round(time.perf_counter() - t, 1), "folder": str(folder)}))
    wav = load_audio(ROOT / "examples" / "speech.flac", 600)
    wav = np.tile(wav, int(np.ceil(max(a.seconds) * 16000 / len(wav))) + 1).astype(np.float32)
    frame, box = portrait(a.size)
    dtypes = a.dtypes or (["float16", "float32"] if device.type == "cuda" else ["float32"])
    for dtype_name in dtypes:
        t = time.perf_counter()
        model = SonicModel(folder, a.device, dtype=getattr(torch, dtype_name))
        sync(device)
        load_s = round(time.perf_counter() - t, 2)
        if a.load_only:
            print(
                json.dumps(
                    {
                        "dtype": dtype_name,
                        "load_s": load_s,
                        "unet_params": sum(p.numel() for p in model.unet.parameters()),
                        "rife": model.rife is not None,
                    }
                )
            )
            continue
        for rife in (False, True):
            for seconds in a.seconds:
                try:
                    result = one_run(model, frame, box, wav, seconds, a.steps, rife)
                except torch.cuda.OutOfMemoryError as e:
                    result = {"seconds_of_video": seconds, "error": f"out of memory: {str(e)[:200]}"}
                print(
                    json.dumps(
                        {
                            "dtype": dtype_name,
                            "rife": rife,
                            "steps": a.steps,
                            "size": a.size,
                            "load_s": load_s,
                            "generated_fps": GENERATED_FPS,
                            **result,
                        }
                    ),
                    flush=True,
                )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
