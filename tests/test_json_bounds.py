"""Every JSON the service parses (the generate config, the fusion, batch and recharge bodies) goes
through one bounded parser: deep nesting, huge or infinite numbers and odd number forms are a 400
naming the field, never a 500 or a traceback in the log."""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from server_helpers import FAST, FakePipeline, assert_clean_error, settings
from conftest import PORTRAIT, SPEECH
from sonic import InvalidParameter
from sonic_server.json_input import MAX_DEPTH, parse_json

ADMIN_KEY = "admin-key-for-json-tests"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One app with credits on SQLite (so the recharge route exists) and a flat admin key."""
    from sonic_server import create_app
    tmp = tmp_path_factory.mktemp("json")
    cfg = settings(tmp, api_keys=[ADMIN_KEY], database_url=f"sqlite:///{tmp / 'credits.sqlite3'}")
    cfg["credits"] = {"enabled": True, "recharge_rate_per_s": 1000, "recharge_burst": 1000}
    app = create_app(cfg, pipeline=FakePipeline())
    yield app.test_client()
    svc = app.extensions["sonic"]
    svc.settler.stop()
    if svc.queue is not None:
        svc.queue.close()
    svc.ledger.close()


AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _generate(client, config_text: str):
    with open(PORTRAIT, "rb") as img, open(SPEECH, "rb") as aud:
        return client.post("/api/sonic/generate", headers=AUTH, content_type="multipart/form-data",
                           data={"config": config_text, "image": (img, "f.jpg"), "audio": (aud, "s.flac")})


def _post_json(client, path: str, text: str):
    return client.post(path, data=text, content_type="application/json", headers=AUTH)


ROUTES = {
    "config": lambda c, t: _generate(c, t),
    "fusion": lambda c, t: _post_json(c, "/fusion", t),
    "batch": lambda c, t: _post_json(c, "/fusion/batch", t),
    "recharge": lambda c, t: _post_json(c, "/api/admin/credits/recharge", t),
}
FIELD = {"config": "config", "fusion": "body", "batch": "body", "recharge": "body"}
FIELD_IN_OBJECT = {"config": "seed", "fusion": "blend_ratio", "batch": "pairs", "recharge": "amount"}


def _deep(depth: int, inside: str = "1") -> str:
    return "[" * depth + inside + "]" * depth


def _in_object(route: str, value: str) -> str:
    """`value` where each route reads it: a config key, a fusion field, a pair, a recharge amount."""
    return {"config": f'{{"seed": {value}}}', "fusion": f'{{"blend_ratio": {value}}}',
            "batch": f'{{"pairs": [{{"blend_ratio": {value}}}]}}', "recharge": f'{{"amount": {value}}}'}[route]


HOSTILE = {
    "deep arrays": lambda r: _deep(5000),
    "deep objects": lambda r: '{"a":' * 5000 + "1" + "}" * 5000,
    "deep inside a field": lambda r: _in_object(r, _deep(3000)),
    "just too deep": lambda r: _in_object(r, _deep(MAX_DEPTH + 1)),
    "a 5000-digit integer": lambda r: _in_object(r, "9" * 5000),
    "a 5000-digit negative": lambda r: _in_object(r, "-" + "9" * 5000),
    "a float overflowing": lambda r: _in_object(r, "1e999"),
    "a long fraction": lambda r: _in_object(r, "0." + "1" * 5000),
    # counted before parsing: 9 MB of these in a /fusion body took 400 MB and 4.6 s to refuse
    "many values": lambda r: _in_object(r, "[" + ",".join(["{}"] * 6000) + "]"),
    "NaN": lambda r: _in_object(r, "NaN"),
    "Infinity": lambda r: _in_object(r, "-Infinity"),
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_json_is_a_400_naming_the_field(client, route, kind, caplog):
    caplog.set_level(logging.ERROR)
    r = ROUTES[route](client, HOSTILE[kind](route))
    # thousands deep stops the decoder itself: then the whole text is named, else the key
    field = FIELD[route] if kind.startswith(("deep ", "many ")) else FIELD_IN_OBJECT[route]
    assert_clean_error(r, 400, "invalid_parameter", field)
    assert not [rec for rec in caplog.records if rec.exc_info], "a traceback was logged"


def test_the_parser_names_what_is_wrong():
    with pytest.raises(InvalidParameter, match="more than 20 deep") as e:
        parse_json(_deep(21), "config")
    assert e.value.field == "config"
    with pytest.raises(InvalidParameter, match="more than 20 deep") as e:
        parse_json('{"seed": ' + _deep(20) + "}", "config")
    assert e.value.field == "seed"
    with pytest.raises(InvalidParameter, match="^pairs: a number has more") as e:
        parse_json('{"pairs": [{"blend_ratio": ' + "1" * 50 + "}]}", "body")
    assert parse_json(_deep(20), "config") is not None
    assert parse_json(b'\xef\xbb\xbf{"seed": 3}', "body") == {"seed": 3}  # a byte order mark was "not valid JSON"
    with pytest.raises(InvalidParameter, match="more than 40 characters"):
        parse_json("1" * 41, "body")
    with pytest.raises(InvalidParameter, match="out of range"):
        parse_json("[1e400]", "body")
    with pytest.raises(InvalidParameter, match="not a JSON number"):
        parse_json('{"a": NaN}', "body")
    with pytest.raises(InvalidParameter, match="not UTF-8"):
        parse_json(b'{"a": "\xff"}', "body")
    assert parse_json('{"seed": 12345678901234567890, "x": -1.5e-300}', "config")["seed"] == 12345678901234567890
    # a key given twice means one thing to one parser and another to the next: refused, named
    with pytest.raises(InvalidParameter, match="'seed' is given twice"):
        parse_json('{"seed": 1, "min_resolution": 256, "seed": 2}', "config")
    with pytest.raises(InvalidParameter, match="'a' is given twice"):
        parse_json('{"pairs": [{"a": 1, "a": 1}]}', "body")
    # what a page sent by mistake is quoted, and what was expected said: "Expecting value" alone
    # did not tell a FormData's "[object Object]" or a raw SDP from a typo
    with pytest.raises(InvalidParameter) as e:
        parse_json("v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1", "offer", expected='JSON {"sdp": ..., "type": "offer"}')
    assert e.value.message == ('offer is not valid JSON: Expecting value (it begins "v=0\\r\\no=- 461173140043005"); '
                               'send JSON {"sdp": ..., "type": "offer"}')
    with pytest.raises(InvalidParameter, match=r'config is not valid JSON: .* \(it begins "\[object Object\]"\)$'):
        parse_json("[object Object]", "config")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12)
number_forms = st.one_of(
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=1, max_value=6000).map(lambda n: "1e" + "9" * min(n, 30)),
    st.integers(min_value=1, max_value=6000).map(lambda n: "-0." + "0" * n + "1"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1E+9999", "-0", "0e0", "1.0e-9999"]))


@st.composite
def hostile_texts(draw) -> str:
    """Generated JSON: a nesting of random depth around a value, or a number form in a field."""
    depth = draw(st.integers(min_value=0, max_value=4000))
    core = draw(st.one_of(json_values.map(json.dumps), number_forms))
    opener = draw(st.sampled_from(["[", '{"k":']))
    closer = "]" if opener == "[" else "}"
    return opener * depth + core + closer * depth


@hyp_settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=st.sampled_from(sorted(ROUTES)), text=hostile_texts())
def test_generated_json_never_gives_a_5xx(client, route, text):
    r = ROUTES[route](client, text)
    assert r.status_code < 500, (route, text[:80], r.get_data(as_text=True)[:300])
    assert "Traceback" not in r.get_data(as_text=True)


def test_ordinary_json_gets_past_the_parser(client):
    # the flat key has no account: generate's and fusion's 403 come after their JSON was read
    assert_clean_error(_generate(client, json.dumps({**FAST, "seed": 3})), 403, "forbidden")
    r = _post_json(client, "/fusion", json.dumps({"source_image": "!", "target_image": "!", "blend_ratio": 0.5}))
    assert_clean_error(r, 403, "forbidden")
    r = _post_json(client, "/api/admin/credits/recharge", json.dumps({"users": ["nobody"], "amount": 5,
                                                                       "reason": "json test"}))
    assert r.status_code == 400 and "nobody" in r.get_data(as_text=True)
