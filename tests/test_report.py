"""The report stage on constructed records: the Pareto frontier, the recommendation under constraints (and why
none, by how much), several machines in one report, missing and partial inputs, the MLflow report run."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from inferlab import records as rec
from inferlab.config import ConfigError, ConstraintsConfig, ReportConfig, compose
from inferlab.report import frontier
from inferlab.report.stage import build
from inferlab.report.table import collect
from inferlab.tracking import TAG_KIND, Tracker


def _env(hw: str) -> dict:
    return {"hardware": {"id": hw}, "git": {"commit": "abc"}, "libraries": {}}


def bench(results, hw, name, precision, batch, tps, ttft, itl90, mem, status="ok", reason=None, stage="bench_gpu",
          scenario="latency", model="m", **extra):
    point = {"runtime": "hf", "scenario": scenario, "precision": precision, "batch_size": batch,
             "kv_cache": extra.pop("kv_cache", "dynamic"), "attn": "sdpa", "compile": False, "prompt_tokens": 64,
             "new_tokens": 128, **extra}
    metrics = {} if status != "ok" else {
        "decode_tps": {"median": tps / batch, "stdev": 0.1}, "total_tps": {"median": tps},
        "ttft_ms": {"median": ttft}, "itl_ms": {"median": itl90 * 0.9, "p90": itl90},
        "peak_allocated_gib" if stage == "bench_gpu" else "peak_rss_mib": mem if stage == "bench_gpu" else mem * 1024}
    rec.append(results / stage / f"{hw}.jsonl", rec.Record(
        stage=stage, name=name, point=point, config={}, model={"name": model, "weights": "random"},
        environment=_env(hw), status=status, reason=reason, metrics=metrics, sweep_id=f"{stage}-{hw}"))


def score(results, hw, precision, rouge_l, model="m", device="cuda"):
    point = {"scenario": "scores", "of": f"hf-{device}-{precision}-dynamic", "of_hardware": hw, "runtime": "hf",
             "device": device, "precision": precision, "kv_cache": "dynamic"}
    rec.append(results / "evaluate" / f"{hw}.jsonl", rec.Record(
        stage="evaluate", name=f"scores-{point['of']}", point=point, config={},
        model={"name": model, "weights": "random"}, environment=_env("scorer"), sweep_id="evaluate-x",
        metrics={"fidelity": {"rougeL": rouge_l, "exact_match": rouge_l / 2}, "task": {}, "perplexity": 10.0}))


@pytest.fixture
def gpu_results(tmp_path):
    r = tmp_path / "results"
    #            name        precision batch tok/s  TTFT  ITL90 GiB
    bench(r, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3)
    bench(r, "gpu-a", "fp16-b64", "fp16", 64, 3400, 65, 19, 9.0)
    bench(r, "gpu-a", "nf4-b1", "nf4", 1, 35, 38, 31, 1.9)
    bench(r, "gpu-a", "nf4-b64", "nf4", 64, 2100, 68, 32, 5.7)
    bench(r, "gpu-a", "int8-b1", "int8", 1, 16, 75, 63, 2.9)  # dominated by nf4-b1 unless its fidelity wins
    bench(r, "gpu-a", "fp32-b1", "fp32", 1, 30, 30, 36, 10.5)  # dominated: slower and bigger than fp16, less faithful
    bench(r, "gpu-a", "bf16-b8", "bf16", 8, 0, 0, 0, 0, status="failed", reason="CUDA out of memory")
    score(r, "gpu-a", "fp16", 1.0)
    score(r, "gpu-a", "nf4", 0.4)
    score(r, "gpu-a", "int8", 0.75)
    score(r, "gpu-a", "fp32", 0.99)
    return r


def test_pareto_frontier_keeps_exactly_the_non_dominated():
    ax = [("total_tps", +1), ("memory_gib", -1), ("fidelity", +1)]
    pts = [{"name": "a", "total_tps": 100, "memory_gib": 5, "fidelity": 1.0},
           {"name": "b", "total_tps": 90, "memory_gib": 6, "fidelity": 1.0},  # beaten by a everywhere
           {"name": "c", "total_tps": 50, "memory_gib": 2, "fidelity": 0.4},  # smallest
           {"name": "d", "total_tps": 100, "memory_gib": 5, "fidelity": 0.9},  # equal to a but less faithful
           {"name": "e", "total_tps": 200, "memory_gib": 9, "fidelity": 0.5},  # fastest
           {"name": "f", "total_tps": 300, "memory_gib": 1, "fidelity": None}]  # quality unknown: not ranked
    assert [p["name"] for p in frontier.pareto(pts, ax)] == ["e", "a", "c"]
    assert [p["name"] for p in frontier.pareto(pts, ax[:2])] == ["f"]  # speed and memory alone: f beats all


def test_frontier_and_recommendation_from_records(gpu_results):
    (section,) = collect(gpu_results)
    names = {c["name"] for c in section.candidates}
    assert "bf16-b8" not in names and len(names) == 6  # the failed point is no candidate
    by = {c["name"]: c for c in section.candidates}
    assert by["nf4-b1"]["fidelity"] == 0.4 and by["fp16-b64"]["fidelity"] == 1.0  # joined by precision + cache
    front, with_quality = frontier.frontier(section.candidates, "total_tps")
    assert with_quality
    assert {c["name"] for c in front} == {"fp16-b64", "fp16-b1", "nf4-b64", "nf4-b1", "int8-b1"}

    cfg = ReportConfig()  # TTFT <= 1000, ITL p90 <= 100, fidelity >= 0.9
    r = frontier.recommend(section.candidates, cfg)
    assert r["status"] == "recommended" and r["name"] == "fp16-b64"
    assert r["settings"] == {"runtime": "hf", "device": "cuda", "precision": "fp16", "batch_size": 64,
                             "kv_cache": "dynamic", "attn": "sdpa", "compile": False}
    assert "on the Pareto frontier" in r["reason"] and r["meeting_constraints"] == 3

    cfg = ReportConfig(constraints=ConstraintsConfig(memory_gib=6, ttft_ms=None, itl_p90_ms=None, min_fidelity=0.5))
    r = frontier.recommend(section.candidates, cfg)
    assert r["name"] == "fp16-b1"  # nf4-b64 fits in 6 GiB and is faster, but its fidelity is 0.4

    cfg = ReportConfig(objective="decode_tps", constraints=ConstraintsConfig(memory_gib=3, ttft_ms=None,
                                                                             itl_p90_ms=None, min_fidelity=None))
    assert frontier.recommend(section.candidates, cfg)["name"] == "nf4-b1"


def test_no_configuration_meets_the_constraints_says_which_and_by_how_much(gpu_results):
    (section,) = collect(gpu_results)
    cfg = ReportConfig(constraints=ConstraintsConfig(memory_gib=1.0, ttft_ms=10, itl_p90_ms=None, min_fidelity=0.9))
    r = frontier.recommend(section.candidates, cfg)
    assert r["status"] == "none" and "name" not in r
    check = r["constraint_check"]
    assert check["memory_gib"]["best"] == pytest.approx(1.9) and check["memory_gib"]["short_by"] == pytest.approx(0.9)
    assert check["memory_gib"]["passing"] == 0
    assert check["ttft_ms"]["best"] == 20 and check["ttft_ms"]["short_by"] == 10
    assert check["min_fidelity"]["passing"] == 3  # fp16 b1, fp16 b64, fp32
    assert "peak memory: best 1.9GiB misses the limit 1GiB by 0.9GiB" in r["reason"]
    assert "TTFT: best 20ms misses the limit 10ms by 10ms" in r["reason"]
    assert r["closest"]["name"] and r["closest"]["fails"]


def test_constraints_are_checked_at_load():
    with pytest.raises(ConfigError, match="report.constraints.min_fidelity: 1.5 is out of range"):
        compose(["report.constraints.min_fidelity=1.5"])
    with pytest.raises(ConfigError, match="report.objective: 'speed' is not allowed; choose one of total_tps"):
        compose(["report.objective=speed"])


def test_report_from_two_machines_with_figures_and_mlflow_run(project, gpu_results, tmp_path):
    results = project / "results"
    gpu_results.rename(results)
    # a laptop: CPU records of the same model, no quality scores there
    bench(results, "laptop", "hf-fp32-b1", "fp32", 1, 2.0, 900, 600, 11.0, stage="bench_cpu")
    bench(results, "laptop", "hf-bf16-b1", "bf16", 1, 3.4, 1000, 360, 5.6, stage="bench_cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose([f"tracking.uri={uri}", "report.constraints.min_fidelity=null"])
    doc = build(cfg)
    metrics = project / "metrics"
    recs = {(r["hardware"], r["model"]): r for r in doc["recommendations"]}
    assert recs[("gpu-a", "m")]["name"] == "fp16-b64"
    laptop = recs[("laptop", "m")]  # ITL p90 <= 100 ms: nothing on the laptop streams that fast
    assert laptop["status"] == "none" and "ITL p90: best 360ms misses the limit 100ms by 260ms" in laptop["reason"]
    assert json.loads((metrics / "recommendation.json").read_text()) == json.loads(json.dumps(doc, default=str))
    md = (metrics / "report.md").read_text()
    assert md.index("## m on gpu-a") < md.index("## m on laptop")  # one section per machine, GPU first
    assert "| gpu-a | m | **fp16-b64** | 3,400 |" in md
    assert "bf16-b8" in md and "CUDA out of memory" in md  # the failed point is listed with its reason
    assert "m on laptop: quality not measured" in md
    assert "**transformers, 16-bit vs 4-bit speed at batch 1**: nf4 decodes 35 tokens/s against fp16's 50" in md
    figs = sorted(p.name for p in (metrics / "figures").glob("*.png"))
    assert "gpu-a--m--frontier.png" in figs and "gpu-a--m--throughput.png" in figs and "laptop--m--memory.png" in figs
    for f in figs:
        assert (metrics / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"figures/{f}" in md
    html = (metrics / "report.html").read_text()
    assert "<table>" in html and html.count("data:image/png;base64,") == len(figs)
    assert json.loads((metrics / "report.json").read_text())["gpu-a"]["m"]["total_tps"] == 3400
    csv_rows = (metrics / "plots" / "frontier.csv").read_text().splitlines()
    assert csv_rows[0].startswith("hardware,model,config") and len(csv_rows) == 1 + 6 + 2

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("inferlab")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'report'")
    assert len(runs) == 1 and runs[0].info.run_name == "report-m"
    assert runs[0].data.params["recommended.gpu-a.m"] == "fp16-b64"
    assert runs[0].data.metrics["gpu-a.m.total_tps"] == 3400
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "report.html", "recommendation.json", "figures"} <= arts
    assert len(client.list_artifacts(runs[0].info.run_id, "figures")) == len(figs)
    build(cfg)  # the same report again: no second run
    assert len(client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'report'")) == 1


def test_report_on_missing_and_partial_inputs(project):
    cfg = compose(["tracking.enabled=false"])
    doc = build(cfg)  # no records at all
    md = (project / "metrics" / "report.md").read_text()
    assert doc["recommendations"] == [] and "No records yet" in md
    assert "No GPU benchmark results" in md and "No CPU benchmark results" in md and "No quality scores" in md

    results = project / "results"
    for name in ("nf4-b1", "fp16-b1"):  # a GPU sweep on a machine without CUDA: every point skipped
        bench(results, "laptop", name, name[:-3], 1, 0, 0, 0, 0, status="skipped", reason="CUDA is not available")
    bench(results, "laptop", "hf-fp32-b1", "fp32", 1, 2.0, 900, 60, 11.0, stage="bench_cpu")
    bench(results, "laptop", "hf-nf4-b1", "nf4", 1, 0, 0, 0, 0, stage="bench_cpu", status="failed",
          reason="killed: out of memory")
    doc = build(cfg)
    md = (project / "metrics" / "report.md").read_text()
    assert "No GPU benchmark results" in md and "laptop: skipped (CUDA is not available)" in md
    assert "1 benchmark point(s) failed" in md and "killed: out of memory" in md
    (r,) = doc["recommendations"]
    # fidelity >= 0.9 is asked for and nothing was scored: no recommendation, and the report says why
    assert r["status"] == "none" and "fidelity: not measured for any configuration" in r["reason"]
    assert "16-bit vs 4-bit" in md and "a 16-bit configuration was not measured" in md


def test_child_runs_carry_the_params_the_ui_groups_by(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = rec.Record(stage="bench_gpu", name="nf4-b4-static", config={}, model={"name": "m", "weights": "random"},
                   point={"runtime": "hf", "precision": "nf4", "batch_size": 4, "kv_cache": "static"},
                   environment=_env("gpu-a"), sweep_id="s1", metrics={"total_tps": {"median": 1.0}})
    from inferlab.config import TrackingConfig

    assert Tracker(TrackingConfig(uri=uri, experiment="t")).log([r]).created == 1
    client = MlflowClient(tracking_uri=uri)
    (child,) = client.search_runs([client.get_experiment_by_name("t").experiment_id],
                                  filter_string=f"tags.`{TAG_KIND}` = 'point'")
    assert child.info.run_name == "nf4-b4-static"
    p = child.data.params
    assert (p["precision"], p["batch_size"], p["kv_cache"], p["hardware"], p["runtime"]) == (
        "nf4", "4", "static", "gpu-a", "hf")
