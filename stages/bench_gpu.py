"""Stage `bench_gpu`: the GPU sweep (transformers + bitsandbytes); every point skipped where there is no CUDA."""

from pathlib import Path

from inferlab.bench import gpu
from inferlab.config import StudyConfig
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    with StageRun(cfg, gpu.STAGE, sections=("bench_gpu",)) as stage:  # logged even if interrupted
        gpu.run(cfg, stage, Path(__file__))


if __name__ == "__main__":
    run_stage(main)
