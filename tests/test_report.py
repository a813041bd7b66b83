"""The report stage on constructed records: the Pareto frontier, the recommendation under
constraints (and why none, by how much), several machines in one report, missing and partial
inputs, the MLflow report run."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from inferlab import records as rec
from inferlab.config import ConfigError, ConstraintsConfig, ReportConfig, compose
from inferlab.environment import hardware
from inferlab.report import frontier
from inferlab.report.build import build
from inferlab.report.table import collect
from inferlab.tracking import TAG_KIND, Tracker


def _env(hw: str, instance: str = "i0") -> dict:
    return {"hardware": {"id": hw, "instance": instance}, "git": {"commit": "abc"},
            "libraries": {}}


def bench(results, hw, name, precision, batch, tps, ttft, itl90, mem, status="ok", reason=None,
          stage="bench_gpu", scenario="latency", model="m", sweep=None, instance="i0", digest=None,
          weights="random", **extra):
    point = {"runtime": "hf", "scenario": scenario, "precision": precision, "batch_size": batch,
             "kv_cache": extra.pop("kv_cache", "dynamic"), "attn": "sdpa", "compile": False, "prompt_tokens": 64,
             "new_tokens": 128, **extra}
    metrics = {} if status != "ok" else {
        "decode_tps": {"median": tps / batch, "stdev": 0.1}, "total_tps": {"median": tps},
        "ttft_ms": {"median": ttft}, "itl_ms": {"median": itl90 * 0.9, "p90": itl90},
        "peak_allocated_gib" if stage == "bench_gpu" else "peak_rss_mib": mem if stage == "bench_gpu" else mem * 1024}
    if digest:
        metrics["output_digest"] = digest
    rec.append(results / stage / f"{hw}.jsonl", rec.Record(
        stage=stage, name=name, point=point, config={}, model={"name": model, "weights": weights},
        environment=_env(hw, instance), status=status, reason=reason, metrics=metrics,
        sweep_id=sweep or f"{stage}-{hw}"))


def score(results, hw, precision, kl, model="m", device="cuda", weights="random"):
    """The evaluate stage's records of one configuration: its generation (with its per-token
    figures against the reference, fp32, or as the reference itself) and the score of its
    outputs."""
    name = f"hf-{device}-{precision}-dynamic"
    own = {"tokens": 2000, "perplexity": 10.0 * (1 + kl), "perplexity_ci95": [9.5, 10.5]}
    tokens = ({"own": own, "is_reference": True} if precision == "fp32" else {"own": own, "vs_reference": {
        "kl_mean": kl, "kl_ci95": [kl * 0.9, kl * 1.1], "kl_median": kl / 2, "kl_p99": kl * 5, "kl_max": kl * 20,
        "top1": 1 - kl, "top1_ci95": [1 - kl * 1.2, 1 - kl * 0.8], "ppl_ratio": 1 + kl,
        "ppl_ratio_ci95": [1 + kl * 0.8, 1 + kl * 1.2], "reference": "hf-cuda-fp32-dynamic", "tokens": 2000}})
    point = {"scenario": "quality", "runtime": "hf", "device": device, "precision": precision,
             "kv_cache": "dynamic"}
    gen = rec.Record(stage="evaluate", name=name, point=point, config={},
                     model={"name": model, "weights": weights}, environment=_env(hw),
                     sweep_id="evaluate-x", metrics={"tokens": tokens, "perplexity": 10.0})
    rec.append(results / "evaluate" / f"{hw}.jsonl", gen)
    point = {"scenario": "scores", "of": name, "of_hardware": hw, "runtime": "hf", "device": device,
             "precision": precision, "kv_cache": "dynamic", "generation_record": gen.record_id}
    rec.append(results / "evaluate" / f"{hw}.jsonl", rec.Record(
        stage="evaluate", name=f"scores-{name}", point=point, config={},
        model={"name": model, "weights": weights}, environment=_env("scorer"), sweep_id="evaluate-x",
        metrics={"drift": {"rougeL": 1 - kl, "exact_match": 1 - 2 * kl}, "task": {"rougeL": 0.3}}))


@pytest.fixture
def gpu_results(tmp_path):
    r = tmp_path / "results"
    #            name        precision batch tok/s  TTFT  ITL90 GiB
    bench(r, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3)
    bench(r, "gpu-a", "fp16-b64", "fp16", 64, 3400, 65, 19, 9.0)
    bench(r, "gpu-a", "nf4-b1", "nf4", 1, 35, 38, 31, 1.9)
    bench(r, "gpu-a", "nf4-b64", "nf4", 64, 2100, 68, 32, 5.7)
    # dominated by nf4-b1 unless its quality wins
    bench(r, "gpu-a", "int8-b1", "int8", 1, 16, 75, 63, 2.9)
    # slower and bigger than fp16: the reference itself
    bench(r, "gpu-a", "fp32-b1", "fp32", 1, 30, 30, 36, 10.5)
    bench(r, "gpu-a", "bf16-b8", "bf16", 8, 0, 0, 0, 0, status="failed",
          reason="CUDA out of memory")
    #                  KL from fp32
    score(r, "gpu-a", "fp16", 0.001)
    score(r, "gpu-a", "nf4", 0.3)
    score(r, "gpu-a", "int8", 0.08)
    score(r, "gpu-a", "fp32", 0.0)  # the reference
    return r


def test_pareto_frontier_keeps_exactly_the_non_dominated():
    ax = [("total_tps", +1), ("memory_gib", -1), ("fidelity", +1)]
    pts = [{"name": "a", "total_tps": 100, "memory_gib": 5, "fidelity": 1.0},
           {"name": "b", "total_tps": 90, "memory_gib": 6, "fidelity": 1.0},  # a beats it
           {"name": "c", "total_tps": 50, "memory_gib": 2, "fidelity": 0.4},  # smallest
           {"name": "d", "total_tps": 100, "memory_gib": 5, "fidelity": 0.9},  # a, less faithful
           {"name": "e", "total_tps": 200, "memory_gib": 9, "fidelity": 0.5},  # fastest
           {"name": "f", "total_tps": 300, "memory_gib": 1, "fidelity": None}]  # quality unknown
    assert [p["name"] for p in frontier.pareto(pts, ax)] == ["e", "a", "c"]
    # speed and memory alone: f beats all
    assert [p["name"] for p in frontier.pareto(pts, ax[:2])] == ["f"]


def test_frontier_and_recommendation_from_records(gpu_results):
    (section,) = collect(gpu_results)
    names = {c["name"] for c in section.candidates}
    assert "bf16-b8" not in names and len(names) == 6  # the failed point is no candidate
    by = {c["name"]: c for c in section.candidates}
    assert by["nf4-b1"]["quality"] == 0.3  # joined by precision + cache
    assert by["fp16-b64"]["kl_mean"] == 0.001
    assert by["fp32-b1"]["kl_mean"] == 0.0  # the reference agrees with itself
    assert by["fp32-b1"]["top1"] == 1.0
    assert by["nf4-b1"]["kl_ci_low"] == pytest.approx(0.27)
    assert by["nf4-b1"]["ppl_ratio"] == pytest.approx(1.3)
    front, with_quality = frontier.frontier(section.candidates, "total_tps")
    assert with_quality  # KL: lower is better; the reference (KL 0) is on the frontier too
    assert {c["name"] for c in front} == {"fp16-b64", "fp16-b1", "nf4-b64", "nf4-b1", "int8-b1",
                                          "fp32-b1"}
    # the quality axis by top-1 agreement: higher is better
    (by_top1,) = collect(gpu_results, "top1")
    top1, _ = frontier.frontier(by_top1.candidates, "total_tps", "top1")
    assert {c["name"] for c in top1} == {c["name"] for c in front}

    cfg = ReportConfig()  # TTFT <= 1000, ITL p90 <= 100, KL <= 0.05
    r = frontier.recommend(section.candidates, cfg)
    assert r["status"] == "recommended" and r["name"] == "fp16-b64"
    assert r["settings"] == {"runtime": "hf", "device": "cuda", "precision": "fp16", "batch_size": 64,
                             "kv_cache": "dynamic", "attn": "sdpa", "compile": False}
    assert "on the Pareto frontier" in r["reason"] and r["meeting_constraints"] == 3
    # a decode loop's point names its loop and how it was compiled: what a server needs to serve it
    loop = {**by["fp16-b64"], "kv_cache": "static", "compile": True, "decode": "graph",
            "compile_mode": "reduce-overhead", "gemv": None, "fuse_block": False}
    assert frontier.settings(loop) == {**r["settings"], "kv_cache": "static", "compile": True,
                                       "decode": "graph", "compile_mode": "reduce-overhead"}

    cfg = ReportConfig(constraints=ConstraintsConfig(memory_gib=6, ttft_ms=None, itl_p90_ms=None,
                                                     max_kl=0.25))
    r = frontier.recommend(section.candidates, cfg)
    assert r["name"] == "fp16-b1"  # nf4-b64 fits in 6 GiB and is faster, but its KL is 0.3
    assert r["figures"]["kl_mean"] == 0.001
    assert r["figures"]["top1_ci_low"] == pytest.approx(1 - 0.0012)
    cfg = ReportConfig(constraints=ConstraintsConfig(memory_gib=6, ttft_ms=None, itl_p90_ms=None, max_kl=None,
                                                     min_top1=0.95))
    # nf4's top-1 agreement is 0.7
    assert frontier.recommend(section.candidates, cfg)["name"] == "fp16-b1"

    limits = ConstraintsConfig(memory_gib=3, ttft_ms=None, itl_p90_ms=None, max_kl=None)
    cfg = ReportConfig(objective="decode_tps", constraints=limits)
    assert frontier.recommend(section.candidates, cfg)["name"] == "nf4-b1"


def test_no_configuration_meets_the_constraints_says_which_and_by_how_much(gpu_results):
    (section,) = collect(gpu_results)
    cfg = ReportConfig(constraints=ConstraintsConfig(memory_gib=1.0, ttft_ms=10, itl_p90_ms=None,
                                                     max_kl=0.05))
    r = frontier.recommend(section.candidates, cfg)
    assert r["status"] == "none" and "name" not in r
    check = r["constraint_check"]
    assert check["memory_gib"]["best"] == pytest.approx(1.9)
    assert check["memory_gib"]["short_by"] == pytest.approx(0.9)
    assert check["memory_gib"]["passing"] == 0
    assert check["ttft_ms"]["best"] == 20 and check["ttft_ms"]["short_by"] == 10
    assert check["max_kl"]["passing"] == 3  # fp16 b1, fp16 b64, fp32
    assert "peak memory: best 1.9GiB misses the limit 1GiB by 0.9GiB" in r["reason"]
    assert "TTFT: best 20ms misses the limit 10ms by 10ms" in r["reason"]
    assert r["closest"]["name"] and r["closest"]["fails"]


def test_constraints_are_checked_at_load():
    with pytest.raises(ConfigError, match="report.constraints.min_top1: 1.5 is out of range"):
        compose(["report.constraints.min_top1=1.5"])
    with pytest.raises(ConfigError, match="report.constraints.max_kl: -1.0 is out of range"):
        compose(["report.constraints.max_kl=-1"])
    with pytest.raises(ConfigError, match="report.quality_metric: 'fidelity'"):
        compose(["report.quality_metric=fidelity"])
    allowed = "report.objective: 'speed' is not allowed; choose one of total_tps"
    with pytest.raises(ConfigError, match=allowed):
        compose(["report.objective=speed"])


def test_report_from_two_machines_with_figures_and_mlflow_run(project, gpu_results, tmp_path):
    results = project / "results"
    gpu_results.rename(results)
    # a laptop: CPU records of the same model, no quality scores there
    bench(results, "laptop", "hf-fp32-b1", "fp32", 1, 2.0, 900, 600, 11.0, stage="bench_cpu")
    bench(results, "laptop", "hf-bf16-b1", "bf16", 1, 3.4, 1000, 360, 5.6, stage="bench_cpu")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose([f"tracking.uri={uri}", "report.constraints.max_kl=null"])
    doc = build(cfg)
    metrics = project / "metrics"
    recs = {(r["hardware"], r["model"]): r for r in doc["recommendations"]}
    assert recs[("gpu-a", "m")]["name"] == "fp16-b64"
    laptop = recs[("laptop", "m")]  # ITL p90 <= 100 ms: nothing on the laptop streams that fast
    assert laptop["status"] == "none"
    assert "ITL p90: best 360ms misses the limit 100ms by 260ms" in laptop["reason"]
    written = json.loads((metrics / "recommendation.json").read_text())
    assert written == json.loads(json.dumps(doc, default=str))
    md = (metrics / "report.md").read_text()
    # one section per machine, GPU first
    assert md.index("## m on gpu-a") < md.index("## m on laptop")
    assert "| gpu-a | m | **fp16-b64** | 3,400 |" in md
    assert "bf16-b8" in md  # the failed point is listed with its reason
    assert "CUDA out of memory" in md
    assert "m on laptop: quality not measured" in md
    assert ("**transformers, 16-bit vs 4-bit speed at batch 1**: nf4 decodes 35 tokens/s against "
            "fp16's 50") in md
    # the first section in full; the laptop's a summary here, in full on a page of its own
    page = (metrics / "report" / "laptop--m.md").read_text()
    summary = md.split("## m on laptop")[1]
    assert "[report/laptop--m.md](report/laptop--m.md)" in summary
    assert "### Configurations" not in summary
    assert page.startswith("[← the report](../report.md)")
    assert "### Configurations: speed, memory and quality" in page
    assert sorted(p.name for p in (metrics / "report").iterdir()) == ["index.md", "laptop--m.md"]
    index = (metrics / "report" / "index.md").read_text()
    assert "- m on gpu-a: [in the report](../report.md)" in index and "- [m on laptop](laptop--m.md)" in index
    figs = sorted(p.name for p in (metrics / "figures").glob("*.png"))
    assert "gpu-a--m--frontier.png" in figs
    assert "gpu-a--m--throughput.png" in figs
    assert "laptop--m--memory.png" in figs
    for f in figs:
        link = f"](figures/{f})" in md if f.startswith("gpu-a") else f"](../figures/{f})" in page
        assert (metrics / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and link, f
    html = (metrics / "report.html").read_text()  # every section, the laptop's folded
    assert "<table>" in html and html.count("data:image/png;base64,") == len(figs)
    assert html.count("<details>") == 1
    assert "<summary>m on laptop: no recommendation</summary>" in html
    here = {"hardware": hardware()["id"], "model": "phi-2"}  # the model configured: no records
    assert json.loads((metrics / "answer.json").read_text()) == {**here, "recommended": "no records"}
    csv_rows = (metrics / "plots" / "frontier.csv").read_text().splitlines()
    assert csv_rows[0].startswith("hardware,model,config") and len(csv_rows) == 1 + 6 + 2

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("inferlab")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'report'")
    assert len(runs) == 1 and runs[0].info.run_name == f"report: phi-2 on {here['hardware']}"
    assert runs[0].data.params["recommended.gpu-a.m"] == "fp16-b64"
    assert runs[0].data.metrics["gpu-a.m.total_tps"] == 3400
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"report.md", "report.html", "recommendation.json", "figures"} <= arts
    assert len(client.list_artifacts(runs[0].info.run_id, "figures")) == len(figs)
    build(cfg)  # the same report again: no second run
    reports = f"tags.`{TAG_KIND}` = 'report'"
    assert len(client.search_runs([exp.experiment_id], filter_string=reports)) == 1
    # the laptop's records gone: its page goes with them
    (results / "bench_cpu" / "laptop.jsonl").unlink()
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    # (the index stays: git keeps no empty folder, and DVC reruns a stage whose out is missing)
    assert [p.name for p in (metrics / "report").iterdir()] == ["index.md"]
    assert "## m on laptop" not in (metrics / "report.md").read_text()


def test_report_on_missing_and_partial_inputs(project):
    cfg = compose(["tracking.enabled=false"])
    doc = build(cfg)  # no records at all
    md = (project / "metrics" / "report.md").read_text()
    assert doc["recommendations"] == [] and "No records yet" in md
    assert "No GPU benchmark results" in md
    assert "No CPU benchmark results" in md
    assert "No quality scores" in md

    results = project / "results"
    for name in ("nf4-b1", "fp16-b1"):  # a GPU sweep on a machine without CUDA: all skipped
        bench(results, "laptop", name, name[:-3], 1, 0, 0, 0, 0, status="skipped",
              reason="CUDA is not available", weights="real")
    bench(results, "laptop", "hf-fp32-b1", "fp32", 1, 2.0, 900, 60, 11.0, stage="bench_cpu",
          weights="real")
    bench(results, "laptop", "hf-nf4-b1", "nf4", 1, 0, 0, 0, 0, stage="bench_cpu", status="failed",
          reason="killed: out of memory", weights="real")
    doc = build(cfg)
    md = (project / "metrics" / "report.md").read_text()
    assert "No GPU benchmark results" in md and "laptop: skipped (CUDA is not available)" in md
    assert "1 benchmark point(s) failed" in md and "killed: out of memory" in md
    (r,) = doc["recommendations"]
    # KL <= 0.05 is asked for, no quality was measured: no recommendation, and the report says why
    assert r["status"] == "none"
    assert "KL divergence: not measured for any configuration" in r["reason"]
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


def test_comparisons_pair_points_of_one_sweep_and_show_the_spread_across_sweeps(project):
    """One point measured in two sweeps on two machine instances at different speeds (a host-bound
    point): each comparison takes both of its sides from one sweep, the spread across sweeps is
    shown and flagged, and two points that never shared a sweep are not compared."""
    results = project / "results"
    #                          name          precision batch tok/s TTFT ITL90 GiB
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 40, 20, 26, 5.3, sweep="sweep-a",
          instance="host-1", kv_cache="dynamic")
    bench(results, "gpu-a", "nf4-b1", "nf4", 1, 30, 30, 35, 1.9, sweep="sweep-a",
          instance="host-1")
    bench(results, "gpu-a", "bf16-b1-dyn", "bf16", 1, 41, 20, 25, 5.3, sweep="sweep-a",
          instance="host-1")
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 60, 15, 17, 5.3, sweep="sweep-b",
          instance="host-2", kv_cache="dynamic")
    bench(results, "gpu-a", "fp16-b1-nokv", "fp16", 1, 56, 18, 19, 5.2, sweep="sweep-b",
          instance="host-2", kv_cache="none")
    bench(results, "gpu-a", "bf16-b1-static", "bf16", 1, 70, 20, 15, 5.3, sweep="sweep-b",
          instance="host-2", kv_cache="static")
    bench(results, "gpu-a", "int8-b1", "int8", 1, 20, 40, 55, 2.9, sweep="sweep-b",
          instance="host-2")
    doc = build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    kv = next(x for x in md.splitlines() if x.startswith("- **KV cache (fp16, batch 1)**"))
    # the pair of sweep b (60 against 56), never sweep a's 40 against sweep b's 56 (1.40x)
    assert "dynamic cache 60 tokens/s" in kv and "no KV cache 56 tokens/s (0.93×)" in kv
    assert "sweep `sweep-b` on instance `host-2`" in kv and "1.40×" not in md
    head = next(line for line in md.splitlines() if "16-bit vs 4-bit speed at batch 1" in line)
    # both from sweep a
    assert "nf4 decodes 30 tokens/s against fp16's 40 tokens/s (0.75× the speed)" in head
    assert "sweep `sweep-a` on instance `host-1`" in head
    bf16 = next(x for x in md.splitlines() if x.startswith("- **KV cache (bf16, batch 1)**"))
    assert "never in one sweep" in bf16 or "not compared" in bf16
    assert "70 tokens/s" not in bf16 or "(1.71×)" not in bf16
    # the point measured twice: median (range), count of sweeps, flagged as moving with the machine
    assert "50 (40–60), 2 sweeps ⚠" in md
    assert "fp16-b1: decode_tps ranges 40% across 2 sweeps on 2 machine instances" in md
    # the frontier and the recommendation rank one sweep's points: sweep b's four (a holds three)
    (r,) = doc["recommendations"]
    assert r["status"] == "recommended" and r["name"] == "bf16-b1-static"
    assert ("Ranked together: the 4 configurations measured in sweep `sweep-b` on instance "
            "`host-2`") in md
    assert "### Measured in other sweeps" in md
    assert "nf4-b1" in md.split("### Measured in other sweeps")[1]
    # the DVC metrics carry the same spread
    from inferlab.aggregate import write_aggregates

    summary = write_aggregates(compose([]), "bench_gpu")
    point = summary["gpu-a"]["models"]["m"]["points"]["fp16-b1"]
    spread = point["decode_tps_across_sweeps"]
    assert (spread["sweeps"], spread["median"], spread["min"], spread["max"]) == (2, 50.0, 40.0, 60.0)
    assert "moves with the machine" in spread["sensitive"] and point["sweep_id"] == "sweep-b"


def test_spread_across_sweeps_stays_with_its_hardware_and_the_newest_gpu_comes_first(project):
    """One point id measured on an older GPU (gpu-a, first by name) in two sweeps and on a newer
    GPU in one: the newer GPU's section shows no spread borrowed from the older GPU's sweeps,
    and comes first (the older GPU's section is history)."""
    results = project / "results"
    #                          name       precision batch tok/s TTFT ITL90 GiB
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 40, 20, 26, 5.3, sweep="old-1",
          instance="host-1")
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 60, 15, 17, 5.3, sweep="old-2",
          instance="host-2")
    bench(results, "gpu-b", "fp16-b1", "fp16", 1, 90, 15, 12, 5.3, sweep="new-1",
          instance="host-3")
    bench(results, "gpu-b", "nf4-b1", "nf4", 1, 80, 15, 13, 1.9, sweep="new-1", instance="host-3")
    old = results / "bench_gpu" / "gpu-a.jsonl"  # measured a year before
    old.write_text("".join(json.dumps({**json.loads(line), "timestamp": "2025-11-26T12:00:00+00:00"}) + "\n"
                           for line in old.read_text().splitlines()))
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    assert md.index("## m on gpu-b") < md.index("## m on gpu-a")
    new = md.split("## m on gpu-b")[1].split("## m on gpu-a")[0]
    history = (project / "metrics" / "report" / "gpu-a--m.md").read_text()  # the older GPU's page
    fp16_new = next(line for line in new.splitlines() if line.startswith("| fp16-b1 |"))
    assert "2 sweeps" not in fp16_new and "(40–60)" not in fp16_new and "| 90 |" in fp16_new
    assert "50 (40–60), 2 sweeps" in history


