"""The settler: ends the credit holds of jobs that have ended, and releases the holds a dead
process left."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: not imported at run time
    from ..queue import JobQueue

from ..errors import redis_not_answering
from ..jobs import CANCELED, FAILED, SUCCEEDED
from .ledger import Ledger

MISSING_RECORD_GRACE_S = 120  # a job hold without a record this long is released
ORPHAN_FUSION_S = 600  # a fusion hold still held after this was left by a process that died
log = logging.getLogger("sonic.credits")


class Settler:
    """Ends the reservations of jobs that have ended: a thread in each API process (any number
    may run: a reservation is settled once). Also called at once where a job's end is seen."""

    def __init__(
        self,
        ledger_: Ledger,
        queue_getter: Callable[[], JobQueue | None],
        price: Callable[[dict], int],
        every_s: float = 2.0,
        live_session: Callable[[str], Any] | None = None,
        live_orphan_s: float = 3600.0 + ORPHAN_FUSION_S,
    ):
        """`live_session(hold_id)`: the record of the live session that streams against a hold
        (distributed mode: sonic_server/live/relay.py), None where unknown; `live_orphan_s`: the
        age after which a live hold nobody knows of was left by a process that died (longer than
        any session may last)."""
        self.ledger, self.queue_getter, self.price, self.every_s = ledger_, queue_getter, price, every_s
        self.live_session, self.live_orphan_s = live_session, live_orphan_s
        self._stop = threading.Event()

    def settle(self, rec) -> None:
        """`rec`: a job record (or None: the record is gone, so the hold is released)."""
        if rec is None:
            return
        if rec.status == SUCCEEDED:
            self.ledger.settle(rec.id, True, self.price(rec.result or {}))
        elif rec.status in (FAILED, CANCELED):
            self.ledger.settle(rec.id, False, reason=f"the job {rec.status}: nothing charged")

    def settle_ended(self, rec) -> None:
        """`settle`, as a job's end-of-job step: with the accounts database away, one log line
        (the sweep settles it once the database answers), not a trace. The sweep itself calls
        `settle`: its failures are said once an outage, by `run`."""
        from .ledger import DATABASE_AWAY

        try:
            self.settle(rec)
        except DATABASE_AWAY as e:
            log.warning("job %s: settled once the accounts database answers again (%s)", rec.id, type(e).__name__)

    def sweep(self, now: float | None = None) -> None:
        """Job holds whose job has ended are settled; a job hold whose record is missing (after a
        grace: the record is saved just after the hold) and a fusion hold left by a process that
        died mid-request are released."""
        queue = self.queue_getter()
        if queue is None:
            return
        now = time.time() if now is None else now
        for job_id, kind, created in self.ledger.held():
            if kind == "live":
                self._sweep_live(job_id, now - created)
                continue
            if kind != "job":
                if now - created > ORPHAN_FUSION_S:
                    self.ledger.settle(job_id, False, reason="the request ended without settling: nothing charged")
                continue
            rec = queue.get(job_id)
            if rec is None:
                if now - created > MISSING_RECORD_GRACE_S:
                    self.ledger.settle(job_id, False, reason="the job record is gone: nothing charged")
            else:
                self.settle(rec)

    def _sweep_live(self, hold_id: str, age_s: float) -> None:
        """A live hold is settled when its session ended: normally by whoever ended it; here when
        that process died before settling (its record says what was streamed). One nobody knows
        of is released once no session could still be using it."""
        rec = self.live_session(hold_id) if self.live_session is not None else None
        if rec is not None:
            if rec.ended is not None:
                streamed = float(rec.streamed_s)
                reason = f"live session {rec.id}: {streamed:.1f} s ({rec.ended}), settled by the sweep"
                self.ledger.settle(hold_id, streamed > 0, self.price({"duration": streamed}), reason=reason)
            return
        if age_s > self.live_orphan_s:
            self.ledger.settle(
                hold_id, False, reason="the live session's server ended without settling: nothing charged"
            )

    def run(self) -> None:
        # a store not answering is said once, not with a trace every sweep: the accounts
        # database, or (distributed) the job store the sweep reads the jobs' ends from
        away: str | None = None
        while not self._stop.wait(self.every_s):
            try:
                self.sweep()
                if away:
                    log.warning("settling reservations: the %s answers again", away)
                away = None
            except Exception as e:  # noqa: BLE001 - whatever it is, the next sweep tries again
                store = _not_answering(e)
                if store is None:
                    log.exception("settling reservations failed")
                elif away != store:
                    log.warning("settling reservations: the %s does not answer (%s)", store, type(e).__name__)
                away = store or away

    def start(self) -> None:
        threading.Thread(target=self.run, name="sonic-credits", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


def _not_answering(error: Exception) -> str | None:
    """The store that does not answer, as an error of its client says; None for other errors."""
    from .ledger import DATABASE_AWAY

    if isinstance(error, DATABASE_AWAY):
        return "accounts database"
    return "job store (Redis)" if redis_not_answering(error) else None
