"""Accounts, API keys and credits (credits.enabled; docs/credits.md).

- `schema`: the tables; `ledger`: the `Ledger` (accounts, keys, holds, charges, recharges, the
  audit log) and its small helpers; `settler`: the `Settler` that ends the holds of ended jobs;
  `billing`: the interface the routes call (who pays, hold, charge, release); `pricing`: what
  things cost; `cli`: `sonic accounts`.

The names below are imported on first use: a service without credits never loads SQLAlchemy.
"""

from importlib import import_module

_EXPORTS = {
    "billing": ["Billing", "FusionHold", "InsufficientCredits", "NoAccount", "Payer"],
    "ledger": ["CreditError", "Ledger", "Principal", "check_amount", "check_reason", "database_url"],
    "pricing": ["cost", "video_price"],
    "settler": ["Settler"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
