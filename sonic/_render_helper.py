"""A render helper process (see render_pool.py): `python -m sonic._render_helper FD`.

Reads requests from the socket FD and answers each (sonic/render_messages.py): a `RenderBatch`
is rendered into its slot of the frames file (a .npy mapped into memory) and answered
`Rendered`; `RecognisePhones` is answered `Phones` from pocketsphinx (loaded on first use); an
exception in either is answered `Failed`. The decoder and frames file of the latest request are
kept until `Release` (no answer) drops them: in /dev/shm, a mapped file holds its memory even
once deleted. End of file on the socket (the parent closed it or exited) ends the process.
"""

from __future__ import annotations

import pickle
import signal
import sys
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

from sonic.memory import give_back_memory
from sonic.render_messages import Answer, Failed, Phones, RecognisePhones, Release, RenderBatch, Rendered

if TYPE_CHECKING:
    from sonic.audio_features import PhoneRecognizer


class _Request:
    """The decoder and frames file of the request being rendered."""

    def __init__(self, batch: RenderBatch):
        self.key = batch.request
        with open(batch.decoder_path, "rb") as f:
            self.decoder: Any = pickle.load(f)  # a PreparedDecoder (sonic/decoders/__init__.py)
        self.frames: np.ndarray = np.load(batch.frames_path, mmap_mode="r+")

    def render(self, batch: RenderBatch) -> Rendered:
        n = len(batch.coeffs)
        self.decoder.render(batch.coeffs, batch.head, out=self.frames[batch.slot, :n])
        return Rendered(n)


class _Helper:
    """This process's state between messages: the current request, and the recogniser once used."""

    def __init__(self) -> None:
        self.request: _Request | None = None
        self.recognizer: PhoneRecognizer | None = None

    def release(self) -> None:
        self.request = None
        give_back_memory()

    def render(self, batch: RenderBatch) -> Rendered:
        if self.request is None or self.request.key != batch.request:
            self.request = None  # the last request's decoder and frames go first
            self.request = _Request(batch)
        return self.request.render(batch)

    def phones(self, ask: RecognisePhones) -> Phones:
        if self.recognizer is None:
            from sonic.audio_features import PhoneRecognizer

            self.recognizer = PhoneRecognizer()
        phones = self.recognizer(ask.wav)
        give_back_memory()  # pocketsphinx's ~30 MB decoder is freed: return it
        return Phones(phones)

    def answer(self, msg: RenderBatch | RecognisePhones) -> Answer:
        try:
            return self.render(msg) if isinstance(msg, RenderBatch) else self.phones(msg)
        except (EOFError, OSError):
            # files of the request that cannot be read (a truncated decoder, the scratch folder
            # gone) end this helper: the parent reports a lost helper and starts fresh ones
            raise
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the request
            return Failed(f"{type(e).__name__}: {e}")


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import cv2

    cv2.setNumThreads(1)
    import sonic.decoders.warp.decoder  # noqa: F401  (the warp decoder's modules, loaded before the first request)

    conn = Connection(fd)
    helper = _Helper()
    while True:
        try:
            msg = conn.recv()
            if isinstance(msg, Release):  # the request is over: its decoder and frames go
                helper.release()
                continue
            conn.send(helper.answer(msg))
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
