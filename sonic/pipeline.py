"""The pipeline object: load models once, then turn (portrait, speech) into an MP4, many times."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Generator, Mapping

import cv2
import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from .audio_features import AudioFeatures, PhoneRecognizer, encode_audio, hear
from .checks import check_output, existing_file, frame_count, load_portrait, writable_video_path
from .decoders import DecoderKind, PreparedDecoder, choose_decoder, get_decoder
from .errors import AudioTooLong, InputTooLarge, InvalidParameter, PipelineError, UnsupportedMedia
from .face import FaceAnalyzer, crop_box
from .geometry import Framing, crop_and_scale, framing_warnings
from .lipsync import mouth_lag, mouth_opening
from .media import (
    SAMPLE_RATE,
    SOUND_RATE,
    check_image_size,
    check_waveform,
    load_audio,
    mono_samples,
    resampled,
    sample_rate_of,
)
from .motion import Motion, build_rig, predict_motion
from .options import GenerateOptions
from .phones_pool import PhonesPool
from .render_pool import RenderPool, render_here
from .settings import Limits, Settings, as_settings
from .sound import Sound, fitted_samples, load_sound
from .writer import VideoWriter

BATCH_FRAMES = 8  # frames rendered and handed to the writer at a time
VIDEO_SUFFIXES = (".mp4", ".m4v")  # names a player takes for what the writer makes
Progress = Callable[[str, float], None]  # (stage, fraction of the whole request done, 0-1)


@dataclass(frozen=True)
class GenerationResult:
    output_path: str
    duration: float
    frames: int
    fps: int
    width: int
    height: int
    seed: int
    lipsync_offset_ms: float
    timings: dict = field(default_factory=dict)
    warnings: tuple = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["warnings"] = list(self.warnings)
        return d


class StageTimer:
    """Wall-clock seconds each stage of one request took, in the order the stages ended."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}  # stage -> s, rounded to ms
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        """End stage `name`: it took the time since the last lap (or since the timer was made)."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 3)
        self._clock = now

    @property
    def total(self) -> float:
        """The stages' seconds summed, s."""
        return round(sum(self.timings.values()), 3)


# a recording loud enough to pass the silence check whose loudness never rises as a voice does
# (steady noise, a hum, a tone: a wrong file) makes no talking face; the caller is told why
NO_SPEECH = (
    "no speech found in the audio (only a steady sound such as a hum, noise or a tone): is it the right recording?"
)


CLIPPED = (
    "the recording is clipped (recorded too loud: its loud parts are cut flat at full scale): the mouth "
    "follows the speech less closely, and rests less in its pauses (record at a lower level)"
)
# over-driven speech: a share of its loud samples this large lies within 2 % of a peak near full
# scale (clean speech, music and song: under 0.5 %; speech peaking at 0.42 given 24 dB of gain,
# 16.6 dB past full scale, on which the scorer's sync fell from 0.76 to 0.61: 16 %; given 12 dB,
# sync unchanged: 2 %)
CLIPPED_WARN_SHARE = 0.05
CLIPPED_MIN_PEAK = 0.5


def clipped_share(wav: np.ndarray) -> float:
    """The share of a recording's loud samples (above -34 dBFS) that sit within 2 % of its peak,
    when that peak is near full scale (else 0): high where the loud parts were cut flat."""
    level = np.abs(wav)
    peak = float(level.max(initial=0.0))
    if peak < CLIPPED_MIN_PEAK:
        return 0.0
    loud = int(np.count_nonzero(level > 0.02))
    return float(np.count_nonzero(level >= 0.98 * peak)) / max(loud, 1)


def noisy_warning(over_background_db: float) -> str:
    # (the loudest moments over the quietest: with music as loud as the voice and no pause in it,
    # "the speech stands N dB above" the music told of a voice that in fact lay under it)
    return (
        f"the recording's loudest moments stand only {over_background_db:.0f} dB above its quietest: the "
        "speech has background noise or music under it, and the mouth follows the speech less closely "
        "than on a clean recording (a quieter room, a closer microphone, noise reduction or no music bed "
        "under the voice gives a livelier, truer mouth)"
    )


