"""Job webhooks: a real receiver on a free loopback port (allowed by outbound.allow_private)
records every delivery; signatures verify, retries come after failures and a closed port, the
events filter and the order hold, a `completed` delivery survives a restart of the server; the
address rules refuse loopback, private and metadata targets when the setting is off."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from server_helpers import FAST, FakePipeline, assert_clean_error, post, settings
from test_http_live import free_port, start_server

SECRET = "whsec_" + base64.b64encode(b"sonic-test-secret-0123456789abcd").decode()


class Receiver:
    """An HTTP server on 127.0.0.1:port recording each POST; answers `statuses` in turn, then 200."""

    def __init__(self, port: int, statuses=()):
        self.port, self.statuses, self.got = port, list(statuses), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.got.append({"headers": dict(self.headers), "body": body.decode(), "at": time.monotonic()})
                self.send_response(outer.statuses.pop(0) if outer.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hooks"

    def wait(self, count, timeout=20.0):
        deadline = time.monotonic() + timeout
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.got

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def verified(delivery) -> dict:
    """The body, once its signature checks out as a receiver would check it."""
    h = {k.lower(): v for k, v in delivery["headers"].items()}
    key = base64.b64decode(SECRET[len("whsec_"):])
    signed = f"{h['webhook-id']}.{h['webhook-timestamp']}.{delivery['body']}".encode()
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert h["webhook-signature"] == f"v1,{expected}" and abs(time.time() - int(h["webhook-timestamp"])) < 60
    return json.loads(delivery["body"])


def documented_verify():
    """The `verify` function of docs/webhooks.md, as a receiver would paste it."""
    from conftest import ROOT
    text = (ROOT / "docs" / "webhooks.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10
    scope: dict = {}
    exec(code, scope)
    return scope["verify"]


@pytest.fixture
def hooked_client(tmp_path):
    from sonic_server import create_app

    apps = []

    def make(pipeline=None, allow_private=True):
        cfg = settings(tmp_path)
        cfg["webhooks"] = {"secret": SECRET, "retry_s": 120}
        cfg["outbound"] = {"allow_private": allow_private}
        app = create_app(cfg, pipeline=pipeline or FakePipeline())
        apps.append(app)
        return app.test_client()

    yield make
    for app in apps:
        app.extensions["sonic"].queue.close()
        app.extensions["sonic"].webhooks.stop()


def test_events_arrive_signed_in_order_and_as_filtered(hooked_client):
    client = hooked_client()
    rx = Receiver(free_port())
    try:
        job = post(client, {**FAST, "webhook": rx.url, "webhook_events_filter": ["start", "progress", "completed"]})
        assert job.status_code == 200, job.get_data()[:300]
        job_id = job.get_json()["job_id"]
        deadline = time.monotonic() + 15
        while not any(json.loads(d["body"])["status"] == "succeeded" for d in rx.got) and time.monotonic() < deadline:
            time.sleep(0.05)
        bodies = [verified(d) for d in rx.got]
        events = [b["status"] for b in bodies]
        verify = documented_verify()  # the receiver's check docs/webhooks.md gives agrees
        assert all(verify(SECRET, d["headers"], d["body"].encode()) for d in rx.got)
        assert not verify(SECRET, rx.got[0]["headers"], rx.got[0]["body"].encode() + b" ")
        assert len(events) >= 3 and events.count("succeeded") == 1, events
        assert events[0] == "processing" and events[-1] == "succeeded" and all(b["job_id"] == job_id for b in bodies)
        assert len({d["headers"]["Webhook-Id"] for d in rx.got}) == len(rx.got)  # one id per delivery
        kinds = [d["headers"]["Webhook-Event"] for d in rx.got]
        assert kinds[0] == "start" and kinds[-1] == "completed" and set(kinds[1:-1]) == {"progress"}, kinds
        assert all(a["body"] != b["body"] for a, b in zip(rx.got, rx.got[1:])), events  # no news is not sent
        assert bodies[-1] == {**client.get(f"/api/sonic/jobs/{job_id}").get_json()}  # the status document itself
        assert not any("Authorization" in d["headers"] for d in rx.got)
        # the default filter: completed only; a form field works as the config key does; a
        # receiver behind Basic auth is named with user:password (percent-encoded as in any URL)
        before = len(rx.got)
        guarded = rx.url.replace("http://", "http://sonic:p%40ss%3Aw@")
        with open(__import__("conftest").PORTRAIT, "rb") as img, open(__import__("conftest").SPEECH, "rb") as aud:
            r = client.post("/api/sonic/generate", data={"image": (img, "p.jpg"), "audio": (aud, "a.flac"),
                                                          "config": json.dumps({**FAST, "seed": 2}), "webhook": guarded})
        assert r.status_code == 200
        rx.wait(before + 1)
        time.sleep(1.0)
        assert [verified(d)["status"] for d in rx.got[before:]] == ["succeeded"]
        assert rx.got[before]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"sonic:p@ss:w").decode()
        assert "p%40ss" not in r.get_data(as_text=True)  # the password is not shown back
        metrics = client.get("/metrics").get_data(as_text=True)
        assert 'sonic_webhook_deliveries_total{result="delivered"}' in metrics
    finally:
        rx.close()


def waiting_gauge(client) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    page = client.get("/metrics").get_data(as_text=True)
    return next(s.value for fam in text_string_to_metric_families(page) for s in fam.samples
                if s.name == "sonic_webhook_jobs_waiting")


def test_failed_deliveries_are_retried_on_500_and_on_a_closed_port(hooked_client):
    client = hooked_client()
    rx = Receiver(free_port(), statuses=[500])
    closed = free_port()  # nothing listens here yet
    try:
        first = post(client, {**FAST, "seed": 3, "webhook": rx.url}).get_json()["job_id"]
        got = rx.wait(2, timeout=15)
        assert len(got) == 2 and got[0]["headers"]["Webhook-Id"] == got[1]["headers"]["Webhook-Id"]
        assert 4.0 <= got[1]["at"] - got[0]["at"] <= 9.0  # the first retry after about 5 s
        assert verified(got[1])["job_id"] == first
        second = post(client, {**FAST, "seed": 4, "webhook": f"http://127.0.0.1:{closed}/late"}).get_json()["job_id"]
        time.sleep(1.5)  # its first attempt finds the port closed
        assert waiting_gauge(client) == 1  # /metrics: a job whose delivery waits for its retry
        late = Receiver(closed)
        try:
            assert verified(late.wait(1, timeout=15)[0])["job_id"] == second
        finally:
            late.close()
        for _ in range(40):
            if waiting_gauge(client) == 0:
                break
            time.sleep(0.05)
        assert waiting_gauge(client) == 0
    finally:
        rx.close()


def test_a_receiver_that_never_answers_holds_up_no_other_jobs_deliveries(hooked_client):
    """One job's receiver takes its connection and never answers (each attempt waits out the
    outbound deadline, 15 s); another job's delivery still arrives at once."""
    import socket

    client = hooked_client()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read nor answered
    rx = Receiver(free_port())
    try:
        stuck = post(client, {**FAST, "seed": 5, "webhook": f"http://127.0.0.1:{silent.getsockname()[1]}/hooks"})
        assert stuck.status_code == 200
        time.sleep(1.0)  # its delivery is being attempted
        sent = time.monotonic()
        other = post(client, {**FAST, "seed": 6, "webhook": rx.url}).get_json()["job_id"]
        got = rx.wait(1, timeout=20)
        assert got and verified(got[0])["job_id"] == other
        assert got[0]["at"] - sent < 2.5, got[0]["at"] - sent  # (behind it: 5 s and more)
    finally:
        rx.close()
        silent.close()


