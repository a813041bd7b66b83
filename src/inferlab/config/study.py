"""The whole study's config and how it is built: `compose()` (conf/ with overrides), `load()`.

The schema is registered in Hydra's ConfigStore (`hydra_plugins.inferlab_schemas`, also in DVC's
composition) and conf/config.yaml names `study_schema` first, so an unknown key or a wrongly typed
value fails inside Hydra, naming the key; `load()` runs every section's `__post_init__` checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from inferlab.config.bench_cpu import BenchCPUConfig
from inferlab.config.bench_gpu import BenchGPUConfig
from inferlab.config.checks import (
    ConfigError,
    check_choice,
    check_fits,
    check_range,
    check_threads,
    conf_dir,
    did_you_mean,
    resolve,
)
from inferlab.config.convert import ConvertConfig
from inferlab.config.evaluate import EvaluateConfig
from inferlab.config.model import ModelConfig
from inferlab.config.report import ReportConfig
from inferlab.config.section import Section, name_sections
from inferlab.config.serve import ServeBenchConfig, ServeConfig
from inferlab.config.tracking import TrackingConfig
from inferlab.config.vocab import (
    BASE_TYPES,
    FAMILY_ARCHITECTURES,
    HF_ATTENTION,
    HF_KV_CACHES,
    HF_PRECISIONS,
    KV_TYPES,
    LLAMA_APIS,
    PINS,
    QUANT_TYPES,
)


@dataclass
class PathsConfig(Section):
    models: str = "models"
    results: str = "results"
    metrics: str = "metrics"
    # a stage refuses to start with less free disk than this where it writes results
    min_free_mb: int = 200

    def __post_init__(self) -> None:
        check_range("paths.min_free_mb", self.min_free_mb, low=0)


@dataclass
class StudyConfig(Section):
    model: ModelConfig = MISSING
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    bench_cpu: BenchCPUConfig = field(default_factory=BenchCPUConfig)
    bench_gpu: BenchGPUConfig = field(default_factory=BenchGPUConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    serve_bench: ServeBenchConfig = field(default_factory=ServeBenchConfig)
    # Pins: a top-level key set on the command line restricts one axis of every sweep to that
    # value, e.g. `python stages/bench_cpu.py -m quant=q4_k_m,q8_0 n_threads=1,2`. Unset (null):
    # the grid's values.
    runtime: str | None = None  # llama_cpp, hf or prompt_cache
    quant: str | None = None
    n_threads: int | None = None
    n_batch: int | None = None
    flash_attn: bool | None = None
    kv_type: str | None = None
    api: str | None = None
    precision: str | None = None
    batch_size: int | None = None
    kv_cache: str | None = None
    attn: str | None = None
    compile: bool | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def __post_init__(self) -> None:
        pins = {"runtime": ("llama_cpp", "hf", "prompt_cache"), "quant": ("f32", "f16", *QUANT_TYPES),
                "kv_type": KV_TYPES, "api": LLAMA_APIS, "precision": HF_PRECISIONS, "kv_cache": HF_KV_CACHES,
                "attn": HF_ATTENTION}
        for key, allowed in pins.items():
            if getattr(self, key) is not None:
                check_choice(key, getattr(self, key), allowed)
        for key in ("n_batch", "batch_size"):
            if getattr(self, key) is not None:
                check_range(key, getattr(self, key), low=1)
        ref = self.evaluate.llama_cpp.reference
        if self.evaluate.llama_cpp.enabled and ref in BASE_TYPES and ref not in self.convert.outtypes:
            raise ConfigError(f"evaluate.llama_cpp.reference: {ref!r} is compared with every other GGUF file, and "
                              f"convert.outtypes {self.convert.outtypes} does not write it: add {ref} to "
                              "convert.outtypes (or set evaluate.llama_cpp.enabled=false)")
        if self.n_threads is not None:
            check_threads("n_threads", self.n_threads, zero=False)
        self._check_contexts()

    def _check_contexts(self) -> None:
        """Prompts that must fit a context window set in another section than theirs."""
        # built here: its position limit is known before it is built
        if self.model.source in ("tiny", "random"):
            limit, lkey = self.model.architecture.max_position_embeddings, "model.architecture.max_position_embeddings"
            for name, section in (("bench_cpu", self.bench_cpu), ("bench_gpu", self.bench_gpu)):
                if section.hf.enabled:
                    new = section.hf.new_tokens or section.workload.new_tokens
                    check_fits(f"{name}.workload.prompt_tokens", {"prompt": section.workload.prompt_tokens,
                                                                  "new": new}, lkey, limit)
            pc = self.bench_gpu.prefix_cache
            if pc.enabled:
                check_fits("bench_gpu.prefix_cache.prefix_tokens", {"prefix": pc.prefix_tokens,
                                                                    "suffix": pc.suffix_tokens,
                                                                    "new": pc.new_tokens}, lkey, limit)
        if self.serve.runtime == "llama_cpp":
            check_fits("serve_bench.prompt_tokens", {"prompt": self.serve_bench.prompt_tokens,
                                                     "new": self.serve_bench.max_tokens}, "serve.n_ctx",
                       self.serve.n_ctx)

    def pins(self, keys: Sequence[str] = PINS) -> dict[str, Any]:
        """The pins set (of `keys` only: a stage that honours some pins reads only those)."""
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def model_dir(self) -> Path:
        return resolve(self.paths.models) / self.model.name

    def model_architecture(self) -> str | None:
        """The model's transformers class (LlamaForCausalLM, ...): from its config.json once
        downloaded, from model.architecture.family for a model built here; None for a Hub or wheel
        model not downloaded yet."""
        import json

        path = self.model_dir() / "hf" / "config.json"
        if path.is_file():
            return (json.loads(path.read_text()).get("architectures") or [None])[0]
        if self.model.source in ("tiny", "random"):
            return FAMILY_ARCHITECTURES[self.model.architecture.family]
        return None

    def gguf_path(self, ftype: str) -> Path:
        """The model's GGUF file of one type (f32, f16, a quant type): where convert writes it and all read it."""
        return self.model_dir() / "gguf" / f"{self.model.name}-{ftype}.gguf"

    def missing_gguf(self, ftype: str) -> str | None:
        """Why the GGUF file of `ftype` is not there (a point that needs it is skipped with this reason), or None."""
        path = self.gguf_path(ftype)
        if path.exists():
            return None
        if not path.parent.is_dir():
            return (f"no GGUF folder {path.parent} (paths.models={self.paths.models!r}): run the convert stage first, "
                    "or point paths.models at the folder that holds the model")
        return f"no GGUF file {path.name}: add {ftype} to convert.quants (or convert.outtypes)"


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="study_schema", node=StudyConfig)


