"""The pipeline for real: DVC experiments and repro in a temporary git repository, Hydra multirun, and the
same record from both paths for the same config."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from inferlab import records
from inferlab.environment import hardware
from inferlab.stage import READS_ENV

from .conftest import copy_project, run
from .test_dependencies import check_config_reads
from .test_report import bench, score

pytestmark = pytest.mark.slow


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERLAB_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = copy_project(tmp_path / "repo")
    (p / ".gitignore").write_text((__import__("pathlib").Path(__file__).parents[1] / ".gitignore").read_text())
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "init"]):
        run(cmd, cwd=p)
    return p


SMALL_BENCH = ["runtime=llama_cpp", "quant=q8_0", "bench_cpu.prompt_cache.enabled=false",
               "bench_cpu.workload.new_tokens=8", "bench_cpu.workload.repetitions=2", "bench_cpu.workload.warmup=0",
               "evaluate.dataset.limit=2", "serve_bench.concurrency=[1,2]", "serve_bench.requests=4",
               "serve_bench.max_tokens=8", "serve_bench.warmup=1", "serve_bench.rate_fractions=[1.0]",
               "serve_bench.rate_requests=4"]


def test_dvc_experiment_then_repro_changes_nothing_and_multirun(repo):
    reads = repo.parent / "config-reads"
    r = run([sys.executable, "-m", "inferlab.cli", "study", "model=tiny-phi", "convert.quants=[q8_0]", *SMALL_BENCH],
            cwd=repo, env={READS_ENV: str(reads)})
    assert "Ran experiment" in r.stdout + r.stderr
    check_config_reads(reads)  # every stage read only config keys that dvc.yaml lists as its params
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["model"]["name"] == "tiny-phi" and params["convert"]["quants"] == ["q8_0"]
    gguf = repo / "models" / "tiny-phi" / "gguf"
    assert sorted(p.name for p in gguf.iterdir()) == ["tiny-phi-f16.gguf", "tiny-phi-f32.gguf", "tiny-phi-q8_0.gguf"]
    metrics = json.loads((repo / "metrics" / "gguf.json").read_text())
    assert set(metrics["types"]) == {"f32", "f16", "q8_0"}  # F32: llama.cpp's reference in the evaluate stage

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("inferlab")
    runs = client.search_runs([exp.experiment_id])
    stages = {r.data.tags["inferlab.stage"] for r in runs}
    # bench_gpu too: its llama.cpp points match the pins and are recorded as skipped here (no CUDA)
    assert stages == {"download", "convert", "bench_cpu", "bench_gpu", "evaluate", "report", "serve_bench"}
    gpu = records.read_all((repo / "results" / "bench_gpu").glob("*.jsonl"))
    assert len(gpu) == 1 and gpu[0].name.startswith("gpu-q8_0-t") and gpu[0].status == "skipped"
    # the served configuration under load: one record per concurrency level and per rate, every request answered
    served = [r for r in records.read_all((repo / "results" / "serve_bench").glob("*.jsonl"))]
    closed = [r for r in served if r.point["scenario"] == "serving"]
    assert sorted(r.point["concurrency"] for r in closed) == [1, 2] and all(r.status == "ok" for r in served)
    assert all(r.metrics["errors"] == 0 and r.metrics["ok"] == 4 and r.point["quant"] == "q8_0" for r in served)
    # each record says what the server said it served (the pinned quant, not the recommendation's settings)
    assert all(r.metrics["served"]["model_file"] == "tiny-phi-q8_0.gguf" and "settings" not in r.point for r in served)
    (opened,) = [r for r in served if r.point["scenario"] == "serving-rate"]
    assert opened.point["rate_fraction"] == 1.0 and opened.metrics["offered_rate"] > 0
    (hw,) = json.loads((repo / "metrics" / "serve_bench.json").read_text()).values()
    assert "q8_0" in next(iter(hw["models"]["tiny-phi"]["saturation"]))
    assert (repo / "metrics" / "plots" / "serve_bench_rates.png").stat().st_size > 10_000
    # the study ends with its answer: the report, the recommendation, figures
    md = (repo / "metrics" / "report.md").read_text()
    assert "## The answer" in md and "## tiny-phi on " in md
    (answer,) = json.loads((repo / "metrics" / "recommendation.json").read_text())["recommendations"]
    assert answer["model"] == "tiny-phi" and answer["candidates"] >= 1
    assert list((repo / "metrics" / "figures").glob("*--tiny-phi--throughput.png"))
    quality = json.loads((repo / "metrics" / "quality.json").read_text())
    configs = next(iter(quality.values()))["tiny-phi"]["configs"]
    # the pins left q8_0, and its reference (llama.cpp's F32 file) ran first in the same sweep all the same
    assert configs["llama-f32-kvf16"]["status"] == "ok" and configs["llama-f32-kvf16"]["reference"] == "itself"
    q8 = configs["llama-q8_0-kvf16"]
    assert q8["status"] == "ok" and q8["reference"] == "llama-f32-kvf16" and q8["kl_ci_low"] <= q8["kl_mean"]
    assert {r.info.run_name for r in runs if r.data.tags["inferlab.kind"] == "point"} >= {"tiny-phi", "f16", "q8_0"}

    lock = (repo / "dvc.lock").read_text()
    mtime = (gguf / "tiny-phi-q8_0.gguf").stat().st_mtime
    r = run(["dvc", "repro"], cwd=repo)
    assert "didn't change" in r.stdout and "Running stage" not in r.stdout
    assert (repo / "dvc.lock").read_text() == lock and (gguf / "tiny-phi-q8_0.gguf").stat().st_mtime == mtime
    status = run(["dvc", "status"], cwd=repo)
    assert "up to date" in status.stdout


    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=repo).stdout)
    exps = [e for commit in shown for e in (commit.get("experiments") or [])]
    assert exps, shown
    quants = [rev["data"]["params"]["params.yaml"]["data"]["convert"]["quants"]
              for e in exps for rev in e["revs"]]
    assert ["q8_0"] in quants

    # DVC remote storage: the large outputs (checkpoint, GGUF files) pushed to a local-path remote and pulled into
    # a fresh clone, which then has nothing to reproduce
    remote = repo.parent / "dvc-remote"
    run(["dvc", "remote", "add", "-d", "store", str(remote)], cwd=repo)
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-q", "-m", "study"], cwd=repo)
    run(["dvc", "push"], cwd=repo)
    clone = repo.parent / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], cwd=repo.parent)
    assert not (clone / "models").exists()
    run(["dvc", "pull"], cwd=clone)
    pulled = clone / "models" / "tiny-phi" / "gguf" / "tiny-phi-q8_0.gguf"
    assert pulled.read_bytes() == (gguf / "tiny-phi-q8_0.gguf").read_bytes()
    assert (clone / "models" / "tiny-phi" / "hf" / "model.safetensors").exists()
    r = run(["dvc", "repro"], cwd=clone)
    assert "Running stage" not in r.stdout and "didn't change" in r.stdout
    assert "up to date" in run(["dvc", "status"], cwd=clone).stdout
    # `inferlab aggregate` rewrites a stage's metrics from its records as the stage wrote them (serve_bench's
    # saturation points included)
    served = json.loads((clone / "metrics" / "serve_bench.json").read_text())
    run([sys.executable, "-m", "inferlab.cli", "aggregate", "serve_bench", "bench_cpu"], cwd=clone)
    assert json.loads((clone / "metrics" / "serve_bench.json").read_text()) == served

    # Hydra multirun of the same stage script, outside DVC
    r = run([sys.executable, "stages/convert.py", "-m", "model=tiny-phi", "convert.quants=[q8_0],[q4_0]"], cwd=repo)
    assert "#0 : model=tiny-phi convert.quants=[q8_0]" in r.stdout + r.stderr
    assert "#1 : model=tiny-phi convert.quants=[q4_0]" in r.stdout + r.stderr
    recs = records.read_all((repo / "results" / "convert").glob("*.jsonl"))
    assert len({x.sweep_id for x in recs}) == 2  # DVC's run, and the multirun (its jobs share one sweep)
    q8 = [x for x in recs if x.name == "q8_0"]
    # the DVC stage and the Hydra job ran the same config: the same point, the same resolved config
    assert len(q8) == 2 and q8[0].point_id == q8[1].point_id and q8[0].config == q8[1].config
    assert (gguf / "tiny-phi-q4_0.gguf").exists()

    # the CPU benchmark: the DVC stage's records and a Hydra multirun of the same points agree
    dvc_recs = records.read_all((repo / "results" / "bench_cpu").glob("*.jsonl"))
    threads = sorted(r.point["n_threads"] for r in dvc_recs)
    assert dvc_recs and all(r.status == "ok" for r in dvc_recs) and threads == sorted(set(threads))
    assert (repo / "metrics" / "bench_cpu.json").exists() and (repo / "metrics" / "plots" / "bench_cpu.csv").exists()
    run([sys.executable, "stages/bench_cpu.py", "-m", "model=tiny-phi", *SMALL_BENCH,
         f"n_threads={','.join(map(str, threads))}"], cwd=repo)
    hydra_recs = [r for r in records.read_all((repo / "results" / "bench_cpu").glob("*.jsonl"))
                  if r.sweep_id not in {d.sweep_id for d in dvc_recs}]
    assert len(hydra_recs) == len(dvc_recs) and len({r.sweep_id for r in hydra_recs}) == 1  # one parent per sweep
    assert sorted(r.point_id for r in hydra_recs) == sorted(r.point_id for r in dvc_recs)
    for h in hydra_recs:
        d = next(x for x in dvc_recs if x.point_id == h.point_id)
        assert h.point == d.point and h.name == d.name and h.model == d.model

    # DVC metrics and plots between commits: the first commit (no results yet) against the study's
    first = run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=repo).stdout.strip()
    diff = json.loads(run(["dvc", "metrics", "diff", first, "--json"], cwd=repo).stdout)
    assert list(diff) == ["metrics/answer.json"]  # the DVC metrics: the answer; the per-point tables are plots
    plots = json.loads(run(["dvc", "plots", "diff", first, "--json"], cwd=repo).stdout)["data"]
    assert "quality_vs_speed" in plots and any(k.startswith("metrics/figures/") for k in plots)


def queue_workers(repo: Path) -> list[int]:
    """The pids of DVC's queue workers that are alive."""
    alive = []
    for pidfile in (repo / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(OSError, ValueError):  # gone, or its file half-written
            pid = int(pidfile.read_text())
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                alive.append(pid)
    return alive


def wait_for_queue(repo: Path, workers_log: Path) -> str:
    """`dvc queue status` once nothing is queued or running: as long as it takes on this machine while a worker
    lives to run them; a queue left with work and no live worker fails at once."""
    seen_worker = False
    while True:
        status = run(["dvc", "queue", "status"], cwd=repo).stdout
        if "Queued" not in status and "Running" not in status:
            return status
        seen_worker = seen_worker or bool(queue_workers(repo))
        if seen_worker and not queue_workers(repo):
            status = run(["dvc", "queue", "status"], cwd=repo).stdout  # it may have finished just now
            assert "Queued" not in status and "Running" not in status, (
                f"no queue worker left, the queue still has work:\n{status}\n{workers_log.read_text()[-3000:]}")
            return status
        time.sleep(3)


def test_queued_experiments_sweep_the_cpu_stage(repo):
    """`dvc exp run --queue -S ...` sweeps run by two queue workers at once: each queued experiment runs in its own
    copy of the workspace, its MLflow runs land in the repository's store (DVC_ROOT), and the device lock keeps
    their measurements from overlapping."""
    common = ["-S", "model=tiny-phi", "-S", "convert.quants=[q8_0]", *[a for o in SMALL_BENCH for a in ("-S", o)]]
    for t in (1, 2):
        run(["dvc", "exp", "run", "--queue", *common, "-S", f"n_threads={t}"], cwd=repo)
    workers = repo.parent / "queue-workers.log"
    run(["dvc", "queue", "start", "-j", "2"], cwd=repo, output=workers)  # two workers: both experiments at once
    status = wait_for_queue(repo, workers)
    # a worker can miss the queue's shutdown and stay, idle (seen once: it logged "shutting down due to empty queue"
    # while its task still ran; `dvc queue stop` did not end it either): end what is left once the queue is done
    for pid in queue_workers(repo):
        with contextlib.suppress(OSError):  # gone already
            os.kill(pid, signal.SIGTERM)
    assert status.count("Success") == 2, status
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=repo).stdout)
    exps = [rev for commit in shown for e in (commit.get("experiments") or []) for rev in e["revs"]]
    threads = sorted(rev["data"]["params"]["params.yaml"]["data"]["n_threads"] for rev in exps)
    assert threads == [1, 2]
    for rev in exps:
        assert "metrics/answer.json" in rev["data"]["metrics"]
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("inferlab").experiment_id],
                              filter_string="tags.`inferlab.stage` = 'bench_cpu' and tags.`inferlab.kind` = 'point'")
    assert sorted(int(r.data.params["point.n_threads"]) for r in runs) == [1, 2]


