"""The sweep on a real Slurm cluster (slurmctld + slurmd on this machine, conftest.slurm_cluster): a Hydra multirun
of bench_cpu through conf/hydra/launcher/slurm_cpu.yaml, one Slurm job per point, logging to one `mlflow server`;
one job cancelled with `scancel` mid-point and one past its time limit, then the multirun run again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from inferlab import records as rec
from inferlab.report.table import collect
from inferlab.tracking import TAG_KIND, TAG_RECORD

from .conftest import mlflow_server, run

pytestmark = pytest.mark.slow

# Three points, one job each, one core each (two at a time on the 2-core node). timeout_min=2 with submitit's
# warning 40 s before it: it came up to 30 s earlier still (slurmctld checks time limits every 30 s), so a job is
# warned 50-80 s after it starts; a point's job took 25 s here.
MULTIRUN = ["-m", "hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
            "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=40",
            "model=tiny-phi", "runtime=llama_cpp", "n_threads=1", "quant=q8_0,q4_0,q4_k_m",
            "bench_cpu.prompt_cache.enabled=false", "bench_cpu.workload.new_tokens=8",
            "bench_cpu.workload.repetitions=2", "bench_cpu.workload.warmup=0", "bench_cpu.bandwidth_gib=0.25"]


def _slurm(conf: Path, *args: str) -> str:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SLURM_CONF": str(conf)})
    assert r.returncode == 0, f"{' '.join(args)}: {r.stderr}"
    return r.stdout


def _show(conf: Path, job: str) -> dict[str, str]:
    out = _slurm(conf, "scontrol", "show", "job", "-o", job)
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _ended(conf: Path, job: str) -> dict[str, str]:
    """Slurm's view of a job once it has ended (its result may be written while its process still exits)."""
    while (info := _show(conf, job))["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        time.sleep(0.5)
    return info


def _new_records(path: Path, before: set[str]) -> list[rec.Record]:
    return [r for r in rec.read_all(path.glob("*.jsonl")) if r.record_id not in before]


def test_multirun_on_slurm_cancel_timeout_and_rerun(tiny_project, slurm_cluster, tmp_path):
    results = tiny_project / "results" / "bench_cpu"
    before = {r.record_id for r in rec.read_all(results.glob("*.jsonl"))}
    with mlflow_server(tmp_path) as uri:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        env.update({"INFERLAB_ROOT": str(tiny_project), "SLURM_CONF": str(slurm_cluster), "MLFLOW_TRACKING_URI": uri,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
                    "INFERLAB_LOCK_DIR": str(tmp_path)})  # the node's device lock, apart from other tests
        # q4_0 and q4_k_m hang in their worker: q4_0 is cancelled by hand, q4_k_m runs into its time limit
        first = subprocess.Popen([sys.executable, "stages/bench_cpu.py", *MULTIRUN, "tracking.enabled=true"],
                                 cwd=tiny_project, env={**env, "INFERLAB_INJECT_FAILURE": "q4_:hang"},
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        array = None
        while array is None:  # submitit's sbatch of the three points, as an array
            assert first.poll() is None, first.stdout.read()
            jobs = _slurm(slurm_cluster, "squeue", "-h", "-o", "%i %j").split()
            array = next((j.split("_")[0] for j in jobs if "_" in j), None)
            time.sleep(0.5)
        sweep_dir = max((tiny_project / "multirun").glob("*/*"), key=lambda p: p.stat().st_mtime)
        log = sweep_dir / ".submitit" / f"{array}_1_0_log.out"
        while "points to run" not in (log.read_text() if log.exists() else ""):  # q4_0 is measuring
            assert first.poll() is None, first.stdout.read()
            state = _show(slurm_cluster, f"{array}_1")
            assert state["JobState"] in ("PENDING", "CONFIGURING", "RUNNING"), state  # it ended before its point
            time.sleep(0.5)
        _slurm(slurm_cluster, "scancel", f"{array}_1")
        out, _ = first.communicate(timeout=600)
        assert first.returncode != 0, out[-3000:]  # two of its jobs did not finish their point

        jobs = {i: _ended(slurm_cluster, f"{array}_{i}") for i in range(3)}  # Slurm's own view of the run
        assert [jobs[i]["JobState"] for i in range(3)] == ["COMPLETED", "CANCELLED", "COMPLETED"], jobs
        first_run = _new_records(results, before)
        by_quant = {r.point["quant"]: r for r in first_run}
        assert sorted(by_quant) == ["q4_k_m", "q8_0"] and len(first_run) == 2  # nothing of the cancelled point
        assert by_quant["q8_0"].status == "ok"
        late = by_quant["q4_k_m"]
        assert late.status == "failed" and f"Slurm job {array}_2 on " in late.reason, late.reason
        assert "reached its time limit" in late.reason and "TimeLimit=00:02:00" in late.reason
        for i, quant in ((0, "q8_0"), (2, "q4_k_m")):
            slurm = by_quant[quant].environment["slurm"]
            assert slurm["SLURM_ARRAY_JOB_ID"] == array and slurm["SLURM_ARRAY_TASK_ID"] == str(i)
            assert slurm["SLURMD_NODENAME"] == jobs[i]["NodeList"] and slurm["SLURM_JOB_ID"] == jobs[i]["JobId"]

        again = run([sys.executable, "stages/bench_cpu.py", *MULTIRUN, "tracking.enabled=true"], cwd=tiny_project,
                    env=env)
        sweep = late.sweep_id
        final = [r for r in rec.read_all(results.glob("*.jsonl")) if r.sweep_id == sweep]
        assert sorted(r.point["quant"] for r in final) == ["q4_0", "q4_k_m", "q8_0"], again.stdout[-2000:]
        measured_again = [r for r in final if r.record_id not in {x.record_id for x in first_run}]
        assert [r.point["quant"] for r in measured_again] == ["q4_0"] and measured_again[0].status == "ok"
        rerun_job = measured_again[0].environment["slurm"]
        assert rerun_job["SLURM_ARRAY_JOB_ID"] != array  # a job of the second multirun
        assert _ended(slurm_cluster, rerun_job["SLURM_JOB_ID"])["JobState"] == "COMPLETED"

        section = next(x for x in collect(tiny_project / "results") if x.model == "tiny-phi")
        seen = {r["quant"]: r for r in section.history if r["sweep_id"] == sweep}  # the report's rows of the run
        assert {q: r["status"] for q, r in seen.items()} == {"q8_0": "ok", "q4_0": "ok", "q4_k_m": "failed"}
        assert late.reason.startswith(seen["q4_k_m"]["reason"]) and f"Slurm job {array}_2" in seen["q4_k_m"]["reason"]

        client = MlflowClient(tracking_uri=uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        points = [r for r in runs if r.data.tags.get(TAG_KIND) == "point"]
        assert sorted(r.data.tags[TAG_RECORD] for r in points) == sorted(r.record_id for r in final)  # once each
        assert len([r for r in runs if r.data.tags.get(TAG_KIND) == "sweep"]) == 1  # the multirun's parent


def _ignores_slurm_signals(ready) -> None:
    from inferlab import slurm

    slurm.leave_signals_to_parent()
    ready.set()
    time.sleep(120)


def test_in_a_slurm_job_sigterm_stops_the_stage_and_its_workers_are_killed_at_the_end(monkeypatch):
    """Without a cluster: in a Slurm job (SLURM_JOB_ID set) a worker outlives SIGTERM and USR2 (its sweep decides),
    the stage's own SIGTERM raises JobEnding, and the stage's end kills the worker (multiprocessing's exit would
    wait on it forever) and puts the earlier handler back."""
    import multiprocessing as mp
    import signal

    from inferlab import slurm

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    worker = ctx.Process(target=_ignores_slurm_signals, args=(ready,), daemon=True)
    earlier = signal.getsignal(signal.SIGTERM)
    restore = slurm.stop_on_sigterm()
    try:
        worker.start()
        assert ready.wait(60)
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            os.kill(worker.pid, sig)
        with pytest.raises(slurm.JobEnding, match="Slurm sent SIGTERM to job 7"):
            os.kill(os.getpid(), signal.SIGTERM)
            worker.join(5)  # the handler raises here, while the worker still lives
        assert worker.is_alive()
    finally:
        restore()
    assert not worker.is_alive() and worker.exitcode == -signal.SIGKILL
    assert signal.getsignal(signal.SIGTERM) is earlier
    assert slurm.time_limit_reason(RuntimeError("x")) is None  # no controller answers: not a time limit
