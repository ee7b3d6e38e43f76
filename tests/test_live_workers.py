"""Live sessions on workers (distributed mode): a real redis-server, two real `sonic worker`
processes, a real API server on a free port and aiortc clients, all on 127.0.0.1 (the workers
gather loopback candidates only, no STUN server is asked). Credits on (SQLite in the shared
data folder, 1 credit a second): every way a session ends settles what it streamed."""

import asyncio
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import requests
import yaml

from conftest import PORTRAIT, ROOT, SPEECH
from server_helpers import assert_clean_error, settings as server_settings
from test_http_live import free_port
from test_redis import start_redis

from live_client import LiveClient  # examples/: pytest.ini's pythonpath

CONFIG = {"min_resolution": 256, "seed": 5}
LEASE_S = 3.0
DRAIN_S = 5.0


class LiveCluster:
    def __init__(self, tmp):
        self.tmp = tmp
        port = self.redis_port = free_port()
        cfg = server_settings(tmp, redis_url=f"redis://127.0.0.1:{port}/0", worker_lease_s=LEASE_S,
                              worker_drain_s=DRAIN_S)
        cfg["render_processes"] = 0
        cfg["live"].update(host_addresses=["127.0.0.1"], max_sessions=1, idle_timeout_s=10.0, max_sessions_per_caller=1)
        cfg["credits"].update(enabled=True, per_video_second=1)
        self.config = tmp / "settings.yaml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.procs: dict[str, subprocess.Popen] = {}
        from sonic_server.accounts import Ledger

        (tmp / "data").mkdir(exist_ok=True)
        self.ledger = Ledger.open(f"sqlite:///{tmp / 'data' / 'credits.sqlite3'}")
        self.redis = start_redis(tmp, port)  # last: nothing after it can fail and leave it running

    def start(self, name, *args):
        log = open(self.tmp / f"{name}.log", "w")
        self.procs[name] = subprocess.Popen([sys.executable, *args, "--config", str(self.config)], cwd=ROOT,
                                            stdout=log, stderr=subprocess.STDOUT)

    def start_worker(self, name):
        self.start(name, "-m", "sonic", "worker", "--name", name)

    def start_api(self):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.start("api", "app.py", "--port", str(self.port))

    def health(self):
        return requests.get(self.base + "/health", timeout=5).json()

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except requests.RequestException:
                pass
            time.sleep(0.2)
        logs = {n: (self.tmp / f"{n}.log").read_text()[-1500:] for n in self.procs}
        pytest.fail(f"{what}: not within {timeout} s; logs: {logs}")

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.redis.terminate()
        self.redis.wait(10)


@pytest.fixture
def cluster(tmp_path):
    c = LiveCluster(tmp_path)
    yield c
    c.stop()


def live_workers(health):
    return {w["name"]: w for w in health.get("workers", []) if "live_slots" in w}


def charged(ledger, name):
    return 1000 - ledger.account(name)["balance"]


