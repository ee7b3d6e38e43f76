"""How a Pipecat pipeline with sonic's face ends, and what it does when the face cannot be made;
run by tests/test_pipecat.py in the integration's own environment (not a test module itself).

    python tests/pipecat_end_run.py PORTRAIT NO_FACE_IMAGE SPEECH OUT.json SONIC_PYTHON|SONIC_URL STALLED

Three pipelines, one after the other, each a source that sends SPEECH whole as TTS audio (as most
TTS services send a reply, faster than real time), the service, and a sink that counts what
arrives:
- `goodbye`: once the face shows, the reply, then at once the pipeline's EndFrame ("say goodbye,
  then hang up"): how much of the reply is heard, and when the pipeline ended;
- `no_face`: a portrait with no face: the error the pipeline reports (on_pipeline_error), and how
  much of the reply still reaches the sink, as plain TTS audio;
- `stalled`: the same, where the face never gets ready (STALLED: a sonic interpreter that never
  answers, or the URL of a service that takes connections and never answers), with a set-up
  wait of STALLED_WAIT_S.
Both ask for frames of SIZE (a transport's), which the face (256x336) is fitted into. OUT.json
holds, for each: the seconds of speech sent and received, the frames received and their sizes,
the seconds from the reply to the pipeline's end and the error reported (if any); OUT.npy the
tenth frame of `goodbye`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import numpy as np
import soundfile as sf
from pipecat.frames.frames import EndFrame, ErrorFrame, Frame, OutputImageRawFrame, StartFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner
from scipy.signal import resample_poly
from sonic_pipecat import SonicVideoService

TTS_RATE = 24_000
CHUNK = 480  # 20 ms
NO_FACE_WAIT_S = 6.0  # the no-face pipeline runs this long after its reply, then ends
STALLED_WAIT_S = 3.0  # the stalled pipeline's ready_timeout_s
SIZE = (320, 240)  # the transport's video size the face is fitted into (the face itself: 256x336)


class Reply(FrameProcessor):
    """Sends the reply whole once `go` is set, then the pipeline's end (after `end_after_s`)."""

    def __init__(self, pcm: np.ndarray, go: asyncio.Event, worker_box: list, result: dict, end_after_s: float):
        super().__init__()
        self._pcm, self._go, self._box, self._result, self._end_after_s = pcm, go, worker_box, result, end_after_s

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._reply())

    async def _reply(self) -> None:
        await self._go.wait()
        self._result["reply_at"] = time.monotonic()
        for at in range(0, len(self._pcm), CHUNK):
            chunk = self._pcm[at : at + CHUNK].tobytes()
            await self.push_frame(TTSAudioRawFrame(audio=chunk, sample_rate=TTS_RATE, num_channels=1))
        await asyncio.sleep(self._end_after_s)
        await self._box[0].queue_frame(EndFrame())


class Counter(FrameProcessor):
    def __init__(self, result: dict, face_shown: asyncio.Event) -> None:
        super().__init__()
        self._result, self._face_shown = result, face_shown

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, OutputImageRawFrame):
            self._result["frames"] += 1
            self._result["sizes"] = sorted({*map(tuple, self._result["sizes"]), tuple(frame.size)})
            if self._result["frames"] == 10:
                np.save(
                    self._result["frame_file"],
                    np.frombuffer(frame.image, np.uint8).reshape(frame.size[1], frame.size[0], 3),
                )
            self._face_shown.set()
        elif isinstance(frame, TTSAudioRawFrame):
            self._result["heard_s"] += len(frame.audio) / 2 / frame.sample_rate
        await self.push_frame(frame, direction)


async def run(portrait: str, pcm: np.ndarray, where: dict, goodbye: bool, frame_file: str) -> dict:
    result: dict = {"sent_s": len(pcm) / TTS_RATE, "heard_s": 0.0, "frames": 0, "error": None, "sizes": []}
    result["frame_file"] = frame_file
    face_shown, box = asyncio.Event(), []
    if not goodbye:
        face_shown.set()  # no face will show: the reply goes at once
    face = SonicVideoService(portrait=portrait, params={"min_resolution": 256, "seed": 3}, size=SIZE, **where)
    worker = PipelineWorker(
        Pipeline(
            [Reply(pcm, face_shown, box, result, 0.0 if goodbye else NO_FACE_WAIT_S), face, Counter(result, face_shown)]
        ),
        params=PipelineParams(audio_out_sample_rate=TTS_RATE),
        idle_timeout_secs=None,
    )
    box.append(worker)

    @worker.event_handler("on_pipeline_error")
    async def on_pipeline_error(worker, frame: ErrorFrame) -> None:
        result["error"] = result["error"] or frame.error

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.wait_for(runner.run(), 60)
    result["ended_after_s"] = time.monotonic() - result.get("reply_at", time.monotonic())
    return result


def where_of(sonic: str) -> dict:
    return {"url": sonic} if sonic.startswith("http") else {"sonic_python": sonic}


async def main(portrait: str, no_face: str, speech: str, out: str, sonic: str, stalled: str) -> None:
    wav, rate = sf.read(speech, dtype="float32")
    pcm = (np.clip(resample_poly(wav, TTS_RATE, rate), -1, 1) * 32767).astype(np.int16)
    where = where_of(sonic)
    results = {"goodbye": await run(portrait, pcm, where, True, out.replace(".json", ".npy"))}
    results["no_face"] = await run(no_face, pcm, where, False, out.replace(".json", "-no-face.npy"))
    stalled_where = {**where_of(stalled), "ready_timeout_s": STALLED_WAIT_S}
    results["stalled"] = await run(portrait, pcm, stalled_where, False, out.replace(".json", "-stalled.npy"))
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
