"""Stage `serve_bench`: the served configuration under load, one record per level and per rate.

It starts the server on 127.0.0.1, drives it in a closed loop (concurrency levels), then in an
open loop (request rates, or fractions of the peak throughput), with prompt lengths drawn from a
distribution; the clients are serve/loadgen.py. The summary adds each configuration's saturation.
"""

from __future__ import annotations

import asyncio
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
from inferlab.config import StudyConfig, resolve, to_container
from inferlab.serve import rates
from inferlab.serve.loadgen import drive, drive_rate
from inferlab.stage import StageRun

log = logging.getLogger(__name__)

STAGE = "serve_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`inferlab serve` in a child process on 127.0.0.1 with the study's config."""

    def __init__(self, cfg: StudyConfig, overrides: dict[str, Any], log_path: Path,
                 startup_s: float = 300):
        self.cfg, self.overrides, self.log_path = cfg, overrides, log_path
        self.startup_s = startup_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerProcess:
        import httpx

        # the sections the server reads (the others take their defaults there)
        sections = ("model", "serve", "serve_bench", "paths")
        data = {k: to_container(getattr(self.cfg, k)) for k in sections}
        data["serve"].update({**self.overrides, "host": "127.0.0.1", "port": self.port,
                              "gradio": False})
        fd, path = tempfile.mkstemp(prefix="inferlab-serve-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(data, f)
        self.params = Path(path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        command = [sys.executable, "-m", "inferlab.serve.server", "--params", str(self.params)]
        self.proc = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + self.startup_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-800:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"the server exited with {self.proc.returncode} while "
                                   f"starting: {tail}")
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
    """Prompts of given token lengths from distinct windows of the pool (the model's tokenizer).

    The server re-tokenizes them; the records carry the count it reports."""

    def __init__(self, cfg: StudyConfig):
        from transformers import AutoTokenizer

        from inferlab.bench.workload import prompts

        self.tok = AutoTokenizer.from_pretrained(str(cfg.model_dir() / "hf"))
        sb = cfg.serve_bench
        encode = lambda t: self.tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
        # the pool, repeated if short
        self.pool = prompts(encode, resolve(sb.prompts), sb.prompt_tokens_max, 1)[0]
        while len(self.pool) < 4 * sb.prompt_tokens_max:
            self.pool = self.pool + self.pool
        self.cursor = 0

    def take(self, lengths: list[int]) -> list[str]:
        out = []
        for n in lengths:
            start = self.cursor % (len(self.pool) - n)
            # the next prompt starts elsewhere: no two alike, little prefix reuse
            self.cursor += 97
            out.append(self.tok.decode(self.pool[start:start + n]))
        return out


def draw_lengths(cfg: StudyConfig, n: int, context: int, seed: int) -> list[int]:
    sb = cfg.serve_bench
    high = max(1, min(sb.prompt_tokens_max, context - sb.max_tokens - 8))
    return rates.prompt_lengths(n, sb.prompt_tokens, sb.prompt_tokens_dist,
                                sb.prompt_tokens_spread, 1, high, np.random.default_rng(seed))


def served(server: ServerProcess) -> dict[str, Any]:
    """What the server says it serves (its engine's description, /v1/models)."""
    import httpx

    return httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0].get("inferlab", {})


def server_context(desc: dict[str, Any], cfg: StudyConfig) -> int:
    return int(desc.get("n_ctx") or desc.get("context_window") or cfg.serve.n_ctx)


