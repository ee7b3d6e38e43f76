"""A live session in a helper process of its own (`python -m sonic.live._helper FD`).

A session's frame is many small numpy, OpenCV and pocketsphinx calls, most of them holding
Python's interpreter lock: two sessions as threads of one process took 1.0 core where each
alone took 0.39, and three fell behind at 1.3 cores (scripts/bench_live.py, docs/live.md).
In processes of their own, sessions do not wait on each other, nor on the WebRTC work of the
process that serves them. The helper runs the session and its clock; this side sends it speech
(`speak`, `hear`, `interrupt`) and reads its frames: the images through a ring of slots in a
file mapped into memory by both (in /dev/shm where there is one), everything else through the
socket. A helper exits when told to, or when its socket reaches end of file (this process gone).

Helpers import their modules before a session needs them: `HelperPool` keeps one started, so
that a session begins without waiting for Python's imports (~1 s).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PipelineError
from ..media import SAMPLE_RATE, mono_samples
from ..render_pool import HelperProcess, scratch_root, sweep_orphans

if TYPE_CHECKING:
    from .session import Spoken

log = logging.getLogger("sonic.live")
SLOTS = 8  # frames in the ring: the reader copies each out long before its slot comes round again
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 5.0
SPEAK_PART_S = 10.0  # speech goes to the helper this much at a time (0.64 MB, a few ms on the socket)
ANSWERS_KEPT = 64  # a speak's answer this many answers old is dropped: its caller gave up
TMP_PREFIX = "sonic-live-"


def read_slot(ring: np.ndarray, stamps: np.ndarray, slot: int, stamp: int) -> np.ndarray | None:
    """A copy of the ring's `slot`, if it holds frame `stamp` from before the copy to after it;
    None if not. The helper writes up to SLOTS frames ahead of the reader, with no wait: it marks
    a slot -1 while writing it, then with the frame's number. A reader that fell a whole ring
    behind would otherwise copy a later frame, or one half written."""
    if stamps[slot] != stamp:
        return None
    picture = np.array(ring[slot])
    return picture if stamps[slot] == stamp else None


# --- messages (pickled over the socket) ------------------------------------------------------
@dataclass(frozen=True)
class Start:
    face: object  # a LiveFace
    options: object  # GenerateOptions
    frames_path: str  # the ring: a .npy of (SLOTS, H * 3 / 2, W) uint8, frames as I420 planes
    stamps_path: str  # the ring's stamps: a .npy of (SLOTS,) int64, see read_slot


@dataclass(frozen=True)
class Speak:
    pcm: np.ndarray
    turn: int | None = None
    limit_s: float | None = None
    whole: bool = False
    seq: int = 0  # echoed by its Queued: an answer that came too late is not taken for the next


@dataclass(frozen=True)
class Hear:
    pcm: np.ndarray


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Begin:
    """Start the clock: sent when the frames are first asked for (the client is connected), so
    that speech queued before then is spoken to the client, not to nobody."""


@dataclass(frozen=True)
class Queued:
    seconds: float
    turn: int = 0
    seq: int = 0
    dropped_s: float = 0.0  # of the Speak it answers


@dataclass(frozen=True)
class FrameOut:
    """A frame's everything but its image, which is in `slot` of the ring."""

    index: int
    time_s: float
    due_at: float
    slot: int
    audio: np.ndarray
    speaking: bool
    opening: float
    blink: float
    rendered: bool
    queued_s: float
    late_frames: int
    stamp: int  # the frame's number in the ring's stamps
    turn: int = 0  # the session's interrupts before the frame was made (its state is of that turn)


@dataclass(frozen=True)
class Failed:
    message: str


class _Helper(HelperProcess):
    """A live session's helper process, with the private folder that holds its frames' ring."""

    def __init__(self) -> None:
        super().__init__("sonic.live._helper")
        self.folder = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=scratch_root())

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.folder, ignore_errors=True)


class HelperPool:
    """One helper kept started ahead of the next session."""

    def __init__(self) -> None:
        self._spare: _Helper | None = None
        self._lock = threading.Lock()
        sweep_orphans(TMP_PREFIX)  # the rings of a process killed mid-session

    def warm(self) -> None:
        """Start the spare, in a thread of its own. Failing (out of file handles, of memory)
        costs nothing now: the next session starts its own helper, and says why if it cannot."""
        with self._lock:
            if self._spare is None or self._spare.proc.poll() is not None:
                try:
                    self._spare = _Helper()
                except OSError as e:  # its thread died with a traceback
                    self._spare = None
                    log.warning("the spare live helper could not be started (%s)", e.strerror or e)

    def take(self) -> _Helper:
        with self._lock:
            helper, self._spare = self._spare, None
        if helper is None or helper.proc.poll() is not None:
            helper = _Helper()
        threading.Thread(target=self.warm, name="sonic-live-warm", daemon=True).start()
        return helper

    def close(self) -> None:
        with self._lock:
            if self._spare is not None:
                self._spare.stop()
                self._spare = None


