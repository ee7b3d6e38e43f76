"""Time the warp decoder alone: every frame of one request rendered again in this process, one
thread, best of N rounds. Prints one JSON line.

usage: python scripts/bench_decoder.py --image IMG --audio AUD [--seed 42] [--rounds 5]

The request runs once with its frames rendered in this process; the decoder it prepared and the
motion it predicted are kept, and `render` over all of them is timed alone (no audio, motion or
encoding). To compare two versions of the decoder, run the script from this checkout with
`PYTHONPATH=<the other checkout>` so that `import sonic` finds that one, alternating the two
runs on a quiet machine (`uptime`: load below 0.5): each version renders its own motion of the
same inputs, as a user would get it.
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # as a render helper runs: one thread

import cv2
import numpy as np

import sonic
from sonic import load_pipeline
from sonic.decoders.warp import decoder as warp


def captured_render(image: str, audio: str, seed: int):
    """One request rendered in this process -> (its decoder, coeffs (T, K), head (T, 4))."""
    calls: list[tuple[object, np.ndarray, np.ndarray]] = []
    render = warp.WarpDecoder.render

    def keeping(self, coeffs, head, out=None):
        calls.append((self, np.array(coeffs), np.array(head)))
        return render(self, coeffs, head, out)

    warp.WarpDecoder.render = keeping
    try:
        pipe = load_pipeline({"render_processes": 0})  # no `with`: older versions lack it
        try:
            with tempfile.TemporaryDirectory() as tmp:
                pipe(image, audio, pipe.options({"seed": seed}), out_path=os.path.join(tmp, "bench.mp4"))
        finally:
            pipe.close()
    finally:
        warp.WarpDecoder.render = render
    return calls[0][0], np.concatenate([c for _, c, _ in calls]), np.concatenate([h for _, _, h in calls])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", required=True)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    decoder, coeffs, head = captured_render(args.image, args.audio, args.seed)
    out = np.empty((len(coeffs), *decoder.frame.shape), np.uint8)
    rounds = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        decoder.render(coeffs, head, out)
        rounds.append((time.perf_counter() - start) / len(coeffs) * 1000)
    print(
        json.dumps(
            {
                "sonic": os.path.dirname(sonic.__file__),
                "frames": len(coeffs),
                "ms_per_frame_best": round(min(rounds), 3),
                "ms_per_frame_rounds": [round(r, 3) for r in rounds],
                "load_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
