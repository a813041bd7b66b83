"""The load generator: streaming clients against a running server, and what they saw.

Closed loop: N concurrent clients, each sending its next request when its last is done (how fast
can it go?). Open loop: requests at a set rate whether or not earlier ones are done, Poisson or
burstier (how many users at what latency?), judged against latency targets (serve/rates.py).
Per request the client clocks TTFT (first text chunk), the gaps between chunks (ITL) and
end-to-end latency, and takes the token counts from the server's usage chunk.

    inferlab loadtest --url http://127.0.0.1:8000 --concurrency 1,4 --requests 16 --max-tokens 32
    inferlab loadtest --url http://127.0.0.1:8000 --concurrency "" --rates 0.5,1,2 --burstiness 1
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

import numpy as np

from inferlab.bench.stats import summarize
from inferlab.serve import rates

# a request an instruction-tuned model answers at length (SmolLM2's answer to the old one-line
# prompt was EOS); the load test asks for exactly --max-tokens tokens all the same (ignore_eos)
DEFAULT_PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island "
                  "who finds a message in a bottle, and what she does next.")


async def _one(client, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, last, gaps, tokens, prompt_tokens = None, None, [], None, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "error": r.text[:200], "sent": t0}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("message", "")[:200]
                    return {"ok": False, "status": 200, "error": error, "sent": t0}
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
                if any(c.get("finish_reason") is None for c in chunk.get("choices", [])):
                    # a chunk per token
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except Exception as e:  # a dropped connection is an error of the run, not a crash of the test
        return {"ok": False, "status": 0, "error": f"{type(e).__name__}: {e}"[:200], "sent": t0}
    end = time.perf_counter()
    return {"ok": True, "ttft_s": None if first is None else first - t0, "gaps": gaps,
            "e2e_s": end - t0, "tokens": tokens or 0, "prompt_tokens": prompt_tokens or 0,
            "sent": t0, "end": end}


def _body(model: str, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    """Greedy, streamed, exactly max_tokens long (ignore_eos, as vLLM's benchmarks): equal cost."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}


class NothingGenerated(RuntimeError):
    """Requests succeeded but no token was generated: a run that measured nothing."""


def check_generated(m: dict[str, Any]) -> dict[str, Any]:
    if m["ok"] and not m["completion_tokens"]:
        raise NothingGenerated(f"{m['ok']} request(s) answered but no token was generated: "
                               "nothing was measured (the model stopped at once, or the server "
                               "ignores ignore_eos); not reported")
    return m


def figures(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """What a set of requests saw, as the records keep it (milliseconds, tokens/s)."""
    ok = [r for r in results if r["ok"]]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)

    def ms(xs) -> dict[str, Any]:
        return summarize([x * 1000 for x in xs], "ms").to_dict()

    decode = [(r["tokens"] - 1) / (r["e2e_s"] - r["ttft_s"]) for r in ok
              if r["ttft_s"] is not None and r["tokens"] > 1 and r["e2e_s"] > r["ttft_s"]]
    return {
        "requests": len(results), "ok": len(ok), "errors": sum(errors.values()),
        "errors_by_status": errors,
        "error_examples": [r["error"] for r in results if not r["ok"]][:3],
        "wall_s": wall, "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "token_throughput": tokens / wall if wall > 0 else 0.0, "completion_tokens": tokens,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / max(len(ok), 1),
        "prompt_tokens": summarize([r["prompt_tokens"] for r in ok], "tokens").to_dict(),
        "ttft_ms": ms([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "itl_ms": ms([g for r in ok for g in r["gaps"]]),
        "tpot_ms": ms([t for t in map(rates.tpot_s, ok) if t is not None]),
        "e2e_ms": ms([r["e2e_s"] for r in ok]),
        "decode_tps": summarize(decode, "tokens/s").to_dict(),
    }


async def drive(url: str, model: str, prompts: list[str], concurrency: int, requests: int,
                max_tokens: int, api_key: str | None = None, timeout_s: float = 900,
                ignore_eos: bool = True) -> dict[str, Any]:
    """Closed loop: `requests` completions from `concurrency` clients, each awaiting its last."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict[str, Any]] = []
    todo = iter(range(requests))

    async def client_loop(client) -> None:
        for i in todo:
            body = _body(model, prompts[i % len(prompts)], max_tokens, ignore_eos)
            results.append(await _one(client, url, body, headers))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return check_generated(figures(results, wall))


async def drive_rate(url: str, model: str, prompts: list[str], rate: float, burstiness: float,
                     warmup: int, max_tokens: int, slo: dict[str, float | None], attainment: float,
                     seed: int = 0, api_key: str | None = None, timeout_s: float = 900,
                     ignore_eos: bool = True) -> dict[str, Any]:
    """Open loop: one request per prompt at a gamma process's arrival times (`rate` requests/s).

    The first `warmup` requests load the server but are not measured; the window runs from the
    first measured request's send to the last measured request's end."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    times = rates.arrival_times(len(prompts), rate, burstiness, np.random.default_rng(seed))
    late: list[float] = []

    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        start = time.perf_counter()

        async def send(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            late.append(time.perf_counter() - start - times[i])
            body = _body(model, prompts[i], max_tokens, ignore_eos)
            return await _one(client, url, body, headers)

        results = await asyncio.gather(*(send(i) for i in range(len(prompts))))
    measured = results[warmup:]
    if not measured:
        raise ValueError("every request of this rate was a warm-up one")
    begin = min(r["sent"] for r in measured)
    end = max(r.get("end", r["sent"]) for r in measured)
    # m requests offered at `rate` take m/rate seconds of arrivals, though random gaps may send
    # them faster (the warm-up took the long gaps): over that window goodput never exceeds the rate
    window = max(end - begin, len(measured) / rate)
    out = check_generated(figures(measured, window))
    out.update(rates.goodput(measured, slo, window, attainment))
    out.update({"offered_rate": rate, "sent_rate": len(measured) / window,
                "burstiness": burstiness, "warmup_requests": warmup,
                "send_lateness_ms": summarize([x * 1000 for x in late], "ms").to_dict()})
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="inferlab loadtest", description="drive a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"))
    p.add_argument("--concurrency", default="1,4",
                   help="closed loop: concurrent clients per level")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rates", default="",
                   help="open loop: request rates (requests/s), e.g. 0.5,1,2")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of arrival gaps (1: Poisson)")
    p.add_argument("--warmup", type=int, default=2,
                   help="first requests of each rate, not measured")
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--itl-ms", type=float, default=100.0,
                   help="target for a request's mean inter-token latency")
    p.add_argument("--e2e-ms", type=float, default=5000.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--respect-eos", action="store_true",
                   help="stop where the model ends (default: exactly --max-tokens per request, "
                        "as vLLM's --ignore-eos)")
    args = p.parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        drive_cli(args)
    except NothingGenerated as e:
        print(f"inferlab loadtest: {e}", file=sys.stderr)
        return 1
    return 0