def test_a_comparison_made_in_two_sweeps_over_other_configurations_shows_both(project):
    """The KV-cache comparison is complete in three sweeps: b (ranked) and c compare the same
    configurations, a compares another: b's sentence, then a's, each within its own sweep; c is
    counted, not repeated."""
    results = project / "results"
    for sweep, host, kv, tps in (("sweep-a", "h1", "static", 45), ("sweep-b", "h2", "none", 56),
                                 ("sweep-c", "h3", "none", 50)):
        bench(results, "gpu-a", "fp16-b1", "fp16", 1, 40 if sweep == "sweep-a" else 60, 20, 26,
              5.3, sweep=sweep, instance=host, kv_cache="dynamic")
        bench(results, "gpu-a", f"fp16-b1-{kv}", "fp16", 1, tps, 18, 19, 5.2, sweep=sweep,
              instance=host, kv_cache=kv)
    bench(results, "gpu-a", "int8-b1", "int8", 1, 20, 40, 55, 2.9, sweep="sweep-b", instance="h2")
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    kv = [line for line in md.splitlines() if line.startswith("- **KV cache (fp16, batch 1)**")]
    assert len(kv) == 2, kv
    assert "no KV cache 56" in kv[0]
    assert "sweep `sweep-b` on instance `h2`; the same comparison in 1 other" in kv[0]
    assert "static" in kv[1]
    assert "sweep `sweep-a` on instance `h1`)" in kv[1]
    assert "no KV cache" not in kv[1]


