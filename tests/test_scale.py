"""Scaling out and surviving faults, for real: Hydra's submitit launchers, a remote MLflow server on 127.0.0.1, a
sweep killed with SIGKILL and resumed, concurrent writers, unwritable or full storage, the device lock."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from inferlab import records as rec
from inferlab.serve.loadtest import free_port

from .conftest import mlflow_server, run

pytestmark = pytest.mark.slow

TINY_SWEEP = ["model=tiny-phi", "runtime=llama_cpp", "bench_cpu.prompt_cache.enabled=false",
              "bench_cpu.workload.new_tokens=8", "bench_cpu.workload.repetitions=2", "bench_cpu.workload.warmup=0",
              "tracking.enabled=false"]


def _env(project: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "INFERLAB_ROOT": str(project), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def test_submitit_local_runs_every_point_in_its_own_process(tiny_project):
    before = {r.record_id for r in rec.read_all((tiny_project / "results" / "bench_cpu").glob("*.jsonl"))}
    r = run([sys.executable, "stages/bench_cpu.py", "-m", "hydra/launcher=submitit_local", *TINY_SWEEP,
             "quant=q8_0,q4_0", "n_threads=1"], cwd=tiny_project, env=_env(tiny_project))
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    new = [x for x in rec.read_all((tiny_project / "results" / "bench_cpu").glob("*.jsonl"))
           if x.record_id not in before]
    assert sorted(x.point["quant"] for x in new) == ["q4_0", "q8_0"] and all(x.status == "ok" for x in new)
    assert len({x.sweep_id for x in new}) == 1  # the jobs of one multirun share one sweep (one MLflow parent)
    for x in new:  # measured in the worker process of its own job, one device at a time
        assert x.metrics["peak_rss_mib"] > 0 and x.metrics["device_lock"]["device"] == "cpu"
    sweep_dir = max((tiny_project / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)
    jobs = [p for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and p.name.isdigit()]  # job ids
    assert len(jobs) == 2  # one submitit job (one process) per sweep point
    pids = set()
    for j in jobs:
        log = next(j.glob("*_log.out")).read_text() + next(j.glob("*_log.err")).read_text()
        assert "completed successfully" in log or "Exiting after successful completion" in log, log[-500:]
        pids.add(j.name)
    assert len(pids) == 2


@pytest.mark.parametrize("launcher", ["slurm_gpu", "slurm_cpu"])
def test_slurm_launcher_config_composes_and_submitit_accepts_it(tmp_path, monkeypatch, launcher):
    """The shipped Slurm launchers (conf/hydra/launcher/slurm_*.yaml): composed by Hydra, turned into a submitit
    Slurm executor the way the plugin does, and the sbatch script asks for one GPU per point (slurm_gpu) or none.
    Nothing is submitted (tests/test_slurm.py does, to a real slurmctld); submitit only checks that an `srun`
    exists, so a placeholder that refuses to run stands in for it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\necho 'not a Slurm cluster' >&2\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    import submitit
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from inferlab.config import conf_dir, register_configs

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "model=phi-2"], return_hydra_config=True)
    conf = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert conf["_target_"].endswith("SlurmLauncher")
    assert conf["gpus_per_node"] == (1 if launcher == "slurm_gpu" else None)
    params = {k: v for k, v in conf.items() if k not in ("_target_", "submitit_folder")}
    params["name"] = "bench_gpu"
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = {"timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
            "stderr_to_stdout"}
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python stages/bench_gpu.py", "uid")
    assert ("#SBATCH --gpus-per-node=1" in script) == (launcher == "slurm_gpu")
    assert "#SBATCH --ntasks-per-node=1" in script and f"#SBATCH --cpus-per-task={conf['cpus_per_task']}" in script
    assert f"#SBATCH --time={params['timeout_min']}" in script


def _log_records(uri: str, paths: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferlab.cli", "log-records", *map(str, paths), "--uri", uri,
                           "--experiment", "remote"], capture_output=True, text=True, timeout=300)


def test_remote_mlflow_server_logs_later_without_duplicates(tmp_path):
    from .test_tracking import make_records

    path = tmp_path / "records.jsonl"
    for r in make_records(sweep="convert-remote-1", n=3):
        rec.append(path, r)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    down = _log_records(uri, [path])  # the server is not up yet: nothing logged, the records stay
    assert down.returncode == 2 and "cannot be reached" in down.stderr
    with mlflow_server(tmp_path, port=port):
        up = _log_records(uri, [path])
        assert up.returncode == 0 and "3 new MLflow run(s)" in up.stdout, up.stdout + up.stderr
        again = _log_records(uri, [path])
        assert "0 new MLflow run(s)" in again.stdout
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("remote")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 4  # one parent, three points
        child = next(r for r in runs if r.data.tags["inferlab.kind"] == "point")
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # where the server says
        assert "record.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        stored = list((tmp_path / "artifacts").rglob("record.json"))
        assert len(stored) == 3 and json.loads(stored[0].read_text())["stage"] == "convert"


