"""Sweep grids: a config's axes crossed, extra points, pins; transformers and llama.cpp points."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from inferlab.backends.decode_step import architecture_problem
from inferlab.config import KERNEL_STEP_ARCHITECTURES, KERNEL_STEP_PRECISIONS, StudyConfig, fuse_problem
from inferlab.environment import missing_package
from inferlab.sweep.points import Point

INDUCTOR_SHORT = {
    "coordinate_descent_tuning": "cdt", "epilogue_fusion": "epilogue",
    "aggressive_fusion": "aggressive", "freezing": "frozen", "max_autotune_gemm": "gemm-autotune",
    "shape_padding": "padded",
}


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


def kernel_step_problem(
    c: dict[str, Any], fuse: str | None, gemv: str, arch: str | None
) -> str | None:
    """Why a point cannot run decode: kernels on a model of class `arch`, or None.

    arch None: not known before the download; the step checks it when made."""
    if arch is not None and (problem := architecture_problem(arch)):
        return problem
    if fuse == "qkv":
        return "decode: kernels fuses q, k and v itself: leave fuse_qkv unset"
    if KERNEL_STEP_ARCHITECTURES.get(arch) and fuse != "block":
        return "decode: kernels runs Phi's fused parallel block: it needs fuse_block: true"
    if KERNEL_STEP_ARCHITECTURES.get(arch) is False and fuse == "block":
        return (f"decode: kernels on {arch} fuses the layer's projections itself; fuse_block "
                "applies to Phi's parallel block only (leave it unset)")
    if c["batch_size"] != 1:
        return (f"decode: kernels takes batch_size: 1 (its kernels take one row), "
                f"got {c['batch_size']}")
    if c["precision"] not in KERNEL_STEP_PRECISIONS:
        return (f"decode: kernels takes precision: one of {', '.join(KERNEL_STEP_PRECISIONS)} "
                f"(the weights its GEMVs read), got {c['precision']}")
    if c["compile"]:
        return ("decode: kernels replaces the compiled step with its own kernels: "
                "it needs compile: false")
    if gemv != "default":
        return (f"decode: kernels runs its own GEMVs: gemv: {gemv} has no effect there "
                "(leave gemv unset)")
    return None


def keep(settings: dict[str, Any], pins: dict[str, Any]) -> bool:
    return all(k in settings and settings[k] == v for k, v in pins.items())


def hf_points(section: Any, model_dir: Path, pins: dict[str, Any], cores: int,
              arch: str | None = None) -> list[Point]:
    """The transformers grid of bench_cpu or bench_gpu plus extra points; arch: model class."""
    H, w = section.hf, section.workload
    if not H.enabled or pins.get("runtime") not in (None, "hf"):
        return []
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    threads = (H.threads or cores) if H.device == "cpu" else 0
    axes = {"precision": H.precisions, "batch_size": H.batch_sizes, "kv_cache": H.kv_cache,
            "attn": H.attn, "compile": H.compile}
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
        int4_gemv = c.pop("int4_gemv", None) or "rows"
        fuse_norm = bool(c.pop("fuse_norm", None))
        fuse_attention = bool(c.pop("fuse_attention", None))
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
        if int4_gemv != "rows":  # only then: older points keep their ids
            settings["int4_gemv"] = int4_gemv
        if fuse_norm:
            settings["fuse_norm"] = True
        if fuse_attention:
            settings["fuse_attention"] = True
        key = tuple(sorted(settings.items()))
        if key in seen or not keep(settings, pins):
            continue
        seen.add(key)
        if inductor and not (c["compile"] and fast):
            skip = ("inductor options apply to the compiled step of the fast and graph loops "
                    "(compile=true, decode)")
        elif c["compile"] and c["kv_cache"] != "static":
            skip = "torch.compile applies to the static KV cache only (kv_cache=static)"
        elif fast and c["kv_cache"] != "static":
            skip = f"the {decode} decode loop runs on a static KV cache (kv_cache=static)"
        elif gemv == "triton" and H.device != "cuda":
            skip = "gemv: triton runs Triton kernels, which need CUDA (device: cuda)"
        elif int4_gemv != "rows" and (decode != "kernels" or c["precision"] != "int4-inductor"):
            skip = (f"int4_gemv: {int4_gemv} picks decode: kernels' int4 GEMV: it applies to "
                    "decode: kernels with precision: int4-inductor")
        elif fuse_attention and decode != "kernels":
            skip = ("fuse_attention is decode: kernels' one-launch attention: it applies to "
                    "decode: kernels")
        elif fuse_norm and (decode != "kernels" or KERNEL_STEP_ARCHITECTURES.get(arch, False)):
            skip = ("fuse_norm puts Llama's RMSNorm in the prologue of decode: kernels' GEMVs: "
                    "it applies to decode: kernels on LlamaForCausalLM")
        elif decode == "kernels":
            skip = kernel_step_problem(c, fuse, gemv, arch) or missing_package(c["precision"])
        else:
            skip = fuse_problem(fuse, c["precision"]) or missing_package(c["precision"])
        name = f"hf-{c['precision']}-b{c['batch_size']}-{c['kv_cache']}-{c['attn']}"
        if c["compile"]:
            name += "-compiled" + ("" if mode == "reduce-overhead" else f"-{mode}")
            flags = [f.strip() for f in (inductor or "").split(",") if f.strip()]
            name += "".join(f"-{INDUCTOR_SHORT.get(f, f)}" for f in flags)
        if fuse:
            name += f"-{fuse}"
        if gemv != "default":
            name += f"-{gemv}"
        if int4_gemv != "rows":
            name += f"-{int4_gemv}"
        if fuse_norm:
            name += "-normfused"
        if fuse_attention:
            name += "-attn1"
        if fast:
            name += f"-{decode}"
        load = {"model_dir": str(model_dir)}
        # each graph-loop point gets a worker of its own, free of other points' compiled state:
        # on an H100 a second capture in one process failed in cuDNN attention
        # ("mha_graph.execute ... is_good()")
        group = (
            ("hf", c["precision"], c["attn"]) + ((f"fuse_{fuse}",) if fuse else ())
            + ((gemv,) if gemv != "default" else ())
            + ((name,) if decode in ("graph", "kernels") else ())
        )
        points.append(Point(name, "hf", group, settings, load, skip))
    return points


def llama_points(cfg: StudyConfig, pins: dict[str, Any], cores: int, L: Any = None,
                 w: Any = None, threads: list[int] | None = None) -> list[Point]:
    """The llama.cpp grid of `L` (default: bench_cpu's) and, on the CPU, its prompt cache."""
    runtime = pins.get("runtime")
    pins = {k: v for k, v in pins.items() if k != "runtime"}
    b = cfg.bench_cpu
    L, w = L or b.llama_cpp, w or b.workload
    # 0: every usable core
    n_threads = [t or cores for t in (threads or L.n_threads or default_threads(cores))]
    axes = {
        "quant": L.quants, "n_threads": list(dict.fromkeys(n_threads)), "n_batch": L.n_batch,
        "flash_attn": L.flash_attn, "kv_type": L.kv_type, "api": L.api,
        "prompt_tokens": [w.prompt_tokens],
    }
    combos = grid(axes, pins)
    first = {k: v[0] for k, v in axes.items()} | {"n_threads": cores}
    for extra in L.extra_points:
        combos.append(first | {k: v for k, v in vars(extra).items() if v is not None})
    points, seen = [], set()
    for c in combos:
        settings = {**c, "scenario": "latency", "new_tokens": w.new_tokens, "warmup": w.warmup,
                    "repetitions": w.repetitions, "n_ctx": L.n_ctx,
                    "n_gpu_layers": L.n_gpu_layers}
        key = tuple(sorted(settings.items()))
        if key in seen or not keep(settings, pins):
            continue
        seen.add(key)
        name = (f"{c['quant']}-t{c['n_threads']}-b{c['n_batch']}-fa{int(c['flash_attn'])}"
                f"-kv{c['kv_type']}-{c['api']}-p{c['prompt_tokens']}")
        points.append(_llama_point(cfg, name, settings))
    if L is b.llama_cpp and b.prompt_cache.enabled and runtime in (None, "prompt_cache"):
        pc = b.prompt_cache
        for mode in pc.modes:
            settings = {
                "scenario": "prefix_cache", "mode": mode, "quant": pc.quant,
                "n_threads": pc.n_threads or cores, "n_batch": L.n_batch[0],
                "flash_attn": L.flash_attn[0], "kv_type": L.kv_type[0], "api": "completion_stream",
                "prefix_tokens": pc.prefix_tokens, "suffix_tokens": pc.suffix_tokens,
                "requests": pc.requests, "new_tokens": pc.new_tokens, "n_ctx": L.n_ctx,
                "n_gpu_layers": L.n_gpu_layers,
            }
            if keep(settings, pins):
                name = f"prefix-{mode}-{pc.quant}-t{settings['n_threads']}"
                points.append(_llama_point(cfg, name, settings))
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