@pytest.mark.parametrize("url", ["http://127.0.0.1/x", "http://10.1.2.3/x", "http://169.254.169.254/latest/meta-data",
                                 "http://[::1]:8080/", "http://localhost/x", "ftp://example.org/x", "http:///x",
                                 "http://[::ffff:127.0.0.1]/x", "http://100.64.0.1/x", "http://[64:ff9b::a00:1]/x",
                                 "http://[2002:a00:1::1]/x", "http://[::127.0.0.1]/x", "http://[fec0::1]/x",
                                 "http://93.184.216.34:0/x"])
def test_webhook_targets_inside_are_refused_unless_allowed(hooked_client, url):
    client = hooked_client(allow_private=False)
    r = post(client, {**FAST, "webhook": url})
    assert_clean_error(r, 400, "invalid_parameter")
    assert r.get_json()["error"]["field"] == "webhook"


@pytest.mark.parametrize("address", [
    "192.0.0.8", "192.0.0.9", "192.88.99.1", "192.31.196.1", "192.52.193.1", "192.175.48.1", "198.18.0.1",
    "203.0.113.9", "240.0.0.1", "255.255.255.255", "0.1.2.3", "::ffff:0:7f00:1", "::ffff:0:a00:1", "3fff::1",
    "5f00::1", "2001:db8::1", "2001:20::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "100::1", "fd00::1", "ff02::1",
    "64:ff9b:1:a00:0:100:808:808", "2620:4f:8000::1", "100:0:0:1::1",
])
def test_no_special_purpose_address_counts_as_public(address):
    """Every block of IANA's special-purpose registries is refused, those the registry marks
    globally reachable (anycast, protocol assignments) too, and an IPv6 form carrying IPv4
    loopback or private; checked without sending anything."""
    import ipaddress

    from sonic_server.outbound import is_public

    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "192.0.1.1", "2606:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_count_as_public(address):
    import ipaddress

    from sonic_server.outbound import is_public

    assert is_public(ipaddress.ip_address(address))


