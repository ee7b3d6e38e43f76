"""Cheap checks of a request's inputs, before anything is queued.

`check_inputs` decodes the portrait and the recording and checks format, pixel count and
duration (the options are already validated by `GenerateOptions.from_dict`), and the output's
size where it follows from the photo alone (`crop_to_face: false`). It needs no face
detector: a web process that only validates and queues never loads FaceMesh, and a face-less
portrait is found by the task that runs the job (`no_face_detected`); the pipeline checks the
output's size of a face crop (`check_output`) once it has found the face, before it renders.

The decoded arrays are returned so that a job run in the same process is not decoded twice
(`SonicPipeline` takes them in place of the paths);
a job run elsewhere decodes its stored files again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputTooLarge, InvalidParameter
from .face import fit_output
from .media import SAMPLE_RATE, decode_budget, load_audio, load_image, upload_decode
from .options import GenerateOptions
from .settings import Limits
from .writer import PART_SUFFIXES, RUN_DIGITS


@dataclass(frozen=True)
class CheckedInputs:
    rgb: np.ndarray  # (H, W, 3) uint8
    wav: np.ndarray  # mono float32 at media.SAMPLE_RATE
    decode_s: float = 0.0  # seconds spent decoding both (reported in the result's timings)

    @property
    def audio_s(self) -> float:
        return len(self.wav) / SAMPLE_RATE

    def count_decode_in(self, timings: dict) -> None:
        """Add the decoding done here to a result's timings (decode and total), in place: the
        pipeline given these arrays decodes nothing itself."""
        for stage in ("decode", "total"):
            timings[stage] = round(timings.get(stage, 0.0) + self.decode_s, 3)


def check_inputs(image: str | Path, audio: str | Path, options: GenerateOptions, limits: Limits) -> CheckedInputs:
    """Decode and check both inputs against the limits (max_image_pixels, max_duration_s, and
    the output limits where the frame is the whole photo); raises the library's errors
    (unsupported_media, input_too_large, audio_too_long, empty_audio) with the field named."""
    t0 = time.perf_counter()
    rgb = load_portrait(image, limits)
    with upload_decode():  # bounded: the request threads' decodes must leave the renders cores
        wav = load_audio(audio, limits.max_duration_s)
    if not options.crop_to_face:
        h, w = rgb.shape[:2]
        check_output((h, w), None, options, frame_count(options, len(wav) / SAMPLE_RATE), limits)
    return CheckedInputs(rgb=rgb, wav=wav, decode_s=time.perf_counter() - t0)


def existing_file(source: str | Path, field: str, shown: str | None = None) -> str | Path:
    """A path that names a file; InvalidParameter naming `field` (shown to the user as `shown`,
    e.g. the CLI's --image) where it is missing or a folder."""
    path = Path(source)
    if not path.is_file():
        if path.is_dir():
            why = "is a folder"
        elif path.exists():  # /dev/stdin, <(...), a FIFO: read once, and no size to check first
            why = "is not a regular file (a pipe or a device): save it to a file and name that"
        else:
            why = "no such file"
        raise InvalidParameter(f"{shown or field} {str(source)[:200]!r}: {why}", field=field)
    return source


def writable_video_path(out_path: str | Path, inputs: tuple[object, ...], shown: str = "out_path") -> Path:
    """Where a video may be written, checked before anything is rendered (InvalidParameter naming
    `out_path`, shown to the user as `shown`, e.g. the CLI's --out): not a folder, not one of the
    `inputs` (it would be overwritten), under a folder that exists or can be made and is
    writable. An MP4 (or empty file) already there is replaced; any other file is not."""
    if not isinstance(out_path, (str, os.PathLike)):
        raise InvalidParameter(f"{shown} must be a path, got {type(out_path).__name__}", field="out_path")
    named = f"{shown} {str(out_path)[:200]!r}"
    if "\0" in str(out_path):  # (pathlib's checks answer False for it, and the write fails)
        raise InvalidParameter(f"{named} cannot be written: a NUL in a file name", field="out_path")
    if str(out_path).endswith(("/", os.sep)):  # (Path drops it)
        raise InvalidParameter(f"{named} ends with a slash: name the video's file", field="out_path")
    try:
        return _writable(Path(out_path), inputs, named)
    except (OSError, ValueError) as e:  # a folder on the way that cannot be searched, a name too long
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:100]
        raise InvalidParameter(f"{named} cannot be written: {reason}", field="out_path") from e


