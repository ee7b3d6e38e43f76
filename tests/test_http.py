"""The HTTP contract through Flask's test client, with a fake pipeline where the model is not the
point (what needs real sockets, processes or the model: tests/test_http_live.py)."""
import io
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf

from conftest import PORTRAIT, SPEECH
from server_helpers import (FAKE_VIDEO, FAST, FakePipeline, assert_clean_error, post, uploads_empty, wait_done,
                            wait_status)
from sonic.errors import NoFaceDetected
from sonic.settings import SettingsError


def test_starting_then_ready_and_setup_failed(tmp_path, monkeypatch):
    import sonic
    from server_helpers import settings
    from sonic_server import create_app
    loaded = threading.Event()

    def slow_load(config):
        loaded.wait(10)
        return FakePipeline()
    monkeypatch.setattr(sonic, "load_pipeline", slow_load)
    client = create_app(settings(tmp_path), background_load=True).test_client()
    h = client.get("/health")                       # the models load while the server answers
    assert h.status_code == 503 and h.get_json()["readiness"] == "starting"
    r = post(client)
    assert_clean_error(r, 503, "not_ready")
    assert r.headers["Retry-After"] == "5"
    loaded.set()
    for _ in range(200):
        if client.get("/health").status_code == 200:
            break
        time.sleep(0.01)
    assert client.get("/health").get_json()["readiness"] == "ready"

    def broken_load(config):
        raise RuntimeError("no model here")
    monkeypatch.setattr(sonic, "load_pipeline", broken_load)
    client = create_app(settings(tmp_path / "b"), background_load=False).test_client()
    h = client.get("/health")
    assert h.status_code == 503 and h.get_json()["readiness"] == "setup_failed"
    r = post(client)
    assert_clean_error(r, 503, "not_ready")
    assert r.headers["Retry-After"] == "60"


def test_health_params_openapi(make_client):
    client, _ = make_client()
    h = client.get("/health")
    assert h.status_code == 200
    assert h.get_json() == {"status": "ok", "readiness": "ready", "queue_length": 0, "running_job": None,
                            "live": {"enabled": True, "sessions": 0, "max_sessions": 2}}
    body = client.get("/api/sonic/params").get_json()
    p = body["parameters"]
    assert p["fps"]["minimum"] == 10 and p["dynamic_scale"]["default"] == 1.0
    assert body["extra"]["async"]["type"] == "boolean"
    spec = client.get("/openapi.json").get_json()
    assert spec["openapi"].startswith("3.") and "/api/sonic/generate" in spec["paths"]
    assert set(p) | {"async"} <= set(spec["components"]["schemas"]["Parameters"]["properties"])


def test_health_when_the_worker_has_stopped(make_client):
    client, cfg = make_client()
    queue = client.application.extensions["sonic"].queue
    queue.close()                                     # the worker thread ends, as if it had died
    deadline = time.monotonic() + 5
    while queue.health()["workers_alive"] and time.monotonic() < deadline:
        time.sleep(0.01)
    h = client.get("/health")
    assert h.status_code == 503
    assert h.get_json() == {"status": "worker_stopped", "readiness": "worker_stopped", "queue_length": 0,
                            "running_job": None, "live": {"enabled": True, "sessions": 0, "max_sessions": 2}}
    r = post(client, {**FAST, "async": True})            # refused, not queued to wait forever
    assert_clean_error(r, 503, "not_ready")
    assert "worker" in r.get_json()["error"]["message"] and r.headers["Retry-After"] == "60"
    assert uploads_empty(cfg)


# every operation of the document with its response codes, as the service has always had them;
# every /api/ operation may also answer 401 (API keys) and 429 (rate limit)
GUARDED = {"401", "429"}
OPERATIONS = {
    ("/api/sonic/generate", "post"): {"200", "202", "400", "402", "403", "409", "413", "415", "422", "503", "500"}
    | GUARDED,
    ("/api/sonic/jobs/{job_id}", "get"): {"200", "404"} | GUARDED,
    ("/api/sonic/jobs", "get"): {"200", "400"} | GUARDED,
    ("/api/sonic/jobs/{job_id}", "delete"): {"204", "404", "503"} | GUARDED,
    ("/api/sonic/jobs/{job_id}/events", "get"): {"200", "204", "404", "503"} | GUARDED,
    ("/api/sonic/jobs/{job_id}/cancel", "post"): {"200", "404"} | GUARDED,
    ("/output/{name}", "get"): {"200", "206", "302", "304", "404", "412", "416", "503"},
    ("/health", "get"): {"200", "503"},
    ("/api/sonic/params", "get"): {"200"} | GUARDED,
    ("/openapi.json", "get"): {"200"},
    ("/metrics", "get"): {"200"},
    **{(path, "post"): {"200", "400", "402", "409", "413", "422"} | GUARDED
       for path in ("/fusion", "/api/fusion", "/fusion/batch", "/api/fusion/batch")},
    ("/api/sonic/live/rtc-configuration", "get"): {"200", "503"} | GUARDED,
    ("/api/sonic/live", "post"): {"201", "400", "402", "413", "415", "422", "503"} | GUARDED,
    ("/api/sonic/live/{session_id}/speak", "post"): {"202", "400", "404", "408", "409", "413", "415", "422", "503"} | GUARDED,
    ("/api/sonic/live/{session_id}/interrupt", "post"): {"200", "404", "503"} | GUARDED,
    ("/api/sonic/live/{session_id}", "get"): {"200", "404", "503"} | GUARDED,
    ("/api/sonic/live/{session_id}", "delete"): {"204", "404", "503"} | GUARDED,
}


