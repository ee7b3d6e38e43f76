"""OpenAPI 3 description of the service, built from the parameter schema."""
from __future__ import annotations

ERROR = {"$ref": "#/components/schemas/Error"}


def _err(desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": ERROR}}}


def openapi_spec(params: dict) -> dict:
    props = {}
    for name, p in params.items():
        s = {"type": p["type"], "description": p["description"]}
        if p["minimum"] is not None:
            s["exclusiveMinimum" if p["exclusive_minimum"] else "minimum"] = p["minimum"]
        if p["maximum"] is not None:
            s["maximum"] = p["maximum"]
        if p["default"] is not None:
            s["default"] = p["default"]
        props[name] = s
    props["async"] = {"type": "boolean", "default": False, "description": "answer 202 at once"}
    job_ref = {"$ref": "#/components/schemas/Job"}
    json_of = lambda schema: {"application/json": {"schema": schema}}
    return {
        "openapi": "3.0.3",
        "info": {"title": "sonic talking-head API", "version": "0.1.0",
                 "description": "Portrait photo + speech recording -> lip-synced MP4."},
        "paths": {
            "/api/sonic/generate": {"post": {
                "summary": "Generate a talking-head video",
                "parameters": [{"name": "Prefer", "in": "header", "required": False,
                                "schema": {"type": "string", "example": "respond-async"}}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["image", "audio"],
                    "properties": {"image": {"type": "string", "format": "binary", "minLength": 1},
                                   "audio": {"type": "string", "format": "binary", "minLength": 1},
                                   "config": {"type": "string", "description": "JSON object of Parameters"}}}}}},
                "responses": {"200": {"description": "video ready", "content": json_of({"$ref": "#/components/schemas/Result"})},
                              "202": {"description": "accepted; poll status_url", "content": json_of(job_ref)},
                              "400": _err("bad or missing field / JSON"), "413": _err("upload too large"),
                              "415": _err("not a decodable image / audio"),
                              "422": _err("no face, audio too long, empty or silent audio"),
                              "503": _err("queue full (Retry-After)"), "500": _err("internal error")}}},
            "/api/sonic/jobs/{job_id}": {"get": {
                "summary": "Job status", "parameters": [{"name": "job_id", "in": "path", "required": True,
                                                         "schema": {"type": "string"}}],
                "responses": {"200": {"description": "status", "content": json_of(job_ref)}, "404": _err("no such job")}}},
            "/api/sonic/jobs/{job_id}/events": {"get": {
                "summary": "Job status as Server-Sent Events until it ends",
                "parameters": [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "event stream", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                              "404": _err("no such job")}}},
            "/api/sonic/jobs/{job_id}/cancel": {"post": {
                "summary": "Cancel a job", "parameters": [{"name": "job_id", "in": "path", "required": True,
                                                           "schema": {"type": "string"}}],
                "responses": {"200": {"description": "status after the cancel", "content": json_of(job_ref)},
                              "404": _err("no such job")}}},
            "/output/{name}": {"get": {
                "summary": "Download a video (supports Range)",
                "parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "MP4", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
                              "206": {"description": "partial content"}, "404": _err("no such video")}}},
            "/health": {"get": {"summary": "Liveness and readiness",
                                "responses": {"200": {"description": "ready or busy"}, "503": {"description": "starting or setup_failed"}}}},
            "/api/sonic/params": {"get": {"summary": "Parameter schema", "responses": {"200": {"description": "schema"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}},
        },
        "components": {"schemas": {
            "Parameters": {"type": "object", "additionalProperties": False, "properties": props},
            "Error": {"type": "object", "properties": {
                "success": {"type": "boolean"}, "request_id": {"type": "string"},
                "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                                           "field": {"type": "string"}}}}},
            "Job": {"type": "object", "properties": {
                "job_id": {"type": "string"}, "status": {"type": "string",
                                                         "enum": ["queued", "processing", "succeeded", "failed", "canceled"]},
                "progress": {"type": "number"}, "stage": {"type": "string"}, "status_url": {"type": "string"}}},
            "Result": {"type": "object", "properties": {
                "success": {"type": "boolean"}, "job_id": {"type": "string"}, "video_url": {"type": "string"},
                "duration": {"type": "number"}, "fps": {"type": "integer"}, "width": {"type": "integer"},
                "height": {"type": "integer"}, "seed": {"type": "integer"}, "lipsync_offset_ms": {"type": "number"},
                "timings": {"type": "object"}, "warnings": {"type": "array", "items": {"type": "string"}}}},
        }},
    }