def _receiver(answer) -> int:
    """A one-connection receiver on a free loopback port: answer(conn) once the request is read."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        try:
            answer(conn)
        except OSError:
            pass
        finally:
            conn.close()
            listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


def _drip(parts, every_s):
    def answer(conn):
        for part in parts:
            conn.send(part)
            time.sleep(every_s)
    return answer


@pytest.mark.parametrize("parts", [
    [bytes([b]) for b in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100],  # the status line a byte at a time
    [b"HTTP/1.1 200 OK\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(20)] + [b"Content-Length: 0\r\n\r\n"],  # lines
], ids=["bytes", "header-lines"])
def test_a_receiver_that_drips_its_answer_is_cut_off_at_the_deadline_and_it_is_a_failure(parts):
    """A receiver sending its answer a little at a time cannot hold the sender past total_s, and
    one cut off between whole header lines has not answered (http.client reads the cut as the
    headers' end: that was counted delivered, and never retried)."""
    from sonic_server.outbound import Reach, check_url, post

    port = _receiver(_drip(parts, 0.2))
    began = time.monotonic()
    with pytest.raises(OSError, match="timed out"):
        post(check_url(f"http://127.0.0.1:{port}/", "webhook", Reach(private=True)), b"{}", {}, connect_s=1, total_s=1.5)
    assert time.monotonic() - began < 3.0


def test_a_receiver_that_drips_its_tls_handshake_is_cut_off_at_the_deadline():
    """The handshake is within the deadline too: a server that sends a TLS record's header, then
    its body a byte at a time (each within the read timeout), cannot hold an https sender past it."""
    from sonic_server.outbound import Reach, check_url, post

    def handshake(conn):  # (the client's hello read)
        conn.send(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 kB, coming
        for _ in range(50):
            conn.send(b"\x00")
            time.sleep(0.2)

    port = _receiver(handshake)
    target = check_url(f"https://127.0.0.1:{port}/", "webhook", Reach(private=True))
    began = time.monotonic()
    with pytest.raises(OSError, match="timed out"):
        post(target, b"{}", {}, connect_s=1, total_s=1.5)
    assert time.monotonic() - began < 3.0


def test_a_receiver_slower_to_answer_than_the_connect_timeout_is_answered_within_the_whole():
    """The connect timeout bounds the connection only: a receiver that answers 1.5 s after the
    request, with 1 s to connect and 3 s in all, has answered (it was cut off at 1 s, then sent
    the same delivery again and again)."""
    from sonic_server.outbound import Reach, check_url, post

    def late(conn):
        time.sleep(1.5)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    port = _receiver(late)
    target = check_url(f"http://127.0.0.1:{port}/", "webhook", Reach(private=True))
    assert post(target, b"{}", {}, connect_s=1, total_s=3) == 200


def test_address_rules_allow_public_addresses_and_open_with_the_setting():
    import ipaddress

    from sonic_server.outbound import Reach, check_url

    # a block opened is opened in the IPv6 forms that carry its addresses too, and only those
    opened = Reach(networks=(ipaddress.ip_network("127.0.0.1/32"),))
    assert check_url("http://[::ffff:127.0.0.1]:9/x", "webhook", opened).address == "::ffff:127.0.0.1"
    with pytest.raises(Exception, match="non-public"):
        check_url("http://[::ffff:127.0.0.2]:9/x", "webhook", opened)

    assert check_url("https://93.184.216.34/hook?a=1", "webhook", Reach()).path == "/hook?a=1"
    assert check_url("http://127.0.0.1:9/x", "webhook", Reach(private=True)).address == "127.0.0.1"
    with pytest.raises(Exception, match="webhook_events_filter"):
        from sonic_server.webhooks import requested
        requested("https://93.184.216.34/", ["finished"], "http://h/", Reach())


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data", "http://169.254.170.2/v2/credentials",
                                 "http://169.254.170.23/v1/credentials", "http://169.254.0.23/meta-data",
                                 "http://100.100.100.200/latest", "http://168.63.129.16/machine",
                                 "http://[fd00:ec2::254]/latest", "http://[fd00:ec2::23]/v1/credentials",
                                 "http://[fd20:ce::254]/computeMetadata", "http://[fd00:c1::a9fe:a9fe]/opc",
                                 "http://[fe80::1]/x", "http://[::ffff:169.254.169.254]/latest",
                                 "http://[64:ff9b:1:a9fe:a9:fe00::]/latest", "http://[64:ff9b::a9fe:a9fe]/latest"])