def test_openapi_document_is_built_from_the_routes(make_client):
    client, _ = make_client()
    spec = client.get("/openapi.json").get_json()
    ops = {(path, method): set(op["responses"]) for path, item in spec["paths"].items() for method, op in item.items()}
    assert ops == OPERATIONS
    for (path, method), _ in OPERATIONS.items():
        op = spec["paths"][path][method]
        assert op["summary"] and all(r["description"] for r in op["responses"].values())
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert names == [part[1:-1] for part in path.split("/") if part.startswith("{")]
    upload = spec["paths"]["/api/sonic/generate"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert upload["properties"]["image"]["minLength"] == 1 and {"image_url", "audio_url"} <= set(upload["properties"])
    by_url = spec["paths"]["/api/sonic/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert by_url["required"] == ["image_url", "audio_url"]
    text = json.dumps(spec)                             # every $ref points at a declared schema
    for ref in set(part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]):
        assert ref in spec["components"]["schemas"], ref
    from sonic.decoders import describe_parameters, get_decoder
    fps_for_warp = describe_parameters(get_decoder("warp"))["fps"]["meaning"]      # the loaded decoder's meaning
    assert spec["components"]["schemas"]["Parameters"]["properties"]["fps"] == {
        "type": "integer", "description": fps_for_warp, "minimum": 10, "maximum": 60, "default": 25}
    duration = spec["components"]["schemas"]["Parameters"]["properties"]["duration"]
    assert duration["minimum"] == 0 and duration["exclusiveMinimum"] is True
    for (path, method), codes in OPERATIONS.items():      # the guard's answers, and its optional key
        op = spec["paths"][path][method]
        guarded = path.startswith(("/api/", "/fusion"))
        assert ("security" in op) == guarded and (codes >= GUARDED) == guarded
    scheme = spec["components"]["securitySchemes"]["bearerKey"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and "api_keys" in scheme["description"]
    # the headers a client reads are declared: on every answer, on those that ask to wait, on a job made
    for (path, method), codes in OPERATIONS.items():
        for code, answer in spec["paths"][path][method]["responses"].items():
            assert "X-Request-ID" in answer["headers"] and ("Retry-After" in answer["headers"]) == (code in ("429", "503"))
    made = spec["paths"]["/api/sonic/generate"]["post"]["responses"]
    assert {"Location", "Idempotent-Replayed"} <= set(made["202"]["headers"])
    gone = client.delete("/api/sonic/jobs/" + "0" * 32)
    assert gone.status_code == 404 and gone.headers["Content-Type"] == "application/json"
    # what a generated client needs (a TypeScript client returned the request id for /health and
    # /api/sonic/params, whose answers had headers but no body): a body schema for every 2xx, a
    # unique operationId, no Origin argument (a browser sets it), the error codes listed
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) and spec["paths"]["/api/sonic/jobs/{job_id}"]["get"]["operationId"] == "jobStatus"
    for (path, method), codes in OPERATIONS.items():
        op = spec["paths"][path][method]
        assert "Origin" not in [p["name"] for p in op.get("parameters", [])]
        for code in codes & {"200", "201", "202", "206"}:
            assert op["responses"][code].get("content"), (path, method, code)
    from sonic_server.errors import STATUS_BY_CODE
    assert set(STATUS_BY_CODE) <= set(spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"])
    health = spec["components"]["schemas"]["Health"]["properties"]["readiness"]["enum"]
    assert client.get("/health").get_json()["readiness"] in health


@pytest.mark.parametrize("server", [{}, {"api_keys": ["k1"]}])
def test_openapi_document_is_valid(make_client, server):
    """The served document passes a real OpenAPI 3.0 validator, which does catch a 3.1 form."""
    from openapi_spec_validator import validate
    from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
    client, _ = make_client(**server)
    spec = client.get("/openapi.json", headers={"Authorization": "Bearer k1"}).get_json()
    assert spec["openapi"] == "3.0.3"
    validate(spec)
    spec["components"]["schemas"]["Parameters"]["properties"]["duration"]["exclusiveMinimum"] = 0   # 3.1's form
    with pytest.raises(OpenAPIValidationError):
        validate(spec)


def test_sync_generate_and_download(make_client):
    client, cfg = make_client()
    r = post(client, {**FAST, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.get_json()
    assert body["success"] and body["seed"] == 3 and body["width"] == 256 and body["fps"] == 25
    assert abs(body["duration"] - 3.0) <= 0.04 and "lipsync_offset_ms" in body and "render" in body["timings"]
    assert body["video_url"].startswith("http://localhost/output/") and "file" not in body
    assert r.headers["X-Request-ID"]
    video = client.get(body["video_url"])
    assert video.status_code == 200 and video.headers["Content-Type"] == "video/mp4"
    assert video.data == FAKE_VIDEO
    assert uploads_empty(cfg)                                        # inputs deleted when the job ends

    part = client.get(body["video_url"], headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.data == FAKE_VIDEO[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(FAKE_VIDEO)}"
    # past the end: 416 with the size, to ask again within it
    beyond = client.get(body["video_url"], headers={"Range": f"bytes={len(FAKE_VIDEO) + 10}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{len(FAKE_VIDEO)}"
    # a Range not served (several ranges, another unit, malformed) is ignored: the whole video
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=abc", "bytes=5-2", f"bytes=-{len(FAKE_VIDEO) + 100}"):
        whole = client.get(body["video_url"], headers={"Range": ignored})
        assert whole.status_code == 200 and whole.data == FAKE_VIDEO, ignored
    # a condition is answered before a range: the client's copy is current (304), or a weak If-Range
    # (which needs a strong match) gets the whole video
    current = client.get(body["video_url"], headers={"Range": "bytes=0-9", "If-None-Match": video.headers["ETag"]})
    assert current.status_code == 304, current.status_code
    weak = client.get(body["video_url"], headers={"Range": "bytes=0-9", "If-Range": "W/" + video.headers["ETag"]})
    assert weak.status_code == 200 and weak.data == FAKE_VIDEO
    assert_conditions_in_rfc_order(client, body["video_url"], video.headers)
    # cached, but checked at each use (a deleted job's video must not go on playing from a cache)
    assert video.headers["Cache-Control"] == "no-cache" and video.headers["ETag"]
    assert client.get(body["video_url"], headers={"If-None-Match": video.headers["ETag"]}).status_code == 304

    again = post(client, {**FAST, "seed": 3, "async": True})         # identical request: cached
    assert again.status_code == 200 and again.get_json()["cached"] is True
    assert again.get_json()["video_url"] == body["video_url"]
    # the hit restarts the video's time to live, not its identity: a download paused before it
    # goes on (its tag was the modification time: the whole file again, and If-Match failed)
    resumed = client.get(body["video_url"], headers={"Range": "bytes=10-19", "If-Range": video.headers["ETag"]})
    assert resumed.status_code == 206 and resumed.data == FAKE_VIDEO[10:20]
    assert client.get(body["video_url"], headers={"If-Match": video.headers["ETag"]}).status_code == 200
    # a client written for 202 follows a 200 the same way: the job's status and status_url
    assert body["status"] == again.get_json()["status"] == "succeeded"
    assert client.get(again.get_json()["status_url"]).get_json()["video_url"] == body["video_url"]
    assert post(client, {**FAST, "seed": 4}).get_json().get("cached") is None   # other parameters: a new video


def assert_conditions_in_rfc_order(client, url: str, video: dict) -> None:
    """RFC 9110 13.2.2: If-Match / If-Unmodified-Since (412), then If-None-Match /
    If-Modified-Since (304), then If-Range, then Range. werkzeug answered a current copy's range
    206, ignored If-Unmodified-Since, and sent the whole video with a 412."""
    etag, modified = video["ETag"], video["Last-Modified"]
    later, earlier, bad_date = "Fri, 01 Jan 2100 00:00:00 GMT", "Thu, 01 Jan 1970 00:00:00 GMT", "yesterday"

    def get(method="GET", **headers):
        return client.open(url, method=method, headers={k.replace("_", "-"): v for k, v in headers.items()})

    def part(r):
        return r.status_code == 206 and r.data == FAKE_VIDEO[:10] and r.headers["ETag"] == etag

    def whole(r):
        return r.status_code == 200 and r.data == FAKE_VIDEO

    def current(r):
        return r.status_code == 304 and not r.data and r.headers["ETag"] == etag

    for r in (get(If_Match='"other"', Range="bytes=0-9"), get(If_Match="W/" + etag), get(If_Unmodified_Since=earlier)):
        assert_clean_error(r, 412, "precondition_failed")
        assert len(r.data) < 400 and r.headers["Cache-Control"] == "no-store"  # the error, not the video
    head = get("HEAD", If_Match='"other"')
    assert head.status_code == 412 and not head.data
    # HEAD: the whole video's headers, whatever Range (ranges are defined for GET only)
    head = get("HEAD", Range="bytes=0-9")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(FAKE_VIDEO)), head.headers
    # a list of dates is no date (werkzeug read the first): ignored
    assert whole(get(If_Unmodified_Since=f"{earlier}, {later}")) and whole(get(If_Modified_Since=f"{later}, {later}"))
    assert part(get(If_Match=etag, Range="bytes=0-9")) and part(get(If_Match="*", Range="bytes=0-9"))
    assert whole(get(If_Unmodified_Since=later)) and whole(get(If_Unmodified_Since=bad_date))
    assert whole(get(If_Match=etag, If_Unmodified_Since=earlier))  # If-Match decides when both are sent
    assert current(get(If_Modified_Since=later, Range="bytes=0-9")) and current(get(If_Modified_Since=modified))
    assert current(get("HEAD", If_None_Match=f'"x", W/{etag}')) and current(get(If_None_Match="*"))
    assert whole(get(If_Modified_Since=earlier)) and whole(get(If_Modified_Since=bad_date))
    assert part(get(If_None_Match='"other"', If_Modified_Since=later, Range="bytes=0-9"))  # If-None-Match decides
    assert part(get(If_Range=etag, Range="bytes=0-9")) and part(get(If_Range=modified, Range="bytes=0-9"))
    for other in ('"other"', earlier, later, bad_date):
        assert whole(get(If_Range=other, Range="bytes=0-9")), other


def test_slow_sync_request_gets_its_job_id(make_client):
    gate = threading.Event()
    client, _ = make_client(FakePipeline(gate=gate), sync_wait_s=0.3)
    try:
        r = post(client, {**FAST, "duration": 20})
        assert r.status_code == 202 and r.get_json()["job_id"] and r.get_json()["status_url"]
        assert r.headers["Location"] == r.get_json()["status_url"]
    finally:
        gate.set()
    assert wait_done(client, r.get_json()["job_id"])["status"] == "succeeded"


def read_events(response):
    """Server-Sent Events of a streamed test-client response, as (name, data) pairs; the response
    is closed at the stream's end, as a WSGI server closes it."""
    events, name = [], None
    for chunk in response.response:
        for line in chunk.decode().splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
        yield events
    response.close()


def test_event_streams_are_capped_and_their_slots_come_back(make_client):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe, max_event_streams=2)
    try:
        job = post(client, {**FAST, "async": True}).get_json()["job_id"]
        assert pipe.started.wait(5)
        url = f"/api/sonic/jobs/{job}/events"
        held = [client.get(url, buffered=False) for _ in range(2)]
        assert all(s.status_code == 200 for s in held)
        refused = client.get(url)
        assert_clean_error(refused, 503, "busy")
        assert "2 event streams" in refused.get_json()["error"]["message"] and refused.headers["Retry-After"]
        assert client.get(f"/api/sonic/jobs/{job}").status_code == 200      # polling still works
        held.pop().close()                                # a client goes away: its slot comes back
        again = client.get(url, buffered=False)
        assert again.status_code == 200
        again.close()
        for s in held:
            s.close()
        assert client.application.extensions["sonic"].event_streams.held == 0
    finally:
        gate.set()


def test_one_key_takes_a_quarter_of_the_event_streams_at_most(make_client):
    """One key could open every stream the server allows; everyone else got 503 and had to poll."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe, max_event_streams=4, api_keys=["key-a", "key-b"])
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    try:
        job_a = post(client, {**FAST, "seed": 81, "async": True}, headers=a).get_json()["job_id"]
        job_b = post(client, {**FAST, "seed": 82, "async": True}, headers=b).get_json()["job_id"]
        held = client.get(f"/api/sonic/jobs/{job_a}/events", headers=a, buffered=False)
        assert held.status_code == 200
        assert_clean_error(client.get(f"/api/sonic/jobs/{job_a}/events", headers=a), 503, "busy")
        theirs = client.get(f"/api/sonic/jobs/{job_b}/events", headers=b, buffered=False)
        assert theirs.status_code == 200
        held.close()
        again = client.get(f"/api/sonic/jobs/{job_a}/events", headers=a, buffered=False)  # its slot is back
        assert again.status_code == 200
        for s in (theirs, again):
            s.close()
    finally:
        gate.set()


def test_async_status_and_events(make_client):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe)
    try:
        r = post(client, {**FAST, "seed": 4}, headers={"Prefer": "respond-async"})
        assert r.status_code == 202 and r.get_json()["status"] in ("queued", "processing")
        assert r.headers["Preference-Applied"] == "respond-async"
        job = r.get_json()["job_id"]
        assert r.headers["Location"].endswith(job)
        assert pipe.started.wait(5)
        s = client.get(f"/api/sonic/jobs/{job}/events", buffered=False)
        assert s.headers["Content-Type"].startswith("text/event-stream")
        stream = read_events(s)
        events = next(stream)
        assert events[0][0] == "processing" and events[0][1]["status"] == "processing"
        gate.set()
        for events in stream:
            pass
    finally:
        gate.set()
    assert events[-1][0] == "succeeded" and events[-1][1]["video_url"].endswith(".mp4")
    assert [name for name, _ in events].count("succeeded") == 1
    assert client.application.extensions["sonic"].event_streams.held == 0     # the ended stream's slot is back
    status = wait_done(client, job)
    assert status["status"] == "succeeded" and status["video_url"] == events[-1][1]["video_url"]
    assert status["progress"] == 1.0 and status["stage"] == "succeeded"
    r2 = post(client, {**FAST, "seed": 5, "async": True})
    assert r2.status_code == 202
    assert wait_done(client, r2.get_json()["job_id"])["status"] == "succeeded"
    ended = [name for name, _ in next(read_events(client.get(f"/api/sonic/jobs/{job}/events", buffered=False)))]
    assert ended == ["succeeded"]                       # a finished job's stream is its final state
    # a browser's EventSource reconnects after the end: having seen it (its id), it gets 204 and stops;
    # one cut off before the end gets the end
    url = f"/api/sonic/jobs/{job}/events"
    assert b"\nid: succeeded\n" in client.get(url).data
    assert client.get(url, headers={"Last-Event-ID": "succeeded"}).status_code == 204
    resumed = client.get(url, headers={"Last-Event-ID": "processing"})
    assert resumed.status_code == 200 and b"event: succeeded" in resumed.data


def test_a_waiting_jobs_event_stream_tells_its_place_as_it_moves_up(make_client, monkeypatch):
    """queue_position in the stream's documents, refreshed at keep-alives: the job ahead is
    canceled, the next document says 0 (the stream broke there, on an event name read from the
    keep-alive's None)."""
    from sonic_server.routes import generate

    monkeypatch.setattr(generate, "SSE_LOOK_S", 0.2)
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe)
    try:
        post(client, {**FAST, "seed": 31, "async": True})
        assert pipe.started.wait(5)
        ahead = post(client, {**FAST, "seed": 32, "async": True}).get_json()
        waiting = post(client, {**FAST, "seed": 33, "async": True}).get_json()
        assert (ahead["queue_position"], waiting["queue_position"]) == (0, 1)
        stream = read_events(client.get(f"/api/sonic/jobs/{waiting['job_id']}/events", buffered=False))
        events = next(stream)
        assert events[-1][0] == "queued" and events[-1][1]["queue_position"] == 1
        client.post(f"/api/sonic/jobs/{ahead['job_id']}/cancel")
        while events[-1][1].get("queue_position") != 0:
            events = next(stream)
        assert events[-1][0] == "queued"
        gate.set()
        for events in stream:
            pass
    finally:
        gate.set()
    names = [name for name, _ in events]
    assert names[-1] == "succeeded" and "error" not in names, names
    assert "queue_position" not in events[-1][1]


def test_a_stopping_server_starts_no_waiting_job(make_client):
    """Once SIGTERM's drain begins, the job that waits is not started (the exit would cut it off,
    and it would read `interrupted`): it stays queued, for the next start to run."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe)
    try:
        running = post(client, {**FAST, "seed": 41, "async": True}).get_json()["job_id"]
        assert pipe.started.wait(5)
        waiting = post(client, {**FAST, "seed": 42, "async": True}).get_json()["job_id"]
        client.application.extensions["sonic"].drain.mark_stopping()
    finally:
        gate.set()
    assert wait_done(client, running)["status"] == "succeeded"
    time.sleep(1.0)
    assert client.get(f"/api/sonic/jobs/{waiting}").get_json()["status"] == "queued" and len(pipe.calls) == 1


def test_with_keys_health_names_no_callers_job(make_client):
    """/health needs no key: it named the running job, whose id names its video, and anyone
    polling it downloaded every caller's videos. With keys it says busy, and no id."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe, api_keys=["key-a"])
    try:
        job = post(client, {**FAST, "seed": 51, "async": True}, headers={"Authorization": "Bearer key-a"}).get_json()
        assert pipe.started.wait(5)
        health = client.get("/health").get_json()
        assert health["readiness"] == "busy" and "running_job" not in health, health
        assert job["job_id"] not in json.dumps(health)
    finally:
        gate.set()
    open_client, _ = make_client(FakePipeline())  # without keys every job is anyone's: it is named
    assert open_client.get("/health").get_json()["running_job"] is None


def test_a_job_cut_off_by_the_stop_reads_interrupted_not_internal_error(make_client):
    """At the exit the render helpers stop under the running job, which failed `internal_error`
    with a traceback; while the server stops, such a failure is the stop's: `interrupted`."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate, error=TypeError("'NoneType' object is not callable"))
    client, _ = make_client(pipe)
    try:
        job = post(client, {**FAST, "seed": 43, "async": True}).get_json()["job_id"]
        assert pipe.started.wait(5)
        client.application.extensions["sonic"].drain.mark_stopping()
    finally:
        gate.set()
    body = wait_done(client, job)
    assert body["status"] == "failed" and body["error"]["code"] == "interrupted", body


def test_cancel(make_client):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, cfg = make_client(pipe)
    try:
        r = post(client, {**FAST, "seed": 6, "duration": 30, "async": True})
        assert r.status_code == 202
        job = r.get_json()["job_id"]
        assert pipe.started.wait(5)
        c = client.post(f"/api/sonic/jobs/{job}/cancel")
        assert c.status_code == 200 and c.get_json()["status"] == "canceled"
        assert c.get_json()["success"] is False
        assert c.get_json()["error"] == {"code": "canceled", "message": "the job was canceled", "status": 409}
    finally:
        gate.set()
    assert not (Path(cfg["output_dir"]) / f"{job}.mp4").exists()
    assert uploads_empty(cfg)
    assert client.get("/api/sonic/jobs/nope").status_code == 404
    assert client.post("/api/sonic/jobs/nope/cancel").status_code == 404
    assert client.get("/api/sonic/jobs/nope/events").status_code == 404
    assert client.post(f"/api/sonic/jobs/{job}/cancel").get_json()["status"] == "canceled"   # again: no change


def test_sync_request_for_a_canceled_job(make_client):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe)
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=post(client, {**FAST, "seed": 11})))
    t.start()
    try:
        assert pipe.started.wait(5)
        job = client.get("/health").get_json()["running_job"]
        client.post(f"/api/sonic/jobs/{job}/cancel")
    finally:
        gate.set()
        t.join(10)
    assert_clean_error(answer["r"], 409, "canceled")


def test_success_is_true_only_while_a_job_can_still_succeed(make_client):
    """`success` is true for queued, processing and succeeded jobs; false, with the error, for
    canceled and failed ones: in the status body, the events and the cancel answer."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, _ = make_client(pipe)
    try:
        running = post(client, {**FAST, "seed": 21, "async": True}).get_json()
        assert pipe.started.wait(5)
        queued = post(client, {**FAST, "seed": 22, "async": True}).get_json()
        assert queued["status"] == "queued" and queued["success"] is True and "error" not in queued
        body = client.get(f"/api/sonic/jobs/{running['job_id']}").get_json()
        assert body["status"] == "processing" and body["success"] is True and "error" not in body
        canceled = client.post(f"/api/sonic/jobs/{queued['job_id']}/cancel").get_json()
        assert canceled["status"] == "canceled" and canceled["success"] is False
        assert canceled["error"]["code"] == "canceled"
    finally:
        gate.set()
    body = wait_done(client, running["job_id"])
    assert body["status"] == "succeeded" and body["success"] is True and "error" not in body
    events = next(read_events(client.get(f"/api/sonic/jobs/{queued['job_id']}/events", buffered=False)))
    assert [name for name, _ in events] == ["canceled"]
    assert events[0][1]["success"] is False and events[0][1]["error"]["status"] == 409
    body = client.get(f"/api/sonic/jobs/{queued['job_id']}").get_json()
    assert body["status"] == "canceled" and body["success"] is False and body["error"]["code"] == "canceled"

    failing, _ = make_client(FakePipeline(error=NoFaceDetected("no face found")))
    job = post(failing, {**FAST, "seed": 23, "async": True}).get_json()["job_id"]
    body = wait_done(failing, job)
    assert body["status"] == "failed" and body["success"] is False and body["error"]["code"] == "no_face_detected"


def test_queue_full_then_503(make_client):
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    client, cfg = make_client(pipe, queue_size=2, retry_after_s=7)
    try:
        running = post(client, {**FAST, "seed": 7, "async": True})
        assert running.status_code == 202
        assert pipe.started.wait(5)                      # the worker has taken it: queue empty
        h = client.get("/health").get_json()
        assert h["readiness"] == "busy" and h["running_job"] == running.get_json()["job_id"]
        queued = [post(client, {**FAST, "seed": s, "async": True}) for s in (8, 9)]
        assert all(r.status_code == 202 and r.get_json()["status"] == "queued" for r in queued)
        assert client.get("/health").get_json()["queue_length"] == 2
        full = post(client, {**FAST, "seed": 10, "async": True})
        assert_clean_error(full, 503, "busy")
        assert full.headers["Retry-After"] == "7"
        # told before its files are decoded (a 40 MP photo took 3.6 s to be told): a photo that
        # is no photo is busy too, and nothing of it is stored
        stored = {p.name for p in Path(cfg["server"]["upload_dir"]).iterdir()}
        assert_clean_error(post(client, {**FAST, "seed": 11, "async": True}, image=SPEECH), 503, "busy")
        assert len(pipe.calls) == 1 and {p.name for p in Path(cfg["server"]["upload_dir"]).iterdir()} == stored
        for r in queued + [running]:
            client.post(f"/api/sonic/jobs/{r.get_json()['job_id']}/cancel")
        # canceled queued jobs free their places at once
        assert client.get("/health").get_json()["queue_length"] == 0
    finally:
        gate.set()
    for r in queued + [running]:
        assert wait_done(client, r.get_json()["job_id"])["status"] == "canceled"
    assert len(pipe.calls) == 1                         # the canceled queued jobs never ran


def test_concurrent_sync_requests(make_client):
    client, _ = make_client(FakePipeline(delay_s=0.2))  # two requests fit: one runs, one waits
    results = {}

    def call(seed):
        results[seed] = post(client, {**FAST, "seed": seed, "duration": 1.0})
    threads = [threading.Thread(target=call, args=(s,)) for s in (21, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    assert len({r.get_json()["video_url"] for r in results.values()}) == 2


def test_errors(make_client, tmp_path):
    client, cfg = make_client()
    with open(PORTRAIT, "rb") as image, open(SPEECH, "rb") as audio:
        r = client.post("/api/sonic/generate", data={"image": image, "audio": audio, "config": "{bad"})
    assert_clean_error(r, 400, "invalid_parameter", "config")
    with open(PORTRAIT, "rb") as image, open(SPEECH, "rb") as audio:  # curl -F config=@c.json: a file part
        config_file = (io.BytesIO(b'{"bogus": 1}'), "c.json")
        r = client.post("/api/sonic/generate", data={"image": image, "audio": audio, "config": config_file})
    assert_clean_error(r, 400, "invalid_parameter", "config")  # not ignored, as if no config were sent
    assert "text field" in r.get_json()["error"]["message"]
    assert_clean_error(post(client, {"fps": 500}), 400, "invalid_parameter", "fps")
    assert_clean_error(post(client, {"dynamic_scal": 1}), 400, "invalid_parameter", "dynamic_scal")
    assert_clean_error(post(client, {"async": "yes"}), 400, "invalid_parameter", "async")
    with open(PORTRAIT, "rb") as image:
        r = client.post("/api/sonic/generate", data={"image": image})
    assert_clean_error(r, 400, "invalid_parameter", "audio")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert_clean_error(post(client, image=empty), 400, "invalid_parameter", "image")
    # a part with no file name: missing when it is empty (a browser's file input left empty), an
    # upload when it has content (it was "missing" too)
    with open(SPEECH, "rb") as audio:
        r = client.post("/api/sonic/generate", data={"image": (io.BytesIO(b""), ""), "audio": audio})
    assert_clean_error(r, 400, "invalid_parameter", "image")
    assert "missing" in r.get_json()["error"]["message"]
    with open(SPEECH, "rb") as audio:
        r = client.post("/api/sonic/generate", data={"image": (io.BytesIO(PORTRAIT.read_bytes()), ""), "audio": audio})
    assert r.status_code == 200, r.get_json()
    big = tmp_path / "big.wav"
    big.write_bytes(b"\0" * (3 * 1024 * 1024))
    assert_clean_error(post(client, audio=big), 413, "input_too_large")
    assert "image_url or audio_url" in post(client, audio=big).get_json()["error"]["message"]
    # a route that takes no URL does not suggest one (the live session's portrait did)
    with open(big, "rb") as f:
        live = client.post("/api/sonic/live", data={"image": f, "offer": "{}"})
    assert_clean_error(live, 413, "input_too_large")
    assert "send smaller files" in live.get_json()["error"]["message"] and "_url" not in live.get_json()["error"]["message"]
    assert_clean_error(post(client, image=SPEECH), 415, "unsupported_media", "image")
    assert_clean_error(post(client, audio=PORTRAIT), 415, "unsupported_media", "audio")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    assert_clean_error(post(client, audio=silent), 422, "empty_audio", "audio")
    for path in ("/output/../app.py", "/output/..%2Fapp.py", "/output/app.py", "/output/" + "0" * 32 + ".mp4"):
        assert_clean_error(client.get(path), 404, "not_found")
    assert_clean_error(client.get("/nowhere"), 404, "not_found")
    # a job id left out: a 404 in JSON (it was a 308 to another route, as an HTML page)
    for path in ("/api/sonic/jobs//events", "/api/sonic/jobs//cancel", "/api/sonic//jobs"):
        assert_clean_error(client.get(path), 404, "not_found")
    r = client.delete("/api/sonic/generate")
    assert_clean_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert uploads_empty(cfg)


@pytest.mark.parametrize("failing", ["upload", "store"])
def test_a_failed_write_leaves_no_upload_and_no_job(make_client, monkeypatch, failing):
    client, cfg = make_client()
    svc = client.application.extensions["sonic"]

    def half_written(job_id, files):                  # the first file lands, then the disk is full
        folder = svc.uploads.root / job_id
        folder.mkdir(parents=True)
        (folder / "image").write_bytes(files["image"])
        raise OSError(28, "No space left on device")

    def locked(rec):
        raise RuntimeError("database is locked")
    if failing == "upload":
        monkeypatch.setattr(svc.uploads, "save", half_written)
    else:
        monkeypatch.setattr(svc.queue.store, "save", locked)
    r = post(client, {**FAST, "seed": 13})
    # an ENOSPC from anywhere is the disk's, said as such (as a job's is); any other, internal
    assert_clean_error(r, 500, "disk_full" if failing == "upload" else "internal_error")
    assert "No space" not in r.text and "locked" not in r.text
    assert uploads_empty(cfg) and not any(Path(cfg["server"]["upload_dir"]).iterdir())
    assert client.get("/health").get_json()["queue_length"] == 0


def test_a_full_upload_disk_is_disk_full_and_leaves_nothing(make_client, tmp_path):
    """A real full filesystem under the upload folder (a 48 kB tmpfs: the portrait fits, the
    recording does not; needs root, as on this project's machines): the operator's problem,
    said as such, no half-written folder, nothing queued, the next request answered."""
    import subprocess
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        client, cfg = make_client(upload_dir=str(mnt), min_free_mb=0)  # the disk filling mid-upload
        for seed in (13, 14):
            r = post(client, {**FAST, "seed": seed})
            assert_clean_error(r, 500, "disk_full")
            assert "no space left on the server's disk" in r.json["error"]["message"] and str(mnt) not in r.text
            assert not any(mnt.iterdir())
        assert client.get("/health").get_json()["queue_length"] == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_an_upload_folder_that_cannot_be_written_is_a_named_error(make_client, tmp_path):
    """The upload folder turned read-only after the service started (a tmpfs remounted read-only;
    needs root, as on this project's machines): the operator's problem, said as such without the
    server's path (it was a 500 internal_error with a traceback in the log), nothing queued."""
    import subprocess
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        client, cfg = make_client(upload_dir=str(mnt), min_free_mb=0)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = post(client, {**FAST, "seed": 13})
        assert_clean_error(r, 500, "pipeline_error")
        assert "cannot keep the uploads in the service's upload folder (Read-only file system)" in r.json["error"]["message"]
        assert str(mnt) not in r.text
        assert client.get("/health").get_json()["queue_length"] == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_service_short_of_disk_says_so_and_refuses_before_reading_the_upload(make_client, tmp_path):
    """Less free disk than server.min_free_mb under the output folder (a 4 MB tmpfs, 3 MB of it
    filled; needs root): every job failed disk_full while /health said ready. Now /health says
    disk_full, generate refuses at once with Retry-After, and both recover once there is room."""
    import subprocess
    mnt = tmp_path / "outputs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        client, cfg = make_client(min_free_mb=2)
        client.application.extensions["sonic"].output_dir = mnt
        (mnt / "filler").write_bytes(b"\0" * 3 * 2**20)
        health = client.get("/health")
        assert health.status_code == 503 and health.get_json()["readiness"] == "disk_full"
        r = post(client, {**FAST, "seed": 16})
        assert_clean_error(r, 500, "disk_full")
        assert r.headers["Retry-After"] == "60" and "under server.min_free_mb (2 MB)" in r.json["error"]["message"]
        assert str(mnt) not in r.text and not any((tmp_path / "uploads").glob("*"))
        (mnt / "filler").unlink()
        assert client.get("/health").get_json()["readiness"] == "ready"
        assert post(client, {**FAST, "seed": 16}).status_code == 200
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_job_database_disk_is_disk_full_and_a_start_on_it_says_so(tmp_path):
    """data_dir on a 1 MB tmpfs, filled (needs root). A request was 500 internal_error (SQLite's
    "database or disk is full"), and a start on the full disk a traceback."""
    import subprocess
    from server_helpers import FakePipeline, settings
    from sonic_server import create_app
    mnt = tmp_path / "data"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    apps = []
    try:
        cfg = settings(tmp_path, data_dir=str(mnt), min_free_mb=0)
        apps.append(create_app(cfg, pipeline=FakePipeline()))
        client = apps[-1].test_client()
        with open(mnt / "filler", "wb", buffering=0) as f:  # every block the job database has not taken
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        r = post(client, {**FAST, "seed": 17, "async": True})
        assert_clean_error(r, 500, "disk_full")
        assert r.headers["Retry-After"] == "60"
        apps[-1].extensions["sonic"].queue.close()
        (mnt / "jobs.sqlite3").unlink()  # a fresh start on the full disk: its database cannot be made
        for extra in mnt.glob("jobs.sqlite3-*"):
            extra.unlink()
        from sonic.errors import SetupError
        with pytest.raises(SetupError, match=r"the disk of server.data_dir is full \(database or disk is full\)"):
            create_app(cfg, pipeline=FakePipeline(), background_load=True)   # sonic serve: one line, exit 2
    finally:
        for app in apps:
            if app.extensions["sonic"].queue is not None:
                app.extensions["sonic"].queue.close()
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_job_gone_while_waited_for_is_not_found(make_client, monkeypatch):
    client, _ = make_client()
    queue = client.application.extensions["sonic"].queue
    job = post(client, {**FAST, "seed": 14, "async": True}).get_json()["job_id"]
    wait_status(client, job, "succeeded")
    monkeypatch.setattr(queue, "wait", lambda job_id, timeout: None)      # pruned meanwhile
    assert_clean_error(post(client, {**FAST, "seed": 15}), 404, "job_not_found")
    assert_clean_error(client.post(f"/api/sonic/jobs/{job}/cancel"), 404, "job_not_found")


def test_no_face_and_internal_errors(make_client, tmp_path):
    client, cfg = make_client(FakePipeline(error=NoFaceDetected("no face found in the image", field="image")))
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((200, 200, 3), 90, np.uint8))
    assert_clean_error(post(client, image=blank), 422, "no_face_detected", "image")
    client, cfg = make_client(FakePipeline(error=RuntimeError(f"boom in {cfg['output_dir']}")))
    r = post(client, {**FAST, "seed": 1})
    assert_clean_error(r, 500, "internal_error")
    assert cfg["output_dir"] not in r.text and "boom" not in r.text
    assert uploads_empty(cfg)
    job = r.get_json()["error"]["job_id"]  # the message points to the log, which names the job
    assert client.get(f"/api/sonic/jobs/{job}").get_json()["status"] == "failed"


def test_every_answer_says_its_type_is_not_to_be_guessed_and_sends_no_referrer(make_client):
    """nosniff was on the pages only: JSON answers, errors, scripts, styles, videos and metrics
    now carry it too, and Referrer-Policy (no address of the service's in another site's Referer)."""
    client, _ = make_client()
    answers = [client.get(path) for path in ("/", "/static/demo.js", "/static/demo.css", "/api/sonic/params", "/api/sonic/jobs",
                                             "/nowhere", "/metrics", "/openapi.json")]
    answers.append(client.delete("/api/sonic/generate"))  # 405
    answers.append(client.options("/api/sonic/generate", headers={"Origin": "http://localhost:3000"}))
    for r in answers:
        assert r.headers.get("X-Content-Type-Options") == "nosniff", (r.request.path, r.status_code)
        # same-origin: under no-referrer a browser sends Origin: null on the page's own POSTs
        assert r.headers.get("Referrer-Policy") == "same-origin", (r.request.path, r.status_code)
        if r.mimetype == "application/json":  # a job's state or a list: no cache keeps it
            assert r.headers.get("Cache-Control") == "no-store", (r.request.path, r.status_code)
    assert sum(r.mimetype == "application/json" for r in answers) >= 5
    assert answers[0].headers["Cache-Control"] != "no-store"  # the page keeps its own


def test_a_link_in_the_output_folder_is_no_video(make_client, tmp_path):
    """The service writes its videos as files: a link named like one (a shared folder another
    process can write to) pointed /output at any file the server could read."""
    client, cfg = make_client()
    secret = tmp_path / "secret.txt"
    secret.write_text("not a video")
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    os.symlink(secret, out / ("a" * 32 + ".mp4"))
    assert_clean_error(client.get("/output/" + "a" * 32 + ".mp4"), 404, "not_found")
    # the file is opened without following a link, and answered from what was opened (a link put
    # in place between a check and an open was followed); a FIFO by that name neither blocks nor plays
    os.mkfifo(out / ("b" * 32 + ".mp4"))
    assert_clean_error(client.get("/output/" + "b" * 32 + ".mp4"), 404, "not_found")
    video = out / ("c" * 32 + ".mp4")
    video.write_bytes(FAKE_VIDEO)
    r = client.get("/output/" + video.name)
    assert r.status_code == 200 and r.data == FAKE_VIDEO and r.headers["Content-Disposition"] == f"inline; filename={video.name}"


def test_hostile_inputs(make_client, tmp_path):
    from PIL import Image
    from sonic.media import FFMPEG
    client, cfg = make_client()
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb, optimize=True)           # 144 Mpx in a few hundred kB
    assert bomb.stat().st_size < 2 * 1024 * 1024
    assert_clean_error(post(client, image=bomb), 413, "input_too_large", "image")
    long = tmp_path / "long.ogg"
    subprocess.run([FFMPEG, "-v", "error", "-f", "lavfi", "-i", "sine=frequency=220:duration=320:sample_rate=8000",
                    "-c:a", "libopus", "-b:a", "6k", str(long)], check=True)
    assert_clean_error(post(client, audio=long), 422, "audio_too_long", "audio")
    for raw in ('{"dynamic_scale": NaN}', '{"fps": Infinity}', '{"seed": "1; rm -rf /"}', '[1, 2]', '"x"',
                '{"min_resolution": 1e308}', "{" + '"a":1,' * 3000 + '"b":2}'):
        with open(PORTRAIT, "rb") as image, open(SPEECH, "rb") as audio:
            r = client.post("/api/sonic/generate", data={"image": image, "audio": audio, "config": raw})
        assert_clean_error(r, 400, "invalid_parameter")
    r = post(client, {**FAST, "duration": 0.5, "seed": 41}, names=("../../../../tmp/evil\u202e.jpg", "..%2F..%2Fé.flac"))
    assert r.status_code == 200 and r.get_json()["video_url"].rsplit("/", 1)[1].count(".") == 1
    assert not os.path.exists("/tmp/evil\u202e.jpg")
    # polyglots: judged by what decodes. A JPEG with a ZIP/HTML tail is a JPEG; a GIF is refused;
    # a WAV header over noise-free garbage is refused as audio
    poly = tmp_path / "poly.jpg"
    poly.write_bytes(PORTRAIT.read_bytes() + b"PK\x03\x04" + b"<html><script>alert(1)</script></html>" * 50)
    assert post(client, {**FAST, "duration": 0.5, "seed": 42}, image=poly).status_code == 200
    gif = tmp_path / "a.gif"
    Image.open(PORTRAIT).save(gif, format="GIF")
    assert_clean_error(post(client, image=gif), 415, "unsupported_media", "image")
    fake_wav = tmp_path / "fake.wav"
    fake_wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + PORTRAIT.read_bytes()[:4000])
    r = post(client, audio=fake_wav)
    assert r.status_code in (415, 422) and r.get_json()["error"]["field"] == "audio"
    assert uploads_empty(cfg)


def test_cors_request_id_and_access_log(make_client, caplog):
    client, _ = make_client(cors_origins=["*"])
    r = client.options("/api/sonic/generate", headers={"Origin": "http://app.example"})
    assert r.status_code in (200, 204) and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in r.headers["Access-Control-Expose-Headers"]
    # a page may send what the API reads (a retry's Idempotency-Key), delete a job, read a
    # replay's mark, and keep the preflight for a while
    pre = client.options("/api/sonic/jobs/x", headers={"Origin": "http://app.example",
                                                       "Access-Control-Request-Method": "DELETE",
                                                       "Access-Control-Request-Headers": "authorization,idempotency-key"})
    allowed = {h.strip().lower() for h in pre.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "idempotency-key", "content-type"} <= allowed
    assert "DELETE" in pre.headers["Access-Control-Allow-Methods"]
    assert "Idempotent-Replayed" in pre.headers["Access-Control-Expose-Headers"]
    assert int(pre.headers["Access-Control-Max-Age"]) >= 600
    assert "Access-Control-Allow-Origin" not in client.get("/health").headers     # no Origin, no CORS headers
    with caplog.at_level(logging.DEBUG, logger="sonic.http"):
        r = client.get("/api/sonic/params", headers={"X-Request-ID": "abc123"})
        client.get("/health")
    assert r.headers["X-Request-ID"] == "abc123"
    lines = {rec.levelname: json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "sonic.http"}
    assert lines["INFO"]["request_id"] == "abc123" and lines["INFO"]["route"] == "/api/sonic/params"
    assert lines["DEBUG"]["route"] == "/health"  # a probe's 200 every few seconds: below INFO
    assert len(client.get("/health").headers["X-Request-ID"]) == 32           # one is made up when none is sent


def test_behind_a_tls_proxy_the_answers_urls_are_the_clients(make_client):
    """server.proxy_hops: the proxy's X-Forwarded-Proto and -Host make the absolute URLs a page
    gets https:// on its own host (an http:// video on an https:// page is blocked as mixed
    content); without the setting they are not trusted (a client could forge them)."""
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "app.example", "X-Forwarded-For": "203.0.113.7"}
    behind, _ = make_client(proxy_hops=1, allowed_hosts=["app.example"])
    body = post(behind, {**FAST, "async": True}, headers=forwarded).get_json()
    assert body["status_url"].startswith("https://app.example/api/sonic/jobs/"), body
    direct, _ = make_client()
    body = post(direct, {**FAST, "async": True, "seed": 9}, headers=forwarded).get_json()  # (not the cached one)
    assert body["status_url"].startswith("http://localhost/"), body


def test_with_a_public_url_every_url_in_an_answer_is_on_it_whatever_host_is_named(make_client):
    """server.public_url: a client naming a foreign Host (or a forged X-Forwarded-Host behind the
    proxy) got URLs on that host; a link shared from such an answer led there. The setting's
    scheme and host win. (A name it does not answer to is refused first: server.allowed_hosts.)"""
    foreign = {"Host": "evil.example", "X-Forwarded-Host": "forged.example", "X-Forwarded-Proto": "http"}
    strict, _ = make_client(public_url="https://talk.example.com", proxy_hops=1)
    assert_clean_error(post(strict, FAST, headers=foreign), 403, "forbidden")
    proxied = {"Host": "127.0.0.1:5000", "X-Forwarded-Host": "talk.example.com", "X-Forwarded-Proto": "http"}
    assert post(strict, FAST, headers=proxied).status_code == 200
    public, _ = make_client(public_url="https://talk.example.com", proxy_hops=1, allowed_hosts=["*"])
    r = post(public, FAST, headers=foreign)
    body = r.get_json()
    assert r.status_code == 200 and body["video_url"].startswith("https://talk.example.com/output/"), body
    assert body["status_url"].startswith("https://talk.example.com/api/sonic/jobs/"), body
    queued = post(public, {**FAST, "async": True, "seed": 9}, headers=foreign)
    assert queued.headers["Location"].startswith("https://talk.example.com/api/sonic/jobs/"), queued.headers
    assert public.get(body["video_url"], headers=foreign).data == FAKE_VIDEO
    for bad in ("talk.example.com", "ftp://x", "https://x?y=1", "https://user@x", "https://a b/", "https://[::1",
                "https://x:", "https://example.com/sonic", "http://[zz]"):
        with pytest.raises(SettingsError, match="server.public_url"):
            make_client(public_url=bad)


def test_the_documents_schemas_name_every_field_a_job_and_a_result_carry(make_client):
    """Clients generated from /openapi.json keep what the server sends: a succeeded job's
    document (its video_url, figures and warnings; the Job schema named none of them), a cached
    result's `cached` and `created`."""
    client, _ = make_client()
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    job = post(client, {**FAST, "async": True}).get_json()["job_id"]
    done = wait_done(client, job)
    assert done["status"] == "succeeded" and not set(done) - set(schemas["Job"]["properties"]), done
    cached = post(client, FAST).get_json()
    assert cached.get("cached") and not set(cached) - set(schemas["Result"]["properties"]), cached


def test_cors_origins_listed(make_client):
    client, _ = make_client(cors_origins=["http://app.example"])
    assert client.get("/health", headers={"Origin": "http://app.example"}).headers[
        "Access-Control-Allow-Origin"] == "http://app.example"
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": "http://evil.example"}).headers


def test_a_page_of_a_listed_origin_reads_every_answer_and_an_unlisted_one_is_named_in_the_log(make_client, caplog):
    """A page that sends a key asks first (a preflight): for a path no route has it was answered
    404, which its browser shows as a bare CORS failure, so the page never read the 404 its
    request got. A page whose origin is not listed sees only a CORS failure: the operator's log
    names the origin (each once a minute at most, a few origins a minute)."""
    client, _ = make_client(cors_origins=["http://app.example"], api_keys=["s3cret-key"])
    page = {"Origin": "http://app.example"}
    for path, method in (("/api/sonic/lives", "POST"), ("/api/sonic/live/" + "a" * 32 + "/", "GET")):
        pre = client.options(path, headers={**page, "Access-Control-Request-Method": method,
                                            "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == "http://app.example"
        r = client.open(path, method=method, headers={**page, "Authorization": "Bearer s3cret-key"})
        assert_clean_error(r, 404, "not_found")
        assert r.headers["Access-Control-Allow-Origin"] == "http://app.example"
    stranger = {"Origin": "http://localhost:56410"}
    with caplog.at_level(logging.WARNING, logger="sonic.http"):
        assert "Access-Control-Allow-Origin" not in client.get("/health", headers=stranger).headers
        assert_clean_error(post(client, headers={**stranger, "Authorization": "Bearer s3cret-key"}), 403, "forbidden")
        client.get("/health", headers={"Origin": "http://other.example"})
        for n in range(10):  # a page making up origins: a few lines a minute, not one a request
            client.get("/health", headers={"Origin": f"http://made-up-{n}.example"})
    told = [rec.getMessage() for rec in caplog.records if "server.cors_origins does not list it" in rec.getMessage()]
    assert len(told) == 5 and '"http://localhost:56410"' in told[0] and '"http://other.example"' in told[1], told


def test_api_keys_and_rate_limit(make_client):
    client, _ = make_client(api_keys=["s3cret-key"], rate_limit_per_s=2, rate_limit_burst=3)
    url = "/api/sonic/params"
    r = client.get(url)
    assert_clean_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_clean_error(client.get(url, headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    assert_clean_error(post(client), 401, "unauthorized")
    auth = {"Authorization": "Bearer s3cret-key"}
    codes = [client.get(url, headers=auth).status_code for _ in range(6)]
    assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
    limited = client.get(url, headers=auth)
    assert_clean_error(limited, 429, "rate_limited")
    # which limit, and that reads spend it too (a page polling a state had "slow down" only)
    assert "each client may send 2 a second to /api/ (bursts of 3), reads of a job's or a live session's state " \
           "included" in limited.get_json()["error"]["message"]
    assert int(limited.headers["Retry-After"]) >= 1
    assert all(client.get("/health").status_code == 200 for _ in range(10))
    assert client.get("/openapi.json").status_code == 200                   # open without a key
    time.sleep(1.1)
    assert client.get(url, headers=auth).status_code == 200          # the bucket refills


@pytest.mark.parametrize("header", ["no-respond-async", "wait=respond-async", "handling=lenient; respond-async=0x",
                                    'foo="a, respond-async"'])
def test_a_prefer_header_without_respond_async_is_answered_when_done(make_client, header):
    """Only a preference named respond-async asks for it (the name was looked for anywhere in the
    header: `no-respond-async` got a 202)."""
    client, _ = make_client()
    r = post(client, {**FAST, "seed": 14}, headers={"Prefer": header})
    assert r.status_code == 200 and r.get_json()["status"] == "succeeded" and "Preference-Applied" not in r.headers


def test_api_keys_from_the_environment(make_client, monkeypatch):
    monkeypatch.setenv("SONIC_API_KEYS", "env-key, other")
    client, _ = make_client()
    assert client.get("/api/sonic/params").status_code == 401
    assert client.get("/api/sonic/params", headers={"Authorization": "Bearer other"}).status_code == 200


@pytest.mark.parametrize("header", ["respond-async", "respond-async, wait=5", "RESPOND-ASYNC", "wait=5,Respond-Async"])
def test_prefer_header(make_client, header):
    client, _ = make_client()
    r = post(client, {**FAST, "seed": 12}, headers={"Prefer": header})
    assert r.status_code == 202
    wait_status(client, r.get_json()["job_id"], "succeeded")
    # the request's own "async": false wins over the wish (it was answered 202 regardless)
    r = post(client, {**FAST, "seed": 13, "async": False}, headers={"Prefer": header})
    assert r.status_code == 200 and r.get_json()["status"] == "succeeded" and "Preference-Applied" not in r.headers


def test_metrics_count_requests_jobs_and_read_the_queue(make_client):
    """Requests by rule, with their seconds; jobs, their wait and their end; answers from the
    cache; the queue's and the webhooks' gauges; the process's own figures."""
    from prometheus_client.parser import text_string_to_metric_families
    client, _ = make_client()

    def scrape() -> dict:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.get_data(as_text=True)) for s in fam.samples}

    before = scrape()
    assert post(client, {**FAST, "seed": 31}).status_code == 200
    assert post(client, {**FAST, "seed": 31}).get_json()["cached"] is True
    assert client.get("/api/sonic/jobs/" + "0" * 32).status_code == 404
    after = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)
    assert delta("sonic_http_requests_total", route="/api/sonic/generate", method="POST", status="200") == 2
    assert delta("sonic_http_request_duration_seconds_count", route="/api/sonic/generate", method="POST") == 2
    assert delta("sonic_http_request_duration_seconds_sum", route="/api/sonic/generate", method="POST") > 0
    assert delta("sonic_cache_hits_total") == 1
    assert delta("sonic_job_wait_seconds_count", kind="generate") == 1
    assert delta("sonic_http_requests_total", route="/api/sonic/jobs/<job_id>", method="GET", status="404") == 1
    assert delta("sonic_jobs_finished_total", kind="generate", status="succeeded") == 1
    assert delta("sonic_job_duration_seconds_count", kind="generate") == 1
    assert delta("sonic_video_seconds_total") > 0
    assert after[("sonic_queue_length", ())] == 0 and after[("sonic_workers_live", ())] == 1
    assert after[("sonic_webhook_jobs_waiting", ())] == 0
    assert not [name for name, _ in after if name.endswith("_created")]  # a series per series, meaning nothing
    # the process's own figures (a custom registry had none), and stages' seconds in buckets that
    # tell a 0.02 s stage from a 0.3 s one (all fell in the first, 0.5 s)
    assert after[("process_resident_memory_bytes", ())] > 50e6 and after[("process_open_fds", ())] > 0
    assert any(name == "sonic_stage_seconds_bucket" and ("le", "0.05") in labels for name, labels in after)


def test_the_grafana_dashboard_reads_only_metrics_the_service_exports(make_client):
    """docs/grafana-dashboard.json: every metric its queries name is on /metrics (after a job that
    succeeded and one that failed)."""
    import re
    from prometheus_client.parser import text_string_to_metric_families
    client, _ = make_client()
    assert post(client, {**FAST, "seed": 41}).status_code == 200
    failing, _ = make_client(FakePipeline(error=NoFaceDetected("no face")))
    assert post(failing, {**FAST, "seed": 42}).status_code == 422
    exported = {s.name for fam in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
                for s in fam.samples}
    dash = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    named = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\bsonic_[a-z_]+", t["expr"])}
    assert named and named <= exported, named - exported


def test_fields_the_route_does_not_read_are_refused_by_name(make_client):
    """A parameter beside `config`, a misnamed field, a second image: each was dropped without a
    word and the request rendered with defaults it did not ask for (and, with credits, paid)."""
    pipe = FakePipeline()
    client, _ = make_client(pipe)

    def form(**extra):
        with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
            data = {"image": (img, "p.jpg"), "audio": (aud, "a.flac"), "config": json.dumps(FAST), **extra}
            return client.post("/api/sonic/generate", data=data, content_type="multipart/form-data")

    cases = [(form(min_resolution="256"), "min_resolution", "put it in the config object"),
             (form(webhook_url="https://example.org/h"), "webhook_url", "did you mean 'webhook'"),
             (form(colour="red"), "colour", "fields: image, audio, config"),
             (client.post("/api/sonic/generate", json={"image_url": "http://h/p.jpg", "audio_url": "http://h/a.wav",
                                                       "seed": 3}), "seed", "put it in the config object")]
    with open(PORTRAIT, "rb") as img, open(PORTRAIT, "rb") as again, open(SPEECH, "rb") as aud:
        cases.append((client.post("/api/sonic/generate", content_type="multipart/form-data",
                                  data={"image": [(img, "p.jpg"), (again, "q.jpg")], "audio": (aud, "a.flac")}),
                      "image", "more than once"))
    with open(SPEECH, "rb") as aud:  # a string where the file goes
        cases.append((client.post("/api/sonic/generate", content_type="multipart/form-data",
                                  data={"image": "not a file", "audio": (aud, "a.flac")}), "image", "must be a file"))
    # a file where the text goes: the webhook was dropped, the job ran and nobody was told
    cases.append((form(webhook=(io.BytesIO(b"https://example.org/h"), "hook.txt")), "webhook",
                  "send it as a text field"))
    # the webhook twice, as a field and in config: the field's won without a word
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        cases.append((client.post("/api/sonic/generate", content_type="multipart/form-data", data={
            "image": (img, "p.jpg"), "audio": (aud, "a.flac"), "webhook": "https://example.org/a",
            "config": json.dumps({**FAST, "async": True, "webhook": "https://example.org/b"})}),
            "webhook", "both as a field and in config"))
    # `?async=true` in the URL: ignored, and the request answered synchronously
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        cases.append((client.post("/api/sonic/generate?async=true", content_type="multipart/form-data",
                                  data={"image": (img, "p.jpg"), "audio": (aud, "a.flac")}),
                      "async", "in the URL's query, which this route does not read"))
    huge = client.post("/api/sonic/generate", data=json.dumps({"x": [0] * 40_000}), content_type="application/json")
    assert_clean_error(huge, 413, "input_too_large")  # 20 MB of numbers took 9 s of CPU to refuse
    assert "at most 64 kB" in huge.get_json()["error"]["message"]
    # chunked, it states no length: it was parsed whole (10 MB: 3.7 s) before its 400
    chunked = client.post("/api/sonic/generate", input_stream=io.BytesIO(json.dumps({"x": [0] * 40_000}).encode()),
                          content_type="application/json", headers={"Transfer-Encoding": "chunked"},
                          environ_overrides={"wsgi.input_terminated": True})
    assert_clean_error(chunked, 413, "input_too_large")
    assert "at most 64 kB" in chunked.get_json()["error"]["message"]
    plain = client.post("/api/sonic/generate", data=json.dumps({"image_url": "http://h/p.jpg"}),
                        content_type="text/plain;charset=UTF-8")  # fetch()'s default for a string body
    assert_clean_error(plain, 400, "invalid_parameter")
    assert "text/plain" in plain.get_json()["error"]["message"]
    for r, field, words in cases:
        assert_clean_error(r, 400, "invalid_parameter", field)
        assert words in r.get_json()["error"]["message"], r.get_json()
    assert not pipe.calls  # nothing rendered
    assert form().status_code == 200


def test_a_json_body_over_its_limit_by_its_stated_length_is_refused_unread(make_client):
    """Its size was read (up to the upload limit, a slow client holding a thread meanwhile)
    before the 413 its Content-Length already called for."""
    client, _ = make_client()

    class Unreadable(io.BytesIO):
        def read(self, size=-1):
            raise AssertionError("the body was read")

        readinto = readline = read
    r = client.post("/api/sonic/generate", input_stream=Unreadable(), content_type="application/json",
                    environ_overrides={"CONTENT_LENGTH": "100000"})
    assert_clean_error(r, 413, "input_too_large")
    assert "at most 64 kB" in r.get_json()["error"]["message"]


def test_deleting_a_canceled_job_removes_a_video_left_under_its_name(make_client):
    """A job without a result has no video by its record; one left under its name (a release
    before left one behind a cancel at the last report) stayed downloadable after DELETE."""
    gate = threading.Event()
    client, cfg = make_client(FakePipeline(gate=gate))
    job = post(client, {**FAST, "seed": 18, "async": True}).get_json()["job_id"]
    assert client.post(f"/api/sonic/jobs/{job}/cancel").get_json()["status"] in ("canceled", "running", "queued")
    gate.set()
    wait_status(client, job, "canceled")
    left = Path(cfg["output_dir"]) / f"{job}.mp4"
    left.write_bytes(FAKE_VIDEO)
    assert client.delete(f"/api/sonic/jobs/{job}").status_code == 204
    assert not left.exists() and client.get(f"/output/{job}.mp4").status_code == 404


def test_a_request_log_line_names_the_job_that_answered_it_and_no_other(make_client, caplog):
    """A generate refused for its upload named a job id no job had (GET answered 404); a cached
    answer's line named none, nor that it was cached."""
    import logging
    client, _ = make_client()
    first = post(client, {**FAST, "seed": 41})
    assert first.status_code == 200
    with caplog.at_level(logging.INFO, logger="sonic.http"):
        cached = post(client, {**FAST, "seed": 41})
        refused = client.post("/api/sonic/generate", data={"image": (io.BytesIO(b"not an image"), "p.jpg"),
                                                           "audio": (open(SPEECH, "rb"), "a.flac")})
    assert cached.get_json()["cached"] and refused.status_code == 415, refused.get_data()[:200]
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "sonic.http"]
    assert lines[0]["job_id"] == first.get_json()["job_id"] and lines[0]["cached"] is True
    assert lines[1]["status"] == 415 and "job_id" not in lines[1]


def test_made_up_methods_and_long_paths_grow_neither_the_metrics_nor_the_log(make_client, caplog):
    """Any token is a method in a request line of up to 64 kB. As a metrics label each new one
    made series that never went away (100 requests with 60 kB methods made a scrape 125 MB and
    its process 320 MB larger), and each was logged whole: counted as "other", logged clipped."""
    import logging
    from prometheus_client.parser import text_string_to_metric_families
    client, _ = make_client()
    with caplog.at_level(logging.INFO, logger="sonic.http"):
        for i in range(20):
            client.open("/health", method=f"BIG{i:03d}" + "Q" * 20000)
        client.get("/" + "x" * 20000)
    scrape = client.get("/metrics").get_data(as_text=True)
    assert len(scrape) < 200_000 and "QQQQ" not in scrape
    methods = {s.labels.get("method") for fam in text_string_to_metric_families(scrape) for s in fam.samples
               if s.name == "sonic_http_requests_total"}
    assert "other" in methods and methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "other"}
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "sonic.http"]
    assert len(lines) == 21 and max(len(rec.getMessage()) for rec in caplog.records) < 2000
    assert lines[0]["method"].startswith("BIG000QQ") and lines[0]["method"].endswith("(20006 characters)")


def test_log_lines_as_text_or_as_json_objects_with_the_records_fields(make_client, caplog):
    """server.log_format: text lines start with the time in UTC (ISO 8601: a line read on
    another machine says when); JSON lines are one object each, a request's and a job's end's
    fields as fields (not a string to parse again), another record's text as `message`, a
    traceback as `exception`."""
    import logging
    import re
    from sonic_server.logs import JsonFormatter, TextFormatter
    client, _ = make_client()
    with caplog.at_level(logging.INFO):
        done = post(client, {**FAST, "seed": 43}).get_json()
        try:
            raise ValueError("broken")
        except ValueError:
            logging.getLogger("sonic.test").exception("a step failed for job %s", "j1")
    request = next(r for r in caplog.records if r.name == "sonic.http")
    ended = next(r for r in caplog.records if r.name == "sonic.jobs" and r.getMessage().startswith("job ended"))
    failed = next(r for r in caplog.records if r.name == "sonic.test")
    text = TextFormatter().format(request)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO sonic\.http \{.*\}", text), text
    assert json.loads(text.split(" sonic.http ", 1)[1])["job_id"] == done["job_id"]
    as_json = [json.loads(JsonFormatter().format(r)) for r in (request, ended, failed)]
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in as_json)
    assert as_json[0]["message"] == "request" and as_json[0]["route"] == "/api/sonic/generate"
    assert as_json[0]["status"] == 200 and as_json[0]["job_id"] == done["job_id"] and as_json[0]["ms"] > 0
    assert as_json[1]["message"] == "job ended" and as_json[1]["status"] == "succeeded" and as_json[1]["wait_s"] >= 0
    assert as_json[2]["message"] == "a step failed for job j1" and as_json[2]["level"] == "ERROR"
    assert "ValueError: broken" in as_json[2]["exception"]


