"""A Pipecat pipeline with sonic's face after a stand-in TTS, run in the integration's own
environment by tests/test_pipecat.py (not a test module itself).

    python tests/pipecat_run.py PORTRAIT SPEECH OUT.npz SONIC_PYTHON|SONIC_URL [end-session|stop-server]

With a URL (http://...) the service uses that running sonic service's live sessions (`url=`)
instead of the engine in this process; with `end-session` too, the session is ended on the
server (DELETE, as an operator or its idle timeout would) after the first reply; with
`stop-server`, the server itself is sent SIGTERM then (its pid in $SONIC_SERVER_PID); either
way the ErrorFrame the pipeline reports (on_pipeline_error) is recorded.

Once the face shows, the source plays SPEECH as TTS audio frames at 16 kHz (the pipeline's output,
the face's sound, is at 24 kHz) in real time (20 ms
chunks): once in real time, a pause, then again all at once (as many TTS services send it),
interrupted 1.2 s after it began; the sink records every frame that
reaches it with its arrival time. OUT.npz holds the video frames, their times and metadata,
the audio chunks' times, lengths and the picture each follows, the interruption's time (and when it reached the sink)
and the TTFB metrics reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import numpy as np
import soundfile as sf
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InterruptionFrame,
    MetricsFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
)
from pipecat.metrics.metrics import TTFBMetricsData
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from scipy.signal import resample_poly
from sonic_pipecat import SonicVideoService

TTS_RATE = 16_000  # as many TTS services send it
OUT_RATE = 24_000  # the pipeline's output: the face's sound
CHUNK_S = 0.02
PAUSE_S = 1.5
INTERRUPT_AFTER_S = 1.2
TAIL_S = 1.5


class SpeechSource(FrameProcessor):
    """Plays the speech as TTS audio frames in real time, then interrupts and ends."""

    def __init__(self, wav: np.ndarray, task_box: list, marks: dict, face_shown: asyncio.Event, end_session=None) -> None:
        super().__init__()
        self._pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
        self._task_box, self._marks, self._face_shown = task_box, marks, face_shown
        self._end_session = end_session

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._play())

    async def _say(self, burst: bool = False) -> None:
        """The speech in 20 ms frames: in real time, or all at once (as many TTS services send it)."""
        n = int(CHUNK_S * TTS_RATE)
        start = time.monotonic()
        for i, at in enumerate(range(0, len(self._pcm), n)):
            await self.push_frame(
                TTSAudioRawFrame(audio=self._pcm[at : at + n].tobytes(), sample_rate=TTS_RATE, num_channels=1)
            )
            if not burst:
                await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK_S - time.monotonic()))

    async def _play(self) -> None:
        await self._face_shown.wait()  # as an agent's first reply comes after the face is up
        await asyncio.sleep(0.5)
        self._marks["first_start"] = time.monotonic()
        await self._say()
        self._marks["first_end"] = time.monotonic()
        if self._end_session is not None:
            await self._end_session()
        await asyncio.sleep(PAUSE_S)
        self._marks["second_start"] = time.monotonic()
        await self._say(burst=True)  # queued whole: only the interruption stops it
        await asyncio.sleep(max(0.0, self._marks["second_start"] + INTERRUPT_AFTER_S - time.monotonic()))
        self._marks["interrupt"] = time.monotonic()
        await self.push_frame(InterruptionFrame())
        await asyncio.sleep(TAIL_S)
        await self._task_box[0].queue_frame(EndFrame())


class Recorder(FrameProcessor):
    def __init__(self, marks: dict) -> None:
        super().__init__()
        self.marks = marks
        self.face_shown = asyncio.Event()
        self.images: list[np.ndarray] = []
        self.image_times: list[float] = []
        self.meta: list[dict] = []
        self.audio: list[tuple[float, int, int]] = []
        self.ttfb: list[float] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        now = time.monotonic()
        if isinstance(frame, OutputImageRawFrame):
            w, h = frame.size
            self.images.append(np.frombuffer(frame.image, np.uint8).reshape(h, w, 3))
            self.image_times.append(now)
            self.meta.append(frame.metadata.get("sonic", {}))
            self.face_shown.set()
        elif isinstance(frame, TTSAudioRawFrame):  # (and the picture it follows)
            self.audio.append((now, len(frame.audio) // 2, frame.sample_rate, len(self.images) - 1))
        elif isinstance(frame, InterruptionFrame):
            self.marks.setdefault("interruption_at", now)
        elif isinstance(frame, MetricsFrame):
            self.ttfb += [d.value for d in frame.data if isinstance(d, TTFBMetricsData) and d.value > 0]
        await self.push_frame(frame, direction)


async def main(portrait: str, speech: str, out: str, sonic: str, mode: str = "") -> None:
    wav, rate = sf.read(speech, dtype="float32")
    wav = resample_poly(wav, TTS_RATE, rate).astype(np.float32)
    box: list = []
    marks: dict = {}
    recorder = Recorder(marks)
    where = {"url": sonic} if sonic.startswith("http") else {"sonic_python": sonic}
    face = SonicVideoService(portrait=portrait, params={"min_resolution": 256, "seed": 3}, **where)

    async def end_session() -> None:  # from outside the service, as the server's operator would
        import aiohttp

        marks["ended_at"] = time.monotonic()
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{sonic}/api/sonic/live/{face._remote.session_id}") as r:
                marks["ended_status"] = r.status

    async def stop_server() -> None:  # a restart, or the server's machine going down
        marks["ended_at"] = time.monotonic()
        os.kill(int(os.environ["SONIC_SERVER_PID"]), signal.SIGTERM)

    ending = {"end-session": end_session, "stop-server": stop_server}.get(mode)
    worker = PipelineWorker(
        Pipeline([SpeechSource(wav, box, marks, recorder.face_shown, ending), face, recorder]),
        params=PipelineParams(audio_out_sample_rate=OUT_RATE, enable_metrics=True),
        idle_timeout_secs=None,
    )
    box.append(worker)

    @worker.event_handler("on_pipeline_error")
    async def on_pipeline_error(worker, frame: ErrorFrame) -> None:  # what a voice agent's code sees
        marks.setdefault("error", frame.error)
        marks.setdefault("error_at", time.monotonic())
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    np.savez(
        out,
        images=np.array(recorder.images),
        image_times=np.array(recorder.image_times),
        meta=json.dumps(recorder.meta),
        audio=np.array(recorder.audio),
        marks=json.dumps(marks),
        ttfb=np.array(recorder.ttfb),
        speech_s=len(wav) / TTS_RATE,
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
