"""Distributed mode with `storage: local`: the folders every process must share, told apart.

API processes write uploads to `server.upload_dir` and serve videos from `output_dir`; workers
read the uploads and write the videos there. A worker started with another folder (a volume
mounted at another path, a variable left out) rendered, was paid for, and wrote each video where
no API process serves it: every link answered 404, and nothing said why. Each such folder now
holds a mark, `.sonic-folder`, with an id made by the first process to look: a job carries the
ids its API process sees, and a worker that sees others fails the job before any work (the
hold released) and logs what differs; `/health` lists such a worker with `shares_folders:
false`.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

FOLDER_MARK = ".sonic-folder"


def folder_id(folder: str | Path) -> str:
    """The id in `<folder>/.sonic-folder`, made now if there is none (written whole before it
    can be seen: of several processes starting together, one makes it and the others read it);
    "" where it can be neither read nor made (then nothing is checked)."""
    mark = Path(folder) / FOLDER_MARK
    for _ in range(2):
        try:
            return mark.read_text().strip()
        except FileNotFoundError:
            pass
        except OSError:
            return ""
        try:
            with tempfile.NamedTemporaryFile("w", dir=folder, prefix=FOLDER_MARK + ".", delete=False) as f:
                f.write(secrets.token_hex(8))
            try:
                os.link(f.name, mark)  # fails where another process made it first: read theirs
            finally:
                os.unlink(f.name)
        except FileExistsError:
            continue
        except OSError:
            return ""
    return ""


def shared_folders(upload_dir: str | Path, output_dir: str | Path) -> dict[str, str]:
    """The ids of this process's shared folders, by the setting that names each."""
    return {"server.upload_dir": folder_id(upload_dir), "output_dir": folder_id(output_dir)}


def differing(expected: dict[str, str] | None, here: dict[str, str]) -> list[str]:
    """The settings whose folder is another here than where the ids `expected` were read (a
    folder whose id could not be read on either side counts as the same)."""
    return [name for name, made in (expected or {}).items() if made and here.get(name) and here[name] != made]
