"""The one parser for JSON that arrives in a request (the generate `config` field, the bodies of
/fusion, /fusion/batch and the recharge route, and whatever `request.get_json` reads): depth and
number size are bounded, and every failure is an `InvalidParameter` naming the field, so no
shape of JSON reaches a recursion limit, an integer-conversion limit or an infinity downstream.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from typing import Any

from flask import request
from flask.json.provider import DefaultJSONProvider

from sonic import InvalidParameter
from sonic.options import DuplicateKey, unique_keys

MAX_DEPTH = 20  # arrays and objects inside each other; the service's own bodies need 3
MAX_NUMBER_CHARS = 40  # characters of one number literal (an int64 takes 20, a float's repr 24)
MAX_CONFIG_CHARS = 10_000  # characters of a request's `config` field (generate, live)
# commas and opening brackets in one JSON text: an upper bound on the values the parser would
# build, counted before it runs. A body may be megabytes (/fusion's images as base64, which
# has none of them), but 9 MB of `[{},{},...]` took 400 MB and 4.6 s to refuse
MAX_VALUES = 10_000


class _Refused:
    """What the decoder's hooks put in place of a number they refuse, with why; found by the walk
    after decoding, so that the answer names the field that holds it."""

    def __init__(self, why: str):
        self.why = why


def _number(kind: type):
    def parse(text: str):
        if len(text) > MAX_NUMBER_CHARS:
            return _Refused(f"a number has more than {MAX_NUMBER_CHARS} characters")
        value = kind(text)
        if value in (float("inf"), float("-inf")):
            return _Refused(f"the number {text} is out of range")
        return value

    return parse


_DECODER = json.JSONDecoder(
    object_pairs_hook=unique_keys,
    parse_int=_number(int),
    parse_float=_number(float),
    parse_constant=lambda name: _Refused(f"{name} is not a JSON number"),
)


def _check(value: Any, field: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH and refused numbers, naming the top-level key that
    holds them (walked without recursion)."""
    if isinstance(value, _Refused):
        raise InvalidParameter(f"{field}: {value.why}", field=field)
    stack: list[tuple[Any, int, str | None]] = [(value, 1, None)]  # (node, depth, top-level key)
    while stack:
        node, depth, key = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for name, child in items:
            where = key or (str(name) if isinstance(node, dict) else field)
            if isinstance(child, _Refused):
                raise InvalidParameter(f"{where}: {child.why}", field=where)
            if isinstance(child, (dict, list)):
                if depth + 1 > MAX_DEPTH:
                    raise InvalidParameter(f"{where} nests arrays or objects more than {MAX_DEPTH} deep", field=where)
                stack.append((child, depth + 1, where))


def parse_json(text: str | bytes, field: str, max_values: int = MAX_VALUES, expected: str | None = None) -> Any:
    """The value of a JSON text, or `InvalidParameter` naming what is wrong and where: the
    top-level key that holds it, else `field`. More than `max_values` commas and brackets
    (`MAX_VALUES`) is refused unparsed. Text that is no JSON is quoted (its beginning) and told
    what is `expected`: a page's `[object Object]` or a raw SDP had only "Expecting value"."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidParameter(f"{field} is not UTF-8 text", field=field) from None
    if text.count(",") + text.count("[") + text.count("{") > max_values:
        raise InvalidParameter(f"{field} holds more than {max_values} values", field=field)
    text = text.removeprefix("\ufeff")  # a byte order mark some editors and serializers write (RFC 8259 §8.1)
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise InvalidParameter(f"{field} nests arrays or objects more than {MAX_DEPTH} deep", field=field) from None
    except json.JSONDecodeError as e:
        told = f"{field} is not valid JSON: {e.msg} (it begins {json.dumps(text[:24])})"
        raise InvalidParameter(told + (f"; send {expected}" if expected else ""), field=field) from None
    except DuplicateKey as e:
        raise InvalidParameter(f"{field}: the key {e.key[:40]!r} is given twice", field=field) from None
    except ValueError as e:  # a number the decoder cannot convert
        raise InvalidParameter(f"{field} is refused: {e}", field=field) from None
    _check(value, field)
    return value


def json_object_body(
    what: str = "the body must be a JSON object (Content-Type: application/json)", max_values: int = MAX_VALUES
) -> dict:
    """The request's JSON body as a dict, parsed by `parse_json` (field `body`, at most
    `max_values` values); `what` says what is expected when the body is not an object."""
    body = parse_json(request.get_data(cache=True), "body", max_values)
    if not isinstance(body, dict):
        raise InvalidParameter(what, field="body")
    return body


def body_type_refused(expected: str) -> InvalidParameter:
    """The error for a body of a type the route does not read (`expected` says what it reads):
    a JSON body read as a form has no fields at all, and "field missing" would mislead."""
    return InvalidParameter(f"the body is {request.mimetype or 'sent without a Content-Type'}: {expected}")


def json_object_field(field: str, max_chars: int, what: str = "a JSON object") -> dict | None:
    """A multipart text field holding a JSON object (the generate and live `config`, the live
    `offer`), parsed by `parse_json`; None when it is absent or blank. Longer than `max_chars`,
    or not an object (`what` says what is expected): `InvalidParameter` naming the field."""
    if field in request.files:  # curl -F config=@file.json: a file part, which form.get never sees
        raise InvalidParameter(
            f"{field} must be a text field, not a file (curl: -F '{field}=<file.json' sends a file's text)",
            field=field,
        )
    raw = request.form.get(field, "")
    if len(raw) > max_chars:
        raise InvalidParameter(f"{field} is longer than {max_chars} characters", field=field)
    if not raw.strip():
        return None
    value = parse_json(raw, field, expected=what)
    if not isinstance(value, dict):
        raise InvalidParameter(f"{field} must be {what}", field=field)
    return value


class BoundedJSONProvider(DefaultJSONProvider):
    """Flask's JSON with `parse_json`'s bounds, so that `request.get_json` is bounded too."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return parse_json(s, "body")