def test_the_cloud_metadata_services_stay_closed_whatever_is_opened(url):
    """outbound.allow_private opened every address, the metadata services' too (a webhook there
    was sent three times: an operator who opened a private receiver opened the machine's
    credentials to every caller). They stay closed under allow_private and allow_networks."""
    import ipaddress

    from sonic_server.outbound import Reach, check_url

    for reach in (Reach(), Reach(private=True),
                  Reach(networks=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))):
        with pytest.raises(Exception, match="link-local or cloud metadata address .* whatever its settings"):
            check_url(url, "webhook", reach)


def test_allow_networks_opens_the_blocks_it_names_and_no_other():
    """A receiver on a private network is opened alone (outbound.allow_networks), not every
    loopback and private address with it; a block that is not one is one line at start."""
    from sonic.settings import SettingsError
    from sonic_server.outbound import Reach, check_url
    from sonic_server.settings import settings_from

    reach = Reach.of(settings_from({"outbound": {"allow_networks": ["127.0.0.2", "10.0.0.0/8"]}}).outbound)
    assert check_url("http://127.0.0.2:9/x", "webhook", reach).address == "127.0.0.2"
    assert check_url("http://10.9.8.7/x", "webhook", reach).address == "10.9.8.7"
    for inside in ("http://127.0.0.1:9/x", "http://192.168.1.1/x"):
        with pytest.raises(Exception, match="outbound.allow_networks"):
            check_url(inside, "webhook", reach)
    with pytest.raises(SettingsError, match='"10.0.0.0/33" is not an address or a CIDR block'):
        settings_from({"outbound": {"allow_networks": ["10.0.0.0/33"]}})


def test_a_completed_delivery_survives_a_restart_of_the_server(tmp_path):
    port = free_port()
    top = {"webhooks": {"secret": SECRET}, "outbound": {"allow_private": True}}
    proc, info = start_server(tmp_path, top=top)
    try:
        import requests
        from conftest import PORTRAIT, SPEECH
        with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
            r = requests.post(info["base"] + "/api/sonic/generate", timeout=60, files={"image": img, "audio": aud},
                              data={"config": json.dumps({**FAST, "webhook": f"http://127.0.0.1:{port}/after"})})
        assert r.status_code == 200, r.text[:300]
        job_id = r.json()["job_id"]
        time.sleep(1.0)  # the first attempt fails: nothing listens yet
    finally:
        proc.kill()
        proc.wait(10)
    rx = Receiver(port)
    proc, info = start_server(tmp_path, top=top)  # the same folders: the outbox is in its database
    try:
        body = verified(rx.wait(1, timeout=20)[0])
        assert body["job_id"] == job_id and body["status"] == "succeeded"
    finally:
        proc.terminate()
        proc.wait(10)
        rx.close()


def test_a_job_cut_off_by_a_restart_is_told_completed(tmp_path):
    """A job left processing by a killed process is marked failed (interrupted) at the next start,
    and its webhook hears of it."""
    from sonic_server import create_app
    from sonic_server.jobs import PROCESSING, JobRecord
    from sonic_server.store import JobStore

    rx = Receiver(free_port())
    try:
        cfg = settings(tmp_path)
        cfg["webhooks"] = {"secret": SECRET}
        cfg["outbound"] = {"allow_private": True}
        rec = JobRecord.new("generate", {"seed": 1})
        rec.status, rec.stage = PROCESSING, "render"
        rec.webhook = {"url": rx.url, "events": ["completed"], "root": "http://localhost/"}
        JobStore(tmp_path / "data" / "jobs.sqlite3").save(rec)
        app = create_app(cfg, pipeline=FakePipeline())
        try:
            body = verified(rx.wait(1, timeout=10)[0])
            assert body["job_id"] == rec.id and body["status"] == "failed" and body["error"]["code"] == "interrupted"
        finally:
            app.extensions["sonic"].queue.close()
            app.extensions["sonic"].webhooks.stop()
    finally:
        rx.close()


