"""The WebRTC side of live sessions (aiortc): one asyncio loop for every session's connection,
the two tracks a session sends (the face, the speech it says) and the microphone it receives.

No STUN or TURN server is used unless the settings name one (aiortc's own default would query
a public STUN server), and `live.host_addresses` can restrict the host candidates gathered (on a
multi-homed server, or to 127.0.0.1 for clients on the same machine: aioice leaves loopback out
by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fractions
import functools
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .feedback import FeedbackCounts, LinkFeedback

if TYPE_CHECKING:  # sessions.py imports this module
    from .ice import IceServer
    from .sessions import Sections

log = logging.getLogger("sonic.live")
T = TypeVar("T")
AUDIO_RATE = 16_000  # the session's audio, as the engine keeps it (sonic.media.SAMPLE_RATE)
PACKET_SAMPLES = AUDIO_RATE // 50  # 20 ms of audio per frame handed to the encoder
# what waits for the encoder at most, older frames dropped (a slow consumer never holds the clock
# back): the same time for both tracks, 0.48 s. Counted in frames alike (12), a stall of the event
# loop between 0.24 and 0.48 s cut the voice's 20 ms packets and not the face's 40 ms frames
QUEUE_S = 0.48
PACKET_S = PACKET_SAMPLES / AUDIO_RATE
MIC_PREFETCH_PACKETS = 0  # the microphone's packets held back beyond the next one (aiortc: 4)
# where the face's VP8 starts, in bit/s (aiortc: 500 kbit/s; its H.264 starts at 1 Mbit/s); the
# client's reports (sonic_server/live/feedback.py) then move it between aiortc's 250 kbit/s and
# 1.5 Mbit/s
VP8_START_BITRATE = 1_000_000


class RtcLoop:
    """One asyncio event loop in a daemon thread, where every session's peer connection lives."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="sonic-live-rtc", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine on the loop and wait for its result (from any other thread); one that
        fails or outlasts `timeout` is cancelled, not left running on the loop."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as e:  # not the builtin TimeoutError before Python 3.11
            future.cancel()
            raise TimeoutError(f"not done within {timeout:g} s") from e
        except BaseException:
            future.cancel()
            raise

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


def restrict_host_addresses(addresses: Sequence[str]) -> None:
    """Gather ICE host candidates on these addresses only (all the machine's when empty).
    aioice offers no option for it: its address lookup is replaced, for the whole process,
    which is what an installation's setting means."""
    import aioice.ice

    original = getattr(aioice.ice, "_sonic_original_get_host_addresses", aioice.ice.get_host_addresses)
    aioice.ice._sonic_original_get_host_addresses = original  # type: ignore[attr-defined]
    if not addresses:
        aioice.ice.get_host_addresses = original
        return
    chosen = list(addresses)
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(chosen)


def announce_host(sdp: str, public_host: str) -> str:
    """The answer with its host candidates' address (and the media lines' connection address)
    replaced by `public_host`: what a client behind the internet reaches a machine behind a 1:1
    NAT at (the ports stay: the NAT maps them one to one)."""
    if not public_host:
        return sdp
    family = "IP6" if ":" in public_host else "IP4"
    lines = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:") and " typ host" in line:
            parts = line.split(" ")
            parts[4] = public_host  # foundation, component, transport, priority, address, port, ...
            line = " ".join(parts)
        elif line.startswith("c=IN "):
            line = f"c=IN {family} {public_host}"
        lines.append(line)
    return "\r\n".join(lines)


def rtc_configuration(servers: Sequence[IceServer]) -> Any:
    """aiortc's configuration: the ICE servers ice.py lists, with their credentials (none by
    default)."""
    from aiortc import RTCConfiguration, RTCIceServer

    return RTCConfiguration(
        iceServers=[RTCIceServer(s.url, username=s.username, credential=s.credential) for s in servers]
    )


