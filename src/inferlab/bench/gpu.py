"""Stage `bench_gpu`: transformers on CUDA over its grid, prompt caching, streaming and more.

Without CUDA every point is recorded as skipped."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from dataclasses import replace
from pathlib import Path
from typing import Any

from inferlab.aggregate import write_aggregates
from inferlab.bench import registry
from inferlab.bench.grid import hf_points, keep, llama_points
from inferlab.config import StudyConfig, resolve, usable_cores
from inferlab.environment import cuda_problem
from inferlab.stage import StageRun
from inferlab.sweep.locks import claim_gpu, visible_gpus
from inferlab.sweep.placement import Slot, host_slots
from inferlab.sweep.points import Point
from inferlab.sweep.run import run_sweep

log = logging.getLogger(__name__)

STAGE = "bench_gpu"


def scenario_points(cfg: StudyConfig, pins: dict[str, Any]) -> list[Point]:
    b = cfg.bench_gpu
    if pins.get("runtime") not in (None, "hf"):
        return []
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    w, model_dir = b.workload, str(cfg.model_dir() / "hf")
    base = {
        "device": "cuda", "n_threads": 0, "compute_dtype": b.hf.compute_dtype,
        "compile_mode": b.hf.compile_mode, "attn": b.hf.attn[0], "compile": False,
    }
    points = []
    if b.prefix_cache.enabled:
        pc = b.prefix_cache
        for mode in pc.modes:
            settings = {
                **base, "scenario": "prefix_cache", "mode": mode, "precision": pc.precision,
                "batch_size": 1, "kv_cache": "dynamic", "prefix_tokens": pc.prefix_tokens,
                "suffix_tokens": pc.suffix_tokens, "requests": pc.requests,
                "new_tokens": pc.new_tokens,
            }
            if keep(settings, pins):
                group = ("hf", pc.precision, base["attn"])
                points.append(Point(f"hf-{pc.precision}-prefix-{mode}", "hf", group, settings,
                                    {"model_dir": model_dir}))
    if b.streaming.enabled:
        s = b.streaming
        settings = {
            **base, "scenario": "streaming", "precision": s.precision, "batch_size": s.batch_size,
            "kv_cache": b.hf.kv_cache[0], "prompt_tokens": w.prompt_tokens,
            "new_tokens": w.new_tokens, "warmup": w.warmup, "repetitions": w.repetitions,
        }
        if keep(settings, pins):
            name = f"hf-{s.precision}-b{s.batch_size}-streaming"
            points.append(Point(name, "hf", ("hf", s.precision, base["attn"]), settings,
                                {"model_dir": model_dir}))
    if b.assisted.enabled:
        points += assisted_points(cfg, base, pins)
    if b.profile.enabled:
        points += profile_points(cfg, pins)
    return points


def assisted_points(cfg: StudyConfig, base: dict[str, Any], pins: dict[str, Any]) -> list[Point]:
    """Prompt-lookup decoding against plain decoding of the same requests, batch 1.

    The requests are the evaluation items of one task, in the evaluate stage's template."""
    import hashlib
    import json

    from inferlab.quality.dataset import load_items, prompt

    a = cfg.bench_gpu.assisted
    items = [i for i in load_items(cfg.evaluate.dataset) if i.task == a.task][: a.requests + 1]
    texts = [prompt(i, cfg.evaluate.templates) for i in items]
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
    points = []
    for n in a.lookup_tokens:
        settings = {
            **base, "scenario": "assisted", "precision": a.precision, "batch_size": 1,
            "kv_cache": "dynamic", "lookup_tokens": n, "max_ngram": a.max_ngram, "task": a.task,
            "requests": len(texts) - 1, "items": digest,
            "max_prompt_tokens": a.max_prompt_tokens, "new_tokens": a.new_tokens,
        }
        if keep(settings, pins):
            name = f"hf-{a.precision}-b1-{'lookup' + str(n) if n else 'plain'}-{a.task}"
            points.append(Point(name, "hf", ("hf", a.precision, base["attn"]), settings,
                                {"model_dir": str(cfg.model_dir() / "hf"), "texts": texts}))
    return points


def profile_points(cfg: StudyConfig, pins: dict[str, Any]) -> list[Point]:
    """One profile per configured transformers point, with its grid settings.

    The grid is reduced to its first point (plain generate(): the host-bound reference) and
    the profile's points."""
    b = cfg.bench_gpu
    hf = replace(b.hf, enabled=True, precisions=b.hf.precisions[:1],
                 batch_sizes=b.hf.batch_sizes[:1], kv_cache=b.hf.kv_cache[:1], attn=b.hf.attn[:1],
                 compile=b.hf.compile[:1], extra_points=list(b.profile.points),
                 new_tokens=b.profile.new_tokens)
    points = []
    arch = cfg.model_architecture()
    for p in hf_points(replace(b, hf=hf), cfg.model_dir() / "hf", pins, 0, arch):
        p.settings.update(scenario="profile", new_tokens=b.profile.new_tokens)
        p.name = p.name + "-profile"
        # its own capture (another length), in a process of its own
        if p.settings.get("decode") in ("graph", "kernels"):
            p.group = (*p.group, "profile")
        if b.profile.keep_trace:
            p.load["trace_dir"] = str(resolve(cfg.paths.results) / STAGE / "traces")
        points.append(p)
    return points


