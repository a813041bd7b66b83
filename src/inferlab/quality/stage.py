"""Stage `evaluate`: generation where the model runs, scoring anywhere from the stored outputs.

Generation: every configuration (transformers precision x KV cache on CUDA and on the CPU, llama.cpp quant type x
KV-cache type) runs in a benchmark worker, writes its greedy outputs per sample to
results/evaluate/outputs/<hardware>/<model>/<config>.jsonl and records its perplexity on the held-out passage. Points
that cannot run here (no CUDA, no GGUF file) are recorded as skipped; an interrupted run resumes.

Scoring: every generation record of the model (from any machine) is scored against the reference precision
of its runtime on the same hardware (fidelity) and against the references (task quality). A score record is
made once per (generation, reference, scorer); rescoring what is unchanged is skipped. Models with random
weights are scored too, and every figure is marked as not meaningful.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.backends import hf
from inferlab.bench.sweep import Point, run_sweep
from inferlab.config import StudyConfig, resolve, usable_cores
from inferlab.quality import dataset
from inferlab.quality.scores import BertScorer, compare, mean_of, token_fidelity
from inferlab.study import StageRun

log = logging.getLogger(__name__)

STAGE = "evaluate"
PINS = ("runtime", "precision", "quant", "kv_cache", "kv_type")  # the pins that select evaluation configurations
NOT_MEANINGFUL = ("random weights: these scores and this perplexity measure nothing about language quality; "
                  "they show that the pipeline runs and how far a configuration's outputs drift from its "
                  "reference, no more")


def outputs_dir(cfg: StudyConfig, hardware: str, model: str | None = None) -> Path:
    """results/evaluate/outputs/<hardware>/<model>/: one JSONL file per configuration."""
    return resolve(cfg.paths.results) / STAGE / "outputs" / hardware / (model or cfg.model.name)


def _keep(settings: dict[str, Any], pins: dict[str, Any]) -> bool:
    return all(settings.get(k) == v for k, v in pins.items() if k in settings)


def generation_points(cfg: StudyConfig, items: list[dataset.Item], passage: str, hardware: str,
                      cuda_problem: str | None) -> list[Point]:
    e = cfg.evaluate
    pins = {k: v for k, v in cfg.pins().items() if k in PINS}
    runtime = pins.pop("runtime", None)
    common = {"scenario": "quality", "items_digest": dataset.digest(items, passage, e), "n_items": len(items),
              "max_new_tokens": dict(e.max_new_tokens), "ppl_window": e.perplexity.window,
              "ppl_stride": e.perplexity.stride}
    load = {"items": [{**asdict(i), "prompt": dataset.prompt(i, e.templates)} for i in items], "passage": passage,
            "outputs_dir": str(outputs_dir(cfg, hardware))}
    cores = usable_cores()
    bnb_missing = importlib.util.find_spec("bitsandbytes") is None
    points: list[Point] = []
    if runtime in (None, "hf"):
        for device, section in (("cuda", e.gpu), ("cpu", e.cpu)):
            if not section.enabled:
                continue
            for precision in section.precisions:
                for kv in section.kv_cache:
                    settings = {**common, "device": device, "precision": precision, "kv_cache": kv, "attn": "sdpa",
                                "compile": False, "compute_dtype": section.compute_dtype,
                                "batch_size": section.batch_size, "threads": cores if device == "cpu" else 0}
                    if not _keep(settings, pins):
                        continue
                    skip = None
                    if device == "cuda" and cuda_problem:
                        skip = cuda_problem
                    elif precision in hf.BNB and bnb_missing:
                        skip = "bitsandbytes is not installed (pip install 'inferlab[gpu]')"
                    elif precision in hf.TORCHAO and importlib.util.find_spec("torchao") is None:
                        skip = "torchao is not installed (pip install torchao)"
                    points.append(Point(f"hf-{device}-{precision}-{kv}", "hf", ("hf", device, precision), settings,
                                        {**load, "model_dir": str(cfg.model_dir() / "hf")}, skip))
    L = e.llama_cpp
    if runtime in (None, "llama_cpp") and L.enabled:
        from inferlab.gguf.pipeline import gguf_path, missing_gguf

        for quant in L.quants:
            for kv in L.kv_type:
                settings = {**common, "quant": quant, "kv_type": kv, "flash_attn": kv != "f16",
                            "n_threads": L.n_threads or cores, "n_batch": 512, "n_ctx": L.n_ctx, "logits_all": True,
                            "batch_size": 1}
                if not _keep(settings, pins):
                    continue
                path, skip = gguf_path(cfg, quant), missing_gguf(cfg, quant)
                points.append(Point(f"llama-{quant}-kv{kv}", "llama_cpp", ("llama_cpp", quant), settings,
                                    {**load, "model_path": str(path)}, skip))
    return points


def _family(p: dict[str, Any]) -> tuple:
    return ("hf", p.get("device")) if p.get("runtime") == "hf" else ("llama_cpp",)


def _config_of(p: dict[str, Any]) -> tuple:
    return (p.get("precision"), p.get("kv_cache")) if p.get("runtime") == "hf" else (p.get("quant"), p.get("kv_type"))


def reference_config(cfg: StudyConfig, point: dict[str, Any]) -> tuple:
    e = cfg.evaluate
    if point.get("runtime") == "hf":
        section = e.gpu if point.get("device") == "cuda" else e.cpu
        return (section.reference, section.kv_cache[0])
    return (e.llama_cpp.reference, e.llama_cpp.kv_type[0])


def _hardware(r: rec.Record) -> str:
    return r.environment.get("hardware", {}).get("id", "?")


def _records(results: Path) -> list[rec.Record]:
    return rec.read_all(sorted((results / STAGE).glob("*.jsonl")))


def _generations(cfg: StudyConfig, recs: list[rec.Record]) -> list[rec.Record]:
    """The latest generation record of each configuration per hardware, for this model."""
    best: dict[tuple, rec.Record] = {}
    for r in recs:
        if r.point.get("scenario") != "quality" or r.model.get("name") != cfg.model.name:
            continue
        key = (_hardware(r), r.point_id)
        if key not in best or r.timestamp >= best[key].timestamp:
            best[key] = r
    return sorted(best.values(), key=lambda r: (_hardware(r), r.name))


def _outputs(cfg: StudyConfig, r: rec.Record) -> list[dict[str, Any]]:
    path = outputs_dir(cfg, _hardware(r), r.model.get("name")) / r.metrics["outputs_file"]
    if not path.exists():
        raise FileNotFoundError(f"the outputs file {path} of {r.name} on {_hardware(r)} is missing")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != r.metrics.get("outputs_sha256"):
        raise ValueError(f"{path} does not match the checksum its generation record holds (rewritten since?)")
    return [json.loads(line) for line in blob.decode().splitlines() if line.strip()]


def score(cfg: StudyConfig, stage: StageRun, bert: BertScorer) -> int:
    """Score every generation of this model not scored yet with the same reference and scorer."""
    recs = _records(resolve(cfg.paths.results))
    done = {r.point_id for r in recs if r.point.get("scenario") == "scores" and r.status == "ok"}
    made = 0
    ok = [g for g in _generations(cfg, recs) if g.status == "ok"]
    for n, g in enumerate(ok, 1):
        hw = _hardware(g)
        wanted = reference_config(cfg, g.point)
        ref = next((r for r in ok if _hardware(r) == hw and _family(r.point) == _family(g.point)
                    and _config_of(r.point) == wanted
                    and r.point.get("items_digest") == g.point.get("items_digest")), None)
        point = {"scenario": "scores", "of": g.name, "of_point": g.point_id, "of_hardware": hw,
                 "generation_record": g.record_id, "reference_record": ref.record_id if ref else None,
                 "reference": "-".join(map(str, wanted)), "scorer": bert.info(),
                 **{k: g.point[k] for k in ("runtime", "device", "precision", "kv_cache", "quant", "kv_type",
                                            "batch_size") if k in g.point}}
        if rec.point_id(STAGE, {"model": stage.model["name"], **point}) in done:
            continue
        log.info("[%d/%d] scoring %s from %s", n, len(ok), g.name, hw)
        try:
            metrics, samples = _score_one(cfg, g, ref, bert)
        except (FileNotFoundError, ValueError) as e:
            stage.record(f"scores-{g.name}", point, status="failed", reason=str(e))
            continue
        stage.record(f"scores-{g.name}", point, metrics=metrics, samples=samples)
        made += 1
    return made


def _score_one(cfg: StudyConfig, g: rec.Record, ref: rec.Record | None,
               bert: BertScorer) -> tuple[dict[str, Any], dict[str, list[float]]]:
    rows = _outputs(cfg, g)
    answers = [r["answer"] for r in rows]
    task = compare(answers, [r["reference"] for r in rows], bert)
    metrics: dict[str, Any] = {
        "meaningful": g.model.get("weights") == "real", "items": len(rows),
        "generated_tokens": g.metrics.get("generated_tokens"), "perplexity": g.metrics["perplexity"],
        "task": mean_of(task), "scorer": bert.info(),
        "task_by_kind": {kind: mean_of({k: [v[i] for i, r in enumerate(rows) if r["task"] == kind]
                                        for k, v in task.items()})
                         for kind in dict.fromkeys(r["task"] for r in rows)},
    }
    if not metrics["meaningful"]:
        metrics["note"] = NOT_MEANINGFUL
    samples = {f"task_{k}": v for k, v in task.items() if k in ("rougeL", "bertscore_f1")}
    if ref is None:
        metrics["fidelity_missing"] = (f"no {'-'.join(map(str, reference_config(cfg, g.point)))} outputs from the "
                                       "same runtime and hardware to compare with")
        return metrics, samples
    ref_rows = {r["item_id"]: r for r in _outputs(cfg, ref)}
    missing = [r["item_id"] for r in rows if r["item_id"] not in ref_rows]
    if missing:
        raise ValueError(f"the reference {ref.name} lacks items {missing[:5]}")
    pairs = [ref_rows[r["item_id"]] for r in rows]
    fid = {**compare(answers, [p["answer"] for p in pairs], bert),
           **token_fidelity([r["output_ids"] for r in rows], [p["output_ids"] for p in pairs])}
    ref_ppl = ref.metrics["perplexity"]
    metrics.update(fidelity=mean_of(fid), reference=ref.name, reference_perplexity=ref_ppl,
                   perplexity_delta=round(g.metrics["perplexity"] - ref_ppl, 6),
                   perplexity_ratio=round(g.metrics["perplexity"] / ref_ppl, 6))
    samples.update({f"fidelity_{k}": v for k, v in fid.items() if k in ("rougeL", "bertscore_f1", "first_diff")})
    return metrics, samples


QUALITY_SETTINGS = ("hardware", "model", "weights", "meaningful", "config", "status", "runtime", "device",
                    "precision", "quant", "kv_cache", "kv_type")
QUALITY_FIGURES = ("perplexity", "perplexity_delta", "perplexity_ratio",
                   "fidelity_rouge1", "fidelity_rouge2", "fidelity_rougeL", "fidelity_bertscore_f1", "exact_match",
                   "first_diff", "task_rouge1", "task_rouge2", "task_rougeL", "task_bertscore_f1", "reason")
QUALITY_COLUMNS = QUALITY_SETTINGS + QUALITY_FIGURES


def quality_rows(results: Path) -> list[dict[str, Any]]:
    """One row per configuration (hardware of generation, model, config): its latest score, or why it has
    none (a failed or skipped generation)."""
    latest: dict[tuple, tuple[tuple, rec.Record]] = {}
    for r in _records(results):
        sc = r.point.get("scenario")
        hw = r.point.get("of_hardware") if sc == "scores" else _hardware(r)
        name = r.point.get("of") if sc == "scores" else r.name
        key = (hw, r.model.get("name"), name)
        rank = (sc == "scores" and r.status == "ok", r.timestamp)  # a score beats a generation record
        if key not in latest or rank >= latest[key][0]:
            latest[key] = (rank, r)
    rows = []
    for (hw, model, name), (_, r) in sorted(latest.items(), key=lambda kv: tuple(map(str, kv[0]))):
        m = r.metrics if r.point.get("scenario") == "scores" else {}
        fid, task = m.get("fidelity", {}), m.get("task", {})
        row = {"hardware": hw, "model": model, "weights": r.model.get("weights"),
               "meaningful": r.model.get("weights") == "real", "config": name,
               "status": r.status if m or r.status != "ok" else "not scored",
               **{k: r.point.get(k, "") for k in ("runtime", "device", "precision", "quant", "kv_cache", "kv_type")},
               "perplexity": m.get("perplexity", ""), "perplexity_delta": m.get("perplexity_delta", ""),
               "perplexity_ratio": m.get("perplexity_ratio", ""),
               **{f"fidelity_{k}": fid.get(k, "") for k in ("rouge1", "rouge2", "rougeL", "bertscore_f1")},
               "exact_match": fid.get("exact_match", ""), "first_diff": fid.get("first_diff", ""),
               **{f"task_{k}": task.get(k, "") for k in ("rouge1", "rouge2", "rougeL", "bertscore_f1")},
               "reason": (r.reason or m.get("fidelity_missing") or "")[:200]}
        rows.append(row)
    return rows


def write_aggregates(cfg: StudyConfig) -> dict[str, Any]:
    import csv
    import io

    rows = quality_rows(resolve(cfg.paths.results))
    summary: dict[str, Any] = {}
    for r in rows:
        model = summary.setdefault(r["hardware"], {}).setdefault(r["model"], {
            "weights": r["weights"], "meaningful": r["meaningful"], "configs": {}})
        if not r["meaningful"]:
            model["note"] = NOT_MEANINGFUL
        model["configs"][r["config"]] = {k: r[k] for k in QUALITY_FIGURES if r[k] not in ("", None)} | {
            "status": r["status"]}
    metrics = resolve(cfg.paths.metrics)
    rec.write_json(metrics / "quality.json", summary)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(QUALITY_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    rec.write_atomic(metrics / "plots" / "quality.csv", buf.getvalue())
    return summary


def run(cfg: StudyConfig, stage: StageRun, stage_file: Path) -> None:
    e = cfg.evaluate
    items = dataset.load_items(e.dataset)  # fails before any model loads
    passage = dataset.passage(cfg.evaluate)
    bert = BertScorer(e.bertscore) if e.score else None  # a bad scorer setting fails before generation
    from inferlab.bench.gpu import cuda_problem

    need_cuda = e.gpu.enabled and cfg.pins().get("runtime") in (None, "hf")
    problem = cuda_problem() if need_cuda else None
    if problem:
        log.warning("evaluate: %s; the CUDA configurations are recorded as skipped", problem)
    points = generation_points(cfg, items, passage, stage.env["hardware"]["id"], problem)
    log.info("evaluate: %d items (%s), %d configurations", len(items),
             ", ".join(f"{t} {sum(i.task == t for i in items)}" for t in dict.fromkeys(i.task for i in items)),
             len(points))
    run_sweep(stage, points, resolve(e.dataset.path), {}, e.point_timeout_s, e.retry_failed, [stage_file],
              lambda m: None)
    if bert is not None:
        made = score(cfg, stage, bert)
        log.info("evaluate: %d configuration(s) scored", made)
    write_aggregates(cfg)
