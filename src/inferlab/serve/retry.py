"""When a request refused with 429 should come back."""

from __future__ import annotations

import math
import threading
import time

from inferlab.serve.engine import Engine


class RetrySlots:
    """When a refused request should come back: when a place in the queue frees that no request
    refused before it was already sent to (the requests queued and in flight, each done at the
    engine's measured pace). Refused requests come back one after another, not all at once into
    a queue that has room for one."""

    def __init__(self) -> None:
        # when the refused requests still to come back were told to
        self.promised: list[float] = []
        self.lock = threading.Lock()

    def take(self, engine: Engine, floor_s: float) -> float:
        """Seconds to wait (serve.retry_after_s while no pace is measured yet, and never less)."""
        now = time.monotonic()
        with self.lock:
            self.promised = [t for t in self.promised if t > now]
            done, k = engine.finish_times(), len(self.promised)
            if not done:
                wait = 0.0
            else:
                # half a request after its place frees: between it and the next one's,
                # early or late by a little
                each = done[-1] / len(done)
                frees = done[k] if k < len(done) else done[-1] + (k - len(done) + 1) * each
                wait = frees + each / 2
            wait = max(wait, floor_s)
            self.promised.append(now + wait)
        return wait


def retry_headers(wait_s: float) -> dict[str, str]:
    """Retry-After in whole seconds, and in ms for clients reading `retry-after-ms` (openai's)."""
    return {"Retry-After": str(math.ceil(wait_s)), "retry-after-ms": str(math.ceil(wait_s * 1000))}