def test_a_librarys_repeated_lines_are_logged_at_most_ten_a_minute():
    """A live client sending malformed microphone packets made aiortc log a warning per packet
    (13,800 a second). The handler the service installs lets ten of one library template through
    a minute, the tenth-and-one saying more are left out; the service's own lines all pass."""
    import logging
    from sonic_server.logs import Repeats
    repeats = Repeats()

    def record(name: str, at: float, msg: str = "RTCRtpReceiver(%s) failed to decode %s frame: %s"):
        r = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, ("audio", "opus", "bad"), None)
        r.created = at
        return r
    flood = [record("aiortc.rtcrtpreceiver", 1000 + i / 1000) for i in range(300)]
    passed = [r for r in flood if repeats.filter(r)]
    assert len(passed) == 11 and "more are left out" in passed[-1].getMessage()
    assert repeats.filter(record("aiortc.rtcrtpreceiver", 1061))                      # the next minute
    assert repeats.filter(record("aiortc.rtcrtpreceiver", 1001, "another template %s %s %s"))
    assert all(repeats.filter(record("sonic.jobs", 1000 + i / 1000, "job ended %s %s %s")) for i in range(50))


def test_a_redis_outage_is_a_line_and_a_fault_while_handling_one_keeps_its_traceback():
    """The handler's Outages filter: a record carrying a Redis outage (or an error raised from
    one) is a one-line warning naming it; an error raised while handling one is a fault of its
    own, logged as it was; a refused password is not an outage."""
    import logging
    import sys

    import redis

    from sonic_server.logs import Outages

    def record(error):
        try:
            raise error
        except Exception:
            return logging.LogRecord("rq.worker", logging.ERROR, __file__, 1, "job %s failed", ("j1",), sys.exc_info())

    def wrapped():
        try:
            raise redis.ConnectionError("Connection refused")
        except redis.ConnectionError as e:
            return RuntimeError("the run stopped").with_traceback(None), e

    outage = record(redis.ConnectionError("Error 111 connecting. Connection refused."))
    assert Outages().filter(outage) and outage.exc_info is None and outage.levelno == logging.WARNING
    assert outage.getMessage() == "job j1 failed (Redis does not answer: ConnectionError: Error 111 connecting. Connection refused.)"
    error, cause = wrapped()
    error.__cause__ = cause  # raised from the outage
    from_outage = record(error)
    assert Outages().filter(from_outage) and from_outage.exc_info is None
    try:  # a fault while handling one (implicit context): kept whole
        try:
            raise redis.ConnectionError("Connection refused")
        except redis.ConnectionError:
            raise TypeError("a bug")
    except TypeError:
        fault = logging.LogRecord("sonic.jobs", logging.ERROR, __file__, 1, "job failed", (), sys.exc_info())
    assert Outages().filter(fault) and fault.exc_info is not None and fault.levelno == logging.ERROR
    password = record(redis.AuthenticationError("invalid password"))
    assert Outages().filter(password) and password.exc_info is not None