@functools.cache
def _track_classes() -> tuple[type, type]:
    """The two outgoing track classes, built on aiortc's MediaStreamTrack (imported only when the
    first session starts: the service runs without aiortc installed until one does), with the
    face encoded by `face_encoder_class`."""
    use_face_encoder()
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class QueuedTrack(MediaStreamTrack):
        """Frames put by the session's clock thread, taken by aiortc's sender as they come."""

        def __init__(self, loop: asyncio.AbstractEventLoop, depth: int) -> None:
            super().__init__()
            self._owner_loop = loop
            self._queue: asyncio.Queue = asyncio.Queue()
            self._depth = depth  # frames kept at most (QUEUE_S of them)

        def put(self, frame: Any) -> None:
            """From any thread."""
            self._owner_loop.call_soon_threadsafe(self._put, frame)

        def _put(self, frame: Any) -> None:
            while self._queue.qsize() >= self._depth:
                self._queue.get_nowait()
            self._queue.put_nowait(frame)

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise MediaStreamError
            frame = await self._queue.get()
            if frame is None:
                raise MediaStreamError
            return frame

    class FaceTrack(QueuedTrack):
        kind = "video"

        def send(self, planes: np.ndarray, index: int, fps: int) -> None:
            """I420 planes (H * 3 / 2, W) uint8: what the encoder takes without converting."""
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts, frame.time_base = index, fractions.Fraction(1, fps)
            self.put(frame)

    class SpeechTrack(QueuedTrack):
        kind = "audio"

        def send(self, pcm: np.ndarray, start_sample: int) -> None:
            """pcm float32 at AUDIO_RATE, starting at `start_sample` of the session's timeline,
            handed on in 20 ms frames: one Opus packet each (the encoder stamps all the packets
            of one frame with one RTP timestamp, which a receiver reads as one packet)."""
            s16 = (np.clip(pcm, -1, 1) * 32767).astype("<i2")
            for at in range(0, len(s16), PACKET_SAMPLES):
                piece = s16[at : at + PACKET_SAMPLES]
                # the voice on both channels: Opus is sent as stereo, and a mono frame would be
                # upmixed to it 3 dB down on each side (the G.711/G.722 encoders mix it back whole)
                frame = av.AudioFrame(format="s16", layout="stereo", samples=len(piece))
                frame.planes[0].update(np.repeat(piece, 2).tobytes())
                frame.sample_rate = AUDIO_RATE
                frame.pts, frame.time_base = start_sample + at, fractions.Fraction(1, AUDIO_RATE)
                self.put(frame)

    return FaceTrack, SpeechTrack


def set_directions(pc: Any, sections: Sections, face: Any, voice: Any) -> None:
    """Before the answer: the face and the voice sent on their sections, the microphone received on
    its own, nothing else. A video section the client sends on (a page that offers its camera) would
    otherwise be received and decoded into a queue that nothing reads: a 960x540 camera grew the
    server by 25 MB a second, for every session that sent one; a second microphone would be mixed
    into the first."""
    transceivers = pc.getTransceivers()
    face_at = sections.face if sections.face is not None else 0  # check_offer asked for one
    transceivers[face_at].sender.replaceTrack(face)
    if sections.voice is not None:
        transceivers[sections.voice].sender.replaceTrack(voice)
    for i, transceiver in enumerate(transceivers):
        sends = i in (face_at, sections.voice)
        hears = i == sections.microphone
        transceiver.direction = {(True, True): "sendrecv", (True, False): "sendonly", (False, True): "recvonly"}.get(
            (sends, hears), "inactive"
        )


async def consume_microphone(track: Any, hear: Callable[[np.ndarray], None], heard: Callable[[], None]) -> None:
    """Read the client's audio track to its end: 16 kHz mono float32 chunks to `hear`."""
    import av
    from aiortc.mediastreams import MediaStreamError

    resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        heard()
        for out in resampler.resample(frame):
            pcm = out.to_ndarray().reshape(-1).astype(np.float32) / 32768.0
            hear(pcm)


def quicken_audio_receiver(receiver: Any) -> None:
    """The microphone's jitter buffer (`microphone_buffer`) in place of aiortc's own."""
    from aiortc.jitterbuffer import JitterBuffer

    name = "_RTCRtpReceiver__jitter_buffer"
    if isinstance(getattr(receiver, name, None), JitterBuffer):
        setattr(receiver, name, microphone_buffer())