class SessionProcess:
    """A LiveSession's interface (speak, hear, interrupt, frames, the state), the session
    itself running in a helper process."""

    def __init__(self, face, options, pool: HelperPool | None = None) -> None:
        from .session import LiveFrame, lookahead_frames

        self._frame_cls = LiveFrame
        self._helper = pool.take() if pool is not None else _Helper()
        h, w = face.decoder.frame.shape[:2]
        self.frame_size = (w, h)
        self.fps = options.fps
        path = os.path.join(self._helper.folder, "frames.npy")
        self._ring = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(SLOTS, h * 3 // 2, w))
        stamps_path = os.path.join(self._helper.folder, "stamps.npy")
        self._stamps = np.lib.format.open_memmap(stamps_path, mode="w+", dtype=np.int64, shape=(SLOTS,))
        self._stamps[:] = -1
        self._picture: np.ndarray | None = None  # the last frame's picture
        self._behind = False  # the last frame's picture had been overwritten in the ring
        self._frames: queue.Queue = queue.Queue(maxsize=SLOTS - 2)
        self._answers: dict[int, Queued] = {}  # Speak's answers by seq, until their caller takes them
        self._answered = threading.Condition()
        self._seq = itertools.count(1)
        self._ended = False  # the helper's messages have stopped (it exited, or was killed)
        self._send_lock = threading.Lock()
        self._speak_lock = threading.Lock()  # one speak call's parts are sent together
        self.queued_s, self.speaking, self.late_frames = 0.0, False, 0
        self.turn = 0  # the session's turn, as its last answer to `speak` gave it
        self._interrupts = 0  # interrupts sent to the helper (its turn once it has had them all)
        self._state_lock = threading.Lock()  # the turn above and the state read from the helper's reports
        self.delay = lookahead_frames(self.fps)  # as the session in the helper has it
        self.failure: str | None = None
        self._begun = False
        try:
            self._send(Start(face, options, path, stamps_path))
            ready = self._helper.conn.recv() if self._helper.conn.poll(START_TIMEOUT_S) else None
        except (OSError, EOFError):
            ready = None
        if not isinstance(ready, Queued):
            self.close()
            # its words (an exception's, naming the helper's files) go to the log, not to a client
            log.error("a live session's helper did not start: %s", getattr(ready, "message", "no answer"))
            raise PipelineError("the live session's helper did not start (the log says why)")
        self._reader = threading.Thread(target=self._read, name="sonic-live-reader", daemon=True)
        self._reader.start()

    def _send(self, message: object) -> None:
        with self._send_lock:
            self._helper.conn.send(message)

    def _read(self) -> None:
        """Frames and replies from the helper, until it ends; then the end, for frames() (however
        the reading stopped: a session whose frames stop without it would never end)."""
        try:
            self._read_messages()
        finally:
            with self._answered:
                self._ended = True  # a speak waiting for its answer gets none now
                self._answered.notify_all()
            self._hand_on(None)

    def _read_messages(self) -> None:
        conn = self._helper.conn
        while True:
            try:
                msg = conn.recv()
            except (OSError, EOFError, TypeError):  # TypeError: closed under the read by close()
                return
            if isinstance(msg, FrameOut):
                self.late_frames = msg.late_frames
                with self._state_lock:
                    if msg.turn >= self._interrupts:  # not a frame made before an interrupt since sent
                        self.queued_s, self.speaking = msg.queued_s, msg.speaking
                picture = read_slot(self._ring, self._stamps, msg.slot, msg.stamp)
                behind = picture is None and self._picture is not None
                if picture is None:
                    if self._picture is not None:
                        # this reader fell a whole ring behind (a stalled process): the frame shows
                        # the picture before it, its sound is kept; said once for each such stall
                        if not self._behind:
                            log.warning("live frame %d: the reader fell behind; pictures repeat", msg.index)
                        picture = self._picture
                    else:  # the first frame: no picture before it to show
                        picture = np.array(self._ring[msg.slot])
                self._picture, self._behind = picture, behind
                frame = self._frame_cls(
                    msg.index,
                    msg.time_s,
                    picture,
                    msg.audio,
                    msg.speaking,
                    msg.opening,
                    msg.blink,
                    msg.rendered,
                    msg.due_at,
                    i420=True,
                )
                self._hand_on(frame)
            elif isinstance(msg, Queued):
                # what the helper holds now: the state read right after a speak shows it (the
                # next frame, or the connection, may be a while away); not an answer from before
                # an interrupt since sent (the helper's turn counts the interrupts it has had)
                with self._state_lock:
                    if msg.turn >= self._interrupts:
                        self.queued_s = float(msg.seconds)
                        self.speaking = self.speaking or self.queued_s > 0
                with self._answered:
                    self._answers[msg.seq] = msg
                    for late in [k for k in self._answers if k < msg.seq - ANSWERS_KEPT]:
                        del self._answers[late]  # answers whose caller gave up waiting
                    self._answered.notify_all()
            elif isinstance(msg, Failed):
                self.failure = msg.message

    def _hand_on(self, item) -> None:
        """Into the frames' queue; when nobody is taking them (yet, or any more) the oldest goes,
        so that this thread never waits on a reader that is gone."""
        while True:
            try:
                self._frames.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._frames.get_nowait()
                except queue.Empty:
                    pass

    # --- a LiveSession's interface --------------------------------------------------------
    def speak(self, pcm: np.ndarray, turn: int | None = None) -> float:
        """LiveSession.speak, answered by the helper; OSError once the helper is gone."""
        return self.queue_speech(pcm, turn).queued_s

    def queue_speech(
        self, pcm: np.ndarray, turn: int | None = None, limit_s: float | None = None, whole: bool = False
    ) -> Spoken:
        """LiveSession.queue_speech, answered by the helper. Long speech goes in parts of
        SPEAK_PART_S: the socket is never held for long by one call (a microphone's 20 ms packets,
        sent on the connections' one loop, wait for it), and one call's parts go together (two
        calls at once were queued in alternate parts). `whole` holds across the parts: each part
        must leave room for the parts after it (the queue only shrinks meanwhile: the parts go
        together). The speech is checked here, as a LiveSession checks it: a bad chunk is refused
        to the caller, not raised in the helper, whose listening it would stop."""
        from .session import Spoken

        pcm = mono_samples(pcm)
        step = int(SPEAK_PART_S * SAMPLE_RATE)
        sent, replies = 0, []
        with self._speak_lock:
            pending = []
            for start in range(0, max(len(pcm), 1), step):
                after_s = max(0, len(pcm) - start - step) / SAMPLE_RATE
                limit = None if limit_s is None else limit_s - after_s if whole else limit_s
                seq = next(self._seq)
                self._send(Speak(pcm[start : start + step], turn, limit, whole, seq))
                sent = min(len(pcm), start + step)
                if not whole:
                    pending.append(seq)
                    continue
                replies.append(self._answer(seq))  # a part refused refuses the rest
                if replies[-1].dropped_s:
                    break
            replies += [self._answer(seq) for seq in pending]
        self.turn = replies[-1].turn
        dropped = sum(r.dropped_s for r in replies) + (len(pcm) - sent) / SAMPLE_RATE
        return Spoken(float(replies[-1].seconds), dropped)

    def _answer(self, seq: int) -> Queued:
        """The helper's answer to the Speak numbered `seq` (answers come in order)."""
        with self._answered:
            if not self._answered.wait_for(lambda: seq in self._answers or self._ended, REPLY_TIMEOUT_S):
                raise PipelineError("the live session's helper did not answer")
            if seq not in self._answers:  # as a send to it would, once it is gone
                raise BrokenPipeError("the live session's helper has stopped")
            return self._answers.pop(seq)

    def hear(self, pcm: np.ndarray) -> None:
        try:
            self._send(Hear(mono_samples(pcm)))
        except OSError:  # the helper is gone: the session is ending
            pass

    def interrupt(self) -> None:
        with self._state_lock:  # (a frame's report read before it is not applied after it)
            self._interrupts += 1
            # until the next frame's report: a session not yet connected (no frames) said
            # "speaking" with nothing queued
            self.queued_s, self.speaking = 0.0, False
        self._send(Interrupt())

    def frames(self, stop: threading.Event | None = None) -> Iterator:
        """The helper's frames as they come (its own clock paces them, from this call on, as a
        LiveSession's does), until `stop` or its end."""
        if not self._begun:
            self._begun = True
            try:
                self._send(Begin())
            except OSError:  # the helper is gone: the frames end at once
                self._hand_on(None)
        while stop is None or not stop.is_set():
            try:
                frame = self._frames.get(timeout=0.2)
            except queue.Empty:
                continue
            if frame is None:
                if self.failure:
                    log.error("a live session's helper failed: %s", self.failure)
                    raise PipelineError("the live session's helper failed (the log says why)")
                return
            yield frame

    def helper_ended(self) -> str:
        """How the helper process ended, for the log: a signal leaves no message (the kernel's
        out-of-memory killer sends 9)."""
        try:  # its socket closes as it dies, a moment before its exit status is there to read
            code = self._helper.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit status {code}"

    def close(self) -> None:
        self._helper.stop()
