"""Where uploads and videos live: folders (`storage: local`, the default; shared volumes in
distributed mode), or an S3-compatible bucket (`storage: s3`, distributed mode: AWS S3, MinIO...).

Two objects, the same interface for both kinds:
- uploads (`Uploads`, `S3Uploads`): a request's files. The API process writes them to its local
  `upload_dir` (the content checks read them there); with S3 it also puts them in the bucket
  (`<prefix>uploads/<job id>/<name>`) and drops its local copy once the job is queued, and the
  worker that runs the job fetches them into its own `upload_dir`. Redis carries only ids.
- outputs (`FolderOutputs`, `S3Outputs`): the finished videos. A worker writes to its
  `output_dir`; with S3 `publish` moves the file into the bucket (`<prefix>outputs/<name>`).
  `/output/<name>` serves a video (from the folder, or streamed from the bucket with Range),
  `url` names it for a job's `video_url` (this server's /output/<name>, or a presigned URL),
  `touch` restarts its time to live (a cache hit) and `expire` deletes the old ones.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal

from flask import Response, request
from werkzeug.exceptions import RequestedRangeNotSatisfiable
from werkzeug.http import http_date
from werkzeug.wsgi import wrap_file

from sonic import SonicError
from sonic.errors import SetupError

from .conditions import CONDITIONS, Validators, one_date, range_applies, verdict
from .errors import error_response
from .uploads import Uploads

log = logging.getLogger("sonic.storage")
# a video is cached, but checked again at each use (ETag, Last-Modified: a 304 costs nothing):
# once its job is deleted or it expires, a browser or a proxy must not go on showing it
VIDEO_CACHE = "no-cache"
CHUNK = 256 * 1024
# a store that did not answer is taken for away this long: every call meanwhile fails at once
# (503 + Retry-After), instead of each request's calls waiting out their own timeouts (with
# boto3's 30 s and three tries, a request to a hung store took 4 minutes, holding a thread)
AWAY_S = 10.0
CONNECT_TIMEOUT_S = 3.0


class StorageUnavailable(SonicError):
    """The object store did not answer or refused: the operator acts; the request may be retried."""

    code = "storage_unavailable"


class FolderOutputs:
    """Videos as files in `output_dir`."""

    remote: Literal[False] = False  # a Literal: `if outputs.remote` tells the two kinds apart

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def publish(self, name: str) -> None:
        """The worker wrote `<output_dir>/<name>`: nothing to move."""

    def touch(self, name: str) -> bool:
        try:
            os.utime(self.folder / name)
            return True
        except OSError:
            return False

    def remove(self, name: str) -> None:
        """A deleted job's video (DELETE /api/sonic/jobs/<id>)."""
        (self.folder / name).unlink(missing_ok=True)

    def expire(self, cutoff: float) -> int:
        """Delete the videos last written before `cutoff` (epoch s); how many."""
        gone = 0
        for path in self.folder.glob("*.mp4"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    gone += 1
            except OSError:
                pass
        return gone

    def url(self, name: str, proxied: str) -> str:
        return proxied

    def response(self, name: str):
        video_file = _open_video(self.folder / name)
        if video_file is None:
            return None
        try:
            return _video_answer(video_file, name)
        except BaseException:
            video_file.close()
            raise


# what opening a name in the output folder fails with where it names no video: nothing, a link
# (O_NOFOLLOW), a path through something that is no folder, a device without a driver
NO_SUCH_VIDEO = {errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO}


def _open_video(path: Path) -> BinaryIO | None:
    """The video file at `path` opened for reading, or None where there is no such plain file.
    The service writes files: a link is no video of its own. Opened without following one, and
    everything after read from the open file, not the name: a link put in its place between a
    check and an open would have been followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # (a FIFO would block the open)
    except OSError as e:
        if e.errno in NO_SUCH_VIDEO:
            return None
        raise  # out of file handles, unreadable: the server's fault, not "no such video"
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _video_answer(video_file: BinaryIO, name: str) -> Response:
    """The answer to a GET or HEAD of the open video `name`: its conditions and range decided, the
    bytes streamed from the file (closed with the answer)."""
    st = os.fstat(video_file.fileno())
    video = Validators.of_file(name, st.st_size, st.st_mtime_ns)
    answered = conditional_answer(verdict(request.headers, request.method, video), video.headers())
    if answered is not None:
        video_file.close()
        return answered
    if not range_applies(request.headers, video):
        ignore_range()
    drop_conditions()  # decided: werkzeug would answer them again, before the range is read
    suffix = request.range.ranges[0] if request.range is not None and len(request.range.ranges) == 1 else None
    if suffix is not None and suffix[0] < 0 and -suffix[0] > st.st_size:
        ignore_range()  # the last N bytes of a shorter file are all of it (RFC 9110 14.1.3); werkzeug said 416
    resp = Response(wrap_file(request.environ, video_file), mimetype="video/mp4", direct_passthrough=True)
    resp.headers.set("Content-Disposition", "inline", filename=name)  # (a download keeps the id's name)
    resp.content_length = st.st_size
    resp.headers["Last-Modified"] = http_date(video.modified)
    resp.set_etag(video.etag)
    try:
        resp.make_conditional(request.environ, accept_ranges=True, complete_length=st.st_size)
    except RequestedRangeNotSatisfiable:
        video_file.close()
        return unsatisfiable_range(st.st_size)
    resp.headers["Cache-Control"] = VIDEO_CACHE
    return resp


def conditional_answer(status: int | None, validators: dict[str, str]):
    """The answer to a request whose condition decided it (conditions.verdict): 304 without a
    body, with the video's validators (ETag, as a 200 would carry it), or the one error body for
    412; None when the video is to be sent."""
    if status == 304:
        return Response(status=304, headers={"Cache-Control": VIDEO_CACHE, **validators})
    if status == 412:
        message = "the video is not the one If-Match or If-Unmodified-Since names (it changed, or is another)"
        return error_response("precondition_failed", message)
    return None


def drop_conditions() -> None:
    """The request is answered as if it had no conditions (they were decided already)."""
    for name in CONDITIONS:
        request.environ.pop("HTTP_" + name.upper().replace("-", "_"), None)
        request.__dict__.pop(name.lower().replace("-", "_"), None)  # werkzeug's parsed copy (request.if_match)


def ignore_range() -> None:
    """The request is answered as if it had no Range: the whole video, 200."""
    request.environ.pop("HTTP_RANGE", None)  # what werkzeug and the bucket's stream read it from
    request.__dict__.pop("range", None)  # and werkzeug's parsed copy, if it was read already


class S3:
    """One bucket, through boto3 (any S3-compatible endpoint). Every call's failure becomes
    StorageUnavailable naming the bucket, never a stack trace to the client. A store that does
    not answer (s3.timeout_s, each call tried twice) is away for AWAY_S: calls fail at once."""

    def __init__(self, cfg):
        import boto3
        from botocore.config import Config

        self.cfg = cfg
        self.bucket = cfg.bucket
        self.prefix = cfg.prefix or ""
        options = dict(
            region_name=cfg.region,
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            config=Config(
                signature_version="s3v4",
                connect_timeout=min(CONNECT_TIMEOUT_S, cfg.timeout_s),
                read_timeout=cfg.timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )
        self.client = boto3.client("s3", endpoint_url=cfg.endpoint_url, **options)
        # presigned URLs carry the host they were signed for: the one clients reach
        self.signer = (
            boto3.client("s3", endpoint_url=cfg.public_endpoint_url, **options)
            if cfg.public_endpoint_url
            else self.client
        )
        self._away_until = 0.0  # time.monotonic(): until then the store is taken for away

    def key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    @property
    def away(self) -> bool:
        """Whether the store did not answer within the last AWAY_S (said by /health)."""
        return time.monotonic() < self._away_until

    def reachable(self, what: str) -> None:
        """StorageUnavailable at once while the store is away."""
        if self.away:
            raise StorageUnavailable(f"the object store does not answer ({what}, bucket {self.bucket})")

    def call(self, what: str, fn, **kw):
        """fn(Bucket=..., **kw); a missing key raises FileNotFoundError, any other failure
        StorageUnavailable (at once while the store is away)."""
        self.reachable(what)
        try:
            return fn(Bucket=self.bucket, **kw)
        except Exception as e:  # noqa: BLE001 - translated
            raise self.failure(what, e, kw.get("Key", "")) from e

    def failure(self, what: str, e: Exception, key: str = "") -> Exception:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as NoConnection

        if isinstance(e, Boto3Error):  # upload_file's S3UploadFailedError, ...
            log.warning("S3 %s in bucket %s failed: %s", what, self.bucket, e)
            return StorageUnavailable(f"the object store refused to {what} (bucket {self.bucket})")
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(key)
            log.warning("S3 %s in bucket %s failed: %s", what, self.bucket, code or e)
            return StorageUnavailable(f"the object store refused to {what} (bucket {self.bucket}: {code})")
        if isinstance(e, (BotoCoreError, OSError)):
            log.warning("S3 %s in bucket %s failed: %s", what, self.bucket, type(e).__name__)
            # the store itself silent or unreachable (timeouts, refused or dropped connections),
            # not this machine's own failure (a full disk under download_file is an OSError too)
            if isinstance(e, (NoConnection, HTTPClientError)):
                self._away_until = time.monotonic() + AWAY_S  # one float, set whole: no lock needed
            return StorageUnavailable(f"the object store does not answer ({what}, bucket {self.bucket})")
        return e

    def check(self) -> None:
        """At start-up: the bucket exists and these credentials may use it."""
        try:
            self.call("open the bucket", self.client.head_bucket)
        except (StorageUnavailable, FileNotFoundError) as e:
            from sonic.errors import SetupError

            where = self.cfg.endpoint_url or "AWS S3"
            raise SetupError(
                f"S3 bucket {self.bucket!r} at {where} cannot be used: it is missing, unreachable "
                f"or the credentials are refused (settings s3.*)"
            ) from e

    def listed(self, what: str, prefix: str) -> Iterator[list[dict]]:
        """The objects under `prefix`, page by page (boto3's object dicts), each page's request
        failing as call()'s do."""
        self.reachable(what)
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix))
        while True:
            try:
                page = next(pages)
            except StopIteration:
                return
            except Exception as e:  # noqa: BLE001 - translated
                raise self.failure(what, e) from e
            yield page.get("Contents", [])

    def delete_prefix(self, prefix: str) -> None:
        for objects in self.listed("list the uploads", prefix):
            keys = [{"Key": o["Key"]} for o in objects]
            if keys:
                self.call("delete", self.client.delete_objects, Delete={"Objects": keys, "Quiet": True})


