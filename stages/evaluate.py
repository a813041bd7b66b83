"""Stage `evaluate`: greedy outputs of every configuration on the evaluation set, perplexity on a held-out
passage, and their scores (ROUGE, BERTScore, token fidelity) against the reference precision and the references."""

from pathlib import Path

from inferlab.config import StudyConfig
from inferlab.quality import evaluate as quality
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    with StageRun(cfg, quality.STAGE, sections=("evaluate",)) as stage:  # records logged even if interrupted
        quality.run(cfg, stage, Path(__file__))


if __name__ == "__main__":
    run_stage(main)