def test_sessions_spread_over_workers_survive_a_killed_one_and_drain(cluster):
    c = cluster
    keys = {name: c.ledger.create_account(name, credits=1000)[1] for name in "abde"}
    keys["c"] = c.ledger.create_account("c", credits=10_000)[1]  # two sessions' holds: only the cap refuses
    c.start_worker("w1")
    c.start_worker("w2")
    c.start_api()
    c.wait(lambda: len(live_workers(c.health())) == 2 and c.health()["readiness"] == "ready", 90, "two workers")
    h = c.health()
    assert all(w["live_slots"] == 1 and w["live_sessions"] == 0 for w in live_workers(h).values())
    assert h["live"]["slots"] == 2 and h["live"]["sessions"] == 0 and h["live"]["max_sessions"] == 2  # summed

    # one caller's two opens at once, sent to the API as they come (each worker has a free slot):
    # one is opened, the other refused by live.max_sessions_per_caller; before, both passed the count
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        raced = sorted(pool.map(lambda _: _open(c.base, keys["c"]), range(2)), key=lambda r: r.status_code)
    assert [r.status_code for r in raced] == [201, 429], [r.text[:300] for r in raced]
    assert_clean_error(raced[1], 429, "rate_limited")
    assert "max_sessions_per_caller" in raced[1].json()["error"]["message"]
    # its record is gone, as after a Redis restart without its data: the worker ends the session
    # at its next beat, settles its hold from its own copy of the record (checked at the end:
    # nothing reserved), and its slot is free again. The session went on streaming, unbilled and
    # impossible to end (a record ended elsewhere did the same), and the hold stayed for an hour
    import redis

    from sonic_server.live.relay import RUNNING, lease_key, record_key

    gone = raced[0].json()["session_id"]
    store = redis.Redis(port=c.redis_port)
    assert store.delete(record_key(gone), lease_key(gone)) == 2 and store.srem(RUNNING, gone) == 1
    c.wait(lambda: c.health()["live"]["slots"] == 2, 6, "the session ended by its worker, its slot back")
    c.wait(lambda: c.ledger.account("c")["reserved"] == 0, 5, "the session's hold settled by its worker")

    async def scenario():
        # two sessions: one on each worker (the least loaded is chosen)
        a, b = LiveClient(c.base, keys["a"]), LiveClient(c.base, keys["b"])
        opened_a = await a.open(PORTRAIT, CONFIG, keep_frames=False)
        opened_b = await b.open(PORTRAIT, CONFIG, keep_frames=False)
        assert {opened_a["worker"], opened_b["worker"]} == {"w1", "w2"}
        assert any(w.startswith("the face is enlarged") for w in opened_a["warnings"])  # the photo's, from the worker
        await asyncio.sleep(1.5)
        speaking = await a.speak_file(SPEECH)
        await asyncio.sleep(0.5)
        state_a = await a.state()
        assert state_a["worker"] == opened_a["worker"] and state_a["state"] == "speaking", state_a
        assert 0 < state_a["queued_s"] < speaking["queued_s"]
        frames_before = len(a.received.video_times)
        assert frames_before >= 25, frames_before  # the face reaches the client from the worker
        h = c.health()
        assert h["live"]["sessions"] == 2 and h["live"]["slots"] == 0
        # every slot taken: 503 busy, Retry-After
        r = await asyncio.to_thread(_open, c.base, keys["e"])
        assert_clean_error(r, 503, "busy")
        assert r.headers["Retry-After"]
        # refused without a command to either worker: each full worker tried was sent the portrait
        assert "had no free slot after all" not in (c.tmp / "api.log").read_text()
        # the worker of a is killed: a is reported ended (worker_lost) within the lease time
        lost, survivor = opened_a["worker"], opened_b["worker"]
        c.procs[lost].send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        gone = await asyncio.to_thread(
            c.wait, lambda: _ended(c.base, a.session_id, keys["a"]) == "worker_lost", LEASE_S + 10, "worker_lost"
        )
        assert gone and time.monotonic() - killed_at < LEASE_S + 3
        received_a = len(a.received.video_times) / 25
        await a.close(end_session=False)
        # b goes on on the other worker; ending it frees that worker's slot for a new session
        state_b = await b.state()
        assert state_b["worker"] == survivor and state_b["frames_sent"] > 50
        await b.close()
        # a portrait with 1.5 MB of junk appended goes to its worker as its pixels, not the junk
        padded = c.tmp / "padded.jpg"
        padded.write_bytes(PORTRAIT.read_bytes() + os.urandom(3 * 2**19))
        d = LiveClient(c.base, keys["d"])
        opened_d = await d.open(padded, CONFIG, keep_frames=False)
        assert opened_d["worker"] == survivor
        await asyncio.sleep(1.0)
        # the survivor is stopped gracefully: it takes no new session, d streams on up to the drain time
        c.procs[survivor].send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        await asyncio.to_thread(
            c.wait, lambda: live_workers(c.health())[survivor]["draining"], 10, "the worker draining"
        )
        assert live_workers(c.health())[survivor]["live_slots"] == 0
        assert_clean_error(await asyncio.to_thread(_open, c.base, keys["e"]), 503, "busy")
        first = (await d.state())["frames_sent"]
        await asyncio.sleep(1.0)
        state_d = await d.state()
        assert state_d["frames_sent"] >= first + 15, (first, state_d)
        assert c.procs[survivor].poll() is None  # draining, not stopped
        ended = await asyncio.to_thread(
            c.wait, lambda: _ended(c.base, d.session_id, keys["d"]), DRAIN_S + 10, "the drain's end"
        )
        assert ended == "server_stopping" and time.monotonic() - stopped_at >= DRAIN_S - 0.5
        await d.close(end_session=False)
        return received_a, state_b, state_d

    received_a, state_b, state_d = asyncio.run(scenario())
    c.wait(lambda: c.procs["w1"].poll() is not None and c.procs["w2"].poll() is not None, 15, "the drained worker stops")
    assert c.procs[[n for n in ("w1", "w2") if c.procs[n].returncode != -9][0]].returncode == 0
    # credits: the lost session paid for what it streamed up to its worker's last beat; the others
    # for what they streamed; nobody else paid; nothing is left on hold
    assert 1 <= charged(c.ledger, "a") <= math.ceil(received_a) + 1, (charged(c.ledger, "a"), received_a)
    assert math.ceil(state_b["streamed_s"]) <= charged(c.ledger, "b") <= math.ceil(state_b["streamed_s"]) + 1
    assert math.ceil(state_d["streamed_s"]) + 2 <= charged(c.ledger, "d") <= DRAIN_S + 3  # on to the drain's end
    assert charged(c.ledger, "e") == 0 and c.ledger.account("c")["balance"] == 10_000  # c's session streamed nothing
    assert all(c.ledger.account(n)["reserved"] == 0 for n in "abcde"), [c.ledger.account(n) for n in "abcde"]
    h = c.health()
    assert h["live"]["sessions"] == 0 and not live_workers(h)
    assert_clean_error(_open(c.base, keys["e"]), 503, "not_ready")  # no worker hosts sessions now


