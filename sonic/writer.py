"""MP4 writer: frames streamed into the bundled ffmpeg (H.264 yuv420p + AAC, +faststart).

Frames arrive as RGB and go to ffmpeg already in yuv420p (BT.601, limited range: what ffmpeg's
own conversion makes, to within 0.02 levels of luma on average): OpenCV converts a 512 px frame
in ~0.15 ms, where ffmpeg's conversion took about a third of the encoder's time, and the pipe
carries half the bytes.

The file appears under its final name only when complete: it is written as a hidden temporary
sibling and renamed; any failure removes the temporary file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import secrets
import subprocess
import tempfile
import threading
import wave
from pathlib import Path

import cv2
import numpy as np

from .errors import DiskFull, PipelineError
from .media import FFMPEG, ffmpeg_not_started
from .memory import expendable
from .sound import Sound

X264_PRESET = "veryfast"
X264_CRF = 20
PIPE_BYTES = 1 << 20  # ffmpeg's stdin pipe (Linux allows up to 1 MiB unprivileged by default)
QUEUED_BATCHES = 2  # rendered batches waiting for the encoder at most (memory: ~2 x 8 frames)
# a run's files, ".NAME.RUN" + each beside the output: the video, its sound, the video with its sound moved
PART, WAV_PART, REMUX_PART = ".part", ".wav.part", ".part.remux"
PART_SUFFIXES = (PART, WAV_PART, REMUX_PART)
RUN_DIGITS = 11  # a run's name, in hex: 6 of its process id, 5 random (two writes of one output: two names)
FEED_POLL_S = 0.2  # how often a feeder with nothing to write looks whether the write was given up
ABANDON_WAIT_S = 2.0  # an interrupted write waits this long at most for its feeder thread
X264_THREADS = 1  # the encoder runs beside the render: one core each on a 2-core machine
AAC_BITRATE = "128k"


def encoder_command(
    frames: str | Path, width: int, height: int, fps: int, wav: str | Path, duration: float, out: str | Path
) -> list[str]:
    """ffmpeg arguments that encode raw yuv420p frames (a file, or "-" for stdin; see `to_yuv420p`)
    and a WAV into an MP4."""
    return [
        FFMPEG,
        "-nostdin",
        "-y",
        "-loglevel",
        "error",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "yuv420p",
        "-s",
        f"{width}x{height}",
        "-r",
        str(fps),
        "-i",
        str(frames),
        "-i",
        str(wav),
        "-map",
        "0:v:0",
        "-map",
        "1:a:0",
        "-c:v",
        "libx264",
        "-threads",
        str(X264_THREADS),
        "-preset",
        X264_PRESET,
        "-crf",
        str(X264_CRF),
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-b:a",
        AAC_BITRATE,
        "-t",
        f"{duration:.4f}",
        "-movflags",
        "+faststart",
        "-f",
        "mp4",
        str(out),
    ]


def to_yuv420p(frames: np.ndarray) -> np.ndarray:
    """RGB frames (B, H, W, 3) uint8, H and W even -> planar yuv420p (B, H * 3 // 2, W)."""
    out = np.empty((len(frames), frames.shape[1] * 3 // 2, frames.shape[2]), np.uint8)
    for i, f in enumerate(frames):
        cv2.cvtColor(f, cv2.COLOR_RGB2YUV_I420, dst=out[i])
    return out


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM (N, C) into a WAV file; a full disk raises OSError(ENOSPC) (libsndfile's own
    writer reported it as an error without a number)."""
    with open(path, "wb") as f, wave.open(f, "wb") as w:  # opened first: a folder that refuses it leaves no writer
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, "<i2").tobytes())


def write_error(e: Exception) -> PipelineError:
    """No space, no permission: say what went wrong, not where (a full disk as `DiskFull`)."""
    message = f"cannot write the video: {getattr(e, 'strerror', None) or type(e).__name__}"
    return DiskFull(message) if getattr(e, "errno", None) == errno.ENOSPC else PipelineError(message)


def _encoder_error(message: str) -> PipelineError:
    """ffmpeg's failure; a full disk (its message says so) as `DiskFull`."""
    return DiskFull(message) if os.strerror(errno.ENOSPC) in message else PipelineError(message)


def part_path(path: Path, run: str, suffix: str) -> Path:
    """One of a run's own files (PART_SUFFIXES): a hidden sibling of the output, named after it
    and the run. Two writes of one output (two CLIs given the same --out) shared one name: each
    removed or cut the other's file, and the one that finished reported a video with no streams."""
    return path.with_name(f".{path.name}.{run}{suffix}")


def new_run() -> str:
    """A run's name (RUN_DIGITS hex digits): this process's id and a random part."""
    return f"{os.getpid() & 0xFFFFFF:06x}{secrets.token_hex(3)[:5]}"


class VideoWriter:
    """Context manager: `write(frames (B, H, W, 3) uint8)` repeatedly, then the file is finalised."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int, sound: Sound, duration: float):
        self.path = Path(path)
        self.width, self.height, self.fps, self.duration = width, height, fps, duration
        self.sound = sound
        self.frames_written = 0
        self.audio_delay_s = 0.0  # set before the end: the audio track is moved this much later (< 0: earlier)

    def __enter__(self) -> "VideoWriter":
        # every file of a run is a hidden ".part" sibling of the output (a restarted service
        # sweeps those) or an anonymous temporary file (gone with the process, however it ends)
        run = new_run()
        self.tmp_path = part_path(self.path, run, PART)
        self._wav_path = part_path(self.path, run, WAV_PART)
        self._remux_path = part_path(self.path, run, REMUX_PART)
        self._log = tempfile.TemporaryFile()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_wav(self._wav_path, self.sound.samples, self.sound.rate)
        except (OSError, RuntimeError) as e:
            self._cleanup()
            raise write_error(e) from e
        except BaseException:  # ^C or SIGTERM while the sound is written: __exit__ will not run
            self._cleanup()
            raise
        try:  # (the command made inside too: a signal can land at any call, and the sound is written)
            cmd = encoder_command("-", self.width, self.height, self.fps, self._wav_path, self.duration, self.tmp_path)
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)
            expendable(self._proc.pid)
        except OSError as e:
            self._cleanup()
            raise ffmpeg_not_started(e) from e
        except BaseException:
            self._cleanup()
            raise
        try:
            self._start_feeder()
        except BaseException:  # ^C or SIGTERM before the feeder runs: ffmpeg would go on writing
            self._proc.kill()
            self._proc.wait()
            self.tmp_path.unlink(missing_ok=True)
            self._cleanup()
            raise
        return self

    def _start_feeder(self) -> None:
        """Frames go to ffmpeg from a feeder thread, so that rendering the next batch overlaps
        encoding this one (a blocked pipe write releases the GIL)."""
        assert self._proc.stdin is not None  # stdin=PIPE
        try:  # a larger pipe: fewer switches between the render and the encoder
            fcntl.fcntl(self._proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (AttributeError, OSError):
            pass
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        self._feed_error: Exception | None = None
        self._abandoned = threading.Event()  # the write was given up: the feeder stops at its next look
        self._feeder = threading.Thread(target=self._feed, name="video-writer", daemon=True)
        self._feeder.start()

    def _feed(self) -> None:
        assert self._proc.stdin is not None  # stdin=PIPE
        while True:
            try:
                frames = self._queue.get(timeout=FEED_POLL_S)
            except queue.Empty:
                if self._abandoned.is_set():
                    return
                continue
            if frames is None:
                return
            if self._feed_error is None:
                try:
                    self._proc.stdin.write(memoryview(frames).cast("B"))
                except (BrokenPipeError, OSError, ValueError) as e:
                    self._feed_error = e  # reported by the next write() or at the end

    def write(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames of shape {frames.shape} do not match {self.width}x{self.height}")
        if self._feed_error is not None:
            raise _encoder_error(f"video encoder stopped: {self._stderr()}") from self._feed_error
        self._queue.put(to_yuv420p(frames))
        self.frames_written += len(frames)

    def _move_audio(self, delay_s: float) -> None:
        """Put the audio back `delay_s` later (silence before it) or earlier, beside the finished
        video stream (copied, not encoded again)."""
        shift = int(round(delay_s * self.sound.rate))
        audio = self.sound.samples
        silence = np.zeros((abs(shift), *audio.shape[1:]), audio.dtype)
        audio = (
            np.concatenate([silence, audio])[: len(audio)] if shift > 0 else np.concatenate([audio[-shift:], silence])
        )
        out = self._remux_path
        try:
            write_wav(self._wav_path, audio, self.sound.rate)
        except (OSError, RuntimeError) as e:
            raise write_error(e) from e
        cmd = [
            FFMPEG,
            "-nostdin",
            "-y",
            "-loglevel",
            "error",
            "-i",
            str(self.tmp_path),
            "-i",
            str(self._wav_path),
            "-map",
            "0:v:0",
            "-map",
            "1:a:0",
            "-c:v",
            "copy",
            "-c:a",
            "aac",
            "-b:a",
            AAC_BITRATE,
            "-t",
            f"{self.duration:.4f}",
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
            str(out),
        ]
        try:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as e:  # out of file handles or processes: said, as the encoder's start is
            raise ffmpeg_not_started(e) from e
        if r.returncode != 0:
            msg = (r.stderr.decode("utf-8", "replace").strip().splitlines() or ["no message"])[-1]
            raise _encoder_error(f"moving the audio failed: {msg.replace(str(out.parent) + os.sep, '')}")
        os.replace(out, self.tmp_path)

    def _stop_feeder(self) -> None:
        self._queue.put(None)
        self._feeder.join()

    def _abandon_feeder(self) -> None:
        """^C, SIGTERM or an error mid-write, ffmpeg killed: the feeder is told by a flag, not
        through the queue, and waited for a moment only. A ^C that lands inside the queue's own
        bookkeeping can leave it unusable (seen: 2 of 15 ^C on a busy machine hung the CLI in
        the join); the feeder is a daemon thread, and is left to the exit."""
        self._abandoned.set()
        self._feeder.join(ABANDON_WAIT_S)

    def _stderr(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        code = self._proc.poll()
        # a signal leaves no message (the kernel's out-of-memory killer: 9)
        line = lines[-1] if lines else f"killed by signal {-code}" if code is not None and code < 0 else "no message"
        line = line.replace(str(self.tmp_path.parent) + os.sep, "")  # messages name no server paths
        return line

    def _cleanup(self) -> None:
        self._log.close()
        try:
            self._wav_path.unlink(missing_ok=True)
        except OSError:  # a folder that cannot be written (read-only, a file): nothing was left there
            pass

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._stop_feeder()
                if self._feed_error is not None and self._proc.wait() == 0:
                    raise _encoder_error(f"video encoder stopped: {self._stderr()}") from self._feed_error
                assert self._proc.stdin is not None  # stdin=PIPE
                try:
                    self._proc.stdin.close()
                except OSError:  # ffmpeg already gone: its exit status says why
                    pass
                rc = self._proc.wait()
                if rc != 0:
                    raise _encoder_error(f"video encoder failed (exit {rc}): {self._stderr()}")
                if abs(self.audio_delay_s) * self.sound.rate >= 1:
                    self._move_audio(self.audio_delay_s)
                try:
                    os.replace(self.tmp_path, self.path)
                except OSError as e:
                    raise write_error(e) from e
            else:
                self._proc.kill()  # a feeder blocked on the pipe fails and drains
                self._abandon_feeder()
                self._proc.wait()
        finally:
            if self._proc.stdin and not self._proc.stdin.closed:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
            for path in (self.tmp_path, self._remux_path):
                if path.exists():
                    path.unlink()
            self._cleanup()
