"""Benchmark the pipeline on one portrait + recording: prints one JSON line.

usage: python scripts/benchmark.py --image IMG --audio AUD [--min-resolution 512] [--fps 25]
       [--repeat-audio N]   (loop the recording N times, e.g. to measure memory on 60 s)
       [--threads N]        (render threads; default: the configured setting)

Models load before the clock starts (a server loads them once); `wall_s` covers one request:
decode, face, audio, motion, decoder set-up, render and encode. rtf = wall_s / audio_s.
In the same run, the output's own frames are written to a raw file and re-encoded with the
writer's exact settings (x264 and AAC): `encode_only_s`, and `ratio` = wall_s / encode_only_s,
the whole pipeline in units of what encoding alone costs on this machine right now.
`peak_rss_mb` is this process; `ffmpeg_peak_rss_mb` the largest ffmpeg child of the request.
Time only on a quiet machine (`uptime`: load below 0.5), or say what else was running.
"""
import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--min-resolution", type=int, default=512)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--repeat-audio", type=int, default=1)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()

    from sonic import load_pipeline
    from sonic.media import FFMPEG, SAMPLE_RATE, load_audio
    from sonic.options import load_config
    from sonic.writer import encoder_command

    cfg = load_config()
    if a.threads:
        cfg["threads"] = a.threads
    t0 = time.perf_counter()
    pipe = load_pipeline(cfg)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        audio = a.audio
        if a.repeat_audio > 1:
            wav = load_audio(a.audio, 3600)
            audio = str(Path(tmp) / "repeated.wav")
            sf.write(audio, np.tile(wav, a.repeat_audio), SAMPLE_RATE)
        opts = pipe.options({"min_resolution": a.min_resolution, "fps": a.fps})
        out = Path(tmp) / "bench.mp4"
        t0 = time.perf_counter()
        res = pipe(a.image, audio, opts, out_path=out)
        wall = time.perf_counter() - t0
        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        # the same frames and audio, encoded alone with the writer's settings
        raw, wav_path = Path(tmp) / "frames.rgb", Path(tmp) / "audio.wav"
        subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-i", str(out), "-f", "rawvideo",
                        "-pix_fmt", "rgb24", str(raw), "-map", "0:a:0", "-ar", str(SAMPLE_RATE), "-ac", "1",
                        str(wav_path)], check=True)
        cmd = encoder_command(raw, res.width, res.height, res.fps, wav_path, res.duration, Path(tmp) / "again.mp4")
        with open(raw, "rb") as f:       # in the page cache, as the pipeline's frames were in memory
            while f.read(1 << 24):
                pass
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        encode_only = time.perf_counter() - t0
    audio_s = res.duration
    print(json.dumps({
        "image": Path(a.image).name, "audio": Path(a.audio).name, "audio_s": round(audio_s, 2),
        "width": res.width, "height": res.height, "fps": res.fps, "frames": res.frames,
        "wall_s": round(wall, 2), "rtf": round(wall / audio_s, 3), "ms_per_frame": round(1000 * wall / res.frames, 1),
        "encode_only_s": round(encode_only, 2), "ratio": round(wall / encode_only, 2),
        "peak_rss_mb": round(peak_self, 1), "ffmpeg_peak_rss_mb": round(peak_children, 1),
        "rss_after_load_mb": round(rss_loaded, 1), "model_load_s": round(load_s, 2),
        "stages_s": res.timings, "device": str(pipe.device), "threads": pipe.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