def _ended(base, session_id, key):
    r = requests.get(f"{base}/api/sonic/live/{session_id}", headers={"Authorization": f"Bearer {key}"}, timeout=15)
    if r.status_code == 404:
        return r.json()["error"].get("ended_reason")
    return None


def _open(base, key):
    from test_live_http import _offer
    import json

    data = {"config": json.dumps(CONFIG), "offer": json.dumps(_offer())}
    with open(PORTRAIT, "rb") as f:
        return requests.post(base + "/api/sonic/live", files={"image": f.read()}, data=data,
                             headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_public_host_replaces_the_answers_host_addresses():
    """Behind a 1:1 NAT the answer names the public address; ports, relay candidates and the rest stay."""
    from sonic_server.live.rtc import announce_host

    sdp = "\r\n".join([
        "v=0", "o=- 1 1 IN IP4 0.0.0.0", "m=video 40000 UDP/TLS/RTP/SAVPF 97", "c=IN IP4 10.0.0.5",
        "a=candidate:1 1 udp 2130706431 10.0.0.5 40000 typ host",
        "a=candidate:2 1 udp 16777215 198.51.100.9 50000 typ relay raddr 0.0.0.0 rport 0", "",
    ])
    out = announce_host(sdp, "203.0.113.7").split("\r\n")
    assert "c=IN IP4 203.0.113.7" in out and "o=- 1 1 IN IP4 0.0.0.0" in out
    assert "a=candidate:1 1 udp 2130706431 203.0.113.7 40000 typ host" in out
    assert "a=candidate:2 1 udp 16777215 198.51.100.9 50000 typ relay raddr 0.0.0.0 rport 0" in out
    assert announce_host(sdp, "") == sdp


def test_a_sessions_record_ends_once_whoever_ends_it(tmp_path):
    """The end-once script: the worker's end and a reaper's (lease lapsed) race for a record;
    exactly one wins and only that one settles; a beat after a reaper's end tells the worker."""
    import redis

    from sonic_server.live.relay import LiveRecord, Records, reap_lost

    port = free_port()
    proc = start_redis(tmp_path, port)
    try:
        records = Records(redis.Redis(port=port))
        settled = []
        records.create(LiveRecord("s1", "w1", "alice", time.time(), "h1", 60.0), lease_s=5)
        assert records.beat("s1", 2.5, lease_s=5)
        assert reap_lost(records, settled.append) == []  # its lease is alive: not lost
        first = records.end("s1", "client_closed", 3.0)
        assert first is not None and first.ended == "client_closed" and first.streamed_s == 3.0
        assert records.end("s1", "client_gone", 4.0) is None and not records.beat("s1", 4.0, lease_s=5)
        assert records.load("s1").ended == "client_closed" and records.running() == []
        # a worker gone: its lease lapses, a reaper ends it with the seconds of the last beat
        records.create(LiveRecord("s2", "w2", None, time.time(), "h2", 60.0), lease_s=0.3)
        assert records.beat("s2", 1.2, lease_s=0.3)
        time.sleep(0.5)
        lost = reap_lost(records, settled.append)
        assert [r.id for r in lost] == ["s2"] and settled == lost and lost[0].streamed_s == 1.2
        assert lost[0].ended == "worker_lost" and records.end("s2", "client_closed", 9.0) is None
        assert not records.beat("s2", 9.0, lease_s=5)  # the worker, back, learns its session is over
        assert reap_lost(records, settled.append) == [] and len(settled) == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_open_is_handed_over_once(tmp_path):
    """The opener and the worker agree once on who has a session: a worker that claims the answer
    in time is waited for even if it answers late; one that finds the opener gone must end it."""
    import threading

    import redis

    from sonic_server.live import relay
    from sonic_server.live.relay import WorkerUnreachable

    port = free_port()
    proc = start_redis(tmp_path, port)
    try:
        conn = redis.Redis(port=port)
        conn.set("sonic:worker:wx", "{}")
        taken = {}

        def slow_worker(claim_after_s):
            command = relay.take_command(conn, "wx", 5)
            time.sleep(claim_after_s)
            taken["claimed"] = relay.claim(conn, command)
            time.sleep(1.2)  # answers after the opener's deadline
            relay.answer(conn, command, {"session_id": "s1", "answer": {}})

        worker = threading.Thread(target=slow_worker, args=(0.2,))
        worker.start()
        assert relay.call(conn, "wx", "open", 1.0)["session_id"] == "s1"  # claimed in time: waited for
        worker.join()
        assert taken["claimed"]
        worker = threading.Thread(target=slow_worker, args=(1.5,))
        worker.start()
        with pytest.raises(WorkerUnreachable):
            relay.call(conn, "wx", "open", 1.0)
        worker.join()
        assert taken["claimed"] is False  # the worker learns the opener gave up: it ends the session
        conn.rpush("sonic:live:cmd:wx", '{"op": "state", "reply_to": "r", "deadline": 1}')
        assert relay.take_command(conn, "wx", 1) is None  # past its deadline (Redis' clock): dropped
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_workers_commands_run_in_order_per_session_and_a_slow_one_holds_up_no_other():
    """The worker's command lanes: session a's commands in the order they came; a's slow speak
    (a long file, a helper slow to answer) does not hold up b's (they waited behind it, up to
    the API's 5 s command timeout: 503 for the other sessions)."""
    import threading

    from sonic_server.live.host import Lanes

    done: list[tuple[str, int, float]] = []
    t0 = time.monotonic()

    def run(item):
        key, n, slow = item
        if slow:
            time.sleep(1.0)
        done.append((key, n, time.monotonic() - t0))

    lanes = Lanes(run)
    lanes.put("a", ("a", 1, True))
    for n in range(2, 5):
        lanes.put("a", ("a", n, False))
    lanes.put("b", ("b", 1, False))
    deadline = time.monotonic() + 5
    while len(done) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [n for key, n, _ in done if key == "a"] == [1, 2, 3, 4]
    b_at = next(at for key, _, at in done if key == "b")
    assert b_at < 0.5 and threading.active_count() < 50


def test_a_portrait_goes_to_its_worker_no_larger_than_its_pixels_need(monkeypatch):
    """Through Redis, in the open command: bytes appended to a small JPEG (47 MB that decode to
    256x300) were sent whole to every worker tried (Redis peaked at 898 MB in a trial of 8
    opens). A portrait heavier than its pixels goes as a PNG of them (the same pixels); one
    still over the bound as a JPEG of quality 95; one over even then is refused, 413."""
    import cv2
    from sonic.errors import InputTooLarge
    from sonic_server.live import remote
    from sonic_server.live.remote import forwarded_portrait

    data = PORTRAIT.read_bytes()
    rgb = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    assert forwarded_portrait(data, rgb) == data                               # as uploaded
    sent = forwarded_portrait(data + os.urandom(4 * 2**20), rgb)
    assert sent[:8] == b"\x89PNG\r\n\x1a\n" and len(sent) < rgb.nbytes
    assert np.array_equal(cv2.cvtColor(cv2.imdecode(np.frombuffer(sent, np.uint8), 1), cv2.COLOR_BGR2RGB), rgb)
    monkeypatch.setattr(remote, "FORWARDED_PORTRAIT_MAX_BYTES", 400_000)
    smooth = cv2.resize(rgb, (1024, 1200), interpolation=cv2.INTER_CUBIC)
    sent = forwarded_portrait(cv2.imencode(".png", smooth)[1].tobytes() + b"\0" * 4_000_000, smooth)
    assert sent[:2] == b"\xff\xd8" and len(sent) <= 400_000                 # a JPEG: no PNG was small enough
    noise = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    with pytest.raises(InputTooLarge, match="MB even as a JPEG"):
        forwarded_portrait(cv2.imencode(".png", noise)[1].tobytes(), noise)


def _turns_scenarios(api):
    """Speak turns' rules, for SpeakTurns (one process) or SharedSpeakTurns (api: one instance per
    API process)."""
    import threading

    from sonic_server.live.sessions import SpeakerBusy

    served: list[str] = []

    def line_length():
        return api[0].waiting("s1")

    def speak(name, turns, hold_s, wait_s=5.0, left=None):
        try:
            with turns.turn("s1", wait_s) as turn:
                served.append(f"{name} in")
                time.sleep(hold_s)
                if left is not None:  # its stream ended: it lets the next go before it is answered
                    turn.release()
                    left.set()
                    time.sleep(0.5)
                served.append(f"{name} out")
        except SpeakerBusy:
            served.append(f"{name} refused")

    def start(name, turns, hold_s, **kw):
        waiting = line_length()
        t = threading.Thread(target=speak, args=(name, turns, hold_s), kwargs=kw)
        t.start()
        deadline = time.monotonic() + 5
        while line_length() == waiting and time.monotonic() < deadline:  # it has its place before the next
            time.sleep(0.01)
        return t

    threads = [start(name, turns, 0.4) for name, turns in zip("abc", api)]  # each through its own process
    for t in threads:
        t.join(10)
    assert served == ["a in", "a out", "b in", "b out", "c in", "c out"], served

    # one held past the next's wait: the next is refused, and its place is given up
    served.clear()
    holder = start("a", api[0], 1.5)
    speak("b", api[1], 0, wait_s=0.5)
    holder.join(10)
    assert served == ["a in", "b refused", "a out"], served
    assert line_length() == 0

    # an interrupt through any process lets the next one go at once
    served.clear()
    holder = start("a", api[0], 3.0)
    waiter = start("b", api[1], 0)
    began = time.monotonic()
    api[2].interrupted("s1")
    waiter.join(10)
    assert served[:3] == ["a in", "b in", "b out"] and time.monotonic() - began < 1.0, served
    holder.join(10)

    # an interrupt just after the holder let go lets nothing else go: the next request, whose
    # turn it now is, keeps it (it was dropped from the line, and waited 5 s for a 409)
    served.clear()
    left = threading.Event()
    holder = start("a", api[0], 0.2, left=left)
    waiter = start("b", api[1], 0.3)
    left.wait(5)
    api[2].interrupted("s1")
    waiter.join(10)
    holder.join(10)
    assert "b refused" not in served and served.index("b in") < served.index("b out"), served


def test_speak_turns_in_one_process():
    from sonic_server.live.sessions import SpeakTurns

    turns = SpeakTurns()
    _turns_scenarios([turns] * 3)


def test_speak_requests_through_different_api_processes_take_turns_in_one_line(tmp_path):
    """Distributed mode's speak turns (remote.SharedSpeakTurns) on a real Redis, one instance
    per API process: requests to one session are served first come first served whichever
    process each reaches (two processes each kept a line of their own, and a request through
    each was spliced into the other); one that waits past its time is refused; an interrupt
    lets the holder's next go at once, and only the holder's; the place of a process that died
    lapses, and the line moves on."""
    import redis

    from sonic_server.live.remote import TICKET_LEASE_S, SharedSpeakTurns

    port = free_port()
    server = start_redis(tmp_path, port)
    try:
        r = redis.Redis(port=port)
        api = [SharedSpeakTurns(redis.Redis(port=port)) for _ in range(3)]
        _turns_scenarios(api)

        # a place held by a process that died (its lease no longer renewed) lapses
        r.rpush("sonic:live:speak:s2", "dead")
        r.set("sonic:live:speak-ticket:dead", 1, px=int(TICKET_LEASE_S * 1000))
        began = time.monotonic()
        with api[1].turn("s2", wait_s=TICKET_LEASE_S + 2):
            waited = time.monotonic() - began
        assert TICKET_LEASE_S - 0.5 < waited < TICKET_LEASE_S + 1.0, waited
    finally:
        server.terminate()
        server.wait(10)