def test_decode_loops_say_whether_they_made_generates_tokens(project):
    """Each decode loop's measured tokens (their digest) against generate()'s for the same prompts,
    in one sweep."""
    results = project / "results"
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 26, 5.3, sweep="s", digest="aaaa")
    bench(results, "gpu-a", "fp16-b1-graph", "fp16", 1, 480, 20, 2.1, 5.3, sweep="s",
          digest="aaaa", kv_cache="static", decode="graph")
    bench(results, "gpu-a", "fp16-b1-kernels", "fp16", 1, 560, 20, 1.8, 5.5, sweep="s",
          digest="bbbb", kv_cache="static", decode="kernels")
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("- **Decode loop (fp16, batch 1)**"))
    graph = line.split("CUDA-graph loop")[1].split("hand-written step")[0]
    kernels = line.split("hand-written step")[1]
    assert "; the same tokens as generate())" in graph and "differ" not in graph
    assert "; tokens differ from generate()'s for the same prompts" in kernels
    assert "generate()" not in line.split("CUDA-graph loop")[0]  # generate() itself: nothing said


def test_the_fastest_of_each_kind_and_the_peer_side_by_side_per_sweep(project):
    """Two sweeps on one GPU: the section's table shows each sweep's fastest point of each kind
    (transformers at 16 and 4 bits, the peer llama.cpp, batching) in that sweep's own row; a
    kind a sweep did not measure is blank."""
    results = project / "results"
    #                          name        precision batch tok/s TTFT ITL90 GiB
    bench(results, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 26, 5.3, sweep="s1", instance="h1")
    bench(results, "gpu-a", "fp16-b1-graph", "fp16", 1, 480, 20, 2.1, 5.3, sweep="s1",
          instance="h1", kv_cache="static", decode="graph")
    bench(results, "gpu-a", "int4-b1-graph", "int4-inductor", 1, 549, 20, 1.9, 2.1, sweep="s1",
          instance="h1", kv_cache="static", decode="graph")
    bench(results, "gpu-a", "fp16-b64", "fp16", 64, 12475, 60, 4.7, 9.4, sweep="s1", instance="h1")
    bench(results, "gpu-a", "gpu-f16", None, 1, 262, 14, 3.8, 0, sweep="s1", instance="h1",
          runtime="llama_cpp", quant="f16")
    bench(results, "gpu-a", "gpu-q4_0", None, 1, 360, 10, 2.8, 0, sweep="s1", instance="h1",
          runtime="llama_cpp", quant="q4_0")
    bench(results, "gpu-a", "fp16-b1-kernels", "fp16", 1, 560, 24, 1.8, 5.5, sweep="s2",
          instance="h2", kv_cache="static", decode="kernels")
    bench(results, "gpu-a", "int4-b1-kernels", "int4-inductor", 1, 643, 33, 1.6, 2.1, sweep="s2",
          instance="h2", kv_cache="static", decode="kernels")
    # a CPU sweep on the GPU machine's host (same hardware id): not beside the GPU's figures
    bench(results, "gpu-a", "cpu-bf16-b1", "bf16", 1, 3, 900, 300, 0.7, sweep="c1", instance="h1",
          stage="bench_cpu")
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    part = md.split("### The fastest of each kind, sweep by sweep")[1].split("###")[0]
    lines = [x for x in part.splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {x.split("|")[1].strip(): dict(zip(head[1:], (c.strip() for c in x.split("|")[2:-1])))
            for x in lines[2:]}
    # the ranked sweep first
    assert list(rows) == ["sweep `s1` on instance `h1`", "sweep `s2` on instance `h2`"]
    assert "transformers, 8-bit, batch 1" not in head  # measured in neither sweep
    s1, s2 = rows["sweep `s1` on instance `h1`"], rows["sweep `s2` on instance `h2`"]
    assert s1 == {"transformers, 16-bit, batch 1": "480 (fp16-b1-graph)",
                  "transformers, 4-bit, batch 1": "549 (int4-b1-graph)", "llama.cpp, 16-bit": "262 (gpu-f16)",
                  "llama.cpp, 4-bit": "360 (gpu-q4_0)", "transformers, batch > 1 (total tokens/s)": "12,475 (fp16-b64)"}
    assert s2 == {"transformers, 16-bit, batch 1": "560 (fp16-b1-kernels)",
                  "transformers, 4-bit, batch 1": "643 (int4-b1-kernels)", "llama.cpp, 16-bit": "",
                  "llama.cpp, 4-bit": "", "transformers, batch > 1 (total tokens/s)": ""}


def test_a_random_weight_4_bit_point_shows_its_formats_quality_on_real_weights(project):
    """phi-2-random's 4-bit points have no quality of their own (random weights); the same format
    scored on a real model (another machine) stands beside the fastest 4-bit point, labelled as
    another model's; a format never scored on real weights gets nothing."""
    results = project / "results"
    bench(results, "gpu-a", "fp16-b1-graph", "fp16", 1, 480, 20, 2.1, 5.3, kv_cache="static",
          decode="graph")
    bench(results, "gpu-a", "int4-b1-graph", "int4-inductor", 1, 549, 20, 1.9, 2.1,
          kv_cache="static", decode="graph")
    for precision, kl in (("fp32", 0.0), ("int4-inductor", 0.121)):
        score(results, "cpu-b", precision, kl, model="real-m", device="cpu", weights="real")
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    line = next(x for x in md.split("## m on gpu-a")[1].splitlines()
                if x.startswith("- **Fastest batch-1 decoding (transformers)**"))
    assert "4-bit's KL divergence from full precision not measured" in line
    assert ("The same format on real weights (int4-inductor, real-m on cpu-b, evaluate stage; another model and "
            "machine, so what the format costs there, not this configuration's own figure)") in line
    assert "KL divergence from full precision 0.121 (0.109–0.133) nats per token" in line
    assert "top-1 agreement 87.9% (85.5%–90.3%)" in line
    assert "perplexity ratio 1.1210 (1.0968–1.1452)" in line
    # a faster nf4 point, a format never scored on real weights: its line says nothing of the kind
    bench(results, "gpu-a", "nf4-b1", "nf4", 1, 600, 20, 1.7, 2.0)
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    line = next(x for x in md.split("## m on gpu-a")[1].splitlines()
                if x.startswith("- **Fastest batch-1 decoding (transformers)**"))
    assert "nf4-b1" in line and "on real weights" not in line
    # a 4-bit point with a quality of its own (its section's weights scored here): nothing borrowed
    score(results, "gpu-a", "fp32", 0.0)
    score(results, "gpu-a", "nf4", 0.3)
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    line = next(x for x in md.split("## m on gpu-a")[1].splitlines()
                if x.startswith("- **Fastest batch-1 decoding (transformers)**"))
    assert "nf4-b1" in line and "KL divergence from full precision 0.3 nats/token" in line
    assert "on real weights" not in line


def _loop_score(results, hw, precision, loop, kl, model="m", weights="random"):
    """An evaluate record of a decode loop scored through its own step (no task outputs)."""
    vs = {"kl_mean": kl, "kl_ci95": [kl * 0.9, kl * 1.1], "top1": 1 - kl, "top1_ci95": [1 - kl * 1.2, 1 - kl * 0.8],
          "ppl_ratio": 1 + kl, "ppl_ratio_ci95": [1 + kl * 0.8, 1 + kl * 1.2], "reference": "hf-cuda-fp32-dynamic"}
    point = {"scenario": "quality", "runtime": "hf", "device": "cuda", "precision": precision, "kv_cache": "static",
             "decode": "graph", "compile": True, "loop": loop}
    rec.append(results / "evaluate" / f"{hw}.jsonl", rec.Record(
        stage="evaluate", name=f"hf-cuda-{precision}-graph", point=point, config={},
        model={"name": model, "weights": weights}, environment=_env(hw), sweep_id="evaluate-x",
        metrics={"tokens": {"own": {"tokens": 2000, "perplexity": 10.0}, "vs_reference": vs,
                            "scored_by": f"the {loop} step, fed one position at a time"}}))


def test_a_decode_loop_takes_the_quality_scored_through_its_own_step(project):
    """A graph-loop point is joined with the quality of its own step, never with generate()'s
    forward pass of the same precision; where the two KL intervals do not overlap, the report
    says so."""
    from inferlab.config import loop_path

    r = project / "results"
    loop_settings = {"decode": "graph", "compile": True, "compile_mode": "reduce-overhead",
                     "batch_size": 1}
    loop = loop_path(loop_settings)
    bench(r, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3, weights="real")
    bench(r, "gpu-a", "fp16-b1-graph", "fp16", 1, 400, 5, 3, 5.4, weights="real",
          kv_cache="static", compile=True, decode="graph", compile_mode="reduce-overhead")
    score(r, "gpu-a", "fp32", 0.0, weights="real")
    score(r, "gpu-a", "fp16", 0.001, weights="real")
    # a broken kernel: far from fp16's forward pass
    _loop_score(r, "gpu-a", "fp16", loop, 0.2, weights="real")
    (s,) = collect(r)
    by = {c["name"]: c for c in s.candidates}
    assert by["fp16-b1"]["kl_mean"] == 0.001 and by["fp16-b1-graph"]["kl_mean"] == 0.2
    assert by["fp16-b1-graph"]["quality_config"] == "hf-cuda-fp16-graph"
    doc = build(compose(["tracking.enabled=false"]))
    (answer,) = doc["recommendations"]
    assert answer["name"] == "fp16-b1"  # the fast loop fails KL <= 0.05 through its own step
    md = (project / "metrics" / "report.md").read_text()
    assert f"hf-cuda-fp16-graph ({loop}), scored through its own step" in md
    assert ("**differs beyond their intervals** (higher) from hf-cuda-fp16-dynamic's forward "
            "pass") in md
    csv = (project / "metrics" / "plots" / "quality.csv").read_text() if (
        project / "metrics" / "plots" / "quality.csv").exists() else ""
    assert csv == "" or "scored_by" in csv.splitlines()[0]


def test_a_random_weight_section_answers_on_speed_and_memory(project):
    """Random weights: no quality limit can be checked, so the answer is the fastest configuration
    within the latency limits, says quality is not measurable there, and gives the same format's
    figure on real weights."""
    r = project / "results"
    bench(r, "gpu-a", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3, model="rand")
    bench(r, "gpu-a", "nf4-b1", "nf4", 1, 60, 20, 21, 2.0, model="rand")
    # TTFT over the 1 s limit
    bench(r, "gpu-a", "fp16-b64", "fp16", 64, 3000, 2000, 90, 9.0, model="rand")
    score(r, "cpu-b", "fp32", 0.0, model="real-m", device="cpu", weights="real")
    score(r, "cpu-b", "nf4", 0.25, model="real-m", device="cpu", weights="real")
    doc = build(compose(["tracking.enabled=false"]))
    (answer,) = [a for a in doc["recommendations"] if a["model"] == "rand"]
    assert answer["status"] == "recommended" and answer["name"] == "nf4-b1"
    assert answer["quality"] == "quality not measurable on random weights"
    assert "the same format on real weights (nf4, real-m on cpu-b: another model and machine): KL divergence " \
           "from full precision 0.25 (0.225–0.275) nats per token" in answer["reason"]
    md = (project / "metrics" / "report.md").read_text()
    assert "| gpu-a | rand | **nf4-b1** |" in md


def circle(graph: dict[str, set[str]]) -> list[str]:
    """An import circle in a graph of modules (module -> the modules it imports), else []."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return []
        for after in sorted(graph.get(name, ())):
            if found := visit(after, [*path, name]):
                return found
        done.add(name)
        return []

    return next((found for name in sorted(graph) if (found := visit(name, []))), [])


def test_the_report_package_has_no_import_circle():
    """Every module of inferlab.report imports (at the top or inside a function) only modules below
    it."""
    from .test_dependencies import SRC, imports_of

    folder = SRC / "inferlab" / "report"
    graph = {f"inferlab.report.{p.stem}": {m for m in imports_of(f"inferlab.report.{p.stem}", p)
                                           if m.startswith("inferlab.report.")}
             for p in folder.glob("*.py") if p.stem != "__init__"}
    assert len(graph) >= 7 and graph["inferlab.report.build"]  # the package was read
    assert circle(graph) == []
    # the check finds a circle: render importing comparisons, which imports render
    assert circle({"r": {"c"}, "c": {"t", "r"}, "t": set()}) == ["c", "r", "c"]


def test_two_sweeps_batching_at_other_batch_sizes_are_two_comparisons(project):
    """4-bit batching compared at batch 16 in one sweep and at batch 64 in another compares other
    configurations: both are shown (the sentences once differed only in figures, which were
    taken out to tell whether two sweeps compared the same points)."""
    results = project / "results"
    for sweep, host, batch in (("sweep-a", "h1", 16), ("sweep-b", "h2", 64)):
        for precision, tps in (("fp16", 50), ("nf4", 35)):
            bench(results, "gpu-a", f"{precision}-b1", precision, 1, tps, 20, 26, 5.3, sweep=sweep,
                  instance=host)
            bench(results, "gpu-a", f"{precision}-b{batch}", precision, batch, tps * batch * 0.6,
                  60, 30, 8.0, sweep=sweep, instance=host)
    build(compose(["tracking.enabled=false", "report.constraints.max_kl=null"]))
    md = (project / "metrics" / "report.md").read_text()
    topic = "- **transformers, 4-bit with and without batching**"
    lines = [x for x in md.splitlines() if x.startswith(topic)]
    assert len(lines) == 2, lines
    assert {"batch 16" in x for x in lines} == {True, False}
    assert {"batch 64" in x for x in lines} == {True, False}
    assert not any("the same comparison in" in x for x in lines)


def test_a_comparison_is_known_by_what_it_compares_not_by_its_figures():
    """Two sweeps compared the same configurations where their comparisons differ in figures."""
    from dataclasses import replace

    from inferlab.report.comparisons import Comparison, Side

    a = Comparison("nf4 batching", "batching", (Side("nf4", "nf4-b16", {"total_tps": 336.0}),),
                   {"batch": 16})
    faster = replace(a, sides=(Side("nf4", "nf4-b16", {"total_tps": 512.0}),))
    bigger = replace(a, settings={"batch": 64})
    other_point = replace(a, sides=(Side("nf4", "nf4-b16-static", {"total_tps": 336.0}),))
    assert a.configurations() == faster.configurations()
    assert a.configurations() != bigger.configurations()
    assert a.configurations() != other_point.configurations()
    assert a.made and not replace(a, missing="batch 1 only").made
