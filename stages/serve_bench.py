"""Stage `serve_bench`: the served configuration under load. Starts `inferlab serve` on 127.0.0.1, drives it with
N concurrent streaming clients per level and records TTFT, ITL, end-to-end percentiles, throughput and errors."""

from inferlab.config import StudyConfig
from inferlab.serve import loadtest
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    with StageRun(cfg, loadtest.STAGE, sections=("serve", "serve_bench")) as stage:  # logged even if interrupted
        loadtest.run(cfg, stage)


if __name__ == "__main__":
    run_stage(main)