def load(cfg: DictConfig | dict[str, Any]) -> StudyConfig:
    """Validate a composed config (or params.yaml's content) against the schema and build the typed
    object.

    Unknown keys and wrongly typed values raise ConfigError naming the key; values are checked by
    the dataclasses' __post_init__."""
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(StudyConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"{key}: {msg}") from None
    except ConfigError:
        raise
    assert isinstance(obj, StudyConfig)
    name_sections(obj)
    return obj


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> StudyConfig:
    """Compose conf/ with Hydra overrides, as a stage run from the command line would, and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    register_configs()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        raise ConfigError(explain_hydra_error(e)) from None
    return load(cfg)


def allowed_keys(full_key: str) -> list[str]:
    """The keys the schema allows next to full_key (for error messages)."""
    import dataclasses
    import typing

    node: Any = StudyConfig
    for part in full_key.split(".")[:-1]:
        hints = typing.get_type_hints(node)
        if part not in hints or not dataclasses.is_dataclass(hints[part]):
            return []
        node = hints[part]
    return [f.name for f in dataclasses.fields(node)]


def explain_hydra_error(e: Exception) -> str:
    """Hydra's composition errors, restated as key, value and what is allowed."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, MissingConfigException):
        m = re.search(r"Could not find '([^/']+)/([^']+)'", str(e))
        if m:
            group, value = m.groups()
            options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
            hint = did_you_mean(value, options)
            return (f"{group}: {value!r} is not a known {group}; "
                    f"choose one of {', '.join(options)}{hint}")
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = cause.full_key
        keys = allowed_keys(key)
        hint = did_you_mean(key.split(".")[-1], keys)
        return f"{key}: unknown key; allowed keys here: {', '.join(keys)}{hint}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return str(e).splitlines()[0]
