"""A live session: a prepared face that speaks PCM as it arrives, one frame at a time.

Its audio timeline advances one frame's worth of samples per frame: what a program queued with
`speak` (played in order, at real time) mixed with what a microphone delivered with `hear`
(a small jitter buffer). Frame `i`'s mouth needs the loudness and phones a little after it (the
look-ahead), so the frame shown at tick `t` is frame `t - delay`, and the audio handed out with
it is the timeline's audio of that same frame: the delay is the broadcast delay, the same for
sound and picture, so that a viewer sees and hears in sync.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from ..audio_features import SPEECH_THRESHOLD
from ..decoders import PreparedDecoder
from ..errors import InvalidParameter
from ..geometry import Framing, framing_warnings
from ..media import SAMPLE_RATE, mono_samples
from ..motion import COEFFS, Rig, mouth_coefficients
from ..options import GenerateOptions
from .features import LoudnessStream, PhoneStream
from .motion import MotionStream

LOOKAHEAD_S = 0.08  # the mouth sees this far ahead (rounded up to whole frames): the broadcast delay
MIC_BUFFER_MAX_S = 0.12  # microphone audio beyond this backlog is dropped: latency stays bounded
SPEAKING_HOLD_S = 0.3  # "speaking" outlasts the last loud frame by this much (pauses between words)
NEVER_LOUD = -(10**9)  # the last loud frame's index before any (or since an interrupt)
PHONE_HISTORY_S = 1.0  # phones older than this before the frame are not looked at


def lookahead_frames(fps: int) -> int:
    """LOOKAHEAD_S in whole frames, rounded up: the broadcast delay of a session at `fps`."""
    return math.ceil(LOOKAHEAD_S * fps - 1e-9)


@dataclass(frozen=True)
class LiveFace:
    """A portrait prepared once for a session: its frame, rig and decoder."""

    framing: Framing
    rig: Rig
    decoder: PreparedDecoder

    @property
    def warnings(self) -> list[str]:
        """What the session's client should know of the photo (a file's warnings alike)."""
        return framing_warnings(self.framing)


@dataclass(frozen=True)
class LiveFrame:
    """One frame of a session, shown at `time_s` after the session's start, with `audio` (n,)
    float32 at SAMPLE_RATE, the speech heard while it shows. Its picture is `pixels`: RGB
    (H, W, 3) uint8, or I420 planes (H * 3 / 2, W) where `i420` (what a helper process hands
    over: video encoders take it as it is); `image` and `yuv420()` give either form."""

    index: int
    time_s: float
    pixels: np.ndarray
    audio: np.ndarray
    speaking: bool
    opening: float  # the mouth's opening (0..~1.4): what tests and meters read
    blink: float  # the lids' closure (0 open .. 1 shut)
    rendered: bool  # False: the previous image again (rendering fell behind; motion went on)
    due_at: float = 0.0  # time.monotonic() when it was due (frames(); 0 from step())
    i420: bool = False

    @functools.cached_property
    def image(self) -> np.ndarray:
        """RGB (H, W, 3) uint8."""
        return cv2.cvtColor(self.pixels, cv2.COLOR_YUV2RGB_I420) if self.i420 else self.pixels

    def yuv420(self) -> np.ndarray:
        """I420 planes (H * 3 / 2, W) uint8 (BT.601, as video encoders convert RGB)."""
        return self.pixels if self.i420 else cv2.cvtColor(self.pixels, cv2.COLOR_RGB2YUV_I420)


@dataclass(frozen=True)
class Spoken:
    """What queuing speech did: the seconds the session now holds, and the seconds of this
    speech dropped for the queue's limit."""

    queued_s: float
    dropped_s: float = 0.0


