"""Live sessions relayed by a TURN server: a real coturn (Debian's `coturn`) on 127.0.0.1 that
checks the credentials the service makes from their shared secret, a real server told to have
its clients relay everything (live.ice_transport_policy: relay), and both clients this project
ships: the demo page in Chromium and examples/live_client.py. Each client asks the service for
its ICE servers first (GET /api/sonic/live/rtc-configuration); the media go through the relay,
as the TURN server's own accounts of the bytes it carried show."""

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import re
import secrets
import shutil
import subprocess
import sys
import time

import pytest
import requests

from conftest import PORTRAIT, ROOT
from test_browser import chromium, open_page, set_param, wait
from test_http_live import free_port, start_server

from live_client import LiveClient  # examples/: pytest.ini's pythonpath

TURNSERVER = shutil.which("turnserver")
SECRET = secrets.token_urlsafe(24)
CONFIG = {"min_resolution": 256, "seed": 3}


@pytest.fixture(scope="module")
def turn(tmp_path_factory):
    """coturn on 127.0.0.1 (UDP and TCP on a free port), the TURN REST API's shared secret, its
    log in a file: {"url", "log"}."""
    if TURNSERVER is None:
        pytest.fail("turnserver is not installed (.ci/run installs Debian's coturn)")
    folder = tmp_path_factory.mktemp("turn")
    port = free_port()
    low = 40_000 + secrets.randbelow(150) * 100  # its relay ports: a range of their own
    log = folder / "turn.log"
    proc = subprocess.Popen(
        [TURNSERVER, "-n", "-v", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={port}",
         f"--min-port={low}", f"--max-port={low + 99}", "--use-auth-secret", f"--static-auth-secret={SECRET}",
         "--realm=sonic", "--allow-loopback-peers", "--no-tls", "--no-dtls", "--no-cli", "--fingerprint",
         "--log-file=stdout", "--simple-log", f"--pidfile={folder / 'pid'}", f"--userdb={folder / 'turndb'}"],
        stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while "turn server id=" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("turnserver did not start: " + log.read_text()[-2000:])
        time.sleep(0.05)
    yield {"url": f"turn:127.0.0.1:{port}?transport=udp", "log": log}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory, turn):
    live = {"host_addresses": ["127.0.0.1"], "max_sessions": 2, "idle_timeout_s": 5, "ice_servers": [turn["url"]],
            "turn_secret": SECRET, "ice_transport_policy": "relay"}
    # sonic.test: the name the page is browsed at (Chromium maps it to 127.0.0.1), as a LAN name would be
    proc, info = start_server(tmp_path_factory.mktemp("live-turn"), top={"live": live}, allowed_hosts=["sonic.test"])
    yield info["base"]
    proc.terminate()
    proc.wait(20)


def relayed_bytes(log, since: int, user: str, timeout: float = 10.0) -> int:
    """The most bytes the TURN server says it relayed to one of `user`'s allocations from its
    peer, among those that ended after the log's first `since` characters (coturn writes an
    allocation's account when it ends)."""
    deadline = time.monotonic() + timeout
    while True:
        sent = [int(b) for b in re.findall(rf"peer usage: realm=<sonic>, username=<\d+:{user}>, rp=\d+, rb=(\d+)",
                                           log.read_text()[since:])]
        if max(sent, default=0) > 0 or time.monotonic() > deadline:  # (an allocation left unused relays 0)
            return max(sent, default=0)
        time.sleep(0.1)


def test_the_configuration_carries_turn_credentials_the_turn_server_can_check(server, turn):
    """What a client is handed: the TURN URL, a user name that is the credential's expiry and a
    password that is its HMAC-SHA1 under the shared secret (coturn's REST API scheme), made anew
    for each answer, lasting the longest session and a margin."""
    before = time.time()
    r = requests.get(server + "/api/sonic/live/rtc-configuration", timeout=10)
    assert r.status_code == 200 and r.headers["Cache-Control"] == "no-store"
    body = r.json()
    config = body["rtc_configuration"]
    assert config["iceTransportPolicy"] == "relay"
    [entry] = config["iceServers"]
    assert entry["urls"] == [turn["url"]]
    expiry, user = entry["username"].split(":")
    assert user == "client" and int(expiry) == body["expires_at"]  # (no keys: every caller is "client")
    assert before + 3600 + 600 - 2 <= int(expiry) <= time.time() + 3600 + 600 + 1
    expected = base64.b64encode(hmac.new(SECRET.encode(), entry["username"].encode(), hashlib.sha1).digest()).decode()
    assert entry["credential"] == expected


