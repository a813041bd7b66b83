"""Sweep axes shared by bench_cpu, bench_gpu and evaluate: workload, llama.cpp and transformers points."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferlab.config.checks import (
    check_all,
    check_choice,
    check_extras,
    check_fits,
    check_folder,
    check_non_empty,
    check_range,
    check_threads,
)
from inferlab.config.section import Section
from inferlab.config.vocab import (
    BNB_PRECISIONS,
    COMPILE_MODES,
    DECODE_LOOPS,
    HF_ATTENTION,
    HF_DECODE,
    HF_GEMV,
    HF_KV_CACHES,
    HF_PRECISIONS,
    INDUCTOR_OPTIONS,
    KV_TYPES,
    LLAMA_APIS,
    PROMPT_CACHE_MODES,
    QUANT_TYPES,
    STEP_INT4_GEMVS,
)


def fuse_problem(fuse: str | None, precision: str) -> str | None:
    """Why a fusion (fuse_qkv, fuse_block) cannot apply to a precision, or None."""
    if fuse and precision in BNB_PRECISIONS:
        return f"fuse_{fuse}: bitsandbytes quantizes the weights while loading, before they can be fused"
    return None


@dataclass
class WorkloadConfig(Section):
    prompts: str = "data/prompts"  # folder of the texts prompts are cut from
    prompt_tokens: int = 64  # prompt length in tokens of the model's tokenizer (exact)
    new_tokens: int = 128  # generated tokens per sequence: fixed, EOS does not end a request early
    warmup: int = 1  # requests run after the cold one and excluded from the figures
    repetitions: int = 3  # measured requests per point (median, p90, p99, stdev over them)

    def check(self, key: str) -> None:
        for name in ("prompt_tokens", "new_tokens", "repetitions"):
            check_range(f"{key}.{name}", getattr(self, name), low=1)
        check_range(f"{key}.warmup", self.warmup, low=0)
        check_folder(f"{key}.prompts", self.prompts)


@dataclass
class LlamaCppPoint(Section):
    """One extra point of the llama.cpp sweep; unset fields take the grid's first value (threads: all cores)."""

    quant: str | None = None
    n_threads: int | None = None
    n_batch: int | None = None
    flash_attn: bool | None = None
    kv_type: str | None = None
    api: str | None = None
    prompt_tokens: int | None = None


@dataclass
class LlamaCppSweep(Section):
    enabled: bool = True
    quants: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"])
    # empty: 1, 2, 4, ... up to the usable cores; 0: all cores
    n_threads: list[int] = field(default_factory=list)
    # prompt tokens per llama_decode call
    n_batch: list[int] = field(default_factory=lambda: [512])
    flash_attn: list[bool] = field(default_factory=lambda: [False])
    kv_type: list[str] = field(default_factory=lambda: ["f16"])  # KV-cache element type
    # generate: token iterator; completion(_stream)
    api: list[str] = field(default_factory=lambda: ["generate"])
    n_ctx: int = 2048
    n_gpu_layers: int = 0  # layers offloaded to a GPU (a CUDA build of llama-cpp-python); 0 on CPU
    # one-axis-at-a-time variations
    extra_points: list[LlamaCppPoint] = field(default_factory=list)

    def check(self, key: str, workload: WorkloadConfig) -> None:
        check_all(f"{key}.quants", self.quants, ("f32", "f16", *QUANT_TYPES))
        check_all(f"{key}.kv_type", self.kv_type, KV_TYPES)
        check_all(f"{key}.api", self.api, LLAMA_APIS)
        for t in self.n_threads:
            check_threads(f"{key}.n_threads", t, zero=True)
        for b in self.n_batch:
            check_range(f"{key}.n_batch", b, low=1)
        check_range(f"{key}.n_ctx", self.n_ctx, low=1)
        check_extras(key, self.extra_points,
                      {"quant": ("f32", "f16", *QUANT_TYPES), "kv_type": KV_TYPES, "api": LLAMA_APIS})
        for i, p in enumerate(self.extra_points):
            if p.n_threads is not None:
                check_threads(f"{key}.extra_points[{i}].n_threads", p.n_threads, zero=False)
            for name in ("n_batch", "prompt_tokens"):
                if getattr(p, name) is not None:
                    check_range(f"{key}.extra_points[{i}].{name}", getattr(p, name), low=1)
        if not self.enabled:
            return
        for name in ("quants", "n_batch", "flash_attn", "kv_type", "api"):
            check_non_empty(f"{key}.{name}", getattr(self, name), f"{key}.enabled")
        wkey = key.rsplit(".", 1)[0] + ".workload"
        prompts = {(wkey, workload.prompt_tokens)} | {(f"{key}.extra_points[{i}]", p.prompt_tokens)
                                                      for i, p in enumerate(self.extra_points) if p.prompt_tokens}
        for where, n in sorted(prompts, key=lambda x: -x[1])[:1]:  # the longest prompt decides
            check_fits(f"{where}.prompt_tokens", {"prompt": n, "new": workload.new_tokens}, f"{key}.n_ctx",
                       self.n_ctx)


