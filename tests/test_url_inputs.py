"""Inputs by URL: `image_url` / `audio_url` (form fields or a JSON body) fetched from a local
HTTP server on a free loopback port (allowed by outbound.allow_private): a good file renders as
an upload does; a 404, a file over the upload limit, a slow server, a file of the wrong type and
a redirect to a forbidden address are each refused with the field and the cause named."""
from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from conftest import PORTRAIT, SPEECH
from server_helpers import FAST, FakePipeline, assert_clean_error, settings
from test_http_live import free_port


class Files:
    """Serves the portrait and the speech, and the bad cases, on 127.0.0.1:port."""

    def __init__(self):
        self.port = free_port()
        routes = {
            "/portrait.jpg": (200, PORTRAIT.read_bytes()),
            "/%C3%A9t%C3%A9.jpg": (200, PORTRAIT.read_bytes()),  # /été.jpg, as a browser asks for it
            "/speech.flac": (200, SPEECH.read_bytes()),
            "/notes.txt": (200, b"just some text, not an image\n" * 40),
            "/gzipped.flac": (200, gzip.compress(SPEECH.read_bytes())),  # sent as Content-Encoding: gzip
            "/2.08mb": (200, b"\0" * 2_080_000),  # under the 2 MB limit alone, over it beside the portrait
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/private/moved":  # an absolute redirect within the same host
                    self.send_response(301)
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/private/portrait.jpg")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/private/portrait.jpg":  # behind Basic auth, as u:p w
                    if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"u:p w").decode():
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.path = "/portrait.jpg"
                if self.path == "/slow":
                    time.sleep(4)
                if self.path == "/portrait-in-1.4s":
                    time.sleep(1.4)
                    self.path = "/portrait.jpg"
                if self.path == "/drip":  # headers at once, then a byte every 0.3 s: never a long silence
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(30):
                            self.wfile.write(b"\xff")
                            self.wfile.flush()
                            time.sleep(0.3)
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server cut it off at its deadline, as it should
                    return
                if self.path == "/to-metadata":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data")
                    self.end_headers()
                    return
                if self.path == "/to-portrait":
                    self.send_response(302)
                    self.send_header("Location", "/portrait.jpg")
                    self.end_headers()
                    return
                if self.path == "/huge":  # no length announced: the cap holds while streaming
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(40):
                        self.wfile.write(b"\0" * 100_000)
                    return
                status, body = routes.get(self.path, (404, b"not here"))
                self.send_response(status)
                if self.path == "/gzipped.flac":  # a server compressing what it was asked for as it is
                    self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def files():
    f = Files()
    yield f
    f.close()


@pytest.fixture
def client(tmp_path):
    from sonic_server import create_app
    cfg = settings(tmp_path)
    cfg["outbound"] = {"allow_private": True, "fetch_timeout_s": 2, "max_fetches": 1}
    app = create_app(cfg, pipeline=FakePipeline())
    yield app.test_client()
    app.extensions["sonic"].queue.close()


def by_form(client, **fields):
    data = {"config": json.dumps(FAST), **fields}
    return client.post("/api/sonic/generate", data=data, content_type="multipart/form-data")


def test_inputs_by_url_render_as_uploads_do(client, files):
    r = by_form(client, image_url=files.url("/to-portrait"), audio_url=files.url("/speech.flac"))
    assert r.status_code == 200, r.get_data()[:300]
    pipeline = client.application.extensions["sonic"].queue.pipeline
    assert pipeline.calls[-1][0].shape[2] == 3  # the portrait's pixels reached the pipeline
    body = {"image_url": files.url("/portrait.jpg"), "audio_url": files.url("/speech.flac"), "config": FAST}
    r = client.post("/api/sonic/generate", json=body)
    assert r.status_code == 200 and r.get_json()["cached"] is True  # the same bytes: the same cache key
    with open(PORTRAIT, "rb") as img:  # a file and a URL may be mixed
        r = client.post("/api/sonic/generate", content_type="multipart/form-data",
                        data={"image": (img, "p.jpg"), "audio_url": files.url("/speech.flac"),
                              "config": json.dumps({**FAST, "seed": 5})})
    assert r.status_code == 200


def test_a_url_with_user_and_password_is_fetched_with_basic_auth(client, files):
    guarded = files.url("/private/portrait.jpg")
    r = by_form(client, image_url=guarded.replace("http://", "http://u:p%20w@"), audio_url=files.url("/speech.flac"))
    assert r.status_code == 200, r.get_data()[:300]
    moved = files.url("/private/moved").replace("http://", "http://u:p%20w@")  # carried to the same host
    r = by_form(client, image_url=moved, audio_url=files.url("/speech.flac"), config=json.dumps({**FAST, "seed": 3}))
    assert r.status_code == 200, r.get_data()[:300]
    r = by_form(client, image_url=guarded, audio_url=files.url("/speech.flac"))
    assert_clean_error(r, 400, "invalid_parameter")
    assert "HTTP 401" in r.get_json()["error"]["message"]


