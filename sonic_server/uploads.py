"""The upload folder: a job's input files live in `<upload_dir>/<job id>/` from the request that
brings them until the job ends (or is refused, or is found cut off at start-up). Created and
deleted here only."""

from __future__ import annotations

import shutil
from pathlib import Path

from sonic import DiskFull
from sonic.errors import PipelineError

from .errors import is_disk_full


class Uploads:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def save(self, job_id: str, files: dict[str, bytes]) -> dict[str, str]:
        """Write each upload under a fixed name (never the client's file name); returns name -> path.
        A full disk is `DiskFull`, a folder that cannot be written a `PipelineError` (the operator's
        problems, said as such, without the server's paths), its half-written folder gone."""
        folder = self.root / job_id
        paths = {}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
                paths[name] = str(folder / name)
        except OSError as e:
            self.remove(job_id)
            if is_disk_full(e):
                raise DiskFull("no space left on the server's disk for the uploads; try again later") from e
            why = f"cannot keep the uploads in the service's upload folder ({e.strerror or type(e).__name__})"
            raise PipelineError(why) from e
        return paths

    def drop_local_copy(self, job_id: str) -> None:
        """The job is queued, or this worker is done with it: with a shared folder its files stay
        where they are (the job's end removes them)."""

    def fetch(self, job_id: str, inputs: dict[str, str]) -> dict[str, str]:
        """Where the worker reads the job's files: here, the shared folder's paths."""
        return inputs

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.root / job_id, ignore_errors=True)