def run(cfg: StudyConfig, stage: StageRun) -> None:
    from inferlab.serve.server import choose

    sb = cfg.serve_bench
    settings, source = choose(cfg)
    pins = cfg.pins(("runtime", "quant", "precision", "n_threads"))
    recommended = cfg.serve.source == "recommendation" and not source.startswith("serve.*")
    overrides: dict[str, Any] = {"source": "config"}
    if recommended and not pins:
        # the server serves the recommendation whole (batch size, KV cache, decode loop)
        overrides = {"source": "recommendation"}
    for k in ("runtime", "quant", "precision", "n_threads", "device"):
        if settings.get(k) is not None:
            overrides[k] = settings[k]
    overrides.update(pins)  # a pin on the command line wins, as in every sweep
    runtime = overrides["runtime"]
    what = overrides.get("quant") if runtime == "llama_cpp" else overrides.get("precision")
    log.info("serve_bench: %s %s (%s%s), concurrency %s, %d requests each; then rates %s",
             runtime, what, source, f"; pinned {pins}" if pins else "", sb.concurrency,
             sb.requests, sb.rates or f"{sb.rate_fractions} of the peak throughput")
    base = {"runtime": runtime, "quant" if runtime == "llama_cpp" else "precision": what,
            "max_tokens": sb.max_tokens, "prompt_tokens": sb.prompt_tokens,
            "prompt_tokens_dist": sb.prompt_tokens_dist,
            "prompt_tokens_spread": sb.prompt_tokens_spread, "served_from": source,
            **({"settings": settings} if overrides["source"] == "recommendation" else {})}
    closed = [(f"{runtime}-{what}-c{c}",
               {**base, "scenario": "serving", "concurrency": c, "requests": max(sb.requests, c)})
              for c in sb.concurrency]
    slo = {"ttft_ms": sb.slo.ttft_ms, "itl_ms": sb.slo.itl_ms, "e2e_ms": sb.slo.e2e_ms}
    steps = [("rate", r) for r in sb.rates] or [("rate_fraction", f) for f in sb.rate_fractions]
    opened = [(f"{runtime}-{what}-" + (f"r{v:g}" if k == "rate" else f"r{v:g}x"),
               {**base, "scenario": "serving-rate", k: v, "burstiness": sb.burstiness,
                "requests": sb.rate_requests, "warmup": sb.warmup, "slo": slo,
                "slo_attainment": sb.slo_attainment, "seed": sb.seed})
              for k, v in steps]
    name = cfg.serve.served_model_name or cfg.model.name
    try:
        with ServerProcess(cfg, overrides, resolve("outputs") / f"{STAGE}-server.log") as server:
            source_prompts = PromptSource(cfg)
            desc = served(server)
            log.info("serve_bench: the server serves %s", desc)
            context = server_context(desc, cfg)
            peak = 0.0
            n = max(sb.requests, max(sb.concurrency))
            prompts = source_prompts.take(draw_lengths(cfg, n, context, sb.seed))
            for i, (label, point) in enumerate(closed, 1):
                c = point["concurrency"]
                if sb.warmup:
                    asyncio.run(drive(server.url, name, prompts, 1, sb.warmup, sb.max_tokens))
                log.info("serve_bench: level %d/%d: concurrency %d, %d requests",
                         i, len(closed), c, point["requests"])
                try:
                    m = asyncio.run(drive(server.url, name, prompts, c, point["requests"],
                                          sb.max_tokens, timeout_s=sb.timeout_s))
                except Exception as e:
                    stage.record(label, point, status="failed",
                                 reason=f"{type(e).__name__}: {e}"[:2000])
                    continue
                m["server"], m["served"] = server.health, desc
                if m["ok"] == 0:
                    stage.record(label, point, status="failed", metrics=m,
                                 reason=f"every request failed: {m['error_examples'][:1]}")
                    continue
                stage.record(label, point, metrics=m)
                peak = max(peak, m["request_throughput"])
                log.info("serve_bench: c=%d: %.2f req/s, %.1f tokens/s, TTFT p50 %.0f ms, "
                         "ITL p50 %.1f ms, %d errors", c, m["request_throughput"],
                         m["token_throughput"], m["ttft_ms"]["median"], m["itl_ms"]["median"],
                         m["errors"])
            for i, (label, point) in enumerate(opened, 1):
                rate = point.get("rate") or point["rate_fraction"] * peak
                if not rate:
                    stage.record(label, point, status="skipped",
                                 reason="no rate: the concurrency sweep measured no "
                                        "throughput to take a fraction of (set serve_bench.rates)")
                    continue
                log.info("serve_bench: rate %d/%d: %.2f requests/s (burstiness %g), "
                         "%d + %d warm-up requests",
                         i, len(opened), rate, sb.burstiness, sb.rate_requests, sb.warmup)
                count = sb.warmup + sb.rate_requests
                prompts = source_prompts.take(draw_lengths(cfg, count, context, sb.seed + i))
                try:
                    m = asyncio.run(drive_rate(server.url, name, prompts, rate, sb.burstiness,
                                               sb.warmup, sb.max_tokens, slo, sb.slo_attainment,
                                               seed=sb.seed + i, timeout_s=sb.timeout_s))
                except Exception as e:
                    stage.record(label, point, status="failed",
                                 reason=f"{type(e).__name__}: {e}"[:2000])
                    continue
                m["server"], m["served"], m["peak_request_throughput"] = server.health, desc, peak
                stage.record(label, point, metrics=m)
                below = "" if m["meets_slo"] else " (below the attainment target)"
                log.info("serve_bench: %.2f req/s offered: goodput %.2f req/s, %.0f%% within "
                         "targets%s, TTFT p90 %.0f ms, TPOT p90 %.1f ms, e2e p90 %.0f ms, "
                         "%d errors", rate, m["goodput"], 100 * m["slo_attainment"], below,
                         m["ttft_ms"]["p90"], m["tpot_ms"]["p90"], m["e2e_ms"]["p90"], m["errors"])
    except Exception as e:
        # the server could not start (a missing GGUF, no CUDA): every point failed, said why
        for label, point in closed + opened:
            stage.record(label, point, status="failed", reason=f"{type(e).__name__}: {e}"[:2000])
    summarize_stage(cfg, stage.env["hardware"]["id"])


