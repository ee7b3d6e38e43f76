"""Access control: who is limited and by what (a verified key, else the client's address), what
a wrong or odd key answers, and that the bucket table stays bounded without dropping real clients.

The rates are low (1 request/s) so that refilling during a test is at most a token or two.
"""
import pytest

from server_helpers import assert_clean_error

URL = "/api/sonic/params"
SLOW = {"rate_limit_per_s": 1, "rate_limit_burst": 10}


def codes(client, n: int, headers=lambda i: {}, addr=lambda i: "10.0.0.1") -> list[int]:
    return [client.get(URL, headers=headers(i), environ_overrides={"REMOTE_ADDR": addr(i)}).status_code
            for i in range(n)]


def test_invented_tokens_are_limited_like_plain_requests(make_client):
    plain, _ = make_client(**SLOW)
    invented, _ = make_client(**SLOW)
    a = codes(plain, 40)
    b = codes(invented, 40, headers=lambda i: {"Authorization": f"Bearer made-up-{i}"})
    assert a[:10] == b[:10] == [200] * 10
    assert a.count(429) >= 28 and b.count(429) >= 28, (a, b)      # 30 over the burst, a token or two refilled
    assert set(a) == set(b) == {200, 429}


def test_another_address_has_its_own_bucket(make_client):
    client, _ = make_client(**SLOW)
    assert codes(client, 20).count(429) >= 8
    assert codes(client, 5, addr=lambda i: "10.0.0.2") == [200] * 5


def test_an_ipv6_client_has_one_bucket_for_its_64_whatever_address_it_picks(make_client):
    """A host is given a /64 (or more) to pick addresses from: a bucket per address was a bucket
    per request. An IPv4 client of a dual-stack socket (::ffff:a.b.c.d) is its IPv4 address."""
    client, _ = make_client(**SLOW)
    assert codes(client, 20, addr=lambda i: f"2001:db8:1:2::{i + 1:x}").count(429) >= 8
    assert codes(client, 5, addr=lambda i: "2001:db8:1:3::1") == [200] * 5      # the next /64: another host
    assert codes(client, 12, addr=lambda i: "10.0.0.9" if i % 2 else "::ffff:10.0.0.9").count(429) >= 1


def test_a_client_that_spent_its_requests_can_still_end_what_it_holds(make_client):
    """A DELETE (ending a live session or a job) has its own bucket: a client past its limit
    still lets go of a session that would otherwise hold a slot until its idle timeout; a
    flood of DELETEs is limited all the same."""
    client, _ = make_client(**SLOW)
    assert codes(client, 20).count(429) >= 8                          # the requests' bucket is spent
    ends = [client.delete(f"/api/sonic/live/{'a' * 32}", environ_overrides={"REMOTE_ADDR": "10.0.0.1"}).status_code
            for _ in range(20)]
    assert ends[:10] == [404] * 10 and ends[10:].count(429) >= 8, ends  # answered, then bounded
    assert codes(client, 3).count(429) >= 2                          # and the requests' bucket is as it was
    # with keys, a DELETE with a wrong key spends the requests' bucket: no second pace for guessing
    client, _ = make_client(api_keys=["the-real-key"], **SLOW)
    guesses = [client.delete("/api/sonic/jobs/" + "b" * 32, headers={"Authorization": f"Bearer guess-{i}"},
                             environ_overrides={"REMOTE_ADDR": "10.0.0.3"}).status_code for i in range(10)]
    assert guesses == [401] * 10
    assert codes(client, 5, headers=lambda i: {"Authorization": f"Bearer guess-x{i}"},
                 addr=lambda i: "10.0.0.3").count(429) >= 4


def test_wrong_keys_cannot_be_guessed_at_full_speed(make_client):
    client, _ = make_client(api_keys=["the-real-key"], **SLOW)
    guesses = codes(client, 30, headers=lambda i: {"Authorization": f"Bearer guess-{i}"})
    assert guesses[:10] == [401] * 10                              # failed authentications count ...
    assert guesses[10:].count(429) >= 18, guesses                   # ... and the address is then slowed down
    r = client.get(URL, headers={"Authorization": "Bearer guess-x"}, environ_overrides={"REMOTE_ADDR": "10.0.0.1"})
    assert_clean_error(r, 429, "rate_limited")
    assert int(r.headers["Retry-After"]) >= 1
    assert codes(client, 5, headers=lambda i: {}) == [429] * 5      # no key at all counts the same
    # the holder of the real key, even behind the same address, is limited by its key alone
    assert codes(client, 10, headers=lambda i: {"Authorization": "Bearer the-real-key"}) == [200] * 10


