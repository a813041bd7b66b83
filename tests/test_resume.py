"""Sweeps under faults, for real: SIGKILL at named moments (between the jobs of a multirun, during MLflow logging,
during the evaluate stage's scoring), the same sweep started twice, a worker killed while it waits for the CPU lock,
a disk that fills between two records, records and report outputs that cannot be written, and a CPU lock file of
another user. After each, nothing measured is measured again, nothing is lost, and every refusal says why."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from inferlab import records as rec
from inferlab.config import compose, to_container

from .conftest import BIN

pytestmark = pytest.mark.slow

TWO_POINTS = ["bench_cpu.llama_cpp.quants=[q8_0,q4_0]", "bench_cpu.llama_cpp.n_threads=[1]"]
SMALL = ["model=tiny-phi", "runtime=llama_cpp", "bench_cpu.prompt_cache.enabled=false",
         "bench_cpu.llama_cpp.extra_points=[]", "bench_cpu.workload.new_tokens=8", "bench_cpu.workload.repetitions=2",
         "bench_cpu.workload.warmup=0", "bench_cpu.bandwidth_gib=0.05"]


def _env(project: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "INFERLAB_ROOT": str(project), "PATH": f"{BIN}{os.pathsep}{env['PATH']}", **extra}


def _start(args: list[str], project: Path, log: Path, **popen) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([sys.executable, *args], cwd=project, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the stage and its workers
    proc.wait()


def _run(args: list[str], project: Path, env: dict, check: bool = True, timeout: float = 600
         ) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _rerun_here(project: Path, stage: str, overrides: list[str], params: Path, monkeypatch, caplog) -> str:
    """The stage's script run in this process, from a params.yaml of `overrides` (as DVC runs it): a rerun after
    the fault, which happened in a process of its own (this saves a new interpreter's imports). Returns its log."""
    import logging
    import runpy

    from inferlab.stage import run_stage

    monkeypatch.setenv("INFERLAB_ROOT", str(project))
    if overrides:
        params.write_text(yaml.safe_dump(to_container(compose(overrides))))
    caplog.set_level(logging.INFO)
    run_stage(runpy.run_path(str(project / "stages" / f"{stage}.py"))["main"], ["--params", str(params)])
    return caplog.text


def _records(project: Path, stage: str, before: set[str]) -> list[rec.Record]:
    return [r for r in rec.read_all(sorted((project / "results" / stage).glob("*.jsonl"))) if r.record_id not in before]


def _ids(project: Path, stage: str) -> set[str]:
    return {r.record_id for r in rec.read_all(sorted((project / "results" / stage).glob("*.jsonl")))}


def test_multirun_killed_between_jobs_resumes_without_measuring_a_point_twice(tiny_project, tmp_path):
    """The README's multirun form, killed once its first job had finished: the rerun measures only the rest."""
    before = _ids(tiny_project, "bench_cpu")
    args = ["stages/bench_cpu.py", "-m", *SMALL, "tracking.enabled=false", "quant=q8_0,q4_0", "n_threads=1"]
    proc = _start(args, tiny_project, tmp_path / "first.log", env=_env(tiny_project))
    _wait_for(tmp_path / "first.log", "#1 :", proc)  # job 0 finished, job 1 launched
    _kill(proc)
    first = _records(tiny_project, "bench_cpu", before)
    assert [r.point["quant"] for r in first] == ["q8_0"]
    r = _run(args, tiny_project, _env(tiny_project))
    said = r.stdout + r.stderr
    assert f"resuming interrupted sweep {first[0].sweep_id}: 1 of 1 points already finished" in said
    assert f"resuming interrupted sweep {first[0].sweep_id}: 0 of 1 points already finished" in said
    final = _records(tiny_project, "bench_cpu", before)
    assert sorted(x.point["quant"] for x in final) == ["q4_0", "q8_0"]  # each point measured once
    assert {x.sweep_id for x in final} == {first[0].sweep_id}
    folder = tiny_project / "results" / "bench_cpu"
    assert not list(folder.glob(".sweep-*.lock"))  # finished: no lock left behind
    manifests = [json.loads(p.read_text()) for p in folder.glob(".sweep-*.json")]
    assert any(m["sweep_id"] == first[0].sweep_id and m["status"] == "complete" and m["jobs"] == 2 for m in manifests)


def test_a_second_start_refuses_a_dead_worker_fails_its_point_and_a_kill_while_logging_loses_nothing(
        tiny_project, tmp_path, monkeypatch, fresh_store, caplog):
    """One sweep through three faults: started a second time while it runs (refused, nothing measured); its worker
    killed while it waits for the CPU lock (that point fails, the sweep goes on); the sweep killed during MLflow
    logging, after its last record (the rerun measures nothing and logs every record once)."""
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    monkeypatch.setenv("INFERLAB_LOCK_DIR", str(lock_dir))  # this test holds the CPU lock of the sweeps below
    store = fresh_store
    env = _env(tiny_project, INFERLAB_LOCK_DIR=str(lock_dir), MLFLOW_TRACKING_URI=store)
    before = _ids(tiny_project, "bench_cpu")
    args = ["stages/bench_cpu.py", *SMALL, *TWO_POINTS]
    from inferlab.sweep.locks import device_lock

    with device_lock("cpu"):  # another sweep measures on this CPU: the first point waits
        proc = _start(args, tiny_project, tmp_path / "a.log", env=env)
        _wait_for(tmp_path / "a.log", "waiting for cpu", proc)
        # the same sweep, while the first is alive (one that waited for the lock instead would time out here)
        second = _run(args, tiny_project, env, check=False, timeout=120)
        assert second.returncode != 0
        assert "cannot start: the same bench_cpu sweep (2 points" in second.stderr
        assert f"is running now (pid {proc.pid} on" in second.stderr and "nothing was run" in second.stderr
        assert _records(tiny_project, "bench_cpu", before) == []
        children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "spawn_main"], capture_output=True,
                                  text=True).stdout.split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGKILL)  # the worker dies while its sweep waits for the lock
        time.sleep(0.5)
    _wait_for(tmp_path / "a.log", "record(s) appended", proc)
    _kill(proc)  # during MLflow logging: every point has its record, not all of them are logged
    first = _records(tiny_project, "bench_cpu", before)
    by_quant = {r.point["quant"]: r for r in first}
    assert sorted(by_quant) == ["q4_0", "q8_0"] and len(first) == 2
    assert by_quant["q8_0"].status == "failed" and "worker process died" in by_quant["q8_0"].reason
    assert "before the point started" in by_quant["q8_0"].reason
    assert by_quant["q4_0"].status == "ok"  # the sweep went on in a fresh worker
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    said = _rerun_here(tiny_project, "bench_cpu", [*SMALL, *TWO_POINTS], tmp_path / "params.yaml", monkeypatch,
                       caplog)
    assert f"resuming interrupted sweep {first[0].sweep_id}: 2 of 2 points already finished" in said
    assert "0 points to run" in said and "memory bandwidth" not in said
    assert _records(tiny_project, "bench_cpu", before) == first  # nothing measured again
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("inferlab").experiment_id])
    points = [x for x in runs if x.data.tags["inferlab.kind"] == "point"]
    assert sorted(x.data.tags["inferlab.record_id"] for x in points) == sorted(x.record_id for x in first)
    assert all(x.info.status in ("FINISHED", "FAILED") and x.data.params for x in points)


