"""Stage `bench_cpu`: the CPU sweep (llama.cpp over GGUF quant types, transformers as the baseline)."""

from pathlib import Path

from inferlab.bench import cpu
from inferlab.config import StudyConfig
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    with StageRun(cfg, cpu.STAGE, sections=("bench_cpu",)) as stage:  # logged even if interrupted
        cpu.run(cfg, stage, Path(__file__))


if __name__ == "__main__":
    run_stage(main)