def test_dvc_metrics_show_and_exp_show_fit_200_columns_and_show_the_answer(repo):
    """DVC's own views after an experiment of the quick study's configuration: `dvc metrics show` is the answer in
    one row, `dvc exp show --only-changed` in a 200-column terminal shows its figures (the parameters that differ
    follow, folded by DVC where they do not fit), and `dvc metrics diff` lists what changed in it."""
    here, results = hardware()["id"], repo / "results"
    long = "hf-int4-inductor-b1-static-sdpa-compiled-block-triton-graph"  # the longest kind of name a point has
    for name, precision, tps in ((long, "int4", 40.0), ("hf-fp32-b1", "fp32", 20.0)):
        bench(results, here, name, precision, 1, tps, 300, 60, 1.0, stage="bench_cpu", model="smollm2-135m")
    for precision, kl in (("fp32", 0.0), ("int4", 0.0123)):
        score(results, here, precision, kl, model="smollm2-135m", device="cpu", weights="real")
    for hw in ("h200", "h200x2", "h100-80gb-hbm3"):  # other machines' records, shipped in git
        bench(results, hw, "fp16-b64", "fp16", 64, 3400, 65, 19, 9.0, model="phi-2-random")
    run(["git", "add", "-A"], cwd=repo)
    run(["git", "commit", "-q", "-m", "records"], cwd=repo)
    run(["dvc", "exp", "run", "-s", "report", "-S", "model=smollm2-135m", "-S", "preset=quick",
         "-S", "report.constraints.max_kl=null"], cwd=repo)
    shown = run(["dvc", "metrics", "show"], cwd=repo).stdout
    exps = run(["dvc", "exp", "show", "--only-changed", "--no-pager"], cwd=repo, env={"COLUMNS": "200"}).stdout
    diff = run(["dvc", "metrics", "diff"], cwd=repo).stdout
    for out in (shown, exps, diff):
        assert max(map(len, out.splitlines())) <= 200, out
    assert [line.split()[0] for line in shown.splitlines()] == ["Path", "metrics/answer.json"]
    for figure in ("total_tps", "ttft_ms", "itl_p90_ms", "memory_gib"):
        assert figure in shown.splitlines()[0] and figure in exps and figure in diff
    assert long in shown and long in diff  # the whole answer, its configuration's name too
    workspace = next(line.split() for line in exps.splitlines() if "workspace" in line)
    assert workspace[1:8] == ["-", "40", "300", "60", "1", "0.0123", "0.9877"]  # its figures first, never folded
