"""CLI: `sonic generate --image IMG --audio AUD --out OUT.mp4 [--config JSON]`, `sonic serve
[--host H] [--port P] [--config settings.yaml]` (also `python -m sonic ...`).

`serve` imports the server package (and flask) only when it runs: the library never does."""

from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
from pathlib import Path
from typing import Callable

from .errors import Busy, InvalidParameter, PipelineError, SonicError


class ProgressBar:
    """The progress line on stderr; `mid_line` while it is drawn and not ended, so that a
    message after it starts on a line of its own (and none is left blank without a bar)."""

    WIDTH = 30

    def __init__(self) -> None:
        self.mid_line = False

    def __call__(self, stage: str, frac: float) -> None:
        filled = int(round(frac * self.WIDTH))
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {frac * 100:5.1f}% {stage:<8}")
        self.mid_line = frac < 1.0
        if not self.mid_line:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        """A message of its own: on a new line after a bar cut short."""
        sys.stderr.write(("\n" if self.mid_line else "") + text + "\n")
        self.mid_line = False


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):  # JSON too long for a file name, a NUL in it
        return False


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    return {int: "a number", float: "a number", str: "a string", list: "an array"}.get(type(value), "another value")


def _params(text: str | None) -> dict:
    from .options import DuplicateKey, unique_keys

    if not text:
        return {}
    named_file = _is_file(text)
    if named_file:
        try:
            text = Path(text).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InvalidParameter(f"--config file is not UTF-8 text (byte {e.start})", field="config") from e
    try:
        params = json.loads(text, object_pairs_hook=unique_keys)
    except DuplicateKey as e:
        raise InvalidParameter(f"--config gives the key {e.key[:40]!r} twice", field="config") from None
    except (ValueError, RecursionError) as e:
        if not named_file and not text.lstrip().startswith(("{", "[")):  # no JSON, and no such file
            raise InvalidParameter(
                f"--config {text[:200]!r}: no such file (or give the JSON itself)", field="config"
            ) from None
        raise _unreadable_json(e) from None
    if not isinstance(params, dict):
        raise InvalidParameter(
            f'--config must be a JSON object of parameters ({{"min_resolution": 512}}), got {_json_kind(params)}',
            field="config",
        )
    return params


def _unreadable_json(e: ValueError | RecursionError) -> InvalidParameter:
    """Why --config's JSON could not be read, in one line."""
    if isinstance(e, json.JSONDecodeError):
        return InvalidParameter(f"--config is not valid JSON: {e.msg} at position {e.pos}", field="config")
    if isinstance(e, RecursionError):  # arrays or objects nested thousands deep
        return InvalidParameter("--config nests arrays or objects too deep", field="config")
    # a whole number of more than Python's 4300 digits
    return InvalidParameter("--config holds a number too long to read (over 4300 digits)", field="config")


# The server package's commands: found when it is installed (pip install "sonic-talking-head[server]"),
# so that the library itself depends on no server module.
SERVER_COMMANDS = {
    "serve": "sonic_server.serve",
    "worker": "sonic_server.worker",
    "accounts": "sonic_server.accounts.cli",
}
EXTRA_OF_COMMAND = {"serve": "server", "worker": "distributed", "accounts": "credits"}  # pyproject.toml's extras


def _server_command(name: str) -> Callable[..., None]:
    try:
        module = importlib.import_module(SERVER_COMMANDS[name])
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"error: `sonic {name}` needs the HTTP service's packages ({e.name} is missing): "
            f'pip install "sonic-talking-head[{EXTRA_OF_COMMAND[name]}]"'
        ) from e
    return module.main


def exit_code(e: SonicError) -> int:
    """2 for what the caller can fix (the inputs, the parameters, the settings, the checkpoints),
    1 for a failure that is not theirs (ffmpeg failed, the disk is full, memory is taken), which a
    script may try again: each was 2."""
    return 1 if isinstance(e, (PipelineError, Busy)) or type(e) is SonicError else 2


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sonic", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="make a talking-head MP4")
    gen.add_argument("--image", required=True, help="portrait (PNG, JPEG, WebP)")
    gen.add_argument("--audio", required=True, help="speech (WAV, MP3, FLAC, OGG, M4A, WebM, AIFF, CAF, AMR)")
    gen.add_argument("--out", required=True, help="output .mp4 path")
    gen.add_argument("--config", help="JSON object of parameters, or a path to a JSON file")
    gen.add_argument(
        "--settings",
        help="YAML settings file (defaults, limits) over the shipped configs/default.yaml; "
        "SONIC_* variables override both",
    )
    gen.add_argument(
        "--decoder",
        choices=("auto", "warp", "sonic"),
        help="the video decoder (setting decoder, SONIC_DECODER; default auto)",
    )
    gen.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="the Sonic model's folder, official layout (setting sonic_checkpoints, SONIC_CHECKPOINTS; docs/gpu.md)",
    )
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the sonic decoder runs")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("serve", help="run the HTTP service (sonic serve --help)", add_help=False)
    sub.add_parser("worker", help="run jobs from Redis (sonic worker --help; docs/scaling.md)", add_help=False)
    sub.add_parser(
        "accounts", help="accounts, keys and credits (sonic accounts --help; docs/credits.md)", add_help=False
    )
    args, rest = ap.parse_known_args(argv)
    if args.command in SERVER_COMMANDS:  # its own flags are the server package's to parse
        _server_command(args.command)(rest, prog=f"sonic {args.command}")
        return 0
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    bar = ProgressBar()
    signal.signal(signal.SIGTERM, _interrupt)  # stopped as ^C is: the render's partial files removed
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # (under nohup it stays ignored)
        signal.signal(signal.SIGHUP, _interrupt)  # its terminal closed, an ssh dropped: the same
    try:
        from .options import GenerateOptions
        from .settings import load_settings

        settings = load_settings(
            args.settings, flags={"decoder": args.decoder, "device": args.device, "sonic_checkpoints": args.checkpoints}
        )
        opts = GenerateOptions.from_dict(_params(args.config), settings)
        # bad media is reported before the models load (seconds), and decoded only once
        from .checks import check_inputs, existing_file, writable_video_path

        for name in ("image", "audio"):
            existing_file(getattr(args, name), name, shown=f"--{name}")
        if args.out == "-":  # a file named "-" was written in the current folder
            raise InvalidParameter(
                "--out -: the video cannot go to stdout (an MP4 is finished in place); name a file", field="out_path"
            )
        writable_video_path(args.out, (args.image, args.audio), shown="--out")

        inputs = check_inputs(args.image, args.audio, opts, settings.limits)
        from .pipeline import load_pipeline

        pipe = load_pipeline(settings)
        result = pipe(
            inputs.rgb,
            inputs.wav,
            opts,
            out_path=args.out,
            progress=None if args.quiet else bar,
            sound_file=args.audio,
        )
    except SonicError as e:  # (a SettingsError too)
        bar.line(f"error: {e.message}")
        return exit_code(e)
    except KeyboardInterrupt:  # ^C, or SIGTERM (timeout, a batch scheduler): the render's files are removed
        bar.line("interrupted")
        return 130
    out = result.to_dict()
    inputs.count_decode_in(out["timings"])  # decoded before the models loaded: it counts
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
