"""Stage `report`: the study's answer, from the records only.

Writes metrics/report.md (+ report.html with the figures embedded, or a placeholder that says HTML is off),
metrics/figures/*.png, metrics/recommendation.json (what `inferlab serve` loads: the same inputs give the same
file), metrics/answer.json (DVC metrics) and metrics/plots/frontier.csv (DVC plots), and logs them as the artifacts
of one MLflow report run. Missing or partial inputs make a report that says what is missing, never an error; a
metrics folder or output file that cannot be written stops it before any work.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

from inferlab import records as rec
from inferlab.config import StudyConfig, resolve, to_container
from inferlab.environment import environment
from inferlab.report import answer, comparisons, figures, frontier, render
from inferlab.report.table import Section, collect
from inferlab.stage import check_storage
from inferlab.tracking import Tracker

log = logging.getLogger(__name__)

STAGE = "report"
OUTPUTS = ("report.md", "report.html", "recommendation.json", "answer.json", "plots/frontier.csv")
HTML_OFF = ("<!doctype html>\n<html><body><p>HTML output is off (<code>report.html: false</code>); the report is "
            "<code>metrics/report.md</code>.</p></body></html>\n")
FRONTIER_COLUMNS = ("hardware", "model", "config", "stage", "runtime", "precision", "quant", "batch_size",
                    "n_threads", "kv_cache", "kv_type", "compile", "decode_tps", "total_tps", "ttft_ms",
                    "itl_p90_ms", "memory_gib", "kl_mean", "top1", "ppl_ratio", "quality", "on_frontier",
                    "recommended")


def _frontier_csv(results: list[tuple[Section, dict[str, Any]]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FRONTIER_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for s, r in results:
        front = set(r.get("frontier", []))
        for c in s.candidates:
            w.writerow({**{k: c.get(k, "") for k in FRONTIER_COLUMNS}, "hardware": s.hardware, "model": s.model,
                        "on_frontier": c["name"] in front, "recommended": r.get("point") == c["name"]})
    return buf.getvalue()


ANSWER_METRICS = ("ttft_ms", "itl_p90_ms", "memory_gib", "kl_mean", "top1")  # after the objective's figure


def answer_metrics(results: list[tuple[Section, dict[str, Any]]], studied: dict[str, str],
                   objective: str) -> dict[str, Any]:
    """The DVC metrics (metrics/answer.json): the studied machine and model's recommendation and a handful of its
    figures, so `dvc metrics show` is one row and `dvc metrics diff` a changelog of the answer. Figures first, names
    last: `dvc exp show` keeps this order and folds a table too wide for the terminal from the right. Every other
    machine's answer is in recommendation.json."""
    r = next((r for s, r in results if (s.hardware, s.model) == (studied["hardware"], studied["model"])), None)
    figures = (r or {}).get("figures") or {}
    out = {k: figures[k] for k in (objective, *ANSWER_METRICS) if figures.get(k) is not None}
    return out | {"recommended": "no records" if r is None else r.get("name") or "none", **studied}


