"""A live session's helper process (see process.py): `python -m sonic.live._helper FD`.

Imports the engine at once (a spare helper is started ahead of its session), then waits for
`Start` on the socket FD: the prepared face, the options and the frames ring. It answers
`Queued(0)` when ready, and on `Begin` runs the session on its own clock: each frame's image
goes into its slot of the ring and the rest is sent as `FrameOut`. A reader thread applies
`Speak` (answered `Queued`), `Hear` and `Interrupt` as they come, before `Begin` too (speech
queued before the client connects waits for it). End of file on the socket ends it.
"""

from __future__ import annotations

import signal
import sys
import threading
from multiprocessing.connection import Connection

import cv2
import numpy as np

from sonic.live.process import SLOTS, Begin, Failed, FrameOut, Hear, Interrupt, Queued, Speak, Start
from sonic.live.session import LiveSession


def _listen(conn: Connection, session: LiveSession, send, begin: threading.Event, stop: threading.Event) -> None:
    """Speech from the parent, applied as it comes; `Begin` starts the clock; end of file stops
    the session."""
    while True:
        try:
            msg = conn.recv()
        except (OSError, EOFError):
            break
        if isinstance(msg, Hear):
            session.hear(msg.pcm)
        elif isinstance(msg, Speak):
            spoken = session.queue_speech(msg.pcm, msg.turn, msg.limit_s, msg.whole)
            send(Queued(spoken.queued_s, session.turn, msg.seq, spoken.dropped_s))
        elif isinstance(msg, Interrupt):
            session.interrupt()
        elif isinstance(msg, Begin):
            begin.set()
    stop.set()
    begin.set()


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it (a terminal's ^C reaches both)
    # one thread: the sessions' processes are the parallelism (OpenCV's pool would start a thread
    # per core, for work too small to share: 40 % more CPU for the same frames)
    cv2.setNumThreads(1)
    conn = Connection(fd)
    try:
        start = conn.recv()
    except (OSError, EOFError):
        return
    assert isinstance(start, Start)
    lock = threading.Lock()

    def send(message: object) -> None:
        with lock:
            conn.send(message)

    try:
        session = LiveSession(start.face, start.options)  # type: ignore[arg-type]
        ring = np.load(start.frames_path, mmap_mode="r+")
        stamps = np.load(start.stamps_path, mmap_mode="r+")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the request
        send(Failed(f"{type(e).__name__}: {e}"))
        return
    begin, stop = threading.Event(), threading.Event()
    threading.Thread(target=_listen, args=(conn, session, send, begin, stop), daemon=True).start()
    send(Queued(0.0))
    begin.wait()
    turn = session.turn  # each frame is made after this is read: in this turn, or a later one
    try:
        for n, frame in enumerate(session.frames(stop)):
            slot = n % SLOTS
            stamps[slot] = -1  # being written (process.read_slot)
            ring[slot] = frame.yuv420()  # converted here, beside the render, not in the encoder's process
            stamps[slot] = n
            send(
                FrameOut(
                    frame.index,
                    frame.time_s,
                    frame.due_at,
                    slot,
                    frame.audio,
                    frame.speaking,
                    frame.opening,
                    frame.blink,
                    frame.rendered,
                    session.queued_s,
                    session.late_frames,
                    stamp=n,
                    turn=turn,
                )
            )
            turn = session.turn
    except (OSError, EOFError):
        pass  # the parent is gone
    except Exception as e:  # noqa: BLE001
        try:
            send(Failed(f"{type(e).__name__}: {e}"))
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]))
