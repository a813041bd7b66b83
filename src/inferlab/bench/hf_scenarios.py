"""Scenarios that need transformers' own machinery: prefix (prompt) caching with a copied KV cache, and
streaming through TextIteratorStreamer as a consumer sees it."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

from inferlab.bench.scenarios import prefix_summary
from inferlab.bench.stats import summarize
from inferlab.bench.timing import RequestTiming
from inferlab.bench.workload import prompts, shared_prefix_requests


class PrefillCounter:
    """Counts the tokens the first forward pass of each generate() call processes (the prefill), so that a
    prefix-cache hit is checked, not assumed."""

    def __init__(self, model):
        self.first: list[int] = []
        self._armed = False
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def arm(self) -> None:
        self._armed = True

    def _hook(self, module, args, kwargs):
        if self._armed:
            ids = kwargs.get("input_ids", args[0] if args else None)
            emb = kwargs.get("inputs_embeds")
            self.first.append(int((ids if ids is not None else emb).shape[1]))
            self._armed = False

    def remove(self) -> None:
        self.handle.remove()


def prefix_cache(backend, folder: Path, mode: str, prefix_tokens: int, suffix_tokens: int, requests: int,
                 new_tokens: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """reuse: the prefix's KV cache is computed once (timed apart) and deep-copied into every request, whose
    prefill then covers only the suffix; recompute: every request prefills prefix and suffix."""
    import torch
    from transformers import DynamicCache

    prefix, suffixes = shared_prefix_requests(backend.tokenize, folder, prefix_tokens, suffix_tokens, requests + 1)
    counter = PrefillCounter(backend.model)
    fill_s = copy_s = 0.0
    cache = None
    try:
        if mode == "reuse":
            backend.sync()
            t0 = time.perf_counter()
            with torch.inference_mode():
                try:  # transformers 5 sizes the cache from the config; 4.x takes no arguments
                    cache = DynamicCache(config=backend.model.config)
                except TypeError:
                    cache = DynamicCache()
                backend.model(input_ids=torch.tensor([prefix], device=backend.device), past_key_values=cache,
                              use_cache=True)
            backend.sync()
            fill_s = time.perf_counter() - t0
        timings: list[RequestTiming] = []
        for suffix in suffixes:
            past = None
            backend.sync()
            t0 = time.perf_counter()
            if cache is not None:
                past = copy.deepcopy(cache)  # a request must not extend the shared prefix's cache
                backend.sync()
                copy_s += time.perf_counter() - t0
            counter.arm()
            t = backend.request([prefix + suffix], new_tokens, past_key_values=past)
            t.start = t0  # the copy is part of what a request costs: TTFT and total time include it
            timings.append(t)
    finally:
        counter.remove()
    metrics, samples = prefix_summary(mode, timings, len(prefix), suffix_tokens, counter.first[1:])
    metrics.update(prefix_fill_ms=round(1e3 * fill_s, 3), cache_copy_ms=round(1e3 * copy_s / len(suffixes), 3))
    return metrics, samples


def streaming(backend, folder: Path, prompt_tokens: int, new_tokens: int, batch: int, warmup: int,
              repetitions: int) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Plain generate against generate feeding a TextIteratorStreamer read by another thread (as a server
    does). TTFT is when the consumer receives its first text; the overhead is the difference in total time."""
    import torch
    from transformers import TextIteratorStreamer

    n = warmup + repetitions
    ps = prompts(backend.tokenize, folder, prompt_tokens, 2 * n)
    plain_e2e, stream_e2e, stream_ttft, pieces = [], [], [], []
    for i in range(n):
        plain = backend.request([ps[2 * i]], new_tokens)
        ids = torch.tensor([ps[2 * i + 1]], device=backend.device)
        streamer = TextIteratorStreamer(backend.tokenizer, skip_prompt=True)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                      **backend.generation_kwargs(new_tokens))
        backend.sync()
        start = time.perf_counter()
        thread = threading.Thread(target=_generate, args=(backend, kwargs))
        thread.start()
        first, count = None, 0
        for text in streamer:
            if first is None and text:
                first = time.perf_counter()
            count += 1
        thread.join()
        backend.sync()
        end = time.perf_counter()
        if i >= warmup:
            plain_e2e.append(1e3 * plain.e2e)
            stream_e2e.append(1e3 * (end - start))
            stream_ttft.append(1e3 * ((first or end) - start))
            pieces.append(count)
    overhead = [s - p for s, p in zip(stream_e2e, plain_e2e)]
    metrics = {
        "plain_e2e_ms": summarize(plain_e2e, "ms").to_dict(), "stream_e2e_ms": summarize(stream_e2e, "ms").to_dict(),
        "ttft_ms": summarize(stream_ttft, "ms").to_dict(), "streaming_overhead_ms": summarize(overhead, "ms").to_dict(),
        "text_pieces": summarize(pieces, "pieces").to_dict(),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": batch,
    }
    metrics["stream_tps"] = summarize([1e3 * new_tokens / e for e in stream_e2e], "tokens/s").to_dict()
    samples = {"plain_e2e_ms": plain_e2e, "stream_e2e_ms": stream_e2e, "ttft_ms": stream_ttft,
               "streaming_overhead_ms": overhead}
    return metrics, samples


def _generate(backend, kwargs: dict) -> None:
    import torch

    with torch.inference_mode():
        backend.model.generate(**kwargs)
