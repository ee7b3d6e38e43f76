"""The accounts database's tables (SQLAlchemy Core), their limits, and the triggers that keep
the ledger append-only."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()
ROLES = ("user", "admin")
MAX_BALANCE = 2**62  # no balance grows past this (a bigint with room to spare)
KEY_PREFIX_CHARS = 12  # "sk_" and 9 more: what lists and `revoke` show of a key
NAME_CHARS = 64

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(NAME_CHARS), nullable=False, unique=True),
    Column("role", String(8), nullable=False),
    Column("balance", BigInteger, nullable=False),
    Column("created", Float, nullable=False),
    CheckConstraint("balance >= 0", name="balance_not_negative"),
)
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("prefix", String(KEY_PREFIX_CHARS), nullable=False, index=True),
    Column("digest", String(64), nullable=False, unique=True),
    Column("created", Float, nullable=False),
    Column("revoked", Float, nullable=True),
)
ledger = Table(
    "ledger",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column(
        "kind", String(16), nullable=False
    ),  # account_created recharge reserve charge release key_created key_revoked
    Column("delta", BigInteger, nullable=False),
    Column("balance", BigInteger, nullable=False),  # the account's balance after this row
    Column("job_id", String(32)),
    Column("operator", String(NAME_CHARS + 8), nullable=False),
    Column("reason", String(500)),
    Column("request_id", String(64)),
    Column("created", Float, nullable=False),
    Index("ledger_account", "account_id", "id"),
    Index("ledger_created", "created"),
)
reservations = Table(
    "reservations",
    metadata,
    Column("job_id", String(32), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("state", String(8), nullable=False),  # held | charged | released
    Column("kind", String(8), nullable=False),  # job (ended by its record) | fusion (ended by its request)
    Column("created", Float, nullable=False),
    Index("reservations_state", "state"),
)
idempotency = Table(
    "idempotency",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("operator", String(NAME_CHARS + 8), primary_key=True),  # one operator's key is not another's
    Column("request", String(64), nullable=False),  # SHA-256 of the call it answered
    Column("status", Integer, nullable=False),
    Column("response", Text, nullable=False),
    Column("created", Float, nullable=False),
)

# what this database is, for what outlives a move to another one: `owner_prefix` names its
# accounts in job records (account:<prefix><id>), so that a new database, numbering its accounts
# from 1 again, does not hand the old one's jobs to its own accounts
identity = Table(
    "identity",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("value", String(64), nullable=False),
)

_APPEND_ONLY = {
    "sqlite": [
        "CREATE TRIGGER IF NOT EXISTS ledger_no_update BEFORE UPDATE ON ledger "
        "BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS ledger_no_delete BEFORE DELETE ON ledger "
        "BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END",
    ],
    "postgresql": [
        "CREATE OR REPLACE FUNCTION ledger_append_only() RETURNS trigger AS $$ BEGIN "
        "RAISE EXCEPTION 'the ledger is append-only'; END $$ LANGUAGE plpgsql",
        "DROP TRIGGER IF EXISTS ledger_append_only ON ledger",
        "CREATE TRIGGER ledger_append_only BEFORE UPDATE OR DELETE ON ledger "
        "FOR EACH ROW EXECUTE FUNCTION ledger_append_only()",
    ],
}