def summarize_stage(cfg: StudyConfig, hardware_id: str | None) -> dict[str, Any]:
    """The stage's aggregates plus each served configuration's saturation point, from the records.

    With a hardware_id, also the figure of latency against request rate for this machine and
    model, and a log line per configuration; None (`inferlab aggregate`): the metrics alone."""
    summary = write_aggregates(cfg, STAGE)
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in latest_points(stage_records(resolve(cfg.paths.results), STAGE)):
        if r.point.get("scenario") != "serving-rate" or r.status != "ok":
            continue
        served = f"{r.point['runtime']} {r.point.get('quant') or r.point.get('precision')}"
        kept = r.point.get("settings") or {}
        if kept.get("batch_size"):
            served += f" b{kept['batch_size']}"
        if kept.get("decode") not in (None, "generate"):
            served += f" {kept['decode']} loop"
        burst = float(r.point.get("burstiness", 1.0))
        if burst != 1.0:
            served += f" burstiness {burst:g}"
        m = r.metrics
        groups.setdefault((r.environment["hardware"]["id"], r.model["name"], served), []).append(
            {"rate": m["offered_rate"], "meets_slo": m["meets_slo"], "goodput": m["goodput"],
             "slo_attainment": m["slo_attainment"], "ttft_ms": _p(m["ttft_ms"]),
             "itl_ms": _p(m["tpot_ms"]), "e2e_ms": _p(m["e2e_ms"])})
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
    slo = {"ttft_ms": sb.slo.ttft_ms, "itl_ms": sb.slo.itl_ms, "e2e_ms": sb.slo.e2e_ms}
    rates.latency_figure(series, slo, resolve(cfg.paths.metrics) / "plots" / f"{STAGE}_rates.png")
    return summary


def _p(summary: dict[str, Any] | None) -> dict[str, float]:
    summary = summary or {}
    return {"p50": summary.get("median", math.nan), "p90": summary.get("p90", math.nan)}