@functools.cache
def _microphone_buffer_class() -> type:
    from aiortc.jitterbuffer import JitterBuffer, JitterFrame
    from aiortc.utils import uint16_add

    class MicrophoneBuffer(JitterBuffer):
        def add(self, packet: Any) -> tuple[bool, Any]:
            pli, frame = super().add(packet)
            return pli, frame if frame is not None else self._step_over_loss(packet.sequence_number)

        def _step_over_loss(self, newest: int) -> Any:
            """The packet held at the head, released when the one after it is missing and a later
            one has come; the buffer goes on from that later one (one packet out per packet in:
            a packet held longer would keep every packet after it that much late)."""
            if self._origin is None or not 2 <= uint16_add(newest, -self._origin) < self._capacity:
                return None  # nothing to step over (or a late packet, already dropped)
            head = self._packets[self._origin % self._capacity]
            if head is None or self._packets[uint16_add(self._origin, 1) % self._capacity] is not None:
                return None
            self._packets[self._origin % self._capacity] = None
            self._origin = uint16_add(self._origin, 1)
            while self._packets[self._origin % self._capacity] is None:  # (the newest is there)
                self._origin = uint16_add(self._origin, 1)
            data = head._data  # type: ignore[attr-defined]  # the receiver's depayloaded frame
            return JitterFrame(data=data, timestamp=head.timestamp)

    return MicrophoneBuffer


def microphone_buffer() -> Any:
    """A jitter buffer for the microphone that releases each packet when the next one arrives,
    instead of holding four more as aiortc does: 80 ms less between a syllable spoken and the
    mouth moving. A lost packet is stepped over as soon as a later one has come: aiortc's buffer
    waits until 16 are queued behind it, and then stays that deep (every loss left the mouth 300
    ms further behind the voice). A packet reordered further than that is dropped: the mouth
    misses 20 ms of speech. aiortc 1.16 has no setting for either."""
    return _microphone_buffer_class()(capacity=16, prefetch=MIC_PREFETCH_PACKETS)


def use_face_encoder() -> None:
    """aiortc's senders encode VP8 with `face_encoder_class` (1.16 has no setting for an
    encoder: its senders take one from `get_encoder` as they start), and leave the client's
    loss and resend reports on the face to its `LinkFeedback`."""
    from aiortc import rtcrtpsender
    from aiortc.codecs import get_encoder

    def encoder_for(codec: Any) -> Any:
        return face_encoder_class()() if codec.mimeType.lower() == "video/vp8" else get_encoder(codec)

    rtcrtpsender.get_encoder = encoder_for
    sender = rtcrtpsender.RTCRtpSender
    if not getattr(sender._handle_rtcp_packet, "face_feedback", False):
        sender._handle_rtcp_packet = _with_face_feedback(sender._handle_rtcp_packet)  # type: ignore[method-assign]


def _with_face_feedback(aiortcs: Callable[..., Any]) -> Callable[..., Any]:
    """An RTCRtpSender's RTCP handling, the face's sender's reports seen by its feedback first:
    a resend request (NACK) is decided there packet by packet, a receiver report's loss moves
    its rate; everything else (and every other sender's) as aiortc does. aiortc 1.16 keeps
    what this reads private (its encoder, history and round trip): another version's sender is
    left as it is."""
    from aiortc.rtp import RTCP_RTPFB_NACK, RTP_HISTORY_SIZE, RtcpRrPacket, RtcpRtpfbPacket, RtcpSrPacket

    async def handle(sender: Any, packet: Any) -> None:
        feedback = _feedback_of(sender)
        history = getattr(sender, "_RTCRtpSender__rtp_history", None)
        if not isinstance(feedback, LinkFeedback) or history is None:
            return await aiortcs(sender, packet)
        if isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            rtt = getattr(sender, "_RTCRtpSender__rtt", None)
            for seq in packet.lost:
                kept = history.get(seq % RTP_HISTORY_SIZE)
                if feedback.resend(seq, kept is not None and kept.sequence_number == seq, rtt):
                    await sender._retransmit(seq)
            return None
        await aiortcs(sender, packet)  # (a report's round trip estimated first)
        if isinstance(packet, (RtcpRrPacket, RtcpSrPacket)):
            for report in packet.reports:
                if report.ssrc == sender._ssrc:
                    feedback.lost(report.fraction_lost / 256, getattr(sender, "_RTCRtpSender__rtt", None))
        return None

    handle.face_feedback = True  # type: ignore[attr-defined]
    return handle


