"""sonic's face in a Pipecat pipeline delivered by Pipecat's SmallWebRTC transport to an aiortc
client, run by tests/test_pipecat.py in the integration's environment inside a network namespace
of its own (only loopback exists: no candidate or packet can leave the machine).

    python tests/pipecat_webrtc_run.py PORTRAIT SPEECH OUT.npz SONIC_PYTHON

The source plays SPEECH as TTS audio (24 kHz, real time) once the client sees the face; the
client records every video frame (time, size, pixels) and the audio it receives (time, rate, RMS).
The client is a process of its own (this script with `--client`), as a viewer's browser is: in
the agent's process, decoding and converting every frame it held the agent's pictures back.
Offer, answer and the client's word that it sees the face pass as JSON lines over its stdin and
stdout; time.monotonic() is the machine's, the same in both.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import numpy as np
import soundfile as sf
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from pipecat.frames.frames import EndFrame, Frame, StartFrame, TTSAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner
from scipy.signal import resample_poly
from sonic_pipecat import SonicVideoService
from sonic_pipecat.remote import loopback_only

TTS_RATE = 24_000
CHUNK_S = 0.02
WIDTH, HEIGHT = 256, 336  # the face at min_resolution 256 (the portrait's crop)


class SpeechSource(FrameProcessor):
    def __init__(self, wav: np.ndarray, face_seen: asyncio.Event, marks: dict) -> None:
        super().__init__()
        self._pcm = (np.clip(wav, -1, 1) * 32767).astype(np.int16)
        self._face_seen, self._marks = face_seen, marks

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        await self.push_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self.create_task(self._play())

    async def _play(self) -> None:
        await self._face_seen.wait()
        await asyncio.sleep(0.5)
        n = int(CHUNK_S * TTS_RATE)
        start = self._marks["speech_start"] = time.monotonic()
        for i, at in enumerate(range(0, len(self._pcm), n)):
            frame = TTSAudioRawFrame(audio=self._pcm[at : at + n].tobytes(), sample_rate=TTS_RATE, num_channels=1)
            await self.push_frame(frame)
            await asyncio.sleep(max(0.0, start + (i + 1) * CHUNK_S - time.monotonic()))
        self._marks["speech_end"] = time.monotonic()


async def receive_video(track, frames: list, face_seen: asyncio.Event) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        image = frame.to_ndarray(format="rgb24")
        frames.append((time.monotonic(), image.shape[1], image.shape[0], image))
        face_seen.set()


async def receive_audio(track, chunks: list) -> None:
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        pcm = frame.to_ndarray().reshape(-1, len(frame.layout.channels))[:, 0].astype(np.float32) / 32768
        chunks.append((time.monotonic(), frame.sample_rate, float(np.sqrt(np.mean(pcm**2)))))


async def client_main(out: str) -> None:
    """The viewer: offers to receive audio and video, records what arrives until its stdin closes."""
    loopback_only()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    face_seen = asyncio.Event()
    video: list = []
    audio: list = []
    tasks: list = []
    # no ICE servers: host candidates only
    client = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    # audio first, then video: the transport fills the offer's transceivers in that order
    client.addTransceiver("audio", direction="recvonly")
    client.addTransceiver("video", direction="recvonly")
    client.createDataChannel("messages")

    @client.on("track")
    def on_track(track) -> None:
        receive = receive_video(track, video, face_seen) if track.kind == "video" else receive_audio(track, audio)
        tasks.append(asyncio.ensure_future(receive))

    await client.setLocalDescription(await client.createOffer())
    print(json.dumps({"sdp": client.localDescription.sdp, "type": client.localDescription.type}), flush=True)
    answer = json.loads(await reader.readline())
    await client.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
    ended = asyncio.ensure_future(reader.read())  # the bot's end closes stdin (or the bot is gone)
    seen = asyncio.ensure_future(face_seen.wait())
    await asyncio.wait({ended, seen}, return_when=asyncio.FIRST_COMPLETED)
    if seen.done():
        print(json.dumps({"face_seen": time.monotonic()}), flush=True)
    seen.cancel()
    await ended
    await client.close()
    for t in tasks:
        t.cancel()
    np.savez(
        out,
        video_times=np.array([t for t, _, _, _ in video]),
        video_sizes=np.array([(w, h) for _, w, h, _ in video]),
        video=np.array([im for _, _, _, im in video if im.shape[:2] == (HEIGHT, WIDTH)]),
        audio=np.array(audio),
    )


async def main(portrait: str, speech: str, out: str, sonic_python: str) -> None:
    loopback_only()
    wav, rate = sf.read(speech, dtype="float32")
    wav = resample_poly(wav, TTS_RATE, rate).astype(np.float32)
    face_seen, marks = asyncio.Event(), {}
    client = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client", out, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
    )
    assert client.stdin is not None and client.stdout is not None
    offer = json.loads(await client.stdout.readline())

    async def wait_for_face() -> None:
        line = await client.stdout.readline()
        if not line:  # the viewer exited: fail now, not at the run's time limit
            raise RuntimeError(f"the viewer exited before it saw the face (status {await client.wait()})")
        assert "face_seen" in json.loads(line), line
        face_seen.set()

    try:
        # the bot: Pipecat's SmallWebRTC transport answers the offer
        connection = SmallWebRTCConnection(ice_servers=[])
        await connection.initialize(sdp=offer["sdp"], type=offer["type"])
        answer = connection.get_answer()
        transport = SmallWebRTCTransport(
            webrtc_connection=connection,
            params=TransportParams(
                audio_out_enabled=True,
                video_out_enabled=True,
                video_out_is_live=True,
                video_out_width=WIDTH,
                video_out_height=HEIGHT,
                video_out_framerate=25,
            ),
        )
        face = SonicVideoService(portrait=portrait, params={"min_resolution": 256, "seed": 3}, sonic_python=sonic_python)
        worker = PipelineWorker(
            Pipeline([SpeechSource(wav, face_seen, marks), face, transport.output()]),
            params=PipelineParams(audio_out_sample_rate=TTS_RATE),
            idle_timeout_secs=None,
        )
        client.stdin.write((json.dumps({"sdp": answer["sdp"], "type": answer["type"]}) + "\n").encode())
        await client.stdin.drain()
        seen = asyncio.ensure_future(wait_for_face())

        async def finish() -> None:
            while "speech_end" not in marks:
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)
            await worker.queue_frame(EndFrame())

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        ending = asyncio.ensure_future(finish())
        run = asyncio.ensure_future(asyncio.wait_for(runner.run(), timeout=60))
        await asyncio.wait({run, seen}, return_when=asyncio.FIRST_COMPLETED)
        if seen.done() and seen.exception() is not None:
            # the viewer is gone: fail now (the transport, stopped while it starts, held the
            # loop's end for minutes)
            print(seen.exception(), file=sys.stderr, flush=True)
            os._exit(1)
        await run
        await ending
        seen.cancel()
        client.stdin.close()
        await asyncio.wait_for(client.wait(), timeout=30)
        assert client.returncode == 0, client.returncode
        with np.load(out) as npz:
            recorded = dict(npz)
        np.savez(
            out,
            **recorded,
            speech_start=marks.get("speech_start", 0.0),
            speech_end=marks.get("speech_end", 0.0),
        )
    finally:
        if client.returncode is None:  # the run failed: the viewer goes with it
            client.kill()
            await client.wait()


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        asyncio.run(client_main(sys.argv[2]))
    else:
        asyncio.run(main(*sys.argv[1:5]))