def test_evaluate_killed_while_scoring_generates_nothing_again(tiny_project, tmp_path, monkeypatch, caplog):
    before = _ids(tiny_project, "evaluate")
    overrides = ["model=tiny-phi", "tracking.enabled=false", "evaluate.dataset.limit=1", "evaluate.cpu.enabled=false",
                 "evaluate.gpu.enabled=false", "evaluate.llama_cpp.quants=[f32,q4_0]",
                 "evaluate.llama_cpp.kv_type=[f16]", "evaluate.tokens.window=256", "evaluate.tokens.stride=255"]
    proc = _start(["stages/evaluate.py", *overrides], tiny_project, tmp_path / "eval.log", env=_env(tiny_project))
    _wait_for(tmp_path / "eval.log", "scoring llama-f32-kvf16", proc)
    while (tmp_path / "eval.log").read_text().count("scoring llama-") < 2:  # the first one's scores are written
        assert proc.poll() is None, (tmp_path / "eval.log").read_text()[-3000:]
        time.sleep(0.05)
    _kill(proc)
    gens = [r for r in _records(tiny_project, "evaluate", before) if r.point["scenario"] == "quality"]
    assert sorted(r.name for r in gens) == ["llama-f32-kvf16", "llama-q4_0-kvf16"]
    assert len(_records(tiny_project, "evaluate", before)) == 3  # two generations and one configuration's scores
    said = _rerun_here(tiny_project, "evaluate", overrides, tmp_path / "params.yaml", monkeypatch, caplog)
    assert f"resuming interrupted sweep {gens[0].sweep_id}: 2 of 2 points already finished" in said
    assert "1 record(s) appended" in said and "(3 of this sweep were written before the interruption)" in said
    new = _records(tiny_project, "evaluate", before)
    assert [x for x in new if x.point["scenario"] == "quality"] == gens  # no configuration generated again
    scores = [x for x in new if x.point["scenario"] == "scores"]
    assert sorted(x.point["of"] for x in scores) == ["llama-f32-kvf16", "llama-q4_0-kvf16"]  # each scored once


