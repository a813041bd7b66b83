"""Typed configuration of the study, the public entry: `from inferlab.config import X`.

`conf/` holds the values; the dataclasses of this package are the schema, one module per config
group (`model`, `convert`, `bench_cpu`, `bench_gpu`, `evaluate`, `report`, `serve`, `tracking`;
`sweeps`: the axes the benchmark and evaluate sections share), the allowed values in `vocab`,
shared checks in `checks`, and the whole study with `load()` and `compose()` in `study`. Values
that need more than a type check are checked in `__post_init__`, when `load()` builds these
objects: before any stage does heavy work."""

from inferlab.config.bench_cpu import BenchCPUConfig
from inferlab.config.bench_gpu import (
    AssistedConfig,
    BenchGPUConfig,
    HFPrefixCacheConfig,
    ProfileConfig,
    StreamingConfig,
)
from inferlab.config.checks import ConfigError, conf_dir, project_root, resolve, usable_cores
from inferlab.config.convert import ConvertConfig
from inferlab.config.evaluate import (
    BertScoreConfig,
    EvalDatasetConfig,
    EvalHF,
    EvalLlamaCpp,
    EvaluateConfig,
    HubDatasetConfig,
    TokensConfig,
)
from inferlab.config.model import ArchitectureConfig, ModelConfig, TokenizerConfig, WheelConfig
from inferlab.config.report import ConstraintsConfig, ReportConfig
from inferlab.config.section import Section, recording, to_container
from inferlab.config.serve import ServeBenchConfig, ServeConfig, ServeSLOConfig
from inferlab.config.study import PathsConfig, StudyConfig, compose, load, register_configs
from inferlab.config.sweeps import (
    HFPoint,
    HFSweep,
    LlamaCppPoint,
    LlamaCppSweep,
    PromptCacheConfig,
    WorkloadConfig,
    fuse_problem,
    loop_path,
)
from inferlab.config.tracking import TrackingConfig
from inferlab.config.vocab import (
    BERTSCORE_OFFLINE,
    BNB_PRECISIONS,
    DECODE_LOOPS,
    FLOAT_DTYPES,
    FOUR_BIT,
    GGUF_FILE_TYPES,
    GRAPH_MODES,
    INT4_INDUCTOR,
    INT4_KERNELS,
    KERNEL_STEP_ARCHITECTURES,
    KERNEL_STEP_PRECISIONS,
    QUALITY_METRICS,
    SIXTEEN_BIT,
    TORCHAO_PRECISIONS,
)

__all__ = [
    "ArchitectureConfig",
    "AssistedConfig",
    "BERTSCORE_OFFLINE",
    "BNB_PRECISIONS",
    "BenchCPUConfig",
    "BenchGPUConfig",
    "BertScoreConfig",
    "ConfigError",
    "ConstraintsConfig",
    "ConvertConfig",
    "DECODE_LOOPS",
    "EvalDatasetConfig",
    "EvalHF",
    "EvalLlamaCpp",
    "EvaluateConfig",
    "FLOAT_DTYPES",
    "FOUR_BIT",
    "GGUF_FILE_TYPES",
    "GRAPH_MODES",
    "HFPoint",
    "HFPrefixCacheConfig",
    "HFSweep",
    "HubDatasetConfig",
    "INT4_INDUCTOR",
    "INT4_KERNELS",
    "KERNEL_STEP_ARCHITECTURES",
    "KERNEL_STEP_PRECISIONS",
    "LlamaCppPoint",
    "LlamaCppSweep",
    "ModelConfig",
    "PathsConfig",
    "ProfileConfig",
    "PromptCacheConfig",
    "QUALITY_METRICS",
    "ReportConfig",
    "SIXTEEN_BIT",
    "Section",
    "ServeBenchConfig",
    "ServeConfig",
    "ServeSLOConfig",
    "StreamingConfig",
    "StudyConfig",
    "TORCHAO_PRECISIONS",
    "TokenizerConfig",
    "TokensConfig",
    "TrackingConfig",
    "WheelConfig",
    "WorkloadConfig",
    "compose",
    "conf_dir",
    "fuse_problem",
    "load",
    "loop_path",
    "project_root",
    "recording",
    "register_configs",
    "resolve",
    "to_container",
    "usable_cores",
]
