"""Access control: optional API keys (Authorization: Bearer) and a per-client token bucket.

Only `/api/` routes are guarded: health, OpenAPI, downloads (unguessable names) and CORS
preflights stay open.
"""
from __future__ import annotations

import hmac
import math
import threading
import time

from flask import Flask, request

from .errors import error_response

MAX_CLIENTS = 10_000      # buckets kept; the least recently seen are dropped beyond this


class TokenBucket:
    """`rate` requests per second per client, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst = float(rate), float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, client: str, now: float | None = None) -> float:
        """0 if the request may go ahead, else the seconds until it may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
            self._buckets[client] = (tokens - 1.0 if wait == 0.0 else tokens, now)
            if len(self._buckets) > MAX_CLIENTS:
                for key in list(self._buckets)[: len(self._buckets) - MAX_CLIENTS]:
                    del self._buckets[key]
        return wait


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def bearer_key(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    return header[7:].strip() or None


def key_allowed(key: str | None, keys: list[str]) -> bool:
    return key is not None and any(hmac.compare_digest(key, k) for k in keys)


def install(app: Flask, keys: list[str], rate_per_s: float, burst: float) -> None:
    """Refuse /api/ requests without a valid key (401, when keys are set) or over the client's
    rate (429 + Retry-After); a client is its key, else its address."""
    bucket = TokenBucket(rate_per_s, burst)

    @app.before_request
    def _guard():
        if not request.path.startswith("/api/") or request.method == "OPTIONS":
            return None
        key = bearer_key(request.headers.get("Authorization"))
        if keys and not key_allowed(key, keys):
            return error_response("unauthorized", "a valid API key is required: Authorization: Bearer <key>",
                                  headers={"WWW-Authenticate": "Bearer"})
        wait = bucket.take(key or request.remote_addr or "unknown")
        if wait > 0:
            return error_response("rate_limited", "too many requests; slow down",
                                  headers={"Retry-After": retry_after(wait)})
        return None
