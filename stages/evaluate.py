"""Stage `evaluate`: greedy outputs of every configuration on the evaluation set, perplexity on a held-out
passage, and their scores (ROUGE, BERTScore, token fidelity) against the reference precision and the references."""

from pathlib import Path

from inferlab.config import StudyConfig
from inferlab.quality import stage as quality
from inferlab.stage import run_stage
from inferlab.study import StageRun


def main(cfg: StudyConfig) -> None:
    with StageRun(cfg, quality.STAGE, sections=("evaluate",)) as stage:  # records logged even if interrupted
        quality.run(cfg, stage, Path(__file__))


if __name__ == "__main__":
    run_stage(main)
