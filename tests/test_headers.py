"""No request header and no path parameter can make the service answer 5xx.

Random values (hypothesis) for Authorization, Range, Prefer, X-Request-ID, Origin, Content-Type
(and its boundary) and Accept go to every route; random job ids and output names go to the
routes that take them. The environ is built directly, as a WSGI server hands it over (header
values latin-1 decoded, path already unquoted), so that what an HTTP client would refuse or
normalise (line breaks, NUL, `..`) still reaches the app.
"""
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from werkzeug.test import EnvironBuilder, run_wsgi_app

from conftest import PORTRAIT, SPEECH
from server_helpers import FAST, assert_clean_error, post
from sonic.settings import SettingsError

KEY = "k1"


def wsgi(text: str) -> str:
    """`text` as a WSGI server hands it over: its UTF-8 bytes, latin-1 decoded."""
    return text.encode("utf-8", "surrogatepass").decode("latin-1")


LATIN1 = st.text(st.characters(min_codepoint=0, max_codepoint=255), max_size=60)    # any bytes
AS_SENT = st.text(max_size=30).map(wsgi)                    # any characters, sent as UTF-8
LONG = st.sampled_from(["a" * 9000, "\xe9" * 5000, "=" * 3000, ",".join(["bytes=0-1"] * 500)])
ANY = st.one_of(LATIN1, AS_SENT, LONG)


def some(*values: str):
    return st.one_of(st.sampled_from([wsgi(v) for v in values]), ANY)


ODD_KEYS = st.one_of(some("Bearer ", "Bearer", "bearer k1", "Bearer k1 k1", "Basic azE6", "Bearer \x00", "Bearer é",
                          "Bearer " + "\xff" * 300, "Bearer \U0001f511"), st.builds(lambda s: "Bearer " + s, ANY))
AUTHORIZATION = st.one_of(st.just(f"Bearer {KEY}"), st.just(f"Bearer {KEY}"), st.just(None), ODD_KEYS)   # mostly valid
HEADERS = {
    "Range": some("bytes=0-10", "bytes=-5", "bytes=100-", "bytes=5-1", "bytes=0-0,5-9", "bytes=-0", "bytes=0-",
                  "bytes=99999999999999999999999-", "items=0-1", "bytes=0-1\n", "bytes=", "bytes=--1"),
    "Prefer": some("respond-async", "wait=5", "respond-async, wait=abc", "respond-async\x00"),
    "X-Request-ID": some("abc123", "a\nb", "a\r\nSet-Cookie: x=1", "x" * 1000, "\x00", " "),
    "Origin": some("http://app.example", "null", "*", "http://app.example\n", "http://\xe9.example", "http://[::1", "http://localhost:abc"),
    "Accept": some("*/*", "application/json;q=0.1", "text/html;q=abc", "*/*;q=9e999", ";;;,,,"),
}
CONTENT_TYPES = st.one_of(
    st.just(None), st.just(None),                            # the body's own, valid multipart type
    st.builds(lambda b: f"multipart/form-data; boundary={b}", ANY),
    st.builds(lambda b: f'multipart/form-data; boundary="{b}"', ANY),
    some("multipart/form-data", "multipart/form-data; boundary=", "application/json", "text/plain; charset=\xff",
         "multipart/form-data; boundary=" + "-" * 200, "application/x-www-form-urlencoded"))
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def assert_answered(r) -> None:
    """Not a 5xx; a 4xx is the one JSON error body; every header is safe to send."""
    assert r.status_code < 500, (r.status_code, r.get_data()[:300])
    if r.status_code >= 400:
        assert_clean_error(r, r.status_code, r.get_json()["error"]["code"])
    for name, value in r.headers.items():
        assert "\n" not in value and "\r" not in value and "\x00" not in value, (name, value)
    r.get_data()                                              # a streamed body runs to its end too
    r.close()


