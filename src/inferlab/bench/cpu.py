"""Stage `bench_cpu`: llama.cpp over the GGUF files (threads, batch, flash attention, KV type, API, prompt cache)
and transformers on the same CPU as the baseline (precision, batch, KV cache, bitsandbytes)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from inferlab.aggregate import write_aggregates
from inferlab.bench import registry
from inferlab.bench.grid import hf_points, llama_points
from inferlab.config import StudyConfig, resolve, usable_cores
from inferlab.stage import StageRun
from inferlab.sweep.memory import cpu_bandwidth
from inferlab.sweep.run import run_sweep

log = logging.getLogger(__name__)

STAGE = "bench_cpu"


def _decode_rate(metrics: dict) -> float | None:
    for key in ("decode_tps", "llama_decode_tps"):
        v = metrics.get(key, {}).get("median")
        if v is not None and v == v:
            return v
    return None


def run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    cores = usable_cores()
    pins = cfg.pins()
    points = []
    if cfg.bench_cpu.llama_cpp.enabled or cfg.bench_cpu.prompt_cache.enabled:
        points += [p for p in llama_points(cfg, pins, cores)
                   if cfg.bench_cpu.llama_cpp.enabled or p.settings["scenario"] == "prefix_cache"]
    points += hf_points(cfg.bench_cpu, cfg.model_dir() / "hf", pins, cores, cfg.model_architecture())
    if not points:
        log.warning("no points to run: the pins %s match nothing in the grid", pins)
    log.info("bench_cpu on %s (%d cores): %d points", stage.env["hardware"]["cpu"], cores, len(points))
    bandwidth = partial(cpu_bandwidth, cfg.bench_cpu.bandwidth_gib)  # measured once the sweep is claimed
    run_sweep(stage, points, resolve(cfg.bench_cpu.workload.prompts), bandwidth, cfg.bench_cpu.point_timeout_s,
              cfg.bench_cpu.retry_failed, [stage_file], _decode_rate, measure=registry.run)
    write_aggregates(cfg, STAGE)
