"""What the routes call to make a request pay (credits.enabled): who pays, hold the price before
any work, charge or release at the end. Refusals are errors with codes, answered by the one
error table like any other (`insufficient_credits`: 402 with `needed` and `balance`;
`forbidden`: 403). A job's hold is settled by the job's end (lifecycle.JobEnd calls the
settler), a fusion's by the request that held it.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sonic import SonicError

from .pricing import video_price

if TYPE_CHECKING:  # annotations only: the ledger (SQLAlchemy) loads with credits enabled
    from ..settings import CreditsSettings
    from .ledger import Ledger, Principal

log = logging.getLogger("sonic.credits")
LIVE_MIN_S = 60.0  # a live session holds at least a minute's credit


class InsufficientCredits(SonicError):
    """The price is more than the account's balance; `extra` goes into the error body."""

    code = "insufficient_credits"

    def __init__(self, what: str, needed: int, balance: int):
        super().__init__(f"{what} {needed} credits and the account has {balance}")
        self.extra = {"needed": needed, "balance": balance}


class NoAccount(SonicError):
    """A key that belongs to no account, where credits are enabled."""

    code = "forbidden"


@dataclass(frozen=True)
class Payer:
    account_id: int
    operator: str  # who the ledger says acted


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

    def hold_video(self, payer: Payer, job_id: str, seconds: float, request_id: str | None) -> None:
        """Hold the estimate of a video of `seconds` for the job, before it is queued."""
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.reserve(payer.account_id, job_id, needed, payer.operator, request_id)
        if not ok:
            raise InsufficientCredits("this video costs", needed, balance)

    def charge_cached(self, payer: Payer, seconds: float, job_id: str, request_id: str | None) -> None:
        """Charge a cached result of `seconds` (credits.charge_cache_hits) at once."""
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.charge(
            payer.account_id, needed, payer.operator, "a cached result", request_id, job_id
        )
        if not ok:
            raise InsufficientCredits("this video costs", needed, balance)

    def release(self, job_id: str) -> None:
        """The hold of a job that was not queued goes back (else the settler's sweep would, later)."""
        try:
            self.ledger.settle(job_id, False, reason="the job was not queued: nothing charged")
        except Exception:  # noqa: BLE001 - the request's own error matters more
            log.exception("the hold of job %s could not be released now; the settler will", job_id)

    def hold_live(self, payer: Payer, hold_id: str, max_seconds: float, request_id: str | None) -> float:
        """Hold credit for a live session: `max_seconds`' worth, or as many whole minutes as the
        balance affords; the seconds held (the session ends when it has streamed them)."""
        balance = self.ledger.balance(payer.account_id)
        seconds = float(max_seconds)
        while seconds > LIVE_MIN_S and video_price(self.credits, seconds) > balance:
            seconds = max(LIVE_MIN_S, (math.ceil(seconds / 60) - 1) * 60.0)
        needed = video_price(self.credits, seconds)
        ok, balance = self.ledger.reserve(payer.account_id, hold_id, needed, payer.operator, request_id, kind="live")
        if not ok:
            raise InsufficientCredits(f"a live session of {seconds:g} s costs", needed, balance)
        return seconds

    def hold_fusions(self, payer: Payer, count: int, request_id: str | None) -> FusionHold:
        price = self.credits.per_fusion
        hold = FusionHold("f" + uuid.uuid4().hex[:31], price)
        ok, balance = self.ledger.reserve(
            payer.account_id, hold.id, price * count, payer.operator, request_id, kind="fusion"
        )
        if not ok:
            raise InsufficientCredits(
                "these fusions cost" if count > 1 else "this fusion costs", price * count, balance
            )
        return hold

    def settle_fusions(self, hold: FusionHold, done: int) -> None:
        """Charge the fusions that were made, release the rest."""
        self.ledger.settle(hold.id, done > 0, hold.price * done, reason=f"{done} fusion(s)")
