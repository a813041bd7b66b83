"""Scenarios that need transformers' machinery: prefix caching, streaming, assisted decoding."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

from inferlab.backends.hf import StepTimer
from inferlab.backends.timing import RequestTiming
from inferlab.bench.scenarios import check_length, prefix_summary
from inferlab.bench.stats import summarize
from inferlab.bench.workload import prompts, shared_prefix_requests


class ForwardLog:
    """Positions each forward pass processes (a hook on the decoder), so a prefill is checked.

    With prompt-lookup decoding a pass covers the last token and the candidates it checks."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.get_decoder().register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        self.lengths.append(int((ids if ids is not None else emb).shape[1]))

    def remove(self) -> None:
        self.handle.remove()


def prefix_cache(
    backend, folder: Path, mode: str, prefix_tokens: int, suffix_tokens: int, requests: int,
    new_tokens: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """reuse: the prefix's cache, made once (timed apart), is deep-copied into every request.

    recompute: every request prefills prefix and suffix."""
    import torch
    from transformers import DynamicCache

    prefix, suffixes = shared_prefix_requests(backend.tokenize, folder, prefix_tokens,
                                              suffix_tokens, requests + 1)
    log = ForwardLog(backend.model)
    prefills: list[int] = []  # tokens the first forward pass of each request processed
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
                ids = torch.tensor([prefix], device=backend.device)
                backend.model(input_ids=ids, past_key_values=cache, use_cache=True)
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
            log.lengths.clear()
            t = backend.request([prefix + suffix], new_tokens, past_key_values=past)
            prefills.append(log.lengths[0])
            t.start = t0  # the copy is part of a request's cost: TTFT and total time include it
            timings.append(t)
    finally:
        log.remove()
    metrics, samples = prefix_summary(mode, timings, len(prefix), suffix_tokens, prefills[1:])
    metrics.update(prefix_fill_ms=round(1e3 * fill_s, 3),
                   cache_copy_ms=round(1e3 * copy_s / len(suffixes), 3))
    return metrics, samples


def streaming(
    backend, folder: Path, prompt_tokens: int, new_tokens: int, batch: int, warmup: int,
    repetitions: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Plain generate against one feeding a TextIteratorStreamer read by another thread.

    TTFT is when the consumer receives its first text; the overhead is the total time's difference."""
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
        "plain_e2e_ms": summarize(plain_e2e, "ms").to_dict(),
        "stream_e2e_ms": summarize(stream_e2e, "ms").to_dict(),
        "ttft_ms": summarize(stream_ttft, "ms").to_dict(),
        "streaming_overhead_ms": summarize(overhead, "ms").to_dict(),
        "text_pieces": summarize(pieces, "pieces").to_dict(),
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": batch,
    }
    stream_tps = [1e3 * new_tokens / e for e in stream_e2e]
    metrics["stream_tps"] = summarize(stream_tps, "tokens/s").to_dict()
    samples = {"plain_e2e_ms": plain_e2e, "stream_e2e_ms": stream_e2e, "ttft_ms": stream_ttft,
               "streaming_overhead_ms": overhead}
    return metrics, samples


def _generate(backend, kwargs: dict) -> None:
    import torch

    with torch.inference_mode():
        backend.model.generate(**kwargs)


def _cut(ids: list[int], limit: int, tail: int = 16) -> list[int]:
    """At most `limit` tokens: the prompt's head and its last `tail` tokens (the template's cue)."""
    return ids if len(ids) <= limit else ids[: limit - tail] + ids[-tail:]


def assisted(
    backend, texts: list[str], lookup_tokens: int, max_ngram: int, max_prompt_tokens: int,
    new_tokens: int,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Prompt-lookup (lookup_tokens > 0) or plain greedy decoding, batch 1, after one warm-up.

    Acceptance is counted: each pass yields its accepted candidates plus one token, so
    accepted = new tokens - passes; drafted = the positions the passes checked beyond the
    prompt (first pass) or the one new token (later passes)."""
    import hashlib

    import torch

    if lookup_tokens and backend.settings.get("kv_cache", "dynamic") != "dynamic":
        raise RuntimeError(
            "prompt-lookup decoding here runs on the dynamic KV cache (kv_cache=dynamic)"
        )
    ps = [_cut(backend.tokenize(t), max_prompt_tokens) for t in texts]
    if len(ps) < 2:
        raise RuntimeError(
            "assisted decoding needs a warm-up request and at least one measured request"
        )
    kwargs = backend.generation_kwargs(new_tokens)
    if lookup_tokens:
        kwargs.update(prompt_lookup_num_tokens=lookup_tokens, max_matching_ngram_size=max_ngram)
    e2e, ttft, per_fwd, rates, fwd_per_tok = [], [], [], [], []
    drafted_all, accepted_all, prompt_lens = [], [], []
    outputs = hashlib.sha256()
    each: list[str] = []  # per request: which decoded to the same tokens as another point's
    log = ForwardLog(backend.model)
    try:
        for i, p in enumerate(ps):
            ids = torch.tensor([p], device=backend.device)
            timer = StepTimer(backend.sync)
            log.lengths.clear()
            backend.sync()
            start = time.perf_counter()
            with torch.inference_mode():
                out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             streamer=timer, **kwargs)
            backend.sync()
            end = time.perf_counter()
            generated = out.shape[1] - ids.shape[1]
            check_length(generated, new_tokens)
            if i == 0:
                continue  # warm-up
            passes = len(log.lengths)
            drafted = (log.lengths[0] - len(p)) + sum(n - 1 for n in log.lengths[1:])
            accepted = new_tokens - passes
            e2e.append(1e3 * (end - start))
            ttft.append(1e3 * ((timer.times[0] if timer.times else end) - start))
            fwd_per_tok.append(passes / new_tokens)
            per_fwd.append(new_tokens / passes)
            drafted_all.append(drafted)
            accepted_all.append(accepted)
            if drafted:
                rates.append(accepted / drafted)
            prompt_lens.append(len(p))
            text = str(out[0, ids.shape[1]:].tolist()).encode()
            outputs.update(text)
            each.append(hashlib.sha256(text).hexdigest()[:12])
    finally:
        log.remove()
    tps = [1e3 * new_tokens / e for e in e2e]
    metrics = {
        "e2e_ms": summarize(e2e, "ms").to_dict(), "ttft_ms": summarize(ttft, "ms").to_dict(),
        "total_tps": summarize(tps, "tokens/s").to_dict(),
        "tokens_per_forward": summarize(per_fwd, "tokens").to_dict(),
        "forwards_per_token": summarize(fwd_per_tok, "passes").to_dict(),
        "acceptance_rate": (
            round(sum(accepted_all) / sum(drafted_all), 4) if sum(drafted_all) else None
        ),
        "acceptance_rate_per_request": summarize(rates, "fraction").to_dict() if rates else None,
        "drafted_tokens": sum(drafted_all), "accepted_tokens": sum(accepted_all),
        "prompt_tokens_each": summarize(prompt_lens, "tokens").to_dict(),
        "outputs_sha256": outputs.hexdigest()[:16],  # the plain point's: lookup changed no token
        "outputs_sha256_each": each,
        "lookup_tokens": lookup_tokens, "max_ngram": max_ngram, "requests": len(e2e),
        "new_tokens": new_tokens, "batch": 1,
    }
    samples = {"e2e_ms": e2e, "ttft_ms": ttft, "total_tps": tps, "tokens_per_forward": per_fwd,
               "acceptance_rate": rates}
    return metrics, samples
