"""The report stage: the objective and what the recommendation must meet."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import check_choice, check_range
from inferlab.config.section import Section
from inferlab.config.vocab import QUALITY_METRICS, REPORT_OBJECTIVES


@dataclass
class ConstraintsConfig(Section):
    """What the recommended configuration must meet; null: no limit."""

    # peak memory: GPU memory allocated (CUDA) or process RSS (CPU)
    memory_gib: float | None = None
    ttft_ms: float | None = 1000.0  # median time to first token
    # 90th percentile inter-token latency (the reader's stream rate)
    itl_p90_ms: float | None = 100.0
    # mean KL divergence per token from the runtime's full precision, in nats (the default quality
    # limit: it weighs every token's whole distribution, so it sees damage before the top-1 choice
    # or perplexity move)
    max_kl: float | None = 0.05
    # agreement of the top-1 next token with the full precision, 0..1
    min_top1: float | None = None

    def check(self, key: str) -> None:
        for name in ("memory_gib", "ttft_ms", "itl_p90_ms", "max_kl"):
            if getattr(self, name) is not None:
                check_range(f"{key}.{name}", getattr(self, name), low=0)
        if self.min_top1 is not None:
            check_range(f"{key}.min_top1", self.min_top1, low=0, high=1)


@dataclass
class ReportConfig(Section):
    # what "fastest" means: total tokens/s (throughput) or decode tokens/s per sequence
    objective: str = "total_tps"
    # the quality axis of the frontier and figures (QUALITY_METRICS)
    quality_metric: str = "kl_mean"
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    # models to report; empty: every model with records
    models: list[str] = field(default_factory=list)
    html: bool = True  # metrics/report.html with the figures embedded, beside metrics/report.md

    def __post_init__(self) -> None:
        check_choice("report.objective", self.objective, REPORT_OBJECTIVES)
        check_choice("report.quality_metric", self.quality_metric, QUALITY_METRICS)
        self.constraints.check("report.constraints")