class Warnings:
    """What a request is told besides its video (an enlarged face, a trimmed recording, a
    parameter the decoder ignores), in the order it was found."""

    def __init__(self) -> None:
        self._messages: list[str] = []

    def add(self, message: str) -> None:
        self._messages.append(message)

    def as_tuple(self) -> tuple[str, ...]:
        return tuple(self._messages)


@dataclass(frozen=True)
class Clip:
    """The audio of one request fitted to its duration, and the video frames that cover it."""

    wav: np.ndarray  # (N,) float32 mono at SAMPLE_RATE, N = round(duration * SAMPLE_RATE): the motion's
    duration: float  # s
    n_frames: int  # at the request's fps
    sound: Sound  # the same recording, fitted alike, at the sound track's quality


def fit_to_duration(wav: np.ndarray, duration: float, warnings: Warnings) -> np.ndarray:
    """The waveform (N,) at SAMPLE_RATE trimmed, or padded with silence, to `duration` s; a
    change is reported in `warnings`."""
    audio_s = len(wav) / SAMPLE_RATE
    n_samples = int(round(duration * SAMPLE_RATE))
    if n_samples > len(wav):
        warnings.add(f"duration {duration:g} s is longer than the audio ({audio_s:.2f} s): padded with silence")
    elif n_samples < len(wav):
        warnings.add(f"audio ({audio_s:.2f} s) trimmed to duration {duration:g} s")
    return fitted_samples(wav, n_samples)


def _no_progress(stage: str, fraction: float) -> None:
    """The progress callback of a caller that gave none."""