@dataclass
class PromptCacheConfig(Section):
    """Requests sharing a long prefix, through llama.cpp with each prompt-cache mode."""

    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: list(PROMPT_CACHE_MODES))
    quant: str = "q4_k_m"
    n_threads: int = 0  # 0: all usable cores
    prefix_tokens: int = 512
    suffix_tokens: int = 16
    requests: int = 4  # requests after the first (which fills the cache)
    new_tokens: int = 8

    def check(self, key: str, n_ctx_key: str, n_ctx: int) -> None:
        check_all(f"{key}.modes", self.modes, PROMPT_CACHE_MODES)
        check_choice(f"{key}.quant", self.quant, ("f32", "f16", *QUANT_TYPES))
        for name in ("requests", "prefix_tokens", "suffix_tokens", "new_tokens"):
            check_range(f"{key}.{name}", getattr(self, name), low=1)
        check_threads(f"{key}.n_threads", self.n_threads)
        if self.enabled:
            check_non_empty(f"{key}.modes", self.modes, f"{key}.enabled")
            check_fits(f"{key}.prefix_tokens", {"prefix": self.prefix_tokens, "suffix": self.suffix_tokens,
                                                "new": self.new_tokens}, n_ctx_key, n_ctx)


@dataclass
class HFPoint(Section):
    """One extra point of the transformers sweep; unset fields take the grid's first value."""

    precision: str | None = None
    batch_size: int | None = None
    kv_cache: str | None = None
    attn: str | None = None
    compile: bool | None = None
    compile_mode: str | None = None  # torch.compile mode (default: the sweep's compile_mode)
    # generate (transformers' generate), fast (static cache, compiled step, no per-token sync),
    # graph (the step and its bookkeeping as one CUDA graph, replayed per token) or kernels (the
    # graph loop over a hand-written step, four Triton kernels per layer: backends/decode_step.py)
    decode: str | None = None
    # inductor options for this point's compile, comma-separated (INDUCTOR_OPTIONS), on top of
    # its compile mode's own
    inductor: str | None = None
    # one matmul for the attention's q, k and v projections (backends/fuse.py); not with
    # bitsandbytes, which quantizes while loading
    fuse_qkv: bool | None = None
    # a parallel decoder layer (Phi's) as two matmuls, [q;k;v;fc1] and [dense|fc2], each as
    # torch.mm + bias so inductor can write its batch-1 kernel (backends/fuse.py)
    fuse_block: bool | None = None
    # default, or triton: batch-1 projections in 16 bits and int4-inductor's run the Triton
    # kernels of backends/kernels.py (CUDA)
    gemv: str | None = None
    # decode: kernels over int4-inductor: its int4 GEMV kernel, rows (default) or splitk
    int4_gemv: str | None = None
    # decode: kernels on Llama: each RMSNorm in the prologue of the GEMV that reads it (two
    # launches per layer fewer)
    fuse_norm: bool | None = None
    # decode: kernels: attention in one launch, a program per query head over the whole cache,
    # not programs per head and chunk plus a combine (one launch per layer fewer; short caches)
    fuse_attention: bool | None = None


