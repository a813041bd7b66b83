"""Sweep grids: the cartesian product of a config's axes, extra points, pins from the command line."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from inferlab.bench.sweep import Point
from inferlab.config import fuse_problem
from inferlab.environment import missing_package

INDUCTOR_SHORT = {"coordinate_descent_tuning": "cdt", "epilogue_fusion": "epilogue", "aggressive_fusion": "aggressive",
                  "freezing": "frozen", "max_autotune_gemm": "gemm-autotune", "shape_padding": "padded"}


def default_threads(cores: int) -> list[int]:
    """1, 2, 4, ... below the core count, and the core count."""
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return [*out, cores]


def grid(axes: dict[str, list], pins: dict[str, Any]) -> list[dict[str, Any]]:
    axes = {k: [pins[k]] if k in pins else v for k, v in axes.items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def keep(settings: dict[str, Any], pins: dict[str, Any]) -> bool:
    return all(k in settings and settings[k] == v for k, v in pins.items())


def hf_points(section: Any, model_dir: Path, pins: dict[str, Any], cores: int) -> list[Point]:
    """The transformers grid of a benchmark section (bench_cpu or bench_gpu): main grid plus extra points."""
    H, w = section.hf, section.workload
    if not H.enabled or pins.get("runtime") not in (None, "hf"):
        return []
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    threads = (H.threads or cores) if H.device == "cpu" else 0
    axes = {"precision": H.precisions, "batch_size": H.batch_sizes, "kv_cache": H.kv_cache, "attn": H.attn,
            "compile": H.compile}
    combos = grid(axes, pins)
    first = {k: v[0] for k, v in axes.items()}
    for extra in H.extra_points:
        combos.append(first | {k: v for k, v in vars(extra).items() if v is not None})
    new_tokens = H.new_tokens or w.new_tokens
    points, seen = [], set()
    for c in combos:
        decode = c.pop("decode", None) or "generate"
        fast = decode != "generate"
        mode = c.pop("compile_mode", None) or H.compile_mode
        inductor = c.pop("inductor", None)
        fuse = "block" if c.pop("fuse_block", None) else None  # the block fusion includes q/k/v
        fuse = "qkv" if c.pop("fuse_qkv", None) and not fuse else fuse
        gemv = c.pop("gemv", None) or "default"
        settings = {**c, "scenario": "latency", "device": H.device, "n_threads": threads,
                    "compute_dtype": H.compute_dtype, "compile_mode": mode,
                    "prompt_tokens": w.prompt_tokens, "new_tokens": new_tokens, "warmup": w.warmup,
                    "repetitions": w.repetitions}
        if fast:  # only then: the ids of the generate() points stay what they were
            settings["decode"] = decode
        if inductor:
            settings["inductor"] = inductor
        if fuse:
            settings[f"fuse_{fuse}"] = True
        if gemv != "default":
            settings["gemv"] = gemv
        key = tuple(sorted(settings.items()))
        if key in seen or not keep(settings, pins):
            continue
        seen.add(key)
        if inductor and not (c["compile"] and fast):
            skip = "inductor options apply to the compiled step of the fast and graph loops (compile=true, decode)"
        elif c["compile"] and c["kv_cache"] != "static":
            skip = "torch.compile applies to the static KV cache only (kv_cache=static)"
        elif fast and c["kv_cache"] != "static":
            skip = f"the {decode} decode loop runs on a static KV cache (kv_cache=static)"
        elif gemv == "triton" and H.device != "cuda":
            skip = "gemv: triton runs Triton kernels, which need CUDA (device: cuda)"
        else:
            skip = fuse_problem(fuse, c["precision"]) or missing_package(c["precision"])
        name = f"hf-{c['precision']}-b{c['batch_size']}-{c['kv_cache']}-{c['attn']}"
        if c["compile"]:
            name += "-compiled" + ("" if mode == "reduce-overhead" else f"-{mode}")
            name += "".join(f"-{INDUCTOR_SHORT.get(f.strip(), f.strip())}" for f in (inductor or "").split(",")
                            if f.strip())
        if fuse:
            name += f"-{fuse}"
        if gemv != "default":
            name += f"-{gemv}"
        if fast:
            name += f"-{decode}"
        load = {"model_dir": str(model_dir)}
        # each graph-loop point gets a worker of its own: no compiled state of another point (dynamo's caches,
        # inductor's CUDA-graph trees, cuDNN attention plans) is left in the process that captures its graph. On an
        # H100, a second capture in one process failed in cuDNN attention ("mha_graph.execute ... is_good()").
        group = (("hf", c["precision"], c["attn"]) + ((f"fuse_{fuse}",) if fuse else ())
                 + ((gemv,) if gemv != "default" else ()) + ((name,) if decode == "graph" else ()))
        points.append(Point(name, "hf", group, settings, load, skip))
    return points
