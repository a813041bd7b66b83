"""The server under load: N concurrent streaming clients, a bounded number of requests, and what they saw.

Per request the client clocks TTFT (first text chunk), the gaps between chunks (ITL) and end-to-end latency,
and takes the token counts from the server's usage chunk. Stage `serve_bench` starts the server on 127.0.0.1,
drives it once per concurrency level and writes one record per level.

    inferlab loadtest --url http://127.0.0.1:8000 --concurrency 1,4 --requests 16 --max-tokens 32
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from inferlab.bench.aggregate import write_aggregates
from inferlab.bench.stats import summarize
from inferlab.config import StudyConfig, resolve, to_container
from inferlab.study import StageRun

log = logging.getLogger(__name__)

STAGE = "serve_bench"


async def _one(client, url: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first, last, gaps, tokens, prompt_tokens = None, None, [], None, None
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"ok": False, "status": r.status_code, "error": r.text[:200]}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 200, "error": chunk["error"].get("message", "")[:200]}
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
        return {"ok": False, "status": 0, "error": f"{type(e).__name__}: {e}"[:200]}
    end = time.perf_counter()
    return {"ok": True, "ttft_s": None if first is None else first - t0, "gaps": gaps, "e2e_s": end - t0,
            "tokens": tokens or 0, "prompt_tokens": prompt_tokens or 0}


async def drive(url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
                api_key: str | None = None, timeout_s: float = 900) -> dict[str, Any]:
    """`requests` streamed greedy completions from `concurrency` clients at once; the figures of the run."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results: list[dict[str, Any]] = []
    todo = iter(range(requests))

    async def client_loop(client) -> None:
        for i in todo:
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
            results.append(await _one(client, url, body, headers))

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
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
        "wall_s": wall, "request_throughput": len(ok) / wall, "token_throughput": tokens / wall,
        "completion_tokens": tokens, "prompt_tokens_mean": sum(r["prompt_tokens"] for r in ok) / max(len(ok), 1),
        "ttft_ms": summarize(ms([r["ttft_s"] for r in ok if r["ttft_s"] is not None]), "ms").to_dict(),
        "itl_ms": summarize(ms([g for r in ok for g in r["gaps"]]), "ms").to_dict(),
        "e2e_ms": summarize(ms([r["e2e_s"] for r in ok]), "ms").to_dict(),
        "decode_tps": summarize([(r["tokens"] - 1) / (r["e2e_s"] - r["ttft_s"]) for r in ok
                                 if r["ttft_s"] is not None and r["tokens"] > 1 and r["e2e_s"] > r["ttft_s"]],
                                "tokens/s").to_dict(),
    }


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

        data = to_container(self.cfg)
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


def prompts_text(cfg: StudyConfig, n: int) -> list[str]:
    """n prompts of serve_bench.prompt_tokens tokens of the model's tokenizer (the server re-tokenizes them; the
    records carry the count it reports)."""
    from transformers import AutoTokenizer

    from inferlab.bench.workload import prompts

    tok = AutoTokenizer.from_pretrained(str(cfg.model_dir() / "hf"))
    ids = prompts(lambda t: tok(t, add_special_tokens=False)["input_ids"], resolve(cfg.serve_bench.prompts),
                  cfg.serve_bench.prompt_tokens, n)
    return [tok.decode(x) for x in ids]


def run(cfg: StudyConfig, stage: StageRun) -> None:
    from inferlab.serve.server import choose

    sb = cfg.serve_bench
    settings, source = choose(cfg)
    pins = {k: v for k, v in cfg.pins().items() if k in ("runtime", "quant", "precision", "n_threads")}
    overrides: dict[str, Any] = {"source": "config"}
    for k in ("runtime", "quant", "precision", "n_threads", "device"):
        if settings.get(k) is not None:
            overrides[k] = settings[k]
    overrides.update(pins)  # a pin on the command line wins, as in every sweep
    runtime = overrides["runtime"]
    what = overrides.get("quant") if runtime == "llama_cpp" else overrides.get("precision")
    log.info("serve_bench: %s %s (%s%s), concurrency %s, %d requests each", runtime, what, source,
             f"; pinned {pins}" if pins else "", sb.concurrency, sb.requests)
    base = {"scenario": "serving", "runtime": runtime, "quant" if runtime == "llama_cpp" else "precision": what,
            "max_tokens": sb.max_tokens, "prompt_tokens": sb.prompt_tokens, "served_from": source}
    try:
        with ServerProcess(cfg, overrides, resolve("outputs") / f"{STAGE}-server.log") as server:
            prompts = prompts_text(cfg, max(sb.requests, max(sb.concurrency)))
            name = cfg.serve.served_model_name or cfg.model.name
            for i, c in enumerate(sb.concurrency, 1):
                point = {**base, "concurrency": c, "requests": max(sb.requests, c)}
                label = f"{runtime}-{what}-c{c}"
                if sb.warmup:
                    asyncio.run(drive(server.url, name, prompts, 1, sb.warmup, sb.max_tokens))
                log.info("serve_bench: level %d/%d: concurrency %d, %d requests", i, len(sb.concurrency), c,
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
                log.info("serve_bench: c=%d: %.1f req/s, %.1f tokens/s, TTFT p50 %.0f ms, ITL p50 %.1f ms, "
                         "%d errors", c, m["request_throughput"], m["token_throughput"], m["ttft_ms"]["median"],
                         m["itl_ms"]["median"], m["errors"])
    except Exception as e:  # the server could not start (a missing GGUF, no CUDA): every level failed, said why
        for c in sb.concurrency:
            stage.record(f"{runtime}-{what}-c{c}", {**base, "concurrency": c, "requests": max(sb.requests, c)},
                         status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
    write_aggregates(cfg, STAGE)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="inferlab loadtest", description="drive a running server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("INFERLAB_API_KEY"))
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt", default="Explain in one paragraph why batching raises throughput.")
    args = p.parse_args(argv)
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
    print("| concurrency | requests | errors | req/s | tokens/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | "
          "ITL p90 ms | e2e p50 ms | e2e p90 ms |\n|" + "---|" * 11)
    for c in (int(x) for x in args.concurrency.split(",")):
        m = asyncio.run(drive(args.url, model, [args.prompt], c, max(args.requests, c), args.max_tokens,
                              args.api_key))
        print(f"| {c} | {m['requests']} | {m['errors']} | {m['request_throughput']:.2f} | "
              f"{m['token_throughput']:.1f} | {m['ttft_ms']['median']:.0f} | {m['ttft_ms']['p90']:.0f} | "
              f"{m['itl_ms']['median']:.1f} | {m['itl_ms']['p90']:.1f} | {m['e2e_ms']['median']:.0f} | "
              f"{m['e2e_ms']['p90']:.0f} |", flush=True)
    return 0
