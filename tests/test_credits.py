"""Accounts and credits (credits.enabled): keys and tokens, per-second metering with holds, bulk
recharge (atomic, soft, idempotent), the ledger and its check; on SQLite and on a real PostgreSQL
(Debian's postgresql, a fresh cluster on a free port). The HTTP side runs in Flask's test client
with a stand-in model."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT
from pg_helpers import Postgres
from server_helpers import FakePipeline, assert_clean_error, post, settings
from test_http_live import free_port

FAST = {"min_resolution": 256}


@pytest.fixture(scope="module")
def postgres():
    pg = Postgres(free_port())
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A fresh database of each kind, as server.database_url names it."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'credits.sqlite3'}"
    return request.getfixturevalue("postgres").new_database()


def ledger_for(url):
    from sonic_server.accounts import Ledger
    return Ledger(url.replace("postgresql://", "postgresql+psycopg://", 1))


@pytest.fixture
def service(tmp_path):
    """service(pipeline=None, database_url=None, **credits) -> (client, ledger, app)."""
    from sonic_server import create_app
    apps = []

    def make(pipeline=None, database_url=None, api_keys=(), **credits):
        cfg = settings(tmp_path, database_url=database_url, api_keys=list(api_keys))
        cfg["credits"] = {"enabled": True, **credits}
        app = create_app(cfg, pipeline=pipeline or FakePipeline())
        apps.append(app)
        return app.test_client(), app.extensions["sonic"].ledger, app
    yield make
    for app in apps:
        svc = app.extensions["sonic"]
        svc.settler.stop()
        if svc.queue is not None:
            svc.queue.close()
        svc.ledger.close()


def auth(key):
    return {"Authorization": f"Bearer {key}"}


def wait_settled(ledger, job_id, timeout=10):
    from sonic_server.accounts.schema import reservations
    from sqlalchemy import select
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ledger.engine.connect() as c:
            state = c.execute(select(reservations.c.state).where(reservations.c.job_id == job_id)).scalar()
        if state in ("charged", "released"):
            return state
        time.sleep(0.05)
    pytest.fail(f"the hold of job {job_id} was never settled")


# -- metering over HTTP ------------------------------------------------------------------------
def test_a_video_is_charged_per_second_after_a_hold_and_402_comes_before_any_work(service):
    pipe = FakePipeline()
    client, ledger, app = service(pipe, per_video_second=10, per_request=2)
    _, key = ledger.create_account("ann", credits=40)
    assert_clean_error(post(client, FAST), 401, "unauthorized")
    r = post(client, FAST, headers=auth(key))                     # 3.0 s: 30 + 2 held, then charged
    assert r.status_code == 200, r.get_json()
    assert ledger.account("ann")["balance"] == 8 and ledger.account("ann")["reserved"] == 0
    kinds = [(e["kind"], e["delta"]) for e in ledger.entries(account="ann")[0]]
    assert kinds[:3] == [("charge", -32), ("release", 32), ("reserve", -32)]
    # too little left: 402 with what is needed, before anything is queued or rendered
    calls = len(pipe.calls)
    r = post(client, {**FAST, "seed": 2}, headers=auth(key))
    assert_clean_error(r, 402, "insufficient_credits")
    assert r.get_json()["error"]["needed"] == 32 and r.get_json()["error"]["balance"] == 8
    assert r.get_json()["error"]["held"] == 0 and "held" not in r.get_json()["error"]["message"]
    assert len(pipe.calls) == calls and app.extensions["sonic"].queue.queue_length() == 0
    # what a live session (or a running job) holds is not in the balance: the refusal says so
    assert ledger.reserve(ledger.authenticate(key).account_id, "l" + "0" * 31, 6, "test", kind="live") == (True, 2)
    r = post(client, {**FAST, "seed": 2}, headers=auth(key))
    assert_clean_error(r, 402, "insufficient_credits")
    assert (r.get_json()["error"]["balance"], r.get_json()["error"]["held"]) == (2, 6)
    assert r.get_json()["error"]["message"].endswith(
        "and the account has 2 (6 more held until its running jobs, live sessions and fusions end)")
    ledger.settle("l" + "0" * 31, False, reason="test")
    assert not any((app.extensions["sonic"].uploads.root).iterdir())
    # the requested duration is what is estimated: 0.5 s costs 5 + 2
    r = post(client, {**FAST, "seed": 3, "duration": 0.5}, headers=auth(key))
    assert r.status_code == 200 and ledger.account("ann")["balance"] == 1
    assert ledger.check() == []


def test_a_video_is_priced_by_its_frames_and_an_account_that_cannot_pay_is_refused_before_decoding(service, tmp_path):
    """A duration under half a frame was priced at 0 credits, held 0, and still rendered a
    frame, charged 0 (the charge is capped at the hold): a video for nothing from an empty
    account. And an account that could not pay had its upload decoded before the 402 (a 39 MP
    PNG: 1.85 s of CPU per request)."""
    pipe = FakePipeline()
    client, ledger, _ = service(pipe, per_video_second=10, per_request=0)
    _, broke = ledger.create_account("bob", credits=0)
    r = post(client, {**FAST, "duration": 1e-300, "fps": 10}, headers=auth(broke))
    assert_clean_error(r, 402, "insufficient_credits")
    assert r.get_json()["error"]["needed"] == 1 and not pipe.calls     # one frame, 0.1 s: 1 credit
    garbage = tmp_path / "not-an-image.jpg"
    garbage.write_bytes(b"\x00" * 4096)
    r = post(client, FAST, image=garbage, headers=auth(broke))         # 402, not 415: nothing was decoded
    assert_clean_error(r, 402, "insufficient_credits")
    assert "at least 1 credit and" in r.get_json()["error"]["message"]
    _, key = ledger.create_account("cy", credits=1)
    r = post(client, {**FAST, "duration": 0.01, "fps": 10}, headers=auth(key))
    assert r.status_code == 200, r.get_json()
    assert ledger.account("cy")["balance"] == 0 and ledger.check() == []             # its frame paid for


def test_failed_and_canceled_jobs_cost_nothing_and_cache_hits_are_free_unless_set(service):
    from sonic import PipelineError
    client, ledger, _ = service(FakePipeline(error=PipelineError("the render broke")))
    _, key = ledger.create_account("bo", credits=100)
    r = post(client, FAST, headers=auth(key))
    assert r.status_code == 500 and ledger.account("bo")["balance"] == 100
    gate = threading.Event()
    client, ledger, _ = service(FakePipeline(gate=gate))
    _, key = ledger.create_account("cy", credits=100)
    job = post(client, {**FAST, "async": True}, headers=auth(key)).get_json()["job_id"]
    assert ledger.account("cy")["reserved"] == 30
    assert client.post(f"/api/sonic/jobs/{job}/cancel", headers=auth(key)).get_json()["status"] == "canceled"
    assert wait_settled(ledger, job) == "released" and ledger.account("cy")["balance"] == 100
    gate.set()
    # a cached result: free by default ...
    done = post(client, {**FAST, "seed": 9}, headers=auth(key))
    assert done.status_code == 200 and ledger.account("cy")["balance"] == 70
    hit = post(client, {**FAST, "seed": 9}, headers=auth(key))
    assert hit.get_json()["cached"] is True and ledger.account("cy")["balance"] == 70
    # ... or charged like a new one, with the same 402
    client, ledger, _ = service(charge_cache_hits=True)
    _, key = ledger.create_account("di", credits=45)
    assert post(client, {**FAST, "seed": 9}, headers=auth(key)).status_code == 200        # 30
    assert post(client, {**FAST, "seed": 9}, headers=auth(key)).status_code == 402        # 15 left, hit costs 30
    assert ledger.account("di")["balance"] == 15 and ledger.check() == []


def test_a_deleted_job_releases_its_hold_at_once_whoever_ended_it(service):
    """A running job deleted: its hold is released by the delete itself. Where the process that
    ended the job did not settle it (a worker without the accounts, a failed settle), the record
    was gone by the sweep, which waits 2 minutes for a missing record: the caller's credits stayed
    held that long (measured: 118 s)."""
    gate = threading.Event()
    client, ledger, app = service(FakePipeline(gate=gate))
    svc = app.extensions["sonic"]
    svc.queue.ending.hooks.remove(svc.settler.settle_ended)  # the job ends elsewhere, unsettled
    _, key = ledger.create_account("del", credits=100)
    job = post(client, {**FAST, "async": True}, headers=auth(key)).get_json()["job_id"]
    assert ledger.account("del")["reserved"] == 30
    assert client.delete(f"/api/sonic/jobs/{job}", headers=auth(key)).status_code == 204
    gate.set()
    assert ledger.account("del")["reserved"] == 0 and ledger.account("del")["balance"] == 100


def test_a_new_accounts_database_does_not_hand_the_old_ones_jobs_to_its_accounts(service, tmp_path):
    """The accounts moved to a new database (SQLite to PostgreSQL, as the docs advise), the job
    records kept: the new database numbers its accounts from 1 again, and its first account saw,
    fetched and could delete the old first account's jobs. Job owners now carry the database's
    own name; a database that had accounts before it had one keeps the old names, so that an
    upgrade leaves every account its jobs."""
    from sqlalchemy import delete
    from sonic_server.accounts.schema import identity

    client, old, _ = service(database_url=f"sqlite:///{tmp_path / 'old.sqlite3'}")
    _, alice = old.create_account("alice", credits=100)
    job = post(client, FAST, headers=auth(alice)).get_json()["job_id"]
    assert client.get(f"/api/sonic/jobs/{job}", headers=auth(alice)).status_code == 200
    client, new, _ = service(database_url=f"sqlite:///{tmp_path / 'new.sqlite3'}")  # same job records
    _, carol = new.create_account("carol", credits=100)
    assert new.authenticate(carol).account_id == old.authenticate(alice).account_id == 1
    assert_clean_error(client.get(f"/api/sonic/jobs/{job}", headers=auth(carol)), 404, "job_not_found")
    assert client.get("/api/sonic/jobs", headers=auth(carol)).get_json()["jobs"] == []
    assert client.delete(f"/api/sonic/jobs/{job}", headers=auth(carol)).status_code == 404
    # a database from before owners had its name: its accounts keep the records' old names
    with old.engine.begin() as c:
        c.execute(delete(identity))
    from sonic_server.accounts import Ledger
    upgraded = Ledger(old.url)
    assert upgraded.owner(1) == "account:1" and new.owner(1) != "account:1"
    upgraded.close()


def test_a_retry_with_an_idempotency_key_is_not_charged_twice(service):
    """charge_cache_hits on: without a key a repeat pays again; with the same Idempotency-Key,
    the retry gets the first answer and pays nothing (a fusion alike)."""
    import base64

    from conftest import EXAMPLES

    client, ledger, _ = service(charge_cache_hits=True)
    _, key = ledger.create_account("ida", credits=200)
    once = {"Idempotency-Key": "retry-me", **auth(key)}
    first = post(client, {**FAST, "seed": 31}, headers=once)
    assert first.status_code == 200 and ledger.account("ida")["balance"] == 170
    again = post(client, {**FAST, "seed": 31}, headers=once)
    assert again.get_json()["job_id"] == first.get_json()["job_id"] and ledger.account("ida")["balance"] == 170
    image = base64.b64encode((EXAMPLES / "portrait.jpg").read_bytes()).decode()
    body = {"source_image": image, "target_image": image}
    fused = [client.post("/fusion", json=body, headers={"Idempotency-Key": "fuse-1", **auth(key)}) for _ in range(2)]
    assert fused[0].status_code == fused[1].status_code == 200
    assert fused[0].get_json()["result"] == fused[1].get_json()["result"]
    price = 170 - ledger.account("ida")["balance"]
    assert price > 0 and client.post("/fusion", json=body, headers=auth(key)).status_code == 200
    assert 170 - ledger.account("ida")["balance"] == 2 * price and ledger.check() == []  # unkeyed: paid again


def test_the_settler_leaves_young_holds_alone(service):
    client, ledger, app = service()
    ledger.create_account("hy", credits=100)
    settler = app.extensions["sonic"].settler
    assert ledger.reserve(1, "f" + "1" * 31, 10, "hy", kind="fusion")[0]         # a fusion in flight
    assert ledger.reserve(1, "a" * 32, 10, "hy")[0]                              # a job not yet queued
    settler.sweep()
    assert ledger.account("hy")["reserved"] == 20
    settler.sweep(now=time.time() + 3600)                                        # left by a dead process
    assert ledger.account("hy")["reserved"] == 0 and ledger.account("hy")["balance"] == 100
    with pytest.raises(Exception, match="another account"):                      # a hold is its account's
        ledger.create_account("other")
        ledger.reserve(2, "a" * 32, 10, "other")


def test_a_live_hold_is_swept_only_when_no_session_can_be_using_it(service):
    """A live session may stream for max_session_s (an hour by default): its hold is not a
    fusion's, released after ten minutes; it is settled when its session's record (distributed
    mode) says it ended, or released once no session could still be using it."""
    from sonic_server.live.relay import LiveRecord

    client, ledger, app = service(per_video_second=1)
    ledger.create_account("lv", credits=100)
    settler = app.extensions["sonic"].settler
    assert ledger.reserve(1, "l" + "1" * 31, 30, "lv", kind="live")[0]
    settler.sweep(now=time.time() + 1200)  # a 20-minute session, still streaming
    assert ledger.account("lv")["reserved"] == 30
    ended = {"l" + "2" * 31: LiveRecord("s2", "w1", None, 0.0, "l" + "2" * 31, 30.0, 7.2, "worker_lost", 0.0)}
    settler.live_session = ended.get  # the session's record, as Redis keeps it
    assert ledger.reserve(1, "l" + "2" * 31, 30, "lv", kind="live")[0]
    settler.sweep()  # ended, its settling process gone: the record's 7.2 s are charged
    assert ledger.account("lv")["reserved"] == 30 and ledger.account("lv")["balance"] == 100 - 30 - 8
    settler.sweep(now=time.time() + settler.live_orphan_s + 1)  # nobody could be using the first now
    assert ledger.account("lv")["reserved"] == 0 and ledger.account("lv")["balance"] == 92 and ledger.check() == []


def test_a_live_session_whose_settling_failed_is_charged_by_the_sweep(service, pipeline):
    """One process: the accounts database failing as a session ends (SQLite's "database is
    locked") left its hold to the sweep, which released it as nothing charged: the session was
    free. The sweep now charges what it streamed."""
    from sonic.live import prepare_live_face
    from sonic_server.live.sessions import LiveSessions
    from sonic_server.settings import LiveSettings
    from test_live_http import _offer

    _, ledger, app = service(per_video_second=1)
    ledger.create_account("lf", credits=100)
    hold = "l" + "3" * 31
    assert ledger.reserve(1, hold, 30, "lf", kind="live")[0]
    live = LiveSessions(LiveSettings(processes=False, warm_start=False, host_addresses=["127.0.0.1"]))
    options = pipeline.options({"min_resolution": 256})
    face = prepare_live_face(pipeline, str(ROOT / "examples" / "portrait.jpg"), options)

    def locked(session):
        raise RuntimeError("(sqlite3.OperationalError) database is locked")

    live.take_slot(None)
    session, _ = live.open(face, options, _offer(), None, 30.0, locked, hold_id=hold)
    session.stats.frames_sent = 180  # 7.2 s streamed at 25 fps
    assert live.end(session.id, "client_closed")
    settler = app.extensions["sonic"].settler
    settler.live_session = live.session_of_hold  # as create_app wires it to the service's sessions
    settler.sweep(now=time.time() + settler.live_orphan_s + 1)
    account = ledger.account("lf")
    assert account["reserved"] == 0 and account["balance"] == 100 - 8 and ledger.check() == []


def test_an_async_job_is_settled_once_by_the_settler_even_if_nobody_asks(service):
    client, ledger, _ = service()
    _, key = ledger.create_account("ed", credits=100)
    job = post(client, {**FAST, "async": True}, headers=auth(key)).get_json()["job_id"]
    assert wait_settled(ledger, job) == "charged" and ledger.account("ed")["balance"] == 70
    for _ in range(3):                                          # reading it again charges nothing more
        assert client.get(f"/api/sonic/jobs/{job}", headers=auth(key)).get_json()["status"] == "succeeded"
    assert ledger.account("ed")["balance"] == 70
    assert [e["kind"] for e in ledger.entries(account="ed")[0]].count("charge") == 1


# -- who may do what -------------------------------------------------------------------------
def test_an_accounts_database_that_does_not_answer_is_a_503_and_health_says_so(service):
    """PostgreSQL stopped under a running service: every request that needs the accounts (a
    key's check first) was a 500 internal_error while /health said ready; now 503
    storage_unavailable + Retry-After, /health says `accounts: unavailable`, and both recover."""
    from sqlalchemy import create_engine

    client, ledger, _ = service()
    _, key = ledger.create_account("ann", credits=100)
    assert client.get("/api/credits", headers=auth(key)).status_code == 200
    working = (ledger.engine, ledger.reader)
    away = create_engine(f"postgresql+psycopg://sonic@127.0.0.1:{free_port()}/sonic",  # nothing listens there
                         connect_args={"connect_timeout": 2})
    ledger.engine = ledger.reader = away
    try:
        for r in (client.get("/api/credits", headers=auth(key)), post(client, FAST, headers=auth(key))):
            assert_clean_error(r, 503, "storage_unavailable")
            assert "accounts database" in r.get_json()["error"]["message"] and r.headers["Retry-After"]
        ledger._answered_at = -1e9  # its last look is past (it keeps one ANSWERS_KEPT_S)
        health = client.get("/health")  # said, but still 200: downloads and flat keys go on
        assert health.status_code == 200 and health.get_json()["accounts"] == "unavailable"
    finally:
        ledger.engine, ledger.reader = working
        away.dispose()
    ledger._answered_at = -1e9
    assert client.get("/health").get_json()["accounts"] == "ok"
    assert client.get("/api/credits", headers=auth(key)).status_code == 200


def test_keys_roles_and_flat_keys(service):
    client, ledger, _ = service(api_keys=["flat-operator-key"])
    _, user = ledger.create_account("fay", credits=10)
    _, admin = ledger.create_account("root", role="admin")
    assert client.get("/api/credits", headers=auth(user)).get_json()["balance"] == 10
    assert_clean_error(client.get("/api/admin/audit", headers=auth(user)), 403, "forbidden")
    assert client.get("/api/admin/audit", headers=auth(admin)).status_code == 200
    assert client.get("/api/admin/audit", headers=auth("flat-operator-key")).status_code == 200
    assert_clean_error(post(client, FAST, headers=auth("flat-operator-key")), 403, "forbidden")
    assert_clean_error(client.get("/api/credits", headers=auth("sk_not-a-key")), 401, "unauthorized")
    revoked = ledger.revoke(user[:12], "test")
    assert revoked == [user[:12]]
    assert_clean_error(client.get("/api/credits", headers=auth(user)), 401, "unauthorized")
    assert client.get("/health").status_code == 200                 # outside /api/: open
    acct = client.get("/api/admin/accounts/fay", headers=auth(admin)).get_json()
    assert acct["keys"][0]["revoked"] and "digest" not in str(acct)
    assert [e["kind"] for e in acct["entries"]] == ["key_revoked", "key_created", "account_created"]
    assert_clean_error(client.get("/api/admin/accounts/nobody", headers=auth(admin)), 404, "not_found")


def test_jwt_bearer_tokens_hs256_and_rs256(service, tmp_path):
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(public)
    secret = "a-long-shared-secret-for-hs256-tokens"
    client, ledger, _ = service(jwt_secret=secret, jwt_public_key=str(tmp_path / "jwt.pub"))
    ledger.create_account("gus", credits=30)
    now = int(time.time())
    hs = jwt.encode({"sub": "gus", "exp": now + 60}, secret, algorithm="HS256")
    assert client.get("/api/credits", headers=auth(hs)).get_json()["account"] == "gus"
    assert post(client, FAST, headers=auth(hs)).status_code == 200 and ledger.account("gus")["balance"] == 0
    rs_admin = jwt.encode({"sub": "gus", "role": "admin", "exp": now + 60}, private, algorithm="RS256")
    assert client.get("/api/admin/audit?account=gus", headers=auth(rs_admin)).status_code == 200
    expired = jwt.encode({"sub": "gus", "exp": now - 5}, secret, algorithm="HS256")
    r = client.get("/api/credits", headers=auth(expired))
    assert_clean_error(r, 401, "unauthorized")
    assert "expired" in r.get_json()["error"]["message"]
    forged = jwt.encode({"sub": "gus", "role": "admin"}, "another-secret-that-is-long-enough", algorithm="HS256")
    assert_clean_error(client.get("/api/credits", headers=auth(forged)), 401, "unauthorized")
    stranger = jwt.encode({"sub": "nobody"}, secret, algorithm="HS256")
    assert_clean_error(client.get("/api/credits", headers=auth(stranger)), 401, "unauthorized")
    none_alg = jwt.encode({"sub": "gus", "role": "admin"}, None, algorithm="none")
    assert_clean_error(client.get("/api/credits", headers=auth(none_alg)), 401, "unauthorized")
    forever = jwt.encode({"sub": "gus"}, secret, algorithm="HS256")            # no exp: never accepted
    r = client.get("/api/credits", headers=auth(forever))
    assert_clean_error(r, 401, "unauthorized")                               # and said why, not "not valid"
    assert r.get_json()["error"]["message"] == "the bearer token has no 'exp' claim (sub and exp are required)"
    # an exp that never comes, or a string PyJWT reads as a time, is no end either
    for exp, why in ((10**30, "expires more than 366 days ahead"), (now + 400 * 86400, "more than 366 days"),
                     (10**400, "more than 366 days"),  # (past a float's range)
                     (str(now + 60), "exp must be a number")):
        r = client.get("/api/credits", headers=auth(jwt.encode({"sub": "gus", "exp": exp}, secret, algorithm="HS256")))
        assert_clean_error(r, 401, "unauthorized")
        assert why in r.get_json()["error"]["message"], r.get_json()
    year = jwt.encode({"sub": "gus", "exp": now + 365 * 86400}, secret, algorithm="HS256")
    assert client.get("/api/credits", headers=auth(year)).status_code == 200
    # a short HS256 secret (guessable offline from any token) is one line at start
    from sonic.settings import SettingsError
    from sonic_server.settings import settings_from
    with pytest.raises(SettingsError, match="credits.jwt_secret must be at least 32 bytes, got 13"):
        settings_from({"credits": {"enabled": True, "jwt_secret": "thirteen-byte"}})


# -- recharge --------------------------------------------------------------------------------
def test_recharge_validation_atomic_soft_idempotency_and_its_own_rate_limit(service):
    client, ledger, _ = service(max_recharge_users=5, recharge_rate_per_s=0.01, recharge_burst=16)
    _, admin = ledger.create_account("boss", role="admin")
    for n in ("u1", "u2", "u3"):
        ledger.create_account(n)

    def recharge(**body):
        return client.post("/api/admin/credits/recharge", json=body, headers=auth(admin))
    base = {"users": ["u1", "u2"], "amount": 10, "reason": "welcome"}
    for body, field in [({**base, "users": []}, "users"), ({**base, "users": ["u1", "u1"]}, "users"),
                        ({**base, "users": ["u1"] * 6}, "users"), ({**base, "amount": 0}, "amount"),
                        ({**base, "amount": -3}, "amount"), ({**base, "amount": 2.5}, "amount"),
                        ({**base, "amount": 10 ** 12}, "amount"), ({**base, "reason": " "}, "reason"),
                        ({"users": ["u1"], "amount": 1}, "reason"), ({**base, "mode": "maybe"}, "mode"),
                        ({**base, "extra": 1}, "extra")]:
        r = recharge(**body)
        assert_clean_error(r, 400, "invalid_parameter")
        assert r.get_json()["error"]["field"] == field, (body, r.get_json())
    # atomic with an unknown account: nothing at all
    r = recharge(**{**base, "users": ["u1", "ghost", "u2"]})
    assert_clean_error(r, 400, "invalid_parameter")
    assert "ghost" in r.get_json()["error"]["message"] and r.get_json()["error"]["field"] == "users"
    assert [ledger.account(n)["balance"] for n in ("u1", "u2")] == [0, 0]
    # soft: the rest is applied, the unknown one listed
    r = recharge(**{**base, "users": ["u1", "ghost", "u2"], "mode": "soft"}).get_json()
    assert r["succeeded"] == ["u1", "u2"] and r["failed_users"] == [{"user": "ghost", "reason": "unknown account"}]
    # the same idempotency key replays the first answer and applies nothing twice
    first = recharge(**{**base, "users": ["u3"], "idempotency_key": "batch-7"}).get_json()
    again = recharge(**{**base, "users": ["u3"], "idempotency_key": "batch-7"}).get_json()
    assert first["succeeded"] == again["succeeded"] == ["u3"] and again["replayed"] is True
    assert ledger.account("u3")["balance"] == 10 and ledger.account("u1")["balance"] == 10
    reused = recharge(**{**base, "users": ["u1"], "idempotency_key": "batch-7"})     # another call, same key
    assert_clean_error(reused, 409, "conflict")
    assert reused.get_json()["error"]["field"] == "idempotency_key" and ledger.account("u1")["balance"] == 10
    # recharges have their own, lower limit (the burst of 16 is spent by now)
    r = recharge(**base)
    assert_clean_error(r, 429, "rate_limited")
    assert client.get("/api/credits", headers=auth(admin)).status_code == 200          # other routes go on
    audit = client.get("/api/admin/audit?operator=boss&limit=2", headers=auth(admin)).get_json()
    assert len(audit["entries"]) == 2 and audit["next_before"] and all(e["operator"] == "boss"
                                                                          for e in audit["entries"])
    older = client.get(f"/api/admin/audit?operator=boss&before={audit['next_before']}",
                       headers=auth(admin)).get_json()
    assert older["entries"][0]["id"] < audit["entries"][-1]["id"]
    for query in ("since=yesterday", "since=inf", "limit=%C2%B2", "before=" + "9" * 30, "limit=0", "limit=1001"):  # a page is never cut silently
        assert_clean_error(client.get(f"/api/admin/audit?{query}", headers=auth(admin)), 400, "invalid_parameter")
    assert ledger.check() == []


# -- the database: concurrency, crashes, the check ----------------------------------------------
def test_parallel_recharges_and_charges_leave_exact_balances(db_url):
    ledger = ledger_for(db_url)
    try:
        for n in ("p1", "p2", "p3"):
            ledger.create_account(n, credits=1000)
        errors = []

        def recharge(i):
            try:
                status, _ = ledger.recharge(["p1", "p2", "p3"], 7, f"load {i}", "atomic" if i % 2 else "soft", "load")
                assert status == 200
            except Exception as e:                                        # noqa: BLE001
                errors.append(e)

        def charge(i):
            try:
                ok, _ = ledger.reserve(1, f"job{i:04d}", 20, "p1")
                assert ok
                assert ledger.settle(f"job{i:04d}", True, 13)
                assert not ledger.settle(f"job{i:04d}", True, 13)           # once
            except Exception as e:                                        # noqa: BLE001
                errors.append(e)
        threads = [threading.Thread(target=recharge, args=(i,)) for i in range(20)]
        threads += [threading.Thread(target=charge, args=(i,)) for i in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors[:3]
        assert ledger.account("p1")["balance"] == 1000 + 20 * 7 - 50 * 13
        assert ledger.account("p2")["balance"] == ledger.account("p3")["balance"] == 1000 + 20 * 7
        assert ledger.check() == []
        # an overdraft is refused in SQL, not in Python: 20 holds of 100 on 1140 credits, 11 succeed
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(ledger.reserve(2, f"big{i}", 100, "p2")[0]))
                   for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results.count(True) == 11 and ledger.account("p2")["balance"] == 40
    finally:
        ledger.close()


CRASH = r"""
import time
from sonic_server.accounts import Ledger
ledger = Ledger({url!r})
def pause():
    print("applied, not committed", flush=True)
    time.sleep(120)
ledger.recharge([f"k{{i}}" for i in range(300)], 5, "crash test", "atomic", "test", before_commit=pause)
"""


def test_a_process_killed_mid_recharge_leaves_nothing_applied(db_url):
    ledger = ledger_for(db_url)
    try:
        with ledger.engine.begin() as c:                                  # 300 accounts, quickly
            from sqlalchemy import insert
            from sonic_server.accounts.schema import accounts
            c.execute(insert(accounts), [dict(name=f"k{i}", role="user", balance=0, created=time.time())
                                         for i in range(300)])
        url = ledger.url
        proc = subprocess.Popen([sys.executable, "-c", CRASH.format(url=url)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "applied, not committed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        assert sum(a["balance"] for a in ledger.list_accounts()) == 0
        assert ledger.entries(limit=5)[0] == []
        status, answer = ledger.recharge([f"k{i}" for i in range(300)], 5, "again", "atomic", "test")
        assert status == 200 and sum(a["balance"] for a in ledger.list_accounts()) == 1500
    finally:
        ledger.close()


def test_the_cli_creates_lists_revokes_recharges_and_checks(tmp_path):
    import yaml
    cfg = tmp_path / "settings.yaml"
    cfg.write_text(yaml.safe_dump({"server": {"data_dir": str(tmp_path / "data")}}))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "sonic", "accounts", "--config", str(cfg), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
    out = cli("create", "ivy", "--credits", "50")
    assert out.returncode == 0 and "key: sk_" in out.stdout, out.stderr
    # which database it used (a relative data_dir would follow the working folder)
    assert f"accounts database: sqlite:///{tmp_path / 'data' / 'credits.sqlite3'}" in out.stderr
    key = out.stdout.split("key: ")[1].split()[0]
    assert cli("create", "ivy").returncode != 0
    assert "ivy" in cli("list").stdout and " 50" in cli("list").stdout
    after = subprocess.run([sys.executable, "-m", "sonic", "accounts", "list", "--config", str(cfg)],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert after.returncode == 0 and "ivy" in after.stdout, after.stderr  # --config after the command too
    out = cli("recharge", "ivy", "--amount", "25", "--reason", "top-up")
    assert out.returncode == 0 and '"succeeded": [\n    "ivy"' in out.stdout
    assert cli("recharge", "ivy", "ghost", "--amount", "5", "--reason", "x").returncode != 0
    blank = cli("recharge", "ivy", "--amount", "5", "--reason", " ")  # refused as the route refuses it
    assert blank.returncode == 1 and blank.stderr.strip().endswith(
        "error: reason is required (1-500 characters, not blank)"), blank.stderr
    assert cli("revoke", key[:12]).returncode == 0 and cli("revoke", key[:12]).returncode != 0
    ok = cli("check")
    assert ok.returncode == 0 and "ok: 1 accounts" in ok.stdout
    # a balance changed behind the ledger's back is found
    ledger = ledger_for(f"sqlite:///{tmp_path / 'data' / 'credits.sqlite3'}")
    with ledger.engine.begin() as c:
        c.exec_driver_sql("UPDATE accounts SET balance = balance + 1 WHERE name = 'ivy'")
    ledger.close()
    bad = cli("check")
    assert bad.returncode == 1 and "MISMATCH ivy: balance 76, ledger sum 75" in bad.stdout


def test_on_postgresql_the_service_meters_and_recharges(service, postgres):
    # written postgres://, as many hosts hand URLs out (SQLAlchemy alone knew no such dialect)
    url = postgres.new_database().replace("postgresql://", "postgres://", 1)
    client, ledger, _ = service(database_url=url)
    _, admin = ledger.create_account("pgadmin", role="admin")
    _, key = ledger.create_account("pguser")
    assert post(client, FAST, headers=auth(key)).status_code == 402
    r = client.post("/api/admin/credits/recharge", json={"users": ["pguser"], "amount": 100, "reason": "start"},
                    headers=auth(admin))
    assert r.status_code == 200 and r.get_json()["succeeded"] == ["pguser"]
    assert post(client, FAST, headers=auth(key)).status_code == 200
    assert client.get("/api/credits", headers=auth(key)).get_json()["balance"] == 70
    assert ledger.engine.dialect.name == "postgresql" and ledger.check() == []


def test_credits_off_is_the_service_as_before(make_client):
    client, _ = make_client()
    assert client.get("/api/credits").status_code == 404
    assert post(client, FAST).status_code == 200


def test_calls_racing_with_one_idempotency_key_apply_once(db_url):
    ledger = ledger_for(db_url)
    try:
        ledger.create_account("race")
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(
            ledger.recharge(["race"], 10, "once", "atomic", "t", idempotency_key="same-key")[1])) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(answers) == 6 and sum(1 for a in answers if not a.get("replayed")) == 1
        assert ledger.account("race")["balance"] == 10 and ledger.check() == []
    finally:
        ledger.close()


def test_an_unreachable_database_is_one_error_line_with_its_password_hidden(tmp_path):
    env = {**os.environ, "SONIC_CREDITS_ENABLED": "1",
           "SONIC_DATABASE_URL": f"postgresql://sonic:hunter2@127.0.0.1:{free_port()}/nowhere",
           # folders of its own: a service running in the checkout owns the default ones
           "SONIC_DATA_DIR": str(tmp_path / "data"), "SONIC_UPLOAD_DIR": str(tmp_path / "uploads"),
           "SONIC_OUTPUT_DIR": str(tmp_path / "outputs")}
    for args in (["serve", "--port", str(free_port())], ["accounts", "list"]):
        out = subprocess.run([sys.executable, "-m", "sonic", *args], capture_output=True, text=True, cwd=ROOT,
                             env=env, timeout=120)
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-800:]
        assert "the accounts database" in out.stderr and "cannot be opened" in out.stderr
        assert "hunter2" not in out.stderr and "***" in out.stderr


def test_the_settler_says_once_that_the_job_store_does_not_answer(tmp_path, caplog):
    """Redis away (distributed mode): the sweep that settles holds fails every 2 s; it was logged
    with a full trace each time (84 in one outage), now once, and once more when it answers."""
    import logging

    import redis

    from sonic_server.accounts import Ledger
    from sonic_server.accounts.settler import Settler

    ledger = Ledger.open(f"sqlite:///{tmp_path / 'credits.sqlite3'}")
    _, key = ledger.create_account("ann", credits=100)
    assert ledger.reserve(ledger.authenticate(key).account_id, "j" * 32, 10, "test")[0]
    away = threading.Event()
    away.set()

    class Queue:
        def get(self, job_id):
            if away.is_set():
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
            return None

    settler = Settler(ledger, lambda: Queue(), lambda result: 0, every_s=0.02)
    caplog.set_level(logging.INFO, logger="sonic.credits")
    settler.start()
    def logged() -> list:
        return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "sonic.credits"]

    try:
        time.sleep(0.5)  # many sweeps
        away.clear()
        deadline = time.monotonic() + 10  # the next sweep sees it back (later on a loaded machine)
        while len(logged()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # more sweeps, which say nothing
    finally:
        settler.stop()
    said = logged()
    assert said == [
        ("WARNING", "settling reservations: the job store (Redis) does not answer (ConnectionError)"),
        ("WARNING", "settling reservations: the job store (Redis) answers again"),
    ], said
