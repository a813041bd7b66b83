"""The field table: every column of every table the study writes (llama-bench's one field list).

A field has a name, a kind (about: which record; setting: what was measured; figure: what came
out), a type, a unit and how it is read from a record (a dotted path: `metrics.decode_tps.median`,
`point.quant`; a list index is a number: `metrics.tokens.own.perplexity_ci95.0`), and how the
report names it. The CSV plot tables, the DVC metrics JSON, the markdown of `inferlab results`, the
MLflow params that group runs and the metrics of each point's run, and the report's figures, labels
and units all derive from these tables, so a new figure is one line here. Rows are typed: a value
that was not measured is None (an empty cell in CSV), booleans are booleans, a float field holds
floats.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferlab.records import instance_of

ABOUT, SETTING, FIGURE = "about", "setting", "figure"
VS_REFERENCE = "vs_reference"  # per-token quality against the runtime's own full precision
# llama.cpp's reference against transformers' fp32 on the same machine
VS_TRANSFORMERS = "vs_transformers"


@dataclass(frozen=True)
class Field:
    name: str
    kind: str  # about / setting / figure
    type: type = float
    unit: str = ""
    # how it is read: dotted path(s) into the record (the first found wins), a function of the
    # record, or None: computed by the table's builder (inferlab.aggregate)
    read: str | tuple[str, ...] | Callable[[Any], Any] | None = None
    summary: bool = False  # in the stage's DVC metrics JSON
    markdown: bool = False  # a default column of `inferlab results`
    group: bool = False  # a top-level MLflow param: the settings runs are grouped and compared by
    # a column of the tables (False: an MLflow group param, or a figure only MLflow logs)
    column: bool = True
    # quality figures: the value of a reference against itself (by construction)
    itself: float | None = None
    # rounded to this many decimals; None: as recorded (NaN: not measured, either way)
    digits: int | None = None
    # a figure of the report's recommendation (recommendation.json, report.json)
    recommended: bool = False
    label: str = ""  # the figure in the report's words (sentences, constraints); default: its name
    header: str = ""  # its column title in the report's tables; default: its label
    # its name on a chart's axis, and as the report's objective or quality axis (default: label)
    axis: str = ""

    @property
    def words(self) -> str:
        return self.label or self.name

    @property
    def title(self) -> str:
        return self.header or self.words

    @property
    def described(self) -> str:
        return self.axis or self.words


def setting(name: str, typ: type = str, **kw: Any) -> Field:
    return Field(name, SETTING, typ, read=f"point.{name}", **kw)


def median(name: str, unit: str, **kw: Any) -> Field:
    """A benchmark figure's median over the repetitions."""
    return Field(name, FIGURE, float, unit, f"metrics.{name}.median", digits=4, **kw)


def figure(name: str, unit: str = "", path: str | None = None, typ: type = float,
           **kw: Any) -> Field:
    """A benchmark figure (rounded to four decimals in the tables)."""
    return Field(name, FIGURE, typ, unit, path or f"metrics.{name}", digits=4, **kw)


def logged(name: str, unit: str = "", typ: type = float) -> Field:
    """A figure as recorded (not rounded), that only its MLflow run shows."""
    return Field(name, FIGURE, typ, unit, f"metrics.{name}", column=False)