def build(cfg: StudyConfig) -> dict[str, Any]:
    """Everything the report says, written to metrics/; returns the recommendation document."""
    rc = cfg.report
    results_dir, metrics_dir = resolve(cfg.paths.results), resolve(cfg.paths.metrics)
    check_storage(cfg, folders=[(f"paths.metrics ({sub})", metrics_dir / sub) for sub in ("figures", "plots")],
                  files=[("the report output", metrics_dir / name) for name in OUTPUTS])
    env = environment()
    studied = {"hardware": env["hardware"]["id"], "model": cfg.model.name}  # this machine, the configured model
    sections = this_run_first(collect(results_dir, rc.quality_metric, rc.models), studied)
    n_records = sum(len(s.rows) + len(s.quality) for s in sections)
    log.info("report: %d hardware/model section(s) from %d records", len(sections), n_records)
    real = comparisons.real_quality(sections)  # what each format costs on real weights, for random-weight sections
    fig_dir = metrics_dir / "figures"
    drawn: set[Path] = set()
    results, parts = [], []
    for s in sections:
        cands = s.candidates
        rcm = frontier.recommend(cands, rc, quality=s.weights != "random")
        if rcm.get("quality") == frontier.NO_QUALITY:
            rcm["reason"] += comparisons.same_format_elsewhere(rcm, s, real)
        front, with_quality = frontier.frontier(cands, rc.objective, rc.quality_metric)
        figs = figures.draw_all(s, front, with_quality, rc.objective, fig_dir, rcm.get("point"))
        drawn.update(p for _, p in figs)
        headline = comparisons.together(s, comparisons.headline)
        caching = comparisons.together(s, comparisons.cache_and_streaming)
        faster = comparisons.together(s, functools.partial(comparisons.faster_decoding, real=real))
        parts.append(render.section_md(s, rcm, headline, caching, figs, metrics_dir, {c["name"] for c in front},
                                       faster, comparisons.profiles(s.merged()), comparisons.side_by_side(s)))
        results.append((s, rcm))
        log.info("report: %s: %s%s", s.title, rcm["status"],
                 f" {rcm['name']}" if rcm["status"] == "recommended" else f" ({rcm['reason'][:160]})")
    for stale in fig_dir.glob("*.png") if fig_dir.is_dir() else ():
        if stale not in drawn:  # figures of a section that no longer exists
            stale.unlink()
    header = {"records": n_records, "generated": rec.now()[:16].replace("T", " ") + " UTC",
              "commit": (env["git"].get("commit") or "unknown")[:10], "objective": rc.objective,
              "constraints": {k: v for k, v in to_container(rc.constraints).items() if v is not None},
              "quality_metric": rc.quality_metric}
    ours = bool(sections) and (sections[0].hardware, sections[0].model) == (studied["hardware"], studied["model"])
    md = render.report_md(parts, render.answer_table(results) if results else "No records yet: run the study.",
                          render.missing_inputs(sections), header, history_from=1 if ours else 0)
    rec.write_atomic(metrics_dir / "report.md", md)
    # an output DVC declares exists either way: with html off, a placeholder that says so
    rec.write_atomic(metrics_dir / "report.html", render.to_html(md, metrics_dir) if rc.html else HTML_OFF)
    document = {  # no time of its own: a rerun on the same records writes the same file (serve_bench depends on it)
        "objective": rc.objective, "quality_metric": rc.quality_metric, "constraints": header["constraints"],
        "git_commit": env["git"].get("commit"), "studied": studied,
        "recommendations": [{"hardware": s.hardware, "model": s.model, "weights": s.weights, **r}
                            for s, r in results],
    }
    rec.write_json(metrics_dir / "recommendation.json", document)
    rec.write_atomic(metrics_dir / "answer.json", json.dumps(answer_metrics(results, studied, rc.objective), indent=2)
                     + "\n")  # in this order (write_json sorts)
    rec.write_atomic(metrics_dir / "plots" / "frontier.csv", _frontier_csv(results))
    log.info("report written: %s (%d figures), recommendation.json", metrics_dir / "report.md", len(drawn))
    # the same report (its text without the time it was made) is logged to MLflow once
    digest = hashlib.sha256(md.replace(header["generated"], "").encode()).hexdigest()[:16]
    _log_mlflow(cfg, document, sorted(drawn), metrics_dir, digest)
    return document


def this_run_first(sections: list[Section], studied: dict[str, str]) -> list[Section]:
    """The section of this machine and the configured model first; the others after it, in their order."""
    mine = [s for s in sections if (s.hardware, s.model) == (studied["hardware"], studied["model"])]
    return mine + [s for s in sections if s not in mine]


def run_name(document: dict[str, Any]) -> str:
    """The report's MLflow run name: short; what it answers is the run's description (answer.lines)."""
    studied = document.get("studied") or {}
    return f"report: {studied['model']} on {studied['hardware']}" if studied else "report"


def _log_mlflow(cfg: StudyConfig, document: dict[str, Any], figs: list[Path], metrics_dir: Path, digest: str) -> None:
    params: dict[str, Any] = {"objective": document["objective"], "quality_metric": document["quality_metric"],
                              **{f"constraint.{k}": v for k, v in document["constraints"].items()}}
    metrics: dict[str, float] = {}
    for r in document["recommendations"]:
        key = f"{r['hardware']}.{r['model']}"
        params[f"recommended.{key}"] = r.get("name", "none")
        for k, v in (r.get("figures") or {}).items():
            if v is not None:
                metrics[f"{key}.{k}"] = float(v)
    files = [metrics_dir / n for n in ("report.md", "report.html", "recommendation.json", "answer.json")]
    Tracker(cfg.tracking).log_report(run_name(document), params, metrics, [f for f in files if f.is_file()], figs,
                                     digest, description="\n".join(answer.lines(document)))


def run(cfg: StudyConfig) -> dict[str, Any]:
    return build(cfg)
