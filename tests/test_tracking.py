"""MLflow logging through a real store: parent and child runs, no duplicates, an unreachable store."""

from __future__ import annotations

import sys
from pathlib import Path

from mlflow import MlflowClient

from inferlab.config import TrackingConfig
from inferlab.records import Record
from inferlab.tracking import TAG_KIND, TAG_RECORD, Tracker

from .conftest import run


def make_records(sweep="convert-test-1", n=3):
    env = {"hardware": {"id": "test-hw"}, "git": {"commit": "abc"}, "libraries": {}}
    return [
        Record(stage="convert", name=f"q{i}", point={"ftype": f"q{i}"}, config={"convert": {"threads": 0}},
               model={"name": "tiny-phi", "weights": "random"}, environment=env, sweep_id=sweep,
               metrics={"file_bytes": 100 * i, "bits_per_weight": 4.5}, status="ok" if i else "failed",
               reason=None if i else "boom")
        for i in range(n)
    ]


def test_records_become_parent_and_child_runs_without_duplicates(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(uri=uri, experiment="t"))
    recs = make_records()
    assert tracker.log(recs).created == 3
    again = tracker.log(recs)  # the same records again: nothing new
    assert again.created == 0 and again.present == 3 and again.ok
    assert tracker.log(make_records()[:0]).created == 0
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags[TAG_KIND] == "sweep"]
    children = [r for r in runs if r.data.tags[TAG_KIND] == "point"]
    assert len(parents) == 1 and len(children) == 3
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.tags["mlflow.source.git.commit"] == "abc"
        assert c.data.params["model.name"] == "tiny-phi" and c.data.params["convert.threads"] == "0"
    by_name = {c.info.run_name: c for c in children}
    assert by_name["q2"].data.metrics["file_bytes"] == 200
    assert by_name["q0"].info.status == "FAILED" and by_name["q0"].data.tags["inferlab.reason"] == "boom"
    assert {c.data.tags[TAG_RECORD] for c in children} == {r.record_id for r in recs}


def test_unreachable_store_keeps_files_and_logs_later(tiny_project, tmp_path):
    """A tracking URI nobody answers: the stage still writes its files and says so; one command logs later."""
    dead = "http://127.0.0.1:9"
    r = run([sys.executable, "stages/convert.py", "model=tiny-phi", "convert.quants=[q4_0]",
             f"tracking.uri={dead}", "tracking.timeout_s=1"], cwd=tiny_project)
    said = r.stdout + r.stderr  # Hydra logs to stdout
    assert "cannot be reached" in said and "inferlab log-records" in said
    files = list((tiny_project / "results" / "convert").glob("*.jsonl"))
    assert files and (tiny_project / "metrics" / "gguf.json").exists()
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    out = run([sys.executable, "-m", "inferlab.cli", "log-records", *map(str, files), "--uri", uri], cwd=tiny_project)
    assert "new MLflow run(s)" in out.stdout
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("inferlab").experiment_id])
    assert any(r.info.run_name == "q4_0" for r in runs)
    again = run([sys.executable, "-m", "inferlab.cli", "log-records", *map(str, files), "--uri", uri], cwd=tiny_project)
    assert "; 0 new MLflow run(s)" in again.stdout


def test_log_records_command_reports_a_dead_store(tiny_project):
    r = run([sys.executable, "-m", "inferlab.cli", "log-records", "--uri", "http://127.0.0.1:9"], cwd=tiny_project,
            check=False)
    assert r.returncode == 2 and "cannot be reached" in r.stderr


def test_given_commit_wins_over_a_stale_git_folder(monkeypatch):
    """On a lent machine the working tree may carry an old .git; the commit the copy was made from is given."""
    from inferlab.environment import git_commit

    monkeypatch.delenv("INFERLAB_GIT_COMMIT", raising=False)
    git_commit.cache_clear()
    here = git_commit()
    assert here["commit"] and len(here["commit"]) == 40 and here["dirty"] in (True, False)
    monkeypatch.setenv("INFERLAB_GIT_COMMIT", "0" * 40)
    git_commit.cache_clear()
    assert git_commit() == {"commit": "0" * 40, "dirty": None, "source": "INFERLAB_GIT_COMMIT"}
    git_commit.cache_clear()


def test_runs_carry_the_measurement_times_dataset_input_and_outputs_table(tmp_path, monkeypatch):
    """A run's Duration in the UI is its measurement's (not the moment of logging); quality runs have the evaluation
    data as dataset input and their per-sample outputs as a table."""
    import json

    monkeypatch.setenv("INFERLAB_ROOT", str(tmp_path))
    outputs = tmp_path / "results/evaluate/outputs/hw/m/hf-cpu-fp32-dynamic.jsonl"
    outputs.parent.mkdir(parents=True)
    outputs.write_text("".join(json.dumps({"item_id": f"qa-{i}", "task": "qa", "prompt_tokens": 9, "output_tokens": 3,
                                           "answer": f"a{i}", "reference": f"r{i}"}) + "\n" for i in range(3)))
    env = {"hardware": {"id": "hw"}, "git": {"commit": "abc"}, "libraries": {}}
    recs = [Record(stage="evaluate", name=f"p{i}", point={"scenario": "quality", "items_digest": "d1", "n_items": 3},
                   config={"evaluate": {"dataset": {"path": "data/eval"}}}, model={"name": "m", "weights": "real"},
                   environment=env, sweep_id="s1", started=f"2026-11-30T10:00:0{2 * i}.250+00:00",
                   ended=f"2026-11-30T10:00:0{2 * i + 1}.750+00:00",
                   artifacts={"outputs": "results/evaluate/outputs/hw/m/hf-cpu-fp32-dynamic.jsonl"})
            for i in range(2)]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert Tracker(TrackingConfig(uri=uri, experiment="t")).log(recs).created == 2
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    for i in range(2):
        info = by_name[f"p{i}"].info
        assert info.end_time - info.start_time == 1500  # 10:00:0x.250 to .750 one second later
    parent = next(r for r in runs if r.data.tags[TAG_KIND] == "sweep").info
    assert parent.end_time - parent.start_time == 3500  # from the first start to the last end
    inputs = by_name["p0"].inputs.dataset_inputs
    assert inputs and inputs[0].dataset.name == "inferlab-evaluation" and inputs[0].dataset.digest == "d1"
    local = client.download_artifacts(by_name["p0"].info.run_id, "outputs.json", str(tmp_path))
    table = json.loads(Path(local).read_text())
    assert table["columns"][:2] == ["item_id", "task"] and len(table["data"]) == 3


