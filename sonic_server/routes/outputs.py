"""Output files: the finished videos, by their unguessable names, with HTTP Range for seeking."""

from __future__ import annotations

import re

from flask import Blueprint, request
from werkzeug.http import parse_range_header

from ..errors import error_response
from ..jobs import JOB_ID
from ..openapi import content, describe, error, header, path_parameter
from ..service import service
from ..storage import ignore_range

bp = Blueprint("outputs", __name__)
OUTPUT_NAME = re.compile(JOB_ID.pattern + r"\.mp4")  # <job id>.mp4 (tasks.py); matched whole, never with `$`
path_parameter("name", OUTPUT_NAME, "the file name in a result's video_url")


@bp.get("/output/<name>")
@describe(
    "Download a video (supports Range)",
    parameters=[
        header("Range", "one byte range, e.g. bytes=0-1023 (several ranges or another unit: ignored, 200)"),
        header("If-None-Match", "the ETag of the copy the client has: 304 while it is current"),
        header("If-Modified-Since", "the Last-Modified of the copy the client has: 304 while it is current"),
        header("If-Match", "the ETag the video must have (else 412)"),
        header("If-Unmodified-Since", "the video must not have changed since (else 412)"),
        header("If-Range", "the ETag or Last-Modified of the copy a Range continues: another video is sent whole"),
    ],
    responses={
        200: ("MP4", content("video/mp4", {"type": "string", "format": "binary"})),
        206: ("the range asked for", content("video/mp4", {"type": "string", "format": "binary"})),
        302: "the video is in object storage (s3.video_url: presigned): its presigned URL",
        304: "not modified (If-None-Match, If-Modified-Since)",
        412: error("If-Match or If-Unmodified-Since names another version of the video"),
        404: error("no such video"),
        416: error("the byte range lies past the end (Content-Range names the size)"),
        503: error("the object store does not answer (Retry-After)"),
    },
)
def output(name):
    """From the output folder, or from the bucket (storage: s3): streamed, or a redirect."""
    _ignore_ranges_not_served()
    resp = service().outputs.response(name) if OUTPUT_NAME.fullmatch(name) else None
    if resp is None:
        return error_response("not_found", "no such video")
    return resp


def _ignore_ranges_not_served() -> None:
    """One byte range is served (206, or 416 past the end). A Range in another unit, of several
    ranges or malformed is ignored, as RFC 9110 has a server do, and the whole video is the
    answer (200): a 416 would tell the client that the video is shorter than it asked for. (The
    conditions are decided before it: sonic_server/conditions.py.)"""
    header = request.headers.get("Range")
    if header is None:
        return
    ranges = parse_range_header(header)
    # HEAD: the whole video's headers (RFC 9110 14.2 defines ranges for GET only; the bucket's HEAD says so too)
    if ranges is None or ranges.units != "bytes" or len(ranges.ranges) != 1 or request.method != "GET":
        ignore_range()