def loop_path(s: dict[str, Any]) -> str | None:
    """The decode loop a transformers point's tokens come from, in words (None: generate()). A
    loop's quality is scored through its own step, so this is part of a quality configuration's
    identity."""
    decode = s.get("decode") or "generate"
    if decode not in DECODE_LOOPS:
        return None
    parts = [f"{decode} loop"]
    if s.get("compile"):
        parts.append(f"compiled {s.get('compile_mode') or 'reduce-overhead'}")
    if s.get("inductor"):
        parts.append(f"inductor {s['inductor']}")
    if s.get("fuse_block") or s.get("fuse_qkv"):
        parts.append("fused block" if s.get("fuse_block") else "fused qkv")
    if (s.get("gemv") or "default") != "default":
        parts.append(f"{s['gemv']} GEMV")
    parts += [name.replace("_", " ") for name in ("fuse_norm", "fuse_attention") if s.get(name)]
    if s.get("int4_gemv") not in (None, "rows"):
        parts.append(f"int4 GEMV {s['int4_gemv']}")
    return ", ".join([*parts, f"batch {s.get('batch_size') or 1}"])


def check_inductor(key: str, value: str | None) -> None:
    for flag in (value or "").split(","):
        if flag.strip():
            check_choice(key, flag.strip(), INDUCTOR_OPTIONS)


@dataclass
class HFSweep(Section):
    enabled: bool = True
    device: str = "cpu"  # cpu or cuda
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    kv_cache: list[str] = field(default_factory=lambda: ["dynamic"])  # none = use_cache=False
    attn: list[str] = field(default_factory=lambda: ["sdpa"])
    # torch.compile (static cache only)
    compile: list[bool] = field(default_factory=lambda: [False])
    compile_mode: str = "reduce-overhead"
    compute_dtype: str = "bf16"  # compute dtype of bitsandbytes 4-bit weights
    threads: int = 0  # torch threads on CPU; 0: all usable cores
    new_tokens: int | None = None  # overrides workload.new_tokens for this runtime
    extra_points: list[HFPoint] = field(default_factory=list)

    def check(self, key: str) -> None:
        check_choice(f"{key}.device", self.device, ("cpu", "cuda"))
        check_all(f"{key}.precisions", self.precisions, HF_PRECISIONS)
        check_all(f"{key}.kv_cache", self.kv_cache, HF_KV_CACHES)
        check_all(f"{key}.attn", self.attn, HF_ATTENTION)
        check_choice(f"{key}.compile_mode", self.compile_mode, COMPILE_MODES)
        check_choice(f"{key}.compute_dtype", self.compute_dtype, ("fp16", "bf16", "fp32"))
        for b in self.batch_sizes:
            check_range(f"{key}.batch_sizes", b, low=1)
        check_threads(f"{key}.threads", self.threads)
        if self.new_tokens is not None:
            check_range(f"{key}.new_tokens", self.new_tokens, low=1)
        if self.enabled:
            for name in ("precisions", "batch_sizes", "kv_cache", "attn", "compile"):
                check_non_empty(f"{key}.{name}", getattr(self, name), f"{key}.enabled")
        check_extras(key, self.extra_points,
                      {"precision": HF_PRECISIONS, "kv_cache": HF_KV_CACHES, "attn": HF_ATTENTION,
                       "compile_mode": COMPILE_MODES, "decode": HF_DECODE, "gemv": HF_GEMV,
                       "int4_gemv": STEP_INT4_GEMVS})
        for i, p in enumerate(self.extra_points):
            check_inductor(f"{key}.extra_points[{i}].inductor", p.inductor)