# The benchmark stages (bench_cpu, bench_gpu, serve_bench): one row per point, its latest record
# per hardware/model.
BENCH: tuple[Field, ...] = (
    Field("hardware", ABOUT, str, read="environment.hardware.id"),
    Field("model", ABOUT, str, read="model.name"),
    Field("weights", ABOUT, str, read="model.weights"),
    Field("name", ABOUT, str, read="name", markdown=True),
    Field("status", ABOUT, str, read="status", summary=True, markdown=True),
    Field("sweep_id", ABOUT, str, read="sweep_id", summary=True),
    Field("instance", ABOUT, str, read=instance_of, summary=True),
    Field("timestamp", ABOUT, str, read="timestamp"),
    Field("point_id", ABOUT, str, read="point_id"),
    setting("runtime", group=True),
    setting("scenario", group=True),
    setting("quant", group=True),
    setting("precision", group=True),
    setting("batch_size", int, markdown=True, group=True, header="batch"),
    setting("n_threads", int, group=True, header="threads"),
    setting("n_batch", int, group=True),
    setting("flash_attn", bool, group=True),
    setting("kv_type", group=True),
    setting("kv_cache", group=True),
    setting("attn", group=True),
    setting("compile", bool, group=True),
    setting("api", group=True),
    setting("mode", group=True),
    setting("prompt_tokens", int, group=True),
    setting("new_tokens", int, group=True),
    setting("concurrency", int),
    setting("max_tokens", int),
    setting("decode"),
    setting("compile_mode"),
    setting("inductor"),
    setting("fuse_qkv", bool),
    setting("fuse_block", bool),
    setting("gemv"),
    setting("int4_gemv"),
    setting("fuse_norm", bool),
    setting("fuse_attention", bool),
    setting("n_gpu_layers", int),
    # the generated tokens of the measured requests, as a digest: equal digests in one sweep,
    # equal tokens
    Field("output_digest", ABOUT, str, read="metrics.output_digest", header="tokens digest"),
    setting("lookup_tokens", int),
    setting("task"),
    setting("rate", float),
    setting("rate_fraction", float),
    setting("burstiness", float),
    setting("device", group=True, column=False),
    median("decode_tps", "tokens/s", summary=True, markdown=True, recommended=True,
           label="decode tokens/s per sequence", header="decode tok/s"),
    median("total_tps", "tokens/s", summary=True, markdown=True, recommended=True,
           label="total tokens/s", header="total tok/s"),  # every sequence of the batch
    median("ttft_ms", "ms", summary=True, markdown=True, recommended=True, label="TTFT",
           header="TTFT ms"),
    median("tpot_ms", "ms"),
    median("e2e_ms", "ms", summary=True),
    median("prefill_tps", "tokens/s"),
    median("llama_decode_tps", "tokens/s"),  # llama.cpp's own counters
    median("harness_overhead_ms", "ms"),
    figure("itl_p50_ms", "ms", "metrics.itl_ms.median", summary=True, markdown=True,
           recommended=True, label="ITL p50", header="ITL p50 ms"),
    figure("itl_p90_ms", "ms", "metrics.itl_ms.p90", summary=True, markdown=True, recommended=True,
           label="ITL p90", header="ITL p90 ms"),
    figure("itl_p99_ms", "ms", "metrics.itl_ms.p99"),
    figure("decode_tps_stdev", "tokens/s", "metrics.decode_tps.stdev", header="±"),
    figure("cold_ttft_ms", "ms", "metrics.cold.ttft_ms", summary=True),
    figure("peak_rss_mib", "MiB", summary=True, markdown=True),
    figure("peak_allocated_gib", "GiB", summary=True, markdown=True),
    figure("peak_reserved_gib", "GiB"),
    figure("gpu_process_gib", "GiB"),  # the driver's figure: llama.cpp allocates outside torch
    figure("load_s", "s"),
    figure("weight_bytes", "bytes", typ=int),
    figure("cache_hits", typ=int, summary=True),
    figure("first_ttft_ms", "ms"),
    figure("harness_overhead_fraction"),
    figure("request_throughput", "requests/s", summary=True),
    figure("token_throughput", "tokens/s", summary=True),
    figure("errors", typ=int, summary=True),
    figure("offered_rate", "requests/s", summary=True),
    figure("goodput", "requests/s", summary=True),
    figure("slo_attainment", summary=True),
    figure("meets_slo", typ=bool, summary=True),
    figure("roofline_tps", "tokens/s", "metrics.roofline.roofline_tps"),
    figure("roofline_fraction", "", "metrics.roofline.roofline_fraction", summary=True,
           markdown=True, recommended=True, label="roofline"),
    figure("bandwidth_gbps", "GB/s", "metrics.bandwidth.bandwidth_gbps"),
    # kernel-level profiles of decode steps (the profile scenario), logged to MLflow only
    logged("profiled_step_ms", "ms"),
    logged("kernel_ms_per_step", "ms"),
    logged("launch_gap_ms_per_step", "ms"),
    logged("host_wait_ms_per_step", "ms"),
    logged("kernels_per_step"),
    logged("weight_gbps_over_matmul", "GB/s"),
    logged("ms_per_step_by_kind", "ms", dict),
    Field("reason", ABOUT, str, read="reason", markdown=True),
    # the same point in several sweeps (computed across its records: aggregate.across_sweeps)
    Field("sweeps", FIGURE, int),
    Field("decode_tps_sweeps_median", FIGURE, float, "tokens/s"),
    Field("decode_tps_sweeps_min", FIGURE, float, "tokens/s"),
    Field("decode_tps_sweeps_max", FIGURE, float, "tokens/s"),
    Field("sensitive", ABOUT, str),
)