class S3Uploads(Uploads):
    """A request's files: checked from the API's local copy, handed to the worker through the bucket."""

    def __init__(self, root: str | Path, s3: S3):
        super().__init__(root)
        self.s3 = s3

    def save(self, job_id: str, files: dict[str, bytes]) -> dict[str, str]:
        paths = super().save(job_id, files)
        for name, data in files.items():
            self.s3.call(
                "store an upload", self.s3.client.put_object, Key=self.s3.key("uploads", job_id, name), Body=data
            )
        return paths

    def drop_local_copy(self, job_id: str) -> None:
        """The job is queued (API), or this run of it is over (worker): the bucket holds its files;
        this machine's copy goes."""
        shutil.rmtree(self.root / job_id, ignore_errors=True)

    def fetch(self, job_id: str, inputs: dict[str, str]) -> dict[str, str]:
        """In the worker: the job's files from the bucket into this machine's upload_dir."""
        folder = self.root / job_id
        folder.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name in inputs:
            path = folder / name
            try:
                self.s3.call(
                    "read an upload",
                    self.s3.client.download_file,
                    Key=self.s3.key("uploads", job_id, name),
                    Filename=str(path),
                )
            except FileNotFoundError as e:
                raise StorageUnavailable(f"the job's {name} is missing from the object store") from e
            paths[name] = str(path)
        return paths

    def remove(self, job_id: str) -> None:
        super().remove(job_id)
        try:
            self.s3.delete_prefix(self.s3.key("uploads", job_id) + "/")
        except StorageUnavailable as e:  # an outage the log tells of already: one line, no trace
            log.warning("job %s: its uploads stay in the bucket for its lifecycle rule (%s)", job_id, e)
        except Exception:  # noqa: BLE001 - the bucket's lifecycle rule is the backstop
            log.exception("job %s: its uploads could not be removed from the bucket", job_id)


