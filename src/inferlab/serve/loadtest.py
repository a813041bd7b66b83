"""The server under load, and what its clients saw.

Closed loop: N concurrent streaming clients, each sending its next request when the last is done (how fast can
it go?). Open loop: requests arriving at a set rate whether or not earlier ones are done, Poisson or burstier
(how many users at what latency?): goodput against latency targets and the saturation point (serve/rates.py).
Per request the client clocks TTFT (first text chunk), the gaps between chunks (ITL) and end-to-end latency, and
takes the token counts from the server's usage chunk. Prompt lengths are drawn from a distribution. Stage
`serve_bench` starts the server on 127.0.0.1, runs both and writes one record per concurrency level and per rate.

    inferlab loadtest --url http://127.0.0.1:8000 --concurrency 1,4 --requests 16 --max-tokens 32
    inferlab loadtest --url http://127.0.0.1:8000 --concurrency "" --rates 0.5,1,2 --burstiness 1
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from inferlab import records as rec
from inferlab.aggregate import latest_points, stage_records, write_aggregates
from inferlab.bench.stats import summarize
from inferlab.config import StudyConfig, resolve, to_container
from inferlab.serve import rates
from inferlab.stage import StageRun

log = logging.getLogger(__name__)

STAGE = "serve_bench"
# a request an instruction-tuned model answers at length (SmolLM2's answer to the old one-line prompt was EOS);
# the load test asks for exactly --max-tokens tokens all the same (ignore_eos)
DEFAULT_PROMPT = ("Write a long, detailed story about a lighthouse keeper on a remote island who finds a message "
                  "in a bottle, and what she does next.")


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
                    return {"ok": False, "status": 200, "error": chunk["error"].get("message", "")[:200], "sent": t0}
                if chunk.get("usage"):
                    tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"]["prompt_tokens"]
                if any(c.get("finish_reason") is None for c in chunk.get("choices", [])):  # one chunk per token
                    now = time.perf_counter()
                    if first is None:
                        first = now
                    else:
                        gaps.append(now - last)
                    last = now
    except Exception as e:  # a dropped connection is an error of the run, not a crash of the test
        return {"ok": False, "status": 0, "error": f"{type(e).__name__}: {e}"[:200], "sent": t0}
    end = time.perf_counter()
    return {"ok": True, "ttft_s": None if first is None else first - t0, "gaps": gaps, "e2e_s": end - t0,
            "tokens": tokens or 0, "prompt_tokens": prompt_tokens or 0, "sent": t0, "end": end}


def _body(model: str, prompt: str, max_tokens: int, ignore_eos: bool = True) -> dict[str, Any]:
    """Greedy, streamed, and exactly max_tokens long (ignore_eos, as vLLM's benchmarks): every request costs the
    same, whatever the model would answer."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}


class NothingGenerated(RuntimeError):
    """Requests succeeded but no token was generated: a run that measured nothing."""


def check_generated(m: dict[str, Any]) -> dict[str, Any]:
    if m["ok"] and not m["completion_tokens"]:
        raise NothingGenerated(f"{m['ok']} request(s) answered but no token was generated: nothing was measured "
                               "(the model stopped at once, or the server ignores ignore_eos); not reported")
    return m


def figures(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """What a set of requests saw, as the records keep it (milliseconds, tokens/s)."""
    ok = [r for r in results if r["ok"]]
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            errors[str(r["status"])] = errors.get(str(r["status"]), 0) + 1
    tokens = sum(r["tokens"] for r in ok)
    ms = lambda xs: [x * 1000 for x in xs]  # noqa: E731
    return {
        "requests": len(results), "ok": len(ok), "errors": sum(errors.values()), "errors_by_status": errors,
        "error_examples": [r["error"] for r in results if not r["ok"]][:3],
        "wall_s": wall, "request_throughput": len(ok) / wall if wall > 0 else 0.0,
        "token_throughput": tokens / wall if wall > 0 else 0.0, "completion_tokens": tokens,
        "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / max(len(ok), 1),
        "prompt_tokens": summarize([r["prompt_tokens"] for r in ok], "tokens").to_dict(),
        "ttft_ms": summarize(ms([r["ttft_s"] for r in ok if r["ttft_s"] is not None]), "ms").to_dict(),
        "itl_ms": summarize(ms([g for r in ok for g in r["gaps"]]), "ms").to_dict(),
        "tpot_ms": summarize(ms([t for t in map(rates.tpot_s, ok) if t is not None]), "ms").to_dict(),
        "e2e_ms": summarize(ms([r["e2e_s"] for r in ok]), "ms").to_dict(),
        "decode_tps": summarize([(r["tokens"] - 1) / (r["e2e_s"] - r["ttft_s"]) for r in ok
                                 if r["ttft_s"] is not None and r["tokens"] > 1 and r["e2e_s"] > r["ttft_s"]],
                                "tokens/s").to_dict(),
    }


async def drive(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
                api_key: str | None = None, timeout_s: float = 900, ignore_eos: bool = True) -> dict[str, Any]:
    """Closed loop: `requests` streamed greedy completions from `concurrency` clients, each sending its next request
    when its last one is done; the figures of the run."""
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


async def drive_rate(url: str, model: str, prompts: list[str], rate: float, burstiness: float, warmup: int,
                     max_tokens: int, slo: dict[str, float | None], attainment: float, seed: int = 0,
                     api_key: str | None = None, timeout_s: float = 900, ignore_eos: bool = True) -> dict[str, Any]:
    """Open loop: one request per prompt, sent at the arrival times of a gamma process at `rate` requests/s, each
    on time whether or not earlier ones are done. The first `warmup` requests load the server but are not measured;
    the window runs from the first measured request's send to the last measured request's end."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    times = rates.arrival_times(len(prompts), rate, burstiness, np.random.default_rng(seed))
    late: list[float] = []

    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()

        async def send(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
            late.append(time.perf_counter() - start - times[i])
            return await _one(client, url, _body(model, prompts[i], max_tokens, ignore_eos), headers)

        results = await asyncio.gather(*(send(i) for i in range(len(prompts))))
    measured = results[warmup:]
    if not measured:
        raise ValueError("every request of this rate was a warm-up one")
    begin = min(r["sent"] for r in measured)
    end = max(r.get("end", r["sent"]) for r in measured)
    # m requests offered at `rate` take m/rate seconds of arrivals, though random gaps may send them faster
    # (the warm-up took the long gaps): over that window at least, goodput never exceeds the offered rate
    window = max(end - begin, len(measured) / rate)
    out = check_generated(figures(measured, window))
    out.update(rates.goodput(measured, slo, window, attainment))
    out.update({"offered_rate": rate, "sent_rate": len(measured) / window, "burstiness": burstiness,
                "warmup_requests": warmup, "send_lateness_ms": summarize([x * 1000 for x in late], "ms").to_dict()})
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`inferlab serve` in a child process on 127.0.0.1 with the study's config; stopped on exit."""

    def __init__(self, cfg: StudyConfig, overrides: dict[str, Any], log_path: Path, startup_s: float = 300):
        self.cfg, self.overrides, self.log_path, self.startup_s = cfg, overrides, log_path, startup_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        import httpx

        # the sections the server reads (the others take their defaults there)
        data = {k: to_container(getattr(self.cfg, k)) for k in ("model", "serve", "serve_bench", "paths")}
        data["serve"].update({**self.overrides, "host": "127.0.0.1", "port": self.port, "gradio": False})
        fd, path = tempfile.mkstemp(prefix="inferlab-serve-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f)
        self.params = Path(path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen([sys.executable, "-m", "inferlab.serve.server", "--params", str(self.params)],
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-800:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting: {tail}")
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                if r.status_code == 200:
                    self.health = r.json()
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the server did not answer /health within {self.startup_s:.0f} s")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        self.params.unlink(missing_ok=True)


class PromptSource:
    """Prompts of given token lengths, cut from distinct windows of the prompt pool with the model's tokenizer (the
    server re-tokenizes them; the records carry the count it reports)."""

    def __init__(self, cfg: StudyConfig):
        from transformers import AutoTokenizer

        from inferlab.bench.workload import prompts

        self.tok = AutoTokenizer.from_pretrained(str(cfg.model_dir() / "hf"))
        sb = cfg.serve_bench
        encode = lambda t: self.tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.pool = prompts(encode, resolve(sb.prompts), sb.prompt_tokens_max, 1)[0]  # the pool, repeated if short
        while len(self.pool) < 4 * sb.prompt_tokens_max:
            self.pool = self.pool + self.pool
        self.cursor = 0

    def take(self, lengths: list[int]) -> list[str]:
        out = []
        for n in lengths:
            start = self.cursor % (len(self.pool) - n)
            self.cursor += 97  # the next prompt starts elsewhere: no two alike, little prefix reuse
            out.append(self.tok.decode(self.pool[start:start + n]))
        return out


def draw_lengths(cfg: StudyConfig, n: int, context: int, seed: int) -> list[int]:
    sb = cfg.serve_bench
    high = max(1, min(sb.prompt_tokens_max, context - sb.max_tokens - 8))
    return rates.prompt_lengths(n, sb.prompt_tokens, sb.prompt_tokens_dist, sb.prompt_tokens_spread, 1, high,
                                np.random.default_rng(seed))


def server_context(server: ServerProcess, cfg: StudyConfig) -> int:
    import httpx

    desc = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0].get("inferlab", {})
    return int(desc.get("n_ctx") or desc.get("context_window") or cfg.serve.n_ctx)


def run(cfg: StudyConfig, stage: StageRun) -> None:
    from inferlab.serve.server import choose

    sb = cfg.serve_bench
    settings, source = choose(cfg)
    pins = cfg.pins(("runtime", "quant", "precision", "n_threads"))
    overrides: dict[str, Any] = {"source": "config"}
    for k in ("runtime", "quant", "precision", "n_threads", "device"):
        if settings.get(k) is not None:
            overrides[k] = settings[k]
    overrides.update(pins)  # a pin on the command line wins, as in every sweep
    runtime = overrides["runtime"]
    what = overrides.get("quant") if runtime == "llama_cpp" else overrides.get("precision")
    log.info("serve_bench: %s %s (%s%s), concurrency %s, %d requests each; then rates %s", runtime, what, source,
             f"; pinned {pins}" if pins else "", sb.concurrency, sb.requests,
             sb.rates or f"{sb.rate_fractions} of the peak throughput")
    base = {"runtime": runtime, "quant" if runtime == "llama_cpp" else "precision": what,
            "max_tokens": sb.max_tokens, "prompt_tokens": sb.prompt_tokens,
            "prompt_tokens_dist": sb.prompt_tokens_dist, "prompt_tokens_spread": sb.prompt_tokens_spread,
            "served_from": source}
    closed = [(f"{runtime}-{what}-c{c}", {**base, "scenario": "serving", "concurrency": c,
                                          "requests": max(sb.requests, c)}) for c in sb.concurrency]
    slo = {"ttft_ms": sb.slo.ttft_ms, "itl_ms": sb.slo.itl_ms, "e2e_ms": sb.slo.e2e_ms}
    steps = [("rate", r) for r in sb.rates] or [("rate_fraction", f) for f in sb.rate_fractions]
    opened = [(f"{runtime}-{what}-" + (f"r{v:g}" if k == "rate" else f"r{v:g}x"),
               {**base, "scenario": "serving-rate", k: v, "burstiness": sb.burstiness, "requests": sb.rate_requests,
                "warmup": sb.warmup, "slo": slo, "slo_attainment": sb.slo_attainment, "seed": sb.seed})
              for k, v in steps]
    name = cfg.serve.served_model_name or cfg.model.name
    try:
        with ServerProcess(cfg, overrides, resolve("outputs") / f"{STAGE}-server.log") as server:
            source_prompts = PromptSource(cfg)
            context = server_context(server, cfg)
            peak = 0.0
            n = max(sb.requests, max(sb.concurrency))
            prompts = source_prompts.take(draw_lengths(cfg, n, context, sb.seed))
            for i, (label, point) in enumerate(closed, 1):
                c = point["concurrency"]
                if sb.warmup:
                    asyncio.run(drive(server.url, name, prompts, 1, sb.warmup, sb.max_tokens))
                log.info("serve_bench: level %d/%d: concurrency %d, %d requests", i, len(closed), c,
                         point["requests"])
                try:
                    m = asyncio.run(drive(server.url, name, prompts, c, point["requests"], sb.max_tokens,
                                          timeout_s=sb.timeout_s))
                except Exception as e:
                    stage.record(label, point, status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
                    continue
                m["server"] = server.health
                if m["ok"] == 0:
                    stage.record(label, point, status="failed", metrics=m,
                                 reason=f"every request failed: {m['error_examples'][:1]}")
                    continue
                stage.record(label, point, metrics=m)
                peak = max(peak, m["request_throughput"])
                log.info("serve_bench: c=%d: %.2f req/s, %.1f tokens/s, TTFT p50 %.0f ms, ITL p50 %.1f ms, "
                         "%d errors", c, m["request_throughput"], m["token_throughput"], m["ttft_ms"]["median"],
                         m["itl_ms"]["median"], m["errors"])
            for i, (label, point) in enumerate(opened, 1):
                rate = point.get("rate") or point["rate_fraction"] * peak
                if not rate:
                    stage.record(label, point, status="skipped", reason="no rate: the concurrency sweep measured no "
                                 "throughput to take a fraction of (set serve_bench.rates)")
                    continue
                log.info("serve_bench: rate %d/%d: %.2f requests/s (burstiness %g), %d + %d warm-up requests", i,
                         len(opened), rate, sb.burstiness, sb.rate_requests, sb.warmup)
                count = sb.warmup + sb.rate_requests
                prompts = source_prompts.take(draw_lengths(cfg, count, context, sb.seed + i))
                try:
                    m = asyncio.run(drive_rate(server.url, name, prompts, rate, sb.burstiness, sb.warmup,
                                               sb.max_tokens, slo, sb.slo_attainment, seed=sb.seed + i,
                                               timeout_s=sb.timeout_s))
                except Exception as e:
                    stage.record(label, point, status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
                    continue
                m["server"], m["peak_request_throughput"] = server.health, peak
                stage.record(label, point, metrics=m)
                log.info("serve_bench: %.2f req/s offered: goodput %.2f req/s, %.0f%% within targets%s, TTFT p90 "
                         "%.0f ms, TPOT p90 %.1f ms, e2e p90 %.0f ms, %d errors", rate, m["goodput"],
                         100 * m["slo_attainment"], "" if m["meets_slo"] else " (below the attainment target)",
                         m["ttft_ms"]["p90"], m["tpot_ms"]["p90"], m["e2e_ms"]["p90"], m["errors"])
    except Exception as e:  # the server could not start (a missing GGUF, no CUDA): every point failed, said why
        for label, point in closed + opened:
            stage.record(label, point, status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
    summarize_stage(cfg, stage.env["hardware"]["id"])


def summarize_stage(cfg: StudyConfig, hardware_id: str | None) -> dict[str, Any]:
    """The stage's aggregates (metrics/serve_bench.json, the plot table) with each served configuration's
    saturation point added, and the figure of latency against request rate for this machine and model. All of it
    from the records (the latest of each point). hardware_id None: the metrics files alone (`inferlab aggregate`),
    no figure and no log line per served configuration."""
    summary = write_aggregates(cfg, STAGE)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest_points(stage_records(resolve(cfg.paths.results), STAGE)):
        if r.point.get("scenario") != "serving-rate" or r.status != "ok":
            continue
        served = f"{r.point['runtime']} {r.point.get('quant') or r.point.get('precision')}"
        burst = float(r.point.get("burstiness", 1.0))
        if burst != 1.0:
            served += f" burstiness {burst:g}"
        m = r.metrics
        groups.setdefault((r.environment["hardware"]["id"], r.model["name"], served), []).append(
            {"rate": m["offered_rate"], "meets_slo": m["meets_slo"], "goodput": m["goodput"],
             "slo_attainment": m["slo_attainment"], "ttft_ms": _p(m["ttft_ms"]), "itl_ms": _p(m["tpot_ms"]),
             "e2e_ms": _p(m["e2e_ms"])})
    series: dict[str, list[dict[str, Any]]] = {}
    for (hw, model, served), pts in groups.items():
        sat = rates.saturation(pts)
        entry = summary.setdefault(hw, {"models": {}})["models"].setdefault(model, {})
        entry.setdefault("saturation", {})[served] = sat
        if hardware_id is not None and hw == hardware_id and model == cfg.model.name:
            series[served] = pts
            rate = sat["saturation_rate"]
            log.info("serve_bench: %s saturates at %s req/s (%s)", served,
                     "no" if rate is None else f"{rate:.3g}", sat["note"])
    rec.write_json(resolve(cfg.paths.metrics) / f"{STAGE}.json", summary)
    if hardware_id is None:
        return summary
    sb = cfg.serve_bench
    rates.latency_figure(series, {"ttft_ms": sb.slo.ttft_ms, "itl_ms": sb.slo.itl_ms, "e2e_ms": sb.slo.e2e_ms},
                         resolve(cfg.paths.metrics) / "plots" / f"{STAGE}_rates.png")
    return summary


def _p(summary: dict[str, Any] | None) -> dict[str, float]:
    summary = summary or {}
    return {"p50": summary.get("median", math.nan), "p90": summary.get("p90", math.nan)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="inferlab loadtest", description="drive a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"))
    p.add_argument("--concurrency", default="1,4", help="closed loop: concurrent clients per level")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--rates", default="", help="open loop: request rates (requests/s), e.g. 0.5,1,2")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)")
    p.add_argument("--warmup", type=int, default=2, help="first requests of each rate, not measured")
    p.add_argument("--ttft-ms", type=float, default=1000.0)
    p.add_argument("--itl-ms", type=float, default=100.0, help="target for a request's mean inter-token latency")
    p.add_argument("--e2e-ms", type=float, default=5000.0)
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--respect-eos", action="store_true",
                   help="stop where the model ends (default: exactly --max-tokens per request, as vLLM's --ignore-eos)")
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
    if args.concurrency:
        print("| concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | "
              "ITL p90 ms | e2e p50 ms | e2e p90 ms |\n|" + "---|" * 11)
        for c in (int(x) for x in args.concurrency.split(",")):
            m = asyncio.run(drive(args.url, model, [args.prompt], c, max(args.requests, c), args.max_tokens,
                                  args.api_key, ignore_eos=not args.respect_eos))
            print(f"| {c} | {m['requests']} | {m['errors']} | {m['request_throughput']:.2f} | "
                  f"{m['token_throughput']:.1f} | {m['ttft_ms']['median']:.0f} | {m['ttft_ms']['p90']:.0f} | "
                  f"{m['itl_ms']['median']:.1f} | {m['itl_ms']['p90']:.1f} | {m['e2e_ms']['median']:.0f} | "
                  f"{m['e2e_ms']['p90']:.0f} |", flush=True)
    if args.rates:
        slo = {"ttft_ms": args.ttft_ms, "itl_ms": args.itl_ms, "e2e_ms": args.e2e_ms}
        print(f"\ntargets: {slo}, {args.attainment:.0%} of requests\n| rate req/s | requests | errors | goodput req/s "
              "| within targets | TTFT p90 ms | TPOT p90 ms | e2e p90 ms |\n|" + "---|" * 8)
        points = []
        for rate in (float(x) for x in args.rates.split(",")):
            m = asyncio.run(drive_rate(args.url, model, [args.prompt] * (args.requests + args.warmup), rate,
                                       args.burstiness, args.warmup, args.max_tokens, slo, args.attainment,
                                       api_key=args.api_key, ignore_eos=not args.respect_eos))
            points.append({"rate": rate, **m})
            print(f"| {rate:g} | {m['requests']} | {m['errors']} | {m['goodput']:.2f} | {m['slo_attainment']:.0%} | "
                  f"{m['ttft_ms']['p90']:.0f} | {m['tpot_ms']['p90']:.1f} | {m['e2e_ms']['p90']:.0f} |", flush=True)
        sat = rates.saturation(points)
        print(f"\nsaturation point: {sat['saturation_rate']} requests/s ({sat['note']})")
