"""A client that reaches the service only through an HTTP proxy and a TURN server, as across NATs
and firewalls. Run by tests/test_live_turn.py inside `unshare -Urn` (a user and network
namespace of its own: nothing reaches any other network), where it builds three networks:

    client 10.10.2.2 ── 10.10.2.1  middle  10.10.1.1 ── 10.10.1.2 server
                                   (TURN server, HTTP proxy; no IP forwarding)

The middle forwards no packet between the two: the client's HTTP goes through the proxy, its
media only through the TURN server, whose relay addresses are on the server's side. The client
is examples/live_client.py, as a user runs it. Prints one JSON line: what the client saw.

usage: nat_run.py FOLDER PORTRAIT TURNSERVER"""

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

SERVER, MIDDLE_S, MIDDLE_C, CLIENT = "10.10.1.2", "10.10.1.1", "10.10.2.1", "10.10.2.2"
SECRET = "secret-shared-by-the-service-and-the-turn-server"


def ip(*args: str, netns: int | None = None) -> None:
    enter = ["nsenter", f"--net=/proc/{netns}/ns/net"] if netns else []
    subprocess.run([*enter, "ip", *args], check=True)


def wire(holder: int, inside: str, outside: str, name: str) -> None:
    """A veth pair from this namespace to `holder`'s, `outside` here and `inside` there."""
    ip("link", "add", "name", f"{name}0", "type", "veth", "peer", "name", f"{name}1")
    ip("link", "set", f"{name}1", "netns", str(holder))
    ip("addr", "add", f"{outside}/24", "dev", f"{name}0")
    ip("link", "set", f"{name}0", "up")
    ip("link", "set", "lo", "up", netns=holder)
    ip("addr", "add", f"{inside}/24", "dev", f"{name}1", netns=holder)
    ip("link", "set", f"{name}1", "up", netns=holder)
    ip("route", "add", "default", "via", outside, netns=holder)


async def proxy(listen: tuple[str, int], to: tuple[str, int]) -> None:
    """A TCP proxy: the client's HTTP to the service."""

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection(*to)
        await asyncio.gather(pipe(reader, to_writer), pipe(to_reader, writer), return_exceptions=True)

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


CLIENT_RUN = """
import asyncio, json, sys, time, socket
from live_client import LiveClient
async def main():
    direct = socket.socket()
    direct.settimeout(1)
    reachable = direct.connect_ex(("{server}", 5000)) == 0
    client = LiveClient("http://{middle}:8080")
    asked = time.monotonic()
    await client.open(sys.argv[1], {{"min_resolution": 256}}, keep_frames=False)
    start = time.monotonic()
    while time.monotonic() - start < 20 and len(client.received.video_times) < 50:
        await asyncio.sleep(0.05)
    first = client.received.video_times[0] - asked if client.received.video_times else None
    offered = sorted({{l.split(" typ ")[1].split()[0] for l in client.pc.localDescription.sdp.splitlines() if " typ " in l}})
    print(json.dumps({{"server_reachable_directly": reachable, "offered": offered,
                      "connection": client.pc.connectionState, "frames": len(client.received.video_times),
                      "first_frame_s": first}}))
    await client.close()
asyncio.run(main())
""".format(server=SERVER, middle=MIDDLE_C)


def ready(host: str, port: int) -> bool:
    """The service answers its /health: ready."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=2) as answer:
            return json.load(answer)["readiness"] == "ready"
    except (OSError, ValueError, KeyError):
        return False


def main() -> None:
    folder, portrait, turnserver = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    root = Path(__file__).resolve().parent.parent
    ip("link", "set", "lo", "up")
    holders = [subprocess.Popen(["unshare", "-n", "sleep", "600"]) for _ in range(2)]
    procs: list[subprocess.Popen] = []
    time.sleep(0.2)
    try:
        server_ns, client_ns = (h.pid for h in holders)
        wire(server_ns, SERVER, MIDDLE_S, "vs")
        wire(client_ns, CLIENT, MIDDLE_C, "vc")
        log = (folder / "turn.log").open("w")
        procs.append(subprocess.Popen(
            [turnserver, "-n", "-L", MIDDLE_S, "-L", MIDDLE_C, f"--relay-ip={MIDDLE_S}", "--listening-port=3478",
             "--use-auth-secret", f"--static-auth-secret={SECRET}", "--realm=sonic", "--no-tls", "--no-dtls",
             "--no-cli", "--fingerprint", "--log-file=stdout", "--simple-log", f"--pidfile={folder / 'turn.pid'}",
             f"--userdb={folder / 'turndb'}"], stdout=log, stderr=subprocess.STDOUT))
        settings = folder / "settings.json"  # JSON is YAML
        settings.write_text(json.dumps({
            "output_dir": str(folder / "out"),
            "server": {"data_dir": str(folder / "data"), "upload_dir": str(folder / "up")},
            "live": {"host_addresses": [SERVER], "ice_servers": [f"turn:{MIDDLE_S}:3478?transport=udp"],
                     "turn_secret": SECRET, "warm_start": False},
        }))
        serve_log = (folder / "server.log").open("w")
        procs.append(subprocess.Popen(
            ["nsenter", f"--net=/proc/{server_ns}/ns/net", sys.executable, "app.py", "--host", SERVER, "--port", "5000",
             "--config", str(settings)], cwd=root, stdout=serve_log, stderr=subprocess.STDOUT))
        threading.Thread(target=asyncio.run, args=(proxy((MIDDLE_C, 8080), (SERVER, 5000)),), daemon=True).start()
        started, deadline = time.monotonic(), time.monotonic() + 60
        while not ready(SERVER, 5000):
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start: " + (folder / "server.log").read_text()[-2000:])
            time.sleep(0.25)
        print(f"server ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        client = subprocess.run(
            ["nsenter", f"--net=/proc/{client_ns}/ns/net", sys.executable, "-c", CLIENT_RUN, portrait],
            cwd=root / "examples", capture_output=True, text=True, timeout=120)
        if client.returncode != 0:
            raise SystemExit("the client failed: " + client.stderr[-3000:])
        print(client.stdout.strip().splitlines()[-1])
    finally:
        for p in [*procs, *holders]:
            p.terminate()
        for p in [*procs, *holders]:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