def test_a_webhooks_password_is_not_written_to_the_log(hooked_client, caplog):
    """The request's log line shows its config: a webhook given there with user:password showed
    the password."""
    import logging

    caplog.set_level(logging.INFO, logger="sonic.http")
    client = hooked_client()
    r = post(client, {**FAST, "seed": 71, "async": True, "webhook": "http://hookuser:S3CRETpw@127.0.0.1:9/hook"})
    assert r.status_code == 202, r.get_data()[:300]
    # nor a token in its path or query (a hooks service's path is its token)
    r = post(client, {**FAST, "seed": 72, "async": True, "webhook": "http://127.0.0.1:9/T0/B1/PathTok3n?api_token=QueryTok3n"})
    assert r.status_code == 202, r.get_data()[:300]
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert '"webhook": "http://***@127.0.0.1:9/..."' in logged and "S3CRETpw" not in logged
    assert '"webhook": "http://127.0.0.1:9/..."' in logged and "Tok3n" not in logged


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_deliveries_waiting_for_one_job_are_bounded(tmp_path, kind, caplog):
    """Every cache hit of a job that names a webhook adds a delivery for that job, and behind a
    receiver that fails only the first is tried: they piled up unbounded (and the outbox's look
    for due deliveries grew quadratic: 4 s at 4,000). Another job's still queue."""
    from sonic_server.jobs import JobRecord
    from sonic_server.outbound import Reach
    from sonic_server.webhooks import MAX_PENDING_PER_JOB, Delivery, MemoryOutbox, SqliteOutbox, Webhooks

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    hooks = Webhooks(outbox, lambda: "s" * 32, 3600, Reach(private=True), tmp_path)
    hooks.start = lambda only_if_pending=False: None  # queued only: nothing is sent here
    rec = JobRecord.new("generate", {})
    rec.webhook = {"url": "http://127.0.0.1:9/h", "events": ["completed"], "root": "http://127.0.0.1/"}
    for _ in range(MAX_PENDING_PER_JOB + 5):
        hooks.notify(rec, "completed")
    due = outbox.due(time.time(), 1000)
    assert len(due) == 1                                          # the job's first; the rest wait their turn
    outbox.done(due[0])
    waiting = 0
    while got := outbox.due(time.time(), 1000):
        outbox.done(got[0])
        waiting += 1
    assert waiting == MAX_PENDING_PER_JOB - 1
    assert caplog.text.count(f"not queued; {MAX_PENDING_PER_JOB} of the job's deliveries, or") == 5
    now = time.time()
    assert outbox.add(Delivery("msg_other", "another_job", 1, "http://h/", "completed", "{}", 0, now, now))
    outbox.done(outbox.due(time.time(), 1000)[0])
    # cached answers of the job, each to its own caller: none waits behind another's receiver
    for _ in range(3):
        hooks.notify(rec, "completed", on_its_own=True)
    assert len(outbox.due(time.time(), 1000)) == 3
    if kind == "sqlite":
        import sqlite3
        indexes = sqlite3.connect(tmp_path / "jobs.sqlite3").execute("PRAGMA index_list(webhook_outbox)").fetchall()
        assert any(row[1] == "webhook_outbox_job" for row in indexes)


@pytest.mark.parametrize("url", [" https://u:s3cret@h.example/x", "https:/\t/u:s3cret@h/", "ht\ttps://u:s3cret@h/",
                                 "\nhttps://u:s3cret@h/", "https://u:s3cret@h/x?next=a@b"])
