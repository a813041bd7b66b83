"""The answer about the run just made comes first: at the end of `inferlab study`, at the top of the report, in the
MLflow report run's description; other machines' and models' records follow as history. The DVC metrics are that
answer."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from inferlab.config import compose
from inferlab.console import answer
from inferlab.environment import hardware
from inferlab.report.build import build
from inferlab.tracking import TAG_KIND

from .test_report import bench


def test_the_run_just_made_answers_first_and_other_machines_follow_as_history(project, tmp_path):
    here = hardware()["id"]
    results = project / "results"
    # a GPU machine's records (shipped in git, say), which the report would otherwise put first
    bench(results, "gpu-a", "fp16-b64", "fp16", 64, 3400, 65, 19, 9.0, model="phi-2-random")
    bench(results, "gpu-b", "fp16-b1", "fp16", 1, 50, 20, 21, 5.3, model="phi-2-random")
    # this machine's CPU records of the model studied, and of another model
    bench(results, here, "hf-fp32-b1", "fp32", 1, 20.0, 300, 60, 1.0, stage="bench_cpu", model="smollm2-135m")
    bench(results, here, "hf-fp32-b1", "fp32", 1, 90.0, 30, 12, 0.2, stage="bench_cpu", model="tiny-phi")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    doc = build(compose(["model=smollm2-135m", f"tracking.uri={uri}", "report.constraints.max_kl=null"]))
    assert doc["studied"] == {"hardware": here, "model": "smollm2-135m"}
    md = (project / "metrics" / "report.md").read_text()
    sections = [line for line in md.splitlines() if line.startswith("## ") and " on " in line]
    assert sections[0] == f"## smollm2-135m on {here}", sections  # this run's section opens the report
    history = md.index("# History: other machines and models")
    assert md.index(sections[0]) < history < min(md.index(s) for s in sections[1:])
    assert md.index(f"| {here} | smollm2-135m |") < md.index("| gpu-a |")  # the answer table too

    lines = answer(project / "metrics")
    assert lines[0].startswith(f"The answer for smollm2-135m on {here} (this machine, the model studied)")
    assert lines[1].startswith("  hf-fp32-b1 (") and "20.0 tokens/s" in lines[1]
    assert lines[2].startswith("Other machines and models with records")
    others = lines[3:-2]
    assert lines[-2].startswith("Report: ") and lines[-1].startswith("MLflow: `inferlab ui`")
    assert len(others) == 3 and {line.split(":")[0].strip() for line in others} == {
        "phi-2-random on gpu-a", "phi-2-random on gpu-b", f"tiny-phi on {here}"}
    assert all(len(line.replace(str(project), "")) <= 200 for line in lines)  # the project's own path aside

    # the DVC metrics: this machine's answer for the model studied, a handful of figures
    metrics = json.loads((project / "metrics" / "answer.json").read_text())
    assert list(metrics.items()) == [("total_tps", 20.0), ("ttft_ms", 300), ("itl_p90_ms", 60), ("memory_gib", 1.0),
                                     ("recommended", "hf-fp32-b1"), ("hardware", here), ("model", "smollm2-135m")]

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("inferlab")
    (run,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'report'")
    assert run.info.run_name == f"report: smollm2-135m on {here}"  # short; the answer is its description
    assert run.data.tags["mlflow.note.content"] == "\n".join(lines[:-2])
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # "Model training"