def test_a_null_url_is_said_to_be_null_not_missing(client, files):
    r = client.post("/api/sonic/generate", json={"image_url": None, "audio_url": files.url("/speech.flac")})
    assert_clean_error(r, 400, "invalid_parameter", "image_url")
    assert r.get_json()["error"]["message"].startswith("image_url is null")


@pytest.mark.parametrize("path, status, code, cause", [
    ("/missing.jpg", 400, "invalid_parameter", "HTTP 404"),
    ("/huge", 413, "input_too_large", "larger than"),
    ("/slow", 400, "invalid_parameter", "longer than"),
    ("/drip", 400, "invalid_parameter", "longer than"),
    ("/notes.txt", 415, "unsupported_media", "image_url"),
    ("/gzipped.flac", 400, "invalid_parameter", "sent the file compressed (gzip); serve it as it is"),
])
def test_a_bad_url_is_named_with_its_cause(client, files, path, status, code, cause):
    began = time.monotonic()
    r = by_form(client, image_url=files.url(path), audio_url=files.url("/speech.flac"))
    assert time.monotonic() - began < 4.0  # within fetch_timeout_s (2 s), not the server's pace
    assert_clean_error(r, status, code)
    err = r.get_json()["error"]
    assert err["field"] == "image_url" and cause in err["message"], err


def test_a_requests_fetched_files_are_bounded_together_as_an_upload_is(client, files):
    """Each URL could bring limits.max_upload_mb, twice an upload's limit for the request."""
    r = by_form(client, image_url=files.url("/portrait.jpg"), audio_url=files.url("/2.08mb"))
    assert_clean_error(r, 413, "input_too_large", "audio_url")
    assert "image_url and audio_url: the files together are larger than 2 MB" in r.get_json()["error"]["message"]


def test_urls_inside_are_refused_and_a_redirect_there_too(tmp_path, files):
    from sonic_server import create_app
    from sonic_server.outbound import Reach, check_url, fetch
    app = create_app(settings(tmp_path), pipeline=FakePipeline())  # allow_private off, as shipped
    try:
        r = app.test_client().post("/api/sonic/generate", json={"image_url": files.url("/portrait.jpg"),
                                                                "audio_url": "http://10.0.0.7/a.flac"})
        assert_clean_error(r, 400, "invalid_parameter")
        assert r.get_json()["error"]["field"] == "image_url" and "non-public" in r.get_json()["error"]["message"]
        assert_clean_error(app.test_client().post("/api/sonic/generate", json={"config": FAST}), 400,
                           "invalid_parameter")
    finally:
        app.extensions["sonic"].queue.close()

    def only_this_server(url, field, reach, **kw):  # this test's server is allowed, nothing else inside
        return check_url(url, field, Reach(private=True) if urlsplit(url).port == files.port else reach, **kw)

    assert fetch(files.url("/to-portrait"), "image_url", Reach(), 10**7, check=only_this_server)[:2] == b"\xff\xd8"
    with pytest.raises(Exception, match="169.254.169.254 is a link-local or cloud metadata address"):
        fetch(files.url("/to-metadata"), "image_url", Reach(), 10**7, check=only_this_server)


def test_a_requests_two_fetches_share_one_timeout(client, files):
    """A slow image and then a dripping audio: the request ends at fetch_timeout_s (2 s) in all,
    not 2 s for each, so one request holds a server thread no longer than that."""
    began = time.monotonic()
    r = by_form(client, image_url=files.url("/portrait-in-1.4s"), audio_url=files.url("/drip"))
    assert time.monotonic() - began < 2.9
    assert_clean_error(r, 400, "invalid_parameter")
    assert r.get_json()["error"]["field"] == "audio_url"


def test_fetches_beyond_max_fetches_are_refused_busy_not_queued_on_threads(client, files):
    """With outbound.max_fetches 1, a request fetching from a slow host holds the only slot: a
    second URL request is answered 503 at once, naming the setting; uploads are not held back,
    and the slot is free again when the first ends."""
    held = {}
    first = threading.Thread(target=lambda: held.update(r=by_form(client, image_url=files.url("/drip"),
                                                                   audio_url=files.url("/speech.flac"))))
    first.start()
    time.sleep(0.5)
    began = time.monotonic()
    r = by_form(client, image_url=files.url("/portrait.jpg"), audio_url=files.url("/speech.flac"))
    assert time.monotonic() - began < 1.0
    assert_clean_error(r, 503, "busy")
    assert "outbound.max_fetches" in r.get_json()["error"]["message"] and r.headers["Retry-After"]
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as speech:
        r = client.post("/api/sonic/generate", content_type="multipart/form-data",
                        data={"image": (img, "p.jpg"), "audio": (speech, "s.flac"), "config": json.dumps(FAST)})
    assert r.status_code == 200
    first.join()
    assert held["r"].status_code == 400
    r = by_form(client, image_url=files.url("/portrait.jpg"), audio_url=files.url("/speech.flac"))
    assert r.status_code == 200, r.get_data()[:300]


