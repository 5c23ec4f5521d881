"""How many requests the app works on at once. Past the limit a request is answered 503 at
once instead of queueing (each upload may hold up to the request-size limit in memory);
liveness probes (``/healthz``) are always answered, so a busy server is not taken for a
dead one. Open connections are capped below the app, in :mod:`imgclf.serve.connections`."""

import logging
import time

from imgclf.serve.errors import error_json

log = logging.getLogger("imgclf")

ALWAYS_ANSWERED = frozenset({"/healthz"})
WARN_EVERY_S = 10.0


class RequestLimit:
    """Pure ASGI middleware: at most ``limit`` HTTP requests in progress (one event loop, so a
    plain counter); a refusal is ``{"error": {"code": "busy"}}`` with ``Retry-After: 1``."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit
        self.active = 0
        self.refused = 0
        self._last_warning = float("-inf")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in ALWAYS_ANSWERED:
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            self.refused += 1
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY_S:  # one line per burst, not one per refusal
                self._last_warning = now
                log.warning("%d requests in progress (limit %d): answering 503 to new ones (%d refused so far)", self.active, self.limit, self.refused)
            busy = error_json(503, "busy", f"the server is working on {self.limit} requests; try again shortly", {"Retry-After": "1"})
            return await busy(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1
