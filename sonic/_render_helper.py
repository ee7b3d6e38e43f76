"""A render helper process (see render_pool.py): `python -m sonic._render_helper FD`.

Reads ("render", key, decoder_path, frames_path, slot, coeffs, head) from the socket FD, renders
the batch into slot `slot` of the frames file (a .npy mapped into memory) and answers
("ok", number of frames) or ("error", message). ("phones", waveform) answers ("ok", timed
phones) from pocketsphinx (loaded on first use). The decoder and frames file of the latest
request are kept until ("release",) (no answer) drops them: in /dev/shm, a mapped file holds
its memory even once deleted. End of file on the socket (the parent closed it or exited) ends
the process.
"""

import pickle
import signal
import sys
from multiprocessing.connection import Connection

from sonic.memory import give_back_memory


def main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    import cv2
    import numpy as np

    cv2.setNumThreads(1)
    import sonic.decoder  # noqa: F401  (the warp decoder's modules, loaded before the first request)

    conn = Connection(fd)
    current_key, dec, buf, recognizer = None, None, None, None
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "release":  # the request is over: its decoder and frames go
            current_key, dec, buf = None, None, None
            give_back_memory()
            continue
        try:
            if msg[0] == "phones":
                if recognizer is None:
                    from sonic.audio_features import PhoneRecognizer

                    recognizer = PhoneRecognizer()
                phones = recognizer(msg[1])
                give_back_memory()  # pocketsphinx's ~30 MB decoder is freed: return it
                conn.send(("ok", phones))
                continue
            _, key, path, frames_path, slot, coeffs, head = msg
            if key != current_key:
                dec = buf = None  # the last request's decoder and frames go first
                with open(path, "rb") as f:
                    dec = pickle.load(f)
                buf = np.load(frames_path, mmap_mode="r+")
                current_key = key
            assert dec is not None and buf is not None  # loaded above for this request's key
            dec.render(coeffs, head, out=buf[slot, : len(coeffs)])
        except (EOFError, OSError):
            return
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the request
            answer: tuple[str, str | int] = ("error", f"{type(e).__name__}: {e}")
        else:
            answer = ("ok", len(coeffs))
        try:
            conn.send(answer)
        except OSError:
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
