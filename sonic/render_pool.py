"""Frames rendered in helper processes.

A frame's work is many small OpenCV and numpy calls; between them the calling thread holds
Python's interpreter lock, so two render threads in one process reach only ~1.15x one thread on
two cores, where two processes reach ~1.8x. The helpers are plain child processes
(`python -m sonic._render_helper`, see that module), started once with the pipeline: they import
only the decoder's modules, never re-run the caller's script (unlike multiprocessing's `spawn`),
and each talks to this process over its own socket. Per request the decoder (the resampled
photo and its fields, ~17 MB at 512 px) is handed over once through a file in a private
temporary folder (in /dev/shm where there is one), and the frames come back through a second
file there, mapped into memory by both sides: two slots per helper, so a helper renders its next
batch while this process copies out the last one (sending 8 MB batches through the socket
instead kept the helpers waiting on it: 1.3x in place of 1.8x). Batch i goes to helper i mod N,
so answers come back in order without any bookkeeping thread here. The messages both ways are
small typed dataclasses (render_messages.py). A caller with other work for a helper (phone
recognition, phones_pool.py) borrows one for a while with `lend`.

A helper that dies (killed, out of memory) fails the request with a `PipelineError`; the helpers
are started afresh for the next one. One request uses the helpers at a time; a request that
arrives while they are busy renders in its own thread instead. Helpers exit when this process
closes the pool or exits (their socket reaches end of file).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import PipelineError
from .memory import expendable
from .render_messages import Answer, Failed, RecognisePhones, Release, RenderBatch, Rendered

IN_FLIGHT_PER_HELPER = 2  # batches asked of each helper ahead (and its slots in the frames file)
CLOSE_WAIT_S = 1.0  # a closing pool waits this long for the request using its helpers
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


TMP_PREFIX = "sonic-render-"

# glibc's defaults hand a frame's freed temporaries (a few MB each) back to the kernel, and the
# next frame faults the same pages in again: 440 000 page faults and 1.7 CPU-seconds of system
# time in the helpers of one 12 s request at 512 px. Keeping freed memory in the heap (no trim
# below 1 GB; blocks up to 32 MB, glibc's largest threshold, from the heap rather than their own
# mapping) cuts that to 128 000 and 0.9 s at the same peak memory; a helper still returns its
# free pages when a request is over (give_back_memory).
HELPER_MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def scratch_root() -> str | None:
    """Where requests' frame files go: /dev/shm (memory) when it is writable, else the temp folder (None)."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def sweep_orphans(prefix: str = TMP_PREFIX) -> None:
    """Remove the temporary folders (named `<prefix><pid>-...`) of processes that died mid-request
    (kill -9): in /dev/shm they would hold their memory until the machine restarts."""
    root = Path(scratch_root() or tempfile.gettempdir())
    for d in root.glob(f"{prefix}*-*"):
        try:
            pid = int(d.name[len(prefix) :].split("-")[0])
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:  # another user's live process
            continue