class S3Outputs:
    """Videos in the bucket: the worker's file is moved there; /output streams it or redirects."""

    remote: Literal[True] = True

    def __init__(self, folder: str | Path, s3: S3):
        self.folder = Path(folder)  # the worker's scratch folder
        self.s3 = s3

    def publish(self, name: str) -> None:
        path = self.folder / name
        self.s3.call(
            "store the video",
            self.s3.client.upload_file,
            Key=self.s3.key("outputs", name),
            Filename=str(path),
            ExtraArgs={"ContentType": "video/mp4"},
        )
        path.unlink(missing_ok=True)

    def touch(self, name: str) -> bool:
        """A copy onto itself restarts the object's Last-Modified (the time-to-live clock)."""
        key = self.s3.key("outputs", name)
        try:
            self.s3.call(
                "refresh a video",
                self.s3.client.copy_object,
                Key=key,
                ContentType="video/mp4",
                CopySource={"Bucket": self.s3.bucket, "Key": key},
                MetadataDirective="REPLACE",
            )
            return True
        except (FileNotFoundError, StorageUnavailable):
            return False

    def remove(self, name: str) -> None:
        """A deleted job's video: the object (and this machine's copy, if any)."""
        self.s3.call("delete a video", self.s3.client.delete_object, Key=self.s3.key("outputs", name))
        (self.folder / name).unlink(missing_ok=True)

    def expire(self, cutoff: float) -> int:
        """Delete the videos last written before `cutoff` (epoch s); how many."""
        gone = 0
        for objects in self.s3.listed("list the videos", self.s3.key("outputs") + "/"):
            old = [{"Key": o["Key"]} for o in objects if o["LastModified"].timestamp() < cutoff]
            if old:
                self.s3.call("delete", self.s3.client.delete_objects, Delete={"Objects": old, "Quiet": True})
                gone += len(old)
        return gone

    def url(self, name: str, proxied: str) -> str:
        if self.s3.cfg.video_url != "presigned":
            return proxied
        return self.s3.signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.s3.bucket, "Key": self.s3.key("outputs", name)},
            ExpiresIn=int(self.s3.cfg.url_ttl_s),
        )

    def response(self, name: str):
        """The video streamed from the bucket (one byte range, conditional GETs), or a redirect to a
        presigned URL; None when there is no such video."""
        if self.s3.cfg.video_url == "presigned":
            try:
                self.s3.call("find the video", self.s3.client.head_object, Key=self.s3.key("outputs", name))
            except FileNotFoundError:
                return None
            return Response(status=302, headers={"Location": self.url(name, ""), "Cache-Control": "no-store"})
        kw = {"Key": self.s3.key("outputs", name)}
        if request.method == "HEAD":  # the headers only: no body is opened
            try:
                head = self.s3.call("find the video", self.s3.client.head_object, **kw)
            except FileNotFoundError:
                return None
            video = Validators(head.get("ETag", "").strip('"'), int(head["LastModified"].timestamp()))
            answered = conditional_answer(verdict(request.headers, "HEAD", video), {"ETag": head.get("ETag", "")})
            return answered or Response(
                status=200, mimetype="video/mp4", headers=self._headers(head, head["ContentLength"])
            )
        if request.headers.get("If-Range") is not None:
            ignore_range()  # the bucket has no If-Range: the whole video, always right
        kw.update(bucket_conditions(request.headers))
        rng = request.range
        if rng is not None and len(rng.ranges) == 1:
            start, stop = rng.ranges[0]
            if start < 0:  # the last -start bytes
                kw["Range"] = f"bytes={start}"
            else:
                kw["Range"] = f"bytes={start}-" if stop is None else f"bytes={start}-{stop - 1}"
        from botocore.exceptions import ClientError

        self.s3.reachable("read the video")
        try:
            obj = self.s3.client.get_object(Bucket=self.s3.bucket, **kw)
        except ClientError as e:
            code, status = (
                e.response.get("Error", {}).get("Code", ""),
                e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"),
            )
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code == "InvalidRange" or status == 416:
                size = self._size(kw["Key"])
                return unsatisfiable_range(size)
            if status in (304, 412) or code in ("304", "PreconditionFailed"):
                sent = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
                validators = {"ETag": sent["etag"]} if sent.get("etag") else {}
                return conditional_answer(412 if status == 412 or code == "PreconditionFailed" else 304, validators)
            raise self.s3.failure("read the video", e) from e
        except Exception as e:  # noqa: BLE001 - botocore: unreachable
            raise self.s3.failure("read the video", e) from e
        body = obj["Body"]
        headers = self._headers(obj, obj["ContentLength"])
        if obj.get("ContentRange"):
            headers["Content-Range"] = obj["ContentRange"]

        def stream():
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return Response(
            stream(),
            status=206 if obj.get("ContentRange") else 200,
            mimetype="video/mp4",
            headers=headers,
            direct_passthrough=True,
        )

    @staticmethod
    def _headers(obj: dict, length: int) -> dict:
        headers = {
            "Accept-Ranges": "bytes",
            "Content-Length": str(length),
            "Cache-Control": VIDEO_CACHE,
        }
        if obj.get("ETag"):
            headers["ETag"] = obj["ETag"]
        if obj.get("LastModified"):
            from datetime import timezone
            from email.utils import format_datetime

            headers["Last-Modified"] = format_datetime(obj["LastModified"].astimezone(timezone.utc), usegmt=True)
        return headers

    def _size(self, key: str) -> int | None:
        try:
            return int(self.s3.call("find the video", self.s3.client.head_object, Key=key)["ContentLength"])
        except Exception:  # noqa: BLE001 - the size is a hint in the 416 answer
            return None