def _writable(path: Path, inputs: tuple[object, ...], named: str) -> Path:
    if path.is_dir():
        raise InvalidParameter(f"{named} is a folder: name the video's file", field="out_path")
    if path.exists():
        if not path.is_file():  # the video replaces it: /dev/null would be gone
            raise InvalidParameter(f"{named} is not a regular file (a device, a FIFO or a socket)", field="out_path")
        for given in inputs:
            if isinstance(given, (str, Path)) and Path(given).exists() and path.samefile(given):
                raise InvalidParameter(f"{named} is one of the inputs: it would be overwritten", field="out_path")
        if not _replaceable(path):  # a recording handed over as an array, written over by its own video
            raise InvalidParameter(
                f"{named} is a file that is not an MP4 video: the video would replace it; "
                "choose another name, or remove it first",
                field="out_path",
            )
    folder = path.parent
    while not folder.exists():  # the writer makes the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise InvalidParameter(f"{named} lies under {str(folder)[:200]!r}, a file", field="out_path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidParameter(f"{named}: the folder {str(folder)[:200]!r} is not writable", field="out_path")
    _name_fits(path, folder, named)
    return path


AUDIO_SUFFIXES = {
    ".m4a",
    ".m4b",
    ".aac",
    ".3gp",
    ".3g2",
    ".wav",
    ".mp3",
    ".flac",
    ".ogg",
    ".opus",
    ".webm",
    ".aif",
    ".aiff",
    ".aifc",
    ".caf",
    ".amr",
}
# an MP4 video's major brands (its `ftyp` box); M4A audio, QuickTime, 3GP and HEIC photos differ
MP4_VIDEO_BRANDS = {b"isom", b"iso2", b"iso4", b"iso5", b"iso6", b"mp41", b"mp42", b"avc1", b"M4V ", b"dash"}


def _replaceable(path: Path) -> bool:
    """Whether a file may be replaced by a video: empty, or an MP4 video already (its `ftyp`
    box's brand) not named as a recording (an audio-only MP4 can carry a video's brand)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if not head:
        return True
    return head[4:8] == b"ftyp" and head[8:12] in MP4_VIDEO_BRANDS and path.suffix.lower() not in AUDIO_SUFFIXES


def _name_fits(path: Path, folder: Path, named: str) -> None:
    """The writer's own files are named after the video (".NAME.RUN.part.remux"): a name that fits
    the file system but not with those additions failed at the end, after the render."""
    try:
        name_max = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    added = max(len(suffix) for suffix in PART_SUFFIXES) + 2 + RUN_DIGITS  # the two dots
    if len(os.fsencode(path.name)) + added > name_max:
        raise InvalidParameter(
            f"{named}: the file name is too long: at most {name_max - added} bytes here "
            f"(the writer names its temporary files after it, {added} more)",
            field="out_path",
        )


def load_portrait(image: str | Path | BinaryIO, limits: Limits) -> np.ndarray:
    """A portrait (a path or an open binary file) decoded to RGB (H, W, 3) uint8 within the
    limits: max_image_pixels, and the decode memory budget shared by this process's decodes."""
    return load_image(image, limits.max_image_pixels, decode_budget(limits.decode_memory_mb, limits.decode_wait_s))


def frame_count(options: GenerateOptions, audio_s: float) -> int:
    """Frames of the video: the requested duration (else the audio's, s) at options.fps."""
    duration = options.duration if options.duration is not None else audio_s
    return max(1, int(round(duration * options.fps)))


def check_output(
    image_hw: tuple[int, int],
    box: tuple[int, int, int, int] | None,
    options: GenerateOptions,
    n_frames: int,
    limits: Limits,
) -> None:
    """Refuse an output over max_output_pixels or max_output_pixel_frames (input_too_large, the
    limit named) before anything is rendered: the frame that `box` (x0, y0, x1, y1 photo px; None:
    the whole photo) of a photo of `image_hw` (H, W) scales to at options.min_resolution, times
    `n_frames`."""
    h, w = image_hw
    width, height = fit_output(box or (0, 0, w, h), (h, w), options.min_resolution)[1]
    if width * height > limits.max_output_pixels:
        raise InputTooLarge(
            f"the output frame would be {width}x{height} pixels, more than the limit of {limits.max_output_pixels} "
            "(limits.max_output_pixels); use crop_to_face: true, a lower min_resolution or a less elongated image",
            field="image",
        )
    if width * height * n_frames > limits.max_output_pixel_frames:
        raise InputTooLarge(
            f"the output would be {n_frames} frames of {width}x{height} pixels, more than the limit of "
            f"{limits.max_output_pixel_frames} pixels x frames (limits.max_output_pixel_frames); "
            "use a shorter duration, a lower fps or a lower min_resolution",
            field="duration",
        )