def test_a_name_slow_to_resolve_costs_no_more_than_its_deadline(monkeypatch):
    """The system's resolver takes no deadline: a name whose DNS server never answers held a
    webhook's request for the resolver's retries, outside any limit, and each hop of a fetch
    added its own. Resolution runs within RESOLVE_S, and within what is left of a fetch's time.
    (No name is looked up: the resolver is this test's, and sleeps.)"""
    import socket

    from sonic import Busy, InvalidParameter
    from sonic_server import outbound

    def never_answers(host, *args, **kw):
        time.sleep(3)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", 80))]

    monkeypatch.setattr(socket, "getaddrinfo", never_answers)
    monkeypatch.setattr(outbound, "RESOLVE_S", 0.5)
    began = time.monotonic()
    with pytest.raises(InvalidParameter, match="did not resolve within 0.5 s") as refused:
        outbound.check_url("https://hooks.example/h", "webhook", outbound.Reach())
    assert refused.value.field == "webhook" and time.monotonic() - began < 1.5
    began = time.monotonic()
    with pytest.raises(InvalidParameter, match="did not resolve within 0.3") as refused:
        outbound.fetch("https://files.example/p.jpg", "image_url", outbound.Reach(), 10**6, total_s=0.3)
    assert refused.value.field == "image_url" and time.monotonic() - began < 1.5
    # stuck lookups hold their threads until the resolver gives up: past RESOLVERS of them, the
    # next is busy at once (no thread piles up); a stuck one keeps no process from exiting (daemon)
    monkeypatch.setattr(outbound, "_resolving", threading.BoundedSemaphore(1))
    with pytest.raises(InvalidParameter):
        outbound.check_url("https://a.example/h", "webhook", outbound.Reach(), resolve_s=0.1)
    with pytest.raises(Busy):
        outbound.check_url("https://b.example/h", "webhook", outbound.Reach(), resolve_s=0.1)


def test_a_url_whose_path_is_in_another_script_is_fetched(client, files):
    """/été.jpg answered 500 (http.client takes ASCII only): it is asked for percent-encoded."""
    r = by_form(client, image_url=files.url("/été.jpg"), audio_url=files.url("/speech.flac"),
                config=json.dumps({**FAST, "seed": 8}))
    assert r.status_code == 200, r.get_data()[:300]


def test_credentials_follow_a_redirect_only_within_the_same_origin():
    from sonic_server.outbound import Target, same_origin_credentials

    first = Target("http://u:p@a.example/x", "http", "a.example", 80, "/x", "203.0.113.1", "Basic dTpw")
    for url, scheme, host, port, carried in (("http://a.example/y", "http", "a.example", 80, True),
                                             ("https://a.example/y", "https", "a.example", 443, False),
                                             ("http://a.example:8080/y", "http", "a.example", 8080, False),
                                             ("http://b.example/y", "http", "b.example", 80, False)):
        hop = same_origin_credentials(Target(url, scheme, host, port, "/y", "203.0.113.2"), first)
        assert (hop.authorization == "Basic dTpw") is carried, url


def test_one_keys_slow_hosts_take_only_its_share_of_the_fetches(tmp_path, files):
    """With keys, one caller holds at most a quarter of outbound.max_fetches: eight requests to a
    host that drips its answer kept every other caller's URL inputs refused 503 for as long as
    they were sent again. Here: 4 slots, one key's first fetch holds its one; its second is
    refused naming its share; another key's URL request is fetched and rendered."""
    from sonic_server import create_app
    cfg = settings(tmp_path)
    cfg["server"]["api_keys"] = ["key-one", "key-two"]
    cfg["outbound"] = {"allow_private": True, "fetch_timeout_s": 2, "max_fetches": 4}
    app = create_app(cfg, pipeline=FakePipeline())
    client = app.test_client()

    def by_url(key: str, image: str):
        return client.post("/api/sonic/generate", headers={"Authorization": f"Bearer {key}"},
                           data={"config": json.dumps(FAST), "image_url": files.url(image),
                                 "audio_url": files.url("/speech.flac")}, content_type="multipart/form-data")
    try:
        held = {}
        first = threading.Thread(target=lambda: held.update(r=by_url("key-one", "/drip")))
        first.start()
        time.sleep(0.5)
        again = by_url("key-one", "/portrait.jpg")
        assert_clean_error(again, 503, "busy")
        assert "this caller has its share of URL fetches under way (1 at once)" in again.get_json()["error"]["message"]
        other = by_url("key-two", "/portrait.jpg")
        assert other.status_code == 200, other.get_data()[:300]
        first.join()
        assert held["r"].status_code == 400
    finally:
        app.extensions["sonic"].queue.close()
