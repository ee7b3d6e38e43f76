"""Input decoding: images and audio checked by content, never by file name.

load_image -> RGB uint8 (H, W, 3), EXIF orientation applied, alpha composited on white.
load_audio -> float32 mono waveform (N,) at SAMPLE_RATE, decoded by the bundled ffmpeg.
check_waveform -> load_audio's checks, for a waveform decoded elsewhere (already in memory).
"""
from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import AudioTooLong, EmptyAudio, InputTooLarge, PipelineError, UnsupportedMedia

SAMPLE_RATE = 16_000            # Hz, what the audio encoder and pocketsphinx expect
SILENCE_RMS = 10 ** (-55 / 20)  # full-scale RMS below which a whole clip counts as silent
ALLOWED_IMAGE_FORMATS = {"PNG", "JPEG", "WEBP"}
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()


def load_image(path: str | Path, max_pixels: int) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); refuse what is not a PNG/JPEG/WebP."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format not in ALLOWED_IMAGE_FORMATS:
                    raise UnsupportedMedia(f"image format {im.format} is not supported (PNG, JPEG, WebP)",
                                           field="image")
                w, h = im.size
                if w * h > max_pixels:
                    raise InputTooLarge(f"image has {w}x{h} pixels, more than the limit of {max_pixels}",
                                        field="image")
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, im)
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputTooLarge(f"image has too many pixels (limit {max_pixels})", field="image") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnsupportedMedia(f"image could not be decoded: {type(e).__name__}", field="image") from e
    if min(rgb.shape[:2]) < 32:
        raise UnsupportedMedia(f"image is only {rgb.shape[1]}x{rgb.shape[0]} pixels", field="image")
    return np.ascontiguousarray(rgb)


def load_audio(path: str | Path, max_duration_s: float) -> np.ndarray:
    """Decode any ffmpeg-readable audio to float32 mono at SAMPLE_RATE, shape (N,)."""
    # Decode at most a little past the limit, so hour-long files cost no more than the limit.
    cmd = [FFMPEG, "-nostdin", "-v", "error", "-i", str(path), "-map", "0:a:0", "-vn",
           "-t", f"{max_duration_s + 1:.3f}", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=True, timeout=120)
    except subprocess.CalledProcessError as e:
        raise UnsupportedMedia("audio could not be decoded (WAV, MP3, FLAC, OGG, M4A are supported)",
                               field="audio") from e
    except subprocess.TimeoutExpired as e:
        raise UnsupportedMedia("audio took too long to decode", field="audio") from e
    except OSError as e:
        raise PipelineError("ffmpeg could not be started") from e
    return check_waveform(np.frombuffer(proc.stdout, dtype=np.float32).copy(), max_duration_s)


def check_waveform(wav: np.ndarray, max_duration_s: float) -> np.ndarray:
    """A mono waveform (N,) at SAMPLE_RATE, checked as a decoded file is: not empty, not longer
    than the limit, not silent; non-finite samples zeroed, the rest clipped to [-1, 1]."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise UnsupportedMedia(f"audio must be one mono channel, got an array of shape {wav.shape}", field="audio")
    if wav.size < SAMPLE_RATE // 10:
        raise EmptyAudio("audio is empty (less than 0.1 s decoded)", field="audio")
    if not np.all(np.isfinite(wav)):
        wav = np.nan_to_num(wav, nan=0.0, posinf=0.0, neginf=0.0)
    if wav.size > max_duration_s * SAMPLE_RATE:
        raise AudioTooLong(f"audio is longer than the limit of {max_duration_s:g} s", field="audio")
    if float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) < SILENCE_RMS:
        raise EmptyAudio("audio is silent", field="audio")
    return np.clip(wav, -1.0, 1.0)
