"""Write a tiny, randomly initialised Sonic model in the official checkpoint layout.

usage: python scripts/make_tiny_checkpoints.py DIR [--safetensors]

For trying the `sonic` decoder's plumbing (CLI, server, progress, errors) on a machine without
the real weights: its videos are coloured noise, not faces. docs/gpu.md has the real layout.
"""
import argparse
from pathlib import Path

from sonic.decoders.sonic.model import quiet_libraries
from sonic.decoders.sonic.tiny import write_tiny_checkpoints

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pth")
    ap.add_argument("--rife", action="store_true", help="also RIFE/flownet.pkl (frame interpolation)")
    a = ap.parse_args()
    quiet_libraries()
    print(write_tiny_checkpoints(a.folder, pth=not a.safetensors, rife=a.rife))