def test_a_point_run_logs_the_figures_of_its_stage_table():
    """A run's metrics are the field table's figures of the record's stage (record.json keeps the rest); a figure
    of several values is logged per value, a boolean as 0/1."""
    from inferlab.tracking.names import run_metrics as _metrics

    env = {"hardware": {"id": "hw"}}
    bench = Record(stage="bench_gpu", name="p", point={"scenario": "profile"}, config={}, model={"name": "m"},
                   environment=env, metrics={"decode_tps": {"median": 12.0, "p99": 9.0}, "meets_slo": True,
                                             "ms_per_step_by_kind": {"matmul": 1.5}, "not_a_field": 3.0})
    assert _metrics(bench) == {"decode_tps": 12.0, "meets_slo": 1.0, "ms_per_step_by_kind.matmul": 1.5}
    score = Record(stage="evaluate", name="scores-a", point={"scenario": "scores"}, config={}, model={},
                   environment=env, metrics={"task": {"rougeL": 0.25}, "drift": {"exact_match": 1.0}})
    assert _metrics(score) == {"task_rougeL": 0.25, "drift_exact_match": 1.0}


def test_a_skipped_point_is_a_finished_run_tagged_skipped_and_a_failed_one_stays_failed(fresh_store):
    """A point skipped on this machine (no CUDA) is no error: its run is FINISHED, tagged skipped with the reason as
    its description; a failed point's run is FAILED. The experiment is of the kind whose UI opens on its runs."""
    client = MlflowClient(tracking_uri=fresh_store)
    client.create_experiment("t")  # made before, without a kind: it gets one
    env = {"hardware": {"id": "hw"}, "git": {"commit": "abc"}, "libraries": {}}
    recs = [Record(stage="bench_gpu", name=name, point={"scenario": "latency"}, config={}, environment=env,
                   model={"name": "m", "weights": "random"}, sweep_id="s1", status=status, reason=reason)
            for name, status, reason in (("gpu-fp16", "skipped", "no CUDA device on this machine"),
                                         ("gpu-nf4", "failed", "CUDA out of memory"), ("gpu-fp32", "ok", None))]
    tracker = Tracker(TrackingConfig(uri=fresh_store, experiment="t"))
    assert tracker.log(recs).created == 3
    exp = client.get_experiment_by_name("t")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    by = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    skipped, failed = by["gpu-fp16"], by["gpu-nf4"]
    assert skipped.info.status == "FINISHED" and skipped.data.tags["inferlab.status"] == "skipped"
    assert skipped.data.tags["mlflow.note.content"] == "skipped: no CUDA device on this machine"
    assert failed.info.status == "FAILED" and failed.data.tags["inferlab.reason"] == "CUDA out of memory"
    assert by["gpu-fp32"].info.status == "FINISHED"
    # a store where an older logger marked the skipped point FAILED: logging the records again finishes it
    client.set_terminated(skipped.info.run_id, "FAILED")
    again = tracker.log(recs)
    assert again.created == 0 and again.present == 3
    assert client.get_run(skipped.info.run_id).info.status == "FINISHED"
    assert client.get_run(failed.info.run_id).info.status == "FAILED"


def test_inferlab_ui_serves_the_store_and_links_to_the_runs_in_the_model_training_view(tmp_path):
    """`inferlab ui` starts MLflow's UI on the store and prints the link that opens the experiment's
    runs (MLflow 3.17 opens its GenAI view from a plain experiment link)."""
    import subprocess
    import time

    import httpx

    from inferlab.serve.loadtest import free_port

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cli = [str(Path(sys.executable).parent / "inferlab"), "ui", "--uri", uri]
    missing = run(cli, cwd=tmp_path, check=False)
    assert missing.returncode == 1 and "no MLflow store at" in missing.stderr
    Tracker(TrackingConfig(uri=uri, experiment="t")).log(make_records())
    exp = MlflowClient(tracking_uri=uri).get_experiment_by_name("t")
    port = free_port()
    ui = subprocess.Popen([*cli, "--experiment", "t", "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ui.stdout.readline()
        link = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        assert link in line, line
        api = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name"
        while True:  # until the UI's server answers (or exits: then its output says why)
            try:
                got = httpx.get(api, params={"experiment_name": "t"}, timeout=5)
                break
            except httpx.HTTPError:
                assert ui.poll() is None, ui.stdout.read()
                time.sleep(0.2)
        assert got.json()["experiment"]["experiment_id"] == exp.experiment_id
    finally:
        ui.terminate()
        ui.wait(timeout=30)
