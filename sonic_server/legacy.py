"""Runtime state left by earlier releases, brought to where this one keeps it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from .settings import ServerConfig

log = logging.getLogger("sonic.http")
DB_NAME = "jobs.sqlite3"


def jobs_db_path(settings: ServerConfig) -> str:
    """Where the job records are (`server.jobs_db_path`). Releases before 0.5 kept them in
    `<output_dir>/jobs.sqlite3`; with `server.jobs_db` unset and no database in the data folder
    yet, that file (with its -wal/-shm companions) is moved there once, so that earlier jobs
    keep their ids, cache hits and recovery."""
    path = settings.server.jobs_db_path
    old = Path(settings.output_dir) / DB_NAME
    if settings.server.jobs_db is None and not Path(path).exists() and old.is_file():
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            if Path(str(old) + suffix).exists():
                shutil.move(str(old) + suffix, str(path) + suffix)
        log.info("job database moved from %s to %s", old, path)
    return path
