"""OpenAPI 3 document, built from what the routes say about themselves.

A view is marked with `@describe(summary, responses, ...)`; a response body's schema is declared
once with `component(name, schema)` next to the code that builds the body. `openapi_spec` walks
the app's URL map: paths, methods and path parameters come from the routes themselves, the
`Parameters` schema from the parameter declarations (`sonic.options.schema`). Answers that a
whole area gives (401 and 429 from the access guard on `/api/`) are declared once with
`responses_under(prefix, ...)` by the code that gives them.
"""

from __future__ import annotations

import re

from flask import Flask

INFO = {
    "title": "sonic talking-head API",
    "version": "0.1.0",
    "description": "Portrait photo + speech recording -> lip-synced MP4.",
}
_COMPONENTS: dict[str, dict] = {}
_AREAS: dict[str, tuple[dict, dict | None]] = {}  # path prefix -> (responses, security scheme)
_EVERYWHERE: list[dict] = []  # parameters every operation takes (headers)
_PATH_SCHEMAS: dict[str, dict] = {}  # path parameter name -> its schema
SECURITY_SCHEME = "bearerKey"
_PATH_ARG = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def component(name: str, schema: dict) -> dict:
    """Declare a named body schema; returns the $ref that points at it."""
    _COMPONENTS[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def responses_under(prefix: str, responses: dict, security_scheme: dict | None = None) -> None:
    """Every operation whose path starts with `prefix` may also answer `responses` (a route's own
    description of a status wins); with `security_scheme`, they accept that (optional) scheme."""
    _AREAS[prefix] = (responses, security_scheme)


def headers_everywhere(*names_and_schemas: tuple[str, str, dict]) -> None:
    """Optional request headers that every operation honours: (name, description, schema)."""
    for name, description, schema in names_and_schemas:
        if all(p["name"] != name for p in _EVERYWHERE):
            _EVERYWHERE.append(header(name, description, schema))


def path_parameter(name: str, pattern: re.Pattern, description: str) -> None:
    """What a path parameter called `name` (in any route) looks like; anything else is a 404."""
    _PATH_SCHEMAS[name] = {"type": "string", "pattern": f"^{pattern.pattern}$", "description": description}


def _optional(where: str, name: str, description: str, schema: dict | None) -> dict:
    return {
        "name": name,
        "in": where,
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def header(name: str, description: str, schema: dict | None = None) -> dict:
    """An optional request header, as an OpenAPI parameter."""
    return _optional("header", name, description, schema)


def query(name: str, description: str, schema: dict | None = None) -> dict:
    """An optional query parameter."""
    return _optional("query", name, description, schema)


def content(media_type: str, schema: dict) -> dict:
    return {media_type: {"schema": schema}}


def error(description: str) -> tuple[str, dict]:
    """An error response: the one error body (sonic_server/errors.py)."""
    return description, content("application/json", {"$ref": "#/components/schemas/Error"})


def describe(
    summary: str,
    responses: dict,
    *,
    parameters: list | None = None,
    request_body: dict | None = None,
    response_headers: dict[int, tuple[str, ...]] | None = None,
):
    """Mark a view for the OpenAPI document. `responses` maps a status to a description, or to
    (description, content); `response_headers` a status to the RESPONSE_HEADERS its answer has
    beside those every answer has."""

    def mark(view):
        view.openapi = {
            "summary": summary,
            "responses": responses,
            "parameters": parameters or [],
            "request_body": request_body,
            "response_headers": response_headers or {},
        }
        return view

    return mark


# response headers, by name: what each says (every answer has X-Request-ID; 429 and 503 have
# Retry-After; the others where a route's `describe` names them)
RESPONSE_HEADERS = {
    "X-Request-ID": "the request's id (the one sent, or made up): quote it when reporting a problem",
    "Retry-After": "seconds to wait before trying again",
    "Location": "the job's status URL",
    "Idempotent-Replayed": "true: the answer to an earlier request with the same Idempotency-Key",
    "Preference-Applied": "respond-async: the request's Prefer header was honoured",
}


def _response(code: int, spec, named: tuple[str, ...]) -> dict:
    out: dict = {"description": spec} if isinstance(spec, str) else {"description": spec[0], "content": spec[1]}
    names = ["X-Request-ID", *(["Retry-After"] if code in (429, 503) else []), *named]
    out["headers"] = {name: {"description": RESPONSE_HEADERS[name], "schema": {"type": "string"}} for name in names}
    return out


IGNORED = " (not used by the loaded decoder: setting it only adds a warning)"


def parameters_schema(params: dict, extra: dict) -> dict:
    """The generation parameters (`sonic.options.schema`, or as the loaded decoder sees them:
    `sonic.decoders.parameter_schema`) plus the route's own as a JSON schema."""
    props = {}
    for name, p in params.items():
        description = p["description"]
        if p.get("honoured") is False:
            description += IGNORED
        s = {"type": p["type"], "description": description}
        if p["minimum"] is not None:
            s["minimum"] = p["minimum"]
            if p["exclusive_minimum"]:
                s["exclusiveMinimum"] = True  # OpenAPI 3.0: a flag on minimum, not a number
        if p["maximum"] is not None:
            s["maximum"] = p["maximum"]
        if p["default"] is not None:
            s["default"] = p["default"]
        if "enum" in p:
            s["enum"] = p["enum"]
        props[name] = s
    return {"type": "object", "additionalProperties": False, "properties": {**props, **extra}}


def operation_id(rule, method: str, several_methods: bool, taken: set[str]) -> str:
    """A generated client's name for an operation, unique: its view's name in camelCase
    ("generate.job_status" -> "jobStatus"), the method first where one view answers several;
    a view's second path (an alias) is named by that path ("/api/fusion" -> "apiFusion")."""
    words = rule.endpoint.rsplit(".", 1)[-1].split("_")
    if several_methods:
        words = [method.lower(), *words]
    name = _camel(words)
    if name in taken:
        name = _camel([method.lower(), *re.findall(r"[a-z0-9]+", _PATH_ARG.sub("", rule.rule).lower())])
    return name


def _camel(words: list[str]) -> str:
    return words[0] + "".join(word.title() for word in words[1:])


def _ops(paths: dict[str, dict]) -> list[dict]:
    return [op for ops in paths.values() for op in ops.values()]


def openapi_spec(app: Flask, params: dict, extra: dict) -> dict:
    paths: dict[str, dict] = {}
    for rule in app.url_map.iter_rules():
        doc = getattr(app.view_functions[rule.endpoint], "openapi", None)
        if doc is None:
            continue
        path_params = [
            {"name": name, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(name, {"type": "string"})}
            for name in _PATH_ARG.findall(rule.rule)
        ]
        areas = [area for prefix, area in _AREAS.items() if rule.rule.startswith(prefix)]
        assert rule.methods is not None  # Flask's add_url_rule always sets them (GET by default)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            responses = {code: r for shared, _ in areas for code, r in shared.items()}
            responses.update(doc["responses"])
            op = {
                "operationId": operation_id(
                    rule, method, len(rule.methods - {"HEAD", "OPTIONS"}) > 1, {o["operationId"] for o in _ops(paths)}
                ),
                "summary": doc["summary"],
                "responses": {
                    str(code): _response(code, r, doc["response_headers"].get(code, ()))
                    for code, r in sorted(responses.items())
                },
            }
            if any(scheme for _, scheme in areas):
                op["security"] = [{}, {SECURITY_SCHEME: []}]  # {}: no key needed unless keys are set
            op["parameters"] = path_params + doc["parameters"] + _EVERYWHERE
            if doc["request_body"]:
                op["requestBody"] = doc["request_body"]
            paths.setdefault(_PATH_ARG.sub(r"{\1}", rule.rule), {})[method.lower()] = op
    components = {"schemas": {**_COMPONENTS, "Parameters": parameters_schema(params, extra)}}
    schemes = [scheme for _, scheme in _AREAS.values() if scheme]
    if schemes:
        components["securitySchemes"] = {SECURITY_SCHEME: schemes[0]}
    return {"openapi": "3.0.3", "info": INFO, "paths": paths, "components": components}
