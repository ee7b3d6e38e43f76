"""A job as clients see it: the document GET /api/sonic/jobs/<id> answers, SSE streams, listings
page through and webhooks deliver, built the same way wherever it is needed (an API process in a
request, a worker sending a webhook); and the address its URLs start with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import public_error
from .host_names import SENT_HOST
from .jobs import PROCESSING, QUEUED, SUCCEEDED, JobRecord, JobStatus

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

CANCELED = {"code": "canceled", "message": "the job was canceled"}
SUCCESSFUL = (QUEUED, PROCESSING, SUCCEEDED)  # a job that has not failed and was not canceled


@dataclass(frozen=True)
class JobUrls:
    status_url: str
    video_base: str  # the /output URL with NAME where the video's name goes
    outputs: Any  # the folder or the bucket: a presigned URL with storage: s3 (storage.py)

    @classmethod
    def under(cls, root: str, job_id: str, outputs: Any) -> JobUrls:
        """The URLs below the service's root URL (what a request's url_root was)."""
        root = root if root.endswith("/") else root + "/"
        return cls(f"{root}api/sonic/jobs/{job_id}", f"{root}output/NAME", outputs)


def ending_error(rec: JobRecord) -> dict:
    """Why a failed or canceled job did not succeed: its stored error, else `canceled` (a
    canceled record holds none), else `internal_error`."""
    if rec.error:
        return rec.error
    if rec.status == JobStatus.CANCELED:
        return dict(CANCELED)
    return {"code": "internal_error", "message": "the job failed"}


def job_document(rec: JobRecord, urls: JobUrls, ahead: int | None = None) -> dict:
    """The public view of a job: status, progress, and the result with its video_url or the error.
    `success` is false once the job has failed or was canceled, and then `error` says why.
    `ahead`: while it waits, the jobs that start before it (`queue_position`, 0: it is next)."""
    body = {"success": rec.status in SUCCESSFUL, **rec.public(), "status_url": urls.status_url}
    if rec.status == QUEUED and ahead is not None:
        body["queue_position"] = ahead
    if not body["success"]:
        body["error"] = ending_error(rec)
    if body.get("error"):
        body["error"] = public_error(body["error"])  # the record keeps the code; the status is derived
    result = body.pop("result", None)
    if result:
        body.update({k: v for k, v in result.items() if k != "file"})
        body["video_url"] = urls.outputs.url(result["file"], urls.video_base.replace("NAME", result["file"]))
    return body


class PublicAddress:
    """WSGI middleware for server.public_url: every request is answered as one sent to that
    address (its scheme and host), whatever Host it named. The URLs in answers (video_url,
    status_url, Location, a live session's state_url, webhooks' bodies) are built on the
    request's address; without this a client that names a foreign Host gets URLs on it, and a
    link shared from that answer leads there. Inside a proxy's forwarding (server.proxy_hops):
    the setting wins over X-Forwarded-Host and -Proto."""

    def __init__(self, app: WSGIApplication, url: str):
        parts = urlsplit(url)
        self.app, self.scheme, self.host = app, parts.scheme, parts.netloc

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.url_scheme"] = self.scheme
        environ[SENT_HOST] = environ.get("HTTP_HOST")  # still checked (server.allowed_hosts)
        environ["HTTP_HOST"] = self.host
        return self.app(environ, start_response)
