"""What a video depends on besides its inputs and options: the installed release and the output
revision of the pipeline. The service's result cache keys on both, so that after an upgrade an
identical request is rendered again rather than answered with a video the old code made.

The release alone is not enough: a checkout installed in editable mode keeps the version it
was installed with while its code moves on. Bump OUTPUT_REVISION with any change that makes the
same inputs and options give different frames or sound (a stage, a constant, a decoder).
"""

from __future__ import annotations

import functools
from importlib import metadata

DISTRIBUTION = "sonic-talking-head"  # the name pyproject.toml gives the package
# see above: bump when the output changes (10: the warp decoder's painting and gaze in float32,
# which rounds a few values differently: at most 6 levels in a few pixels of a frame; and a
# recording's samples that are not numbers made silence before it is resampled)
OUTPUT_REVISION = 10


@functools.lru_cache(maxsize=1)
def package_version() -> str:
    """The installed release ("unknown" when run from a checkout that is not installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def pipeline_version(decoder: str = "warp") -> str:
    """One string for the release, the output revision and the decoder kind that renders."""
    return f"{package_version()}/r{OUTPUT_REVISION}/{decoder}"