def token(name: str, path: str, itself: float | None = None, unit: str = "", typ: type = float,
          **kw: Any) -> Field:
    """A per-token quality figure of a generation record (vs its runtime's reference, or own)."""
    return Field(name, FIGURE, typ, unit, f"metrics.tokens.{path}", summary=True, itself=itself,
                 **kw)


def text(name: str, path: str, **kw: Any) -> Field:
    """A text score of a generation, from its score record."""
    return Field(name, FIGURE, float, "", f"score.metrics.{path}", summary=True, **kw)


# The evaluate stage: one row per configuration (hardware, model, config), its latest generation
# and that generation's score record.
QUALITY: tuple[Field, ...] = (
    Field("hardware", ABOUT, str, read="environment.hardware.id"),
    Field("model", ABOUT, str, read="model.name"),
    Field("weights", ABOUT, str, read="model.weights"),
    Field("meaningful", ABOUT, bool),  # real weights: the scores say something about quality
    Field("config", ABOUT, str, read="name", header="configuration"),
    Field("status", ABOUT, str),  # the generation's, or "not scored"
    setting("runtime"),
    setting("device"),
    setting("precision"),
    setting("quant"),
    setting("kv_cache"),
    setting("kv_type"),
    # a decode loop scored through its own step (None: a forward pass over each window)
    setting("loop"),
    # what produced the distributions
    Field("scored_by", ABOUT, str, read="metrics.tokens.scored_by"),
    # what the model really got (group sizes, ...)
    Field("holds", SETTING, str, read="metrics.quantization"),
    Field("bits_per_weight", SETTING, float, "bits", read="metrics.bits_per_weight",
          header="bits/weight"),
    Field("reference", ABOUT, str),  # "itself", or the configuration it is compared with
    Field("sweep_id", ABOUT, str, read="sweep_id"),
    token("tokens_scored", "own.tokens", unit="tokens", typ=int, header="tokens"),
    token("kl_mean", f"{VS_REFERENCE}.kl_mean", 0.0, "nats/token", recommended=True,
          label="KL divergence", header="KL",
          axis="KL divergence from full precision (nats per token)"),
    token("kl_ci_low", f"{VS_REFERENCE}.kl_ci95.0", 0.0, "nats/token", recommended=True),
    token("kl_ci_high", f"{VS_REFERENCE}.kl_ci95.1", 0.0, "nats/token", recommended=True),
    token("kl_median", f"{VS_REFERENCE}.kl_median", 0.0, "nats/token"),
    token("kl_p99", f"{VS_REFERENCE}.kl_p99", 0.0, "nats/token", label="KL p99"),
    token("kl_max", f"{VS_REFERENCE}.kl_max", 0.0, "nats/token", label="KL max"),
    token("top1", f"{VS_REFERENCE}.top1", 1.0, recommended=True, label="top-1 agreement",
          header="top-1", axis="top-1 agreement with full precision"),
    token("top1_ci_low", f"{VS_REFERENCE}.top1_ci95.0", 1.0, recommended=True),
    token("top1_ci_high", f"{VS_REFERENCE}.top1_ci95.1", 1.0, recommended=True),
    token("perplexity", "own.perplexity"),
    token("perplexity_ci_low", "own.perplexity_ci95.0"),
    token("perplexity_ci_high", "own.perplexity_ci95.1"),
    # score records before per-token quality carried the ratio themselves
    Field("ppl_ratio", FIGURE, float, "", summary=True, itself=1.0, recommended=True,
          label="perplexity ratio", header="ppl ratio", axis="perplexity ratio to full precision",
          read=(f"metrics.tokens.{VS_REFERENCE}.ppl_ratio", "score.metrics.perplexity_ratio")),
    token("ppl_ratio_ci_low", f"{VS_REFERENCE}.ppl_ratio_ci95.0", 1.0, recommended=True),
    token("ppl_ratio_ci_high", f"{VS_REFERENCE}.ppl_ratio_ci95.1", 1.0, recommended=True),
    token("vs_transformers_kl", f"{VS_TRANSFORMERS}.kl_mean", unit="nats/token"),
    token("vs_transformers_top1", f"{VS_TRANSFORMERS}.top1"),
    text("task_rougeL", "task.rougeL", recommended=True, label="task ROUGE-L",
         axis="task ROUGE-L against the references"),
    text("task_bertscore_f1", "task.bertscore_f1"),
    text("task_exact_match", "task.exact_match", label="task exact match"),
    text("drift_rougeL", "drift.rougeL", recommended=True, label="drift ROUGE-L",
         axis="output drift: ROUGE-L against the full precision's outputs"),
    text("drift_bertscore_f1", "drift.bertscore_f1"),
    text("drift_exact_match", "drift.exact_match", label="drift exact match"),
    text("drift_first_diff", "drift.first_diff"),
    Field("reason", ABOUT, str, summary=True),
)


