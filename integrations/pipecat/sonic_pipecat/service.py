"""SonicVideoService: a talking face after the text-to-speech of a Pipecat pipeline.

It takes the pipeline's TTS audio frames, speaks them with sonic's live engine in this process
(`sonic.live.LiveSession`: no network, no key) and pushes downstream, on a frame clock, the
face's video frames (`OutputImageRawFrame`, RGB) and the audio they show, in sync (the engine's
80 ms look-ahead delays both alike), in chunks of the transport's size. Between utterances the
face idles (blinks, gaze, breath); an interruption drops what was queued and closes the mouth
within a few frames. The time from an utterance's first audio to its first frame is reported as
TTFB in Pipecat's metrics.

With `url=` it uses a running sonic service's live sessions instead (sonic_pipecat/remote.py: the
portrait and the speech go over HTTP, the face comes back over WebRTC): nothing of sonic needs
to be installed beside the agent.

The portrait is prepared once, from the moment the service is made (in a thread; the service
holds the pipeline's StartFrame until it is ready, 1-3 s, while the processors before it start
at once: TTS audio that reaches it meanwhile is kept, and spoken once the face shows; make the
service before a greeting is due; past `ready_timeout_s` the face is given up, reported, and the
voice goes on without it): in this interpreter when it can load the face
landmarker (MediaPipe), else by the sonic project's interpreter (`sonic_python`, or the
environment variable SONIC_PYTHON), which writes the prepared face to a file
(`python -m sonic.live.face_file`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pickle
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup

from .voice import VOICED

ENGINE_RATE = 16_000  # Hz: what sonic's engine hears and hands back
CHUNK_MS = 20  # audio is pushed in chunks of this length (a transport's usual 10-40 ms)
RESAMPLER_QUALITY = "HQ"  # SoX's, for the sound to and from the engine (below)
FINISH_MARGIN_S = 2.0  # at the pipeline's end, the queued speech is waited for this much past its length
# Pipecat gives every processor 20 s to set up (PipelineWorker's setup_timeout_secs), then stops the
# whole pipeline, voice and all: the face gives up before, reports why, and the voice goes on
READY_TIMEOUT_S = 15.0
PREPARE_MAX_S = 300.0  # sonic's interpreter is stopped past this, whoever waits (its thread holds the exit)
UTTERANCE_GAP_S = 0.5  # TTS audio after this long without any begins an utterance (its TTFB)


class FrameFitter:
    """The face's frames fitted into a transport's fixed size (Pipecat's output transports
    stretch any other size to theirs): scaled to fit whole, centred, the rest filled with the
    first frame enlarged to cover and blurred (made once: what shows there barely moves)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.width, self.height = (int(v) for v in size)
        if self.width < 16 or self.height < 16:
            raise ValueError(f"size must be (width, height) of at least 16 px each; got {size!r}")
        self._fill: np.ndarray | None = None

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if (w, h) == (self.width, self.height):
            return image
        if self._fill is None:
            self._fill = self._blurred_cover(image)
        scale = min(self.width / w, self.height / h)
        fw, fh = max(1, round(w * scale)), max(1, round(h * scale))
        out = self._fill.copy()
        y0, x0 = (self.height - fh) // 2, (self.width - fw) // 2
        out[y0 : y0 + fh, x0 : x0 + fw] = cv2.resize(
            image, (fw, fh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        )
        return out

    def _blurred_cover(self, image: np.ndarray) -> np.ndarray:
        """The image enlarged to cover the size, centred, blurred and darkened; made at an
        eighth of the size (a few ms, on the event loop, even for 1920x1080)."""
        h, w = image.shape[:2]
        sw, sh = max(2, self.width // 8), max(2, self.height // 8)
        cover = max(sw / w, sh / h)
        small = cv2.resize(image, (max(sw, round(w * cover)), max(sh, round(h * cover))), interpolation=cv2.INTER_AREA)
        y0, x0 = (small.shape[0] - sh) // 2, (small.shape[1] - sw) // 2
        blurred = cv2.GaussianBlur(small[y0 : y0 + sh, x0 : x0 + sw], (0, 0), 0.04 * max(sw, sh))
        return cv2.resize(blurred // 2 + 32, (self.width, self.height), interpolation=cv2.INTER_LINEAR)


class SonicVideoService(FrameProcessor):
    """A face that speaks the TTS audio that reaches it.

    portrait: path of the portrait; params: sonic's generation parameters that apply to live
    sessions (min_resolution, fps, seed, dynamic_scale, motion_scale, gaze, expression, ...);
    sonic_python: the sonic project's interpreter, used to prepare the portrait when this one
    cannot load MediaPipe (default: $SONIC_PYTHON, else this interpreter); url: a running sonic
    service to open the session on instead of running the engine here (api_key: its key);
    size: (width, height) of the transport's video: the face is fitted into it whole, not
    stretched (without it frames have the face's own size, which follows the portrait's crop);
    ready_timeout_s: how long the pipeline's set-up waits for the face (the portrait prepared,
    or the service's session opened) before it reports an error and goes on without it."""

    def __init__(
        self,
        *,
        portrait: str | Path,
        params: dict[str, Any] | None = None,
        sonic_python: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
        size: tuple[int, int] | None = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be more than 0 s; got {ready_timeout_s!r}")
        self._ready_timeout_s = float(ready_timeout_s)
        self._fit = FrameFitter(size) if size is not None else None
        self._portrait = str(portrait)
        self._params = dict(params or {})
        self._sonic_python = sonic_python or os.environ.get("SONIC_PYTHON")
        self._session: Any = None
        self._clock: asyncio.Task | None = None
        self._out_rate = 24_000
        # Pipecat's default stream resampler (SoX "VHQ") hands the engine's 40 ms frames out every
        # other frame, holding back up to 75 ms: the face's sound came one or two frames after the
        # picture it goes with, and the TTS's 20 ms chunks reached the face 10-76 ms late. "HQ"
        # hands out sound with every frame (up to 12 ms held back; 7-37 ms of the TTS's chunks)
        # and is as flat to 7.2 kHz (LQ rolls off from 6.5 kHz, QQ from 4 kHz)
        self._to_engine = create_stream_resampler(quality=RESAMPLER_QUALITY)
        self._from_engine = create_stream_resampler(quality=RESAMPLER_QUALITY)
        self._passing = create_stream_resampler(quality=RESAMPLER_QUALITY)  # the voice without a face
        self._awaiting_first_frame = False
        self._error: str | None = None
        self._started = False  # the pipeline's StartFrame has passed (an error is reported once it has)
        self._early: list[TTSAudioRawFrame] = []  # speech heard before the face was ready (or failed)
        self.frames_pushed = 0
        self._url, self._api_key = url, api_key
        self._remote: Any = None
        self._remote_audio: asyncio.Task | None = None
        self._last_heard = float("-inf")  # when TTS audio last reached the service (monotonic)
        self._preparer: subprocess.Popen | None = None  # sonic's interpreter preparing the portrait
        self._gave_up = False  # set-up stopped waiting for the portrait
        # the engine in this process: its portrait is prepared from now on, in a thread of its own
        self._ready: concurrent.futures.Future | None = None
        if url is None:
            preparing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sonic-face")
            self._ready = preparing.submit(self._prepare)
            preparing.shutdown(wait=False)  # the thread ends with its one task

    def can_generate_metrics(self) -> bool:
        return True

    # --- the portrait -----------------------------------------------------------------------
    def _prepare(self) -> Any:
        """The live session of the portrait (blocking: run in a thread)."""
        from sonic.live.session import LiveSession

        python = self._sonic_python
        if python is None:
            from sonic import load_pipeline
            from sonic.live import prepare_live_face

            try:
                import mediapipe  # noqa: F401 - the face landmarker, which this interpreter may lack
            except ImportError as e:
                raise RuntimeError(
                    f"this interpreter cannot prepare the portrait ({e}): set sonic_python= or the "
                    "environment variable SONIC_PYTHON to the sonic project's interpreter (its .venv/bin/python)"
                ) from e
            pipeline = load_pipeline()
            options = pipeline.options(self._params)
            return LiveSession(prepare_live_face(pipeline, self._portrait, options), options)
        portrait = str(Path(self._portrait).resolve())
        if os.sep in python:  # a path, taken from this working folder (the command runs in another)
            python = str(Path(python).absolute())
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "face.pkl"
            if self._gave_up:
                raise RuntimeError("the pipeline stopped waiting for the portrait")
            # run in an empty folder: `-m` looks in the working folder first, where a folder named
            # `sonic` (a clone of the project beside the agent) would shadow the installed package
            preparer = self._preparer = subprocess.Popen(
                [python, "-m", "sonic.live.face_file", portrait, str(out), json.dumps(self._params)],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if self._gave_up:  # given up between the check above and the start: nobody killed it
                preparer.kill()
            try:
                _, stderr = preparer.communicate(timeout=PREPARE_MAX_S)
            except subprocess.TimeoutExpired:
                preparer.kill()
                preparer.communicate()
                raise RuntimeError(f"sonic could not prepare the portrait within {PREPARE_MAX_S:g} s") from None
            if preparer.returncode != 0:
                raise RuntimeError(f"sonic could not prepare the portrait: {_last_error(stderr, preparer)}")
            prepared = pickle.loads(out.read_bytes())  # written just now by the command above
        return LiveSession(prepared["face"], prepared["options"])

    async def setup(self, setup: FrameProcessorSetup) -> None:
        await super().setup(setup)
        self._out_rate = setup.audio_out_sample_rate
        if self._ready is None:
            await self._open_remote()
            return
        try:
            session = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._ready)), self._ready_timeout_s)
        except asyncio.TimeoutError:
            self._give_up_preparing()
            self._error = (
                f"SonicVideoService: the portrait was not ready within {self._ready_timeout_s:g} s "
                "(ready_timeout_s): the agent goes on without a face"
            )
            return
        except Exception as e:  # noqa: BLE001 - reported to the pipeline as its error, not raised into it
            self._error = f"SonicVideoService: {e}"  # (what it heard goes on once the error is out)
            return
        self._session = session
        for warning in session.face.warnings:  # what a file's response would say of the photo
            logger.warning(f"SonicVideoService: {warning}")
        await self._hear_early()

    def _give_up_preparing(self) -> None:
        """Stop sonic's interpreter preparing the portrait (it would hold this process's exit)."""
        self._gave_up = True
        if self._preparer is not None and self._preparer.poll() is None:
            self._preparer.kill()

    async def _open_remote(self) -> None:
        from .remote import RemoteSession

        assert self._url is not None  # remote mode
        remote = RemoteSession(self._url, self._api_key)
        try:
            await remote.open(self._portrait, self._params, self._ready_timeout_s)
        except Exception as e:  # noqa: BLE001 - reported to the pipeline as its error, not raised into it
            await remote.close()
            self._error = f"SonicVideoService: {e}"
            return
        self._remote = remote
        for warning in remote.warnings:
            logger.warning(f"SonicVideoService: {warning}")
        await self._hear_early()

    async def _hear_early(self) -> None:
        """What reached the service before its face was ready, or before it failed, in order."""
        early, self._early = self._early, []
        for frame in early:
            await self._hear(frame)

    # --- frames in --------------------------------------------------------------------------
    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            await self._hear(frame)  # consumed: the face's audio goes downstream with its frames
        elif isinstance(frame, InterruptionFrame):
            if self._session is not None:
                self._session.interrupt()
            if self._remote is not None:
                self._remote.interrupt()
            self._awaiting_first_frame = False
            await self.push_frame(frame, direction)
        elif isinstance(frame, EndFrame):
            await self._finish_speaking()  # an end, unlike a cancel, lets the last reply be heard
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _start(self) -> None:
        if self._remote is not None:
            self._clock = self.create_task(self._pump_remote_video())
            self._remote_audio = self.create_task(self._pump_remote_audio())
            return
        if self._session is None:
            # upstream, where the pipeline reports it (on_pipeline_error); the TTS audio then goes
            # on downstream without a face (_hear), so that the agent is still heard
            self._started = True
            await self.push_error(self._error or "SonicVideoService: no portrait prepared")
            await self._hear_early()
            return
        self._clock = self.create_task(self._run_clock())

    async def _hear(self, frame: TTSAudioRawFrame) -> None:
        if self._session is None and self._remote is None:
            if self._error is None or not self._started:
                self._early.append(frame)  # heard once the face is ready (or, failed, passed on)
            else:
                await self._pass_on(frame)  # no face: the voice goes on without it
            return
        if self._remote is not None and self._remote.ended:
            await self._pass_on(frame)  # the face is gone: the voice goes on without it
            return
        now = time.monotonic()
        face = self._session if self._session is not None else self._remote
        speaking = face.speaking  # a sentence that follows one still spoken is not a new reply
        begins = now - self._last_heard > UTTERANCE_GAP_S and not speaking
        self._last_heard = now
        if begins:  # an utterance's TTFB: from its first audio here to its first voiced audio out
            self._awaiting_first_frame = True
            await self.start_ttfb_metrics()
        audio = await self._to_engine.resample(_mono(frame), frame.sample_rate, ENGINE_RATE)
        speech = np.frombuffer(audio, np.int16).astype(np.float32) / 32768.0
        if self._remote is not None:
            self._remote.speak(speech)
            return
        assert self._session is not None
        self._session.speak(speech)

    async def _pass_on(self, frame: TTSAudioRawFrame) -> None:
        """The voice without a face, as the face's own sound went: mono at the output rate. (Passed
        on as it came, a TTS's 8 kHz after the face's 24 kHz broke a writer set up for the face's
        sound, on every frame.)"""
        audio = _mono(frame)
        if frame.sample_rate != self._out_rate:
            audio = await self._passing.resample(audio, frame.sample_rate, self._out_rate)
        await self.push_frame(TTSAudioRawFrame(audio=audio, sample_rate=self._out_rate, num_channels=1))

    # --- frames out -------------------------------------------------------------------------
    async def _run_clock(self) -> None:
        """One frame every 1/fps s (the session's own clock rules: late frames go out unrendered)."""
        session = self._session
        period = 1.0 / session.fps
        start = time.monotonic()
        tick = 0
        while True:
            due = start + tick * period
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            late = (time.monotonic() - due) > period
            frame = await asyncio.to_thread(session.step, not late, due)
            tick += 1
            if frame.index < 0:
                continue
            await self._push(frame)

    def _fitted(self, image: np.ndarray) -> np.ndarray:
        return self._fit(image) if self._fit is not None else image

    async def _push(self, frame: Any) -> None:
        image = self._fitted(frame.image)
        out = OutputImageRawFrame(image=image.tobytes(), size=(image.shape[1], image.shape[0]), format="RGB")
        out.metadata["sonic"] = {"index": frame.index, "opening": frame.opening, "speaking": frame.speaking}
        await self.push_frame(out)
        self.frames_pushed += 1
        if frame.audio.any():
            await self._push_audio((np.clip(frame.audio, -1, 1) * 32767).astype(np.int16), ENGINE_RATE)

    async def _push_audio(self, pcm: np.ndarray, rate: int) -> None:
        """The face's sound (int16 mono at `rate`) downstream at the output rate, in chunks of at
        most CHUNK_MS; its first voiced sound after a reply began ends the reply's TTFB."""
        if self._awaiting_first_frame and np.abs(pcm).max() > VOICED:
            self._awaiting_first_frame = False
            await self.stop_ttfb_metrics()
        audio = await self._from_engine.resample(pcm.tobytes(), rate, self._out_rate)
        step = self._out_rate * CHUNK_MS // 1000 * 2  # bytes of one chunk (16-bit mono)
        for i in range(0, len(audio), step):
            chunk = audio[i : i + step]
            await self.push_frame(TTSAudioRawFrame(audio=chunk, sample_rate=self._out_rate, num_channels=1))

    async def _pump_remote_video(self) -> None:
        remote = self._remote
        async for frame in remote.frames():
            image = self._fitted(frame.to_ndarray(format="rgb24"))
            size = (image.shape[1], image.shape[0])
            await self.push_frame(OutputImageRawFrame(image=image.tobytes(), size=size, format="RGB"))
            self.frames_pushed += 1
        if remote.ended:  # the session ended on the server's side, not by this pipeline's end
            await self.push_error(f"SonicVideoService: the live session ended: {remote.ended}")

    async def _pump_remote_audio(self) -> None:
        async for frame in self._remote.audio():
            samples = frame.to_ndarray().reshape(-1, len(frame.layout.channels))
            pcm = samples.mean(axis=1).astype(np.int16)
            if pcm.any():  # (silence between replies: nothing to play)
                await self._push_audio(pcm, frame.sample_rate)

    async def _finish_speaking(self) -> None:
        """Until the speech queued so far has been shown and pushed (a goodbye sent whole, then
        the pipeline's end), bounded by its length and a margin."""
        if self._session is not None and self._clock is not None:
            session = self._session
            deadline = time.monotonic() + session.queued_s + FINISH_MARGIN_S
            # "speaking" ends once the last loud frame has been shown (and pushed) and a pause passed
            while session.speaking and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        elif self._remote is not None:
            await self._remote.finish_speaking(FINISH_MARGIN_S)

    async def _stop(self) -> None:
        if self._remote is not None:
            await self._remote.close()
            self._remote = None
        if self._ready is not None and not self._ready.done():
            self._give_up_preparing()
        for task in (self._clock, self._remote_audio):
            if task is not None:
                await self.cancel_task(task)
        self._clock = self._remote_audio = None
        if self._session is not None:
            self._session.close()
            self._session = None


def _last_error(stderr: str, proc: subprocess.Popen) -> str:
    """What sonic's interpreter said went wrong: its error's message (the command writes the
    error as JSON), or its last line, or its exit status."""
    lines = stderr.strip().splitlines()
    if not lines:
        return f"it exited with status {proc.returncode}"
    try:
        return str(json.loads(lines[-1])["message"])
    except (ValueError, KeyError, TypeError):
        return lines[-1]


def _mono(frame: TTSAudioRawFrame) -> bytes:
    """A TTS frame's 16-bit samples, its channels averaged into one."""
    pcm = np.frombuffer(frame.audio, np.int16)
    if frame.num_channels > 1:
        pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
    return pcm.tobytes()
