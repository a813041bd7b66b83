"""Stage `convert`: GGUF F16 (F32 on request) and the configured llama.cpp quantizations, each checked."""

import sys

from inferlab.config import StudyConfig
from inferlab.gguf import pipeline
from inferlab.stage import StageRun, run_stage


def main(cfg: StudyConfig) -> None:
    stage = StageRun(cfg, "convert", sections=("convert",))
    ok = pipeline.run(cfg, stage)
    stage.finish()
    if not ok:
        sys.exit("convert: some files failed (see the records above and metrics/gguf.json)")


if __name__ == "__main__":
    run_stage(main)