class SonicPipeline:
    def __init__(
        self, settings: Settings | Mapping | None = None, *, faces=None, phones=None, decoder: DecoderKind | None = None
    ):
        """Load the models; `faces` (`.analyze(rgb)`), `phones` (a PhoneRecognizer) and `decoder`
        (a DecoderKind) replace the ones the settings name, e.g. small stand-ins in tests of the
        orchestration where the models are not the point."""
        self.settings = as_settings(settings)
        # the decoder kind is looked up first: a misspelt name fails before any model loads
        kind = decoder if decoder is not None else get_decoder(choose_decoder(self.settings))
        self.decoder = kind.load(self.settings)
        self.device = self.decoder.device  # the warp decoder runs on the CPU with OpenCV
        self.faces = faces if faces is not None else FaceAnalyzer()
        # a decoder that speaks makes frames from the waveform itself: no phones, no motion
        self.phones = None if self.decoder.speaks else phones if phones is not None else PhoneRecognizer()
        # frames are rendered by `render_processes` helper processes, each single-threaded inside
        # (see render_pool.py; the x264 encoder runs beside them in its own process); 0 renders here
        self.render_processes = 0 if self.decoder.speaks else max(0, self.settings.render_processes)
        cv2.setNumThreads(1)
        # numpy's OpenBLAS would start a thread per core for the decoder's matrix products; its
        # threads spin while they wait and took a third of a core from the render and the encoder
        threadpool_limits(1, user_api="blas")
        self._render_pool = RenderPool(self.render_processes) if self.render_processes else None
        self._one_at_a_time = threading.Lock()  # a render's face graphs and helpers are the pipeline's own
        self._process = os.getpid()  # where its face graphs and helpers live (see _in_its_own_process)
        # a long recording's second half is recognised by a render helper (phones_pool.py)
        self._phones_pool = PhonesPool(self._render_pool) if self._render_pool is not None else None
        if self._render_pool is not None:
            self._render_pool.start()

    def close(self) -> None:
        """Stop the render processes (they also stop when this process exits)."""
        if self._render_pool is not None:
            self._render_pool.close()

    def __enter__(self) -> SonicPipeline:
        return self

    def __exit__(self, *exc: object) -> None:  # `with load_pipeline() as pipe:` closes it
        self.close()

    def _in_its_own_process(self) -> None:
        """A pipeline copied into a child by fork (multiprocessing's default on Linux) hung there
        for good: the face analyser's graph threads and the render helpers' sockets are its
        parent's."""
        if os.getpid() != self._process:
            raise PipelineError(
                "this pipeline was loaded in another process and copied here by fork (multiprocessing's "
                "default on Linux), where it cannot run: call sonic.load_pipeline() in each process, or "
                "use multiprocessing.get_context('spawn')"
            )

    def options(self, params: dict | None = None) -> GenerateOptions:
        return GenerateOptions.from_dict(params, self.settings)

    def __call__(
        self,
        image: str | Path | np.ndarray | Image.Image,
        audio: str | Path | np.ndarray,
        options: GenerateOptions | Mapping[str, Any] | None = None,
        *,
        out_path: str | Path | None = None,
        progress: Progress | None = None,
        sound_file: str | Path | None = None,
        sample_rate: int | None = None,
    ) -> GenerationResult:
        """Portrait (a path, an open binary file, a PIL image or an RGB uint8 array (H, W, 3)) +
        speech (a path, or a mono array (N,) of float samples in -1..1 or int16 / int32 PCM, at
        `sample_rate` Hz: default sonic.SAMPLE_RATE, 16 kHz) -> MP4 at out_path. Arrays (e.g.
        from `checks.check_inputs`) are not decoded again, but checked as files are. The video's
        sound is a speech file's own, in stereo at media.SOUND_RATE; with a waveform, the file it
        came from (`sound_file`), else the waveform itself, at its own rate. `options`:
        GenerateOptions, or a dict of parameters (checked). Every fault in what is given is a
        SonicError naming its field, raised before anything is rendered.

        Without out_path the video goes to the configured output_dir under a fresh uuid name; a
        missing folder is made, an MP4 already there replaced (another file is refused).
        `progress(stage, fraction)` is called as the work advances (decode, face, audio, motion,
        render, done); an exception raised from it before `done` cancels the render (no file is
        left). One render at a time: calls from several threads wait their turn (the face analyser's
        graphs and the render helpers are the pipeline's own; run two in parallel with two
        pipelines).
        """
        if isinstance(options, Mapping):
            options = GenerateOptions.from_dict(dict(options), self.settings)
        elif options is not None and not isinstance(options, GenerateOptions):
            raise InvalidParameter(
                f"options must be a dict of parameters or GenerateOptions, got {type(options).__name__}",
                field="options",
            )
        rate = SAMPLE_RATE if sample_rate is None else sample_rate_of(sample_rate)
        if sample_rate is not None and not isinstance(audio, np.ndarray):
            raise InvalidParameter(
                "sample_rate is for an array; a file's own rate is read from it", field="sample_rate"
            )
        if out_path is not None:
            out_path = writable_video_path(out_path, (image, audio, sound_file))
        if progress is not None and not callable(progress):
            raise InvalidParameter(
                f"progress must be a function (stage, fraction), got {type(progress).__name__}", field="progress"
            )
        # (a missing sound_file is allowed: a job's upload may have moved to a bucket, and the
        # waveform is the sound then; a folder was IsADirectoryError from deep inside)
        if sound_file is not None and Path(sound_file).is_dir():
            raise InvalidParameter(f"sound_file {str(sound_file)[:200]!r} is a folder", field="sound_file")
        self._in_its_own_process()
        with self._one_at_a_time:
            return self._generate(image, audio, options, out_path, progress, sound_file, rate)

    def _generate(
        self,
        image: str | Path | np.ndarray | Image.Image,
        audio: str | Path | np.ndarray,
        options: GenerateOptions | None,
        out_path: str | Path | None,
        progress: Progress | None,
        sound_file: str | Path | None,
        sample_rate: int = SAMPLE_RATE,
    ) -> GenerationResult:
        """The numbered steps of a render (`__call__`)."""
        opts = options or self.options()
        if out_path is None:
            out_path = Path(self.settings.output_dir) / f"{uuid.uuid4().hex}.mp4"
        report = progress or _no_progress
        timer, warnings = StageTimer(), Warnings()

        # 1. decode and check the inputs
        report("decode", 0.0)
        rgb, wav, sound = self._decode(image, audio, sound_file, sample_rate)
        audio_s = len(wav) / SAMPLE_RATE
        if cut_short := sound.cut_short(audio_s):
            warnings.add(cut_short)
        if stand_in := sound.stand_in_warning():
            warnings.add(stand_in)
        suffix = Path(out_path).suffix
        if suffix.lower() not in VIDEO_SUFFIXES:  # a player goes by the name
            named = f"its name ends in {suffix!r}" if suffix else "its name has no extension"
            warnings.add(f"the video is an MP4, though {named}: name it .mp4")
        duration = opts.duration if opts.duration is not None else audio_s
        n_frames = frame_count(opts, audio_s)
        timer.lap("decode")

        # 2. face analysis, crop and scale to the output frame (its size checked before it is built)
        report("face", 0.05)
        framing = self.framing(rgb, opts, n_frames)
        for warning in framing_warnings(framing):
            warnings.add(warning)
        timer.lap("face")

        # 3. duration: trim or pad the audio with silence; the parameters this decoder ignores
        # a duration under a frame still makes a frame, and the frame its sound
        duration = max(duration, 1 / opts.fps)
        clip = Clip(fit_to_duration(wav, duration, warnings), duration, n_frames, sound.fitted(duration))
        for name in self.decoder.unused(opts):
            warnings.add(f"{name} is not used by the {self.decoder.name} decoder")
        if self.decoder.speaks:  # the decoder makes the frames from the waveform: its own steps 4-6
            return self._speak(framing, clip, opts, out_path, report, timer, warnings)

        # 4. audio encoder
        report("audio", 0.1)
        feats = self._audio_features(clip, opts.fps)
        sent = wav[: len(clip.wav)]  # the speech as sent: trimmed, not padded
        heard = hear(sent, opts.fps)
        if not heard.speech:
            warnings.add(NO_SPEECH)
        elif heard.noisy:
            warnings.add(noisy_warning(heard.over_background_db))
        if clipped_share(sent) >= CLIPPED_WARN_SHARE:
            warnings.add(CLIPPED)
        timer.lap("audio")

        # 5. motion prediction, smoothing and lip-sync calibration
        report("motion", 0.15)
        rig = build_rig(framing.landmarks)
        motion = predict_motion(
            feats,
            rig,
            dynamic_scale=opts.dynamic_scale,
            motion_scale=opts.motion_scale,
            smooth=opts.smooth_motion,
            align=opts.align_mouth,
            seed=opts.seed,
            gaze=opts.gaze == "natural",
        )
        timer.lap("motion")

        # 6. decoder set-up, then render and encode frames in batches (streamed)
        decoder = self.decoder.prepare(framing, rig, opts)
        timer.lap("decoder_setup")
        self._render(decoder, motion, framing.frame, clip, opts, out_path, report)
        timer.lap("render")  # rendering and encoding overlap: one figure for both

        # 7. the result
        report("done", 1.0)
        return _result(out_path, framing.frame, clip, opts, motion.lipsync_offset_ms, timer, warnings)

    def _decode(
        self,
        image: str | Path | np.ndarray | Image.Image,
        audio: str | Path | np.ndarray,
        sound_file: str | Path | None,
        sample_rate: int = SAMPLE_RATE,
    ) -> tuple[np.ndarray, np.ndarray, Sound]:
        """Step 1: the portrait (H, W, 3) uint8, the speech (N,) float32 at SAMPLE_RATE, decoded
        from files or taken as given (an array at `sample_rate`), checked against the limits, and
        the speech for the sound track (a file's own, at SOUND_RATE)."""
        limits = self.settings.limits
        rgb = decode_portrait(image, limits)
        max_s = limits.max_duration_s
        if isinstance(audio, np.ndarray):
            if max(audio.shape, default=0) > max_s * sample_rate:  # before it is converted or resampled
                raise AudioTooLong(f"audio is longer than the limit of {max_s:g} s", field="audio")
            pcm = mono_samples(audio)
            wav = check_waveform(resampled(pcm, sample_rate), max_s)
            if sound_file is not None:
                return rgb, wav, load_sound(sound_file, max_s, wav)
            if sample_rate == SAMPLE_RATE:
                return rgb, wav, Sound.of_waveform(wav)
            # the sound track from the array as given, at a rate every AAC encoder takes
            return rgb, wav, Sound.of_waveform(resampled(pcm, sample_rate, SOUND_RATE), SOUND_RATE)
        if hasattr(audio, "read"):
            raise InvalidParameter(
                "audio must be a path or a mono array; an open file is not read: give its path", field="audio"
            )
        path = _file_of(audio, "audio")
        wav = load_audio(path, max_s)
        return rgb, wav, load_sound(path, max_s, wav)

    def framing(self, rgb: np.ndarray, opts: GenerateOptions, n_frames: int, faces=None) -> Framing:
        """Step 2: the output frame cut from the photo around the face; an output over the
        limits is refused before the frame is built, and when the frame is the whole photo,
        before the face is sought. `faces` replaces the pipeline's face analyser (a caller on
        another thread brings its own: FaceMesh graphs are not shared between threads)."""
        limits = self.settings.limits
        image_h, image_w = rgb.shape[:2]
        if not opts.crop_to_face:
            check_output((image_h, image_w), None, opts, n_frames, limits)
        if faces is None:
            self._in_its_own_process()
        face = (faces or self.faces).analyze(rgb)
        box = crop_box(face.box, (image_h, image_w), opts.expand_ratio, opts.crop_to_face)
        check_output((image_h, image_w), box, opts, n_frames, limits)
        framing = crop_and_scale(rgb, face.landmarks, box, opts.min_resolution)
        return dataclasses.replace(framing, other_faces=face.others)

    def _audio_features(self, clip: Clip, fps: int) -> AudioFeatures:
        """Step 4: loudness and phones per frame; with render helpers, a long recording is
        recognised in two halves, the second by a helper (phones_pool.py)."""
        assert self.phones is not None  # set for every decoder that does not speak
        if self._phones_pool is None:
            return encode_audio(clip.wav, clip.n_frames, fps, self.phones)
        with self._phones_pool.second_half() as second:
            return encode_audio(clip.wav, clip.n_frames, fps, self.phones, second)

    def _render(
        self,
        decoder: PreparedDecoder,
        motion: Motion,
        frame: np.ndarray,
        clip: Clip,
        opts: GenerateOptions,
        out_path: str | Path,
        report: Progress,
    ) -> None:
        """Step 6: the frames of `motion` rendered in batches and encoded as they come, with the
        clip's audio, into an MP4 of `frame`'s (H, W) size; progress runs from 0.2 to 1."""
        height, width = frame.shape[:2]
        done = 0
        with (
            VideoWriter(out_path, width, height, opts.fps, clip.sound, clip.duration) as writer,
            contextlib.closing(self._batches(decoder, motion.coeffs, motion.head)) as batches,
        ):
            for frames in batches:
                writer.write(frames)
                done += len(frames)
                report("render", 0.2 + 0.8 * min(1.0, done / clip.n_frames))

    def _batches(self, decoder: PreparedDecoder, coeffs: np.ndarray, head: np.ndarray):
        """Rendered frames in batches of BATCH_FRAMES, in order; a clip of one or two batches is
        rendered here (handing the decoder to the helpers would cost more than it saves)."""
        if self._render_pool is None or len(coeffs) <= 2 * BATCH_FRAMES:
            return render_here(decoder, coeffs, head, BATCH_FRAMES)
        return self._render_pool.frames(decoder, coeffs, head, BATCH_FRAMES)

    def _speak(
        self,
        framing: Framing,
        clip: Clip,
        opts: GenerateOptions,
        out_path: str | Path,
        report: Progress,
        timer: StageTimer,
        warnings: Warnings,
    ) -> GenerationResult:
        """Steps 4-6 for a decoder that makes the frames from the waveform itself: its own stages
        (each timed as the decoder reports it), then the mouth measured on the frames and the
        audio moved to match it (align_mouth)."""
        stage = "decoder_setup"  # the stage being timed: the decoder names the next ones

        def staged(name: str, fraction: float) -> None:
            nonlocal stage
            if name != stage:
                timer.lap(stage)
                stage = name
            report(name, fraction)

        # 4. the decoder's frames, written as they come; each frame's mouth measured meanwhile
        video = self.decoder.speak(framing, clip.wav, clip.n_frames, opts, staged)
        height, width = video.frame.shape[:2]
        done, offset_ms = 0, video.lipsync_offset_ms
        opening: list[float] = []  # inner-lip gap / inter-ocular distance per frame (NaN: no face)
        batches = iter(video.batches)
        with (
            VideoWriter(out_path, width, height, opts.fps, clip.sound, clip.duration) as writer,
            # a generator is closed when writing fails, so that the decoder stops generating
            contextlib.closing(batches) if isinstance(batches, Generator) else contextlib.nullcontext(),
        ):
            for frames in batches:
                writer.write(frames)
                done += len(frames)
                if opts.align_mouth:
                    opening.extend(mouth_opening(self.faces, f) for f in frames)
            if done != clip.n_frames:
                raise PipelineError(f"the {self.decoder.name} decoder made {done} frames, not {clip.n_frames}")
            timer.lap(stage)

            # 5. lip-sync: the mouth is `lag` frames late, so the audio follows it
            if opts.align_mouth:
                lag = mouth_lag(opening, clip.wav, opts.fps)
                if lag is None:
                    warnings.add(
                        "align_mouth: too few generated frames show a measurable face; the audio was not moved"
                    )
                else:
                    writer.audio_delay_s = lag / opts.fps
                    offset_ms = round(lag * 1000 / opts.fps, 1)
        timer.lap("align")  # the writer moved the audio as it closed

        # 6. the result
        report("done", 1.0)
        return _result(out_path, video.frame, clip, opts, offset_ms, timer, warnings)


