"""What the routes reach through `current_app`: the settings they use, read once in create_app,
the upload folder, and the job queue once the model has loaded."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flask import current_app

from sonic.settings import Settings

from .queue import JobQueue
from .uploads import Uploads


@dataclass
class Service:
    settings: Settings           # sonic/settings.py: parameter defaults, limits, folders
    uploads: Uploads
    output_dir: Path             # videos, served from /output/<name>
    sync_wait_s: float           # a synchronous request waits this long, then gets 202
    retry_after_s: str           # Retry-After of a 503 for a full queue
    queue: JobQueue | None = None
    status: str = "starting"     # starting | ready | setup_failed


def service() -> Service:
    return current_app.extensions["sonic"]
