"""The Sonic checkpoint folder, in the official layout, read as it is (docs/gpu.md):

    DIR/Sonic/unet.pth                   the whole UNet, audio attention included
    DIR/Sonic/audio2token.pth            whisper features -> audio tokens
    DIR/Sonic/audio2bucket.pth           whisper features + image embedding -> motion buckets
    DIR/stable-video-diffusion-img2vid-xt/unet/config.json
    DIR/stable-video-diffusion-img2vid-xt/vae/            config.json + weights
    DIR/stable-video-diffusion-img2vid-xt/scheduler/      scheduler_config.json
    DIR/stable-video-diffusion-img2vid-xt/image_encoder/  config.json + weights
    DIR/whisper-tiny/                    config.json, preprocessor_config.json + weights
    DIR/RIFE/flownet.pkl                 optional: frame interpolation

Each `.pth` may also be given as `.safetensors` beside it (scripts/convert_checkpoints.py writes
them); the safetensors file wins. This module only looks at paths: it imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import SetupError

SVD = "stable-video-diffusion-img2vid-xt"
# a folder that diffusers / transformers load holds its config and one of these weight files
HF_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
)


@dataclass(frozen=True)
class Layout:
    root: Path

    def weights(self, stem: str) -> Path:
        """Sonic/<stem>.safetensors when present, else Sonic/<stem>.pth."""
        st = self.root / "Sonic" / f"{stem}.safetensors"
        return st if st.is_file() else self.root / "Sonic" / f"{stem}.pth"

    @property
    def unet_config(self) -> Path:
        return self.root / SVD / "unet" / "config.json"

    @property
    def vae(self) -> Path:
        return self.root / SVD / "vae"

    @property
    def scheduler(self) -> Path:
        return self.root / SVD / "scheduler"

    @property
    def image_encoder(self) -> Path:
        return self.root / SVD / "image_encoder"

    @property
    def whisper(self) -> Path:
        return self.root / "whisper-tiny"

    @property
    def rife(self) -> Path | None:
        for name in ("flownet.safetensors", "flownet.pkl"):
            if (self.root / "RIFE" / name).is_file():
                return self.root / "RIFE" / name
        return None

    def missing(self) -> list[str]:
        """What the folder lacks, as paths relative to it (empty: complete)."""
        lack = []
        for stem in ("unet", "audio2token", "audio2bucket"):
            if not self.weights(stem).is_file():
                lack.append(f"Sonic/{stem}.pth")
        for f in (
            self.unet_config,
            self.scheduler / "scheduler_config.json",
            self.vae / "config.json",
            self.image_encoder / "config.json",
            self.whisper / "config.json",
            self.whisper / "preprocessor_config.json",
        ):
            if not f.is_file():
                lack.append(str(f.relative_to(self.root)))
        for folder in (self.vae, self.image_encoder, self.whisper):
            if folder.is_dir() and not any((folder / w).is_file() for w in HF_WEIGHTS):
                lack.append(f"{folder.relative_to(self.root)}/<weights: {HF_WEIGHTS[0]} or model.safetensors>")
        return lack


def checked_layout(folder: str | Path | None) -> Layout:
    """The layout of `folder`; SetupError naming the first missing file when it is incomplete."""
    if not folder:
        raise SetupError(
            "the sonic decoder needs its checkpoints: set sonic_checkpoints "
            "(SONIC_CHECKPOINTS, --checkpoints DIR); see docs/gpu.md"
        )
    root = Path(folder)
    if not root.is_dir():
        raise SetupError(f"sonic_checkpoints {str(root)!r} is not a folder")
    layout = Layout(root)
    lack = layout.missing()
    if lack:
        more = f" (and {len(lack) - 1} more)" if len(lack) > 1 else ""
        raise SetupError(f"the Sonic checkpoint folder {str(root)!r} lacks {lack[0]}{more}; see docs/gpu.md")
    return layout


def is_complete(folder: str | Path | None) -> bool:
    if not folder:
        return False
    return Path(folder).is_dir() and not Layout(Path(folder)).missing()
