"""MP4 writer: frames streamed into the bundled ffmpeg (H.264 yuv420p + AAC, +faststart).

The file appears under its final name only when complete: it is written as a hidden temporary
sibling and renamed; any failure removes the temporary file.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import PipelineError
from .media import FFMPEG, SAMPLE_RATE

X264_PRESET = "veryfast"
X264_CRF = 20
AAC_BITRATE = "128k"


class VideoWriter:
    """Context manager: `write(frames (B, H, W, 3) uint8)` repeatedly, then the file is finalised."""

    def __init__(self, path: str | Path, width: int, height: int, fps: int, audio: np.ndarray, duration: float):
        self.path = Path(path)
        self.width, self.height, self.fps, self.duration = width, height, fps, duration
        self.audio = audio
        self.frames_written = 0

    def __enter__(self) -> "VideoWriter":
        self.tmp_path = self.path.with_name(f".{self.path.name}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmpdir = tempfile.TemporaryDirectory(prefix="sonic-")
            wav = os.path.join(self._tmpdir.name, "audio.wav")
            sf.write(wav, self.audio, SAMPLE_RATE, subtype="PCM_16")
        except OSError as e:        # no space, no permission: say what, not where
            if getattr(self, "_tmpdir", None):
                self._tmpdir.cleanup()
            raise PipelineError(f"cannot write the video: {e.strerror or type(e).__name__}") from e
        self._log = open(os.path.join(self._tmpdir.name, "ffmpeg.log"), "w+b")
        cmd = [FFMPEG, "-nostdin", "-y", "-loglevel", "error",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}",
               "-r", str(self.fps), "-i", "-", "-i", wav, "-map", "0:v:0", "-map", "1:a:0",
               "-c:v", "libx264", "-preset", X264_PRESET, "-crf", str(X264_CRF), "-pix_fmt", "yuv420p",
               "-c:a", "aac", "-b:a", AAC_BITRATE, "-t", f"{self.duration:.4f}",
               "-movflags", "+faststart", "-f", "mp4", str(self.tmp_path)]
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)
        except OSError as e:
            self._cleanup()
            raise PipelineError("ffmpeg could not be started") from e
        return self

    def write(self, frames: np.ndarray) -> None:
        if frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"frames of shape {frames.shape} do not match {self.width}x{self.height}")
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except (BrokenPipeError, OSError) as e:
            raise PipelineError(f"video encoder stopped: {self._stderr()}") from e
        self.frames_written += len(frames)

    def _stderr(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = self._log.read().decode("utf-8", "replace").strip().splitlines()
        line = lines[-1] if lines else "no message"
        for folder in (str(self.tmp_path.parent), self._tmpdir.name):   # messages name no server paths
            line = line.replace(folder + os.sep, "")
        return line

    def _cleanup(self) -> None:
        if getattr(self, "_log", None):
            self._log.close()
        self._tmpdir.cleanup()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._proc.stdin.close()
                rc = self._proc.wait()
                if rc != 0:
                    raise PipelineError(f"video encoder failed (exit {rc}): {self._stderr()}")
                try:
                    os.replace(self.tmp_path, self.path)
                except OSError as e:
                    raise PipelineError(f"cannot write the video: {e.strerror or type(e).__name__}") from e
            else:
                self._proc.kill()
                self._proc.wait()
        finally:
            if self._proc.stdin and not self._proc.stdin.closed:
                try:
                    self._proc.stdin.close()
                except OSError:
                    pass
            if self.tmp_path.exists():
                self.tmp_path.unlink()
            self._cleanup()
