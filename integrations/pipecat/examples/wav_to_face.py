"""Try the face without a voice agent: a recording stands in for the text-to-speech, and the
frames the face pushes are written to an MP4. Runs offline, in the integration's environment:

    integrations/pipecat/.venv/bin/python integrations/pipecat/examples/wav_to_face.py \
        examples/portrait.jpg examples/speech.flac face.mp4

(SONIC_PYTHON names sonic's own interpreter, as for the service: integrations/pipecat/README.md.)
In an agent, the TTS service sits where `RecordingAsSpeech` does and the transport where
`Mp4Sink` does.
"""

from __future__ import annotations

import asyncio
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
from pipecat.frames.frames import EndFrame, ErrorFrame, Frame, OutputImageRawFrame, StartFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from sonic_pipecat import SonicVideoService

FPS = 25
CHUNK_S = 0.02  # TTS services send their audio in short frames: 20 ms here
TAIL_S = 1.0  # the face idles this long after the speech before the pipeline ends


class RecordingAsSpeech(FrameProcessor):
    """Pushes a recording as TTS audio frames in real time, once the face shows, then ends the
    pipeline (the EndFrame lets the face finish what it was given)."""

    def __init__(self, path: str, face_shown: asyncio.Event, worker_box: list) -> None:
        super().__init__()
        samples, self._rate = sf.read(path, dtype="int16", always_2d=True)
        self._pcm = samples.mean(axis=1).astype(np.int16)  # one channel, as TTS audio is
        self._face_shown, self._worker_box = face_shown, worker_box

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._speak())

    async def _speak(self) -> None:
        await self._face_shown.wait()
        n = int(CHUNK_S * self._rate)
        start = asyncio.get_running_loop().time()
        for i, at in enumerate(range(0, len(self._pcm), n)):
            chunk = self._pcm[at : at + n].tobytes()
            await self.push_frame(TTSAudioRawFrame(audio=chunk, sample_rate=self._rate, num_channels=1))
            await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK_S - asyncio.get_running_loop().time()))
        await asyncio.sleep(TAIL_S)
        await self._worker_box[0].queue_frame(EndFrame())


class Mp4Sink(FrameProcessor):
    """Writes the face's frames and the audio they show to an MP4 (H.264 + AAC)."""

    def __init__(self, path: str, audio_rate: int) -> None:
        super().__init__()
        self.face_shown = asyncio.Event()
        self._container = av.open(path, "w")
        self._video = self._audio = None
        self._audio_rate = audio_rate
        self._pictures = 0
        self._sound_end = 0  # in samples: where the sound written so far ends

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            self._add_picture(frame)
            self.face_shown.set()
        elif isinstance(frame, TTSAudioRawFrame) and self._video is not None:
            self._add_sound(frame)
        elif isinstance(frame, EndFrame):
            self._close()
        await self.push_frame(frame, direction)

    def _add_picture(self, frame: OutputImageRawFrame) -> None:
        width, height = frame.size
        if self._video is None:
            self._video = self._container.add_stream("libx264", rate=FPS)
            self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
            self._audio = self._container.add_stream("aac", rate=self._audio_rate, layout="mono")
        self._pictures += 1
        picture = np.frombuffer(frame.image, np.uint8).reshape(height, width, 3)
        for packet in self._video.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
            self._container.mux(packet)

    def _add_sound(self, frame: TTSAudioRawFrame) -> None:
        """The face pushes each picture, then the audio it shows: this audio starts no earlier
        than that picture (the face is silent between replies, and pushes no audio then)."""
        pcm = np.frombuffer(frame.audio, np.int16).reshape(1, -1)
        shown_at = (self._pictures - 1) * frame.sample_rate // FPS
        start = max(self._sound_end, shown_at)
        sound = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        sound.sample_rate, sound.pts, sound.time_base = frame.sample_rate, start, Fraction(1, frame.sample_rate)
        self._sound_end = start + pcm.shape[1]
        for packet in self._audio.encode(sound):
            self._container.mux(packet)

    def _close(self) -> None:
        for stream in (self._video, self._audio):
            if stream is not None:
                for packet in stream.encode(None):
                    self._container.mux(packet)
        self._container.close()


async def main(portrait: str, recording: str, out: str) -> None:
    audio_rate = 24_000  # the pipeline's output rate: the face's audio comes out at it
    box: list = []
    sink = Mp4Sink(out, audio_rate)
    face = SonicVideoService(portrait=portrait, params={"min_resolution": 384})
    worker = PipelineWorker(
        Pipeline([RecordingAsSpeech(recording, sink.face_shown, box), face, sink]),
        params=PipelineParams(audio_out_sample_rate=audio_rate),
    )
    box.append(worker)
    failed: list[str] = []

    @worker.event_handler("on_pipeline_error")
    async def on_pipeline_error(worker, frame: ErrorFrame) -> None:
        # no face (none in the portrait, the service refused): no picture will come, and the
        # recording waits for one; the example ends with the error instead of waiting for ever
        if not sink.face_shown.is_set():
            failed.append(str(frame.error))
            await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()
    if failed:
        Path(out).unlink(missing_ok=True)  # (opened, never written)
        sys.exit(f"error: {failed[0]}")
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: wav_to_face.py PORTRAIT RECORDING OUT.mp4")
    asyncio.run(main(*sys.argv[1:]))