def _result(
    out_path: str | Path,
    frame: np.ndarray,
    clip: Clip,
    opts: GenerateOptions,
    lipsync_offset_ms: float,
    timer: StageTimer,
    warnings: Warnings,
) -> GenerationResult:
    """What a request made: an MP4 of clip.n_frames frames of `frame`'s (H, W) size."""
    height, width = frame.shape[:2]
    return GenerationResult(
        output_path=str(out_path),
        duration=round(clip.n_frames / opts.fps, 4),
        frames=clip.n_frames,
        fps=opts.fps,
        width=width,
        height=height,
        seed=opts.seed,
        lipsync_offset_ms=lipsync_offset_ms,
        timings={**timer.timings, "total": timer.total},
        warnings=warnings.as_tuple(),
    )


def load_pipeline(settings: Settings | Mapping | str | Path | None = None) -> SonicPipeline:
    """Load the models once; the returned pipeline is called per request."""
    return SonicPipeline(as_settings(settings))


def _file_of(source: Any, field: str) -> Any:
    """An open binary file, taken as it is, or a path that names a file (`checks.existing_file`);
    InvalidParameter naming `field` for an object of another kind."""
    if hasattr(source, "read"):
        if isinstance(source, io.TextIOBase):  # open(path) without "rb": its reads failed as UnicodeDecodeError
            raise InvalidParameter(f"{field}: open the file in binary mode (open(path, 'rb'))", field=field)
        return source
    if not isinstance(source, (str, Path)):
        kinds = "a path, a PIL image or an RGB uint8 array" if field == "image" else "a path or a mono array"
        raise InvalidParameter(f"{field} must be {kinds}, got {type(source).__name__}", field=field)
    return existing_file(source, field)


