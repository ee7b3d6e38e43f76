"""Benchmark the pipeline on one portrait + recording: prints one JSON line.

usage: python scripts/benchmark.py --image IMG --audio AUD [--min-resolution 512] [--fps 25]
       [--repeat-audio N]   (loop the recording N times, e.g. to measure memory on 60 s)

Models load before the clock starts (a server loads them once); `wall_s` covers one request:
decode, face, audio, motion, decoder set-up, render and encode. rtf = wall_s / audio_s.
"""
import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--min-resolution", type=int, default=512)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--repeat-audio", type=int, default=1)
    a = ap.parse_args()

    import torch
    from sonic import load_pipeline
    from sonic.media import SAMPLE_RATE, load_audio

    t0 = time.perf_counter()
    pipe = load_pipeline()
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory() as tmp:
        audio = a.audio
        if a.repeat_audio > 1:
            wav = load_audio(a.audio, 3600)
            audio = str(Path(tmp) / "repeated.wav")
            sf.write(audio, np.tile(wav, a.repeat_audio), SAMPLE_RATE)
        opts = pipe.options({"min_resolution": a.min_resolution, "fps": a.fps})
        t0 = time.perf_counter()
        res = pipe(a.image, audio, opts, out_path=Path(tmp) / "bench.mp4")
        wall = time.perf_counter() - t0
    audio_s = res.duration
    print(json.dumps({
        "image": Path(a.image).name, "audio": Path(a.audio).name, "audio_s": round(audio_s, 2),
        "width": res.width, "height": res.height, "fps": res.fps, "frames": res.frames,
        "wall_s": round(wall, 2), "rtf": round(wall / audio_s, 3), "ms_per_frame": round(1000 * wall / res.frames, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_after_load_mb": round(rss_loaded, 1), "model_load_s": round(load_s, 2),
        "stages_s": res.timings, "device": str(pipe.device), "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
