"""Rate limit on job creation: ``security.create_rate_per_min`` per client.

A client is its API key (by hash) or, without keys, its address. Each has a
token bucket holding up to one minute's allowance that refills continuously,
so a burst of ``rate`` requests passes and then one every ``60/rate`` s. Over
the limit: 429 problem JSON with ``Retry-After`` (whole seconds until a token
is back). Only ``POST /api/create-clips`` is limited; 0 turns it off.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from clipservice.api.appkeys import SETTINGS
from clipservice.api.auth import client_id
from clipservice.errors import ProblemError

LIMITED = ("POST", "/api/create-clips")
# Buckets kept at most; full (idle) ones are dropped first when over it.
_MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets per client; ``take`` returns 0 or the seconds to wait."""

    def __init__(self, rate_per_min: int, clock: Any = time.monotonic) -> None:
        self.capacity = float(rate_per_min)
        self.per_s = rate_per_min / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _refill(self, b: _Bucket, now: float) -> None:
        b.tokens = min(self.capacity, b.tokens + (now - b.at) * self.per_s)
        b.at = now

    def take(self, client: str) -> float:
        """Spend one token for ``client``; 0.0 if allowed, else seconds until allowed."""
        if self.capacity <= 0:
            return 0.0
        now = self._clock()
        b = self._buckets.get(client)
        if b is None:
            if len(self._buckets) >= _MAX_BUCKETS:
                self._prune(now)
            b = self._buckets[client] = _Bucket(self.capacity, now)
        self._refill(b, now)
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / self.per_s

    def _prune(self, now: float) -> None:
        for key, b in list(self._buckets.items()):
            self._refill(b, now)
            if b.tokens >= self.capacity:
                del self._buckets[key]
        while len(self._buckets) >= _MAX_BUCKETS:
            # Still full of active clients: forget the oldest (they gain a little).
            del self._buckets[next(iter(self._buckets))]


CREATE_LIMITER = web.AppKey("create_limiter", RateLimiter)


def setup_ratelimit(app: web.Application) -> None:
    """Attach the job-creation limiter (from settings) to ``app``."""
    app[CREATE_LIMITER] = RateLimiter(app[SETTINGS].security.create_rate_per_min)


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if (request.method, request.path) == LIMITED:
        wait_s = request.app[CREATE_LIMITER].take(client_id(request))
        if wait_s > 0:
            limit = request.app[SETTINGS].security.create_rate_per_min
            raise ProblemError(
                429,
                "Too Many Requests",
                f"at most {limit} jobs per minute; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
    response: web.StreamResponse = await handler(request)
    return response