def drive_cli(args) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    ignore_eos = not args.respect_eos
    if args.concurrency:
        print("| concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | TTFT p90 ms "
              "| ITL p50 ms | ITL p90 ms | e2e p50 ms | e2e p90 ms |\n|" + "---|" * 11)
        for c in (int(x) for x in args.concurrency.split(",")):
            m = asyncio.run(drive(args.url, model, [args.prompt], c, max(args.requests, c),
                                  args.max_tokens, args.api_key, ignore_eos=ignore_eos))
            ttft, itl, e2e = m["ttft_ms"], m["itl_ms"], m["e2e_ms"]
            print(f"| {c} | {m['requests']} | {m['errors']} | {m['request_throughput']:.2f} | "
                  f"{m['token_throughput']:.1f} | {ttft['median']:.0f} | {ttft['p90']:.0f} | "
                  f"{itl['median']:.1f} | {itl['p90']:.1f} | {e2e['median']:.0f} | "
                  f"{e2e['p90']:.0f} |", flush=True)
    if args.rates:
        slo = {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "e2e_ms": args.e2e_ms}
        print(f"\ntargets: {slo}, {args.attainment:.0%} of requests\n| rate req/s | requests | "
              "errors | goodput req/s | within targets | TTFT p90 ms | TPOT p90 ms | e2e p90 ms "
              "|\n|" + "---|" * 8)
        points = []
        prompts = [args.prompt] * (args.requests + args.warmup)
        for rate in (float(x) for x in args.rates.split(",")):
            m = asyncio.run(drive_rate(args.url, model, prompts, rate, args.burstiness,
                                       args.warmup, args.max_tokens, slo, args.attainment,
                                       api_key=args.api_key, ignore_eos=ignore_eos))
            points.append({"rate": rate, **m})
            print(f"| {rate:g} | {m['requests']} | {m['errors']} | {m['goodput']:.2f} | "
                  f"{m['slo_attainment']:.0%} | {m['ttft_ms']['p90']:.0f} | "
                  f"{m['tpot_ms']['p90']:.1f} | {m['e2e_ms']['p90']:.0f} |", flush=True)
        sat = rates.saturation(points)
        print(f"\nsaturation point: {sat['saturation_rate']} requests/s ({sat['note']})")