def test_a_real_keys_bucket_survives_a_flood_of_junk(make_client, monkeypatch):
    from sonic_server import access
    monkeypatch.setattr(access, "MAX_CLIENTS", 50)
    # a token every 50 s: the 500 junk requests may take seconds on a loaded machine, and must not refill it
    client, _ = make_client(api_keys=["the-real-key"], rate_limit_per_s=0.02, rate_limit_burst=10)
    real = {"Authorization": "Bearer the-real-key"}
    assert codes(client, 10, headers=lambda i: real) == [200] * 10   # the key's burst is spent
    # junk from 500 addresses, each with its own invented key: 401s, none of which evicts the key
    junk = codes(client, 500, headers=lambda i: {"Authorization": f"Bearer junk-{i}"},
                 addr=lambda i: f"10.1.{i // 250}.{i % 250}")
    assert set(junk) == {401}
    assert client.get(URL, headers=real).status_code == 429          # still limited: its bucket was kept
    limiter = client.application.extensions["sonic_access"]
    assert len(limiter.addresses) <= 50 and len(limiter.keys) == 1


def test_bucket_table_is_bounded_and_keeps_the_recent(monkeypatch):
    from sonic_server.access import TokenBucket
    bucket = TokenBucket(rate=1, burst=2, max_clients=3)
    for client in ("a", "b", "c"):
        bucket.take(client, now=0.0)
    bucket.take("a", now=0.0)                          # "a" is the most recent now: "b" goes first
    assert bucket.take("a", now=0.0) > 0               # "a" has spent its burst of 2
    for client in ("d", "e"):
        bucket.take(client, now=0.0)
    assert len(bucket) == 3 and "a" in bucket and "b" not in bucket


@pytest.mark.parametrize("token", ["é", "clé-ü", "\u5bc6\u94a5", "\x00", "\xff" * 300, "\U0001f511"])
def test_odd_bearer_tokens_are_401(make_client, token):
    client, _ = make_client(api_keys=["the-real-key"])
    raw = ("Bearer " + token).encode("utf-8").decode("latin-1")        # the header as a WSGI server passes it
    r = client.get(URL, environ_overrides={"HTTP_AUTHORIZATION": raw})
    assert_clean_error(r, 401, "unauthorized")
    r = client.get(URL, headers={"Authorization": "Bearer " + token})    # as the test client passes it
    assert_clean_error(r, 401, "unauthorized")


def test_a_non_ascii_key_is_matched_on_its_utf8_bytes(make_client):
    client, _ = make_client(api_keys=["clé"])
    raw = "Bearer clé".encode("utf-8").decode("latin-1")
    assert client.get(URL, environ_overrides={"HTTP_AUTHORIZATION": raw}).status_code == 200
    assert client.get(URL, headers={"Authorization": "Bearer cle"}).status_code == 401


def test_bearer_scheme_is_case_insensitive(make_client):
    client, _ = make_client(api_keys=["k1"])
    assert client.get(URL, headers={"Authorization": "bearer k1"}).status_code == 200
    assert client.get(URL, headers={"Authorization": "Basic k1"}).status_code == 401


