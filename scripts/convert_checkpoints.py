"""Rewrite a Sonic checkpoint folder's .pth files as .safetensors, beside them.

usage: python scripts/convert_checkpoints.py DIR [--allow-unsafe-pickle]

`.safetensors` holds tensors only and loads without pickle; the loader prefers it to the `.pth`
of the same name (sonic/decoders/sonic/layout.py). A `.pth` that needs full pickle (it can run code
from the file) is converted only with --allow-unsafe-pickle: for files you trust.
"""
import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from sonic.decoders.sonic.weights import load_state
from sonic.errors import SetupError


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--allow-unsafe-pickle", action="store_true")
    a = ap.parse_args()
    files = sorted((a.folder / "Sonic").glob("*.pth")) + sorted((a.folder / "RIFE").glob("*.pkl"))
    if not files:
        print(f"error: no Sonic/*.pth or RIFE/*.pkl under {a.folder}", file=sys.stderr)
        return 2
    for path in files:
        try:
            state = load_state(path, a.allow_unsafe_pickle)
        except SetupError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return 2
        out = path.with_suffix(".safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
        print(f"{path} -> {out} ({len(state)} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
