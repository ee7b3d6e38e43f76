"""What the routes call to make a request pay (credits.enabled): who pays, hold the price before
any work, charge or release at the end. Refusals are errors with codes, answered by the one
error table like any other (`insufficient_credits`: 402 with `needed`, `balance` and `held`;
`forbidden`: 403). A job's hold is settled by the job's end (lifecycle.JobEnd calls the
settler), a fusion's by the request that held it.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sonic import SonicError

from .pricing import video_price

if TYPE_CHECKING:  # annotations only: the ledger (SQLAlchemy) loads with credits enabled
    from ..settings import CreditsSettings
    from .ledger import Ledger, Principal

log = logging.getLogger("sonic.credits")
LIVE_MIN_S = 3.0  # a live session holds at least this many seconds' credit


def credits(n: int) -> str:
    return "credit" if n == 1 else "credits"


class InsufficientCredits(SonicError):
    """The price is more than the account's balance; `extra` goes into the error body."""

    code = "insufficient_credits"

    def __init__(self, what: str, needed: int, balance: int, held: int = 0):
        # what its running jobs and live sessions hold is not in the balance: said, or a caller
        # whose account lists more than the price is left to wonder (a live session holds an hour)
        besides = f" ({held} more held until its running jobs, live sessions and fusions end)" if held else ""
        super().__init__(f"{what} {needed} {credits(needed)} and the account has {balance}{besides}")
        self.extra = {"needed": needed, "balance": balance, "held": held}


class NoAccount(SonicError):
    """A key that belongs to no account, where credits are enabled."""

    code = "forbidden"


@dataclass(frozen=True)
class Payer:
    account_id: int
    operator: str  # who the ledger says acted


@dataclass(frozen=True)
class LiveHold:
    id: str  # the server's own id for the hold
    seconds: float  # what it covers: the session streams at most this long


@dataclass(frozen=True)
class FusionHold:
    id: str  # the server's own id for the hold, never the client's
    price: int  # of one fusion


class Billing:
    def __init__(self, ledger: Ledger, credits: CreditsSettings):
        self.ledger, self.credits = ledger, credits

    def payer(self, principal: Principal, what: str) -> Payer:
        """The account that pays for the request; NoAccount for a key without one."""
        if principal.account_id is None:
            raise NoAccount(f"{what} an account's key or token (credits are enabled); this key belongs to no account")
        return Payer(principal.account_id, principal.operator)

    def _refusal(self, payer: Payer, what: str, needed: int, balance: int) -> InsufficientCredits:
        """The 402, with what the account's holds take (left out, 0, where the database stopped
        answering since its balance was read: the refusal stands, and is no 503)."""
        from .ledger import DATABASE_AWAY  # loaded by now: the ledger answered the balance

        try:
            held = self.ledger.held_by(payer.account_id)
        except DATABASE_AWAY:
            held = 0
        return InsufficientCredits(what, needed, balance, held)

    def check_video(self, payer: Payer, seconds: float, exact: bool) -> None:
        """Before a request's files are decoded: whether the account can pay for a video of
        `seconds` (`exact`: its length is known, else the least it can be), so that an account
        that cannot pay is answered at once, without the decoding (a read: nothing is held)."""
        needed = video_price(self.credits, seconds)
        balance = self.ledger.balance(payer.account_id)
        if balance < needed:
            raise self._refusal(payer, "this video costs" if exact else "a video costs at least", needed, balance)

    def hold_video(self, payer: Payer, job_id: str, seconds: float, request_id: str | None) -> None:
        """Hold the estimate of a video of `seconds` for the job, before it is queued."""
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.reserve(payer.account_id, job_id, needed, payer.operator, request_id)
        if not ok:
            raise self._refusal(payer, "this video costs", needed, balance)

    def charge_cached(self, payer: Payer, seconds: float, job_id: str, request_id: str | None) -> None:
        """Charge a cached result of `seconds` (credits.charge_cache_hits) at once."""
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.charge(
            payer.account_id, needed, payer.operator, "a cached result", request_id, job_id
        )
        if not ok:
            raise self._refusal(payer, "this video costs", needed, balance)

    def release(self, job_id: str) -> None:
        """The hold of a job that was not queued goes back (else the settler's sweep would, later)."""
        try:
            self.ledger.settle(job_id, False, reason="the job was not queued: nothing charged")
        except Exception:  # noqa: BLE001 - the request's own error matters more
            log.exception("the hold of job %s could not be released now; the settler will", job_id)

    def hold_live(self, payer: Payer, max_seconds: float, request_id: str | None) -> LiveHold:
        """Hold credit for a live session: `max_seconds`' worth, or the whole seconds the balance
        affords (the session ends when it has streamed them: credit_exhausted)."""
        balance = self.ledger.balance(payer.account_id)
        per_second, per_request = self.credits.per_video_second, self.credits.per_request
        affordable = (balance - per_request) // per_second if per_second else max_seconds
        seconds = float(min(max_seconds, affordable))
        if seconds < LIVE_MIN_S:
            raise self._refusal(
                payer,
                f"a live session holds at least {LIVE_MIN_S:g} s of credit, which costs",
                video_price(self.credits, LIVE_MIN_S),
                balance,
            )
        hold = LiveHold("l" + uuid.uuid4().hex[:31], seconds)
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.reserve(payer.account_id, hold.id, needed, payer.operator, request_id, kind="live")
        if not ok:  # spent meanwhile by another request
            raise self._refusal(payer, f"a live session of {seconds:g} s costs", needed, balance)
        return hold

    def settle_live(self, hold: LiveHold, streamed_s: float, reason: str) -> None:
        """Charge the seconds a live session streamed (nothing if none), release the rest."""
        self.ledger.settle(hold.id, streamed_s > 0, video_price(self.credits, streamed_s), reason=reason)

    def hold_fusions(self, payer: Payer, count: int, request_id: str | None) -> FusionHold:
        price = self.credits.per_fusion
        hold = FusionHold("f" + uuid.uuid4().hex[:31], price)
        ok, balance = self.ledger.reserve(
            payer.account_id, hold.id, price * count, payer.operator, request_id, kind="fusion"
        )
        if not ok:
            raise self._refusal(
                payer, "these fusions cost" if count > 1 else "this fusion costs", price * count, balance
            )
        return hold

    def settle_fusions(self, hold: FusionHold, done: int) -> None:
        """Charge the fusions that were made, release the rest."""
        self.ledger.settle(hold.id, done > 0, hold.price * done, reason=f"{done} fusion(s)")
