"""Distributed mode with `storage: local`: the folders every process must share, told apart.

API processes write uploads to `server.upload_dir` and serve videos from `output_dir`; workers
read the uploads and write the videos there. A worker started with another folder (a volume
mounted at another path, a variable left out) rendered, was paid for, and wrote each video where
no API process serves it: every link answered 404, and nothing said why. Each such folder now
holds a mark, `.sonic-folder`, with an id made by the first process to look. API processes
publish the ids they see in Redis (`sonic:folders`: at their start and with each job) and give
them to each job; a worker that
sees others takes no job (it says so once, and `/health` lists it `shares_folders: false`), and
one that took a job anyway (before the ids were published) fails it before any work. The marks
are read at each look: one deleted is made again, and every process then reads the new id.

The ids hold the storage too (`storage`: "local", or the bucket and prefix with `storage: s3`): a
worker without the API's `s3:` settings took each job and failed it at once, "the job's image
file is no longer on the server", with nothing naming the setting.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("sonic.folders")
FOLDER_MARK = ".sonic-folder"
PUBLISHED_KEY = "sonic:folders"  # the ids the API processes see (queue/redis.py's PREFIX)
_unmarked: set[str] = set()  # folders whose mark could not be made, said once each


def folder_id(folder: str | Path) -> str:
    """The id in `<folder>/.sonic-folder`, made now if there is none (written whole before it
    can be seen: of several processes starting together, one makes it and the others read it);
    "" where it can be neither read nor made (a full disk: nothing is checked then, and the log
    says so once)."""
    mark = Path(folder) / FOLDER_MARK
    for _ in range(2):
        try:
            return mark.read_text().strip()
        except FileNotFoundError:
            pass
        except OSError:
            break
        try:
            _make_mark(mark)
        except FileExistsError:
            continue  # another process made it first: read theirs
        except OSError:
            break
    if str(folder) not in _unmarked:
        _unmarked.add(str(folder))
        log.warning("cannot read or make %s: whether other processes share %s is not checked", mark, folder)
    return ""


def _make_mark(mark: Path) -> None:
    """A new id, whole in place or not there at all (FileExistsError where a mark is)."""
    fd, temporary = tempfile.mkstemp(dir=mark.parent, prefix=FOLDER_MARK + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(8))
        try:
            os.link(temporary, mark)  # fails where the mark is there
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: renamed over (each look reads it again)
            os.replace(temporary, mark)
    finally:
        Path(temporary).unlink(missing_ok=True)


STORAGE = "storage"  # the ids' entry for where the files go (the setting's name)
LOCAL = "local"


def bucket_ids(bucket: str, prefix: str) -> dict[str, str]:
    """The ids of processes that keep their files in a bucket: the bucket alone (not its endpoint:
    an API process and a worker may reach one store by two names)."""
    return {STORAGE: f"s3 bucket {bucket}/{prefix}"}


def folder_settings(upload_dir: str | Path, output_dir: str | Path) -> dict[str, str | Path]:
    """This process's shared folders, by the setting that names each."""
    return {"server.upload_dir": upload_dir, "output_dir": output_dir}


def shared_folders(upload_dir: str | Path, output_dir: str | Path) -> dict[str, str]:
    """The ids of this process's shared folders, by the setting that names each, and its storage
    (local)."""
    ids = {name: folder_id(folder) for name, folder in folder_settings(upload_dir, output_dir).items()}
    return {STORAGE: LOCAL, **ids}


def differing(expected: dict[str, str] | None, here: dict[str, str]) -> list[str]:
    """The settings whose folder is another here than where the ids `expected` were read (a
    folder whose id could not be read on either side counts as the same)."""
    return [name for name, made in (expected or {}).items() if made and here.get(name) and here[name] != made]


def publish(conn: Any, ids: dict[str, str]) -> None:
    """The ids an API process sees, for the workers to compare theirs with."""
    conn.set(PUBLISHED_KEY, json.dumps(ids, sort_keys=True))


def published(conn: Any) -> dict[str, str] | None:
    """The ids the API processes published last; None before any did."""
    raw = conn.get(PUBLISHED_KEY)
    return json.loads(raw) if raw else None
