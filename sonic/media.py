"""Input decoding: images and audio checked by content, never by file name.

load_image -> RGB uint8 (H, W, 3), EXIF orientation applied, alpha composited on white; PNG, JPEG
    and WebP only, decoded reduced above WORKING_PIXELS, the memory of concurrent decodes bounded
    by a DecodeBudget.
load_audio -> float32 mono waveform (N,) at SAMPLE_RATE, decoded by the bundled ffmpeg from the
    documented containers only (AUDIO_DEMUXERS), reading no file but the one it is given.
check_waveform -> load_audio's checks, for a waveform decoded elsewhere (already in memory).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import re
import struct
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, NamedTuple

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .color_profile import embedded_profile, to_srgb
from .errors import AudioTooLong, Busy, EmptyAudio, InputTooLarge, InvalidParameter, PipelineError, UnsupportedMedia
from .memory import expendable

SAMPLE_RATE = 16_000  # Hz, what the audio encoder and pocketsphinx expect
SOUND_RATE = 48_000  # Hz of the video's sound track
SILENCE_DBFS = -55.0  # a clip whose loudest SILENCE_BLOCK_S is below this RMS (dB full scale) is silent
SILENCE_BLOCK_S = 0.5  # judged on the loudest part: quiet speech padded with silence is still speech
SILENCE_RMS = 10 ** (SILENCE_DBFS / 20)
MIN_AUDIO_S = 0.1  # the shortest audio a request may send
MIN_IMAGE_SIDE = 32  # pixels, the smallest portrait side taken
# float speech beyond this is not -1..1 audio (16-bit values as floats, a gain gone wrong: it
# would be clipped to a square wave); a little over full scale is clipped, as a file's is
MAX_FLOAT_PEAK = 2.0
MAX_BROKEN_SHARE = 0.01  # a file's samples that are not numbers: up to this share repaired, more refused
# Hz of a caller's array (telephone to studio), and the least a file may have: a 244-byte WAV
# that declared 1 Hz became 100 s of interpolated noise, a 100 s render
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 384_000
ALLOWED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
AVIF_BRANDS = {b"avif", b"avis"}  # an AVIF still image's and sequence's major brands
# ISO BMFF brands of recordings and videos (MP4, M4A, MOV, 3GP): a file given as the photo with
# one of them was swapped with the recording
RECORDING_BRANDS = {
    b"isom",
    b"iso2",
    b"iso4",
    b"iso5",
    b"iso6",
    b"mp41",
    b"mp42",
    b"M4A ",
    b"M4B ",
    b"M4V ",
    b"qt  ",
    b"3gp4",
    b"3gp5",
    b"3gp6",
    b"3g2a",
    b"avc1",
    b"dash",
    b"f4v ",
    b"MSNV",
}
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}  # an ISO BMFF ftyp's major brand
# Larger photos are decoded reduced to this (not by a whole factor: working_size): the output
# frame is at most 1024 px on its short side, and a face in a 16 MP photo still has more pixels
# than the crop shows.
WORKING_PIXELS = 16_000_000
# A JPEG may have this many times `max_pixels`: it is decoded reduced in the DCT (1/2, 1/4 or
# 1/8 of each side), so its memory stays a PNG's at the limit or less, and its time small (a
# 108 MP phone photo in 0.2 s here). 4 x the default 40 MP takes phones' 48, 50, 64 and 108 MP
# photos, and stays under Pillow's own refusal (2 x Image.MAX_IMAGE_PIXELS, 179 MP).
JPEG_PIXELS_FACTOR = 4
# Pillow names a JPEG that carries a second image (a phone's gain map, MPF) "MPO": a JPEG still
JPEG_FORMATS = ("JPEG", "MPO")
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
# The demuxers ffmpeg may use on an upload: the containers the service documents (WAV, MP3, FLAC,
# OGG, M4A/MP4, WebM as browsers record, raw AAC, and what Macs and phones' recorders write:
# AIFF, CAF, AMR). ffmpeg picks a demuxer by content, and some (hls, dash, concat, imf, sdp,
# avisynth...) open the files or URLs a manifest names: none of those is allowed, whatever the
# upload's name or declared type.
AUDIO_DEMUXERS = ("wav", "mp3", "flac", "ogg", "mov", "matroska", "aac", "aiff", "caf", "amr")
AUDIO_FORMATS_TEXT = "WAV, MP3, FLAC, OGG, M4A, WebM, AIFF, CAF, AMR"
# the containers that hold sound and nothing else: one without a readable stream is damaged
SOUND_ONLY_DEMUXERS = ("wav", "mp3", "flac", "aac", "aiff", "caf", "amr")
DOWNMIX = ["-ac", "1"]  # ffmpeg's own downmix, for every layout it knows
MAX_CHANNELS = 64  # ffmpeg's pan filter averages at most this many channels
DECODE_TIMEOUT_S = 120
# ffmpeg's work on a recording grows with its samples (rate x channels x seconds), not with the
# file's size: a 4 MB FLAC of 299 s of 8-channel silence at 384 kHz took 16 s of CPU. A recording
# is decoded only as far as this many samples go: 300 s of 8 channels at 48 kHz (about 1.5 s of
# one core here); longer at a higher rate or with more channels is refused by name.
MAX_DECODE_SAMPLES = 120_000_000
# uploads decoded at once by a process's request threads (`upload_decode`); as many more wait,
# up to AUDIO_DECODE_WAIT_S, and beyond them one more is refused busy at once: uploads cannot
# take every core from the renders, nor every server thread by waiting
AUDIO_DECODES = max(2, os.cpu_count() or 2)
AUDIO_DECODE_WAIT_S = 30.0
_audio_decodes = threading.BoundedSemaphore(AUDIO_DECODES)
_audio_decodes_and_waiting = threading.BoundedSemaphore(2 * AUDIO_DECODES)
CAP_REACHED_S = 0.05  # a decode that ends this close to its cap was cut by it
OUTPUT_CHUNK_BYTES = 1 << 20  # ffmpeg's output is read this much at a time
WAV_HEADER_BYTES = 1 << 16  # a WAV's chunks before its samples (fmt, LIST, fact, a broadcast WAV's bext...)
WAV_STREAMING_SIZE = 0x7FFF0000
TRAILING_SAMPLES_S = 0.1  # past a WAV's declared end, at least this much more is read as its samples
PROBE_BYTES = 1 << 20  # the probe's WAV: its header is all it needs, 10 ms of 64 channels at 384 kHz fit
MIX_LOSS = 0.1  # a mix below this share of a channel's RMS (20 dB) lost the speech: cancelled, or left out
LEVEL_TIE_DB = 0.1  # channels this close in level count as alike (a pair in opposite phase)
LEVELS_FILTER = "astats=measure_perchannel=RMS_level:measure_overall=none"


def load_image(
    source: str | Path | BinaryIO,
    max_pixels: int,
    budget: "DecodeBudget | None" = None,
    max_working_pixels: int = WORKING_PIXELS,
) -> np.ndarray:
    """Decode a PNG/JPEG/WebP to RGB uint8 (H, W, 3), at most `max_working_pixels` (a larger photo
    is decoded reduced: JPEGs in the DCT, the others right after decoding); any other format is
    refused with its name. A PNG or WebP may have `max_pixels`, a JPEG `JPEG_PIXELS_FACTOR` times
    as many. `budget` bounds the memory of this process's decodes at once."""
    data = _image_bytes(source)
    try:
        with warnings.catch_warnings():
            # the size is checked below, before decoding; Pillow's own error (past 179 MP) stays
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # the bytes are in memory and only the allowed formats' readers see them
            with Image.open(io.BytesIO(data), formats=ALLOWED_IMAGE_FORMATS) as im:
                w, h = im.size
                reduced = _reduced_in_dct(im)
                allowed = max_pixels * (JPEG_PIXELS_FACTOR if reduced else 1)
                if w * h > allowed:
                    fix = "scale it down" + ("" if reduced else ", or save it as a baseline JPEG")
                    raise InputTooLarge(
                        f"image has {w}x{h} pixels, more than the limit of {allowed} for a {_kind(im)} "
                        f"(limits.max_image_pixels: {max_pixels}; a baseline JPEG may have {JPEG_PIXELS_FACTOR}x): "
                        f"{fix}",
                        field="image",
                    )
                with (budget or UNBOUNDED).reserve(decode_bytes(im, max_working_pixels)):
                    rgb = _decode_reduced(im, max_working_pixels)
    except Image.DecompressionBombError as e:  # past Pillow's own limit, checked at open
        raise InputTooLarge(
            f"image has more pixels than are decoded here (limits.max_image_pixels: {max_pixels}; a baseline "
            f"JPEG may have {JPEG_PIXELS_FACTOR}x)",
            field="image",
        ) from e
    except UnidentifiedImageError as e:
        raise UnsupportedMedia(_unsupported_image(data), field="image") from e
    except (OSError, SyntaxError, ValueError) as e:
        # Pillow's own words name the fault ("image file is truncated", "broken PNG file"); the
        # bytes are in memory, so no path can be in them
        reason = str(e)[:200] or type(e).__name__
        if "MAX_TEXT" in reason:  # Pillow's words name its own constants there
            reason = "its text metadata (a PNG text chunk) is larger than a photo's may be: save it without"
        raise UnsupportedMedia(f"image could not be decoded: {reason}", field="image") from e
    return check_image_size(rgb)