def face_feedback(pc: Any) -> FeedbackCounts | None:
    """What the connection's face sender did with the client's reports (None before its
    first frame, or with another codec than VP8)."""
    for sender in pc.getSenders():
        feedback = _feedback_of(sender)
        if isinstance(feedback, LinkFeedback):
            return feedback.counts()
    return None


def _feedback_of(sender: Any) -> Any:
    """A sender's LinkFeedback, where its encoder is the face's (aiortc keeps it private)."""
    return getattr(getattr(sender, "_RTCRtpSender__encoder", None), "feedback", None)


@functools.cache
def face_encoder_class() -> type:
    """aiortc's VP8 encoder (its packets, its picture ids) with the face's own rate control and
    keyframes (`LinkFeedback`). aiortc made a new encoder (its next frame a keyframe, coarse at
    a constant rate, and the frames after it soft) each time the client's estimate moved by 10 %:
    a stream whose estimate climbed went soft every 1.5 s (received PSNR in the 0.8 s after each:
    40.4 dB against 44.5). Here the rate moves in steps, starts at VP8_START_BITRATE, and the
    first keyframe finds the encoder's buffer full (+1.1-1.5 dB over the first half second)."""
    import av
    from aiortc.codecs.vpx import MAX_BITRATE, MIN_BITRATE, Vp8Encoder, number_of_threads

    class FaceEncoder(Vp8Encoder):
        def __init__(self) -> None:
            super().__init__()
            self.feedback = LinkFeedback(VP8_START_BITRATE, MIN_BITRATE, MAX_BITRATE)

        @property
        def target_bitrate(self) -> int:
            """The rate the encoder runs at (aiortc compares it with its encoder's to make a new
            one: the running encoder's own, so that only `encode` here makes them)."""
            return self.feedback.running

        @target_bitrate.setter
        def target_bitrate(self, estimate: int) -> None:  # the client's estimate (REMB)
            self.feedback.estimated(estimate)

        def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
            feedback = self.feedback
            if force_keyframe:  # aiortc's flag: a picture-loss report since the last frame
                feedback.keyframe_asked()
            codec, rate = self.codec, feedback.wanted()
            made = codec is None or codec.bit_rate != rate or (codec.width, codec.height) != (frame.width, frame.height)
            if made:
                threads = number_of_threads(frame.width * frame.height, os.cpu_count() or 1)
                self.codec, feedback.running = _vp8_context(av, frame.width, frame.height, rate, threads), rate
            asked = feedback.keyframe_now()
            if made or asked:  # (a new encoder's first frame is one)
                feedback.keyframe_made()
            return super().encode(frame, asked and not made)

    return FaceEncoder


def _vp8_context(av: Any, width: int, height: int, rate: int, threads: int) -> Any:
    """A libvpx VP8 encoder for real time at a constant `rate` (bit/s): no look-ahead, a
    second's buffer that starts full, the quantiser free over its whole range, keyframes only
    when asked for (the first, a client's picture-loss report)."""
    codec = av.CodecContext.create("libvpx", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.bit_rate, codec.gop_size, codec.qmin, codec.qmax = rate, 3000, 2, 56
    codec.thread_count = threads
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "-6",
        "lag-in-frames": "0",
        "minrate": str(rate),  # minrate = maxrate = bit_rate: libvpx's constant rate
        "maxrate": str(rate),
        "bufsize": str(rate),  # in bits: a second
        "rc_init_occupancy": str(rate),  # full at the start: the first keyframe may take more
        "undershoot-pct": "100",
        "overshoot-pct": "15",
        "static-thresh": "1",
        "noise-sensitivity": "4",
        "partitions": "0",
    }
    return codec


def face_tracks(loop: asyncio.AbstractEventLoop, fps: int) -> tuple[Any, Any]:
    """A (video, audio) pair of outgoing tracks on the loop, each holding QUEUE_S at most."""
    face_cls, speech_cls = _track_classes()
    return face_cls(loop, max(1, round(QUEUE_S * fps))), speech_cls(loop, round(QUEUE_S / PACKET_S))