def test_a_password_is_masked_in_every_form_a_url_parser_accepts(url):
    """urlsplit drops leading spaces and controls, and tabs and newlines anywhere: each of these is
    fetched with the password, and the log's mask, anchored at a clean scheme, missed the first four."""
    from urllib.parse import urlsplit
    from sonic_server.outbound import without_credentials
    assert urlsplit(url).password == "s3cret"
    assert "s3cret" not in without_credentials({"webhook": url})["webhook"]


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_deleted_jobs_deliveries_go_with_it(tmp_path, kind):
    """They carry the job's document and the receiver's URL (a password in it), and were still
    tried for webhooks.retry_s after DELETE /api/sonic/jobs/<id>; their rows lingered on disk in
    the database's write-ahead log."""
    from sonic_server.webhooks import Delivery, MemoryOutbox, SqliteOutbox

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    now = time.time()
    secret = "http://user:hookpass@127.0.0.1:9/h"
    for i, job in enumerate(["job_a", "job_a", "job_a.0f3c", "job_b", "job_ab"]):  # a cached answer's: suffixed
        outbox.add(Delivery(f"msg_{i}", job, i, secret, "completed", "{}", 0, now, now))
    assert outbox.jobs_waiting() == 4  # /metrics' sonic_webhook_jobs_waiting
    outbox.forget_job("job_a")
    assert sorted(d.job_id for d in outbox.due(now + 1, 100)) == ["job_ab", "job_b"]
    assert outbox.jobs_waiting() == 2
    if kind == "sqlite":
        wal = tmp_path / "jobs.sqlite3-wal"
        assert not wal.exists() or wal.stat().st_size == 0          # checkpointed: no old copy left there
        assert oct((tmp_path / "jobs.sqlite3").stat().st_mode & 0o777) == "0o600"


def down_and_up(outbox):
    """A port that takes connections and never answers (each attempt waits out the 15 s
    deadline), a receiver that answers, and a sender over `outbox`, not started."""
    import socket

    from sonic_server.outbound import Reach
    from sonic_server.webhooks import Webhooks

    down = socket.socket()
    down.bind(("127.0.0.1", 0))
    down.listen(16)  # accepted by the kernel, never read nor answered
    return down, Receiver(free_port()), Webhooks(outbox, lambda: SECRET, retry_s=600, reach=Reach(private=True), outputs=None)


def a_receiver_down_holds_up_no_other(outbox, seq) -> None:
    """Six jobs' deliveries to a receiver that is down (it takes the connection and never answers:
    each attempt waits out the 15 s deadline), then one to another receiver: that one arrives at
    once. All four senders went to the first six, and the other waited 15 s behind them (in a
    trial of many customers, 24 s). `seq()` numbers the deliveries as the outbox's writers do."""
    from sonic_server.webhooks import Delivery

    down, rx, hooks = down_and_up(outbox)
    now = time.time()
    for i in range(6):
        url = f"http://127.0.0.1:{down.getsockname()[1]}/hooks"
        outbox.add(Delivery(f"msg_down_{i}", f"job_down_{i}", seq(), url, "completed", "{}", 0, now, now))
    hooks.start()
    try:
        time.sleep(1.0)  # its attempts are under way
        sent, now = time.monotonic(), time.time()
        outbox.add(Delivery("msg_up", "job_up", seq(), rx.url, "completed", "{}", 0, now, now))
        got = rx.wait(1, timeout=20)
        assert got and got[0]["at"] - sent < 2.5, got and got[0]["at"] - sent
        # a receiver that answers takes many deliveries quickly: 60 jobs' within a few seconds
        # (a place freed is taken at once, not at the next look every 0.5 s: 7.5 s before)
        sent, now = time.monotonic(), time.time()
        for i in range(60):
            outbox.add(Delivery(f"msg_many_{i}", f"job_many_{i}", seq(), rx.url, "completed", "{}", 0, now, now))
        got = rx.wait(61, timeout=30)
        assert len(got) == 61 and got[-1]["at"] - sent < 4.0, (len(got), got[-1]["at"] - sent)
    finally:
        hooks.stop()
        rx.close()
        down.close()


