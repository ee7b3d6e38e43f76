"""A live session from Python with aiortc: open it against a running sonic server, send a speech
file (as the microphone track, or pushed with /speak), and record what comes back to an MP4.

    python examples/live_client.py --server http://127.0.0.1:5000 --image examples/portrait.jpg \
        --speech examples/speech.flac --seconds 6 --out live.mp4 [--speak] [--api-key KEY]

With --speak the file goes to POST /api/sonic/live/<id>/speak (as a voice agent's text-to-speech
would) and the microphone track stays silent; without it the file plays as the microphone.
On the server's own machine (a 127.0.0.1 URL) both ends gather loopback candidates only, and
no STUN server is asked: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import requests
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError

END_TRIES = 4  # DELETEs of the session refused for now (429, 503) before giving up


def use_loopback_only() -> None:
    """Gather ICE host candidates on 127.0.0.1 only (aioice leaves loopback out by default)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class SessionRefused(RuntimeError):
    """The server answered the open with an error (busy, a bad parameter, no face...)."""

    def __init__(self, response: requests.Response):
        try:
            error = response.json()["error"]
            why = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            why = response.text[:300]
        after = response.headers.get("Retry-After")
        retry = f"; retry in {after} s" if after else ""
        super().__init__(f"the server refused the session ({response.status_code} {why}){retry}")
        self.status_code = response.status_code


class NoRelay(RuntimeError):
    """The server asks for relayed media, and its TURN server gave this client no relay address."""


class Microphone(MediaStreamTrack):
    """A microphone that plays a waveform (float32 mono at 16 kHz; silence after it, or nothing
    at all if None) in real time, 20 ms a frame. `started`: when its first frame was handed to
    the connection (the clock of what was sent)."""

    kind = "audio"

    def __init__(self, wav: np.ndarray | None = None) -> None:
        super().__init__()
        self.wav = np.zeros(0, np.float32) if wav is None else np.asarray(wav, np.float32)
        self.started: float | None = None
        self._sent = 0

    async def recv(self):
        import av

        if self.started is None:
            self.started = time.monotonic()
        await asyncio.sleep(max(0.0, self.started + self._sent / 16_000 - time.monotonic()))
        piece = self.wav[self._sent : self._sent + 320]
        piece = np.pad(piece, (0, 320 - len(piece)))
        frame = av.AudioFrame(format="s16", layout="mono", samples=320)
        frame.planes[0].update((np.clip(piece, -1, 1) * 32767).astype("<i2").tobytes())
        frame.sample_rate, frame.pts, frame.time_base = 16_000, self._sent, fractions.Fraction(1, 16_000)
        self._sent += 320
        return frame


@dataclass
class Received:
    """What came back: video frames' arrival times and, where kept, the frames; audio likewise."""

    video_times: list[float] = field(default_factory=list)
    video_frames: list[np.ndarray] = field(default_factory=list)
    audio_times: list[float] = field(default_factory=list)
    audio: list[np.ndarray] = field(default_factory=list)  # mono float32 at 48 kHz, in order
    audio_at: list[int] = field(default_factory=list)  # each chunk's place in the stream (48 kHz samples)
    size: tuple[int, int] | None = None


