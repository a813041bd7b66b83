"""Prometheus text exposition: counters, histograms and gauges, without a client library."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable


def label(value: object) -> str:
    """A label value escaped for Prometheus's text format (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, v)] += 1
        self.sum += v
        self.n += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            out.append(f'{self.name}_bucket{{le="{b}"}} {cum}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        out += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.n}"]
        return out


class Metrics:
    """What the server counts; thread-safe (the engine thread and the event loop both record).
    Label values come from bounded sets (the server's endpoints, its error codes, HTTP statuses)
    and are escaped all the same."""

    def __init__(self, queue_depth: Callable[[], int], in_flight: Callable[[], int],
                 batch_sizes: Callable[[], dict[int, int]] = dict):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.tokens = 0
        self.ttft = Histogram("inferlab_ttft_seconds",
                              "Time from request to first generated token")
        self.itl = Histogram("inferlab_itl_seconds", "Time between streamed tokens")
        self.e2e = Histogram("inferlab_request_seconds", "Time from request to last token")
        self.queue_depth, self.in_flight, self.batch_sizes = queue_depth, in_flight, batch_sizes

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def count_tokens(self, n: int) -> None:
        with self.lock:
            self.tokens += n

    def generated(self, ttft: float | None, gaps: list[float], e2e: float) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            for g in gaps:
                self.itl.observe(g)
            self.e2e.observe(e2e)

    def render(self) -> str:
        with self.lock:
            out = ["# HELP inferlab_requests_total Requests by endpoint and HTTP status",
                   "# TYPE inferlab_requests_total counter"]
            out += [f'inferlab_requests_total{{endpoint="{label(e)}",status="{label(s)}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP inferlab_errors_total Failed requests by error type",
                    "# TYPE inferlab_errors_total counter"]
            out += [f'inferlab_errors_total{{type="{label(k)}"}} {n}'
                    for k, n in sorted(self.errors.items())]
            out += ["# HELP inferlab_generated_tokens_total Tokens generated",
                    "# TYPE inferlab_generated_tokens_total counter",
                    f"inferlab_generated_tokens_total {self.tokens}"]
            for h in (self.ttft, self.itl, self.e2e):
                out += h.render()
            out += ["# HELP inferlab_queue_depth Requests waiting for the engine",
                    "# TYPE inferlab_queue_depth gauge",
                    f"inferlab_queue_depth {self.queue_depth()}",
                    "# HELP inferlab_requests_in_flight Requests being generated",
                    "# TYPE inferlab_requests_in_flight gauge",
                    f"inferlab_requests_in_flight {self.in_flight()}",
                    "# HELP inferlab_engine_batches_total Batches the engine ran, by requests "
                    "decoded together",
                    "# TYPE inferlab_engine_batches_total counter"]
            out += [f'inferlab_engine_batches_total{{size="{k}"}} {n}'
                    for k, n in sorted(self.batch_sizes().items())]
        return "\n".join(out) + "\n"