def one_callers_receivers_hold_up_no_other(outbox, seq) -> None:
    """One caller's jobs' deliveries to six paths of a host that never answers (six receivers:
    a hooks service gives each customer a path), then another caller's to a live receiver: it
    arrives at once, as does one made without keys. All four senders went to the first
    caller's, and the other's waited 15 s behind each four of them (a security trial: a key's
    cached answers, 16 of them, held another key's webhook 58 s)."""
    from sonic_server.webhooks import Delivery

    down, rx, hooks = down_and_up(outbox)
    now = time.time()
    for i in range(6):
        url = f"http://127.0.0.1:{down.getsockname()[1]}/hooks/customer-{i}"
        outbox.add(Delivery(f"msg_b_{i}", f"job_b_{i}", seq(), url, "completed", "{}", 0, now, now, "caller-b"))
    hooks.start()
    try:
        time.sleep(1.0)  # its attempts are under way
        sent, now = time.monotonic(), time.time()
        outbox.add(Delivery("msg_a", "job_a", seq(), rx.url, "completed", "{}", 0, now, now, "caller-a"))
        outbox.add(Delivery("msg_anon", "job_anon", seq(), rx.url + "?anon", "completed", "{}", 0, now, now))
        got = rx.wait(2, timeout=20)
        assert len(got) == 2 and max(g["at"] for g in got) - sent < 2.5, [g["at"] - sent for g in got]
    finally:
        hooks.stop()
        rx.close()
        down.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_one_callers_receivers_hold_up_no_other_callers_deliveries(tmp_path, kind):
    from itertools import count

    from sonic_server.webhooks import MemoryOutbox, SqliteOutbox

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    one_callers_receivers_hold_up_no_other(outbox, count(1).__next__)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_receiver_that_is_down_holds_up_no_other_receivers_deliveries(tmp_path, kind):
    from itertools import count

    from sonic_server.webhooks import MemoryOutbox, SqliteOutbox

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    a_receiver_down_holds_up_no_other(outbox, count(1).__next__)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_delivery_whose_job_is_deleted_while_it_is_sent_is_not_put_back(tmp_path, kind):
    """Its attempt failed after the delete: written back, it was tried again for webhooks.retry_s,
    the deleted job's document and the receiver's password with it."""
    from sonic_server.webhooks import Delivery, MemoryOutbox, SqliteOutbox

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    now = time.time()
    outbox.add(Delivery("msg_a", "job_a", 1, "http://127.0.0.1:9/h", "completed", "{}", 0, now, now))
    outbox.add(Delivery("msg_b", "job_b", 2, "http://127.0.0.1:9/h", "completed", "{}", 0, now, now))
    sending_a, sending_b = outbox.due(now, 10)
    outbox.forget_job("job_a")                       # DELETE while its attempt is under way
    for sent in (sending_a, sending_b):
        sent.attempts, sent.next_at = 1, now + 5   # the attempt failed
        outbox.retry(sent)
    assert outbox.due(now + 10, 10) == [Delivery("msg_b", "job_b", 2, "http://127.0.0.1:9/h", "completed", "{}", 1,
                                                 now + 5, now)]


def test_deliveries_waiting_in_an_outbox_from_before_callers_were_named_are_still_sent(tmp_path):
    """A job database whose outbox table has no `owner` column (deliveries written before they
    named their caller) gains it at start, and its waiting deliveries come out as anyone's."""
    import sqlite3

    from sonic_server.webhooks import Delivery, SqliteOutbox

    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE webhook_outbox (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, seq INTEGER NOT NULL, "
               "url TEXT NOT NULL, event TEXT NOT NULL, body TEXT NOT NULL, attempts INTEGER NOT NULL, "
               "next_at REAL NOT NULL, first_at REAL NOT NULL)")
    db.execute("INSERT INTO webhook_outbox VALUES ('msg_old', 'job_old', 1, 'http://h/x', 'completed', '{}', 0, 1, 1)")
    db.commit()
    db.close()
    outbox = SqliteOutbox(tmp_path / "jobs.sqlite3")
    assert outbox.due(10, 10) == [Delivery("msg_old", "job_old", 1, "http://h/x", "completed", "{}", 0, 1.0, 1.0, "")]
    assert outbox.due(10, 10, skip_owners=["someone"])[0].id == "msg_old"


def one_callers_waiting_deliveries_are_bounded(outbox) -> None:
    """Each cached answer's delivery waits on its own (the per-job bound does not hold them): a
    key that sent its cached request again and again to receivers that fail piled them up
    without end. MAX_PENDING_PER_OWNER of one caller's wait at most; another caller's, and
    those made without keys, still queue; a caller's place comes back as its deliveries go."""
    from sonic_server.webhooks import MAX_PENDING_PER_OWNER, Delivery

    now = time.time()

    def add(i: int, owner: str) -> bool:
        return outbox.add(Delivery(f"msg_{owner}_{i}", f"job_{owner}.{i}", i + 1, "http://127.0.0.1:9/h", "completed",
                                   "{}", 0, now, now, owner))
    assert all(add(i, "caller-b") for i in range(MAX_PENDING_PER_OWNER))
    assert not add(MAX_PENDING_PER_OWNER, "caller-b")
    assert add(0, "caller-a") and all(add(i, "") for i in range(MAX_PENDING_PER_OWNER + 2))
    outbox.forget_job("job_caller-b")                              # its job deleted: its deliveries go
    assert add(MAX_PENDING_PER_OWNER + 1, "caller-b")


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_one_callers_waiting_deliveries_are_bounded(tmp_path, kind):
    from sonic_server.webhooks import MemoryOutbox, SqliteOutbox

    outbox = MemoryOutbox() if kind == "memory" else SqliteOutbox(tmp_path / "jobs.sqlite3")
    one_callers_waiting_deliveries_are_bounded(outbox)


