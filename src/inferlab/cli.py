"""The `inferlab` command: helpers around the pipeline (the stages themselves run through DVC or Hydra)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inferlab.config import ConfigError, TrackingConfig, compose, project_root, to_container


def record_paths(given: list[str], experiments: bool) -> list[Path]:
    """The record files to log: every results/<stage>/*.jsonl by default; a folder given: its own *.jsonl and
    its stages' record files; a file given: that file. Never the evaluate stage's per-sample outputs."""
    from inferlab.records import record_files

    if not given:
        return record_files(project_root() / "results", experiments)
    out: list[Path] = []
    for p in map(Path, given):
        out += [*sorted(p.glob("*.jsonl")), *record_files(p, experiments)] if p.is_dir() else [p]
    return list(dict.fromkeys(out))


def cmd_log_records(args: argparse.Namespace) -> int:
    from inferlab.records import read_all
    from inferlab.tracking import Tracker, check_reachable

    paths = record_paths(args.paths, args.experiments)
    records = read_all(paths)
    if not records:
        print(f"no records in {', '.join(map(str, paths)) or 'results/'}", file=sys.stderr)
        return 1
    tracker = Tracker(TrackingConfig(uri=args.uri, experiment=args.experiment))
    problem = check_reachable(tracker.uri, tracker.cfg.timeout_s)
    if problem:
        print(f"MLflow tracking store {tracker.uri} cannot be reached: {problem}", file=sys.stderr)
        return 2
    res = tracker.log(records)
    line = (f"{len(records)} record(s) read from {len(paths)} file(s); {res.created} new MLflow run(s) at "
            f"{tracker.uri}, {res.present} already there")
    if res.replaced or res.duplicates:
        line += (f" ({res.replaced} unfinished run(s) of an earlier logger replaced, {res.duplicates} duplicate "
                 "run(s) of a logger at the same time deleted)")
    print(line + ("; nothing new to log" if res.ok and not res.created else ""))
    if res.ok:
        return 0
    for name, why in res.rejected[:20]:
        print(f"rejected: {name}: {why}", file=sys.stderr)
    if len(res.rejected) > 20:
        print(f"... and {len(res.rejected) - 20} more rejected", file=sys.stderr)
    if res.pending:
        print(f"{len(res.pending)} record(s) were still being logged by another process: rerun to check",
              file=sys.stderr)
    if res.unreachable:
        print(f"MLflow tracking store {tracker.uri} cannot be reached: {res.unreachable}", file=sys.stderr)
    if res.failed:
        print(f"MLflow tracking store {tracker.uri} failed: {res.failed}", file=sys.stderr)
    print(f"{res.not_logged} of {res.records} record(s) not logged", file=sys.stderr)
    return 2 if res.unreachable else 1


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    try:
        cfg = compose(args.overrides)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(to_container(cfg), sort_keys=False), end="")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    """Print a stage's results (latest record per point; for evaluate, per configuration) as markdown or CSV."""
    import csv

    from inferlab.bench.aggregate import MARKDOWN_COLUMNS, markdown, stage_rows
    from inferlab.quality import stage as quality

    if args.stage == quality.STAGE:  # one row per configuration: its scores (figures of its own shape)
        rows, columns = quality.quality_rows(project_root() / "results"), quality.QUALITY_COLUMNS
    else:
        rows, columns = stage_rows(project_root() / "results", args.stage), MARKDOWN_COLUMNS
    if args.model:
        rows = [r for r in rows if r["model"] == args.model]
    if not rows:
        print(f"no records for {args.stage} under results/{args.stage}/", file=sys.stderr)
        return 1
    if args.format == "csv":
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    else:
        print(markdown(rows, tuple(args.columns.split(",")) if args.columns else columns))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    """Rewrite metrics/<stage>.json and metrics/plots/<stage>.csv from the records (e.g. after copying records
    from another machine)."""
    from inferlab.bench.aggregate import write_aggregates
    from inferlab.quality import stage as quality

    cfg = compose([])
    for stage in args.stages:
        if stage == quality.STAGE:
            quality.write_aggregates(cfg)
            print("metrics/quality.json and metrics/plots/quality.csv written from results/evaluate/")
            continue
        write_aggregates(cfg, stage)
        print(f"metrics/{stage}.json and metrics/plots/{stage}.csv written from results/{stage}/")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """`dvc exp run` with each override as -S, and this environment's tools first on PATH (the stages call
    `python`), so the study runs from the virtual environment without activating it."""
    import os
    import subprocess

    hydra_overrides = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]  # not DVC's file:key=value
    try:  # the config DVC would compose, checked first: a bad key or value fails now, before DVC runs anything
        compose(hydra_overrides)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "dvc"), "exp", "run", *[a for o in args.overrides for a in ("-S", o)], *args.dvc_args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env, cwd=project_root())


def cmd_parallel_check(args: argparse.Namespace) -> int:
    """Points measured beside other GPUs against the same points measured alone (exit 1 beyond tolerance)."""
    from inferlab.bench.parallel import compare

    rows = compare(project_root() / "results", args.stage, args.tolerance)
    if not rows:
        print(f"no point of {args.stage} was measured both alone and beside another GPU", file=sys.stderr)
        return 2
    print(f"| point | GPU | beside | decode tok/s alone | parallel | ratio | total tok/s alone | parallel | ratio "
          f"| within ±{args.tolerance:.0%} |\n|" + "---|" * 10)
    for r in rows:
        print(f"| {r['name']} | {r['gpu']} | {r['beside']} | {r.get('decode_tps_alone', 0):.1f} | "
              f"{r.get('decode_tps_parallel', 0):.1f} | {r.get('decode_tps_ratio', 0):.3f} | "
              f"{r.get('total_tps_alone', 0):.1f} | {r.get('total_tps_parallel', 0):.1f} | "
              f"{r.get('total_tps_ratio', 0):.3f} | {'yes' if r['within_tolerance'] else 'NO'} |")
    return 0 if all(r["within_tolerance"] for r in rows) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    from inferlab.serve.server import main as serve_main

    return serve_main(args.overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    from inferlab.serve.demo import main as demo_main

    return demo_main(args.demo_args)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from inferlab.serve.loadtest import main as loadtest_main

    return loadtest_main(args.loadtest_args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="inferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("log-records", help="log records (JSONL) to MLflow; runs already there are skipped")
    p.add_argument("paths", nargs="*", help="record files or folders (default: every results/<stage>/*.jsonl)")
    p.add_argument("--experiments", action="store_true", help="also results/experiments/ (records moved out)")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
    p.add_argument("--experiment", default="inferlab")
    p.set_defaults(fn=cmd_log_records)

    p = sub.add_parser("config", help="print the resolved configuration for Hydra overrides")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny-phi convert.quants=[q8_0]")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("results", help="a benchmark stage's results as markdown or CSV, from the records")
    p.add_argument("stage", choices=["bench_cpu", "bench_gpu", "evaluate", "serve_bench"])
    p.add_argument("--model", default=None)
    p.add_argument("--format", choices=["md", "csv"], default="md")
    p.add_argument("--columns", default=None, help="comma-separated columns (markdown)")
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("aggregate", help="rewrite a stage's metrics files from its records")
    p.add_argument("stages", nargs="+", choices=["bench_cpu", "bench_gpu", "evaluate", "serve_bench"])
    p.set_defaults(fn=cmd_aggregate)

    p = sub.add_parser("study", help="run the study as a DVC experiment: inferlab study model=tiny-phi ...")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, passed to `dvc exp run` as -S")
    p.add_argument("--dvc-args", nargs=argparse.REMAINDER, default=[], help="further arguments for dvc exp run")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("parallel-check", help="points measured beside other GPUs against the same points alone")
    p.add_argument("stage", nargs="?", default="bench_gpu")
    p.add_argument("--tolerance", type=float, default=0.05)
    p.set_defaults(fn=cmd_parallel_check)

    p = sub.add_parser("serve", help="serve the recommended configuration: OpenAI-compatible API, demo under /ui")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny-phi serve.port=8001")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("demo", help="the Gradio demo alone, against a running server (--url, --api-key, --port)")
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("loadtest", help="drive a running server with concurrent streaming clients (--url, "
                                         "--concurrency 1,4, --requests, --max-tokens)")
    p.add_argument("loadtest_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_loadtest)

    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
