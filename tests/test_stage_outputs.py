"""What DVC sees of the stages' outputs, for real in a temporary git repository: the report with HTML off still
produces every output it declares, a forced rerun on the same records writes the same recommendation, and a stage
that fails on its config leaves the previous metrics in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from inferlab.config import compose, to_container

from .conftest import copy_project, run
from .test_report import bench, score

pytestmark = pytest.mark.slow


def _params(repo: Path, overrides: list[str], **changes: object) -> None:
    """params.yaml as DVC's composition writes it, with `changes` (dotted keys) made after it: values the schema
    refuses, as a hand-edited params.yaml or a `dvc exp run -S` would give them."""
    data = to_container(compose(overrides))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def test_report_outputs_and_failed_stages_through_dvc(tmp_path, monkeypatch):
    monkeypatch.delenv("INFERLAB_ROOT", raising=False)
    repo = copy_project(tmp_path / "repo")
    monkeypatch.chdir(repo)  # compose() reads this copy's conf/
    results = repo / "results"
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3)
    bench(results, "gpu-a", "nf4-b1", "nf4", 1, 35, 38, 31, 1.9)
    bench(results, "cpu-a", "q8_0-t2", "fp32", 1, 20, 40, 41, 0.5, stage="bench_cpu")
    score(results, "gpu-a", "fp16", 1.0)
    score(results, "gpu-a", "nf4", 0.95)
    for folder in ("models/tiny-phi/hf", "models/tiny-phi/gguf"):  # bench_cpu's deps (never reached: see below)
        (repo / folder).mkdir(parents=True)
        (repo / folder / "placeholder").write_text("x")
    _params(repo, ["model=tiny-phi", "report.html=false", "tracking.enabled=false"])
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"],
                ["git", "config", "user.name", "t"], ["git", "add", "-A"], ["git", "commit", "-q", "-m", "init"]):
        run(cmd, cwd=repo)

    # report.html: false, through DVC: every declared output exists (the HTML one says HTML is off)
    run(["dvc", "repro", "--single-item", "report"], cwd=repo)
    assert "HTML output is off" in (repo / "metrics" / "report.html").read_text()
    first = (repo / "metrics" / "recommendation.json").read_bytes()
    assert json.loads(first)["recommendations"]
    # a forced rerun on the same records: the same recommendation, byte for byte (serve_bench depends on it)
    run(["dvc", "repro", "--single-item", "--force", "report"], cwd=repo)
    assert (repo / "metrics" / "recommendation.json").read_bytes() == first

    # a stage that fails on its config (a bad value in params.yaml) leaves the previous metrics as they were
    metrics = repo / "metrics" / "bench_cpu.json"
    metrics.write_text('{"previous": true}\n')
    _params(repo, ["model=tiny-phi", "tracking.enabled=false"], **{"bench_cpu.point_timeout_s": -1})
    r = run(["dvc", "repro", "--single-item", "bench_cpu"], cwd=repo, check=False)
    assert r.returncode != 0 and "bench_cpu.point_timeout_s: -1" in r.stdout + r.stderr
    assert metrics.read_text() == '{"previous": true}\n'
