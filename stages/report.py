"""Stage `report`: the study's answer from the records: tables per hardware and model, the Pareto
frontier, the recommended configuration under the constraints, figures, an MLflow report run."""

from inferlab.config import StudyConfig
from inferlab.report import build as report
from inferlab.stage import run_stage


def main(cfg: StudyConfig) -> None:
    report.run(cfg)


if __name__ == "__main__":
    run_stage(main)
