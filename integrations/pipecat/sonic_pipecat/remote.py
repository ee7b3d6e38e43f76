"""A running sonic service's live session, as SonicVideoService's `url=` mode uses it.

The session is opened with POST /api/sonic/live (the portrait, the parameters and a WebRTC offer
that receives the face's video and audio and sends a silent microphone); speech goes to
/speak as raw 16 kHz PCM (`audio/L16;rate=16000`) in batches of SEND_EVERY_S; /interrupt and
DELETE do what they say. What the server sends arrives on the offer's tracks; `frames()` and
`audio()` yield it as it comes (the server keeps picture and sound in sync). When the session
ends on the server's side (its idle timeout, max_session_s, credit, a restart, an operator),
`frames()` and `audio()` end and `ended` says why.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError
from loguru import logger

from .voice import VOICED

RATE = 16_000  # Hz of the speech sent (audio/L16;rate=16000)
SEND_EVERY_S = 0.1  # speech is sent in batches this long at most (a request per batch)
RETRY_MAX_S = 2.0  # a batch refused for now (429, 503) is sent again after Retry-After, at most this
ARRIVAL_MAX_S = 2.0  # what was spoken reaches this side within this (the service's look-ahead, jitter buffer)
QUIET_S = 0.3  # ... and has once the face's sound has been quiet this long
STATE_TIMEOUT_S = 2.0  # a state request at the end waits this long for its answer
REQUEST_TIMEOUT_S = 5.0  # any other request (speak, interrupt, the end, why it ended): past it, the service is gone
END_TRIES = 3  # DELETEs of the session refused for now before the service's idle timeout is left to end it
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# why the service ended a session (its 404's `ended_reason`), in an agent developer's words
ENDED_BECAUSE = {
    "client_closed": "a DELETE from elsewhere ended it (an operator, not this agent)",
    "client_gone": "it heard nothing from this agent for its live.idle_timeout_s",
    "max_session": "it reached the service's live.max_session_s",
    "credit_exhausted": "the account's credit ran out",
    "server_stopping": "the service is stopping (a restart or a shutdown)",
    "worker_lost": "the service's worker that ran it stopped answering",
    "error": "it failed on the service",
}


def loopback_only() -> None:
    """Gather ICE host candidates on 127.0.0.1 only (a server on this machine: nothing need
    leave it; aioice has no option for it, so its address lookup is replaced for the process)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


