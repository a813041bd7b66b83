"""`inferlab log-records` under faults, for real: the committed H100 records whose metric names MLflow rejects, one
malformed record among good ones, a logger killed mid-run, a SQLite store killed while it is being created, and two
loggers at once through one `mlflow server`. Every record ends up logged once, or the command says which was not
and exits non-zero."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from inferlab import records as rec

from .conftest import ROOT, mlflow_server

H100 = ROOT / "results" / "bench_gpu" / "h100-80gb-hbm3.jsonl"


def _log_records_here(capsys, *args: str) -> tuple[int, str, str]:
    """`inferlab log-records` in this process (after the fault, which happened in a process of its own)."""
    from inferlab.cli import main

    code = main(["log-records", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _start_log_records(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "inferlab.cli", "log-records", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            start_new_session=True)


def _runs(uri: str, experiment: str = "inferlab") -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=5000) if exp else []


def _points(uri: str, experiment: str = "inferlab") -> list:
    return [r for r in _runs(uri, experiment) if r.data.tags.get("inferlab.kind") == "point"]


def _each_logged_once(uri: str, recs: list[rec.Record], experiment: str = "inferlab") -> None:
    """Every record has exactly one run, and it is complete: ended, with its params and its record.json."""
    runs = _runs(uri, experiment)
    points = [r for r in runs if r.data.tags.get("inferlab.kind") == "point"]
    assert sorted(r.data.tags["inferlab.record_id"] for r in points) == sorted(r.record_id for r in recs)
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs)  # nothing left RUNNING
    assert all(r.data.params and r.data.tags.get("inferlab.logged") != "false" for r in points)
    parents = {r.info.run_id for r in runs if r.data.tags.get("inferlab.kind") == "sweep"}
    assert len(parents) == len({r.sweep_id for r in recs})  # one parent run per sweep
    assert {r.data.tags["mlflow.parentRunId"] for r in points} <= parents


def _triton_lines() -> list[str]:
    return [line for line in H100.read_text().splitlines() if "(Triton)" in line]


def test_real_records_with_names_mlflow_rejects_and_one_bad_record(project, fresh_store, capsys, caplog):
    """The committed H100 records whose metric names MLflow rejects are logged under rewritten names; a malformed
    record among them is reported and the others are still logged; the command exits non-zero; only record files
    are read (not the evaluate stage's per-sample outputs, not results/experiments/ unless asked)."""
    lines = _triton_lines()
    n = len(lines)
    assert n >= 10
    bad = json.loads(lines[0])
    bad.update(record_id="0" * 32, name="hand-edited", environment="h100")  # a field of the wrong shape
    results = project / "results"
    (results / "bench_gpu").mkdir(parents=True)
    (results / "bench_gpu" / "h100.jsonl").write_text("\n".join([*lines[:6], json.dumps(bad), *lines[6:]]) + "\n")
    outputs = next((ROOT / "results" / "evaluate" / "outputs").rglob("*.jsonl"))
    (results / "evaluate" / "outputs" / "hw" / "m").mkdir(parents=True)
    shutil.copy(outputs, results / "evaluate" / "outputs" / "hw" / "m" / outputs.name)  # not records
    shutil.copytree(ROOT / "results" / "experiments", results / "experiments")
    good = [rec.Record.from_dict(json.loads(line)) for line in lines]

    code, out, err = _log_records_here(capsys, "--uri", fresh_store)
    assert code == 1, out + err
    assert f"{n + 1} record(s) read from 1 file(s); {n} new MLflow run(s)" in out
    assert "rejected: hand-edited (00000000000000000000000000000000): AttributeError" in err
    assert f"1 of {n + 1} record(s) not logged" in err
    assert "cannot be reached" not in out + err + caplog.text and "unreadable record" not in caplog.text
    _each_logged_once(fresh_store, good)
    names = {k for run in _points(fresh_store) for k in run.data.metrics}
    assert "ms_per_step_by_kind.fused _Triton_" in names and not any("(" in n for n in names)
    # again, with results/experiments/ asked for: its records are new, the rest is there under the same names
    code, out, _ = _log_records_here(capsys, "--uri", fresh_store, "--experiments")
    moved = [rec.Record.from_dict(json.loads(line)) for f in sorted((results / "experiments").glob("*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    assert code == 1 and f"read from 2 file(s); {len(moved)} new MLflow run(s)" in out and f"{n} already there" in out
    _each_logged_once(fresh_store, good + moved)


def _running_point(db: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return con.execute("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid WHERE "
                               "r.status = 'RUNNING' AND t.key = 'inferlab.kind' AND t.value = 'point'"
                               ).fetchone()[0] > 0
    except sqlite3.Error:  # busy, or not made yet
        return False


def test_a_logger_killed_mid_run_leaves_nothing_a_rerun_skips(tmp_path, fresh_store, capsys):
    from .test_records import make_record

    path = tmp_path / "records.jsonl"
    recs = [make_record(f"sweep-{i % 3}", f"p{i}") for i in range(15)]
    for r in recs:
        r.metrics = {f"m{j}": float(j) for j in range(40)}
        rec.append(path, r)
    db = Path(fresh_store[len("sqlite:///"):])
    proc = _start_log_records(str(path), "--uri", fresh_store)
    deadline = time.time() + 120
    while not _running_point(db):  # a point run made and not yet finished: kill the logger there
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < len(_points(fresh_store)) < 15
    code, out, err = _log_records_here(capsys, str(path), "--uri", fresh_store)
    assert code == 0 and "unfinished run(s) of an earlier logger replaced" in out, out + err
    _each_logged_once(fresh_store, recs)


def _mid_migration(db: Path) -> bool:
    """Whether one of the store's schema migrations is halfway: SQLite migrations copy a table into a temporary
    one (_alembic_tmp_<table>), drop the old and rename the copy."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1) as con:
            return bool(con.execute("SELECT 1 FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'"
                                    ).fetchall())
    except sqlite3.Error:
        return False


def _kill_mid_migration(proc: subprocess.Popen, folder: Path) -> None:
    """SIGKILL in the middle of one of the store's schema migrations (MLflow runs dozens, for seconds)."""
    deadline = time.time() + 120
    while not any(_mid_migration(db) for db in folder.glob("*mlflow.db*") if not db.name.endswith(".lock")):
        assert proc.poll() is None and time.time() < deadline, "the store was made before the kill"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_kill_while_the_sqlite_store_is_made_breaks_nothing(tmp_path, capsys, caplog):
    from .test_records import make_record

    path = tmp_path / "records.jsonl"
    recs = [make_record("sweep", f"p{i}") for i in range(3)]
    for r in recs:
        rec.append(path, r)
    # inferlab log-records killed while it creates the store: the next one makes it and logs everything
    first = tmp_path / "first"
    first.mkdir()
    uri = f"sqlite:///{first / 'mlflow.db'}"
    _kill_mid_migration(_start_log_records(str(path), "--uri", uri), first)
    code, out, err = _log_records_here(capsys, str(path), "--uri", uri)
    assert code == 0 and "3 new MLflow run(s)" in out, out + err
    _each_logged_once(uri, recs)
    assert sorted(p.name for p in first.iterdir()) == ["mlartifacts", "mlflow.db", "mlflow.db.lock"]
    # a store left half-made by MLflow itself killed mid-migration (what loggers before this fix left): set aside
    second = tmp_path / "second"
    second.mkdir()
    uri = f"sqlite:///{second / 'mlflow.db'}"
    code = f"from mlflow import MlflowClient; MlflowClient(tracking_uri={uri!r}).search_experiments()"
    _kill_mid_migration(subprocess.Popen([sys.executable, "-c", code], start_new_session=True), second)
    code, out, err = _log_records_here(capsys, str(path), "--uri", uri)
    assert code == 0 and "3 new MLflow run(s)" in out, out + err
    assert "probably left half-made" in caplog.text and "held no runs and was moved to mlflow.db.broken-" in caplog.text
    _each_logged_once(uri, recs)


@pytest.mark.slow
def test_two_loggers_at_once_through_one_server_log_each_record_once(tmp_path, mlflow_template):
    """Two `inferlab log-records` started together against one `mlflow server`, each with a lock folder of its own
    (as on two hosts; on one host they would take turns): the duplicate runs are found and deleted, each record
    has one run, and between them they say 12 new runs."""
    from .test_records import make_record

    path = tmp_path / "records.jsonl"
    recs = [make_record(f"sweep-{i % 3}", f"p{i}") for i in range(12)]
    for r in recs:
        rec.append(path, r)
    shutil.copy(mlflow_template, tmp_path / "server.db")
    with mlflow_server(tmp_path, db=tmp_path / "server.db") as uri:
        # each with a lock folder of its own, as on two hosts: the lock one host's loggers share cannot help
        procs = [_start_log_records(str(path), "--uri", uri, env={"INFERLAB_LOCK_DIR": str(tmp_path / host)})
                 for host in ("host-a", "host-b")]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0, out + err
        _each_logged_once(uri, recs)
        created = sum(int(out.split("; ")[1].split(" new")[0]) for out, _ in outs)
        assert created == 12, outs  # together they say what is there: 12 runs, once


def test_a_garbled_line_in_the_middle_of_a_file_fails_the_command_naming_file_and_line(project, fresh_store,
                                                                                          capsys):
    """A line that is not a record, between good ones, is not a torn end (a writer killed mid-write leaves no
    newline): the readable records are logged, and the command names the file and the line and exits non-zero."""
    lines = _triton_lines()[:3]
    path = project / "results" / "bench_gpu" / "h100.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join([lines[0], lines[1][: len(lines[1]) // 2] + "#garbled", lines[2]]) + "\n")
    code, out, err = _log_records_here(capsys, "--uri", fresh_store)
    assert code == 1, out + err
    assert f"unreadable record: {path}:2: " in err and "2 new MLflow run(s)" in out, out + err
    path.write_text("\n".join(lines) + "\n" + lines[0][:100])  # a torn last line only: a warning, exit 0
    code, out, err = _log_records_here(capsys, "--uri", fresh_store)
    assert code == 0 and "unreadable record" not in err, out + err
