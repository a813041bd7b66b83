"""One request's timing, from the clock readings taken as the consumer sees each token.

Seconds on time.perf_counter(); on a GPU the device is synchronised before each clock read, so a
token's timestamp is when it exists, not when its kernel was queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTiming:
    start: float  # when the request was issued
    token_times: list[float]  # when each generation step's tokens became available
    end: float  # when the request returned
    prompt_tokens: int  # per sequence, counted by the tokenizer / runtime
    generated_tokens: int  # per sequence, counted by the runtime
    batch: int = 1
    internal: dict = field(default_factory=dict)  # the runtime's own counters (llama.cpp's, ...)
    output_ids: list | None = None  # generated ids per sequence, where the backend returns them

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start if self.token_times else self.end - self.start

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itl(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive steps."""
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot(self) -> float:
        """Time per output token after the first: (last token - first token) / (n - 1)."""
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else float("nan")

    def figures(self) -> dict[str, float]:
        """The per-request figures, each name carrying its unit."""
        tpot = self.tpot
        return {
            "ttft_ms": 1e3 * self.ttft,
            "tpot_ms": 1e3 * tpot,
            "e2e_ms": 1e3 * self.e2e,
            "prefill_tps": (
                self.batch * self.prompt_tokens / self.ttft if self.ttft > 0 else float("nan")
            ),
            "decode_tps": 1.0 / tpot if tpot == tpot and tpot > 0 else float("nan"),  # per sequence
            "total_tps": (
                self.batch * self.generated_tokens / self.e2e if self.e2e > 0 else float("nan")
            ),
        }