def test_a_store_away_is_said_once_and_its_return_once(caplog, monkeypatch):
    """The outbox's store away (Redis down 11 s): the sender said so with a traceback twice a
    second, 22 times in each process; now once, and once more when it answers again."""
    import logging
    from sonic_server import webhooks
    from sonic_server.outbound import Reach
    from sonic_server.webhooks import MemoryOutbox, Webhooks

    monkeypatch.setattr(webhooks, "SEND_EVERY_S", 0.02)
    outbox = MemoryOutbox()
    hooks = Webhooks(outbox, lambda: "s" * 32, 3600, Reach(private=True), None)
    away = threading.Event()
    away.set()
    real_due = outbox.due

    def due(*args, **kwargs):
        if away.is_set():
            from redis.exceptions import ConnectionError as RedisConnectionError
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return real_due(*args, **kwargs)

    monkeypatch.setattr(outbox, "due", due)
    caplog.set_level(logging.INFO, logger="sonic.webhooks")
    hooks.start()
    try:
        time.sleep(0.5)                                          # some 25 looks while away
        away.clear()
        time.sleep(0.3)
    finally:
        hooks.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "sonic.webhooks"]
    assert said == ["webhooks: sending failed; trying again every 0.0 s, quietly", "webhooks: sending again"], said



def test_any_failure_that_lasts_is_said_once(caplog, monkeypatch):
    """Not only Redis away: a failure of another kind (a database locked, a disk full) logged a
    traceback twice a second while it lasted; now once, a different one once more, the end once."""
    import logging
    from sonic_server import webhooks
    from sonic_server.outbound import Reach
    from sonic_server.webhooks import MemoryOutbox, Webhooks

    monkeypatch.setattr(webhooks, "SEND_EVERY_S", 0.02)
    outbox = MemoryOutbox()
    hooks = Webhooks(outbox, lambda: "s" * 32, 3600, Reach(private=True), None)
    failing = ["database is locked"]
    real_due = outbox.due

    def due(*args, **kwargs):
        if failing:
            raise OSError(failing[0])
        return real_due(*args, **kwargs)

    monkeypatch.setattr(outbox, "due", due)
    caplog.set_level(logging.INFO, logger="sonic.webhooks")
    hooks.start()
    try:
        time.sleep(0.3)
        failing[0] = "No space left on device"
        time.sleep(0.3)
        failing.clear()
        time.sleep(0.2)
    finally:
        hooks.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "sonic.webhooks"]
    assert said == ["webhooks: sending failed; trying again every 0.0 s, quietly"] * 2 + ["webhooks: sending again"], said


def test_a_failing_delivery_is_last_tried_at_the_end_of_its_window(tmp_path):
    """webhooks.retry_s 12: the attempts came at 0, 5 and 35 s (the backoff ran past the window);
    now at 0, 5 and 12 s, then it is dropped."""
    import socket

    from sonic_server.outbound import Reach
    from sonic_server.webhooks import Delivery, MemoryOutbox, Webhooks

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # refused at once
    outbox = MemoryOutbox()
    hooks = Webhooks(outbox, lambda: SECRET, retry_s=12, reach=Reach(private=True), outputs=None)
    first = time.time() - 5  # its first attempt 5 s ago failed: this is its second
    d = Delivery("msg_w", "job_w", 1, f"http://127.0.0.1:{port}/hooks", "completed", "{}", 1, first, first)
    outbox.add(d)
    hooks._attempt(d)
    assert d.attempts == 2 and abs(d.next_at - (first + 12)) < 0.01, d.next_at - first
    d.first_at -= 7  # the window's end reached: dropped
    hooks._attempt(d)
    assert outbox.jobs_waiting() == 0
