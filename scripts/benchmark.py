"""Benchmark the pipeline on one portrait + recording: prints one JSON line.

usage: python scripts/benchmark.py --image IMG --audio AUD [--min-resolution 512] [--fps 25]
       [--repeat-audio N]   (loop the recording N times, e.g. to measure memory on 60 s)
       [--render-processes N] (render helper processes; default: the configured setting)
       [--runs N]           (repeat the request N times; the figures of the median run by wall time)

Models load before the clock starts (a server loads them once); `wall_s` covers one request:
decode, face, audio, motion, decoder set-up, render and encode. rtf = wall_s / audio_s.
In the same run, the output's own frames are written to a raw file (yuv420p, the format the
writer hands ffmpeg) and re-encoded with the writer's exact settings (x264 and AAC): `encode_only_s`, and `ratio` = wall_s / encode_only_s,
the whole pipeline in units of what encoding alone costs on this machine right now.
`peak_rss_mb` is this process; `ffmpeg_peak_rss_mb` the largest ffmpeg child of the request;
`helpers_peak_rss_mb` each render helper process; `all_processes_peak_mb` their sum (an upper
bound: the peaks need not coincide).
Time only on a quiet machine (`uptime`: load below 0.5), or say what else was running.
"""
import argparse
import json
import os
import resource
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf



def measure(pipe, image, audio, opts, tmp: Path):
    """One request, then its own frames re-encoded alone -> (result, wall_s, encode_only_s,
    peak RSS of this process MB, peak RSS of the request's ffmpeg MB)."""
    from sonic.media import FFMPEG, SOUND_RATE
    from sonic.writer import encoder_command

    out = tmp / "bench.mp4"
    watcher = ChildMemory()
    t0 = time.perf_counter()
    res = pipe(image, audio, opts, out_path=out)
    wall = time.perf_counter() - t0
    peak_children = watcher.stop()   # (ffmpeg MB, [each render helper MB])
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw, wav_path = tmp / "frames.yuv", tmp / "audio.wav"
    subprocess.run([FFMPEG, "-nostdin", "-y", "-loglevel", "error", "-i", str(out), "-f", "rawvideo",
                    "-pix_fmt", "yuv420p", str(raw), "-map", "0:a:0", "-ar", str(SOUND_RATE), "-ac", "2",
                    str(wav_path)], check=True)
    cmd = encoder_command(raw, res.width, res.height, res.fps, wav_path, res.duration, tmp / "again.mp4")
    with open(raw, "rb") as f:       # in the page cache, as the pipeline's frames were in memory
        while f.read(1 << 24):
            pass
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    encode_only = time.perf_counter() - t0
    raw.unlink()
    return res, wall, encode_only, peak_self, peak_children


class ChildMemory:
    """Peak resident memory (VmHWM) of this process's children, polled every 50 ms: the largest
    ffmpeg, and each render helper process (python) on its own."""

    def __init__(self):
        self.peak_kb = 0
        self.helpers_kb: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        me = os.getpid()
        while not self._stop.wait(0.05):
            for task in Path(f"/proc/{me}/task").iterdir():
                try:
                    kids = (task / "children").read_text().split()
                except OSError:
                    continue
                for pid in kids:
                    try:
                        status = Path(f"/proc/{pid}/status").read_text().splitlines()
                    except OSError:
                        continue
                    name = status[0].split(":", 1)[1].strip()
                    for line in status:
                        if line.startswith("VmHWM:"):
                            kb = int(line.split()[1])
                            if name.startswith("ffmpeg"):
                                self.peak_kb = max(self.peak_kb, kb)
                            else:
                                self.helpers_kb[pid] = max(self.helpers_kb.get(pid, 0), kb)

    def stop(self) -> tuple[float, list[float]]:
        self._stop.set()
        self._thread.join()
        return self.peak_kb / 1024, sorted(round(kb / 1024, 1) for kb in self.helpers_kb.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--min-resolution", type=int, default=512)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--repeat-audio", type=int, default=1)
    ap.add_argument("--render-processes", type=int, help="render helper processes (0: render in this process)")
    ap.add_argument("--runs", type=int, default=1)
    a = ap.parse_args()

    from sonic import load_pipeline
    from sonic.media import SAMPLE_RATE, load_audio
    from sonic.settings import load_settings

    settings = load_settings(flags={"render_processes": a.render_processes})
    t0 = time.perf_counter()
    pipe = load_pipeline(settings)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        audio = a.audio
        if a.repeat_audio > 1:
            wav = load_audio(a.audio, 3600)
            audio = str(Path(tmp) / "repeated.wav")
            sf.write(audio, np.tile(wav, a.repeat_audio), SAMPLE_RATE)
        opts = pipe.options({"min_resolution": a.min_resolution, "fps": a.fps})
        runs = [measure(pipe, a.image, audio, opts, Path(tmp)) for _ in range(a.runs)]
    runs.sort(key=lambda r: r[1])
    res, wall, encode_only, peak_self, (peak_ffmpeg, peak_helpers) = runs[len(runs) // 2]
    audio_s = res.duration
    print(json.dumps({
        "image": Path(a.image).name, "audio": Path(a.audio).name, "audio_s": round(audio_s, 2),
        "width": res.width, "height": res.height, "fps": res.fps, "frames": res.frames,
        "wall_s": round(wall, 2), "rtf": round(wall / audio_s, 3), "ms_per_frame": round(1000 * wall / res.frames, 1),
        "encode_only_s": round(encode_only, 2), "ratio": round(wall / encode_only, 2),
        "peak_rss_mb": round(peak_self, 1), "ffmpeg_peak_rss_mb": round(peak_ffmpeg, 1),
        "helpers_peak_rss_mb": peak_helpers,
        "all_processes_peak_mb": round(peak_self + peak_ffmpeg + sum(peak_helpers), 1),
        "rss_after_load_mb": round(rss_loaded, 1), "model_load_s": round(load_s, 2),
        "stages_s": res.timings, "device": str(pipe.device), "render_processes": pipe.render_processes,
        "runs": a.runs, "wall_s_all": [round(r[1], 2) for r in runs], "ratio_all": [round(r[1] / r[2], 2) for r in runs],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
