"""The bench_cpu stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import check_positive
from inferlab.config.section import Section
from inferlab.config.sweeps import HFSweep, LlamaCppSweep, PromptCacheConfig, WorkloadConfig


@dataclass
class BenchCPUConfig(Section):
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    llama_cpp: LlamaCppSweep = field(default_factory=LlamaCppSweep)
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    hf: HFSweep = field(default_factory=HFSweep)
    # buffer size of the bandwidth measurement (far larger than the caches)
    bandwidth_gib: float = 1.0
    # a point still running after this is stopped and recorded as failed
    point_timeout_s: float = 1800.0
    retry_failed: bool = False  # on resume, run failed points again

    def __post_init__(self) -> None:
        self.workload.check("bench_cpu.workload")
        self.llama_cpp.check("bench_cpu.llama_cpp", self.workload)
        self.prompt_cache.check("bench_cpu.prompt_cache", "bench_cpu.llama_cpp.n_ctx", self.llama_cpp.n_ctx)
        self.hf.check("bench_cpu.hf")
        check_positive("bench_cpu.bandwidth_gib", self.bandwidth_gib)
        check_positive("bench_cpu.point_timeout_s", self.point_timeout_s)