def config_switches(params: dict, loaded_decoder: str | None) -> bool:
    """The request switches a `config` may hold beside the generation parameters, checked the
    same for generate and live: `async` (returned) is true or false, and `decoder`, when given,
    names the one this server has loaded."""
    want_async = params.get("async", False)
    if not isinstance(want_async, bool):
        raise InvalidParameter("async must be true or false", field="async")
    decoder = params.get("decoder")
    if decoder is not None and decoder != loaded_decoder:
        raise InvalidParameter(
            f"decoder {str(decoder)[:40]!r} is not loaded by this server; loaded: {loaded_decoder}",
            field="decoder",
        )
    return want_async


def refuse_unknown(
    names: Collection[str], known: tuple[str, ...], parameters: Collection[str] = (), kind: str = "field"
) -> None:
    """InvalidParameter for the first of a request's field `names` that is not `known`: a
    generation parameter (one of `parameters`) is told to go in the config object, a near miss
    gets its likely name. A misnamed field was dropped, and the request went on without it.
    `kind`: what the names are, in the message (a field, a query parameter)."""
    for name in names:
        if name in known:
            continue
        text = str(name)[:40]
        if name in parameters:
            raise InvalidParameter(f"{text!r} is a generation parameter: put it in the config object", field=text)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" ({kind}s: {', '.join(known)})"
        raise InvalidParameter(f"unknown {kind} {text!r}{hint}", field=text)


def check_form_fields(files: tuple[str, ...], texts: tuple[str, ...], parameters: Collection[str] = ()) -> None:
    """A form request (multipart or urlencoded) names only the `files` and text fields `texts` its
    route reads, each once, a text field not as a file (which would not be read as text). A
    second `image` or `offer` was dropped unsaid: which one the request used was not said. A
    multipart body whose Content-Type names no boundary, or one in which no part was found (its
    boundary is not the one the body uses), is refused naming Content-Type: the route said
    "image is missing" of an image it sent. (A client that sets Content-Type itself for a
    FormData body drops the boundary its library would have written.)"""
    if request.mimetype == "multipart/form-data":
        if not request.mimetype_params.get("boundary"):  # (known before the body is read)
            raise InvalidParameter(
                "Content-Type multipart/form-data names no boundary (multipart/form-data; boundary=...): "
                "let the HTTP library write this header for a form",
                field="Content-Type",
            )
        if request.content_length != 0 and not request.form and not request.files:
            raise InvalidParameter(
                "the multipart body holds no complete part: are its parts separated by the boundary its "
                "Content-Type names, and does it end with --<boundary>--?",
                field="Content-Type",
            )
    for name in (*files, *texts):
        if len(request.files.getlist(name)) + len(request.form.getlist(name)) > 1:
            raise InvalidParameter(f"the field {name!r} is given more than once", field=name)
    for name in texts:
        if name in request.files:
            raise InvalidParameter(f"the field {name!r} is sent as a file: send it as a text field", field=name)
    refuse_unknown([*request.form.keys(), *request.files.keys()], (*files, *texts), parameters)


def check_sent_as_file(name: str) -> None:
    """InvalidParameter where the form's file `name` came as a text field: the route would have
    said it is missing."""
    if name in request.form:
        raise InvalidParameter(f"{name} must be a file part (a file in the form), not text", field=name)
