"""Stage `bench_cpu`: llama.cpp over the GGUF files, and transformers on the same CPU as baseline.

llama.cpp: threads, batch, flash attention, KV type, API, prompt cache; transformers:
precision, batch, KV cache."""

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
    arch = cfg.model_architecture()
    points += hf_points(cfg.bench_cpu, cfg.model_dir() / "hf", pins, cores, arch)
    if not points:
        log.warning("no points to run: the pins %s match nothing in the grid", pins)
    log.info("bench_cpu on %s (%d cores): %d points", stage.env["hardware"]["cpu"], cores,
             len(points))
    b = cfg.bench_cpu
    bandwidth = partial(cpu_bandwidth, b.bandwidth_gib)  # measured once the sweep is claimed
    run_sweep(stage, points, resolve(b.workload.prompts), bandwidth, b.point_timeout_s,
              b.retry_failed, [stage_file], _decode_rate, measure=registry.run)
    write_aggregates(cfg, STAGE)
