"""Stage `bench_cpu`: llama.cpp over the GGUF files (threads, batch, flash attention, KV type, API, prompt cache)
and transformers on the same CPU as the baseline (precision, batch, KV cache, bitsandbytes)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

from inferlab.aggregate import write_aggregates
from inferlab.bench.grid import default_threads, grid, hf_points, keep
from inferlab.bench.memory import cpu_bandwidth
from inferlab.bench.sweep import Point, run_sweep
from inferlab.config import StudyConfig, resolve, usable_cores
from inferlab.stage import StageRun

log = logging.getLogger(__name__)

STAGE = "bench_cpu"


def llama_points(cfg: StudyConfig, pins: dict[str, Any], cores: int, L: Any = None, w: Any = None,
                 threads: list[int] | None = None) -> list[Point]:
    """The llama.cpp grid of `L` (default: bench_cpu.llama_cpp) and, for the CPU sweep, its prompt-cache
    scenario."""
    runtime = pins.get("runtime")
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    b = cfg.bench_cpu
    L, w = L or b.llama_cpp, w or b.workload
    n_threads = [t or cores for t in (threads or L.n_threads or default_threads(cores))]  # 0: every usable core
    axes = {"quant": L.quants, "n_threads": list(dict.fromkeys(n_threads)), "n_batch": L.n_batch,
            "flash_attn": L.flash_attn, "kv_type": L.kv_type, "api": L.api, "prompt_tokens": [w.prompt_tokens]}
    combos = grid(axes, pins)
    first = {k: v[0] for k, v in axes.items()} | {"n_threads": cores}
    for extra in L.extra_points:
        combos.append(first | {k: v for k, v in vars(extra).items() if v is not None})
    points, seen = [], set()
    for c in combos:
        settings = {**c, "scenario": "latency", "new_tokens": w.new_tokens, "warmup": w.warmup,
                    "repetitions": w.repetitions, "n_ctx": L.n_ctx, "n_gpu_layers": L.n_gpu_layers}
        key = tuple(sorted(settings.items()))
        if key in seen or not keep(settings, pins):
            continue
        seen.add(key)
        name = (f"{c['quant']}-t{c['n_threads']}-b{c['n_batch']}-fa{int(c['flash_attn'])}-kv{c['kv_type']}"
                f"-{c['api']}-p{c['prompt_tokens']}")
        points.append(_llama_point(cfg, name, settings))
    if L is b.llama_cpp and b.prompt_cache.enabled and runtime in (None, "prompt_cache"):
        pc = b.prompt_cache
        for mode in pc.modes:
            settings = {"scenario": "prefix_cache", "mode": mode, "quant": pc.quant,
                        "n_threads": pc.n_threads or cores, "n_batch": L.n_batch[0], "flash_attn": L.flash_attn[0],
                        "kv_type": L.kv_type[0], "api": "completion_stream", "prefix_tokens": pc.prefix_tokens,
                        "suffix_tokens": pc.suffix_tokens, "requests": pc.requests, "new_tokens": pc.new_tokens,
                        "n_ctx": L.n_ctx, "n_gpu_layers": L.n_gpu_layers}
            if keep(settings, pins):
                points.append(_llama_point(cfg, f"prefix-{mode}-{pc.quant}-t{settings['n_threads']}", settings))
    if runtime == "hf":
        return []
    if runtime == "prompt_cache":
        return [p for p in points if p.settings["scenario"] == "prefix_cache"]
    if runtime == "llama_cpp":
        return [p for p in points if p.settings["scenario"] == "latency"]
    return points


def _llama_point(cfg: StudyConfig, name: str, settings: dict[str, Any]) -> Point:
    path = cfg.gguf_path(settings["quant"])
    if settings["kv_type"] not in ("f16", "f32") and not settings["flash_attn"]:
        skip = "llama.cpp quantizes the V cache only with flash attention (flash_attn=true)"
    else:
        skip = cfg.missing_gguf(settings["quant"])
    load = {"model_path": str(path)}
    return Point(name, "llama_cpp", ("llama_cpp", settings["quant"]), settings, load, skip)


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
    points += hf_points(cfg.bench_cpu, cfg.model_dir() / "hf", pins, cores)
    if not points:
        log.warning("no points to run: the pins %s match nothing in the grid", pins)
    log.info("bench_cpu on %s (%d cores): %d points", stage.env["hardware"]["cpu"], cores, len(points))
    bandwidth = partial(cpu_bandwidth, cfg.bench_cpu.bandwidth_gib)  # measured once the sweep is claimed
    run_sweep(stage, points, resolve(cfg.bench_cpu.workload.prompts), bandwidth, cfg.bench_cpu.point_timeout_s,
              cfg.bench_cpu.retry_failed, [stage_file], _decode_rate)
    write_aggregates(cfg, STAGE)