class RemoteSession:
    """One live session of a sonic service, from an asyncio event loop."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http: aiohttp.ClientSession | None = None
        self._pc: RTCPeerConnection | None = None
        self.session_id: str | None = None
        self.fps = 25
        self._video: asyncio.Queue = asyncio.Queue()
        self._audio: asyncio.Queue = asyncio.Queue()
        self._outgoing = bytearray()
        self._interrupt_due = False  # an interruption the sender is to tell the service, before more speech
        self._wake = asyncio.Event()  # the sender looks at once (an interruption), not at its next batch
        self._sender: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.ended: str | None = None  # why the session ended on the server's side, once it has
        self._closing = False
        self._last_voiced = float("-inf")  # when the face's sound last carried speech (loop time)
        self._sending = False  # a batch of speech is on its way to the service
        self._last_sent = float("-inf")  # when the service last took speech with a voice in it
        if urlparse(self.url).hostname in LOOPBACK:
            loopback_only()

    async def open(self, portrait: str, params: dict[str, Any], within_s: float) -> None:
        """Open the session within `within_s` seconds: a service that does not answer in time,
        or stays busy (503, 429: asked again after Retry-After while time is left), raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        self._http = aiohttp.ClientSession(headers=self._headers, timeout=timeout)
        no_answer = f"the sonic service at {self.url} did not answer within {within_s:g} s"
        pc = self._pc = RTCPeerConnection(await self._rtc_configuration(deadline, no_answer))
        pc.addTransceiver("video", direction="recvonly")
        pc.addTrack(AudioStreamTrack())  # the microphone the session mixes in: silence

        @pc.on("track")
        def on_track(track) -> None:
            queue = self._video if track.kind == "video" else self._audio
            self._tasks.append(asyncio.ensure_future(self._drain(track, queue)))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self._ended_by_server()

        await pc.setLocalDescription(await pc.createOffer())
        image = Path(portrait).read_bytes()
        offer = json.dumps({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type})

        def form() -> aiohttp.FormData:  # (a FormData is sent once: one per try)
            data = aiohttp.FormData()
            data.add_field("image", image, filename=Path(portrait).name)
            data.add_field("config", json.dumps(params))
            data.add_field("offer", offer)
            return data

        status, text, tries = await self._asked("POST", "/api/sonic/live", deadline, no_answer, form)
        if status != 201:
            asked = f", asked {tries} times in {within_s:g} s" if tries > 1 else ""
            raise RuntimeError(f"the sonic service refused the session ({status}{asked}): {_message(text)}")
        try:
            body = json.loads(text)
        except ValueError:
            raise RuntimeError(f"the sonic service's answer is not JSON: {text[:200]!r}") from None
        self.session_id = body["session_id"]
        self.warnings: list[str] = list(body.get("warnings", []))  # the photo's, and unused parameters
        self.fps = int(params.get("fps", 25))
        await pc.setRemoteDescription(RTCSessionDescription(**body["answer"]))
        # connected within the same time: without it the TTS audio would go to a face nobody
        # sees until the service's idle timeout (a network that blocks the media)
        while pc.connectionState != "connected":
            if pc.connectionState in ("failed", "closed") or loop.time() >= deadline:
                raise RuntimeError(
                    f"the connection to the sonic service was not made within {within_s:g} s "
                    f"({pc.connectionState}): see live.ice_servers in its docs/live.md"
                )
            await asyncio.sleep(0.02)
        self._sender = asyncio.ensure_future(self._send_speech())

    async def _asked(
        self,
        method: str,
        path: str,
        deadline: float,
        no_answer: str,
        form: Callable[[], aiohttp.FormData] | None = None,
    ) -> tuple[int, str, int]:
        """One request to the service, asked again after Retry-After where it is refused for now
        (429, 503: busy, not turned off) while time is left before `deadline`: the last answer's
        status and text, and how many times it was asked. No answer in time, or no service:
        RuntimeError."""
        assert self._http is not None
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            left = deadline - loop.time()
            if left <= 0:  # (aiohttp takes a timeout of 0 or less as none at all)
                raise RuntimeError(no_answer)
            tries += 1
            data, limit = (form() if form is not None else None), aiohttp.ClientTimeout(left)
            try:
                async with self._http.request(method, self.url + path, data=data, timeout=limit) as r:
                    text = await r.text()
                    wait = _stated_retry_after(r.headers) if r.status in (429, 503) else None
            except asyncio.TimeoutError:
                raise RuntimeError(no_answer) from None
            except aiohttp.ClientError as e:
                raise RuntimeError(f"the sonic service at {self.url} cannot be reached: {_said(e)}") from None
            if wait is None or loop.time() + wait >= deadline:
                return r.status, text, tries
            await asyncio.sleep(wait)

    async def _rtc_configuration(self, deadline: float, no_answer: str) -> RTCConfiguration:
        """The service's STUN and TURN servers, credentials included (GET
        /api/sonic/live/rtc-configuration): across NATs and firewalls the media reach the service
        only through a TURN server this side uses too. A service older than the route (404)
        gets none, as before."""
        status, text, _ = await self._asked("GET", "/api/sonic/live/rtc-configuration", deadline, no_answer)
        if status == 404:
            return RTCConfiguration(iceServers=[])
        if status != 200:
            raise RuntimeError(f"the sonic service refused its RTC configuration ({status}): {_message(text)}")
        try:
            config = json.loads(text)["rtc_configuration"]
            servers = [
                RTCIceServer(s["urls"], username=s.get("username"), credential=s.get("credential"))
                for s in config["iceServers"]
            ]
            policy = RTCIceTransportPolicy(config["iceTransportPolicy"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(f"the sonic service's RTC configuration is not understood: {text[:200]!r}") from None
        return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)

    def speak(self, pcm: np.ndarray) -> None:
        """Queue speech (float32 at 16 kHz): sent with the next batch."""
        self._outgoing += (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()

    @property
    def speaking(self) -> bool:
        """Speech is on its way to the service, or the face's sound carried a voice just now."""
        recent = asyncio.get_running_loop().time() - self._last_voiced < QUIET_S
        return bool(self._outgoing) or self._sending or recent

    async def _send_speech(self) -> None:
        """The one sender of speech and interruptions, in the order they came: an interruption
        sent beside a batch could reach the service before it, and the batch be spoken after."""
        headers = {"Content-Type": "audio/L16;rate=16000"}
        while self.ended is None:
            try:
                await asyncio.wait_for(self._wake.wait(), SEND_EVERY_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._http is None:
                continue
            if self._interrupt_due:
                self._interrupt_due = False
                await self._request("POST", "/interrupt")
            if not self._outgoing:
                continue
            body, self._outgoing = bytes(self._outgoing), bytearray()
            self._sending = True
            try:
                async with self._http.post(self._url("/speak"), data=body, headers=headers) as r:
                    if r.status in (429, 503):  # refused for now: sent again, ahead of what came since
                        if not self._interrupt_due:  # (unless interrupted meanwhile)
                            self._outgoing[:0] = body
                        await asyncio.sleep(_retry_after(r.headers))
                    elif r.status == 404:  # ended on the server's side before its tracks told
                        self._end(f"the sonic service ended it: {_ended_because(await r.text())}")
                    elif r.status >= 400:
                        self._end(f"the sonic service refused speech ({r.status}): {_message(await r.text())}")
                    elif np.abs(np.frombuffer(body, "<i2")).max() > VOICED:
                        self._last_sent = asyncio.get_running_loop().time()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                await self._failed(e)
            finally:
                self._sending = False

    async def _request(self, method: str, tail: str) -> None:
        """A request whose answer does not matter, only whether the service is still there."""
        assert self._http is not None
        try:
            async with self._http.request(method, self._url(tail)) as r:
                await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            await self._failed(e)

    async def _failed(self, error: Exception) -> None:
        """A request failed: the session is over if the service says so or is gone; a slow
        answer from a service still holding the session ends nothing (what it was is lost)."""
        reason = await self._why_ended()
        if reason is not None:
            self._end(reason)
        else:
            logger.warning(f"the sonic service did not answer a request in time ({_said(error)})")

    def _url(self, tail: str = "") -> str:
        return f"{self.url}/api/sonic/live/{self.session_id}{tail}"

    async def _drain(self, track, queue: asyncio.Queue) -> None:
        while True:
            try:
                frame = await track.recv()
                if track.kind == "audio" and np.abs(frame.to_ndarray()).max() > VOICED:
                    self._last_voiced = asyncio.get_running_loop().time()
                await queue.put(frame)
            except MediaStreamError:
                await self._ended_by_server()  # (before the end is seen, so that it has its reason)
                await queue.put(None)
                return

    async def _ended_by_server(self) -> None:
        """The connection or a track ended without this side closing it: the server's word on why."""
        if not self._closing and self.ended is None:
            self._end(await self._why_ended() or "the sonic service stopped sending it")

    async def _why_ended(self) -> str | None:
        """Why the session is over, in the server's words, or that the server is gone; None while
        the server still holds it."""
        try:
            assert self._http is not None
            async with self._http.get(self._url()) as r:
                if r.status == 404:
                    return f"the sonic service ended it: {_ended_because(await r.text())}"
        except (aiohttp.ClientError, asyncio.TimeoutError, AssertionError) as e:
            return f"the sonic service at {self.url} cannot be reached: {_said(e)}"
        return None

    def _end(self, reason: str) -> None:
        """The session is over on the server's side: frames() and audio() end."""
        if self.ended is None and not self._closing:
            self.ended = reason
            self._video.put_nowait(None)
            self._audio.put_nowait(None)

    def interrupt(self) -> None:
        """Drop the speech not yet sent, and have the sender tell the service at once (not
        waited for: the pipeline's interruption goes on whether the service answers or not)."""
        self._outgoing.clear()
        if self.ended is None:
            self._interrupt_due = True
            self._wake.set()

    async def finish_speaking(self, margin_s: float) -> None:
        """Until the speech sent so far has been spoken by the service and has arrived here,
        bounded by its length and `margin_s` (and each request by STATE_TIMEOUT_S)."""
        if self.ended is not None or self._http is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + len(self._outgoing) / 2 / RATE + margin_s
        while self.ended is None and (self._outgoing or self._sending) and loop.time() < deadline:
            await asyncio.sleep(0.02)  # the sender takes it with its next batch, and the service answers
        known = False
        while self.ended is None and loop.time() < deadline:
            queued = await self._queued_s()
            if queued == 0:
                break
            if queued is not None and not known:  # what the service holds: spoken in real time
                deadline, known = loop.time() + queued + margin_s, True
            await asyncio.sleep(min(0.2, queued or 0.2))
        # the last of it is on its way (the service's look-ahead, the jitter buffer): once speech
        # sent has come back, until the sound has been quiet a moment
        waiting_for_voice = self._last_sent > self._last_voiced
        until = loop.time() + ARRIVAL_MAX_S
        while self.ended is None and loop.time() < until:
            arrived = not waiting_for_voice or self._last_voiced > self._last_sent
            if arrived and loop.time() - self._last_voiced >= QUIET_S:
                break
            await asyncio.sleep(0.02)

    async def _queued_s(self) -> float | None:
        """The seconds of speech the service holds for this session; None when it cannot say now
        (refused for now, no answer in STATE_TIMEOUT_S), 0 when the session is gone."""
        assert self._http is not None
        timeout = aiohttp.ClientTimeout(total=STATE_TIMEOUT_S)
        try:
            async with self._http.get(self._url(), timeout=timeout) as r:
                if r.status == 404:
                    return 0.0
                state = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return float(state.get("queued_s", 0)) if isinstance(state, dict) else None

    async def frames(self) -> AsyncIterator[Any]:
        """The face's video frames (av.VideoFrame) as they arrive, until the session ends."""
        while (frame := await self._video.get()) is not None:
            yield frame

    async def audio(self) -> AsyncIterator[Any]:
        """The face's audio frames (av.AudioFrame) as they arrive, until the session ends."""
        while (frame := await self._audio.get()) is not None:
            yield frame

    async def close(self) -> None:
        self._closing = True
        for task in [self._sender, *self._tasks]:
            if task is not None:
                task.cancel()
        if self._http is not None:
            if self.session_id:
                await self._end_on_server()
            await self._http.close()
            self._http = None
        if self._pc is not None:
            await self._pc.close()
            self._pc = None
        await self._video.put(None)
        await self._audio.put(None)

    async def _end_on_server(self) -> None:
        """DELETE the session; refused for now (429, 503) it is sent again after Retry-After, a
        few times: a session left running holds one of the service's slots until its idle timeout."""
        assert self._http is not None
        for _ in range(END_TRIES):
            try:
                async with self._http.delete(self._url()) as r:
                    await r.read()
                    if r.status not in (429, 503):
                        return
                    await asyncio.sleep(_retry_after(r.headers))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return  # the service is gone: nothing left to end


def _stated_retry_after(headers: Any) -> float | None:
    """A refusal's Retry-After in seconds, as the service states it; None where it states none
    (a refusal that waiting will not lift, such as live sessions turned off)."""
    try:
        return max(0.0, float(headers["Retry-After"]))
    except (KeyError, ValueError):
        return None


def _said(error: Exception) -> str:
    """An exception's message, or its kind where it has none (a timeout)."""
    return str(error) or type(error).__name__


def _retry_after(headers: Any) -> float:
    """A refusal's Retry-After in seconds, at most RETRY_MAX_S (1 where it is missing or no number)."""
    stated = _stated_retry_after(headers)
    return 1.0 if stated is None else min(RETRY_MAX_S, stated)


def _ended_because(text: str) -> str:
    """A 404's reason in words, or its message."""
    try:
        reason = json.loads(text)["error"]["ended_reason"]
    except (ValueError, KeyError, TypeError):
        return _message(text)
    return f"{ENDED_BECAUSE.get(reason, 'it ended')} ({reason})"


def _message(text: str) -> str:
    """The message of a sonic error body, or the body itself."""
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]
