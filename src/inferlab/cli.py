"""The `inferlab` command: helpers around the pipeline (stages run through DVC or Hydra)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from inferlab.config import (
    ConfigError,
    TrackingConfig,
    compose,
    project_root,
    resolve,
    to_container,
)


def results_dir() -> Path:
    """The configured results folder (paths.results)."""
    return resolve(compose([]).paths.results)


def record_paths(given: list[str], experiments: bool) -> list[Path]:
    """The record files to log: every results/<stage>/*.jsonl by default; a folder given: its
    own *.jsonl and its stages' record files; a file given: that file. Never the evaluate
    stage's per-sample outputs."""
    from inferlab.records import record_files

    if not given:
        return record_files(results_dir(), experiments)
    out: list[Path] = []
    for p in map(Path, given):
        out += [*sorted(p.glob("*.jsonl")), *record_files(p, experiments)] if p.is_dir() else [p]
    return list(dict.fromkeys(out))


def cmd_log_records(args: argparse.Namespace) -> int:
    from inferlab.records import read_all
    from inferlab.tracking import Tracker, check_reachable

    paths = record_paths(args.paths, args.experiments)
    garbled: list[str] = []
    records = read_all(paths, garbled)
    for line in garbled:
        print(f"unreadable record: {line}", file=sys.stderr)
    if not records:
        print(f"no records in {', '.join(map(str, paths)) or 'results/'}", file=sys.stderr)
        return 1
    tracker = Tracker(TrackingConfig(uri=args.uri, experiment=args.experiment))
    problem = check_reachable(tracker.uri, tracker.cfg.timeout_s)
    if problem:
        print(f"MLflow tracking store {tracker.uri} cannot be reached: {problem}", file=sys.stderr)
        return 2
    res = tracker.log(records)
    line = (f"{len(records)} record(s) read from {len(paths)} file(s); {res.created} new "
            f"MLflow run(s) at {tracker.uri}, {res.present} already there")
    if res.replaced or res.duplicates:
        line += (f" ({res.replaced} unfinished run(s) of an earlier logger replaced, "
                 f"{res.duplicates} duplicate run(s) of a logger at the same time deleted)")
    print(line + ("; nothing new to log" if res.ok and not res.created else ""))
    if garbled:
        print(f"{len(garbled)} unreadable record line(s), named above, were not logged: repair "
              "or remove them", file=sys.stderr)
    if res.ok:
        return 1 if garbled else 0
    for name, why in res.rejected[:20]:
        print(f"rejected: {name}: {why}", file=sys.stderr)
    if len(res.rejected) > 20:
        print(f"... and {len(res.rejected) - 20} more rejected", file=sys.stderr)
    if res.pending:
        print(f"{len(res.pending)} record(s) were still being logged by another process: rerun "
              "to check", file=sys.stderr)
    if res.unreachable:
        print(f"MLflow tracking store {tracker.uri} cannot be reached: {res.unreachable}",
              file=sys.stderr)
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
    """Print a stage's results as markdown or CSV (the latest record per point, or config)."""
    import csv

    from inferlab.aggregate import QUALITY_STAGE, markdown, stage_rows
    from inferlab.fields import MARKDOWN_COLUMNS, QUALITY_COLUMNS

    # evaluate: one row per configuration, its scores (figures of its own shape)
    columns = QUALITY_COLUMNS if args.stage == QUALITY_STAGE else MARKDOWN_COLUMNS
    rows = stage_rows(results_dir(), args.stage)
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
    """Rewrite metrics/<stage>.json and metrics/plots/<stage>.csv from the records (e.g. after
    copying records from another machine)."""
    from inferlab.aggregate import METRICS_NAMES, write_aggregates
    from inferlab.serve.loadtest import STAGE as SERVE_BENCH
    from inferlab.serve.loadtest import summarize_stage

    cfg = compose([])
    for stage in args.stages:
        # with each served configuration's saturation point, as the stage writes it
        if stage == SERVE_BENCH:
            summarize_stage(cfg, None)
        else:
            write_aggregates(cfg, stage)
        name = METRICS_NAMES.get(stage, stage)
        print(f"metrics/{name}.json and metrics/plots/{name}.csv written from results/{stage}/")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """`dvc exp run` with each override as -S, and this environment's tools first on PATH (the
    stages call `python`), so the study runs from the virtual environment without activating it.
    The terminal shows the stages, points done / left with the time left, warnings and the
    answer; the full output goes to a log file (--verbose: everything on the terminal too)."""
    import datetime as dt
    import os
    import subprocess

    # not DVC's file:key=value
    hydra_overrides = [o for o in args.overrides if ":" not in o.split("=", 1)[0]]
    # the config DVC would compose, checked first: a bad key or value fails now, before DVC runs
    # anything
    try:
        compose(hydra_overrides)
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2

    import yaml

    from inferlab.console import StudyConsole

    root = project_root()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"}
    sets = [a for o in args.overrides for a in ("-S", o)]
    cmd = [str(bin_dir / "dvc"), "exp", "run", *sets, *args.dvc_args]
    print("+", " ".join(cmd), flush=True)
    if args.verbose:
        return subprocess.call(cmd, env=env, cwd=root)
    log_path = root / "outputs" / f"study-{dt.datetime.now():%Y%m%d-%H%M%S}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    stages = list(yaml.safe_load((root / "dvc.yaml").read_text()).get("stages", {}))
    console = StudyConsole(stages, sys.stdout)
    console.say(f"the full output goes to {log_path.relative_to(root)}")
    tail: list[str] = []
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            tail = [*tail[-59:], line]
            console.feed(line)
        rc = proc.wait()
    from inferlab.config import PathsConfig

    # the study's metrics folder (paths.metrics in params.yaml wins)
    metrics = root / PathsConfig().metrics
    params = root / "params.yaml"
    if params.is_file():
        configured = yaml.safe_load(params.read_text()).get("paths", {}).get("metrics")
        metrics = root / (configured or metrics)
    console.finish(rc, metrics, log_path.relative_to(root), tail)
    return rc


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _fmt_s(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def cmd_parallel_check(args: argparse.Namespace) -> int:
    """Points measured beside other GPUs against the same points measured alone, from the
    records under the configured results folder (paths.results); exit 1 when a point moved or
    the parallel run took too long."""
    from inferlab.bench.parallel import FIGURES, compare, runs
    from inferlab.config import resolve

    stages = [a for a in args.items if "=" not in a]
    if len(stages) > 1:
        print(f"parallel-check takes one stage, got {', '.join(stages)}", file=sys.stderr)
        return 2
    stage = stages[0] if stages else "bench_gpu"
    try:
        cfg = compose([a for a in args.items if "=" in a])
    except ConfigError as e:
        print(f"invalid configuration: {e}", file=sys.stderr)
        return 2
    results = resolve(cfg.paths.results)
    rows = compare(results, stage, args.tolerance)
    if not rows:
        print(f"no point of {stage} under {results / stage} was measured both alone and beside "
              "another GPU", file=sys.stderr)
        return 2
    info = runs(results, stage, rows)
    print(f"parallel-check {stage}: {len(rows)} point(s) measured alone and in a parallel run, "
          f"records in {results / stage}")
    for side in ("parallel", "alone"):
        for s in info[side]:
            print(f"- {side} run {s['sweep_id']}: {len(s['points'])} points on "
                  f"{','.join(s['gpus'])}, GPUs busy {_fmt_s(s['seconds'])}")
    ratio = info["time_ratio"]
    slow = ratio is not None and args.max_time_ratio is not None and ratio > args.max_time_ratio
    if ratio is not None:
        asked = args.max_time_ratio
        limit = f" (at most {asked:.2f} asked)" if asked is not None else ""
        print(f"- parallel/alone time: {ratio:.2f}{limit}")
    elif args.max_time_ratio is not None:
        print("- parallel/alone time: not comparable (not one parallel and one alone run over "
              "the same points)")
    print("\nratio: parallel/alone median; spread: (max - min) / median of a run's "
          "repetitions; a point moved when a ratio is off 1 by more than "
          f"±{args.tolerance:.0%} or its wider spread\n")
    head = "| point | GPU alone | GPU parallel | beside |"
    for label in FIGURES.values():
        head += f" {label} alone (spread) | parallel (spread) | ratio | allowed |"
    print(head + " moved |\n|" + "---|" * (5 + 4 * len(FIGURES)))
    for r in rows:
        cells = [r["name"], r["gpu_alone"], r["gpu"], r["beside"]]
        for f in FIGURES:
            c = r.get(f)
            if c is None:
                cells += ["-"] * 4
                continue
            cells += [f"{c['alone']:.1f} ({_pct(c['alone_spread'])})",
                      f"{c['parallel']:.1f} ({_pct(c['parallel_spread'])})", f"{c['ratio']:.3f}",
                      f"±{_pct(c['allowed'])}"]
        print("| " + " | ".join(cells) + f" | {'MOVED' if r['moved'] else 'no'} |")
    moved = [r for r in rows if r["moved"]]
    if moved:
        named = "; ".join(f"{r['name']} on {r['gpu']} (" + ", ".join(
            f"{FIGURES[f]} x{r[f]['ratio']:.3f}, allowed ±{_pct(r[f]['allowed'])}"
            for f in r["moved"]) + ")" for r in moved)
        print(f"\nparallel-check FAILED: {len(moved)} of {len(rows)} points moved beside "
              f"another GPU: {named}", file=sys.stderr)
    if slow:
        print(f"parallel-check FAILED: the parallel run took {ratio:.2f} of the alone run's "
              f"time, more than {args.max_time_ratio:.2f}", file=sys.stderr)
    if not moved and not slow:
        print(f"\nparallel-check passed: all {len(rows)} points within their tolerance")
    return 1 if moved or slow else 0


def runs_url(base: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's UI, in its "Model training" view.

    MLflow 3.17's UI ignores the experiment's kind tag and opens its GenAI view unless the link
    (or the browser's last choice) says workflowType=machine_learning."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def cmd_ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from inferlab.tracking import tracking_uri
    from inferlab.tracking.store import SQLITE

    cfg = compose([]).tracking
    name = args.experiment or cfg.experiment
    uri = tracking_uri(TrackingConfig(uri=args.uri, experiment=name))
    if uri.startswith(SQLITE) and not Path(uri[len(SQLITE):]).is_file():
        print(f"no MLflow store at {uri}: run a stage (or `inferlab log-records`) first", file=sys.stderr)
        return 1
    from mlflow import MlflowClient

    try:
        exp = MlflowClient(tracking_uri=uri).get_experiment_by_name(name)
    except Exception as e:  # noqa: BLE001 - any store failure is reported the same way
        print(f"MLflow tracking store {uri} cannot be read: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if exp is None:
        print(f"no experiment '{name}' in {uri}: run a stage (or `inferlab log-records`) first",
              file=sys.stderr)
        return 1
    if uri.startswith(("http://", "https://")):  # a server already serves its UI
        print(f"open {runs_url(uri, exp.experiment_id)}")
        return 0
    print(f"MLflow UI of {uri}, experiment '{name}': open "
          f"{runs_url(f'http://{args.host}:{args.port}', exp.experiment_id)} (Ctrl+C stops it)", flush=True)
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow_bin), "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    return subprocess.call(cmd, env={**os.environ, "MLFLOW_TRACKING_URI": uri})


def cmd_serve(args: argparse.Namespace) -> int:
    from inferlab.serve.server import main as serve_main

    return serve_main(args.overrides)


def cmd_demo(args: argparse.Namespace) -> int:
    from inferlab.serve.demo import main as demo_main

    return demo_main(args.demo_args)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from inferlab.serve.loadgen import main as loadtest_main

    return loadtest_main(args.loadtest_args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="inferlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("log-records",
                       help="log records (JSONL) to MLflow; runs already there are skipped")
    p.add_argument("paths", nargs="*",
                   help="record files or folders (default: every results/<stage>/*.jsonl)")
    p.add_argument("--experiments", action="store_true",
                   help="also results/experiments/ (records moved out)")
    p.add_argument("--uri", default=None,
                   help="tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
    p.add_argument("--experiment", default="inferlab")
    p.set_defaults(fn=cmd_log_records)

    p = sub.add_parser("config", help="print the resolved configuration for Hydra overrides")
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides, e.g. model=tiny-phi convert.quants=[q8_0]")
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("results",
                       help="a benchmark stage's results as markdown or CSV, from the records")
    p.add_argument("stage", choices=["bench_cpu", "bench_gpu", "evaluate", "serve_bench"])
    p.add_argument("--model", default=None)
    p.add_argument("--format", choices=["md", "csv"], default="md")
    p.add_argument("--columns", default=None, help="comma-separated columns (markdown)")
    p.set_defaults(fn=cmd_results)

    p = sub.add_parser("aggregate", help="rewrite a stage's metrics files from its records")
    p.add_argument("stages", nargs="+",
                   choices=["bench_cpu", "bench_gpu", "evaluate", "serve_bench"])
    p.set_defaults(fn=cmd_aggregate)

    p = sub.add_parser("study",
                       help="run the study as a DVC experiment: inferlab study model=tiny-phi ...")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, passed to `dvc exp run` as -S")
    p.add_argument("--verbose", action="store_true",
                   help="every line the stages print, not a summary")
    p.add_argument("--dvc-args", nargs=argparse.REMAINDER, default=[],
                   help="further arguments for dvc exp run")
    p.set_defaults(fn=cmd_study)

    p = sub.add_parser("parallel-check",
                       help="points measured beside other GPUs against the same points alone")
    p.add_argument("items", nargs="*", metavar="STAGE|OVERRIDE",
                   help="the stage (default bench_gpu) and Hydra overrides, "
                        "e.g. paths.results=gpu-work/results")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="allowed deviation where a point's spread is less")
    p.add_argument("--max-time-ratio", type=float, default=None,
                   help="also fail when the parallel run took more than this fraction "
                        "of the alone run's time")
    p.set_defaults(fn=cmd_parallel_check)

    p = sub.add_parser("serve",
                       help="serve the recommended configuration: OpenAI-compatible API, "
                            "demo under /ui")
    p.add_argument("overrides", nargs="*",
                   help="Hydra overrides, e.g. model=tiny-phi serve.port=8001")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("ui", help="the MLflow UI on the study's store; prints the link to its runs")
    p.add_argument("--uri", default=None, help="tracking URI (default: $MLFLOW_TRACKING_URI, else mlflow.db)")
    p.add_argument("--experiment", default=None, help="experiment name (default: tracking.experiment)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)

    p = sub.add_parser("demo",
                       help="the Gradio demo alone, against a running server "
                            "(--url, --api-key, --port)")
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("loadtest",
                       help="drive a running server with concurrent streaming clients "
                            "(--url, --concurrency 1,4, --requests, --max-tokens)")
    p.add_argument("loadtest_args", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_loadtest)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # their own options (--url ...) go to their own parsers, in any order
        return cmd_demo(argparse.Namespace(demo_args=argv[1:]))
    if argv[:1] == ["loadtest"]:
        return cmd_loadtest(argparse.Namespace(loadtest_args=argv[1:]))
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