def decode_portrait(image: str | Path | BinaryIO | np.ndarray | Image.Image, limits: Limits) -> np.ndarray:
    """A portrait as given (a path, an open binary file, a PIL image or an RGB uint8 array) ->
    RGB uint8 (H, W, 3), checked against the limits (a SonicError naming `image`)."""
    if isinstance(image, (np.ndarray, Image.Image)):
        return portrait_array(image, limits)
    return load_portrait(_file_of(image, "image"), limits)


def portrait_array(image: np.ndarray | Image.Image, limits: Limits) -> np.ndarray:
    """A portrait given in memory as RGB uint8 (H, W, 3): a PIL image converted, an array checked
    as a file's pixels are (UnsupportedMedia / InputTooLarge naming `image`)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UnsupportedMedia(
            f"an image array must be RGB uint8 of shape (H, W, 3); got {image.dtype} {tuple(image.shape)}",
            field="image",
        )
    if image.shape[0] * image.shape[1] > limits.max_image_pixels:
        raise InputTooLarge(
            f"image has {image.shape[1]}x{image.shape[0]} pixels, more than the limit of "
            f"{limits.max_image_pixels} (limits.max_image_pixels)",
            field="image",
        )
    # a view (a crop, a flip: strided) as its own pixels: MediaPipe refuses an array that is not
    # contiguous, which read as "the face analysis failed" on a valid portrait
    return check_image_size(np.ascontiguousarray(image))
