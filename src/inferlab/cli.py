"""The `inferlab` command: helpers around the pipeline (the stages themselves run through DVC or Hydra)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inferlab.config import ConfigError, TrackingConfig, compose, project_root, to_container


def cmd_log_records(args: argparse.Namespace) -> int:
    from inferlab.records import read_all
    from inferlab.tracking import Tracker, check_reachable

    paths = [Path(p) for p in args.paths] or sorted((project_root() / "results").rglob("*.jsonl"))
    records = read_all(paths)
    if not records:
        print(f"no records in {', '.join(map(str, paths)) or 'results/'}", file=sys.stderr)
        return 1
    tracker = Tracker(TrackingConfig(uri=args.uri, experiment=args.experiment))
    problem = check_reachable(tracker.uri, tracker.cfg.timeout_s)
    if problem:
        print(f"MLflow tracking store {tracker.uri} cannot be reached: {problem}", file=sys.stderr)
        return 2
    created = tracker.log(records)
    print(f"{len(records)} record(s) read from {len(paths)} file(s); {created} new MLflow run(s) at {tracker.uri}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    try:
        cfg = compose(args.overrides)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_container(cfg), sort_keys=False), end="")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """`dvc exp run` with each override as -S, and this environment's tools first on PATH (the stages call
    `python`), so the study runs from the virtual environment without activating it."""
    import os
    import subprocess

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "dvc"), "exp", "run", *[a for o in args.overrides for a in ("-S", o)], *args.dvc_args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=project_root())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="inferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("log-records", help="log records (JSONL) to MLflow; runs already there are skipped")
    p.add_argument("paths", nargs="*", help="record files (default: every results/**/*.jsonl)")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
    p.add_argument("--experiment", default="inferlab")
    p.set_defaults(fn=cmd_log_records)

    p = sub.add_parser("config", help="print the resolved configuration for Hydra overrides")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny-phi convert.quants=[q8_0]")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("study", help="run the study as a DVC experiment: inferlab study model=tiny-phi ...")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, passed to `dvc exp run` as -S")
    p.add_argument("--dvc-args", nargs=argparse.REMAINDER, default=[], help="further arguments for dvc exp run")
    p.set_defaults(fn=cmd_study)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
