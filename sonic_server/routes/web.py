"""Pages for people: the demo page at `/` (plain HTML, CSS and JS from sonic_server/web/, nothing
from a CDN) and Swagger UI at `/docs` for /openapi.json, from the swagger-ui files that the
swagger-ui-bundle package ships (Apache-2.0). Neither is part of the API document."""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

from ..errors import error_response

bp = Blueprint("web", __name__)
WEB = Path(__file__).resolve().parent.parent / "web"
PAGE_FILES = {"demo.js", "demo.css", "live.js", "docs.css"}
SWAGGER_FILES = {"swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png"}
# the demo page loads only its own files; videos may come from a bucket (presigned URLs)
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: http: https:; "
    "script-src 'self'; style-src 'self'; connect-src 'self'; object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
# Swagger UI styles its elements inline
DOCS_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; object-src 'none'; frame-ancestors 'none'; base-uri 'none'"
)


def _page(name: str, policy: str):
    resp = send_from_directory(WEB, name, mimetype="text/html", max_age=0)
    resp.headers["Content-Security-Policy"] = policy  # (nosniff, as on every answer: hooks.browser_headers)
    return resp


@bp.get("/")
def index():
    return _page("index.html", PAGE_POLICY)


@bp.get("/static/<name>")
def page_file(name):
    if name not in PAGE_FILES:
        return error_response("not_found", "no such file")
    return send_from_directory(WEB, name, max_age=300)


@bp.get("/docs")
def docs():
    return _page("docs.html", DOCS_POLICY)


@bp.get("/docs/init.js")
def docs_init():
    return send_from_directory(WEB, "docs-init.js", max_age=300)


@bp.get("/docs/assets/<name>")
def docs_asset(name):
    if name not in SWAGGER_FILES:
        return error_response("not_found", "no such file")
    from swagger_ui_bundle import swagger_ui_path

    return send_from_directory(swagger_ui_path, name, max_age=86400)
