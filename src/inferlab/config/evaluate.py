"""The evaluate stage: the evaluation set, per-token quality, and the configurations that generate."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import (
    ConfigError,
    check_all,
    check_choice,
    check_extras,
    check_file,
    check_fits,
    check_folder,
    check_non_empty,
    check_positive,
    check_range,
    check_threads,
)
from inferlab.config.section import Section
from inferlab.config.sweeps import HFPoint, check_inductor
from inferlab.config.vocab import (
    BERTSCORE_OFFLINE,
    COMPILE_MODES,
    DECODE_LOOPS,
    EVAL_TASKS,
    HF_GEMV,
    HF_KV_CACHES,
    HF_PRECISIONS,
    KV_TYPES,
    QUANT_TYPES,
    STEP_INT4_GEMVS,
)


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
        check_all(f"{key}.tasks", self.tasks, EVAL_TASKS)
        check_non_empty(f"{key}.tasks", self.tasks)
        check_choice(f"{key}.hub.task", self.hub.task, EVAL_TASKS)
        if self.source == "local":
            check_folder(f"{key}.path", self.path)
        if self.limit is not None:
            check_range(f"{key}.limit", self.limit, low=1)


@dataclass
class TokensConfig(Section):
    """Quality per token: every configuration's next-token distribution at every position of this
    text, compared with its runtime's reference (KL divergence, top-1 agreement, perplexity ratio).
    """

    # held-out plain text, tokenized once by the model's tokenizer
    text: str = "data/eval/heldout.txt"
    window: int = 512  # tokens per forward pass
    # tokens the window moves by; each token is scored once, with window - stride context or more
    stride: int = 384
    # fewer scored tokens than this is an error: the intervals would be too wide
    min_tokens: int = 2000

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
    # decode loops scored per token through their own step (teacher forcing); null: every loop
    # point of the device's benchmark grid (bench_gpu.hf on cuda, bench_cpu.hf on cpu)
    loops: list[HFPoint] | None = field(default_factory=list)

    def check(self, key: str) -> None:
        check_all(f"{key}.precisions", self.precisions, HF_PRECISIONS)
        check_extras(key, self.loops or [], {"precision": HF_PRECISIONS, "compile_mode": COMPILE_MODES,
                                              "decode": DECODE_LOOPS, "gemv": HF_GEMV,
                                              "int4_gemv": STEP_INT4_GEMVS}, what="loops")
        for i, p in enumerate(self.loops or []):
            check_inductor(f"{key}.loops[{i}].inductor", p.inductor)
        check_all(f"{key}.kv_cache", self.kv_cache, HF_KV_CACHES)
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
    # a quantized KV cache uses flash attention
    kv_type: list[str] = field(default_factory=lambda: ["f16", "q8_0"])
    # the quants evaluated with the KV types after the first (empty: every quant with every KV
    # type)
    kv_quants: list[str] = field(default_factory=list)
    reference: str = "f32"  # the full-precision file every other file is compared with
    n_threads: int = 0  # 0: all usable cores
    n_ctx: int = 2048
    # layers on the GPU (-1: all, as bench_gpu runs llama.cpp; needs a CUDA build)
    n_gpu_layers: int = 0

    def check(self, key: str) -> None:
        check_all(f"{key}.quants", self.quants, ("f32", "f16", *QUANT_TYPES))
        check_all(f"{key}.kv_type", self.kv_type, KV_TYPES)
        check_all(f"{key}.kv_quants", self.kv_quants, self.quants)
        check_choice(f"{key}.reference", self.reference, ("f32", "f16", *QUANT_TYPES))
        check_threads(f"{key}.n_threads", self.n_threads)
        check_range(f"{key}.n_ctx", self.n_ctx, low=1)
        if self.enabled:
            check_non_empty(f"{key}.quants", self.quants, f"{key}.enabled")
            check_non_empty(f"{key}.kv_type", self.kv_type, f"{key}.enabled")


@dataclass
class BertScoreConfig(Section):
    # a Hub model name (roberta-large, needs the Hub) or a local folder
    model: str = BERTSCORE_OFFLINE
    num_layers: int | None = 6  # layer whose embeddings are compared; required for a local folder
    # needs bert-score's baseline file for the model (Hub models only)
    rescale_with_baseline: bool = False
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
    # tasks whose prompt goes through the model's chat template, where it has one (an instruct
    # model answers a question asked as a chat turn); code completion stays a plain continuation
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
        # llama.cpp scores a token window and generates within one context
        if self.llama_cpp.enabled:
            check_fits("evaluate.tokens.window", {"window": self.tokens.window}, "evaluate.llama_cpp.n_ctx",
                       self.llama_cpp.n_ctx)
            for task, n in self.max_new_tokens.items():
                check_fits(f"evaluate.max_new_tokens.{task}", {"new": n}, "evaluate.llama_cpp.n_ctx",
                           self.llama_cpp.n_ctx)
