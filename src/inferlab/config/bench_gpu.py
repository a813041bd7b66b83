"""The bench_gpu stage (conf/bench_gpu/)."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import (
    ConfigError,
    check_all,
    check_choice,
    check_extras,
    check_non_empty,
    check_positive,
    check_range,
)
from inferlab.config.section import Section
from inferlab.config.sweeps import HFPoint, HFSweep, LlamaCppSweep, WorkloadConfig, check_inductor
from inferlab.config.vocab import (
    COMPILE_MODES,
    EVAL_TASKS,
    HF_ATTENTION,
    HF_DECODE,
    HF_GEMV,
    HF_KV_CACHES,
    HF_PRECISIONS,
    STEP_INT4_GEMVS,
)


@dataclass
class HFPrefixCacheConfig(Section):
    """Requests sharing a long prefix through transformers: the prefix's KV cache computed once and
    copied per request (reuse) against recomputing it every time (recompute)."""

    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: ["recompute", "reuse"])
    precision: str = "fp16"
    prefix_tokens: int = 512
    suffix_tokens: int = 16
    requests: int = 4
    new_tokens: int = 16

    def check(self, key: str) -> None:
        check_all(f"{key}.modes", self.modes, ("recompute", "reuse"))
        check_choice(f"{key}.precision", self.precision, HF_PRECISIONS)
        for name in ("requests", "prefix_tokens", "suffix_tokens", "new_tokens"):
            check_range(f"{key}.{name}", getattr(self, name), low=1)
        if self.enabled:
            check_non_empty(f"{key}.modes", self.modes, f"{key}.enabled")


@dataclass
class StreamingConfig(Section):
    """TextIteratorStreamer against plain generate: TTFT as the consumer sees it, and the overhead of streaming."""

    enabled: bool = True
    precision: str = "fp16"
    batch_size: int = 1

    def check(self, key: str) -> None:
        check_choice(f"{key}.precision", self.precision, HF_PRECISIONS)
        check_range(f"{key}.batch_size", self.batch_size, low=1)


@dataclass
class AssistedConfig(Section):
    """Prompt-lookup decoding (transformers' assisted generation without a draft model): candidate
    tokens are copied from the prompt where its last n-gram occurred before, and checked in one
    forward pass. Run on the summarization items of the evaluation set (the answer repeats the
    input), against the same requests decoded without lookup (lookup_tokens 0)."""

    enabled: bool = True
    precision: str = "fp16"
    # candidates per step; 0: plain decoding
    lookup_tokens: list[int] = field(default_factory=lambda: [0, 10])
    max_ngram: int = 2  # longest n-gram searched for in the prompt
    task: str = "summarization"
    requests: int = 8  # items of the task, one request each (batch 1), after one warm-up request
    max_prompt_tokens: int = 512  # longer inputs are cut (tokens of the model's tokenizer)
    new_tokens: int = 64  # fixed length

    def check(self, key: str) -> None:
        check_choice(f"{key}.precision", self.precision, HF_PRECISIONS)
        for n in self.lookup_tokens:
            check_range(f"{key}.lookup_tokens", n, low=0)
        check_range(f"{key}.max_ngram", self.max_ngram, low=1)
        check_choice(f"{key}.task", self.task, EVAL_TASKS)
        for name in ("requests", "max_prompt_tokens", "new_tokens"):
            check_range(f"{key}.{name}", getattr(self, name), low=1)
        if self.enabled:
            check_non_empty(f"{key}.lookup_tokens", self.lookup_tokens, f"{key}.enabled")


@dataclass
class ProfileConfig(Section):
    """Kernel-level profiles (torch.profiler) of decode steps: GPU kernel time, the gaps between
    kernels (launch latency) and the time the GPU waits for the host, per generated token. Each
    point names a configuration of the transformers sweep (unset fields take the grid's first
    values)."""

    enabled: bool = False
    new_tokens: int = 32  # decode steps profiled (after the configuration's warm-up)
    # also keep the Chrome trace (trace.json.gz, open in Perfetto) beside the record
    keep_trace: bool = False
    points: list[HFPoint] = field(default_factory=list)

    def check(self, key: str) -> None:
        check_range(f"{key}.new_tokens", self.new_tokens, low=2)
        check_extras(f"{key}.points", self.points,
                      {"precision": HF_PRECISIONS, "kv_cache": HF_KV_CACHES, "attn": HF_ATTENTION,
                       "compile_mode": COMPILE_MODES, "decode": HF_DECODE, "gemv": HF_GEMV,
                       "int4_gemv": STEP_INT4_GEMVS})
        for i, p in enumerate(self.points):
            check_inductor(f"{key}.points[{i}].inductor", p.inductor)


def _gpu_llama() -> LlamaCppSweep:
    return LlamaCppSweep(quants=["f16", "q8_0", "q4_k_m", "q4_0"], n_threads=[], flash_attn=[True], n_gpu_layers=-1)


@dataclass
class BenchGPUConfig(Section):
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    hf: HFSweep = field(default_factory=lambda: HFSweep(device="cuda", compute_dtype="fp16"))
    # llama.cpp on the GPU over the convert stage's GGUF files (a CUDA build of llama-cpp-python;
    # all layers offloaded with n_gpu_layers -1): the peer a user would pick instead, measured in
    # the same run
    llama_cpp: LlamaCppSweep = field(default_factory=_gpu_llama)
    prefix_cache: HFPrefixCacheConfig = field(default_factory=HFPrefixCacheConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    assisted: AssistedConfig = field(default_factory=AssistedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    bandwidth_gib: float = 2.0  # device-to-device copy buffer
    point_timeout_s: float = 900.0
    retry_failed: bool = False
    # GPUs measuring at once, one point each, each GPU's workers on its own share of the host's
    # cores: 0 every GPU of the host ($INFERLAB_GPUS, else $CUDA_VISIBLE_DEVICES, else nvidia-smi),
    # 1 one point at a time on the first (the "alone" figures `inferlab parallel-check` compares a
    # parallel sweep with)
    gpus: int = 0

    def __post_init__(self) -> None:
        check_range("bench_gpu.gpus", self.gpus, low=0)
        self.workload.check("bench_gpu.workload")
        self.hf.check("bench_gpu.hf")
        self.llama_cpp.check("bench_gpu.llama_cpp", self.workload)
        if self.llama_cpp.n_gpu_layers == 0:
            raise ConfigError("bench_gpu.llama_cpp.n_gpu_layers: 0 is not allowed on the GPU; "
                              "choose -1 (every layer) or a number of layers to offload")
        self.prefix_cache.check("bench_gpu.prefix_cache")
        self.streaming.check("bench_gpu.streaming")
        self.assisted.check("bench_gpu.assisted")
        self.profile.check("bench_gpu.profile")
        check_positive("bench_gpu.bandwidth_gib", self.bandwidth_gib)
        check_positive("bench_gpu.point_timeout_s", self.point_timeout_s)
