"""What is measured, independent of the backend that runs the model."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from inferlab.backends.base import Backend
from inferlab.backends.timing import RequestTiming
from inferlab.bench.stats import summarize
from inferlab.bench.workload import prompts, shared_prefix_requests

log = logging.getLogger(__name__)

FIGURE_UNITS = {"ttft_ms": "ms", "tpot_ms": "ms", "e2e_ms": "ms", "prefill_tps": "tokens/s",
                "decode_tps": "tokens/s", "total_tps": "tokens/s"}


def check_length(generated: int, new_tokens: int) -> None:
    """Every timed request generates the fixed length (EOS cannot end one early)."""
    if generated != new_tokens:
        raise RuntimeError(f"generated {generated} tokens instead of the fixed {new_tokens}")


def summarize_requests(
    timings: list[RequestTiming],
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Summaries (median, p90, p99, stdev, ...) of every per-request figure, and the raw samples."""
    samples: dict[str, list[float]] = {k: [] for k in FIGURE_UNITS}
    itl: list[float] = []
    for t in timings:
        for k, v in t.figures().items():
            samples[k].append(v)
        itl.extend(1e3 * x for x in t.itl)
    metrics = {k: summarize(v, FIGURE_UNITS[k]).to_dict() for k, v in samples.items()}
    metrics["itl_ms"] = summarize(itl, "ms").to_dict()
    samples["itl_ms"] = itl
    internal = [t.internal for t in timings if "eval_ms" in t.internal]
    setup = [t.internal["setup_s"] for t in timings if "setup_s" in t.internal]
    if setup:  # the graph loop's compile and capture inside a request (0 once done)
        metrics["setup_ms"] = summarize([1e3 * x for x in setup], "ms").to_dict()
    launches = [t.internal["step_launches"] for t in timings if "step_launches" in t.internal]
    # decode: kernels' Triton launches per step (the graph loop adds a few small kernels)
    if launches:
        metrics["step_launches"] = launches[-1]
    if internal:  # llama.cpp's own counters: how much of the wall clock llama.cpp itself spent
        own_ms = [i["prompt_ms"] + i["eval_ms"] for i in internal]
        overhead = [1e3 * t.e2e - o for t, o in zip(timings, own_ms)]
        samples["llama_prompt_ms"] = [i["prompt_ms"] for i in internal]
        samples["llama_eval_ms"] = [i["eval_ms"] for i in internal]
        samples["harness_overhead_ms"] = overhead
        metrics["llama_prompt_ms"] = summarize(samples["llama_prompt_ms"], "ms").to_dict()
        rates = [1e3 * i["n_eval"] / i["eval_ms"] for i in internal if i["eval_ms"] > 0]
        metrics["llama_decode_tps"] = summarize(rates, "tokens/s").to_dict()
        metrics["harness_overhead_ms"] = summarize(overhead, "ms").to_dict()
        metrics["harness_overhead_fraction"] = round(
            sum(overhead) / sum(1e3 * t.e2e for t in timings), 4) if timings else None
    return metrics, samples


def output_digest(timings: list[RequestTiming]) -> str | None:
    """A digest of the generated tokens (None where the backend does not return them).

    Two points of one sweep with the same digest decoded the same prompts to the same tokens."""
    if not timings or any(t.output_ids is None for t in timings):
        return None
    return hashlib.sha1(json.dumps([t.output_ids for t in timings]).encode()).hexdigest()[:16]


def latency(
    backend: Backend, folder: Path, prompt_tokens: int, new_tokens: int, batch: int,
    warmup: int, repetitions: int, **opts: Any,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """A cold first request, warm-up requests (excluded), then the measured repetitions.

    Every request gets its own prompts."""
    n = 1 + warmup + repetitions
    ps = prompts(backend.tokenize, folder, prompt_tokens, n * batch)
    batches = [ps[i * batch:(i + 1) * batch] for i in range(n)]
    cold = backend.request(batches[0], new_tokens, **opts)
    check_length(cold.generated_tokens, new_tokens)
    for b in batches[1:1 + warmup]:
        backend.request(b, new_tokens, **opts)
    timings = []
    for b in batches[1 + warmup:]:
        t = backend.request(b, new_tokens, **opts)
        check_length(t.generated_tokens, new_tokens)
        timings.append(t)
    metrics, samples = summarize_requests(timings)
    cold_fig = cold.figures()
    metrics["cold"] = {k: round(v, 3) for k, v in cold_fig.items()}
    warm_ttft = metrics["ttft_ms"]["median"]
    metrics["cold_ttft_penalty_ms"] = round(cold_fig["ttft_ms"] - warm_ttft, 3)
    # the first request's cost beyond a warm one (compilation and graph capture, or page
    # faults and allocations): a user pays it once per loaded model
    extra = cold_fig["e2e_ms"] - metrics["e2e_ms"]["median"]
    metrics["first_request_extra_ms"] = round(extra, 3)
    metrics.update(prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch)
    if (digest := output_digest(timings)) is not None:
        metrics["output_digest"] = digest
    return metrics, samples


def prefix_cache(
    backend: Backend, folder: Path, mode: str, prefix_tokens: int, suffix_tokens: int,
    requests: int, new_tokens: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Requests sharing a long prefix: the first fills the mode's cache, the others should hit it.

    A hit is checked: llama.cpp's count of evaluated prompt tokens is below the prompt's."""
    prefix, suffixes = shared_prefix_requests(backend.tokenize, folder, prefix_tokens,
                                              suffix_tokens, requests + 1)
    timings = []
    for suffix in suffixes:
        # "context": keep the KV cache between requests (llama-cpp-python reuses the prefix);
        # none / ram / disk: each request starts from an empty context: only the prompt cache helps
        t = backend.request([prefix + suffix], new_tokens, api="completion_stream",
                            reset=mode != "context")
        timings.append(t)
    full = len(prefix) + suffix_tokens
    evaluated = [t.internal.get("n_prompt_eval", full) for t in timings[1:]]
    return prefix_summary(mode, timings, len(prefix), suffix_tokens, evaluated)


def prefix_summary(
    mode: str, timings: list[RequestTiming], prefix_tokens: int, suffix_tokens: int,
    evaluated: list[int],
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """A shared-prefix run: the first request (filling the cache) apart, the others summarized.

    And how many were hits (fewer prompt tokens evaluated than the prompt holds)."""
    first, rest = timings[0], timings[1:]
    hits = sum(1 for e in evaluated if e < prefix_tokens + suffix_tokens - 1)
    metrics, samples = summarize_requests(rest)
    metrics.update(
        mode=mode, prefix_tokens=prefix_tokens, suffix_tokens=suffix_tokens, requests=len(rest),
        first_ttft_ms=round(1e3 * first.ttft, 3), cache_hits=hits,
        hit_rate=hits / len(rest) if rest else 0.0,
        prompt_tokens_evaluated=summarize(evaluated, "tokens").to_dict(),
    )
    samples["prompt_tokens_evaluated"] = [float(e) for e in evaluated]
    return metrics, samples
