"""Stage `bench_cpu`: the CPU sweep (llama.cpp over GGUF quant types, transformers as the baseline)."""

from pathlib import Path

from inferlab.bench import cpu
from inferlab.config import StudyConfig
from inferlab.stage import run_stage
from inferlab.study import StageRun


def main(cfg: StudyConfig) -> None:
    stage = StageRun(cfg, cpu.STAGE, sections=("bench_cpu",))
    try:
        cpu.run(cfg, stage, Path(__file__))
    finally:
        stage.finish()  # records already written are logged even if the sweep was interrupted


if __name__ == "__main__":
    run_stage(main)
