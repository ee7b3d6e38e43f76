"""Face fusion: POST /fusion (and /api/fusion) blends the largest face of a source photo into a
target photo (sonic/fusion.py); POST /fusion/batch (and /api/fusion/batch) does up to
`server.fusion_max_batch` pairs in one call. Synchronous: a fusion takes a fraction of a second.

Input: JSON with base64 images (a `data:image/...;base64,` prefix is accepted), or multipart
with the images as files and the other fields as form fields. Output: JSON with the result as
base64, or (`output_format: binary`) the image itself with its content type, for `<img src>`.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import numpy as np
from flask import Blueprint, Response, g, jsonify, request
from PIL import Image

from sonic import Busy, InputTooLarge, InvalidParameter, SonicError, UnsupportedMedia
from sonic.media import WORKING_PIXELS, decode_budget, load_image

from .. import idempotency
from ..json_input import check_form_fields, json_object_body
from ..openapi import content, describe, error
from ..service import Service, service

if TYPE_CHECKING:
    from ..accounts.billing import FusionHold

bp = Blueprint("fusion", __name__)
FIELDS = {"source_image", "target_image", "blend_ratio", "swap_eye", "output_format", "image_format"}
OUTPUT_FORMATS = ("base64", "binary")
IMAGE_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "png": ("PNG", "image/png")}
SUPPORTED = "PNG, JPEG or WebP"
_engine_lock = threading.Lock()


class FusionEngine:
    """The face model for fusions: its own FaceAnalyzer (mediapipe's graphs are not thread-safe),
    loaded at the first fusion. One fusion at a time holds its `turn`, from decoding its images to
    encoding the result, so that the full-size images of one fusion only are in memory at once;
    a request that waits longer than limits.decode_wait_s for its turn is refused busy."""

    def __init__(self):
        self._analyzer = None
        self._lock = threading.Lock()

    @contextmanager
    def turn(self, wait_s: float) -> Iterator[None]:
        if not self._lock.acquire(timeout=wait_s):
            raise Busy("other fusions are running; retry shortly")
        try:
            yield
        finally:
            self._lock.release()

    def fuse(self, source, target, ratio, swap_eye):
        """Called within a turn."""
        from sonic.face import FaceAnalyzer
        from sonic.fusion import fuse

        if self._analyzer is None:
            self._analyzer = FaceAnalyzer()
        return fuse(source, target, self._analyzer, ratio, swap_eye)


def _engine(svc) -> FusionEngine:
    with _engine_lock:
        if svc.fusion is None:
            svc.fusion = FusionEngine()
    return svc.fusion


def _image_bytes(raw: bytes | str | None, name: str) -> bytes:
    """An image field's bytes: a file's, or a base64 string's (a data: URL prefix is accepted)."""
    if raw is None or raw == "" or raw == b"":
        raise InvalidParameter(f"{name} is required (base64 in JSON, or a file in multipart)", name)
    if not isinstance(raw, (str, bytes)):
        raise InvalidParameter(f"{name} must be a base64 string", name)
    if isinstance(raw, bytes):
        return raw
    text = raw.strip()
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameter(f"{name} is not valid base64", name) from None


def _decode(data: bytes, name: str, limits, full_size: bool) -> np.ndarray:
    """The image as RGB: the target at its full size (the result is the target), the source
    reduced like a portrait (only its face is used)."""
    working = limits.max_image_pixels if full_size else WORKING_PIXELS
    budget = decode_budget(limits.decode_memory_mb, limits.decode_wait_s)
    try:
        return load_image(io.BytesIO(data), limits.max_image_pixels, budget, max_working_pixels=working)
    except InputTooLarge as e:
        raise InputTooLarge(e.message.replace("image", name, 1), name) from None
    except UnsupportedMedia as e:
        why = e.message.split(" (")[0]
        raise InvalidParameter(f"{name}: {why}; supported formats: {SUPPORTED}", name) from None


def _options(body: dict, where: str = "", form: bool = False) -> dict:
    """The fusion's options, checked. `form`: the fields came as a form's text, so numbers and
    booleans are read from their words; JSON's must be JSON's own (as generate's config)."""
    unknown = sorted(str(k) for k in set(body) - FIELDS)
    if unknown:
        raise InvalidParameter(f"unknown field {where}{unknown[0]!r} (known: {', '.join(sorted(FIELDS))})", unknown[0])
    ratio = body.get("blend_ratio", 0.6)
    if isinstance(ratio, str) and form:
        try:
            ratio = float(ratio)
        except (ValueError, OverflowError):
            raise InvalidParameter("blend_ratio must be a number from 0 to 1", "blend_ratio") from None
    try:
        ok = not isinstance(ratio, bool) and isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0
    except OverflowError:
        ok = False
    if not ok:
        raise InvalidParameter("blend_ratio must be a number from 0 to 1", "blend_ratio")
    swap = body.get("swap_eye", False)
    if isinstance(swap, str) and form and swap.lower() in ("true", "false", "1", "0"):
        swap = swap.lower() in ("true", "1")
    if not isinstance(swap, bool):
        raise InvalidParameter("swap_eye must be true or false", "swap_eye")
    out = body.get("output_format", "base64")
    if out not in OUTPUT_FORMATS:
        raise InvalidParameter(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}", "output_format")
    fmt = str(body.get("image_format", "jpeg")).lower()
    if fmt == "jpg":
        fmt = "jpeg"
    if fmt not in IMAGE_FORMATS:
        raise InvalidParameter(f"image_format must be one of {', '.join(IMAGE_FORMATS)}", "image_format")
    return {"blend_ratio": float(ratio), "swap_eye": swap, "output_format": out, "image_format": fmt}


def _encode(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil_format = IMAGE_FORMATS[fmt][0]
    Image.fromarray(rgb).save(buf, format=pil_format, **({"quality": 92} if pil_format == "JPEG" else {}))
    return buf.getvalue()


def _one(svc, body: dict, files=None) -> tuple[dict, bytes, str, str]:
    """One fusion: (the result's JSON fields, the encoded image, its format, the output format)."""
    t0 = time.perf_counter()
    opts = _options(body, form=files is not None)
    limits = svc.settings.limits
    raw = {
        name: _image_bytes(files[name] if files and name in files else body.get(name), name)
        for name in ("source_image", "target_image")
    }
    engine = _engine(svc)
    with engine.turn(limits.decode_wait_s):
        t_turn = time.perf_counter()  # the wait for the turn is not decoding
        src = _decode(raw["source_image"], "source_image", limits, full_size=False)
        tgt = _decode(raw["target_image"], "target_image", limits, full_size=True)
        t_decode = time.perf_counter()
        res = engine.fuse(src, tgt, opts["blend_ratio"], opts["swap_eye"])
        del src, tgt
        t_fuse = time.perf_counter()
        data = _encode(res.image, opts["image_format"])
        t_end = time.perf_counter()
    timings = {
        "decode": round(t_decode - t_turn, 3),
        **{k: v for k, v in res.timings.items() if k != "total"},
        "encode": round(t_end - t_fuse, 3),
        "total": round(t_end - t0, 3),
    }
    h, w = res.image.shape[:2]
    return (
        {
            "width": w,
            "height": h,
            "faces": res.faces,
            "blend_ratio": opts["blend_ratio"],
            "swap_eye": opts["swap_eye"],
            "image_format": opts["image_format"],
            "timings": timings,
        },
        data,
        opts["image_format"],
        opts["output_format"],
    )


def _hold(svc: Service, count: int) -> FusionHold | None:
    """With credits: the price of `count` fusions held from the paying account (NoAccount: 403,
    InsufficientCredits: 402); else None."""
    if svc.billing is None:
        return None
    payer = svc.billing.payer(g.principal, "fusions need")
    return svc.billing.hold_fusions(payer, count, g.get("request_id"))


def _settle(svc: Service, hold: FusionHold | None, done: int) -> None:
    if hold is not None and svc.billing is not None:
        svc.billing.settle_fusions(hold, done)


FUSION_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["source_image", "target_image"],
                "additionalProperties": False,
                "properties": {
                    "source_image": {
                        "type": "string",
                        "format": "byte",
                        "description": "the face to blend in (base64)",
                    },
                    "target_image": {
                        "type": "string",
                        "format": "byte",
                        "description": "the photo it goes into (base64)",
                    },
                    "blend_ratio": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.6},
                    "swap_eye": {"type": "boolean", "default": False},
                    "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS), "default": "base64"},
                    "image_format": {"type": "string", "enum": list(IMAGE_FORMATS), "default": "jpeg"},
                },
            }
        },
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["source_image", "target_image"],
                "additionalProperties": False,
                "properties": {
                    "source_image": {"type": "string", "format": "binary"},
                    "target_image": {"type": "string", "format": "binary"},
                    "blend_ratio": {"type": "number"},
                    "swap_eye": {"type": "boolean"},
                    "output_format": {"type": "string", "enum": list(OUTPUT_FORMATS)},
                    "image_format": {"type": "string", "enum": list(IMAGE_FORMATS)},
                },
            }
        },
    },
}
FUSION_RESULT = {
    "type": "object",
    "properties": {
        "success": {"type": "boolean"},
        "request_id": {"type": "string"},
        "result": {
            "type": "object",
            "properties": {
                "image_base64": {"type": "string"},
                "width": {"type": "integer"},
                "height": {"type": "integer"},
                "faces": {"type": "object"},
            },
        },
        "timings": {"type": "object"},
    },
}
ERRORS = {
    400: error("a bad field (named): base64, image format, blend_ratio..."),
    402: error("credits enabled: not enough credits"),
    409: error("this Idempotency-Key was used with another request, or its first request still runs"),
    413: error("an image or the body is too large"),
    422: error("no face in the source or the target image (field says which)"),
}