class LiveSession:
    """A face speaking as audio arrives. `speak` and `hear` may be called from any thread;
    `step` (or `frames`) from one thread, the session's clock."""

    def __init__(self, face: LiveFace, options: GenerateOptions) -> None:
        self.face, self.fps = face, options.fps
        self.delay = lookahead_frames(self.fps)
        self._lock = threading.Lock()  # guards the speech queue and the microphone buffer
        self._speech: deque[np.ndarray] = deque()
        self._queued = 0  # samples in self._speech
        self._mic = np.zeros(0, np.float32)
        self._pending: deque[np.ndarray] = deque()  # the timeline's audio not yet handed out
        self._interrupted = False
        self._turn = 0  # interrupts so far: speech sent for an earlier turn is dropped
        self._loudness = LoudnessStream(self.fps)
        self._phones = PhoneStream()
        self._motion = MotionStream(
            face.rig,
            self.fps,
            dynamic_scale=options.dynamic_scale,
            motion_scale=options.motion_scale,
            smooth=options.smooth_motion,
            seed=options.seed,
            gaze=options.gaze == "natural",
        )
        self.tick = 0  # frames stepped
        self.late_frames = 0
        self._last_loud_tick = NEVER_LOUD
        # the face at rest until the first frame of motion: a photo with an open mouth has it
        # closed, as every later frame at rest has (no jump after the look-ahead)
        rest = mouth_coefficients(np.zeros(1), np.zeros(1), face.rig)
        self._image = face.decoder.render(rest, np.zeros((1, 4)))[0]

    # --- speech in -------------------------------------------------------------------------
    def speak(self, pcm: np.ndarray, turn: int | None = None) -> float:
        """Queue speech (float32 (n,) at SAMPLE_RATE) behind what is queued; returns the seconds
        queued. `turn`: what `turn` was when this speech began (a stream sent in parts); an
        interrupt since then has ended that turn, and its speech is dropped."""
        return self.queue_speech(pcm, turn).queued_s

    def queue_speech(
        self, pcm: np.ndarray, turn: int | None = None, limit_s: float | None = None, whole: bool = False
    ) -> Spoken:
        """`speak`, with the queue held to `limit_s` seconds: what would pass it is dropped, or,
        `whole`, all of it. Checked under the queue's lock, so that callers at the same moment
        cannot pass the limit between them (each had seen the room as it was)."""
        pcm = mono_samples(pcm)
        with self._lock:
            kept = len(pcm)
            if limit_s is not None:
                room = max(0, int(limit_s * SAMPLE_RATE) - self._queued)
                kept = 0 if whole and kept > room else min(kept, room)
            if kept and (turn is None or turn == self._turn):
                self._speech.append(pcm[:kept])
                self._queued += kept
            return Spoken(self._queued / SAMPLE_RATE, (len(pcm) - kept) / SAMPLE_RATE)

    def hear(self, pcm: np.ndarray) -> None:
        """Microphone audio (float32 (n,) at SAMPLE_RATE) as it arrives; mixed with the queued speech."""
        pcm = mono_samples(pcm)
        with self._lock:
            self._mic = np.concatenate([self._mic, pcm])[-int(MIC_BUFFER_MAX_S * SAMPLE_RATE + len(pcm)) :]

    def interrupt(self) -> None:
        """Stop speaking at once: the queue is dropped, and so is what was heard but not yet shown."""
        with self._lock:
            self._speech.clear()
            self._queued = 0
            self._interrupted = True
            self._turn += 1
            # nor does "speaking" outlast it (SPEAKING_HOLD_S bridges pauses between words): a
            # client that read idle from the interrupt's answer read speaking again for 0.3 s
            self._last_loud_tick = NEVER_LOUD

    @property
    def turn(self) -> int:
        """How many times the session was interrupted: a stream of speech passes the turn it
        began in to `speak`, so that an interrupt stops the rest of it too."""
        with self._lock:
            return self._turn

    @property
    def queued_s(self) -> float:
        with self._lock:
            return self._queued / SAMPLE_RATE

    @property
    def speaking(self) -> bool:
        """Speech queued, or heard in the last SPEAKING_HOLD_S of what is being shown."""
        return self.queued_s > 0 or (self.tick - self.delay) - self._last_loud_tick <= SPEAKING_HOLD_S * self.fps

    # --- frames out ------------------------------------------------------------------------
    def _samples(self, tick: int) -> int:
        return int(round((tick + 1) * SAMPLE_RATE / self.fps)) - int(round(tick * SAMPLE_RATE / self.fps))

    def _take(self, n: int) -> np.ndarray:
        """The timeline's next n samples: queued speech plus the microphone, silence where neither."""
        out = np.zeros(n, np.float32)
        with self._lock:
            filled = 0
            while filled < n and self._speech:
                head = self._speech[0]
                k = min(n - filled, len(head))
                out[filled : filled + k] += head[:k]
                filled += k
                if k == len(head):
                    self._speech.popleft()
                else:
                    self._speech[0] = head[k:]
            self._queued -= filled
            k = min(n, len(self._mic))
            out[:k] += self._mic[:k]
            self._mic = self._mic[k:]
            interrupted, self._interrupted = self._interrupted, False
        if interrupted:  # what was heard but not yet shown is dropped with the queue
            shown = self.tick - self.delay  # the first frame not yet shown
            self._pending = deque(np.zeros_like(a) for a in self._pending)
            self._motion.silence_after(shown)
            self._loudness.silence_from(shown)
        return np.clip(out, -1.0, 1.0)

    def step(self, render: bool = True, due_at: float = 0.0) -> LiveFrame:
        """Advance the timeline by one frame and return the frame it makes visible (the first
        `delay` frames are the portrait at rest). render=False keeps the previous image (the
        motion and the audio still advance): how a session that fell behind catches up."""
        chunk = self._take(self._samples(self.tick))
        self._pending.append(chunk)
        loud, pitch = self._loudness.push(chunk)
        self._motion.add(loud, pitch)
        heard_speech = bool(len(loud) and loud[-1] > SPEECH_THRESHOLD)
        self._phones.push(chunk, heard_speech)
        index = self.tick - self.delay
        self.tick += 1
        if index < 0:
            return LiveFrame(index, 0.0, self._image, np.zeros(0, np.float32), False, 0.0, 0.0, False, due_at)
        motion = self._motion.frame(index, self._phones.phones(index / self.fps - PHONE_HISTORY_S))
        if motion.loudness > SPEECH_THRESHOLD and not self._interrupted:  # (not one made as it came)
            self._last_loud_tick = index
        if render:
            self._image = self.face.decoder.render(motion.coeffs[None], motion.head[None])[0]
        audio = self._pending.popleft()
        blink = float(motion.coeffs[COEFFS.index("blink")])
        return LiveFrame(
            index, index / self.fps, self._image, audio, self.speaking, motion.opening, blink, render, due_at
        )

    def frames(self, stop: threading.Event | None = None) -> Iterator[LiveFrame]:
        """Frames on wall-clock time, one every 1/fps s from now (the first once the look-ahead
        has filled), until `stop` is set. A frame whose time is more than a frame period past when
        its turn comes (rendering, or the machine, fell behind) goes out late: unrendered (the
        image held, the motion and the audio on time) and counted, until the clock is caught up:
        the stream never drifts."""
        start = time.monotonic()
        i = 0
        while stop is None or not stop.is_set():
            due = start + i / self.fps
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            late = (time.monotonic() - due) * self.fps > 1.0
            frame = self.step(render=not late, due_at=due)
            i += 1
            if frame.index < 0:  # the look-ahead filling: nothing to show yet
                continue
            self.late_frames += late
            yield frame

    def close(self) -> None:
        """Nothing to release here (SessionProcess's close stops its helper)."""

    @property
    def frame_size(self) -> tuple[int, int]:
        """(width, height) of the frames."""
        h, w = self.face.decoder.frame.shape[:2]
        return w, h


def check_live_decoder(speaks: bool, name: str) -> None:
    """A live session needs a decoder that renders from motion, frame by frame."""
    if speaks:
        raise InvalidParameter(
            f"the {name} decoder cannot run live sessions; live mode uses the warp decoder", field="decoder"
        )


NOT_LIVE = ("duration", "align_mouth", "inference_steps")  # a file's parameters a session has no use for


def unused_live(given: Iterable[str]) -> tuple[str, ...]:
    """The parameters a request named (`given`) that a live session ignores, whatever their
    value: `"align_mouth": true` asks for what a file would get as well (only values away from
    the defaults had been named)."""
    named = set(given)
    return tuple(name for name in NOT_LIVE if name in named)
