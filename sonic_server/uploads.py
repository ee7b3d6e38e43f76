"""The upload folder: a job's input files live in `<upload_dir>/<job id>/` from the request that
brings them until the job ends (or is refused, or is found cut off at start-up). Created and
deleted here only."""
from __future__ import annotations

import shutil
from pathlib import Path


class Uploads:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def save(self, job_id: str, files: dict[str, bytes]) -> dict[str, str]:
        """Write each upload under a fixed name (never the client's file name); returns name -> path."""
        folder = self.root / job_id
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, data in files.items():
            (folder / name).write_bytes(data)
            paths[name] = str(folder / name)
        return paths

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)