def _full_disk(limit: int):
    def limit_files() -> None:  # in the stage process (and its workers): no file may grow past `limit` bytes
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return limit_files


def test_a_disk_full_between_two_records_stops_the_sweep_and_the_rerun_measures_only_what_is_missing(
        tiny_project, tmp_path, monkeypatch, caplog):
    """The records file may grow to 10 KB (RLIMIT_FSIZE, as a full disk): the first record (about 7 KB) fits,
    the second does not. The sweep stops saying so, with no half record in the file; the rerun measures the point
    whose record was refused, and no other."""
    results = tmp_path / "results"
    params = to_container(compose([*SMALL, *TWO_POINTS, "tracking.enabled=false", f"paths.results={results}"]))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["stages/bench_cpu.py", "--params", str(tmp_path / "params.yaml")]
    full = subprocess.run([sys.executable, *args], cwd=tiny_project, env=_env(tiny_project), capture_output=True,
                          text=True, timeout=600, preexec_fn=_full_disk(10_000))
    assert full.returncode != 0
    assert "stopped:" in full.stderr and "could not be written" in full.stderr and "File too large" in full.stderr
    path = next((results / "bench_cpu").glob("*.jsonl"))
    assert path.read_bytes().endswith(b"\n")
    (kept,) = rec.read(path)
    said = _rerun_here(tiny_project, "bench_cpu", [], tmp_path / "params.yaml", monkeypatch, caplog)
    assert f"resuming interrupted sweep {kept.sweep_id}: 1 of 2 points already finished" in said
    final = list(rec.read(path))
    assert len(final) == 2 and {x.sweep_id for x in final} == {kept.sweep_id} and final[0] == kept
    assert len({x.point_id for x in final}) == 2 and all(x.status == "ok" for x in final)
    assert len(path.read_text().splitlines()) == 2  # every line a whole record


