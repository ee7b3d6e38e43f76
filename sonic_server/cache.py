"""Result cache: identical inputs and parameters (the same cache key) answer with the video
already made, as long as its record and its file both still exist."""
from __future__ import annotations

from pathlib import Path

from .jobs import SUCCEEDED, JobRecord


class ResultCache:
    def __init__(self, store, output_dir: Path):
        self.store = store
        self.output_dir = Path(output_dir)

    def lookup(self, key: str) -> JobRecord | None:
        job_id = self.store.cached(key) if key else None
        rec = self.store.load(job_id) if job_id else None
        if rec and rec.status == SUCCEEDED and (self.output_dir / rec.result["file"]).is_file():
            return rec
        return None