# The figures of a convert record (one GGUF file) and of a download record.
CONVERT: tuple[Field, ...] = (
    logged("file_bytes", "bytes", int),
    logged("bits_per_weight", "bits"),
    logged("weight_bytes", "bytes", int),
    logged("parameters", "", int),
    logged("matrices", "", int),
    # tensors llama.cpp stored in another type than the file's name says
    logged("fallback_tensors", "", int),
    logged("fallback_to", "tensors", dict),
    logged("tensor_types", "tensors", dict),
    logged("logits_rel_error"),  # against transformers on the same prompt
    logged("same_tokenization", "", bool),
    logged("convert_s", "s"),
    logged("quantize_s", "s"),
)
DOWNLOAD: tuple[Field, ...] = (logged("bytes", "bytes", int), logged("files", "", int),
                               logged("seconds", "s"))

# What the report derives per benchmark point (inferlab.report.table): the memory that bounds
# it, by runtime and device (torch's peak allocation, the driver's figure for llama.cpp on a
# GPU, or the process RSS).
REPORT: tuple[Field, ...] = (
    Field("workload", SETTING, str, header="prompt+new"),  # prompt and new tokens, e.g. 64+128
    Field("memory_gib", FIGURE, float, "GiB", recommended=True, label="peak memory",
          header="memory GiB"),
)


def names(table: tuple[Field, ...],
          keep: Callable[[Field], bool] = lambda f: f.column) -> tuple[str, ...]:
    return tuple(f.name for f in table if keep(f))


COLUMNS = names(BENCH)  # the benchmark tables' columns, in order
QUALITY_COLUMNS = names(QUALITY)
# joined onto each benchmark point by the report
QUALITY_FIGURES = names(QUALITY, lambda f: f.kind == FIGURE)
MARKDOWN_COLUMNS = names(BENCH, lambda f: f.markdown)
GROUP_PARAMS = names(BENCH, lambda f: f.group)  # top-level MLflow params of a point's run
# the recommendation's figures
RECOMMENDED = names(BENCH + REPORT + QUALITY, lambda f: f.recommended)
# a figure's field (the benchmark's where both have it)
BY_NAME = {f.name: f for f in QUALITY + REPORT + BENCH}


STAGE_TABLES = {"bench_cpu": BENCH, "bench_gpu": BENCH, "serve_bench": BENCH, "evaluate": QUALITY,
                "convert": CONVERT, "download": DOWNLOAD}


def field(name: str) -> Field:
    """The field of a figure or setting of any table, by name."""
    return BY_NAME[name]


def figures(r: Any) -> dict[str, Any]:
    """A record's figures, as the field table of its stage reads them (the metrics of its MLflow
    run); a figure of several values (per kernel kind, per tensor type) is a dict."""
    table = STAGE_TABLES.get(r.stage, ())
    source = r
    if table is QUALITY:  # a generation's figures, or its score record's text scores
        score = r if r.point.get("scenario") == "scores" else None
        source = {"metrics": r.metrics, "score": score}
    return {f.name: v for f in table if f.kind == FIGURE and f.read is not None
            and (v := read(f, source)) is not None}


def dig(obj: Any, path: str) -> Any:
    """The value at a dotted path (attributes, keys, list indices); None if a step is missing."""
    for part in path.split("."):
        if obj is None:
            return None
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, (list, tuple)):
            obj = obj[int(part)] if part.isdigit() and int(part) < len(obj) else None
        else:
            obj = getattr(obj, part, None)
    return obj


def value(v: Any, digits: int | None = 4, typ: type | None = None) -> Any:
    """A figure as the tables hold it: NaN (not measured) is None, a whole number of a float
    field a float, floats rounded to `digits` (None: as recorded)."""
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if isinstance(v, float):
        return None if v != v else v if digits is None else round(v, digits)
    return v


def read(f: Field, source: Any) -> Any:
    """A field's value from a record (or a dict of records, e.g. a generation and its score)."""
    if f.read is None:
        return None
    if callable(f.read):
        return value(f.read(source), f.digits, f.type)
    for path in (f.read,) if isinstance(f.read, str) else f.read:
        v = value(dig(source, path), f.digits, f.type)
        if v is not None:
            return v
    return None