class LiveClient:
    """One session: `open()`, then `speak_file()` / `interrupt()` / `state()`, then `close()`."""

    def __init__(self, server: str, api_key: str | None = None) -> None:
        self.server = server.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pc: RTCPeerConnection | None = None
        self.session_id: str | None = None
        self.received = Received()
        self._tasks: list[asyncio.Task] = []
        if urlparse(self.server).hostname in ("127.0.0.1", "localhost"):
            use_loopback_only()

    async def open(
        self,
        image: str | Path,
        config: dict | None = None,
        microphone: MediaStreamTrack | None = None,
        keep_frames: bool = True,
        on_frame: Callable[[np.ndarray, float], None] | None = None,
        before_answer: Callable[[dict], Awaitable[None]] | None = None,
    ) -> dict:
        """Offer (receive video and audio; send `microphone`, silence if None), POST it with the
        portrait, apply the answer. Returns the server's JSON. Received frames are kept (for
        write_mp4) unless keep_frames is False; `on_frame(image, arrival time)` sees each.
        `before_answer(body)` runs once the session exists, before the connection is made (a
        greeting can be queued there: it waits for the connection)."""
        rtc = await self.rtc_configuration()
        pc = self.pc = RTCPeerConnection(rtc)
        pc.addTransceiver("video", direction="recvonly")
        pc.addTrack(microphone or Microphone())

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                self._tasks.append(asyncio.ensure_future(self._read_video(track, keep_frames, on_frame)))
            else:
                self._tasks.append(asyncio.ensure_future(self._read_audio(track)))

        await pc.setLocalDescription(await pc.createOffer())
        offer = {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}
        if rtc.iceTransportPolicy == RTCIceTransportPolicy.RELAY and " typ relay" not in offer["sdp"]:
            await pc.close()
            raise NoRelay(
                "the server asks for relayed media, and its TURN server gave this client no relay address "
                "(is it reachable from here? are the credentials right?)"
            )
        files = {"image": Path(image).read_bytes()}
        data = {"offer": json.dumps(offer), "config": json.dumps(config or {})}
        r = await asyncio.to_thread(
            requests.post, f"{self.server}/api/sonic/live", files=files, data=data, headers=self.headers, timeout=30
        )
        if r.status_code != 201:
            raise SessionRefused(r)
        body = r.json()
        self.session_id = body["session_id"]
        if before_answer is not None:
            await before_answer(body)
        await pc.setRemoteDescription(RTCSessionDescription(**body["answer"]))
        return body

    async def rtc_configuration(self) -> RTCConfiguration:
        """The server's STUN and TURN servers, credentials included (GET
        /api/sonic/live/rtc-configuration): a client behind a NAT or a firewall reaches the server
        only through a TURN server it uses itself. (aiortc uses the first STUN and TURN URL.)"""
        r = await asyncio.to_thread(
            requests.get, f"{self.server}/api/sonic/live/rtc-configuration", headers=self.headers, timeout=10
        )
        if r.status_code == 404:  # a server older than the route: host candidates only, as then
            return RTCConfiguration(iceServers=[])
        if r.status_code != 200:
            raise SessionRefused(r)
        config = r.json()["rtc_configuration"]
        servers = [
            RTCIceServer(s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in config["iceServers"]
        ]
        policy = RTCIceTransportPolicy(config["iceTransportPolicy"])
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)

    async def _read_video(
        self, track: MediaStreamTrack, keep: bool, on_frame: Callable[[np.ndarray, float], None] | None
    ) -> None:
        got = self.received
        async for frame, now in _arrivals(track):
            got.video_times.append(now)
            got.size = (frame.width, frame.height)
            if keep or on_frame is not None:
                image = frame.to_ndarray(format="rgb24")
                if keep:
                    got.video_frames.append(image)
                if on_frame is not None:
                    on_frame(image, now)

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        import av

        resampler = av.AudioResampler(format="s16", layout="mono", rate=48_000)
        got, first = self.received, None
        async for frame, now in _arrivals(track):
            # where it belongs, from its timestamp: a lost packet leaves a gap there, not a shift
            # of everything after it (aiortc's decoder stamps frames at 48 kHz)
            first = frame.pts if first is None else first
            at = round((frame.pts - first) * float(frame.time_base) * 48_000)
            for out in resampler.resample(frame):
                samples = out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
                got.audio_times.append(now)
                got.audio_at.append(at)
                got.audio.append(samples)
                at += len(samples)

    def session_url(self, tail: str = "") -> str:
        """This session's URL (+ tail: "/speak", "/interrupt"), for requests of your own."""
        return f"{self.server}/api/sonic/live/{self.session_id}{tail}"

    async def _call(self, method: str, tail: str = "", timeout: float = 10, **kwargs) -> requests.Response:
        """A request to this session's URL (+ tail), off the event loop; an error status raises."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        r = await asyncio.to_thread(
            requests.request, method, self.session_url(tail), headers=headers, timeout=timeout, **kwargs
        )
        r.raise_for_status()
        return r

    async def speak_file(self, path: str | Path) -> dict:
        return (await self._call("POST", "/speak", timeout=60, files={"audio": Path(path).read_bytes()})).json()

    async def speak_pcm(self, pcm16k: np.ndarray) -> dict:
        body = (np.clip(pcm16k, -1, 1) * 32767).astype("<i2").tobytes()
        headers = {"Content-Type": "audio/L16;rate=16000"}
        return (await self._call("POST", "/speak", timeout=60, data=body, headers=headers)).json()

    async def interrupt(self) -> None:
        await self._call("POST", "/interrupt")

    async def state(self) -> dict:
        return (await self._call("GET")).json()

    async def close(self, end_session: bool = True) -> None:
        if end_session and self.session_id:
            await asyncio.to_thread(self._end)
        if self.pc is not None:
            await self.pc.close()
        for task in self._tasks:
            task.cancel()

    def _end(self) -> None:
        """DELETE the session; refused for now (429, 503) it is sent again after Retry-After, a
        few times: a session left running holds one of the server's slots until its idle timeout."""
        for _ in range(END_TRIES):
            r = requests.delete(self.session_url(), headers=self.headers, timeout=10)
            if r.status_code not in (429, 503):
                if r.status_code not in (204, 404):  # 404: it had ended already
                    print(f"ending the session: {r.status_code} {r.text[:200]}", file=sys.stderr)
                return
            retry_after = r.headers.get("Retry-After", "1")
            time.sleep(min(5.0, float(retry_after)) if retry_after.isdigit() else 1.0)
        print("ending the session: refused; the server ends it after its idle timeout", file=sys.stderr)