def check_image_size(rgb: np.ndarray) -> np.ndarray:
    """A portrait of at least MIN_IMAGE_SIDE pixels each way (UnsupportedMedia naming `image`):
    no face can be found in less, and an empty image would break the face detector's graph."""
    if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
        raise UnsupportedMedia(
            f"image is only {rgb.shape[1]}x{rgb.shape[0]} pixels; a portrait needs {MIN_IMAGE_SIDE} or more each way",
            field="image",
        )
    return rgb


def _grey16_to_8(grey: np.ndarray) -> np.ndarray:
    """A 16-bit greyscale image (Pillow's "I;16" or "I": 0..65535) as 8-bit (0..255)."""
    return np.clip((grey.astype(np.float64) + 128) / 257, 0, 255).astype(np.uint8)


IMAGE_HEAD_BYTES = 4096  # enough for Pillow to name another format from its header


def _image_bytes(source: str | Path | BinaryIO) -> bytes:
    """The file's bytes, read whole only when its first bytes are a PNG's, a JPEG's or a WebP's:
    a 2 GB file of anything else was read into memory before it was refused."""
    with contextlib.ExitStack() as stack:
        f = source if hasattr(source, "read") else stack.enter_context(open(source, "rb"))
        head = f.read(IMAGE_HEAD_BYTES)
        if not _allowed_image_head(head):
            raise UnsupportedMedia(_unsupported_image(head), field="image")
        return head + f.read()


