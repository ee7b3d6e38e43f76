"""The pipeline object: load models once, then turn (portrait, speech) into an MP4, many times."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import cv2
import numpy as np
from threadpoolctl import threadpool_limits

from .audio_features import PhoneRecognizer, encode_audio
from .checks import check_output, frame_count
from .decoders import DecoderKind, PreparedDecoder, choose_decoder, get_decoder
from .errors import PipelineError
from .face import FaceAnalyzer, crop_box
from .geometry import crop_and_scale
from .lipsync import mouth_lag, mouth_opening
from .media import SAMPLE_RATE, check_waveform, decode_budget, load_audio, load_image
from .motion import build_rig, predict_motion
from .options import GenerateOptions
from .render_pool import RenderPool, render_here
from .settings import Settings, as_settings
from .writer import VideoWriter

BATCH_FRAMES = 8  # frames rendered and handed to the writer at a time
UPSCALE_WARN = 1.25  # a face enlarged more than this from the photo is reported in warnings
Progress = Callable[[str, float], None]


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
        if self._render_pool is not None:
            self._render_pool.start()

    def close(self) -> None:
        """Stop the render processes (they also stop when this process exits)."""
        if self._render_pool is not None:
            self._render_pool.close()

    def _batches(self, decoder: PreparedDecoder, coeffs: np.ndarray, head: np.ndarray):
        """Rendered frames in batches of BATCH_FRAMES, in order; a clip of one or two batches is
        rendered here (handing the decoder to the helpers would cost more than it saves)."""
        if self._render_pool is None or len(coeffs) <= 2 * BATCH_FRAMES:
            return render_here(decoder, coeffs, head, BATCH_FRAMES)
        return self._render_pool.frames(decoder, coeffs, head, BATCH_FRAMES)

    def options(self, params: dict | None = None) -> GenerateOptions:
        return GenerateOptions.from_dict(params, self.settings)

    def __call__(
        self,
        image: str | Path | np.ndarray,
        audio: str | Path | np.ndarray,
        options: GenerateOptions | None = None,
        *,
        out_path: str | Path | None = None,
        progress: Progress | None = None,
    ) -> GenerationResult:
        """Portrait (path or RGB uint8 array (H, W, 3)) + speech (path or mono float32 array (N,) at
        media.SAMPLE_RATE) -> MP4 at out_path. Arrays (e.g. from `checks.check_inputs`) are not
        decoded again; a waveform is still checked against the limits as a file is.

        Without out_path the video goes to the configured output_dir under a fresh uuid name.
        `progress(stage, fraction)` is called as the work advances.
        """
        opts = options or self.options()
        if out_path is None:
            out_path = Path(self.settings.output_dir) / f"{uuid.uuid4().hex}.mp4"
        limits = self.settings.limits
        report = progress or (lambda stage, frac: None)
        timings: dict[str, float] = {}
        warnings: list[str] = []
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = round(now - clock, 3)
            clock = now

        # 1. decode and check the inputs
        report("decode", 0.0)
        budget = decode_budget(limits.decode_memory_mb, limits.decode_wait_s)
        rgb = image if isinstance(image, np.ndarray) else load_image(image, limits.max_image_pixels, budget)
        max_s = limits.max_duration_s
        wav = check_waveform(audio, max_s) if isinstance(audio, np.ndarray) else load_audio(audio, max_s)
        audio_s = len(wav) / SAMPLE_RATE
        duration = opts.duration if opts.duration is not None else audio_s
        n_frames = frame_count(opts, audio_s)
        lap("decode")

        # 2. face analysis, crop and scale to the output frame (its size checked before it is built)
        report("face", 0.05)
        image_h, image_w = rgb.shape[:2]
        if not opts.crop_to_face:  # the frame is the whole photo: refused before the face is sought
            check_output((image_h, image_w), None, opts, n_frames, limits)
        face = self.faces.analyze(rgb)
        box = crop_box(face.box, rgb.shape[:2], opts.expand_ratio, opts.crop_to_face)
        check_output((image_h, image_w), box, opts, n_frames, limits)
        framing = crop_and_scale(rgb, face.landmarks, box, opts.min_resolution)
        lm = framing.landmarks
        height, width = framing.frame.shape[:2]
        if framing.upscale > UPSCALE_WARN:
            warnings.append(
                f"the face is enlarged {framing.upscale:.1f}x from the photo: a larger or closer "
                "portrait gives a sharper video"
            )
        lap("face")

        # 3. duration: trim or pad the audio with silence
        n_samples = int(round(duration * SAMPLE_RATE))
        if n_samples > len(wav):
            warnings.append(f"duration {duration:g} s is longer than the audio ({audio_s:.2f} s): padded with silence")
            wav = np.concatenate([wav, np.zeros(n_samples - len(wav), np.float32)])
        elif n_samples < len(wav):
            warnings.append(f"audio ({audio_s:.2f} s) trimmed to duration {duration:g} s")
            wav = wav[:n_samples]
        warnings += [f"{name} is not used by the {self.decoder.name} decoder" for name in self.decoder.unused(opts)]
        if self.decoder.speaks:
            return self._speak(framing, wav, n_frames, duration, opts, out_path, report, lap, timings, warnings)

        # 4. audio encoder
        report("audio", 0.1)
        # a long recording is recognised in two halves, one of them by a render helper
        assert self.phones is not None  # set for every decoder that does not speak
        with self._render_pool.recogniser() if self._render_pool else contextlib.nullcontext(None) as second:
            feats = encode_audio(wav, n_frames, opts.fps, self.phones, second)
        lap("audio")

        # 5. motion prediction, smoothing and lip-sync calibration
        report("motion", 0.15)
        rig = build_rig(lm)
        motion = predict_motion(
            feats,
            rig,
            dynamic_scale=opts.dynamic_scale,
            motion_scale=opts.motion_scale,
            smooth=opts.smooth_motion,
            align=opts.align_mouth,
            seed=opts.seed,
        )
        lap("motion")

        # 6. decoder set-up, then render and encode frames in batches (streamed)
        decoder = self.decoder.prepare(framing, rig, opts)
        lap("decoder_setup")
        done = 0
        with (
            VideoWriter(out_path, width, height, opts.fps, wav, duration) as writer,
            contextlib.closing(self._batches(decoder, motion.coeffs, motion.head)) as batches,
        ):
            for frames in batches:
                writer.write(frames)
                done += len(frames)
                report("render", 0.2 + 0.8 * min(1.0, done / n_frames))
        lap("render")  # rendering and encoding overlap: one figure for both
        timings["total"] = round(sum(timings.values()), 3)
        report("done", 1.0)
        return GenerationResult(
            output_path=str(out_path),
            duration=round(n_frames / opts.fps, 4),
            frames=n_frames,
            fps=opts.fps,
            width=width,
            height=height,
            seed=opts.seed,
            lipsync_offset_ms=motion.lipsync_offset_ms,
            timings=timings,
            warnings=tuple(warnings),
        )

    def _speak(self, framing, wav, n_frames, duration, opts, out_path, report, lap, timings, warnings):
        """Steps 4-6 for a decoder that makes the frames from the waveform itself."""
        current = ["decoder_setup"]

        def staged(stage: str, frac: float) -> None:  # each stage's seconds in timings
            if stage != current[0]:
                lap(current[0])
                current[0] = stage
            report(stage, frac)

        video = self.decoder.speak(framing, wav, n_frames, opts, staged)
        height, width = video.frame.shape[:2]
        done, opening, offset_ms = 0, [], video.lipsync_offset_ms
        batches = iter(video.batches)
        with (
            VideoWriter(out_path, width, height, opts.fps, wav, duration) as writer,
            contextlib.closing(batches) if hasattr(batches, "close") else contextlib.nullcontext(),
        ):
            for frames in batches:
                writer.write(frames)
                done += len(frames)
                if opts.align_mouth:  # the mouth of each frame, measured as it is written
                    opening.extend(mouth_opening(self.faces, f) for f in frames)
            if done != n_frames:
                raise PipelineError(f"the {self.decoder.name} decoder made {done} frames, not {n_frames}")
            lap(current[0])
            if opts.align_mouth:
                lag = mouth_lag(opening, wav, opts.fps)
                if lag is None:
                    warnings.append(
                        "align_mouth: too few generated frames show a measurable face; the audio was not moved"
                    )
                else:  # the mouth is `lag` frames late: the audio follows it
                    writer.audio_delay_s = lag / opts.fps
                    offset_ms = round(lag * 1000 / opts.fps, 1)
        lap("align")
        timings["total"] = round(sum(timings.values()), 3)
        report("done", 1.0)
        return GenerationResult(
            output_path=str(out_path),
            duration=round(n_frames / opts.fps, 4),
            frames=n_frames,
            fps=opts.fps,
            width=width,
            height=height,
            seed=opts.seed,
            lipsync_offset_ms=offset_ms,
            timings=timings,
            warnings=tuple(warnings),
        )


def load_pipeline(settings: Settings | Mapping | str | Path | None = None) -> SonicPipeline:
    """Load the models once; the returned pipeline is called per request."""
    return SonicPipeline(as_settings(settings))
