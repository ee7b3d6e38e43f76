"""Output files: the finished videos, by their unguessable names, with HTTP Range for seeking."""

from __future__ import annotations

import re

from flask import Blueprint

from ..errors import error_response
from ..jobs import JOB_ID
from ..openapi import content, describe, error, header, path_parameter
from ..service import service

bp = Blueprint("outputs", __name__)
OUTPUT_NAME = re.compile(JOB_ID.pattern + r"\.mp4")  # <job id>.mp4 (tasks.py); matched whole, never with `$`
path_parameter("name", OUTPUT_NAME, "the file name in a result's video_url")


@bp.get("/output/<name>")
@describe(
    "Download a video (supports Range)",
    parameters=[header("Range", "one byte range, e.g. bytes=0-1023")],
    responses={
        200: ("MP4", content("video/mp4", {"type": "string", "format": "binary"})),
        206: ("the range asked for", content("video/mp4", {"type": "string", "format": "binary"})),
        302: "the video is in object storage (s3.video_url: presigned): its presigned URL",
        304: "not modified",
        404: error("no such video"),
        416: error("range not satisfiable (one range is served; Content-Range names the size)"),
        503: error("the object store does not answer (Retry-After)"),
    },
)
def output(name):
    """From the output folder, or from the bucket (storage: s3): streamed, or a redirect."""
    resp = service().outputs.response(name) if OUTPUT_NAME.fullmatch(name) else None
    if resp is None:
        return error_response("not_found", "no such video")
    return resp
