"""The convert stage: GGUF files written and checked."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferlab.config.checks import ConfigError, check_choice, check_range, check_threads
from inferlab.config.section import Section
from inferlab.config.vocab import BASE_TYPES, QUANT_TYPES


@dataclass
class ConvertConfig(Section):
    # written by the converter: f32, f16 or both
    outtypes: list[str] = field(default_factory=lambda: ["f32", "f16"])
    # from the most precise file written; q3_k_m and q2_k: where quality breaks (on rows k-quants
    # do not fit, metrics/gguf.json says what llama.cpp stored instead)
    quants: list[str] = field(default_factory=lambda: ["q8_0", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k"])
    threads: int = 0  # quantization threads; 0 = all cores
    check_tokens: int = 8  # every file is loaded and generates this many tokens as a check
    # the most precise file written: logits against transformers', tokenization
    check_logits: bool = True
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
