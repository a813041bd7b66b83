"""How a stage script runs: from params.yaml (DVC) or by composing conf/ with Hydra (command line, multirun).

    python stages/convert.py --params params.yaml          # what dvc.yaml runs; params.yaml is DVC's composition
    python stages/convert.py model=tiny-phi convert.quants=[q8_0]
    python stages/convert.py -m convert.quants=[q8_0],[q4_0]

Both paths validate the same way (inferlab.config.load) and hand the stage the same StudyConfig.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from inferlab.config import ConfigError, compose, conf_dir, load, recording, register_configs
from inferlab.logs import quiet_libraries, setup_logging

log = logging.getLogger(__name__)

StageFn = Callable[..., object]


READS_ENV = "INFERLAB_CONFIG_READS"  # a folder: each stage writes the config keys it read to <stage>.json there


def _call(fn: StageFn, cfg) -> None:
    folder = os.environ.get(READS_ENV)
    if not folder:
        _run(fn, cfg)
        return
    with recording() as reads:  # what dvc.yaml must list as the stage's params (tests/test_dependencies.py)
        try:
            _run(fn, cfg)
        finally:
            path = Path(folder) / f"{Path(inspect.getfile(fn)).stem}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(sorted(reads), indent=1) + "\n")


def _run(fn: StageFn, cfg) -> None:
    from inferlab.records import WriteError
    from inferlab.study import CannotStart, Stopped

    try:
        fn(cfg)
    except CannotStart as e:
        log.error("cannot start: %s", e)
        raise SystemExit(f"cannot start: {e}") from None
    except (Stopped, WriteError) as e:  # the records written before it are kept; a rerun resumes the sweep
        log.error("stopped: %s", e)
        raise SystemExit(f"stopped: {e}") from None


def run_stage(fn: StageFn, argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--params"]:
        if len(argv) != 2:
            sys.exit("usage: stages/<name>.py --params params.yaml   (or Hydra overrides: key=value ...)")
        setup_logging()
        path = Path(argv[1])
        try:
            cfg = load(yaml.safe_load(path.read_text()))
        except ConfigError as e:
            sys.exit(f"invalid configuration in {path}: {e}")
        _call(fn, cfg)
        return

    import hydra
    from omegaconf import DictConfig

    register_configs()
    if not any(a in ("-m", "--multirun") or a.startswith(("-", "hydra")) for a in argv):
        try:  # fail before Hydra starts a run folder, with the key, the value and what is allowed
            compose(argv)
        except ConfigError as e:
            sys.exit(f"invalid configuration: {e}")

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
    def _main(dcfg: DictConfig) -> None:
        quiet_libraries()  # Hydra has configured logging by now
        try:
            cfg = load(dcfg)
        except ConfigError as e:
            log.error("invalid configuration: %s", e)
            raise SystemExit(f"invalid configuration: {e}") from None
        _call(fn, cfg)

    sys.argv = [sys.argv[0], *argv]
    _main()
