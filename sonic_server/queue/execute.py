"""Running one job's task and turning how it ended into the record's final status and fields:
the same for every backend (the in-process worker thread, `sonic worker` processes)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Callable

from sonic import DiskFull, SonicError
from sonic.memory import give_back_memory

from ..jobs import CANCELED, FAILED, SUCCEEDED, JobRecord, JobStatus
from ..lifecycle import JobCanceled, JobTimedOut

log = logging.getLogger("sonic.jobs")
INTERNAL = {"code": "internal_error", "message": "generation failed; see the server log with this job id"}
OUT_OF_MEMORY = {"code": "out_of_memory", "message": "ran out of memory; try a shorter clip or a lower min_resolution"}
DISK_FULL = DiskFull("no space left on the server's disk; try again later").to_dict()
JOB_TIMEOUT = "job_timeout"


def run_task(
    rec: JobRecord,
    tasks: dict,
    pipeline,
    output_dir: Path,
    inputs,
    progress: Callable[[str, float], None],
    job_timeout_s: float = 0.0,
) -> tuple[JobStatus, dict]:
    """Run the record's task; (final status, fields to set on the record). Never raises: the
    progress callback's JobCanceled / JobTimedOut and every error become a status. The memory
    the task freed goes back to the system at its end."""
    try:
        progress("starting", 0.0)
        result = tasks[rec.kind](rec.copy(), pipeline, output_dir, inputs, progress)
    except JobCanceled:
        return CANCELED, {}
    except JobTimedOut:
        log.warning("job %s stopped: it ran past the limit of %g s", rec.id, job_timeout_s)
        return FAILED, {
            "error": {
                "code": JOB_TIMEOUT,
                "message": f"the job ran longer than the limit of "
                f"{job_timeout_s:g} s (server.job_timeout_s) and was stopped; try a shorter clip",
            }
        }
    except SonicError as e:
        return FAILED, {"error": e.to_dict()}
    except MemoryError:
        log.error("job %s ran out of memory", rec.id)  # the writer has removed its files
        return FAILED, {"error": dict(OUT_OF_MEMORY)}
    except Exception as e:  # noqa: BLE001 - reported, never raised to HTTP
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # from outside the writer
            log.error("job %s failed: no space left on the disk", rec.id)
            return FAILED, {"error": dict(DISK_FULL)}
        log.exception("job %s failed", rec.id)
        return FAILED, {"error": dict(INTERNAL)}
    else:
        return SUCCEEDED, {"result": result, "progress": 1.0}
    finally:
        give_back_memory()