@bp.post("/fusion")
@bp.post("/api/fusion")
@describe(
    "Blend the source photo's face into the target photo",
    parameters=[idempotency.PARAMETER],
    request_body=FUSION_BODY,
    responses={
        200: (
            "the fused image: JSON with base64, or the image itself (output_format: binary)",
            {
                "application/json": {"schema": FUSION_RESULT},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        ),
        **ERRORS,
    },
)
@idempotency.once("fusion")
def fusion():
    svc = service()
    body, files = _request_body()
    hold = _hold(svc, 1)
    try:
        fields, data, fmt, output = _one(svc, body, files)
    except BaseException:
        _settle(svc, hold, 0)
        raise
    _settle(svc, hold, 1)
    if output == "binary":
        resp = Response(data, mimetype=IMAGE_FORMATS[fmt][1])
        resp.headers["X-Fusion-Timings"] = ",".join(f"{k}={v}" for k, v in fields["timings"].items())
        return resp
    timings = fields.pop("timings")
    return jsonify(
        {
            "success": True,
            "result": {"image_base64": base64.b64encode(data).decode("ascii"), **fields},
            "timings": timings,
            "request_id": g.get("request_id"),
        }
    )


def _request_body() -> tuple[dict, dict | None]:
    """(the fields, the uploaded files) of a JSON or multipart request."""
    if request.mimetype == "multipart/form-data":
        # each field once (a second source_image was dropped unsaid), checked as generate's form is
        images = ("source_image", "target_image")  # a file, or base64 as a text field
        check_form_fields(images, tuple(sorted(FIELDS - set(images))))
        files = {n: request.files[n].read() for n in images if n in request.files}
        return {k: v for k, v in request.form.items() if k not in files}, files
    return json_object_body("send a JSON object (Content-Type: application/json) or multipart/form-data"), None


BATCH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["pairs"],
                "additionalProperties": False,
                "properties": {
                    # each pair has /fusion's JSON fields; a bad pair is that pair's error in the answer, not a 400
                    "pairs": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "description": "source_image, target_image and optionally blend_ratio, swap_eye, "
                            "image_format, as for POST /fusion",
                        },
                    },
                    "blend_ratio": {"type": "number", "minimum": 0, "maximum": 1},
                    "swap_eye": {"type": "boolean"},
                    "image_format": {"type": "string", "enum": list(IMAGE_FORMATS)},
                },
            }
        }
    },
}