def _unwritable(path: Path) -> None:
    """Make a file or folder unwritable, even for root where the filesystem allows (chattr +i)."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
        return
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root and `chattr +i` is refused here ({r.stderr.strip()}): nothing can make a "
                    "file unwritable for root")


def _writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755 if path.is_dir() else 0o644)


def test_an_unwritable_records_file_or_stage_folder_stops_the_sweep_before_its_first_point(project, tmp_path):
    from inferlab.stage import StageRun, StorageError

    records = project / "results" / "bench_cpu" / "some-hw.jsonl"
    records.parent.mkdir(parents=True)
    records.write_text("")
    (project / "models" / "tiny-phi").mkdir(parents=True)
    cfg = compose(["model=tiny-phi"])
    for target, said in ((project / "results" / "bench_cpu", "paths.results (bench_cpu records): "),
                         (None, "the records file ")):
        if target is None:  # the records file this machine appends to
            target = StageRun(cfg, "bench_cpu", sections=()).path
            target.write_text("")
        _unwritable(target)
        try:
            with pytest.raises(StorageError) as e:
                StageRun(cfg, "bench_cpu", sections=())
            assert str(e.value).startswith(said + str(target)) and "nothing was run" in str(e.value)
        finally:
            _writable(target)
    # through the stage script: refused before any point is measured (no worker started, no bandwidth measured)
    target = StageRun(cfg, "bench_cpu", sections=()).path
    _unwritable(target)
    try:
        r = _run(["stages/bench_cpu.py", *SMALL], project, _env(project), check=False)
    finally:
        _writable(target)
    assert r.returncode != 0 and "cannot start: the records file" in r.stderr
    assert "[1/" not in r.stdout + r.stderr and "memory bandwidth" not in r.stdout + r.stderr


def test_the_report_checks_its_storage_before_any_work(project):
    from inferlab.report.build import build
    from inferlab.stage import StorageError

    with pytest.raises(StorageError, match=r"paths.results: only .* MiB free .* nothing was run"):
        build(compose(["paths.min_free_mb=100000000"]))
    assert not (project / "metrics" / "report.md").exists()
    report = project / "metrics" / "report.md"
    report.parent.mkdir()
    report.write_text("the report of an earlier run\n")
    _unwritable(report)
    try:
        with pytest.raises(StorageError, match="the report output .*report.md cannot be written"):
            build(compose(["tracking.enabled=false"]))
        assert not (project / "metrics" / "recommendation.json").exists()  # stopped before writing anything
    finally:
        _writable(report)


def test_the_cpu_lock_file_of_another_user_still_locks(monkeypatch):
    """A lock file made by one user (root, mode 0644, as the issue found it) is used by the next user's sweep;
    without root, a lock file its owner made read-only."""
    import shutil
    import tempfile
    import traceback

    from inferlab.sweep.locks import device_lock

    folder = Path(tempfile.mkdtemp(prefix="inferlab-locks-"))  # /tmp: every user can reach it
    try:
        folder.chmod(0o1777)
        monkeypatch.setenv("INFERLAB_LOCK_DIR", str(folder))
        lock = folder / "inferlab-cpu.lock"
        lock.write_text("")
        lock.chmod(0o644 if os.geteuid() == 0 else 0o444)
        pid = os.fork()
        if pid == 0:  # the other user
            code = 1
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                with device_lock("cpu") as waited:
                    code = 0 if waited >= 0 else 1
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with device_lock("gpu-7"):  # a lock file made now can be used by everyone
            assert (folder / "inferlab-gpu-7.lock").stat().st_mode & 0o777 == 0o666
    finally:
        shutil.rmtree(folder)


def test_sigterm_stops_a_sweep_as_ctrl_c_does_and_the_rerun_measures_only_the_rest(tiny_project, tmp_path,
                                                                                    monkeypatch, caplog):
    """SIGTERM (kill, a scheduler, a timeout) to a sweep whose second point is being measured: the sweep stops
    at once with one plain message and no traceback, its worker is stopped with it, the first point's record is
    kept, and the rerun measures the second point only."""
    import psutil

    before = _ids(tiny_project, "bench_cpu")
    overrides = [*SMALL, *TWO_POINTS, "tracking.enabled=false"]
    log = tmp_path / "sweep.log"
    locks = tmp_path / "locks"  # this sweep's CPU lock, not one another test on this machine holds
    locks.mkdir()
    monkeypatch.setenv("INFERLAB_LOCK_DIR", str(locks))
    proc = _start(["stages/bench_cpu.py", *overrides], tiny_project, log,
                  env=_env(tiny_project, INFERLAB_INJECT_FAILURE="q4_0:slow=300", INFERLAB_LOCK_DIR=str(locks)))
    _wait_for(log, "[1/2]", proc)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    os.kill(proc.pid, signal.SIGTERM)  # the stage process alone, as `kill` does
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "interrupted by SIGTERM" in text and "rerun the same command" in text, text[-3000:]
    assert "Traceback" not in text and "BrokenPipe" not in text, text[-3000:]
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, alive  # the worker measuring the second point was stopped with the sweep
    (first,) = _records(tiny_project, "bench_cpu", before)
    assert first.point["quant"] == "q8_0" and first.status == "ok"
    said = _rerun_here(tiny_project, "bench_cpu", overrides, tmp_path / "params.yaml", monkeypatch, caplog)
    assert f"resuming interrupted sweep {first.sweep_id}: 1 of 2 points already finished" in said
    final = _records(tiny_project, "bench_cpu", before)
    assert final[0] == first and [x.point["quant"] for x in final] == ["q8_0", "q4_0"]  # q8_0 not measured again


def test_an_unwritable_aggregate_stops_the_stage_before_its_first_point(project):
    """metrics/bench_cpu.json and metrics/plots/bench_cpu.csv, which the stage replaces at its end, are checked
    before its first point: an immutable one is named now, not found after the sweep."""
    from inferlab.stage import StageRun, StorageError

    (project / "models" / "tiny-phi").mkdir(parents=True)
    cfg = compose(["model=tiny-phi"])
    for path in (project / "metrics" / "bench_cpu.json", project / "metrics" / "plots" / "bench_cpu.csv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}\n")
        _unwritable(path)
        try:
            with pytest.raises(StorageError) as e:
                StageRun(cfg, "bench_cpu", sections=())
            assert str(e.value).startswith(f"the bench_cpu aggregate {path} cannot be written"), str(e.value)
            assert "nothing was run" in str(e.value)
        finally:
            _writable(path)