def test_a_client_that_relays_everything_gets_the_face_through_the_turn_server(server, turn):
    """examples/live_client.py takes the service's configuration: its offer names relay
    candidates only, the pair it connects by is relayed on its side, and the face's frames come
    through the TURN server, whose account shows them."""

    async def session():
        client = LiveClient(server)
        await client.open(PORTRAIT, CONFIG, keep_frames=False)
        offered = re.findall(r"typ (\w+)", client.pc.localDescription.sdp)
        deadline = time.monotonic() + 15
        while len(client.received.video_times) < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        ice = client.pc.getTransceivers()[0].receiver.transport.transport
        pairs = list(ice._connection._nominated.values())  # aiortc has no getStats for the chosen pair
        frames = len(client.received.video_times)
        await client.close()
        return offered, pairs, frames

    since = len(turn["log"].read_text())
    offered, pairs, frames = asyncio.run(session())
    assert offered and set(offered) == {"relay"}, offered
    assert frames >= 50
    assert pairs and all(p.local_candidate.type == "relay" for p in pairs)
    assert relayed_bytes(turn["log"], since, "client") > 50_000  # 50 frames of video at least


def test_the_page_relays_its_live_session_through_the_turn_server(server, turn):
    """The demo page asks for the configuration before its offer: its connection's chosen pair
    is a relayed one on the browser's side, the face plays, and the TURN server carried it. The
    page is browsed by a name over plain http, as from another machine on a LAN: no microphone
    there (browsers give it to secure pages only), and the page says why, not "TypeError"."""
    since = len(turn["log"].read_text())
    d = chromium("--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
                 "--host-resolver-rules=MAP sonic.test 127.0.0.1")
    try:
        open_page(d, server.replace("127.0.0.1", "sonic.test"))
        assert d.execute_script("return window.isSecureContext") is False
        d.find_element("id", "image").send_keys(str(PORTRAIT))
        set_param(d, "min_resolution", 256)
        d.find_element("id", "live-start").click()
        wait(d, "return document.getElementById('live-video').currentTime > 1.0", 30, "the live video playing")
        local = d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            live.pc.getStats().then((stats) => {
              let pair = null;
              stats.forEach((s) => { if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
              done(pair ? stats.get(pair.localCandidateId).candidateType : null);
            });""")
        assert local == "relay"
        assert d.find_element("id", "error-live").text == ("the microphone is not available (the microphone needs a "
                                                           "secure page: https, or http://localhost): the portrait "
                                                           "will speak only the files you send")
        d.find_element("id", "live-stop").click()
        wait(d, "return live.id === null", 10, "the session stopped")
        # (the connection closed, the browser gives its allocations back: the account is written)
        relayed = relayed_bytes(turn["log"], since, "client")
    finally:
        d.quit()
    assert relayed > 50_000


def test_a_client_that_reaches_the_service_only_through_a_proxy_and_a_turn_server_gets_the_face(tmp_path):
    """Across NATs and firewalls, in networks of a namespace of its own (tests/nat_run.py): the
    client cannot reach the server's address at all, only an HTTP proxy and the TURN server
    between them. examples/live_client.py, unchanged, takes the service's TURN server and
    credentials, offers a relay candidate beside its host one, connects, and the face arrives.
    (Without the TURN server on its side it stays "connecting": measured, not tested.)"""
    if TURNSERVER is None:
        pytest.fail("turnserver is not installed (.ci/run installs Debian's coturn)")
    done = subprocess.run(["unshare", "-Urn", sys.executable, str(ROOT / "tests" / "nat_run.py"), str(tmp_path),
                           str(PORTRAIT), TURNSERVER], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["server_reachable_directly"] is False  # the networks are as drawn
    assert "relay" in seen["offered"] and seen["connection"] == "connected" and seen["frames"] >= 50, seen


def test_without_live_sessions_there_is_no_configuration(tmp_path):
    from server_helpers import FakePipeline, settings
    from sonic_server import create_app
    cfg = settings(tmp_path)
    cfg["live"]["enabled"] = False
    app = create_app(cfg, pipeline=FakePipeline())
    try:
        r = app.test_client().get("/api/sonic/live/rtc-configuration")
    finally:
        app.extensions["sonic"].queue.close()
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "not_ready"


def test_credentials_written_in_a_url_are_handed_over_apart_from_it_and_only_with_a_key(tmp_path):
    """`turn:user:password@host` (the settings' form, percent-encoded) becomes the browser's
    {urls, username, credential}; STUN needs none; a service with keys answers only its callers,
    and the credentials it makes name each caller apart."""
    from server_helpers import FakePipeline, settings
    from sonic_server import create_app
    cfg = settings(tmp_path, api_keys=["k1", "k2"])
    cfg["live"]["ice_servers"] = ["stun:10.0.0.1:3478", "turn:alice:pa%3Ass@w0rd@turn.example.org:3478?transport=tcp",
                                  "turn:relay.example.org:3478"]
    cfg["live"]["turn_secret"] = SECRET
    app = create_app(cfg, pipeline=FakePipeline())
    try:
        client = app.test_client()
        refused = client.get("/api/sonic/live/rtc-configuration")
        bodies = [client.get("/api/sonic/live/rtc-configuration", headers={"Authorization": f"Bearer {key}"}).get_json()
                  for key in ("k1", "k2")]
    finally:
        app.extensions["sonic"].queue.close()
    assert refused.status_code == 401
    written, made = bodies[0]["rtc_configuration"]["iceServers"][:2], bodies[0]["rtc_configuration"]["iceServers"][2]
    assert written == [
        {"urls": ["stun:10.0.0.1:3478"]},
        {"urls": ["turn:turn.example.org:3478?transport=tcp"], "username": "alice", "credential": "pa:ss@w0rd"},
    ]
    # made credentials name their caller (a digest), so that the TURN server's logs tell keys apart
    names = [body["rtc_configuration"]["iceServers"][2]["username"].split(":")[1] for body in bodies]
    assert all(re.fullmatch(r"client-[0-9a-f]{16}", name) for name in names) and names[0] != names[1]
    assert made["urls"] == ["turn:relay.example.org:3478"]


def test_a_written_turn_password_on_a_service_without_keys_is_warned_of_at_start(tmp_path, caplog):
    """Without keys or accounts, a password written in live.ice_servers goes to anyone who asks
    for the rtc-configuration: the start says so (never the password), and says nothing where
    keys guard it or the credentials are made from a secret."""
    from server_helpers import FakePipeline, settings
    from sonic_server import create_app

    def start_warnings(api_keys, ice_servers, turn_secret=""):
        caplog.clear()
        cfg = settings(tmp_path, api_keys=api_keys)
        cfg["live"]["ice_servers"], cfg["live"]["turn_secret"] = ice_servers, turn_secret
        with caplog.at_level(logging.WARNING, logger="sonic_server"):
            create_app(cfg, pipeline=FakePipeline()).extensions["sonic"].queue.close()
        return [r.getMessage() for r in caplog.records if "ice_servers" in r.getMessage()]

    written = ["stun:10.0.0.1:3478", "turn:alice:s3cret-pw@turn.example.org:3478"]
    said = start_warnings([], written)
    assert len(said) == 1 and "turn:alice:***@turn.example.org:3478" in said[0] and "s3cret-pw" not in said[0]
    assert "live.turn_secret" in said[0] and "anyone" in said[0]
    assert start_warnings(["k1"], written) == []
    assert start_warnings([], ["turn:turn.example.org:3478"], SECRET) == []


def test_a_turn_server_that_refuses_the_credentials_is_named_not_left_to_time_out(tmp_path_factory, turn):
    """A service whose turn_secret is not the TURN server's, relay only: the page says at Start
    that the TURN server gave it no relay address and what it answered (401), instead of a
    session that never connects; so does the Python client; and the service's log says its own
    sessions got no relay address (a client that connects directly still gets its face)."""
    from live_client import NoRelay
    from aiortc import RTCConfiguration

    live = {"host_addresses": ["127.0.0.1"], "idle_timeout_s": 5, "ice_servers": [turn["url"]],
            "turn_secret": "not-the-turn-servers-secret", "ice_transport_policy": "relay"}
    proc, info = start_server(tmp_path_factory.mktemp("live-turn-refused"), top={"live": live})
    d = chromium("--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns")
    try:
        open_page(d, info["base"])
        d.find_element("id", "image").send_keys(str(PORTRAIT))
        d.find_element("id", "live-start").click()
        said = wait(d, "return document.getElementById('error-live').textContent", 20, "the page's error")
        assert said.startswith("the live session could not start: this server relays its media through a TURN "
                               "server, which gave this browser no relay address ("), said
        assert turn["url"].split("?")[0] in said and " 401 " in said, said
        assert d.execute_script("return live.id") is None

        async def sessions():
            with pytest.raises(NoRelay, match="gave this client no relay address"):
                await LiveClient(info["base"]).open(PORTRAIT, CONFIG, keep_frames=False)
            direct = LiveClient(info["base"])  # a client that asks for no relay: it connects directly

            async def no_servers():
                return RTCConfiguration(iceServers=[])

            direct.rtc_configuration = no_servers
            await direct.open(PORTRAIT, CONFIG, keep_frames=False)
            deadline = time.monotonic() + 15
            while not direct.received.video_times and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            await direct.close()
            return len(direct.received.video_times)

        assert asyncio.run(sessions()) > 0
    finally:
        d.quit()
        proc.terminate()
        proc.wait(20)
    log = (info["tmp"] / "server.log").read_text()
    assert f"the TURN server {turn['url']} gave it no relay address" in log, log[-3000:]


def test_a_turn_server_that_does_not_answer_holds_up_one_session_not_each(tmp_path_factory):
    """A TURN server that takes requests and never answers (down behind a firewall that drops,
    not refuses): the first session's answer waits for it and the log says so; the sessions
    after it gather without it (it receives nothing more from them) and still get their face."""
    import socket
    import threading

    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind(("127.0.0.1", 0))
    blackhole.settimeout(0.2)
    received: list[float] = []
    stop = threading.Event()

    def swallow():
        while not stop.is_set():
            try:
                blackhole.recv(2048)
                received.append(time.monotonic())
            except OSError:
                pass

    threading.Thread(target=swallow, daemon=True).start()
    url = f"turn:127.0.0.1:{blackhole.getsockname()[1]}"
    live = {"host_addresses": ["127.0.0.1"], "idle_timeout_s": 5, "ice_servers": [url], "turn_secret": SECRET}
    proc, info = start_server(tmp_path_factory.mktemp("live-turn-silent"), top={"live": live})

    async def session():
        client = LiveClient(info["base"])  # asks for no relay itself: it reaches the server directly

        async def no_servers():
            from aiortc import RTCConfiguration
            return RTCConfiguration(iceServers=[])

        client.rtc_configuration = no_servers
        asked = time.monotonic()
        await client.open(PORTRAIT, CONFIG, keep_frames=False)
        deadline = time.monotonic() + 15
        while not client.received.video_times and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await client.close()
        return asked, len(client.received.video_times)

    try:
        first_asked, first_frames = asyncio.run(session())
        second_asked, second_frames = asyncio.run(session())
    finally:
        stop.set()
        proc.terminate()
        proc.wait(20)
        blackhole.close()
    assert first_frames > 0 and second_frames > 0
    assert any(first_asked <= t < second_asked for t in received)  # the first session asked it
    assert not [t for t in received if t >= second_asked]  # the second did not
    log = (info["tmp"] / "server.log").read_text()
    assert log.count(f"the TURN server {url} gave it no relay address") == 1, log[-3000:]
    assert "The next 60 s of sessions gather without it" in log


def test_the_server_asks_a_resting_turn_server_again_after_a_while_and_says_when_it_answers():
    from sonic_server.live.ice import IceServer, RelayWatch

    now = [0.0]
    watch = RelayWatch(retry_s=60, clock=lambda: now[0])
    servers = [IceServer("stun:10.0.0.1:3478"), IceServer("turn:10.0.0.1:3478", "u", "p")]
    assert watch.servers(servers) == servers
    assert watch.asked(relayed=False)  # news: it failed
    now[0] = 59.0
    assert watch.servers(servers) == servers[:1]  # resting: STUN only
    now[0] = 61.0
    assert watch.servers(servers) == servers  # asked again
    assert not watch.asked(relayed=False)  # still failing: not news
    now[0] = 200.0
    assert watch.asked(relayed=True)  # news: it answers again
    assert not watch.asked(relayed=True) and watch.servers(servers) == servers