def gpu_llama_points(cfg: StudyConfig, pins: dict[str, Any], cores: int) -> list[Point]:
    """llama.cpp with its layers on the GPU, over the GGUF files of the convert stage."""
    L = cfg.bench_gpu.llama_cpp
    if not L.enabled or pins.get("runtime") not in (None, "llama_cpp"):
        return []
    points = llama_points(cfg, {**pins, "runtime": "llama_cpp"}, cores, L,
                          cfg.bench_gpu.workload, threads=L.n_threads or [cores])
    for p in points:
        p.settings["device"] = "cuda"
        p.name = f"gpu-{p.name}"
    return points


def _bandwidth_in_child(gib: float) -> dict:
    """Measured in a child process: this one never holds a CUDA context while workers run."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_bandwidth, (gib,))


def _bandwidth(gib: float) -> dict:
    from inferlab.sweep.memory import gpu_bandwidth

    return gpu_bandwidth(gib)


def _decode_rate(metrics: dict) -> float | None:
    v = metrics.get("decode_tps", {}).get("median")
    return v if v is not None and v == v else None


def one_gpu_per_job() -> bool:
    """Whether this is a job of `hydra/launcher=gpus`: several jobs at once, one GPU each."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("hydra/launcher") == "gpus"
    except (ImportError, ValueError):  # not under Hydra (DVC's --params path)
        return False


def gpu_slots(wanted: int, host: list[str], claimed: str | None = None) -> list[Slot]:
    """The GPUs this sweep measures on, each with its share of the host's cores.

    The one a job claimed, else the first `wanted` of the host's (0: all). A GPU's share is
    the same however many run at once."""
    if not host:
        return []
    if wanted > len(host):
        raise SystemExit(
            f"bench_gpu.gpus: {wanted} GPUs at once asked for, but this host offers {len(host)} "
            f"({','.join(host)}); choose 0 (every GPU) or at most {len(host)}"
        )
    shares = host_slots(host)
    used = [claimed] if claimed is not None else host[:wanted or len(host)]
    return [shares[g] for g in used]


def run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    # Under hydra/launcher=gpus several sweep jobs run at once, each on one GPU; otherwise
    # the sweep itself spreads its points over the host's GPUs (bench_gpu.gpus).
    host = visible_gpus()
    with claim_gpu(host) if one_gpu_per_job() else contextlib.nullcontext() as gpu:
        if gpu is not None:
            # in every record of this job
            stage.add_environment("gpu", {"claimed": gpu, "of": host})
        _run(cfg, stage, stage_file, host, gpu)


def _run(cfg: StudyConfig, stage: StageRun, stage_file: Path, host: list[str],
         claimed: str | None) -> None:
    pins = cfg.pins()
    problem = cuda_problem()
    slots = [] if problem else gpu_slots(cfg.bench_gpu.gpus, host, claimed)
    for s in slots:
        cpus = s.describe(len(slots))["cpus"] or "all"
        where = s.source + (f", NUMA node {s.numa}" if s.numa else "")
        log.info("GPU %s: its workers on cores %s (%d; %s)", s.gpu, cpus, len(s.cpus), where)
    # the grid's thread counts (llama.cpp's host threads) are a GPU's share of the cores
    pinned = slots and all(s.cpus for s in slots)
    cores = min(len(s.cpus) for s in slots) if pinned else usable_cores()
    arch = cfg.model_architecture()
    points = (
        hf_points(cfg.bench_gpu, cfg.model_dir() / "hf", pins, cores, arch)
        + gpu_llama_points(cfg, pins, cores) + scenario_points(cfg, pins)
    )
    if problem:
        log.warning("bench_gpu: %s; every point is recorded as skipped", problem)
        for p in points:
            p.skip = problem

    def bandwidth() -> dict:  # once the sweep is claimed (a refused second start measures nothing)
        if problem:
            return {}
        b = _bandwidth_in_child(cfg.bench_gpu.bandwidth_gib)
        log.info("device bandwidth (copy, read+write): %.0f GB/s", b["bandwidth_gbps"])
        return b

    log.info("bench_gpu: %d points", len(points))
    b = cfg.bench_gpu
    run_sweep(stage, points, resolve(b.workload.prompts), bandwidth, b.point_timeout_s,
              b.retry_failed, [stage_file], _decode_rate, slots or None,
              measure=registry.run)
    write_aggregates(cfg, STAGE)