def test_a_chunked_body_is_decoded_strictly():
    """sonic serve's decoder of chunked bodies (werkzeug's counted a chunk that stopped short as
    read whole, and handed on the rest of its buffer unwritten): extensions, trailers and bare
    LFs are read; a body that ends inside a chunk or before its last one is ClientDisconnected
    (408), malformed framing a BadRequest (400) naming it."""
    from werkzeug.exceptions import BadRequest, ClientDisconnected

    from sonic_server.serve import MAX_CHUNK_LINE, ChunkedBody

    def body(raw: bytes, read: int = 7) -> bytes:
        stream, out = ChunkedBody(io.BufferedReader(io.BytesIO(raw))), b""
        while chunk := stream.read(read):
            out += chunk
        return out

    good = b"5;name=\"a;b\"\r\nhello\r\n6\n world\n000\r\nX-Trailer: 1\r\n\r\nnext request"
    assert body(good) == body(good, 1) == body(good, 100) == b"hello world"
    assert body(b"3\r\nabc\r\n0\r\n") == b"abc"  # a client that closes after the last chunk
    assert body(b"0000000000000000003\r\nabc\r\n0\r\n\r\n") == b"abc"  # leading zeros are no size
    for raw, why in ((b"10\r\nshort", "ended inside a chunk"), (b"3\r\nabc\r", "before its last"),
                     (b"3\r\nabc\r\n", "before its last"), (b"", "before its last")):
        with pytest.raises(ClientDisconnected, match=why):
            body(raw)
    for raw, why in ((b"zz\r\nabc\r\n0\r\n\r\n", 'a chunk\'s size is "zz", not a hexadecimal number'),
                     (b"-3\r\nabc\r\n0\r\n\r\n", "not a hexadecimal number"),
                     (b"\r\nabc\r\n0\r\n\r\n", "not a hexadecimal number"),
                     (b"1000000000000000\r\nabc", "a chunk's size is past any body's"),
                     (b"2\r\nabc\r\n0\r\n\r\n", "a chunk is longer than its size says"),
                     (b"1" * (MAX_CHUNK_LINE + 1) + b"\r\n", f"a line over {MAX_CHUNK_LINE} bytes"),
                     (b"0\r\n" + b"X: 1\r\n" * 101 + b"\r\n", "more than 100 trailer lines")):
        with pytest.raises(BadRequest, match=why) as e:
            body(raw)
        assert type(e.value) is BadRequest  # a 400, not the 408 of ClientDisconnected (a BadRequest too)