# 14 points: 3 quants x 2 thread counts and the one-setting-at-a-time variations
SWEEP14 = [*TINY_SWEEP, "bench_cpu.llama_cpp.quants=[q8_0,q4_k_m,q4_0]", "bench_cpu.llama_cpp.n_threads=[1,2]",
          "bench_cpu.workload.new_tokens=24", "bench_cpu.workload.repetitions=3"]


def test_sigkill_mid_sweep_keeps_finished_records_and_the_rerun_finishes_the_rest(tiny_project):
    path = tiny_project / "results" / "bench_cpu"
    before = {r.record_id for r in rec.read_all(path.glob("*.jsonl"))}
    proc = subprocess.Popen([sys.executable, "stages/bench_cpu.py", *SWEEP14], cwd=tiny_project,
                            env=_env(tiny_project), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        new = [r for r in rec.read_all(path.glob("*.jsonl")) if r.record_id not in before]
        if len(new) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its worker, in the middle of the next point
    proc.wait()
    lines = [line for f in path.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    for line in lines:
        json.loads(line)  # every line whole: nothing half-written
    killed = [r for r in rec.read_all(path.glob("*.jsonl")) if r.record_id not in before]
    assert len(killed) >= 2
    sweep = killed[0].sweep_id
    r = run([sys.executable, "stages/bench_cpu.py", *SWEEP14], cwd=tiny_project, env=_env(tiny_project))
    m = re.search(rf"resuming interrupted sweep {sweep}: {len(killed)} of (\d+) points already finished",
                  r.stdout + r.stderr)
    assert m, r.stdout[-2000:]
    total = int(m.group(1))
    assert f"{total - len(killed)} record(s) appended" in r.stdout + r.stderr  # only the missing points ran
    final = [x for x in rec.read_all(path.glob("*.jsonl")) if x.sweep_id == sweep]
    assert len(final) == total and len({x.point_id for x in final}) == total  # each point once: none redone or lost
    assert {x.record_id for x in killed} <= {x.record_id for x in final}
    assert not list((tiny_project / "metrics").glob(".*.tmp*")) and not list(path.glob(".*.jsonl.*"))


def _append_many(path: str, who: int, n: int) -> None:
    from .test_tracking import make_records

    for i in range(n):
        r = make_records(sweep=f"writer-{who}", n=2)[1]
        r.samples = {"pad": [float(i)] * 2000}  # ~20 KB lines: far beyond the pipe-atomic size
        rec.append(Path(path), r)


def test_two_writers_at_once_lose_nothing(tmp_path):
    path = tmp_path / "records.jsonl"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 150)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    got = list(rec.read(path))
    assert len(got) == 300 and len({r.record_id for r in got}) == 300
    assert {r.sweep_id for r in got} == {"writer-0", "writer-1"}


def test_unwritable_results_or_a_full_disk_fail_before_any_work(project):
    blocker = project / "not-a-folder"
    blocker.write_text("a file where a folder should be\n")
    env = _env(project)
    r = subprocess.run([sys.executable, "stages/bench_cpu.py", "model=tiny-phi", f"paths.results={blocker}/results"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"cannot start: paths.results: {blocker}/results is not writable" in r.stderr + r.stdout
    r = subprocess.run([sys.executable, "stages/download.py", "model=tiny-phi", "paths.min_free_mb=1000000000"],
                       cwd=project, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "MiB free on the disk of" in r.stderr + r.stdout
    assert "needs at least 1,000,000,000 MiB (paths.min_free_mb); nothing was run" in r.stderr + r.stdout
    assert not (project / "models" / "tiny-phi").exists()  # the model was never built


def _hold(key: str, seconds: float, out: str, barrier) -> None:
    from inferlab.sweep.locks import device_lock

    barrier.wait()  # all three ask for their lock at the same moment
    with device_lock(key) as waited:
        t0 = time.time()
        time.sleep(seconds)
        Path(out).write_text(json.dumps([t0, time.time(), waited]))


def test_device_lock_serialises_measurements_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("INFERLAB_LOCK_DIR", str(tmp_path))
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    outs = [tmp_path / f"{i}.json" for i in range(3)]
    keys = ["cpu", "cpu", "gpu-1"]
    procs = [ctx.Process(target=_hold, args=(k, 1.0, str(o), barrier)) for k, o in zip(keys, outs)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (a0, a1, aw), (b0, b1, bw), (g0, g1, gw) = (json.loads(o.read_text()) for o in outs)
    assert a1 <= b0 or b1 <= a0  # the two CPU holders never overlapped
    assert max(aw, bw) > 0.8  # one of them waited for the other to finish
    assert gw < 0.5  # another device's lock does not wait for them
