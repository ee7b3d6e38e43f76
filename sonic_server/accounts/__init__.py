"""Accounts, API keys and credits (credits.enabled; docs/credits.md).

- `schema`: the tables; `ledger`: the `Ledger` (accounts, keys, holds, charges, recharges, the
  audit log) and its small helpers; `settler`: the `Settler` that ends the holds of ended jobs;
  `billing`: the interface the routes call (who pays, hold, charge, release); `cli`:
  `sonic accounts`.
"""

from .billing import Billing, FusionHold, InsufficientCredits, NoAccount, Payer
from .ledger import CreditError, Ledger, Principal, check_amount, database_url, video_price
from .settler import Settler

__all__ = [
    "Billing",
    "CreditError",
    "FusionHold",
    "InsufficientCredits",
    "Ledger",
    "NoAccount",
    "Payer",
    "Principal",
    "Settler",
    "check_amount",
    "database_url",
    "video_price",
]
