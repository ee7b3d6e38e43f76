"""Accounts, API keys and credits on SQL (SQLAlchemy Core): SQLite by default
(`<data_dir>/credits.sqlite3`), PostgreSQL when `server.database_url` (SONIC_DATABASE_URL) names one.

Tables: `accounts` (name, role, balance), `api_keys` (SHA-256 digests only; a key is shown once,
when it is made), `ledger` (append-only: every change, with its operator, reason, request id and
time; database triggers refuse UPDATE and DELETE), `reservations` (one per job: held, then
charged or released, exactly once) and `idempotency` (the first answer of a recharge call, by key).

Every balance change is one UPDATE with its condition in SQL (`balance = balance - :n WHERE
balance >= :n`), in the same transaction as its ledger row, never a read-modify-write in
Python; so an account's balance always equals the sum of its ledger's deltas (`check`). Bulk
recharges lock their accounts in id order (no deadlock between overlapping calls).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sqlalchemy import (
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, SQLAlchemyError

from .schema import (
    _APPEND_ONLY,
    KEY_PREFIX_CHARS,
    MAX_BALANCE,
    ROLES,
    accounts,
    api_keys,
    idempotency,
    identity,
    ledger,
    metadata,
    reservations,
)


class CreditError(Exception):
    """A request the ledger refuses; `field` names what to change (the HTTP layer answers 400)."""

    def __init__(self, message: str, field: str | None = None, code: str = "invalid_parameter"):
        super().__init__(message)
        self.message, self.field, self.code = message, field, code


@dataclass(frozen=True)
class Principal:
    """Who a request is: an account (by key or token), or a flat server.api_keys key (no account)."""

    name: str
    role: str
    account_id: int | None
    via: str  # key | jwt | flat

    @property
    def operator(self) -> str:
        return f"{self.via}:{self.name}" if self.via != "key" else self.name


ANSWERS_KEPT_S = 2.0  # how long answers() trusts its last look at the database
DATABASE_AWAY = (OperationalError, InterfaceError)  # the errors of a database that does not answer


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


# the scheme PostgreSQL's own tools take, and the older one many hosts hand out (SQLAlchemy knows
# neither alias as a driver): both reach the installed driver, psycopg 3
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def database_url(settings) -> str:
    url = settings.server.database_url
    if url:
        scheme = next((s for s in POSTGRES_SCHEMES if url.startswith(s)), None)
        return "postgresql+psycopg://" + url[len(scheme) :] if scheme else url
    folder = Path(settings.server.data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'credits.sqlite3'}"


def shown_url(url: str) -> str:
    """A database URL as it may be shown: its password hidden."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


