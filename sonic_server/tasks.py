"""Task registry: a job's `kind` -> the function that runs it.

A task gets the record, the loaded pipeline, the output folder, the inputs the route already
decoded (`sonic.checks.CheckedInputs`, or None when the job runs where they were not decoded:
then it reads the record's stored files) and a progress callback. It returns the result dict
stored in the record (`file` names the output under output_dir) and raises the library's
errors; the queue backend turns those into a failed record. A second kind (face fusion) is one
more function and one more entry in TASKS.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from sonic import GenerateOptions
from sonic.errors import InvalidParameter, PipelineError

from .jobs import JobRecord
from .lifecycle import RunSuperseded

Progress = Callable[[str, float], None]


def run_generate(rec: JobRecord, pipeline, output_dir: Path, inputs, progress: Progress) -> dict:
    """Portrait + speech -> `<output_dir>/<job id>.mp4`; the pipeline's result without its path."""
    if inputs is None and (missing := rec.missing_inputs()):
        # the stored files are the service's, not the caller's: one that is gone (a cleanup, a job
        # store restored from an old snapshot) is the service's fault, said without its path
        raise PipelineError(f"the job's {missing[0]} file is no longer on the server; submit the job again")
    image = inputs.rgb if inputs is not None else rec.inputs["image"]
    audio = inputs.wav if inputs is not None else rec.inputs["audio"]
    out = Path(output_dir) / f"{rec.id}.mp4"
    try:
        res = pipeline(
            image, audio, _options(rec.params), out_path=out, progress=progress, sound_file=rec.inputs["audio"]
        )
    except InvalidParameter as e:
        if e.field != "out_path":
            raise
        # the path is the service's own, not the caller's: its fault, and no server path in the answer
        raise PipelineError("cannot write the video: the service's output folder is not writable") from e
    except RunSuperseded:  # the name is the job's, and the job another run's now
        raise
    except BaseException:
        # a cancel or time limit at the last progress report comes after the video is in place:
        # a job that ends without a result leaves no video (it was downloadable, and uncharged)
        out.unlink(missing_ok=True)
        raise
    result = res.to_dict()
    if inputs is not None:  # decoded before queueing: the time counts as the request's decode
        inputs.count_decode_in(result["timings"])
    result.pop("output_path", None)
    result["file"] = out.name
    return result


def _options(params: dict) -> GenerateOptions:
    """The record's parameters as options. Parameters this release does not know come from a
    newer API process (a rolling upgrade that reached the API before this worker): said as such,
    not as a TypeError behind `internal_error`."""
    unknown = sorted(set(params) - {f.name for f in dataclasses.fields(GenerateOptions)})
    if unknown:
        raise PipelineError(
            f"this job was made by a newer release than the worker that took it runs (it does not know "
            f"{', '.join(unknown)}): upgrade the workers, then the API processes, and submit it again"
        )
    return GenerateOptions(**params)


TASKS: dict[str, Callable[..., dict]] = {"generate": run_generate}