def test_a_page_of_an_unlisted_origin_cannot_start_work(make_client):
    """CORS only hides answers: a multipart POST without Authorization is sent by a browser
    without a preflight. With a list of origins, one from an unlisted page is refused before it
    does anything; a listed page (however its origin is spelt), this server's own pages and
    clients that send no Origin (curl) are served; with "*" every page is."""
    from server_helpers import FAST, post, uploads_empty
    client, cfg = make_client(cors_origins=["http://app.example", "https://admin.example:8443"])
    refused = post(client, FAST, headers={"Origin": "http://evil.example"})
    assert_clean_error(refused, 403, "forbidden")
    assert "cors_origins" in refused.get_json()["error"]["message"] and uploads_empty(cfg)
    assert client.get("/api/sonic/jobs").get_json()["jobs"] == []
    assert client.get("/health", headers={"Origin": "http://evil.example"}).status_code == 200  # reads are not refused
    for origin in ("http://APP.example:80", "https://admin.example:8443", "http://localhost", None):
        r = post(client, FAST, headers={"Origin": origin} if origin else {})
        assert r.status_code == 200, (origin, r.get_json())
    # the demo page behind a proxy that sends its own Host: its browser says it is same-origin
    behind = {"Origin": "https://sonic.example", "Host": "127.0.0.1:5000"}
    assert post(client, FAST, headers={**behind, "Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert_clean_error(post(client, FAST, headers={**behind, "Sec-Fetch-Site": "cross-site"}), 403, "forbidden")
    anyone, _ = make_client(cors_origins=["*"])
    assert post(anyone, FAST, headers={"Origin": "http://evil.example"}).status_code == 200


def test_by_default_only_pages_on_this_machine_may_call_the_api(make_client):
    """The default, cors_origins: [loopback]: a local web app (any port) may call the API and
    read its answers; a page of any other site may neither read them nor start or delete
    anything (with "*", the default before, every site its operator browsed could list, fetch
    and delete a keyless server's jobs)."""
    from server_helpers import FAST, post, uploads_empty
    client, cfg = make_client()
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "https://[::1]:5173", "http://127.0.0.2"):
        r = client.get("/api/sonic/jobs", headers={"Origin": origin})
        assert r.headers["Access-Control-Allow-Origin"] == origin, origin
        assert post(client, FAST, headers={"Origin": origin}).status_code == 200, origin
    for origin in ("http://evil.example", "http://localhost.evil.example", "http://127.0.0.1.evil.example",
                   "file://", "null", "http://u@localhost:3000"):
        r = client.get("/api/sonic/jobs", headers={"Origin": origin})
        assert "Access-Control-Allow-Origin" not in r.headers, origin
        assert_clean_error(post(client, FAST, headers={"Origin": origin}), 403, "forbidden")
        assert_clean_error(client.delete("/api/sonic/jobs/x", headers={"Origin": origin}), 403, "forbidden")
    assert uploads_empty(cfg)
    # an Origin no browser sends is no origin (it was a 500 on every route)
    for origin in ("http://[::1", "http://]x", "http://localhost:abc"):
        r = client.get("/health", headers={"Origin": origin})
        assert r.status_code in (200, 503) and "Access-Control-Allow-Origin" not in r.headers, origin
        assert_clean_error(post(client, FAST, headers={"Origin": origin}), 403, "forbidden")
    # the demo page at server.public_url, behind a proxy that sends its own Host, over plain http
    # (no Sec-Fetch-Site there): this server's own page
    behind, _ = make_client(public_url="https://sonic.example")
    r = post(behind, FAST, headers={"Origin": "https://sonic.example", "Host": "127.0.0.1:5000"})
    assert r.status_code == 200, r.get_json()


def test_cors_answers_vary_by_origin(make_client):
    client, _ = make_client(cors_origins=["http://app.example"])
    allowed = client.get("/health", headers={"Origin": "http://app.example"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "http://app.example"
    assert "Origin" in allowed.headers["Vary"]
    refused = client.get("/health", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in refused.headers and "Origin" in refused.headers["Vary"]
    assert "Origin" in client.get("/health").headers["Vary"]        # a cache must not reuse it for an origin
    anyone, _ = make_client(cors_origins=["*"])
    r = anyone.get("/health", headers={"Origin": "http://app.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "*" and "Origin" in r.headers["Vary"]
    closed, _ = make_client(cors_origins=[])
    r = closed.get("/health", headers={"Origin": "http://app.example"})
    assert "Access-Control-Allow-Origin" not in r.headers and "Vary" not in r.headers


def test_the_access_line_names_the_caller_by_digest_never_the_key(make_client, caplog):
    """An operator attributes a request to a customer from the access log: the line carries the
    key's digest (what the key's jobs are owned by), and the key itself appears nowhere."""
    import json
    import logging

    client, _ = make_client(api_keys=["the-real-key"])
    with caplog.at_level(logging.INFO, logger="sonic.http"):
        client.get("/api/sonic/jobs", headers={"Authorization": "Bearer the-real-key"})
        client.get("/api/sonic/jobs")
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "sonic.http"]
    keyed = [line for line in lines if line["status"] == 200]
    assert keyed and keyed[0]["caller"].startswith("key:") and all("caller" not in line for line in lines
                                                                     if line["status"] == 401)
    assert not any("the-real-key" in rec.getMessage() for rec in caplog.records)