def _allowed_image_head(head: bytes) -> bool:
    return head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _unsupported_image(data: bytes) -> str:
    """What to say of an image none of the allowed readers recognised: its format where Pillow
    knows it (the header only is read, from memory)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            name = im.format
    except Exception:  # noqa: BLE001 - any reader's failure: not an image
        name = None
    if name:
        return f"image format {name} is not supported (PNG, JPEG, WebP)"
    brands = _ftyp_brands(data)
    if brands & AVIF_BRANDS:  # Pillow's reader needs the whole file to name it
        return "image format AVIF is not supported (PNG, JPEG, WebP): export it as JPEG or PNG"
    if brands & HEIF_BRANDS:  # Pillow has no HEIF reader to name it
        return "image format HEIC/HEIF (an iPhone's photo format) is not supported (PNG, JPEG, WebP): export it as JPEG"
    sound = _sound_format(data)
    if sound:
        return f"image is {sound}, not a picture (are the image and the audio swapped?)"
    return "image could not be decoded: not a PNG, JPEG or WebP"


# the first four bytes of recordings (and videos) people send, and what to call them
SOUND_SIGNATURES = {
    b"fLaC": "a FLAC recording",
    b"OggS": "an Ogg recording (Opus, Vorbis)",
    b"caff": "a CAF recording",
    b"\x1aE\xdf\xa3": "a WebM or Matroska file (a recording or a video)",
    b"#!AM": "an AMR recording",
}


def _sound_format(data: bytes) -> str | None:
    """What recording or video the first bytes of a file given as the photo make it, by the
    signatures of the formats people record in; None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "a WAV recording"
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "an AIFF recording"
    if data[:3] == b"ID3" or _mpeg_audio_frame(data):
        return "an MP3 recording"
    if data[:4] in SOUND_SIGNATURES:
        return SOUND_SIGNATURES[data[:4]]
    if data[4:8] == b"ftyp" and data[8:12] in RECORDING_BRANDS:  # its major brand (a raw photo: "crx ")
        return "an MP4, M4A or MOV file (a recording or a video)"
    return None


def _mpeg_audio_frame(data: bytes) -> bool:
    """Whether `data` starts with an MPEG audio frame's header (an MP3 without tags): the sync
    bits, then a version, layer, bitrate and sample rate that exist (a UTF-16 text starts FF FE)."""
    if len(data) < 3 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 3, (data[1] >> 1) & 3
    bitrate, rate = data[2] >> 4, (data[2] >> 2) & 3
    return version != 1 and layer != 0 and bitrate not in (0, 15) and rate != 3


def _ftyp_brands(data: bytes) -> set[bytes]:
    """An ISO BMFF file's major and compatible brands, from its first box (`ftyp`); none for
    another file. (An AVIF may carry the HEIF brand `mif1` as its major one, `avif` among the rest.)"""
    if data[4:8] != b"ftyp":
        return set()
    end = min(len(data), int.from_bytes(data[:4], "big"))
    return {data[8:12]} | {data[i : i + 4] for i in range(16, end - 3, 4)}


def working_size(w: int, h: int, max_working_pixels: int) -> tuple[int, int]:
    """w x h brought to at most max_working_pixels, the aspect kept. Not by a whole factor: a
    24 MP phone photo halved each way kept 6 MP of 16, and its face a half of its sharpness."""
    if w * h <= max_working_pixels:
        return w, h
    scale = math.sqrt(max_working_pixels / (w * h))
    return max(1, math.floor(w * scale)), max(1, math.floor(h * scale))


class DecodePlan(NamedTuple):
    """How a photo is decoded: reduced by `dct` in a JPEG's DCT (1, 2, 4 or 8 each way), then
    resized to `size` where that differs."""

    dct: int
    size: tuple[int, int]


ENOUGH_OF_WORKING = 0.6  # a DCT reduction that keeps this share of WORKING_PIXELS needs no resize


