"""Output files: the finished videos, by their unguessable names, with HTTP Range for seeking."""
from __future__ import annotations

import re

from flask import Blueprint, send_from_directory

from ..errors import error_response
from ..jobs import JOB_ID
from ..openapi import content, describe, error, header, path_parameter
from ..service import service

bp = Blueprint("outputs", __name__)
OUTPUT_NAME = re.compile(JOB_ID.pattern + r"\.mp4")    # <job id>.mp4 (tasks.py); matched whole, never with `$`
MAX_AGE_S = 3600
path_parameter("name", OUTPUT_NAME, "the file name in a result's video_url")


@bp.get("/output/<name>")
@describe("Download a video (supports Range)", parameters=[header("Range", "one byte range, e.g. bytes=0-1023")],
          responses={
    200: ("MP4", content("video/mp4", {"type": "string", "format": "binary"})), 206: "partial content",
    404: error("no such video"), 416: "range not satisfiable"})
def output(name):
    folder = service().output_dir
    if not OUTPUT_NAME.fullmatch(name) or not (folder / name).is_file():
        return error_response("not_found", "no such video")
    return send_from_directory(folder, name, mimetype="video/mp4", conditional=True, max_age=MAX_AGE_S)
