"""`sonic accounts`: manage accounts, keys and credits in the service's database (the same one
the server uses: server.database_url / SONIC_DATABASE_URL, else <data_dir>/credits.sqlite3).

  sonic accounts create NAME [--admin] [--credits N]   a new account; prints its key (shown once)
  sonic accounts key NAME                              another key for an account
  sonic accounts list                                  accounts, roles, balances
  sonic accounts show NAME                             one account, its keys and recent ledger
  sonic accounts revoke KEY_PREFIX                     revoke keys by their first characters
  sonic accounts recharge NAME... --amount N --reason TEXT [--soft] [--idempotency-key K]
  sonic accounts check                                 balances against ledger sums; exit 1 on a mismatch
Every change is written to the ledger with the operator `cli:<user>`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from sonic.errors import SonicError
from sonic.settings import SettingsError

from ..settings import load_settings


def main(argv: list[str] | None = None, prog: str = "sonic accounts") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="settings YAML over the shipped configs/default.yaml")
    # --config after the command too (`sonic accounts list --config s.yaml`), as operators type it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--config", default=argparse.SUPPRESS, help="settings YAML (as before the command)")
    commands = ap.add_subparsers(dest="command", required=True)

    def command(name: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[after])

    c = command("create")
    c.add_argument("name")
    c.add_argument("--admin", action="store_true")
    c.add_argument("--credits", type=int, default=0)
    c.add_argument("--reason")
    command("key").add_argument("name")
    command("list")
    command("show").add_argument("name")
    command("revoke").add_argument("prefix")
    r = command("recharge")
    r.add_argument("names", nargs="+")
    r.add_argument("--amount", type=int, required=True)
    r.add_argument("--reason", required=True)
    r.add_argument("--soft", action="store_true", help="each account on its own (default: all or none)")
    r.add_argument("--idempotency-key")
    command("check")
    a = ap.parse_args(argv)
    from .ledger import CreditError, Ledger, check_amount, check_reason, database_url, shown_url

    try:
        settings = load_settings(a.config)
        url = database_url(settings)
        ledger = Ledger.open(url)
    except SettingsError as e:
        sys.exit(f"error: {e}")
    except SonicError as e:  # the database cannot be opened
        sys.exit(f"error: {e.message}")
    # which one: a relative data_dir follows the working folder (another folder, another database)
    print(f"accounts database: {shown_url(url)}", file=sys.stderr)
    operator = f"cli:{getpass.getuser()}"
    try:
        if a.command == "create":
            acct, key = ledger.create_account(a.name, "admin" if a.admin else "user", a.credits, operator, a.reason)
            print(f"account {acct['name']} ({acct['role']}), balance {acct['balance']}")
            print(f"key: {key}")
            print("(the key is shown this once; it is stored hashed)", file=sys.stderr)
        elif a.command == "key":
            print(f"key: {ledger.create_key(a.name, operator)}")
        elif a.command == "list":
            for acct in ledger.list_accounts():
                print(f"{acct['name']:<32} {acct['role']:<6} {acct['balance']:>14}")
        elif a.command == "show":
            shown = ledger.account(a.name)
            if shown is None:
                sys.exit(f"error: no account named {a.name!r}")
            entries, _ = ledger.entries(account=a.name, limit=20)
            print(json.dumps({**shown, "ledger": entries}, indent=2))
        elif a.command == "revoke":
            revoked = ledger.revoke(a.prefix, operator)
            if not revoked:
                sys.exit(f"error: no live key starts with {a.prefix!r}")
            print("revoked: " + ", ".join(revoked))
        elif a.command == "recharge":
            if len(set(a.names)) != len(a.names):
                sys.exit("error: an account is named twice")
            check_amount(a.amount, settings.credits.max_recharge_amount)
            check_reason(a.reason)
            status, answer = ledger.recharge(
                a.names, a.amount, a.reason, "soft" if a.soft else "atomic", operator, idempotency_key=a.idempotency_key
            )
            print(json.dumps(answer, indent=2))
            if answer.get("failed_users"):
                sys.exit(1)
        elif a.command == "check":
            bad = ledger.check()
            for b in bad:
                print(f"MISMATCH {b['account']}: balance {b['balance']}, ledger sum {b['ledger_sum']}")
            if bad:
                sys.exit(1)
            print(f"ok: {len(ledger.list_accounts())} accounts, every balance equals its ledger's sum")
    except CreditError as e:
        sys.exit(f"error: {e.message}")
    finally:
        ledger.close()
