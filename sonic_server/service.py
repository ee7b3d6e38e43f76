"""What the routes reach through `current_app`: the settings they use, read once in create_app,
the upload folder, and the job queue once the model has loaded."""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from flask import current_app

from sonic.errors import Busy
from sonic.media import AUDIO_DECODES

from .host_limits import short_of_disk
from .outbound import Reach
from .queue import JobQueue
from .settings import ServerConfig
from .uploads import Uploads

if TYPE_CHECKING:  # annotations only: accounts load only with credits, fusion at the first fusion
    from .accounts import Billing, Ledger, Settler
    from .drain import Drain
    from .idempotency import IdempotencyStore
    from .live.remote import RemoteSessions
    from .live.sessions import LiveSessions
    from .routes.fusion import FusionEngine
    from .storage import FolderOutputs, S3Outputs
    from .webhooks import Webhooks


def upload_check_refused(full: bool) -> Busy:
    """What a request is told when its upload cannot be checked now."""
    if full:
        return Busy(
            f"{2 * AUDIO_DECODES} uploads are being checked or waiting, the most this server allows; retry shortly"
        )
    return Busy(
        f"this caller has {AUDIO_DECODES} uploads being checked at once, the most one key or account may "
        "(half of this server's); send the next when one is answered"
    )


class Slots:
    """At most `limit` holders at once (e.g. open event streams, each of which holds a thread),
    and at most `per_holder` (a quarter of them, one at least, unless told) for any one named
    holder: one key could take every event stream, and everyone else had to poll."""

    def __init__(self, limit: int, per_holder: int | None = None):
        self.limit, self.held = limit, 0
        self.per_holder = per_holder if per_holder is not None else max(1, -(-limit // 4))
        self._by_holder: Counter[str] = Counter()
        self._lock = threading.Lock()

    def take(self, holder: str | None = None) -> bool:
        """A slot for `holder` (None: anyone, counted only in the whole)."""
        with self._lock:
            if self.held >= self.limit or (holder is not None and self._by_holder[holder] >= self.per_holder):
                return False
            self.held += 1
            if holder is not None:
                self._by_holder[holder] += 1
            return True

    def full(self) -> bool:
        """Every slot is held (else a refusal was the holder's own share)."""
        with self._lock:
            return self.held >= self.limit

    @contextmanager
    def holding(self, holder: str | None, refusal: Callable[[bool], Exception]) -> Iterator[None]:
        """A slot for `holder` while the block runs; else `refusal(full)` is raised (full: every
        slot was held, not only the holder's share)."""
        if not self.take(holder):
            raise refusal(self.full())
        try:
            yield
        finally:
            self.give_back(holder)

    def given_back_once(self, holder: str | None = None) -> Callable[[], None]:
        """A call that gives `holder`'s slot back the first time it is made and does nothing
        after: for a response's close, which more than one layer of a WSGI stack may call."""
        pending = [True]

        def give_back() -> None:
            with self._lock:
                if not pending:
                    return
                pending.clear()
            self.give_back(holder)

        return give_back

    def give_back(self, holder: str | None = None) -> None:
        with self._lock:
            self.held -= 1
            if holder is not None:
                self._by_holder[holder] -= 1
                if self._by_holder[holder] <= 0:
                    del self._by_holder[holder]


@dataclass
class Service:
    settings: ServerConfig  # sonic_server/settings.py: parameter defaults, limits, folders, the server
    uploads: Uploads  # the folder, or a bucket's stand-in (storage.S3Uploads)
    output_dir: Path  # videos, served from /output/<name>
    outputs: FolderOutputs | S3Outputs  # where the videos are: the folder, or a bucket (sonic_server/storage.py)
    sync_wait_s: float  # a synchronous request waits this long, then gets 202
    retry_after_s: str  # Retry-After of a 503 for a full queue
    event_streams: Slots = field(default_factory=lambda: Slots(32))
    fetches: Slots = field(default_factory=lambda: Slots(8))  # requests fetching inputs by URL (outbound)
    reach: Reach = field(default_factory=Reach)  # where those fetches and webhooks may go (outbound.*)
    # uploads being checked (decoded) at once, as many as sonic.media's decode slots and their
    # waiting places, half of them for one key or account: one caller's flood of long recordings
    # refused every other caller's uploads at once (503 busy)
    upload_checks: Slots = field(default_factory=lambda: Slots(2 * AUDIO_DECODES, per_holder=AUDIO_DECODES))
    queue: JobQueue | None = None
    status: str = "starting"  # starting | ready | setup_failed
    setup_error: str | None = None  # why setup failed, for /health (a checkpoint file and key, ...)
    decoder: str | None = None  # the loaded pipeline's decoder and device, once ready
    device: str | None = None
    decoder_identity: str | None = None  # the decoder and its weights: part of the result cache key
    ledger: Ledger | None = None  # accounts and credits (credits.enabled; sonic_server/accounts/)
    billing: Billing | None = None  # what the routes call to make a request pay (credits.enabled)
    settler: Settler | None = None  # ends the credit holds of jobs that have ended
    fusion: FusionEngine | None = None  # the face fusion engine, made at the first fusion (routes/fusion.py)
    webhooks: Webhooks | None = None  # job webhooks: deliveries made and sent (sonic_server/webhooks.py)
    idempotency: IdempotencyStore | None = None  # Idempotency-Key answers (sonic_server/idempotency.py)
    drain: Drain | None = None  # the stop's drain: how long a synchronous wait may still wait (drain.py)
    live: LiveSessions | RemoteSessions | None = None  # live sessions: here, or on the workers (sonic_server/live/)

    def loaded_decoder_identity(self) -> str:
        """The loaded decoder's identity (the result cache keys on it): this process's pipeline's,
        or what the workers announced (distributed mode)."""
        if self.decoder_identity:
            return self.decoder_identity
        return (self.queue.decoder_identity() if self.queue else None) or self.decoder or "warp"

    def free_disk_short_mb(self) -> float | None:
        """Without Redis (the jobs run here): the free MB of the disk under output_dir or
        upload_dir when under server.min_free_mb, else None. Such a service failed every job
        `disk_full` while /health said ready; it now takes none (routes/generate.py) and
        /health says disk_full. With Redis each worker looks at its own (worker.py)."""
        srv = self.settings.server
        if srv.redis_url or srv.min_free_mb <= 0:
            return None
        return short_of_disk([self.output_dir, Path(srv.upload_dir)], srv.min_free_mb)

    def loaded_decoder(self) -> str | None:
        """The name of the decoder that renders this service's jobs, once known."""
        return self.decoder or (self.loaded_decoder_identity().split("-")[0] if self.queue else None)


def service() -> Service:
    return current_app.extensions["sonic"]