def environ(headers: dict, path: str | None = None) -> dict:
    env = {"HTTP_" + name.upper().replace("-", "_"): value for name, value in headers.items()}
    if path is not None:
        env["PATH_INFO"] = path
    return env


class Served:
    """What the fuzz tests send to (a short repr: hypothesis prints it with a failing example)."""

    def __init__(self, client, job: str, video: str, body: bytes, body_type: str):
        self.client, self.job, self.video, self.body, self.body_type = client, job, video, body, body_type

    def __repr__(self) -> str:
        return f"Served(job={self.job})"


@pytest.fixture
def served(make_client):
    """A client with an API key, one finished job and its video; the multipart body of a request."""
    client, _ = make_client(api_keys=[KEY])
    r = post(client, {**FAST, "seed": 1}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    job = r.get_json()["job_id"]
    with open(PORTRAIT, "rb") as image, open(SPEECH, "rb") as audio:
        builder = EnvironBuilder(method="POST", data={"config": '{"min_resolution": 256, "seed": 1}',
                                                      "image": (image, "face.jpg"), "audio": (audio, "talk.flac")})
        env = builder.get_environ()
        body = env["wsgi.input"].read()
    return Served(client, job, r.get_json()["video_url"].rsplit("/", 1)[1], body, env["CONTENT_TYPE"])


def routes(job: str, video: str) -> list[tuple[str, str]]:
    return [("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/api/sonic/params"),
            ("POST", "/api/sonic/generate"), ("GET", f"/api/sonic/jobs/{job}"),
            ("GET", f"/api/sonic/jobs/{job}/events"), ("POST", f"/api/sonic/jobs/{job}/cancel"),
            ("GET", f"/output/{video}"), ("OPTIONS", "/api/sonic/generate"), ("GET", "/nowhere"),
            ("DELETE", "/health")]


@FUZZ
@given(data=st.data(), headers=st.fixed_dictionaries({}, optional=HEADERS), auth=AUTHORIZATION,
       content_type=CONTENT_TYPES)
def test_no_header_value_gives_a_server_error(served, data, headers, auth, content_type):
    client, job, video, body, body_type = served.client, served.job, served.video, served.body, served.body_type
    method, path = data.draw(st.sampled_from(routes(job, video)), label="route")
    env = environ(headers if auth is None else {**headers, "Authorization": auth}, path)
    if method == "POST":
        env["CONTENT_TYPE"] = body_type if content_type is None else content_type
    r = client.open("/", method=method, data=body if method == "POST" else None, environ_overrides=env)
    event(f"{method} {path.replace(job, '<job>').replace(video, '<video>')}: {r.status_code}")
    assert_answered(r)


SEGMENTS = st.one_of(
    LATIN1, AS_SENT,
    st.sampled_from([wsgi(s) for s in [
        "..", ".", "...", "\x00", "a\x00b", "%00", "%2e%2e", "..\\app.py", "../app.py", "..%2Fapp.py",
        "0" * 32, "0" * 32 + ".mp4\n", "0" * 32 + ".MP4", "0" * 32 + ".mp4\x00", "x" * 20000,
        "\u202e" * 10, "\xe9" * 500, " ", "\t", "?", "#", ";", "app.py", "/etc/passwd"]]))


@FUZZ
@given(data=st.data(), segment=SEGMENTS)
def test_no_path_parameter_gives_a_server_error(served, data, segment):
    client, job, video = served.client, served.job, served.video
    template = data.draw(st.sampled_from(["/api/sonic/jobs/{}", "/api/sonic/jobs/{}/events",
                                          "/api/sonic/jobs/{}/cancel", "/output/{}"]), label="route")
    segment = data.draw(st.sampled_from([segment, job + segment, video + segment, segment + video]), label="segment")
    method = "POST" if template.endswith("cancel") else "GET"
    r = client.open("/", method=method, environ_overrides=environ({"Authorization": f"Bearer {KEY}"},
                                                                  template.format(segment)))
    assert_answered(r)
    if template == "/output/{}" and segment != video:
        assert r.status_code in (404, 308), r.status_code  # only the real name serves a file (308: "//" merged)


@pytest.mark.parametrize("path", ["/output/../app.py", "/output/..", "/output/..\\app.py", "/output/%2e%2e/app.py",
                                  "/output/app.py", "/output/" + "0" * 32 + ".mp4\n"])
def test_names_outside_the_output_folder_are_404(served, path):
    client = served.client
    r = client.get("/", environ_overrides={"PATH_INFO": path})          # not normalised by a client
    assert_clean_error(r, 404, "not_found")
    assert b"import" not in r.get_data()


def test_odd_request_ids_are_replaced_not_echoed(served):
    client = served.client
    for sent in ("a\nb", "a\r\nSet-Cookie: x=1", "\x00", "\xe9t\xe9", " "):
        r = client.get("/health", environ_overrides={"HTTP_X_REQUEST_ID": sent})
        assert r.status_code == 200 and len(r.headers["X-Request-ID"]) == 32 and "Set-Cookie" not in r.headers
    assert client.get("/health", headers={"X-Request-ID": "trace-42"}).headers["X-Request-ID"] == "trace-42"
    assert client.get("/health", headers={"X-Request-ID": "y" * 100}).headers["X-Request-ID"] == "y" * 64


def test_a_host_that_is_no_host_is_refused_and_hosts_with_ports_or_brackets_are_not(served, make_client):
    """The answer's URLs are built on Host: one with spaces or markup, or a port past 1-65535, made them
    `http:///...`."""
    client = served.client
    for sent in ("a b<script>", "evil.example:666/x", "x@y", "h:port", "[::1", "", "127.0.0.1:99999", "localhost:0",
                 "[::1]:65536"):
        r = client.get("/health", environ_overrides={"HTTP_HOST": sent})
        assert r.status_code == 400, (sent, r.status_code)
        assert r.get_json()["error"] == {"code": "invalid_parameter", "field": "Host",
                                         "message": "the Host header must be a host name or address, with a port or not"}
    for sent in ("localhost", "127.0.0.1:5000", "[::1]:8080", "[2001:db8::1]", "10.0.0.5", "app.localhost:3000"):
        r = client.get("/health", environ_overrides={"HTTP_HOST": sent})
        assert r.status_code == 200, (sent, r.status_code, r.get_data()[:200])
    named, _ = make_client(api_keys=[KEY], allowed_hosts=["video.example.com", "my_host.local"])
    for sent in ("video.example.com", "VIDEO.example.com.:443", "my_host.local:443"):
        r = named.get("/health", environ_overrides={"HTTP_HOST": sent})
        assert r.status_code == 200, (sent, r.status_code, r.get_data()[:200])
    r = named.post("/api/sonic/generate", headers={"Authorization": f"Bearer {KEY}"}, data={
        "config": '{"async": true}', "image": (open(PORTRAIT, "rb"), "f.jpg"), "audio": (open(SPEECH, "rb"), "a.flac")},
        environ_overrides={"HTTP_HOST": "video.example.com:8443"})
    assert r.get_json()["status_url"].startswith("http://video.example.com:8443/api/sonic/jobs/"), r.get_json()


def answered_raw(client, host: str | None, protocol: str = "HTTP/1.1") -> tuple[int, dict]:
    """(status, JSON body) of GET /health sent as a WSGI server hands it over, with this Host (None:
    none): the test client cannot send every Host (it builds a URL on it)."""
    env = EnvironBuilder(path="/health").get_environ()
    del env["HTTP_HOST"]
    if host is not None:
        env["HTTP_HOST"] = host
    env["SERVER_PROTOCOL"] = protocol
    body, status, _ = run_wsgi_app(client.application, env, buffered=True)
    return int(status.split()[0]), json.loads(b"".join(body))


def test_an_http_1_1_request_without_host_is_refused_and_http_1_0_is_not(served):
    """RFC 9112 3.2: an HTTP/1.1 request without Host is answered 400 (1.0 may leave it out)."""
    status, body = answered_raw(served.client, None)
    assert status == 400 and body["error"] == {
        "code": "invalid_parameter", "field": "Host", "message": "an HTTP/1.1 request must name its Host"}
    assert answered_raw(served.client, None, "HTTP/1.0")[0] == 200
    for later in ("HTTP/1.2", "HTTP/2.0"):
        assert answered_raw(served.client, None, later)[0] == 400, later


@pytest.mark.parametrize("listed, answered, refused", [
    # nothing listed, listening on loopback (the default): addresses and localhost only
    ((), ["127.0.0.1:5000", "[::1]:5000", "localhost:5000", "a.localhost", "192.168.1.9"],
     ["evil.example:5000", "localhost.evil.example", "127.0.0.1.nip.io", "sonic"]),
    ((".example.com", "sonic"), ["example.com", "talk.EXAMPLE.com:443", "a.b.example.com", "sonic:8080", "10.1.2.3"],
     ["badexample.com", "example.com.evil.example", "sonic.evil.example"]),
    (("*",), ["evil.example:5000", "anything"], []),
])
def test_a_request_to_a_name_this_server_does_not_answer_to_is_refused(make_client, listed, answered, refused):
    """DNS rebinding: a page whose own name was pointed at this machine called a keyless server
    as its own origin (no CORS applies) and could read, start and delete its jobs. The name it
    sends in Host is the one thing it cannot hide."""
    client, cfg = make_client(allowed_hosts=list(listed))
    for host in answered:
        assert client.get("/api/sonic/jobs", environ_overrides={"HTTP_HOST": host}).status_code == 200, host
    for host in refused:
        for method, path in (("GET", "/api/sonic/jobs"), ("GET", "/"), ("GET", "/output/x.mp4"),
                             ("DELETE", "/api/sonic/jobs/x"), ("POST", "/api/sonic/generate")):
            r = client.open(path, method=method, environ_overrides={"HTTP_HOST": host})
            assert_clean_error(r, 403, "forbidden")
            message = r.get_json()["error"]["message"]
            assert "server.allowed_hosts" in message and f"SONIC_ALLOWED_HOSTS={host.split(':')[0]}," in message, message


def test_listening_beyond_loopback_names_must_still_be_listed(make_client):
    """A container listens on 0.0.0.0 and is still browsed at localhost on a laptop, where a
    page's name can be pointed at it: the rule does not depend on where the server listens."""
    anywhere, _ = make_client(host="0.0.0.0")
    assert anywhere.get("/health", environ_overrides={"HTTP_HOST": "localhost:8080"}).status_code == 200
    assert_clean_error(anywhere.get("/health", environ_overrides={"HTTP_HOST": "sonic:8080"}), 403, "forbidden")
    listed, _ = make_client(host="0.0.0.0", allowed_hosts=["sonic"])
    assert listed.get("/health", environ_overrides={"HTTP_HOST": "sonic:8080"}).status_code == 200
    for bad in ("http://talk.example.com", "talk.example.com:443", "*.example.com", "a b", "", "a..b"):
        with pytest.raises(SettingsError, match="server.allowed_hosts"):
            make_client(allowed_hosts=[bad])


def test_behind_a_proxy_the_proxys_host_and_the_forwarded_one_are_both_checked(make_client):
    """A page may set X-Forwarded-Host on its own (same-origin) requests, and a proxy that does
    not set it passes the page's on: with proxy_hops, `Host: evil.example` and
    `X-Forwarded-Host: localhost` were answered."""
    behind, _ = make_client(proxy_hops=1, allowed_hosts=["talk.example.com"])

    def status(host: str, forwarded: str) -> int:
        return behind.get("/api/sonic/jobs", headers={"X-Forwarded-Host": forwarded},
                          environ_overrides={"HTTP_HOST": host}).status_code
    assert status("evil.example", "localhost") == 403 and status("evil.example", "evil.example, localhost") == 403
    assert status("127.0.0.1:5000", "evil.example") == 403
    assert status("127.0.0.1:5000", "talk.example.com") == 200 and status("talk.example.com", "talk.example.com") == 200


def test_a_bracketed_host_that_is_no_ipv6_address_is_refused(served):
    """`[bad]` passed the Host pattern, and the answer's URLs became `http:///...`."""
    for sent in ("[bad]", "[dead:beef]", "[dead:beef]:80", "[::1%25eth0]"):
        status, body = answered_raw(served.client, sent)
        assert status == 400 and body["error"]["field"] == "Host", (sent, body)
    assert answered_raw(served.client, "[::ffff:127.0.0.1]:80")[0] == 200


def test_a_multipart_body_without_a_boundary_is_refused_naming_the_header(served):
    """Its parts cannot be found: the route said "image is missing" of an image that was sent."""
    for path in ("/api/sonic/generate", "/fusion", "/api/sonic/live"):
        r = served.client.post(path, data=b"--x\r\n", headers={"Authorization": f"Bearer {KEY}",
                                                                  "Content-Type": "multipart/form-data"})
        assert_clean_error(r, 400, "invalid_parameter")
        assert r.get_json()["error"]["field"] == "Content-Type" and "boundary" in r.get_json()["error"]["message"]
    # a boundary the body does not use: no part is found
    for path in ("/api/sonic/generate", "/fusion", "/api/sonic/live"):
        r = served.client.post(path, data=served.body, headers={
            "Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=not-the-one"})
        assert_clean_error(r, 400, "invalid_parameter", "Content-Type")
        assert "holds no complete part" in r.get_json()["error"]["message"], path
    # the right boundary, the closing one missing: werkzeug drops the last part (here the only one)
    unclosed = b'--b0\r\nContent-Disposition: form-data; name="config"\r\n\r\n{"seed": 1}\r\n'
    r = served.client.post("/api/sonic/generate", data=unclosed, headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "multipart/form-data; boundary=b0"})
    assert_clean_error(r, 400, "invalid_parameter", "Content-Type")
    assert "end with --<boundary>--" in r.get_json()["error"]["message"]
    # a file sent as a text field is said to be one, not missing
    r = served.client.post("/api/sonic/generate", data={"image": "face.jpg", "audio": "talk.flac"},
                           headers={"Authorization": f"Bearer {KEY}"}, content_type="multipart/form-data")
    assert_clean_error(r, 400, "invalid_parameter", "image")
    assert "image must be a file part" in r.get_json()["error"]["message"]
    # a stranger is told 401 first; a GET's stray Content-Type is no body to read
    r = served.client.post("/api/sonic/generate", data=b"--x\r\n", headers={"Content-Type": "multipart/form-data"})
    assert_clean_error(r, 401, "unauthorized")
    r = served.client.get(f"/api/sonic/jobs/{served.job}", headers={"Authorization": f"Bearer {KEY}",
                                                                    "Content-Type": "multipart/form-data"})
    assert r.status_code == 200

def test_unknown_job_ids_are_404_without_echoing_them(served):
    client, job = served.client, served.job
    auth = {"Authorization": f"Bearer {KEY}"}
    for bad in ("x" * 20000, "a\x00b", job.upper(), job + "0"):
        for suffix, method in (("", "GET"), ("/events", "GET"), ("/cancel", "POST")):
            r = client.open("/", method=method, environ_overrides=environ(auth, f"/api/sonic/jobs/{bad}{suffix}"))
            assert_clean_error(r, 404, "job_not_found")
            assert len(r.get_data()) < 500
