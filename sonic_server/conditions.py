"""Conditional requests for a stored video, in the order RFC 9110 13.2.2 gives them.

werkzeug answered a Range before the conditions (a 206 where the client's copy was current),
ignored If-Unmodified-Since, and sent the whole video with its 412. Here the conditions are
decided first: If-Match, else If-Unmodified-Since (412: the video is not the one the client
means); If-None-Match, else If-Modified-Since (304: its copy is current); then If-Range says
whether a Range applies at all (a changed video is sent whole). What is left for the file's
response is the Range alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from werkzeug.datastructures import Headers
from werkzeug.http import http_date, parse_date, parse_etags, quote_etag

CONDITIONS = ("If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range")


@dataclass(frozen=True)
class Validators:
    """What a stored video is known by: a strong entity tag and its last change, in whole
    seconds (all that Last-Modified can say)."""

    etag: str  # unquoted
    modified: int  # seconds since the epoch

    @classmethod
    def of_file(cls, name: str, size: int, mtime_ns: int) -> Validators:
        """The tag names the video, not its time: a result cache hit restarts the video's time to
        live by its modification time, and a tag made of that time told every client holding the
        same bytes that the video had changed (a resumed download started again, If-Match
        failed). A job's video is written once, under its job's id, so its name and size name its
        bytes, the same from every API process on a shared folder (an inode number is not, on
        some network file systems). Last-Modified moves with a hit, as an object's in a bucket
        does."""
        return cls(f"{hashlib.sha256(name.encode()).hexdigest()[:16]}-{size:x}", mtime_ns // 1_000_000_000)

    def headers(self) -> dict[str, str]:
        return {"ETag": quote_etag(self.etag), "Last-Modified": http_date(self.modified)}


def verdict(headers: Headers | Mapping[str, str], method: str, video: Validators) -> int | None:
    """412 (a precondition failed), 304 (the client's copy is current), or None: answer it."""
    if_match, unmodified_since = headers.get("If-Match"), _seconds(headers.get("If-Unmodified-Since"))
    if if_match is not None:
        if not parse_etags(if_match).contains(video.etag):  # strong comparison; "*": any video
            return 412
    elif unmodified_since is not None and video.modified > unmodified_since:
        return 412
    if_none_match, modified_since = headers.get("If-None-Match"), _seconds(headers.get("If-Modified-Since"))
    if if_none_match is not None:
        if parse_etags(if_none_match).contains_weak(video.etag):
            return 304 if method in ("GET", "HEAD") else 412
    elif method in ("GET", "HEAD") and modified_since is not None and video.modified <= modified_since:
        return 304
    return None


def range_applies(headers: Headers | Mapping[str, str], video: Validators) -> bool:
    """If-Range: the Range is for the video the client has part of, named by its strong entity
    tag or its exact Last-Modified date; another (or a weak tag) is sent whole."""
    value = headers.get("If-Range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith('"'):
        return value == quote_etag(video.etag)
    seconds = _seconds(value) if not value.startswith("W/") else None
    return seconds is not None and seconds == video.modified


def one_date(value: str | None) -> datetime | None:
    """An HTTP date; None for no date or one that cannot be read (ignored, as RFC 9110 has a
    server ignore an invalid date). A list of dates (more than the one comma after the weekday;
    two headers arrive joined by one) is none: werkzeug read its first."""
    if not value or value.count(",") > 1:
        return None
    return parse_date(value)


def _seconds(value: str | None) -> int | None:
    """`one_date` as seconds since the epoch."""
    date = one_date(value)
    return int(date.timestamp()) if date is not None else None