class Ledger:
    """The accounts database. Thread-safe (one engine, a connection per call)."""

    @classmethod
    def open(cls, url: str) -> "Ledger":
        """The ledger at `url`, or SetupError naming the database (its password hidden) and why."""
        try:
            return cls(url)
        except Exception as e:  # noqa: BLE001 - unreachable, refused, bad URL
            from sonic.errors import SetupError

            try:
                where = shown_url(url)
            except Exception:  # noqa: BLE001
                where = "server.database_url"
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0][:200]
            raise SetupError(f"the accounts database {where} cannot be opened: {why}") from e

    def __init__(self, url: str):
        self.url = url
        self.sqlite = url.startswith("sqlite")
        self._answers, self._answered_at = True, -ANSWERS_KEPT_S  # answers(): the last look
        self._asking = threading.Lock()
        if self.sqlite:

            def sqlite_engine(writer: bool):
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

                @event.listens_for(engine, "connect")
                def _connect(dbapi, _):
                    dbapi.isolation_level = None  # transactions are ours: BEGIN IMMEDIATE below
                    dbapi.execute("PRAGMA journal_mode=WAL")
                    dbapi.execute("PRAGMA foreign_keys=ON")
                    dbapi.execute("PRAGMA busy_timeout=30000")

                if writer:

                    @event.listens_for(engine, "begin")
                    def _begin(conn):
                        conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers queue here, never fail half-way

                return engine

            self.engine = sqlite_engine(writer=True)
            self.reader = sqlite_engine(writer=False)  # reads never wait for a writer (WAL)
        else:
            # a database that does not answer is an error within seconds, not a request held
            self.engine = create_engine(
                url, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args={"connect_timeout": 5}
            )
            self.reader = self.engine
        with self.engine.begin() as c:
            if self.engine.dialect.name == "postgresql":  # API processes starting together: one at a time
                c.exec_driver_sql("SELECT pg_advisory_xact_lock(74201)")
            metadata.create_all(c)
            for ddl in _APPEND_ONLY.get(self.engine.dialect.name, []):
                c.exec_driver_sql(ddl)
            self.owner_prefix = _owner_prefix(c)

    # -- accounts and keys ---------------------------------------------------------------
    def create_account(
        self,
        name: str,
        role: str = "user",
        credits: int = 0,
        operator: str = "cli",
        reason: str | None = None,
        request_id: str | None = None,
    ) -> tuple[dict, str]:
        """A new account with one new key; (the account, the key: shown this once)."""
        check_name(name)
        if role not in ROLES:
            raise CreditError(f"role must be one of {', '.join(ROLES)}", "role")
        check_amount(credits, MAX_BALANCE - 1, allow_zero=True)
        now = time.time()
        try:
            with self.engine.begin() as c:
                aid = c.execute(
                    insert(accounts)
                    .values(name=name, role=role, balance=int(credits), created=now)
                    .returning(accounts.c.id)
                ).scalar_one()
                self._log(
                    c,
                    aid,
                    "account_created",
                    int(credits),
                    int(credits),
                    operator,
                    reason or f"account created ({role})",
                    request_id,
                )
                key = self._add_key(c, aid, operator, request_id)
        except IntegrityError as e:
            raise CreditError(f"an account named {name!r} exists already", "name", "conflict") from e
        account = self.account(name)
        assert account is not None  # committed above, and accounts are never deleted
        return account, key

    def create_key(self, name: str, operator: str = "cli", request_id: str | None = None) -> str:
        with self.engine.begin() as c:
            row = c.execute(select(accounts.c.id).where(accounts.c.name == name)).first()
            if row is None:
                raise CreditError(f"no account named {name!r}", "name", "not_found")
            return self._add_key(c, row.id, operator, request_id)

    def _add_key(self, c, aid: int, operator: str, request_id: str | None) -> str:
        key = new_key()
        c.execute(
            insert(api_keys).values(
                account_id=aid, prefix=key[:KEY_PREFIX_CHARS], digest=digest(key), created=time.time()
            )
        )
        bal = c.execute(select(accounts.c.balance).where(accounts.c.id == aid)).scalar_one()
        self._log(c, aid, "key_created", 0, bal, operator, f"key {key[:KEY_PREFIX_CHARS]}", request_id)
        return key

    def revoke(self, prefix: str, operator: str = "cli", request_id: str | None = None) -> list[str]:
        """Revoke the live keys starting with `prefix` (at least 8 characters); their prefixes."""
        if len(prefix) < 8:
            raise CreditError("give at least the first 8 characters of the key", "prefix")
        now = time.time()
        with self.engine.begin() as c:
            rows = c.execute(
                select(api_keys.c.id, api_keys.c.account_id, api_keys.c.prefix).where(
                    api_keys.c.prefix.startswith(prefix[:KEY_PREFIX_CHARS]), api_keys.c.revoked.is_(None)
                )
            ).all()
            rows = [r for r in rows if r.prefix.startswith(prefix[:KEY_PREFIX_CHARS])]
            for r in rows:
                c.execute(update(api_keys).where(api_keys.c.id == r.id).values(revoked=now))
                bal = c.execute(select(accounts.c.balance).where(accounts.c.id == r.account_id)).scalar_one()
                self._log(c, r.account_id, "key_revoked", 0, bal, operator, f"key {r.prefix}", request_id)
        return [r.prefix for r in rows]

    def answers(self) -> bool:
        """Whether the database answers (for /health; asked at most every ANSWERS_KEPT_S, so
        that probes do not each open a connection, or wait out a connect timeout)."""
        if time.monotonic() - self._answered_at > ANSWERS_KEPT_S and self._asking.acquire(blocking=False):
            try:  # one probe asks; those arriving meanwhile take the last answer
                with self.reader.connect() as c:
                    c.execute(text("SELECT 1"))
                self._answers = True
            except SQLAlchemyError:
                self._answers = False
            finally:
                self._answered_at = time.monotonic()
                self._asking.release()
        return self._answers

    def authenticate(self, key: str) -> Principal | None:
        with self.reader.connect() as c:
            row = c.execute(
                select(accounts.c.id, accounts.c.name, accounts.c.role)
                .select_from(api_keys.join(accounts))
                .where(api_keys.c.digest == digest(key), api_keys.c.revoked.is_(None))
            ).first()
        return Principal(row.name, row.role, row.id, "key") if row else None

    def owner(self, account_id: int) -> str:
        """The account as job records and live sessions name their owner: unique to this database,
        so that another one's account of the same id sees none of them."""
        return f"account:{self.owner_prefix}{account_id}"

    def principal(self, name: str, role: str, via: str) -> Principal | None:
        """An account named by a token (`sub`); None if there is no such account."""
        with self.reader.connect() as c:
            row = c.execute(select(accounts.c.id).where(accounts.c.name == name)).first()
        return Principal(name, role, row.id, via) if row else None

    def account(self, name: str) -> dict | None:
        with self.reader.connect() as c:
            row = c.execute(select(accounts).where(accounts.c.name == name)).first()
            if row is None:
                return None
            keys = c.execute(
                select(api_keys.c.prefix, api_keys.c.created, api_keys.c.revoked)
                .where(api_keys.c.account_id == row.id)
                .order_by(api_keys.c.id)
            ).all()
            held = self._held(c, row.id)
        return {
            "name": row.name,
            "role": row.role,
            "balance": int(row.balance),
            "reserved": int(held),
            "created": row.created,
            "keys": [{"prefix": k.prefix, "created": k.created, "revoked": k.revoked} for k in keys],
        }

    def list_accounts(self) -> list[dict]:
        with self.reader.connect() as c:
            rows = c.execute(select(accounts.c.name, accounts.c.role, accounts.c.balance).order_by(accounts.c.name))
            return [{"name": r.name, "role": r.role, "balance": int(r.balance)} for r in rows]

    # -- metering ------------------------------------------------------------------------
    def balance(self, account_id: int) -> int:
        """An account's balance now."""
        with self.engine.connect() as c:
            return self._balance(c, account_id)

    def held_by(self, account_id: int) -> int:
        """What the account's holds take now (running jobs, live sessions, fusions): not in its balance."""
        with self.engine.connect() as c:
            return self._held(c, account_id)

    @staticmethod
    def _held(c, account_id: int) -> int:
        return int(
            c.execute(
                select(func.coalesce(func.sum(reservations.c.amount), 0)).where(
                    reservations.c.account_id == account_id, reservations.c.state == "held"
                )
            ).scalar_one()
        )

    def reserve(
        self, account_id: int, job_id: str, amount: int, operator: str, request_id: str | None = None, kind: str = "job"
    ) -> tuple[bool, int]:
        """Hold `amount` for a job (ids are the server's own); (held, the balance). Holding twice
        for one job and account holds once."""
        with self.engine.begin() as c:
            row = c.execute(select(reservations.c.account_id).where(reservations.c.job_id == job_id)).first()
            if row is not None:
                if row.account_id != account_id:
                    raise CreditError("this hold belongs to another account", "job_id", "conflict")
                return True, self._balance(c, account_id)
            bal = c.execute(
                update(accounts)
                .where(accounts.c.id == account_id, accounts.c.balance >= amount)
                .values(balance=accounts.c.balance - amount)
                .returning(accounts.c.balance)
            ).scalar()
            if bal is None:
                return False, self._balance(c, account_id)
            c.execute(
                insert(reservations).values(
                    job_id=job_id, account_id=account_id, amount=amount, state="held", kind=kind, created=time.time()
                )
            )
            self._log(c, account_id, "reserve", -amount, bal, operator, "estimate for the job", request_id, job_id)
        return True, int(bal)

    def settle(self, job_id: str, succeeded: bool, actual: int = 0, reason: str | None = None) -> bool:
        """End a job's reservation once: release it, and on success charge `actual` (at most what
        was held). False if there is none held (settled already, by this or another process)."""
        with self.engine.begin() as c:
            row = c.execute(
                update(reservations)
                .where(reservations.c.job_id == job_id, reservations.c.state == "held")
                .values(state="charged" if succeeded else "released")
                .returning(reservations.c.account_id, reservations.c.amount)
            ).first()
            if row is None:
                return False
            aid, held = row.account_id, int(row.amount)
            bal = c.execute(
                update(accounts)
                .where(accounts.c.id == aid)
                .values(balance=accounts.c.balance + held)
                .returning(accounts.c.balance)
            ).scalar_one()
            self._log(c, aid, "release", held, bal, "system", reason or "the job ended", None, job_id)
            if succeeded:
                amount = min(int(actual), held)
                bal = c.execute(
                    update(accounts)
                    .where(accounts.c.id == aid)
                    .values(balance=accounts.c.balance - amount)
                    .returning(accounts.c.balance)
                ).scalar_one()
                self._log(c, aid, "charge", -amount, bal, "system", reason or "video produced", None, job_id)
        return True

    def charge(
        self,
        account_id: int,
        amount: int,
        operator: str,
        reason: str,
        request_id: str | None = None,
        job_id: str | None = None,
    ) -> tuple[bool, int]:
        """Charge at once (a cached result, when hits are charged); (charged, the balance)."""
        with self.engine.begin() as c:
            bal = c.execute(
                update(accounts)
                .where(accounts.c.id == account_id, accounts.c.balance >= amount)
                .values(balance=accounts.c.balance - amount)
                .returning(accounts.c.balance)
            ).scalar()
            if bal is None:
                return False, self._balance(c, account_id)
            self._log(c, account_id, "charge", -amount, bal, operator, reason, request_id, job_id)
        return True, int(bal)

    def held(self, limit: int = 500) -> list:
        """Holds not yet ended, oldest first: rows of (job_id, kind, created)."""
        with self.reader.connect() as c:
            return c.execute(
                select(reservations.c.job_id, reservations.c.kind, reservations.c.created)
                .where(reservations.c.state == "held")
                .order_by(reservations.c.created)
                .limit(limit)
            ).all()

    # -- recharge ------------------------------------------------------------------------
    def recharge(
        self,
        users: list[str],
        amount: int,
        reason: str,
        mode: str,
        operator: str,
        idempotency_key: str | None = None,
        request_id: str | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[int, dict]:
        """Add `amount` to each account: `atomic` (all or none) or `soft` (each on its own, in a
        savepoint). (HTTP status, answer); with an idempotency key the first answer is replayed."""
        request = hashlib.sha256(json.dumps([sorted(users), amount, reason, mode]).encode()).hexdigest()
        if idempotency_key:
            stored = self._replay(idempotency_key, operator, request)
            if stored:
                return stored
        try:
            with self.engine.begin() as c:
                if mode == "atomic":
                    status, answer = self._recharge_atomic(c, users, amount, reason, operator, request_id)
                else:
                    status, answer = self._recharge_soft(c, users, amount, reason, operator, request_id)
                if idempotency_key:
                    c.execute(
                        insert(idempotency).values(
                            key=idempotency_key,
                            operator=operator,
                            request=request,
                            status=status,
                            response=json.dumps(answer),
                            created=time.time(),
                        )
                    )
                if before_commit:
                    before_commit()
        except IntegrityError:
            stored = self._replay(idempotency_key, operator, request) if idempotency_key else None
            if stored:  # the same key, committed meanwhile by a twin call
                return stored
            raise
        return status, answer

    def _replay(self, key: str, operator: str, request: str) -> tuple[int, dict] | None:
        """This operator's first answer for `key`; a different call under the same key is a 409."""
        with self.reader.connect() as c:
            row = c.execute(
                select(idempotency.c.status, idempotency.c.response, idempotency.c.request).where(
                    idempotency.c.key == key, idempotency.c.operator == operator
                )
            ).first()
        if row is None:
            return None
        if row.request != request:
            raise CreditError(
                "this idempotency_key was used for a different recharge (users, amount, reason or mode); use a new key",
                "idempotency_key",
                "conflict",
            )
        return row.status, {**json.loads(row.response), "replayed": True}

    def _lock(self, c, users: list[str]) -> dict[str, int]:
        """name -> id of the named accounts, locked in id order (PostgreSQL; SQLite's writer lock
        is already held)."""
        found = {}
        for i in range(0, len(users), 500):
            q = (
                select(accounts.c.id, accounts.c.name)
                .where(accounts.c.name.in_(users[i : i + 500]))
                .order_by(accounts.c.id)
                .with_for_update()
            )
            found.update({r.name: r.id for r in c.execute(q)})
        return found

    def _recharge_atomic(self, c, users, amount, reason, operator, request_id):
        found = self._lock(c, users)
        unknown = [u for u in users if u not in found]
        if unknown:
            raise CreditError(
                f"unknown accounts: {', '.join(unknown[:20])}"
                + (" ..." if len(unknown) > 20 else "")
                + "; nothing was recharged",
                "users",
            )
        ids = sorted(found.values())
        balances = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            for r in c.execute(
                update(accounts)
                .where(accounts.c.id.in_(chunk), accounts.c.balance <= MAX_BALANCE - amount)
                .values(balance=accounts.c.balance + amount)
                .returning(accounts.c.id, accounts.c.balance)
            ):
                balances[r.id] = int(r.balance)
        if len(balances) != len(ids):
            full = [n for n, i in found.items() if i not in balances]
            raise CreditError(
                f"the balance would pass its limit for: {', '.join(full[:20])}; nothing was recharged", "amount"
            )
        now = time.time()
        c.execute(
            insert(ledger),
            [
                dict(
                    account_id=i,
                    kind="recharge",
                    delta=amount,
                    balance=balances[i],
                    operator=operator,
                    reason=reason,
                    request_id=request_id,
                    created=now,
                    job_id=None,
                )
                for i in ids
            ],
        )
        return 200, {"success": True, "mode": "atomic", "amount": amount, "succeeded": list(users), "failed_users": []}

    def _recharge_soft(self, c, users, amount, reason, operator, request_id):
        found = self._lock(c, users)
        succeeded, failed = [], []
        for name in sorted(users, key=lambda n: found.get(n, 0)):
            if name not in found:
                failed.append({"user": name, "reason": "unknown account"})
                continue
            try:
                with c.begin_nested():
                    bal = c.execute(
                        update(accounts)
                        .where(accounts.c.id == found[name], accounts.c.balance <= MAX_BALANCE - amount)
                        .values(balance=accounts.c.balance + amount)
                        .returning(accounts.c.balance)
                    ).scalar()
                    if bal is None:
                        raise CreditError("the balance would pass its limit")
                    self._log(c, found[name], "recharge", amount, bal, operator, reason, request_id)
                succeeded.append(name)
            except CreditError as e:
                failed.append({"user": name, "reason": e.message})
        order = {n: i for i, n in enumerate(users)}
        succeeded.sort(key=order.get)
        failed.sort(key=lambda f: order[f["user"]])
        return 200, {
            "success": not failed,
            "mode": "soft",
            "amount": amount,
            "succeeded": succeeded,
            "failed_users": failed,
        }

    # -- reading -------------------------------------------------------------------------
    def entries(
        self,
        *,
        account: str | None = None,
        operator: str | None = None,
        since: float | None = None,
        until: float | None = None,
        before: int | None = None,
        limit: int = 50,
    ) -> tuple[list[dict], int | None]:
        """Ledger rows, newest first, filtered; (rows, the `before` of the next page or None)."""
        q = select(ledger, accounts.c.name).select_from(ledger.join(accounts)).order_by(ledger.c.id.desc())
        if account is not None:
            q = q.where(accounts.c.name == account)
        if operator is not None:
            q = q.where(ledger.c.operator == operator)
        if since is not None:
            q = q.where(ledger.c.created >= since)
        if until is not None:
            q = q.where(ledger.c.created < until)
        if before is not None:
            q = q.where(ledger.c.id < before)
        with self.reader.connect() as c:
            rows = c.execute(q.limit(limit + 1)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        out = [
            {
                "id": int(r.id),
                "account": r.name,
                "kind": r.kind,
                "delta": int(r.delta),
                "balance": int(r.balance),
                "job_id": r.job_id,
                "operator": r.operator,
                "reason": r.reason,
                "request_id": r.request_id,
                "time": r.created,
            }
            for r in rows
        ]
        return out, (out[-1]["id"] if more and out else None)

    def check(self) -> list[dict]:
        """Accounts whose balance is not the sum of their ledger (empty: all consistent)."""
        sums = (
            select(ledger.c.account_id, func.sum(ledger.c.delta).label("total"))
            .group_by(ledger.c.account_id)
            .subquery()
        )
        q = select(accounts.c.name, accounts.c.balance, func.coalesce(sums.c.total, 0).label("total")).select_from(
            accounts.outerjoin(sums, sums.c.account_id == accounts.c.id)
        )
        with self.reader.connect() as c:
            return [
                {"account": r.name, "balance": int(r.balance), "ledger_sum": int(r.total)}
                for r in c.execute(q)
                if int(r.balance) != int(r.total)
            ]

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def _balance(c, account_id: int) -> int:
        return int(c.execute(select(accounts.c.balance).where(accounts.c.id == account_id)).scalar_one())

    @staticmethod
    def _log(
        c,
        aid: int,
        kind: str,
        delta: int,
        balance: int,
        operator: str,
        reason: str | None,
        request_id: str | None,
        job_id: str | None = None,
    ) -> None:
        c.execute(
            insert(ledger).values(
                account_id=aid,
                kind=kind,
                delta=int(delta),
                balance=int(balance),
                operator=operator,
                reason=reason,
                request_id=request_id,
                job_id=job_id,
                created=time.time(),
            )
        )

    def close(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()


def check_name(name) -> None:
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name):
        raise CreditError(
            "an account name is 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit", "name"
        )


MAX_REASON_CHARS = 500


def check_reason(reason, field: str = "reason") -> str:
    """A recharge's reason, for the audit log: text that is not blank (the route and the CLI alike)."""
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_CHARS or "\x00" in reason:
        raise CreditError(f"{field} is required (1-{MAX_REASON_CHARS} characters, not blank)", field)
    return reason


def _owner_prefix(c) -> str:
    """This database's part of its accounts' names in job records (`Ledger.owner`), made once,
    in the transaction that made the tables. A database that had accounts before it had one
    keeps the records' old names (account:<id>): its jobs stay its accounts'."""
    prefix = c.execute(select(identity.c.value).where(identity.c.key == "owner_prefix")).scalar()
    if prefix is None:
        had_accounts = c.execute(select(func.count()).select_from(accounts)).scalar() > 0
        prefix = "" if had_accounts else secrets.token_hex(4) + ":"
        c.execute(insert(identity).values(key="owner_prefix", value=prefix))
    return str(prefix)


def check_amount(amount, limit: int, allow_zero: bool = False, field: str = "amount") -> int:
    if isinstance(amount, bool) or not isinstance(amount, int):
        written = " (written as an integer: no decimal point or exponent)" if isinstance(amount, float) else ""
        raise CreditError(f"{field} must be a whole number of credits{written}", field)
    if amount < 0 or (amount == 0 and not allow_zero):
        raise CreditError(f"{field} must be positive", field)
    if amount > limit:
        raise CreditError(f"{field} must be at most {limit}", field)
    return amount
