"""Stage `bench_gpu`: transformers + bitsandbytes on CUDA over precision x batch x KV cache x compile x attention,
prompt caching with a copied KV cache, and streaming. Without CUDA every point is recorded as skipped."""

from __future__ import annotations

import logging
import multiprocessing as mp
from pathlib import Path
from typing import Any

from inferlab.bench.aggregate import write_aggregates
from inferlab.bench.grid import hf_points, keep, usable_cores
from inferlab.bench.lock import claim_gpu, visible_gpus
from inferlab.bench.sweep import Point, run_sweep
from inferlab.config import StudyConfig, resolve
from inferlab.study import StageRun

log = logging.getLogger(__name__)

STAGE = "bench_gpu"


def cuda_problem() -> str | None:
    """None where a CUDA device can run the sweep; otherwise why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"no CUDA device on this machine (torch {torch.__version__}, torch.cuda.is_available() is False)"
    return None


def scenario_points(cfg: StudyConfig, pins: dict[str, Any]) -> list[Point]:
    b = cfg.bench_gpu
    if pins.get("runtime") not in (None, "hf"):
        return []
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    w, model_dir = b.workload, str(cfg.model_dir() / "hf")
    base = {"device": "cuda", "n_threads": 0, "compute_dtype": b.hf.compute_dtype, "compile_mode": b.hf.compile_mode,
            "attn": b.hf.attn[0], "compile": False}
    points = []
    if b.prefix_cache.enabled:
        pc = b.prefix_cache
        for mode in pc.modes:
            settings = {**base, "scenario": "prefix_cache", "mode": mode, "precision": pc.precision, "batch_size": 1,
                        "kv_cache": "dynamic", "prefix_tokens": pc.prefix_tokens, "suffix_tokens": pc.suffix_tokens,
                        "requests": pc.requests, "new_tokens": pc.new_tokens}
            if keep(settings, pins):
                points.append(Point(f"hf-{pc.precision}-prefix-{mode}", "hf", ("hf", pc.precision, base["attn"]),
                                    settings, {"model_dir": model_dir}))
    if b.streaming.enabled:
        s = b.streaming
        settings = {**base, "scenario": "streaming", "precision": s.precision, "batch_size": s.batch_size,
                    "kv_cache": b.hf.kv_cache[0], "prompt_tokens": w.prompt_tokens, "new_tokens": w.new_tokens,
                    "warmup": w.warmup, "repetitions": w.repetitions}
        if keep(settings, pins):
            points.append(Point(f"hf-{s.precision}-b{s.batch_size}-streaming", "hf", ("hf", s.precision, base["attn"]),
                                settings, {"model_dir": model_dir}))
    return points


def _bandwidth_in_child(gib: float) -> dict:
    """Measured in a child process, so this process never holds a CUDA context while workers run."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_bandwidth, (gib,))


def _bandwidth(gib: float) -> dict:
    from inferlab.bench.memory import gpu_bandwidth

    return gpu_bandwidth(gib)


def _decode_rate(metrics: dict) -> float | None:
    v = metrics.get("decode_tps", {}).get("median")
    return v if v is not None and v == v else None


def run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    # On a host with several GPUs and several sweep jobs at once (hydra/launcher=gpus), this job takes one GPU
    # for all its points; the workers it starts see only that one. Claimed before CUDA is first asked about.
    with claim_gpu() as gpu:
        if gpu is not None:
            stage.env["gpu"] = {"claimed": gpu, "of": visible_gpus()}  # in every record of this job
        _run(cfg, stage, stage_file)


def _run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    pins = cfg.pins()
    points = hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", pins, usable_cores()) + scenario_points(cfg, pins)
    problem = cuda_problem()
    if problem:
        log.warning("bench_gpu: %s; every point is recorded as skipped", problem)
        for p in points:
            p.skip = p.skip or problem
        bandwidth: dict = {}
    else:
        bandwidth = _bandwidth_in_child(cfg.bench_gpu.bandwidth_gib)
        log.info("device bandwidth (copy, read+write): %.0f GB/s", bandwidth["bandwidth_gbps"])
    log.info("bench_gpu: %d points", len(points))
    run_sweep(stage, points, resolve(cfg.bench_gpu.workload.prompts), bandwidth, cfg.bench_gpu.point_timeout_s,
              cfg.bench_gpu.retry_failed, [stage_file], _decode_rate)
    write_aggregates(cfg, STAGE)