@bp.post("/fusion/batch")
@bp.post("/api/fusion/batch")
@describe(
    "Several fusions in one call: each pair's result or its own error",
    parameters=[idempotency.PARAMETER],
    request_body=BATCH_BODY,
    responses={200: ("one entry per pair, in order", content("application/json", {"type": "object"})), **ERRORS},
)
@idempotency.once("fusion/batch")
def fusion_batch():
    svc = service()
    body = json_object_body("send a JSON object with pairs")
    unknown = sorted(str(k) for k in set(body) - {"pairs", "blend_ratio", "swap_eye", "image_format"})
    if unknown:
        raise InvalidParameter(f"unknown field {unknown[0]!r}", unknown[0])
    pairs = body.get("pairs")
    limit = svc.settings.server.fusion_max_batch
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, dict) for p in pairs):
        raise InvalidParameter("pairs must be a non-empty list of objects with source_image and target_image", "pairs")
    if len(pairs) > limit:
        raise InvalidParameter(f"at most {limit} pairs per call (server.fusion_max_batch)", "pairs")
    shared = {k: body[k] for k in ("blend_ratio", "swap_eye", "image_format") if k in body}
    _options(shared)  # shared settings are checked once: a 400
    hold = _hold(svc, len(pairs))
    t0 = time.perf_counter()
    results, done = [], 0
    try:
        for i, pair in enumerate(pairs):
            try:
                fields, data, _, _ = _one(svc, {**shared, **pair, "output_format": "base64"})
                timings = fields.pop("timings")
                results.append(
                    {
                        "index": i,
                        "success": True,
                        "timings": timings,
                        "result": {"image_base64": base64.b64encode(data).decode("ascii"), **fields},
                    }
                )
                done += 1
            except SonicError as e:
                from ..errors import public_error

                results.append({"index": i, "success": False, "error": public_error(e.to_dict())})
    finally:
        _settle(svc, hold, done)
    return jsonify(
        {
            "success": done == len(pairs),
            "succeeded": done,
            "failed": len(pairs) - done,
            "results": results,
            "timings": {"total": round(time.perf_counter() - t0, 3)},
            "request_id": g.get("request_id"),
        }
    )
