"""What the host gives the service (sonic_server/host_limits.py): the shortfalls named at
start-up, the open-files limit raised, the helpers the kernel kills first, and a server out of
file handles that waits instead of spinning."""
import os
import resource
import socket
import subprocess
import sys
import time

import requests
import yaml

from conftest import ROOT
from server_helpers import settings
from sonic_server.host_limits import raise_open_files, shortfalls, worst_case_memory_mb
from sonic_server.settings import settings_from
from test_http_live import free_port


def test_each_shortfall_names_the_settings_that_would_fit_and_none_is_said_with_room():
    cfg = settings_from({})  # 2 render helpers, 2 live sessions, a 768 MB decode budget
    assert worst_case_memory_mb(cfg) == 450 + 2 * 120 + 75 + 768 + 130 + 2 * 200
    assert shortfalls(cfg, memory_mb=8192, cpus=4, open_files=65536) == []
    memory, cpus, files = shortfalls(cfg, memory_mb=1000, cpus=1, open_files=64)
    assert "may use 1000 MB" in memory and "up to 2063 MB" in memory and "limits.decode_memory_mb 768" in memory
    assert "set live.max_sessions to 1" in cpus
    assert "the limit is 64 (ulimit -n)" in files
    # an API process whose workers run the jobs and sessions is not told about their memory or CPUs
    assert shortfalls(cfg, 1500, 1, 65536, runs_here=False) == []
    assert worst_case_memory_mb(cfg, runs_here=False) == 450 + 75 + 768
    small = settings_from({"render_processes": 0, "limits": {"decode_memory_mb": 100}, "live": {"enabled": False}})
    assert shortfalls(small, memory_mb=1000, cpus=1, open_files=65536) == []


def test_the_soft_open_files_limit_is_raised_to_the_hard_one():
    code = ("import resource; from sonic_server.host_limits import raise_open_files; "
            "print(raise_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))).stdout.split()
    assert out == [str(hard), str(hard)] and raise_open_files() == hard
    # under waitress (select(): no handle numbered 1024 or more) only that far, never lowered
    code = "from sonic_server.host_limits import raise_open_files; print(raise_open_files(1024), raise_open_files(512))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))).stdout.split()
    assert out == [str(min(1024, hard))] * 2


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_server_out_of_file_handles_waits_and_says_so_then_answers_again(tmp_path):
    """With every handle held by idle connections the server's accept failed at once, again and
    again: 100 % CPU, nothing answered, nothing logged, until the connections timed out."""
    cfg = settings(tmp_path, socket_timeout_s=60)
    cfg.update(render_processes=0)
    cfg["live"]["enabled"] = False
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--config", str(tmp_path / "settings.yaml")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    held: list[socket.socket] = []
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if requests.get(base + "/health", timeout=1).json()["readiness"] == "ready":
                    break
            except requests.RequestException:
                pass
            time.sleep(0.25)
        for _ in range(80):  # more than the server has handles left
            held.append(socket.create_connection(("127.0.0.1", port)))
            held[-1].sendall(b"GET /health HTTP/1.1\r\n")  # half a request: each holds its thread
        time.sleep(1)
        before = _cpu_s(proc.pid)
        time.sleep(3)
        assert _cpu_s(proc.pid) - before < 0.5          # waiting, not spinning (it spun at 100 %)
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "no answer once the connections closed"
            time.sleep(0.2)
        log.seek(0)
        text = log.read()
        assert "open files: the limit is 64 (ulimit -n)" in text
        assert "out of file handles (Too many open files): new connections wait" in text
    finally:
        for s in held:
            s.close()
        proc.terminate()
        proc.wait(10)


def test_the_server_starts_without_asking_dns_for_its_own_name(monkeypatch, tmp_path):
    """http.server asked DNS for the name of the address it listens on (socket.getfqdn), which
    nothing uses: on a machine no DNS server answers, `sonic serve` waited out the resolver's
    timeouts before it listened (tests/nat_run.py's isolated network: ready after 11.3 s, now 1.8 s)."""
    import socket

    from flask import Flask

    from sonic_server.serve import ThrottledAcceptServer

    def lookup(*args):
        raise AssertionError("a DNS lookup at start")

    monkeypatch.setattr(socket, "getfqdn", lookup)
    server = ThrottledAcceptServer("127.0.0.1", 0, Flask(__name__))
    try:
        assert (server.server_name, server.server_port) == ("127.0.0.1", server.socket.getsockname()[1])
    finally:
        server.server_close()
    socket_path = tmp_path / "sonic.sock"  # (werkzeug's unix:// hosts: an address that is no pair)
    server = ThrottledAcceptServer(f"unix://{socket_path}", 0, Flask(__name__))
    try:
        assert server.server_name == str(socket_path) and socket_path.exists()
    finally:
        server.server_close()


def test_a_workers_metrics_start_without_dns_and_answer_only_names_of_this_machine(monkeypatch):
    """`sonic worker --metrics-port` used prometheus_client's server: it asked DNS for its
    address's name at start, and answered a Host of any name (DNS rebinding: a page whose own
    name points at the worker could read its counters). It now refuses names as the API does."""
    import socket

    import requests

    from sonic_server.host_names import HostNames
    from sonic_server.worker import serve_metrics

    def lookup(*args):
        raise AssertionError("a DNS lookup at start")

    monkeypatch.setattr(socket, "getfqdn", lookup)
    for listed, rebound_answered in (((), False), (("metrics.example",), True)):
        server = serve_metrics("127.0.0.1", 0, HostNames.of(listed, None), 2.0)
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}/metrics"
        try:
            page = requests.get(url, timeout=5)
            assert page.status_code == 200 and "# TYPE sonic_jobs_finished_total counter" in page.text
            assert page.headers["Content-Type"].startswith("text/plain")
            rebound = requests.get(url, headers={"Host": "metrics.example:9100"}, timeout=5)
            if rebound_answered:
                assert rebound.status_code == 200 and "sonic_jobs_finished_total" in rebound.text
            else:
                assert rebound.status_code == 403 and "sonic_" not in rebound.text
                assert "does not answer to the name metrics.example: list it in server.allowed_hosts" in rebound.text
            assert "Python" not in page.headers["Server"]                  # no versions for a scanner
            head = requests.head(url, timeout=5)
            assert head.status_code == 200 and head.content == b""
            malformed = requests.get(url, headers={"Host": "a b<c>"}, timeout=5)
            assert malformed.status_code == 400 and "sonic_" not in malformed.text
            assert "the Host header must be a host name or address" in malformed.text
            # a client that sends half a request and stops is dropped after the socket timeout
            stalled = socket.create_connection(("127.0.0.1", server.socket.getsockname()[1]), timeout=10)
            stalled.sendall(b"GET /metrics HTTP/1.1\r\n")
            t0 = time.monotonic()
            assert stalled.recv(100) == b"" and time.monotonic() - t0 < 5  # closed by the server
            stalled.close()
        finally:
            server.shutdown()
            server.server_close()
