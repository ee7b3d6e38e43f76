"""HTTP service entry point: placeholder until the HTTP service issue lands.

The pipeline is usable today from Python (`sonic.load_pipeline`) and from the CLI
(`python -m sonic generate ...`). This file will hold the Flask app factory.
"""
import sys

if __name__ == "__main__":
    sys.stderr.write("The HTTP service is not built yet; use: python -m sonic generate --help\n")
    sys.exit(1)
