"""Credits (registered only with credits.enabled): a caller's own balance and ledger, and the
admin routes: an account, the audit log, bulk recharge. docs/credits.md."""

from __future__ import annotations

import re

from flask import Blueprint, g, jsonify, request

from ..accounts import CreditError, check_amount, check_reason
from ..errors import error_response
from ..json_input import MAX_VALUES, json_object_body
from ..openapi import content, describe, error, path_parameter
from ..service import service

bp = Blueprint("credits", __name__)
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
path_parameter("account", ACCOUNT_NAME, "an account's name")
MODES = ("atomic", "soft")
RECHARGE_FIELDS = {"users", "amount", "reason", "mode", "idempotency_key"}
ENTRY = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "account": {"type": "string"},
        "kind": {"type": "string"},
        "delta": {"type": "integer"},
        "balance": {"type": "integer"},
        "job_id": {"type": "string", "nullable": True},
        "operator": {"type": "string"},
        "reason": {"type": "string", "nullable": True},
        "request_id": {"type": "string", "nullable": True},
        "time": {"type": "number"},
    },
}
PAGE: dict = {  # a JSON schema, spread into others below
    "type": "object",
    "properties": {"entries": {"type": "array", "items": ENTRY}, "next_before": {"type": "integer", "nullable": True}},
}


PAGE_MAX = 1000  # entries in one page of a ledger or of the audit


def _int_arg(name: str, default=None, minimum: int = 0, maximum: int | None = None):
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"[0-9]{1,18}", raw) or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        within = f"from {minimum} to {maximum}" if maximum is not None else f"of at least {minimum}"
        raise CreditError(f"{name} must be a whole number {within}", name)
    return int(raw)


def _float_arg(name: str):
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not -1e12 < value < 1e12:  # nan, inf and the absurd
        raise CreditError(f"{name} must be a time in seconds since the epoch", name)
    return value


def _page(**filters):
    svc = service()
    limit = _int_arg("limit", min(svc.settings.credits.ledger_page, PAGE_MAX), 1, PAGE_MAX)  # never cut silently
    entries, more = svc.ledger.entries(before=_int_arg("before", None, 1), limit=limit, **filters)
    return {"entries": entries, "next_before": more}


def _credit_error(e: CreditError):
    return error_response(e.code, e.message, e.field)


bp.register_error_handler(CreditError, _credit_error)


@bp.get("/api/credits")
@describe(
    "Your balance and your ledger (newest first; ?before=<id>&limit=N pages)",
    responses={
        200: (
            "balance and ledger",
            content(
                "application/json",
                {
                    "type": "object",
                    "properties": {
                        "account": {"type": "string"},
                        "role": {"type": "string"},
                        "balance": {"type": "integer"},
                        "reserved": {"type": "integer"},
                        **PAGE["properties"],
                    },
                },
            ),
        ),
        400: error("a bad query parameter"),
        403: error("a key without an account"),
    },
)
def my_credits():
    p = g.principal
    if p.account_id is None:
        return error_response("forbidden", "this key belongs to no account")
    acct = service().ledger.account(p.name)
    return jsonify(
        {
            "account": acct["name"],
            "role": acct["role"],
            "balance": acct["balance"],
            "reserved": acct["reserved"],
            **_page(account=p.name),
        }
    )


@bp.get("/api/admin/accounts/<account>")
@describe(
    "An account: role, balance, keys (prefixes only) and its recent ledger (admin)",
    responses={
        200: ("the account", content("application/json", {"type": "object"})),
        403: error("not an admin"),
        404: error("no such account"),
    },
)
def account(account):
    acct = service().ledger.account(account) if ACCOUNT_NAME.fullmatch(account) else None
    if acct is None:
        return error_response("not_found", "no such account")
    return jsonify({**acct, **_page(account=account)})


@bp.get("/api/admin/audit")
@describe(
    "The audit log: every change, newest first (admin); filters: account, operator, since, until "
    "(epoch seconds), before (an entry id), limit",
    responses={
        200: ("entries", content("application/json", PAGE)),
        400: error("a bad query parameter"),
        403: error("not an admin"),
    },
)
def audit():
    for name in ("account", "operator"):
        if "\x00" in request.args.get(name, ""):
            raise CreditError(f"{name} must not contain NUL", name)
    return jsonify(
        _page(
            account=request.args.get("account"),
            operator=request.args.get("operator"),
            since=_float_arg("since"),
            until=_float_arg("until"),
        )
    )


RECHARGE_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["users", "amount", "reason"],
                "properties": {
                    "users": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                    "amount": {"type": "integer", "minimum": 1},
                    "reason": {"type": "string", "minLength": 1},
                    "mode": {"type": "string", "enum": list(MODES), "default": "atomic"},
                    "idempotency_key": {"type": "string", "maxLength": 200},
                },
            }
        }
    },
}


@bp.post("/api/admin/credits/recharge")
@describe(
    "Recharge many accounts at once (admin): atomic (all or none) or soft (each on its own)",
    request_body=RECHARGE_BODY,
    responses={
        200: (
            "applied (soft: see failed_users), or the first answer replayed for its idempotency_key",
            content("application/json", {"type": "object"}),
        ),
        400: error("a bad field (named); atomic: an unknown account, nothing applied"),
        403: error("not an admin"),
    },
)
def recharge():
    svc = service()
    cfg = svc.settings.credits
    # a value per account, and a few more: a recharge may name max_recharge_users accounts
    body = json_object_body("the body must be a JSON object", max_values=max(MAX_VALUES, 2 * cfg.max_recharge_users))
    unknown = sorted(set(body) - RECHARGE_FIELDS)
    if unknown:
        return error_response("invalid_parameter", f"unknown field {unknown[0]!r}", unknown[0])
    users = body.get("users")
    if not isinstance(users, list) or not users or not all(isinstance(u, str) and u for u in users):
        return error_response("invalid_parameter", "users must be a non-empty list of account names", "users")
    if len(users) > cfg.max_recharge_users:
        return error_response(
            "invalid_parameter",
            f"at most {cfg.max_recharge_users} users per call (credits.max_recharge_users)",
            "users",
        )
    seen, dupes = set(), []
    for u in users:
        if u in seen and u not in dupes:
            dupes.append(u)
        seen.add(u)
    if dupes:
        return error_response("invalid_parameter", f"users named twice: {', '.join(dupes[:20])}", "users")
    if any("\x00" in u or len(u) > 64 for u in users):
        return error_response("invalid_parameter", "an account name is at most 64 characters, without NUL", "users")
    check_amount(body.get("amount"), cfg.max_recharge_amount)
    reason = check_reason(body.get("reason"))
    mode = body.get("mode", "atomic")
    if mode not in MODES:
        return error_response("invalid_parameter", f"mode must be one of {', '.join(MODES)}", "mode")
    key = body.get("idempotency_key")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= 200 or "\x00" in key):
        return error_response(
            "invalid_parameter", "idempotency_key must be a string of 1-200 characters", "idempotency_key"
        )
    status, answer = svc.ledger.recharge(
        users,
        body["amount"],
        reason.strip(),
        mode,
        g.principal.operator,
        idempotency_key=key,
        request_id=g.get("request_id"),
    )
    resp = jsonify({**answer, "request_id": g.get("request_id")})
    resp.status_code = status
    return resp