def decode_plan(im: Image.Image, max_working_pixels: int) -> DecodePlan:
    """The cheapest decode that keeps enough: a JPEG whose next DCT reduction still keeps
    ENOUGH_OF_WORKING of the allowed pixels is decoded at it (48 MP: 12 MP of 16, 0.2 s and half
    the memory of a full decode); else (24 MP, halved, would keep 6) at the largest reduction that
    stays above working_size, then resized to it. Others are resized to working_size."""
    w, h = im.size
    target = working_size(w, h, max_working_pixels)
    if target == (w, h) or im.format not in JPEG_FORMATS:
        return DecodePlan(1, target)
    coarse = next((d for d in (2, 4, 8) if -(-w // d) * -(-h // d) <= max_working_pixels), 8)
    coarse_size = (-(-w // coarse), -(-h // coarse))
    if coarse_size[0] * coarse_size[1] >= ENOUGH_OF_WORKING * max_working_pixels:
        return DecodePlan(coarse, coarse_size)
    # as Pillow's draft chooses for a requested size: the largest of 8, 4, 2, 1 not past the
    # smaller of the two whole ratios
    ratio = min(w // target[0], h // target[1])
    fine = next(d for d in (8, 4, 2, 1) if ratio >= d)
    return DecodePlan(fine, target)


def _progressive_jpeg(im: Image.Image) -> bool:
    """A progressive JPEG holds every coefficient of the whole image while it decodes (2 bytes
    each: 933 MB measured for a 156 MP one), whatever size it is decoded at."""
    return im.format in JPEG_FORMATS and bool(im.info.get("progressive"))


def _reduced_in_dct(im: Image.Image) -> bool:
    """A baseline JPEG: decoded at its reduced size. A progressive one counts as the PNG it
    costs as much as."""
    return im.format in JPEG_FORMATS and not _progressive_jpeg(im)


def _kind(im: Image.Image) -> str:
    if im.format in JPEG_FORMATS:
        return "progressive JPEG" if _progressive_jpeg(im) else "JPEG"
    return str(im.format)


def decode_bytes(im: Image.Image, max_working_pixels: int) -> int:
    """Bytes a decode of `im` holds at its peak: Pillow's own buffer (4 bytes a pixel but for
    1-byte modes; a JPEG decoded at its reduced size, a progressive one's coefficients too), a
    palette or 1-bit image's conversion before it is resized, then about three working copies."""
    w, h = im.size
    plan = decode_plan(im, max_working_pixels)
    native = 1 if im.mode in ("1", "L", "P") else 4
    coefficients = w * h * len(im.getbands()) * 2 if _progressive_jpeg(im) else 0
    decoded = -(-w // plan.dct) * -(-h // plan.dct)
    converted = decoded * 4 if im.mode in ("1", "P") and plan.size != im.size else 0
    return coefficients + decoded * native + converted + plan.size[0] * plan.size[1] * 4 * 3


def _decode_reduced(im: Image.Image, max_working_pixels: int) -> np.ndarray:
    """RGB uint8 of an opened image, reduced to at most max_working_pixels, EXIF orientation
    applied, in sRGB (sonic/color_profile.py), transparency on white."""
    icc = embedded_profile(im)
    plan = decode_plan(im, max_working_pixels)
    w, h = im.size
    if plan.dct > 1:
        im.draft("RGB", (w // plan.dct, h // plan.dct))  # Pillow reduces by plan.dct for this size
    im.load()
    if im.mode in ("P", "PA"):  # resized and profiled as the colours the palette stands for
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
    if plan.size != im.size:
        if im.mode == "1":  # resized by nearest pixel as it is
            im = im.convert("RGBA" if "transparency" in im.info else "L")
        # bilinear, widened by the reduction as Pillow does: anti-aliased, at half of Lanczos's time
        # (24 MP to 16 MP: 0.26 s against 0.48 s)
        im = im.resize(plan.size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # 16-bit greyscale (PNG): Pillow's convert would clip it to white
        im = Image.fromarray(_grey16_to_8(np.asarray(im)))
    im = to_srgb(im, icc)
    if im.mode in ("RGBA", "LA"):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return np.array(im.convert("RGB"), dtype=np.uint8)


class DecodeBudget:
    """Bytes that this process's image decodes may hold at once. A decode waits up to `wait_s`
    for its share, then is refused as `busy`; at most `max_waiting` wait, and one more is refused
    at once (each waiter holds a server thread); one decode larger than the whole budget may run
    when nothing else does, so that every allowed image can be decoded."""

    def __init__(self, total_bytes: int, wait_s: float, max_waiting: int = 4):
        self.total, self.wait_s, self.max_waiting = int(total_bytes), float(wait_s), int(max_waiting)
        self.in_use = self.waiting = 0
        self._cond = threading.Condition()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        share = min(int(nbytes), self.total)
        busy = Busy("too many large images are being decoded at once; retry shortly", field="image")
        with self._cond:
            if self.in_use + share > self.total:
                if self.waiting >= self.max_waiting:
                    raise busy
                self.waiting += 1
                try:
                    if not self._cond.wait_for(lambda: self.in_use + share <= self.total, timeout=self.wait_s):
                        raise busy
                finally:
                    self.waiting -= 1
            self.in_use += share
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= share
                self._cond.notify_all()


UNBOUNDED = DecodeBudget(1 << 62, 0.0)


@functools.lru_cache(maxsize=None)
def decode_budget(total_mb: float, wait_s: float) -> DecodeBudget:
    """The process's budget for these settings (limits.decode_memory_mb, limits.decode_wait_s):
    every request of the process shares it."""
    return DecodeBudget(int(total_mb * 2**20), wait_s)


def load_audio(path: str | Path, max_duration_s: float) -> np.ndarray:
    """Decode an audio file of one of AUDIO_DEMUXERS' formats to float32 mono at SAMPLE_RATE,
    shape (N,). Anything else (a playlist, a manifest, a script) is refused with its format named,
    before ffmpeg could open any other file; so is one longer than MAX_DECODE_SAMPLES allow."""
    stream = probe_audio(path)
    if stream is None:
        raise _undecodable(path)
    if stream.channels > MAX_CHANNELS:  # ffmpeg's mix then failed, and the file was said to have no sound
        raise too_many_channels(stream.channels)
    if stream.rate < MIN_SAMPLE_RATE:
        raise UnsupportedMedia(
            f"audio is at {stream.rate} Hz, too low a sample rate for speech (at least {MIN_SAMPLE_RATE} Hz; "
            "a telephone's 8000 works): the file's header states a wrong rate, or it is not a recording",
            field="audio",
        )
    decode_s = min(max_duration_s + 1, stream.decodable_s)
    if stream.duration_s is not None and min(stream.duration_s, max_duration_s) > decode_s:
        raise stream.too_much()  # as its container states: refused before decoding
    wav = _decode_audio(path, decode_s, DOWNMIX)
    if wav is None:
        raise _undecodable(path)
    if decode_s < max_duration_s + 1 and len(wav) >= (decode_s - CAP_REACHED_S) * SAMPLE_RATE:
        raise stream.too_much()  # its container understated it (or stated nothing)
    stated = stream.duration_s
    if len(wav) > max_duration_s * SAMPLE_RATE and stated is not None and stated > max_duration_s + 1:
        # (decoded 1 s past the limit: how far past, its container says)
        raise AudioTooLong(
            f"audio lasts {stated:.0f} s{' or so' if stream.estimated else ''}, longer than the limit of "
            f"{max_duration_s:g} s: trim it, or send it in parts",
            field="audio",
        )
    if not np.isfinite(wav).all() and stream.rate != SAMPLE_RATE:
        wav = _repaired_at_its_rate(path, decode_s, stream.rate)
    try:
        return check_waveform(wav, max_duration_s)
    except EmptyAudio:
        # the mix can be silent with speech in the file: channels in opposite phase (a miswired
        # stereo pair) cancel, and ffmpeg's downmix leaves out some channels (the LFE): the
        # loudest channel alone may still hold the speech
        loudest = _loudest_channel(path, decode_s)
        if loudest is None or len(loudest) != len(wav) or not MIX_LOSS * rms(loudest) > max(rms(wav), 1e-9):
            raise
        return check_waveform(loudest, max_duration_s)


def _repaired_at_its_rate(path: str | Path, seconds: float, rate: int) -> np.ndarray:
    """A recording with samples that are not numbers, at SAMPLE_RATE: decoded at its own rate,
    where they are counted (`damaged` past MAX_BROKEN_SHARE) and made silence, then resampled.
    Resampled first, each one spread over the resampler's filter: 0.05 % of a 44.1 kHz file's
    samples became 5 % at 16 kHz (refused as damaged), and each left a gap of silence."""
    native = _decode_audio(path, seconds, DOWNMIX, rate)
    if native is None:
        raise _undecodable(path)
    return resampled(_finite_or_damaged(native), rate)


def _finite_or_damaged(wav: np.ndarray) -> np.ndarray:
    """Samples with a few that are not numbers (NaN, infinite) made silence, in place; more than
    MAX_BROKEN_SHARE of them: UnsupportedMedia (a file made mostly of them was refused as
    "digital silence", or rendered as clicks)."""
    broken = ~np.isfinite(wav)
    count = int(np.count_nonzero(broken))
    if count > MAX_BROKEN_SHARE * wav.size:
        raise UnsupportedMedia(
            f"audio is damaged: {100 * count / wav.size:.3g} % of its samples are not numbers (NaN or infinite)",
            field="audio",
        )
    wav[broken] = 0.0
    return wav


def _loudest_channel(path: str | Path, seconds: float) -> np.ndarray | None:
    """The channel of a recording with the most energy, at SAMPLE_RATE; None where none
    decodes. ffmpeg measures every channel's level as it decodes (nothing held: 64 channels at
    16 kHz would be gigabytes), then decodes that one channel alone."""
    measure = ["-map", "0:a:0", "-vn", "-t", f"{seconds:.3f}", "-af", LEVELS_FILTER, "-f", "null", "-"]
    proc = run_ffmpeg_on(path, ["-v", "info"], measure)
    levels = _channel_levels(proc.stderr)
    if proc.returncode != 0 or not levels or max(levels.values()) == -np.inf:
        return None
    top = max(levels.values())
    loudest = min(c for c, db in levels.items() if db >= top - LEVEL_TIE_DB)  # a pair alike: the first
    return _decode_audio(path, seconds, ["-af", f"pan=mono|c0=c{loudest}"])


def _channel_levels(log: bytes) -> dict[int, float]:
    """{channel (from 0): RMS dB} from astats' own lines of an ffmpeg log (never the file's
    tags, which ffmpeg prints too); a level that does not read as a number counts as silence."""
    levels, channel = {}, None
    for line in log.splitlines():
        found = re.match(rb"\[Parsed_astats_\d+ @ [^\]]+\] (Channel|RMS level dB): (\S+)\s*$", line)
        if found is None:
            continue
        if found[1] == b"Channel":
            channel = int(found[2]) - 1 if found[2].isdigit() else None
        elif channel is not None:
            try:
                db = float(found[2])
            except ValueError:
                db = -np.inf
            levels[channel] = db if np.isfinite(db) or db == -np.inf else -np.inf
    return levels


# a video stream in ffmpeg's description of a file (not a cover picture of a recording): a clip
# whose video outlasts its sound is no recording cut short
MOVING_PICTURES = re.compile(rb"^\s*Stream #\d+:\d+.*: Video: (?!.*\(attached pic\)).*$", re.MULTILINE)


@dataclass(frozen=True)
class AudioStream:
    """A recording's first audio stream as ffmpeg decodes it."""

    rate: int  # Hz
    channels: int
    duration_s: float | None  # as the container states it: absent, or wrong, in some files
    estimated: bool = False  # ffmpeg guessed duration_s from the bitrate (an MP3 without its length)

    @property
    def decodable_s(self) -> float:
        """How many seconds of it MAX_DECODE_SAMPLES allow."""
        return MAX_DECODE_SAMPLES / (self.rate * self.channels)

    def too_much(self) -> AudioTooLong:
        return AudioTooLong(
            f"audio of {self.channels} channel(s) at {self.rate} Hz is more to decode than this server takes "
            f"beyond {self.decodable_s:.0f} s ({MAX_DECODE_SAMPLES // 1_000_000} million samples); send it at "
            "48 kHz or less, or with fewer channels",
            field="audio",
        )


def probe_audio(path: str | Path) -> AudioStream | None:
    """The rate and channels of a recording's first audio stream, from the header of a WAV that
    ffmpeg makes of its first 10 ms (neither resampled nor mixed: as it decodes, whatever the
    container's layout is called), and the duration its container states; None when it does not
    decode."""
    proc = run_ffmpeg_on(
        path, ["-v", "info"], ["-map", "0:a:0", "-vn", "-t", "0.01", "-f", "wav", "-"], max_output_bytes=PROBE_BYTES
    )
    if proc.returncode != 0 or len(proc.stdout) < 28 or proc.stdout[:4] != b"RIFF" or proc.stdout[12:16] != b"fmt ":
        return None
    channels, rate = struct.unpack_from("<HI", proc.stdout, 22)
    if not channels or not rate:
        return None
    stated = re.search(rb"^\s*Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)", proc.stderr, re.MULTILINE)
    duration = None if stated is None else 3600 * int(stated[1]) + 60 * int(stated[2]) + float(stated[3])
    if MOVING_PICTURES.search(proc.stderr):  # the container's length is its longest stream's, maybe the video's
        duration = None
    estimated = b"Estimating duration from bitrate" in proc.stderr
    wav = _wav_data(path)
    if wav is not None and wav.streaming:
        duration, estimated = None, False  # a recorder's placeholder, whatever ffmpeg reads into it
    elif estimated and wav is not None and wav.byte_rate:
        duration, estimated = wav.size / wav.byte_rate, False  # ffmpeg measures a WAV by its file's size
    return AudioStream(rate=rate, channels=channels, duration_s=duration, estimated=estimated)


class WavData(NamedTuple):
    """What a WAV file's header says of its samples."""

    size: int  # bytes, as the data chunk declares them
    byte_rate: int  # bytes a second (0 where the fmt chunk was not read)
    offset: int = 0  # where the samples start in the file

    @property
    def streaming(self) -> bool:
        """A size a recorder writes while it streams: 0, or near 2 or 4 GB (no upload is that
        large; sox writes 0x7FFFF000 rounded down to whole samples)."""
        return self.size == 0 or self.size >= WAV_STREAMING_SIZE


def _samples_past_declared_end(path: str | Path) -> bool:
    """A WAV whose samples go on past the size its data chunk declares (a recorder that fixed
    its header too early): ffmpeg stops at the declared size (a 7 s recording declared 1 s made a
    1 s video, nothing said). Only where what follows is not something else a WAV may carry
    there: a chunk (LIST tags, a second WAV joined with `cat`: RIFF), after its pad byte or where
    a writer left the pad byte out, or an ID3 tag; read as samples, their bytes were noise."""
    wav = _wav_data(path)
    if wav is None or wav.streaming:  # a streaming size: ffmpeg reads to the end already
        return False
    end = wav.offset + wav.size
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        left = f.tell() - end
        if left < max(TRAILING_SAMPLES_S * wav.byte_rate, 16):
            return False
        f.seek(end)
        after = f.read(9)
    starts = (after[1:], after[:8]) if wav.size & 1 else (after[:8],)
    return not any(_chunk_header(head, left) for head in starts) and not after.startswith((b"ID3", b"TAG"))


def _chunk_header(head: bytes, left: int) -> bool:
    """Whether 8 bytes read as a RIFF chunk's header: a four-character name, a size that fits."""
    return len(head) == 8 and all(0x20 <= b <= 0x7E for b in head[:4]) and struct.unpack_from("<I", head, 4)[0] <= left


def _wav_data(path: str | Path) -> WavData | None:
    """A WAV file's data chunk as its header declares it; None for another file, or a data chunk
    beyond the first WAV_HEADER_BYTES."""
    with open(path, "rb") as f:
        head = f.read(WAV_HEADER_BYTES)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    at, byte_rate = 12, 0
    while at + 8 <= len(head):
        kind, size = head[at : at + 4], struct.unpack_from("<I", head, at + 4)[0]
        if kind == b"fmt " and at + 20 <= len(head):
            byte_rate = struct.unpack_from("<I", head, at + 16)[0]
        if kind == b"data":
            return WavData(size, byte_rate, at + 8)
        at += 8 + size + (size & 1)
    return None


def loudest_rms(wav: np.ndarray) -> float:
    """RMS of the loudest SILENCE_BLOCK_S block of a clip (the whole clip when it is shorter)."""
    n = int(SILENCE_BLOCK_S * SAMPLE_RATE)
    if len(wav) <= n:
        return rms(wav)
    blocks = wav[: len(wav) // n * n].reshape(-1, n)
    return max(float(np.sqrt(np.einsum("ij,ij->i", blocks, blocks, dtype=np.float64).max() / n)), rms(wav[-n:]))


def rms(wav: np.ndarray) -> float:
    """Root mean square of samples (0 for none), in float64."""
    return float(np.sqrt(np.mean(wav.astype(np.float64) ** 2))) if len(wav) else 0.0


def _decode_audio(
    path: str | Path, max_duration_s: float, downmix: list[str], rate: int = SAMPLE_RATE
) -> np.ndarray | None:
    """The decoded mono samples at `rate` (the file's own: not resampled), or None where ffmpeg
    refused or failed; a file whose many channels ffmpeg cannot downmix by itself (no known
    layout) is decoded again with an explicit average of its channels."""
    # Decode at most a little past the limit, so hour-long files cost no more than the limit.
    out = ["-map", "0:a:0", "-vn", "-t", f"{max_duration_s + 1:.3f}", *downmix, "-ar", str(rate), "-f", "f32le", "-"]
    # a little past what -t asks: where the timestamps lie, the bytes still stop it
    cap = int((max_duration_s + 2) * rate) * 4
    proc = run_ffmpeg_on(path, ["-v", "error"], out, max_output_bytes=cap)
    if proc.returncode == 0:
        return np.frombuffer(proc.stdout, dtype=np.float32).copy()
    n = unmixable_channels(proc.stderr)
    if n is not None and downmix == DOWNMIX:
        if n > MAX_CHANNELS:
            raise too_many_channels(n)
        return _decode_audio(path, max_duration_s, ["-af", average_of(n)], rate)
    return None


def too_many_channels(n: int) -> UnsupportedMedia:
    """The refusal of a recording of `n` channels, more than ffmpeg mixes."""
    return UnsupportedMedia(
        f"audio has {n} channels; at most {MAX_CHANNELS} are supported: mix it down to stereo or mono", field="audio"
    )


def unmixable_channels(stderr: bytes) -> int | None:
    """How many channels a recording has, where ffmpeg said it knows no downmix of them (no
    layout: "Rematrix is needed between N channels ..."); None where it said nothing of the kind."""
    said = re.search(rb"Rematrix is needed between (\d+) channels", stderr)
    return int(said.group(1)) if said else None


def average_of(channels: int, layout: str = "mono") -> str:
    """An ffmpeg `pan` filter that averages `channels` channels into each channel of `layout`
    (mono, or stereo: the same average on both sides)."""
    mean = "+".join(f"{1 / channels:.8f}*c{i}" for i in range(channels))
    return f"pan={layout}|" + "|".join(f"c{k}={mean}" for k in range(2 if layout == "stereo" else 1))


def ffmpeg_not_started(e: OSError) -> PipelineError:
    """ffmpeg's start failed: why, without a path (out of file handles or processes, not installed)."""
    return PipelineError(f"ffmpeg could not be started: {e.strerror or e}")


def run_ffmpeg_on(
    path: str | Path, verbosity: list[str], output: list[str], max_output_bytes: int | None = None
) -> subprocess.CompletedProcess:
    """ffmpeg reading one upload: the file is handed over as an open descriptor (the only
    protocol allowed is `fd`, so nothing a file names can be opened) and only AUDIO_DEMUXERS may
    read it. With max_output_bytes, ffmpeg is stopped once its output passes that many bytes and
    the answer holds those bytes (return code 0: what was asked for was made): `-t` counts by the
    stream's timestamps, and a stream whose timestamps never advance would otherwise be decoded
    whole, into memory, whatever `-t` says."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise PipelineError("the uploaded audio could not be read") from e
    cmd = [
        FFMPEG,
        "-nostdin",
        "-hide_banner",
        *verbosity,
        "-protocol_whitelist",
        "fd",
        "-format_whitelist",
        ",".join(AUDIO_DEMUXERS),
        *(["-ignore_length", "1"] if _samples_past_declared_end(path) else []),
        "-fd",
        str(fd),
        "-i",
        "fd:",
        *output,
    ]
    try:
        with tempfile.TemporaryFile() as log:  # a file: a full stderr pipe would stall the decode
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, pass_fds=(fd,))
            expendable(proc.pid)
            out, cut, timed_out = _output_of(proc, max_output_bytes, DECODE_TIMEOUT_S)
            log.seek(0)
            errors = log.read()
    except OSError as e:
        raise ffmpeg_not_started(e) from e
    finally:
        os.close(fd)
    if timed_out:
        raise UnsupportedMedia("audio took too long to decode", field="audio")
    return subprocess.CompletedProcess(cmd, 0 if cut else proc.returncode, out, errors)


def _output_of(proc: subprocess.Popen, max_bytes: int | None, timeout_s: float) -> tuple[bytes, bool, bool]:
    """A running process's standard output, at most max_bytes of it (then it is killed), and
    whether it was cut there, and whether it ran past timeout_s (then it is killed too)."""
    late = threading.Event()

    def stop_late() -> None:
        late.set()
        proc.kill()

    timer = threading.Timer(timeout_s, stop_late)
    timer.start()
    chunks, total, cut = [], 0, False
    try:
        assert proc.stdout is not None
        while chunk := proc.stdout.read(OUTPUT_CHUNK_BYTES):
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                cut = True
                proc.kill()
                break
        proc.wait()
    except BaseException:  # ^C, SIGTERM in the CLI: no ffmpeg left running
        proc.kill()
        proc.wait()
        raise
    finally:
        timer.cancel()
        if proc.stdout is not None:
            proc.stdout.close()
    out = b"".join(chunks)
    return (out[:max_bytes] if cut else out), cut, late.is_set()


@contextmanager
def upload_decode() -> Iterator[None]:
    """A slot for decoding an upload in a request thread (at most AUDIO_DECODES at once, as many
    waiting up to AUDIO_DECODE_WAIT_S; one more is Busy at once). A job already admitted decodes
    without one: it must not wait behind new uploads."""
    busy = Busy(f"{AUDIO_DECODES} recordings are being decoded at once, the most this server allows; retry shortly")
    if not _audio_decodes_and_waiting.acquire(blocking=False):
        raise busy
    try:
        if not _audio_decodes.acquire(timeout=AUDIO_DECODE_WAIT_S):
            raise busy
        try:
            yield
        finally:
            _audio_decodes.release()
    finally:
        _audio_decodes_and_waiting.release()


@dataclass(frozen=True)
class Probed:
    """What ffmpeg's probe of a file found: its demuxer's name ("wav", "mov,mp4,...", "jpeg_pipe"),
    None when nothing recognises it, whether it holds an audio stream, and whether the demuxer
    could open it at all (an MP4 cut short lacks the index it keeps at its end)."""

    format: str | None
    has_audio: bool
    opened: bool = True


def probed_audio(path: str | Path) -> Probed:
    """The probe reads this file only, under the same allow-lists as the decode."""
    proc = run_ffmpeg_on(path, ["-v", "debug"], [])  # no output: ffmpeg stops once the file is open
    found = re.search(rb"Format (\S+) probed with size=", proc.stderr)
    has_audio = re.search(rb"Stream #\d+:\d+\S*: Audio:", proc.stderr) is not None
    opened = b"Error opening input" not in proc.stderr
    return Probed(found.group(1).decode("ascii", "replace") if found else None, has_audio, opened)


def _cut_id3(path: str | Path) -> str | None:
    """Why a file no format recognises is still a recording: an MP3 whose ID3 tag (its cover
    art, often 100s of kB) is longer than the file, which was cut short inside it."""
    try:
        with open(path, "rb") as f:
            head = f.read(10)
        size = os.path.getsize(path)
    except OSError:
        return None
    if len(head) < 10 or head[:3] != b"ID3" or any(b & 0x80 for b in head[6:10]):
        return None
    tag = 10 + sum(b << (7 * (3 - i)) for i, b in enumerate(head[6:10]))  # its size: 7 bits a byte
    if tag < size:
        return None
    return (
        f"audio is an MP3 cut short: its tag (ID3: the title, cover art...) takes {tag} bytes and the file "
        f"ends at {size}, before any sound: the upload or the download stopped early"
    )


# ffmpeg's names for the image formats it recognises (a photo given as the recording)
IMAGE_DEMUXERS = {
    "jpeg_pipe": "JPEG",
    "png_pipe": "PNG",
    "webp_pipe": "WebP",
    "gif": "GIF",
    "gif_pipe": "GIF",
    "bmp_pipe": "BMP",
    "tiff_pipe": "TIFF",
    "svg_pipe": "SVG",
    "image2": "still",
}


def _undecodable(path: str | Path) -> UnsupportedMedia:
    """Why a file did not decode, in the user's words: empty, an image, no sound in it, or a
    format named where ffmpeg recognised one."""
    supported = f"supported: {AUDIO_FORMATS_TEXT}"
    try:
        if os.path.getsize(path) == 0:
            return UnsupportedMedia("audio file is empty (0 bytes)", field="audio")
    except OSError:
        pass
    probed = probed_audio(path)
    name = probed.format
    if name is None:
        cut = _cut_id3(path)
        return UnsupportedMedia(cut or f"audio is not in a recognised format ({supported})", field="audio")
    picture = IMAGE_DEMUXERS.get(name)
    if picture is not None:
        return UnsupportedMedia(
            f"audio is a {picture} image, not a recording (are the image and the audio swapped?)", field="audio"
        )
    if not any(part in AUDIO_DEMUXERS for part in name.split(",")):
        return UnsupportedMedia(f"audio format {name!r} is not supported ({supported})", field="audio")
    container = name.split(",")[0]
    if not probed.has_audio and container in SOUND_ONLY_DEMUXERS:
        # (a WAV header with 0 Hz or 0 channels, a FLAC cut at its first frames: "no sound track"
        # told the sender the recording had none)
        return UnsupportedMedia(
            f"audio: the {container} file holds no sound that can be read: it is cut short, or its header "
            "is damaged (sample rate, channels, sample size)",
            field="audio",
        )
    if not probed.opened:  # recognised, then refused by its demuxer: no streams to speak of
        index = (
            " (an MP4 or M4A not written for streaming keeps its index at its end: none came)"
            if container == "mov"
            else ""
        )
        return UnsupportedMedia(
            f"audio: the {container} file cannot be opened: it is cut short{index} or damaged; an upload or a "
            "recorder that stopped early leaves such a file",
            field="audio",
        )
    if not probed.has_audio:
        return UnsupportedMedia(f"audio: the file ({container}) has no sound track", field="audio")
    return UnsupportedMedia(f"audio could not be decoded as {container} ({supported})", field="audio")


def full_scale(pcm: np.ndarray) -> np.ndarray:
    """16- and 32-bit integer samples (as decoders and TTS engines hand PCM over) as float32 in
    -1..1; any other array as it is."""
    pcm = np.asarray(pcm)
    if pcm.dtype in (np.int16, np.int32):
        return (pcm / float(-np.iinfo(pcm.dtype).min)).astype(np.float32)
    return pcm


def mono_samples(pcm: np.ndarray) -> np.ndarray:
    """Speech handed over in memory (to a live session, or to a render as an array) -> float32 (n,):
    16- and 32-bit integers scaled (a TTS engine's PCM as it comes); refused, naming the fault:
    anything that is not one channel of finite float or integer samples (a stereo array would be
    heard as one voice at half speed, NaN as silence), and floats far outside -1..1."""
    pcm = np.asarray(pcm)
    if pcm.ndim == 2 and 1 in pcm.shape:
        pcm = pcm.reshape(-1)
    if pcm.ndim != 1:
        raise InvalidParameter(
            f"speech must be one channel, shape (n,); got shape {pcm.shape} (mix it down first: pcm.mean(axis=1))",
            field="audio",
        )
    pcm = full_scale(pcm)
    if pcm.dtype.kind != "f":
        raise InvalidParameter(f"speech must be float (-1..1), int16 or int32 samples; got {pcm.dtype}", field="audio")
    pcm = pcm.astype(np.float32, copy=False)
    if not np.isfinite(pcm).all():
        raise InvalidParameter("speech holds NaN or infinite samples", field="audio")
    peak = float(np.abs(pcm).max()) if pcm.size else 0.0
    if peak > MAX_FLOAT_PEAK:
        raise InvalidParameter(
            f"speech samples must lie in -1..1; these reach {peak:.4g} (16-bit values given as floats? divide "
            "them by 32768, or pass them as int16)",
            field="audio",
        )
    return pcm


def resampled(pcm: np.ndarray, rate: int, to: int = SAMPLE_RATE) -> np.ndarray:
    """Samples at `rate` Hz (a caller's array: a TTS engine's 24 kHz, a recording's 44.1 kHz) at
    `to` Hz; polyphase, so what lies above the new Nyquist does not fold back as noise."""
    if rate == to:
        return pcm
    from scipy.signal import resample_poly

    common = math.gcd(rate, to)
    return resample_poly(pcm, to // common, rate // common).astype(np.float32)


def sample_rate_of(value: object) -> int:
    """A caller's sample rate, in Hz, checked (InvalidParameter naming `sample_rate`)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not (MIN_SAMPLE_RATE <= value <= MAX_SAMPLE_RATE)
    ):
        raise InvalidParameter(
            f"sample_rate must be a whole number of Hz from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}; got {value!r}",
            field="sample_rate",
        )
    return int(value)


def check_waveform(wav: np.ndarray, max_duration_s: float) -> np.ndarray:
    """A mono waveform (N,) at SAMPLE_RATE, checked as a decoded file is: not empty, not longer
    than the limit, not silent; integer samples scaled to full scale (they were clipped: a
    square wave), non-finite samples zeroed (past MAX_BROKEN_SHARE of them, refused), the rest
    clipped to [-1, 1]."""
    wav = np.asarray(full_scale(wav), dtype=np.float32)
    if wav.ndim != 1:
        raise UnsupportedMedia(f"audio must be one mono channel, got an array of shape {wav.shape}", field="audio")
    if wav.size < MIN_AUDIO_S * SAMPLE_RATE:
        raise EmptyAudio(f"audio is empty (less than {MIN_AUDIO_S:g} s decoded)", field="audio")
    if not np.isfinite(wav).all():
        wav = _finite_or_damaged(wav.copy())  # (the caller's array stays as it was)
    wav = wav - np.float32(wav.mean())  # a DC offset is no sound: it must not pass for speech
    if wav.size > max_duration_s * SAMPLE_RATE:
        raise AudioTooLong(f"audio is longer than the limit of {max_duration_s:g} s", field="audio")
    level_rms = loudest_rms(wav)
    if level_rms < SILENCE_RMS:
        if level_rms == 0:
            raise EmptyAudio(
                f"audio is silent (digital silence; speech must reach {SILENCE_DBFS:g} dBFS RMS)", field="audio"
            )
        raise EmptyAudio(
            f"audio is silent or too quiet (its loudest {SILENCE_BLOCK_S:g} s is {20 * np.log10(level_rms):.0f} "
            f"dBFS RMS; speech must reach {SILENCE_DBFS:g} dBFS): if it holds speech, raise its level",
            field="audio",
        )
    return np.clip(wav, -1.0, 1.0)
