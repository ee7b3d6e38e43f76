"""Job records: plain, JSON-serialisable data, the same in memory, in SQLite and (later) in Redis.

A record says what to run (`kind`, `params`, the stored `inputs`), where it stands (`status`,
`stage`, `progress`) and how it ended (`result`, or `error` with a code, a message and maybe a
field). It holds no locks or events: whoever runs jobs (a queue backend) owns the waiting.
An error keeps its code, never an HTTP status: the routes derive that from the code
(sonic_server/errors.py) when they answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from sonic import GenerateOptions
from sonic import version as sonic_version


class JobStatus(str, Enum):
    """Where a job stands (its transitions: sonic_server/lifecycle.py). A str, so that records
    store, compare and print as the plain words they are in JSON."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    def __str__(self) -> str:
        return self.value


QUEUED, PROCESSING, SUCCEEDED, FAILED, CANCELED = (
    JobStatus.QUEUED,
    JobStatus.PROCESSING,
    JobStatus.SUCCEEDED,
    JobStatus.FAILED,
    JobStatus.CANCELED,
)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED})
JOB_ID = re.compile(r"[0-9a-f]{32}")  # what JobRecord.new makes (uuid4 hex): anything else is no job of ours


@dataclass
class JobRecord:
    id: str
    kind: str  # a key of sonic_server.tasks.TASKS: "generate"
    params: dict  # the request's validated parameters (GenerateOptions.to_dict())
    inputs: dict = field(default_factory=dict)  # name -> stored file path ("image", "audio")
    cache_key: str = ""
    status: JobStatus = QUEUED
    stage: str = "queued"
    progress: float = 0.0  # 0-1
    result: dict | None = None  # the task's result; "file" names the output under output_dir
    error: dict | None = None  # {"code", "message", "field"?}
    created: float = field(default_factory=time.time)  # epoch s
    started: float | None = None
    finished: float | None = None
    attempts: int = 0  # distributed mode: runs started (a job lost with its worker may run again)
    worker: str | None = None  # distributed mode: the worker of the latest run (for operators; not public)
    owner: str | None = None  # who made it (access.Caller.owner); None: made without keys, anyone's
    webhook: dict | None = None  # {"url", "events", "root"} when the request asked for one (webhooks.py)
    # distributed, storage: local: the ids of the shared folders as its API process saw them, which
    # the worker that runs it must see too (shared_folders.py)
    folders: dict | None = None

    @classmethod
    def new(cls, kind: str, params: dict, cache_key: str = "", owner: str | None = None) -> "JobRecord":
        return cls(id=uuid.uuid4().hex, kind=kind, params=dict(params), cache_key=cache_key, owner=owner)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobRecord":
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if "status" in fields:
            fields["status"] = JobStatus(fields["status"])
        return cls(**fields)

    def copy(self) -> "JobRecord":
        return JobRecord.from_dict(self.to_dict())

    def missing_inputs(self) -> list[str]:
        """The names of the stored input files that are no longer where the record says."""
        return [name for name, path in self.inputs.items() if not Path(path).is_file()]

    def public(self) -> dict:
        """What a client may see: id, status, progress, stage, when it was made (epoch s), and the
        result or the error."""
        d = {
            "job_id": self.id,
            "status": self.status,
            "progress": round(self.progress, 3),
            "stage": self.stage,
            "created": round(self.created, 3),
        }
        if self.result is not None:
            d["result"] = self.result
        if self.error is not None:
            d["error"] = self.error
        return d


def cache_key(
    image: bytes, audio: bytes, options: GenerateOptions, version: str | None = None, owner: str | None = None
) -> str:
    """Identical inputs and parameters give the same key (and the cached video), as long as the
    pipeline is the same: `version` (default `sonic.version.pipeline_version()`: the release and
    the output revision) is part of the key, so an upgrade renders again. With an `owner` the
    key is that owner's: a cache hit is always one of the caller's own jobs."""
    version = sonic_version.pipeline_version() if version is None else version
    h = hashlib.sha256()
    for part in (version.encode(), image, audio, repr(sorted(options.to_dict().items())).encode()):
        h.update(hashlib.sha256(part).digest())
    if owner is not None:
        h.update(hashlib.sha256(owner.encode()).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class JobQuery:
    """A listing of jobs: newest first, `limit` at most, before the `after` position of a previous
    page (its last job's (created, id)), of one owner (None: everyone's), of these statuses (empty:
    any), created in [created_from, created_to)."""

    owner: str | None = None
    statuses: tuple[JobStatus, ...] = ()
    created_from: float | None = None
    created_to: float | None = None
    after: tuple[float, str] | None = None
    limit: int = 20

    def admits(self, rec: JobRecord) -> bool:
        """Whether a record belongs in the listing (the in-memory and Redis stores filter so)."""
        if self.owner is not None and rec.owner != self.owner:
            return False
        if self.statuses and rec.status not in self.statuses:
            return False
        if self.created_from is not None and rec.created < self.created_from:
            return False
        if self.created_to is not None and rec.created >= self.created_to:
            return False
        return self.after is None or (rec.created, rec.id) < self.after


def newest_first(records: list[JobRecord]) -> list[JobRecord]:
    return sorted(records, key=lambda r: (r.created, r.id), reverse=True)