async def _arrivals(track: MediaStreamTrack):
    """A track's frames as they arrive, with their arrival time, until it ends."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        yield frame, time.monotonic()


PLACE_DRIFT_S = 1.0  # a chunk whose timestamp and arrival disagree by more goes after the last one


def placed_audio(received: Received) -> np.ndarray:
    """The received sound as one 48 kHz track, each chunk where its timestamp puts it: silence
    for what was lost. (Joined end to end, a lossy session's sound ran ahead of its pictures by
    each lost packet's 20 ms and more.) A timestamp that jumps (a sender's restart: aiortc reads
    a step back as a wrap, 2**32 ahead) is not followed: the chunk goes after the last one, so
    the track is never longer than what arrived, plus the gaps lost."""
    if not received.audio:
        return np.zeros(0, np.float32)
    if len(received.audio_at) != len(received.audio):  # chunks without places (made by hand): in order
        return np.concatenate(received.audio)
    first_arrival, end, places = received.audio_times[0], 0, []
    for at, arrived, chunk in zip(received.audio_at, received.audio_times, received.audio):
        if at < 0 or abs(at - (arrived - first_arrival) * 48_000) > PLACE_DRIFT_S * 48_000:
            at = end
        places.append(at)
        end = max(end, at + len(chunk))
    track = np.zeros(end, np.float32)
    for at, chunk in zip(places, received.audio):
        track[at : at + len(chunk)] = chunk
    return track


def write_mp4(received: Received, path: str | Path, fps: int) -> None:
    """The received frames and audio as an H.264 + AAC MP4 (frames at `fps`, in arrival order;
    the sound placed by its timestamps)."""
    import av

    with av.open(str(path), "w") as out:
        width, height = received.size or (512, 512)
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        audio = out.add_stream("aac", rate=48_000)
        audio.layout = "mono"  # type: ignore[attr-defined]
        for i, image in enumerate(received.video_frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode():
            out.mux(packet)
        pcm = placed_audio(received)
        s16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
        for start in range(0, len(s16), 1024):
            piece = s16[start : start + 1024]
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(piece))
            frame.planes[0].update(piece.tobytes())
            frame.sample_rate, frame.pts = 48_000, start
            for packet in audio.encode(frame):
                out.mux(packet)
        for packet in audio.encode():
            out.mux(packet)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--server", default="http://127.0.0.1:5000")
    ap.add_argument("--image", required=True)
    ap.add_argument("--speech", required=True)
    ap.add_argument("--seconds", type=float, default=8.0, help="how long to record")
    ap.add_argument("--out", default="live.mp4")
    ap.add_argument(
        "--speak", action="store_true", help="push the file with /speak instead of playing it as the microphone"
    )
    ap.add_argument("--config", default="{}", help="JSON parameters, e.g. '{\"min_resolution\": 256}'")
    ap.add_argument("--api-key")
    args = ap.parse_args()
    client = LiveClient(args.server, args.api_key)
    mic = None if args.speak else MediaPlayer(args.speech).audio
    t0 = time.monotonic()
    body = await client.open(args.image, json.loads(args.config), microphone=mic)
    print(f"session {body['session_id']} open in {time.monotonic() - t0:.2f} s")
    for warning in body.get("warnings", []):
        print("warning:", warning)
    if args.speak:
        print("queued", (await client.speak_file(args.speech))["queued_s"], "s of speech")
    await asyncio.sleep(args.seconds)
    gone = False
    try:
        print("server state:", json.dumps(await client.state()))
    except requests.HTTPError as e:  # 404: ended meanwhile (a limit, its worker lost...); 503: its worker is silent
        print(f"the session's state: {e.response.status_code} {e.response.text}")
        gone = e.response.status_code == 404
    except requests.ConnectionError:  # the server stopped meanwhile: what arrived is still written
        print("the session's state: the server cannot be reached any more (it stopped during the session)")
        gone = True
    await client.close(end_session=not gone)
    received = client.received
    if not received.video_times:
        sys.exit(f"error: no frame arrived in {args.seconds:g} s: no connection was made (docs/live.md, Networks)")
    print(f"first frame {received.video_times[0] - t0:.2f} s after the offer; {len(received.video_times)} frames")
    write_mp4(received, args.out, int(json.loads(args.config).get("fps", 25)))
    print("recorded", args.out)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (SessionRefused, NoRelay) as refused:
        sys.exit(f"error: {refused}")
    except requests.ConnectionError:
        sys.exit("error: the server cannot be reached (is it running? --server)")