class HelperProcess:
    """A child process `python -m <module> FD` that talks to this one over a socket (`conn`);
    it imports only what its module does, and exits when the socket reaches end of file. The
    render helpers and the live sessions' helpers (sonic/live/process.py) are started so."""

    def __init__(self, module: str = "sonic._render_helper"):
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        # one thread each: the helpers are the parallelism (spinning BLAS threads cost a third of a core)
        env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for name, value in HELPER_MALLOC_SETTINGS.items():
            env.setdefault(name, value)  # an operator's own settings win
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        expendable(self.proc.pid)
        self.conn = Connection(parent.detach())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        try:
            # shut down, then closed: a thread of this process still blocked reading the socket (a
            # live session's reader) kept it open past a close alone, and the helper read no end
            # of file: each stop waited its 2 s, then killed it
            with socket.socket(fileno=os.dup(self.conn.fileno())) as end:
                end.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.conn.close()  # the helper reads end of file and exits
        except OSError:
            pass
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def render_here(decoder, coeffs: np.ndarray, head: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Rendered batches of `batch` frames, in order, in the calling thread."""
    for start in range(0, len(coeffs), batch):
        yield decoder.render(coeffs[start : start + batch], head[start : start + batch])


class RenderPool:
    def __init__(self, processes: int):
        self.processes = max(1, int(processes))
        self._busy = threading.Lock()  # one request at a time uses the helpers
        self._helpers: list[HelperProcess] = []
        atexit.register(self._close_at_exit)

    def start(self) -> None:
        """Start the helpers (they import in the background, ~1 s, while the caller goes on)."""
        if not self._helpers or not all(h.alive() for h in self._helpers):
            sweep_orphans()
            self._stop_helpers()
            self._helpers = [HelperProcess() for _ in range(self.processes)]

    @contextlib.contextmanager
    def lend(self) -> Iterator[HelperLine | None]:
        """One helper for the caller's own requests, held (with the others) while the caller stays
        inside; None when another request is using the helpers. On leaving, the answers not yet
        read are read, so that the helper stays in step for the next request."""
        if not self._busy.acquire(blocking=False):
            yield None
            return
        line: HelperLine | None = None
        try:
            self.start()
            line = HelperLine(self, self._helpers[-1])
            yield line
        finally:
            try:
                if line is not None:
                    line.settle()
            finally:
                self._busy.release()

    def frames(self, decoder, coeffs: np.ndarray, head: np.ndarray, batch: int) -> Iterator[np.ndarray]:
        """Yield rendered batches of `batch` frames, in order (in this thread when the helpers
        are busy with another request)."""
        if not self._busy.acquire(blocking=False):
            yield from render_here(decoder, coeffs, head, batch)
            return
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=scratch_root()))
        asked: list[int] = [0] * self.processes  # answers each helper still owes
        try:
            self.start()
            helpers = self._helpers
            path = tmp / "decoder.pickle"
            with open(path, "wb") as f:
                pickle.dump(decoder, f, protocol=pickle.HIGHEST_PROTOCOL)
            key = uuid.uuid4().hex
            starts = list(range(0, len(coeffs), batch))
            slot_shape = (batch, *decoder.frame.shape)
            slots = len(helpers) * IN_FLIGHT_PER_HELPER
            buf_path = tmp / "frames.buf"
            buf = np.lib.format.open_memmap(buf_path, "w+", np.uint8, (slots, *slot_shape))
            sent = 0

            def ask_more() -> None:
                nonlocal sent
                while sent < len(starts) and asked[sent % len(helpers)] < IN_FLIGHT_PER_HELPER:
                    s = starts[sent]
                    k = sent % len(helpers)
                    helpers[k].conn.send(
                        RenderBatch(
                            key, str(path), str(buf_path), sent % slots, coeffs[s : s + batch], head[s : s + batch]
                        )
                    )
                    asked[k] += 1
                    sent += 1

            for i in range(len(starts)):
                ask_more()
                k = i % len(helpers)
                asked[k] -= 1
                n = self._answer(helpers[k])
                yield buf[i % slots, :n].copy()  # the slot is asked to render again next
        except (EOFError, OSError) as e:
            raise self._lost(e) from e
        finally:
            try:
                self._drain(asked)
                for h in self._helpers:
                    with contextlib.suppress(OSError):
                        h.conn.send(Release())
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                self._busy.release()

    @staticmethod
    def _answer(helper: HelperProcess) -> int:
        """The number of frames the helper rendered into its slot."""
        answer = helper.conn.recv()
        if isinstance(answer, Failed):
            raise PipelineError(f"rendering failed: {answer.error}")
        assert isinstance(answer, Rendered)  # a helper answers RenderBatch with Rendered or Failed
        return answer.frames

    def _drain(self, asked: list[int]) -> None:
        """After a request ends early (cancelled, encoder failed), read the answers still owed,
        so that the next request starts in step; helpers that cannot be read are restarted."""
        try:
            for k, n in enumerate(asked):
                for _ in range(n):
                    if not self._helpers[k].conn.poll(10):
                        raise TimeoutError
                    self._helpers[k].conn.recv()
        except (EOFError, OSError, TimeoutError, IndexError):
            self._stop_helpers()

    def _lost(self, e: BaseException) -> PipelineError:
        self._stop_helpers()
        return PipelineError("a render process stopped unexpectedly; the request can be sent again")

    def _stop_helpers(self) -> None:
        helpers, self._helpers = self._helpers, []
        for h in helpers:
            h.stop()

    def pids(self) -> list[int]:
        return [h.proc.pid for h in self._helpers]

    def close(self) -> None:
        """Stop the helpers. A request using them gets CLOSE_WAIT_S to end, then they are
        stopped under it (it fails, as a killed helper's does): at the interpreter's exit a job
        still rendering held the exit, past docker's 10 s."""
        free = self._busy.acquire(timeout=CLOSE_WAIT_S)
        try:
            self._stop_helpers()
        finally:
            if free:
                self._busy.release()

    def _close_at_exit(self) -> None:
        """`close` at the interpreter's exit. A second ^C or SIGTERM while it waits (the CLI's
        SIGTERM is a KeyboardInterrupt) printed a traceback and left helpers running: they are
        killed at once instead."""
        helpers = list(self._helpers)
        try:
            self.close()
        except KeyboardInterrupt:
            for h in helpers:
                with contextlib.suppress(OSError):
                    h.proc.kill()


class HelperLine:
    """One render helper lent to a caller (`RenderPool.lend`): its requests go in order and the
    helper answers them in the same order."""

    def __init__(self, pool: RenderPool, helper: HelperProcess):
        self._pool, self._helper = pool, helper
        self._owed = 0  # answers asked for and not yet read

    def send(self, request: RecognisePhones) -> None:
        """Ask the helper; PipelineError (the helpers stopped) when it is gone."""
        try:
            self._helper.conn.send(request)
        except OSError as e:
            raise self._pool._lost(e) from e
        self._owed += 1

    def receive(self) -> Answer:
        """The next answer, waiting for it; PipelineError (the helpers stopped) when the helper
        dies first."""
        try:
            answer = self._helper.conn.recv()
        except (EOFError, OSError) as e:
            self._owed = 0  # a lost helper owes nothing
            raise self._pool._lost(e) from e
        self._owed -= 1
        return answer

    def settle(self) -> None:
        """Read (and drop) the answers still owed: the caller failed before it read them."""
        with contextlib.suppress(PipelineError):
            while self._owed:
                self.receive()
