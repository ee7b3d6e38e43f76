"""What things cost, from the settings' price table (credits.per_video_second, per_request,
per_fusion): no database, so that the routes can price without loading the ledger."""

from __future__ import annotations

import math


def cost(seconds: float, per_second: int, per_request: int) -> int:
    """Credits for `seconds` of video: whole credits, rounded up (to the millisecond first, so
    that 3.0 s is 3.0 s however the float came out)."""
    return int(math.ceil(round(float(seconds) * per_second, 3))) + int(per_request)


def video_price(credits, seconds: float) -> int:
    """A video of `seconds` at the settings' price table (credits.per_video_second, per_request)."""
    return cost(seconds, credits.per_video_second, credits.per_request)