def bucket_conditions(headers) -> dict:
    """A request's conditions as get_object's arguments: the bucket decides them, in RFC 9110's
    order, before the range (a date that cannot be read, or a list of them, is ignored, as it is
    for a file)."""
    kw: dict = {}
    for header, arg in (("If-Match", "IfMatch"), ("If-None-Match", "IfNoneMatch")):
        if headers.get(header) is not None:
            kw[arg] = headers[header]
    for header, arg in (("If-Modified-Since", "IfModifiedSince"), ("If-Unmodified-Since", "IfUnmodifiedSince")):
        date = one_date(headers.get(header))
        if date is not None:
            kw[arg] = date
    return kw


def as_outputs(outputs):
    """A folder's path as FolderOutputs; outputs objects as they are."""
    return FolderOutputs(outputs) if isinstance(outputs, (str, Path)) else outputs


def open_storage(settings) -> tuple[Uploads, FolderOutputs | S3Outputs]:
    """(uploads, outputs) for these settings, their folders checked writable (SetupError naming
    the setting otherwise: every job would render, then fail). Nothing is contacted here: `check`
    the outputs' bucket (S3Outputs.s3.check) where a failure can be reported."""
    srv = settings.server
    folders = [("server.upload_dir", srv.upload_dir), ("output_dir", settings.output_dir)]
    if not srv.redis_url:  # one process: its job records (and accounts, webhook secret) live there
        folders.append(("server.data_dir", srv.data_dir))
    for name, folder in folders:
        writable_folder(folder, name)
    if settings.storage != "s3":
        return Uploads(srv.upload_dir), FolderOutputs(settings.output_dir)
    s3 = S3(settings.s3)
    return S3Uploads(srv.upload_dir, s3), S3Outputs(settings.output_dir, s3)


def writable_folder(folder: str, setting: str) -> None:
    """Make `folder` if need be and write a file in it; SetupError naming `setting` and the cause."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise SetupError(
            f"setting {setting}: the folder {folder!r} cannot be written: {e.strerror or type(e).__name__}"
        ) from None


def unsatisfiable_range(size: int | None):
    """416, the one error body, with the video's size (RFC 9110: a client asks again within it)."""
    headers = {"Content-Range": f"bytes */{size}"} if size is not None else None
    return error_response("http_error", "the requested range is not satisfiable", status=416, headers=headers)
